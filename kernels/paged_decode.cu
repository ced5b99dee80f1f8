// Paged KV cache split-KV decode attention. Mirrors src/paged/ (CPU path) exactly.
//
// Decode (FlashInfer-style): one block per (sequence, kv head, group of up to 8 query rows,
// split) serves every query row of the GQA group, so a page is read once per group. The
// block's page ids are staged in shared memory, K/V tiles stream through a cp.async ring and
// the math reads shared memory (see "decode" below). Split-KV divides the block's page list
// into num_splits contiguous parts (blockIdx.x) whose (o, lse) a merge kernel combines.
// Every kernel here is launched as a programmatic dependent of the previous one in the stream
// (launch.cuh): on Hopper the Quest score -> select -> decode -> merge chain overlaps each
// launch with the previous kernel's tail instead of paying it in series.
#include <atomic>

#include "longattn/check.cuh"
#include "longattn/dtype.cuh"
#include "longattn/fp8.cuh"
#include "longattn/launch.cuh"
#include "longattn/mask.cuh"
#include "longattn/mma.cuh"
#include "longattn/paged_common.cuh"
#include "longattn/softmax.cuh"
#include "longattn/swizzle.cuh"

namespace longattn {
namespace {

// ---- decode ------------------------------------------------------------------------
// One block of 4 warps per (sequence, kv head, group of up to kRows query rows, split). The
// block's keys are the tokens of its pages, in order: "virtual key" u in [0, n_keys) is slot
// u % page_size of the block's work page u / page_size. Per page, its first key index and
// the byte offset of (physical page, kv head) are staged in shared memory up front, in
// chunks of kPageChunk pages, so no K/V load waits on a table lookup. K and V tiles of kN
// keys stream through a kStages-deep cp.async ring (16-byte cp.async.cg, zero-fill past the
// end / for channels >= head_dim). Shared-memory rows are XOR-swizzled by 16-byte vector
// (vector v of tile key t lives at v ^ (t & 7)), so every ldmatrix below is conflict-free.
//
// The math runs on tensor cores (mma.sync m16n8k16, f32 accumulation), transposed so that
// the block's <= 8 query rows are the n8 side: warp w owns the 16 tile keys of key group
// kw = w % kKeyWarps and, per tile,
//   S^T (16 keys x 8 rows)  = K (16 x DB, ldmatrix) . Q^T (DB x 8, B fragments in registers)
//   O^T (kDH dims x 8 rows) += V^T (ldmatrix.trans) . P^T (16 keys x 8 rows)
// where P^T's B fragment is the S^T accumulator packed to 16 bits and transposed per 8x8
// (movmatrix). A lane holds keys g, g + 8 (g = lane / 4) of rows 2t, 2t + 1 (t = lane % 4), so
// the online softmax of a row reduces over lanes xor 4, 8, 16. Each warp keeps its own
// (m, l, O^T) state, so no block barrier is needed per tile besides the ring's; at the end the
// key groups' states are merged through shared memory (aliasing the ring). For DB = 256 the
// warps pair up (kDimSplit = 2): both warps of a key group compute the same S (identical
// instructions on identical data, hence identical m and l) and each accumulates half of O's
// channels, which keeps the tile at 16 KB of K and the accumulators at 32 registers.
// Channels >= head_dim are zero in the ring and in q_s, so they add nothing to S. Q and K
// enter the mma as stored (T); P is rounded to T for P.V, as in dense_mma_padded.cu.
//
// FP8 cache (KV = __nv_fp8_e4m3, kv_dtype LA_F8E4M3; decode_kernel<T, DB, __nv_fp8_e4m3>):
// the ring holds the raw e4m3 tiles (half the bytes of a T tile), copied 8 channels (8 bytes)
// at a time with cp.async.ca (8-byte rows of head_dim % 16 == 8 are only 8-byte aligned), zero
// past the end and past head_dim as above. A raw tile is [2 halves][kN keys][DB / 2 channels]
// (channel chunks 0..kVR/2-1 of every key, then the rest), so both the loader's copies and the
// conversion's reads of one warp cover 256 contiguous bytes. After the ring wait the block
// converts the slot's K and V (exact: every e4m3 value is a T value) into one pair of T tiles
// in the swizzled layout of a T ring slot, at the start of shared memory, and after a second
// barrier the math above reads them unchanged. Scores take k_scale[kvh] folded into the
// softmax scale ((q . k) * (scale * k_scale)); outputs and split partials are multiplied by
// v_scale[kvh], the LSE is not. The stage count is the T kernel's: half the ring bytes plus
// the 2 converted tiles keep every bucket within the T kernel's shared memory (bytes per
// block, DB 64 / 128 / 256: 54592 / 88128 / 89664 against 70976 / 104512 / 106048; blocks
// per SM by shared memory 4 / 2 / 2 on sm_90, 3 / 1 / 1 on sm_80). The fp8 path reads every
// cache row with 8-byte copies, so it needs k_cache and v_cache 8-byte aligned only.
constexpr int kPageChunk = 256;  // pages staged per refill
static_assert(kRows == 8, "the query rows are the n8 side of the mma");

// kKvBytes: bytes of a cache element (2: the T cache; 1: e4m3, see above).
template <int DB, int kKvBytes = 2>
struct DecodeCfg {
  static constexpr int kVR = DB / kVec;                 // 8-channel vectors per key row
  static constexpr int kDimSplit = DB > 128 ? 2 : 1;    // warps sharing a key group
  static constexpr int kKeyWarps = kWarps / kDimSplit;  // key groups of 16 keys per tile
  static constexpr int kN = 16 * kKeyWarps;             // keys per tile
  static constexpr int kDH = DB / kDimSplit;            // O channels per warp
  static constexpr int kQkSteps = DB / 16;              // k16 steps of S^T
  static constexpr int kPvSteps = kDH / 16;             // m16 blocks of O^T
  static constexpr int kStages = DB <= 64 ? 4 : 3;      // cp.async ring depth
  // __launch_bounds__ blocks per SM (register cap 255). ptxas stays near 100 registers for
  // DB = 64, so where shared memory allows 3 such blocks (sm_90) registers do too.
  static constexpr int kMinBlocks = 2;
  static constexpr int kLoadKeys = kThreads / (kVR / 2);  // keys per loader pass (2 vectors each)
  static constexpr int kLPT = kN / kLoadKeys;             // loader passes per tile
  static constexpr int kTileElems = kN * DB;
  static_assert(kVR >= 8 && kVR <= 32 && kN % kLoadKeys == 0, "tile shape");
  static_assert(kDH % 64 == 0 && DB % 64 == 0, "ldmatrix offsets: whole 8-vector swizzle rows");
  static_assert(kPageChunk >= kN + 1, "a tile's pages fit in one chunk (page size 1)");
  // Shared memory layout (bytes): [e4m3: converted K, V tiles (T)], ring, q rows (T), key
  // positions, page chunk, row bounds, per key group (m, l).
  static constexpr bool kFp8 = kKvBytes == 1;
  static_assert(kKvBytes == 1 || kKvBytes == 2, "cache element size");
  static constexpr size_t kTileBytes = (size_t)kTileElems * 2;  // a T tile (what the math reads)
  static constexpr size_t kRawTileBytes = (size_t)kTileElems * kKvBytes;  // a ring tile
  static constexpr size_t kRawOff = kFp8 ? 2 * kTileBytes : 0;           // the ring
  static constexpr size_t kRingBytes = kRawOff + (size_t)kStages * 2 * kRawTileBytes;
  static_assert(!kFp8 || (kN * kVR) % kThreads == 0, "whole conversion passes");
  static constexpr size_t kMergeBytes = sizeof(float) * kKeyWarps * kRows * DB;
  static_assert(kMergeBytes <= kRingBytes, "the merge aliases the ring");
  static constexpr size_t kQOff = kRingBytes;
  static constexpr size_t kKeyOff = kQOff + 2 * kRows * DB;
  static constexpr size_t kPageOff = kKeyOff + sizeof(int) * kStages * kN;  // byte offsets
  static constexpr size_t kKeyBaseOff = kPageOff + sizeof(long long) * kPageChunk;
  static constexpr size_t kBoundsOff = kKeyBaseOff + sizeof(int) * kPageChunk;  // lo, hi [kRows]
  static constexpr size_t kMlOff = kBoundsOff + sizeof(int) * 2 * kRows;  // m, l [groups][rows]
  static constexpr size_t kSmemBytes = kMlOff + sizeof(float) * 2 * kKeyWarps * kRows;
  static_assert(kPageOff % 8 == 0, "page offsets are 8-byte aligned");
};

// Transpose of an 8x8 16-bit matrix held as one m8n8 fragment (lane: row lane / 4, columns
// 2 * (lane % 4), +1): afterwards the lane holds the same positions of the transpose.
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// True on every lane if x is true on some lane of the (converged) warp.
__device__ __forceinline__ bool warp_any(bool x) {
  uint32_t r;
  asm volatile(
      "{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n vote.sync.any.pred q, p, 0xffffffff;\n"
      " selp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(r)
      : "r"((uint32_t)x));
  return r != 0;
}

// The decode block (see above). kMerge: the in-kernel split merge (decode_merge_kernel,
// below); counters is its merge_counters (unused otherwise).
// ---- in-kernel split merge (decode_merge_kernel; NOT YET RUN ON A GPU) -----------------
// Run by every block of a split-KV launch after it wrote its partial rows [row0, row0 + nrows)
// of (sequence b, kv head kvh). Release: each thread fences its partial writes device-wide,
// then one thread takes a ticket on the counter of the block's (sequence, kv head, row group)
// (blockIdx.z, blockIdx.y). The block that draws ticket ns - 1 (ns: the group's split count,
// num_splits, or fewer with balanced splits) is the last of its group: every other split's
// partial is written and fenced before its ticket. It fences
// again (acquire) and merges the group's rows: per row, m = max_s lse_s and wsum = sum_s
// exp(lse_s - m) (a split with lse = -inf weighs 0), o = sum_s w_s o_s / wsum and lse =
// m + ln(wsum), or o = 0 and lse = -inf when wsum = 0: split_merge_kernel's algebra, summed
// in split order per element (split_merge_kernel sums per warp first, so the two agree to
// f32 rounding). Partials are read with ld.global.cg (L2: other SMs wrote them in this grid).
// Finally the counter goes back to 0: the next launch touches it only after this grid
// completes (stream order; a dependent launch's griddepcontrol.wait), so plans replay and
// CUDA graphs capture. Cost in the last block: nrows * d * num_splits * 4 bytes of L2 reads
// (8 rows x d128 x 33 splits: 135 KB), instead of a second launch.
// m_s, l_s: >= kRows floats of shared memory each that the block no longer reads.
template <typename T>
__device__ __forceinline__ void merge_in_block(const LaPagedDecodeParams &p, int32_t *counters,
                                               int ns, int b, int kvh, int row0, int nrows,
                                               float *m_s, float *l_s) {
  __shared__ int last_s;
  const LaPagedCache &c = p.cache;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  int32_t *counter = counters + (long long)blockIdx.z * gridDim.y + blockIdx.y;
  __threadfence();
  __syncthreads();  // every partial row written and fenced; m_s / l_s no longer read
  if (tid == 0) last_s = atomicAdd(counter, 1) == ns - 1;
  __syncthreads();
  if (!last_s) return;
  __threadfence();
  const int group = p.heads_q / c.heads_kv, sq = p.q_len, d = c.head_dim;
  const long long split_rows = (long long)c.batch * p.heads_q * sq;  // rows per split
  auto row_of = [&](int r) {  // (b, h, qi) of block row r, as an lse index
    const int rr = row0 + r, h = kvh * group + rr % group;
    return ((long long)b * p.heads_q + h) * sq + rr / group;
  };
  for (int r = warp; r < nrows; r += kWarps) {
    const long long row = row_of(r);
    float m = kNegInf;
    for (int s = lane; s < ns; s += 32) m = fmaxf(m, __ldcg(p.lse_partial + s * split_rows + row));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float wsum = 0.0f;
    for (int s = lane; s < ns; s += 32) {
      const float ls = __ldcg(p.lse_partial + s * split_rows + row);
      wsum += ls == kNegInf ? 0.0f : expf(ls - m);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) wsum += __shfl_xor_sync(0xffffffffu, wsum, o);
    if (lane == 0) {
      m_s[r] = m;
      l_s[r] = wsum;
    }
  }
  __syncthreads();
  using Pair = typename Elem<T>::Pair;
  const int vecs = d / 4;
  for (int e = tid; e < nrows * vecs; e += kThreads) {
    const int r = e / vecs, v = e % vecs;
    const long long row = row_of(r);
    const float m = m_s[r], wsum = l_s[r];
    float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 8  // 8 splits' loads in flight: ~5 L2 round trips at 33 splits
    for (int s = 0; s < ns; ++s) {
      const long long rs = s * split_rows + row;
      const float ls = __ldcg(p.lse_partial + rs);
      const float4 x = __ldcg(reinterpret_cast<const float4 *>(p.o_partial + rs * d) + v);
      const float w = ls == kNegInf ? 0.0f : expf(ls - m);
      a.x += w * x.x;
      a.y += w * x.y;
      a.z += w * x.z;
      a.w += w * x.w;
    }
    const float inv = wsum > 0.0f ? 1.0f / wsum : 0.0f;
    const int rr = row0 + r, qi = rr / group, h = kvh * group + rr % group;
    T *o = static_cast<T *>(p.o) + (long long)b * p.o_batch_stride + qi * p.o_row_stride +
           h * p.o_head_stride;
    Pair *dst = reinterpret_cast<Pair *>(o + 4 * v);  // 8-byte aligned: strides are multiples of 8
    dst[0] = Elem<T>::from_float2(make_float2(a.x * inv, a.y * inv));
    dst[1] = Elem<T>::from_float2(make_float2(a.z * inv, a.w * inv));
    if (v == 0 && p.lse != nullptr) p.lse[row] = wsum > 0.0f ? m + logf(wsum) : kNegInf;
  }
  if (tid == 0) *counter = 0;
}

// pages_per_split: LaPagedDecodeMergeParams.pages_per_split (kMerge only; 0 otherwise).
template <typename T, int DB, typename KV, bool kMerge>
__device__ __forceinline__ void decode_block(const LaPagedDecodeParams &p, int32_t *counters,
                                             int pages_per_split) {
  wait_for_previous_grid();
  allow_next_grid();
  using Cfg = DecodeCfg<DB, sizeof(KV)>;
  constexpr bool kFp8 = kIsFp8<KV>;
  static_assert(kFp8 == Cfg::kFp8 && (kFp8 || std::is_same_v<KV, T>), "cache type");
  constexpr int kN = Cfg::kN, kStages = Cfg::kStages, kKeyWarps = Cfg::kKeyWarps;
  constexpr int kVR = Cfg::kVR, kDH = Cfg::kDH, kQkSteps = Cfg::kQkSteps;
  constexpr int kPvSteps = Cfg::kPvSteps;
  constexpr int kLoadKeys = Cfg::kLoadKeys, kLPT = Cfg::kLPT, kTileElems = Cfg::kTileElems;
  const LaPagedCache &c = p.cache;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *ring = reinterpret_cast<T *>(smem_raw);
  T *q_s = reinterpret_cast<T *>(smem_raw + Cfg::kQOff);
  int *keypos_s = reinterpret_cast<int *>(smem_raw + Cfg::kKeyOff);
  long long *page_s = reinterpret_cast<long long *>(smem_raw + Cfg::kPageOff);
  int *keybase_s = reinterpret_cast<int *>(smem_raw + Cfg::kKeyBaseOff);
  int *lo_s = reinterpret_cast<int *>(smem_raw + Cfg::kBoundsOff);
  int *hi_s = lo_s + kRows;
  float *m_s = reinterpret_cast<float *>(smem_raw + Cfg::kMlOff);
  float *l_s = m_s + kKeyWarps * kRows;
  float *acc_s = reinterpret_cast<float *>(smem_raw);  // after the loop only

  const int d = c.head_dim, ps = c.page_size, dv = d / kVec;
  const int split = blockIdx.x, b = blockIdx.z;
  const int group = p.heads_q / c.heads_kv;
  const int rows_total = p.q_len * group;
  const int row_groups = (rows_total + kRows - 1) / kRows;
  const int kvh = blockIdx.y / row_groups, row0 = (blockIdx.y % row_groups) * kRows;
  const int nrows = min(kRows, rows_total - row0);
  const int sq = p.q_len, sk = c.seqlens_k[b];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;  // fragment row group / thread in group
  const int kw = warp % kKeyWarps, dh = warp / kKeyWarps;

  // Independent global loads first, so their DRAM round trips overlap: the head kind, the
  // page count of a listed head (read whenever lists exist; used only by listed heads) and,
  // below, the query rows.
  const long long list_row = (long long)b * c.heads_kv + kvh;
  const int kind = p.head_kind != nullptr ? p.head_kind[kvh] : (int)LA_HEAD_FULL;
  const int listed_count = p.page_count != nullptr ? p.page_count[list_row] : 0;
  float k_scale = 1.0f, v_scale = 1.0f;  // e4m3 cache: its scales (kv_scales [2, heads_kv])
  if constexpr (kFp8) {
    k_scale = p.kv_scales[kvh];
    v_scale = p.kv_scales[c.heads_kv + kvh];
  }
  const Mask mask = kind == LA_HEAD_STREAMING
                        ? Mask{p.streaming_window - 1, 0, p.streaming_sinks}
                        : Mask{p.window_left, p.window_right, p.sinks};

  // Query rows -> shared memory as T (zero past nrows and past head_dim); row rr is (query
  // position rr / group, head of the group rr % group). Per row, the visible keys are
  // [lo, hi] plus the sinks below hi (Mask::visible, with hi < sk folded in).
  const T *q = static_cast<const T *>(p.q) + (long long)b * p.q_batch_stride;
  for (int e = tid; e < kRows * kVR; e += kThreads) {
    const int r = e / kVR, cv = e % kVR;
    uint4 raw = make_uint4(0u, 0u, 0u, 0u);
    if (r < nrows && cv < dv) {
      const int rr = row0 + r, qi = rr / group, h = kvh * group + rr % group;
      raw = *reinterpret_cast<const uint4 *>(q + qi * p.q_row_stride + h * p.q_head_stride +
                                             cv * kVec);
    }
    *reinterpret_cast<uint4 *>(q_s + r * DB + cv * kVec) = raw;
  }
  if (tid < kRows) {
    const int qi = (row0 + min(tid, nrows - 1)) / group;
    const long long diag = (long long)qi + sk - sq;
    long long hi = sk - 1;
    if (mask.right >= 0) hi = min(hi, diag + mask.right);
    long long lo = 0;
    if (mask.left >= 0) lo = max(lo, min(diag - mask.left, (long long)sk));
    lo_s[tid] = (int)lo;
    hi_s[tid] = (int)max(hi, -1ll);
  }
  __syncthreads();
  // Q^T as B fragments (k = channel, n = row): b0 = channels 16kk + 2t, +1 of row g, b1 the
  // same 8 channels further. This lane's rows are 2t and 2t + 1.
  uint32_t qf[kQkSteps][2];
#pragma unroll
  for (int kk = 0; kk < kQkSteps; ++kk) {
    qf[kk][0] = *reinterpret_cast<const uint32_t *>(q_s + g * DB + 16 * kk + 2 * t4);
    qf[kk][1] = *reinterpret_cast<const uint32_t *>(q_s + g * DB + 16 * kk + 8 + 2 * t4);
  }
  const int lo0 = lo_s[2 * t4], lo1 = lo_s[2 * t4 + 1];
  const int hi0 = hi_s[2 * t4], hi1 = hi_s[2 * t4 + 1];

  // The block's work pages (same enumeration as Mask::key_tiles / the CPU path).
  const bool listed = kind == LA_HEAD_PAGES || kind == LA_HEAD_QUEST;
  const int qi_lo = row0 / group, qi_hi = (row0 + nrows - 1) / group + 1;
  int sink_pages = 0, first = 0, last = 0, n_work;
  const int32_t *list = nullptr;
  if (listed) {
    list = p.page_list + list_row * p.page_list_stride;
    n_work = listed_count;
  } else {
    mask.key_tiles(qi_lo, qi_hi, sq, sk, ps, sink_pages, first, last);
    n_work = sink_pages + (last - first);
  }
  int w0 = (int)((long long)split * n_work / p.num_splits);
  int w1 = (int)((long long)(split + 1) * n_work / p.num_splits);
  int splits_here = p.num_splits;  // splits of this block's work
  if constexpr (kMerge) {
    if (pages_per_split > 0) {  // balanced splits (paged.h): split * pages_per_split < n_work
      splits_here = min(max(1, (n_work + pages_per_split - 1) / pages_per_split), p.num_splits);
      if (split >= splits_here) return;  // uniform over the block, after its last barrier
      w0 = split * pages_per_split;
      w1 = split + 1 == splits_here ? n_work : w0 + pages_per_split;
    }
  }
  // max_pages_per_seq * page_size fits in i32 (checked on the host).
  const uint32_t n_keys = (uint32_t)(w1 - w0) * (uint32_t)ps;
  const int n_tiles = (int)((n_keys + kN - 1) / kN);
  const int32_t *table = c.block_table + (long long)b * c.max_pages_per_seq;
  const FastDiv page_div(ps);

  // Page chunk: for entries [chunk_base, chunk_base + kPageChunk) of the block's pages, the
  // byte offset of (page, slot 0, kvh) in k_cache / v_cache and the page's first key index.
  const uint32_t slot_bytes = (uint32_t)c.heads_kv * d * (uint32_t)sizeof(KV);  // < 2^25
  int chunk_base = 0;
  auto refill = [&](int base) {
    __syncthreads();  // no thread still reads the previous chunk
    for (int i = tid; i < kPageChunk; i += kThreads) {
      const int w = w0 + base + i;
      if (w < w1) {
        const int lp = listed ? list[w] : (w < sink_pages ? w : first + (w - sink_pages));
        keybase_s[i] = lp * ps;
        page_s[i] = slot_offset(c, table[lp], 0, kvh) * (long long)sizeof(KV);
      }
    }
    __syncthreads();
    chunk_base = base;
  };

  const char *k_cache = static_cast<const char *>(c.k_cache);
  const char *v_cache = static_cast<const char *>(c.v_cache);
  // Loader: thread copies vectors ld_v and ld_v + kVR / 2 of keys ld_k + i * kLoadKeys (a
  // quarter warp writes 8 consecutive vectors of one key for kVR >= 16: conflict-free). A
  // vector is 8 channels: kVecBytes of the cache.
  const int ld_v = tid % (kVR / 2), ld_k = tid / (kVR / 2);
  constexpr int kVecBytes = kVec * (int)sizeof(KV);
  unsigned char *raw_ring = smem_raw + Cfg::kRawOff;  // e4m3 only
  // Issues the cp.async copies of tile `tile` (if any) into its ring slot; the caller
  // commits. Uniform over the block.
  auto issue = [&](int tile) {
    if (tile >= n_tiles) return;
    const uint32_t u0 = (uint32_t)tile * kN;
    const uint32_t u_last = min(u0 + kN, n_keys) - 1;
    if ((int)page_div.div(u_last) - chunk_base >= kPageChunk) refill((int)page_div.div(u0));
    const int st = tile % kStages;
    T *ks = ring + (size_t)st * 2 * kTileElems;
    T *vs = ks + kTileElems;
#pragma unroll
    for (int i = 0; i < kLPT; ++i) {
      const int kk = ld_k + i * kLoadKeys;
      const uint32_t u = u0 + kk;
      int key = -1;
      long long off = ld_v * kVecBytes;
      if (u < n_keys) {
        const uint32_t wr = page_div.div(u);
        const int slot = (int)(u - wr * (uint32_t)ps);
        const int idx = (int)wr - chunk_base;
        const int k = keybase_s[idx] + slot;
        if (k < sk) {
          key = k;
          off += page_s[idx] + (long long)((uint64_t)(uint32_t)slot * slot_bytes);
        }
      }
      const int v1 = ld_v + kVR / 2;
      const bool pred0 = key >= 0 && ld_v < dv, pred1 = key >= 0 && v1 < dv;
      const long long off1 = off + (kVR / 2) * kVecBytes;
      if constexpr (kFp8) {
        // Raw tile [2 halves][kN keys][DB / 2 bytes]: vector ld_v of the key's half.
        unsigned char *kr = raw_ring + (size_t)st * 2 * Cfg::kRawTileBytes;
        unsigned char *vr = kr + Cfg::kRawTileBytes;
        const int ro0 = kk * (DB / 2) + ld_v * kVecBytes, ro1 = ro0 + kN * (DB / 2);
        mma::cp_async_8(mma::smem_addr(kr + ro0), k_cache + (pred0 ? off : 0), pred0);
        mma::cp_async_8(mma::smem_addr(vr + ro0), v_cache + (pred0 ? off : 0), pred0);
        mma::cp_async_8(mma::smem_addr(kr + ro1), k_cache + (pred1 ? off1 : 0), pred1);
        mma::cp_async_8(mma::smem_addr(vr + ro1), v_cache + (pred1 ? off1 : 0), pred1);
      } else {
        const int so0 = swizzled_elem<DB>(kk, ld_v), so1 = swizzled_elem<DB>(kk, v1);
        mma::cp_async_16(mma::smem_addr(ks + so0), k_cache + (pred0 ? off : 0), pred0);
        mma::cp_async_16(mma::smem_addr(vs + so0), v_cache + (pred0 ? off : 0), pred0);
        mma::cp_async_16(mma::smem_addr(ks + so1), k_cache + (pred1 ? off1 : 0), pred1);
        mma::cp_async_16(mma::smem_addr(vs + so1), v_cache + (pred1 ? off1 : 0), pred1);
      }
      if (ld_v == 0) keypos_s[st * kN + kk] = key;
    }
  };

  if (n_tiles > 0) refill(0);
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    issue(t);
    mma::cp_async_commit();
  }

