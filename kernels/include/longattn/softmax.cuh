// The online softmax on the device, the GPU twin of src/softmax.rs: the running (max, sum)
// state of a row, its rescale factor, the LSE of a finished row, and the merge weights of two
// partial results. Scores are kept in log2 units (scale * log2(e) folded in) so that exp2
// maps to one MUFU instruction; LSE is natural log on output.
#pragma once

#include "longattn/common.cuh"
#include "longattn/mma.cuh"

namespace longattn {

// Factor that rescales a state with max m_old to the new max m_new.
__device__ __forceinline__ float rescale_factor(float m_old, float m_new) {
  // m_new == -inf means everything so far is masked: keep the state (avoid -inf - -inf).
  return m_new == kNegInf ? 1.0f : exp2f(m_old - m_new);
}

// Natural-log LSE of a finished row in log2 units; -inf for an empty row.
__device__ __forceinline__ float lse_from_log2(float m_log2, float l) {
  return l > 0.0f ? (m_log2 + __log2f(l)) * kLn2 : kNegInf;
}

// Weights (wa, wb) and LSE of merging two partial results with natural-log LSEs la, lb over
// disjoint key sets, as src/softmax.rs merge_weights: o = wa o_a + wb o_b. Both empty stays
// empty (0, 0, -inf) instead of NaN.
__device__ __forceinline__ void merge_weights(float la, float lb, float &wa, float &wb,
                                              float &lse) {
  const float m = fmaxf(la, lb);
  if (m == kNegInf) {
    wa = 0.0f;
    wb = 0.0f;
    lse = kNegInf;
    return;
  }
  lse = m + logf(expf(la - m) + expf(lb - m));
  wa = expf(la - lse);
  wb = expf(lb - lse);
}

// Online softmax of the two rows a thread holds in the m16n8 accumulator layout of the
// tensor-core kernels (rows g and g + 8 of a warp's 16; the 4 threads of a quad, lanes xor 1
// and 2, share a row). The state of row r is (m[r], l[r]): the running max in log2 units
// (-inf before any visible key) and this thread's partial sum until softmax_finalize. A score
// tile of kBlocks n8 blocks is float[kBlocks][4]: element [i][2 r + c] is row r, column
// 8 i + 2 tq + c. (The state stays two arrays of the caller: wrapping them in a struct moves
// ptxas's register assignment in the verified kernels.)

// Folds row r of a score tile (log2 units, masked = -inf) into (m, l); the scores become
// their exponentials (P), and the factor that rescales the row's O is returned.
template <int kBlocks>
__device__ __forceinline__ float softmax_update(float &m, float &l, int r, float (&s)[kBlocks][4]) {
  float mx = m;
#pragma unroll
  for (int i = 0; i < kBlocks; ++i) mx = fmaxf(mx, fmaxf(s[i][2 * r], s[i][2 * r + 1]));
  mx = fmaxf(mx, mma::shfl_xor<1>(mx));
  mx = fmaxf(mx, mma::shfl_xor<2>(mx));
  const float alpha = rescale_factor(m, mx);
  // A row with nothing visible yet has mx = -inf: subtract 0 instead, so that masked scores
  // give exp2(-inf) = 0 rather than exp2(-inf - -inf) = NaN.
  const float base = mx == kNegInf ? 0.0f : mx;
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kBlocks; ++i) {
    s[i][2 * r] = mma::fast_exp2(s[i][2 * r] - base);
    s[i][2 * r + 1] = mma::fast_exp2(s[i][2 * r + 1] - base);
    sum += s[i][2 * r] + s[i][2 * r + 1];
  }
  l = l * alpha + sum;
  m = mx;
  return alpha;
}

// Row sums over the quad (in place), and their inverses (0 for an empty row, whose output is
// 0).
__device__ __forceinline__ void softmax_finalize(float (&l)[2], float (&inv)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += mma::shfl_xor<1>(l[r]);
    l[r] += mma::shfl_xor<2>(l[r]);
    inv[r] = l[r] > 0.0f ? __fdividef(1.0f, l[r]) : 0.0f;
  }
}

// Scales row r of an accumulator tile of kBlocks n8 blocks by alpha.
template <int kBlocks>
__device__ __forceinline__ void scale_row(float (&acc)[kBlocks][4], int r, float alpha) {
#pragma unroll
  for (int i = 0; i < kBlocks; ++i) {
    acc[i][2 * r] *= alpha;
    acc[i][2 * r + 1] *= alpha;
  }
}

}  // namespace longattn
