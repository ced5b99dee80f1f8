/* longattn paged prefill: attention of q_len new query tokens per sequence (or
 * cu_seqlens_q[b + 1] - cu_seqlens_q[b] of them, varlen) over the sequence's K/V in the
 * paged cache (which already holds the new tokens), as dense attention with seqlen_q = that
 * count, seqlen_k = seqlens_k[b] over the gathered tokens (chunked prefill, prefix caching). The C ABI shared by the CUDA launcher and the Rust side
 * (bindgen generates the FFI from this file).
 *
 * Conventions (see semantics.md, "Extension: paged prefill"):
 *   cache:  as in paged.h (LaPagedCache: NHD pages, block_table, seqlens_k)
 *   q, o:   [batch, q_len, heads_q, head_dim] element strides, last dim contiguous; varlen:
 *           [total_q, heads_q, head_dim] packed rows (batch strides unused)
 *   lse:    [batch, heads_q, q_len] f32, natural log; varlen: [heads_q, total_q]
 * The window is FlashAttention's (left, right), -1 unbounded, aligned bottom-right: query
 * row i of sequence b sits at position seqlens_k[b] - q_len_b + i. The kernel's previous
 * version passed on an H200 (sm_90a, 2026-12-04); the current one is not yet verified. */
#ifndef LONGATTN_PAGED_PREFILL_H
#define LONGATTN_PAGED_PREFILL_H

#include <stdint.h>

/* Relative to this file, so that bindgen (which has no include path) finds them too. */
#include "paged.h"
#include "types.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct LaPagedPrefillParams {
  /* Read only (k_cache, v_cache, block_table, seqlens_k). Validated on the host: page ids
   * in range for every token below seqlens_k, seqlens_k within the table row. */
  LaPagedCache cache;
  const void *q;
  void *o;
  /* Optional (NULL: not written). */
  float *lse;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  /* q_len: rows per sequence, or with cu_seqlens_q the longest sequence's (grid x). */
  int32_t q_len, heads_q;
  /* Optional (NULL: every sequence has q_len rows): [batch + 1] row offsets of the packed
   * queries, nondecreasing from 0, and total_q = cu_seqlens_q[batch] (validated on the
   * host). */
  const int32_t *cu_seqlens_q;
  int32_t total_q;
  /* Window (-1 = unbounded side) plus `sinks` leading keys (they obey the right bound). */
  int32_t window_left, window_right, sinks;
  /* Softmax scale applied to q.k; softcap <= 0 disables the tanh cap. */
  float scale, softcap;
  /* Element type of q / o. */
  LaDtype dtype;
  /* Element type of the cache: dtype, or LA_F8E4M3 with kv_scales [2, heads_kv] f32 (k
   * scales, then v scales; a cached value is e4m3 * scale, see paged.h). */
  LaDtype kv_dtype;
  const float *kv_scales;
} LaPagedPrefillParams;

/* Query rows one prefill block serves (grid x = ceil(q_len / LA_PAGED_PREFILL_ROWS)). */
#define LA_PAGED_PREFILL_ROWS 64

/* Tensor cores (mma.sync, sm_80+); f16/bf16, head_dim 64, 128 or 256. Returns a cudaError_t
 * value (0 on success; cudaErrorInvalidValue for bad arguments, cudaErrorNotSupported when
 * the device cannot run it) and never synchronizes. */
int la_paged_prefill(const LaPagedPrefillParams *params, cudaStream_t stream);

/* Hopper tensor cores (wgmma + TMA bulk copies of whole pages, sm_90a: compute capability 9.0
 * only; kernels/paged_prefill_wgmma.cu), the same params and semantics as la_paged_prefill:
 * f16/bf16 caches of q's dtype (no FP8), head_dim 64, 128 or 256, page_size a power of two
 * >= 16, 16-byte aligned q/k_cache/v_cache/o and strides the copy engine can address.
 * COMPILED ONLY, NOT YET RUN ON A GPU. Returns cudaErrorInvalidValue for bad arguments (as
 * la_paged_prefill), cudaErrorNotSupported (801) where it cannot run these params on the
 * current device (la_paged_prefill_wgmma_unsupported_reason says why), else the launch's
 * cudaError_t value; never synchronizes. */
int la_paged_prefill_wgmma(const LaPagedPrefillParams *params, cudaStream_t stream);
/* Why la_paged_prefill_wgmma cannot run these params on the current device (a static
 * string completing "the kernel cannot run this problem here: ..."), or NULL when it can.
 * Reads the scalars and pointer values only, never device memory. */
const char *la_paged_prefill_wgmma_unsupported_reason(const LaPagedPrefillParams *params);

#ifdef __cplusplus
}
#endif

#endif