  // Per-lane parts of the ldmatrix addresses (bytes) within a K or V tile:
  //   K (A, x4):       key 16kw + lane % 16,                   chunk 2kk + lane / 16
  //   V (A = V^T, x4.trans): key 16kw + lane % 8 + 8 (lane / 16), chunk 2i + (lane / 8) % 2
  //                    (+ the warp's channel half)
  // Both keys have low 3 bits lane % 8 and the swizzle only touches the low 3 bits of the
  // chunk, so chunk c maps to 8 (c / 8) + ((c % 8) ^ lane % 8): four per-lane offsets
  // (c % 8 = 2j + bit) plus compile-time immediates.
  uint32_t k_off[4], v_off[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    k_off[j] = ldmatrix_offset_rows16<DB, T>(lane, 16 * kw, j);
    v_off[j] = ldmatrix_offset_rows8x2<DB, T>(lane, 16 * kw, dh * kDH, j);
  }
  constexpr uint32_t kChunk8Bytes = 64 * sizeof(T);  // 8 chunks of 8 elements
  const uint32_t ring_base = mma::smem_addr(ring);

  // Per-warp softmax state of this lane's rows 2t, 2t + 1: m (uniform over the lanes of a
  // row), l (this lane's keys only, summed at the end), O^T accumulators (channel 16i + g
  // (+8) of the warp's half, rows 2t, 2t + 1). Log2 units.
  float m[2] = {kNegInf, kNegInf}, l[2] = {0.0f, 0.0f};
  float acc[kPvSteps][4];
#pragma unroll
  for (int i = 0; i < kPvSteps; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.0f;
  float score_scale = p.scale;
  if constexpr (kFp8) score_scale *= k_scale;  // (q . k_e4m3) * (scale * k_scale)
  const float softcap = p.softcap;

#pragma unroll 1
  for (int tile = 0; tile < n_tiles; ++tile) {
    mma::cp_async_wait<kStages - 2>();  // this thread's copies of `tile` landed
    __syncthreads();  // everyone's copies visible; everyone done with the slot refilled next
    issue(tile + kStages - 1);
    mma::cp_async_commit();  // always (possibly empty): keeps the group count per tile

    const int st = tile % kStages;
    if constexpr (kFp8) {
      // Slot st (raw e4m3) -> the T tiles at the start of shared memory (the previous tile's
      // readers passed the barrier above). Vector (key, cv) of K and V per step: a warp reads
      // 256 contiguous raw bytes, a quarter warp writes 8 vectors of one swizzled row.
      const unsigned char *kr = raw_ring + (size_t)st * 2 * Cfg::kRawTileBytes;
      const unsigned char *vr = kr + Cfg::kRawTileBytes;
      T *kt = ring, *vt = ring + kTileElems;
#pragma unroll
      for (int j = 0; j < kN * kVR / kThreads; ++j) {
        const int e = tid + j * kThreads, key = e / kVR, cv = e % kVR;
        const int ro = (cv / (kVR / 2)) * (kN * (DB / 2)) + key * (DB / 2) + (cv % (kVR / 2)) * kVec;
        const int so = swizzled_elem<DB>(key, cv);
        const uint2 kraw = *reinterpret_cast<const uint2 *>(kr + ro);
        const uint2 vraw = *reinterpret_cast<const uint2 *>(vr + ro);
        *reinterpret_cast<uint4 *>(kt + so) = e4m3x8_to_pack8<T>(kraw);
        *reinterpret_cast<uint4 *>(vt + so) = e4m3x8_to_pack8<T>(vraw);
      }
      __syncthreads();
    }
    const uint32_t ks = ring_base + (uint32_t)((kFp8 ? 0 : st) * 2 * Cfg::kTileBytes);
    const uint32_t vs = ks + (uint32_t)Cfg::kTileBytes;
    const int *kp = keypos_s + st * kN + 16 * kw;

    // S^T = K Q^T: c0, c1 = key g, rows 2t, 2t + 1; c2, c3 = key g + 8. Two accumulator
    // chains (even / odd k16 steps) for latency.
    float sa[4] = {0.0f, 0.0f, 0.0f, 0.0f}, sb[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int kk = 0; kk < kQkSteps; ++kk) {
      uint32_t a[4];
      mma::ldmatrix_x4(a, ks + k_off[kk % 4] + (kk / 4) * kChunk8Bytes);
      if (kk % 2 == 0)
        mma::Mma<T>::run(sa, a, qf[kk][0], qf[kk][1]);
      else
        mma::Mma<T>::run(sb, a, qf[kk][0], qf[kk][1]);
    }
    const int key0 = kp[g], key1 = kp[g + 8];
    float x[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = e < 2 ? key0 : key1;
      const int lo = (e & 1) ? lo1 : lo0, hi = (e & 1) ? hi1 : hi0;
      float xs = kNegInf;
      // Mask::visible with the row's bounds (j = -1 marks no key).
      if (j >= 0 && j <= hi && (j >= lo || j < mask.sinks)) {
        xs = (sa[e] + sb[e]) * score_scale;
        if (softcap > 0.0f) xs = softcap * tanhf(xs / softcap);
        xs *= kLog2e;  // log2 units: exp2 is one MUFU op
      }
      x[e] = xs;
    }
    float alpha[2], pr[4];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tmax = fmaxf(x[r], x[r + 2]);
      tmax = fmaxf(tmax, mma::shfl_xor<4>(tmax));
      tmax = fmaxf(tmax, mma::shfl_xor<8>(tmax));
      tmax = fmaxf(tmax, mma::shfl_xor<16>(tmax));
      // Nothing visible yet keeps (m, l, acc) = (-inf, 0, 0): the factor is 1, p is 0.
      const float m_new = fmaxf(m[r], tmax);
      alpha[r] = rescale_factor(m[r], m_new);
      m[r] = m_new;
      pr[r] = x[r] == kNegInf ? 0.0f : mma::fast_exp2(x[r] - m_new);
      pr[r + 2] = x[r + 2] == kNegInf ? 0.0f : mma::fast_exp2(x[r + 2] - m_new);
      l[r] = l[r] * alpha[r] + (pr[r] + pr[r + 2]);
    }
    if (warp_any(alpha[0] != 1.0f || alpha[1] != 1.0f)) {  // rare once the row max settles
#pragma unroll
      for (int i = 0; i < kPvSteps; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] *= alpha[e & 1];
    }

    // P^T as the B fragment (k = key, n = row): b0 = keys 2t, 2t + 1 of row g, b1 = keys
    // 2t + 8, +9: the transposes of the 8x8 blocks (keys 0-7 | 8-15) x rows of S^T.
    const uint32_t b0 = movmatrix_trans(pack2<T>(pr[0], pr[1]));
    const uint32_t b1 = movmatrix_trans(pack2<T>(pr[2], pr[3]));
    // O^T += V^T P^T over this warp's channel blocks.
#pragma unroll
    for (int i = 0; i < kPvSteps; ++i) {
      uint32_t a[4];
      mma::ldmatrix_x4_trans(a, vs + v_off[i % 4] + (i / 4) * kChunk8Bytes);
      mma::Mma<T>::run(acc[i], a, b0, b1);
    }
  }
  mma::cp_async_wait<0>();  // only empty groups can remain; the ring is reused below
  __syncthreads();

