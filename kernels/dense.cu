// Dense attention: the public dispatcher and the portable CUDA-core (SIMT) kernel.
//
// SIMT kernel: a block of 4 warps owns 16 query rows (4 per warp) of one (batch, head).
// Key tiles of 32 keys are staged in shared memory; in the score phase lane j computes the
// scores of key j for the warp's 4 rows, then the online softmax runs per row with warp
// reductions, and in the PV phase each lane owns head-dim pairs {2*lane + 64*c}. Only the
// key tiles that the mask leaves visible are visited (Mask::key_tiles).

#include "longattn/check.cuh"
#include "longattn/common.cuh"
#include "longattn/dense_tensors.cuh"
#include "longattn/dispatch.cuh"
#include "longattn/mask.cuh"
#include "longattn/softmax.cuh"

namespace longattn {
namespace {

constexpr int kSimtWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kSimtThreads = kSimtWarps * 32;
constexpr int kSimtBlockM = kSimtWarps * kRowsPerWarp;
constexpr int kSimtBlockN = 32;  // one key per lane in the score phase
constexpr int kVec = 8;          // elements per 16-byte load

// Shared memory of one block for head dim d:
//   q_s [kSimtBlockM][d] f32, k_s [kSimtBlockN][d + 2] T, v_s [kSimtBlockN][d] T.
// The +2 elements (one 32-bit word) per key row put the 32 lanes' key rows in 32 different
// banks when each lane walks its own row.
__host__ __device__ constexpr int simt_k_pitch(int d) { return d + 2; }
inline size_t simt_smem_bytes(int d) {
  return sizeof(float) * kSimtBlockM * d + 2 * (size_t)kSimtBlockN * simt_k_pitch(d) +
         2 * (size_t)kSimtBlockN * d;
}

template <typename T, int kMaxDim>
__global__ void __launch_bounds__(kSimtThreads)
    dense_simt_kernel(const __grid_constant__ LaDenseParams p) {
  static_assert(kMaxDim % 64 == 0, "each lane owns kMaxDim / 64 head-dim pairs");
  constexpr int kPairsPerLane = kMaxDim / 64;
  using E = Elem<T>;
  using Pair = typename E::Pair;
  extern __shared__ __align__(16) unsigned char smem_raw[];

  const int d = p.head_dim;
  const int k_pitch = simt_k_pitch(d);
  float *q_s = reinterpret_cast<float *>(smem_raw);
  T *k_s = reinterpret_cast<T *>(q_s + kSimtBlockM * d);
  T *v_s = k_s + kSimtBlockN * k_pitch;

  const int b = blockIdx.z, h = blockIdx.y;
  const SeqInfo s = seq_info(p, b, h);
  const int m0 = blockIdx.x * kSimtBlockM;
  if (m0 >= s.sq) return;
  const HeadTensors<T> head = head_tensors<T>(p, s, b, h);
  const T *q = head.q, *k = head.k, *v = head.v;
  T *o = head.o;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int vecs_per_row = d / kVec;

  // Q tile -> f32 shared memory (rows past the sequence are zero).
  for (int c = tid; c < kSimtBlockM * vecs_per_row; c += kSimtThreads) {
    const int r = c / vecs_per_row, col = (c % vecs_per_row) * kVec, i = m0 + r;
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (i < s.sq) raw = *reinterpret_cast<const uint4 *>(q + i * p.q_row_stride + col);
    const Pair *pairs = reinterpret_cast<const Pair *>(&raw);
    float *dst = q_s + r * d + col;
#pragma unroll
    for (int x = 0; x < kVec / 2; ++x) {
      const float2 f = E::to_float2(pairs[x]);
      dst[2 * x] = f.x;
      dst[2 * x + 1] = f.y;
    }
  }

  const Mask mask{p.window_left, p.window_right, p.sinks};
  const int row_end = min(m0 + kSimtBlockM, s.sq);
  int sink_tiles, first, last;
  mask.key_tiles(m0, row_end, s.sq, s.sk, kSimtBlockN, sink_tiles, first, last);
  const int n_tiles = sink_tiles + (last - first);

  float m[kRowsPerWarp], l[kRowsPerWarp];
  float2 acc[kRowsPerWarp][kPairsPerLane];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = kNegInf;
    l[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < kPairsPerLane; ++c) acc[r][c] = make_float2(0.0f, 0.0f);
  }

