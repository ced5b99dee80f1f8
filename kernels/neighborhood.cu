// Neighborhood attention (NATTEN semantics): the portable CUDA-core kernel, the fallback that
// runs every valid problem (any head_dim multiple of 8 up to 256, f16/bf16, ranks 1-3,
// kernel size, dilation, causal and stride per dim, GQA, softcap, LSE).
//
// One warp per (query token, query head, sequence); a block holds 4 consecutive tokens of
// one head, whose neighborhoods mostly overlap (L1/L2 reuse). A key's head_dim is spread over
// kLanes lanes, 8 elements (one 16-byte vector) each, kLanes = the next power of two >=
// head_dim / 8; the warp's 32 / kLanes lane groups ("slots") take consecutive keys of the
// neighborhood, each with its own online-softmax state in log2 units, and the slots merge by
// xor shuffles at the end. Only the neighborhood's keys are visited (enumerated row-major
// over the per-dim windows, index math per key), so no masked key costs a load.
//
// Rank-generic by padding: the host fills leading dims with (1, 1, 1, 1, non-causal), whose
// window is always {0}, so the per-dim loops are unrolled over LA_NA_DIMS dims.

#include "longattn/common.cuh"
#include "longattn/neighborhood.cuh"
#include "longattn/softmax.cuh"