  // Merge the key groups' states (the OnlineSoftmax / merge_weights algebra). The two warps
  // of a key group (kDimSplit = 2) hold the same (m, l); the first one publishes them.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += mma::shfl_xor<4>(l[r]);
    l[r] += mma::shfl_xor<8>(l[r]);
    l[r] += mma::shfl_xor<16>(l[r]);
    if (dh == 0 && g == 0) {
      m_s[kw * kRows + 2 * t4 + r] = m[r];
      l_s[kw * kRows + 2 * t4 + r] = l[r];
    }
  }
#pragma unroll
  for (int i = 0; i < kPvSteps; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      acc_s[(kw * kRows + 2 * t4 + (e & 1)) * DB + dh * kDH + 16 * i + g + 8 * (e >> 1)] = acc[i][e];
  __syncthreads();
  T *o = static_cast<T *>(p.o) + (long long)b * p.o_batch_stride;
  for (int e = tid; e < nrows * d; e += kThreads) {
    const int r = e / d, ch = e % d;
    float m_all = kNegInf;
#pragma unroll
    for (int w = 0; w < kKeyWarps; ++w) m_all = fmaxf(m_all, m_s[w * kRows + r]);
    float l_all = 0.0f, a_all = 0.0f;
#pragma unroll
    for (int w = 0; w < kKeyWarps; ++w) {
      const float mw = m_s[w * kRows + r];
      // An empty key group (m = -inf) contributes nothing; -inf - -inf would be NaN.
      const float f = mw == kNegInf ? 0.0f : exp2f(mw - m_all);
      l_all += f * l_s[w * kRows + r];
      a_all += f * acc_s[(w * kRows + r) * DB + ch];
    }
    float out = l_all > 0.0f ? a_all / l_all : 0.0f;
    if constexpr (kFp8) out *= v_scale;
    const float lse = lse_from_log2(m_all, l_all);
    const int rr = row0 + r, qi = rr / group, h = kvh * group + rr % group;
    if (kMerge ? splits_here == 1 : p.num_splits == 1) {
      o[qi * p.o_row_stride + h * p.o_head_stride + ch] = Elem<T>::from_float(out);
      if (ch == 0 && p.lse != nullptr) p.lse[((long long)b * p.heads_q + h) * sq + qi] = lse;
    } else {
      const long long row = (((long long)split * c.batch + b) * p.heads_q + h) * sq + qi;
      p.o_partial[row * d + ch] = out;
      if (ch == 0) p.lse_partial[row] = lse;
    }
  }
  if constexpr (kMerge) {
    if (splits_here > 1)
      merge_in_block<T>(p, counters, splits_here, b, kvh, row0, nrows, m_s, l_s);
  }
}

template <typename T, int DB, typename KV = T>
__global__ void __launch_bounds__(kThreads, DecodeCfg<DB, sizeof(KV)>::kMinBlocks)
    decode_kernel(const __grid_constant__ LaPagedDecodeParams p) {
  decode_block<T, DB, KV, false>(p, nullptr, 0);
}

// Split-KV decode with the in-kernel merge (la_paged_decode_inmerge; NOT YET RUN ON A GPU):
// decode_kernel's block, then merge_in_block.
template <typename T, int DB, typename KV = T>
__global__ void __launch_bounds__(kThreads, DecodeCfg<DB, sizeof(KV)>::kMinBlocks)
    decode_merge_kernel(const __grid_constant__ LaPagedDecodeMergeParams p) {
  decode_block<T, DB, KV, true>(p.decode, p.merge_counters, p.pages_per_split);
}

// Merge of the split partials, one block of kWarps warps per (b, h, qi) row: warp w
// accumulates splits w, w + kWarps, ... with lane owning the float4 channel vectors lane and
// lane + 32 of o_partial ([num_splits, batch, heads_q, q_len, head_dim]). Every load of a
// batch of kMergeBatch splits is issued before any is used, and the first batch before the
// row's max and weight sum are known, so the row costs about two memory round trips instead
// of one per split. Weights exp(lse_s - max) (an empty split, lse = -inf, weighs 0); o =
// sum_s w_s o_s / sum_s w_s and lse = max + ln(sum_s w_s), or o = 0 and lse = -inf for a row
// no split saw (the merge_weights algebra of src/softmax.rs applied to all splits at once).
constexpr int kMergeBatch = 8;                 // splits per warp in flight together
constexpr int kMergeLaneVecs = kMaxDim / 128;  // float4 vectors per lane (d <= kMaxDim)

template <typename T>
__global__ void __launch_bounds__(kThreads) split_merge_kernel(const __grid_constant__ LaPagedDecodeParams p) {
  wait_for_previous_grid();
  allow_next_grid();
  const LaPagedCache &c = p.cache;
  const long long rows = (long long)c.batch * p.heads_q * p.q_len;
  const long long row = blockIdx.x;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int n_splits = p.num_splits, vecs = c.head_dim / 4;
  __shared__ float warp_red[kWarps];
  __shared__ float4 warp_acc[kWarps - 1][kMaxDim / 4];
  const float *lse_part = p.lse_partial + row;  // split s at s * rows
  const float4 *o_part = reinterpret_cast<const float4 *>(p.o_partial + row * c.head_dim);
  const long long split_vecs = rows * vecs;  // float4 stride between splits

  // Loads the o vectors of this warp's splits s0 + kWarps * j (zero past the last split and
  // past head_dim).
  float4 batch[kMergeBatch][kMergeLaneVecs];
  auto load_batch = [&](int s0) {
#pragma unroll
    for (int j = 0; j < kMergeBatch; ++j) {
      const int s = s0 + kWarps * j;
#pragma unroll
      for (int x = 0; x < kMergeLaneVecs; ++x) {
        const int v = lane + 32 * x;
        batch[j][x] = s < n_splits && v < vecs ? o_part[s * split_vecs + v]
                                                : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
    }
  };
  load_batch(warp);

  // Row max, then weight sum, over all splits (block reductions).
  auto block_reduce = [&](float x, bool is_max) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float y = __shfl_xor_sync(0xffffffffu, x, o);
      x = is_max ? fmaxf(x, y) : x + y;
    }
    if (lane == 0) warp_red[warp] = x;
    __syncthreads();
    float all = warp_red[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) all = is_max ? fmaxf(all, warp_red[w]) : all + warp_red[w];
    __syncthreads();  // warp_red is reused by the next reduction
    return all;
  };
  float m = kNegInf;
  for (int s = tid; s < n_splits; s += kThreads) m = fmaxf(m, lse_part[s * rows]);
  m = block_reduce(m, true);
  auto weight = [&](int s) {
    const float ls = lse_part[s * rows];
    return ls == kNegInf ? 0.0f : expf(ls - m);
  };
  float wsum = 0.0f;
  for (int s = tid; s < n_splits; s += kThreads) wsum += weight(s);
  wsum = block_reduce(wsum, false);

