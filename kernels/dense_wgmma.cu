// Hopper dense attention forward (wgmma.mma_async, f32 accumulation, sm_90a only).
//
// A block of two warpgroups (256 threads) owns kBlockM = 128 query rows of one (batch, head);
// warpgroup wg owns rows 64wg..64wg+63 and keeps its S tile, P and O accumulator in registers
// (warp w of the group: rows 16w + lane/4 and +8, as in the mma.sync kernel), so no reduction
// crosses warps. Q, K and V live in shared memory in the 128-byte swizzle layout that wgmma
// descriptors read: the head dim is split into panels of 64 elements (128 bytes), each panel
// a (rows, 128 B) array whose 16-byte chunk c of row r sits at chunk c ^ (r % 8).
//
// Per key tile t: S = Q K^T (wgmma, A = Q and B = K both K-major from shared memory), scale
// (or softcap) into log2 units, mask only when the tile is not fully visible to the warp's
// rows, online softmax with exp2, then O += P V (P converted to f16/bf16 in registers as the
// A operand, V read MN-major through the descriptor's transpose bit). The two GEMMs overlap
// the softmax (FlashAttention-3's intra-warpgroup pipelining): iteration t issues S_t and
// then O += P_{t-1} V_{t-1}, waits for S_t only, computes the exponentials while the PV
// wgmma runs, then waits for it and rescales O.
//
// Loads: cp.async by all threads into kStages-deep K and V rings. Load group c holds K_c and
// V_{c-1} (group 0 also Q) and is issued kLookahead iterations before iteration c needs it.
// Only the tiles that Mask::key_tiles leaves visible are visited (sink tiles, then the
// window). Semantics are exactly those of the SIMT kernel in dense.cu (see semantics.md).

#include "longattn/common.cuh"
#include "longattn/dispatch.cuh"
#include "longattn/mma.cuh"
#include "longattn/wgmma.cuh"

namespace longattn {
namespace {

template <int kHeadDim_, int kBlockN_, int kLookahead_>
struct WgTraits {
  static constexpr int kWarpgroups = 2;
  static constexpr int kThreads = 128 * kWarpgroups;
  static constexpr int kBlockM = 64 * kWarpgroups;  // one m64 wgmma row block per warpgroup
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;
  // Iterations between issuing a load group and using it; the rings need one more stage.
  static constexpr int kLookahead = kLookahead_;
  static constexpr int kStages = kLookahead + 1;

  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks of one row
  static constexpr int kSRegs = kBlockN / 2;          // S: (64, kBlockN) f32 per warpgroup
  static constexpr int kORegs = kHeadDim / 2;         // O: (64, kHeadDim) f32 per warpgroup
  static constexpr int kQkSteps = kHeadDim / 16;      // k16 steps of Q K^T
  static constexpr int kPvSteps = kBlockN / 16;       // k16 steps of P V

  // Shared memory (bytes): Q (kBlockM, kHeadDim), then the K ring and the V ring
  // (kStages, kBlockN, kHeadDim) each, plus slack to align the base to 1024 bytes (the
  // swizzle atom). Q's rows double as the staging area of O.
  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * 2;
  static constexpr uint32_t kKvBytes = kBlockN * kHeadDim * 2;
  static constexpr size_t kSmemBytes = kQBytes + 2 * (size_t)kStages * kKvBytes + 1024;

