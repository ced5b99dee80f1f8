/* longattn: the validated C API for C and C++ programs.
 *
 * Every entry point runs the same checks as the Rust API (shapes, strides, options, buffer
 * lengths, overlap) before any pointer is read, returns a status code and never aborts: a
 * failed call leaves a message for longattn_last_error() on the calling thread.
 *
 * Conventions (docs/semantics.md): q, out: [batch, seqlen_q, heads_q, head_dim];
 * k, v: [batch, seqlen_k, heads_kv, head_dim] (or packed [total, heads, head_dim] with
 * cu_seqlens); element strides, last dim contiguous; causal is bottom-right aligned;
 * LSE is f32, natural log, [batch, heads_q, seqlen_q] (varlen: [heads_q, total_q]);
 * a row with no visible key gives output 0 and LSE -inf.
 *
 * Link: -llongattn (pkg-config longattn, or CMake find_package(longattn)). */
#ifndef LONGATTN_H
#define LONGATTN_H

#include <stddef.h>
#include <stdint.h>

#define LONGATTN_VERSION_MAJOR 0
#define LONGATTN_VERSION_MINOR 1
#define LONGATTN_VERSION_PATCH 0
#define LONGATTN_VERSION_STRING "0.1.0"

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes; one per Rust error variant. */
typedef enum longattn_status {
  LONGATTN_OK = 0,
  LONGATTN_ERR_SHAPE = 1,           /* a shape or buffer length does not match */
  LONGATTN_ERR_STRIDE = 2,          /* a stride is negative, non-contiguous or out of the buffer */
  LONGATTN_ERR_INVALID_OPTION = 3,  /* window, scale, softcap, sinks out of their domain */
  LONGATTN_ERR_INDEX = 4,           /* malformed cu_seqlens, block tables, page ids, block masks */
  LONGATTN_ERR_UNSUPPORTED = 5,     /* valid, but no kernel implements it */
  LONGATTN_ERR_CUDA_NOT_COMPILED = 6,
  LONGATTN_ERR_NO_GPU = 7,
  LONGATTN_ERR_CUDA = 8,
  LONGATTN_ERR_NULL_POINTER = 9,    /* a required pointer argument is NULL */
  LONGATTN_ERR_INTERNAL = 10        /* a bug in longattn (caught, never unwound into C) */
} longattn_status;

typedef enum longattn_dtype {
  LONGATTN_F32 = 0,
  LONGATTN_F16 = 1,
  LONGATTN_BF16 = 2
} longattn_dtype;

/* Element strides of a [batch, seq, heads, head_dim] tensor (head_dim stride is 1). */
typedef struct longattn_strides {
  int64_t batch;
  int64_t seq;
  int64_t head;
} longattn_strides;

/* A tensor on the host: data, its length in elements (the buffer the strides may reach)
 * and its strides. */
typedef struct longattn_tensor {
  const void *data;
  size_t len;
  longattn_strides strides;
} longattn_tensor;

typedef struct longattn_tensor_mut {
  void *data;
  size_t len;
  longattn_strides strides;
} longattn_tensor_mut;

/* A dense attention problem. Options follow FlashAttention-2: window_left/right = -1 is
 * unbounded; causal sets the right bound to min(right, 0) and keeps the left bound;
 * scale 0 means 1/sqrt(head_dim); softcap 0 means off. */
typedef struct longattn_dense_desc {
  size_t batch;
  size_t heads_q;
  size_t heads_kv;
  size_t head_dim;
  size_t seqlen_q;               /* fixed lengths; ignored when cu_seqlens_q != NULL */
  size_t seqlen_k;
  const int32_t *cu_seqlens_q;   /* varlen: host arrays of batch + 1 offsets, or NULL */
  const int32_t *cu_seqlens_k;
  float scale;
  float softcap;
  int64_t window_left;
  int64_t window_right;
  int32_t causal;
  size_t sinks;
} longattn_dense_desc;

/* "0.1.0": the library's version, to compare with LONGATTN_VERSION_STRING. */
const char *longattn_version(void);

/* The message of the last failed call on this thread ("" if none). Valid until the next
 * longattn call on this thread. */
const char *longattn_last_error(void);

/* Elements of the output and of the LSE of a problem (so callers size buffers). */
longattn_status longattn_dense_sizes(const longattn_dense_desc *desc, size_t *out_len,
                                     size_t *lse_len);

