// Tensor-core prefill over the paged KV cache (mma.sync m16n8k16, f32 accumulation, sm_80+).
// The version before load_kv's table-reads-first / FastDiv change passed the GPU tests and
// memcheck on an H200 (sm_90a, 2026-12-04); THIS VERSION IS NOT YET VERIFIED ON A GPU, nor is
// any sm_80 build. Reachable only through the explicit PagedPrefill::forward_gpu.
//
// Semantics: dense attention (dense_mma_padded.cu) with seqlen_q = q_len, seqlen_k = seqlens_k[b]
// over sequence b's tokens in the pages; token j lives in page block_table[b][j / page_size],
// slot j % page_size. The shared FlashAttention-2 mainloop (longattn/mma_mainloop.cuh) with
// the paged prefill problem, which is all this file writes:
// - a block owns 64 query rows of one (sequence, query head); Q rows are contiguous (loaded
//   like dense);
// - schedule: dense's WindowTiles over keys [0, sk) with the bottom-right mask (the q rows are
//   the last q_len positions);
// - load_kv: each thread copies whole 16-byte chunks of key rows; a row's address goes
//   through the page table (any page size), rows past sk are zero-filled by cp.async;
// - mask_tile: dense's row-bounds rule (j <= hi && (j >= lo || j < sinks)) with the interior
//   shortcut.
//
// FP8 cache (kv_dtype LA_F8E4M3; paged_prefill_kernel<T, Fp8KvTraits<...>>; compiled only,
// NOT YET RUN ON A GPU): the T mainloop
// runs unchanged on T K/V tiles; only load_kv differs. Every thread owns the same
// (row, 8-channel chunk) pairs as in the T path and for each it
//   - copies the raw 8 e4m3 bytes with an 8-byte cp.async into a raw ring behind the
//     mainloop's shared memory: kRawSlots = kStages slots of [K, V][kPasses][kThreads] 8-byte
//     vectors (kBlockN * head_dim bytes each of K and V), thread-private, so a warp's copies
//     and reads cover 256 contiguous bytes (no bank conflict) and no barrier is needed
//     between them: cp.async.wait_group makes a thread's own copies visible to itself;
//   - later converts them (exact, fp8.cuh) into the swizzled T tile of the mainloop's ring
//     (one 16-byte st.shared per vector).
// The raw copies run kStages - 1 tiles ahead of the conversion: load_kv(t) converts raw tile
// t into T stage t % kStages and issues raw tile t + kStages - 1. load_kv(t) belongs to the
// mainloop's cp.async group t + 1 and the mainloop's own wait before it guarantees groups up
// to t - kStages + 2 (kStages - 1 groups after raw tile t was issued), so a raw tile has the
// same kStages - 1 iterations of latency hiding as a T tile has in the T path and the mainloop
// needs no extra wait or barrier. The prologue's tiles (t < kStages - 1, no raw copy issued
// yet) are loaded synchronously (8-byte global loads, converted in registers). Trade-off
// against synchronous loads in every tile (no raw ring, no extra shared memory): those stall
// each tile on a global load round trip before its compute; the raw ring costs kStages *
// kBlockN * head_dim * 2 bytes of shared memory per block (see Fp8KvTraits for the shapes).
// k_scale[kvh] is folded into the softmax scale ((q . k_e4m3) * (scale * k_scale), so the
// softcap sees the true score) and every output row is multiplied by v_scale[kvh] in f32
// before its rounding to T (the mainloop's kOutScale hook); the LSE is not scaled. The cache
// rows are read with 8-byte copies: k_cache and v_cache need 8-byte alignment only.

#include <climits>

#include "longattn/check.cuh"
#include "longattn/common.cuh"
#include "longattn/dense_mask.cuh"
#include "longattn/dispatch.cuh"
#include "longattn/fp8.cuh"
#include "longattn/mask.cuh"
#include "longattn/mma_mainloop.cuh"
#include "longattn/paged_common.cuh"
#include "longattn/paged_prefill.h"
#include "longattn/schedule.cuh"

