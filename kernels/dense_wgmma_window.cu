// Persistent Hopper dense attention (wgmma.mma_async + TMA, sm_90a only), two walks of one
// kernel, by name only, not yet run on a GPU: LA_DENSE_WGMMA_WINDOW (64-key tiles, for short
// sliding windows) and LA_DENSE_WGMMA_PERSISTENT (dense_wgmma.cu's 128-key tiles, for any
// dense problem: points 2 and 3 below are what it adds to dense_wgmma.cu, aimed at the
// per-tile prologue and epilogue that 1k-token problems lose most to). Semantics are exactly
// those of the SIMT kernel in dense.cu (any window, sinks, softcap, GQA, varlen, LSE); what
// differs from dense_wgmma.cu is the work each block does.
//
// Under a causal window W a 128-row query tile spans W + 127 keys, and dense_wgmma.cu's
// block computes every one of them for every row: with 128-key tiles that is (W + 128) keys
// per row for W visible (67% useful at W = 256), and its three or four key tiles barely
// amortise the block's fixed costs (launch, the Q copy, the ring's first tiles in flight,
// the O write-back) while the block holds the whole SM. This kernel changes three things:
//
// 1. 64-key tiles, and each consumer warpgroup visits only the key tiles its own 64 rows can
//    see. The block still loads the union (the producer's schedule is Mask::key_tiles of all
//    128 rows, as in dense_wgmma.cu); a consumer skips the tiles outside its rows' reach
//    (consumer 0 the window's last tile, consumer 1 its first): W + 64 keys per row instead of
//    W + 128 (80% useful at W = 256, 94% at W = 1024).
// 2. Persistent blocks: one block per SM walks work items (128-row query tile, head,
//    sequence), item w = block, block + grid, ..., the query tiles of one head adjacent (the
//    blocks running at once read overlapping windows of the same K/V from L2) and each head's
//    last tile first. The K/V ring runs on across items, and Q is double-buffered: the
//    producer loads the next item's Q and first key tiles while the consumers finish the
//    current item, so pipeline fill and launch are paid once per SM, not once per tile.
// 3. The ping-pong turns are taken per tile of the block's schedule by both consumers alike
//    (n + 1 turns for n tiles), whether or not a consumer computes that tile (an empty
//    turn), so the two stay in step whatever their own ranges.
//
// Consumer c computes tiles [lo, hi) of the item's schedule, from the first to the last tile
// its rows can see, in wgmma_mainloop.cuh's order (S_lo alone; S_t with PV_{t-1}; PV_{hi-1}
// alone), every wgmma in straight-line code (ptxas serialises wgmmas under a data-dependent
// branch). A tile outside [lo, hi) is released (both ring barriers) once it is loaded and,
// past hi, once the last PV has completed, so its arrivals never count toward the stage's
// previous use. Scale, softcap, the per-element mask of boundary tiles only, the online
// softmax overlapping the PV wgmma, and O staged in the consumer's own Q rows are those of
// wgmma_mainloop.cuh.
//
// Shared memory (bytes, 1024-aligned): Q buffers 0 and 1 (128, D) each; the K ring and the V
// ring (kStages, 64, D); mbarriers: Q full and Q empty per buffer, then K full, V full,
// K empty, V empty per stage. Named barriers as in WgTraits (turns 1, 2; staging 3, 4).

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

// WgTraits with two Q buffers (the shared-memory layout above), for either walk: 64-key tiles
// (LA_DENSE_WGMMA_WINDOW) or the Hopper kernel's 128-key tiles (LA_DENSE_WGMMA_PERSISTENT).
template <int kHeadDim_, int kBlockN_, int kStages_>
struct WgWalkTraits : WgTraits<kHeadDim_, kBlockN_, kStages_> {
  using Base = WgTraits<kHeadDim_, kBlockN_, kStages_>;
  static constexpr uint32_t kKBase = 2 * Base::kQBytes;
  static constexpr uint32_t kVBase = kKBase + kStages_ * Base::kKvBytes;
  static constexpr uint32_t kBarrierOffset = kVBase + kStages_ * Base::kKvBytes;
  static constexpr uint32_t kBarrierBytes = 8 * (4 + 4 * kStages_);
  static constexpr size_t kSmemBytes = (size_t)kBarrierOffset + kBarrierBytes + 1024;
  static_assert(kSmemBytes <= 232448, "fits the 227 KB a Hopper block may opt in to");
};

