// Fused tensor-core neighborhood attention (mma.sync m16n8k16, f32 accumulation, sm_80+).
// NOT YET VERIFIED ON A GPU: compiled without spills, reachable only through the explicit
// NeighborhoodAttention::forward_gpu_fused.
//
// The dense mma kernel's FlashAttention-2 mainloop (kernels/dense_mma.cu: 4 warps x 16 query
// rows, cp.async K/V ring, ldmatrix from XOR-swizzled shared memory, online softmax in log2
// units, O += P V from the re-packed S accumulators) with a different key-tile schedule, row
// addressing and mask, which are the only parts written here:
// - schedule: block x runs query tile x of the host schedule (src/neighborhood/schedule.rs):
//   64 rows = a power-of-two box of in-group positions of one dilation group, and the key
//   tiles of 64 keys that cut the box of keys its rows' neighborhoods cover (row-major);
// - addressing: a query row's token comes from its box coordinates (shifts), a key's from
//   its key-box coordinates (two divisions), so dilation groups need no gather copy; rows
//   and keys past the box are zero-filled by cp.async;
// - mask: interior key tiles (every valid row sees every key, flagged by the host) skip it;
//   boundary tiles compare each key's box coordinates with the row's window per dim.
// TODO(schedule header): fold into the dense kernels' shared mainloop once the key-tile
// schedule abstraction lands (kernels/include/longattn, being written in another branch);
// until then this file repeats the mainloop instead of editing dense_mma.cu.

#include "longattn/common.cuh"
#include "longattn/dispatch.cuh"
#include "longattn/mma.cuh"
#include "longattn/neighborhood.cuh"

namespace longattn {
namespace {

template <int kHeadDim_, int kStages_, int kMinBlocks_>
struct NaMmaTraits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = 16 * kWarps;  // query rows per tile (LaNaSchedule: 64)
  static constexpr int kBlockN = 64;           // keys per key tile (LaNaSchedule::key_tile)
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kStages = kStages_;
  static constexpr int kMinBlocks = kMinBlocks_;
  static constexpr int kChunksPerRow = kHeadDim / 8;
  static constexpr int kSBlocks = kBlockN / 8;   // (16, kBlockN) S per warp
  static constexpr int kOBlocks = kHeadDim / 8;  // (16, kHeadDim) O per warp
  static constexpr int kQkSteps = kHeadDim / 16;
  static constexpr int kPvSteps = kBlockN / 16;
  static constexpr int kQElems = kBlockM * kHeadDim;
  static constexpr int kKvElems = kBlockN * kHeadDim;
  static constexpr size_t kSmemBytes = 2 * ((size_t)kQElems + 2 * (size_t)kStages * kKvElems);
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;

  static_assert(kHeadDim % 64 == 0, "the XOR swizzle permutes 8 chunks of 16 bytes per row");
  static_assert(kBlockN % kRowsPerPass == 0 && kBlockM % kRowsPerPass == 0, "whole passes");
  static_assert((16 * kChunksPerRow) % 32 == 0, "O write-back is whole warp passes");
  static_assert(kStages >= 2 && kStages <= 4, "cp.async ring depth");
};

using Traits64 = NaMmaTraits<64, 3, 2>;
using Traits128 = NaMmaTraits<128, 2, 2>;

template <int kHeadDim>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y) {
  const typename Elem<T>::Pair v = Elem<T>::from_float2(make_float2(x, y));
  return *reinterpret_cast<const uint32_t *>(&v);
}

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