namespace longattn {
namespace {

using Traits64 = DenseTraits64;
using Traits128 = DenseTraits128;
using Traits256 = DenseTraits256;
static_assert(Traits64::kBlockM == LA_PAGED_PREFILL_ROWS, "rows per block (paged_prefill.h)");

// Tile shapes of the FP8 cache (see the file comment): Base's mainloop plus the raw e4m3
// ring, kStages slots of K and V tiles of kBlockN * head_dim bytes behind MmaSmem.
// Shared memory per block (bytes), blocks per SM on sm_90 / sm_80 (by shared memory, 228 / 164
// KB per SM with 1 KB reserved per block, and by registers), registers (sm_90a / sm_80):
//   d64:  kBlockN 64, 2 stages: 40960 + 16384 =  57344: 3 / 2, 168 / 168
//         (T kernel: 3 stages, 57344: 3 / 2, 167 / 167)
//   d128: kBlockN 64, 2 stages: 81920 + 32768 = 114688: 2 / 1, 254 / 247-251
//         (T kernel: 81920: 2 / 2, 246 / 248)
//   d256: kBlockN 16, 2 stages: 65536 + 16384 =  81920: 2 / 2, 239-240 / 244
//         (T kernel: kBlockN 32, 98304: 2 / 1, 255 / 255)
// d64 trades a T stage for the raw ring (1 tile of raw lookahead plus 1 of T ring equal the T
// kernel's 3-stage prefetch distance, at the same shared memory); d256 halves kBlockN, which
// keeps 2 blocks per SM (kBlockN 32 would need 131072 bytes: 1 per SM) at twice the tiles.
template <class Base>
struct Fp8KvTraits : Base {
  static constexpr int kRawSlots = Base::kStages;
  static constexpr int kPasses = Base::kBlockN / Base::kRowsPerPass;  // copy passes per tile
  static constexpr size_t kRawTileBytes = (size_t)Base::kKvElems;     // one byte per element
  static constexpr size_t kRawOff = Base::kSmemBytes;                 // the raw ring
  static constexpr size_t kSmemBytes = kRawOff + (size_t)kRawSlots * 2 * kRawTileBytes;
  static_assert(kRawTileBytes == (size_t)kPasses * Base::kThreads * 8, "8 bytes per (pass, thread)");
  static_assert(kRawOff % 16 == 0, "aligned raw ring");
};
using Fp8Traits64 = Fp8KvTraits<MmaTraits<64, 64, 2, true, 3>>;
using Fp8Traits128 = Fp8KvTraits<DenseTraits128>;
using Fp8Traits256 = Fp8KvTraits<MmaTraits<256, 16, 2, false, 2>>;

template <class Tr>
inline constexpr bool kFp8Tiles = false;
template <class Base>
inline constexpr bool kFp8Tiles<Fp8KvTraits<Base>> = true;

// KV: the cache's element type (T, or __nv_fp8_e4m3 with Fp8KvTraits).
template <typename T, class Tr, typename KV = T>
struct PagedPrefillProblem {
  static constexpr bool kFp8 = kIsFp8<KV>;
  static constexpr bool kOutScale = kFp8;  // v_scale (mma_mainloop.cuh)
  static_assert(kOutScale == kFp8Tiles<Tr> && (kFp8 || std::is_same_v<KV, T>), "cache type");
  const T *q;            // row 0 of this (sequence, query head)
  T *o;                  // row 0 of this (sequence, query head)
  float *lse;            // LSE of row 0 of this (sequence, query head), or nullptr
  const KV *kc, *vc;     // cache base + kv head offset
  const int32_t *pages;  // this sequence's block-table row
  long long q_row_stride, o_row_stride;
  int page_size, slot_stride;  // slot_stride = heads_kv * head_dim
  FastDiv page_div;            // j / page_size in a multiply-shift
  int m0, sq, sk;
  Mask mask;
  float scale, softcap;
  WindowTiles tiles;
  WarpWindowMask<Tr> window;  // prepare_rows(): the mask of this warp's rows
  // FP8 cache only: the raw ring's shared address, the tile count, v_scale[kvh].
  uint32_t raw_smem;
  int n_tiles;
  float v_scale;

