// Hopper paged prefill (wgmma.mma_async + TMA, warp-specialised, sm_90a only): the paged
// prefill problem (paged_prefill.h; the same semantics as the mma.sync kernel of
// paged_prefill.cu and the CPU path: dense attention with seqlen_q = the sequence's query
// count, seqlen_k = seqlens_k[b] over its tokens gathered from the pages, bottom-right mask)
// on the Hopper mainloop (longattn/wgmma_mainloop.cuh). COMPILED ONLY, NOT YET RUN ON A GPU;
// reachable only through the explicit la_paged_prefill_wgmma (Rust: PagedPrefillKernel::Hopper).
//
// What this file writes is the Problem:
// - block (x, h, b) owns query rows [m0, m0 + 128) of query head h of sequence b (m0 in
//   reverse order, as dense: under a causal mask the last query tiles have the most keys);
//   the Q tile is one bulk tensor copy per 64-channel panel of a 4-D map over q (head_dim,
//   rows, heads_q, batch; varlen: packed rows, batch 1), rows past the tensor zero-filled;
// - schedule: dense's WindowTiles over keys [0, sk) (sink tiles, then the window), tiles of
//   kBlockN keys aligned to multiples of kBlockN;
// - K/V: the page pool as a 4-D map (head_dim, num_pages * page_size rows, heads_kv, 1) with
//   boxes of box_rows = min(page_size, kBlockN) rows. page_size is a power of two >= 16, so
//   a key tile is kBlockN / box_rows whole pages (page_size < kBlockN) or lies inside one page
//   (page_size >= kBlockN); the producer thread reads the page id of each box from the block
//   table and issues one copy per (box, 64-channel panel) into rows [i * box_rows, (i + 1) *
//   box_rows) of the stage (box_rows * 128 bytes >= 2048: every box starts on a 1024-byte
//   swizzle atom, so the copy engine's 128-byte swizzle matches the tile's). All of a stage's
//   copies complete on its one mbarrier, whose expect_tx is the bytes of the copies issued;
// - the tail tile (the one holding key sk - 1 when sk is not a multiple of kBlockN; it is
//   the last tile visited, since tiles are visited in ascending order and none lies past sk):
//   only boxes holding a key below sk are copied (a table entry past the sequence's pages is
//   never read). K rows past sk are never zeroed: whatever the stage holds there is masked to
//   -inf before the softmax. V rows past sk must be finite (P = 0 times NaN is NaN), and the
//   last page's slots past sk are whatever the cache holds: the producer copies V of the tail
//   tile onto a private mbarrier, waits for it, writes zeros over rows [sk - n0, kBlockN),
//   fences them to the async proxy (wgmma reads shared memory through it) and only then
//   arrives on the stage's full barrier (no bytes expected). That costs the producer one
//   round trip and <= (kBlockN - 1) * head_dim * 2 bytes of st.shared once per block;
// - mask: dense's window rule (WarpWindowMask, dense_mask.cuh) on the m16n8-layout S
//   registers, skipped for interior tiles;
// - O rows < sq stored as 16-byte vectors from the staging tile; LSE rows < sq.
// The FP8 cache and page sizes that are not powers of two >= 16 stay on the mma.sync kernel
// (la_paged_prefill_wgmma_unsupported_reason says so).

#include <cuda.h>

#include "longattn/common.cuh"
#include "longattn/dense_mask.cuh"
#include "longattn/dispatch.cuh"
#include "longattn/mask.cuh"
#include "longattn/paged_common.cuh"
#include "longattn/paged_prefill.h"
#include "longattn/schedule.cuh"
#include "longattn/tma_host.cuh"
#include "longattn/wgmma_mainloop.cuh"

namespace longattn {
namespace {

// The tensor maps of one launch: q (head_dim, rows, heads_q, batch) with boxes of kBlockM
// rows, and the K and V page pools (head_dim, num_pages * page_size, heads_kv, 1) with boxes
// of min(page_size, kBlockN) rows. Passed by value (__grid_constant__).
struct PagedMaps {
  CUtensorMap q, k, v;
};

template <typename T, class Tr>
struct PagedPrefillWgProblem {
  using WindowMask = WarpWindowMask<WgMaskShape<Tr>>;
  static constexpr int kPanelBytes = Tr::kBlockN * 128;  // one 64-channel panel of a stage
  const LaPagedPrefillParams &p;
  const PagedMaps &maps;
  int b, h, m0;
  int q0, sq, sk;  // first packed row (varlen) or 0, query rows, keys
  WindowTiles tiles;
  // Producer: the sequence's block-table row, its kv head, the page geometry.
  const int32_t *pages;
  int kvh, page_shift, box_rows, boxes_per_tile;
  uint32_t tail_bar;  // the private mbarrier of the tail tile's V copies

