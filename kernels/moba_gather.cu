// MoBA's gather attention (opt-in, MobaAttention::Gather; docs/design/block_sparse.md "The
// gather formulation"): instead of attending each 64-row query tile to the union of its rows'
// selected blocks (moba.cu), the selection is transposed into, per (sequence, query head, key
// block), the rows that chose the block, and each block is attended by exactly those rows:
// the pairs computed are the pairs the selection shows (plus the rounding to 64-row groups).
// Each (row, selection slot) gets a partial (o, lse); la_ring_gather (ring_merge.cu) merges a
// row's slots. NOT YET RUN ON A GPU (compiled and register-checked only).
//
// 1. moba_gather_count_kernel, grid (num_chunks, heads_q, batch), 256 threads: per chunk of
//    kChunk rows, the number of rows that chose each key block (shared-memory counters,
//    order-free), written densely to counts[b, h, chunk, :]; the padding slots (-1) of its
//    rows get their partials (o = 0, lse = -inf) so that the merge weighs them 0.
// 2. moba_gather_scan_kernel, grid (heads_q, batch), 256 threads: per (b, h), block-major
//    exclusive scans: each (block, chunk) count becomes the index of the run's first entry,
//    and each block's rows are cut into work items of at most 64 rows, block by block.
// 3. moba_gather_scatter_kernel, grid (num_chunks, heads_q, batch), one warp: walks its chunk
//    32 rows at a time; a row's entry for block kb goes to the block's running counter plus
//    the number of lower rows of the step holding kb (a scan of their sorted lists in shared
//    memory), and the highest such row advances the counter. Entries of a block are thus in
//    increasing row order, deterministic.
// 4. moba_gather_attention_kernel, grid (max_work, heads_q, batch): the mma.sync mainloop
//    (mma_mainloop.cuh) with GatherProblem: one work item's rows (Q loaded by index; a short
//    item repeats its last row, whose duplicate is not stored) over one key block's tiles;
//    the options' mask through WarpWindowMask at the rows' own positions, so it bites only
//    in warps holding rows of the block itself (rows increasing: the block's own rows come
//    first, in its first bn / 64 items).
#include "longattn/block_sparse.h"
#include "longattn/common.cuh"
#include "longattn/dense_mask.cuh"
#include "longattn/dense_tensors.cuh"
#include "longattn/dispatch.cuh"
#include "longattn/mma_mainloop.cuh"

