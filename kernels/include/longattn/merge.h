/* longattn merge of two partial attention results: the C ABI shared by the CUDA launcher
 * (kernels/merge.cu) and the Rust side (bindgen generates the FFI from this file). */
#ifndef LONGATTN_MERGE_H
#define LONGATTN_MERGE_H

#include <stdint.h>

/* Relative to this file, so that bindgen (which has no include path) finds it too. */
#include "types.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Merges two partial results over disjoint key sets, row by row:
 *   o:   [rows, heads, head_dim] contiguous (rows = batch * seqlen)
 *   lse: [batch, heads, seqlen] f32 natural log
 * out_o/out_lse may alias a_o/a_lse (in-place accumulation). */
typedef struct LaMergeParams {
  const void *a_o;
  const float *a_lse;
  const void *b_o;
  const float *b_lse;
  void *out_o;
  float *out_lse;
  int32_t batch, seqlen, heads, head_dim;
  LaDtype dtype;
} LaMergeParams;

/* Returns a cudaError_t value (0 on success) and never synchronizes. */
int la_merge(const LaMergeParams *params, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
