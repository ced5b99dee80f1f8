// Hopper dense attention with the query heads of a GQA group packed into one tile (wgmma +
// TMA on the Hopper mainloop, wgmma_mainloop.cuh; sm_90a only), for short query sequences
// over a long K/V: chunked prefill, speculative decoding (issue 16 item 1). The Hopper dense
// kernel gives each (sequence, query head) its own 128-row tile, so a chunk of 16 new tokens
// leaves 88% of the tile's rows empty while the tile still streams all its keys; here the
// G = heads_q / heads_kv heads that share a kv head share the tile: row r of a block is query
// position m0 + r / G of head kvh * G + r % G, the block covers P = floor(128 / G) positions of
// all G heads (P * G rows; G <= 128), and the kv head's K/V is streamed once for all of them.
// dense_mma_gqa.cu is the same problem on the sm_80 mainloop.
//
// Q arrives as one bulk tensor copy per 64-channel panel of a (channel, head, position,
// batch) view of q: the box {64, G, P, 1} lands as rows (position, head) in the 128-byte
// swizzle layout of the mainloop's Q tile. Rows past P * G keep whatever the shared memory
// held: their scores are computed (rows are independent in every wgmma and in the softmax)
// and never stored. The key-tile schedule covers the block's positions (Mask::key_tiles over
// [m0, m0 + P)); the window mask is per row position (WarpWindowMask::prepare_positions).
// head_dim 64, 128 or 256 (the Hopper dense kernel's tiles). Compiled, **not yet run on a
// GPU**: reached only through LA_DENSE_WGMMA_GQA (never AUTO).

#include <cuda.h>

#include "longattn/common.cuh"
#include "longattn/dense_mask.cuh"
#include "longattn/dense_tensors.cuh"
#include "longattn/dispatch.cuh"
#include "longattn/mask.cuh"
#include "longattn/schedule.cuh"
#include "longattn/tma_host.cuh"
#include "longattn/wgmma_mainloop.cuh"

namespace longattn {
namespace {

// Positions [m0, m0 + positions) of every head of kv head kvh of sequence b: block (x, kvh, b),
// m0 in reverse order (with a causal mask the last positions have the most keys).
template <typename T, class Tr>
struct DenseGqaWgProblem {
  const LaDenseParams &p;
  const tma_host::QkvMaps &maps;  // q as (channel, head, position, batch); k, v as dense
  int b, kvh, group, positions, m0;
  SeqInfo s;
  WindowTiles tiles;
  int batch_coord, k_row0;  // producer: tensor coordinates (packed rows are absolute)

  __device__ __forceinline__ DenseGqaWgProblem(const LaDenseParams &p_,
                                               const tma_host::QkvMaps &maps_)
      : p(p_), maps(maps_), b(blockIdx.z), kvh(blockIdx.y) {
    group = p.heads_q / p.heads_kv;
    positions = Tr::kBlockM / group;
    s = seq_info(p, b, kvh * group);
    m0 = (gridDim.x - 1 - blockIdx.x) * positions;
  }
  __device__ __forceinline__ bool active() const { return m0 < s.sq; }
  __device__ __forceinline__ int schedule() {
    const Mask mask{p.window_left, p.window_right, p.sinks};
    tiles = WindowTiles::of(mask, m0, min(m0 + positions, s.sq), s.sq, s.sk, Tr::kBlockN);
    return tiles.count();
  }
  __device__ __forceinline__ float scale() const { return p.scale; }
  __device__ __forceinline__ float softcap() const { return p.softcap; }
  // Tile row r: position m0 + r / group of query head kvh * group + r % group; false for a
  // row past the block's positions or past the sequence.
  __device__ __forceinline__ bool row(int r, int &pos, int &head) const {
    const int k = r / group;
    pos = m0 + k;
    head = kvh * group + (r - k * group);
    return k < positions && pos < s.sq;
  }

  // ---- producer ----
  __device__ __forceinline__ void producer_begin() {
    batch_coord = p.cu_seqlens_q != nullptr ? 0 : b;
    k_row0 = (int)s.k_row0;
    tma::prefetch_map(&maps.k);
    tma::prefetch_map(&maps.v);
  }
  // One {64 channels, group heads, positions} box per panel: positions * group rows of 128 B.
  __device__ __forceinline__ void load_q(uint32_t dst, uint32_t full) const {
    tma::arrive_expect_tx(full, (uint32_t)(Tr::kPanels * positions * group * 128));
#pragma unroll
    for (int pn = 0; pn < Tr::kPanels; ++pn)
      tma::load_4d(dst + pn * (Tr::kBlockM * 128), &maps.q, full, 64 * pn, kvh * group,
                   (int)s.q_row0 + m0, batch_coord);
  }
  __device__ __forceinline__ int kv_coords(int t) const { return k_row0 + tiles.key0(t); }
  __device__ __forceinline__ void load_k(int row, uint32_t dst, uint32_t full) const {
    load_kv_rows<Tr>(&maps.k, row, kvh, batch_coord, dst, full);
  }
  __device__ __forceinline__ void load_v(int row, uint32_t dst, uint32_t full) const {
    load_kv_rows<Tr>(&maps.v, row, kvh, batch_coord, dst, full);
  }