  for (int t = 0; t < n_tiles; ++t) {
    const int n0 = (t < sink_tiles ? t : first + (t - sink_tiles)) * kSimtBlockN;
    __syncthreads();  // the previous tile's readers are done (and Q is staged)
    for (int c = tid; c < kSimtBlockN * vecs_per_row; c += kSimtThreads) {
      const int r = c / vecs_per_row, col = (c % vecs_per_row) * kVec, j = n0 + r;
      // Zero-fill keys past the end: p = 0 there, and 0 * garbage could be NaN.
      uint4 kr = make_uint4(0, 0, 0, 0), vr = make_uint4(0, 0, 0, 0);
      if (j < s.sk) {
        kr = *reinterpret_cast<const uint4 *>(k + j * p.k_row_stride + col);
        vr = *reinterpret_cast<const uint4 *>(v + j * p.v_row_stride + col);
      }
      uint32_t *kd = reinterpret_cast<uint32_t *>(k_s + r * k_pitch + col);
      kd[0] = kr.x;
      kd[1] = kr.y;
      kd[2] = kr.z;
      kd[3] = kr.w;
      *reinterpret_cast<uint4 *>(v_s + r * d + col) = vr;
    }
    __syncthreads();

    // Scores: lane = key.
    float sc[kRowsPerWarp] = {};
    const Pair *krow = reinterpret_cast<const Pair *>(k_s + lane * k_pitch);
    const float *qrow = q_s + warp * kRowsPerWarp * d;
    for (int c2 = 0; c2 < d / 2; ++c2) {
      const float2 kf = E::to_float2(krow[c2]);
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const float2 qf = *reinterpret_cast<const float2 *>(qrow + r * d + 2 * c2);
        sc[r] = fmaf(qf.x, kf.x, fmaf(qf.y, kf.y, sc[r]));
      }
    }
    const int j = n0 + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int i = m0 + warp * kRowsPerWarp + r;
      float x = kNegInf;
      if (mask.visible(i, j, s.sq, s.sk)) {
        x = sc[r] * p.scale;
        if (p.softcap > 0.0f) x = p.softcap * tanhf(x / p.softcap);
        x *= kLog2e;
      }
      const float m_new = fmaxf(m[r], warp_max(x));
      const float alpha = rescale_factor(m[r], m_new);
      const float pr = x == kNegInf ? 0.0f : exp2f(x - m_new);
      l[r] = l[r] * alpha + warp_sum(pr);
#pragma unroll
      for (int c = 0; c < kPairsPerLane; ++c) {
        acc[r][c].x *= alpha;
        acc[r][c].y *= alpha;
      }
      m[r] = m_new;
      sc[r] = pr;
    }

