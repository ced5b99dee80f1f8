// Tensor-core dense attention on the shared mainloop (mma.sync m16n8k16, sm_80+), for any
// head_dim that is a multiple of 8 up to 256: LA_DENSE_MMA (head dims 64/128/256),
// LA_DENSE_MMA_PADDED (any), and AUTO wherever the Hopper kernel does not run. Verified on an
// H200 (sm_90a build, 2026-12-04: GPU tests and memcheck; the sm_80 build has not run).
//
// The dense problem for mma_attention (longattn/mma_mainloop.cuh): 64 query rows of one
// (sequence, head), key tiles from the mask's schedule (WindowTiles: sink tiles, then the
// window), per-element masking only on tiles that are not fully visible to the warp's rows.
// The head dim is padded inside the kernel to the tile's (64, 128 or 256), as
// FlashAttention-2 does: the 16-byte chunks past head_dim are zero-filled by the copies
// (they add 0 to Q K^T and give 0 columns of O) and are never written back, so the caller's
// tensors are read and written at their own head_dim (docs/design/kernels.md).
//
// Head dims that are not a multiple of 8 (59, 111, ...): rows are then not 16-byte aligned,
// so the problem's element-wise flavour moves them element by element through registers (synchronous loads
// into the same swizzled tiles, elements past head_dim zero; stores of the valid elements
// only). Same mainloop, same tiles; compiled, **not yet run on a GPU**, reached only through
// LA_DENSE_MMA_PADDED (never AUTO): dense_mma_padded_kernel<T, Tr, true>.

#include "longattn/common.cuh"
#include "longattn/dense_mask.cuh"
#include "longattn/dense_tensors.cuh"
#include "longattn/dispatch.cuh"
#include "longattn/mask.cuh"
#include "longattn/mma_mainloop.cuh"
#include "longattn/schedule.cuh"

namespace longattn {
namespace {

// Rows [row0, row0 + kRows) of a (rows, head_dim) global tile of 2-byte T with element row
// stride `stride`, element by element into the swizzled shared tile at `dst` (the thread ->
// (row, chunk) mapping of load_rows); elements past head_dim and rows >= valid_rows are zero.
// Synchronous: the mainloop's barrier before a tile is read orders these stores.
template <class Tr, int kRows, typename T>
__device__ __forceinline__ void load_rows_elementwise(uint32_t dst, const T *src, long long stride,
                                                      int row0, int valid_rows, int tid,
                                                      int head_dim) {
  constexpr int kCpr = Tr::kChunksPerRow;
  const int chunk = tid % kCpr, r0 = tid / kCpr;
  const int valid = min(max(head_dim - chunk * 8, 0), 8);  // elements of this chunk
  const unsigned short *s = reinterpret_cast<const unsigned short *>(src);
  // Rows in flight per iteration, as many as the registers left by the O accumulator allow
  // without spilling (ptxas, sm_80 and sm_90a): all at d128, 2 at d64 (168-register cap of 3
  // blocks per SM), 1 at d256 (128 accumulator registers).
  constexpr int kUnroll = Tr::kHeadDim == 128 ? kRows / Tr::kRowsPerPass : Tr::kHeadDim == 64 ? 2 : 1;
#pragma unroll kUnroll
  for (int pass = 0; pass < kRows / Tr::kRowsPerPass; ++pass) {
    const int r = r0 + pass * Tr::kRowsPerPass;
    const bool ok = row0 + r < valid_rows;
    const unsigned short *row = s + (long long)(row0 + r) * stride + chunk * 8;
    uint32_t w[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const uint32_t lo = ok && 2 * e < valid ? row[2 * e] : 0u;
      const uint32_t hi = ok && 2 * e + 1 < valid ? row[2 * e + 1] : 0u;
      w[e] = lo | (hi << 16);
    }
    const uint32_t a = dst + swizzled_elem<Tr::kHeadDim>(r, chunk) * (int)sizeof(T);
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(a), "r"(w[0]), "r"(w[1]),
                 "r"(w[2]), "r"(w[3]));
  }
}

// Query rows [m0, m0 + kBlockM) of one (sequence, head) against its keys under the mask.
// kElementwise: head_dim is not a multiple of 8, rows move element by element (file comment).
template <typename T, class Tr, bool kElementwise>
struct DenseProblem {
  const LaDenseParams &p;
  SeqInfo s;
  HeadTensors<T> head;
  int m0;
  int chunks;  // 16-byte chunks of the caller's rows (the last one partial if kElementwise)
  float scale = p.scale, softcap = p.softcap;
  WindowTiles tiles;         // schedule()
  WarpWindowMask<Tr> window;  // prepare_rows()

