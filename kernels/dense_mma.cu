// Tensor-core dense attention forward (mma.sync m16n8k16, f32 accumulation, sm_80+).
//
// FlashAttention-2 structure: a block of 4 warps owns kBlockM = 64 query rows of one
// (batch, head); warp w owns rows 16w..16w+15 and keeps its S tile, P and O accumulator in
// registers, so no reduction crosses warps. Key/value tiles of kBlockN keys stream through a
// kStages-deep cp.async ring in shared memory (rows past the sequence are zero-filled by the
// copy itself). Per tile: S = Q K^T (ldmatrix from swizzled shared memory), scale (or softcap)
// into log2 units, mask only when the tile is not fully visible to the warp's rows, online
// softmax with exp2, then O += P V (P re-packed from the S accumulators as A fragments, V read
// with ldmatrix.trans). Only the tiles that Mask::key_tiles leaves visible are visited: sink
// tiles first, then the window tiles. Semantics are exactly those of the SIMT kernel in
// dense.cu (see docs/semantics.md). Traits, shared-memory layout (MmaSmem), row loader,
// swizzle, key-tile schedule (WindowTiles) and online softmax come from the shared headers;
// the loop itself stays written out here until it can move onto mma_attention
// (mma_mainloop.cuh explains why).

#include "longattn/common.cuh"
#include "longattn/dense_tensors.cuh"
#include "longattn/dispatch.cuh"
#include "longattn/mask.cuh"
#include "longattn/mma_mainloop.cuh"
#include "longattn/schedule.cuh"