/* Dense attention on the CPU (f32, f16 or bf16 host buffers; lse may be NULL). */
longattn_status longattn_dense_forward_cpu(const longattn_dense_desc *desc, longattn_dtype dtype,
                                           longattn_tensor q, longattn_tensor k,
                                           longattn_tensor v, longattn_tensor_mut out,
                                           float *lse, size_t lse_len);

/* Dense attention on the GPU: q, k, v, out (and lse, when not NULL) are device allocations of
 * GPU `device` holding `len` elements of dtype (f16 or bf16; f32 is refused); the work is
 * queued on `stream` (a cudaStream_t/CUstream of that device's primary context, the one the
 * CUDA runtime and PyTorch use; NULL: the legacy default stream) and nothing is
 * synchronized. Every argument is validated first (as longattn_dense_forward_cpu, plus the
 * kernels' limits: alignment, head dims). Varlen offsets stay host arrays. Buffers must
 * stay alive until the queued work completes. Returns LONGATTN_ERR_NO_GPU without a GPU. */
longattn_status longattn_dense_forward_cuda(const longattn_dense_desc *desc,
                                            longattn_dtype dtype, longattn_tensor q,
                                            longattn_tensor k, longattn_tensor v,
                                            longattn_tensor_mut out, float *lse,
                                            size_t lse_len, int32_t device, void *stream);

/* A paged KV cache and one decode step. k_cache, v_cache: [num_pages, page_size, heads_kv,
 * head_dim] (contiguous); block_table: [batch, max_pages_per_seq] page ids (host);
 * seqlens_k: [batch] tokens per sequence (host), including the q_len new tokens, whose
 * K/V are already in the cache. q, out: [batch, q_len, heads_q, head_dim]. The new tokens
 * are causal among themselves (bottom-right): a right bound of -1 becomes 0. Every head
 * reads all its visible pages (per-kv-head policies: longattn_paged_decode_policy_cpu). */
typedef struct longattn_paged_desc {
  size_t num_pages;
  size_t page_size;
  size_t heads_kv;
  size_t head_dim;
  size_t batch;
  const int32_t *block_table;
  size_t max_pages_per_seq;
  const int32_t *seqlens_k;
  size_t heads_q;
  size_t q_len;
  float scale;   /* 0: 1/sqrt(head_dim) */
  float softcap; /* 0: off */
  int64_t window_left;
  int64_t window_right;
  size_t sinks;
} longattn_paged_desc;

/* Elements of one of k_cache / v_cache, of the output and of the LSE. */
longattn_status longattn_paged_sizes(const longattn_paged_desc *desc, size_t *cache_len,
                                     size_t *out_len, size_t *lse_len);

/* Paged decode on the CPU (host buffers of dtype; lse may be NULL). */
longattn_status longattn_paged_decode_cpu(const longattn_paged_desc *desc, longattn_dtype dtype,
                                          longattn_tensor q, const void *k_cache,
                                          const void *v_cache, size_t cache_len,
                                          longattn_tensor_mut out, float *lse, size_t lse_len);

/* Paged decode on the GPU: q, out, k_cache, v_cache (cache_len elements each) and lse (NULL
 * or lse_len floats) are device allocations of GPU `device` of dtype (f16 or bf16); the
 * descriptor's block_table and seqlens_k stay host arrays (validated, uploaded on `stream`
 * per call). Stream, validation and lifetimes as longattn_dense_forward_cuda. */
longattn_status longattn_paged_decode_cuda(const longattn_paged_desc *desc, longattn_dtype dtype,
                                           longattn_tensor q, const void *k_cache,
                                           const void *v_cache, size_t cache_len,
                                           longattn_tensor_mut out, float *lse, size_t lse_len,
                                           int32_t device, void *stream);

/* Paged prefill (chunked prefill, prefix caching): desc->q_len new query tokens per
 * sequence, or with cu_seqlens_q ([batch + 1] host offsets, NULL for fixed q_len) packed
 * rows q, out: [total_q, heads_q, head_dim]; the cache already holds the new tokens
 * (seqlens_k counts them). Dense attention over each sequence's gathered tokens with the
 * descriptor's window as given (-1 unbounded; causal is (-1, 0), bottom-right aligned).
 * lse: [batch, heads_q, q_len], or [heads_q, total_q] with cu_seqlens_q. */