using WgWindow64 = WgWalkTraits<64, 64, 8>;    // 161 KB shared: 32 KB Q, 8 stages of 16 KB
using WgWindow128 = WgWalkTraits<128, 64, 4>;  // 193 KB shared: 64 KB Q, 4 stages of 32 KB
// The persistent dense walk keeps dense_wgmma.cu's 128-key tiles; the second Q buffer costs
// d128 its third stage (FlashAttention-3 also runs d128 with two).
using WgPersistent64 = WgWalkTraits<64, 128, 4>;    // 161 KB shared: 32 KB Q, 4 stages of 32 KB
using WgPersistent128 = WgWalkTraits<128, 128, 2>;  // 193 KB shared: 64 KB Q, 2 stages of 64 KB
// Head dims 136-192 (both walks): three 64-channel panels; two Q buffers of 48 KB leave room
// for two stages of 64-key tiles only.
using WgWalk192 = WgWalkTraits<192, 64, 2>;  // 193 KB shared: 96 KB Q, 2 stages of 48 KB

// Work item w of the persistent walk: query rows [m0, m0 + 128) of head h of sequence b, with
// its key-tile schedule (the union over the 128 rows, as dense_wgmma.cu's block).
template <class Tr>
struct WindowItem {
  int b, h, m0;
  SeqInfo s;
  WindowTiles tiles;

  // `q_tiles`: query tiles per head (of the longest sequence with varlen).
  __device__ __forceinline__ WindowItem(const LaDenseParams &p, long long w, int q_tiles) {
    const long long per_seq = (long long)q_tiles * p.heads_q;
    b = (int)(w / per_seq);
    const long long rem = w - (long long)b * per_seq;
    h = (int)(rem / q_tiles);
    m0 = (q_tiles - 1 - (int)(rem - (long long)h * q_tiles)) * Tr::kBlockM;
    s = seq_info(p, b, h);
    const Mask mask{p.window_left, p.window_right, p.sinks};
    tiles = WindowTiles::of(mask, m0, min(m0 + Tr::kBlockM, s.sq), s.sq, s.sk, Tr::kBlockN);
  }
  __device__ __forceinline__ bool active() const { return m0 < s.sq; }
};

// One consumer's rows of an item: the window mask of this thread's rows (dense_mask.cuh: the
// per-thread visible ranges and per-warp bounds of dense_wgmma.cu's mask), plus the
// consumer's own reach, which decides the tiles it skips.
template <class Tr>
struct ConsumerRows {
  int warp_row0;
  WarpWindowMask<WgMaskShape<Tr>> window;
  // Keys the consumer's rows can see lie in [0, reach_hi] and in [reach_lo, reach_hi] or
  // below `sinks`; reach_hi < 0 when the consumer has no valid row (or sees nothing).
  long long reach_lo, reach_hi;
};

template <class Tr>
__device__ __forceinline__ ConsumerRows<Tr> consumer_rows(const LaDenseParams &p,
                                                          const SeqInfo &s, int m0, int wg,
                                                          int warp, int g) {
  ConsumerRows<Tr> w;
  w.warp_row0 = m0 + 64 * wg + 16 * warp;
  w.window.prepare(Mask{p.window_left, p.window_right, p.sinks}, w.warp_row0, g, s.sq, s.sk);
  const long long shift = (long long)s.sk - s.sq;
  // A row's visible range grows with the row: the first row bounds the left reach, the last
  // the right.
  const int first = m0 + 64 * wg, last = min(first + 63, s.sq - 1);
  w.reach_hi = -1;
  w.reach_lo = 0;
  if (first <= last) {
    long long hr = s.sk - 1;
    if (p.window_right >= 0) hr = min(hr, (long long)last + shift + p.window_right);
    w.reach_hi = hr;
    if (p.window_left >= 0) w.reach_lo = max((long long)first + shift - p.window_left, 0LL);
  }
  return w;
}

