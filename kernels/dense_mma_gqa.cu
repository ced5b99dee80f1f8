// Tensor-core dense attention with the query heads of a GQA group packed into one tile
// (mma.sync on the shared mainloop, sm_80+), for short query sequences: chunked prefill,
// speculative decoding, seqlen_q of 1-32 over a long K/V (issue 16 item 1). The dense
// kernels give each (sequence, query head) its own 64-row tile, so 4 query rows leave 94% of
// the tile's rows empty while every row of the tile still pays for the K/V it streams. Here
// the G = heads_q / heads_kv heads that share a kv head share the tile instead: row r of a
// block is query position m0 + r / G of head kvh * G + r % G, so a block covers 64 / G
// positions of all G heads and streams the kv head's K/V once for all of them.
//
// The dense problem otherwise (mask, schedule, head-dim padding to the 64/128/256 tile):
// rows are gathered per (position, head) by cp.async, the key-tile schedule covers the
// block's positions, and the window mask is per row position (WarpWindowMask::
// prepare_positions). G <= 64; head_dim any multiple of 8 up to 256.
// Compiled, **not yet run on a GPU**: reached only through LA_DENSE_MMA_GQA (never AUTO).

#include "longattn/common.cuh"
#include "longattn/dense_mask.cuh"
#include "longattn/dense_tensors.cuh"
#include "longattn/dispatch.cuh"
#include "longattn/mask.cuh"
#include "longattn/mma_mainloop.cuh"
#include "longattn/schedule.cuh"

namespace longattn {
namespace {

// Query positions [m0, m0 + positions) of every head of kv head `kvh` of one sequence.
template <typename T, class Tr>
struct DenseGqaProblem {
  const LaDenseParams &p;
  SeqInfo s;
  int b, kvh, group, m0, positions;
  int chunks;  // 16-byte chunks of the caller's rows: head_dim / 8 <= Tr::kChunksPerRow
  float scale = p.scale, softcap = p.softcap;
  WindowTiles tiles;          // schedule()
  WarpWindowMask<Tr> window;  // prepare_rows()

