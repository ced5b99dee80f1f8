// Device-side basics shared by every family: element conversion, the log2/ln constants and
// warp reductions. The mask (mask.cuh), the online softmax (softmax.cuh) and the
// shared-memory swizzle (swizzle.cuh) build on it.
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

// Two floats rounded to T and packed into one 32-bit register (an mma fragment element).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y) {
  const typename Elem<T>::Pair v = Elem<T>::from_float2(make_float2(x, y));
  return *reinterpret_cast<const uint32_t *>(&v);
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
