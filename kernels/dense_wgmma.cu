// Hopper dense attention forward (wgmma.mma_async + TMA, warp-specialised, sm_90a only), on
// the Hopper mainloop (longattn/wgmma_mainloop.cuh: producer warpgroup, mbarrier rings,
// ping-pong consumers, intra-warpgroup S/PV overlap). This file writes the dense problem:
// block (x, h, b) owns query rows [m0, m0 + 128) of head h of sequence b, m0 in reverse order
// (with a causal mask the last query tiles have the most keys); Q, K and V arrive as bulk
// tensor copies of 4-D maps (tma_host.cuh); only the tiles that Mask::key_tiles leaves visible
// are loaded (sink tiles, then the window), and only boundary tiles are masked per element.
// Semantics are exactly those of the SIMT kernel in dense.cu. Verified on an H200 (2026-12-04).
// LA_DENSE_WGMMA_WIDE runs the same problem with 176-key tiles (WgDenseWide, d128 only) where
// no element mask is needed: full attention, where only the keys past seqlen_k of the ragged
// last tile are masked (mask_tile's boundary case). Not yet run on a GPU.

#include <cuda.h>

#include "longattn/common.cuh"
#include "longattn/dense_tensors.cuh"
#include "longattn/dispatch.cuh"
#include "longattn/mask.cuh"
#include "longattn/schedule.cuh"
#include "longattn/tma_host.cuh"
#include "longattn/wgmma_mainloop.cuh"

namespace longattn {
namespace {

// Query rows [m0, m0 + kBlockM) of one (sequence b, query head h): block (x, h, b), m0 in
// reverse order (with a causal mask the last query tiles have the most keys).
template <typename T, class Tr>
struct DenseWgProblem {
  const LaDenseParams &p;
  const tma_host::QkvMaps &maps;
  int b, h;
  SeqInfo s;
  int m0;
  WindowTiles tiles;
  // Producer: tensor coordinates (channel, row, head, batch); packed (varlen) rows are absolute.
  int batch_coord, kvh, q_row, k_row0;

  __device__ __forceinline__ DenseWgProblem(const LaDenseParams &p_,
                                            const tma_host::QkvMaps &maps_)
      : p(p_), maps(maps_), b(blockIdx.z), h(blockIdx.y) {
    s = seq_info(p, b, h);
    m0 = (gridDim.x - 1 - blockIdx.x) * Tr::kBlockM;
  }
  __device__ __forceinline__ bool active() const { return m0 < s.sq; }
  __device__ __forceinline__ int schedule() {
    const Mask mask{p.window_left, p.window_right, p.sinks};
    tiles = WindowTiles::of(mask, m0, min(m0 + Tr::kBlockM, s.sq), s.sq, s.sk, Tr::kBlockN);
    return tiles.count();
  }
  __device__ __forceinline__ float scale() const { return p.scale; }
  __device__ __forceinline__ float softcap() const { return p.softcap; }

  // ---- producer ----
  __device__ __forceinline__ void producer_begin() {
    batch_coord = p.cu_seqlens_q != nullptr ? 0 : b;
    kvh = h / (p.heads_q / p.heads_kv);
    q_row = (int)s.q_row0 + m0;
    k_row0 = (int)s.k_row0;
    tma::prefetch_map(&maps.k);
    tma::prefetch_map(&maps.v);
  }
  __device__ __forceinline__ void load_q(uint32_t dst, uint32_t full) const {
    tma::arrive_expect_tx(full, Tr::kQBytes);
#pragma unroll
    for (int pn = 0; pn < Tr::kPanels; ++pn)
      tma::load_4d(dst + pn * (Tr::kBlockM * 128), &maps.q, full, 64 * pn, q_row, h, batch_coord);
  }
  // Key tile t: kBlockN rows from this (absolute) row.
  __device__ __forceinline__ int kv_coords(int t) const { return k_row0 + tiles.key0(t); }
  __device__ __forceinline__ void load_k(int row, uint32_t dst, uint32_t full) const {
    load_kv_rows<Tr>(&maps.k, row, kvh, batch_coord, dst, full);
  }
  __device__ __forceinline__ void load_v(int row, uint32_t dst, uint32_t full) const {
    load_kv_rows<Tr>(&maps.v, row, kvh, batch_coord, dst, full);
  }