    // PV: lane owns pairs lane + 32 * c.
    const int n_keys = min(kSimtBlockN, s.sk - n0);
    for (int jj = 0; jj < n_keys; ++jj) {
      const Pair *vrow = reinterpret_cast<const Pair *>(v_s + jj * d);
      float pj[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) pj[r] = __shfl_sync(0xffffffffu, sc[r], jj);
#pragma unroll
      for (int c = 0; c < kPairsPerLane; ++c) {
        const int pair = lane + 32 * c;
        if (2 * pair < d) {
          const float2 vf = E::to_float2(vrow[pair]);
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            acc[r][c].x = fmaf(pj[r], vf.x, acc[r][c].x);
            acc[r][c].y = fmaf(pj[r], vf.y, acc[r][c].y);
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = m0 + warp * kRowsPerWarp + r;
    if (i >= s.sq) continue;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    Pair *orow = reinterpret_cast<Pair *>(o + i * p.o_row_stride);
#pragma unroll
    for (int c = 0; c < kPairsPerLane; ++c) {
      const int pair = lane + 32 * c;
      if (2 * pair < d) orow[pair] = E::from_float2(make_float2(acc[r][c].x * inv, acc[r][c].y * inv));
    }
    if (lane == 0 && p.lse != nullptr) p.lse[s.lse_base + i] = lse_from_log2(m[r], l[r]);
  }
}

template <typename T, int kMaxDim>
cudaError_t launch_simt(const LaDenseParams &p, cudaStream_t stream) {
  return launch_query_tiles(dense_simt_kernel<T, kMaxDim>, simt_smem_bytes(p.head_dim),
                            kSimtBlockM, kSimtThreads, p, stream);
}

template <typename T>
cudaError_t launch_simt_for_dim(const LaDenseParams &p, cudaStream_t stream) {
  if (p.head_dim <= 64) return launch_simt<T, 64>(p, stream);
  if (p.head_dim <= 128) return launch_simt<T, 128>(p, stream);
  return launch_simt<T, 256>(p, stream);
}

}  // namespace

cudaError_t dense_simt_forward(const LaDenseParams &p, cudaStream_t stream) {
  if (p.head_dim <= 0 || p.head_dim > 256 || p.head_dim % kVec != 0) return cudaErrorInvalidValue;
  return with_dtype<__half, __nv_bfloat16>(p.dtype, cudaErrorInvalidValue, [&](auto t) {
    return launch_simt_for_dim<typename decltype(t)::type>(p, stream);
  });
}

}  // namespace longattn

namespace longattn {

// Every scalar of the params the Rust API validates, and the pointers a launch reads.
bool dense_params_ok(const LaDenseParams *p) {
  if (p == nullptr || !check::dtype(p->dtype)) return false;
  if (p->batch < 0 || p->seqlen_q < 0 || p->seqlen_k < 0 || p->total_q < 0 || p->total_k < 0)
    return false;
  if (!check::heads(p->heads_q, p->heads_kv, p->head_dim)) return false;
  if (!check::mask(p->window_left, p->window_right, p->sinks)) return false;
  if (!check::scoring(p->scale, p->softcap)) return false;
  if (!check::strides(p->q_batch_stride, p->q_row_stride, p->q_head_stride) ||
      !check::strides(p->k_batch_stride, p->k_row_stride, p->k_head_stride) ||
      !check::strides(p->v_batch_stride, p->v_row_stride, p->v_head_stride) ||
      !check::strides(p->o_batch_stride, p->o_row_stride, p->o_head_stride))
    return false;
  if ((p->cu_seqlens_q == nullptr) != (p->cu_seqlens_k == nullptr)) return false;
  const bool work = p->batch > 0 && p->seqlen_q > 0;
  return !work || (p->q != nullptr && p->o != nullptr &&
                   (p->seqlen_k == 0 || (p->k != nullptr && p->v != nullptr)));
}

}  // namespace longattn

extern "C" const char *la_dense_kernel_unsupported_reason(const LaDenseParams *params,
                                                          LaDenseKernel kernel) {
  if (!longattn::dense_params_ok(params)) return "its parameters are invalid";
  switch (kernel) {
    case LA_DENSE_AUTO:
    case LA_DENSE_SIMT:
      if (params->head_dim > 0 && params->head_dim <= 256 && params->head_dim % 8 == 0 &&
          params->dtype != LA_F32)
        return nullptr;
      return "it takes f16 or bf16 with head_dim a multiple of 8 up to 256 only";
    case LA_DENSE_MMA:
      if (!longattn::tensor_core_head_dim(params->head_dim))
        return "the tensor-core kernels take head_dim 64, 128 or 256 only";
      return longattn::dense_mma_padded_unsupported_reason(*params);
    case LA_DENSE_WGMMA: return longattn::dense_wgmma_unsupported_reason(*params);
    case LA_DENSE_MMA_PADDED: return longattn::dense_mma_padded_unsupported_reason(*params);
    case LA_DENSE_MMA_GQA: return longattn::dense_mma_gqa_unsupported_reason(*params);
    case LA_DENSE_WGMMA_WINDOW: return longattn::dense_wgmma_window_unsupported_reason(*params);
    case LA_DENSE_WGMMA_PERSISTENT:
      return longattn::dense_wgmma_persistent_unsupported_reason(*params);
    case LA_DENSE_WGMMA_GQA: return longattn::dense_wgmma_gqa_unsupported_reason(*params);
    case LA_DENSE_WGMMA_WIDE: return longattn::dense_wgmma_wide_unsupported_reason(*params);
  }
  return "unknown kernel";
}

