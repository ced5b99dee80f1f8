// Ring attention's running state on the GPU: a piece's (o, lse) over a row range of the shard
// merged into the rank's f32 state, and the final write in the output dtype. One warp per
// (batch, head, row); lane 0 computes the merge weights and broadcasts them, so each state
// row is read and written by one warp only (pieces of one step cover disjoint key sets but
// may share rows; they are merged one launch after the other on the compute stream).

#include "longattn/common.cuh"
#include "longattn/dtype.cuh"
#include "longattn/ring.h"
#include "longattn/softmax.cuh"

namespace longattn {
namespace {

constexpr int kRingWarps = 8;
constexpr int kInitThreads = 256;

__global__ void __launch_bounds__(kInitThreads)
    state_init_kernel(float *acc_o, float *acc_lse, long long rows, int head_dim) {
  const long long n = rows * head_dim;
  for (long long x = (long long)blockIdx.x * kInitThreads + threadIdx.x; x < n;
       x += (long long)gridDim.x * kInitThreads) {
    acc_o[x] = 0.0f;
    if (x < rows) acc_lse[x] = kNegInf;
  }
}

template <typename T>
__global__ void __launch_bounds__(kRingWarps * 32)
    ring_merge_kernel(const __grid_constant__ LaRingMergeParams p) {
  const long long item = (long long)blockIdx.x * kRingWarps + threadIdx.x / 32;
  if (item >= (long long)p.batch * p.heads * p.rows) return;
  const int lane = threadIdx.x % 32;
  const int i = (int)(item % p.rows);  // piece row
  const long long bh = item / p.rows;  // b * heads + h
  const int h = (int)(bh % p.heads);
  const long long b = bh / p.heads;
  const long long si = bh * p.len + p.row0 + i;  // state row
  float wa = 0.0f, wb = 0.0f, lse = kNegInf;
  if (lane == 0) merge_weights(p.acc_lse[si], p.lse[bh * p.rows + i], wa, wb, lse);
  wa = __shfl_sync(0xffffffffu, wa, 0);
  wb = __shfl_sync(0xffffffffu, wb, 0);
  const T *o = static_cast<const T *>(p.o) + b * p.o_batch_stride + (long long)i * p.o_row_stride +
               (long long)h * p.o_head_stride;
  float *acc = p.acc_o + si * p.head_dim;
  for (int x = lane; x < p.head_dim; x += 32) acc[x] = wa * acc[x] + wb * Elem<T>::to_float(o[x]);
  if (lane == 0) p.acc_lse[si] = lse;
}

template <typename T>
__global__ void __launch_bounds__(kRingWarps * 32)
    ring_finalize_kernel(const __grid_constant__ LaRingFinalizeParams p) {
  const long long item = (long long)blockIdx.x * kRingWarps + threadIdx.x / 32;
  if (item >= (long long)p.batch * p.heads * p.len) return;
  const int lane = threadIdx.x % 32;
  const int i = (int)(item % p.len);
  const long long bh = item / p.len;
  const int h = (int)(bh % p.heads);
  const long long b = bh / p.heads;
  const float *acc = p.acc_o + item * p.head_dim;
  T *out = static_cast<T *>(p.out) + b * p.out_batch_stride + (long long)i * p.out_row_stride +
           (long long)h * p.out_head_stride;
  for (int x = lane; x < p.head_dim; x += 32) out[x] = Elem<T>::from_float(acc[x]);
  if (lane == 0 && p.lse != nullptr) p.lse[item] = p.acc_lse[item];
}

long long warp_blocks(long long items) { return (items + kRingWarps - 1) / kRingWarps; }

template <typename T>
cudaError_t launch_ring_merge(const LaRingMergeParams &p, cudaStream_t stream) {
  const long long blocks = warp_blocks((long long)p.batch * p.heads * p.rows);
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  ring_merge_kernel<T><<<(unsigned)blocks, kRingWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_ring_finalize(const LaRingFinalizeParams &p, cudaStream_t stream) {
  const long long blocks = warp_blocks((long long)p.batch * p.heads * p.len);
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  ring_finalize_kernel<T><<<(unsigned)blocks, kRingWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace longattn

extern "C" int la_ring_state_init(float *acc_o, float *acc_lse, int64_t rows, int32_t head_dim,
                                  cudaStream_t stream) {
  using namespace longattn;
  const long long n = (long long)rows * head_dim;
  if (n <= 0) return cudaSuccess;
  long long blocks = (n + kInitThreads - 1) / kInitThreads;
  if (blocks > 65535) blocks = 65535;  // grid-stride loop covers the rest
  state_init_kernel<<<(unsigned)blocks, kInitThreads, 0, stream>>>(acc_o, acc_lse, rows, head_dim);
  return cudaGetLastError();
}

// f16 and bf16 only: the GPU ring's dense pieces take no other dtype.
extern "C" int la_ring_merge(const LaRingMergeParams *params, cudaStream_t stream) {
  using namespace longattn;
  return with_dtype<__half, __nv_bfloat16>(params->dtype, cudaErrorInvalidValue, [&](auto t) {
    return launch_ring_merge<typename decltype(t)::type>(*params, stream);
  });
}

extern "C" int la_ring_finalize(const LaRingFinalizeParams *params, cudaStream_t stream) {
  using namespace longattn;
  return with_dtype<__half, __nv_bfloat16>(params->dtype, cudaErrorInvalidValue, [&](auto t) {
    return launch_ring_finalize<typename decltype(t)::type>(*params, stream);
  });
}
