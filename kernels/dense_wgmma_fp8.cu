// FP8 (e4m3) dense attention forward on Hopper (wgmma.mma_async with e4m3 operands + TMA,
// warp-specialised, sm_90a only), any head_dim that is a multiple of 16 up to 256, padded inside
// the kernel to 64, 128 or 256 channels (the copy engine zero-fills channels past head_dim, as
// the 16-bit persistent kernels do; no copy of the caller's tensors). Semantics: docs/semantics.md, "FP8 dense
// forward" (FlashAttention-3's descales [batch, heads_kv], P quantised to e4m3 per 128-key
// tile against the running row max, l from the unquantised P, bf16/f16 output, natural-log
// LSE). **Not yet run on a GPU.**
//
// Why its own mainloop: wgmma_mainloop.cuh is written for 2-byte operands (its traits size
// every tile as elements x 2 bytes, its P fragments pack two 16-bit values per register, its
// PV product reads V MN-major with the transpose bit, and it stages O in Q's shared memory,
// which holds only half of O here). Making it take 8-bit operands would rewrite the code of
// the verified dense and block-sparse kernels; this file keeps their SASS and follows the
// same structure on the same pieces (wgmma.cuh descriptors and fences, tma.cuh copies and
// barriers, softmax.cuh, mask.cuh / schedule.cuh's WindowTiles, dense_tensors.cuh).
//
// Two kernels per call, in stream order:
// 1. vt_prepass_kernel writes V^T into the caller's scratch (LaDenseFp8Params.vt): FP8 wgmma
//    reads both shared-memory operands K-major only (no transpose bit for 8-bit types), and in
//    O += P V the reduction runs over keys, so V (stored [keys, d]) must become [d, keys].
//    The pre-pass also permutes the keys inside every group of 32 (the k extent of one FP8
//    wgmma), so that the f32 accumulator registers of S, converted in place to e4m3, are the
//    A-operand register fragment of the PV wgmma with no shuffle:
//      S accumulator (m64nNk*, f32): thread (warp w, g = lane / 4, t = lane % 4) holds, in the
//        n8 block i, columns 8 i + 2 t and 8 i + 2 t + 1 of rows 16 w + g (+ 8);
//      A fragment (m64nNk32, 8-bit, per the PTX ISA): register 0 holds k columns 4 t .. 4 t + 3
//        of row g, register 1 the same of row g + 8, registers 2 and 3 columns 16 + 4 t .. of
//        rows g and g + 8 (byte x = column 4 t + x; the mma.sync m16n8k32 layout).
//    So A column 4 t + x (x < 4) of a 32-key group is given key 2 t + (x & 1) + 8 (x >> 1), and
//    A column 16 + 4 t + x key 16 + 2 t + (x & 1) + 8 (x >> 1) (kv_slot_key below): the keys
//    this thread holds in S. As P V sums over keys, permuting P's columns and V^T's columns
//    alike changes nothing; the pre-pass places key kv_slot_key(s) at V^T column s.
// 2. dense_fp8_kernel: block (x, h, b) owns query rows [m0, m0 + 128) of head h of sequence b
//    (m0 in reverse order), one producer warpgroup (one thread issues every bulk tensor copy:
//    Q once, then per key tile K [128 keys, 128 channels] and V^T [128 channels, 128 keys],
//    kStages-deep rings with full/empty mbarriers; a Q or K tile of 256 channels is two copies of
//    128-byte panels) and two consumer warpgroups of 64 rows each
//    (S, P and O in registers; ping-pong turns and the S_t / PV_{t-1} overlap of the 16-bit
//    Hopper mainloop). Key tiles are the definition's 128-key tiles, visited in increasing
//    order (WindowTiles: sink tiles, then the window); a tile no row of the block sees is
//    skipped, which the definition makes exact. Per tile: S = Q K^T over the codes (4 k32
//    steps per 128 channels), scores scaled by scale * q_descale * k_descale (log2 units), softcap, mask,
//    the online softmax (softmax.cuh: running max m_t, l += unquantised p), P rounded to e4m3
//    (cvt.rn.satfinite: p is in [0, 1]) straight into the A registers, O += P V^T (4 k32
//    steps, n = the padded head dim). Epilogue: O * v_descale / l written from registers for
//    the caller's channels, LSE = m + ln l.
// With 1-byte elements a V^T tile row (128 keys) is exactly one 128-byte swizzle row, and so is
// every 128-channel panel of a Q or K row; at 64 channels Q and K rows are 64-byte swizzle rows
// (wgmma::make_desc_k_major<64>). Shared memory: 144 KB at 128 channels (4 stages), 72 KB at 64
// (4 stages), 225 KB at 256 (3 stages, 64 KB per stage).

