// Programmatic dependent launch (compute capability 9.0+): a kernel launched with
// launch_dependent() may be scheduled while the previous kernel in the stream is still
// running, so its launch latency hides behind that kernel's tail. Such a kernel calls
// wait_for_previous_grid() before touching any memory (the previous kernel may write its
// inputs); a kernel calls allow_next_grid() once its blocks no longer need the SM space the
// next kernel would take. On older devices both are no-ops and the launch is plain stream
// order.
#pragma once

#include <atomic>

#include <cuda_runtime.h>

namespace longattn {

__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether the current device supports programmatic dependent launch (cached per device;
// higher ordinals are queried per call).
inline bool dependent_launch_supported() {
  constexpr int kMaxCached = 64;
  static std::atomic<int> known[kMaxCached];  // 0 unknown, 1 no, 2 yes
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const bool cached = dev >= 0 && dev < kMaxCached;
  if (cached) {
    const int k = known[dev].load(std::memory_order_relaxed);
    if (k != 0) return k == 2;
  }
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (cached) known[dev].store(major >= 9 ? 2 : 1, std::memory_order_relaxed);
  return major >= 9;
}

// Launches kernel<<<grid, block, smem, stream>>>(args...) as a programmatic dependent of the
// previous kernel in `stream` where the device supports it.
template <class... Params, class... Args>
cudaError_t launch_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                             cudaStream_t stream, const Args &...args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = dependent_launch_supported() ? 1 : 0;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

}  // namespace longattn