  static_assert(kHeadDim % 64 == 0, "the head dim is split into 64-element swizzle panels");
  static_assert(kBlockN % 64 == 0 && kBlockN <= 256, "the key tile is the n of S = Q K^T");
  static_assert(kThreads % kChunksPerRow == 0, "a copy pass covers whole rows");
  static_assert((kThreads / kChunksPerRow) % 8 == 0, "a copy pass keeps the row's swizzle phase");
  static_assert(kBlockN % (kThreads / kChunksPerRow) == 0, "K/V tiles are whole copy passes");
  static_assert(kBlockM % (kThreads / kChunksPerRow) == 0, "Q tiles are whole copy passes");
  static_assert((kBlockM * kChunksPerRow) % kThreads == 0, "O write-back is whole passes");
  static_assert(kSRegs % 8 == 0 && kORegs % 4 == 0, "whole n8 accumulator blocks");
  static_assert(kQkSteps % 4 == 0 && kPvSteps * 8 == kSRegs, "k16 steps cover whole panels");
};

using Wg64 = WgTraits<64, 128, 2>;   // 113 KB shared
using Wg128 = WgTraits<128, 128, 2>;  // 225 KB shared
using Wg256 = WgTraits<256, 64, 1>;   // 193 KB shared

// Byte offset of 16-byte chunk `chunk` of `row` in a (kRows, kHeadDim) tile in the panel
// layout (see the file comment).
template <int kRows>
__device__ __forceinline__ uint32_t panel_offset(int row, int chunk) {
  return (uint32_t)((chunk >> 3) * (kRows * 128) + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
}

// Copies rows [row0, row0 + kRows) of a (rows, kHeadDim) global tile with element row stride
// `stride` into the panel layout at shared byte address `dst` via cp.async; rows >=
// valid_rows are zero-filled (no read).
template <class Tr, int kRows, typename T>
__device__ __forceinline__ void load_tile(uint32_t dst, const T *src, long long stride, int row0,
                                          int valid_rows, int tid) {
  constexpr int kCpr = Tr::kChunksPerRow;
  constexpr int kRowsPerPass = Tr::kThreads / kCpr;
  const int chunk = tid % kCpr, r0 = tid / kCpr;
  const long long step = kRowsPerPass * stride;
  const T *g = src + (long long)(row0 + r0) * stride + chunk * 8;
  // kRowsPerPass is a multiple of 8: every pass has the same swizzle phase.
  const uint32_t base = dst + panel_offset<kRows>(r0, chunk);
#pragma unroll
  for (int pass = 0; pass < kRows / kRowsPerPass; ++pass) {
    const int r = r0 + pass * kRowsPerPass;
    const bool ok = row0 + r < valid_rows;
    mma::cp_async_16(base + pass * kRowsPerPass * 128, ok ? g : src, ok);
    g += step;
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y) {
  const typename Elem<T>::Pair v = Elem<T>::from_float2(make_float2(x, y));
  return *reinterpret_cast<const uint32_t *>(&v);
}

template <typename T, class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    dense_wgmma_kernel(const __grid_constant__ LaDenseParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN;
  constexpr int kStages = Tr::kStages, kLookahead = Tr::kLookahead;
  using SMma = wgmma::Mma<T, BN>;  // S = Q K^T: n = key tile
  using OMma = wgmma::Mma<T, D>;   // O += P V: n = head dim
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t raw_addr = mma::smem_addr(smem_raw);
  const uint32_t pad = ((raw_addr + 1023u) & ~1023u) - raw_addr;
  unsigned char *smem = smem_raw + pad;
  const uint32_t q_base = raw_addr + pad;
  const uint32_t k_base = q_base + Tr::kQBytes;
  const uint32_t v_base = k_base + kStages * Tr::kKvBytes;

  const int b = blockIdx.z, h = blockIdx.y;
  const SeqInfo s = seq_info(p, b, h);
  // Reverse order: with a causal mask the last query tiles have the most keys.
  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
  if (m0 >= s.sq) return;
  const HeadTensors<T> head = head_tensors<T>(p, s, b, h);
  const T *k = head.k, *v = head.v;
  T *o = head.o;

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid / 32) % 4, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;

  const Mask mask{p.window_left, p.window_right, p.sinks};
  int sink_tiles, first, last;
  mask.key_tiles(m0, min(m0 + BM, s.sq), s.sq, s.sk, BN, sink_tiles, first, last);
  const int n_tiles = sink_tiles + (last - first);
  auto tile_n0 = [&](int t) { return (t < sink_tiles ? t : first + (t - sink_tiles)) * BN; };
  // Load group c: K_c and V_{c-1}, each only if that tile exists.
  auto issue_group = [&](int c) {
    if (c < n_tiles)
      load_tile<Tr, BN>(k_base + (c % kStages) * Tr::kKvBytes, k, p.k_row_stride, tile_n0(c),
                        s.sk, tid);
    if (c >= 1 && c <= n_tiles)
      load_tile<Tr, BN>(v_base + ((c - 1) % kStages) * Tr::kKvBytes, v, p.v_row_stride,
                        tile_n0(c - 1), s.sk, tid);
  };

  // Group 0 also carries the Q tile (rows past the sequence are zero).
  load_tile<Tr, BM>(q_base, head.q, p.q_row_stride, m0, s.sq, tid);
#pragma unroll
  for (int c = 0; c < kLookahead; ++c) {
    issue_group(c);
    mma::cp_async_commit();
  }

  // This thread's two rows (16w + g and +8 of its warpgroup's 64) and their visible key range:
  // key j is visible iff j <= hi && (j >= lo || j < sinks), which is Mask::visible for j >= 0.
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

  // Descriptor start addresses (bytes). Q: this warpgroup's 64 rows of each panel; k16 step kk
  // is panel kk / 4, 32 bytes per step inside the 128-byte rows. K likewise per stage. V: the
  // 16 keys of step kk are two 8-row groups, 2048 bytes per step; panels are kBlockN * 128
  // bytes apart (the MN-direction atom stride, LBO).
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

  // Start of iteration t: group t (K_t, V_{t-1}) has landed for every thread (and is visible
  // to the async proxy), and every warpgroup is done with iteration t - 1 (its wgmmas were
  // waited), so the stages that group t + kLookahead overwrites (K_{t+L-kStages},
  // V_{t+L-1-kStages}) are free.
  auto begin_iteration = [&](int t) {
    mma::cp_async_wait<kLookahead - 1>();
    wgmma::fence_proxy_async();
    __syncthreads();
    issue_group(t + kLookahead);
    mma::cp_async_commit();
  };
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
    // boundary tiles, including the ragged last tile whose zero-filled keys are past sk,
    // mask per element.
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
    // Online softmax per row; the 4 threads of a quad share a row.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m[r];
#pragma unroll
      for (int i = 0; i < Tr::kSRegs / 4; ++i)
        mx = fmaxf(mx, fmaxf(sacc[4 * i + 2 * r], sacc[4 * i + 2 * r + 1]));
      mx = fmaxf(mx, mma::shfl_xor<1>(mx));
      mx = fmaxf(mx, mma::shfl_xor<2>(mx));
      alpha[r] = rescale_factor(m[r], mx);
      // Nothing visible yet (mx = -inf): subtract 0 so that masked scores give 0, not NaN.
      const float base = mx == kNegInf ? 0.0f : mx;
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < Tr::kSRegs / 4; ++i) {
        sacc[4 * i + 2 * r] = mma::fast_exp2(sacc[4 * i + 2 * r] - base);
        sacc[4 * i + 2 * r + 1] = mma::fast_exp2(sacc[4 * i + 2 * r + 1] - base);
        sum += sacc[4 * i + 2 * r] + sacc[4 * i + 2 * r + 1];
      }
      l[r] = l[r] * alpha[r] + sum;
      m[r] = mx;
    }
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
    // Tile 0: S only (O is zero, nothing to rescale).
    float alpha[2];
    begin_iteration(0);
    wgmma::fence();
    issue_s(0);
    wgmma::wait<0>();
    wgmma::fence_operands(sacc);
    softmax(0, alpha);
    pack_p();
    // Tiles 1..n-1: issue S_t, then O += P_{t-1} V_{t-1}; the exponentials of S_t overlap the
    // PV wgmma, which is waited before O is rescaled and P overwritten.
    for (int t = 1; t < n_tiles; ++t) {
      begin_iteration(t);
      wgmma::fence();
      issue_s(t);
      issue_pv(t - 1);
      wgmma::wait<1>();
      wgmma::fence_operands(sacc);
      softmax(t, alpha);
      wgmma::wait<0>();
      wgmma::fence_operands(oacc);
#pragma unroll
      for (int i = 0; i < Tr::kORegs / 4; ++i) {
        oacc[4 * i + 0] *= alpha[0];
        oacc[4 * i + 1] *= alpha[0];
        oacc[4 * i + 2] *= alpha[1];
        oacc[4 * i + 3] *= alpha[1];
      }
      pack_p();
    }
    // The last PV (its V is in group n_tiles).
    begin_iteration(n_tiles);
    wgmma::fence();
    issue_pv(n_tiles - 1);
    wgmma::wait<0>();
    wgmma::fence_operands(oacc);
  }

