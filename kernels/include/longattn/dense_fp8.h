/* longattn FP8 (e4m3) dense forward on Hopper: the C ABI of kernels/dense_wgmma_fp8.cu
 * (bindgen generates the Rust side from this file). Semantics: docs/semantics.md, "FP8 dense
 * forward". No CUDA header is included here so that bindgen needs only a plain C toolchain. */
#ifndef LONGATTN_DENSE_FP8_H
#define LONGATTN_DENSE_FP8_H

#include <stdint.h>

#include "dense.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Keys per tile of the FP8 definition (P quantised against the running max per tile), the
 * kernel's key tile. */
#define LA_FP8_KEY_TILE 128
/* Keys between consecutive sequences' regions in the V^T scratch, beyond their rounding to
 * 16 (see LaDenseFp8Params.vt). */
#define LA_FP8_VT_SEQ_GAP 144

typedef struct LaDenseFp8Params {
  /* q, k, v: e4m3 codes (element strides are byte strides); o: `base.dtype` (LA_BF16 or
   * LA_F16); every other field as for the 16-bit dense kernels. */
  LaDenseParams base;
  /* Device descale factors, [batch, heads_kv] f32 each (FlashAttention-3's convention). */
  const float *q_descale;
  const float *k_descale;
  const float *v_descale;
  /* Device scratch, [heads_kv, head_dim, vt_keys] e4m3, written by the kernel's pre-pass
   * (stream-ordered, before the attention kernel): V transposed, keys permuted within each
   * group of 32. Sequence b occupies keys [start_b, start_b + ceil(seqlen_k(b) / 128) * 128)
   * of every row, start_b = round_up_16(k0_b) + LA_FP8_VT_SEQ_GAP * b with k0_b its first
   * packed key row (cu_seqlens_k[b], or b * seqlen_k for fixed lengths); keys past seqlen_k(b)
   * are zeros. vt_keys is a multiple of 16, at least round_up_16(rows_k) +
   * LA_FP8_VT_SEQ_GAP * batch (rows_k = total_k, or batch * seqlen_k), below 2^31. */
  void *vt;
  int64_t vt_keys;
} LaDenseFp8Params;

/* Runs the FP8 forward on `stream` (never synchronizes): the V^T pre-pass, then the attention
 * kernel. Returns a cudaError_t value: cudaErrorInvalidValue for invalid params,
 * LA_DENSE_KERNEL_UNSUPPORTED (cudaErrorNotSupported) where the kernel cannot run them here
 * (la_dense_fp8_unsupported_reason says why). */
int la_dense_fp8_forward(const LaDenseFp8Params *params, cudaStream_t stream);
/* Why the FP8 kernel cannot run these params on the current device (a static string
 * completing "the kernel cannot run this problem here: ..."), or NULL when it can. */
const char *la_dense_fp8_unsupported_reason(const LaDenseFp8Params *params);

#ifdef __cplusplus
}
#endif

#endif
