// Fused tensor-core neighborhood attention (mma.sync m16n8k16, f32 accumulation, sm_80+).
// Verified on an H200 (sm_90a build) on 2026-12-04: GPU tests and compute-sanitizer memcheck
// clean (racecheck cut off by its time limit, incomplete); the sm_80 build has not run on a
// GPU. Reachable only through the explicit NeighborhoodAttention::forward_gpu_fused.
//
// The shared FlashAttention-2 mainloop (longattn/mma_mainloop.cuh, as the dense mma kernel)
// with the neighborhood problem, which is all this file writes:
// - schedule: block x runs query tile x of the host schedule (src/neighborhood/schedule.rs):
//   64 rows = a power-of-two box of in-group positions of one dilation group, and the key
//   tiles of 64 keys that cut the box of keys its rows' neighborhoods cover (row-major);
// - addressing: a query row's token comes from its box coordinates (shifts), a key's from
//   its key-box coordinates (two divisions), so dilation groups need no gather copy; rows
//   and keys past the box are zero-filled by cp.async;
// - mask: interior key tiles (every valid row sees every key, flagged by the host) skip it;
//   boundary tiles compare each key's box coordinates with the row's window per dim.

#include "longattn/common.cuh"
#include "longattn/dispatch.cuh"
#include "longattn/mma_mainloop.cuh"
#include "longattn/neighborhood.cuh"

namespace longattn {
namespace {

// 64 query rows (LaNaSchedule: a 2^6-row box) and key tiles of 64 keys
// (LaNaSchedule::key_tile); Q fragments are re-read from shared memory per tile.
using Traits64 = MmaTraits<64, 64, 3, false, 2>;
using Traits128 = MmaTraits<128, 64, 2, false, 2>;

// Box coordinates of row r of a query tile with extents 2^tile_log2[a] (row-major).
__device__ __forceinline__ void tile_coords(int r, const LaNaSchedule &s, int (&c)[LA_NA_DIMS]) {
  c[2] = r & ((1 << s.tile_log2[2]) - 1);
  c[1] = (r >> s.tile_log2[2]) & ((1 << s.tile_log2[1]) - 1);
  c[0] = r >> (s.tile_log2[2] + s.tile_log2[1]);
}

// Token of query row r of `tile`, or -1 for a padding row past the group's end.
__device__ __forceinline__ long long row_token(const LaNeighborhoodParams &p,
                                               const LaNaSchedule &s, const LaNaTile &tile,
                                               int r) {
  int c[LA_NA_DIMS];
  tile_coords(r, s, c);
  bool ok = true;
#pragma unroll
  for (int a = 0; a < LA_NA_DIMS; ++a) {
    ok = ok && c[a] < tile.valid[a];
    c[a] += tile.origin[a];
  }
  return ok ? na::token(p, c, tile.group) : -1;
}

// Box coordinates of key n of `tile`'s key box (row-major), relative to the box's start.
__device__ __forceinline__ void key_coords(int n, const LaNaTile &tile, int (&c)[LA_NA_DIMS]) {
  const int rest = n / tile.key_extent[2];
  c[2] = n - rest * tile.key_extent[2];
  c[0] = rest / tile.key_extent[1];
  c[1] = rest - c[0] * tile.key_extent[1];
}

// Moves box coordinates c forward by `by` keys (row-major), carrying into the outer dims;
// cheaper than key_coords' two divisions when `by` is at most a few rows of the box.
__device__ __forceinline__ void advance(int (&c)[LA_NA_DIMS], int by, const LaNaTile &tile) {
  c[2] += by;
  while (c[2] >= tile.key_extent[2]) {
    c[2] -= tile.key_extent[2];
    if (++c[1] >= tile.key_extent[1]) {
      c[1] = 0;
      ++c[0];
    }
  }
}

// Query tile blockIdx.x of the host schedule for one (batch, head).
template <typename T, class Tr>
struct NeighborhoodProblem {
  const LaNeighborhoodParams &p;
  const LaNaSchedule &sched;
  LaNaTile tile;
  const T *q, *k, *v;
  T *o;
  int b, h, n_keys;
  float scale, softcap;
  // This thread's two rows: the window per dim relative to the key box, [lo, hi]; a padding
  // row gets an empty window (lo > hi) in dim 0.
  int lo[2][LA_NA_DIMS], hi[2][LA_NA_DIMS];