  __device__ __forceinline__ void load_q(uint32_t q_smem, int tid) {
    load_rows<Tr, Tr::kBlockM>(q_smem, q, q_row_stride, m0, sq, tid);
  }
  __device__ __forceinline__ int schedule() {
    // (64-bit: m0 + kBlockM may pass INT_MAX for q_len near it.)
    const int row_end = (int)min((long long)m0 + Tr::kBlockM, (long long)sq);
    tiles = WindowTiles::of(mask, m0, row_end, sq, sk, Tr::kBlockN);
    if constexpr (kFp8) {
      n_tiles = tiles.count();
      return n_tiles;
    } else {
      return tiles.count();
    }
  }
  __device__ __forceinline__ int key0(int t) const { return tiles.key0(t); }
  // Tile t: keys [n0, n0 + kBlockN), each row's address through the page table. All of this
  // thread's table reads issue first, then the copies: cp.async carries a "memory" clobber,
  // so a table read written after one waits for it, and the reads of one tile would run one
  // after another (the first H200 run measured 0.59-0.62x of the dense kernel so).
  __device__ __forceinline__ void load_kv_t(uint32_t k_smem, uint32_t v_smem, int t, int tid) {
    constexpr int kPasses = Tr::kBlockN / Tr::kRowsPerPass;
    const int chunk = tid % Tr::kChunksPerRow, r0 = tid / Tr::kChunksPerRow;
    const int n0 = key0(t);
    int slot[kPasses];  // physical slot (page * page_size + offset) of each row, -1 past sk
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const int j = n0 + r0 + pass * Tr::kRowsPerPass;
      const int lp = (int)page_div.div((uint32_t)j);
      slot[pass] = j < sk ? pages[lp] * page_size + (j - lp * page_size) : -1;
    }
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const bool ok = slot[pass] >= 0;
      const long long off = ok ? (long long)slot[pass] * slot_stride + chunk * 8 : 0;
      const uint32_t dst =
          swizzled_elem<Tr::kHeadDim>(r0 + pass * Tr::kRowsPerPass, chunk) * (int)sizeof(T);
      mma::cp_async_16(k_smem + dst, kc + off, ok);
      mma::cp_async_16(v_smem + dst, vc + off, ok);
    }
  }
  // Physical slot (page * page_size + offset) of this thread's rows of tile t, -1 for keys
  // at or past `limit` (<= sk; 0: every row -1 without a table read, whatever key0(t) is).
  static constexpr int kPasses = Tr::kBlockN / Tr::kRowsPerPass;
  __device__ __forceinline__ void tile_slots(int t, int r0, int limit,
                                             int (&slot)[kPasses]) const {
    const int n0 = key0(t);
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const int j = n0 + r0 + pass * Tr::kRowsPerPass;
      const int lp = (int)page_div.div((uint32_t)j);
      slot[pass] = (uint32_t)j < (uint32_t)limit ? pages[lp] * page_size + (j - lp * page_size) : -1;
    }
  }
  // FP8 cache (see the file comment): T tile t into (k_smem, v_smem), synchronously for the
  // prologue's tiles, else from the raw ring; then the raw copies of tile t + kStages - 1.
  // Order: the table reads of the raw tile, then every load of tile t (so their latencies
  // overlap: one round trip, not one per vector), then the conversions and 16-byte stores,
  // then the copies. The shared loads and stores are volatile asm, kept in order with the
  // ring's cp.async / barrier asm; the loads carry a "memory" clobber so that the table reads
  // stay above them. The whole function is one branch-free block: with the table reads and
  // the copies each under `if (t + kStages - 1 < n_tiles)`, ptxas merged the two and issued
  // the table reads after the conversion (their latency then stalls the copies).
  __device__ __forceinline__ void load_kv_fp8(uint32_t k_smem, uint32_t v_smem, int t, int tid) {
    constexpr int kAhead = Tr::kStages - 1;
    constexpr uint32_t kVecBytes = 8 * Tr::kThreads;  // one pass of raw vectors
    const int chunk = tid % Tr::kChunksPerRow, r0 = tid / Tr::kChunksPerRow;
    auto raw_addr = [&](int tile, int kv, int pass) {
      return raw_smem + (uint32_t)(((tile % Tr::kRawSlots) * 2 + kv) * Tr::kRawTileBytes) +
             (uint32_t)pass * kVecBytes + (uint32_t)tid * 8;
    };
    // Tile ta's rows (none past the last tile: its copies then zero-fill a slot nobody reads;
    // one branch-free block, so the table reads issue first).
    const int ta = t + kAhead;
    int slot_a[kPasses];
    tile_slots(ta, r0, ta < n_tiles ? sk : 0, slot_a);
    uint2 kr[kPasses], vr[kPasses];
    if (t < kAhead) {
      int slot[kPasses];
      tile_slots(t, r0, sk, slot);
#pragma unroll
      for (int pass = 0; pass < kPasses; ++pass) {
        kr[pass] = vr[pass] = make_uint2(0u, 0u);
        if (slot[pass] >= 0) {
          const long long off = (long long)slot[pass] * slot_stride + chunk * 8;
          kr[pass] = *reinterpret_cast<const uint2 *>(kc + off);
          vr[pass] = *reinterpret_cast<const uint2 *>(vc + off);
        }
      }
    } else {
#pragma unroll
      for (int pass = 0; pass < kPasses; ++pass) {
        asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n"
                     : "=r"(kr[pass].x), "=r"(kr[pass].y)
                     : "r"(raw_addr(t, 0, pass))
                     : "memory");
        asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n"
                     : "=r"(vr[pass].x), "=r"(vr[pass].y)
                     : "r"(raw_addr(t, 1, pass))
                     : "memory");
      }
    }
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const uint32_t dst = (uint32_t)(
          swizzled_elem<Tr::kHeadDim>(r0 + pass * Tr::kRowsPerPass, chunk) * (int)sizeof(T));
      const uint4 kx = e4m3x8_to_pack8<T>(kr[pass]), vx = e4m3x8_to_pack8<T>(vr[pass]);
      asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(k_smem + dst), "r"(kx.x),
                   "r"(kx.y), "r"(kx.z), "r"(kx.w));
      asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(v_smem + dst), "r"(vx.x),
                   "r"(vx.y), "r"(vx.z), "r"(vx.w));
    }
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const bool ok = slot_a[pass] >= 0;
      const long long off = ok ? (long long)slot_a[pass] * slot_stride + chunk * 8 : 0;
      mma::cp_async_8(raw_addr(ta, 0, pass), kc + off, ok);
      mma::cp_async_8(raw_addr(ta, 1, pass), vc + off, ok);
    }
  }
  __device__ __forceinline__ void load_kv(uint32_t k_smem, uint32_t v_smem, int t, int tid) {
    if constexpr (kFp8) {
      load_kv_fp8(k_smem, v_smem, t, tid);
    } else {
      load_kv_t(k_smem, v_smem, t, tid);
    }
  }
  __device__ __forceinline__ void prepare_rows(int warp, int g) {
    window.prepare(mask, m0 + 16 * warp, g, sq, sk);
  }
  __device__ __forceinline__ void mask_tile(float (&sc)[Tr::kSBlocks][4], int, int n0,
                                            int tq) const {
    window.apply(sc, n0, tq);
  }
  __device__ __forceinline__ void store_o(int row, int chunk, const uint4 *staged) {
    const int i = m0 + row;
    if (i < sq) *reinterpret_cast<uint4 *>(o + i * o_row_stride + chunk * 8) = *staged;
  }
  __device__ __forceinline__ float out_scale() const { return v_scale; }
  __device__ __forceinline__ bool has_lse() const { return lse != nullptr; }
  __device__ __forceinline__ void store_lse(int row, float value) {
    const int i = m0 + row;
    if (i < sq) lse[i] = value;
  }
};