#include <cuda.h>
#include <cuda_fp8.h>

#include "longattn/common.cuh"
#include "longattn/dense_fp8.h"
#include "longattn/dense_mask.cuh"
#include "longattn/dense_tensors.cuh"
#include "longattn/dispatch.cuh"
#include "longattn/mask.cuh"
#include "longattn/mma.cuh"
#include "longattn/schedule.cuh"
#include "longattn/softmax.cuh"
#include "longattn/tma.cuh"
#include "longattn/tma_host.cuh"
#include "longattn/wgmma.cuh"

namespace longattn {
namespace fp8dense {

// D: the padded head dim (64, 128 or 256).
template <int D>
struct Fp8Traits {
  static constexpr int kHeadDim = D;
  static constexpr int kBlockM = 128;  // two consumers of 64 rows
  static constexpr int kBlockN = LA_FP8_KEY_TILE;
  static constexpr int kStages = D == 256 ? 3 : 4;
  // Q and K tiles are kPanels panels of kPanelBytes-byte swizzle rows (channel panels).
  static constexpr int kPanelBytes = D < 128 ? D : 128;
  static constexpr int kPanels = D / kPanelBytes;
  // S_t issued together with P_{t-1} V_{t-1} (S, the previous P and O live at once: 64 + 16 +
  // D / 2 registers), except at 256 channels, where that spills under the 240-register budget
  // and each tile runs S, softmax, P V in turn.
  static constexpr bool kOverlapPv = D != 256;
  static constexpr int kConsumerThreads = 256;
  static constexpr int kThreads = 128 + kConsumerThreads;
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static constexpr uint32_t kTurnBarrier = 1;  // 1 + consumer (0 is __syncthreads)
  static constexpr int kSRegs = kBlockN / 2;   // S: (64, 128) f32 per consumer
  static constexpr int kORegs = kHeadDim / 2;  // O: (64, D) f32 per consumer
  static constexpr int kQkSteps = kHeadDim / 32;  // k32 steps of Q K^T
  static constexpr int kPvSteps = kBlockN / 32;   // k32 steps of P V
  static constexpr int kQkStepsPerPanel = kPanelBytes / 32;
  // Shared memory: Q (128 rows x D B), kStages K tiles (128 keys x D B) and V^T tiles
  // (D channels x 128 B), the mbarriers (Q full; K full, V full, K empty, V empty per stage),
  // slack to align the base to 1024 bytes. Every tile and panel is a whole number of 1024-byte
  // atoms.
  static constexpr uint32_t kQBytes = kBlockM * kHeadDim;
  static constexpr uint32_t kTileBytes = kBlockN * kHeadDim;  // a K tile and a V^T tile alike
  static constexpr uint32_t kPanelTileBytes = 128 * kPanelBytes;  // one panel of Q or K
  static constexpr uint32_t kBarrierOffset = kQBytes + 2 * kStages * kTileBytes;
  static constexpr size_t kSmemBytes = (size_t)kBarrierOffset + 8 * (1 + 4 * kStages) + 1024;
  static_assert(D == 64 || D == 128 || D == 256, "64, 128 or 256 channels");
  static_assert(kBlockM == 128 && kBlockN == 128,
                "a V^T row and a Q/K panel row are one 128-byte swizzle row (panel offsets use 128 "
                "rows)");
  static_assert(kSmemBytes <= 232448, "fits the 227 KB a Hopper block may opt in to");
  static_assert(128 * kProducerRegs + kConsumerThreads * kConsumerRegs <= 65536,
                "the register budgets fit the register file");
};

// The key (within a group of 32) that V^T column s (< 32) holds: see the file comment.
__host__ __device__ constexpr int kv_slot_key(int s) {
  return (s & 16) + 2 * ((s >> 2) & 3) + (s & 1) + 8 * ((s >> 1) & 1);
}

// Compile-time proof that pack_p and the pre-pass agree: for thread t of a quad, A column
// 4 t + x (register 0 / 1, byte x) and 16 + 4 t + x (register 2 / 3) hold the keys that
// pack_p converts into that byte, i.e. S columns 2 t, 2 t + 1 of n8 blocks 0 and 1 (bytes
// 0-1, 2-3) and of blocks 2 and 3; and every key of the group has exactly one column.
constexpr bool kv_slots_match_pack_p() {
  for (int t = 0; t < 4; ++t)
    for (int x = 0; x < 4; ++x)
      for (int half = 0; half < 2; ++half) {
        const int block = 2 * half + (x >> 1);  // n8 block of byte x: pack_p's x[0..], x[4..]
        const int s_key = 8 * block + 2 * t + (x & 1);
        if (kv_slot_key(16 * half + 4 * t + x) != s_key) return false;
      }
  for (int key = 0; key < 32; ++key) {
    int hits = 0;
    for (int s = 0; s < 32; ++s) hits += kv_slot_key(s) == key;
    if (hits != 1) return false;
  }
  return true;
}
static_assert(kv_slots_match_pack_p(), "the V^T key permutation is the A fragment of S");

// First V^T column of sequence b (dense_fp8.h).
__device__ __forceinline__ long long vt_start(const LaDenseParams &p, int b) {
  const long long k0 =
      p.cu_seqlens_k != nullptr ? (long long)p.cu_seqlens_k[b] : (long long)b * p.seqlen_k;
  return ((k0 + 15) & ~15LL) + (long long)LA_FP8_VT_SEQ_GAP * b;
}

// Two probabilities in [0, 1] -> two e4m3 codes, x in the low byte (round to nearest even).
__device__ __forceinline__ uint32_t e4m3x2(float x, float y) {
  return (uint32_t)__nv_cvt_float2_to_fp8x2(make_float2(x, y), __NV_SATFINITE, __NV_E4M3);
}

// The tensor maps of one call: Q and K as (channel, row, head, batch) byte tensors, V^T as
// (key, channel, kv head, 1); boxes of 128 x 128 bytes, 128-byte swizzle.
struct Fp8Maps {
  CUtensorMap q, k, vt;
};

// One 1-byte-element tensor (dims innermost first, byte strides of dims 1..3) as a map of
// box_cols x box_rows boxes, box_cols 64 or 128 bytes (the swizzle row: 64- or 128-byte
// swizzle); elements past the tensor's extents arrive as zeros. False where the copy engine
// cannot address it (a null or not 16-byte aligned base, no rows: no keys at all, a stride of
// an extent > 1 not a positive multiple of 16 below 2^40, an extent of 2^31 or more).
bool encode_bytes(CUtensorMap *map, const void *base, const long long (&dims)[4],
                  const long long (&strides)[3], int box_cols, int box_rows) {
  const tma_host::EncodeTiled encode = tma_host::encode_tiled();
  if (encode == nullptr || base == nullptr || dims[1] < 1 ||
      reinterpret_cast<uintptr_t>(base) % 16 != 0)
    return false;
  cuuint64_t gdims[4];
  cuuint64_t gstrides[3];
  for (int i = 0; i < 4; ++i) {
    if (dims[i] >= (1LL << 31)) return false;
    gdims[i] = (cuuint64_t)(dims[i] < 1 ? 1 : dims[i]);
  }
  for (int i = 0; i < 3; ++i) {
    const bool stepped = dims[i + 1] > 1;
    if (stepped && (strides[i] <= 0 || strides[i] % 16 != 0 || strides[i] >= (1LL << 40)))
      return false;
    gstrides[i] = (cuuint64_t)(stepped ? strides[i] : 16);
  }
  const cuuint32_t box[4] = {(cuuint32_t)box_cols, (cuuint32_t)box_rows, 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUtensorMapSwizzle swizzle =
      box_cols == 64 ? CU_TENSOR_MAP_SWIZZLE_64B : CU_TENSOR_MAP_SWIZZLE_128B;
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 4, const_cast<void *>(base), gdims, gstrides,
                box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Q and K in boxes of one channel panel (Tr::kPanelBytes) by 128 rows; V^T in boxes of 128 keys
// by Tr::kHeadDim channels (those past head_dim are zeros).
template <class Tr>
bool encode_maps(Fp8Maps *maps, const LaDenseFp8Params &p) {
  const LaDenseParams &d = p.base;
  const bool packed = d.cu_seqlens_q != nullptr;
  const long long q_dims[4] = {d.head_dim, packed ? d.total_q : d.seqlen_q, d.heads_q,
                               packed ? 1 : d.batch};
  const long long q_strides[3] = {d.q_row_stride, d.q_head_stride, d.q_batch_stride};
  const long long k_dims[4] = {d.head_dim, packed ? d.total_k : d.seqlen_k, d.heads_kv,
                               packed ? 1 : d.batch};
  const long long k_strides[3] = {d.k_row_stride, d.k_head_stride, d.k_batch_stride};
  const long long vt_dims[4] = {p.vt_keys, d.head_dim, d.heads_kv, 1};
  const long long vt_strides[3] = {p.vt_keys, p.vt_keys * d.head_dim,
                                   p.vt_keys * d.head_dim * d.heads_kv};
  return encode_bytes(&maps->q, d.q, q_dims, q_strides, Tr::kPanelBytes, Tr::kBlockM) &&
         encode_bytes(&maps->k, d.k, k_dims, k_strides, Tr::kPanelBytes, Tr::kBlockN) &&
         encode_bytes(&maps->vt, p.vt, vt_dims, vt_strides, 128, Tr::kHeadDim);
}

// ---- pre-pass: V^T with permuted keys ------------------------------------------------------
// Block (t, g, b) writes key tile t (128 keys) of kv head g of sequence b: V rows (head_dim
// channels, a multiple of 16) in 16-byte vectors (zeros past the sequence's end) into shared
// memory, then each thread gathers 16 permuted keys of one channel and stores them as one
// 16-byte vector of V^T. One kernel for every head dim.
constexpr int kPrepassThreads = 256;

__global__ void __launch_bounds__(kPrepassThreads)
    vt_prepass_kernel(const __grid_constant__ LaDenseFp8Params p) {
  constexpr int BN = LA_FP8_KEY_TILE, kRow = 256 + 16;  // rows of up to 256 channels
  __shared__ __align__(16) uint8_t tile[BN * kRow];
  const LaDenseParams &d = p.base;
  const int D = d.head_dim, chunks = D / 16;
  const int t = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const bool packed = d.cu_seqlens_k != nullptr;
  const int k0 = packed ? d.cu_seqlens_k[b] : 0;
  const int sk = packed ? d.cu_seqlens_k[b + 1] - k0 : d.seqlen_k;
  if (t * BN >= sk) return;  // uniform over the block
  const uint8_t *v = static_cast<const uint8_t *>(d.v) + (packed ? 0 : b * d.v_batch_stride) +
                     ((long long)k0 + (long long)t * BN) * d.v_row_stride + g * d.v_head_stride;
  for (int idx = threadIdx.x; idx < BN * chunks; idx += kPrepassThreads) {
    const int key = idx / chunks, chunk = idx % chunks;
    uint4 x = make_uint4(0u, 0u, 0u, 0u);
    if (t * BN + key < sk) x = *reinterpret_cast<const uint4 *>(v + key * d.v_row_stride + 16 * chunk);
    *reinterpret_cast<uint4 *>(tile + key * kRow + 16 * chunk) = x;
  }
  __syncthreads();
  uint8_t *out = static_cast<uint8_t *>(p.vt) + (long long)g * D * p.vt_keys + vt_start(d, b) +
                 (long long)t * BN;
  for (int idx = threadIdx.x; idx < D * (BN / 16); idx += kPrepassThreads) {
    const int c = idx / (BN / 16), s0 = 16 * (idx % (BN / 16));
    uint32_t w[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      uint32_t word = 0;
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const int s = s0 + 4 * q + x;
        const int key = (s & ~31) + kv_slot_key(s & 31);
        word |= (uint32_t)tile[key * kRow + c] << (8 * x);
      }
      w[q] = word;
    }
    *reinterpret_cast<uint4 *>(out + (long long)c * p.vt_keys + s0) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// ---- the attention kernel ---------------------------------------------------------------------
// Natural-log LSE of a finished row; NaN stays NaN (the NaN policy), empty rows give -inf.
__device__ __forceinline__ float fp8_lse(float m_log2, float l) {
  return l != l ? l : lse_from_log2(m_log2, l);
}

template <typename To, class Tr>
__device__ __forceinline__ void fp8_block(unsigned char *smem_raw, const LaDenseFp8Params &p,
                                          const Fp8Maps &maps) {
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, kStages = Tr::kStages;
  const LaDenseParams &d = p.base;
  const uint32_t raw_addr = mma::smem_addr(smem_raw);
  const uint32_t q_base = (raw_addr + 1023u) & ~1023u;
  const uint32_t k_base = q_base + Tr::kQBytes;
  const uint32_t v_base = k_base + kStages * Tr::kTileBytes;
  const uint32_t bar_base = q_base + Tr::kBarrierOffset;
  const uint32_t q_full = bar_base;
  auto k_full = [&](int st) { return bar_base + 8u * (1 + st); };
  auto v_full = [&](int st) { return bar_base + 8u * (1 + kStages + st); };
  auto k_empty = [&](int st) { return bar_base + 8u * (1 + 2 * kStages + st); };
  auto v_empty = [&](int st) { return bar_base + 8u * (1 + 3 * kStages + st); };

  const int b = blockIdx.z, h = blockIdx.y;
  const SeqInfo s = seq_info(d, b, h);
  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
  if (m0 >= s.sq) return;  // uniform over the block, before any barrier
  const Mask mask{d.window_left, d.window_right, d.sinks};
  const WindowTiles tiles = WindowTiles::of(mask, m0, min(m0 + BM, s.sq), s.sq, s.sk, BN);
  const int n_tiles = tiles.count();
  const int kvh = h / (d.heads_q / d.heads_kv);

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
    // ---- producer: one thread issues every copy ----------------------------------------
    tma::release_registers<Tr::kProducerRegs>();
    if (tid == 0 && n_tiles > 0) {
      const int batch_coord = d.cu_seqlens_q != nullptr ? 0 : b;
      const int k_row0 = (int)s.k_row0;
      const int vt0 = (int)vt_start(d, b);
      tma::prefetch_map(&maps.k);
      tma::prefetch_map(&maps.vt);
      tma::arrive_expect_tx(q_full, Tr::kQBytes);
#pragma unroll
      for (int pn = 0; pn < Tr::kPanels; ++pn)
        tma::load_4d(q_base + pn * Tr::kPanelTileBytes, &maps.q, q_full, pn * Tr::kPanelBytes,
                     (int)s.q_row0 + m0, h, batch_coord);
      for (int t = 0; t < n_tiles; ++t) {
        const int st = t % kStages;
        const uint32_t reuse_parity = ((t / kStages) - 1) & 1;  // previous use's release
        const int key0 = tiles.key0(t);
        if (t >= kStages) tma::wait(k_empty(st), reuse_parity);
        tma::arrive_expect_tx(k_full(st), Tr::kTileBytes);
#pragma unroll
        for (int pn = 0; pn < Tr::kPanels; ++pn)
          tma::load_4d(k_base + st * Tr::kTileBytes + pn * Tr::kPanelTileBytes, &maps.k,
                       k_full(st), pn * Tr::kPanelBytes, k_row0 + key0, kvh, batch_coord);
        if (t >= kStages) tma::wait(v_empty(st), reuse_parity);
        tma::arrive_expect_tx(v_full(st), Tr::kTileBytes);
        tma::load_4d(v_base + st * Tr::kTileBytes, &maps.vt, v_full(st), vt0 + key0, 0, kvh, 0);
      }
    }
    return;
  }

  // ---- consumers ---------------------------------------------------------------------------
  tma::claim_registers<Tr::kConsumerRegs>();
  const int wg = tid / 128 - 1, warp = (tid / 32) % 4, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;
  const int at = b * d.heads_kv + kvh;
  const float qk_scale = d.scale * p.q_descale[at] * p.k_descale[at];
  const float v_descale = p.v_descale[at];
  const float scale_log2 = qk_scale * kLog2e;
  const bool softcap = d.softcap > 0.0f;
  const float cap_pre = softcap ? qk_scale / d.softcap : 0.0f;
  const float cap_post = d.softcap * kLog2e;

  // This thread's two rows' visible keys, and the warp's bounds that decide whether a tile
  // needs per-element masking at all (dense_mask.cuh, as dense_wgmma.cu).
  const int warp_row0 = m0 + 64 * wg + 16 * warp;
  WarpWindowMask<WgMaskShape<Tr>> window;
  window.prepare(mask, warp_row0, g, s.sq, s.sk);

  // Descriptors: k32 step kk of Q K^T is 32 bytes into the row of channel panel kk /
  // kQkStepsPerPanel (a 128- or 64-byte swizzle row); step kk of P V is 32 bytes (keys) into
  // the V^T rows (128-byte swizzle rows, one per channel).
  const uint32_t q_wg = q_base + wg * 64 * Tr::kPanelBytes;
  auto qk_desc = [](uint32_t tile, int kk) {
    return wgmma::make_desc_k_major<Tr::kPanelBytes>(
        tile + (kk / Tr::kQkStepsPerPanel) * Tr::kPanelTileBytes +
        (kk % Tr::kQkStepsPerPanel) * 32);
  };
  auto pv_desc = [](uint32_t tile, int kk) {
    return wgmma::make_desc_k_major<128>(tile + kk * 32);
  };
  using MmaS = wgmma::MmaE4m3<Tr::kBlockN>;
  using MmaO = wgmma::MmaE4m3<Tr::kHeadDim>;

  float m[2] = {kNegInf, kNegInf};  // row max, log2 units
  float l[2] = {0.0f, 0.0f};        // this thread's partial sum of the unquantised p
  float oacc[Tr::kORegs];
  float sacc[Tr::kSRegs];
  uint32_t pf[Tr::kPvSteps][4];  // P of the previous tile in e4m3: A fragments per k32 step
#pragma unroll
  for (int i = 0; i < Tr::kORegs; ++i) oacc[i] = 0.0f;
#pragma unroll
  for (int i = 0; i < Tr::kSRegs; ++i) sacc[i] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < Tr::kPvSteps; ++kk)
#pragma unroll
    for (int e = 0; e < 4; ++e) pf[kk][e] = 0u;

  auto parity = [&](int t) { return (uint32_t)((t / kStages) & 1); };
  auto take_turn = [&]() { tma::named_sync(Tr::kTurnBarrier + wg, Tr::kConsumerThreads); };
  auto pass_turn = [&]() {
    tma::named_arrive(Tr::kTurnBarrier + (1 - wg), Tr::kConsumerThreads);
  };
  auto issue_s = [&](int t) {
    const uint32_t ks = k_base + (t % kStages) * Tr::kTileBytes;
#pragma unroll
    for (int kk = 0; kk < Tr::kQkSteps; ++kk) {
      if (kk == 0) {
        MmaS::template ss<0>(sacc, qk_desc(q_wg, kk), qk_desc(ks, kk));
      } else {
        MmaS::template ss<1>(sacc, qk_desc(q_wg, kk), qk_desc(ks, kk));
      }
    }
    wgmma::commit();
  };
  auto issue_pv = [&](int t) {  // O += P_t V_t (V^T tile: D channels x 128 permuted keys)
    const uint32_t vs = v_base + (t % kStages) * Tr::kTileBytes;
#pragma unroll
    for (int kk = 0; kk < Tr::kPvSteps; ++kk) MmaO::rs(oacc, pf[kk], pv_desc(vs, kk));
    wgmma::commit();
  };
  // Scores of tile t (S_t waited) -> exponentials in sacc, running max and sum (unquantised),
  // rescale factors. Interior tiles skip the per-element mask; boundary tiles, including the
  // ragged last tile whose keys past sk are zeros or the next packed sequence's, mask.
  auto softmax = [&](int t, float (&alpha)[2]) {
    const int n0 = tiles.key0(t);
    wgmma::scale_scores(sacc, softcap, cap_pre, cap_post, scale_log2);
    window.apply(reinterpret_cast<float(&)[Tr::kSRegs / 4][4]>(sacc), n0, tq);
#pragma unroll
    for (int r = 0; r < 2; ++r)
      alpha[r] = softmax_update(m[r], l[r], r, reinterpret_cast<float(&)[Tr::kSRegs / 4][4]>(sacc));
  };
  // P in e4m3, straight into the A fragments: k32 step kk covers the n8 blocks 4 kk .. 4 kk + 3
  // (registers 16 kk ..); register 4 i + 2 r + e of S is row r, key 8 i + 2 tq + e. A register
  // 0 takes row 0's keys 2 tq, 2 tq + 1 (block 4 kk) and 8 + 2 tq, 9 + 2 tq (block 4 kk + 1),
  // register 1 the same of row 1, registers 2 and 3 blocks 4 kk + 2 and 4 kk + 3: the columns
  // the pre-pass gave those keys (kv_slot_key).
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < Tr::kPvSteps; ++kk) {
      const float *x = sacc + 16 * kk;
      pf[kk][0] = e4m3x2(x[0], x[1]) | (e4m3x2(x[4], x[5]) << 16);
      pf[kk][1] = e4m3x2(x[2], x[3]) | (e4m3x2(x[6], x[7]) << 16);
      pf[kk][2] = e4m3x2(x[8], x[9]) | (e4m3x2(x[12], x[13]) << 16);
      pf[kk][3] = e4m3x2(x[10], x[11]) | (e4m3x2(x[14], x[15]) << 16);
    }
  };