namespace longattn {
namespace {

constexpr int kChunk = LA_MOBA_GATHER_CHUNK_ROWS;
constexpr int kItemRows = 64;  // rows per work item: the mainloop's query tile
static_assert(kItemRows == DenseTraits64::kBlockM && kItemRows == DenseTraits128::kBlockM &&
                  kItemRows == DenseTraits256::kBlockM,
              "a work item fills the attention's query tile");
static_assert(kChunk % 32 == 0, "the scatter walks chunks 32 rows at a time");

// Row (in packed (row, head) order) of sequence b's row 0: the partial o planes are
// [batch * seqlen_q or total_q, heads_q, head_dim].
__device__ __forceinline__ long long packed_row0(const LaDenseParams &d, const SeqInfo &s,
                                                 int b) {
  return d.cu_seqlens_q != nullptr ? (long long)s.q_row0 : (long long)b * d.seqlen_q;
}

// ---- 1. Counts -----------------------------------------------------------------------
constexpr int kCountThreads = 256;

template <typename T, int D>
__global__ void __launch_bounds__(kCountThreads)
    moba_gather_count_kernel(const __grid_constant__ LaMobaGatherParams p) {
  extern __shared__ __align__(16) int32_t cnt_s[];  // [num_k_blocks]
  const LaMobaParams &m = p.moba;
  const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int nkb = m.num_k_blocks, tk = m.top_k;
  const SeqInfo s = seq_info(m.dense, b, h);
  for (int kb = tid; kb < nkb; kb += kCountThreads) cnt_s[kb] = 0;
  __syncthreads();
  // Chunks past a short (varlen) sequence's end count nothing but are still written.
  const int i0 = c * kChunk, i1 = min(i0 + kChunk, s.sq);
  const int32_t *sel = m.row_blocks + s.lse_base * tk;
  const long long orow0 = packed_row0(m.dense, s, b);
  for (long long e = (long long)i0 * tk + tid; e < (long long)i1 * tk; e += kCountThreads) {
    const int kb = sel[e];
    if (kb >= 0) {
      atomicAdd(&cnt_s[kb], 1);
      continue;
    }
    // A padding slot: its partial weighs 0 in the merge (and o must be finite there).
    const int i = (int)(e / tk), j = (int)(e - (long long)i * tk);
    p.partial_lse[j * p.rows + s.lse_base + i] = kNegInf;
    uint4 *o = reinterpret_cast<uint4 *>(static_cast<T *>(p.partial_o) +
                                         (j * p.rows + (orow0 + i) * m.dense.heads_q + h) * D);
#pragma unroll
    for (int x = 0; x < D / 8; ++x) o[x] = make_uint4(0u, 0u, 0u, 0u);
  }
  __syncthreads();
  int32_t *out = p.counts + (((long long)b * m.dense.heads_q + h) * p.num_chunks + c) * nkb;
  for (int kb = tid; kb < nkb; kb += kCountThreads) out[kb] = cnt_s[kb];
}

// ---- 2. Scans ------------------------------------------------------------------------
constexpr int kScanThreads = 256;

// Exclusive block-wide scan of one int per thread (kScanThreads); returns the thread's
// prefix and sets `total`. `warp_s` holds kScanThreads / 32 ints.
__device__ __forceinline__ int block_exclusive_scan(int x, int *warp_s, int &total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int incl = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) warp_s[warp] = incl;
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kScanThreads / 32; ++w) {
    const int v = warp_s[w];
    if (w < warp) before += v;
    total += v;
  }
  __syncthreads();  // warp_s is reused by the next scan
  return before + incl - x;
}

__global__ void __launch_bounds__(kScanThreads)
    moba_gather_scan_kernel(const __grid_constant__ LaMobaGatherParams p) {
  __shared__ int warp_s[kScanThreads / 32];
  const LaMobaParams &m = p.moba;
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int nkb = m.num_k_blocks, nc = p.num_chunks;
  const long long bh = (long long)b * m.dense.heads_q + h;
  int32_t *cnt = p.counts + bh * nc * nkb;
  int4 *work = reinterpret_cast<int4 *>(p.work) + bh * p.max_work;
  int carry_e = 0, carry_w = 0;  // entries and work items of the blocks before this batch
  for (int kb0 = 0; kb0 < nkb; kb0 += kScanThreads) {
    const int kb = kb0 + tid;
    int tot = 0;
    if (kb < nkb)
      for (int c = 0; c < nc; ++c) tot += cnt[(long long)c * nkb + kb];
    const int items = (tot + kItemRows - 1) / kItemRows;
    int sum_e, sum_w;
    const int first_e = carry_e + block_exclusive_scan(tot, warp_s, sum_e);
    const int first_w = carry_w + block_exclusive_scan(items, warp_s, sum_w);
    if (kb < nkb) {
      int e = first_e;
      for (int c = 0; c < nc; ++c) {
        int32_t &x = cnt[(long long)c * nkb + kb];
        const int n = x;
        x = e;
        e += n;
      }
      for (int w = 0; w < items; ++w)
        work[first_w + w] = make_int4(kb, first_e + kItemRows * w,
                                      min(kItemRows, tot - kItemRows * w), 0);
    }
    carry_e += sum_e;
    carry_w += sum_w;
  }
  if (tid == 0) p.work_count[bh] = carry_w;
}

// ---- 3. Scatter ----------------------------------------------------------------------
// Whether the increasing, -1 padded list `list` (n entries) holds kb >= 0.
__device__ __forceinline__ bool holds(const int32_t *list, int n, int kb) {
  for (int x = 0; x < n; ++x) {
    const int v = list[x];
    if (v < 0 || v > kb) return false;
    if (v == kb) return true;
  }
  return false;
}

