// The FlashAttention-2 mainloop on mma.sync (m16n8k16, f32 accumulation, sm_80+) for every
// tensor-core kernel that streams key tiles through a cp.async ring: neighborhood
// (neighborhood_mma.cu), padded dense (dense_mma_padded.cu), block-sparse
// (block_sparse_mma.cu) and paged prefill (paged_prefill.cu). What differs
// between them is a Problem type (below): which query rows the block owns, which key tiles
// it visits (its key-tile schedule, schedule.cuh), how a tile's rows are fetched, the mask of
// a boundary tile, and where output rows go. The dense mma.sync kernel is
// dense_mma_padded.cu (at head dims 64/128/256 it is the former dense_mma.cu's problem, 1-4%
// faster on an H200, 2026-12-04).
//
// A block of 4 warps owns kBlockM = 64 query rows; warp w owns rows 16w..16w+15 and keeps its
// S tile, P and O accumulator in registers, so no reduction crosses warps. K/V tiles of
// kBlockN keys stream through a kStages-deep cp.async ring in shared memory (rows past the
// end zero-filled by the copy itself). Per tile: S = Q K^T (ldmatrix from swizzled shared
// memory), scale (or softcap) into log2 units, mask only where the Problem says the tile is
// not interior, online softmax with exp2 (softmax.cuh), then O += P V (P re-packed from the S
// accumulators as A fragments, V read with ldmatrix.trans). The epilogue stages O in the
// warp's own Q rows and writes 16-byte vectors.
//
// Problem (all __device__ __forceinline__; `tid` is threadIdx.x):
//   void load_q(uint32_t q_smem, int tid);         // cp.async copies of the (kBlockM, D) Q tile
//   int schedule();                                // plans the key tiles, returns their count
//   int key0(int t) const;                         // first key of visited tile t (mask coords)
//   void load_kv(uint32_t k_smem, uint32_t v_smem, int t, int tid);  // tile t's K and V rows
//   void prepare_rows(int warp, int g);            // this thread's rows: 16 warp + g (+8)
//   void mask_tile(float (&s)[kSBlocks][4], int t, int n0, int tq);  // -inf where masked
//   void store_o(int row, int chunk, const uint4 *staged);  // tile row (< kBlockM): 8 elements
//   bool has_lse() const; void store_lse(int row, float lse);
// plus `scale` and `softcap` (0 = off) members. Optional: `static constexpr bool kOutScale =
// true` with `float out_scale() const` multiplies every output row by out_scale() in f32,
// before the rounding to T (the LSE is not scaled; the FP8 cache's v_scale, paged_prefill.cu). Shared memory addresses are 32-bit
// shared-window addresses (mma::smem_addr) of row-major swizzled tiles (swizzle.cuh).
#pragma once

#include <type_traits>

#include "longattn/common.cuh"
#include "longattn/dtype.cuh"
#include "longattn/mma.cuh"
#include "longattn/softmax.cuh"
#include "longattn/swizzle.cuh"

namespace longattn {

// Tile configuration of one head dim.
template <int kHeadDim_, int kBlockN_, int kStages_, bool kQInRegs_, int kMinBlocks_>
struct MmaTraits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = 16 * kWarps;  // one m16 MMA row block per warp
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  // Q fragments held in registers across key tiles (else re-read from shared memory per tile,
  // which keeps the hd256 O accumulator of 128 registers clear of spills).
  static constexpr bool kQInRegs = kQInRegs_;
  // Resident blocks per SM asked of ptxas (__launch_bounds__): caps registers at
  // 65536 / (kThreads * kMinBlocks), matching what shared memory allows anyway.
  static constexpr int kMinBlocks = kMinBlocks_;

  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks of one row
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;  // rows of one copy pass
  static constexpr int kSBlocks = kBlockN / 8;        // n8 blocks of S per warp: (16, kBlockN)
  static constexpr int kOBlocks = kHeadDim / 8;       // n8 blocks of O per warp: (16, kHeadDim)
  static constexpr int kQkSteps = kHeadDim / 16;      // k16 steps of Q K^T
  static constexpr int kPvSteps = kBlockN / 16;       // k16 steps of P V

