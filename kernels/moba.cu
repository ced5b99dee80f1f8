// MoBA on the GPU (semantics.md "MoBA selection"; src/block_sparse/moba.rs is the CPU
// reference): gating (pool, then per-row top-k + per-tile union) and the attention over the
// selections. NOT YET RUN ON A GPU (compiled and register-checked only).
//
// 1. moba_pool_kernel, grid (num_k_blocks, heads_kv, batch), 256 threads: the f32 mean of
//    each key block; thread (ch = tid % D, group = tid / D) sums rows group, group + 256 / D,
//    ... of channel ch, the groups are added in shared memory (fixed order).
// 2. moba_select_kernel, grid (num_tiles, heads_q, batch), 128 threads, one block per 64-row
//    query tile (the attention's tile): the tile's Q rows (as T, padded rows) stay in shared
//    memory; the pooled keys of the blocks before the tile's last row's own block stream
//    through in chunks of 32 blocks (f32); thread (ty = tid / 8, tx = tid % 8) scores rows
//    ty + 16a against blocks tx + 8c (4 x 4, f32 FMA in channel order) into a shared score
//    tile; then thread r < 64 merges row r's scores of the blocks before its own block into
//    its running top-(top_k - 1) list in shared memory (sorted by (score desc, index asc):
//    blocks arrive in increasing index, so a candidate displaces an entry only when its
//    ordered key is strictly greater, which is the tie rule; NaN is mapped to -inf first).
//    Each row then adds its own block, sorts its list by index, writes it (RowBlocks layout)
//    and sets its blocks in a shared bitset of the tile's key blocks, which warp 0 compacts
//    (popc + warp scan) into the tile's increasing union list.
// 2b. moba_select_blocks_kernel: the same at query-block granularity (below).
// 2c. moba_select_tc_kernel: moba_select_kernel with the scores on tensor cores (opt-in,
//    la_moba_select_tc; below).
// 3. moba_attention_kernel: the mma.sync mainloop (mma_mainloop.cuh) with MobaProblem, the
//    block-sparse problem of block_sparse_mma.cu whose list is the tile's union and whose
//    mask adds each row's selection: the 64 rows' lists are copied into dynamic shared
//    memory after the mainloop's (top_k i32 per row); per visited tile of key block kb a
//    thread scans each of its two rows' increasing lists up to the first entry >= kb (no
//    state kept across tiles: persistent cursors cost registers the d64 configuration does
//    not have); a warp whose rows all hold kb takes the window mask alone (interior tiles
//    skip it).
#include "longattn/block_sparse.h"
#include "longattn/common.cuh"
#include "longattn/dense_mask.cuh"
#include "longattn/dense_tensors.cuh"
#include "longattn/dispatch.cuh"
#include "longattn/mma_mainloop.cuh"

