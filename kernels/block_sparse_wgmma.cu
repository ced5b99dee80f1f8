// Block-sparse attention on the Hopper mainloop (wgmma.mma_async + TMA, warp-specialised,
// sm_90a only; longattn/wgmma_mainloop.cuh). NOT YET RUN ON A GPU: reachable only through
// the explicit BlockSparseKernel::Hopper of BlockSparseAttention (the default is the verified
// mma.sync kernel, block_sparse_mma.cu, whose semantics this kernel reproduces exactly).
//
// This file writes the block-sparse problem of the mainloop:
// - rows: block (x, h, b) owns query rows [m0, m0 + 128) of head h of sequence b (fixed or
//   varlen, seq_info), m0 in reverse order (causal-like lists are longest for the last rows);
//   block_m is a multiple of 128, so the tile lies inside one query block, qb = m0 / block_m;
// - schedule: qb's CSR list (LaBlockSparseParams), each listed key block cut into
//   block_n / kBlockN key tiles (block_n is a multiple of kBlockN, so a tile lies inside one
//   key block); the last listed block (indices are sorted, so only it can be the sequence's
//   short last block) loses its tiles that start at or past the sequence's end. An empty
//   list schedules 0 tiles: the mainloop then writes output 0 and LSE -inf for every row;
// - loads: Q, K and V as the dense Hopper kernel (dense_wgmma.cu), bulk tensor copies of the
//   same 4-D maps (tma_host::encode_qkv); tile t's key block is read from global memory by
//   the producer thread (one 4-byte load per tile, issued before it waits for the ring slot);
// - mask: a tile of a full block masks only keys past the sequence's end (rows past sq are
//   never stored); a tile of a partial block applies the options' window / causal / sinks
//   mask, skipped when the tile is interior for every valid row of the warp (WarpWindowMask,
//   the rule of the mma.sync kernels). The consumers read each entry's key block and kind one
//   entry ahead (tile_info), so that the load's latency hides behind a tile's wgmmas.
//
// Anything else (block_m not a multiple of 128, block_n not a multiple of the head dim's key
// tile, f32, another head dim, a device other than compute capability 9.0, tensors the copy
// engine cannot address) is refused with cudaErrorNotSupported before any launch; the caller
// keeps the mma.sync kernel for those.

#include <cuda.h>

#include "longattn/block_sparse.h"
#include "longattn/common.cuh"
#include "longattn/dense_mask.cuh"
#include "longattn/dense_tensors.cuh"
#include "longattn/dispatch.cuh"
#include "longattn/mask.cuh"
#include "longattn/tma_host.cuh"
#include "longattn/wgmma_mainloop.cuh"

namespace longattn {
namespace {

// Query rows [m0, m0 + kBlockM) of one (sequence b, query head h) over the key blocks listed
// for their query block.
template <typename T, class Tr>
struct BlockSparseWgProblem {
  static constexpr int BN = Tr::kBlockN;
  const LaBlockSparseParams &p;
  const tma_host::QkvMaps &maps;
  int b, h;
  SeqInfo s;
  int m0;
  // schedule(): this query block's entries, tiles per listed block, the sequence's key blocks.
  const int32_t *indices;
  const uint8_t *full;
  int count, tiles_per_block, seq_k_blocks;
  // Producer: tensor coordinates (channel, row, head, batch); packed (varlen) rows absolute.
  int batch_coord, kvh, k_row0;
  // Consumers (tile_info): entry cur_e's key block and kind, and entry cur_e + 1's (loaded one
  // entry ahead).
  int cur_e, cur_kb, next_kb;
  uint8_t cur_full, next_full;

  __device__ __forceinline__ BlockSparseWgProblem(const LaBlockSparseParams &p_,
                                                  const tma_host::QkvMaps &maps_)
      : p(p_), maps(maps_), b(blockIdx.z), h(blockIdx.y) {
    s = seq_info(p.dense, b, h);
    m0 = (gridDim.x - 1 - blockIdx.x) * Tr::kBlockM;
  }
  __device__ __forceinline__ bool active() const { return m0 < s.sq; }

