/* longattn ring attention: the running-state and deferred merges of a ring rank (C ABI shared by the CUDA
 * launchers and the Rust side through bindgen).
 *
 * A rank's running state is f32, laid out per (batch, head) like the CPU ring's:
 *   acc_o:   [batch, heads, len, head_dim] f32
 *   acc_lse: [batch, heads, len] f32, natural log; -inf = no key seen yet (acc_o row 0)
 * A ring piece covers query rows [row0, row0 + rows) of the shard; its dense call wrote
 *   o:   [batch, rows, heads, head_dim] in the output dtype, element strides below
 *   lse: [batch, heads, rows] f32
 * The merge is the LSE merge of semantics.md with the CPU's empty-state rule (both -inf
 * stays o = 0, lse = -inf). */
#ifndef LONGATTN_RING_H
#define LONGATTN_RING_H

#include <stdint.h>

#include "longattn/dense.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct LaRingMergeParams {
  const void *o;
  const float *lse;
  float *acc_o;
  float *acc_lse;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int32_t batch, heads, head_dim;
  /* Rows of the piece, rows of the shard (the state's row extent), the piece's first row. */
  int32_t rows, len, row0;
  LaDtype dtype;
} LaRingMergeParams;

/* Writes the running state into the output (dtype, element strides) and, when lse is not
 * NULL, the natural-log LSE [batch, heads, len]. */
typedef struct LaRingFinalizeParams {
  const float *acc_o;
  const float *acc_lse;
  void *out;
  float *lse;
  int64_t out_batch_stride, out_row_stride, out_head_stride;
  int32_t batch, heads, len, head_dim;
  LaDtype dtype;
} LaRingFinalizeParams;

/* The deferred merge (opt-in): every piece of a rank's whole ring wrote its (o, lse) into a
 * slot of its own, and one launch combines each shard row's slots at the end.
 * slots [slot_count][4] = (o_offset, lse_offset, row0, rows): slot s's o lies at
 * slots_o + o_offset, [batch, rows, heads, head_dim] contiguous in the output dtype, its lse
 * at slots_lse + lse_offset, [batch, heads, rows] f32; it covers shard rows [row0, row0 + rows).
 * segments [segment_count][4] = (start, end, first, count): shard rows [start, end) are
 * covered by the slots slot_list[first .. first + count) (count 0: no key, o = 0, lse = -inf);
 * sorted, tiling [0, len). out (dtype, element strides) and, when lse is not NULL, lse
 * [batch, heads, len] = the LSE merge of the covering slots, one pass per row; head_dim a
 * multiple of 4 up to 256. */
typedef struct LaRingGatherParams {
  const void *slots_o;
  const float *slots_lse;
  const int64_t *slots;
  const int32_t *segments;
  const int32_t *slot_list;
  void *out;
  float *lse;
  int64_t out_batch_stride, out_row_stride, out_head_stride;
  int32_t segment_count, batch, heads, len, head_dim;
  LaDtype dtype;
} LaRingGatherParams;

/* acc_o[0 .. rows * head_dim) = 0, acc_lse[0 .. rows) = -inf. */
int la_ring_state_init(float *acc_o, float *acc_lse, int64_t rows, int32_t head_dim,
                       cudaStream_t stream);
int la_ring_merge(const LaRingMergeParams *params, cudaStream_t stream);
int la_ring_finalize(const LaRingFinalizeParams *params, cudaStream_t stream);
int la_ring_gather(const LaRingGatherParams *params, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
