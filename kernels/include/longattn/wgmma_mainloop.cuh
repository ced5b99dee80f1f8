// The Hopper mainloop (wgmma.mma_async, warp-specialised, sm_90a only) for every kernel whose
// key tiles can be loaded by a single producer thread into 128-byte-swizzled shared tiles:
// dense (dense_wgmma.cu), block-sparse (block_sparse_wgmma.cu). What differs between them is a
// Problem type (below): which query rows the block owns, which key tiles it visits (its key-tile
// schedule), how Q and a tile's K and V reach shared memory (the copies and their mbarrier
// accounting), the mask of a boundary tile, and where output rows go. The mainloop is the one
// of dense_wgmma.cu, verified on an H200 (2026-12-04): moving it here left the dense kernels'
// SASS identical (scripts/sass-diff.sh).
//
// A block of three warpgroups (384 threads) owns kBlockM = 128 query rows. Warpgroup 0 is the
// producer: it gives most of its registers away (setmaxnreg) and one of its threads issues
// every load (the Problem's load_q / load_k / load_v: bulk tensor copies that complete on an
// mbarrier). Warpgroups 1 and 2 are the consumers: consumer c owns rows 64c..64c+63 and keeps
// its S tile, P and O accumulator in registers (warp w of the group: rows 16w + lane/4 and +8,
// as in the mma.sync mainloop), so no reduction crosses warps and no block-wide barrier runs
// inside the key loop.
//
// Shared memory holds Q, and kStages-deep rings of K and V tiles, each in the 128-byte swizzle
// layout that both the copy engine (CU_TENSOR_MAP_SWIZZLE_128B) and the wgmma descriptors use:
// the head dim is split into panels of 64 elements (128 bytes), each panel a (rows, 128 B)
// array whose 16-byte chunk c of row r sits at chunk c ^ (r % 8). Every ring stage has a
// "full" barrier (the producer's expect_tx arrival + the copy's bytes) and an "empty" barrier
// (one arrival per consumer thread once its wgmmas have read the stage).
//
// Per key tile t a consumer issues S_t = Q K_t^T and O += P_{t-1} V_{t-1} back to back, waits
// for S_t only, computes the scale/softcap, mask (where the Problem says so) and online softmax
// (exp2) while the PV wgmma runs, then waits for it and rescales O (FlashAttention-3's
// intra-warpgroup overlap). The two consumers also take turns issuing their wgmmas (two named
// barriers, "ping-pong"), so one consumer's softmax runs while the other's matrix products
// occupy the tensor cores.
//
// Problem (all __device__ __forceinline__):
//   Problem(args...);                               // from the kernel's parameters
//   bool active() const;                            // false: the block has no rows
//   int schedule();                                 // plans the key tiles, returns their count
//   // producer side, one thread, only when schedule() > 0:
//   void producer_begin();                          // per-block coordinates, map prefetches
//   void load_q(uint32_t dst, uint32_t full);       // expect_tx(full, kQBytes) + the Q copies
//   KvCoords kv_coords(int t) const;                // where tile t's keys are (any type)
//   void load_k(KvCoords c, uint32_t dst, uint32_t full);  // expect_tx(full, kKvBytes) + K
//   void load_v(KvCoords c, uint32_t dst, uint32_t full);  // ... and V
//   // consumer side, every consumer thread:
//   Out output() const;                             // where this block's rows go (any type)
//   Rows prepare_rows(int wg, int warp, int g) const;  // this thread's rows: 64 wg + 16 warp
//                                                   // + g and + 8 of the tile (any type)
//   TileInfo tile_info(int t) const;                // what mask_tile needs of tile t (any type)
//   void mask_tile(float (&s)[kSRegs], const Rows &, TileInfo, int tq) const;  // -inf where
//                                                   // masked (m16n8 layout: column 8 j + 2 tq
//                                                   // + (e & 1) of register 4 j + e)
//   void store_o(Out, int row, int chunk, F staged);  // tile row (< kBlockM), 8 elements:
//                                                   // uint4 staged() reads them
//   bool has_lse() const;
//   void store_lse(const Rows &, int g, int r, F lse);  // row g + 8 r of the warp: lse()
//   float scale() const; float softcap() const;     // softmax scale, softcap (0 = off)
// Each call sits where the verified dense kernel computed the same values (kv_coords before
// the ring waits, tile_info before the scaling, the staged values and the LSE read only
// inside the problem's row check): nvcc's schedule follows source order, and the dense
// kernels' SASS stays identical only so.
#pragma once

