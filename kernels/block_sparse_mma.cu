// Block-sparse tensor-core attention (mma.sync m16n8k16, f32 accumulation, sm_80+).
// Verified on an H200 (sm_90a build) on 2026-12-04: GPU tests, compute-sanitizer memcheck
// and racecheck clean; the sm_80 build has not run on a GPU. Reachable only through the
// explicit BlockSparseAttention::forward_gpu.
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
#include "longattn/common.cuh"
#include "longattn/dense_mask.cuh"
#include "longattn/dense_tensors.cuh"
#include "longattn/dispatch.cuh"
#include "longattn/mma_mainloop.cuh"

namespace longattn {
namespace {

using Traits64 = DenseTraits64;
using Traits128 = DenseTraits128;
using Traits256 = DenseTraits256;

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
  WarpWindowMask<Tr> window;  // prepare_rows(): the options' mask of this warp's rows

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
    const LaDenseParams &d = p.dense;
    window.prepare(Mask{d.window_left, d.window_right, d.sinks}, m0 + 16 * warp, g, sq, sk);
  }
  __device__ __forceinline__ void mask_tile(float (&sc)[Tr::kSBlocks][4], int t, int n0,
                                            int tq) const {
    if (full[t / tiles_per_block] == 0) {
      window.apply(sc, n0, tq);  // partial block: the options' mask
      return;
    }
    // Full block: every key of it up to the sequence's end.
    if (n0 + BN <= sk) return;
#pragma unroll
    for (int i = 0; i < Tr::kSBlocks; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (n0 + 8 * i + 2 * tq + (e & 1) >= sk) sc[i][e] = kNegInf;
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
  const dim3 grid((p.dense.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, p.dense.heads_q,
                  p.dense.batch);
  return launch_mma_kernel<Tr>(block_sparse_mma_kernel<T, Tr>, grid, stream, p);
}

constexpr int kGridLimit = 65535;  // grid y (heads) and z (batch)

long long blocks_of(int32_t len, int32_t block) { return ((long long)len + block - 1) / block; }

}  // namespace

// Every check that needs no device memory (the lists' contents are the Rust side's); shared
// with block_sparse_wgmma.cu (dispatch.cuh).
bool block_sparse_params_ok(const LaBlockSparseParams &p) {
  const LaDenseParams &d = p.dense;
  if (!dense_params_ok(&d) || d.batch > kGridLimit || d.heads_q > kGridLimit) return false;
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

}  // namespace longattn

extern "C" int la_block_sparse_mma_forward(const LaBlockSparseParams *params,
                                           cudaStream_t stream) {
  using namespace longattn;
  static_assert(LA_DENSE_KERNEL_UNSUPPORTED == cudaErrorNotSupported, "documented in dense.h");
  if (params == nullptr || !block_sparse_params_ok(*params)) return cudaErrorInvalidValue;
  const LaBlockSparseParams &p = *params;
  if (p.dense.batch == 0 || p.dense.seqlen_q == 0) return cudaSuccess;
  cudaError_t err = cudaErrorNotSupported;  // f32, or a head_dim without a configuration
  with_head_dim_config<Traits64, Traits128, Traits256>(p.dense, [&](auto t, auto tr) {
    err = launch<typename decltype(t)::type, typename decltype(tr)::type>(p, stream);
  });
  return err;
}
