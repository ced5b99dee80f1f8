// Hopper dense attention forward (wgmma.mma_async + TMA, warp-specialised, sm_90a only).
//
// A block of three warpgroups (384 threads) owns kBlockM = 128 query rows of one (batch,
// head). Warpgroup 0 is the producer: it gives most of its registers away (setmaxnreg) and
// one of its threads issues every load as a bulk tensor copy (TMA) that completes on an
// mbarrier. Warpgroups 1 and 2 are the consumers: consumer c owns rows 64c..64c+63 and keeps
// its S tile, P and O accumulator in registers (warp w of the group: rows 16w + lane/4 and
// +8, as in the mma.sync kernel), so no reduction crosses warps and no block-wide barrier
// runs inside the key loop.
//
// Shared memory holds Q, and kStages-deep rings of K and V tiles, each in the 128-byte swizzle
// layout that both the copy engine (CU_TENSOR_MAP_SWIZZLE_128B) and the wgmma descriptors use:
// the head dim is split into panels of 64 elements (128 bytes), each panel a (rows, 128 B)
// array whose 16-byte chunk c of row r sits at chunk c ^ (r % 8). Every ring stage has a
// "full" barrier (the producer's expect_tx arrival + the copy's bytes) and an "empty" barrier
// (one arrival per consumer thread once its wgmmas have read the stage).
//
// Per key tile t a consumer issues S_t = Q K_t^T and O += P_{t-1} V_{t-1} back to back, waits
// for S_t only, computes the scale/softcap, mask (boundary tiles only) and online softmax
// (exp2) while the PV wgmma runs, then waits for it and rescales O (FlashAttention-3's
// intra-warpgroup overlap). The two consumers also take turns issuing their wgmmas (two named
// barriers, "ping-pong"), so one consumer's softmax runs while the other's matrix products
// occupy the tensor cores. Only the tiles that Mask::key_tiles leaves visible are loaded (sink
// tiles, then the window). Semantics are exactly those of the SIMT kernel in dense.cu.

#include <cuda.h>

#include "longattn/common.cuh"
#include "longattn/dense_tensors.cuh"
#include "longattn/dispatch.cuh"
#include "longattn/mask.cuh"
#include "longattn/mma.cuh"
#include "longattn/schedule.cuh"
#include "longattn/softmax.cuh"
#include "longattn/swizzle.cuh"
#include "longattn/tma.cuh"
#include "longattn/wgmma.cuh"

namespace longattn {
namespace {

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
  static_assert(kBlockN % 64 == 0 && kBlockN <= 256, "the key tile is the n of S = Q K^T");
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

using Wg64 = WgTraits<64, 128, 4>;    // 145 KB shared
using Wg128 = WgTraits<128, 128, 3>;  // 225 KB shared
using Wg256 = WgTraits<256, 64, 2>;   // 193 KB shared

// The three tensor maps (Q, K, V as [batch, rows, heads, head_dim] with element strides,
// boxes of 64 channels x kBlockM or kBlockN rows), passed by value.
struct WgTensorMaps {
  CUtensorMap q, k, v;
};

template <typename T, class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    dense_wgmma_kernel(const __grid_constant__ LaDenseParams p,
                       const __grid_constant__ WgTensorMaps maps) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN;
  constexpr int kStages = Tr::kStages;
  using SMma = wgmma::Mma<T, BN>;  // S = Q K^T: n = key tile
  using OMma = wgmma::Mma<T, D>;   // O += P V: n = head dim
  extern __shared__ __align__(1024) unsigned char smem_raw[];
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

  const int b = blockIdx.z, h = blockIdx.y;
  const SeqInfo s = seq_info(p, b, h);
  // Reverse order: with a causal mask the last query tiles have the most keys.
  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
  if (m0 >= s.sq) return;  // uniform over the block, before any barrier