namespace longattn {
namespace {

using Traits64 = DenseTraits64;
using Traits128 = DenseTraits128;
using Traits256 = DenseTraits256;

template <typename T, class Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks)
    dense_mma_kernel(const __grid_constant__ LaDenseParams p) {
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, kStages = Tr::kStages;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  MmaSmem<T, Tr> &sm = *reinterpret_cast<MmaSmem<T, Tr> *>(smem_raw);
  T *q_s = sm.q, *k_s = sm.k[0], *v_s = sm.v[0];

  const int b = blockIdx.z, h = blockIdx.y;
  const SeqInfo s = seq_info(p, b, h);
  // Reverse order: with a causal mask the last query tiles have the most keys; start them
  // first so that the short tail tiles fill in at the end.
  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
  if (m0 >= s.sq) return;
  const HeadTensors<T> head = head_tensors<T>(p, s, b, h);
  const T *q = head.q, *k = head.k, *v = head.v;
  T *o = head.o;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;  // MMA fragment row group / thread in group

  // Group 0: the Q tile (rows past the sequence are zero).
  load_rows<Tr, BM>(mma::smem_addr(q_s), q, p.q_row_stride, m0, s.sq, tid);
  mma::cp_async_commit();

  const Mask mask{p.window_left, p.window_right, p.sinks};
  const WindowTiles tiles = WindowTiles::of(mask, m0, min(m0 + BM, s.sq), s.sq, s.sk, BN);
  const int n_tiles = tiles.count();
  auto tile_n0 = [&](int t) { return tiles.key0(t); };
  auto load_kv = [&](int t) {
    const int stage = t % kStages, n0 = tile_n0(t);
    load_rows<Tr, BN>(mma::smem_addr(sm.k[stage]), k, p.k_row_stride, n0, s.sk, tid);
    load_rows<Tr, BN>(mma::smem_addr(sm.v[stage]), v, p.v_row_stride, n0, s.sk, tid);
  };

  // Groups 1..kStages-1: the first key tiles (empty groups keep the count uniform).
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < n_tiles) load_kv(t);
    mma::cp_async_commit();
  }

  // Per-lane parts of the ldmatrix addresses (bytes):
  //   Q (A, x4):       row 16*warp + lane%16,            chunk 2*kk + lane/16
  //   K (B, x4):       row 16*nb2 + lane%8 + 8*(lane/16), chunk 2*kk + (lane/8)%2
  //   V (B, x4.trans): row 16*kk + lane%16,              chunk 2*db2 + lane/16
  // In all three the row's low 3 bits are lane % 8, and the swizzle only touches the low 3
  // bits of the chunk, so chunk c = 8*(c/8) + (c%8) maps to 8*(c/8) + ((c%8) ^ lane%8):
  // four per-lane offsets (c%8 = 2j + bit, j < 4) plus compile-time immediates. (Computing
  // the XOR per address instead keeps one register per distinct chunk alive.)
  uint32_t q_off[4], k_off[4], v_off[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    q_off[j] = ldmatrix_offset_rows16<D, T>(lane, 16 * warp, j);
    k_off[j] = ldmatrix_offset_rows8x2<D, T>(lane, 0, 0, j);
    v_off[j] = ldmatrix_offset_rows16<D, T>(lane, 0, j);
  }
  constexpr uint32_t kChunk8Bytes = 64 * sizeof(T);  // 8 chunks of 8 elements
  const uint32_t q_base = mma::smem_addr(q_s);
  const uint32_t k_base = mma::smem_addr(k_s), v_base = mma::smem_addr(v_s);
  auto q_addr = [&](int kk) { return q_base + q_off[kk % 4] + (kk / 4) * kChunk8Bytes; };

  uint32_t qf[Tr::kQInRegs ? Tr::kQkSteps : 1][4];
  if constexpr (Tr::kQInRegs) {
    mma::cp_async_wait<kStages - 1>();  // the Q group has landed
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < Tr::kQkSteps; ++kk) mma::ldmatrix_x4(qf[kk], q_addr(kk));
  }

  // This thread's two rows (g and g + 8 of the warp's 16) and their visible key range:
  // key j is visible iff j <= hi && (j >= lo || j < sinks), which is Mask::visible for
  // 0 <= j (hi folds in j < sk; lo is clamped to [0, sk]).
  const int warp_row0 = m0 + 16 * warp;
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
  // per-element masking at all (hi grows with the row, lo too).
  const int warp_last = min(warp_row0 + 15, s.sq - 1);
  const long long diag_first = (long long)warp_row0 + s.sk - s.sq;
  const long long diag_last = (long long)warp_last + s.sk - s.sq;

  const float scale_log2 = p.scale * kLog2e;
  const bool softcap = p.softcap > 0.0f;
  const float cap_pre = softcap ? (p.scale / p.softcap) : 0.0f;  // tanh arg per q.k
  const float cap_post = p.softcap * kLog2e;  // cap, in log2 units

  float m[2] = {kNegInf, kNegInf};  // row max, log2 units
  float l[2] = {0.0f, 0.0f};        // this thread's partial row sum (quad-reduced at the end)
  float acc[Tr::kOBlocks][4];       // O: (16, kHeadDim) per warp
