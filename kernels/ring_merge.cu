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

// The gather reads slot rows in 4-channel (8-byte) chunks: chunk c of a row is channels
// 4c..4c+3, lane l holds chunks l and l + 32 (head_dim <= 256; the GPU ring's head dims are
// multiples of 8, and every slot row starts at a multiple of head_dim elements of a
// cudaMalloc'd buffer, so each chunk is 8-byte aligned).
constexpr int kGatherChunks = 2;

template <typename T>
__global__ void __launch_bounds__(kRingWarps * 32)
    ring_gather_kernel(const __grid_constant__ LaRingGatherParams p) {
  const long long item = (long long)blockIdx.x * kRingWarps + threadIdx.x / 32;
  if (item >= (long long)p.batch * p.heads * p.len) return;
  const int lane = threadIdx.x % 32;
  const int i = (int)(item % p.len);
  const long long bh = item / p.len;
  const int h = (int)(bh % p.heads);
  const long long b = bh / p.heads;
  // The segment holding row i (sorted, tiling [0, len)).
  int lo = 0, hi = p.segment_count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.segments[4 * mid] <= i) lo = mid; else hi = mid - 1;
  }
  const int first = p.segments[4 * lo + 2], count = p.segments[4 * lo + 3];
  // Slot s: (o_offset, lse_offset, row0, rows); its row i's lse and o.
  const auto lse_of = [&](const int64_t *s) {
    return p.slots_lse[s[1] + bh * s[3] + (i - s[2])];
  };
  const auto o_of = [&](const int64_t *s) {
    return static_cast<const T *>(p.slots_o) + s[0] + ((b * s[3] + (i - s[2])) * p.heads + h) *
                                                          p.head_dim;
  };
  float m = kNegInf;
  for (int x = 0; x < count; ++x) m = fmaxf(m, lse_of(p.slots + 4 * p.slot_list[first + x]));
  const int chunks = p.head_dim / 4;
  float acc[kGatherChunks][4] = {};
  float sum = 0.0f;
  // Every slot is read even when all are empty (m = -inf, weights 0): an empty slot's o is 0,
  // but a partial whose scores were NaN (a NaN query row: the mainloops write o = NaN, lse =
  // -inf) then gives 0 * NaN = NaN, as la_ring_merge's zero-weighted update and the union
  // MoBA path do; skipping the reads wrote such a row as empty (0, -inf).
  for (int x = 0; x < count; ++x) {
    const int64_t *s = p.slots + 4 * p.slot_list[first + x];
    const float w = m == kNegInf ? 0.0f : expf(lse_of(s) - m);
    sum += w;
    const uint2 *o = reinterpret_cast<const uint2 *>(o_of(s));
#pragma unroll
    for (int c = 0; c < kGatherChunks; ++c) {
      if (lane + 32 * c >= chunks) break;
      const uint2 v = o[lane + 32 * c];
      const float2 x0 = Elem<T>::to_float2(*reinterpret_cast<const typename Elem<T>::Pair *>(&v.x));
      const float2 x1 = Elem<T>::to_float2(*reinterpret_cast<const typename Elem<T>::Pair *>(&v.y));
      acc[c][0] += w * x0.x;
      acc[c][1] += w * x0.y;
      acc[c][2] += w * x1.x;
      acc[c][3] += w * x1.y;
    }
  }
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  T *out = static_cast<T *>(p.out) + b * p.out_batch_stride + (long long)i * p.out_row_stride +
           (long long)h * p.out_head_stride;
#pragma unroll
  for (int c = 0; c < kGatherChunks; ++c) {
    if (lane + 32 * c >= chunks) break;
#pragma unroll
    for (int e = 0; e < 4; ++e) out[4 * (lane + 32 * c) + e] = Elem<T>::from_float(acc[c][e] * inv);
  }
  if (lane == 0 && p.lse != nullptr) p.lse[item] = m == kNegInf ? kNegInf : m + logf(sum);
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

template <typename T>
cudaError_t launch_ring_gather(const LaRingGatherParams &p, cudaStream_t stream) {
  if (p.head_dim <= 0 || p.head_dim % 4 != 0 || p.head_dim > 32 * 4 * kGatherChunks ||
      p.segment_count <= 0 ||
      p.batch < 0 || p.heads < 0 || p.len < 0)
    return cudaErrorInvalidValue;
  const long long blocks = warp_blocks((long long)p.batch * p.heads * p.len);
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  ring_gather_kernel<T><<<(unsigned)blocks, kRingWarps * 32, 0, stream>>>(p);
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

extern "C" int la_ring_gather(const LaRingGatherParams *params, cudaStream_t stream) {
  using namespace longattn;
  if (params == nullptr) return cudaErrorInvalidValue;
  return with_dtype<__half, __nv_bfloat16>(params->dtype, cudaErrorInvalidValue, [&](auto t) {
    return launch_ring_gather<typename decltype(t)::type>(*params, stream);
  });
}