longattn_status longattn_paged_prefill_sizes(const longattn_paged_desc *desc,
                                             const int32_t *cu_seqlens_q, size_t *cache_len,
                                             size_t *out_len, size_t *lse_len);
longattn_status longattn_paged_prefill_cpu(const longattn_paged_desc *desc,
                                           const int32_t *cu_seqlens_q, longattn_dtype dtype,
                                           longattn_tensor q, const void *k_cache,
                                           const void *v_cache, size_t cache_len,
                                           longattn_tensor_mut out, float *lse, size_t lse_len);
/* On the GPU (device buffers as longattn_paged_decode_cuda; f16 or bf16, head_dim 64, 128 or
 * 256). The kernel's current version is not yet verified on a GPU. */
longattn_status longattn_paged_prefill_cuda(const longattn_paged_desc *desc,
                                            const int32_t *cu_seqlens_q, longattn_dtype dtype,
                                            longattn_tensor q, const void *k_cache,
                                            const void *v_cache, size_t cache_len,
                                            longattn_tensor_mut out, float *lse, size_t lse_len,
                                            int32_t device, void *stream);

/* An FP8 e4m3 paged cache (docs/semantics.md, "FP8 KV cache": OCP e4m3fn, max 448):
 * k_cache, v_cache hold cache_len e4m3 bytes each ([num_pages, page_size, heads_kv,
 * head_dim]); a stored value means value * k_scales[kv head] (keys) or value *
 * v_scales[kv head] (values). The scales are host arrays of heads_kv floats, > 0 and at
 * most FLT_MAX / 448 (every code dequantises to a finite float), or both NULL (scale 1). */
typedef struct longattn_fp8_cache {
  const void *k_cache;
  const void *v_cache;
  size_t cache_len;
  const float *k_scales;
  const float *v_scales;
} longattn_fp8_cache;

/* Paged decode over an FP8 cache on the CPU (q, out of dtype: f32, f16 or bf16). */
longattn_status longattn_paged_decode_fp8_cpu(const longattn_paged_desc *desc, longattn_dtype dtype,
                                              longattn_tensor q, longattn_fp8_cache cache,
                                              longattn_tensor_mut out, float *lse, size_t lse_len);

/* Paged decode over an FP8 cache on the GPU (q, out, the caches and lse device allocations
 * of `device`; q/out f16 or bf16; the scales stay host arrays). As
 * longattn_paged_decode_cuda otherwise. The FP8 kernel is not yet verified on a GPU. */
longattn_status longattn_paged_decode_fp8_cuda(const longattn_paged_desc *desc, longattn_dtype dtype,
                                               longattn_tensor q, longattn_fp8_cache cache,
                                               longattn_tensor_mut out, float *lse, size_t lse_len,
                                               int32_t device, void *stream);

/* FlashAttention-3's descales of an FP8 dense call (docs/semantics.md, "FP8 dense forward"):
 * [batch, heads_kv] floats each; a q code of query head h means code * q[b, h / group], k and v
 * codes of kv head g code * k[b, g] and code * v[b, g]. Host arrays for the CPU call, device
 * arrays for the CUDA call. */
typedef struct longattn_fp8_descales {
  const float *q;
  const float *k;
  const float *v;
} longattn_fp8_descales;

/* Dense attention over FP8 e4m3 codes on the CPU: q, k, v hold len one-byte codes each
 * (strides in elements = bytes; the layout and options of longattn_dense_forward_cpu), the
 * descales finite, > 0 and at most FLT_MAX / 448; out of out_dtype (f16 or bf16; f32 is
 * refused). P is quantised to e4m3 per 128-key tile as the definition says. */
longattn_status longattn_dense_fp8_forward_cpu(const longattn_dense_desc *desc,
                                               longattn_dtype out_dtype, longattn_tensor q,
                                               longattn_tensor k, longattn_tensor v,
                                               longattn_fp8_descales descales,
                                               longattn_tensor_mut out, float *lse,
                                               size_t lse_len);

/* The same on device buffers of GPU `device` (the descales device arrays too, not inspected:
 * the caller guarantees their values), queued on `stream` as longattn_dense_forward_cuda;
 * Hopper (compute capability 9.0) only, head_dim a multiple of 16 up to 256. The FP8 kernel
 * is not yet verified on a GPU. */