  if (n_tiles > 0 && !Tr::kOverlapPv) {
    // Tile by tile: S_t, its softmax, then P_t V_t, each wgmma group on its turn (two turns per
    // tile; consumer 1's last P V passes to nobody).
    if (wg == 1) pass_turn();  // consumer 0 takes the first turn
    float alpha[2];
    tma::wait(q_full, 0);
    for (int t = 0; t < n_tiles; ++t) {
      tma::wait(k_full(t % kStages), parity(t));
      take_turn();
      wgmma::fence();
      issue_s(t);
      pass_turn();
      wgmma::wait<0>();
      wgmma::fence_operands(sacc);
      tma::arrive(k_empty(t % kStages));
      softmax(t, alpha);
      if (t > 0) wgmma::scale_rows(oacc, alpha);
      pack_p();
      tma::wait(v_full(t % kStages), parity(t));
      take_turn();
      wgmma::fence();
      issue_pv(t);
      if (wg == 0 || t + 1 < n_tiles) pass_turn();
      wgmma::wait<0>();
      wgmma::fence_operands(oacc);
      tma::arrive(v_empty(t % kStages));
    }
  } else if (n_tiles > 0) {
    if (wg == 1) pass_turn();  // consumer 0 takes the first turn
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
      pack_p();
    }
    tma::wait(v_full((n_tiles - 1) % kStages), parity(n_tiles - 1));
    take_turn();
    wgmma::fence();
    issue_pv(n_tiles - 1);
    if (wg == 0) pass_turn();
    wgmma::wait<0>();
    wgmma::fence_operands(oacc);
  }