  // Rows past the sequence and elements past head_dim are zero.
  __device__ __forceinline__ void load_tile(uint32_t dst, const T *src, long long stride, int row0,
                                            int valid_rows, int tid) {
    if constexpr (kElementwise) {
      load_rows_elementwise<Tr, Tr::kBlockN>(dst, src, stride, row0, valid_rows, tid, p.head_dim);
    } else {
      load_rows<Tr, Tr::kBlockN>(dst, src, stride, row0, valid_rows, tid, chunks);
    }
  }
  __device__ __forceinline__ void load_q(uint32_t q_smem, int tid) {
    if constexpr (kElementwise) {
      load_rows_elementwise<Tr, Tr::kBlockM>(q_smem, head.q, p.q_row_stride, m0, s.sq, tid,
                                             p.head_dim);
    } else {
      load_rows<Tr, Tr::kBlockM>(q_smem, head.q, p.q_row_stride, m0, s.sq, tid, chunks);
    }
  }
  __device__ __forceinline__ int schedule() {
    const Mask mask{p.window_left, p.window_right, p.sinks};
    tiles = WindowTiles::of(mask, m0, min(m0 + Tr::kBlockM, s.sq), s.sq, s.sk, Tr::kBlockN);
    return tiles.count();
  }
  __device__ __forceinline__ int key0(int t) const { return tiles.key0(t); }
  __device__ __forceinline__ void load_kv(uint32_t k_smem, uint32_t v_smem, int t, int tid) {
    const int n0 = key0(t);
    load_tile(k_smem, head.k, p.k_row_stride, n0, s.sk, tid);
    load_tile(v_smem, head.v, p.v_row_stride, n0, s.sk, tid);
  }
  __device__ __forceinline__ void prepare_rows(int warp, int g) {
    window.prepare(Mask{p.window_left, p.window_right, p.sinks}, m0 + 16 * warp, g, s.sq, s.sk);
  }
  __device__ __forceinline__ void mask_tile(float (&sc)[Tr::kSBlocks][4], int, int n0,
                                            int tq) const {
    window.apply(sc, n0, tq);
  }
  __device__ __forceinline__ void store_o(int row, int chunk, const uint4 *staged) {
    const int i = m0 + row;
    if constexpr (kElementwise) {
      // Only the valid elements, 2 bytes at a time (rows are not 16-byte aligned).
      if (i >= s.sq || chunk >= chunks) return;
      const uint4 v = *staged;
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
      unsigned short *o =
          reinterpret_cast<unsigned short *>(head.o + i * p.o_row_stride + chunk * 8);
      const int valid = min(p.head_dim - chunk * 8, 8);
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (e < valid) o[e] = (unsigned short)(w[e / 2] >> (16 * (e % 2)));
    } else {
      if (i < s.sq && chunk < chunks)
        *reinterpret_cast<uint4 *>(head.o + i * p.o_row_stride + chunk * 8) = *staged;
    }
  }
  __device__ __forceinline__ bool has_lse() const { return p.lse != nullptr; }
  __device__ __forceinline__ void store_lse(int row, float lse) {
    const int i = m0 + row;
    if (i < s.sq) p.lse[s.lse_base + i] = lse;
  }
};

template <typename T, class Tr, bool kElementwise>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks)
    dense_mma_padded_kernel(const __grid_constant__ LaDenseParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int b = blockIdx.z, h = blockIdx.y;
  const SeqInfo s = seq_info(p, b, h);
  // Reverse order: with a causal mask the last query tiles have the most keys.
  const int m0 = (gridDim.x - 1 - blockIdx.x) * Tr::kBlockM;
  if (m0 >= s.sq) return;
  DenseProblem<T, Tr, kElementwise> pb{p, s, head_tensors<T>(p, s, b, h), m0,
                                       kElementwise ? (p.head_dim + 7) / 8 : p.head_dim / 8};
  mma_attention<T, Tr>(pb, smem_raw);
}

}  // namespace

// The kernel of `p`'s head dim: the element-wise one where it is not a multiple of 8.
template <typename T, class Tr>
auto *kernel_for(const LaDenseParams &p) {
  return p.head_dim % 8 == 0 ? dense_mma_padded_kernel<T, Tr, false>
                             : dense_mma_padded_kernel<T, Tr, true>;
}

const char *dense_mma_padded_unsupported_reason(const LaDenseParams &p) {
  size_t smem = 0;
  const void *kernel = nullptr;
  const bool known = with_padded_config(p.head_dim, p.dtype, [&](auto t, auto tr) {
    using Tr = typename decltype(tr)::type;
    smem = Tr::kSmemBytes;
    kernel = reinterpret_cast<const void *>(kernel_for<typename decltype(t)::type, Tr>(p));
  });
  if (!known) return "it takes f16 or bf16 with head_dim up to 256 only";
  return device_unsupported_reason(kernel, smem, [](int major, int) { return major >= 8; });
}

cudaError_t dense_mma_padded_forward(const LaDenseParams &p, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  with_padded_config(p.head_dim, p.dtype, [&](auto t, auto tr) {
    using Tr = typename decltype(tr)::type;
    err = launch_query_tiles(kernel_for<typename decltype(t)::type, Tr>(p), Tr::kSmemBytes,
                             Tr::kBlockM, Tr::kThreads, p, stream);
  });
  return err;
}

}  // namespace longattn
