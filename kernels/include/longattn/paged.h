/* longattn paged KV cache: append (with Quest page metadata), Quest page selection and
 * split-KV decode attention. The C ABI shared by the CUDA launchers and the Rust side
 * (bindgen generates the FFI from this file).
 *
 * Conventions (see semantics.md, "Paged KV cache and decode"):
 *   k_cache, v_cache: [num_pages, page_size, heads_kv, head_dim] (NHD), contiguous
 *   block_table:      [batch, max_pages_per_seq] i32 physical page ids
 *   seqlens_k:        [batch] i32; token t of sequence b lives in page
 *                     block_table[b][t / page_size], slot t % page_size
 *   kmin, kmax:       [num_pages, heads_kv, head_dim] per-page, per-channel key bounds in the
 *                     cache's dtype (the bounds of f16/bf16 keys are f16/bf16 values)
 *   q, o:             [batch, q_len, heads_q, head_dim] element strides, last dim contiguous
 *   lse:              [batch, heads_q, q_len] f32, natural log
 *   kv_dtype:         the cache's element type (k_cache, v_cache, kmin, kmax): dtype, or
 *                     LA_F8E4M3 with kv_scales [2, heads_kv] f32 (k scales, then v scales):
 *                     a cached value is e4m3 * scale; append stores
 *                     e4m3_rne_satfinite(x / scale) (f32 division; NaN stays NaN, +-inf and
 *                     |x / scale| > 448 saturate to +-448)
 * Windows use FlashAttention's (left, right) with -1 meaning unbounded; causal is (-1, 0).
 * No CUDA header is included here: LaDtype and cudaStream_t come from types.h. */
#ifndef LONGATTN_PAGED_H
#define LONGATTN_PAGED_H

#include <stdint.h>

/* Relative to this file, so that bindgen (which has no include path) finds it too. */
#include "types.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The cache and its tables, shared by every paged params struct. Already validated on the
 * host: page ids in range for every token below seqlens_k, seqlens_k within the table row. */
typedef struct LaPagedCache {
  /* Written by append, read by decode. */
  void *k_cache;
  void *v_cache;
  const int32_t *block_table;
  const int32_t *seqlens_k;
  int32_t batch, num_pages, page_size, heads_kv, head_dim, max_pages_per_seq;
} LaPagedCache;

/* How one kv head reads the cache (one launch serves a mix). */
typedef enum LaHeadKind {
  /* Every page the mask leaves visible. */
  LA_HEAD_FULL = 0,
  /* The pages of page_list (an explicit list per (sequence, kv head)). */
  LA_HEAD_PAGES = 1,
  /* Streaming head: sinks + recent window only (its own mask, replacing the base mask). */
  LA_HEAD_STREAMING = 2,
  /* Quest top-B: la_paged_quest_select fills page_list, decode then reads it as PAGES. */
  LA_HEAD_QUEST = 3
} LaHeadKind;

/* Append new tokens (a decode step or a prefill chunk, packed over the batch). seqlens_k
 * already counts them: sequence b's new tokens take positions
 * [seqlens_k[b] - n_b, seqlens_k[b]) with n_b = cu_seqlens_new[b + 1] - cu_seqlens_new[b].
 * Metadata of a page touched by this append: if slot 0 is written the page is (re)started
 * and kmin/kmax are the bounds of the new tokens alone; otherwise the old bounds are
 * widened by the new tokens. Either way they equal min/max over slots 0..=last written. */
typedef struct LaPagedAppendParams {
  LaPagedCache cache;
  /* [total_new, heads_kv, head_dim], element strides. */
  const void *k_new;
  const void *v_new;
  int64_t k_new_row_stride, k_new_head_stride;
  int64_t v_new_row_stride, v_new_head_stride;
  /* [batch + 1] offsets into k_new/v_new. */
  const int32_t *cu_seqlens_new;
  /* Optional (NULL: no metadata kept), dtype of the cache. */
  void *kmin;
  void *kmax;
  /* Most pages any one sequence's new tokens touch (grid x). */
  int32_t max_pages_touched;
  /* Element type of k_new / v_new. */
  LaDtype dtype;
  /* Element type of the cache and its metadata: dtype, or LA_F8E4M3 (then kv_scales, see
   * above, is required and the metadata holds the bounds of the stored e4m3 values). */
  LaDtype kv_dtype;
  const float *kv_scales;
} LaPagedAppendParams;

/* Quest scoring and top-B page selection for the LA_HEAD_QUEST kv heads.
 * Score of page p for query row i, query head h: S = sum_c max(q_c * kmax_c, q_c * kmin_c)
 * (no 1/sqrt(d)); a kv head's page score is the max over its group's query heads and the
 * q_len rows. Candidates: pages holding a key visible to some row under the base mask.
 * Always kept: the page of the newest token and the first sink_pages pages (when they are
 * candidates). Selected: max(budget_pages, #kept) pages, kept ones first, then higher score,
 * then lower page index (deterministic). page_list lists them in ascending page order. */
typedef struct LaQuestParams {
  /* Dimensions and page table; k_cache/v_cache are not read (may be NULL). */
  LaPagedCache cache;
  const void *q;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int32_t q_len, heads_q;
  /* Dtype of the cache; the score is computed in f32. */
  const void *kmin;
  const void *kmax;
  /* [heads_kv] LaHeadKind values; only LA_HEAD_QUEST heads are scored. */
  const int32_t *head_kind;
  /* [batch, heads_kv, max_pages_per_seq]; -inf for pages that are not candidates. */
  float *scores;
  /* [batch, heads_kv, max_pages_per_seq] logical page indices, and [batch, heads_kv] counts. */
  int32_t *page_list;
  int32_t *page_count;
  int32_t budget_pages, sink_pages;
  int32_t window_left, window_right, sinks;
  /* Element type of q. */
  LaDtype dtype;
  /* Element type of kmin/kmax (the cache's): dtype, or LA_F8E4M3 (then kv_scales, see
   * above, is required and a page's score is k_scale[kv head] times the sum over the
   * stored bounds). */
  LaDtype kv_dtype;
  const float *kv_scales;
} LaQuestParams;

