// Quest page selection: per-page scores from the kmin/kmax metadata, then the top pages per
// (sequence, kv head). Both kernels are launched as programmatic dependents of the previous
// kernel in the stream (launch.cuh). Mirrors src/paged/ (CPU path) exactly.
//
// FP8 cache (kv_dtype LA_F8E4M3; quest_score_kernel<T, __nv_fp8_e4m3>; compiled only, NOT YET
// RUN ON A GPU): kmin/kmax [num_pages, heads_kv, head_dim] hold the bounds of the stored e4m3
// values, one byte each. A lane reads its 4 channels as one 4-byte load and converts them
// exactly (fp8.cuh); the per-row sum over the stored bounds is multiplied by k_scale[kvh] in
// f32 (sum * k_scale, as the CPU path: the scale is > 0, so it factors out of every max) and
// the scores buffer holds these scaled scores. Selection (quest_kernel) reads only the scores
// and is the same kernel for both caches. kmin/kmax need 4-byte alignment.
#include "longattn/check.cuh"
#include "longattn/dtype.cuh"
#include "longattn/fp8.cuh"
#include "longattn/launch.cuh"
#include "longattn/mask.cuh"
#include "longattn/paged_common.cuh"

namespace longattn {
namespace {

// ---- Quest selection ----------------------------------------------------------------
// Order-preserving map of a float onto uint32 (larger float -> larger integer).
__device__ __forceinline__ uint32_t ordered_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct QuestCandidates {
  int sink_pages, first, last;  // candidates: [0, sink_pages) and [first, last)
  int newest;                   // page of the newest token, -1 if none
  int n_pages;                  // pages of the sequence
  // The candidate pages of sequence b: the key tiles (pages) that p's mask lets its q_len
  // newest queries see.
  __device__ __forceinline__ static QuestCandidates of(const LaQuestParams &p, int b) {
    const int ps = p.cache.page_size, sk = p.cache.seqlens_k[b];
    const Mask mask{p.window_left, p.window_right, p.sinks};
    QuestCandidates cand;
    mask.key_tiles(0, p.q_len, p.q_len, sk, ps, cand.sink_pages, cand.first, cand.last);
    cand.newest = sk > 0 ? (sk - 1) / ps : -1;
    cand.n_pages = (sk + ps - 1) / ps;
    return cand;
  }
  __device__ __forceinline__ bool contains(int page) const {
    return page < sink_pages || (page >= first && page < last);
  }
  __device__ __forceinline__ int count() const { return sink_pages + (last - first); }
};

// Raw bounds of one lane's 4 consecutive channels: 8 bytes (T, 8-byte aligned) or 4 bytes
// (e4m3, 4-byte aligned), converted by cvt4.
template <typename KV>
using Raw4 = std::conditional_t<kIsFp8<KV>, uint32_t, uint2>;
template <typename KV>
__device__ __forceinline__ Raw4<KV> raw4(const KV *src) {
  return *reinterpret_cast<const Raw4<KV> *>(src);
}
// Converted to floats (e4m3: exactly).
template <typename KV>
__device__ __forceinline__ float4 cvt4(const Raw4<KV> &raw) {
  if constexpr (kIsFp8<KV>) {
    const float2 a = e4m3x2_to_float2(raw), b = e4m3x2_to_float2(raw >> 16);
    return make_float4(a.x, a.y, b.x, b.y);
  } else {
    using Pair = typename Elem<KV>::Pair;
    const float2 a = Elem<KV>::to_float2(*reinterpret_cast<const Pair *>(&raw.x));
    const float2 b = Elem<KV>::to_float2(*reinterpret_cast<const Pair *>(&raw.y));
    return make_float4(a.x, a.y, b.x, b.y);
  }
}

// Stages query rows [r0, r0 + nr) of the block's (sequence, kv head) as floats in q_s
// [kQuestRows, d]: row rr is query rr / group of head kvh * group + rr % group; rows past nr
// are zero.
template <typename T, int kThreads>
__device__ __forceinline__ void stage_q_rows(const LaQuestParams &p, const T *q, int kvh,
                                             int group, int r0, int nr, int d, float *q_s) {
  for (int e = threadIdx.x; e < kQuestRows * d; e += kThreads) {
    const int r = e / d, ch = e % d;
    float x = 0.0f;
    if (r < nr) {
      const int rr = r0 + r, qi = rr / group, h = kvh * group + rr % group;
      x = Elem<T>::to_float(q[qi * p.q_row_stride + h * p.q_head_stride + ch]);
    }
    q_s[r * d + ch] = x;
  }
}

// One page's score, warp-wide: the max of `best` and, over the staged rows q_s [nr, d], the
// warp's sum of max(q * hi, q * lo) (times k_scale for e4m3 bounds, kFp8). The lane holds
// the page's bounds of channels 4 * lane + 128 * x (zero past d).
template <bool kFp8, int kVecs>
__device__ __forceinline__ float page_score(float best, const float *q_s, int nr, int d,
                                            int lane, const float4 (&lo)[kVecs],
                                            const float4 (&hi)[kVecs], float k_scale) {
  for (int r = 0; r < nr; ++r) {
    float s = 0.0f;
#pragma unroll
    for (int x = 0; x < kVecs; ++x) {
      const int ch = 4 * lane + 128 * x;
      if (ch < d) {
        const float4 qv = *reinterpret_cast<const float4 *>(q_s + r * d + ch);
        s += fmaxf(qv.x * hi[x].x, qv.x * lo[x].x) + fmaxf(qv.y * hi[x].y, qv.y * lo[x].y) +
             fmaxf(qv.z * hi[x].z, qv.z * lo[x].z) + fmaxf(qv.w * hi[x].w, qv.w * lo[x].w);
      }
    }
    if constexpr (kFp8) {
      best = fmaxf(best, warp_sum(s) * k_scale);
    } else {
      best = fmaxf(best, warp_sum(s));
    }
  }
  return best;
}

// Scoring, grid (page chunks, heads_kv, batch): one block per (sequence, kv head, chunk of
// kQuestChunk pages), a warp per page, so even batch 1 spreads over the whole GPU. Writes
// the chunk's scores (-inf where not a candidate or not a Quest head: the documented output,
// the buffer is not necessarily pre-filled). KV: the type of kmin/kmax, T or __nv_fp8_e4m3
// (then scores are k_scale[kvh] * the sum, see the file comment).
constexpr int kQuestChunk = 64;

template <typename T, typename KV>
__global__ void __launch_bounds__(kQuestThreads) quest_score_kernel(const __grid_constant__ LaQuestParams p) {
  wait_for_previous_grid();
  allow_next_grid();
  const LaPagedCache &c = p.cache;
  const int kvh = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const long long row_base = ((long long)b * c.heads_kv + kvh) * c.max_pages_per_seq;
  float *scores = p.scores + row_base;
  const int pg0 = blockIdx.x * kQuestChunk;
  const int pg1 = min(pg0 + kQuestChunk, c.max_pages_per_seq);
  for (int pg = pg0 + tid; pg < pg1; pg += kQuestThreads) scores[pg] = kNegInf;
  if (p.head_kind[kvh] != LA_HEAD_QUEST) return;
  __shared__ __align__(16) float q_s[kQuestRows * kMaxDim];

  const int d = c.head_dim;
  const int group = p.heads_q / c.heads_kv;
  const int rows = p.q_len * group;
  const QuestCandidates cand = QuestCandidates::of(p, b);
  const int pg_end = min(pg1, cand.n_pages);
  if (pg0 >= pg_end) return;

  const T *q = static_cast<const T *>(p.q) + (long long)b * p.q_batch_stride;
  constexpr bool kFp8 = kIsFp8<KV>;
  static_assert(kFp8 || std::is_same_v<KV, T>, "metadata type");
  const KV *kmin = static_cast<const KV *>(p.kmin), *kmax = static_cast<const KV *>(p.kmax);
  float k_scale = 1.0f;  // e4m3 bounds: kv_scales [2, heads_kv], k scales first
  if constexpr (kFp8) k_scale = p.kv_scales[kvh];
  for (int r0 = 0; r0 < rows; r0 += kQuestRows) {
    const int nr = min(kQuestRows, rows - r0);
    __syncthreads();  // previous pass done with q_s (and the -inf fill is visible)
    stage_q_rows<T, kQuestThreads>(p, q, kvh, group, r0, nr, d, q_s);
    __syncthreads();
    // Warp per page; lane owns channels 4 * lane + 128 * x.
    for (int pg = pg0 + warp; pg < pg_end; pg += kQuestWarps) {
      if (!cand.contains(pg)) continue;
      const int phys = c.block_table[(long long)b * c.max_pages_per_seq + pg];
      const long long m_off = ((long long)phys * c.heads_kv + kvh) * d;
      float4 lo[kMaxDim / 128], hi[kMaxDim / 128];
#pragma unroll
      for (int x = 0; x < kMaxDim / 128; ++x) {
        const int ch = 4 * lane + 128 * x;
        lo[x] = hi[x] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (ch < d) {
          lo[x] = cvt4<KV>(raw4<KV>(kmin + m_off + ch));
          hi[x] = cvt4<KV>(raw4<KV>(kmax + m_off + ch));
        }
      }
      const float best = page_score<kFp8>(scores[pg], q_s, nr, d, lane, lo, hi, k_scale);
      __syncwarp();  // every lane read scores[pg] before lane 0 overwrites it
      if (lane == 0) scores[pg] = best;
    }
  }
}

// Selection of the pages of (sequence b, kv head kvh) from its row of scores
// (quest_score_kernel's) into page_list and page_count, by a block of kThreads threads (whole
// warps, at most 32 of them); returns at once (uniform over the block) when kvh is not a
// Quest head. The order is: kept pages, then higher score (the float total order:
// ordered_bits), then lower page index. k_sel >= #kept, so every kept page is taken and the
// other candidates ("ranked" pages) compete for the take_ranked = k_sel - #kept remaining
// places:
// 1. A 4-pass radix select (8-bit digits, most significant first) over the ranked pages'
//    32-bit keys finds the threshold key kth (the take_ranked-th largest) and how many of
//    the pages whose key equals kth are taken (ties_taken): pages above kth are all taken,
//    and of those at kth the ties_taken lowest page indices. Histograms are counted with
//    one shared atomic per distinct digit per warp (__match_any_sync).
// 2. Compaction in ascending page order: thread t owns the contiguous pages [t * per,
//    (t + 1) * per), so one block-wide exclusive scan of (other taken pages, ties) per thread
//    gives each taken page its output position: #taken non-ties before it plus
//    min(#ties before it, ties_taken).
// Keys are staged in keys_s (shared, kStagedPages entries) when the sequence has at most
// kStagedPages pages (128k tokens at page 16) and recomputed from the scores (L2)
// otherwise. kCg: the scores were written by other blocks of this grid, read with
// ld.global.cg (L2). The prologue (row offsets, head check, candidates) stands where
// quest_kernel had it: moved later, quest_kernel's SASS changes.
constexpr int kStagedPages = 8192;  // 32 KB of keys

template <int kThreads, bool kCg>
__device__ __forceinline__ void quest_select(const LaQuestParams &p, int kvh, int b,
                                             uint32_t *keys_s) {
  constexpr int kWarps = kThreads / 32;
  static_assert(kWarps * 32 == kThreads && kWarps <= 32, "one warp scans the per-warp totals");
  const LaPagedCache &c = p.cache;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const long long row_base = ((long long)b * c.heads_kv + kvh) * c.max_pages_per_seq;
  const float *scores = p.scores + row_base;
  if (p.head_kind[kvh] != LA_HEAD_QUEST) return;
  __shared__ int hist[2][256];
  __shared__ uint32_t sel_prefix;
  __shared__ int sel_remaining;
  __shared__ uint2 warp_total[kWarps];  // (taken, ties) per warp
  const QuestCandidates cand = QuestCandidates::of(p, b);
  const int n_pages = cand.n_pages;
  auto score = [&](int pg) {
    if constexpr (kCg) {
      return __ldcg(scores + pg);
    } else {
      return scores[pg];
    }
  };

  // How many pages to take: the budget, or every kept page if more, at most the candidates.
  int n_kept = 0;
  for (int pg = 0; pg < min(p.sink_pages, n_pages); ++pg) n_kept += cand.contains(pg);
  if (cand.newest >= p.sink_pages && cand.contains(cand.newest)) ++n_kept;
  const int n_cand = cand.count();
  const int k_sel = min(max(p.budget_pages, n_kept), n_cand);
  const int n_ranked = n_cand - n_kept, take_ranked = k_sel - n_kept;
  auto kept = [&](int pg) { return pg < p.sink_pages || pg == cand.newest; };
  // Only a partial take of the ranked pages needs their keys (uniform over the block).
  const bool partial = take_ranked > 0 && take_ranked < n_ranked;
  const bool staged = n_pages <= kStagedPages;
  auto key_of = [&](int pg) { return staged ? keys_s[pg] : ordered_bits(score(pg)); };

  uint32_t kth = 0;
  int ties_taken = 0;
  if (partial) {
    if (staged)
      for (int pg = tid; pg < n_pages; pg += kThreads) keys_s[pg] = ordered_bits(score(pg));
    if (tid < 256) hist[0][tid] = hist[1][tid] = 0;
    __syncthreads();  // keys staged, histograms cleared
    uint32_t prefix = 0, prefix_mask = 0;
    int remaining = take_ranked;
    for (int pass = 0; pass < 4; ++pass) {
      const int shift = 24 - 8 * pass;
      int *h = hist[pass & 1];
      for (int base = 0; base < n_pages; base += kThreads) {
        const int pg = base + tid;
        uint32_t digit = 256;  // not counted
        if (pg < n_pages && cand.contains(pg) && !kept(pg)) {
          const uint32_t key = key_of(pg);
          if ((key & prefix_mask) == prefix) digit = (key >> shift) & 0xffu;
        }
        const unsigned peers = __match_any_sync(0xffffffffu, digit);
        if (digit < 256 && lane == __ffs(peers) - 1) atomicAdd(&h[digit], __popc(peers));
      }
      __syncthreads();  // histogram complete
      // Clear the next pass's histogram: its last reader, the previous pass's digit search,
      // finished before the previous pass's final barrier.
      if (tid < 256) hist[(pass + 1) & 1][tid] = 0;
      if (warp == 0) {
        // Digit search from 255 down (first digit whose running count reaches `remaining`),
        // as a warp scan: lane L owns digits 255 - 8L down to 248 - 8L.
        int cnt[8], own = 0;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          cnt[k] = h[255 - 8 * lane - k];
          own += cnt[k];
        }
        int incl = own;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int y = __shfl_up_sync(0xffffffffu, incl, o);
          if (lane >= o) incl += y;
        }
        const unsigned hit = __ballot_sync(0xffffffffu, incl >= remaining);
        if (lane == (hit != 0 ? __ffs(hit) - 1 : 31)) {
          int cum = incl - own, digit = 255 - 8 * lane;
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            digit = 255 - 8 * lane - k;
            if (digit == 0 || cum + cnt[k] >= remaining) break;
            cum += cnt[k];
          }
          sel_remaining = remaining - cum;
          sel_prefix = prefix | ((uint32_t)digit << shift);
        }
      }
      __syncthreads();
      remaining = sel_remaining;
      prefix = sel_prefix;
      prefix_mask |= 0xffu << shift;
    }
    kth = prefix;
    ties_taken = remaining;
  }

  // Per page: taken outright (kept, or ranked above the threshold / every ranked page when
  // all are taken) or a tie at the threshold.
  auto classify = [&](int pg, bool &taken, bool &tie) {
    taken = tie = false;
    if (!cand.contains(pg)) return;
    if (kept(pg)) {
      taken = true;
    } else if (!partial) {
      taken = take_ranked > 0;
    } else {
      const uint32_t key = key_of(pg);
      taken = key > kth;
      tie = key == kth;
    }
  };
  const int per = (n_pages + kThreads - 1) / kThreads;
  const int p0 = min(tid * per, n_pages), p1 = min(p0 + per, n_pages);
  uint32_t n_taken = 0, n_tie = 0;
  for (int pg = p0; pg < p1; ++pg) {
    bool taken, tie;
    classify(pg, taken, tie);
    n_taken += taken;
    n_tie += tie;
  }
  // Exclusive block scan of both counts: warp scans, then every warp scans the warp totals
  // and takes its own offset.
  auto warp_incl_scan = [&](uint32_t x) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t y = __shfl_up_sync(0xffffffffu, x, o);
      if (lane >= o) x += y;
    }
    return x;
  };
  const uint32_t taken_incl = warp_incl_scan(n_taken), tie_incl = warp_incl_scan(n_tie);
  if (lane == 31) warp_total[warp] = make_uint2(taken_incl, tie_incl);
  __syncthreads();
  const uint2 total = kWarps == 32 || lane < kWarps ? warp_total[lane] : make_uint2(0u, 0u);
  const uint32_t taken_warps = warp_incl_scan(total.x) - total.x;
  const uint32_t tie_warps = warp_incl_scan(total.y) - total.y;
  uint32_t taken_before =
      __shfl_sync(0xffffffffu, taken_warps, warp) + taken_incl - n_taken;
  int tie_before = (int)(__shfl_sync(0xffffffffu, tie_warps, warp) + tie_incl - n_tie);
  int32_t *out = p.page_list + row_base;
  for (int pg = p0; pg < p1; ++pg) {
    bool taken, tie;
    classify(pg, taken, tie);
    if (taken) {
      out[taken_before + min(tie_before, ties_taken)] = pg;
      ++taken_before;
    } else if (tie) {
      if (tie_before < ties_taken) out[taken_before + tie_before] = pg;
      ++tie_before;
    }
  }
  if (tid == 0) p.page_count[(long long)b * c.heads_kv + kvh] = k_sel;
}

