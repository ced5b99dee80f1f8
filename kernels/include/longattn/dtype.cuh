// The one dtype dispatch of the launchers: maps a runtime LaDtype onto the element type a
// kernel is instantiated for. Each entry point lists the element types it has kernels for;
// any other dtype gets the caller's `unsupported` value.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "longattn/types.h"

namespace longattn {

template <class X>
struct Tag {
  using type = X;
};

template <class T> inline constexpr bool kHasDtype = false;
template <class T> inline constexpr LaDtype kDtypeOf = LA_F32;
template <> inline constexpr bool kHasDtype<__half> = true;
template <> inline constexpr LaDtype kDtypeOf<__half> = LA_F16;
template <> inline constexpr bool kHasDtype<__nv_bfloat16> = true;
template <> inline constexpr LaDtype kDtypeOf<__nv_bfloat16> = LA_BF16;
template <> inline constexpr bool kHasDtype<float> = true;
template <> inline constexpr LaDtype kDtypeOf<float> = LA_F32;
// OCP e4m3 ("e4m3fn"): a paged-cache element type only (kv_dtype), see fp8.cuh.
template <> inline constexpr bool kHasDtype<__nv_fp8_e4m3> = true;
template <> inline constexpr LaDtype kDtypeOf<__nv_fp8_e4m3> = LA_F8E4M3;

// Calls f(Tag<T>{}) for the T among Ts whose LaDtype is `dtype` and returns its result, or
// returns `unsupported` when no T matches:
//   with_dtype<__half, __nv_bfloat16>(p.dtype, cudaErrorInvalidValue,
//                                     [&](auto t) { return launch<typename decltype(t)::type>(p); });
template <class... Ts, class R, class F>
R with_dtype(LaDtype dtype, R unsupported, F &&f) {
  static_assert((kHasDtype<Ts> && ...), "an element type without a LaDtype");
  R result = unsupported;
  ((dtype == kDtypeOf<Ts> ? (result = f(Tag<Ts>{}), true) : false) || ...);
  return result;
}

}  // namespace longattn
