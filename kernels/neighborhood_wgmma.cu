// Hopper neighborhood attention (wgmma.mma_async + TMA, warp-specialised, sm_90a only) on the
// Hopper mainloop (longattn/wgmma_mainloop.cuh). Compiled for sm_80 (empty body) and sm_90a;
// NOT YET RUN ON A GPU. Reachable only through NeighborhoodAttention::forward_gpu_hopper.
//
// This file writes the neighborhood problem:
// - a block owns a box of 128 in-group query positions of one dilation group (extents
//   2^query_log2 per dim, chosen on the host: LaNaHopperTiles), loaded by ONE bulk tensor
//   copy per 64-channel panel of an N-D tensor map over the grid, (channel, x_last, ...,
//   x_first, head[, batch]) with elementStrides = the dilation per spatial dim: starting at
//   origin * dilation + group, the copy samples exactly one dilation group, and positions
//   past the grid are zero-filled by the copy engine. With SWIZZLE_128B the box lands as 128
//   rows of 128 bytes in row-major box order (the last dim fastest), the layout the mainloop
//   expects, so row r of the tile is box coordinate unravel(r);
// - key tiles: a box of queries' neighborhoods is a box per dim (windows are separable and
//   their starts and ends monotone), [start(first row), end(last valid row)); the block tiles
//   that range with key boxes of 2^key_log2 keys per dim (128 keys), each one copy of the same
//   kind of map; the schedule is the product of the per-dim tile counts, computed here (no
//   host schedule);
// - mask: a key's in-group coordinates against the row's window per dim (na::window, the CPU
//   semantics exactly); keys past the union or past the grid (zero-filled) fall outside every
//   window. A warp skips the mask on a tile inside every one of its valid rows' windows.
// A 3-D grid with head and batch would be a rank-6 map (the copy engine takes 5): a 3-D
// problem launches once per batch element with the batch offset in the maps' base pointers.

#include <cuda.h>
#include <limits.h>

#include "longattn/common.cuh"
#include "longattn/dispatch.cuh"
#include "longattn/neighborhood.cuh"
#include "longattn/tma_host.cuh"
#include "longattn/wgmma_mainloop.cuh"

namespace longattn {
namespace {

// Tiles: 128 query rows (two consumer warpgroups) and 128-key boxes, the dense d64/d128 rings.
using NaWg64 = WgDense64;
using NaWg128 = WgDense128;
static_assert(NaWg64::kBlockM == 128 && NaWg64::kBlockN == 128 && NaWg128::kBlockN == 128,
              "LaNaHopperTiles boxes hold 128 rows and 128 keys");

// The per-launch geometry the kernel reads besides the params: box shapes, blocks per dim,
// the maps' layout, and the batch element of this launch (3-D: one launch per element).
struct NaWgGeom {
  int log_q[LA_NA_DIMS], log_k[LA_NA_DIMS];
  int boxes[LA_NA_DIMS];  // query boxes per dim of the longest (first) dilation group
  int rank;               // spatial dims in the maps (the problem's rank)
  int batch0;             // first batch element of this launch (the map has no batch dim: rank 3)
};

struct NaWgArgs {
  CUtensorMap q, k, v;
  NaWgGeom geo;
};

template <typename T, class Tr>
struct NaWgProblem {
  const LaNeighborhoodParams &p;
  const NaWgArgs &a;
  int b, h;
  // Per dim: dilation group, first in-group row, valid rows (<= box extent), first key of the
  // union, key boxes over the union.
  int group[LA_NA_DIMS], origin[LA_NA_DIMS], valid[LA_NA_DIMS];
  int kstart[LA_NA_DIMS], ntiles[LA_NA_DIMS];
  int kvh;