// Selection, grid (heads_kv, batch): one block of kSelectThreads per (sequence, kv head) of
// a Quest head, on the scores of quest_score_kernel (quest_select).
constexpr int kSelectThreads = 1024;

__global__ void __launch_bounds__(kSelectThreads) quest_kernel(const __grid_constant__ LaQuestParams p) {
  wait_for_previous_grid();
  allow_next_grid();
  __shared__ uint32_t keys_s[kStagedPages];
  quest_select<kSelectThreads, false>(p, blockIdx.x, blockIdx.y, keys_s);
}

// ---- Quest selection v5 (la_paged_quest_select_v5; NOT YET RUN ON A GPU) ----------------
// One launch instead of score + select. Grid (ceil(max_pages_per_seq / chunk), heads_kv,
// batch), chunk = pages_per_block (host-sized so the launch covers ~2 blocks per SM), 256
// threads. A block of a Quest head:
// 1. Loads the page ids of its chunk's candidate pages (one load per thread, all in flight,
//    issued together with the query rows' loads) into shared memory: no warp waits on a
//    table read before its metadata loads.
// 2. Warp w scores page groups w, w + 8, ... of kInFlight consecutive pages: it issues the
//    kmin/kmax loads of the whole group (kInFlight pages x 2 bounds x kLaneVecs 4-channel
//    vectors per lane) before converting any, so a warp has kInFlight pages' metadata in
//    flight instead of one page's after a dependent table read. The score arithmetic is
//    quest_score_kernel's, term for term (same per-lane sums, same warp_sum, the same k_scale
//    product for e4m3), so the scores are bit-identical to the two-kernel path's. Rows
//    beyond kQuestRows take further passes over the bounds, as there.
// 3. Writes the chunk's scores (-inf for non-candidates; the documented scores output), then
//    takes a ticket on its (sequence, kv head)'s counter after a __threadfence (release).
// 4. The block that draws the last ticket (gridDim.x - 1) fences (acquire) and selects the
//    row's pages from the row's scores (read from L2 with ld.global.cg, staged as
//    order-preserving keys in shared memory up to kStagedPages pages) with quest_kernel's
//    quest_select on 256 threads, so the selection is the same; then it resets the counter to 0 (plans
//    replay, CUDA graphs capture). Blocks of non-Quest heads write -inf and leave.
// Shared memory: the scoring buffers (q rows 16 KB, chunk page ids and scores 8 KB) alias
// the selection's staged keys (32 KB).
constexpr int kV5Threads = 256;
constexpr int kV5Warps = kV5Threads / 32;
constexpr int kV5MaxChunk = LA_QUEST_V5_MAX_CHUNK;
constexpr size_t kV5SmemBytes = kStagedPages * sizeof(uint32_t);
static_assert(sizeof(float) * kQuestRows * kMaxDim + 2 * sizeof(int) * kV5MaxChunk <= kV5SmemBytes,
              "the scoring buffers fit in the staged keys' space");