longattn_status longattn_dense_fp8_forward_cuda(const longattn_dense_desc *desc,
                                                longattn_dtype out_dtype, longattn_tensor q,
                                                longattn_tensor k, longattn_tensor v,
                                                longattn_fp8_descales descales,
                                                longattn_tensor_mut out, float *lse,
                                                size_t lse_len, int32_t device, void *stream);

/* dst[i] = e4m3(src[i] / scale) for i < n (round to nearest even, saturating at +-448, NaN
 * kept): the bytes an FP8 cache holds for these values, as the crate's append writes them.
 * scale finite and > 0; dst must not overlap src. */
longattn_status longattn_fp8_quantize(const float *src, size_t n, float scale, uint8_t *dst);

/* ---- Paged append: writing new tokens into a paged cache --------------------------------- */

/* The writable buffers of a paged cache (host for the _cpu calls, device allocations of the
 * call's GPU for the _cuda calls): k_cache, v_cache of cache_len elements each
 * ([num_pages, page_size, heads_kv, head_dim]) and the optional Quest page metadata kmin,
 * kmax of meta_len elements each ([num_pages, heads_kv, head_dim], per-channel min / max of
 * each page's keys, in the cache's element type), or both NULL (not maintained). No two of
 * the buffers may overlap. */
typedef struct longattn_paged_kv_mut {
  void *k_cache;
  void *v_cache;
  size_t cache_len;
  void *kmin; /* NULL with kmax NULL: no metadata */
  void *kmax;
  size_t meta_len;
} longattn_paged_kv_mut;

/* Elements of one of k_cache / v_cache and of one of kmin / kmax of desc's cache. Only the
 * cache fields of desc are read (num_pages, page_size, heads_kv, head_dim, batch,
 * block_table, max_pages_per_seq, seqlens_k); heads_q, q_len and the options are not. */
longattn_status longattn_paged_cache_sizes(const longattn_paged_desc *desc, size_t *cache_len,
                                           size_t *meta_len);

/* Appends new tokens: k_new, v_new: [total_new, heads_kv, head_dim] (element strides: seq is
 * the token stride, head the head stride; batch unused) of dtype; cu_seqlens_new: [batch + 1]
 * host offsets, sequence b's new rows cu_seqlens_new[b]..cu_seqlens_new[b + 1]. desc's
 * seqlens_k already counts them: they go to positions seqlens_k[b] - n_b .. seqlens_k[b]
 * (page block_table[b][t / page_size], slot t % page_size). Two sequences may not write one
 * page. With kmin/kmax, each touched page's bounds are widened by the new keys (a write to
 * slot 0 restarts the page: a reused page forgets its previous owner). Only desc's cache
 * fields are read (as longattn_paged_cache_sizes). Host buffers; f32, f16 or bf16; the
 * cache's dtype is the new tokens' dtype. */
longattn_status longattn_paged_append_cpu(const longattn_paged_desc *desc,
                                          const int32_t *cu_seqlens_new, longattn_dtype dtype,
                                          longattn_tensor k_new, longattn_tensor v_new,
                                          longattn_paged_kv_mut cache);

/* The same on device buffers of GPU `device` (k_new, v_new and the cache's buffers; f16 or
 * bf16, token and head strides multiples of 8 elements); cu_seqlens_new and desc's tables
 * stay host arrays (validated, uploaded on `stream` per call). Stream, validation and
 * lifetimes as longattn_dense_forward_cuda. Not yet run on a GPU through the C API. */
longattn_status longattn_paged_append_cuda(const longattn_paged_desc *desc,
                                           const int32_t *cu_seqlens_new, longattn_dtype dtype,
                                           longattn_tensor k_new, longattn_tensor v_new,
                                           longattn_paged_kv_mut cache, int32_t device,
                                           void *stream);

/* Appends into an FP8 e4m3 cache (the cache's buffers and kmin/kmax hold e4m3 bytes,
 * cache_len / meta_len of them): a new value x of kv head g is stored as
 * e4m3(x / k_scales[g]) (values: v_scales[g]), as longattn_fp8_quantize writes it; the
 * metadata are the bounds of the stored codes. k_new, v_new of dtype (f32, f16 or bf16 on the
 * CPU); k_scales, v_scales: host arrays of heads_kv floats as in longattn_fp8_cache, or both
 * NULL (scale 1). Use the same scales for the decode. */