  float4 acc[kMergeLaneVecs];
#pragma unroll
  for (int x = 0; x < kMergeLaneVecs; ++x) acc[x] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  auto add_batch = [&](int s0) {
#pragma unroll
    for (int j = 0; j < kMergeBatch; ++j) {
      const int s = s0 + kWarps * j;
      if (s >= n_splits) break;
      const float w = weight(s);
#pragma unroll
      for (int x = 0; x < kMergeLaneVecs; ++x) {
        acc[x].x += w * batch[j][x].x;
        acc[x].y += w * batch[j][x].y;
        acc[x].z += w * batch[j][x].z;
        acc[x].w += w * batch[j][x].w;
      }
    }
  };
  add_batch(warp);
  for (int s0 = warp + kWarps * kMergeBatch; s0 < n_splits; s0 += kWarps * kMergeBatch) {
    load_batch(s0);
    add_batch(s0);
  }

  // Warps 1.. hand their sums to warp 0, which writes o and lse.
  if (warp > 0) {
#pragma unroll
    for (int x = 0; x < kMergeLaneVecs; ++x)
      if (lane + 32 * x < vecs) warp_acc[warp - 1][lane + 32 * x] = acc[x];
  }
  __syncthreads();
  if (warp > 0) return;
  const int qi = (int)(row % p.q_len);
  const int h = (int)((row / p.q_len) % p.heads_q);
  const long long b = row / ((long long)p.q_len * p.heads_q);
  T *o = static_cast<T *>(p.o) + b * p.o_batch_stride + qi * p.o_row_stride + h * p.o_head_stride;
  using Pair = typename Elem<T>::Pair;
  const float inv = wsum > 0.0f ? 1.0f / wsum : 0.0f;
#pragma unroll
  for (int x = 0; x < kMergeLaneVecs; ++x) {
    const int v = lane + 32 * x;
    if (v >= vecs) continue;
    float4 a = acc[x];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      const float4 y = warp_acc[w - 1][v];
      a.x += y.x;
      a.y += y.y;
      a.z += y.z;
      a.w += y.w;
    }
    Pair *dst = reinterpret_cast<Pair *>(o + 4 * v);  // 8-byte aligned: strides are multiples of 8
    dst[0] = Elem<T>::from_float2(make_float2(a.x * inv, a.y * inv));
    dst[1] = Elem<T>::from_float2(make_float2(a.z * inv, a.w * inv));
  }
  if (lane == 0 && p.lse != nullptr) p.lse[row] = wsum > 0.0f ? m + logf(wsum) : kNegInf;
}