// Tr: the T cache's traits (DenseTraits*), or Fp8KvTraits<...> for an e4m3 cache.
template <typename T, class Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks)
    paged_prefill_kernel(const __grid_constant__ LaPagedPrefillParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int b = blockIdx.z, h = blockIdx.y;
  // Reverse order: under a causal mask the last query tiles have the most keys; start them
  // first so that the short tail tiles fill in at the end.
  const int m0 = (gridDim.x - 1 - blockIdx.x) * Tr::kBlockM;
  // Varlen: this sequence's rows start at cu_seqlens_q[b]; blocks past its count leave
  // (the whole block at once, before any barrier).
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int q0 = varlen ? p.cu_seqlens_q[b] : 0;
  const int sq = varlen ? p.cu_seqlens_q[b + 1] - q0 : p.q_len;
  if (m0 >= sq) return;
  const LaPagedCache &c = p.cache;
  const int kvh = h / (p.heads_q / c.heads_kv);
  const long long kv_head_off = (long long)kvh * c.head_dim;
  using KV = std::conditional_t<kFp8Tiles<Tr>, __nv_fp8_e4m3, T>;
  PagedPrefillProblem<T, Tr, KV> pb;
  const long long q_base = varlen ? (long long)q0 * p.q_row_stride : b * p.q_batch_stride;
  const long long o_base = varlen ? (long long)q0 * p.o_row_stride : b * p.o_batch_stride;
  pb.q = static_cast<const T *>(p.q) + q_base + h * p.q_head_stride;
  pb.o = static_cast<T *>(p.o) + o_base + h * p.o_head_stride;
  const long long lse_base =
      varlen ? (long long)h * p.total_q + q0 : ((long long)b * p.heads_q + h) * p.q_len;
  pb.lse = p.lse != nullptr ? p.lse + lse_base : nullptr;
  pb.kc = static_cast<const KV *>(c.k_cache) + kv_head_off;
  pb.vc = static_cast<const KV *>(c.v_cache) + kv_head_off;
  pb.pages = c.block_table + (long long)b * c.max_pages_per_seq;
  pb.q_row_stride = p.q_row_stride;
  pb.o_row_stride = p.o_row_stride;
  pb.page_size = c.page_size;
  pb.page_div = FastDiv(c.page_size);
  pb.slot_stride = c.heads_kv * c.head_dim;
  pb.m0 = m0;
  pb.sq = sq;
  pb.sk = c.seqlens_k[b];
  pb.mask = Mask{p.window_left, p.window_right, p.sinks};
  pb.scale = p.scale;
  pb.softcap = p.softcap;
  if constexpr (kFp8Tiles<Tr>) {
    // (q . k_e4m3) * (scale * k_scale); outputs times v_scale (kv_scales [2, heads_kv]).
    pb.scale = p.scale * p.kv_scales[kvh];
    pb.v_scale = p.kv_scales[c.heads_kv + kvh];
    pb.raw_smem = mma::smem_addr(smem_raw + Tr::kRawOff);
  }
  mma_attention<T, Tr>(pb, smem_raw);
}