longattn_status longattn_paged_append_fp8_cpu(const longattn_paged_desc *desc,
                                              const int32_t *cu_seqlens_new, longattn_dtype dtype,
                                              longattn_tensor k_new, longattn_tensor v_new,
                                              longattn_paged_kv_mut cache, const float *k_scales,
                                              const float *v_scales);

/* The same on device buffers (k_new, v_new f16 or bf16; the scales stay host arrays), as
 * longattn_paged_append_cuda. Not yet run on a GPU. */
longattn_status longattn_paged_append_fp8_cuda(const longattn_paged_desc *desc,
                                               const int32_t *cu_seqlens_new, longattn_dtype dtype,
                                               longattn_tensor k_new, longattn_tensor v_new,
                                               longattn_paged_kv_mut cache, const float *k_scales,
                                               const float *v_scales, int32_t device,
                                               void *stream);

/* ---- Per-kv-head decode policies ---------------------------------------------------------- */

/* How one kv head (and its query-head group) reads the cache in a decode step. */
typedef enum longattn_head_policy {
  LONGATTN_HEAD_FULL = 0,      /* every page the descriptor's mask leaves visible */
  LONGATTN_HEAD_STREAMING = 1, /* the first streaming_sinks tokens plus the streaming_window
                                * most recent ones (the current one included); this mask
                                * replaces the descriptor's for the head */
  LONGATTN_HEAD_QUEST = 2      /* Quest: max(1, quest_token_budget / page_size) of the visible
                                * pages (more if the always-kept ones do not fit): the newest
                                * page and the first quest_sink_pages pages, then the highest
                                * scores sum_c max(q_c kmax_c, q_c kmin_c) (max over the
                                * group's query heads and rows) */
} longattn_head_policy;

/* The policy of a decode step (docs/semantics.md, "Paged KV cache and decode"). A separate
 * descriptor passed to new entry points, so longattn_paged_desc and the existing decode calls
 * keep their layout and ABI (a field appended to longattn_paged_desc would be read past the
 * end of an older caller's struct). heads: [heads_kv] host array of longattn_head_policy
 * values (int32). kmin, kmax: the page metadata as the append maintains it (meta_len elements
 * each of the cache's element type, e4m3 bytes for an FP8 cache; host arrays for the _cpu
 * calls, device arrays for the _cuda calls), required when a head is LONGATTN_HEAD_QUEST,
 * else may be NULL (both). The streaming fields are read when a head streams (window >= 1),
 * the Quest fields when a head is Quest. */
typedef struct longattn_decode_policy {
  const int32_t *heads;
  size_t streaming_sinks;
  size_t streaming_window;
  size_t quest_token_budget;
  size_t quest_sink_pages;
  const void *kmin;
  const void *kmax;
  size_t meta_len;
} longattn_decode_policy;

/* longattn_paged_decode_cpu with a policy per kv head (sizes from longattn_paged_sizes and
 * longattn_paged_cache_sizes). */
longattn_status longattn_paged_decode_policy_cpu(const longattn_paged_desc *desc,
                                                 const longattn_decode_policy *policy,
                                                 longattn_dtype dtype, longattn_tensor q,
                                                 const void *k_cache, const void *v_cache,
                                                 size_t cache_len, longattn_tensor_mut out,
                                                 float *lse, size_t lse_len);

/* longattn_paged_decode_cuda with a policy per kv head (kmin, kmax device arrays; heads a host
 * array). Quest heads run the page-selection kernel first. Not yet run on a GPU through the
 * C API. */
longattn_status longattn_paged_decode_policy_cuda(const longattn_paged_desc *desc,
                                                  const longattn_decode_policy *policy,
                                                  longattn_dtype dtype, longattn_tensor q,
                                                  const void *k_cache, const void *v_cache,
                                                  size_t cache_len, longattn_tensor_mut out,
                                                  float *lse, size_t lse_len, int32_t device,
                                                  void *stream);

/* longattn_paged_decode_fp8_cpu with a policy per kv head (kmin, kmax e4m3 bytes, as
 * longattn_paged_append_fp8_cpu writes them). */
