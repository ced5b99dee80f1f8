// Merge of two partial attention results (o, lse) over disjoint key sets; one warp per
// (row, head). Lane 0 alone reads and writes the LSE values so that out may alias a.

#include "longattn/check.cuh"
#include "longattn/common.cuh"
#include "longattn/dtype.cuh"
#include "longattn/merge.h"
#include "longattn/softmax.cuh"

namespace longattn {
namespace {

constexpr int kMergeWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kMergeWarps * 32) merge_kernel(const __grid_constant__ LaMergeParams p) {
  const long long item = (long long)blockIdx.x * kMergeWarps + threadIdx.x / 32;
  const long long rows = (long long)p.batch * p.seqlen;
  if (item >= rows * p.heads) return;
  const int lane = threadIdx.x % 32;
  const long long r = item / p.heads;
  const int h = (int)(item % p.heads);
  const long long b = r / p.seqlen, sidx = r % p.seqlen;
  const long long li = (b * p.heads + h) * p.seqlen + sidx;

  float wa = 0.0f, wb = 0.0f, lse = kNegInf;
  if (lane == 0) merge_weights(p.a_lse[li], p.b_lse[li], wa, wb, lse);
  wa = __shfl_sync(0xffffffffu, wa, 0);
  wb = __shfl_sync(0xffffffffu, wb, 0);
  const long long base = item * p.head_dim;
  const T *ao = static_cast<const T *>(p.a_o) + base;
  const T *bo = static_cast<const T *>(p.b_o) + base;
  T *oo = static_cast<T *>(p.out_o) + base;
  for (int x = lane; x < p.head_dim; x += 32) {
    const float v = wa * Elem<T>::to_float(ao[x]) + wb * Elem<T>::to_float(bo[x]);
    oo[x] = Elem<T>::from_float(v);
  }
  if (lane == 0) p.out_lse[li] = lse;
}

template <typename T>
cudaError_t launch_merge(const LaMergeParams &p, cudaStream_t stream) {
  const long long items = (long long)p.batch * p.seqlen * p.heads;
  const long long blocks = (items + kMergeWarps - 1) / kMergeWarps;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  merge_kernel<T><<<(unsigned)blocks, kMergeWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace longattn

extern "C" int la_merge(const LaMergeParams *params, cudaStream_t stream) {
  using namespace longattn;
  if (params == nullptr || !check::dtype(params->dtype) || params->batch < 0 ||
      params->seqlen < 0 || params->heads < 0 || params->head_dim <= 0)
    return cudaErrorInvalidValue;
  const bool work = (long long)params->batch * params->seqlen * params->heads > 0;
  if (work && (params->a_o == nullptr || params->a_lse == nullptr || params->b_o == nullptr ||
               params->b_lse == nullptr || params->out_o == nullptr ||
               params->out_lse == nullptr))
    return cudaErrorInvalidValue;
  return with_dtype<__half, __nv_bfloat16, float>(
      params->dtype, cudaErrorInvalidValue,
      [&](auto t) { return launch_merge<typename decltype(t)::type>(*params, stream); });
}