  // Epilogue: O * v_descale / l straight from registers (each quad writes 16 contiguous bytes
  // of a row) for the caller's head_dim channels (n8 blocks below it: head_dim is a multiple
  // of 16); empty rows give 0 (inv = 0), NaN rows NaN.
  float inv[2];
  softmax_finalize(l, inv);
  To *o = static_cast<To *>(d.o) + b * d.o_batch_stride + s.q_row0 * d.o_row_stride +
          h * d.o_head_stride;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = warp_row0 + g + 8 * r;
    if (i >= s.sq) continue;
    const float w = inv[r] * v_descale;
#pragma unroll
    for (int n = 0; n < Tr::kORegs / 4; ++n)
      if (8 * n < d.head_dim)
        *reinterpret_cast<uint32_t *>(o + i * d.o_row_stride + 8 * n + 2 * tq) =
            pack2<To>(oacc[4 * n + 2 * r] * w, oacc[4 * n + 2 * r + 1] * w);
    if (d.lse != nullptr && tq == 0) d.lse[s.lse_base + i] = fp8_lse(m[r], l[r]);
  }
}

template <typename To, class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    dense_fp8_kernel(const __grid_constant__ LaDenseFp8Params p,
                     const __grid_constant__ Fp8Maps maps) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  fp8_block<To, Tr>(smem_raw, p, maps);