// Whether key tile [n0, n0 + kBlockN) holds a key some row of the consumer can see.
template <class Tr>
__device__ __forceinline__ bool consumer_needs(const ConsumerRows<Tr> &w, int sinks, int n0) {
  return (long long)n0 <= w.reach_hi &&
         ((long long)n0 + Tr::kBlockN - 1 >= w.reach_lo || n0 < sinks);
}

template <typename T, class Tr>
__device__ __forceinline__ void window_attention(unsigned char *smem_raw, const LaDenseParams &p,
                                                 const tma_host::QkvMaps &maps, int q_tiles,
                                                 long long n_items) {
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN;
  constexpr int kStages = Tr::kStages;
  using SMma = wgmma::Mma<T, BN>;
  using OMma = wgmma::Mma<T, D>;
  const uint32_t raw_addr = mma::smem_addr(smem_raw);
  const uint32_t pad = ((raw_addr + 1023u) & ~1023u) - raw_addr;
  unsigned char *smem = smem_raw + pad;
  const uint32_t q_base = raw_addr + pad;
  const uint32_t k_base = q_base + Tr::kKBase;
  const uint32_t v_base = q_base + Tr::kVBase;
  const uint32_t bar_base = q_base + Tr::kBarrierOffset;
  auto q_full = [&](int qb) { return bar_base + 8u * qb; };
  auto q_empty = [&](int qb) { return bar_base + 8u * (2 + qb); };
  auto k_full = [&](int st) { return bar_base + 8u * (4 + st); };
  auto v_full = [&](int st) { return bar_base + 8u * (4 + kStages + st); };
  auto k_empty = [&](int st) { return bar_base + 8u * (4 + 2 * kStages + st); };
  auto v_empty = [&](int st) { return bar_base + 8u * (4 + 3 * kStages + st); };
  // Ring use c (counted over the whole walk) is stage c % kStages, phase parity (c / kStages).
  auto parity = [](int c) { return (uint32_t)((c / kStages) & 1); };

  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int qb = 0; qb < 2; ++qb) {
      tma::barrier_init(q_full(qb), 1);
      tma::barrier_init(q_empty(qb), Tr::kConsumerThreads);
    }
    for (int st = 0; st < kStages; ++st) {
      tma::barrier_init(k_full(st), 1);
      tma::barrier_init(v_full(st), 1);
      tma::barrier_init(k_empty(st), Tr::kConsumerThreads);
      tma::barrier_init(v_empty(st), Tr::kConsumerThreads);
    }
    tma::fence_barrier_init();
  }
  __syncthreads();

  if (tid < 128) {
    // ---- producer warpgroup: one thread issues every copy of every item ------------------
    tma::release_registers<Tr::kProducerRegs>();
    if (tid == 0) {
      tma::prefetch_map(&maps.q);
      tma::prefetch_map(&maps.k);
      tma::prefetch_map(&maps.v);
      const int kvh_div = p.heads_q / p.heads_kv;
      int c = 0, qi = 0;  // ring uses and Q loads so far
      for (long long w = blockIdx.x; w < n_items; w += gridDim.x) {
        const WindowItem<Tr> it(p, w, q_tiles);
        if (!it.active()) continue;
        const int batch_coord = p.cu_seqlens_q != nullptr ? 0 : it.b;
        const int kvh = it.h / kvh_div;
        const int qb = qi & 1;
        if (qi >= 2) tma::wait(q_empty(qb), ((qi >> 1) - 1) & 1);
        tma::arrive_expect_tx(q_full(qb), Tr::kQBytes);
#pragma unroll
        for (int pn = 0; pn < Tr::kPanels; ++pn)
          tma::load_4d(q_base + qb * Tr::kQBytes + pn * (BM * 128), &maps.q, q_full(qb), 64 * pn,
                       (int)it.s.q_row0 + it.m0, it.h, batch_coord);
        ++qi;
        const int n = it.tiles.count();
        for (int t = 0; t < n; ++t, ++c) {
          const int st = c % kStages, row = (int)it.s.k_row0 + it.tiles.key0(t);
          const uint32_t reuse_parity = ((c / kStages) - 1) & 1;
          if (c >= kStages) tma::wait(k_empty(st), reuse_parity);
          tma::arrive_expect_tx(k_full(st), Tr::kKvBytes);
#pragma unroll
          for (int pn = 0; pn < Tr::kPanels; ++pn)
            tma::load_4d(k_base + st * Tr::kKvBytes + pn * (BN * 128), &maps.k, k_full(st),
                         64 * pn, row, kvh, batch_coord);
          if (c >= kStages) tma::wait(v_empty(st), reuse_parity);
          tma::arrive_expect_tx(v_full(st), Tr::kKvBytes);
#pragma unroll
          for (int pn = 0; pn < Tr::kPanels; ++pn)
            tma::load_4d(v_base + st * Tr::kKvBytes + pn * (BN * 128), &maps.v, v_full(st),
                         64 * pn, row, kvh, batch_coord);
        }
      }
    }
  } else {
    // ---- consumer warpgroups -----------------------------------------------------------
    tma::claim_registers<Tr::kConsumerRegs>();
    const int wg = tid / 128 - 1, warp = (tid / 32) % 4, lane = tid % 32;
    const int ctid = tid - 128 * (wg + 1);
    const int g = lane / 4, tq = lane % 4;
    const float scale_log2 = p.scale * kLog2e;
    const bool softcap = p.softcap > 0.0f;
    const float cap_pre = softcap ? (p.scale / p.softcap) : 0.0f;
    const float cap_post = p.softcap * kLog2e;

    auto take_turn = [&]() { tma::named_sync(Tr::kTurnBarrier + wg, Tr::kConsumerThreads); };
    auto pass_turn = [&]() { tma::named_arrive(Tr::kTurnBarrier + (1 - wg), Tr::kConsumerThreads); };
    // Consumer 0 takes the first turn; consumer 1 passes after every turn, and consumer 0
    // takes one last turn after the walk to consume its final pass.
    if (wg == 1) pass_turn();

    auto k_desc = [&](uint32_t ks, int kk) {
      return wgmma::make_desc(ks + (kk / 4) * (BN * 128) + (kk % 4) * 32, 16, 1024);
    };
    auto v_desc = [&](uint32_t vs, int kk) {
      return wgmma::make_desc(vs + kk * 2048, BN * 128, 1024);
    };

    int c0 = 0, qi = 0;  // ring uses before this item, items so far
    for (long long w = blockIdx.x; w < n_items; w += gridDim.x) {
      const WindowItem<Tr> it(p, w, q_tiles);
      if (!it.active()) continue;
      const int qb = qi & 1;
      const uint32_t q_buf = q_base + qb * Tr::kQBytes;
      unsigned char *q_smem = smem + qb * Tr::kQBytes;
      const uint32_t q_wg = q_buf + wg * 64 * 128;
      auto q_desc = [&](int kk) {
        return wgmma::make_desc(q_wg + (kk / 4) * (BM * 128) + (kk % 4) * 32, 16, 1024);
      };
      const ConsumerRows<Tr> rows = consumer_rows<Tr>(p, it.s, it.m0, wg, warp, g);
      const int n = it.tiles.count();

      float m[2] = {kNegInf, kNegInf};
      float l[2] = {0.0f, 0.0f};
      float oacc[Tr::kORegs];
      float sacc[Tr::kSRegs];
      uint32_t pf[Tr::kPvSteps][4];
#pragma unroll
      for (int i = 0; i < Tr::kORegs; ++i) oacc[i] = 0.0f;
#pragma unroll
      for (int i = 0; i < Tr::kSRegs; ++i) sacc[i] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < Tr::kPvSteps; ++kk)
#pragma unroll
        for (int e = 0; e < 4; ++e) pf[kk][e] = 0u;

      // The Q copy completes before any S and before O is staged over it.
      tma::wait(q_full(qb), (qi >> 1) & 1);
      // This consumer computes tiles [lo, hi) of the item's schedule: from the first to the
      // last tile its rows can see (a tile between them that none can see, past the sink
      // tiles, is masked like any boundary tile). Turn k of the n + 1 is S_k (k = lo), S_k and
      // PV_{k-1} (lo < k < hi), PV_{hi-1} (k = hi) or empty; an empty turn's tile (k < lo or
      // k > hi: tile k - 1) is released unread. Every wgmma sits in straight-line code, as in
      // wgmma_mainloop.cuh (a wgmma under a data-dependent branch is serialised by ptxas).
      int lo = n, hi = n;
      for (int k = 0; k < n; ++k)
        if (consumer_needs<Tr>(rows, p.sinks, it.tiles.key0(k))) {
          if (lo == n) lo = k;
          hi = k + 1;
        }
      auto empty_turn = [&]() {
        take_turn();
        pass_turn();
      };
      auto release = [&](int k) {  // a tile this consumer skips, once loaded (see above)
        const int ck = c0 + k;
        tma::wait(k_full(ck % kStages), parity(ck));
        tma::arrive(k_empty(ck % kStages));
        tma::wait(v_full(ck % kStages), parity(ck));
        tma::arrive(v_empty(ck % kStages));
      };
      auto stage = [&](int t) { return (c0 + t) % kStages; };
      auto phase = [&](int t) { return parity(c0 + t); };
      auto issue_s = [&](int t) {
        const uint32_t ks = k_base + stage(t) * Tr::kKvBytes;
#pragma unroll
        for (int kk = 0; kk < Tr::kQkSteps; ++kk) {
          if (kk == 0) {
            SMma::template ss<0>(sacc, q_desc(kk), k_desc(ks, kk));
          } else {
            SMma::template ss<1>(sacc, q_desc(kk), k_desc(ks, kk));
          }
        }
        wgmma::commit();
      };
      auto issue_pv = [&](int t) {
        const uint32_t vs = v_base + stage(t) * Tr::kKvBytes;
#pragma unroll
        for (int kk = 0; kk < Tr::kPvSteps; ++kk) OMma::rs_bt(oacc, pf[kk], v_desc(vs, kk));
        wgmma::commit();
      };
      auto softmax = [&](int t, float (&alpha)[2]) {
        wgmma::scale_scores(sacc, softcap, cap_pre, cap_post, scale_log2);
        // Interior tiles skip the mask; boundary tiles, the ragged last one included, mask
        // per element.
        rows.window.apply(reinterpret_cast<float(&)[Tr::kSRegs / 4][4]>(sacc), it.tiles.key0(t),
                          tq);
#pragma unroll
        for (int r = 0; r < 2; ++r)
          alpha[r] =
              softmax_update(m[r], l[r], r, reinterpret_cast<float(&)[Tr::kSRegs / 4][4]>(sacc));
      };

      for (int k = 0; k < lo; ++k) {
        empty_turn();
        release(k);
      }
      if (lo < hi) {
        float alpha[2];
        tma::wait(k_full(stage(lo)), phase(lo));
        take_turn();
        wgmma::fence();
        issue_s(lo);
        pass_turn();
        wgmma::wait<0>();
        wgmma::fence_operands(sacc);
        tma::arrive(k_empty(stage(lo)));
        softmax(lo, alpha);
        wgmma::pack_p<T>(pf, sacc);
        for (int t = lo + 1; t < hi; ++t) {
          tma::wait(k_full(stage(t)), phase(t));
          tma::wait(v_full(stage(t - 1)), phase(t - 1));
          take_turn();
          wgmma::fence();
          issue_s(t);
          issue_pv(t - 1);
          pass_turn();
          wgmma::wait<1>();
          wgmma::fence_operands(sacc);
          tma::arrive(k_empty(stage(t)));
          softmax(t, alpha);
          wgmma::wait<0>();
          wgmma::fence_operands(oacc);
          tma::arrive(v_empty(stage(t - 1)));
          wgmma::scale_rows(oacc, alpha);
          wgmma::pack_p<T>(pf, sacc);
        }
        tma::wait(v_full(stage(hi - 1)), phase(hi - 1));
        take_turn();
        wgmma::fence();
        issue_pv(hi - 1);
        pass_turn();
        wgmma::wait<0>();
        wgmma::fence_operands(oacc);
        tma::arrive(v_empty(stage(hi - 1)));  // the ring runs on into the next tiles and items
      } else if (n > 0) {
        empty_turn();  // nothing to compute: n + 1 empty turns in all
      }
      for (int k = hi; k < n; ++k) {
        empty_turn();
        release(k);
      }
      c0 += n;

      // Epilogue: stage O in this consumer's rows of the item's Q buffer (its wgmmas are
      // done), write 16-byte vectors, then hand the buffer back to the producer.
      float inv[2];
      softmax_finalize(l, inv);
#pragma unroll
      for (int i = 0; i < Tr::kORegs / 4; ++i)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = 64 * wg + 16 * warp + g + 8 * r;
          *reinterpret_cast<uint32_t *>(q_smem + panel_offset<BM>(row, i) + 4 * tq) =
              pack2<T>(oacc[4 * i + 2 * r] * inv[r], oacc[4 * i + 2 * r + 1] * inv[r]);
        }
      tma::named_sync(Tr::kStagingBarrier + wg, 128);
      T *o = head_tensors<T>(p, it.s, it.b, it.h).o;
      constexpr int kCpr = Tr::kChunksPerRow;
      const int chunks = p.head_dim / 8;  // the caller's channels (the tile's may be padded)
      // Thread ctid writes chunks ctid, ctid + 128, ... of the consumer's 64 x kCpr, its
      // (row, chunk) stepped incrementally: with 24 chunks per row (d192) per-pass divisions
      // hoisted out of the walk would hold a register per pass.
      int r = 64 * wg + ctid / kCpr, chunk = ctid % kCpr;