// Devices whose decode launch attributes are remembered (higher ordinals set them per call).
constexpr int kMaxCachedDevices = 64;
enum KernelSetup : int { kSetupPending = 0, kSetupDone = 1, kSetupTooLarge = 2 };

// One-time (per instantiation and device) preparation of a decode kernel: checks the card's
// opt-in shared memory per block and sets the kernel's dynamic shared-memory size and
// carveout. The attribute calls are idempotent, so two threads racing on a device's first
// launch both set the same values; the result is published with release/acquire.
template <typename T, int DB, typename KV, bool kMerge = false>
cudaError_t prepare_decode_kernel() {
  constexpr size_t smem = DecodeCfg<DB, sizeof(KV)>::kSmemBytes;
  static std::atomic<int> setup[kMaxCachedDevices];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const bool cached = dev >= 0 && dev < kMaxCachedDevices;
  if (cached) {
    const int state = setup[dev].load(std::memory_order_acquire);
    if (state == kSetupDone) return cudaSuccess;
    if (state == kSetupTooLarge) return cudaErrorNotSupported;
  }
  // Cards with ~99 KB per block (sm_86/sm_89) cannot hold the larger rings: say so plainly
  // instead of failing the attribute call with "invalid argument".
  int optin = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  if (smem > (size_t)optin) {
    if (cached) setup[dev].store(kSetupTooLarge, std::memory_order_release);
    return cudaErrorNotSupported;
  }
  const void *kernel = kMerge ? reinterpret_cast<const void *>(decode_merge_kernel<T, DB, KV>)
                              : reinterpret_cast<const void *>(decode_kernel<T, DB, KV>);
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  // Ask for the largest shared-memory carveout so that as many blocks as possible fit per SM
  // (kMinBlocks on H100/H200; fewer on A100 for the 128 and 256 buckets).
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                             (int)cudaSharedmemCarveoutMaxShared);
  if (err != cudaSuccess) return err;
  if (cached) setup[dev].store(kSetupDone, std::memory_order_release);
  return cudaSuccess;
}