  // The list of query block m0 / block_m and its tile count (0 for an empty list).
  __device__ __forceinline__ int schedule() {
    indices = p.indices;
    full = p.full;
    count = 0;
    tiles_per_block = p.block_n / BN;
    seq_k_blocks = (int)(((long long)s.sk + p.block_n - 1) / p.block_n);
    const int qb = m0 / p.block_m;
    if (qb >= p.num_q_blocks) return 0;
    const int mb = p.mask_batch == 1 ? 0 : b, mh = p.mask_heads == 1 ? 0 : h;
    const long long list = ((long long)mb * p.mask_heads + mh) * p.num_q_blocks + qb;
    const int off = p.offsets[list];
    const int n = p.offsets[list + 1] - off;
    if (n <= 0) return 0;
    count = n;
    indices += off;
    full += off;
    // One tile per block (block_n == kBlockN): a listed block's tile always starts inside the
    // sequence, no read needed. Else the last listed block drops its tiles past the end (an
    // index outside the sequence, which the Rust API refuses, keeps all its tiles: key0
    // sends them to sk, where every key is masked).
    if (tiles_per_block == 1) return count;
    const int last = indices[count - 1];
    int drop = 0;
    if ((unsigned)last < (unsigned)seq_k_blocks) {
      // Tiles of the last block that start before sk; only the sequence's final block has
      // fewer than tiles_per_block (any other block's quotient exceeds it: no negative drop).
      const int start = last * p.block_n;  // < sk: no overflow
      const int inside = (s.sk - start - 1) / BN + 1;  // sk - start >= 1: no overflow
      if (inside < tiles_per_block) drop = tiles_per_block - inside;
    }
    return count * tiles_per_block - drop;
  }
  __device__ __forceinline__ float scale() const { return p.dense.scale; }
  __device__ __forceinline__ float softcap() const { return p.dense.softcap; }

  // First key of sub-tile `sub` of key block kb (relative to the sequence); sk for a block
  // outside the sequence or a tile past its end (loaded as whatever lies there, fully
  // masked). Unsigned: kb * block_n < sk <= INT32_MAX and sub * BN < block_n.
  __device__ __forceinline__ int key0(int kb, int sub) const {
    if ((unsigned)kb >= (unsigned)seq_k_blocks) return s.sk;
    const unsigned n0 = (unsigned)kb * (unsigned)p.block_n + (unsigned)(sub * BN);
    return n0 < (unsigned)s.sk ? (int)n0 : s.sk;
  }

  // ---- producer (one thread, 24 registers) ----
  __device__ __forceinline__ void producer_begin() {
    batch_coord = p.dense.cu_seqlens_q != nullptr ? 0 : b;
    kvh = h / (p.dense.heads_q / p.dense.heads_kv);
    k_row0 = (int)s.k_row0;
    tma::prefetch_map(&maps.k);
    tma::prefetch_map(&maps.v);
  }
  __device__ __forceinline__ void load_q(uint32_t dst, uint32_t full_bar) const {
    const int q_row = (int)s.q_row0 + m0;
    tma::arrive_expect_tx(full_bar, Tr::kQBytes);
#pragma unroll
    for (int pn = 0; pn < Tr::kPanels; ++pn)
      tma::load_4d(dst + pn * (Tr::kBlockM * 128), &maps.q, full_bar, 64 * pn, q_row, h,
                   batch_coord);
  }
  // Key tile t: kBlockN rows from this (absolute) row.
  __device__ __forceinline__ int kv_coords(int t) const {
    const int e = t / tiles_per_block;
    return k_row0 + key0(indices[e], t - e * tiles_per_block);
  }
  __device__ __forceinline__ void load_k(int row, uint32_t dst, uint32_t full_bar) const {
    load_kv_rows<Tr>(&maps.k, row, kvh, batch_coord, dst, full_bar);
  }
  __device__ __forceinline__ void load_v(int row, uint32_t dst, uint32_t full_bar) const {
    load_kv_rows<Tr>(&maps.v, row, kvh, batch_coord, dst, full_bar);
  }

