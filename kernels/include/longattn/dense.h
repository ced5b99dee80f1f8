/* longattn dense (flash) attention: the C ABI shared by the CUDA
 * launchers and the Rust side (bindgen generates src/ffi.rs from this file).
 *
 * Conventions (see semantics.md):
 *   q:   [batch, seqlen_q, heads_q,  head_dim]   element strides, last dim contiguous
 *   k,v: [batch, seqlen_k, heads_kv, head_dim]
 *   o:   like q
 *   lse: [batch, heads_q, seqlen_q] f32, natural log; with varlen [heads_q, total_q]
 * Windows use FlashAttention's (left, right) with -1 meaning unbounded; causal is (-1, 0).
 * No CUDA header is included here so that bindgen needs only a plain C toolchain. */
#ifndef LONGATTN_DENSE_H
#define LONGATTN_DENSE_H

#include <stdint.h>

/* Relative to this file, so that bindgen (which has no include path) finds it too. The merge
 * ABI (la_merge) has its own header, merge.h. */
#include "types.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct LaDenseParams {
  const void *q;
  const void *k;
  const void *v;
  void *o;
  /* Optional (NULL: not written). */
  float *lse;
  /* Optional packed-batch offsets, length batch + 1 (NULL: fixed lengths). */
  const int32_t *cu_seqlens_q;
  const int32_t *cu_seqlens_k;

  /* Element strides; the head_dim stride is 1. Unused batch strides are 0 with varlen. */
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;

  int32_t batch;
  /* Fixed lengths, or the maximum over the batch with varlen. */
  int32_t seqlen_q, seqlen_k;
  int32_t heads_q, heads_kv, head_dim;
  /* Total packed query / key rows with varlen (the LSE row stride, and the row extents the
   * Hopper kernel's tensor maps cover); seqlen_q / seqlen_k otherwise. */
  int32_t total_q, total_k;

  /* Mask: window (-1 = unbounded side) plus `sinks` leading keys, causal-clipped. */
  int32_t window_left, window_right, sinks;
  /* Softmax scale applied to q.k; softcap <= 0 disables the tanh cap. */
  float scale, softcap;
  LaDtype dtype;
} LaDenseParams;

/* Kernel variants the dense dispatcher may run. */
typedef enum LaDenseKernel {
  /* Pick the fastest kernel that supports the problem. */
  LA_DENSE_AUTO = 0,
  /* Portable CUDA-core kernel: any head_dim multiple of 8 up to 256. */
  LA_DENSE_SIMT = 1,
  /* Tensor-core kernel (mma.sync, sm_80+) at head_dim 64, 128, 256: LA_DENSE_MMA_PADDED's
   * kernel, refusing the head dims it would pad. */
  LA_DENSE_MMA = 2,
  /* Hopper tensor-core kernel (wgmma, sm_90a: compute capability 9.0 only): head_dim 64, 128,
   * 256. */
  LA_DENSE_WGMMA = 3,
  /* Tensor-core kernel on the shared mainloop (mma.sync, sm_80+): any head_dim up to 256,
   * padded inside the kernel (verified on an H200, 2026-12-04, for multiples of 8). AUTO picks
   * it on sm_80+ wherever LA_DENSE_WGMMA does not run. Head dims that are not a multiple of 8
   * run here only (by name; AUTO refuses them): an element-wise variant without 16-byte
   * alignment needs, not yet run on a GPU. */
  LA_DENSE_MMA_PADDED = 4,
  /* Tensor-core kernel (mma.sync, sm_80+) packing the heads_q / heads_kv query heads that
   * share a kv head into one 64-row tile (at most 64 of them; head_dim a multiple of 8 up to
   * 256): short query sequences (chunked prefill, speculative decoding) fill the tile instead
   * of leaving most of its rows empty. By name only; not yet run on a GPU. */
  LA_DENSE_MMA_GQA = 5,
  /* Hopper tensor-core kernel for short sliding windows (wgmma, sm_90a: compute capability 9.0
   * only), head_dim a multiple of 8 up to 192 (padded inside to 64, 128 or 192 channels):
   * 64-key tiles, each 64-row half of a query tile visiting only the key tiles its rows see,
   * persistent blocks walking query tiles with the next one's loads in flight. Any mask runs;
   * it is built for windows of 256 to a few thousand keys. By name only; not yet run on a
   * GPU. */
  LA_DENSE_WGMMA_WINDOW = 6,
  /* LA_DENSE_WGMMA_WINDOW's persistent walk with LA_DENSE_WGMMA's 128-key tiles (64 at head
   * dims above 128), for any dense problem (sm_90a, head dims as LA_DENSE_WGMMA_WINDOW): one
   * block per SM walks the query tiles, loading the next tile's Q and first keys while it
   * finishes the current one, so the per-tile prologue and epilogue that dominate 1k-token
   * problems overlap work. By name only; not yet run on a GPU. */
  LA_DENSE_WGMMA_PERSISTENT = 7,
  /* LA_DENSE_MMA_GQA's packing on the Hopper mainloop (wgmma, sm_90a: compute capability 9.0
   * only): the heads_q / heads_kv query heads of a kv head (at most 128) share one 128-row
   * tile, floor(128 / group) positions each; head_dim 64, 128 or 256. For short query
   * sequences over a long K/V. By name only; not yet run on a GPU. */
  LA_DENSE_WGMMA_GQA = 8,
  /* LA_DENSE_WGMMA with 176-key tiles (FlashAttention-3's d128 tile without a mask): f16/bf16,
   * head_dim 128, full attention only (no causal mask, window or sinks; softcap runs), sm_90a.
   * Fewer per-tile fixed costs per key than the 128-key tiles. By name only; not yet run on a
   * GPU. */
  LA_DENSE_WGMMA_WIDE = 9
} LaDenseKernel;

/* Returned by la_dense_forward when the kernel asked for by name (not AUTO) cannot run these
 * params on the current device (equals cudaErrorNotSupported). */
#define LA_DENSE_KERNEL_UNSUPPORTED 801

/* All launchers return a cudaError_t value (0 on success) and never synchronize. */
int la_dense_forward(const LaDenseParams *params, LaDenseKernel kernel, cudaStream_t stream);
/* Whether `kernel` (not AUTO) supports these params on the current device. */
int la_dense_kernel_supports(const LaDenseParams *params, LaDenseKernel kernel);
/* Why `kernel` cannot run these params on the current device, completing "the kernel cannot
 * run this problem here: ..." (a static string), or NULL when it can. */
const char *la_dense_kernel_unsupported_reason(const LaDenseParams *params, LaDenseKernel kernel);
const char *la_error_string(int error);

#ifdef __cplusplus
}
#endif

#endif