namespace longattn {
namespace {

constexpr int kNaWarps = 4;
constexpr int kNaThreads = kNaWarps * 32;
constexpr int kVec = 8;  // elements per 16-byte load

template <typename T, int kLanes>
__global__ void __launch_bounds__(kNaThreads)
    neighborhood_simt_kernel(const __grid_constant__ LaNeighborhoodParams p) {
  static_assert(kLanes >= 1 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0,
                "lanes per key: a power of two dividing the warp");
  constexpr int kSlots = 32 / kLanes;  // keys in flight per warp step
  using E = Elem<T>;
  using Pair = typename E::Pair;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long t = (long long)blockIdx.x * kNaWarps + warp;
  if (t >= p.tokens) return;  // whole warps leave: the shuffles below stay warp-uniform
  const int h = blockIdx.y, b = blockIdx.z;
  const int kvh = h / (p.heads_q / p.heads_kv);
  const int slot = lane / kLanes, sub = lane % kLanes;
  const bool owns = sub < p.head_dim / kVec;  // this lane holds channels [8 sub, 8 sub + 8)
  const int col = sub * kVec;

  // The query's window per dim (outermost first).
  int start[LA_NA_DIMS], len[LA_NA_DIMS], group[LA_NA_DIMS];
  {
    long long rest = t;
    int x[LA_NA_DIMS];
#pragma unroll
    for (int a = LA_NA_DIMS - 1; a >= 0; --a) rest = na::divmod(rest, p.length[a], x[a]);
#pragma unroll
    for (int a = 0; a < LA_NA_DIMS; ++a) na::window(p, a, x[a], start[a], len[a], group[a]);
  }
  const long long n_keys = (long long)len[0] * len[1] * len[2];

  float qf[kVec];
  {
    uint4 raw = make_uint4(0, 0, 0, 0);
    const T *q = static_cast<const T *>(p.q) + b * p.q_batch_stride + t * p.q_row_stride +
                 h * p.q_head_stride;
    if (owns) raw = *reinterpret_cast<const uint4 *>(q + col);
    const Pair *pairs = reinterpret_cast<const Pair *>(&raw);
#pragma unroll
    for (int e = 0; e < kVec / 2; ++e) {
      const float2 f = E::to_float2(pairs[e]);
      qf[2 * e] = f.x;
      qf[2 * e + 1] = f.y;
    }
  }
  const T *k = static_cast<const T *>(p.k) + b * p.k_batch_stride + kvh * p.k_head_stride + col;
  const T *v = static_cast<const T *>(p.v) + b * p.v_batch_stride + kvh * p.v_head_stride + col;

  const bool softcap = p.softcap > 0.0f;
  const float scale_log2 = p.scale * kLog2e;
  float m = kNegInf, l = 0.0f, acc[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) acc[e] = 0.0f;

  // Warp-uniform trip count: a slot past the last key still joins the shuffles.
  for (long long n0 = 0; n0 < n_keys; n0 += kSlots) {
    const long long n = n0 + slot;
    const bool valid = n < n_keys;
    uint4 kr = make_uint4(0, 0, 0, 0), vr = make_uint4(0, 0, 0, 0);
    if (valid && owns) {
      int j[LA_NA_DIMS];
      j[0] = (int)na::divmod(na::divmod(n, len[2], j[2]), len[1], j[1]);
#pragma unroll
      for (int a = 0; a < LA_NA_DIMS; ++a) j[a] += start[a];
      const long long key = na::token(p, j, group);
      kr = *reinterpret_cast<const uint4 *>(k + key * p.k_row_stride);
      vr = *reinterpret_cast<const uint4 *>(v + key * p.v_row_stride);
    }
    const Pair *kp = reinterpret_cast<const Pair *>(&kr);
    float dot = 0.0f;
#pragma unroll
    for (int e = 0; e < kVec / 2; ++e) {
      const float2 f = E::to_float2(kp[e]);
      dot = fmaf(qf[2 * e], f.x, fmaf(qf[2 * e + 1], f.y, dot));
    }
#pragma unroll
    for (int o = kLanes / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (!valid) continue;
    // Score in log2 units: scale * log2(e) folded into one multiply, or the softcap.
    const float x = softcap ? p.softcap * tanhf(dot * p.scale / p.softcap) * kLog2e
                            : dot * scale_log2;
    const float m_new = fmaxf(m, x);
    const float alpha = exp2f(m - m_new);  // m = -inf before the first key: 0
    const float pr = exp2f(x - m_new);
    l = l * alpha + pr;
    m = m_new;
    const Pair *vp = reinterpret_cast<const Pair *>(&vr);
#pragma unroll
    for (int e = 0; e < kVec / 2; ++e) {
      const float2 f = E::to_float2(vp[e]);
      acc[2 * e] = fmaf(pr, f.x, acc[2 * e] * alpha);
      acc[2 * e + 1] = fmaf(pr, f.y, acc[2 * e + 1] * alpha);
    }
  }

  // Merge the slots' states (the same lane of every slot holds the same channels).
#pragma unroll
  for (int o = kLanes; o < 32; o <<= 1) {
    const float m_o = __shfl_xor_sync(0xffffffffu, m, o);
    const float l_o = __shfl_xor_sync(0xffffffffu, l, o);
    const float m_new = fmaxf(m, m_o);
    // Both slots empty (-inf): keep the empty state instead of exp2(-inf - -inf) = NaN.
    const float a = m_new == kNegInf ? 1.0f : exp2f(m - m_new);
    const float c = m_new == kNegInf ? 0.0f : exp2f(m_o - m_new);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float acc_o = __shfl_xor_sync(0xffffffffu, acc[e], o);
      acc[e] = acc[e] * a + acc_o * c;
    }
    l = l * a + l_o * c;
    m = m_new;
  }

  if (slot != 0) return;
  // A query always sees itself, so l > 0; the guard keeps NaN inputs from dividing by 0.
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  if (owns) {
    uint4 out;
    Pair *op = reinterpret_cast<Pair *>(&out);
#pragma unroll
    for (int e = 0; e < kVec / 2; ++e)
      op[e] = E::from_float2(make_float2(acc[2 * e] * inv, acc[2 * e + 1] * inv));
    T *o = static_cast<T *>(p.o) + b * p.o_batch_stride + t * p.o_row_stride +
           h * p.o_head_stride + col;
    *reinterpret_cast<uint4 *>(o) = out;
  }
  if (sub == 0 && p.lse != nullptr)
    p.lse[((long long)b * p.heads_q + h) * p.tokens + t] = lse_from_log2(m, l);
}

template <typename T, int kLanes>
cudaError_t launch(const LaNeighborhoodParams &p, cudaStream_t stream) {
  const dim3 grid((unsigned)((p.tokens + kNaWarps - 1) / kNaWarps), p.heads_q, p.batch);
  neighborhood_simt_kernel<T, kLanes><<<grid, kNaThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// The lanes-per-key switch: kLanes = next power of two >= head_dim / 8.
template <typename T>
cudaError_t launch_for_dim(const LaNeighborhoodParams &p, cudaStream_t stream) {
  const int vecs = p.head_dim / kVec;
  if (vecs <= 1) return launch<T, 1>(p, stream);
  if (vecs <= 2) return launch<T, 2>(p, stream);
  if (vecs <= 4) return launch<T, 4>(p, stream);
  if (vecs <= 8) return launch<T, 8>(p, stream);
  if (vecs <= 16) return launch<T, 16>(p, stream);
  return launch<T, 32>(p, stream);
}

}  // namespace
}  // namespace longattn

extern "C" int la_neighborhood_forward(const LaNeighborhoodParams *params, cudaStream_t stream) {
  using namespace longattn;
  if (params == nullptr || !na::params_ok(*params)) return cudaErrorInvalidValue;
  const LaNeighborhoodParams &p = *params;
  if (p.batch == 0 || p.tokens == 0) return cudaSuccess;
  switch (p.dtype) {
    case LA_F16: return launch_for_dim<__half>(p, stream);
    case LA_BF16: return launch_for_dim<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}