longattn_status longattn_paged_decode_fp8_policy_cpu(const longattn_paged_desc *desc,
                                                     const longattn_decode_policy *policy,
                                                     longattn_dtype dtype, longattn_tensor q,
                                                     longattn_fp8_cache cache,
                                                     longattn_tensor_mut out, float *lse,
                                                     size_t lse_len);

/* longattn_paged_decode_fp8_cuda with a policy per kv head. Not yet run on a GPU. */
longattn_status longattn_paged_decode_fp8_policy_cuda(const longattn_paged_desc *desc,
                                                      const longattn_decode_policy *policy,
                                                      longattn_dtype dtype, longattn_tensor q,
                                                      longattn_fp8_cache cache,
                                                      longattn_tensor_mut out, float *lse,
                                                      size_t lse_len, int32_t device,
                                                      void *stream);

/* ---- Merging partial results (split-KV, cascades, ring attention) ------------------------- */

/* Two results over disjoint key sets, (o_a, lse_a) and (o_b, lse_b), give
 * M = max(lse_a, lse_b), lse = M + ln(exp(lse_a - M) + exp(lse_b - M)),
 * o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b; two empty rows (lse -inf) give o = 0,
 * lse = -inf (docs/semantics.md, "Merging partial results"). o: [batch, seqlen, heads,
 * head_dim] contiguous; lse: [batch, heads, seqlen] f32, natural log (the layout the dense and
 * paged calls write; varlen: batch = 1, seqlen = total_q). Each dimension at most INT32_MAX,
 * head_dim >= 1. */
typedef struct longattn_merge_desc {
  size_t batch;
  size_t seqlen;
  size_t heads;
  size_t head_dim;
} longattn_merge_desc;

/* A partial result read by a merge: o_len elements of the call's dtype, lse_len floats. */
typedef struct longattn_partial {
  const void *o;
  size_t o_len;
  const float *lse;
  size_t lse_len;
} longattn_partial;

/* A partial result written by a merge. */
typedef struct longattn_partial_mut {
  void *o;
  size_t o_len;
  float *lse;
  size_t lse_len;
} longattn_partial_mut;

/* Elements of an o buffer and of an lse buffer. */
longattn_status longattn_merge_sizes(const longattn_merge_desc *desc, size_t *o_len,
                                     size_t *lse_len);

/* out = merge(a, b) on host buffers (o of dtype: f32, f16 or bf16). out's buffers may overlap
 * neither each other nor a or b (a and b may alias each other). */
longattn_status longattn_merge_cpu(const longattn_merge_desc *desc, longattn_dtype dtype,
                                   longattn_partial a, longattn_partial b,
                                   longattn_partial_mut out);

/* acc = merge(acc, part) in place on host buffers (a running result: ring steps, cascades).
 * acc's buffers may overlap neither each other nor part's. */
longattn_status longattn_merge_into_cpu(const longattn_merge_desc *desc, longattn_dtype dtype,
                                        longattn_partial_mut acc, longattn_partial part);

/* The same on device buffers of GPU `device` (f32, f16 or bf16), queued on `stream`; stream,
 * validation and lifetimes as longattn_dense_forward_cuda. Not yet run on a GPU through the
 * C API. */
longattn_status longattn_merge_cuda(const longattn_merge_desc *desc, longattn_dtype dtype,
                                    longattn_partial a, longattn_partial b,
                                    longattn_partial_mut out, int32_t device, void *stream);
longattn_status longattn_merge_into_cuda(const longattn_merge_desc *desc, longattn_dtype dtype,
                                         longattn_partial_mut acc, longattn_partial part,
                                         int32_t device, void *stream);

/* ---- Neighborhood attention (1-D, 2-D, 3-D grids) ------------------------------------------ */

#define LONGATTN_MAX_NEIGHBORHOOD_DIMS 3

/* One grid dim (docs/semantics.md, "Neighborhood attention (NATTEN semantics)"): a query at
 * position x sees `kernel` keys along the dim, every `dilation`-th position of its
 * dilation group (x mod dilation), the window shifted at the borders so that it always holds
 * `kernel` keys (kernel * dilation <= length); with causal, only keys at or before x (fewer
 * near the start). stride s: runs of s in-group positions share one window (non-causal dims
 * only, s <= kernel). dilation 0 and stride 0 mean 1. kernel = length, dilation 1 on every
 * dim and no causal dim is full self-attention over the grid. */