  __device__ __forceinline__ NaWgProblem(const LaNeighborhoodParams &p_, const NaWgArgs &a_)
      : p(p_), a(a_), b(a_.geo.batch0 + (int)blockIdx.z), h(blockIdx.y) {
    // blockIdx.x: per dim (group, box) pairs, the last dim fastest; a group shorter than the
    // first has boxes past its end (inactive blocks).
    unsigned x = blockIdx.x;
#pragma unroll
    for (int d = LA_NA_DIMS - 1; d >= 0; --d) {
      const unsigned n = (unsigned)a.geo.boxes[d];
      const unsigned u = x % (n * (unsigned)p.dilation[d]);
      x /= n * (unsigned)p.dilation[d];
      group[d] = (int)(u / n);
      origin[d] = (int)(u % n) << a.geo.log_q[d];
      const int lg = (int)(((long long)p.length[d] - group[d] + p.dilation[d] - 1) / p.dilation[d]);
      valid[d] = min(1 << a.geo.log_q[d], lg - origin[d]);
    }
  }
  __device__ __forceinline__ bool active() const {
    return valid[0] > 0 && valid[1] > 0 && valid[2] > 0;
  }
  __device__ __forceinline__ int schedule() {
    int n = 1;
#pragma unroll
    for (int d = 0; d < LA_NA_DIMS; ++d) {
      int s0, l0, s1, l1, g;
      na::window(p, d, origin[d] * p.dilation[d] + group[d], s0, l0, g);
      na::window(p, d, (origin[d] + valid[d] - 1) * p.dilation[d] + group[d], s1, l1, g);
      kstart[d] = s0;
      const int ext = (1 << a.geo.log_k[d]);
      ntiles[d] = (s1 + l1 - s0 + ext - 1) / ext;
      n *= ntiles[d];
    }
    return n;
  }
  __device__ __forceinline__ float scale() const { return p.scale; }
  __device__ __forceinline__ float softcap() const { return p.softcap; }

  // In-group first key per dim of key tile t (row-major over the per-dim tile counts).
  struct Keys {
    int k[LA_NA_DIMS];
  };
  __device__ __forceinline__ Keys key_box(int t) const {
    Keys c;
    const int t2 = t % ntiles[2], rest = t / ntiles[2];
    const int t1 = rest % ntiles[1], t0 = rest / ntiles[1];
    c.k[0] = kstart[0] + (t0 << a.geo.log_k[0]);
    c.k[1] = kstart[1] + (t1 << a.geo.log_k[1]);
    c.k[2] = kstart[2] + (t2 << a.geo.log_k[2]);
    return c;
  }

  // ---- producer ----
  __device__ __forceinline__ void producer_begin() {
    kvh = h / (p.heads_q / p.heads_kv);
    tma::prefetch_map(&a.k);
    tma::prefetch_map(&a.v);
  }
  // One copy per 64-channel panel of the box whose first in-group position per dim is `in`:
  // map coordinates (channel, x_last, ..., x_first, head[, batch]).
  __device__ __forceinline__ void load_box(const CUtensorMap *map, const int (&in)[LA_NA_DIMS],
                                           int head, uint32_t dst, uint32_t panel_bytes,
                                           uint32_t full) const {
    int x[LA_NA_DIMS];
#pragma unroll
    for (int d = 0; d < LA_NA_DIMS; ++d) x[d] = in[d] * p.dilation[d] + group[d];
    // The launch of a 3-D problem has the batch element in the base pointer.
    const int bc = b - a.geo.batch0;
#pragma unroll
    for (int pn = 0; pn < Tr::kPanels; ++pn) {
      const uint32_t at = dst + pn * panel_bytes;
      if (a.geo.rank == 1) {
        tma::load_4d(at, map, full, 64 * pn, x[2], head, bc);
      } else if (a.geo.rank == 2) {
        tma::load_5d(at, map, full, 64 * pn, x[2], x[1], head, bc);
      } else {
        tma::load_5d(at, map, full, 64 * pn, x[2], x[1], x[0], head);
      }
    }
  }
  __device__ __forceinline__ void load_q(uint32_t dst, uint32_t full) const {
    tma::arrive_expect_tx(full, Tr::kQBytes);
    load_box(&a.q, origin, h, dst, Tr::kBlockM * 128, full);
  }
  __device__ __forceinline__ Keys kv_coords(int t) const { return key_box(t); }
  __device__ __forceinline__ void load_k(const Keys &c, uint32_t dst, uint32_t full) const {
    tma::arrive_expect_tx(full, Tr::kKvBytes);
    load_box(&a.k, c.k, kvh, dst, Tr::kBlockN * 128, full);
  }
  __device__ __forceinline__ void load_v(const Keys &c, uint32_t dst, uint32_t full) const {
    tma::arrive_expect_tx(full, Tr::kKvBytes);
    load_box(&a.v, c.k, kvh, dst, Tr::kBlockN * 128, full);
  }