#pragma unroll
  for (int i = 0; i < Tr::kOBlocks; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.0f;

  for (int t = 0; t < n_tiles; ++t) {
    // Tile t (and Q) have landed for every thread, and every warp is done with tile t - 1,
    // whose stage the prefetch below overwrites.
    mma::cp_async_wait<kStages - 2>();
    __syncthreads();
    if (t + kStages - 1 < n_tiles) load_kv(t + kStages - 1);
    mma::cp_async_commit();

    const int stage = t % kStages, n0 = tile_n0(t);
    const uint32_t ks = k_base + (uint32_t)(stage * Tr::kKvElems * sizeof(T));
    const uint32_t vs = v_base + (uint32_t)(stage * Tr::kKvElems * sizeof(T));

    // S = Q K^T: (16, kBlockN) per warp.
    float sc[Tr::kSBlocks][4];
#pragma unroll
    for (int i = 0; i < Tr::kSBlocks; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[i][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < Tr::kQkSteps; ++kk) {
      uint32_t a[4];
      if constexpr (Tr::kQInRegs) {
#pragma unroll
        for (int e = 0; e < 4; ++e) a[e] = qf[kk][e];
      } else {
        mma::ldmatrix_x4(a, q_addr(kk));
      }
#pragma unroll
      for (int nb2 = 0; nb2 < Tr::kSBlocks / 2; ++nb2) {
        uint32_t bk[4];
        mma::ldmatrix_x4(bk, ks + k_off[kk % 4] + (kk / 4) * kChunk8Bytes +
                                 (uint32_t)(16 * nb2 * D * sizeof(T)));
        mma::Mma<T>::run(sc[2 * nb2], a, bk[0], bk[1]);
        mma::Mma<T>::run(sc[2 * nb2 + 1], a, bk[2], bk[3]);
      }
    }

    // Scores in log2 units: scale * log2(e) folded into one multiply, or the softcap.
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
      for (int i = 0; i < Tr::kSBlocks; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = n0 + 8 * i + 2 * tq + (e & 1), r = e >> 1;
          if (!(j <= hi[r] && (j >= lo[r] || j < p.sinks))) sc[i][e] = kNegInf;
        }
    }

    // Online softmax per row; the 4 threads of a quad share a row.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float alpha = softmax_update(m[r], l[r], r, sc);
      scale_row(acc, r, alpha);
    }

    // O += P V. The S accumulators of n8 blocks 2kk and 2kk+1 are exactly the A fragment of
    // k16 step kk (a0: row g, a1: row g+8, a2/a3: the same 8 columns further).
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

  // Epilogue. Drain the ring (only empty groups can be pending, plus Q when no tile ran) and
  // make every thread's Q copies complete before the warps reuse their Q rows for O.
  mma::cp_async_wait<0>();
  __syncthreads();

  float inv[2];
  softmax_finalize(l, inv);
  // Stage the warp's (16, kHeadDim) O tile in its own Q rows (same swizzle), then write
  // 16-byte vectors to global memory.
#pragma unroll
  for (int i = 0; i < Tr::kOBlocks; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = 16 * warp + g + 8 * r;
      *reinterpret_cast<uint32_t *>(q_s + swizzled_elem<D>(row, i) + 2 * tq) =
          pack2<T>(acc[i][2 * r] * inv[r], acc[i][2 * r + 1] * inv[r]);
    }
  mma::syncwarp();
  constexpr int kCpr = Tr::kChunksPerRow;
#pragma unroll
  for (int pass = 0; pass < 16 * kCpr / 32; ++pass) {
    const int idx = lane + 32 * pass, r = idx / kCpr, chunk = idx % kCpr;
    const int i = warp_row0 + r;
    if (i < s.sq) {
      const uint4 val = *reinterpret_cast<const uint4 *>(q_s + swizzled_elem<D>(16 * warp + r, chunk));
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

template <typename T, class Tr>
cudaError_t launch_mma(const LaDenseParams &p, cudaStream_t stream) {
  return launch_query_tiles(dense_mma_kernel<T, Tr>, Tr::kSmemBytes, Tr::kBlockM,
                            Tr::kThreads, p, stream);
}

template <class F>
bool with_config(const LaDenseParams &p, F &&f) {
  return with_head_dim_config<Traits64, Traits128, Traits256>(p, static_cast<F &&>(f));
}

}  // namespace

const char *dense_mma_unsupported_reason(const LaDenseParams &p) {
  const auto kernel_of = [](auto t, auto tr) {
    return reinterpret_cast<const void *>(
        dense_mma_kernel<typename decltype(t)::type, typename decltype(tr)::type>);
  };
  // Ampere or newer; device_runs also checks that the sm_80/sm_90a fatbinary has code for it.
  return tensor_core_unsupported_reason<Traits64, Traits128, Traits256>(
      p, kernel_of, [](int major, int) { return major >= 8; });
}

cudaError_t dense_mma_forward(const LaDenseParams &p, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  with_config(p, [&](auto t, auto tr) {
    err = launch_mma<typename decltype(t)::type, typename decltype(tr)::type>(p, stream);
  });
  return err;
}

}  // namespace longattn