template <typename T, class Tr>
cudaError_t launch(const LaPagedPrefillParams &p, cudaStream_t stream) {
  const dim3 grid((unsigned)(((long long)p.q_len + Tr::kBlockM - 1) / Tr::kBlockM), p.heads_q,
                  p.cache.batch);
  return launch_mma_kernel<Tr>(paged_prefill_kernel<T, Tr>, grid, stream, p);
}

template <typename T>
cudaError_t launch_for_dim(const LaPagedPrefillParams &p, cudaStream_t stream) {
  switch (p.cache.head_dim) {
    case 64: return launch<T, Traits64>(p, stream);
    case 128: return launch<T, Traits128>(p, stream);
    case 256: return launch<T, Traits256>(p, stream);
  }
  return cudaErrorInvalidValue;
}

// The e4m3 cache (kv_dtype LA_F8E4M3).
template <typename T>
cudaError_t launch_fp8_for_dim(const LaPagedPrefillParams &p, cudaStream_t stream) {
  switch (p.cache.head_dim) {
    case 64: return launch<T, Fp8Traits64>(p, stream);
    case 128: return launch<T, Fp8Traits128>(p, stream);
    case 256: return launch<T, Fp8Traits256>(p, stream);
  }
  return cudaErrorInvalidValue;
}

// The scalar arguments the Rust API validates (what lives in device memory, the tables,
// cannot be checked here; see check.cuh).
bool params_ok(const LaPagedPrefillParams &p) {
  const LaPagedCache &c = p.cache;
  const int d = c.head_dim;
  // Slots (page * page_size + offset) are 32-bit in load_kv.
  return dims_ok(c) && (long long)c.num_pages * c.page_size <= INT_MAX &&
         (d == 64 || d == 128 || d == 256) && p.q_len > 0 && p.q != nullptr &&
         (p.cu_seqlens_q == nullptr || p.total_q >= 0) &&
         p.o != nullptr && p.heads_q <= 65535 && check::heads(p.heads_q, c.heads_kv, d) &&
         check::mask(p.window_left, p.window_right, p.sinks) &&
         check::scoring(p.scale, p.softcap) &&
         check::strides(p.q_batch_stride, p.q_row_stride, p.q_head_stride) &&
         check::strides(p.o_batch_stride, p.o_row_stride, p.o_head_stride);
}

}  // namespace

bool paged_prefill_params_ok(const LaPagedPrefillParams &p) { return params_ok(p); }

}  // namespace longattn

extern "C" int la_paged_prefill(const LaPagedPrefillParams *params, cudaStream_t stream) {
  using namespace longattn;
  if (params == nullptr || !params_ok(*params)) return cudaErrorInvalidValue;
  // The cache holds q's dtype, or e4m3 with its scales.
  const bool fp8 = params->kv_dtype == LA_F8E4M3 && params->kv_scales != nullptr;
  if (params->kv_dtype != params->dtype && !fp8) return cudaErrorInvalidValue;
  return with_dtype<__half, __nv_bfloat16>(params->dtype, cudaErrorInvalidValue, [&](auto t) {
    using T = typename decltype(t)::type;
    return fp8 ? launch_fp8_for_dim<T>(*params, stream) : launch_for_dim<T>(*params, stream);
  });
}