#endif
}

// Head dims the kernel takes: multiples of 16 (the pre-pass's 16-byte vectors) up to 256.
bool head_dim_ok(int head_dim) { return head_dim > 0 && head_dim <= 256 && head_dim % 16 == 0; }

// The output-type x padded-head-dim switch (head_dim_ok head dims onto 64, 128 or 256
// channels): calls f(Tag<To>{}, Tag<Fp8Traits<D>>{}), or returns false for an output type the
// kernel does not write.
template <class F>
bool with_fp8_config(const LaDenseParams &d, F &&f) {
  return with_dtype<__half, __nv_bfloat16>(d.dtype, false, [&](auto t) {
    if (d.head_dim <= 64) f(t, Tag<Fp8Traits<64>>{});
    else if (d.head_dim <= 128) f(t, Tag<Fp8Traits<128>>{});
    else f(t, Tag<Fp8Traits<256>>{});
    return true;
  });
}

// What la_dense_fp8_forward needs beyond the dense params' checks: descale pointers, and the
// scratch (pointer, vt_keys a multiple of 16 that covers every sequence, below 2^31).
bool fp8_params_ok(const LaDenseFp8Params *p) {
  if (p == nullptr || !dense_params_ok(&p->base)) return false;
  const LaDenseParams &d = p->base;
  const bool work = d.batch > 0 && d.seqlen_q > 0;
  if (!work) return true;
  const long long rows_k =
      d.cu_seqlens_k != nullptr ? (long long)d.total_k : (long long)d.batch * d.seqlen_k;
  const long long need = ((rows_k + 15) & ~15LL) + (long long)LA_FP8_VT_SEQ_GAP * d.batch;
  return p->q_descale != nullptr && p->k_descale != nullptr && p->v_descale != nullptr &&
         p->vt != nullptr && p->vt_keys % 16 == 0 && p->vt_keys >= need &&
         p->vt_keys < (1LL << 31);
}