__global__ void __launch_bounds__(32)
    moba_gather_scatter_kernel(const __grid_constant__ LaMobaGatherParams p) {
  extern __shared__ __align__(16) int32_t scatter_s[];
  const LaMobaParams &m = p.moba;
  const int c = blockIdx.x, h = blockIdx.y, b = blockIdx.z, lane = threadIdx.x;
  const int nkb = m.num_k_blocks, tk = m.top_k;
  int32_t *ctr_s = scatter_s;            // [num_k_blocks]: the next entry of each block
  int32_t *list_s = scatter_s + nkb;     // [32, top_k]: the step's rows' lists
  int32_t *adv_s = list_s + 32 * tk;     // [32, top_k]: counter advances
  const SeqInfo s = seq_info(m.dense, b, h);
  const int i0 = c * kChunk;
  if (i0 >= s.sq) return;
  const long long bh = (long long)b * m.dense.heads_q + h;
  const int32_t *cnt = p.counts + (bh * p.num_chunks + c) * nkb;
  for (int kb = lane; kb < nkb; kb += 32) ctr_s[kb] = cnt[kb];
  const int32_t *sel = m.row_blocks + s.lse_base * tk;
  int32_t *ent = p.entries + s.lse_base * tk;
  const int i1 = min(i0 + kChunk, s.sq);
  for (int r0 = i0; r0 < i1; r0 += 32) {
    const int i = r0 + lane;
    for (int j = 0; j < tk; ++j) list_s[lane * tk + j] = i < i1 ? sel[(long long)i * tk + j] : -1;
    __syncwarp();
    for (int j = 0; j < tk; ++j) {
      const int kb = list_s[lane * tk + j];
      int adv = 0;
      if (kb >= 0) {
        int before = 0;
        bool last = true;
        for (int l = 0; l < 32; ++l) {
          if (l == lane || !holds(list_s + l * tk, tk, kb)) continue;
          if (l < lane) ++before;
          else last = false;
        }
        ent[ctr_s[kb] + before] = i * tk + j;
        if (last) adv = before + 1;
      }
      adv_s[lane * tk + j] = adv;
    }
    __syncwarp();  // every counter read before any advance
    for (int j = 0; j < tk; ++j) {
      const int a = adv_s[lane * tk + j];
      if (a > 0) ctr_s[list_s[lane * tk + j]] += a;  // one lane per block
    }
    __syncwarp();  // counters advanced, lists free for the next step
  }
}

// ---- 4. Attention --------------------------------------------------------------------
// One work item: up to 64 gathered rows (rows_s / slots_s: sequence row and selection slot,
// the last repeated past `n`) of one (sequence, query head) over key block kb's tiles.
template <typename T, class Tr>
struct GatherProblem {
  static constexpr int BN = Tr::kBlockN;
  const LaMobaGatherParams &p;
  const T *q, *k, *v;
  const int32_t *rows_s, *slots_s;
  int kb, n, h, sq, sk;
  long long lse_base, orow0;
  float scale, softcap;
  WarpWindowMask<Tr> window;