template <typename T, class Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks)
    neighborhood_mma_kernel(const __grid_constant__ LaNeighborhoodParams p,
                            const __grid_constant__ LaNaSchedule sched) {
  constexpr int D = Tr::kHeadDim, BN = Tr::kBlockN, kStages = Tr::kStages;
  constexpr int kCpr = Tr::kChunksPerRow, kRowsPerPass = Tr::kRowsPerPass;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T *q_s = reinterpret_cast<T *>(smem_raw);
  T *k_s = q_s + Tr::kQElems;
  T *v_s = k_s + kStages * Tr::kKvElems;

  const int b = blockIdx.z, h = blockIdx.y;
  const LaNaTile tile = sched.tiles[blockIdx.x];
  const int kvh = h / (p.heads_q / p.heads_kv);
  const T *q = static_cast<const T *>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T *k = static_cast<const T *>(p.k) + b * p.k_batch_stride + kvh * p.k_head_stride;
  const T *v = static_cast<const T *>(p.v) + b * p.v_batch_stride + kvh * p.v_head_stride;
  T *o = static_cast<T *>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
  const int n_keys = tile.key_extent[0] * tile.key_extent[1] * tile.key_extent[2];
  const int n_tiles = tile.num_key_tiles;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;
  const int chunk = tid % kCpr, r0 = tid / kCpr;

  // Group 0: the Q tile, rows gathered by token (padding rows zero-filled).
  {
    const uint32_t base = mma::smem_addr(q_s);
#pragma unroll
    for (int pass = 0; pass < Tr::kBlockM / kRowsPerPass; ++pass) {
      const int r = r0 + pass * kRowsPerPass;
      const long long t = row_token(p, sched, tile, r);
      const T *src = t >= 0 ? q + t * p.q_row_stride + chunk * 8 : q;
      mma::cp_async_16(base + swizzle<D>(r, chunk) * (int)sizeof(T), src, t >= 0);
    }
  }
  mma::cp_async_commit();

  // Key tile t: keys [t * BN, t * BN + BN) of the key box; one token per row for K and V.
  auto load_kv = [&](int t) {
    const int stage = t % kStages;
    const uint32_t kb = mma::smem_addr(k_s + stage * Tr::kKvElems);
    const uint32_t vb = mma::smem_addr(v_s + stage * Tr::kKvElems);
#pragma unroll
    for (int pass = 0; pass < BN / kRowsPerPass; ++pass) {
      const int r = r0 + pass * kRowsPerPass, n = t * BN + r;
      const bool ok = n < n_keys;
      long long key = 0;
      if (ok) {
        int c[LA_NA_DIMS];
        key_coords(n, tile, c);
#pragma unroll
        for (int a = 0; a < LA_NA_DIMS; ++a) c[a] += tile.key_start[a];
        key = na::token(p, c, tile.group);
      }
      const uint32_t off = swizzle<D>(r, chunk) * (int)sizeof(T);
      mma::cp_async_16(kb + off, k + key * p.k_row_stride + chunk * 8, ok);
      mma::cp_async_16(vb + off, v + key * p.v_row_stride + chunk * 8, ok);
    }
  };
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < n_tiles) load_kv(t);
    mma::cp_async_commit();
  }

  // ldmatrix lane offsets, as in dense_mma.cu.
  const int sw = lane & 7;
  uint32_t q_off[4], k_off[4], v_off[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    q_off[j] = ((16 * warp + (lane & 15)) * D + (((2 * j + (lane >> 4)) ^ sw) << 3)) * sizeof(T);
    k_off[j] = (((lane & 7) + ((lane >> 4) << 3)) * D + (((2 * j + ((lane >> 3) & 1)) ^ sw) << 3)) *
               sizeof(T);
    v_off[j] = ((lane & 15) * D + (((2 * j + (lane >> 4)) ^ sw) << 3)) * sizeof(T);
  }
  constexpr uint32_t kChunk8Bytes = 64 * sizeof(T);
  const uint32_t q_base = mma::smem_addr(q_s);
  const uint32_t k_base = mma::smem_addr(k_s), v_base = mma::smem_addr(v_s);

  // This thread's two rows (g and g + 8 of the warp's 16): the window per dim relative to
  // the key box, [lo, hi]; a padding row gets an empty window (lo > hi) in dim 0.
  int lo[2][LA_NA_DIMS], hi[2][LA_NA_DIMS];
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

  const float scale_log2 = p.scale * kLog2e;
  const bool softcap = p.softcap > 0.0f;
  const float cap_pre = softcap ? (p.scale / p.softcap) : 0.0f;
  const float cap_post = p.softcap * kLog2e;

  float m[2] = {kNegInf, kNegInf};
  float l[2] = {0.0f, 0.0f};
  float acc[Tr::kOBlocks][4];
