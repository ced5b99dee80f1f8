// Placement of one (sequence, query head) in the dense params: per-sequence lengths and row
// offsets for fixed or packed (varlen) batches, and the head's q/k/v/o base pointers. Used by
// the three dense kernels (dense.cu, dense_mma_padded.cu, dense_wgmma.cu).
#pragma once

#include "longattn/dense.h"

namespace longattn {

// Per-sequence placement for fixed or packed (varlen) batches.
struct SeqInfo {
  int sq, sk;            // this sequence's lengths
  long long q_row0, k_row0;  // first packed row (varlen) or 0
  long long lse_base;    // index of (b, h, row 0) in the LSE buffer; row stride 1
};

__device__ __forceinline__ SeqInfo seq_info(const LaDenseParams &p, int b, int h) {
  SeqInfo s;
  if (p.cu_seqlens_q != nullptr) {
    const int q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
    s.sq = p.cu_seqlens_q[b + 1] - q0;
    s.sk = p.cu_seqlens_k[b + 1] - k0;
    s.q_row0 = q0;
    s.k_row0 = k0;
    s.lse_base = (long long)h * p.total_q + q0;
  } else {
    s.sq = p.seqlen_q;
    s.sk = p.seqlen_k;
    s.q_row0 = 0;
    s.k_row0 = 0;
    s.lse_base = ((long long)b * p.heads_q + h) * p.seqlen_q;
  }
  return s;
}

// Base pointers of one (sequence b, query head h) for the dense kernels: row i of q and o is
// at `q + i * q_row_stride`, key j of the matching kv head at `k + j * k_row_stride`.
template <typename T>
struct HeadTensors {
  const T *q, *k, *v;
  T *o;
};

template <typename T>
__device__ __forceinline__ HeadTensors<T> head_tensors(const LaDenseParams &p, const SeqInfo &s,
                                                       int b, int h) {
  const int kvh = h / (p.heads_q / p.heads_kv);
  HeadTensors<T> t;
  t.q = static_cast<const T *>(p.q) + b * p.q_batch_stride + s.q_row0 * p.q_row_stride +
        h * p.q_head_stride;
  t.k = static_cast<const T *>(p.k) + b * p.k_batch_stride + s.k_row0 * p.k_row_stride +
        kvh * p.k_head_stride;
  t.v = static_cast<const T *>(p.v) + b * p.v_batch_stride + s.k_row0 * p.v_row_stride +
        kvh * p.v_head_stride;
  t.o = static_cast<T *>(p.o) + b * p.o_batch_stride + s.q_row0 * p.o_row_stride +
        h * p.o_head_stride;
  return t;
}

}  // namespace longattn
