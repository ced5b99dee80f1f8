// Block-sparse tensor-core attention (mma.sync m16n8k16, f32 accumulation, sm_80+).
// NOT YET VERIFIED ON A GPU: compiled without spills, reachable only through the explicit
// BlockSparseAttention::forward_gpu.
//
// The shared FlashAttention-2 mainloop (longattn/mma_mainloop.cuh) with the block-sparse
// problem, which is all this file writes:
// - rows: block x owns 64 query rows of one (sequence, query head) (fixed or varlen, as the
//   dense kernels: seq_info), which lie inside one query block since block_m is a multiple
//   of 64; the tiles run in reverse order (causal-like masks give the last rows the longest
//   lists, and they start first);
// - schedule: the query block's CSR list (LaBlockSparseParams), each listed key block cut
//   into block_n / kBlockN key tiles; the last listed block (indices are sorted, so only it
//   can be the sequence's short last block) loses its tiles past the end. Tile t's key block
//   and kind are read from global memory per tile (indices[t / tiles_per_block], a few bytes
//   the prefetch of that tile already pulled into L1);
// - mask: a tile of a full block masks only keys past the end; a tile of a partial block
//   skips the mask when it is interior to the window for every row of the warp (as the
//   dense mma kernel), else applies j <= hi && (j >= lo || j < sinks) per element.

#include "longattn/block_sparse.h"
#include "longattn/check.cuh"
#include "longattn/common.cuh"
#include "longattn/dense_tensors.cuh"
#include "longattn/dispatch.cuh"
#include "longattn/mma_mainloop.cuh"

namespace longattn {
namespace {

// The dense mma kernel's configurations (kernels/dense_mma.cu).
using Traits64 = MmaTraits<64, 64, 3, true, 3>;     // 56 KB shared
using Traits128 = MmaTraits<128, 64, 2, true, 2>;   // 80 KB shared
using Traits256 = MmaTraits<256, 32, 2, false, 1>;  // 96 KB shared

// Query rows [m0, m0 + 64) of one (sequence, query head) over the listed key blocks.
template <typename T, class Tr>
struct BlockSparseProblem {
  static constexpr int BN = Tr::kBlockN;
  const LaBlockSparseParams &p;
  const T *q, *k, *v;
  T *o;
  long long list_index;  // this query block's list, or -1 (no list: no key visible)
  int m0, sq, sk;
  long long lse_base;
  int tiles_per_block;   // block_n / BN
  float scale, softcap;
  // Filled by schedule(): this list's entries.
  const int32_t *indices;
  const uint8_t *full;
  int count;
  // This thread's two rows: key j is visible iff j <= hi && (j >= lo || j < sinks) (the
  // dense mma kernel's bounds); the warp's first and last rows' diagonals for the
  // interior-tile test.
  int hi[2], lo[2];
  long long diag_first, diag_last;