template <typename T, int DB, typename KV>
cudaError_t launch_decode_kernel(const LaPagedDecodeParams &p, dim3 grid, cudaStream_t stream) {
  const cudaError_t err = prepare_decode_kernel<T, DB, KV>();
  if (err != cudaSuccess) return err;
  return launch_dependent(decode_kernel<T, DB, KV>, grid, dim3(kThreads),
                          DecodeCfg<DB, sizeof(KV)>::kSmemBytes, stream, p);
}

template <typename T, int DB, typename KV>
cudaError_t launch_decode_merge_kernel(const LaPagedDecodeMergeParams &p, dim3 grid,
                                       cudaStream_t stream) {
  const cudaError_t err = prepare_decode_kernel<T, DB, KV, true>();
  if (err != cudaSuccess) return err;
  return launch_dependent(decode_merge_kernel<T, DB, KV>, grid, dim3(kThreads),
                          DecodeCfg<DB, sizeof(KV)>::kSmemBytes, stream, p);
}

// The decode grid (splits, heads_kv * row groups, batch); false when it exceeds the limits.
inline bool decode_grid(const LaPagedDecodeParams &p, dim3 &grid) {
  const int rows = p.q_len * (p.heads_q / p.cache.heads_kv);
  const int row_groups = (rows + kRows - 1) / kRows;
  const long long gy = (long long)p.cache.heads_kv * row_groups;
  if (gy > 65535 || p.num_splits < 1 || p.num_splits > 65535) return false;
  grid = dim3(p.num_splits, (unsigned)gy, p.cache.batch);
  return true;
}