  // Shared memory (elements): Q (kBlockM, kHeadDim), then K and V rings
  // (kStages, kBlockN, kHeadDim) each (MmaSmem). Q's rows double as the staging area of O.
  static constexpr int kQElems = kBlockM * kHeadDim;
  static constexpr int kKvElems = kBlockN * kHeadDim;
  static constexpr size_t kSmemBytes = 2 * ((size_t)kQElems + 2 * (size_t)kStages * kKvElems);

  static_assert(kHeadDim % 64 == 0, "the XOR swizzle permutes 8 chunks of 16 bytes per row");
  static_assert(kBlockN % 16 == 0, "ldmatrix.x4 loads two n8 blocks of K per k16 step");
  static_assert(kHeadDim % 16 == 0, "ldmatrix.x4.trans loads two n8 blocks of V per k16 step");
  static_assert(kThreads % kChunksPerRow == 0, "a copy pass covers whole rows");
  static_assert(kBlockN % kRowsPerPass == 0, "K/V tiles are whole copy passes");
  static_assert(kBlockM % kRowsPerPass == 0, "Q tiles are whole copy passes");
  static_assert((16 * kChunksPerRow) % 32 == 0, "O write-back is whole warp passes");
  static_assert(kStages >= 2 && kStages <= 4, "cp.async ring depth");
};

// The dense tile shapes (verified on an H200), used by every problem
// whose rows and keys are a sequence's positions: dense, padded dense, block-sparse, paged
// prefill. Shared memory 56 / 80 / 96 KB; Q fragments in registers except at d256.
using DenseTraits64 = MmaTraits<64, 64, 3, true, 3>;
using DenseTraits128 = MmaTraits<128, 64, 2, true, 2>;
using DenseTraits256 = MmaTraits<256, 32, 2, false, 1>;

// The dtype x padded-head-dim switch of the kernels that pad the head dim inside the kernel
// (head_dim 1..256 onto the DenseTraits* tiles, f16/bf16; dense_mma_padded.cu,
// dense_mma_gqa.cu): calls f(Tag<T>{}, Tag<Traits>{}), or returns false. Host code.
template <class F>
bool with_padded_config(int head_dim, LaDtype dtype, F &&f) {
  if (head_dim <= 0 || head_dim > 256) return false;
  return with_dtype<__half, __nv_bfloat16>(dtype, false, [&](auto t) {
    if (head_dim <= 64) f(t, Tag<DenseTraits64>{});
    else if (head_dim <= 128) f(t, Tag<DenseTraits128>{});
    else f(t, Tag<DenseTraits256>{});
    return true;
  });
}

// Shared memory of the mainloop, for 2-byte T.
template <typename T, class Tr>
struct MmaSmem {
  T q[Tr::kQElems];                   // (kBlockM, kHeadDim); O staging in the epilogue
  T k[Tr::kStages][Tr::kKvElems];     // K ring: (kBlockN, kHeadDim) per stage
  T v[Tr::kStages][Tr::kKvElems];     // V ring
  static_assert(sizeof(T) == 2, "16-bit operands");
};

// Whether Problem scales its output rows (Problem::kOutScale, see the file comment).
template <class P, class = void>
inline constexpr bool kHasOutScale = false;
template <class P>
inline constexpr bool kHasOutScale<P, std::enable_if_t<P::kOutScale>> = true;

// Copies rows [row0, row0 + kRows) of a (rows, kHeadDim) global tile with element row stride
// `stride` into the swizzled shared tile at `dst` via cp.async; rows >= valid_rows, and the
// 16-byte chunks >= valid_chunks of every row (a head dim padded up to kHeadDim), are
// zero-filled (no read).
template <class Tr, int kRows, typename T>
__device__ __forceinline__ void load_rows(uint32_t dst, const T *src, long long stride, int row0,
                                          int valid_rows, int tid,
                                          int valid_chunks = Tr::kChunksPerRow) {
  constexpr int kCpr = Tr::kChunksPerRow;
  constexpr int kRowsPerPass = Tr::kRowsPerPass;
  const int chunk = tid % kCpr, r0 = tid / kCpr;
  const bool chunk_ok = chunk < valid_chunks;
  // One running pointer (advanced by kRowsPerPass rows per pass) rather than one 64-bit
  // address per pass, which the compiler would otherwise keep live across the tile loop.
  const long long step = kRowsPerPass * stride;
  const T *g = src + (long long)(row0 + r0) * stride + chunk * 8;
#pragma unroll
  for (int pass = 0; pass < kRows / kRowsPerPass; ++pass) {
    const int r = r0 + pass * kRowsPerPass;
    const bool ok = chunk_ok && row0 + r < valid_rows;
    mma::cp_async_16(dst + swizzled_elem<Tr::kHeadDim>(r, chunk) * (int)sizeof(T), ok ? g : src,
                     ok);
    g += step;
  }
}