#pragma unroll
      for (int pass = 0; pass < 64 * kCpr / 128; ++pass) {
        const int i = it.m0 + r;
        if (i < it.s.sq && chunk < chunks)
          *reinterpret_cast<uint4 *>(o + i * p.o_row_stride + chunk * 8) =
              *reinterpret_cast<const uint4 *>(q_smem + panel_offset<BM>(r, chunk));
        r += 128 / kCpr;
        chunk += 128 % kCpr;
        if (chunk >= kCpr) {
          chunk -= kCpr;
          ++r;
        }
      }
      if (p.lse != nullptr && tq == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int i = rows.warp_row0 + g + 8 * r;
          if (i < it.s.sq) p.lse[it.s.lse_base + i] = lse_from_log2(m[r], l[r]);
        }
      }
      // The staging writes and reads precede the next copy into this buffer (async proxy).
      wgmma::fence_proxy_async();
      tma::arrive(q_empty(qb));
      ++qi;
    }
    if (wg == 0) take_turn();
  }
}

template <typename T, class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    dense_wgmma_window_kernel(const __grid_constant__ LaDenseParams p,
                              const __grid_constant__ tma_host::QkvMaps maps, int q_tiles,
                              long long n_items) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  window_attention<T, Tr>(smem_raw, p, maps, q_tiles, n_items);