  // ---- consumers ----
  __device__ __forceinline__ T *output() const { return head_tensors<T>(p.dense, s, b, h).o; }
  struct Rows {
    WarpWindowMask<WgMaskShape<Tr>> window;  // the options' mask of this thread's two rows
    int warp_row0;
  };
  // This thread's rows, and the first entry's key block and kind (loaded here, long before
  // the first tile's scores need them).
  __device__ __forceinline__ Rows prepare_rows(int wg, int warp, int g) {
    Rows w;
    w.warp_row0 = m0 + 64 * wg + 16 * warp;
    const LaDenseParams &d = p.dense;
    w.window.prepare(Mask{d.window_left, d.window_right, d.sinks}, w.warp_row0, g, s.sq, s.sk);
    cur_e = -1;
    if (count > 0) {
      next_kb = indices[0];
      next_full = full[0];
    }
    return w;
  }
  struct TileInfo {
    int n0;
    bool full;
  };
  // Tile t's first key and kind. The mainloop asks for tiles 0, 1, 2, ... in order, so entry
  // e + 1 is loaded when entry e is first used (any other order reloads: still exact).
  __device__ __forceinline__ TileInfo tile_info(int t) {
    const int e = t / tiles_per_block;
    if (e != cur_e) {
      if (e == cur_e + 1) {
        cur_kb = next_kb;
        cur_full = next_full;
      } else {
        cur_kb = indices[e];
        cur_full = full[e];
      }
      cur_e = e;
      if (e + 1 < count) {
        next_kb = indices[e + 1];
        next_full = full[e + 1];
      }
    }
    return {key0(cur_kb, t - e * tiles_per_block), cur_full != 0};
  }
  __device__ __forceinline__ void mask_tile(float (&sacc)[Tr::kSRegs], const Rows &w,
                                            TileInfo info, int tq) const {
    if (!info.full) {
      // Partial block: the options' mask (keys past sk included).
      w.window.apply(reinterpret_cast<float(&)[Tr::kSRegs / 4][4]>(sacc), info.n0, tq);
      return;
    }
    // Full block: every key of it up to the sequence's end.
    if (info.n0 + BN <= s.sk) return;
#pragma unroll
    for (int i = 0; i < Tr::kSRegs / 4; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (info.n0 + 8 * i + 2 * tq + (e & 1) >= s.sk) sacc[4 * i + e] = kNegInf;
  }
  template <class Staged>
  __device__ __forceinline__ void store_o(T *o, int r, int chunk, const Staged &staged) const {
    const int i = m0 + r;
    if (i < s.sq) {
      const uint4 val = staged();
      *reinterpret_cast<uint4 *>(o + i * p.dense.o_row_stride + chunk * 8) = val;
    }
  }
  __device__ __forceinline__ bool has_lse() const { return p.dense.lse != nullptr; }
  template <class Lse>
  __device__ __forceinline__ void store_lse(const Rows &w, int g, int r, const Lse &lse) const {
    const int i = w.warp_row0 + g + 8 * r;
    if (i < s.sq) p.dense.lse[s.lse_base + i] = lse();
  }
};

template <typename T, class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    block_sparse_wgmma_kernel(const __grid_constant__ LaBlockSparseParams p,
                              const __grid_constant__ tma_host::QkvMaps maps) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  wgmma_attention<T, Tr, BlockSparseWgProblem<T, Tr>>(smem_raw, p, maps);
#endif
}

template <typename T, class Tr>
cudaError_t launch(const LaBlockSparseParams &p, cudaStream_t stream) {
  tma_host::QkvMaps maps;
  if (!tma_host::encode_qkv(&maps, p.dense, Tr::kHeadDim, Tr::kBlockM, Tr::kBlockN))
    return cudaErrorNotSupported;
  const dim3 grid((p.dense.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, p.dense.heads_q,
                  p.dense.batch);
  return tma_host::launch<Tr>(block_sparse_wgmma_kernel<T, Tr>, grid, stream, p, maps);
}

template <class F>
bool with_config(const LaDenseParams &p, F &&f) {
  return with_head_dim_config<WgDense64, WgDense128, WgDense256>(p, static_cast<F &&>(f));
}

// What the kernel takes that needs no device: f16/bf16, head_dim 64/128/256, block_m a
// multiple of the 128-row query tile, block_n a multiple of the head dim's key tile.
const char *shape_unsupported_reason(const LaBlockSparseParams &p) {
  int block_n = 0;
  if (!with_config(p.dense, [&](auto, auto tr) { block_n = decltype(tr)::type::kBlockN; }))
    return "it takes f16 or bf16 with head_dim 64, 128 or 256 only";
  if (p.block_m % WgDense128::kBlockM != 0)
    return "it takes block_m a multiple of 128 only (its query tile)";
  if (p.block_n % block_n != 0)
    return "it takes block_n a multiple of its key tile only (128 at head_dim 64 and 128, 64 "
           "at head_dim 256)";
  return nullptr;
}

}  // namespace
}  // namespace longattn

extern "C" const char *la_block_sparse_wgmma_unsupported_reason(
    const LaBlockSparseParams *params) {
  using namespace longattn;
  if (params == nullptr || !block_sparse_params_ok(*params)) return "its parameters are invalid";
  const LaBlockSparseParams &p = *params;
  const char *why = shape_unsupported_reason(p);
  if (why != nullptr) return why;
  const auto kernel_of = [](auto t, auto tr) {
    return reinterpret_cast<const void *>(
        block_sparse_wgmma_kernel<typename decltype(t)::type, typename decltype(tr)::type>);
  };
  why = tensor_core_unsupported_reason<WgDense64, WgDense128, WgDense256>(
      p.dense, kernel_of, tma_host::is_sm90);
  return why != nullptr ? why : tma_host::tensors_unmappable_reason(p.dense);
}

extern "C" int la_block_sparse_wgmma_forward(const LaBlockSparseParams *params,
                                             cudaStream_t stream) {
  using namespace longattn;
  if (params == nullptr || !block_sparse_params_ok(*params)) return cudaErrorInvalidValue;
  const LaBlockSparseParams &p = *params;
  if (p.dense.batch == 0 || p.dense.seqlen_q == 0) return cudaSuccess;
  if (la_block_sparse_wgmma_unsupported_reason(params) != nullptr) return cudaErrorNotSupported;
  cudaError_t err = cudaErrorNotSupported;
  with_config(p.dense, [&](auto t, auto tr) {
    err = launch<typename decltype(t)::type, typename decltype(tr)::type>(p, stream);
  });
  return err;
}