  __device__ __forceinline__ PagedPrefillWgProblem(const LaPagedPrefillParams &p_,
                                                   const PagedMaps &maps_)
      : p(p_), maps(maps_), b(blockIdx.z), h(blockIdx.y) {
    const bool varlen = p.cu_seqlens_q != nullptr;
    q0 = varlen ? p.cu_seqlens_q[b] : 0;
    sq = varlen ? p.cu_seqlens_q[b + 1] - q0 : p.q_len;
    sk = p.cache.seqlens_k[b];
    m0 = (gridDim.x - 1 - blockIdx.x) * Tr::kBlockM;
  }
  __device__ __forceinline__ bool active() const { return m0 < sq; }
  __device__ __forceinline__ int schedule() {
    const Mask mask{p.window_left, p.window_right, p.sinks};
    // (64-bit: m0 + kBlockM may pass INT_MAX for q_len near it.)
    const int row_end = (int)min((long long)m0 + Tr::kBlockM, (long long)sq);
    tiles = WindowTiles::of(mask, m0, row_end, sq, sk, Tr::kBlockN);
    return tiles.count();
  }
  __device__ __forceinline__ float scale() const { return p.scale; }
  __device__ __forceinline__ float softcap() const { return p.softcap; }

  // ---- producer ----
  __device__ __forceinline__ void producer_begin() {
    const LaPagedCache &c = p.cache;
    pages = c.block_table + (long long)b * c.max_pages_per_seq;
    kvh = h / (p.heads_q / c.heads_kv);
    page_shift = __ffs(c.page_size) - 1;  // a power of two (checked on the host)
    box_rows = min(c.page_size, Tr::kBlockN);
    boxes_per_tile = Tr::kBlockN / box_rows;
    __shared__ alignas(8) uint64_t tail_storage;
    tail_bar = mma::smem_addr(&tail_storage);
    tma::barrier_init(tail_bar, 1);
    tma::fence_barrier_init();
    tma::prefetch_map(&maps.k);
    tma::prefetch_map(&maps.v);
  }
  __device__ __forceinline__ void load_q(uint32_t dst, uint32_t full) const {
    const bool varlen = p.cu_seqlens_q != nullptr;
    tma::arrive_expect_tx(full, Tr::kQBytes);
#pragma unroll
    for (int pn = 0; pn < Tr::kPanels; ++pn)
      tma::load_4d(dst + pn * (Tr::kBlockM * 128), &maps.q, full, 64 * pn, q0 + m0, h,
                   varlen ? 0 : b);
  }
  // Key tile t: keys [n0, n0 + kBlockN), its boxes that hold a key below sk (all of them but
  // in the tail tile) and each box's pool row through the page table. The table reads of a
  // tile are issued together here, before the producer waits for the tile's ring stage, so
  // their latency overlaps that wait instead of serialising one read per box between copies.
  static constexpr int kMaxBoxes = Tr::kBlockN / 16;  // pages of >= 16 rows
  struct TileBoxes {
    int n0, boxes;
    int row[kMaxBoxes];
  };
  __device__ __forceinline__ TileBoxes kv_coords(int t) const {
    TileBoxes c;
    c.n0 = tiles.key0(t);
    c.boxes = max(0, min(boxes_per_tile, (sk - c.n0 + box_rows - 1) / box_rows));
#pragma unroll
    for (int i = 0; i < kMaxBoxes; ++i) {
      const int j = c.n0 + i * box_rows;  // first key of box i
      c.row[i] = i < c.boxes
                     ? (pages[j >> page_shift] << page_shift) + (j & ((1 << page_shift) - 1))
                     : 0;
    }
    return c;
  }
  // Copies tile c's boxes, completing on `bar` (expect_tx of the bytes issued; none, a plain
  // arrival, for a tile at or past sk, which the schedule never visits).
  __device__ __forceinline__ void load_boxes(const CUtensorMap *map, const TileBoxes &c,
                                             uint32_t dst, uint32_t bar) const {
    tma::arrive_expect_tx(bar, (uint32_t)(c.boxes * box_rows) * (Tr::kHeadDim * 2));
#pragma unroll
    for (int i = 0; i < kMaxBoxes; ++i) {
      if (i >= c.boxes) break;
#pragma unroll
      for (int pn = 0; pn < Tr::kPanels; ++pn)
        tma::load_4d(dst + pn * kPanelBytes + i * box_rows * 128, map, bar, 64 * pn, c.row[i],
                     kvh, 0);
    }
  }
  __device__ __forceinline__ void load_k(const TileBoxes &c, uint32_t dst, uint32_t full) const {
    load_boxes(&maps.k, c, dst, full);
  }
  __device__ __forceinline__ void load_v(const TileBoxes &c, uint32_t dst, uint32_t full) const {
    const int n0 = c.n0;
    if (n0 + Tr::kBlockN <= sk) {
      load_boxes(&maps.v, c, dst, full);
      return;
    }
    // The tail tile (see the file comment): copy, wait, zero the rows past sk, then release.
    load_boxes(&maps.v, c, dst, tail_bar);
    tma::wait(tail_bar, 0);
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    for (int r = max(sk - n0, 0); r < Tr::kBlockN; ++r)
#pragma unroll
      for (int pn = 0; pn < Tr::kPanels; ++pn)
#pragma unroll
        for (int c = 0; c < 8; ++c)
          asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(
                           dst + pn * kPanelBytes + r * 128 + c * 16),
                       "r"(zero.x), "r"(zero.y), "r"(zero.z), "r"(zero.w)
                       : "memory");
    wgmma::fence_proxy_async();
    tma::arrive(full);
  }