  // Tile row r: position m0 + r / group of query head kvh * group + r % group; false for a
  // padding row (past positions * group, or past the sequence).
  __device__ __forceinline__ bool row(int r, int &pos, int &head) const {
    const int k = r / group;
    pos = m0 + k;
    head = kvh * group + (r - k * group);
    return k < positions && pos < s.sq;
  }
  __device__ __forceinline__ long long q_offset(int pos, int head) const {
    return b * p.q_batch_stride + (s.q_row0 + pos) * p.q_row_stride + head * p.q_head_stride;
  }
  __device__ __forceinline__ void load_q(uint32_t q_smem, int tid) {
    const int chunk = tid % Tr::kChunksPerRow, r0 = tid / Tr::kChunksPerRow;
    const T *q = static_cast<const T *>(p.q);
#pragma unroll
    for (int pass = 0; pass < Tr::kBlockM / Tr::kRowsPerPass; ++pass) {
      const int r = r0 + pass * Tr::kRowsPerPass;
      int pos, head;
      const bool ok = row(r, pos, head) && chunk < chunks;
      const T *src = ok ? q + q_offset(pos, head) + chunk * 8 : q;
      mma::cp_async_16(q_smem + swizzled_elem<Tr::kHeadDim>(r, chunk) * (int)sizeof(T), src, ok);
    }
  }
  __device__ __forceinline__ int schedule() {
    const Mask mask{p.window_left, p.window_right, p.sinks};
    tiles = WindowTiles::of(mask, m0, min(m0 + positions, s.sq), s.sq, s.sk, Tr::kBlockN);
    return tiles.count();
  }
  __device__ __forceinline__ int key0(int t) const { return tiles.key0(t); }
  __device__ __forceinline__ void load_kv(uint32_t k_smem, uint32_t v_smem, int t, int tid) {
    const int n0 = key0(t);
    const T *k = static_cast<const T *>(p.k) + b * p.k_batch_stride + s.k_row0 * p.k_row_stride +
                 kvh * p.k_head_stride;
    const T *v = static_cast<const T *>(p.v) + b * p.v_batch_stride + s.k_row0 * p.v_row_stride +
                 kvh * p.v_head_stride;
    load_rows<Tr, Tr::kBlockN>(k_smem, k, p.k_row_stride, n0, s.sk, tid, chunks);
    load_rows<Tr, Tr::kBlockN>(v_smem, v, p.v_row_stride, n0, s.sk, tid, chunks);
  }
  // This thread's rows 16 warp + g (+ 8) sit at positions m0 + row / group; padding rows get
  // the last valid position (their scores are never stored).
  __device__ __forceinline__ void prepare_rows(int warp, int g) {
    const int last = min(m0 + positions, s.sq) - 1;
    int pos[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) pos[r] = min(m0 + (16 * warp + g + 8 * r) / group, last);
    const int first = min(m0 + (16 * warp) / group, last);
    const int warp_last = min(m0 + (16 * warp + 15) / group, last);
    window.prepare_positions(Mask{p.window_left, p.window_right, p.sinks}, pos, first, warp_last,
                             s.sq, s.sk);
  }
  __device__ __forceinline__ void mask_tile(float (&sc)[Tr::kSBlocks][4], int, int n0,
                                            int tq) const {
    window.apply(sc, n0, tq);
  }
  __device__ __forceinline__ void store_o(int r, int chunk, const uint4 *staged) {
    int pos, head;
    if (!row(r, pos, head) || chunk >= chunks) return;
    T *o = static_cast<T *>(p.o) + b * p.o_batch_stride + (s.q_row0 + pos) * p.o_row_stride +
           head * p.o_head_stride;
    *reinterpret_cast<uint4 *>(o + chunk * 8) = *staged;
  }
  __device__ __forceinline__ bool has_lse() const { return p.lse != nullptr; }
  // LSE layout of seq_info: (b, h, row) at ((b * heads_q + h) * seqlen_q + row), or packed
  // (h * total_q + q_row0 + row) for varlen.
  __device__ __forceinline__ void store_lse(int r, float lse) {
    int pos, head;
    if (!row(r, pos, head)) return;
    const long long base = p.cu_seqlens_q != nullptr
                               ? (long long)head * p.total_q + s.q_row0
                               : ((long long)b * p.heads_q + head) * p.seqlen_q;
    p.lse[base + pos] = lse;
  }
};

// Block (x, kvh, b): positions [m0, m0 + positions) of every head of kv head kvh, m0 in
// reverse order (with a causal mask the last positions have the most keys).
template <typename T, class Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks)
    dense_mma_gqa_kernel(const __grid_constant__ LaDenseParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int b = blockIdx.z, kvh = blockIdx.y;
  const int group = p.heads_q / p.heads_kv, positions = Tr::kBlockM / group;
  const SeqInfo s = seq_info(p, b, kvh * group);
  const int m0 = (gridDim.x - 1 - blockIdx.x) * positions;
  if (m0 >= s.sq) return;
  DenseGqaProblem<T, Tr> pb{p, s, b, kvh, group, m0, positions, p.head_dim / 8};
  mma_attention<T, Tr>(pb, smem_raw);
}

}  // namespace

const char *dense_mma_gqa_unsupported_reason(const LaDenseParams &p) {
  if (p.heads_q / p.heads_kv > DenseTraits64::kBlockM)
    return "it packs at most 64 query heads per kv head into a tile";
  if (p.head_dim % 8 != 0) return "it takes head_dim a multiple of 8 only";
  size_t smem = 0;
  const void *kernel = nullptr;
  const bool known = with_padded_config(p.head_dim, p.dtype, [&](auto t, auto tr) {
    using Tr = typename decltype(tr)::type;
    smem = Tr::kSmemBytes;
    kernel = reinterpret_cast<const void *>(dense_mma_gqa_kernel<typename decltype(t)::type, Tr>);
  });
  if (!known) return "it takes f16 or bf16 with head_dim up to 256 only";
  return device_unsupported_reason(kernel, smem, [](int major, int) { return major >= 8; });
}

cudaError_t dense_mma_gqa_forward(const LaDenseParams &p, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  if (p.head_dim % 8 != 0) return err;
  with_padded_config(p.head_dim, p.dtype, [&](auto t, auto tr) {
    using Tr = typename decltype(tr)::type;
    auto kernel = dense_mma_gqa_kernel<typename decltype(t)::type, Tr>;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               (int)Tr::kSmemBytes);
    if (err != cudaSuccess) return;
    const int positions = Tr::kBlockM / (p.heads_q / p.heads_kv);
    const dim3 grid((p.seqlen_q + positions - 1) / positions, p.heads_kv, p.batch);
    kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
    err = cudaGetLastError();
  });
  return err;
}

}  // namespace longattn
