// Pieces shared by the paged-cache kernels (paged_append.cu, paged_quest.cu, the prefills,
// paged_decode.cu): block shapes, 8-element (16-byte) pack/unpack, the cache slot offset and
// the host-side cache dimension check.
#pragma once

#include "longattn/common.cuh"
#include "longattn/paged.h"
#include "longattn/paged_prefill.h"

namespace longattn {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = LA_PAGED_DECODE_ROWS;  // query rows per decode block
constexpr int kVec = 8;                      // elements per 16-byte load
constexpr int kQuestWarps = 8;
constexpr int kQuestThreads = kQuestWarps * 32;
constexpr int kQuestRows = 16;   // query rows staged per scoring pass
constexpr int kMaxDim = 256;
static_assert(kMaxDim / kVec <= 32, "one warp must cover a key row");

template <typename T>
__device__ __forceinline__ void unpack8(const uint4 &raw, float (&f)[kVec]) {
  using Pair = typename Elem<T>::Pair;
  const Pair *pairs = reinterpret_cast<const Pair *>(&raw);
#pragma unroll
  for (int x = 0; x < kVec / 2; ++x) {
    const float2 v = Elem<T>::to_float2(pairs[x]);
    f[2 * x] = v.x;
    f[2 * x + 1] = v.y;
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&f)[kVec]) {
  using Pair = typename Elem<T>::Pair;
  uint4 raw;
  Pair *pairs = reinterpret_cast<Pair *>(&raw);
#pragma unroll
  for (int x = 0; x < kVec / 2; ++x) pairs[x] = Elem<T>::from_float2(make_float2(f[2 * x], f[2 * x + 1]));
  return raw;
}

__device__ __forceinline__ long long slot_offset(const LaPagedCache &c, int phys, int slot,
                                                 int kvh) {
  return (((long long)phys * c.page_size + slot) * c.heads_kv + kvh) * c.head_dim;
}

// Division by the page size without a divide per token (decode and prefill): exact u / d
// for u < 2^31 and 1 <= d < 2^31: m = ceil(2^(31+l) / d), l = ceil(log2 d),
// u / d = (u * m) >> (31 + l) (checked exhaustively for small d on the host).
struct FastDiv {
  uint32_t mul;
  int shift;
  FastDiv() = default;
  __device__ __forceinline__ explicit FastDiv(int d) {
    int l = 0;
    while ((1u << l) < (uint32_t)d) ++l;
    mul = (uint32_t)(((1ull << (31 + l)) + (uint64_t)d - 1) / (uint64_t)d);
    shift = 31 + l;
  }
  __device__ __forceinline__ uint32_t div(uint32_t u) const {
    return (uint32_t)(((uint64_t)u * mul) >> shift);
  }
};

// The cache dimensions every paged kernel supports, and its page table (what Quest
// selection reads: it scores pages from their key metadata and never touches K/V).
inline bool table_ok(const LaPagedCache &c) {
  return c.head_dim > 0 && c.head_dim <= kMaxDim && c.head_dim % kVec == 0 && c.page_size > 0 &&
         c.heads_kv > 0 && c.batch > 0 && c.batch <= 65535 && c.num_pages >= 0 &&
         c.max_pages_per_seq > 0 && c.block_table != nullptr && c.seqlens_k != nullptr;
}

// table_ok, and the K/V pages that append, decode and prefill read or write.
inline bool dims_ok(const LaPagedCache &c) {
  return table_ok(c) && (c.num_pages == 0 || (c.k_cache != nullptr && c.v_cache != nullptr));
}

// The scalar arguments of a paged prefill the Rust API validates (the mma.sync launcher's
// check, paged_prefill.cu; the Hopper launcher runs it too). Null pointers of q/o/tables fail.
bool paged_prefill_params_ok(const LaPagedPrefillParams &p);

}  // namespace longattn