#pragma unroll
  for (int i = 0; i < Tr::kOBlocks; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.0f;

  for (int t = 0; t < n_tiles; ++t) {
    mma::cp_async_wait<kStages - 2>();
    __syncthreads();
    if (t + kStages - 1 < n_tiles) load_kv(t + kStages - 1);
    mma::cp_async_commit();

    const int stage = t % kStages, n0 = t * BN;
    const uint32_t ks = k_base + (uint32_t)(stage * Tr::kKvElems * sizeof(T));
    const uint32_t vs = v_base + (uint32_t)(stage * Tr::kKvElems * sizeof(T));

    // S = Q K^T: (16, BN) per warp; Q fragments re-read from shared memory per tile.
    float sc[Tr::kSBlocks][4];
#pragma unroll
    for (int i = 0; i < Tr::kSBlocks; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[i][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < Tr::kQkSteps; ++kk) {
      uint32_t a[4];
      mma::ldmatrix_x4(a, q_base + q_off[kk % 4] + (kk / 4) * kChunk8Bytes);
#pragma unroll
      for (int nb2 = 0; nb2 < Tr::kSBlocks / 2; ++nb2) {
        uint32_t bk[4];
        mma::ldmatrix_x4(bk, ks + k_off[kk % 4] + (kk / 4) * kChunk8Bytes +
                                 (uint32_t)(16 * nb2 * D * sizeof(T)));
        mma::Mma<T>::run(sc[2 * nb2], a, bk[0], bk[1]);
        mma::Mma<T>::run(sc[2 * nb2 + 1], a, bk[2], bk[3]);
      }
    }

    if (softcap) {
#pragma unroll
      for (int i = 0; i < Tr::kSBlocks; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[i][e] = cap_post * tanhf(sc[i][e] * cap_pre);
    } else {
#pragma unroll
      for (int i = 0; i < Tr::kSBlocks; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[i][e] *= scale_log2;
    }

    // Boundary key tiles: per element, the key's box coordinates against the row's window.
    // This thread's columns are n0 + 8 i + 2 tq + e2: one division pair for the first, then
    // steps of 1 and 8 keys with carries (coordinates past n_keys are never compared).
    if (!sched.interior[tile.first_key_tile + t]) {
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

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m[r];
#pragma unroll
      for (int i = 0; i < Tr::kSBlocks; ++i) mx = fmaxf(mx, fmaxf(sc[i][2 * r], sc[i][2 * r + 1]));
      mx = fmaxf(mx, mma::shfl_xor<1>(mx));
      mx = fmaxf(mx, mma::shfl_xor<2>(mx));
      const float alpha = rescale_factor(m[r], mx);
      // Nothing visible yet (mx = -inf): subtract 0 so masked scores give exp2(-inf) = 0.
      const float base = mx == kNegInf ? 0.0f : mx;
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < Tr::kSBlocks; ++i) {
        sc[i][2 * r] = mma::fast_exp2(sc[i][2 * r] - base);
        sc[i][2 * r + 1] = mma::fast_exp2(sc[i][2 * r + 1] - base);
        sum += sc[i][2 * r] + sc[i][2 * r + 1];
      }
      l[r] = l[r] * alpha + sum;
      m[r] = mx;
#pragma unroll
      for (int i = 0; i < Tr::kOBlocks; ++i) {
        acc[i][2 * r] *= alpha;
        acc[i][2 * r + 1] *= alpha;
      }
    }

#pragma unroll
    for (int kk = 0; kk < Tr::kPvSteps; ++kk) {
      const uint32_t a[4] = {pack2<T>(sc[2 * kk][0], sc[2 * kk][1]),
                             pack2<T>(sc[2 * kk][2], sc[2 * kk][3]),
                             pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                             pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
      for (int db2 = 0; db2 < Tr::kOBlocks / 2; ++db2) {
        uint32_t bv[4];
        mma::ldmatrix_x4_trans(bv, vs + v_off[db2 % 4] + (db2 / 4) * kChunk8Bytes +
                                       (uint32_t)(16 * kk * D * sizeof(T)));
        mma::Mma<T>::run(acc[2 * db2], a, bv[0], bv[1]);
        mma::Mma<T>::run(acc[2 * db2 + 1], a, bv[2], bv[3]);
      }
    }
  }

  mma::cp_async_wait<0>();
  __syncthreads();

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += mma::shfl_xor<1>(l[r]);
    l[r] += mma::shfl_xor<2>(l[r]);
    inv[r] = l[r] > 0.0f ? __fdividef(1.0f, l[r]) : 0.0f;
  }
#pragma unroll
  for (int i = 0; i < Tr::kOBlocks; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = 16 * warp + g + 8 * r;
      *reinterpret_cast<uint32_t *>(q_s + swizzle<D>(row, i) + 2 * tq) =
          pack2<T>(acc[i][2 * r] * inv[r], acc[i][2 * r + 1] * inv[r]);
    }
  mma::syncwarp();
#pragma unroll
  for (int pass = 0; pass < 16 * kCpr / 32; ++pass) {
    const int idx = lane + 32 * pass, r = idx / kCpr, ch = idx % kCpr;
    const long long tok = row_token(p, sched, tile, 16 * warp + r);
    if (tok >= 0) {
      const uint4 val = *reinterpret_cast<const uint4 *>(q_s + swizzle<D>(16 * warp + r, ch));
      *reinterpret_cast<uint4 *>(o + tok * p.o_row_stride + ch * 8) = val;
    }
  }
  if (p.lse != nullptr && tq == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const long long tok = row_token(p, sched, tile, 16 * warp + g + 8 * r);
      if (tok >= 0)
        p.lse[((long long)b * p.heads_q + h) * p.tokens + tok] = lse_from_log2(m[r], l[r]);
    }
  }
}

template <typename T, class Tr>
const void *kernel_ptr() {
  return reinterpret_cast<const void *>(neighborhood_mma_kernel<T, Tr>);
}

template <typename T, class Tr>
cudaError_t launch(const LaNeighborhoodParams &p, const LaNaSchedule &s, cudaStream_t stream) {
  auto kernel = neighborhood_mma_kernel<T, Tr>;
  if (device_unsupported_reason(kernel_ptr<T, Tr>(), Tr::kSmemBytes, [](int major, int) { return major >= 8; }) != nullptr)
    return cudaErrorNotSupported;
  const cudaError_t err = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Tr::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(s.num_tiles, p.heads_q, p.batch);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p, s);
  return cudaGetLastError();
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
  cudaError_t err = cudaErrorNotSupported;
  switch (p.dtype) {
    case LA_F16: err = launch_for_dim<__half>(p, *schedule, stream); break;
    case LA_BF16: err = launch_for_dim<__nv_bfloat16>(p, *schedule, stream); break;
    default: return cudaErrorInvalidValue;
  }
  static_assert(LA_DENSE_KERNEL_UNSUPPORTED == cudaErrorNotSupported, "documented in dense.h");
  return err;
}