  __device__ __forceinline__ void load_q(uint32_t q_smem, int tid) {
    const int chunk = tid % Tr::kChunksPerRow, r0 = tid / Tr::kChunksPerRow;
#pragma unroll
    for (int pass = 0; pass < Tr::kBlockM / Tr::kRowsPerPass; ++pass) {
      const int r = r0 + pass * Tr::kRowsPerPass;
      const T *src = q + (long long)rows_s[r] * p.moba.dense.q_row_stride + chunk * 8;
      mma::cp_async_16(q_smem + swizzled_elem<Tr::kHeadDim>(r, chunk) * (int)sizeof(T), src,
                       true);
    }
  }
  __device__ __forceinline__ int schedule() const {
    const long long start = (long long)kb * p.moba.block_n;
    const int len = (int)min((long long)p.moba.block_n, sk - start);
    return (len + BN - 1) / BN;
  }
  __device__ __forceinline__ int key0(int t) const { return kb * p.moba.block_n + t * BN; }
  __device__ __forceinline__ void load_kv(uint32_t k_smem, uint32_t v_smem, int t, int tid) {
    const int n0 = key0(t);
    const LaDenseParams &d = p.moba.dense;
    load_rows<Tr, BN>(k_smem, k, d.k_row_stride, n0, sk, tid);
    load_rows<Tr, BN>(v_smem, v, d.v_row_stride, n0, sk, tid);
  }
  __device__ __forceinline__ void prepare_rows(int warp, int g) {
    const LaDenseParams &d = p.moba.dense;
    const int pos[2] = {rows_s[16 * warp + g], rows_s[16 * warp + g + 8]};
    int first = pos[0], last = pos[0];
    for (int r = 0; r < 16; ++r) {
      const int x = rows_s[16 * warp + r];
      first = min(first, x);
      last = max(last, x);
    }
    window.prepare_positions(Mask{d.window_left, d.window_right, d.sinks}, pos, first, last, sq,
                             sk);
  }
  __device__ __forceinline__ void mask_tile(float (&sc)[Tr::kSBlocks][4], int, int n0, int tq) {
    window.apply(sc, n0, tq);
  }
  __device__ __forceinline__ void store_o(int r, int chunk, const uint4 *staged) {
    if (r >= n) return;
    const long long row = slots_s[r] * p.rows + (orow0 + rows_s[r]) * p.moba.dense.heads_q + h;
    *reinterpret_cast<uint4 *>(static_cast<T *>(p.partial_o) + row * Tr::kHeadDim + chunk * 8) =
        *staged;
  }
  __device__ __forceinline__ bool has_lse() const { return true; }
  __device__ __forceinline__ void store_lse(int r, float lse) {
    if (r < n) p.partial_lse[slots_s[r] * p.rows + lse_base + rows_s[r]] = lse;
  }
};

template <typename T, class Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks)
    moba_gather_attention_kernel(const __grid_constant__ LaMobaGatherParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const LaMobaParams &m = p.moba;
  const int w = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const long long bh = (long long)b * m.dense.heads_q + h;
  if (w >= p.work_count[bh]) return;
  const int4 item = reinterpret_cast<const int4 *>(p.work)[bh * p.max_work + w];
  const SeqInfo s = seq_info(m.dense, b, h);
  const HeadTensors<T> head = head_tensors<T>(m.dense, s, b, h);
  int32_t *rows_s = reinterpret_cast<int32_t *>(smem_raw + Tr::kSmemBytes);
  int32_t *slots_s = rows_s + Tr::kBlockM;
  const int32_t *ent = p.entries + s.lse_base * m.top_k + item.y;
  for (int r = threadIdx.x; r < Tr::kBlockM; r += Tr::kThreads) {
    const int e = ent[min(r, item.z - 1)];
    const int i = e / m.top_k;
    rows_s[r] = i;
    slots_s[r] = e - i * m.top_k;
  }
  __syncthreads();
  GatherProblem<T, Tr> pb{p,
                          head.q,
                          head.k,
                          head.v,
                          rows_s,
                          slots_s,
                          item.x,
                          item.z,
                          h,
                          s.sq,
                          s.sk,
                          s.lse_base,
                          packed_row0(m.dense, s, b),
                          m.dense.scale,
                          m.dense.softcap};
  mma_attention<T, Tr>(pb, smem_raw);
}

// ---- Launchers -----------------------------------------------------------------------
template <typename T, class Tr>
cudaError_t launch_index(const LaMobaGatherParams &p, cudaStream_t stream) {
  const LaDenseParams &d = p.moba.dense;
  const size_t nkb = (size_t)p.moba.num_k_blocks;
  const dim3 chunks(p.num_chunks, d.heads_q, d.batch);
  cudaError_t err = launch_sm80(moba_gather_count_kernel<T, Tr::kHeadDim>, chunks, kCountThreads,
                                sizeof(int32_t) * nkb, stream, p);
  if (err != cudaSuccess) return err;
  err = launch_sm80(moba_gather_scan_kernel, dim3(d.heads_q, d.batch), kScanThreads, 0, stream, p);
  if (err != cudaSuccess) return err;
  return launch_sm80(moba_gather_scatter_kernel, chunks, 32,
                     sizeof(int32_t) * (nkb + 2 * 32 * (size_t)p.moba.top_k), stream, p);
}

