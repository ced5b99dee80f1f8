// Internal launcher entry points of each dense kernel (one translation unit each); the
// public la_dense_forward in dense.cu dispatches among them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "longattn/dense.h"

namespace longattn {

template <class X>
struct Tag {
  using type = X;
};

// The dtype x head-dim switch of the tensor-core kernels (head_dim 64/128/256, f16/bf16):
// calls f(Tag<T>{}, Tag<Traits>{}) with the kernel's traits for that head dim, or returns
// false for a configuration the kernel does not have.
template <class Traits64, class Traits128, class Traits256, class F>
bool with_head_dim_config(const LaDenseParams &p, F &&f) {
  auto by_dim = [&](auto t) {
    switch (p.head_dim) {
      case 64: f(t, Tag<Traits64>{}); return true;
      case 128: f(t, Tag<Traits128>{}); return true;
      case 256: f(t, Tag<Traits256>{}); return true;
    }
    return false;
  };
  switch (p.dtype) {
    case LA_F16: return by_dim(Tag<__half>{});
    case LA_BF16: return by_dim(Tag<__nv_bfloat16>{});
    default: return false;
  }
}

// Whether the current device can run `kernel` with `smem` bytes of dynamic shared memory:
// `cc_ok(major, minor)` accepts its compute capability, the opt-in shared-memory limit holds
// `smem`, and the fatbinary has code for it. Clears any error it causes, so that a fallback
// kernel's launch does not report a stale one.
template <class CcOk>
bool device_runs(const void *kernel, size_t smem, CcOk &&cc_ok) {
  int dev = 0, major = 0, minor = 0, smem_optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) !=
          cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (!cc_ok(major, minor) || (size_t)smem_optin < smem) return false;
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return true;
}

cudaError_t dense_simt_forward(const LaDenseParams &p, cudaStream_t stream);
bool dense_mma_supports(const LaDenseParams &p);
cudaError_t dense_mma_forward(const LaDenseParams &p, cudaStream_t stream);
// Hopper wgmma kernel (sm_90a code only): false unless the device is compute capability 9.0.
bool dense_wgmma_supports(const LaDenseParams &p);
cudaError_t dense_wgmma_forward(const LaDenseParams &p, cudaStream_t stream);
}  // namespace longattn
