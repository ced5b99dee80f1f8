/* longattn neighborhood attention (NATTEN semantics, semantics.md "Neighborhood
 * attention"): the C ABI shared by the CUDA launcher and the Rust side (bindgen).
 *
 * Layout: q, o: [batch, tokens, heads_q, head_dim]; k, v: [batch, tokens, heads_kv,
 * head_dim], the grid flattened row-major into the token axis (the last dim fastest);
 * element strides, head_dim contiguous. lse: [batch, heads_q, tokens] f32, natural log.
 *
 * The grid always has LA_NA_DIMS dims: a rank-r problem puts its dims last and fills the
 * leading ones with (length 1, kernel 1, dilation 1, stride 1, non-causal), which change no
 * window and no token index, so one kernel serves every rank. */
#ifndef LONGATTN_NEIGHBORHOOD_H
#define LONGATTN_NEIGHBORHOOD_H

#include <stdint.h>

#include "longattn/dense.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LA_NA_DIMS 3

typedef struct LaNeighborhoodParams {
  const void *q;
  const void *k;
  const void *v;
  void *o;
  /* Optional (NULL: not written). */
  float *lse;

  /* Element strides; the head_dim stride is 1. */
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;

  int32_t batch, heads_q, heads_kv, head_dim;
  /* Per dim, outermost first: length L >= 1, kernel k >= 1 with k * dilation <= L,
   * dilation >= 1, stride 1 <= s <= k (1 on causal dims), causal 0 or 1. */
  int32_t length[LA_NA_DIMS];
  int32_t kernel[LA_NA_DIMS];
  int32_t dilation[LA_NA_DIMS];
  int32_t stride[LA_NA_DIMS];
  int32_t causal[LA_NA_DIMS];
  /* Product of the lengths. */
  int64_t tokens;

  /* Softmax scale applied to q.k; softcap <= 0 disables the tanh cap. */
  float scale, softcap;
  LaDtype dtype;
} LaNeighborhoodParams;

/* Portable kernel (CUDA cores, any device the build targets): any head_dim multiple of 8 up
 * to 256, f16 or bf16. Returns a cudaError_t value (0 on success; cudaErrorInvalidValue for
 * params the Rust API refuses, before any CUDA call) and never synchronizes. */
int la_neighborhood_forward(const LaNeighborhoodParams *params, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