const char *unsupported_reason(const LaDenseFp8Params &p) {
  const LaDenseParams &d = p.base;
  if (!head_dim_ok(d.head_dim))
    return "the FP8 kernel takes head dims that are multiples of 16 up to 256 only";
  const void *kernel = nullptr;
  size_t smem = 0;
  bool mappable = false;
  Fp8Maps maps;
  const bool known = with_fp8_config(d, [&](auto t, auto tr) {
    using Tr = typename decltype(tr)::type;
    kernel = reinterpret_cast<const void *>(dense_fp8_kernel<typename decltype(t)::type, Tr>);
    smem = Tr::kSmemBytes;
    mappable = encode_maps<Tr>(&maps, p);
  });
  if (!known) return "the FP8 kernel writes bf16 or f16 output only";
  const char *why = device_unsupported_reason(kernel, smem, tma_host::is_sm90);
  if (why != nullptr) return why;
  if (!mappable)
    return "the TMA copy engine cannot address q/k/v^T (it needs 16-byte aligned bases, at "
           "least one key, and strides that are positive multiples of 16 bytes for every "
           "dimension longer than 1)";
  const long long v_align = (long long)reinterpret_cast<uintptr_t>(d.v) | d.v_row_stride |
                            d.v_head_stride | d.v_batch_stride;
  if (v_align % 16 != 0)
    return "the V^T pre-pass reads v in 16-byte vectors (16-byte aligned base and strides)";
  return nullptr;
}