  __device__ __forceinline__ void load_q(uint32_t q_smem, int tid) {
    load_rows<Tr, Tr::kBlockM>(q_smem, q, p.dense.q_row_stride, m0, sq, tid);
  }
  // The list's extent and tile count (read after the Q copies are issued).
  __device__ __forceinline__ int schedule() {
    count = 0;
    indices = p.indices;
    full = p.full;
    if (list_index < 0) return 0;
    const int off = p.offsets[list_index];
    count = p.offsets[list_index + 1] - off;
    indices += off;
    full += off;
    if (count <= 0) return 0;
    // Tiles of the last listed block past the sequence's end are not visited. (An index past
    // the end, which the Rust API refuses, keeps all its tiles: key0 sends them past sk,
    // where they are zero-filled and fully masked.)
    const long long start = (long long)indices[count - 1] * p.block_n;
    int drop = 0;
    if (start < sk && start + p.block_n > sk)
      drop = tiles_per_block - (int)((sk - start + BN - 1) / BN);
    return count * tiles_per_block - drop;
  }
  // First key of tile t; sk for a key block outside [0, sk) (never read: zero-filled).
  __device__ __forceinline__ int key0(int t) const {
    const int e = t / tiles_per_block, sub = t - e * tiles_per_block;
    const int kb = indices[e];
    const long long n0 = (long long)kb * p.block_n + sub * BN;
    return (kb < 0 || n0 >= sk) ? sk : (int)n0;
  }
  __device__ __forceinline__ void load_kv(uint32_t k_smem, uint32_t v_smem, int t, int tid) {
    const int n0 = key0(t);
    load_rows<Tr, BN>(k_smem, k, p.dense.k_row_stride, n0, sk, tid);
    load_rows<Tr, BN>(v_smem, v, p.dense.v_row_stride, n0, sk, tid);
  }
  __device__ __forceinline__ void prepare_rows(int warp, int g) {
    const int warp_row0 = m0 + 16 * warp;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const long long diag = (long long)(warp_row0 + g + 8 * r) + sk - sq;
      long long hr = sk - 1;
      if (p.dense.window_right >= 0) hr = min(hr, diag + p.dense.window_right);
      long long lr = 0;
      if (p.dense.window_left >= 0)
        lr = min(max(diag - p.dense.window_left, 0LL), (long long)sk);
      hi[r] = (int)max(hr, -1LL);
      lo[r] = (int)lr;
    }
    const int warp_last = min(warp_row0 + 15, sq - 1);
    diag_first = (long long)warp_row0 + sk - sq;
    diag_last = (long long)warp_last + sk - sq;
  }
  __device__ __forceinline__ void mask_tile(float (&sc)[Tr::kSBlocks][4], int t, int n0,
                                            int tq) const {
    const int n_end = n0 + BN;
    if (full[t / tiles_per_block] != 0) {
      // Full block: every key of it up to the sequence's end.
      if (n_end <= sk) return;
#pragma unroll
      for (int i = 0; i < Tr::kSBlocks; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (n0 + 8 * i + 2 * tq + (e & 1) >= sk) sc[i][e] = kNegInf;
      return;
    }
    // Partial block: the window/sinks mask, skipped on tiles interior for the warp's rows.
    const int wl = p.dense.window_left, wr = p.dense.window_right, sinks = p.dense.sinks;
    const bool interior = n_end <= sk && (wr < 0 || (long long)n_end - 1 <= diag_first + wr) &&
                          (wl < 0 || (long long)n0 >= diag_last - wl || n_end <= sinks);
    if (interior) return;
#pragma unroll
    for (int i = 0; i < Tr::kSBlocks; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = n0 + 8 * i + 2 * tq + (e & 1), r = e >> 1;
        if (!(j <= hi[r] && (j >= lo[r] || j < sinks))) sc[i][e] = kNegInf;
      }
  }
  __device__ __forceinline__ void store_o(int row, int chunk, const uint4 *staged) {
    const int i = m0 + row;
    if (i < sq) *reinterpret_cast<uint4 *>(o + i * p.dense.o_row_stride + chunk * 8) = *staged;
  }
  __device__ __forceinline__ bool has_lse() const { return p.dense.lse != nullptr; }
  __device__ __forceinline__ void store_lse(int row, float lse) {
    const int i = m0 + row;
    if (i < sq) p.dense.lse[lse_base + i] = lse;
  }
};

template <typename T, class Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks)
    block_sparse_mma_kernel(const __grid_constant__ LaBlockSparseParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int b = blockIdx.z, h = blockIdx.y;
  const SeqInfo s = seq_info(p.dense, b, h);
  const int m0 = (gridDim.x - 1 - blockIdx.x) * Tr::kBlockM;
  if (m0 >= s.sq) return;
  const HeadTensors<T> head = head_tensors<T>(p.dense, s, b, h);
  const int qb = m0 / p.block_m;
  const int mb = p.mask_batch == 1 ? 0 : b, mh = p.mask_heads == 1 ? 0 : h;
  const long long list =
      qb < p.num_q_blocks ? ((long long)mb * p.mask_heads + mh) * p.num_q_blocks + qb : -1;
  BlockSparseProblem<T, Tr> pb{p,
                               head.q,
                               head.k,
                               head.v,
                               head.o,
                               list,
                               m0,
                               s.sq,
                               s.sk,
                               s.lse_base,
                               p.block_n / Tr::kBlockN,
                               p.dense.scale,
                               p.dense.softcap};
  mma_attention<T, Tr>(pb, smem_raw);
}

template <typename T, class Tr>
cudaError_t launch(const LaBlockSparseParams &p, cudaStream_t stream) {
  auto kernel = block_sparse_mma_kernel<T, Tr>;
  if (device_unsupported_reason(reinterpret_cast<const void *>(kernel), Tr::kSmemBytes,
                                [](int major, int) { return major >= 8; }) != nullptr)
    return cudaErrorNotSupported;
  const cudaError_t err = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Tr::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.dense.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, p.dense.heads_q,
                  p.dense.batch);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

constexpr int kGridLimit = 65535;  // grid y (heads) and z (batch)

// The dense params' checks (la_dense_forward's), with the pointers a launch reads.
bool dense_ok(const LaDenseParams &p) {
  if (!check::dtype(p.dtype)) return false;
  if (p.batch < 0 || p.seqlen_q < 0 || p.seqlen_k < 0 || p.total_q < 0 || p.total_k < 0)
    return false;
  if (p.batch > kGridLimit || p.heads_q > kGridLimit) return false;
  if (!check::heads(p.heads_q, p.heads_kv, p.head_dim)) return false;
  if (!check::mask(p.window_left, p.window_right, p.sinks)) return false;
  if (!check::scoring(p.scale, p.softcap)) return false;
  if (!check::strides(p.q_batch_stride, p.q_row_stride, p.q_head_stride) ||
      !check::strides(p.k_batch_stride, p.k_row_stride, p.k_head_stride) ||
      !check::strides(p.v_batch_stride, p.v_row_stride, p.v_head_stride) ||
      !check::strides(p.o_batch_stride, p.o_row_stride, p.o_head_stride))
    return false;
  if ((p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr)) return false;
  const bool work = p.batch > 0 && p.seqlen_q > 0;
  return !work || (p.q != nullptr && p.o != nullptr &&
                   (p.seqlen_k == 0 || (p.k != nullptr && p.v != nullptr)));
}

long long blocks_of(int32_t len, int32_t block) { return ((long long)len + block - 1) / block; }

// Every check that needs no device memory (the lists' contents are the Rust side's).
bool params_ok(const LaBlockSparseParams &p) {
  const LaDenseParams &d = p.dense;
  if (!dense_ok(d)) return false;
  if (p.block_m <= 0 || p.block_n <= 0 || p.block_m % 64 != 0 || p.block_n % 64 != 0)
    return false;
  if (p.mask_batch < 1 || (p.mask_batch != 1 && p.mask_batch != d.batch)) return false;
  if (p.mask_heads < 1 || (p.mask_heads != 1 && p.mask_heads != d.heads_q)) return false;
  if (p.num_q_blocks != blocks_of(d.seqlen_q, p.block_m) ||
      p.num_k_blocks != blocks_of(d.seqlen_k, p.block_n))
    return false;
  const long long lists = (long long)p.mask_batch * p.mask_heads * p.num_q_blocks;
  if (lists >= INT32_MAX) return false;
  const bool work = d.batch > 0 && d.seqlen_q > 0;
  return !work || (p.offsets != nullptr && p.indices != nullptr && p.full != nullptr);
}

}  // namespace
}  // namespace longattn

extern "C" int la_block_sparse_mma_forward(const LaBlockSparseParams *params,
                                           cudaStream_t stream) {
  using namespace longattn;
  static_assert(LA_DENSE_KERNEL_UNSUPPORTED == cudaErrorNotSupported, "documented in dense.h");
  if (params == nullptr || !params_ok(*params)) return cudaErrorInvalidValue;
  const LaBlockSparseParams &p = *params;
  if (p.dense.batch == 0 || p.dense.seqlen_q == 0) return cudaSuccess;
  cudaError_t err = cudaErrorNotSupported;  // f32, or a head_dim without a configuration
  with_head_dim_config<Traits64, Traits128, Traits256>(p.dense, [&](auto t, auto tr) {
    err = launch<typename decltype(t)::type, typename decltype(tr)::type>(p, stream);
  });
  return err;
}