  const Mask mask{p.window_left, p.window_right, p.sinks};
  const WindowTiles tiles = WindowTiles::of(mask, m0, min(m0 + BM, s.sq), s.sq, s.sk, BN);
  const int n_tiles = tiles.count();
  auto tile_n0 = [&](int t) { return tiles.key0(t); };

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
      // Tensor coordinates: (channel, row, head, batch); packed (varlen) rows are absolute.
      const int batch_coord = p.cu_seqlens_q != nullptr ? 0 : b;
      const int kvh = h / (p.heads_q / p.heads_kv);
      const int q_row = (int)s.q_row0 + m0, k_row0 = (int)s.k_row0;
      tma::prefetch_map(&maps.k);
      tma::prefetch_map(&maps.v);
      tma::arrive_expect_tx(q_full, Tr::kQBytes);
#pragma unroll
      for (int pn = 0; pn < Tr::kPanels; ++pn)
        tma::load_4d(q_base + pn * (BM * 128), &maps.q, q_full, 64 * pn, q_row, h, batch_coord);
      for (int t = 0; t < n_tiles; ++t) {
        const int st = t % kStages;
        const uint32_t reuse_parity = ((t / kStages) - 1) & 1;  // previous use's release
        const int row = k_row0 + tile_n0(t);
        if (t >= kStages) tma::wait(k_empty(st), reuse_parity);
        tma::arrive_expect_tx(k_full(st), Tr::kKvBytes);
#pragma unroll
        for (int pn = 0; pn < Tr::kPanels; ++pn)
          tma::load_4d(k_base + st * Tr::kKvBytes + pn * (BN * 128), &maps.k, k_full(st), 64 * pn,
                       row, kvh, batch_coord);
        if (t >= kStages) tma::wait(v_empty(st), reuse_parity);
        tma::arrive_expect_tx(v_full(st), Tr::kKvBytes);
#pragma unroll
        for (int pn = 0; pn < Tr::kPanels; ++pn)
          tma::load_4d(v_base + st * Tr::kKvBytes + pn * (BN * 128), &maps.v, v_full(st), 64 * pn,
                       row, kvh, batch_coord);
      }
    }
  } else {
    // ---- consumer warpgroups -----------------------------------------------------------
    tma::claim_registers<Tr::kConsumerRegs>();
    const int wg = tid / 128 - 1, warp = (tid / 32) % 4, lane = tid % 32;
    const int ctid = tid - 128 * (wg + 1);  // thread index within the consumer
    const int g = lane / 4, tq = lane % 4;
    T *o = head_tensors<T>(p, s, b, h).o;

    // This thread's two rows (16w + g and +8 of its consumer's 64) and their visible key
    // range: key j is visible iff j <= hi && (j >= lo || j < sinks), which is Mask::visible
    // for j >= 0.
    const int warp_row0 = m0 + 64 * wg + 16 * warp;
    int hi[2], lo[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const long long diag = (long long)(warp_row0 + g + 8 * r) + s.sk - s.sq;
      long long hr = s.sk - 1;
      if (p.window_right >= 0) hr = min(hr, diag + p.window_right);
      long long lr = 0;
      if (p.window_left >= 0) lr = min(max(diag - p.window_left, 0LL), (long long)s.sk);
      hi[r] = (int)max(hr, -1LL);
      lo[r] = (int)lr;
    }
    // The same bounds for the warp's first and last valid rows decide whether a tile needs
    // per-element masking at all.
    const int warp_last = min(warp_row0 + 15, s.sq - 1);
    const long long diag_first = (long long)warp_row0 + s.sk - s.sq;
    const long long diag_last = (long long)warp_last + s.sk - s.sq;

    const float scale_log2 = p.scale * kLog2e;
    const bool softcap = p.softcap > 0.0f;
    const float cap_pre = softcap ? (p.scale / p.softcap) : 0.0f;
    const float cap_post = p.softcap * kLog2e;

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
      const int n0 = tile_n0(t);
      if (softcap) {
#pragma unroll
        for (int i = 0; i < Tr::kSRegs; ++i) sacc[i] = cap_post * tanhf(sacc[i] * cap_pre);
      } else {
#pragma unroll
        for (int i = 0; i < Tr::kSRegs; ++i) sacc[i] *= scale_log2;
      }
      // Interior tiles (every key visible to every valid row of the warp) skip the mask;
      // boundary tiles, including the ragged last tile whose keys past sk are zeros or the
      // next packed sequence's, mask per element.
      const int n_end = n0 + BN;
      const bool interior =
          n_end <= s.sk &&
          (p.window_right < 0 || (long long)n_end - 1 <= diag_first + p.window_right) &&
          (p.window_left < 0 || (long long)n0 >= diag_last - p.window_left || n_end <= p.sinks);
      if (!interior) {
#pragma unroll
        for (int i = 0; i < Tr::kSRegs / 4; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = n0 + 8 * i + 2 * tq + (e & 1), r = e >> 1;
            if (!(j <= hi[r] && (j >= lo[r] || j < p.sinks))) sacc[4 * i + e] = kNegInf;
          }
      }
      // Online softmax per row; the 4 threads of a quad share a row. sacc is the m16n8
      // layout of n8 blocks (4 registers each), as softmax.cuh expects.
#pragma unroll
      for (int r = 0; r < 2; ++r)
        alpha[r] = softmax_update(m[r], l[r], r, reinterpret_cast<float(&)[Tr::kSRegs / 4][4]>(sacc));
    };
    // The S accumulators of n8 blocks 2kk and 2kk+1 are the A fragment of k16 step kk.
    auto pack_p = [&]() {
#pragma unroll
      for (int kk = 0; kk < Tr::kPvSteps; ++kk) {
        pf[kk][0] = pack2<T>(sacc[8 * kk + 0], sacc[8 * kk + 1]);
        pf[kk][1] = pack2<T>(sacc[8 * kk + 2], sacc[8 * kk + 3]);
        pf[kk][2] = pack2<T>(sacc[8 * kk + 4], sacc[8 * kk + 5]);
        pf[kk][3] = pack2<T>(sacc[8 * kk + 6], sacc[8 * kk + 7]);
      }
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
      pack_p();
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
#pragma unroll
        for (int i = 0; i < Tr::kORegs / 4; ++i) {
          oacc[4 * i + 0] *= alpha[0];
          oacc[4 * i + 1] *= alpha[0];
          oacc[4 * i + 2] *= alpha[1];
          oacc[4 * i + 3] *= alpha[1];
        }
        pack_p();
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
      const int i = m0 + r;
      if (i < s.sq) {
        const uint4 val = *reinterpret_cast<const uint4 *>(smem + panel_offset<BM>(r, chunk));
        *reinterpret_cast<uint4 *>(o + i * p.o_row_stride + chunk * 8) = val;
      }
    }
    if (p.lse != nullptr && tq == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = warp_row0 + g + 8 * r;
        if (i < s.sq) p.lse[s.lse_base + i] = lse_from_log2(m[r], l[r]);
      }
    }
  }