#include "longattn/common.cuh"
#include "longattn/mma.cuh"
#include "longattn/softmax.cuh"
#include "longattn/swizzle.cuh"
#include "longattn/tma.cuh"
#include "longattn/wgmma.cuh"

namespace longattn {

template <int kHeadDim_, int kBlockN_, int kStages_>
struct WgTraits {
  static constexpr int kConsumers = 2;  // consumer warpgroups
  static constexpr int kConsumerThreads = 128 * kConsumers;
  static constexpr int kThreads = 128 + kConsumerThreads;  // + the producer warpgroup
  static constexpr int kBlockM = 64 * kConsumers;  // one m64 wgmma row block per consumer
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;  // depth of the K ring and of the V ring
  // setmaxnreg budgets: 128 x 24 + 256 x 240 <= 64K registers.
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  // Named barriers: 0 is __syncthreads; the turn of consumer c is 1 + c; consumer c's O
  // staging is 3 + c.
  static constexpr uint32_t kTurnBarrier = 1;
  static constexpr uint32_t kStagingBarrier = 3;

  static constexpr int kPanels = kHeadDim / 64;
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks of one row
  static constexpr int kSRegs = kBlockN / 2;          // S: (64, kBlockN) f32 per consumer
  static constexpr int kORegs = kHeadDim / 2;         // O: (64, kHeadDim) f32 per consumer
  static constexpr int kQkSteps = kHeadDim / 16;      // k16 steps of Q K^T
  static constexpr int kPvSteps = kBlockN / 16;       // k16 steps of P V

  // Shared memory (bytes): Q (kBlockM, kHeadDim), the K ring and the V ring (kStages,
  // kBlockN, kHeadDim) each, the mbarriers (Q full; K full, V full, K empty, V empty per
  // stage), plus slack to align the base to 1024 bytes (the swizzle atom). Each consumer's
  // Q rows double as the staging area of its O rows.
  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * 2;
  static constexpr uint32_t kKvBytes = kBlockN * kHeadDim * 2;
  static constexpr uint32_t kBarrierOffset = kQBytes + 2 * kStages * kKvBytes;
  static constexpr uint32_t kBarrierBytes = 8 * (1 + 4 * kStages);
  static constexpr size_t kSmemBytes = (size_t)kBarrierOffset + kBarrierBytes + 1024;

  static_assert(kPanels * 64 == kHeadDim, "the head dim is split into 64-element swizzle panels");
  // The key tile is the n of S = Q K^T (a multiple of 8 up to 256) and whole k16 steps of
  // P V; 16-row multiples also keep every K/V panel (kBlockN x 128 bytes) and ring stage a
  // whole number of 1024-byte swizzle atoms, so each stays atom-aligned (176: 22 atoms).
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "the key tile is the n of S = Q K^T");
  static_assert(kBlockM <= 256 && kBlockN <= 256, "a TMA box has at most 256 rows");
  static_assert((64 * kChunksPerRow) % 128 == 0, "O write-back is whole passes per consumer");
  static_assert(kSRegs % 8 == 0 && kORegs % 4 == 0, "whole n8 accumulator blocks");
  static_assert(kQkSteps % 4 == 0 && kPvSteps * 8 == kSRegs, "k16 steps cover whole panels");
  static_assert(kSmemBytes <= 232448, "fits the 227 KB a Hopper block may opt in to");
  static_assert(128 * kProducerRegs + kConsumerThreads * kConsumerRegs <= 65536,
                "the register budgets fit the register file");
  static_assert(kStagingBarrier >= kTurnBarrier + kConsumers && kStagingBarrier + kConsumers <= 16,
                "distinct named barrier ids, at most 16");
};