  // ---- consumers ----
  __device__ __forceinline__ T *output() const { return head_tensors<T>(p, s, b, h).o; }
  // This thread's two rows' visible key range: key j is visible iff j <= hi && (j >= lo ||
  // j < sinks), which is Mask::visible for j >= 0. The same bounds for the warp's first and
  // last valid rows decide whether a tile needs per-element masking at all.
  struct Rows {
    int warp_row0, hi[2], lo[2];
    long long diag_first, diag_last;
  };
  __device__ __forceinline__ Rows prepare_rows(int wg, int warp, int g) const {
    Rows w;
    const int warp_row0 = m0 + 64 * wg + 16 * warp;
    w.warp_row0 = warp_row0;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const long long diag = (long long)(warp_row0 + g + 8 * r) + s.sk - s.sq;
      long long hr = s.sk - 1;
      if (p.window_right >= 0) hr = min(hr, diag + p.window_right);
      long long lr = 0;
      if (p.window_left >= 0) lr = min(max(diag - p.window_left, 0LL), (long long)s.sk);
      w.hi[r] = (int)max(hr, -1LL);
      w.lo[r] = (int)lr;
    }
    const int warp_last = min(warp_row0 + 15, s.sq - 1);
    w.diag_first = (long long)warp_row0 + s.sk - s.sq;
    w.diag_last = (long long)warp_last + s.sk - s.sq;
    return w;
  }
  __device__ __forceinline__ int tile_info(int t) const { return tiles.key0(t); }
  // Interior tiles (every key visible to every valid row of the warp) skip the mask; boundary
  // tiles, including the ragged last tile whose keys past sk are zeros or the next packed
  // sequence's, mask per element.
  __device__ __forceinline__ void mask_tile(float (&sacc)[Tr::kSRegs], const Rows &w, int n0,
                                            int tq) const {
    const int n_end = n0 + Tr::kBlockN;
    const bool interior =
        n_end <= s.sk &&
        (p.window_right < 0 || (long long)n_end - 1 <= w.diag_first + p.window_right) &&
        (p.window_left < 0 || (long long)n0 >= w.diag_last - p.window_left || n_end <= p.sinks);
    if (interior) return;
#pragma unroll
    for (int i = 0; i < Tr::kSRegs / 4; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = n0 + 8 * i + 2 * tq + (e & 1), r = e >> 1;
        if (!(j <= w.hi[r] && (j >= w.lo[r] || j < p.sinks))) sacc[4 * i + e] = kNegInf;
      }
  }
  template <class Staged>
  __device__ __forceinline__ void store_o(T *o, int r, int chunk, const Staged &staged) const {
    const int i = m0 + r;
    if (i < s.sq) {
      const uint4 val = staged();
      *reinterpret_cast<uint4 *>(o + i * p.o_row_stride + chunk * 8) = val;
    }
  }
  __device__ __forceinline__ bool has_lse() const { return p.lse != nullptr; }
  template <class Lse>
  __device__ __forceinline__ void store_lse(const Rows &w, int g, int r, const Lse &lse) const {
    const int i = w.warp_row0 + g + 8 * r;
    if (i < s.sq) p.lse[s.lse_base + i] = lse();
  }
};

template <typename T, class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    dense_wgmma_kernel(const __grid_constant__ LaDenseParams p,
                       const __grid_constant__ tma_host::QkvMaps maps) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  wgmma_attention<T, Tr, DenseWgProblem<T, Tr>>(smem_raw, p, maps);
#endif
}

template <typename T, class Tr>
cudaError_t launch_wgmma(const LaDenseParams &p, cudaStream_t stream) {
  tma_host::QkvMaps maps;
  if (!tma_host::encode_qkv(&maps, p, Tr::kHeadDim, Tr::kBlockM, Tr::kBlockN))
    return cudaErrorNotSupported;
  const dim3 grid((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, p.heads_q, p.batch);
  return tma_host::launch<Tr>(dense_wgmma_kernel<T, Tr>, grid, stream, p, maps);
}

template <class F>
bool with_config(const LaDenseParams &p, F &&f) {
  return with_head_dim_config<WgDense64, WgDense128, WgDense256>(p, static_cast<F &&>(f));
}

}  // namespace

const char *dense_wgmma_unsupported_reason(const LaDenseParams &p) {
  const auto kernel_of = [](auto t, auto tr) {
    return reinterpret_cast<const void *>(
        dense_wgmma_kernel<typename decltype(t)::type, typename decltype(tr)::type>);
  };
  const char *why = tensor_core_unsupported_reason<WgDense64, WgDense128, WgDense256>(
      p, kernel_of, tma_host::is_sm90);
  return why != nullptr ? why : tma_host::tensors_unmappable_reason(p);
}

cudaError_t dense_wgmma_forward(const LaDenseParams &p, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  with_config(p, [&](auto t, auto tr) {
    err = launch_wgmma<typename decltype(t)::type, typename decltype(tr)::type>(p, stream);
  });
  return err;
}

const char *dense_wgmma_wide_unsupported_reason(const LaDenseParams &p) {
  const void *kernel = with_dtype<__half, __nv_bfloat16>(p.dtype, (const void *)nullptr, [](auto t) {
    return reinterpret_cast<const void *>(
        dense_wgmma_kernel<typename decltype(t)::type, WgDenseWide>);
  });
  if (kernel == nullptr || p.head_dim != WgDenseWide::kHeadDim)
    return "it takes f16 or bf16 with head_dim 128 only";
  if (p.window_left >= 0 || p.window_right >= 0 || p.sinks > 0)
    return "it runs full attention only (no causal mask, window or sinks): its 176-key tiles "
           "mask only the keys past seqlen_k";
  const char *why = device_unsupported_reason(kernel, WgDenseWide::kSmemBytes, tma_host::is_sm90);
  return why != nullptr ? why : tma_host::tensors_unmappable_reason(p);
}

cudaError_t dense_wgmma_wide_forward(const LaDenseParams &p, cudaStream_t stream) {
  return with_dtype<__half, __nv_bfloat16>(p.dtype, cudaErrorInvalidValue, [&](auto t) {
    return launch_wgmma<typename decltype(t)::type, WgDenseWide>(p, stream);
  });
}

}  // namespace longattn