// KV: the cache's element type, T or __nv_fp8_e4m3.
template <typename T, typename KV>
cudaError_t launch_decode(const LaPagedDecodeParams &p, cudaStream_t stream) {
  dim3 grid;
  if (!decode_grid(p, grid)) return cudaErrorInvalidConfiguration;
  const int d = p.cache.head_dim;
  cudaError_t err = d <= 64    ? launch_decode_kernel<T, 64, KV>(p, grid, stream)
                    : d <= 128 ? launch_decode_kernel<T, 128, KV>(p, grid, stream)
                               : launch_decode_kernel<T, 256, KV>(p, grid, stream);
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const long long merge_rows = (long long)p.cache.batch * p.heads_q * p.q_len;
  if (merge_rows > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  return launch_dependent(split_merge_kernel<T>, dim3((unsigned)merge_rows), dim3(kThreads), 0,
                          stream, p);
}

// One launch: the plain kernel when there is one split, else decode_merge_kernel.
template <typename T, typename KV>
cudaError_t launch_decode_inmerge(const LaPagedDecodeMergeParams &p, cudaStream_t stream) {
  if (p.decode.num_splits == 1) return launch_decode<T, KV>(p.decode, stream);
  dim3 grid;
  if (!decode_grid(p.decode, grid)) return cudaErrorInvalidConfiguration;
  const int d = p.decode.cache.head_dim;
  return d <= 64    ? launch_decode_merge_kernel<T, 64, KV>(p, grid, stream)
         : d <= 128 ? launch_decode_merge_kernel<T, 128, KV>(p, grid, stream)
                    : launch_decode_merge_kernel<T, 256, KV>(p, grid, stream);
}

// The scalar and pointer checks of every decode entry point.
bool decode_params_ok(const LaPagedDecodeParams *params) {
  if (params == nullptr || !dims_ok(params->cache) || params->q_len <= 0 ||
      params->q == nullptr || params->o == nullptr ||
      !check::heads(params->heads_q, params->cache.heads_kv, params->cache.head_dim) ||
      !check::mask(params->window_left, params->window_right, params->sinks) ||
      params->streaming_window < 0 || params->streaming_sinks < 0 ||
      !check::scoring(params->scale, params->softcap) || params->num_splits < 1 ||
      (params->num_splits > 1 && (params->o_partial == nullptr || params->lse_partial == nullptr)) ||
      (params->page_list == nullptr) != (params->page_count == nullptr) ||
      !check::strides(params->q_batch_stride, params->q_row_stride, params->q_head_stride) ||
      !check::strides(params->o_batch_stride, params->o_row_stride, params->o_head_stride))
    return false;
  // The cache holds q's dtype, or e4m3 with its scales.
  return params->kv_dtype == params->dtype ||
         (params->kv_dtype == LA_F8E4M3 && params->kv_scales != nullptr);
}

}  // namespace
}  // namespace longattn

