// FP8 e4m3 ("e4m3fn": OCP FP8, no infinities, max finite 448, NaN = 0x7f / 0xff) pieces of
// the paged cache (kv_dtype LA_F8E4M3, see paged.h): 8 channels travel as 8 bytes (a uint2,
// channel x in byte x), a cached value means e4m3 * scale[kv head]. The one place these
// conversions live; paged_append.cu and paged_decode.cu both use them.
//   quantize:   e4m3_rne_satfinite(x / scale), x / scale an IEEE f32 division (RN), the
//               conversion round-to-nearest-even with saturation: finite values beyond +-448
//               and +-inf become +-448, NaN stays NaN (cvt.rn.satfinite.e4m3x2.f32)
//   dequantize: e4m3 -> f32 / f16 / bf16 is exact (every e4m3 value is an f16 and a bf16
//               value), so a converted tile can enter the f16/bf16 mma unchanged.
// Everything is __host__ __device__ (as <cuda_fp8.h>'s conversions) so the logic can be
// checked on the CPU.
#pragma once

#include <stdint.h>

#include <type_traits>

#include "longattn/common.cuh"
#include "longattn/dtype.cuh"

namespace longattn {

constexpr int kFp8Vec = 8;  // e4m3 values per 8-byte vector

template <typename KV> inline constexpr bool kIsFp8 = false;
template <> inline constexpr bool kIsFp8<__nv_fp8_e4m3> = true;

// Two e4m3 values (bits 0-15 of x2, byte 0 = element 0) -> f16x2 bits (element 0 in the low
// half), exact; NaN becomes the f16 NaN 0x7fff, as <cuda_fp8.h>'s conversion. Branch-free
// integer form for devices without the cvt.f16x2.e4m3x2 instruction (below sm_89, where
// <cuda_fp8.h> normalises subnormals in a loop): the sign goes to bit 15 and the 7 other bits
// to bits 7-13, which reads as the e4m3 value / 2^8 (exponent bias 15 instead of 7, the same
// for subnormals: 2^-14 * 0.mmm = 2^-6 * 0.mmm / 2^8), times 2^8 exactly; then the NaN code
// (all 7 bits set, read as 1.875 * 2^8) is replaced.
__host__ __device__ __forceinline__ uint32_t e4m3x2_to_f16x2_bits_sw(uint32_t x2) {
  const uint32_t lanes = (x2 & 0xffu) | ((x2 & 0xff00u) << 8);  // a byte per 16-bit lane
  const uint32_t mag = lanes & 0x007f007fu;
  const uint32_t bits = (mag << 7) | ((lanes & 0x00800080u) << 8);
  const __half2 h = __hmul2(*reinterpret_cast<const __half2 *>(&bits), __half2(__half_raw{0x5c00}, __half_raw{0x5c00}));
  const uint32_t v = *reinterpret_cast<const uint32_t *>(&h);
  const uint32_t nan = (((mag + 0x00010001u) & 0x00800080u) >> 7) * 0xffffu;  // lanes == 0x7f
  return (v & ~nan) | (0x7fff7fffu & nan);
}

// The same (the cvt instruction where the device has it).
__host__ __device__ __forceinline__ uint32_t e4m3x2_to_f16x2_bits(uint32_t x2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
  return e4m3x2_to_f16x2_bits_sw(x2);
#else
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)x2, __NV_E4M3);
  return (uint32_t)h.x | ((uint32_t)h.y << 16);
#endif
}

// Two e4m3 values (byte 0 = element 0) -> two floats, exact.
__host__ __device__ __forceinline__ float2 e4m3x2_to_float2(uint32_t x2) {
  const uint32_t h = e4m3x2_to_f16x2_bits(x2);
  return make_float2(__half2float(__half(__half_raw{(unsigned short)(h & 0xffffu)})),
                     __half2float(__half(__half_raw{(unsigned short)(h >> 16)})));
}

// 8 e4m3 values -> 8 floats, exact.
__host__ __device__ __forceinline__ void e4m3x8_to_float(const uint2 &raw, float (&f)[kFp8Vec]) {
#pragma unroll
  for (int x = 0; x < kFp8Vec / 2; ++x) {
    const uint32_t w = x < 2 ? raw.x : raw.y;
    const float2 v = e4m3x2_to_float2(w >> (16 * (x % 2)));
    f[2 * x] = v.x;
    f[2 * x + 1] = v.y;
  }
}

// 8 floats -> 8 e4m3 values, round-to-nearest-even with saturation (see above).
__host__ __device__ __forceinline__ uint2 float_to_e4m3x8(const float (&f)[kFp8Vec]) {
  uint32_t w[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(f[4 * i], f[4 * i + 1]), __NV_SATFINITE, __NV_E4M3);
    const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(f[4 * i + 2], f[4 * i + 3]), __NV_SATFINITE, __NV_E4M3);
    w[i] = (lo & 0xffffu) | (hi << 16);
  }
  return make_uint2(w[0], w[1]);
}

// The stored form of 8 values under `scale`: e4m3_rne_satfinite(f / scale), the division
// correctly rounded (__fdiv_rn on the device, IEEE `/` on the host).
__host__ __device__ __forceinline__ uint2 quantize_e4m3x8(const float (&f)[kFp8Vec], float scale) {
  float y[kFp8Vec];
#pragma unroll
  for (int x = 0; x < kFp8Vec; ++x) {
#ifdef __CUDA_ARCH__
    y[x] = __fdiv_rn(f[x], scale);
#else
    y[x] = f[x] / scale;
#endif
  }
  return float_to_e4m3x8(y);
}

// Two e4m3 values -> one packed T pair (an mma fragment register), exact.
template <typename T>
__device__ __forceinline__ uint32_t e4m3x2_to_pair(uint32_t x2) {
  if constexpr (std::is_same_v<T, __half>) {
    return e4m3x2_to_f16x2_bits(x2);
  } else {
    // f16 -> f32 -> bf16 is exact for e4m3 values (3 mantissa bits, exponents 2^-9..2^8).
    const float2 f = e4m3x2_to_float2(x2);
    return pack2<T>(f.x, f.y);
  }
}

// 8 e4m3 values -> 8 T values (16 bytes, element x in the x-th 16-bit half), exact.
template <typename T>
__device__ __forceinline__ uint4 e4m3x8_to_pack8(const uint2 &raw) {
  return make_uint4(e4m3x2_to_pair<T>(raw.x), e4m3x2_to_pair<T>(raw.x >> 16),
                    e4m3x2_to_pair<T>(raw.y), e4m3x2_to_pair<T>(raw.y >> 16));
}

}  // namespace longattn
