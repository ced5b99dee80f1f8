// Device-side neighborhood index math shared by the neighborhood kernels (portable and
// tensor-core): the per-dim window of NATTEN's semantics and the token of grid coordinates.
// Mirrors NeighborhoodDim::window in src/neighborhood/mod.rs exactly.
#pragma once

#include <math.h>

#include "longattn/neighborhood.h"

namespace longattn {
namespace na {

// Window of position x along dim a: in-group indices [start, start + len) of dilation group
// `group` (key position j * dilation + group).
__device__ __forceinline__ void window(const LaNeighborhoodParams &p, int a, int x, int &start,
                                       int &len, int &group) {
  const int d = p.dilation[a], k = p.kernel[a], s = p.stride[a];
  const int g = x % d, i = x / d;
  const int lg = (int)(((long long)p.length[a] - g + d - 1) / d);
  group = g;
  if (p.causal[a]) {
    start = max(i - k + 1, 0);
    len = i + 1 - start;
    return;
  }
  const int left = k / 2, right = k / 2 + k % 2 - 1;
  const int c = (int)min((long long)(i / s) * s + s / 2, (long long)lg - 1);
  // Shifted left at the end border so that the window always holds k keys.
  start = (long long)c + right >= lg ? lg - k : max(c - left, 0);
  len = k;
}

// n / d and n % d, in 32-bit arithmetic whenever n fits (the common case).
__device__ __forceinline__ long long divmod(long long n, int d, int &rem) {
  if ((n >> 32) == 0) {
    const unsigned q = (unsigned)n / (unsigned)d;
    rem = (int)((unsigned)n - q * (unsigned)d);
    return q;
  }
  const long long q = n / d;
  rem = (int)(n - q * d);
  return q;
}

// Flat token (row-major grid) of in-group coordinates j of dilation group g.
__device__ __forceinline__ long long token(const LaNeighborhoodParams &p, const int (&j)[LA_NA_DIMS],
                                           const int (&g)[LA_NA_DIMS]) {
  long long t = 0;
#pragma unroll
  for (int a = 0; a < LA_NA_DIMS; ++a)
    t = t * p.length[a] + (long long)j[a] * p.dilation[a] + g[a];
  return t;
}

// The checks of the Rust API that need no device memory (NeighborhoodAttention::new,
// forward_gpu): a C caller gets cudaErrorInvalidValue instead of an out-of-bounds kernel.
inline bool params_ok(const LaNeighborhoodParams &p) {
  if (p.batch < 0 || p.heads_q <= 0 || p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0 ||
      p.heads_q > 65535 || p.batch > 65535)
    return false;
  if (p.head_dim <= 0 || p.head_dim > 256 || p.head_dim % 8 != 0) return false;
  if (p.dtype != LA_F16 && p.dtype != LA_BF16) return false;
  if (!(isfinite(p.scale) && p.scale > 0.0f) || isnan(p.softcap)) return false;
  if (p.softcap > 0.0f && !(isfinite(p.softcap) && isfinite(p.scale / p.softcap))) return false;
  long long tokens = 1;
  for (int a = 0; a < LA_NA_DIMS; ++a) {
    const long long L = p.length[a], k = p.kernel[a], d = p.dilation[a], s = p.stride[a];
    if (L < 1 || k < 1 || d < 1 || k * d > L || s < 1 || s > k) return false;
    if (p.causal[a] != 0 && (p.causal[a] != 1 || s != 1)) return false;
    if (tokens > (1LL << 62) / L) return false;  // no overflow: L <= 2^31
    tokens *= L;
  }
  // The portable kernel's grid: blocks of 4 tokens, at most 2^31 - 1 of them.
  if (tokens != p.tokens || (tokens + 3) / 4 > 0x7fffffffLL) return false;
  const int64_t strides[] = {p.q_batch_stride, p.q_row_stride, p.q_head_stride,
                             p.k_batch_stride, p.k_row_stride, p.k_head_stride,
                             p.v_batch_stride, p.v_row_stride, p.v_head_stride,
                             p.o_batch_stride, p.o_row_stride, p.o_head_stride};
  for (int64_t s : strides)
    if (s < 0) return false;
  const bool work = p.batch > 0 && p.tokens > 0;
  return !work || (p.q != nullptr && p.k != nullptr && p.v != nullptr && p.o != nullptr);
}

}  // namespace na
}  // namespace longattn