typedef struct longattn_neighborhood_dim {
  size_t length;
  size_t kernel;
  size_t dilation;
  size_t stride;
  int32_t causal;
} longattn_neighborhood_dim;

/* A neighborhood problem: q, out: [batch, X, (Y, (Z,)) heads_q, head_dim], k, v: [batch, X,
 * (Y, (Z,)) heads_kv, head_dim] with dims[0..rank) = X, Y, Z (outermost first; entries past
 * rank are not read): the grid is flattened into the seq axis of longattn_strides (tokens =
 * X * Y * Z, row-major, last dim fastest), so the strides are those of [batch, tokens, heads,
 * head_dim]. rank 1 to 3 (0 and above 3 are refused); heads_kv divides heads_q; scale 0 means
 * 1/sqrt(head_dim), softcap 0 means off. LSE: [batch, heads_q, tokens]. */
typedef struct longattn_neighborhood_desc {
  size_t batch;
  size_t heads_q;
  size_t heads_kv;
  size_t head_dim;
  size_t rank;
  longattn_neighborhood_dim dims[LONGATTN_MAX_NEIGHBORHOOD_DIMS];
  float scale;
  float softcap;
} longattn_neighborhood_desc;

/* Elements of the output (and of q) and of the LSE. */
longattn_status longattn_neighborhood_sizes(const longattn_neighborhood_desc *desc,
                                            size_t *out_len, size_t *lse_len);

/* Neighborhood attention on the CPU (f32, f16 or bf16 host buffers; lse may be NULL). Refused:
 * a bad rank, a dim of length 0 or above INT32_MAX, kernel/dilation/stride out of their
 * domain (kernel * dilation > length, stride > kernel, stride > 1 on a causal dim), heads,
 * lengths, strides or overlaps as longattn_dense_forward_cpu. */
longattn_status longattn_neighborhood_forward_cpu(const longattn_neighborhood_desc *desc,
                                                  longattn_dtype dtype, longattn_tensor q,
                                                  longattn_tensor k, longattn_tensor v,
                                                  longattn_tensor_mut out, float *lse,
                                                  size_t lse_len);

/* The same on device buffers of GPU `device` (f16 or bf16; head_dim a multiple of 8 up to 256,
 * 16-byte aligned buffers, strides multiples of 8 elements), queued on `stream`; stream,
 * validation and lifetimes as longattn_dense_forward_cuda. The fused tensor-core kernel runs
 * at head_dim 64 and 128, the portable one otherwise. Not yet run on a GPU through the C
 * API. */
longattn_status longattn_neighborhood_forward_cuda(const longattn_neighborhood_desc *desc,
                                                   longattn_dtype dtype, longattn_tensor q,
                                                   longattn_tensor k, longattn_tensor v,
                                                   longattn_tensor_mut out, float *lse,
                                                   size_t lse_len, int32_t device, void *stream);

/* ---- Block-sparse prefill ------------------------------------------------------------------ */

/* A block mask in CSR form (docs/semantics.md, "Block-sparse masks"; FlexAttention's BlockMask,
 * FlashInfer's BSR), host arrays for the CPU and CUDA calls alike. Query block qb holds
 * rows qb * block_m .. (qb + 1) * block_m of each sequence, key block kb keys kb * block_n ..
 * (kb + 1) * block_n (the last of each may be short). List l, row-major over [batch, heads,
 * num_q_blocks], is indices[offsets[l] .. offsets[l + 1]]: strictly increasing key blocks in
 * 0 .. num_k_blocks. offsets: batch * heads * num_q_blocks + 1 entries, offsets[0] = 0, never
 * decreasing, the last = nnz. full: nnz flags, nonzero = the block is fully visible (the
 * descriptor's causal/window/sinks mask is not applied inside it), 0 = partial (that mask
 * applies), or NULL: every block partial. A key outside every listed block is hidden; a row
 * that sees no key gives output 0 and LSE -inf. batch is the problem's or 1 (broadcast over
 * sequences), heads its heads_q or 1; num_q_blocks = ceil(max seqlen_q / block_m),
 * num_k_blocks = ceil(max seqlen_k / block_n) (varlen: each sequence uses the leading blocks
 * of its own lengths; lists past its last query block must be empty). At most INT32_MAX lists
 * and entries. */