#endif
}

// The tiles of one walk for these params (f16/bf16; head_dim a multiple of 8 up to 192,
// padded to the tile's 64, 128 or 192 channels): f(Tag<T>, Tag<Traits>), or false. `wide`:
// 128-key tiles (the persistent dense walk) where the head dim leaves room, else 64.
template <class F>
bool with_walk_config(const LaDenseParams &p, bool wide, F &&f) {
  auto by_dim = [&](auto t) {
    const int d = p.head_dim;
    if (d <= 0 || d % 8 != 0 || d > 192) return false;
    if (d <= 64) {
      if (wide) f(t, Tag<WgPersistent64>{});
      else f(t, Tag<WgWindow64>{});
    } else if (d <= 128) {
      if (wide) f(t, Tag<WgPersistent128>{});
      else f(t, Tag<WgWindow128>{});
    } else {
      f(t, Tag<WgWalk192>{});
    }
    return true;
  };
  return with_dtype<__half, __nv_bfloat16>(p.dtype, false, by_dim);
}

// Query tiles per head (of the longest sequence) and work items (tile, head, sequence).
// dense_params_ok bounds seqlen_q, heads_q and batch to int, so the product fits easily.
long long window_items(const LaDenseParams &p, int *q_tiles) {
  *q_tiles = (int)(((long long)p.seqlen_q + 127) / 128);
  return (long long)*q_tiles * p.heads_q * p.batch;
}