static_assert(LA_QUEST_V5_MAX_CHUNK % LA_QUEST_V5_CHUNK_ALIGN == 0, "chunk bounds");

// kLaneVecs: 4-channel vectors per lane (1: head_dim <= 128, 2: <= 256); kInFlight: pages
// whose bounds one warp loads together.
template <typename T, typename KV, int kLaneVecs>
__global__ void __launch_bounds__(kV5Threads, 2) quest_v5_kernel(const __grid_constant__ LaQuestV5Params v) {
  constexpr int kInFlight = kLaneVecs == 1 ? 8 : 4;
  constexpr bool kFp8 = kIsFp8<KV>;
  static_assert(kFp8 || std::is_same_v<KV, T>, "metadata type");
  wait_for_previous_grid();
  allow_next_grid();
  const LaQuestParams &p = v.quest;
  const LaPagedCache &c = p.cache;
  const int kvh = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int mp = c.max_pages_per_seq;
  const long long row = (long long)b * c.heads_kv + kvh;
  float *scores = p.scores + row * mp;
  const int pg0 = blockIdx.x * v.pages_per_block;
  const int pg1 = min(pg0 + v.pages_per_block, mp);
  if (p.head_kind[kvh] != LA_HEAD_QUEST) {
    for (int pg = pg0 + tid; pg < pg1; pg += kV5Threads) scores[pg] = kNegInf;
    return;
  }
  __shared__ __align__(16) unsigned char smem[kV5SmemBytes];
  __shared__ int last_s;
  float *q_s = reinterpret_cast<float *>(smem);                      // [kQuestRows, d]
  int *phys_s = reinterpret_cast<int *>(smem + sizeof(float) * kQuestRows * kMaxDim);
  float *best_s = reinterpret_cast<float *>(phys_s + kV5MaxChunk);  // [chunk]

  const int d = c.head_dim;
  const int group = p.heads_q / c.heads_kv;
  const int rows = p.q_len * group;
  const QuestCandidates cand = QuestCandidates::of(p, b);
  const int n_local = max(min(pg1, cand.n_pages) - pg0, 0);  // the chunk's pages of the sequence

  const T *q = static_cast<const T *>(p.q) + (long long)b * p.q_batch_stride;
  const KV *kmin = static_cast<const KV *>(p.kmin), *kmax = static_cast<const KV *>(p.kmax);
  float k_scale = 1.0f;  // e4m3 bounds: kv_scales [2, heads_kv], k scales first
  if constexpr (kFp8) k_scale = p.kv_scales[kvh];
  const int32_t *table = c.block_table + (long long)b * mp;
  for (int i = tid; i < n_local; i += kV5Threads) {
    const int pg = pg0 + i;
    phys_s[i] = cand.contains(pg) ? table[pg] : -1;  // -1: not a candidate
    best_s[i] = kNegInf;
  }
  for (int r0 = 0; r0 < rows; r0 += kQuestRows) {
    const int nr = min(kQuestRows, rows - r0);
    if (r0 > 0) __syncthreads();  // the previous pass is done with q_s
    stage_q_rows<T, kV5Threads>(p, q, kvh, group, r0, nr, d, q_s);
    __syncthreads();  // q rows, page ids (and the -inf scores) staged
    for (int g0 = warp * kInFlight; g0 < n_local; g0 += kV5Warps * kInFlight) {
      Raw4<KV> lo[kInFlight][kLaneVecs], hi[kInFlight][kLaneVecs];
      int phys[kInFlight];
#pragma unroll
      for (int j = 0; j < kInFlight; ++j) phys[j] = g0 + j < n_local ? phys_s[g0 + j] : -1;
      // Every load of the group before any use.
#pragma unroll
      for (int j = 0; j < kInFlight; ++j) {
        const long long m_off = ((long long)max(phys[j], 0) * c.heads_kv + kvh) * d;
#pragma unroll
        for (int x = 0; x < kLaneVecs; ++x) {
          const int ch = 4 * lane + 128 * x;
          lo[j][x] = hi[j][x] = Raw4<KV>{};
          if (phys[j] >= 0 && ch < d) {
            lo[j][x] = raw4<KV>(kmin + m_off + ch);
            hi[j][x] = raw4<KV>(kmax + m_off + ch);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kInFlight; ++j) {
        if (phys[j] < 0) continue;  // uniform over the warp
        float4 lf[kLaneVecs], hf[kLaneVecs];
#pragma unroll
        for (int x = 0; x < kLaneVecs; ++x) {
          lf[x] = cvt4<KV>(lo[j][x]);
          hf[x] = cvt4<KV>(hi[j][x]);
        }
        const float best = page_score<kFp8>(best_s[g0 + j], q_s, nr, d, lane, lf, hf, k_scale);
        __syncwarp();  // every lane read best_s[g0 + j] before lane 0 overwrites it
        if (lane == 0) best_s[g0 + j] = best;
      }
    }
  }
  __syncthreads();  // every page's score in best_s
  for (int pg = pg0 + tid; pg < pg1; pg += kV5Threads) {
    const int i = pg - pg0;
    scores[pg] = i < n_local && phys_s[i] >= 0 ? best_s[i] : kNegInf;
  }

  // Ticket: the last block of the row selects.
  __threadfence();
  __syncthreads();  // every score of this block written and fenced
  int32_t *counter = v.select_counters + row;
  if (tid == 0) last_s = atomicAdd(counter, 1) == (int)gridDim.x - 1;
  __syncthreads();
  if (!last_s) return;
  __threadfence();
  quest_select<kV5Threads, true>(p, kvh, b, reinterpret_cast<uint32_t *>(smem));
  if (tid == 0) *counter = 0;
}

template <typename T, typename KV>
cudaError_t launch_quest_v5(const LaQuestV5Params &v, cudaStream_t stream) {
  const LaPagedCache &c = v.quest.cache;
  const int chunks = (c.max_pages_per_seq + v.pages_per_block - 1) / v.pages_per_block;
  const dim3 grid(chunks, c.heads_kv, c.batch);
  return c.head_dim <= 128
             ? launch_dependent(quest_v5_kernel<T, KV, 1>, grid, dim3(kV5Threads), 0, stream, v)
             : launch_dependent(quest_v5_kernel<T, KV, 2>, grid, dim3(kV5Threads), 0, stream, v);
}

// KV: the type of kmin/kmax, T or __nv_fp8_e4m3.
template <typename T, typename KV>
cudaError_t launch_quest(const LaQuestParams &p, cudaStream_t stream) {
  const int chunks = (p.cache.max_pages_per_seq + kQuestChunk - 1) / kQuestChunk;
  const cudaError_t err =
      launch_dependent(quest_score_kernel<T, KV>, dim3(chunks, p.cache.heads_kv, p.cache.batch),
                       dim3(kQuestThreads), 0, stream, p);
  if (err != cudaSuccess) return err;
  return launch_dependent(quest_kernel, dim3(p.cache.heads_kv, p.cache.batch),
                          dim3(kSelectThreads), 0, stream, p);
}

// The checks of both Quest entry points.
bool quest_params_ok(const LaQuestParams *params) {
  if (params == nullptr || !table_ok(params->cache) || params->q_len <= 0 ||
      params->head_kind == nullptr || params->q == nullptr || params->kmin == nullptr ||
      params->kmax == nullptr || params->scores == nullptr || params->page_list == nullptr ||
      params->page_count == nullptr ||
      !check::heads(params->heads_q, params->cache.heads_kv, params->cache.head_dim) ||
      !check::mask(params->window_left, params->window_right, params->sinks) ||
      params->budget_pages < 0 || params->sink_pages < 0 ||
      !check::strides(params->q_batch_stride, params->q_row_stride, params->q_head_stride))
    return false;
  // The metadata holds q's dtype, or e4m3 with the cache's scales.
  return params->kv_dtype == params->dtype ||
         (params->kv_dtype == LA_F8E4M3 && params->kv_scales != nullptr);
}

}  // namespace
}  // namespace longattn

