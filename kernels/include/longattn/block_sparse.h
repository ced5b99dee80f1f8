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

/* Hopper kernel (wgmma + TMA, sm_90a: compute capability 9.0 only; kernels/block_sparse_wgmma.cu).
 * NOT YET RUN ON A GPU. Same params, same semantics and the same cudaErrorInvalidValue checks
 * as la_block_sparse_mma_forward; it takes less: head_dim 64, 128 or 256, f16 or bf16,
 * block_m a multiple of 128 (its query tile), block_n a multiple of its key tile (128 at
 * head_dim 64 and 128, 64 at head_dim 256), q/k/v the copy engine can address (16-byte aligned
 * pointers, every stride of a dimension longer than 1 a positive multiple of 16 bytes).
 * Anything else returns LA_DENSE_KERNEL_UNSUPPORTED before any launch (the caller keeps
 * la_block_sparse_mma_forward for it). Never synchronizes. */
int la_block_sparse_wgmma_forward(const LaBlockSparseParams *params, cudaStream_t stream);
/* Why la_block_sparse_wgmma_forward cannot run these params on the current device, completing
 * "the kernel cannot run this problem here: ..." (a static string), or NULL when it can. Reads
 * no device memory. */
const char *la_block_sparse_wgmma_unsupported_reason(const LaBlockSparseParams *params);

/* MoBA on the GPU (semantics.md "MoBA selection"; kernels/moba.cu). A dense problem (the
 * dense params: q, k, v, o, lse, lengths, GQA, varlen, scale, softcap, element mask) whose
 * query row i of (sequence b, query head h) sees key j iff key block j / block_n is in the
 * row's own selection and the element mask shows (i, j). Rows are in LSE order: row
 * r = lse_base(b, h) + i ([batch, heads_q, seqlen_q], or [heads_q, total_q] with varlen).
 * Query tiles are 64 rows (tile x of (b, h) holds rows 64x .. 64x + 63).
 *
 * la_moba_select writes, from q and k:
 *   pooled       [batch, heads_kv, num_k_blocks, head_dim] f32: the mean of each key block
 *                 (blocks past a sequence's end are not written);
 *   row_blocks   [rows, top_k] i32: each row's selection, increasing, -1 padded (the
 *                 RowBlocks layout): its own block (position p = i + sk - sq, own = p /
 *                 block_n; no block when p < 0) and the top_k - 1 best blocks before it by
 *                 q_i . pooled (f32), higher score first, lower block index on ties, NaN as
 *                 -inf;
 *   union_blocks [batch, heads_q, num_tiles, union_width] i32 and union_count [batch,
 *                 heads_q, num_tiles]: each 64-row tile's union of its rows' blocks,
 *                 increasing (tiles past a sequence's end are not written).
 * la_moba_attention reads row_blocks, union_blocks and union_count and writes o and lse.
 *
 * la_moba_select_blocks is la_moba_select at query-block granularity (semantics.md, "Query-block
 * granularity"): query block qb (block_m rows, a multiple of 64) gates on the f32 mean of its
 * rows; its rows occupy positions p0..=p1 (p0 clamped at 0; nothing when p1 < 0); the key
 * blocks meeting [p0, p1] are listed, and select_k minus their number (saturating) more among
 * the blocks before p0's block, by the same ranking. Every row of the block gets the block's
 * list in row_blocks, and every 64-row tile of it has it as its union. */
#define LA_MOBA_MAX_TOP_K 32
#define LA_MOBA_MAX_K_BLOCKS 65536
#define LA_MOBA_TILE_ROWS 64

typedef struct LaMobaParams {
  LaDenseParams dense;
  float *pooled;
  int32_t *row_blocks;
  int32_t *union_blocks;
  int32_t *union_count;
  /* num_k_blocks = ceil(dense.seqlen_k / block_n) (<= LA_MOBA_MAX_K_BLOCKS); block_n a
   * multiple of 64; top_k = min(MoBA's top_k, num_k_blocks) in 1..=LA_MOBA_MAX_TOP_K (the
   * row stride of row_blocks); num_tiles = ceil(dense.seqlen_q / 64); union_width =
   * min(num_k_blocks, 64 * top_k). */
  int32_t num_k_blocks, block_n, top_k, num_tiles, union_width;
  /* la_moba_select_blocks only (ignored by the others): rows per query block (a multiple of
   * 64) and MoBA's top_k as configured; then top_k = min(num_k_blocks, max(select_k,
   * (block_m - 1) / block_n + 2)), the longest list. */
  int32_t block_m, select_k;
} LaMobaParams;