extern "C" int la_dense_kernel_supports(const LaDenseParams *params, LaDenseKernel kernel) {
  return la_dense_kernel_unsupported_reason(params, kernel) == nullptr;
}

extern "C" int la_dense_forward(const LaDenseParams *params, LaDenseKernel kernel,
                                cudaStream_t stream) {
  using namespace longattn;
  constexpr int kKernelUnsupported = LA_DENSE_KERNEL_UNSUPPORTED;
  static_assert(kKernelUnsupported == cudaErrorNotSupported, "documented in dense.h");
  if (!dense_params_ok(params)) return cudaErrorInvalidValue;
  const LaDenseParams &p = *params;
  if (p.seqlen_q == 0 || p.batch == 0) return cudaSuccess;
  switch (kernel) {
    case LA_DENSE_AUTO:
      // Fastest first (H200, 2026-12-04): wgmma, then the mma.sync kernel (any head dim, padded
      // to the tile: 18x the SIMT kernel at d96), SIMT where no tensor core runs. Head dims
      // that are not a multiple of 8 run only on LA_DENSE_MMA_PADDED, by name: its
      // element-wise variant has not run on a GPU yet.
      if (p.head_dim % 8 != 0) return kKernelUnsupported;
      // No key at all (fixed seqlen_k 0, or packed sequences without keys): every row is empty
      // (0, LSE -inf). K and V may be null then, which the Hopper kernel's tensor maps would
      // have to describe; the SIMT kernel writes those rows and reads no key.
      if (p.total_k == 0) return dense_simt_forward(p, stream);
      if (dense_wgmma_supports(p)) return dense_wgmma_forward(p, stream);
      if (dense_mma_padded_unsupported_reason(p) == nullptr) return dense_mma_padded_forward(p, stream);
      return dense_simt_forward(p, stream);
    case LA_DENSE_SIMT: return dense_simt_forward(p, stream);
    case LA_DENSE_MMA:  // the mma.sync kernel at the head dims it needs no padding for
      return tensor_core_head_dim(p.head_dim) && dense_mma_padded_unsupported_reason(p) == nullptr
                 ? dense_mma_padded_forward(p, stream)
                 : kKernelUnsupported;
    case LA_DENSE_WGMMA:
      return dense_wgmma_supports(p) ? dense_wgmma_forward(p, stream) : kKernelUnsupported;
    case LA_DENSE_MMA_PADDED:
      return dense_mma_padded_unsupported_reason(p) == nullptr ? dense_mma_padded_forward(p, stream)
                                                               : kKernelUnsupported;
    case LA_DENSE_MMA_GQA:
      return dense_mma_gqa_unsupported_reason(p) == nullptr ? dense_mma_gqa_forward(p, stream)
                                                            : kKernelUnsupported;
    case LA_DENSE_WGMMA_WINDOW:
      return dense_wgmma_window_unsupported_reason(p) == nullptr
                 ? dense_wgmma_window_forward(p, stream)
                 : kKernelUnsupported;
    case LA_DENSE_WGMMA_PERSISTENT:
      return dense_wgmma_persistent_unsupported_reason(p) == nullptr
                 ? dense_wgmma_persistent_forward(p, stream)
                 : kKernelUnsupported;
    case LA_DENSE_WGMMA_GQA:
      return dense_wgmma_gqa_unsupported_reason(p) == nullptr ? dense_wgmma_gqa_forward(p, stream)
                                                              : kKernelUnsupported;
    case LA_DENSE_WGMMA_WIDE:
      return dense_wgmma_wide_unsupported_reason(p) == nullptr ? dense_wgmma_wide_forward(p, stream)
                                                               : kKernelUnsupported;
  }
  return cudaErrorInvalidValue;
}

extern "C" const char *la_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}