// One K or V tile of a dense-layout operand (tensor map over (channel, row, head, batch),
// tma_host.cuh): kBlockN rows from `row` of kv head `kvh`, one bulk copy per 64-channel panel,
// completing on the ring barrier `full` (expect_tx of the whole tile first). The load_k /
// load_v of every Problem whose key tiles are contiguous rows (dense, GQA-packed dense,
// block-sparse).
template <class Tr>
__device__ __forceinline__ void load_kv_rows(const CUtensorMap *map, int row, int kvh,
                                             int batch_coord, uint32_t dst, uint32_t full) {
  tma::arrive_expect_tx(full, Tr::kKvBytes);
#pragma unroll
  for (int pn = 0; pn < Tr::kPanels; ++pn)
    tma::load_4d(dst + pn * (Tr::kBlockN * 128), map, full, 64 * pn, row, kvh, batch_coord);
}

// The dense tile shapes (verified on an H200), used by every problem whose key tiles are
// contiguous rows of a sequence: dense and block-sparse.
using WgDense64 = WgTraits<64, 128, 4>;    // 145 KB shared
using WgDense128 = WgTraits<128, 128, 3>;  // 225 KB shared
using WgDense256 = WgTraits<256, 64, 2>;   // 193 KB shared
// FlashAttention-3's d128 tile for problems without a causal/local mask: 176-key tiles cut
// the per-tile fixed costs per key by 27%; two stages of 88 KB (three do not fit).
using WgDenseWide = WgTraits<128, 176, 2>;  // 209 KB shared