// Runs the mainloop of one block for `pb` (see the file comment); `smem_raw` is the dynamic
// shared memory (Tr::kSmemBytes).
template <typename T, class Tr, class Problem>
__device__ __forceinline__ void mma_attention(Problem &pb, unsigned char *smem_raw) {
  constexpr int D = Tr::kHeadDim, kStages = Tr::kStages;
  MmaSmem<T, Tr> &sm = *reinterpret_cast<MmaSmem<T, Tr> *>(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;  // MMA fragment row group / thread in group

  // Group 0: the Q tile.
  pb.load_q(mma::smem_addr(sm.q), tid);
  mma::cp_async_commit();

  // The key-tile schedule is planned after the Q copies are issued, which overlaps its
  // arithmetic with their latency.
  const int n_tiles = pb.schedule();
  auto load_kv = [&](int t) {
    const int stage = t % kStages;
    pb.load_kv(mma::smem_addr(sm.k[stage]), mma::smem_addr(sm.v[stage]), t, tid);
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
  const uint32_t q_base = mma::smem_addr(sm.q);
  const uint32_t k_base = mma::smem_addr(sm.k), v_base = mma::smem_addr(sm.v);
  auto q_addr = [&](int kk) { return q_base + q_off[kk % 4] + (kk / 4) * kChunk8Bytes; };

  uint32_t qf[Tr::kQInRegs ? Tr::kQkSteps : 1][4];
  if constexpr (Tr::kQInRegs) {
    mma::cp_async_wait<kStages - 1>();  // the Q group has landed
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < Tr::kQkSteps; ++kk) mma::ldmatrix_x4(qf[kk], q_addr(kk));
  }

  pb.prepare_rows(warp, g);

  const float scale_log2 = pb.scale * kLog2e;
  const bool softcap = pb.softcap > 0.0f;
  const float cap_pre = softcap ? (pb.scale / pb.softcap) : 0.0f;  // tanh arg per q.k
  const float cap_post = pb.softcap * kLog2e;  // cap, in log2 units

  float m[2] = {kNegInf, kNegInf};  // row max, log2 units (softmax.cuh)
  float l[2] = {0.0f, 0.0f};        // this thread's partial row sums
  float acc[Tr::kOBlocks][4];  // O: (16, kHeadDim) per warp
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

    const int stage = t % kStages, n0 = pb.key0(t);
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

    pb.mask_tile(sc, t, n0, tq);

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
  if constexpr (kHasOutScale<Problem>) {
    const float os = pb.out_scale();
    inv[0] *= os;
    inv[1] *= os;
  }
  // Stage the warp's (16, kHeadDim) O tile in its own Q rows (same swizzle), then write
  // 16-byte vectors to global memory.
#pragma unroll
  for (int i = 0; i < Tr::kOBlocks; ++i)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = 16 * warp + g + 8 * r;
      *reinterpret_cast<uint32_t *>(sm.q + swizzled_elem<D>(row, i) + 2 * tq) =
          pack2<T>(acc[i][2 * r] * inv[r], acc[i][2 * r + 1] * inv[r]);
    }
  mma::syncwarp();
  constexpr int kCpr = Tr::kChunksPerRow;
#pragma unroll
  for (int pass = 0; pass < 16 * kCpr / 32; ++pass) {
    const int idx = lane + 32 * pass, r = idx / kCpr, chunk = idx % kCpr;
    const int row = 16 * warp + r;
    pb.store_o(row, chunk, reinterpret_cast<const uint4 *>(sm.q + swizzled_elem<D>(row, chunk)));
  }
  if (pb.has_lse() && tq == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) pb.store_lse(16 * warp + g + 8 * r, lse_from_log2(m[r], l[r]));
  }
}

}  // namespace longattn
