// Paged KV cache family: append (+ Quest kmin/kmax metadata), Quest page selection and
// split-KV decode attention. Mirrors src/paged/ (CPU path) exactly.
//
// Decode layout (FlashInfer-style, no shared-memory staging of K/V): a lane owns 8
// consecutive channels (one 16-byte vector) of a key, so G = next_pow2(head_dim / 8) lanes
// cover one key row and a warp holds 32 / G key "slots". A block of 4 warps serves one
// (sequence, kv head, group of up to 8 query rows), where the rows are the (query position,
// query head of the group) pairs: every K/V vector loaded feeds all rows of the group, so a
// page is read once per GQA group. With more than 4 rows the warps form two teams of 4 rows
// each that walk the same keys (the second load of a vector is an L1 hit; 8 rows per warp
// would spill). Each slot runs its own online-softmax state over its keys
// (4 keys per step, so 8 independent 16-byte loads are in flight per lane) and the slots'
// states are merged in shared memory at the end. Split-KV divides the block's page list
// into num_splits contiguous parts (blockIdx.x) whose (o, lse) a merge kernel combines.

#include "longattn/common.cuh"
#include "longattn/paged.h"

namespace longattn {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = LA_PAGED_DECODE_ROWS;  // query rows per decode block
constexpr int kWarpRows = 4;                 // query rows per warp (registers: 4 x 8 accumulators)
constexpr int kTeams = kRows / kWarpRows;    // warp teams when a block holds > 4 rows
static_assert(kRows % kWarpRows == 0 && kWarps % kTeams == 0, "warps split evenly into teams");
constexpr int kVec = 8;                      // elements per 16-byte load
constexpr int kKeysPerStep = 4;              // keys a slot loads before one softmax rescale
constexpr int kQuestWarps = 8;
constexpr int kQuestThreads = kQuestWarps * 32;
constexpr int kQuestRows = 16;   // query rows staged per scoring pass
constexpr int kMaxDim = 256;
static_assert(kMaxDim / kVec <= 32, "one warp must cover a key row");

// Lanes per key row: the smallest power of two covering head_dim / 8 vectors.
__host__ __device__ __forceinline__ int lanes_per_key(int d) {
  int g = 1;
  while (g * kVec < d) g <<= 1;
  return g;
}

__device__ __forceinline__ float reduce_sum_lanes(float x, int g) {
  for (int o = g >> 1; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

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

// A shared-memory vector load the compiler may not hoist out of the key loop: the decode
// block's query rows (kRows x 8 floats per lane) would otherwise be kept in registers next to
// the accumulators and spill.
__device__ __forceinline__ float4 lds128_volatile(const float *ptr) {
  float4 v;
  const unsigned addr = (unsigned)__cvta_generic_to_shared(ptr);
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(addr));
  return v;
}

__device__ __forceinline__ long long slot_offset(const LaPagedCache &c, int phys, int slot,
                                                 int kvh) {
  return (((long long)phys * c.page_size + slot) * c.heads_kv + kvh) * c.head_dim;
}

// ---- append -------------------------------------------------------------------------
// Grid (max_pages_touched, batch): one block per (sequence, page touched by its new tokens).
// A thread owns one (kv head, 8-channel vector) and walks the page's new slots in order, so
// the page's metadata needs no atomics and is deterministic.
template <typename T>
__global__ void __launch_bounds__(kThreads) append_kernel(const __grid_constant__ LaPagedAppendParams p) {
  const LaPagedCache &c = p.cache;
  const int b = blockIdx.y;
  const int n_new = p.cu_seqlens_new[b + 1] - p.cu_seqlens_new[b];
  if (n_new <= 0) return;
  const int end = c.seqlens_k[b], start = end - n_new;
  const int ps = c.page_size;
  const int lp = start / ps + blockIdx.x;
  if ((long long)lp * ps >= end) return;
  const int s0 = max(start - lp * ps, 0);
  const int s1 = min(end - lp * ps, ps);  // exclusive
  const int phys = c.block_table[(long long)b * c.max_pages_per_seq + lp];
  const int vecs = c.head_dim / kVec;
  const T *k_new = static_cast<const T *>(p.k_new);
  const T *v_new = static_cast<const T *>(p.v_new);
  T *k_cache = static_cast<T *>(c.k_cache);
  T *v_cache = static_cast<T *>(c.v_cache);
  for (int item = threadIdx.x; item < c.heads_kv * vecs; item += kThreads) {
    const int h = item / vecs, col = (item % vecs) * kVec;
    float mn[kVec], mx[kVec];
#pragma unroll
    for (int x = 0; x < kVec; ++x) {
      mn[x] = -kNegInf;
      mx[x] = kNegInf;
    }
    for (int slot = s0; slot < s1; ++slot) {
      const long long t = p.cu_seqlens_new[b] + (lp * ps + slot - start);
      const uint4 kr = *reinterpret_cast<const uint4 *>(k_new + t * p.k_new_row_stride +
                                                        h * p.k_new_head_stride + col);
      const uint4 vr = *reinterpret_cast<const uint4 *>(v_new + t * p.v_new_row_stride +
                                                        h * p.v_new_head_stride + col);
      const long long dst = slot_offset(c, phys, slot, h) + col;
      *reinterpret_cast<uint4 *>(k_cache + dst) = kr;
      *reinterpret_cast<uint4 *>(v_cache + dst) = vr;
      float f[kVec];
      unpack8<T>(kr, f);
#pragma unroll
      for (int x = 0; x < kVec; ++x) {
        mn[x] = fminf(mn[x], f[x]);
        mx[x] = fmaxf(mx[x], f[x]);
      }
    }
    if (p.kmin == nullptr) continue;
    const long long m_off = ((long long)phys * c.heads_kv + h) * c.head_dim + col;
    float4 *kmin = reinterpret_cast<float4 *>(p.kmin + m_off);
    float4 *kmax = reinterpret_cast<float4 *>(p.kmax + m_off);
    if (s0 > 0) {
      // The page already holds slots 0..s0: widen its bounds. (s0 == 0 restarts the page,
      // which is how a reused page drops the bounds of its previous owner.)
#pragma unroll
      for (int x = 0; x < kVec / 4; ++x) {
        const float4 a = kmin[x], z = kmax[x];
        mn[4 * x] = fminf(mn[4 * x], a.x);
        mn[4 * x + 1] = fminf(mn[4 * x + 1], a.y);
        mn[4 * x + 2] = fminf(mn[4 * x + 2], a.z);
        mn[4 * x + 3] = fminf(mn[4 * x + 3], a.w);
        mx[4 * x] = fmaxf(mx[4 * x], z.x);
        mx[4 * x + 1] = fmaxf(mx[4 * x + 1], z.y);
        mx[4 * x + 2] = fmaxf(mx[4 * x + 2], z.z);
        mx[4 * x + 3] = fmaxf(mx[4 * x + 3], z.w);
      }
    }
#pragma unroll
    for (int x = 0; x < kVec / 4; ++x) {
      kmin[x] = make_float4(mn[4 * x], mn[4 * x + 1], mn[4 * x + 2], mn[4 * x + 3]);
      kmax[x] = make_float4(mx[4 * x], mx[4 * x + 1], mx[4 * x + 2], mx[4 * x + 3]);
    }
  }
}

// ---- Quest selection ----------------------------------------------------------------
// Order-preserving map of a float onto uint32 (larger float -> larger integer).
__device__ __forceinline__ uint32_t ordered_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Unique 64-bit selection key: kept pages above every score, then score, then lower page
// index first. 0 marks a page that is not a candidate.
__device__ __forceinline__ uint64_t select_key(bool candidate, bool kept, float score, int page) {
  if (!candidate) return 0;
  const uint64_t hi = kept ? 0xffffffffull : (uint64_t)ordered_bits(score);
  return (hi << 32) | (uint64_t)(0xffffffffu - (uint32_t)page);
}

struct QuestCandidates {
  int sink_pages, first, last;  // candidates: [0, sink_pages) and [first, last)
  int newest;                   // page of the newest token, -1 if none
  __device__ __forceinline__ bool contains(int page) const {
    return page < sink_pages || (page >= first && page < last);
  }
  __device__ __forceinline__ int count() const { return sink_pages + (last - first); }
};

// Grid (heads_kv, batch): one block per (sequence, kv head). Scores go to global memory
// (also an output), then an 8-pass radix select over the unique 64-bit keys finds the
// K-th largest key and a block scan writes the selected pages in ascending order.
template <typename T>
__global__ void __launch_bounds__(kQuestThreads) quest_kernel(const __grid_constant__ LaQuestParams p) {
  const LaPagedCache &c = p.cache;
  const int kvh = blockIdx.x, b = blockIdx.y;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const long long row_base = ((long long)b * c.heads_kv + kvh) * c.max_pages_per_seq;
  float *scores = p.scores + row_base;
  if (p.head_kind[kvh] != LA_HEAD_QUEST) {
    // Documented output: -inf scores for heads that are not Quest heads (the buffer is not
    // necessarily pre-filled).
    for (int pg = tid; pg < c.max_pages_per_seq; pg += kQuestThreads) scores[pg] = kNegInf;
    return;
  }
  __shared__ __align__(16) float q_s[kQuestRows * kMaxDim];
  __shared__ int hist[256];
  __shared__ unsigned long long sel_prefix;
  __shared__ int sel_remaining;
  __shared__ int warp_base[kQuestWarps];

  const int d = c.head_dim, ps = c.page_size, sk = c.seqlens_k[b];
  const int group = p.heads_q / c.heads_kv;
  const int rows = p.q_len * group;

  const Mask mask{p.window_left, p.window_right, p.sinks};
  QuestCandidates cand;
  mask.key_tiles(0, p.q_len, p.q_len, sk, ps, cand.sink_pages, cand.first, cand.last);
  cand.newest = sk > 0 ? (sk - 1) / ps : -1;
  const int n_pages = (sk + ps - 1) / ps;

  for (int pg = tid; pg < c.max_pages_per_seq; pg += kQuestThreads) scores[pg] = kNegInf;
  const T *q = static_cast<const T *>(p.q) + (long long)b * p.q_batch_stride;
  for (int r0 = 0; r0 < rows; r0 += kQuestRows) {
    const int nr = min(kQuestRows, rows - r0);
    __syncthreads();  // previous pass done with q_s (and the -inf fill is visible)
    for (int e = tid; e < kQuestRows * d; e += kQuestThreads) {
      const int r = e / d, ch = e % d;
      float x = 0.0f;
      if (r < nr) {
        const int rr = r0 + r, qi = rr / group, h = kvh * group + rr % group;
        x = Elem<T>::to_float(q[qi * p.q_row_stride + h * p.q_head_stride + ch]);
      }
      q_s[r * d + ch] = x;
    }
    __syncthreads();
    // Warp per page; lane owns channels 4 * lane + 128 * x.
    for (int pg = warp; pg < n_pages; pg += kQuestWarps) {
      if (!cand.contains(pg)) continue;
      const int phys = c.block_table[(long long)b * c.max_pages_per_seq + pg];
      const long long m_off = ((long long)phys * c.heads_kv + kvh) * d;
      float4 lo[kMaxDim / 128], hi[kMaxDim / 128];
#pragma unroll
      for (int x = 0; x < kMaxDim / 128; ++x) {
        const int ch = 4 * lane + 128 * x;
        lo[x] = hi[x] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (ch < d) {
          lo[x] = *reinterpret_cast<const float4 *>(p.kmin + m_off + ch);
          hi[x] = *reinterpret_cast<const float4 *>(p.kmax + m_off + ch);
        }
      }
      float best = scores[pg];
      for (int r = 0; r < nr; ++r) {
        float s = 0.0f;
#pragma unroll
        for (int x = 0; x < kMaxDim / 128; ++x) {
          const int ch = 4 * lane + 128 * x;
          if (ch < d) {
            const float4 qv = *reinterpret_cast<const float4 *>(q_s + r * d + ch);
            s += fmaxf(qv.x * hi[x].x, qv.x * lo[x].x) + fmaxf(qv.y * hi[x].y, qv.y * lo[x].y) +
                 fmaxf(qv.z * hi[x].z, qv.z * lo[x].z) + fmaxf(qv.w * hi[x].w, qv.w * lo[x].w);
          }
        }
        best = fmaxf(best, warp_sum(s));
      }
      if (lane == 0) scores[pg] = best;
    }
  }

  // How many pages to take: the budget, or every kept page if more, at most the candidates.
  int n_kept = 0;
  for (int pg = 0; pg < min(p.sink_pages, n_pages); ++pg) n_kept += cand.contains(pg);
  if (cand.newest >= p.sink_pages && cand.contains(cand.newest)) ++n_kept;
  const int n_cand = cand.count();
  const int k_sel = min(max(p.budget_pages, n_kept), n_cand);
  auto kept = [&](int pg) { return pg < p.sink_pages || pg == cand.newest; };
  auto key_of = [&](int pg) {
    return select_key(cand.contains(pg), kept(pg), scores[pg], pg);
  };

  // Radix select of the k_sel-th largest key (keys are unique, so exactly k_sel keys are
  // >= it). Every candidate is taken when k_sel == n_cand.
  unsigned long long kth = 1;
  if (k_sel < n_cand) {
    unsigned long long prefix = 0, prefix_mask = 0;
    int remaining = k_sel;
    for (int shift = 56; shift >= 0; shift -= 8) {
      __syncthreads();  // scores written; previous pass's readers of hist done
      for (int x = tid; x < 256; x += kQuestThreads) hist[x] = 0;
      __syncthreads();
      for (int pg = tid; pg < n_pages; pg += kQuestThreads) {
        const unsigned long long key = key_of(pg);
        if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xff], 1);
      }
      __syncthreads();
      if (tid == 0) {
        int cum = 0, digit = 255;
        for (; digit > 0; --digit) {
          if (cum + hist[digit] >= remaining) break;
          cum += hist[digit];
        }
        sel_remaining = remaining - cum;
        sel_prefix = prefix | ((unsigned long long)digit << shift);
      }
      __syncthreads();
      remaining = sel_remaining;
      prefix = sel_prefix;
      prefix_mask |= 0xffull << shift;
    }
    kth = prefix;
  }