  // ---- consumers ----
  // Box coordinates of tile row r (row-major, the last dim fastest); valid when inside the
  // group along every dim.
  __device__ __forceinline__ bool row_coords(int r, int (&c)[LA_NA_DIMS]) const {
    c[2] = r & ((1 << a.geo.log_q[2]) - 1);
    c[1] = (r >> a.geo.log_q[2]) & ((1 << a.geo.log_q[1]) - 1);
    c[0] = r >> (a.geo.log_q[2] + a.geo.log_q[1]);
    return c[0] < valid[0] && c[1] < valid[1] && c[2] < valid[2];
  }
  __device__ __forceinline__ long long row_token(int r) const {
    int c[LA_NA_DIMS];
    if (!row_coords(r, c)) return -1;
#pragma unroll
    for (int d = 0; d < LA_NA_DIMS; ++d) c[d] += origin[d];
    return na::token(p, c, group);
  }
  __device__ __forceinline__ T *output() const {
    return static_cast<T *>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
  }
  // This thread's two rows' windows per dim, in-group [lo, hi) (an invalid row: empty), and
  // the warp's common window [wlo, whi) over its valid rows (every key in it is visible to
  // every valid row of the warp).
  struct Rows {
    int warp_row0;
    int lo[2][LA_NA_DIMS], hi[2][LA_NA_DIMS];
    int wlo[LA_NA_DIMS], whi[LA_NA_DIMS];
  };
  __device__ __forceinline__ Rows prepare_rows(int wg, int warp, int g) const {
    Rows w;
    w.warp_row0 = 64 * wg + 16 * warp;
    int mlo[LA_NA_DIMS], mhi[LA_NA_DIMS];
#pragma unroll
    for (int d = 0; d < LA_NA_DIMS; ++d) {
      mlo[d] = INT_MIN;
      mhi[d] = INT_MAX;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      int c[LA_NA_DIMS];
      const bool ok = row_coords(w.warp_row0 + g + 8 * r, c);
#pragma unroll
      for (int d = 0; d < LA_NA_DIMS; ++d) {
        int start, len, grp;
        na::window(p, d, ok ? (origin[d] + c[d]) * p.dilation[d] + group[d] : group[d], start,
                   len, grp);
        w.lo[r][d] = ok ? start : 0;
        w.hi[r][d] = ok ? start + len : 0;
        if (ok) {
          mlo[d] = max(mlo[d], start);
          mhi[d] = min(mhi[d], start + len);
        }
      }
    }
#pragma unroll
    for (int d = 0; d < LA_NA_DIMS; ++d) {
      w.wlo[d] = __reduce_max_sync(0xffffffffu, mlo[d]);
      w.whi[d] = __reduce_min_sync(0xffffffffu, mhi[d]);
    }
    return w;
  }
  __device__ __forceinline__ Keys tile_info(int t) const { return key_box(t); }
  // Key column n of the tile is key-box coordinate unravel(n) (the last dim fastest);
  // visible iff inside the row's window along every dim. The unsigned compare
  // (c + k0 - lo) < (hi - lo) is lo <= c + k0 < hi.
  __device__ __forceinline__ void mask_tile(float (&sacc)[Tr::kSRegs], const Rows &w,
                                            const Keys &kb, int tq) const {
    bool interior = true;
#pragma unroll
    for (int d = 0; d < LA_NA_DIMS; ++d)
      interior = interior && kb.k[d] >= w.wlo[d] && kb.k[d] + (1 << a.geo.log_k[d]) <= w.whi[d];
    if (interior) return;
    const int l2 = a.geo.log_k[2], l1 = a.geo.log_k[1];
    const int m2 = (1 << l2) - 1, m1 = (1 << l1) - 1;
    unsigned rel[2][LA_NA_DIMS], wid[2][LA_NA_DIMS];
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int d = 0; d < LA_NA_DIMS; ++d) {
        rel[r][d] = (unsigned)(kb.k[d] - w.lo[r][d]);
        wid[r][d] = (unsigned)(w.hi[r][d] - w.lo[r][d]);
      }
#pragma unroll
    for (int i = 0; i < Tr::kSRegs / 4; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = 8 * i + 2 * tq + (e & 1), r = e >> 1;
        const unsigned c2 = (unsigned)(n & m2), c1 = (unsigned)((n >> l2) & m1),
                       c0 = (unsigned)(n >> (l2 + l1));
        const bool vis = c2 + rel[r][2] < wid[r][2] && c1 + rel[r][1] < wid[r][1] &&
                         c0 + rel[r][0] < wid[r][0];
        if (!vis) sacc[4 * i + e] = kNegInf;
      }
  }
  template <class Staged>
  __device__ __forceinline__ void store_o(T *o, int r, int chunk, const Staged &staged) const {
    const long long tok = row_token(r);
    if (tok >= 0) {
      const uint4 val = staged();
      *reinterpret_cast<uint4 *>(o + tok * p.o_row_stride + chunk * 8) = val;
    }
  }
  __device__ __forceinline__ bool has_lse() const { return p.lse != nullptr; }
  template <class Lse>
  __device__ __forceinline__ void store_lse(const Rows &w, int g, int r, const Lse &lse) const {
    const long long tok = row_token(w.warp_row0 + g + 8 * r);
    if (tok >= 0) p.lse[((long long)b * p.heads_q + h) * p.tokens + tok] = lse();
  }
};

template <typename T, class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    neighborhood_wgmma_kernel(const __grid_constant__ LaNeighborhoodParams p,
                              const __grid_constant__ NaWgArgs args) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  wgmma_attention<T, Tr, NaWgProblem<T, Tr>>(smem_raw, p, args);
#endif
}