namespace longattn {
namespace {

constexpr int kTileRows = LA_MOBA_TILE_ROWS;
constexpr int kMaxTopK = LA_MOBA_MAX_TOP_K;
static_assert(kTileRows == DenseTraits64::kBlockM && kTileRows == DenseTraits128::kBlockM &&
                  kTileRows == DenseTraits256::kBlockM,
              "the gating tile is the attention's query tile");

// ---- 1. Pooling ---------------------------------------------------------------------
constexpr int kPoolThreads = 256;

template <typename T, int D>
__global__ void __launch_bounds__(kPoolThreads) moba_pool_kernel(const __grid_constant__ LaMobaParams p) {
  constexpr int kGroups = kPoolThreads / D;
  __shared__ float part[kPoolThreads];
  const int kb = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const SeqInfo s = seq_info(p.dense, b, 0);
  const long long r0 = (long long)kb * p.block_n;
  if (r0 >= s.sk) return;
  const int n = (int)min((long long)p.block_n, s.sk - r0);
  const int ch = tid % D, grp = tid / D;
  const T *k = static_cast<const T *>(p.dense.k) + b * p.dense.k_batch_stride +
               (s.k_row0 + r0) * p.dense.k_row_stride + kvh * p.dense.k_head_stride + ch;
  float sum = 0.0f;
  for (int r = grp; r < n; r += kGroups) sum += Elem<T>::to_float(k[r * p.dense.k_row_stride]);
  part[tid] = sum;
  __syncthreads();
  if (grp == 0) {
#pragma unroll
    for (int g = 1; g < kGroups; ++g) sum += part[g * D + ch];
    p.pooled[(((long long)b * p.dense.heads_kv + kvh) * p.num_k_blocks + kb) * D + ch] = sum / n;
  }
}

// ---- 2. Selection + union -----------------------------------------------------------
constexpr int kSelThreads = 128;
constexpr int kChunk = 32;  // pooled key blocks per pass

// Order-preserving map of a float onto uint32 (larger float -> larger integer); NaN ranks
// as -inf.
__device__ __forceinline__ uint32_t rank_key(float f) {
  const uint32_t u = __float_as_uint(f != f ? kNegInf : f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Row tid's merge of one chunk's scores (`scores[0..n]`, blocks c0..c0 + n) into its top
// list (`key`/`idx`, `filled` of `cap` ranked, best first): a block enters when the list is
// not full or it beats the last entry, and passes only strictly worse entries, so equal
// scores keep the lower block index first.
__device__ __forceinline__ void merge_chunk(const float *scores, int n, int c0, int cap,
                                            int &filled, uint32_t *key_list, int *idx) {
  for (int c = 0; c < n; ++c) {
    const uint32_t key = rank_key(scores[c]);
    int pos;
    if (filled < cap) {
      pos = filled++;
    } else if (key > key_list[cap - 1]) {
      pos = cap - 1;
    } else {
      continue;
    }
    while (pos > 0 && key_list[pos - 1] < key) {
      key_list[pos] = key_list[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    key_list[pos] = key;
    idx[pos] = c0 + c;
  }
}

// Row tid's selection: the ranked blocks plus its own (own >= 0; none when the row sees no
// key), in increasing index, written to `out` and padded with -1 to top_k; each block's bit
// set in the tile's union bitset.
__device__ __forceinline__ void write_row(int32_t *out, int top_k, int own, int filled,
                                          int *idx, uint32_t *bits) {
  int n = 0;
  if (own >= 0) {
    idx[filled] = own;  // filled <= cap < kMaxTopK
    n = filled + 1;
    for (int i = 1; i < n; ++i) {  // insertion sort
      const int v = idx[i];
      int j = i;
      while (j > 0 && idx[j - 1] > v) {
        idx[j] = idx[j - 1];
        --j;
      }
      idx[j] = v;
    }
    for (int i = 0; i < n; ++i) {
      out[i] = idx[i];
      atomicOr(&bits[idx[i] / 32], 1u << (idx[i] % 32));
    }
  }
  for (int i = n; i < top_k; ++i) out[i] = -1;
}

// Warp 0 (all 32 lanes): tile `tile`'s union list from its bitset of `words` words, in
// increasing block index, and its count.
__device__ __forceinline__ void write_union(const LaMobaParams &p, long long tile,
                                            const uint32_t *bits, int words, int lane) {
  int32_t *list = p.union_blocks + tile * p.union_width;
  int base = 0;
  for (int w0 = 0; w0 < words; w0 += 32) {
    const uint32_t word = w0 + lane < words ? bits[w0 + lane] : 0u;
    const int cnt = __popc(word);
    int incl = cnt;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    int at = base + incl - cnt;
    for (uint32_t m = word; m != 0u; m &= m - 1u) list[at++] = 32 * (w0 + lane) + __ffs(m) - 1;
    base += __shfl_sync(0xffffffffu, incl, 31);
  }
  if (lane == 0) p.union_count[tile] = base;
}

// The setup of a row-wise gate block (moba_select_kernel, moba_select_tc_kernel): the tile's
// rows [m0, m0 + rows) of (sequence b, query head h), whose candidates are the key blocks
// before the own block of the tile's last row (own_last; n_cand of them, none when
// top_k == 1). begin() stages the tile's Q rows in q_s (T's bits, row stride q_stride, zero
// rows past `rows`), clears the union bitset (`words` words: blocks 0..own_last) and ends
// with a barrier (bits cleared before any row sets its blocks: there may be no chunk).
struct GateTile {
  int rows, cap, n_cand, words;  // cap: ranked slots per row
  int my_own;           // own block of row threadIdx.x (-1: no such row, or it sees no key)
  const float *pooled;  // the kv head's pooled keys [num_k_blocks, D]

  template <typename T, int D>
  __device__ __forceinline__ static GateTile begin(const LaMobaParams &p, const SeqInfo &s, int b,
                                                   int h, int m0, uint16_t *q_s, int q_stride,
                                                   uint32_t *bits_s) {
    GateTile t;
    const int tid = threadIdx.x;
    const HeadTensors<T> head = head_tensors<T>(p.dense, s, b, h);
    const int kvh = h / (p.dense.heads_q / p.dense.heads_kv);
    t.rows = min(kTileRows, s.sq - m0);
    const int shift = s.sk - s.sq;  // position of row i is i + shift
    // Own block of the tile's last row: every row's candidates lie below it.
    const int p_last = m0 + t.rows - 1 + shift;
    const int own_last = p_last >= 0 ? p_last / p.block_n : -1;
    t.cap = p.top_k - 1;
    t.n_cand = t.cap > 0 ? max(own_last, 0) : 0;
    for (int e = tid; e < kTileRows * D; e += kSelThreads) {
      const int r = e / D, c = e % D;
      const uint16_t *q = reinterpret_cast<const uint16_t *>(head.q);
      q_s[r * q_stride + c] = r < t.rows ? q[(long long)(m0 + r) * p.dense.q_row_stride + c] : 0;
    }
    t.words = own_last >= 0 ? own_last / 32 + 1 : 0;
    for (int w = tid; w < t.words; w += kSelThreads) bits_s[w] = 0u;
    __syncthreads();
    const int my_p = m0 + tid + shift;
    t.my_own = (tid < t.rows && my_p >= 0) ? my_p / p.block_n : -1;
    t.pooled = p.pooled + ((long long)b * p.dense.heads_kv + kvh) * p.num_k_blocks * (long long)D;
    return t;
  }
};

// The end of a selection block (every thread; the per-row state of the thread's row, rows
// < tile.rows): each row's selection written (write_row), then warp 0 the tile's union
// (write_union).
__device__ __forceinline__ void finish_tile(const LaMobaParams &p, int b, int h, int x, int m0,
                                            const GateTile &tile, int filled, int *my_idx,
                                            uint32_t *bits_s) {
  const int tid = threadIdx.x;
  if (tid < tile.rows) {
    // The sequence's placement again (a few cached loads): keeping lse_base live across the
    // score loop made ptxas spill it (sm_90a, f16).
    const SeqInfo s = seq_info(p.dense, b, h);
    write_row(p.row_blocks + (s.lse_base + m0 + tid) * (long long)p.top_k, p.top_k, tile.my_own,
              filled, my_idx, bits_s);
  }
  __syncthreads();
  if (tid < 32)
    write_union(p, ((long long)b * p.dense.heads_q + h) * p.num_tiles + x, bits_s, tile.words,
                tid);
}

// A 16-bit element's bits as f32 (exact).
template <typename T>
__device__ __forceinline__ float bits_to_float(uint16_t u);
template <>
__device__ __forceinline__ float bits_to_float<__half>(uint16_t u) {
  return __half2float(__ushort_as_half(u));
}
template <>
__device__ __forceinline__ float bits_to_float<__nv_bfloat16>(uint16_t u) {
  return __uint_as_float((uint32_t)u << 16);
}

// Shared memory of the selection kernel for head dim D (bytes, 16-aligned parts), then the
// union bitset (words of the tile's key blocks).
template <typename T, int D>
struct SelSmem {
  static constexpr int kQStride = D + 2;  // T elements; shifts rows by one bank
  static constexpr int kPStride = D + 1;  // floats
  static constexpr int kSStride = kChunk + 1;
  static constexpr int kTop = kMaxTopK + 1;  // row stride: odd, rows hit distinct banks
  static constexpr size_t kQ = (sizeof(T) * kTileRows * kQStride + 15) / 16 * 16;
  static constexpr size_t kP = sizeof(float) * kChunk * kPStride;
  static constexpr size_t kS = sizeof(float) * kTileRows * kSStride;
  static constexpr size_t kTopBytes = sizeof(uint32_t) * kTileRows * kTop;
  static constexpr size_t kFixed = kQ + kP + kS + 2 * kTopBytes;
  static size_t bytes(int num_k_blocks) {
    return kFixed + sizeof(uint32_t) * ((num_k_blocks + 31) / 32);
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(kSelThreads) moba_select_kernel(const __grid_constant__ LaMobaParams p) {
  using Sm = SelSmem<T, D>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint16_t *q_s = reinterpret_cast<uint16_t *>(smem_raw);  // T's bits
  float *p_s = reinterpret_cast<float *>(smem_raw + Sm::kQ);
  float *s_s = reinterpret_cast<float *>(smem_raw + Sm::kQ + Sm::kP);
  uint32_t *topk_s = reinterpret_cast<uint32_t *>(smem_raw + Sm::kQ + Sm::kP + Sm::kS);
  int *topi_s = reinterpret_cast<int *>(smem_raw + Sm::kQ + Sm::kP + Sm::kS + Sm::kTopBytes);
  uint32_t *bits_s = reinterpret_cast<uint32_t *>(smem_raw + Sm::kFixed);

  const int x = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x;
  const SeqInfo s = seq_info(p.dense, b, h);
  const int m0 = x * kTileRows;
  if (m0 >= s.sq) return;
  const GateTile tile = GateTile::begin<T, D>(p, s, b, h, m0, q_s, Sm::kQStride, bits_s);
  // Row tid's top list (threads < 64).
  int filled = 0;
  uint32_t *my_key = topk_s + tid * Sm::kTop;
  int *my_idx = topi_s + tid * Sm::kTop;
  const int ty = tid / 8, tx = tid % 8;
  for (int c0 = 0; c0 < tile.n_cand; c0 += kChunk) {
    const int nc = min(kChunk, tile.n_cand - c0);
    __syncthreads();  // the previous chunk's scores are merged, p_s is free
    for (int e = tid; e < kChunk * D; e += kSelThreads) {
      const int c = e / D, ch = e % D;
      p_s[c * Sm::kPStride + ch] = c < nc ? tile.pooled[(long long)(c0 + c) * D + ch] : 0.0f;
    }
    __syncthreads();
    float acc[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][c] = 0.0f;
#pragma unroll 4
    for (int ch = 0; ch < D; ++ch) {
      float qv[4], pv[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) qv[a] = bits_to_float<T>(q_s[(ty + 16 * a) * Sm::kQStride + ch]);
#pragma unroll
      for (int c = 0; c < 4; ++c) pv[c] = p_s[(tx + 8 * c) * Sm::kPStride + ch];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[a][c] = fmaf(qv[a], pv[c], acc[a][c]);
    }
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int c = 0; c < 4; ++c) s_s[(ty + 16 * a) * Sm::kSStride + tx + 8 * c] = acc[a][c];
    __syncthreads();
    if (tid < kTileRows)
      merge_chunk(s_s + tid * Sm::kSStride, min(nc, tile.my_own - c0), c0, tile.cap, filled,
                  my_key, my_idx);
  }

  finish_tile(p, b, h, x, m0, tile, filled, my_idx, bits_s);
}

// ---- 2b. Selection at query-block granularity ------------------------------------------
// Grid (num_tiles, heads_q, batch), 128 threads: the CTA of a 64-row tile computes its query
// block's list (every tile of a block computes the same one, in the same order): the f32 mean
// of the block's rows (thread per channel, rows in order), then the scores of the candidate
// blocks in chunks of 32 (warp per block, lanes over channels, butterfly sum), merged by
// thread 0 into the top list by merge_chunk (the rule of moba_select_kernel); the diagonal
// blocks are appended and the list sorted. The tile's rows and union get the list.
template <typename T, int D>
__global__ void __launch_bounds__(kSelThreads) moba_select_blocks_kernel(const __grid_constant__ LaMobaParams p) {
  __shared__ float qm[D];
  __shared__ float sc[kChunk];
  __shared__ uint32_t key_s[kMaxTopK];
  __shared__ int idx_s[kMaxTopK];
  __shared__ int n_list;
  const int x = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const SeqInfo s = seq_info(p.dense, b, h);
  const int m0 = x * kTileRows;
  if (m0 >= s.sq) return;
  const HeadTensors<T> head = head_tensors<T>(p.dense, s, b, h);
  const int kvh = h / (p.dense.heads_q / p.dense.heads_kv);
  const int r0 = m0 / p.block_m * p.block_m, r1 = min(r0 + p.block_m, s.sq);
  const int shift = s.sk - s.sq;
  const int p1 = r1 - 1 + shift;
  if (p1 >= 0) {
    const int p0 = max(r0 + shift, 0);
    const int diag0 = p0 / p.block_n, n_diag = p1 / p.block_n - diag0 + 1;
    const int take = min(max(p.select_k - n_diag, 0), diag0);  // candidates: 0..diag0
    int filled = 0;
    if (take > 0) {
      for (int ch = tid; ch < D; ch += kSelThreads) {
        float sum = 0.0f;
        for (int r = r0; r < r1; ++r)
          sum += Elem<T>::to_float(head.q[(long long)r * p.dense.q_row_stride + ch]);
        qm[ch] = sum / (r1 - r0);
      }
      const float *pooled =
          p.pooled + ((long long)b * p.dense.heads_kv + kvh) * p.num_k_blocks * (long long)D;
      for (int c0 = 0; c0 < diag0; c0 += kChunk) {
        const int nc = min(kChunk, diag0 - c0);
        __syncthreads();  // qm written; the previous chunk merged
        for (int c = warp; c < nc; c += kSelThreads / 32) {
          const float *pk = pooled + (long long)(c0 + c) * D;
          float part = 0.0f;
#pragma unroll
          for (int ch = lane; ch < D; ch += 32) part = fmaf(qm[ch], pk[ch], part);
          part = warp_sum(part);
          if (lane == 0) sc[c] = part;
        }
        __syncthreads();
        if (tid == 0) merge_chunk(sc, nc, c0, take, filled, key_s, idx_s);
      }
    }
    if (tid == 0) {
      // The ranked blocks (all below diag0) by index, then the diagonal blocks.
      for (int i = 1; i < filled; ++i) {
        const int v = idx_s[i];
        int j = i;
        while (j > 0 && idx_s[j - 1] > v) {
          idx_s[j] = idx_s[j - 1];
          --j;
        }
        idx_s[j] = v;
      }
      for (int i = 0; i < n_diag; ++i) idx_s[filled + i] = diag0 + i;
      n_list = filled + n_diag;
    }
  } else if (tid == 0) {
    n_list = 0;
  }
  __syncthreads();
  const int n = n_list, rows = min(kTileRows, s.sq - m0);
  int32_t *out = p.row_blocks + (s.lse_base + m0) * (long long)p.top_k;
  for (int e = tid; e < rows * p.top_k; e += kSelThreads) {
    const int j = e % p.top_k;
    out[e] = j < n ? idx_s[j] : -1;
  }
  const long long tile = ((long long)b * p.dense.heads_q + h) * p.num_tiles + x;
  for (int j = tid; j < n; j += kSelThreads) p.union_blocks[tile * p.union_width + j] = idx_s[j];
  if (tid == 0) p.union_count[tile] = n;
}

// ---- 2c. Selection on tensor cores (opt-in) ---------------------------------------------
// moba_select_tc_kernel: moba_select_kernel with the scores on tensor cores (mma.sync m16n8k16, T
// inputs, f32 accumulators); the tile setup, the merge, the row lists and the union are the same
// functions (GateTile::begin, merge_chunk, finish_tile). Each chunk's f32 pooled keys are split
// into two T values, hi = T(p) and lo = T(p - hi), so that hi + lo carries about 16 significant
// bits of p (T's 8 or 11 alone would reorder many near-ties): the scores are q . hi + q . lo (two
// MMAs per tile), within about 2^-16 sum |q p| of the f32 dot product (q is exact in T). Warp w
// scores rows 16w..16w+15 against the chunk's 32 blocks (4 n-tiles of 8), A fragments (Q) and B
// fragments (pooled keys, [block][channel], i.e. column-major B) read as 32-bit pairs from shared
// memory with row strides of D + 8 elements (D / 2 + 4 words: the 8 rows x 4 words of
// a fragment load hit 32 distinct banks).
template <typename T, int D>
struct SelTcSmem {
  static constexpr int kStride = D + 8;  // T elements, Q rows and pooled-key rows
  static constexpr int kSStride = kChunk + 1;
  static constexpr int kTop = kMaxTopK + 1;
  static constexpr size_t kQ = (sizeof(T) * kTileRows * kStride + 15) / 16 * 16;
  static constexpr size_t kP = (sizeof(T) * kChunk * kStride + 15) / 16 * 16;  // hi, then lo
  static constexpr size_t kS = sizeof(float) * kTileRows * kSStride;
  static constexpr size_t kTopBytes = sizeof(uint32_t) * kTileRows * kTop;
  static constexpr size_t kFixed = kQ + 2 * kP + kS + 2 * kTopBytes;
  static size_t bytes(int num_k_blocks) {
    return kFixed + sizeof(uint32_t) * ((num_k_blocks + 31) / 32);
  }
};
static_assert(kTileRows == 16 * (kSelThreads / 32) && kChunk == 32,
              "one 16-row m-tile per warp, four 8-block n-tiles per chunk");

template <typename T, int D>
__global__ void __launch_bounds__(kSelThreads) moba_select_tc_kernel(const __grid_constant__ LaMobaParams p) {
  using Sm = SelTcSmem<T, D>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  uint16_t *q_s = reinterpret_cast<uint16_t *>(smem_raw);  // T's bits
  T *hi_s = reinterpret_cast<T *>(smem_raw + Sm::kQ);
  T *lo_s = reinterpret_cast<T *>(smem_raw + Sm::kQ + Sm::kP);
  float *s_s = reinterpret_cast<float *>(smem_raw + Sm::kQ + 2 * Sm::kP);
  uint32_t *topk_s = reinterpret_cast<uint32_t *>(smem_raw + Sm::kQ + 2 * Sm::kP + Sm::kS);
  int *topi_s =
      reinterpret_cast<int *>(smem_raw + Sm::kQ + 2 * Sm::kP + Sm::kS + Sm::kTopBytes);
  uint32_t *bits_s = reinterpret_cast<uint32_t *>(smem_raw + Sm::kFixed);

  const int x = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const SeqInfo s = seq_info(p.dense, b, h);
  const int m0 = x * kTileRows;
  if (m0 >= s.sq) return;
  const GateTile tile = GateTile::begin<T, D>(p, s, b, h, m0, q_s, Sm::kStride, bits_s);
  int filled = 0;
  uint32_t *my_key = topk_s + tid * Sm::kTop;
  int *my_idx = topi_s + tid * Sm::kTop;
  const int g = lane / 4, t = lane % 4;
  const uint32_t *q_w = reinterpret_cast<const uint32_t *>(q_s);
  const uint32_t *hi_w = reinterpret_cast<const uint32_t *>(hi_s);
  const uint32_t *lo_w = reinterpret_cast<const uint32_t *>(lo_s);
  constexpr int kW = Sm::kStride / 2;  // words per row
  for (int c0 = 0; c0 < tile.n_cand; c0 += kChunk) {
    const int nc = min(kChunk, tile.n_cand - c0);
    __syncthreads();  // the previous chunk's scores are merged, hi_s / lo_s are free
    for (int e = tid; e < kChunk * D; e += kSelThreads) {
      const int c = e / D, ch = e % D;
      const float v = c < nc ? tile.pooled[(long long)(c0 + c) * D + ch] : 0.0f;
      const T hv = Elem<T>::from_float(v);
      hi_s[c * Sm::kStride + ch] = hv;
      lo_s[c * Sm::kStride + ch] = Elem<T>::from_float(v - Elem<T>::to_float(hv));
    }
    __syncthreads();
    float acc[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
    const int ra = 16 * warp + g;  // A rows ra and ra + 8
#pragma unroll 2
    for (int k0 = 0; k0 < D; k0 += 16) {
      const int kw = k0 / 2 + t;  // word of channels k0 + 2t, k0 + 2t + 1
      const uint32_t a[4] = {q_w[ra * kW + kw], q_w[(ra + 8) * kW + kw], q_w[ra * kW + kw + 4],
                             q_w[(ra + 8) * kW + kw + 4]};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = 8 * j + g;  // B column (block of the chunk)
        mma::Mma<T>::run(acc[j], a, hi_w[n * kW + kw], hi_w[n * kW + kw + 4]);
        mma::Mma<T>::run(acc[j], a, lo_w[n * kW + kw], lo_w[n * kW + kw + 4]);
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float *row = s_s + ra * Sm::kSStride + 8 * j + 2 * t;
      row[0] = acc[j][0];
      row[1] = acc[j][1];
      row[8 * Sm::kSStride] = acc[j][2];
      row[8 * Sm::kSStride + 1] = acc[j][3];
    }
    __syncthreads();
    if (tid < kTileRows)
      merge_chunk(s_s + tid * Sm::kSStride, min(nc, tile.my_own - c0), c0, tile.cap, filled,
                  my_key, my_idx);
  }

  finish_tile(p, b, h, x, m0, tile, filled, my_idx, bits_s);
}

// ---- 3. Attention ---------------------------------------------------------------------
// Query rows [m0, m0 + 64) of one (sequence, query head) over the tile's union list, each row
// masked to its own selection (rows_s: the 64 rows' lists, top_k each, -1 past the end).
template <typename T, class Tr>
struct MobaProblem {
  static constexpr int BN = Tr::kBlockN;
  const LaMobaParams &p;
  const T *q, *k, *v;
  T *o;
  const int32_t *indices;  // the tile's union list
  int count;
  int m0, sq, sk;
  long long lse_base;
  int tiles_per_block;  // block_n / BN
  float scale, softcap;
  WarpWindowMask<Tr> window;

  __device__ __forceinline__ void load_q(uint32_t q_smem, int tid) {
    load_rows<Tr, Tr::kBlockM>(q_smem, q, p.dense.q_row_stride, m0, sq, tid);
  }
  __device__ __forceinline__ int schedule() {
    if (count <= 0) return 0;
    // As block_sparse_mma.cu: the last listed block's tiles past the end are not visited.
    const long long start = (long long)indices[count - 1] * p.block_n;
    int drop = 0;
    if (start < sk && start + p.block_n > sk)
      drop = tiles_per_block - (int)((sk - start + BN - 1) / BN);
    return count * tiles_per_block - drop;
  }
  __device__ __forceinline__ int key0(int t) const {
    const int e = t / tiles_per_block, sub = t - e * tiles_per_block;
    const long long n0 = (long long)indices[e] * p.block_n + sub * BN;
    return n0 >= sk ? sk : (int)n0;
  }
  __device__ __forceinline__ void load_kv(uint32_t k_smem, uint32_t v_smem, int t, int tid) {
    const int n0 = key0(t);
    load_rows<Tr, BN>(k_smem, k, p.dense.k_row_stride, n0, sk, tid);
    load_rows<Tr, BN>(v_smem, v, p.dense.v_row_stride, n0, sk, tid);
  }
  __device__ __forceinline__ void prepare_rows(int warp, int g) {
    const LaDenseParams &d = p.dense;
    window.prepare(Mask{d.window_left, d.window_right, d.sinks}, m0 + 16 * warp, g, sq, sk);
  }
  __device__ __forceinline__ void mask_tile(float (&sc)[Tr::kSBlocks][4], int t, int n0, int tq) {
    const int kb = indices[t / tiles_per_block];
    // The rows' lists (moba_attention_kernel) and this thread's rows 16 warp + g (+ 8) are
    // recomputed here rather than kept: the d256 configuration has no register to spare.
    extern __shared__ __align__(128) unsigned char smem_raw[];
    const int32_t *rows_s = reinterpret_cast<const int32_t *>(smem_raw + Tr::kSmemBytes);
    const int row0 = 16 * (int)(threadIdx.x / 32) + (int)(threadIdx.x % 32) / 4;
    bool sel[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // Rows past the end are never stored: they count as selecting every block. Else a
      // scan of the row's increasing list (-1 padded) up to the first entry >= kb.
      const int row = row0 + 8 * r;
      sel[r] = m0 + row >= sq;
      const int32_t *list = rows_s + row * p.top_k;
      for (int i = 0; i < p.top_k && !sel[r]; ++i) {
        const int x = list[i];
        if (x < 0 || x > kb) break;
        sel[r] = x == kb;
      }
    }
    if (!__all_sync(0xffffffffu, sel[0] && sel[1])) {
#pragma unroll
      for (int i = 0; i < Tr::kSBlocks; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (!sel[e >> 1]) sc[i][e] = kNegInf;
    }
    window.apply(sc, n0, tq);
  }
  __device__ __forceinline__ void store_o(int r, int chunk, const uint4 *staged) {
    const int i = m0 + r;
    if (i < sq) *reinterpret_cast<uint4 *>(o + i * p.dense.o_row_stride + chunk * 8) = *staged;
  }
  __device__ __forceinline__ bool has_lse() const { return p.dense.lse != nullptr; }
  __device__ __forceinline__ void store_lse(int r, float lse) {
    const int i = m0 + r;
    if (i < sq) p.dense.lse[lse_base + i] = lse;
  }
};

template <typename T, class Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks)
    moba_attention_kernel(const __grid_constant__ LaMobaParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int b = blockIdx.z, h = blockIdx.y;
  const SeqInfo s = seq_info(p.dense, b, h);
  const int x = gridDim.x - 1 - blockIdx.x;  // long (late) tiles first
  const int m0 = x * Tr::kBlockM;
  if (m0 >= s.sq) return;
  const HeadTensors<T> head = head_tensors<T>(p.dense, s, b, h);
  int32_t *rows_s = reinterpret_cast<int32_t *>(smem_raw + Tr::kSmemBytes);
  const int rows = min(Tr::kBlockM, s.sq - m0);
  const int32_t *sel = p.row_blocks + (s.lse_base + m0) * (long long)p.top_k;
  for (int e = threadIdx.x; e < Tr::kBlockM * p.top_k; e += Tr::kThreads)
    rows_s[e] = e < rows * p.top_k ? sel[e] : -1;
  const long long tile = ((long long)b * p.dense.heads_q + h) * p.num_tiles + x;
  MobaProblem<T, Tr> pb{p,
                        head.q,
                        head.k,
                        head.v,
                        head.o,
                        p.union_blocks + tile * p.union_width,
                        p.union_count[tile],
                        m0,
                        s.sq,
                        s.sk,
                        s.lse_base,
                        p.block_n / Tr::kBlockN,
                        p.dense.scale,
                        p.dense.softcap};
  mma_attention<T, Tr>(pb, smem_raw);
}

// ---- Launchers ------------------------------------------------------------------------
// The pooled keys of every gate (no key: nothing to pool, and an empty grid is an error).
template <typename T, int D>
cudaError_t launch_pool(const LaMobaParams &p, cudaStream_t stream) {
  if (p.num_k_blocks <= 0) return cudaSuccess;
  const LaDenseParams &d = p.dense;
  return launch_sm80(moba_pool_kernel<T, D>, dim3(p.num_k_blocks, d.heads_kv, d.batch),
                     kPoolThreads, 0, stream, p);
}

template <typename T, class Tr>
cudaError_t launch_select(const LaMobaParams &p, cudaStream_t stream) {
  constexpr int D = Tr::kHeadDim;
  const LaDenseParams &d = p.dense;
  const cudaError_t err = launch_pool<T, D>(p, stream);
  if (err != cudaSuccess) return err;
  return launch_sm80(moba_select_kernel<T, D>, dim3(p.num_tiles, d.heads_q, d.batch), kSelThreads,
                     SelSmem<T, D>::bytes(p.num_k_blocks), stream, p);
}

template <typename T, class Tr>
cudaError_t launch_select_tc(const LaMobaParams &p, cudaStream_t stream) {
  constexpr int D = Tr::kHeadDim;
  const LaDenseParams &d = p.dense;
  const cudaError_t err = launch_pool<T, D>(p, stream);
  if (err != cudaSuccess) return err;
  return launch_sm80(moba_select_tc_kernel<T, D>, dim3(p.num_tiles, d.heads_q, d.batch),
                     kSelThreads, SelTcSmem<T, D>::bytes(p.num_k_blocks), stream, p);
}

template <typename T, class Tr>
cudaError_t launch_select_blocks(const LaMobaParams &p, cudaStream_t stream) {
  constexpr int D = Tr::kHeadDim;
  const LaDenseParams &d = p.dense;
  const cudaError_t err = launch_pool<T, D>(p, stream);
  if (err != cudaSuccess) return err;
  return launch_sm80(moba_select_blocks_kernel<T, D>, dim3(p.num_tiles, d.heads_q, d.batch),
                     kSelThreads, 0, stream, p);
}

template <typename T, class Tr>
cudaError_t launch_attention(const LaMobaParams &p, cudaStream_t stream) {
  const dim3 grid(p.num_tiles, p.dense.heads_q, p.dense.batch);
  return launch_sm80(moba_attention_kernel<T, Tr>, grid, Tr::kThreads,
                     Tr::kSmemBytes + sizeof(int32_t) * Tr::kBlockM * p.top_k, stream, p);
}

constexpr int kGridLimit = 65535;  // grid y (heads) and z (batch)

long long blocks_of(int32_t len, int32_t block) { return ((long long)len + block - 1) / block; }

// Every check that needs no device memory (the selections' contents are the kernels').
bool params_ok(const LaMobaParams &p) {
  const LaDenseParams &d = p.dense;
  if (!dense_params_ok(&d) || d.batch > kGridLimit || d.heads_q > kGridLimit) return false;
  if (p.block_n <= 0 || p.block_n % 64 != 0) return false;
  if (p.num_k_blocks != blocks_of(d.seqlen_k, p.block_n) || p.num_k_blocks > LA_MOBA_MAX_K_BLOCKS)
    return false;
  const long long slots = min((long long)p.num_k_blocks, (long long)p.top_k);
  if (p.top_k < 1 || p.top_k > LA_MOBA_MAX_TOP_K || (p.num_k_blocks > 0 && slots != p.top_k))
    return false;
  if (p.num_tiles != blocks_of(d.seqlen_q, kTileRows)) return false;
  if (p.union_width != min((long long)p.num_k_blocks, (long long)kTileRows * p.top_k)) return false;
  const bool work = d.batch > 0 && d.seqlen_q > 0;
  return !work || (p.pooled != nullptr && p.row_blocks != nullptr &&
                   p.union_blocks != nullptr && p.union_count != nullptr);
}

// la_moba_select_blocks: block_m a multiple of 64, select_k >= 1, top_k the longest list.
bool blocks_ok(const LaMobaParams &p) {
  if (p.block_m <= 0 || p.block_m % 64 != 0 || p.select_k < 1 || p.block_n <= 0) return false;
  const long long longest = max((long long)p.select_k, (long long)(p.block_m - 1) / p.block_n + 2);
  return p.num_k_blocks == 0 || p.top_k == min((long long)p.num_k_blocks, longest);
}

template <class F>
int run(const LaMobaParams *params, F &&f, bool blocks = false) {
  static_assert(LA_DENSE_KERNEL_UNSUPPORTED == cudaErrorNotSupported, "documented in dense.h");
  if (params == nullptr || !params_ok(*params) || (blocks && !blocks_ok(*params)))
    return cudaErrorInvalidValue;
  const LaMobaParams &p = *params;
  if (p.dense.batch == 0 || p.dense.seqlen_q == 0) return cudaSuccess;
  cudaError_t err = cudaErrorNotSupported;  // f32, or a head_dim without a configuration
  with_head_dim_config<DenseTraits64, DenseTraits128, DenseTraits256>(
      p.dense, [&](auto t, auto tr) { err = f(t, tr, p); });
  return err;
}

}  // namespace
}  // namespace longattn

extern "C" int la_moba_select(const LaMobaParams *params, cudaStream_t stream) {
  using namespace longattn;
  return run(params, [&](auto t, auto tr, const LaMobaParams &p) {
    return launch_select<typename decltype(t)::type, typename decltype(tr)::type>(p, stream);
  });
}

extern "C" int la_moba_select_tc(const LaMobaParams *params, cudaStream_t stream) {
  using namespace longattn;
  return run(params, [&](auto t, auto tr, const LaMobaParams &p) {
    return launch_select_tc<typename decltype(t)::type, typename decltype(tr)::type>(p, stream);
  });
}

extern "C" int la_moba_select_blocks(const LaMobaParams *params, cudaStream_t stream) {
  using namespace longattn;
  return run(
      params,
      [&](auto t, auto tr, const LaMobaParams &p) {
        return launch_select_blocks<typename decltype(t)::type, typename decltype(tr)::type>(
            p, stream);
      },
      true);
}

extern "C" int la_moba_attention(const LaMobaParams *params, cudaStream_t stream) {
  using namespace longattn;
  return run(params, [&](auto t, auto tr, const LaMobaParams &p) {
    return launch_attention<typename decltype(t)::type, typename decltype(tr)::type>(p, stream);
  });
}