  // Compaction in ascending page order: ballot within warps, warp offsets through smem.
  int base = 0;
  __syncthreads();
  for (int p0 = 0; p0 < n_pages; p0 += kQuestThreads) {
    const int pg = p0 + tid;
    const bool take = pg < n_pages && key_of(pg) >= kth && key_of(pg) != 0;
    const unsigned ballot = __ballot_sync(0xffffffffu, take);
    if (lane == 0) warp_base[warp] = __popc(ballot);
    __syncthreads();
    int offset = base;
    for (int w = 0; w < warp; ++w) offset += warp_base[w];
    int total = 0;
    for (int w = 0; w < kQuestWarps; ++w) total += warp_base[w];
    if (take) p.page_list[row_base + offset + __popc(ballot & ((1u << lane) - 1u))] = pg;
    base += total;
    __syncthreads();
  }
  if (tid == 0) p.page_count[(long long)b * c.heads_kv + kvh] = base;
}

// ---- decode ------------------------------------------------------------------------
// Shared memory of a decode block for head dim d: q_s [kRows][d] f32, then the per-slot
// softmax states for the final merge: m_s, l_s [slots][kRows], acc_s [slots][kRows][d].
inline size_t decode_smem_bytes(int d) {
  const int slots = kWarps * (32 / lanes_per_key(d));
  return sizeof(float) * ((size_t)kRows * d + 2 * (size_t)slots * kRows +
                          (size_t)slots * kRows * d);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) decode_kernel(const __grid_constant__ LaPagedDecodeParams p) {
  const LaPagedCache &c = p.cache;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int d = c.head_dim, ps = c.page_size;
  const int g_lanes = lanes_per_key(d);
  const int slots_per_warp = 32 / g_lanes, n_slots = kWarps * slots_per_warp;
  float *q_s = reinterpret_cast<float *>(smem_raw);
  float *m_s = q_s + kRows * d;
  float *l_s = m_s + n_slots * kRows;
  float *acc_s = l_s + n_slots * kRows;

  const int split = blockIdx.x, b = blockIdx.z;
  const int group = p.heads_q / c.heads_kv;
  const int rows_total = p.q_len * group;
  const int row_groups = (rows_total + kRows - 1) / kRows;
  const int kvh = blockIdx.y / row_groups, row0 = (blockIdx.y % row_groups) * kRows;
  const int nrows = min(kRows, rows_total - row0);
  const int sq = p.q_len, sk = c.seqlens_k[b];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int tx = lane % g_lanes, ty = lane / g_lanes;
  const int col = tx * kVec;
  const bool lane_active = col < d;

  // Query rows -> f32 shared memory; row rr is (query position rr / group, head of the group
  // rr % group).
  const T *q = static_cast<const T *>(p.q) + (long long)b * p.q_batch_stride;
  for (int e = tid; e < kRows * (d / kVec); e += kThreads) {
    const int r = e / (d / kVec), cc = (e % (d / kVec)) * kVec;
    float f[kVec] = {};
    if (r < nrows) {
      const int rr = row0 + r, qi = rr / group, h = kvh * group + rr % group;
      unpack8<T>(*reinterpret_cast<const uint4 *>(q + qi * p.q_row_stride + h * p.q_head_stride + cc), f);
    }
#pragma unroll
    for (int x = 0; x < kVec; ++x) q_s[r * d + cc + x] = f[x];
  }

  const int kind = p.head_kind != nullptr ? p.head_kind[kvh] : (int)LA_HEAD_FULL;
  const Mask mask = kind == LA_HEAD_STREAMING
                        ? Mask{p.streaming_window - 1, 0, p.streaming_sinks}
                        : Mask{p.window_left, p.window_right, p.sinks};
  const bool listed = kind == LA_HEAD_PAGES || kind == LA_HEAD_QUEST;
  const int qi_lo = row0 / group, qi_hi = (row0 + nrows - 1) / group + 1;
  int sink_pages = 0, first = 0, last = 0, n_work;
  const int32_t *list = nullptr;
  if (listed) {
    const long long lb = (long long)b * c.heads_kv + kvh;
    list = p.page_list + lb * p.page_list_stride;
    n_work = p.page_count[lb];
  } else {
    mask.key_tiles(qi_lo, qi_hi, sq, sk, ps, sink_pages, first, last);
    n_work = sink_pages + (last - first);
  }
  // Virtual keys: the tokens of this split's pages in order (max_pages_per_seq * page_size
  // fits in i32, checked on the host).
  const int w0 = (int)((long long)split * n_work / p.num_splits);
  const int w1 = (int)((long long)(split + 1) * n_work / p.num_splits);
  const int v_end = w1 * ps;
  const int32_t *table = c.block_table + (long long)b * c.max_pages_per_seq;

  // Teams: with nrows > kWarpRows, warp team t owns rows [t * kWarpRows, (t + 1) * kWarpRows)
  // and walks all keys with its warps; otherwise one team of every warp owns all rows.
  const int teams = nrows > kWarpRows ? kTeams : 1;
  const int team_warps = kWarps / teams;
  const int team = warp / team_warps, team_warp = warp % team_warps;
  const int team_slots = team_warps * slots_per_warp;
  const int wrow0 = team * kWarpRows;  // first block row of this warp
  float m[kWarpRows], l[kWarpRows], acc[kWarpRows][kVec];
#pragma unroll
  for (int r = 0; r < kWarpRows; ++r) {
    m[r] = kNegInf;
    l[r] = 0.0f;
#pragma unroll
    for (int x = 0; x < kVec; ++x) acc[r][x] = 0.0f;
  }
  const T *k_cache = static_cast<const T *>(c.k_cache);
  const T *v_cache = static_cast<const T *>(c.v_cache);
  const float score_scale = p.scale;
  __syncthreads();  // q_s staged

  // The loop bound is per warp (uniform), so the lane-group shuffles below are safe.
  const int step = team_slots * kKeysPerStep;
  for (int vw = w0 * ps + team_warp * slots_per_warp * kKeysPerStep; vw < v_end; vw += step) {
    const int v0 = vw + ty * kKeysPerStep;
    uint4 kr[kKeysPerStep], vr[kKeysPerStep];
    int j[kKeysPerStep];
#pragma unroll
    for (int t = 0; t < kKeysPerStep; ++t) {
      const int v = v0 + t;
      j[t] = -1;
      kr[t] = vr[t] = make_uint4(0, 0, 0, 0);
      if (v < v_end) {
        const int w = v / ps, slot = v - w * ps;
        const int page = listed ? list[w] : (w < sink_pages ? w : first + (w - sink_pages));
        const int key = page * ps + slot;
        if (key < sk) {
          j[t] = key;
          if (lane_active) {
            const long long off = slot_offset(c, table[page], slot, kvh) + col;
            kr[t] = *reinterpret_cast<const uint4 *>(k_cache + off);
            vr[t] = *reinterpret_cast<const uint4 *>(v_cache + off);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kWarpRows; ++r) {
      if (wrow0 + r < nrows) {
      const int qi = (row0 + wrow0 + r) / group;
      // Inactive lanes (col >= d) read row r's first channels: their K is zero anyway.
      const float *qrow = q_s + (wrow0 + r) * d + (lane_active ? col : 0);
      const float4 qa = lds128_volatile(qrow), qb = lds128_volatile(qrow + 4);
      const float qv[kVec] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
      float s[kKeysPerStep];
      float tile_max = kNegInf;
#pragma unroll
      for (int t = 0; t < kKeysPerStep; ++t) {
        // K stays packed in registers and is widened per row: ALU is cheap here, registers
        // are not (8 rows x 8 accumulators per lane already).
        float kf[kVec];
        unpack8<T>(kr[t], kf);
        float dot = 0.0f;
#pragma unroll
        for (int x = 0; x < kVec; ++x) dot = fmaf(qv[x], kf[x], dot);
        dot = reduce_sum_lanes(dot, g_lanes);
        float xs = kNegInf;
        if (j[t] >= 0 && mask.visible(qi, j[t], sq, sk)) {
          xs = dot * score_scale;
          if (p.softcap > 0.0f) xs = p.softcap * tanhf(xs / p.softcap);
          xs *= kLog2e;  // log2 units: exp2f is one MUFU op
        }
        s[t] = xs;
        tile_max = fmaxf(tile_max, xs);
      }
      // Nothing visible yet keeps (m, l, acc) = (-inf, 0, 0): rescale_factor gives 1 and
      // every p is 0.
      const float m_new = fmaxf(m[r], tile_max);
      const float alpha = rescale_factor(m[r], m_new);
      l[r] *= alpha;
#pragma unroll
      for (int x = 0; x < kVec; ++x) acc[r][x] *= alpha;
#pragma unroll
      for (int t = 0; t < kKeysPerStep; ++t) {
        const float pr = s[t] == kNegInf ? 0.0f : exp2f(s[t] - m_new);
        l[r] += pr;
        float vf[kVec];
        unpack8<T>(vr[t], vf);
#pragma unroll
        for (int x = 0; x < kVec; ++x) acc[r][x] = fmaf(pr, vf[x], acc[r][x]);
      }
      m[r] = m_new;
      }
    }
  }

  // Merge the slots' states (the same (m, l, acc) algebra as OnlineSoftmax / merge_weights).
  // Slot sl of a team writes rows of that team only, so [slot][kRows] holds both teams.
  const int slot_id = team_warp * slots_per_warp + ty;
#pragma unroll
  for (int r = 0; r < kWarpRows; ++r) {
    const int row = wrow0 + r;
    if (tx == 0) {
      m_s[slot_id * kRows + row] = m[r];
      l_s[slot_id * kRows + row] = l[r];
    }
    if (lane_active) {
#pragma unroll
      for (int x = 0; x < kVec; ++x) acc_s[(slot_id * kRows + row) * d + col + x] = acc[r][x];
    }
  }
  __syncthreads();
  T *o = static_cast<T *>(p.o) + (long long)b * p.o_batch_stride;
  for (int e = tid; e < nrows * d; e += kThreads) {
    const int r = e / d, ch = e % d;
    float m_all = kNegInf;
    for (int sl = 0; sl < team_slots; ++sl) m_all = fmaxf(m_all, m_s[sl * kRows + r]);
    float l_all = 0.0f, a_all = 0.0f;
    for (int sl = 0; sl < team_slots; ++sl) {
      const float ms = m_s[sl * kRows + r];
      // An empty slot (m = -inf) contributes nothing; -inf - -inf would be NaN.
      const float f = ms == kNegInf ? 0.0f : exp2f(ms - m_all);
      l_all += f * l_s[sl * kRows + r];
      a_all += f * acc_s[(sl * kRows + r) * d + ch];
    }
    const float out = l_all > 0.0f ? a_all / l_all : 0.0f;
    const float lse = lse_from_log2(m_all, l_all);
    const int rr = row0 + r, qi = rr / group, h = kvh * group + rr % group;
    if (p.num_splits == 1) {
      o[qi * p.o_row_stride + h * p.o_head_stride + ch] = Elem<T>::from_float(out);
      if (ch == 0 && p.lse != nullptr) p.lse[((long long)b * p.heads_q + h) * sq + qi] = lse;
    } else {
      const long long row = (((long long)split * c.batch + b) * p.heads_q + h) * sq + qi;
      p.o_partial[row * d + ch] = out;
      if (ch == 0) p.lse_partial[row] = lse;
    }
  }
}

// One warp per (b, h, qi) row merges the num_splits partial results.
template <typename T>
__global__ void __launch_bounds__(kThreads) split_merge_kernel(const __grid_constant__ LaPagedDecodeParams p) {
  const LaPagedCache &c = p.cache;
  const long long rows = (long long)c.batch * p.heads_q * p.q_len;
  const long long row = (long long)blockIdx.x * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32, d = c.head_dim;
  float m_all = kNegInf;
  for (int s = 0; s < p.num_splits; ++s) m_all = fmaxf(m_all, p.lse_partial[s * rows + row]);
  float wsum = 0.0f;
  for (int s = 0; s < p.num_splits; ++s) {
    const float ls = p.lse_partial[s * rows + row];
    wsum += ls == kNegInf ? 0.0f : expf(ls - m_all);
  }
  const int qi = (int)(row % p.q_len);
  const int h = (int)((row / p.q_len) % p.heads_q);
  const long long b = row / ((long long)p.q_len * p.heads_q);
  T *o = static_cast<T *>(p.o) + b * p.o_batch_stride + qi * p.o_row_stride + h * p.o_head_stride;
  for (int ch = lane; ch < d; ch += 32) {
    float a = 0.0f;
    for (int s = 0; s < p.num_splits; ++s) {
      const float ls = p.lse_partial[s * rows + row];
      if (ls != kNegInf) a += expf(ls - m_all) * p.o_partial[(s * rows + row) * d + ch];
    }
    o[ch] = Elem<T>::from_float(wsum > 0.0f ? a / wsum : 0.0f);
  }
  if (lane == 0 && p.lse != nullptr)
    p.lse[row] = wsum > 0.0f ? m_all + logf(wsum) : kNegInf;
}

bool dims_ok(const LaPagedCache &c) {
  return c.head_dim > 0 && c.head_dim <= kMaxDim && c.head_dim % kVec == 0 && c.page_size > 0 &&
         c.heads_kv > 0 && c.batch > 0 && c.batch <= 65535;
}

template <typename T>
cudaError_t launch_append(const LaPagedAppendParams &p, cudaStream_t stream) {
  if (p.max_pages_touched <= 0) return cudaSuccess;
  const dim3 grid(p.max_pages_touched, p.cache.batch);
  append_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_quest(const LaQuestParams &p, cudaStream_t stream) {
  const dim3 grid(p.cache.heads_kv, p.cache.batch);
  quest_kernel<T><<<grid, kQuestThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_decode(const LaPagedDecodeParams &p, cudaStream_t stream) {
  const int rows = p.q_len * (p.heads_q / p.cache.heads_kv);
  const int row_groups = (rows + kRows - 1) / kRows;
  const long long gy = (long long)p.cache.heads_kv * row_groups;
  if (gy > 65535 || p.num_splits < 1 || p.num_splits > 65535) return cudaErrorInvalidConfiguration;
  const size_t smem = decode_smem_bytes(p.cache.head_dim);
  auto kernel = decode_kernel<T>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.num_splits, (unsigned)gy, p.cache.batch);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const long long merge_rows = (long long)p.cache.batch * p.heads_q * p.q_len;
  const long long blocks = (merge_rows + kWarps - 1) / kWarps;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  split_merge_kernel<T><<<(unsigned)blocks, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace longattn

extern "C" int la_paged_append(const LaPagedAppendParams *params, cudaStream_t stream) {
  using namespace longattn;
  if (!dims_ok(params->cache)) return cudaErrorInvalidValue;
  switch (params->dtype) {
    case LA_F16: return launch_append<__half>(*params, stream);
    case LA_BF16: return launch_append<__nv_bfloat16>(*params, stream);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" int la_paged_quest_select(const LaQuestParams *params, cudaStream_t stream) {
  using namespace longattn;
  if (!dims_ok(params->cache) || params->q_len <= 0 || params->head_kind == nullptr)
    return cudaErrorInvalidValue;
  if (params->cache.heads_kv > 65535) return cudaErrorInvalidConfiguration;
  switch (params->dtype) {
    case LA_F16: return launch_quest<__half>(*params, stream);
    case LA_BF16: return launch_quest<__nv_bfloat16>(*params, stream);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" int la_paged_decode(const LaPagedDecodeParams *params, cudaStream_t stream) {
  using namespace longattn;
  if (!dims_ok(params->cache) || params->q_len <= 0) return cudaErrorInvalidValue;
  switch (params->dtype) {
    case LA_F16: return launch_decode<__half>(*params, stream);
    case LA_BF16: return launch_decode<__nv_bfloat16>(*params, stream);
    default: return cudaErrorInvalidValue;
  }
}
