// Host-side argument checks of the C entry points (la_dense_forward, la_merge, la_paged_*):
// the checks the Rust API runs that need no device memory. A launcher returns
// cudaErrorInvalidValue before anything is launched when one fails. What lives in device
// memory (cu_seqlens, block tables, page ids, page lists) cannot be read here: the Rust API
// validates those on the host copies it is given; C callers must pass valid tables (the
// validated C API in include/longattn.h does it for them).
#pragma once

#include <math.h>
#include <stdint.h>

#include "longattn/types.h"

namespace longattn {
namespace check {

inline bool dtype(LaDtype t) { return t == LA_F16 || t == LA_BF16 || t == LA_F32; }

// GQA head layout: every count >= 1, heads_q a multiple of heads_kv.
inline bool heads(int32_t heads_q, int32_t heads_kv, int32_t head_dim) {
  return heads_q > 0 && heads_kv > 0 && head_dim > 0 && heads_q % heads_kv == 0;
}

// Window sides are -1 (unbounded) or >= 0; sinks >= 0.
inline bool mask(int32_t left, int32_t right, int32_t sinks) {
  return left >= -1 && right >= -1 && sinks >= 0;
}

// Scale finite and > 0; softcap <= 0 is off, else finite with scale / softcap finite.
inline bool scoring(float scale, float softcap) {
  if (!(isfinite(scale) && scale > 0.0f)) return false;
  if (isnan(softcap)) return false;
  return softcap <= 0.0f || (isfinite(softcap) && isfinite(scale / softcap));
}

inline bool strides(int64_t a, int64_t b, int64_t c) { return a >= 0 && b >= 0 && c >= 0; }

}  // namespace check
}  // namespace longattn