extern "C" int la_paged_decode(const LaPagedDecodeParams *params, cudaStream_t stream) {
  using namespace longattn;
  if (!decode_params_ok(params)) return cudaErrorInvalidValue;
  const bool fp8 = params->kv_dtype == LA_F8E4M3;
  return with_dtype<__half, __nv_bfloat16>(params->dtype, cudaErrorInvalidValue, [&](auto t) {
    using T = typename decltype(t)::type;
    return fp8 ? launch_decode<T, __nv_fp8_e4m3>(*params, stream)
               : launch_decode<T, T>(*params, stream);
  });
}

extern "C" int la_paged_decode_inmerge(const LaPagedDecodeMergeParams *params,
                                       cudaStream_t stream) {
  using namespace longattn;
  if (params == nullptr || !decode_params_ok(&params->decode) ||
      (params->decode.num_splits > 1 && params->merge_counters == nullptr) ||
      params->pages_per_split < 0)
    return cudaErrorInvalidValue;
  const bool fp8 = params->decode.kv_dtype == LA_F8E4M3;
  return with_dtype<__half, __nv_bfloat16>(params->decode.dtype, cudaErrorInvalidValue, [&](auto t) {
    using T = typename decltype(t)::type;
    return fp8 ? launch_decode_inmerge<T, __nv_fp8_e4m3>(*params, stream)
               : launch_decode_inmerge<T, T>(*params, stream);
  });
}