  // Rows gathered by token (padding rows zero-filled).
  __device__ __forceinline__ void load_q(uint32_t q_smem, int tid) {
    const int chunk = tid % Tr::kChunksPerRow, r0 = tid / Tr::kChunksPerRow;
#pragma unroll
    for (int pass = 0; pass < Tr::kBlockM / Tr::kRowsPerPass; ++pass) {
      const int r = r0 + pass * Tr::kRowsPerPass;
      const long long t = row_token(p, sched, tile, r);
      const T *src = t >= 0 ? q + t * p.q_row_stride + chunk * 8 : q;
      mma::cp_async_16(q_smem + swizzled_elem<Tr::kHeadDim>(r, chunk) * (int)sizeof(T), src,
                       t >= 0);
    }
  }
  __device__ __forceinline__ int schedule() const { return tile.num_key_tiles; }
  __device__ __forceinline__ int key0(int t) const { return t * Tr::kBlockN; }
  // Key tile t: keys [t * BN, t * BN + BN) of the key box; one token per row for K and V.
  __device__ __forceinline__ void load_kv(uint32_t k_smem, uint32_t v_smem, int t, int tid) {
    const int chunk = tid % Tr::kChunksPerRow, r0 = tid / Tr::kChunksPerRow;
#pragma unroll
    for (int pass = 0; pass < Tr::kBlockN / Tr::kRowsPerPass; ++pass) {
      const int r = r0 + pass * Tr::kRowsPerPass, n = t * Tr::kBlockN + r;
      const bool ok = n < n_keys;
      long long key = 0;
      if (ok) {
        int c[LA_NA_DIMS];
        key_coords(n, tile, c);
#pragma unroll
        for (int a = 0; a < LA_NA_DIMS; ++a) c[a] += tile.key_start[a];
        key = na::token(p, c, tile.group);
      }
      const uint32_t off = swizzled_elem<Tr::kHeadDim>(r, chunk) * (int)sizeof(T);
      mma::cp_async_16(k_smem + off, k + key * p.k_row_stride + chunk * 8, ok);
      mma::cp_async_16(v_smem + off, v + key * p.v_row_stride + chunk * 8, ok);
    }
  }
  __device__ __forceinline__ void prepare_rows(int warp, int g) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      int c[LA_NA_DIMS];
      tile_coords(16 * warp + g + 8 * r, sched, c);
      bool ok = true;
#pragma unroll
      for (int a = 0; a < LA_NA_DIMS; ++a) {
        ok = ok && c[a] < tile.valid[a];
        const int x = (tile.origin[a] + c[a]) * p.dilation[a] + tile.group[a];
        int start, len, grp;
        na::window(p, a, ok ? x : tile.group[a], start, len, grp);
        lo[r][a] = start - tile.key_start[a];
        hi[r][a] = start + len - 1 - tile.key_start[a];
      }
      if (!ok) {
        lo[r][0] = 1;
        hi[r][0] = 0;
      }
    }
  }
  // Boundary key tiles (flagged by the host): per element, the key's box coordinates against
  // the row's window. This thread's columns are n0 + 8 i + 2 tq + e2: one division pair for
  // the first, then steps of 1 and 8 keys with carries (coordinates past n_keys are never
  // compared).
  __device__ __forceinline__ void mask_tile(float (&sc)[Tr::kSBlocks][4], int t, int n0,
                                            int tq) const {
    if (sched.interior[tile.first_key_tile + t]) return;
    int cb[LA_NA_DIMS];
    key_coords(n0 + 2 * tq, tile, cb);
#pragma unroll
    for (int i = 0; i < Tr::kSBlocks; ++i) {
      int c[LA_NA_DIMS] = {cb[0], cb[1], cb[2]};
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2) {
        if (e2 == 1) advance(c, 1, tile);
        const int n = n0 + 8 * i + 2 * tq + e2;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          bool vis = n < n_keys;
#pragma unroll
          for (int a = 0; a < LA_NA_DIMS; ++a) vis = vis && c[a] >= lo[r][a] && c[a] <= hi[r][a];
          if (!vis) sc[i][2 * r + e2] = kNegInf;
        }
      }
      if (i + 1 < Tr::kSBlocks) advance(cb, 8, tile);
    }
  }
  __device__ __forceinline__ void store_o(int row, int chunk, const uint4 *staged) {
    const long long tok = row_token(p, sched, tile, row);
    if (tok >= 0) *reinterpret_cast<uint4 *>(o + tok * p.o_row_stride + chunk * 8) = *staged;
  }
  __device__ __forceinline__ bool has_lse() const { return p.lse != nullptr; }
  __device__ __forceinline__ void store_lse(int row, float lse) {
    const long long tok = row_token(p, sched, tile, row);
    if (tok >= 0) p.lse[((long long)b * p.heads_q + h) * p.tokens + tok] = lse;
  }
};