#endif
}

// ---- host side: tensor maps -----------------------------------------------------------

using EncodeTiled = CUresult (*)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *,
                                 const cuuint64_t *, const cuuint64_t *, const cuuint32_t *,
                                 const cuuint32_t *, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's cuTensorMapEncodeTiled through the runtime (no libcuda link), looked up once;
// null if the driver lacks it.
EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void *ptr = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<EncodeTiled>(nullptr);
    }
    return reinterpret_cast<EncodeTiled>(ptr);
  }();
  return fn;
}

// One operand as a 4-D tensor (head_dim, rows, heads, batch) with byte strides, boxes of 64
// channels x box_rows rows. Returns false where the copy engine cannot address it (pointer
// not 16-byte aligned, a stride that is not a multiple of 16 bytes or is 0 over more than one
// index, an extent the map cannot hold).
struct OperandShape {
  const void *base;
  long long rows, heads, batch;
  long long row_stride, head_stride, batch_stride;  // elements
};

bool operand_mappable(const OperandShape &x, int head_dim) {
  auto stride_ok = [](long long stride, long long extent) {
    return extent <= 1 || (stride > 0 && (stride * 2) % 16 == 0 && stride * 2 < (1LL << 40));
  };
  return (reinterpret_cast<uintptr_t>(x.base) % 16) == 0 && head_dim % 64 == 0 &&
         x.rows < (1LL << 31) && x.heads < (1LL << 31) && x.batch < (1LL << 31) &&
         stride_ok(x.row_stride, x.rows) && stride_ok(x.head_stride, x.heads) &&
         stride_ok(x.batch_stride, x.batch);
}