template <typename To, class Tr>
cudaError_t launch(const LaDenseFp8Params &p, cudaStream_t stream) {
  const LaDenseParams &d = p.base;
  Fp8Maps maps;
  if (!encode_maps<Tr>(&maps, p)) return cudaErrorNotSupported;
  if (d.seqlen_k > 0) {
    const dim3 grid((d.seqlen_k + Tr::kBlockN - 1) / Tr::kBlockN, d.heads_kv, d.batch);
    vt_prepass_kernel<<<grid, kPrepassThreads, 0, stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const dim3 grid((d.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, d.heads_q, d.batch);
  return tma_host::launch<Tr>(dense_fp8_kernel<To, Tr>, grid, stream, p, maps);
}

}  // namespace fp8dense
}  // namespace longattn

extern "C" const char *la_dense_fp8_unsupported_reason(const LaDenseFp8Params *params) {
  using namespace longattn;
  using namespace longattn::fp8dense;
  if (!fp8_params_ok(params)) return "its parameters are invalid";
  return unsupported_reason(*params);
}

extern "C" int la_dense_fp8_forward(const LaDenseFp8Params *params, cudaStream_t stream) {
  using namespace longattn;
  using namespace longattn::fp8dense;
  if (!fp8_params_ok(params)) return cudaErrorInvalidValue;
  const LaDenseParams &d = params->base;
  if (d.batch == 0 || d.seqlen_q == 0) return cudaSuccess;
  if (unsupported_reason(*params) != nullptr) return cudaErrorNotSupported;
  cudaError_t err = cudaErrorNotSupported;
  with_fp8_config(d, [&](auto t, auto tr) {
    err = launch<typename decltype(t)::type, typename decltype(tr)::type>(*params, stream);
  });
  return err;
}