template <typename T, class Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks)
    neighborhood_mma_kernel(const __grid_constant__ LaNeighborhoodParams p,
                            const __grid_constant__ LaNaSchedule sched) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int b = blockIdx.z, h = blockIdx.y;
  const LaNaTile tile = sched.tiles[blockIdx.x];
  const int kvh = h / (p.heads_q / p.heads_kv);
  NeighborhoodProblem<T, Tr> pb{
      p,
      sched,
      tile,
      static_cast<const T *>(p.q) + b * p.q_batch_stride + h * p.q_head_stride,
      static_cast<const T *>(p.k) + b * p.k_batch_stride + kvh * p.k_head_stride,
      static_cast<const T *>(p.v) + b * p.v_batch_stride + kvh * p.v_head_stride,
      static_cast<T *>(p.o) + b * p.o_batch_stride + h * p.o_head_stride,
      b,
      h,
      tile.key_extent[0] * tile.key_extent[1] * tile.key_extent[2],
      p.scale,
      p.softcap};
  mma_attention<T, Tr>(pb, smem_raw);
}

template <typename T, class Tr>
cudaError_t launch(const LaNeighborhoodParams &p, const LaNaSchedule &s, cudaStream_t stream) {
  return launch_mma_kernel<Tr>(neighborhood_mma_kernel<T, Tr>,
                               dim3(s.num_tiles, p.heads_q, p.batch), stream, p, s);
}

template <typename T>
cudaError_t launch_for_dim(const LaNeighborhoodParams &p, const LaNaSchedule &s,
                           cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch<T, Traits64>(p, s, stream);
    case 128: return launch<T, Traits128>(p, s, stream);
  }
  return cudaErrorNotSupported;
}

// What the host schedule promises and the kernel relies on, checkable without reading the
// device arrays (their contents are the Rust side's: NeighborhoodSchedule).
bool schedule_ok(const LaNaSchedule &s) {
  if (s.key_tile != 64 || s.num_tiles < 0 || (s.num_tiles > 0 && (!s.tiles || !s.interior)))
    return false;
  int rows_log2 = 0;
  for (int a = 0; a < LA_NA_DIMS; ++a) {
    if (s.tile_log2[a] < 0 || s.tile_log2[a] > 6) return false;
    rows_log2 += s.tile_log2[a];
  }
  return rows_log2 == 6;
}

}  // namespace
}  // namespace longattn

extern "C" int la_neighborhood_mma_forward(const LaNeighborhoodParams *params,
                                           const LaNaSchedule *schedule, cudaStream_t stream) {
  using namespace longattn;
  if (params == nullptr || schedule == nullptr || !na::params_ok(*params) ||
      !schedule_ok(*schedule))
    return cudaErrorInvalidValue;
  const LaNeighborhoodParams &p = *params;
  if (p.batch == 0 || p.tokens == 0 || schedule->num_tiles == 0) return cudaSuccess;
  const cudaError_t err = with_dtype<__half, __nv_bfloat16>(p.dtype, cudaErrorInvalidValue, [&](auto t) {
    return launch_for_dim<typename decltype(t)::type>(p, *schedule, stream);
  });
  static_assert(LA_DENSE_KERNEL_UNSUPPORTED == cudaErrorNotSupported, "documented in dense.h");
  return err;
}
