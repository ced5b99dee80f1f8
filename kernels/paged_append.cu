// Paged KV cache append: writes new K/V rows into their pages and updates the pages' Quest
// kmin/kmax metadata. Mirrors src/paged/ (CPU path) exactly.
#include "longattn/check.cuh"
#include "longattn/dtype.cuh"
#include "longattn/fp8.cuh"
#include "longattn/paged_common.cuh"

namespace longattn {
namespace {

// The codes `q` of 8 quantized values (byte x = value x) with every NaN code given the sign
// of its source value in `raw` (8 f16/bf16 values, value x in bits 16 x .. 16 x + 15 of the
// 128 bits: sign at bit 15 of its half). A NaN keeps its sign (docs/semantics.md, FP8 KV
// cache; the CPU path's F8E4M3::from_f32 of the quotient), but the device's division yields
// the canonical NaN and cvt.rn.satfinite.e4m3x2 (or <cuda_fp8.h>'s sm_80 path, which
// canonicalises first) stores 0x7f: without this a NaN with the sign bit set was stored as
// 0x7f on the GPU and 0xff on the CPU. A code is NaN exactly where its source is (scales are
// finite and > 0), so the NaN codes pick the signs to copy.
__device__ __forceinline__ uint2 e4m3x8_nan_signs(uint2 q, const uint4 &raw) {
  auto fix4 = [](uint32_t codes, uint32_t lo, uint32_t hi) {
    // Sign bits of the 4 sources at bit 7 of their bytes; bit 7 of each NaN byte (low 7 bits
    // all set: +1 carries into bit 7, never into the next byte).
    const uint32_t signs = ((lo >> 8) & 0x80u) | ((lo >> 16) & 0x8000u) |
                           ((hi << 8) & 0x800000u) | (hi & 0x80000000u);
    const uint32_t nan = ((codes & 0x7f7f7f7fu) + 0x01010101u) & 0x80808080u;
    return (codes & ~nan) | (signs & nan);
  };
  return make_uint2(fix4(q.x, raw.x, raw.y), fix4(q.y, raw.z, raw.w));
}

// ---- append -------------------------------------------------------------------------
// Grid (max_pages_touched, batch): one block per (sequence, page touched by its new tokens).
// A thread owns one (kv head, 8-channel vector) and walks the page's new slots in order, so
// the page's metadata needs no atomics and is deterministic.
//
// KV = __nv_fp8_e4m3 (an fp8 cache, kv_dtype LA_F8E4M3): the thread's 8 new channels (16
// bytes of T) are quantized with the kv head's scale (kv_scales [2, heads_kv]: k scales,
// then v scales) to 8 e4m3 bytes, one 8-byte store per row (slot offsets are multiples of
// head_dim, head_dim % 8 == 0, so 8-byte aligned). The metadata are the bounds of the stored
// e4m3 values, kept as e4m3 too (a min/max of e4m3 values is one, so nothing is rounded; the
// one other value, +-inf when all of a channel's keys are NaN, saturates to +-448).
template <typename T, typename KV = T>
__global__ void __launch_bounds__(kThreads) append_kernel(const __grid_constant__ LaPagedAppendParams p) {
  constexpr bool kFp8 = kIsFp8<KV>;
  // 8 cached channels: 16 bytes of T, or 8 e4m3 bytes.
  using Vec8 = std::conditional_t<kFp8, uint2, uint4>;
  const LaPagedCache &c = p.cache;
  const int b = blockIdx.y;
  const int n_new = p.cu_seqlens_new[b + 1] - p.cu_seqlens_new[b];
  if (n_new <= 0) return;
  const int end = c.seqlens_k[b], start = end - n_new;
  const int ps = c.page_size;
  const int lp = start / ps + blockIdx.x;
  if ((long long)lp * ps >= end) return;
  const int s0 = max(start - lp * ps, 0);
  const int s1 = min(end - lp * ps, ps);  // exclusive
  const int phys = c.block_table[(long long)b * c.max_pages_per_seq + lp];
  const int vecs = c.head_dim / kVec;
  const T *k_new = static_cast<const T *>(p.k_new);
  const T *v_new = static_cast<const T *>(p.v_new);
  KV *k_cache = static_cast<KV *>(c.k_cache);
  KV *v_cache = static_cast<KV *>(c.v_cache);
  for (int item = threadIdx.x; item < c.heads_kv * vecs; item += kThreads) {
    const int h = item / vecs, col = (item % vecs) * kVec;
    float k_scale = 1.0f, v_scale = 1.0f;
    if constexpr (kFp8) {
      k_scale = p.kv_scales[h];
      v_scale = p.kv_scales[c.heads_kv + h];
    }
    float mn[kVec], mx[kVec];
#pragma unroll
    for (int x = 0; x < kVec; ++x) {
      mn[x] = -kNegInf;
      mx[x] = kNegInf;
    }
    for (int slot = s0; slot < s1; ++slot) {
      const long long t = p.cu_seqlens_new[b] + (lp * ps + slot - start);
      const uint4 kr = *reinterpret_cast<const uint4 *>(k_new + t * p.k_new_row_stride +
                                                        h * p.k_new_head_stride + col);
      const uint4 vr = *reinterpret_cast<const uint4 *>(v_new + t * p.v_new_row_stride +
                                                        h * p.v_new_head_stride + col);
      const long long dst = slot_offset(c, phys, slot, h) + col;
      float f[kVec];
      if constexpr (kFp8) {
        unpack8<T>(kr, f);
        const uint2 kq = e4m3x8_nan_signs(quantize_e4m3x8(f, k_scale), kr);
        unpack8<T>(vr, f);
        const uint2 vq = e4m3x8_nan_signs(quantize_e4m3x8(f, v_scale), vr);
        *reinterpret_cast<uint2 *>(k_cache + dst) = kq;
        *reinterpret_cast<uint2 *>(v_cache + dst) = vq;
        e4m3x8_to_float(kq, f);  // the bounds are those of the stored values
      } else {
        *reinterpret_cast<uint4 *>(k_cache + dst) = kr;
        *reinterpret_cast<uint4 *>(v_cache + dst) = vr;
        unpack8<T>(kr, f);
      }
#pragma unroll
      for (int x = 0; x < kVec; ++x) {
        mn[x] = fminf(mn[x], f[x]);
        mx[x] = fmaxf(mx[x], f[x]);
      }
    }
    if (p.kmin == nullptr) continue;
    // Bounds are stored as KV: the min/max of KV values is a KV value, so nothing is rounded.
    const long long m_off = ((long long)phys * c.heads_kv + h) * c.head_dim + col;
    Vec8 *kmin = reinterpret_cast<Vec8 *>(static_cast<KV *>(p.kmin) + m_off);
    Vec8 *kmax = reinterpret_cast<Vec8 *>(static_cast<KV *>(p.kmax) + m_off);
    if (s0 > 0) {
      // The page already holds slots 0..s0: widen its bounds. (s0 == 0 restarts the page,
      // which is how a reused page drops the bounds of its previous owner.)
      float a[kVec], z[kVec];
      if constexpr (kFp8) {
        e4m3x8_to_float(*kmin, a);
        e4m3x8_to_float(*kmax, z);
      } else {
        unpack8<T>(*kmin, a);
        unpack8<T>(*kmax, z);
      }
#pragma unroll
      for (int x = 0; x < kVec; ++x) {
        mn[x] = fminf(mn[x], a[x]);
        mx[x] = fmaxf(mx[x], z[x]);
      }
    }
    if constexpr (kFp8) {
      *kmin = float_to_e4m3x8(mn);
      *kmax = float_to_e4m3x8(mx);
    } else {
      *kmin = pack8<T>(mn);
      *kmax = pack8<T>(mx);
    }
  }
}

template <typename T, typename KV>
cudaError_t launch_append(const LaPagedAppendParams &p, cudaStream_t stream) {
  if (p.max_pages_touched <= 0) return cudaSuccess;
  const dim3 grid(p.max_pages_touched, p.cache.batch);
  append_kernel<T, KV><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace longattn

extern "C" int la_paged_append(const LaPagedAppendParams *params, cudaStream_t stream) {
  using namespace longattn;
  if (params == nullptr || !dims_ok(params->cache) ||
      (params->max_pages_touched > 0 &&
       (params->k_new == nullptr || params->v_new == nullptr ||
        params->cu_seqlens_new == nullptr)) ||
      (params->kmin == nullptr) != (params->kmax == nullptr) ||
      !check::strides(params->k_new_row_stride, params->k_new_head_stride, 0) ||
      !check::strides(params->v_new_row_stride, params->v_new_head_stride, 0))
    return cudaErrorInvalidValue;
  // The cache holds the new rows' dtype, or e4m3 with its scales.
  const bool fp8 = params->kv_dtype == LA_F8E4M3 && params->kv_scales != nullptr;
  if (params->kv_dtype != params->dtype && !fp8) return cudaErrorInvalidValue;
  return with_dtype<__half, __nv_bfloat16>(params->dtype, cudaErrorInvalidValue, [&](auto t) {
    using T = typename decltype(t)::type;
    return fp8 ? launch_append<T, __nv_fp8_e4m3>(*params, stream)
               : launch_append<T, T>(*params, stream);
  });
}