bool encode_operand(CUtensorMap *map, const OperandShape &x, LaDtype dtype, int head_dim,
                    int box_rows) {
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr || !operand_mappable(x, head_dim)) return false;
  // Strides of extent-1 dimensions are never stepped; give them any valid value.
  auto stride_bytes = [](long long stride, long long extent) {
    return (cuuint64_t)(extent <= 1 ? 16 : stride * 2);
  };
  const cuuint64_t dims[4] = {(cuuint64_t)head_dim, (cuuint64_t)max(x.rows, 1LL),
                              (cuuint64_t)max(x.heads, 1LL), (cuuint64_t)max(x.batch, 1LL)};
  const cuuint64_t strides[3] = {stride_bytes(x.row_stride, x.rows),
                                 stride_bytes(x.head_stride, x.heads),
                                 stride_bytes(x.batch_stride, x.batch)};
  const cuuint32_t box[4] = {64, (cuuint32_t)box_rows, 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type =
      dtype == LA_BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode(map, type, 4, const_cast<void *>(x.base), dims, strides, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Q, K, V of `p` as tensors: fixed lengths are (batch, seqlen) with the batch stride; packed
// batches are one sequence of total rows (each block adds its sequence's first row).
OperandShape q_shape(const LaDenseParams &p) {
  const bool packed = p.cu_seqlens_q != nullptr;
  return {p.q, packed ? p.total_q : p.seqlen_q, p.heads_q, packed ? 1 : p.batch,
          p.q_row_stride, p.q_head_stride, p.q_batch_stride};
}
OperandShape kv_shape(const LaDenseParams &p, const void *base, long long row_stride,
                      long long head_stride, long long batch_stride) {
  const bool packed = p.cu_seqlens_k != nullptr;
  return {base, packed ? p.total_k : p.seqlen_k, p.heads_kv, packed ? 1 : p.batch, row_stride,
          head_stride, batch_stride};
}

bool tensors_mappable(const LaDenseParams &p) {
  return encode_tiled() != nullptr && operand_mappable(q_shape(p), p.head_dim) &&
         operand_mappable(kv_shape(p, p.k, p.k_row_stride, p.k_head_stride, p.k_batch_stride),
                          p.head_dim) &&
         operand_mappable(kv_shape(p, p.v, p.v_row_stride, p.v_head_stride, p.v_batch_stride),
                          p.head_dim);
}

template <typename T, class Tr>
cudaError_t launch_wgmma(const LaDenseParams &p, cudaStream_t stream) {
  WgTensorMaps maps;
  if (!encode_operand(&maps.q, q_shape(p), p.dtype, Tr::kHeadDim, Tr::kBlockM) ||
      !encode_operand(&maps.k,
                      kv_shape(p, p.k, p.k_row_stride, p.k_head_stride, p.k_batch_stride),
                      p.dtype, Tr::kHeadDim, Tr::kBlockN) ||
      !encode_operand(&maps.v,
                      kv_shape(p, p.v, p.v_row_stride, p.v_head_stride, p.v_batch_stride),
                      p.dtype, Tr::kHeadDim, Tr::kBlockN))
    return cudaErrorNotSupported;
  auto kernel = dense_wgmma_kernel<T, Tr>;
  const cudaError_t err = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Tr::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, p.heads_q, p.batch);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p, maps);
  return cudaGetLastError();
}

template <class F>
bool with_config(const LaDenseParams &p, F &&f) {
  return with_head_dim_config<Wg64, Wg128, Wg256>(p, static_cast<F &&>(f));
}

}  // namespace

const char *dense_wgmma_unsupported_reason(const LaDenseParams &p) {
  const auto kernel_of = [](auto t, auto tr) {
    return reinterpret_cast<const void *>(
        dense_wgmma_kernel<typename decltype(t)::type, typename decltype(tr)::type>);
  };
  // sm_90a code runs on compute capability 9.0 only; other devices would load the
  // empty sm_80 body. The copy engine must be able to address every operand.
  const char *why = tensor_core_unsupported_reason<Wg64, Wg128, Wg256>(
      p, kernel_of, [](int major, int minor) { return major == 9 && minor == 0; });
  if (why != nullptr) return why;
  if (!tensors_mappable(p))
    return "the TMA copy engine cannot address q/k/v with these strides (it needs positive "
           "multiples of 16 bytes for every dimension longer than 1)";
  return nullptr;
}

cudaError_t dense_wgmma_forward(const LaDenseParams &p, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  with_config(p, [&](auto t, auto tr) {
    err = launch_wgmma<typename decltype(t)::type, typename decltype(tr)::type>(p, stream);
  });
  return err;
}

}  // namespace longattn