template <typename T, class Tr>
cudaError_t launch_attention(const LaMobaGatherParams &p, cudaStream_t stream) {
  const dim3 grid(p.max_work, p.moba.dense.heads_q, p.moba.dense.batch);
  return launch_sm80(moba_gather_attention_kernel<T, Tr>, grid, Tr::kThreads,
                     Tr::kSmemBytes + 2 * sizeof(int32_t) * Tr::kBlockM, stream, p);
}

constexpr int kGridLimit = 65535;  // grid y (heads) and z (batch)

long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }

// Every check that needs no device memory (the selections' contents are the kernels').
bool params_ok(const LaMobaGatherParams &g) {
  const LaMobaParams &p = g.moba;
  const LaDenseParams &d = p.dense;
  if (!dense_params_ok(&d) || d.batch > kGridLimit || d.heads_q > kGridLimit) return false;
  if (p.block_n <= 0 || p.block_n % 64 != 0) return false;
  if (p.num_k_blocks != ceil_div(d.seqlen_k, p.block_n) ||
      p.num_k_blocks > LA_MOBA_GATHER_MAX_K_BLOCKS)
    return false;
  const long long slots = min((long long)p.num_k_blocks, (long long)p.top_k);
  if (p.top_k < 1 || p.top_k > LA_MOBA_MAX_TOP_K || (p.num_k_blocks > 0 && slots != p.top_k))
    return false;
  const long long pairs = (long long)d.seqlen_q * p.top_k;  // entry values i * top_k + j
  if (pairs > 0x7fffffffLL || g.num_chunks != ceil_div(d.seqlen_q, kChunk) ||
      g.max_work != ceil_div(pairs, kItemRows) + p.num_k_blocks)
    return false;
  const long long rows =
      (long long)d.heads_q * (d.cu_seqlens_q != nullptr ? d.total_q : (long long)d.batch * d.seqlen_q);
  if (g.rows != rows) return false;
  const bool work = d.batch > 0 && d.seqlen_q > 0;
  return !work || (p.row_blocks != nullptr && g.counts != nullptr && g.entries != nullptr &&
                   g.work != nullptr && g.work_count != nullptr && g.partial_o != nullptr &&
                   g.partial_lse != nullptr);
}

template <class F>
int run(const LaMobaGatherParams *params, F &&f) {
  static_assert(LA_DENSE_KERNEL_UNSUPPORTED == cudaErrorNotSupported, "documented in dense.h");
  if (params == nullptr || !params_ok(*params)) return cudaErrorInvalidValue;
  const LaMobaGatherParams &p = *params;
  if (p.moba.dense.batch == 0 || p.moba.dense.seqlen_q == 0) return cudaSuccess;
  cudaError_t err = cudaErrorNotSupported;  // f32, or a head_dim without a configuration
  with_head_dim_config<DenseTraits64, DenseTraits128, DenseTraits256>(
      p.moba.dense, [&](auto t, auto tr) { err = f(t, tr, p); });
  return err;
}

}  // namespace
}  // namespace longattn

extern "C" int la_moba_gather_index(const LaMobaGatherParams *params, cudaStream_t stream) {
  using namespace longattn;
  return run(params, [&](auto t, auto tr, const LaMobaGatherParams &p) {
    return launch_index<typename decltype(t)::type, typename decltype(tr)::type>(p, stream);
  });
}

extern "C" int la_moba_gather_attention(const LaMobaGatherParams *params, cudaStream_t stream) {
  using namespace longattn;
  return run(params, [&](auto t, auto tr, const LaMobaGatherParams &p) {
    return launch_attention<typename decltype(t)::type, typename decltype(tr)::type>(p, stream);
  });
}
