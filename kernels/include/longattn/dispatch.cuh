// Internal launcher entry points of each dense kernel (one translation unit each); the
// public la_dense_forward in dense.cu dispatches among them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "longattn/block_sparse.h"
#include "longattn/dense.h"
#include "longattn/dtype.cuh"

namespace longattn {

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
  return with_dtype<__half, __nv_bfloat16>(p.dtype, false, by_dim);
}

// Why the current device cannot run `kernel` with `smem` bytes of dynamic shared memory, or
// nullptr when it can: `cc_ok(major, minor)` accepts its compute capability, the opt-in
// shared-memory limit holds `smem`, and the fatbinary has code for it. Clears any error it
// causes, so that a fallback kernel's launch does not report a stale one.
template <class CcOk>
const char *device_unsupported_reason(const void *kernel, size_t smem, CcOk &&cc_ok) {
  int dev = 0, major = 0, minor = 0, smem_optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) !=
          cudaSuccess) {
    cudaGetLastError();
    return "the current device's attributes cannot be read";
  }
  if (!cc_ok(major, minor)) return "the current device's compute capability is not one it runs on";
  if ((size_t)smem_optin < smem)
    return "it needs more shared memory per block than the current device allows";
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    cudaGetLastError();
    return "the library has no code for the current device's architecture";
  }
  return nullptr;
}

// Every scalar of the params the Rust API validates, and the pointers a launch reads
// (la_dense_forward's check; kernels/dense.cu). Null is not ok.
bool dense_params_ok(const LaDenseParams *p);
// The block-sparse launchers' check (la_block_sparse_mma_forward's, kernels/block_sparse_mma.cu):
// the dense params, grid limits, block sizes and counts, mask dims, list pointers.
bool block_sparse_params_ok(const LaBlockSparseParams &p);

// Launches kernel<<<grid, threads, smem, stream>>>(args...): cudaErrorNotSupported where the
// device cannot run it (below sm_80, less opt-in shared memory than `smem`, no code for it),
// else raises its dynamic shared-memory limit to `smem` first.
template <class Kernel, class... Args>
cudaError_t launch_sm80(Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream,
                        const Args &...args) {
  if (device_unsupported_reason(reinterpret_cast<const void *>(kernel), smem,
                                [](int major, int) { return major >= 8; }) != nullptr)
    return cudaErrorNotSupported;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem, stream>>>(args...);
  return cudaGetLastError();
}

// Launches a kernel of the mma.sync mainloop (mma_mainloop.cuh) with traits Tr over `grid`
// (launch_sm80 with Tr::kThreads threads and Tr::kSmemBytes of shared memory).
template <class Tr, class Kernel, class... Args>
cudaError_t launch_mma_kernel(Kernel kernel, dim3 grid, cudaStream_t stream,
                              const Args &...args) {
  return launch_sm80(kernel, grid, Tr::kThreads, Tr::kSmemBytes, stream, args...);
}

cudaError_t dense_simt_forward(const LaDenseParams &p, cudaStream_t stream);
// Hopper wgmma kernel (sm_90a code only): false unless the device is compute capability 9.0.
// The *_unsupported_reason functions say why a kernel cannot run `p` on the current device
// (a static string), or return nullptr.
const char *dense_wgmma_unsupported_reason(const LaDenseParams &p);
inline bool dense_wgmma_supports(const LaDenseParams &p) {
  return dense_wgmma_unsupported_reason(p) == nullptr;
}
cudaError_t dense_wgmma_forward(const LaDenseParams &p, cudaStream_t stream);
// The Hopper kernel for short sliding windows (dense_wgmma_window.cu: 64-key tiles, per-consumer
// key ranges, persistent blocks): LA_DENSE_WGMMA_WINDOW only, head_dim a multiple of 8 up to 192.
const char *dense_wgmma_window_unsupported_reason(const LaDenseParams &p);
cudaError_t dense_wgmma_window_forward(const LaDenseParams &p, cudaStream_t stream);
// The same persistent walk with dense_wgmma.cu's 128-key tiles, for any dense problem
// (dense_wgmma_window.cu): LA_DENSE_WGMMA_PERSISTENT only, head dims as above.
const char *dense_wgmma_persistent_unsupported_reason(const LaDenseParams &p);
cudaError_t dense_wgmma_persistent_forward(const LaDenseParams &p, cudaStream_t stream);
// dense_wgmma.cu's kernel with 176-key tiles (WgDenseWide): LA_DENSE_WGMMA_WIDE only, f16/bf16,
// head_dim 128, full attention (no window, causal mask or sinks).
const char *dense_wgmma_wide_unsupported_reason(const LaDenseParams &p);
cudaError_t dense_wgmma_wide_forward(const LaDenseParams &p, cudaStream_t stream);
// Head dims the tensor-core kernels have tiles for (others are padded up to one).
inline bool tensor_core_head_dim(int d) { return d == 64 || d == 128 || d == 256; }
// The mma.sync kernel on the shared mainloop, any head_dim up to 256 (padded in the kernel):
// LA_DENSE_MMA (at 64/128/256), LA_DENSE_MMA_PADDED, and AUTO below sm_90.
const char *dense_mma_padded_unsupported_reason(const LaDenseParams &p);
cudaError_t dense_mma_padded_forward(const LaDenseParams &p, cudaStream_t stream);
// The mma.sync kernel with a GQA group's query heads packed into one tile (dense_mma_gqa.cu):
// LA_DENSE_MMA_GQA only.
const char *dense_mma_gqa_unsupported_reason(const LaDenseParams &p);
cudaError_t dense_mma_gqa_forward(const LaDenseParams &p, cudaStream_t stream);
// The Hopper kernel with a GQA group's query heads packed into one tile (dense_wgmma_gqa.cu):
// LA_DENSE_WGMMA_GQA only.
const char *dense_wgmma_gqa_unsupported_reason(const LaDenseParams &p);
cudaError_t dense_wgmma_gqa_forward(const LaDenseParams &p, cudaStream_t stream);
// Why a tensor-core kernel has no configuration for `p` that this device can run, or nullptr
// when it has: `kernel_of(Tag<T>, Tag<Traits>)` names the kernel instantiation, `cc_ok` the
// compute capabilities it accepts.
template <class Traits64, class Traits128, class Traits256, class KernelOf, class CcOk>
const char *tensor_core_unsupported_reason(const LaDenseParams &p, KernelOf &&kernel_of,
                                           CcOk &&cc_ok) {
  size_t smem = 0;
  const void *kernel = nullptr;
  const bool known =
      with_head_dim_config<Traits64, Traits128, Traits256>(p, [&](auto t, auto tr) {
        smem = decltype(tr)::type::kSmemBytes;
        kernel = kernel_of(t, tr);
      });
  if (!known) return "it takes f16 or bf16 with head_dim 64, 128 or 256 only";
  return device_unsupported_reason(kernel, smem, static_cast<CcOk &&>(cc_ok));
}

// Launches `kernel` over one block per (block_m query rows, query head, sequence) with
// `smem` bytes of dynamic shared memory (the opt-in limit raised to it first).
template <class Kernel>
cudaError_t launch_query_tiles(Kernel kernel, size_t smem, int block_m, int threads,
                               const LaDenseParams &p, cudaStream_t stream) {
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.seqlen_q + block_m - 1) / block_m, p.heads_q, p.batch);
  kernel<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace longattn