// One operand (q, k or v) as a tensor map over the grid: dims (channel, x_last, ...,
// x_first, head[, batch]) with byte strides, boxes (64, extent * dilation per spatial dim,
// 1, 1) and elementStrides (1, dilation..., 1, 1). `base` already holds this launch's batch
// offset when the map has no batch dim (rank 3).
bool encode_operand(CUtensorMap *map, const LaNeighborhoodParams &p, const int (&log_box)[3],
                    const void *base, int64_t row_stride, int64_t head_stride,
                    int64_t batch_stride, int heads, int rank) {
  const tma_host::EncodeTiled encode = tma_host::encode_tiled();
  if (encode == nullptr || reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  cuuint64_t dims[5], strides[4];
  cuuint32_t box[5], estride[5];
  int n = 0;
  // A stride is stepped only over extents above 1; it must be a positive multiple of 16
  // bytes below 2^40 there, any valid value elsewhere.
  bool ok = true;
  auto push = [&](long long extent, long long stride_elems, int box_dim, int estep) {
    dims[n] = (cuuint64_t)extent;
    box[n] = (cuuint32_t)box_dim;
    estride[n] = (cuuint32_t)estep;
    if (n > 0) {
      const bool steps = extent > 1;
      ok = ok && (!steps || (stride_elems > 0 && (stride_elems * 2) % 16 == 0 &&
                             stride_elems * 2 < (1LL << 40)));
      strides[n - 1] = steps ? (cuuint64_t)(stride_elems * 2) : 16;
    }
    ++n;
  };
  push(p.head_dim, 1, 64, 1);
  long long pitch = row_stride;
  for (int d = LA_NA_DIMS - 1; d >= LA_NA_DIMS - rank; --d) {
    push(p.length[d], pitch, (1 << log_box[d]) * p.dilation[d], p.dilation[d]);
    // Capped past 2^40 bytes (refused by push if a stepped dim reaches it): no overflow.
    pitch = pitch > (1LL << 41) / p.length[d] ? (1LL << 41) : pitch * p.length[d];
  }
  push(heads, head_stride, 1, 1);
  if (rank < 3) push(p.batch, batch_stride, 1, 1);
  if (!ok) return false;
  const CUtensorMapDataType type =
      p.dtype == LA_BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode(map, type, (cuuint32_t)n, const_cast<void *>(base), dims, strides, box, estride,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// What LaNaHopperTiles promises (neighborhood.h) for `p`, checkable on the host.
bool tiles_ok(const LaNeighborhoodParams &p, const LaNaHopperTiles &t) {
  if (t.rank < 1 || t.rank > LA_NA_DIMS) return false;
  int q = 0, k = 0;
  for (int d = 0; d < LA_NA_DIMS; ++d) {
    const int lq = t.query_log2[d], lk = t.key_log2[d];
    if (lq < 0 || lq > 7 || lk < 0 || lk > 7 || p.dilation[d] > 8) return false;
    if (d < LA_NA_DIMS - t.rank && (lq != 0 || lk != 0 || p.length[d] != 1)) return false;
    if ((1 << lq) * p.dilation[d] > 256 || (1 << lk) * p.dilation[d] > 256) return false;
    q += lq;
    k += lk;
  }
  return q == 7 && k == 7;
}

template <typename T, class Tr>
cudaError_t launch(const LaNeighborhoodParams &p, const LaNaHopperTiles &t, cudaStream_t stream) {
  auto kernel = neighborhood_wgmma_kernel<T, Tr>;
  if (device_unsupported_reason(reinterpret_cast<const void *>(kernel), Tr::kSmemBytes,
                                tma_host::is_sm90) != nullptr)
    return cudaErrorNotSupported;
  const int rank = t.rank;
  NaWgArgs args;
  long long blocks = 1;
  for (int d = 0; d < LA_NA_DIMS; ++d) {
    args.geo.log_q[d] = t.query_log2[d];
    args.geo.log_k[d] = t.key_log2[d];
    const long long lg0 = (p.length[d] + p.dilation[d] - 1) / p.dilation[d];
    args.geo.boxes[d] = (int)((lg0 + (1 << t.query_log2[d]) - 1) >> t.query_log2[d]);
    blocks *= (long long)args.geo.boxes[d] * p.dilation[d];
  }
  if (blocks > 0x7fffffffLL) return cudaErrorNotSupported;
  args.geo.rank = rank;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Tr::kSmemBytes);
  if (err != cudaSuccess) return err;
  // Rank 1-2: one launch, batch in the maps; rank 3: one launch per batch element.
  const int launches = rank < 3 ? 1 : p.batch;
  for (int b0 = 0; b0 < launches; ++b0) {
    const int64_t off = rank < 3 ? 0 : b0;
    const char *q = static_cast<const char *>(p.q) + off * p.q_batch_stride * 2;
    const char *k = static_cast<const char *>(p.k) + off * p.k_batch_stride * 2;
    const char *v = static_cast<const char *>(p.v) + off * p.v_batch_stride * 2;
    if (!encode_operand(&args.q, p, t.query_log2, q, p.q_row_stride, p.q_head_stride,
                        p.q_batch_stride, p.heads_q, rank) ||
        !encode_operand(&args.k, p, t.key_log2, k, p.k_row_stride, p.k_head_stride,
                        p.k_batch_stride, p.heads_kv, rank) ||
        !encode_operand(&args.v, p, t.key_log2, v, p.v_row_stride, p.v_head_stride,
                        p.v_batch_stride, p.heads_kv, rank))
      return cudaErrorNotSupported;
    args.geo.batch0 = rank < 3 ? 0 : b0;
    const dim3 grid((unsigned)blocks, p.heads_q, rank < 3 ? p.batch : 1);
    kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p, args);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace longattn

extern "C" int la_neighborhood_wgmma_forward(const LaNeighborhoodParams *params,
                                             const LaNaHopperTiles *tiles, cudaStream_t stream) {
  using namespace longattn;
  if (params == nullptr || tiles == nullptr || !na::params_ok(*params) ||
      !tiles_ok(*params, *tiles))
    return cudaErrorInvalidValue;
  const LaNeighborhoodParams &p = *params;
  if (p.batch == 0 || p.tokens == 0) return cudaSuccess;
  static_assert(LA_DENSE_KERNEL_UNSUPPORTED == cudaErrorNotSupported, "documented in dense.h");
  return with_dtype<__half, __nv_bfloat16>(p.dtype, cudaErrorInvalidValue, [&](auto t) {
    using T = typename decltype(t)::type;
    switch (p.head_dim) {
      case 64: return launch<T, NaWg64>(p, *tiles, stream);
      case 128: return launch<T, NaWg128>(p, *tiles, stream);
    }
    return cudaErrorNotSupported;
  });
}