extern "C" int la_paged_quest_select(const LaQuestParams *params, cudaStream_t stream) {
  using namespace longattn;
  if (!quest_params_ok(params)) return cudaErrorInvalidValue;
  const bool fp8 = params->kv_dtype == LA_F8E4M3;
  if (params->cache.heads_kv > 65535) return cudaErrorInvalidConfiguration;
  return with_dtype<__half, __nv_bfloat16>(params->dtype, cudaErrorInvalidValue, [&](auto t) {
    using T = typename decltype(t)::type;
    return fp8 ? launch_quest<T, __nv_fp8_e4m3>(*params, stream)
               : launch_quest<T, T>(*params, stream);
  });
}

extern "C" int la_paged_quest_select_v5(const LaQuestV5Params *params, cudaStream_t stream) {
  using namespace longattn;
  if (params == nullptr || !quest_params_ok(&params->quest) ||
      params->select_counters == nullptr ||
      params->pages_per_block < LA_QUEST_V5_CHUNK_ALIGN ||
      params->pages_per_block > LA_QUEST_V5_MAX_CHUNK ||
      params->pages_per_block % LA_QUEST_V5_CHUNK_ALIGN != 0)
    return cudaErrorInvalidValue;
  if (params->quest.cache.heads_kv > 65535) return cudaErrorInvalidConfiguration;
  const bool fp8 = params->quest.kv_dtype == LA_F8E4M3;
  return with_dtype<__half, __nv_bfloat16>(params->quest.dtype, cudaErrorInvalidValue, [&](auto t) {
    using T = typename decltype(t)::type;
    return fp8 ? launch_quest_v5<T, __nv_fp8_e4m3>(*params, stream)
               : launch_quest_v5<T, T>(*params, stream);
  });
}