template <typename T, class Tr>
cudaError_t launch_window(const LaDenseParams &p, cudaStream_t stream) {
  tma_host::QkvMaps maps;
  // Maps over the caller's head_dim channels: a panel past them arrives zero-filled.
  if (!tma_host::encode_qkv(&maps, p, p.head_dim, Tr::kBlockM, Tr::kBlockN, 8))
    return cudaErrorNotSupported;
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  int q_tiles = 0;
  const long long items = window_items(p, &q_tiles);
  const long long blocks = items < sms ? items : sms;  // one block per SM (shared memory)
  return tma_host::launch<Tr>(dense_wgmma_window_kernel<T, Tr>, dim3((unsigned)blocks), stream, p,
                              maps, q_tiles, items);
}

const char *walk_unsupported_reason(const LaDenseParams &p, bool wide) {
  size_t smem = 0;
  const void *kernel = nullptr;
  const bool known = with_walk_config(p, wide, [&](auto t, auto tr) {
    using Tr = typename decltype(tr)::type;
    smem = Tr::kSmemBytes;
    kernel = reinterpret_cast<const void *>(
        dense_wgmma_window_kernel<typename decltype(t)::type, Tr>);
  });
  if (!known)
    return "the persistent Hopper kernels take f16 or bf16 with head_dim a multiple of 8 up to "
           "192 only";
  const char *why = device_unsupported_reason(kernel, smem, tma_host::is_sm90);
  return why != nullptr ? why : tma_host::tensors_unmappable_reason(p, 8);
}

cudaError_t walk_forward(const LaDenseParams &p, bool wide, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  with_walk_config(p, wide, [&](auto t, auto tr) {
    err = launch_window<typename decltype(t)::type, typename decltype(tr)::type>(p, stream);
  });
  return err;
}

}  // namespace

const char *dense_wgmma_window_unsupported_reason(const LaDenseParams &p) {
  return walk_unsupported_reason(p, false);
}

cudaError_t dense_wgmma_window_forward(const LaDenseParams &p, cudaStream_t stream) {
  return walk_forward(p, false, stream);
}

const char *dense_wgmma_persistent_unsupported_reason(const LaDenseParams &p) {
  return walk_unsupported_reason(p, true);
}

cudaError_t dense_wgmma_persistent_forward(const LaDenseParams &p, cudaStream_t stream) {
  return walk_forward(p, true, stream);
}

}  // namespace longattn