// Runs the mainloop of one block (see the file comment) for the Problem constructed from
// `args` (the kernel's parameters); returns at once, before any barrier, when the problem is
// not active() (a block-uniform "no work"). `smem_raw` is the dynamic shared memory
// (Tr::kSmemBytes). sm_90a code only: call it from a body guarded by __CUDA_ARCH_FEAT_SM90_ALL.
template <typename T, class Tr, class Problem, class... Args>
__device__ __forceinline__ void wgmma_attention(unsigned char *smem_raw, const Args &...args) {
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN;
  constexpr int kStages = Tr::kStages;
  using SMma = wgmma::Mma<T, BN>;  // S = Q K^T: n = key tile
  using OMma = wgmma::Mma<T, D>;   // O += P V: n = head dim
  const uint32_t raw_addr = mma::smem_addr(smem_raw);
  const uint32_t pad = ((raw_addr + 1023u) & ~1023u) - raw_addr;
  unsigned char *smem = smem_raw + pad;
  const uint32_t q_base = raw_addr + pad;
  const uint32_t k_base = q_base + Tr::kQBytes;
  const uint32_t v_base = k_base + kStages * Tr::kKvBytes;
  // mbarriers (8 bytes each): Q full, then per stage K full, V full, K empty, V empty.
  const uint32_t bar_base = q_base + Tr::kBarrierOffset;
  const uint32_t q_full = bar_base;
  auto k_full = [&](int st) { return bar_base + 8u * (1 + st); };
  auto v_full = [&](int st) { return bar_base + 8u * (1 + kStages + st); };
  auto k_empty = [&](int st) { return bar_base + 8u * (1 + 2 * kStages + st); };
  auto v_empty = [&](int st) { return bar_base + 8u * (1 + 3 * kStages + st); };

  Problem pb(args...);
  if (!pb.active()) return;  // uniform over the block, before any barrier
  const int n_tiles = pb.schedule();

  const int tid = threadIdx.x;
  if (tid == 0) {
    tma::barrier_init(q_full, 1);
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
    // ---- producer warpgroup: one thread issues every copy --------------------------------
    tma::release_registers<Tr::kProducerRegs>();
    if (tid == 0 && n_tiles > 0) {
      pb.producer_begin();
      pb.load_q(q_base, q_full);
      for (int t = 0; t < n_tiles; ++t) {
        const int st = t % kStages;
        const uint32_t reuse_parity = ((t / kStages) - 1) & 1;  // previous use's release
        const auto coords = pb.kv_coords(t);
        if (t >= kStages) tma::wait(k_empty(st), reuse_parity);
        pb.load_k(coords, k_base + st * Tr::kKvBytes, k_full(st));
        if (t >= kStages) tma::wait(v_empty(st), reuse_parity);
        pb.load_v(coords, v_base + st * Tr::kKvBytes, v_full(st));
      }
    }
  } else {
    // ---- consumer warpgroups -----------------------------------------------------------
    tma::claim_registers<Tr::kConsumerRegs>();
    const int wg = tid / 128 - 1, warp = (tid / 32) % 4, lane = tid % 32;
    const int ctid = tid - 128 * (wg + 1);  // thread index within the consumer
    const int g = lane / 4, tq = lane % 4;
    const auto out = pb.output();
    const auto rows = pb.prepare_rows(wg, warp, g);

    const float scale_log2 = pb.scale() * kLog2e;
    const bool softcap = pb.softcap() > 0.0f;
    const float cap_pre = softcap ? (pb.scale() / pb.softcap()) : 0.0f;
    const float cap_post = pb.softcap() * kLog2e;

    // Descriptor start addresses (bytes). Q: this consumer's 64 rows of each panel; k16 step
    // kk is panel kk / 4, 32 bytes per step inside the 128-byte rows. K likewise per stage.
    // V: the 16 keys of step kk are two 8-row groups, 2048 bytes per step; panels are
    // kBlockN * 128 bytes apart (the MN-direction atom stride, LBO).
    const uint32_t q_wg = q_base + wg * 64 * 128;
    auto q_desc = [&](int kk) {
      return wgmma::make_desc(q_wg + (kk / 4) * (BM * 128) + (kk % 4) * 32, 16, 1024);
    };
    auto k_desc = [&](uint32_t ks, int kk) {
      return wgmma::make_desc(ks + (kk / 4) * (BN * 128) + (kk % 4) * 32, 16, 1024);
    };
    auto v_desc = [&](uint32_t vs, int kk) {
      return wgmma::make_desc(vs + kk * 2048, BN * 128, 1024);
    };

    float m[2] = {kNegInf, kNegInf};  // row max, log2 units
    float l[2] = {0.0f, 0.0f};        // this thread's partial row sum (quad-reduced at the end)
    float oacc[Tr::kORegs];
    float sacc[Tr::kSRegs];
    uint32_t pf[Tr::kPvSteps][4];  // P of the previous tile, A fragments per k16 step
#pragma unroll
    for (int i = 0; i < Tr::kORegs; ++i) oacc[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < Tr::kSRegs; ++i) sacc[i] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < Tr::kPvSteps; ++kk)
#pragma unroll
      for (int e = 0; e < 4; ++e) pf[kk][e] = 0u;

    auto parity = [&](int t) { return (uint32_t)((t / kStages) & 1); };
    // Turns: consumer wg issues its wgmmas between take_turn() and pass_turn(); the other
    // consumer's turn starts when this one passes.
    auto take_turn = [&]() { tma::named_sync(Tr::kTurnBarrier + wg, Tr::kConsumerThreads); };
    auto pass_turn = [&]() { tma::named_arrive(Tr::kTurnBarrier + (1 - wg), Tr::kConsumerThreads); };
    auto issue_s = [&](int t) {
      const uint32_t ks = k_base + (t % kStages) * Tr::kKvBytes;
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
    auto issue_pv = [&](int t) {  // O += P_t V_t
      const uint32_t vs = v_base + (t % kStages) * Tr::kKvBytes;
#pragma unroll
      for (int kk = 0; kk < Tr::kPvSteps; ++kk) OMma::rs_bt(oacc, pf[kk], v_desc(vs, kk));
      wgmma::commit();
    };
    // Scores of tile t (S_t waited) -> exponentials in sacc, running max/sum, rescale factors.
    auto softmax = [&](int t, float (&alpha)[2]) {
      const auto info = pb.tile_info(t);
      wgmma::scale_scores(sacc, softcap, cap_pre, cap_post, scale_log2);
      pb.mask_tile(sacc, rows, info, tq);
      // Online softmax per row; the 4 threads of a quad share a row. sacc is the m16n8
      // layout of n8 blocks (4 registers each), as softmax.cuh expects.
#pragma unroll
      for (int r = 0; r < 2; ++r)
        alpha[r] = softmax_update(m[r], l[r], r, reinterpret_cast<float(&)[Tr::kSRegs / 4][4]>(sacc));
    };

    if (n_tiles > 0) {
      // Consumer 0 takes the first turn.
      if (wg == 1) pass_turn();
      // Tile 0: S only (O is zero, nothing to rescale).
      float alpha[2];
      tma::wait(q_full, 0);
      tma::wait(k_full(0), 0);
      take_turn();
      wgmma::fence();
      issue_s(0);
      pass_turn();
      wgmma::wait<0>();
      wgmma::fence_operands(sacc);
      tma::arrive(k_empty(0));
      softmax(0, alpha);
      wgmma::pack_p<T>(pf, sacc);
      // Tiles 1..n-1: issue S_t, then O += P_{t-1} V_{t-1}; the exponentials of S_t overlap
      // the PV wgmma, which is waited before O is rescaled and P overwritten.
      for (int t = 1; t < n_tiles; ++t) {
        tma::wait(k_full(t % kStages), parity(t));
        tma::wait(v_full((t - 1) % kStages), parity(t - 1));
        take_turn();
        wgmma::fence();
        issue_s(t);
        issue_pv(t - 1);
        pass_turn();
        wgmma::wait<1>();
        wgmma::fence_operands(sacc);
        tma::arrive(k_empty(t % kStages));
        softmax(t, alpha);
        wgmma::wait<0>();
        wgmma::fence_operands(oacc);
        tma::arrive(v_empty((t - 1) % kStages));
        wgmma::scale_rows(oacc, alpha);
        wgmma::pack_p<T>(pf, sacc);
      }
      // The last PV. Consumer 1 passes no turn after it: consumer 0 takes no further one.
      tma::wait(v_full((n_tiles - 1) % kStages), parity(n_tiles - 1));
      take_turn();
      wgmma::fence();
      issue_pv(n_tiles - 1);
      if (wg == 0) pass_turn();
      wgmma::wait<0>();
      wgmma::fence_operands(oacc);
    }

    // Epilogue. This consumer's wgmmas are done (and the Q copy, if any, was waited), so its
    // own Q rows can hold its O rows.
    float inv[2];
    softmax_finalize(l, inv);
    // Stage O in Q's shared memory (same panel layout, conflict-free), then write 16-byte
    // vectors to global memory.
#pragma unroll
    for (int i = 0; i < Tr::kORegs / 4; ++i)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = 64 * wg + 16 * warp + g + 8 * r;
        *reinterpret_cast<uint32_t *>(smem + panel_offset<BM>(row, i) + 4 * tq) =
            pack2<T>(oacc[4 * i + 2 * r] * inv[r], oacc[4 * i + 2 * r + 1] * inv[r]);
      }
    tma::named_sync(Tr::kStagingBarrier + wg, 128);
    constexpr int kCpr = Tr::kChunksPerRow;
#pragma unroll
    for (int pass = 0; pass < 64 * kCpr / 128; ++pass) {
      const int idx = ctid + 128 * pass, r = 64 * wg + idx / kCpr, chunk = idx % kCpr;
      pb.store_o(out, r, chunk, [&] {
        return *reinterpret_cast<const uint4 *>(smem + panel_offset<BM>(r, chunk));
      });
    }
    if (pb.has_lse() && tq == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r)
        pb.store_lse(rows, g, r, [&] { return lse_from_log2(m[r], l[r]); });
    }
  }
}

}  // namespace longattn