typedef struct longattn_block_mask {
  size_t batch;
  size_t heads;
  size_t num_q_blocks;
  size_t num_k_blocks;
  size_t block_m;
  size_t block_n;
  const int32_t *offsets;
  const int32_t *indices;
  const uint8_t *full; /* NULL: every entry partial */
  size_t nnz;
} longattn_block_mask;

/* Block-sparse attention on the CPU: the dense problem of desc (buffers, options, sizes from
 * longattn_dense_sizes, as longattn_dense_forward_cpu) visiting only the listed key blocks;
 * f32, f16 or bf16; lse may be NULL. A malformed mask (offsets length or order, an index out
 * of range, unsorted or duplicated, dims that do not match the problem) is refused with
 * LONGATTN_ERR_INDEX, LONGATTN_ERR_SHAPE or LONGATTN_ERR_INVALID_OPTION and a message naming
 * the list. Every listed block partial with causal set equals longattn_dense_forward_cpu with
 * causal set. */
longattn_status longattn_block_sparse_forward_cpu(const longattn_dense_desc *desc,
                                                  const longattn_block_mask *mask,
                                                  longattn_dtype dtype, longattn_tensor q,
                                                  longattn_tensor k, longattn_tensor v,
                                                  longattn_tensor_mut out, float *lse,
                                                  size_t lse_len);

/* The same on device buffers of GPU `device` (q, k, v, out, lse; the mask and the varlen
 * offsets stay host arrays, validated, then uploaded on `stream` per call), queued on
 * `stream`; stream, validation and lifetimes as longattn_dense_forward_cuda. The tensor-core
 * kernel: f16 or bf16, block_m and block_n multiples of 64, head_dim 64, 128 or 256. Not yet
 * run on a GPU through the C API. */
longattn_status longattn_block_sparse_forward_cuda(const longattn_dense_desc *desc,
                                                   const longattn_block_mask *mask,
                                                   longattn_dtype dtype, longattn_tensor q,
                                                   longattn_tensor k, longattn_tensor v,
                                                   longattn_tensor_mut out, float *lse,
                                                   size_t lse_len, int32_t device, void *stream);

/* ---- MoBA (mixture of block attention) ---------------------------------------------------- */

/* MoBA's knobs (docs/semantics.md, "MoBA selection"; Lu et al. 2025): keys in blocks of
 * block_n; a query row at position p (bottom-right aligned) attends to its own block
 * p / block_n and the top_k - 1 earlier blocks whose mean key scores highest against it (ties:
 * the lower block; all of them when fewer exist), under the descriptor's element mask (MoBA's
 * is causal). block_n and top_k >= 1 (0 is refused with LONGATTN_ERR_INVALID_OPTION). */
typedef struct longattn_moba_config {
  size_t block_n;
  size_t top_k;
} longattn_moba_config;

/* MoBA on the CPU: per-token selection (f64 gating), then attention over each row's blocks;
 * buffers, options and sizes (longattn_dense_sizes) as longattn_dense_forward_cpu; f32, f16 or
 * bf16; lse may be NULL. */
longattn_status longattn_moba_forward_cpu(const longattn_dense_desc *desc,
                                          longattn_moba_config config, longattn_dtype dtype,
                                          longattn_tensor q, longattn_tensor k, longattn_tensor v,
                                          longattn_tensor_mut out, float *lse, size_t lse_len);

/* The same on device buffers of GPU `device`, queued on `stream` as
 * longattn_dense_forward_cuda (scratch for the selection is allocated per call): f16 or bf16,
 * head_dim 64, 128 or 256, min(top_k, key blocks) at most 32. The gating runs in f32, so a
 * near-tie may pick another block than the CPU's f64 gating. The MoBA kernels are not yet run
 * on a GPU. */
longattn_status longattn_moba_forward_cuda(const longattn_dense_desc *desc,
                                           longattn_moba_config config, longattn_dtype dtype,
                                           longattn_tensor q, longattn_tensor k, longattn_tensor v,
                                           longattn_tensor_mut out, float *lse, size_t lse_len,
                                           int32_t device, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* LONGATTN_H */