  // ---- consumers ----
  __device__ __forceinline__ T *output() const {
    const long long base = p.cu_seqlens_q != nullptr ? (long long)q0 * p.o_row_stride
                                                     : (long long)b * p.o_batch_stride;
    return static_cast<T *>(p.o) + base + (long long)h * p.o_head_stride;
  }
  struct Rows {
    WindowMask w;
    int warp_row0;
  };
  __device__ __forceinline__ Rows prepare_rows(int wg, int warp, int g) const {
    Rows rows;
    rows.warp_row0 = m0 + 64 * wg + 16 * warp;
    rows.w.prepare(Mask{p.window_left, p.window_right, p.sinks}, rows.warp_row0, g, sq, sk);
    return rows;
  }
  __device__ __forceinline__ int tile_info(int t) const { return tiles.key0(t); }
  __device__ __forceinline__ void mask_tile(float (&sacc)[Tr::kSRegs], const Rows &rows, int n0,
                                            int tq) const {
    rows.w.apply(reinterpret_cast<float(&)[Tr::kSRegs / 4][4]>(sacc), n0, tq);
  }
  template <class Staged>
  __device__ __forceinline__ void store_o(T *o, int r, int chunk, const Staged &staged) const {
    const int i = m0 + r;
    if (i < sq) {
      const uint4 val = staged();
      *reinterpret_cast<uint4 *>(o + i * p.o_row_stride + chunk * 8) = val;
    }
  }
  __device__ __forceinline__ bool has_lse() const { return p.lse != nullptr; }
  template <class Lse>
  __device__ __forceinline__ void store_lse(const Rows &rows, int g, int r, const Lse &lse) const {
    const int i = rows.warp_row0 + g + 8 * r;
    if (i < sq) {
      const long long base = p.cu_seqlens_q != nullptr
                                 ? (long long)h * p.total_q + q0
                                 : ((long long)b * p.heads_q + h) * p.q_len;
      p.lse[base + i] = lse();
    }
  }
};

template <typename T, class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    paged_prefill_wgmma_kernel(const __grid_constant__ LaPagedPrefillParams p,
                               const __grid_constant__ PagedMaps maps) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  wgmma_attention<T, Tr, PagedPrefillWgProblem<T, Tr>>(smem_raw, p, maps);
#endif
}

// Calls f(Tag<T>{}, Tag<Traits>{}) for the params' dtype and head dim (the dense Hopper
// tiles); false for a configuration the kernel does not have.
template <class F>
bool with_config(const LaPagedPrefillParams &p, F &&f) {
  auto by_dim = [&](auto t) {
    switch (p.cache.head_dim) {
      case 64: f(t, Tag<WgDense64>{}); return true;
      case 128: f(t, Tag<WgDense128>{}); return true;
      case 256: f(t, Tag<WgDense256>{}); return true;
    }
    return false;
  };
  return with_dtype<__half, __nv_bfloat16>(p.dtype, false, by_dim);
}

// q and the two pools as tensors (see PagedMaps).
tma_host::OperandShape q_shape(const LaPagedPrefillParams &p) {
  const bool varlen = p.cu_seqlens_q != nullptr;
  return {p.q,
          varlen ? p.total_q : p.q_len,
          p.heads_q,
          varlen ? 1 : p.cache.batch,
          p.q_row_stride,
          p.q_head_stride,
          p.q_batch_stride};
}
tma_host::OperandShape pool_shape(const LaPagedPrefillParams &p, const void *base) {
  const LaPagedCache &c = p.cache;
  return {base, (long long)c.num_pages * c.page_size, c.heads_kv, 1,
          (long long)c.heads_kv * c.head_dim, c.head_dim, 0};
}

