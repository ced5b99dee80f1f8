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

#include <climits>

#include "longattn/check.cuh"
#include "longattn/common.cuh"
#include "longattn/dense_mask.cuh"
#include "longattn/dispatch.cuh"
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

template <typename T, class Tr>
struct PagedPrefillProblem {
  const T *q;            // row 0 of this (sequence, query head)
  T *o;                  // row 0 of this (sequence, query head)
  float *lse;            // LSE of row 0 of this (sequence, query head), or nullptr
  const T *kc, *vc;      // cache base + kv head offset
  const int32_t *pages;  // this sequence's block-table row
  long long q_row_stride, o_row_stride;
  int page_size, slot_stride;  // slot_stride = heads_kv * head_dim
  FastDiv page_div;            // j / page_size in a multiply-shift
  int m0, sq, sk;
  Mask mask;
  float scale, softcap;
  WindowTiles tiles;
  WarpWindowMask<Tr> window;  // prepare_rows(): the mask of this warp's rows

  __device__ __forceinline__ void load_q(uint32_t q_smem, int tid) {
    load_rows<Tr, Tr::kBlockM>(q_smem, q, q_row_stride, m0, sq, tid);
  }
  __device__ __forceinline__ int schedule() {
    // (64-bit: m0 + kBlockM may pass INT_MAX for q_len near it.)
    const int row_end = (int)min((long long)m0 + Tr::kBlockM, (long long)sq);
    tiles = WindowTiles::of(mask, m0, row_end, sq, sk, Tr::kBlockN);
    return tiles.count();
  }
  __device__ __forceinline__ int key0(int t) const { return tiles.key0(t); }
  // Tile t: keys [n0, n0 + kBlockN), each row's address through the page table. All of this
  // thread's table reads issue first, then the copies: cp.async carries a "memory" clobber,
  // so a table read written after one waits for it, and the reads of one tile would run one
  // after another (the first H200 run measured 0.59-0.62x of the dense kernel so).
  __device__ __forceinline__ void load_kv(uint32_t k_smem, uint32_t v_smem, int t, int tid) {
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
  __device__ __forceinline__ bool has_lse() const { return lse != nullptr; }
  __device__ __forceinline__ void store_lse(int row, float value) {
    const int i = m0 + row;
    if (i < sq) lse[i] = value;
  }
};

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
  PagedPrefillProblem<T, Tr> pb;
  const long long q_base = varlen ? (long long)q0 * p.q_row_stride : b * p.q_batch_stride;
  const long long o_base = varlen ? (long long)q0 * p.o_row_stride : b * p.o_batch_stride;
  pb.q = static_cast<const T *>(p.q) + q_base + h * p.q_head_stride;
  pb.o = static_cast<T *>(p.o) + o_base + h * p.o_head_stride;
  const long long lse_base =
      varlen ? (long long)h * p.total_q + q0 : ((long long)b * p.heads_q + h) * p.q_len;
  pb.lse = p.lse != nullptr ? p.lse + lse_base : nullptr;
  pb.kc = static_cast<const T *>(c.k_cache) + kv_head_off;
  pb.vc = static_cast<const T *>(c.v_cache) + kv_head_off;
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
}  // namespace longattn

extern "C" int la_paged_prefill(const LaPagedPrefillParams *params, cudaStream_t stream) {
  using namespace longattn;
  if (params == nullptr || !params_ok(*params)) return cudaErrorInvalidValue;
  return with_dtype<__half, __nv_bfloat16>(params->dtype, cudaErrorInvalidValue, [&](auto t) {
    return launch_for_dim<typename decltype(t)::type>(*params, stream);
  });
}