  // Epilogue. Drain the ring (only empty groups can be pending, plus Q when no tile ran); all
  // wgmmas were waited, so every warpgroup may reuse the Q rows for O.
  mma::cp_async_wait<0>();
  __syncthreads();

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += mma::shfl_xor<1>(l[r]);
    l[r] += mma::shfl_xor<2>(l[r]);
    inv[r] = l[r] > 0.0f ? __fdividef(1.0f, l[r]) : 0.0f;  // empty row: output 0
  }
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
  __syncthreads();
  constexpr int kCpr = Tr::kChunksPerRow;
#pragma unroll
  for (int pass = 0; pass < BM * kCpr / Tr::kThreads; ++pass) {
    const int idx = tid + Tr::kThreads * pass, r = idx / kCpr, chunk = idx % kCpr;
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
#endif
}

template <typename T, class Tr>
cudaError_t launch_wgmma(const LaDenseParams &p, cudaStream_t stream) {
  return launch_query_tiles(dense_wgmma_kernel<T, Tr>, Tr::kSmemBytes, Tr::kBlockM,
                            Tr::kThreads, p, stream);
}

template <class F>
bool with_config(const LaDenseParams &p, F &&f) {
  return with_head_dim_config<Wg64, Wg128, Wg256>(p, static_cast<F &&>(f));
}

}  // namespace

bool dense_wgmma_supports(const LaDenseParams &p) {
  const auto kernel_of = [](auto t, auto tr) {
    return reinterpret_cast<const void *>(
        dense_wgmma_kernel<typename decltype(t)::type, typename decltype(tr)::type>);
  };
  // sm_90a code runs on compute capability 9.0 only; other devices would load the
  // empty sm_80 body.
  return tensor_core_supports<Wg64, Wg128, Wg256>(
      p, kernel_of, [](int major, int minor) { return major == 9 && minor == 0; });
}

cudaError_t dense_wgmma_forward(const LaDenseParams &p, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  with_config(p, [&](auto t, auto tr) {
    err = launch_wgmma<typename decltype(t)::type, typename decltype(tr)::type>(p, stream);
  });
  return err;
}

}  // namespace longattn