/* Gating (sm_80+, f16 / bf16, head_dim 64, 128 or 256): two launches (pool, then select +
 * union). Returns a cudaError_t value and never synchronizes: cudaErrorInvalidValue for
 * invalid params (checked before any CUDA call), LA_DENSE_KERNEL_UNSUPPORTED for f32,
 * another head_dim or a device it cannot run on. NOT YET RUN ON A GPU. */
int la_moba_select(const LaMobaParams *params, cudaStream_t stream);

/* la_moba_select with the scores on tensor cores (mma.sync m16n8k16; pooled keys split into
 * two f16/bf16 parts, f32 accumulation; opt-in): same params, same outputs up to near-ties of
 * the scores, same return values. NOT YET RUN ON A GPU. */
int la_moba_select_tc(const LaMobaParams *params, cudaStream_t stream);

/* Gating at query-block granularity (pool, then select): same params (block_m, select_k set),
 * same return values. NOT YET RUN ON A GPU. */
int la_moba_select_blocks(const LaMobaParams *params, cudaStream_t stream);

/* Attention over the selections of la_moba_select or la_moba_select_blocks (same params; the
 * mma.sync mainloop of block_sparse_mma.cu over each tile's union, each row masked to its own
 * selection). Same return values. NOT YET RUN ON A GPU. */
int la_moba_attention(const LaMobaParams *params, cudaStream_t stream);

/* MoBA's gather attention (opt-in; kernels/moba_gather.cu): the per-token selections of
 * la_moba_select (params `moba`; its union buffers are not read) transposed, per (sequence,
 * query head, key block), into the list of rows that chose the block, and each block attended
 * by its rows only, one partial (o, lse) per (row, selection slot); la_ring_gather merges them
 * (slot j of every row is plane j below). rows = the LSE row count ([batch, heads_q, seqlen_q]
 * or [heads_q, total_q]); row r = lse_base(b, h) + i as in la_moba_select; slots = moba.top_k.
 *   counts      [batch, heads_q, num_chunks, num_k_blocks] i32: per chunk of
 *                LA_MOBA_GATHER_CHUNK_ROWS rows, how many rows chose each block, then the
 *                first entry of each (block, chunk) run;
 *   entries     [rows, slots] i32: (b, h)'s entries at lse_base * slots, block by block
 *                (increasing), each block's rows increasing, entry = i * slots + j (j: the
 *                slot of row i holding the block);
 *   work        [batch, heads_q, max_work, 4] i32: (block, first entry, rows <= 64, 0), block
 *                by block; work_count [batch, heads_q] of them;
 *   partial_o   [slots][batch * seqlen_q or total_q, heads_q, head_dim] (moba.dense.dtype):
 *                row i of slot j's block (padding slots: 0);
 *   partial_lse [slots][rows] f32 (padding slots: -inf).
 * num_chunks = ceil(seqlen_q / LA_MOBA_GATHER_CHUNK_ROWS); max_work = ceil(seqlen_q * slots /
 * 64) + num_k_blocks; num_k_blocks <= LA_MOBA_GATHER_MAX_K_BLOCKS; seqlen_q * slots < 2^31. */
#define LA_MOBA_GATHER_CHUNK_ROWS 512
#define LA_MOBA_GATHER_MAX_K_BLOCKS 8192

typedef struct LaMobaGatherParams {
  LaMobaParams moba;
  int32_t *counts;
  int32_t *entries;
  int32_t *work;
  int32_t *work_count;
  void *partial_o;
  float *partial_lse;
  int64_t rows;
  int32_t num_chunks, max_work;
} LaMobaGatherParams;

/* The transpose (after la_moba_select on the same stream): counts, entries, work, work_count
 * and the padding slots' partials; three launches. Same return values as la_moba_select.
 * NOT YET RUN ON A GPU. */
int la_moba_gather_index(const LaMobaGatherParams *params, cudaStream_t stream);

/* The attention over the gathered rows (after la_moba_gather_index): partial_o and
 * partial_lse of every chosen (row, slot). Same return values. NOT YET RUN ON A GPU. */
int la_moba_gather_attention(const LaMobaGatherParams *params, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
