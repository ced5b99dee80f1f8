// Device-side building blocks shared by every family: element conversion, the mask
// (window + sinks, causal is a window) and the online-softmax state. Mirrors src/mask.rs and
// src/softmax.rs exactly.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace longattn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

// ---- element conversion -------------------------------------------------------------
template <typename T> struct Elem;
template <> struct Elem<__half> {
  using Pair = __half2;
  static __device__ __forceinline__ float2 to_float2(Pair x) { return __half22float2(x); }
  static __device__ __forceinline__ Pair from_float2(float2 x) { return __float22half2_rn(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
};
template <> struct Elem<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(Pair x) { return __bfloat1622float2(x); }
  static __device__ __forceinline__ Pair from_float2(float2 x) { return __float22bfloat162_rn(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
};
template <> struct Elem<float> {
  static __device__ __forceinline__ float from_float(float x) { return x; }
  static __device__ __forceinline__ float to_float(float x) { return x; }
};

// ---- mask ---------------------------------------------------------------------------
// FlashAttention window (left, right), -1 = unbounded, plus `sinks` leading keys that obey
// the right bound. `diag = i + sk - sq` aligns the diagonal bottom-right.
struct Mask {
  int left, right, sinks;

  __host__ __device__ __forceinline__ bool visible(int i, int j, int sq, int sk) const {
    if (j < 0 || j >= sk) return false;
    const long long diag = (long long)i + sk - sq;
    if (right >= 0 && j > diag + right) return false;
    const bool in_left = left < 0 || j >= diag - left;
    return in_left || j < sinks;
  }

  // Key tiles that rows [row_begin, row_end) must visit, as two ranges of tile indices:
  // sink tiles [0, sink_tiles) then window tiles [first, last). Mirrors Mask::key_tiles.
  __host__ __device__ __forceinline__ void key_tiles(int row_begin, int row_end, int sq, int sk,
                                                     int block_n, int &sink_tiles, int &first,
                                                     int &last) const {
    const long long d = (long long)sk - sq;
    long long lo = left >= 0 ? (long long)row_begin + d - left : 0;
    if (lo < 0) lo = 0;
    long long hi = right >= 0 ? (long long)row_end - 1 + d + right + 1 : sk;
    if (hi > sk) hi = sk;
    long long sink_end = sinks < sk ? sinks : sk;
    if (right >= 0 && sink_end > (long long)row_end - 1 + d + right + 1)
      sink_end = (long long)row_end - 1 + d + right + 1;
    if (sink_end < 0) sink_end = 0;
    sink_tiles = (int)((sink_end + block_n - 1) / block_n);
    if (hi <= lo || row_end <= row_begin) {
      first = last = sink_tiles;
      return;
    }
    first = (int)(lo / block_n);
    if (first < sink_tiles) first = sink_tiles;
    last = (int)((hi + block_n - 1) / block_n);
    if (last < first) last = first;
  }
};

// ---- online softmax -----------------------------------------------------------------
// Scores are kept in log2 units (scale * log2(e) folded in) so that exp2f maps to one MUFU
// instruction; LSE is converted back to natural log on output.
__device__ __forceinline__ float rescale_factor(float m_old, float m_new) {
  // m_new == -inf means everything so far is masked: keep the state (avoid -inf - -inf).
  return m_new == kNegInf ? 1.0f : exp2f(m_old - m_new);
}

// Natural-log LSE of a finished row in log2 units; -inf for an empty row.
__device__ __forceinline__ float lse_from_log2(float m_log2, float l) {
  return l > 0.0f ? (m_log2 + __log2f(l)) * kLn2 : kNegInf;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

}  // namespace longattn