// Box rows of the pools' maps: one page, or one key tile when pages are larger.
template <class Tr>
int box_rows(const LaPagedPrefillParams &p) {
  return p.cache.page_size < Tr::kBlockN ? p.cache.page_size : Tr::kBlockN;
}

template <typename T, class Tr>
cudaError_t launch(const LaPagedPrefillParams &p, cudaStream_t stream) {
  PagedMaps maps;
  if (!tma_host::encode_operand(&maps.q, q_shape(p), p.dtype, Tr::kHeadDim, Tr::kBlockM) ||
      !tma_host::encode_operand(&maps.k, pool_shape(p, p.cache.k_cache), p.dtype, Tr::kHeadDim,
                                box_rows<Tr>(p)) ||
      !tma_host::encode_operand(&maps.v, pool_shape(p, p.cache.v_cache), p.dtype, Tr::kHeadDim,
                                box_rows<Tr>(p)))
    return cudaErrorNotSupported;
  const dim3 grid((unsigned)(((long long)p.q_len + Tr::kBlockM - 1) / Tr::kBlockM), p.heads_q,
                  p.cache.batch);
  return tma_host::launch<Tr>(paged_prefill_wgmma_kernel<T, Tr>, grid, stream, p, maps);
}

// Why the Hopper kernel cannot run valid params `p` here (a static string), or nullptr.
const char *unsupported_reason(const LaPagedPrefillParams &p) {
  if (p.kv_dtype != p.dtype)
    return "the Hopper paged prefill reads f16/bf16 caches of q's dtype only (an FP8 cache "
           "runs on the mma.sync kernel)";
  const int ps = p.cache.page_size;
  if (ps < 16 || (ps & (ps - 1)) != 0)
    return "the Hopper paged prefill copies whole pages in bulk and takes page sizes that are "
           "powers of two from 16 (the mma.sync kernel takes any)";
  size_t smem = 0;
  const void *kernel = nullptr;
  const bool known = with_config(p, [&](auto t, auto tr) {
    using Tr = typename decltype(tr)::type;
    smem = Tr::kSmemBytes;
    kernel = reinterpret_cast<const void *>(
        paged_prefill_wgmma_kernel<typename decltype(t)::type, Tr>);
  });
  if (!known) return "the Hopper paged prefill takes f16 or bf16 with head_dim 64, 128 or 256";
  const char *why = device_unsupported_reason(kernel, smem, tma_host::is_sm90);
  if (why != nullptr) return why;
  if (tma_host::encode_tiled() == nullptr)
    return "the driver has no tensor-map encoder (cuTensorMapEncodeTiled)";
  if (!tma_host::operand_mappable(q_shape(p), p.cache.head_dim) ||
      !tma_host::operand_mappable(pool_shape(p, p.cache.k_cache), p.cache.head_dim) ||
      !tma_host::operand_mappable(pool_shape(p, p.cache.v_cache), p.cache.head_dim))
    return "the TMA copy engine cannot address q or the page pools with these strides (it "
           "needs 16-byte aligned bases and positive multiples of 16 bytes for every dimension "
           "longer than 1)";
  return nullptr;
}

// What la_paged_prefill takes: its scalar checks, q/o f16 or bf16, a cache of q's dtype or
// e4m3 with scales (which this kernel then refuses as unsupported, not as invalid).
bool params_valid(const LaPagedPrefillParams *p) {
  return p != nullptr && paged_prefill_params_ok(*p) &&
         (p->dtype == LA_F16 || p->dtype == LA_BF16) &&
         (p->kv_dtype == p->dtype || (p->kv_dtype == LA_F8E4M3 && p->kv_scales != nullptr));
}

}  // namespace
}  // namespace longattn

extern "C" const char *la_paged_prefill_wgmma_unsupported_reason(
    const LaPagedPrefillParams *params) {
  using namespace longattn;
  if (!params_valid(params)) return "its parameters are invalid";
  return unsupported_reason(*params);
}

extern "C" int la_paged_prefill_wgmma(const LaPagedPrefillParams *params, cudaStream_t stream) {
  using namespace longattn;
  if (!params_valid(params)) return cudaErrorInvalidValue;
  if (unsupported_reason(*params) != nullptr) return cudaErrorNotSupported;
  cudaError_t err = cudaErrorInvalidValue;
  with_config(*params, [&](auto t, auto tr) {
    err = launch<typename decltype(t)::type, typename decltype(tr)::type>(*params, stream);
  });
  return err;
}
