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

/* One query tile of the tensor-core kernel's schedule (src/neighborhood/schedule.rs): a box
 * of in-group positions of one dilation group, and the box of keys its rows' neighborhoods
 * cover, cut into key tiles of `key_tile` keys (row-major over the key box). */
typedef struct LaNaTile {
  /* Dilation group, first row and valid rows (in-group) per dim. */
  int32_t group[LA_NA_DIMS];
  int32_t origin[LA_NA_DIMS];
  int32_t valid[LA_NA_DIMS];
  /* Key box: first in-group key index and extent per dim. */
  int32_t key_start[LA_NA_DIMS];
  int32_t key_extent[LA_NA_DIMS];
  /* This tile's key tiles: entries [first_key_tile, first_key_tile + num_key_tiles) of
   * LaNaSchedule::interior. */
  int32_t first_key_tile, num_key_tiles;
} LaNaTile;

typedef struct LaNaSchedule {
  /* Device arrays: num_tiles tiles, and one flag per key tile (1: every valid row of its
   * query tile sees every key of it, no element mask). */
  const LaNaTile *tiles;
  const uint8_t *interior;
  int32_t num_tiles;
  /* log2 of the query tile's extent per dim (the extents multiply to 64 rows). */
  int32_t tile_log2[LA_NA_DIMS];
  /* Keys per key tile: 64. */
  int32_t key_tile;
} LaNaSchedule;

/* Tensor-core kernel (mma.sync, sm_80+; verified on an H200, sm_80 not run): head_dim 64 or 128,
 * f16 or bf16, 64-row query tiles and 64-key tiles from `schedule`. Returns
 * LA_DENSE_KERNEL_UNSUPPORTED when the device or the params are outside what it covers,
 * cudaErrorInvalidValue for invalid params. */
int la_neighborhood_mma_forward(const LaNeighborhoodParams *params, const LaNaSchedule *schedule,
                                cudaStream_t stream);

/* Box shapes of the Hopper kernel (kernels/neighborhood_wgmma.cu), chosen on the host
 * (src/neighborhood/schedule.rs, HopperTiles): a block owns a box of 2^query_log2[a]
 * in-group positions per dim (128 rows in all) of one dilation group, and visits the key
 * range its rows' windows cover per dim in key boxes of 2^key_log2[a] keys per dim (128 in
 * all). Padded dims (before the last `rank` dims: length 1, kernel 1) have log2 0. Each box
 * is one TMA copy, so per dim the box extent times the dilation is at most 256 and the
 * dilation at most 8. */
typedef struct LaNaHopperTiles {
  /* The problem's rank (1 to 3): the tensor maps have its dims only. */
  int32_t rank;
  int32_t query_log2[LA_NA_DIMS];
  int32_t key_log2[LA_NA_DIMS];
} LaNaHopperTiles;

/* Hopper kernel (wgmma + TMA, sm_90a only; compiled, NOT YET RUN ON A GPU): head_dim 64 or
 * 128, f16 or bf16, boxes from `tiles`. Returns LA_DENSE_KERNEL_UNSUPPORTED when the device
 * is not compute capability 9.0, or the copy engine cannot address the tensors (pointers
 * 16-byte aligned, strides positive multiples of 16 bytes below 2^40 bytes);
 * cudaErrorInvalidValue for invalid params or tiles. One launch per batch element for a 3-D
 * grid (the tensor map has at most 5 dims); never synchronizes. */
int la_neighborhood_wgmma_forward(const LaNeighborhoodParams *params,
                                  const LaNaHopperTiles *tiles, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