  // ---- consumers ----
  // The sequence's first output row; store_o adds the position and head.
  __device__ __forceinline__ T *output() const {
    return static_cast<T *>(p.o) + b * p.o_batch_stride + s.q_row0 * p.o_row_stride;
  }
  struct Rows {
    int row0;  // the warp's first tile row
    WarpWindowMask<WgMaskShape<Tr>> window;
  };
  // This thread's rows 64 wg + 16 warp + g (+ 8) sit at positions m0 + row / group; rows past
  // the block's positions get the last valid position (their scores are never stored).
  __device__ __forceinline__ Rows prepare_rows(int wg, int warp, int g) const {
    Rows w;
    w.row0 = 64 * wg + 16 * warp;
    const int last = min(m0 + positions, s.sq) - 1;
    int pos[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) pos[r] = min(m0 + (w.row0 + g + 8 * r) / group, last);
    const int first = min(m0 + w.row0 / group, last);
    const int warp_last = min(m0 + (w.row0 + 15) / group, last);
    w.window.prepare_positions(Mask{p.window_left, p.window_right, p.sinks}, pos, first,
                               warp_last, s.sq, s.sk);
    return w;
  }
  __device__ __forceinline__ int tile_info(int t) const { return tiles.key0(t); }
  __device__ __forceinline__ void mask_tile(float (&sacc)[Tr::kSRegs], const Rows &w, int n0,
                                            int tq) const {
    w.window.apply(reinterpret_cast<float(&)[Tr::kSRegs / 4][4]>(sacc), n0, tq);
  }
  template <class Staged>
  __device__ __forceinline__ void store_o(T *o, int r, int chunk, const Staged &staged) const {
    int pos, head;
    if (row(r, pos, head)) {
      const uint4 val = staged();
      *reinterpret_cast<uint4 *>(o + pos * p.o_row_stride + head * p.o_head_stride + chunk * 8) =
          val;
    }
  }
  __device__ __forceinline__ bool has_lse() const { return p.lse != nullptr; }
  // LSE layout of seq_info: (b, h, row) at ((b * heads_q + h) * seqlen_q + row), or packed
  // (h * total_q + q_row0 + row) for varlen.
  template <class Lse>
  __device__ __forceinline__ void store_lse(const Rows &w, int g, int r, const Lse &lse) const {
    int pos, head;
    if (!row(w.row0 + g + 8 * r, pos, head)) return;
    const long long base = p.cu_seqlens_q != nullptr
                               ? (long long)head * p.total_q + s.q_row0
                               : ((long long)b * p.heads_q + head) * p.seqlen_q;
    p.lse[base + pos] = lse();
  }
};

template <typename T, class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    dense_wgmma_gqa_kernel(const __grid_constant__ LaDenseParams p,
                           const __grid_constant__ tma_host::QkvMaps maps) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  wgmma_attention<T, Tr, DenseGqaWgProblem<T, Tr>>(smem_raw, p, maps);
#endif
}

// Q as (channel, head, position, batch) in boxes of {64, group, positions}; K and V as the
// dense kernel maps them.
template <class Tr>
bool encode_gqa_maps(tma_host::QkvMaps *maps, const LaDenseParams &p) {
  const int group = p.heads_q / p.heads_kv, positions = Tr::kBlockM / group;
  const tma_host::OperandShape q = tma_host::q_shape(p);
  const tma_host::OperandShape q_by_head{q.base,        q.heads,      q.rows,
                                         q.batch,       q.head_stride, q.row_stride,
                                         q.batch_stride};
  return tma_host::encode_operand(&maps->q, q_by_head, p.dtype, Tr::kHeadDim, group, 64,
                                  positions) &&
         tma_host::encode_kv(maps, p, Tr::kHeadDim, Tr::kBlockN);
}

template <typename T, class Tr>
cudaError_t launch_gqa(const LaDenseParams &p, cudaStream_t stream) {
  tma_host::QkvMaps maps;
  if (!encode_gqa_maps<Tr>(&maps, p)) return cudaErrorNotSupported;
  const int positions = Tr::kBlockM / (p.heads_q / p.heads_kv);
  const dim3 grid((p.seqlen_q + positions - 1) / positions, p.heads_kv, p.batch);
  return tma_host::launch<Tr>(dense_wgmma_gqa_kernel<T, Tr>, grid, stream, p, maps);
}

}  // namespace

const char *dense_wgmma_gqa_unsupported_reason(const LaDenseParams &p) {
  if (p.heads_q / p.heads_kv > WgDense64::kBlockM)
    return "it packs at most 128 query heads per kv head into a tile";
  const auto kernel_of = [](auto t, auto tr) {
    return reinterpret_cast<const void *>(
        dense_wgmma_gqa_kernel<typename decltype(t)::type, typename decltype(tr)::type>);
  };
  const char *why = tensor_core_unsupported_reason<WgDense64, WgDense128, WgDense256>(
      p, kernel_of, tma_host::is_sm90);
  if (why != nullptr) return why;
  bool mappable = false;
  with_head_dim_config<WgDense64, WgDense128, WgDense256>(p, [&](auto, auto tr) {
    tma_host::QkvMaps maps;
    mappable = encode_gqa_maps<typename decltype(tr)::type>(&maps, p);
  });
  return mappable ? nullptr
                  : "the TMA copy engine cannot address q (by head and position) or k/v with "
                    "these strides (it needs positive multiples of 16 bytes for every dimension "
                    "longer than 1)";
}

cudaError_t dense_wgmma_gqa_forward(const LaDenseParams &p, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  with_head_dim_config<WgDense64, WgDense128, WgDense256>(p, [&](auto t, auto tr) {
    err = launch_gqa<typename decltype(t)::type, typename decltype(tr)::type>(p, stream);
  });
  return err;
}

}  // namespace longattn
