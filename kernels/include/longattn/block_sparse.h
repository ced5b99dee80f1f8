/* longattn block-sparse attention (semantics.md "Block-sparse masks", src/block_sparse):
 * the C ABI shared by the CUDA launcher and the Rust side (bindgen).
 *
 * A dense problem (LaDenseParams: tensors, lengths, GQA, varlen, scale, softcap and the
 * element mask) restricted to the key blocks of a block mask in CSR form: list
 * l = (mb * mask_heads + mh) * num_q_blocks + qb, with mb = 0 when mask_batch == 1 (else the
 * sequence b) and mh = 0 when mask_heads == 1 (else the query head h), is
 * indices[offsets[l] .. offsets[l + 1]], strictly increasing key block indices below the
 * sequence's own key block count; full[e] != 0 marks entry e as a full block (no element
 * mask inside, only keys past the sequence's end are cut), 0 as partial (the dense params'
 * window / sinks mask applies inside). Query blocks are block_m rows, key blocks block_n keys,
 * counted from row 0 / key 0 of each sequence. A row with no visible key gets output 0 and
 * LSE -inf. */
#ifndef LONGATTN_BLOCK_SPARSE_H
#define LONGATTN_BLOCK_SPARSE_H

#include <stdint.h>

#include "longattn/dense.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct LaBlockSparseParams {
  /* The dense problem; its window_left / window_right / sinks are the partial blocks' mask. */
  LaDenseParams dense;
  /* Device arrays of the block mask: offsets [num_lists + 1], indices and full [nnz]. */
  const int32_t *offsets;
  const int32_t *indices;
  const uint8_t *full;
  /* Lists: mask_batch (1 or dense.batch) x mask_heads (1 or dense.heads_q) x num_q_blocks;
   * num_q_blocks = ceil(dense.seqlen_q / block_m), num_k_blocks = ceil(dense.seqlen_k /
   * block_n) (the maxima with varlen). */
  int32_t mask_batch, mask_heads, num_q_blocks, num_k_blocks;
  /* Block sizes in tokens: multiples of 64. */
  int32_t block_m, block_n;
} LaBlockSparseParams;

/* Tensor-core kernel (mma.sync, sm_80+; verified on an H200, sm_80 not run): head_dim 64, 128 or
 * 256, f16 or bf16, fixed or varlen batches. Returns a cudaError_t value and never
 * synchronizes: cudaErrorInvalidValue for invalid params (checked before any CUDA call;
 * the list contents live on the device and are not read here: the Rust API validates
 * them), LA_DENSE_KERNEL_UNSUPPORTED for f32, another head_dim or a device it cannot run
 * on. */
int la_block_sparse_mma_forward(const LaBlockSparseParams *params, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