/* Decode attention over the paged cache, split-KV when num_splits > 1 (then o_partial and
 * lse_partial receive per-split results and a merge kernel writes o and lse). */
typedef struct LaPagedDecodeParams {
  LaPagedCache cache;
  const void *q;
  void *o;
  /* Optional (NULL: not written). */
  float *lse;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int32_t q_len, heads_q;
  /* Optional [heads_kv] LaHeadKind values (NULL: every head LA_HEAD_FULL). */
  const int32_t *head_kind;
  /* [batch, heads_kv, page_list_stride] ascending logical page indices and
   * [batch, heads_kv] counts, used by LA_HEAD_PAGES and LA_HEAD_QUEST heads (NULL when no
   * head is one; a non-NULL page_count is read by every block, early in its prologue). */
  const int32_t *page_list;
  const int32_t *page_count;
  int32_t page_list_stride;
  /* Base mask: window (-1 = unbounded side) plus `sinks` leading keys. */
  int32_t window_left, window_right, sinks;
  /* Mask of LA_HEAD_STREAMING heads: window (streaming_window - 1, 0) plus sinks. */
  int32_t streaming_window, streaming_sinks;
  /* Softmax scale applied to q.k; softcap <= 0 disables the tanh cap. */
  float scale, softcap;
  int32_t num_splits;
  /* [num_splits, batch, heads_q, q_len, head_dim] and [num_splits, batch, heads_q, q_len]
   * f32 scratch, used when num_splits > 1. */
  float *o_partial;
  float *lse_partial;
  /* Element type of q / o. */
  LaDtype dtype;
  /* Element type of the cache: dtype, or LA_F8E4M3 (then kv_scales, see above, is
   * required: scores use k * k_scale[kv head], outputs v * v_scale[kv head]). */
  LaDtype kv_dtype;
  const float *kv_scales;
} LaPagedDecodeParams;

/* Query rows (q_len * heads_q / heads_kv) one decode block serves; more rows take more
 * blocks, each reading its pages again. */
#define LA_PAGED_DECODE_ROWS 8

/* Split-KV decode with the split merge inside the decode kernel (one launch per step;
 * la_paged_decode_inmerge; NOT YET RUN ON A GPU). Each block writes its split's partial to
 * o_partial / lse_partial as la_paged_decode does, then takes a ticket on the counter of its
 * (sequence, kv head, row group); the block that draws the last ticket merges the group's
 * rows over all splits (split_merge_kernel's algebra) and sets the counter back to 0.
 * merge_counters: [batch, heads_kv * ceil(q_len * heads_q / heads_kv / LA_PAGED_DECODE_ROWS)]
 * i32, all 0 before the launch and 0 again when it completes (zero them once; a launch that
 * fails midway leaves them unspecified). Unused when num_splits == 1 (then the plain decode
 * kernel runs).
 * pages_per_split: 0 divides every block's work pages into num_splits equal shares (as
 * la_paged_decode). > 0 sizes splits by pages instead (balanced splits for batches of mixed
 * lengths): a block with n work pages runs s = min(max(1, ceil(n / pages_per_split)),
 * num_splits) splits, split i covering pages [i * pages_per_split, ...) and the last one the
 * rest; blocks with split >= s exit at once, a block with s == 1 writes o and lse directly
 * (no partial, no ticket), and the merging block merges its group's s splits. */
typedef struct LaPagedDecodeMergeParams {
  LaPagedDecodeParams decode;
  int32_t *merge_counters;
  int32_t pages_per_split;
} LaPagedDecodeMergeParams;

/* Quest selection v5 (la_paged_quest_select_v5; NOT YET RUN ON A GPU): same inputs, outputs
 * and selection as la_paged_quest_select, in one launch. Grid (ceil(max_pages_per_seq /
 * pages_per_block), heads_kv, batch): a block scores a chunk of pages_per_block pages (the
 * chunk's page ids loaded together, then several pages' bounds in flight per warp), writes
 * their scores, and takes a ticket on its (sequence, kv head)'s counter; the last block of a
 * Quest head selects its pages from the row's scores and sets the counter back to 0.
 * select_counters: [batch, heads_kv] i32, all 0 before the launch and 0 again after it.
 * pages_per_block: a multiple of LA_QUEST_V5_CHUNK_ALIGN in [LA_QUEST_V5_CHUNK_ALIGN,
 * LA_QUEST_V5_MAX_CHUNK]. */
typedef struct LaQuestV5Params {
  LaQuestParams quest;
  int32_t *select_counters;
  int32_t pages_per_block;
} LaQuestV5Params;

#define LA_QUEST_V5_CHUNK_ALIGN 64
#define LA_QUEST_V5_MAX_CHUNK 1024

/* All launchers return a cudaError_t value (0 on success) and never synchronize. */
int la_paged_append(const LaPagedAppendParams *params, cudaStream_t stream);
int la_paged_quest_select(const LaQuestParams *params, cudaStream_t stream);
int la_paged_decode(const LaPagedDecodeParams *params, cudaStream_t stream);
int la_paged_decode_inmerge(const LaPagedDecodeMergeParams *params, cudaStream_t stream);
int la_paged_quest_select_v5(const LaQuestV5Params *params, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
