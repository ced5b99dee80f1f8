//! MoBA's GPU index arithmetic (`kernels/moba.cu`, `kernels/moba_gather.cu`, not yet run on a
//! GPU), replayed on the CPU against the reference semantics (`src/block_sparse/moba.rs`):
//! - the per-token gate (`moba_select_kernel` and `moba_select_tc_kernel`, which share
//!   `GateTile::begin`, `merge_chunk` and `finish_tile`): per 64-row tile, the candidate count
//!   from the tile's last row, chunks of 32 pooled blocks, each row merging only the blocks
//!   before its own (`min(nc, my_own - c0)`) into a streaming top list with the tie rule, its
//!   own block appended, the union through the shared bitset;
//! - the query-block gate (`moba_select_blocks_kernel`): diagonal blocks, `take`, the merge;
//! - the gather transpose (`moba_gather_count_kernel`, `moba_gather_scan_kernel`,
//!   `moba_gather_scatter_kernel`): per-chunk counts, block-major scans in batches of 256
//!   blocks, work items, the warp's 32-row scatter steps;
//! - the partial layout: where the gather attention and the count kernel store each (row,
//!   slot)'s `(o, lse)` and where `la_ring_gather` reads it with the plan's slot table;
//! - both attentions' visits (`MobaProblem` over the tile unions, `GatherProblem` over the
//!   work items: key tiles of 64 or 32 keys, the last block's dropped tiles, the per-row
//!   list scan, `WarpWindowMask`) under random element masks: every pair the selection and
//!   the mask show computed unmasked exactly once, no other pair;
//! - the tensor-core gate's fragment words through the PTX m16n8k16 layout into the score
//!   tile.
//!
//! The scores are the CPU's own f64 scores (the GPU's are f32: near-ties may flip there, which
//! the GPU tests accept; here the control flow and the indices are under test), so the model
//! must reproduce `moba_select_cpu`, `moba_tile_unions`, `moba_select_blocks_cpu` and
//! `moba_gather_index_cpu` exactly, on shapes with many ties (small integer inputs), NaN keys,
//! varlen batches, `seqlen_q != seqlen_k` both ways, partial last blocks and no keys at all.
//! Each model also asserts the bounds the kernels rely on (shared-memory arrays, the pooled
//! blocks the pool kernel wrote, buffer extents from `MobaGpuDims` / `MobaGatherDims`).

mod common;

use common::{cu_seqlens, rng};
use longattn::block_sparse::RowBlocks;
use longattn::block_sparse::moba::{
    GPU_GATHER_CHUNK_ROWS, GPU_GATHER_ITEM_ROWS, GPU_MAX_TOP_K, GPU_TILE_ROWS, MobaConfig,
    MobaGatherDims, MobaGpuDims, moba_gather_index_cpu, moba_pooled_keys_cpu,
    moba_select_blocks_cpu, moba_select_cpu, moba_tile_unions,
};
use longattn::*;
use rand::Rng;
use rand::rngs::SmallRng;

/// `kChunk` of moba.cu: pooled key blocks per pass of the gate.
const GATE_CHUNK: usize = 32;
/// `kScanThreads` of moba_gather.cu: key blocks per pass of the scan.
const SCAN_THREADS: usize = 256;

/// A problem with its inputs (f32 elements: the kernels' f16/bf16 only change the scores).
struct Problem {
    attn: FlashAttention,
    cfg: MobaConfig,
    q: Vec<f32>,
    k: Vec<f32>,
    qs: Strides,
    ks: Strides,
}

impl Problem {
    fn q(&self) -> Strided<&[f32]> {
        Strided::new(&self.q[..], self.qs)
    }
    fn k(&self) -> Strided<&[f32]> {
        Strided::new(&self.k[..], self.ks)
    }
    /// Element offset of row `i` of sequence `b`, head `h` in `q`.
    fn q_at(&self, b: usize, i: usize, h: usize) -> usize {
        let s = self.attn.span(b).unwrap();
        (b as i64 * self.qs.batch + (s.q_start + i) as i64 * self.qs.seq + h as i64 * self.qs.head)
            as usize
    }
    /// LSE row of (sequence `b`, head `h`, row 0) (`SeqInfo::lse_base`).
    fn lse_base(&self, b: usize, h: usize) -> usize {
        let a = &self.attn;
        if a.is_varlen() {
            h * a.total_q() + a.span(b).unwrap().q_start
        } else {
            (b * a.heads_q() + h) * a.max_seqlen_q()
        }
    }
}

/// A random problem: 1..=3 sequences (fixed or varlen, some empty of keys or queries),
/// `seqlen_q` up to `max_q`, `seqlen_k` up to `max_k`, GQA, `block_n` a multiple of 64,
/// `top_k` up to 12 (or 32). Inputs are small integers (ties everywhere) or uniform values;
/// now and then a NaN key.
fn problem(r: &mut SmallRng, max_q: usize, max_k: usize) -> Problem {
    problem_with(r, max_q, max_k, AttentionOptions::causal())
}

/// [`problem`] under the element mask of `opts`.
fn problem_with(r: &mut SmallRng, max_q: usize, max_k: usize, opts: AttentionOptions) -> Problem {
    let batch = r.random_range(1..=3usize);
    let varlen = r.random_bool(0.5);
    let (hq, hkv) = [(1, 1), (2, 1), (4, 2), (3, 3)][r.random_range(0..4)];
    let d = 64;
    let mut len = |max: usize| -> usize {
        match r.random_range(0..8) {
            0 => 0,
            1 => 1,
            2 => max,
            _ => r.random_range(1..=max),
        }
    };
    let lens: Vec<(usize, usize)> = if varlen {
        (0..batch)
            .map(|_| (len(max_q).max(1), len(max_k)))
            .collect()
    } else {
        vec![(len(max_q).max(1), len(max_k)); batch]
    };
    let block_n = 64 * r.random_range(1..=4usize);
    let top_k = if r.random_bool(0.1) {
        GPU_MAX_TOP_K
    } else {
        r.random_range(1..=12)
    };
    let (cq, ck): (Vec<i32>, Vec<i32>) = (
        cu_seqlens(&lens.iter().map(|l| l.0).collect::<Vec<_>>()),
        cu_seqlens(&lens.iter().map(|l| l.1).collect::<Vec<_>>()),
    );
    let seqlens = if varlen {
        SeqLens::Varlen {
            cu_seqlens_q: &cq,
            cu_seqlens_k: &ck,
        }
    } else {
        SeqLens::Fixed {
            seqlen_q: lens[0].0,
            seqlen_k: lens[0].1,
        }
    };
    let attn = FlashAttention::new(
        &AttentionShape {
            seqlens,
            batch,
            head_dim: d,
            heads_q: hq,
            heads_kv: hkv,
        },
        &opts,
    )
    .unwrap();
    let (rows_q, rows_k) = if varlen {
        (*cq.last().unwrap() as usize, *ck.last().unwrap() as usize)
    } else {
        (batch * lens[0].0, batch * lens[0].1)
    };
    let (sq, sk) = if varlen { (0, 0) } else { lens[0] };
    let integer = r.random_bool(0.6);
    let value = |r: &mut SmallRng| -> f32 {
        if integer {
            r.random_range(-1i32..=1) as f32
        } else {
            r.random_range(-1.0f32..1.0)
        }
    };
    let q = (0..rows_q * hq * d).map(|_| value(r)).collect();
    let mut k: Vec<f32> = (0..rows_k * hkv * d).map(|_| value(r)).collect();
    if !k.is_empty() && r.random_bool(0.2) {
        let at = r.random_range(0..k.len());
        k[at] = f32::NAN;
    }
    Problem {
        attn,
        cfg: MobaConfig { block_n, top_k },
        q,
        k,
        qs: Strides::contiguous(sq, hq, d),
        ks: Strides::contiguous(sk, hkv, d),
    }
}

/// `rank_key` of moba.cu on the reference's f64 scores: order-preserving, NaN as -inf.
fn rank_key(s: f64) -> u64 {
    let u = if s.is_nan() { f64::NEG_INFINITY } else { s }.to_bits();
    if u >> 63 == 1 { !u } else { u | (1 << 63) }
}

/// `merge_chunk` of moba.cu: `scores[..n]` (blocks `c0..c0 + n`; none when `n <= 0`) into the
/// top list `key` / `idx` of `filled` of `cap` ranked entries.
fn merge_chunk(
    scores: &[f64],
    n: i64,
    c0: usize,
    cap: usize,
    filled: &mut usize,
    key: &mut [u64],
    idx: &mut [i32],
) {
    for (c, &s) in scores.iter().enumerate().take(n.max(0) as usize) {
        let k = rank_key(s);
        let mut pos = if *filled < cap {
            *filled += 1;
            *filled - 1
        } else if k > key[cap - 1] {
            cap - 1
        } else {
            continue;
        };
        while pos > 0 && key[pos - 1] < k {
            key[pos] = key[pos - 1];
            idx[pos] = idx[pos - 1];
            pos -= 1;
        }
        key[pos] = k;
        idx[pos] = (c0 + c) as i32;
    }
}

/// The gate's score: `moba.rs`'s `dot` (channel order, f64) of a query row with block `kb`'s
/// pooled key of `pooled` (`[batch, heads_kv, num_k_blocks, d]`).
fn score(x: &Problem, pooled: &[f64], qrow: &[f64], b: usize, h: usize, kb: usize) -> f64 {
    let a = &x.attn;
    let (d, nk) = (a.head_dim(), a.max_seqlen_k().div_ceil(x.cfg.block_n));
    let kvh = h / (a.heads_q() / a.heads_kv());
    let pk = &pooled[((b * a.heads_kv() + kvh) * nk + kb) * d..][..d];
    qrow.iter().zip(pk).map(|(q, p)| q * p).sum()
}

/// The per-token gate of moba.cu, tile by tile: `[rows, slots]` selections and the per-tile
/// unions (`[batch, heads_q, num_tiles]`, empty past a sequence's end).
fn gate_model(x: &Problem, dims: &MobaGpuDims) -> (Vec<i32>, Vec<Vec<i32>>) {
    let a = &x.attn;
    let (bn, top_k, d) = (x.cfg.block_n, dims.slots, a.head_dim());
    let pooled = moba_pooled_keys_cpu(a, &x.cfg, x.q(), x.k()).unwrap();
    let mut out = vec![i32::MIN; a.lse_len() * top_k];
    let mut unions = Vec::new();
    let smem_words = dims.num_k_blocks.div_ceil(32);
    for (b, span) in a.spans().enumerate() {
        let (sq, sk) = (span.seqlen_q as i64, span.seqlen_k as i64);
        let written = span.seqlen_k.div_ceil(bn); // blocks the pool kernel wrote
        for h in 0..a.heads_q() {
            for x_t in 0..dims.num_tiles {
                let m0 = (x_t * GPU_TILE_ROWS) as i64;
                if m0 >= sq {
                    unions.push(Vec::new());
                    continue;
                }
                // GateTile::begin.
                let rows = (GPU_TILE_ROWS as i64).min(sq - m0);
                let shift = sk - sq;
                let p_last = m0 + rows - 1 + shift;
                let own_last = if p_last >= 0 { p_last / bn as i64 } else { -1 };
                let cap = top_k - 1;
                let n_cand = if cap > 0 { own_last.max(0) as usize } else { 0 };
                let words = if own_last >= 0 {
                    own_last as usize / 32 + 1
                } else {
                    0
                };
                assert!(words <= smem_words, "bitset past SelSmem::bytes");
                let mut bits = vec![0u32; words];
                let my_own: Vec<i64> = (0..GPU_TILE_ROWS as i64)
                    .map(|t| {
                        let p = m0 + t + shift;
                        if t < rows && p >= 0 {
                            p / bn as i64
                        } else {
                            -1
                        }
                    })
                    .collect();
                let qrows: Vec<Vec<f64>> = (0..GPU_TILE_ROWS as i64)
                    .map(|t| {
                        if t < rows {
                            let o = x.q_at(b, (m0 + t) as usize, h);
                            x.q[o..o + d].iter().map(|&v| v as f64).collect()
                        } else {
                            vec![0.0; d]
                        }
                    })
                    .collect();
                let mut filled = [0usize; GPU_TILE_ROWS];
                let mut key = vec![[0u64; GPU_MAX_TOP_K + 1]; GPU_TILE_ROWS];
                let mut idx = vec![[0i32; GPU_MAX_TOP_K + 1]; GPU_TILE_ROWS];
                for c0 in (0..n_cand).step_by(GATE_CHUNK) {
                    let nc = GATE_CHUNK.min(n_cand - c0);
                    assert!(
                        c0 + nc <= written,
                        "a candidate block the pool kernel skipped"
                    );
                    for t in 0..GPU_TILE_ROWS {
                        let s: Vec<f64> = (0..nc)
                            .map(|c| score(x, &pooled, &qrows[t], b, h, c0 + c))
                            .collect();
                        let n = (nc as i64).min(my_own[t] - c0 as i64);
                        let (k, i) = (&mut key[t], &mut idx[t]);
                        merge_chunk(&s, n, c0, cap, &mut filled[t], k, i);
                    }
                }
                // finish_tile: write_row, then write_union.
                for t in 0..rows as usize {
                    let row = x.lse_base(b, h) + m0 as usize + t;
                    let slots = &mut out[row * top_k..(row + 1) * top_k];
                    let mut n = 0;
                    if my_own[t] >= 0 {
                        let f = filled[t];
                        assert!(
                            f <= cap && f < GPU_MAX_TOP_K + 1,
                            "idx[filled] out of its row"
                        );
                        idx[t][f] = my_own[t] as i32;
                        n = f + 1;
                        idx[t][..n].sort_unstable();
                        for (s, &kb) in slots.iter_mut().zip(&idx[t][..n]) {
                            *s = kb;
                            let w = kb as usize / 32;
                            assert!(w < words, "block {kb} past the cleared bitset");
                            bits[w] |= 1 << (kb % 32);
                        }
                    }
                    slots[n..].iter_mut().for_each(|s| *s = -1);
                }
                // write_union: the words in order, each word's bits from the lowest.
                let mut list = Vec::new();
                for (w, &word) in bits.iter().enumerate() {
                    list.extend(
                        (0..32)
                            .filter(|j| word >> j & 1 == 1)
                            .map(|j| (32 * w + j) as i32),
                    );
                }
                assert!(list.len() <= dims.union_width, "union past union_width");
                unions.push(list);
            }
        }
    }
    assert!(
        out.iter().all(|&v| v != i32::MIN),
        "a row the gate never wrote"
    );
    (out, unions)
}

/// The per-token gate's model equals the reference selection and its tile unions, on
/// random shapes with ties, NaN keys, varlen batches and `seqlen_q != seqlen_k`.
#[test]
fn gate_model_matches_the_cpu_selection() {
    let mut r = rng(0x30ba);
    let mut tiles = 0;
    for case in 0..60 {
        let x = problem(&mut r, 300, 2500);
        let dims = MobaGpuDims::new(&x.attn, &x.cfg).unwrap();
        let (rows, unions) = gate_model(&x, &dims);
        let want = moba_select_cpu(&x.attn, &x.cfg, x.q(), x.k()).unwrap();
        assert_eq!(want.top_k(), dims.slots, "case {case}");
        assert_eq!(rows, want.blocks(), "case {case}: rows");
        let want_unions = moba_tile_unions(&x.attn, &want, GPU_TILE_ROWS).unwrap();
        assert_eq!(unions, want_unions, "case {case}: unions");
        tiles += unions.len();
    }
    assert!(tiles > 100);
}

/// The query-block gate of moba.cu (`moba_select_blocks_kernel`) for tile `m0` of (b, h):
/// its list (every row of the tile gets it, and it is the tile's union).
fn blocks_model(
    x: &Problem,
    pooled: &[f64],
    (block_m, select_k, slots): (usize, usize, usize),
    (b, h, m0): (usize, usize, usize),
) -> Vec<i32> {
    let a = &x.attn;
    let span = a.span(b).unwrap();
    let (sq, sk, bn, d) = (
        span.seqlen_q as i64,
        span.seqlen_k as i64,
        x.cfg.block_n as i64,
        a.head_dim(),
    );
    let r0 = (m0 / block_m * block_m) as i64;
    let r1 = (r0 + block_m as i64).min(sq);
    let shift = sk - sq;
    let p1 = r1 - 1 + shift;
    if p1 < 0 {
        return Vec::new();
    }
    let p0 = (r0 + shift).max(0);
    let diag0 = p0 / bn;
    let n_diag = p1 / bn - diag0 + 1;
    let take = (select_k as i64 - n_diag).max(0).min(diag0) as usize;
    assert!(take <= GPU_MAX_TOP_K, "key_s / idx_s hold kMaxTopK");
    let mut filled = 0;
    let mut key = [0u64; GPU_MAX_TOP_K];
    let mut idx = [0i32; GPU_MAX_TOP_K];
    if take > 0 {
        // The f32 mean of the block's rows, here in f64 as the reference (rows in order).
        let mut qm = vec![0.0f64; d];
        for i in r0..r1 {
            let o = x.q_at(b, i as usize, h);
            for (m, &v) in qm.iter_mut().zip(&x.q[o..o + d]) {
                *m += v as f64;
            }
        }
        qm.iter_mut().for_each(|m| *m /= (r1 - r0) as f64);
        for c0 in (0..diag0 as usize).step_by(GATE_CHUNK) {
            let nc = GATE_CHUNK.min(diag0 as usize - c0);
            let s: Vec<f64> = (0..nc)
                .map(|c| score(x, pooled, &qm, b, h, c0 + c))
                .collect();
            merge_chunk(&s, nc as i64, c0, take, &mut filled, &mut key, &mut idx);
        }
    }
    let mut list = idx[..filled].to_vec();
    list.sort_unstable();
    list.extend((0..n_diag).map(|i| (diag0 + i) as i32));
    assert!(list.len() <= slots, "list longer than top_k");
    list
}

/// The query-block gate's model equals `moba_select_blocks_cpu`'s lists (causal: no listed
/// block is hidden entirely, so the reference drops none), for every 64-row tile of every
/// query block of 64 to 256 rows.
#[test]
fn blocks_gate_model_matches_the_cpu_lists() {
    let mut r = rng(0xb10c);
    for case in 0..40 {
        let x = problem(&mut r, 400, 2000);
        let block_m = 64 * r.random_range(1..=4usize);
        let dims = MobaGpuDims::for_query_blocks(&x.attn, &x.cfg, block_m).unwrap();
        let want = moba_select_blocks_cpu(&x.attn, &x.cfg, block_m, x.q(), x.k()).unwrap();
        let pooled = moba_pooled_keys_cpu(&x.attn, &x.cfg, x.q(), x.k()).unwrap();
        let a = &x.attn;
        for (b, span) in a.spans().enumerate() {
            for h in 0..a.heads_q() {
                for m0 in (0..span.seqlen_q).step_by(GPU_TILE_ROWS) {
                    let got =
                        blocks_model(&x, &pooled, (block_m, x.cfg.top_k, dims.slots), (b, h, m0));
                    let w = want.list(b, h, m0 / block_m).unwrap();
                    assert_eq!(got, w.indices, "case {case}: ({b}, {h}) rows {m0}..");
                }
            }
        }
    }
}

/// What the transpose wrote, per (sequence, head): entries and work items (as
/// `MobaGatherIndex`), from the kernels' three passes over `rows` (`[lse rows, slots]`).
fn transpose_model(
    x: &Problem,
    dims: &MobaGpuDims,
    g: &MobaGatherDims,
    rows: &[i32],
) -> (Vec<Vec<i32>>, Vec<Vec<[i32; 4]>>) {
    let a = &x.attn;
    let (nkb, tk, nc) = (dims.num_k_blocks, dims.slots, g.num_chunks);
    let chunk = GPU_GATHER_CHUNK_ROWS;
    let sentinel = -7;
    // Scratch as a previous call left it: the kernels must overwrite what they read.
    let mut counts = vec![12345i32; a.batch() * a.heads_q() * nc * nkb];
    let mut entries = vec![sentinel; g.rows * tk];
    let mut work = vec![[99i32; 4]; a.batch() * a.heads_q() * g.max_work];
    let mut work_count = vec![-1i32; a.batch() * a.heads_q()];
    // 1. moba_gather_count_kernel: every (b, h, chunk) of the grid writes its counts.
    for (b, span) in a.spans().enumerate() {
        for h in 0..a.heads_q() {
            let base = x.lse_base(b, h);
            for c in 0..nc {
                let mut cnt = vec![0i32; nkb];
                let (i0, i1) = (c * chunk, (c * chunk + chunk).min(span.seqlen_q));
                for e in i0 * tk..i1.max(i0) * tk {
                    let kb = rows[base * tk + e];
                    if kb >= 0 {
                        cnt[kb as usize] += 1; // cnt_s holds num_k_blocks counters
                    }
                }
                let at = ((b * a.heads_q() + h) * nc + c) * nkb;
                counts[at..at + nkb].copy_from_slice(&cnt);
            }
        }
    }
    // 2. moba_gather_scan_kernel: per (b, h), batches of 256 blocks.
    for bh in 0..a.batch() * a.heads_q() {
        let cnt = &mut counts[bh * nc * nkb..(bh + 1) * nc * nkb];
        let (mut carry_e, mut carry_w) = (0i32, 0i32);
        for kb0 in (0..nkb).step_by(SCAN_THREADS) {
            let tot: Vec<i32> = (0..SCAN_THREADS)
                .map(|t| {
                    let kb = kb0 + t;
                    if kb < nkb {
                        (0..nc).map(|c| cnt[c * nkb + kb]).sum()
                    } else {
                        0
                    }
                })
                .collect();
            let items: Vec<i32> = tot
                .iter()
                .map(|&t| (t + GPU_GATHER_ITEM_ROWS as i32 - 1) / GPU_GATHER_ITEM_ROWS as i32)
                .collect();
            let (mut first_e, mut first_w) = (carry_e, carry_w);
            for t in 0..SCAN_THREADS {
                let kb = kb0 + t;
                if kb < nkb {
                    let mut e = first_e;
                    for c in 0..nc {
                        let n = cnt[c * nkb + kb];
                        cnt[c * nkb + kb] = e;
                        e += n;
                    }
                    for w in 0..items[t] {
                        let at = (first_w + w) as usize;
                        assert!(at < g.max_work, "work item past max_work");
                        let n = (GPU_GATHER_ITEM_ROWS as i32).min(tot[t] - 64 * w);
                        work[bh * g.max_work + at] = [kb as i32, first_e + 64 * w, n, 0];
                    }
                }
                first_e += tot[t];
                first_w += items[t];
            }
            carry_e = first_e;
            carry_w = first_w;
        }
        work_count[bh] = carry_w;
    }
    // 3. moba_gather_scatter_kernel: one warp per (b, h, chunk) inside the sequence.
    for (b, span) in a.spans().enumerate() {
        for h in 0..a.heads_q() {
            let base = x.lse_base(b, h);
            let bh = b * a.heads_q() + h;
            let limit = span.seqlen_q * tk; // (b, h)'s entries
            for c in 0..nc {
                let i0 = c * chunk;
                if i0 >= span.seqlen_q {
                    continue;
                }
                let mut ctr = counts[(bh * nc + c) * nkb..][..nkb].to_vec();
                let i1 = (i0 + chunk).min(span.seqlen_q);
                for r0 in (i0..i1).step_by(32) {
                    let list: Vec<&[i32]> = (0..32)
                        .map(|l| {
                            let i = r0 + l;
                            if i < i1 {
                                &rows[(base + i) * tk..(base + i + 1) * tk]
                            } else {
                                &[][..]
                            }
                        })
                        .collect();
                    let holds = |l: usize, kb: i32| list[l].contains(&kb);
                    let mut adv = Vec::new(); // counters advance after every lane's read
                    for (lane, l_list) in list.iter().enumerate() {
                        for (j, &kb) in l_list.iter().enumerate() {
                            if kb < 0 {
                                continue;
                            }
                            let before = (0..lane).filter(|&l| holds(l, kb)).count() as i32;
                            let last = !(lane + 1..32).any(|l| holds(l, kb));
                            let at = ctr[kb as usize] + before;
                            assert!(at >= 0 && (at as usize) < limit, "entry past (b, h)'s");
                            let e = &mut entries[base * tk + at as usize];
                            assert_eq!(*e, sentinel, "entry written twice");
                            *e = ((r0 + lane) * tk + j) as i32;
                            if last {
                                adv.push((kb as usize, before + 1));
                            }
                        }
                    }
                    for (kb, n) in adv {
                        ctr[kb] += n;
                    }
                }
            }
        }
    }
    // Read back as MobaGpuPlan::gather_index does.
    let mut ent = Vec::new();
    let mut items = Vec::new();
    for (b, _) in a.spans().enumerate() {
        for h in 0..a.heads_q() {
            let bh = b * a.heads_q() + h;
            let n = work_count[bh] as usize;
            let its = work[bh * g.max_work..][..n].to_vec();
            let total: usize = its.iter().map(|it| it[2] as usize).sum();
            let base = x.lse_base(b, h) * tk;
            ent.push(entries[base..base + total].to_vec());
            items.push(its);
        }
    }
    (ent, items)
}

/// A random per-token selection of `x` (valid `RowBlocks`): rows before key 0 choose
/// nothing; others up to `slots` distinct blocks of their sequence, drawn mostly from a few
/// hot blocks so that runs exceed 64 rows and cross chunks.
fn random_rows(r: &mut SmallRng, x: &Problem, slots: usize) -> Vec<i32> {
    let a = &x.attn;
    let bn = x.cfg.block_n;
    let mut rows = vec![-1i32; a.lse_len() * slots];
    for (b, span) in a.spans().enumerate() {
        let nkb = span.seqlen_k.div_ceil(bn);
        for h in 0..a.heads_q() {
            for i in 0..span.seqlen_q {
                if nkb == 0 || i + span.seqlen_k < span.seqlen_q {
                    continue;
                }
                let n = r.random_range(0..=slots.min(nkb));
                let mut l: Vec<i32> = Vec::new();
                while l.len() < n {
                    let kb = match r.random_range(0..4) {
                        0 => 0,
                        1 => nkb - 1,
                        2 => nkb / 2,
                        _ => r.random_range(0..nkb),
                    } as i32;
                    if !l.contains(&kb) {
                        l.push(kb);
                    }
                }
                l.sort_unstable();
                let at = (x.lse_base(b, h) + i) * slots;
                rows[at..at + n].copy_from_slice(&l);
            }
        }
    }
    rows
}

/// The transpose's model equals `moba_gather_index_cpu` exactly (entries block by block,
/// rows increasing; work items of <= 64 rows), on the reference selection of random
/// problems and on random selections with hot blocks over up to 600 key blocks (scans of
/// several 256-block batches) and up to 1500 rows (several 512-row chunks).
#[test]
fn transpose_model_matches_the_cpu_index() {
    let mut r = rng(0x7a45);
    for case in 0..40 {
        let (x, rows) = if case % 2 == 0 {
            let x = problem(&mut r, 700, 3000);
            let rows = moba_select_cpu(&x.attn, &x.cfg, x.q(), x.k()).unwrap();
            (x, rows.blocks().to_vec())
        } else {
            let mut x = problem(&mut r, 1500, 64 * 600);
            x.cfg.block_n = 64;
            let slots = MobaGpuDims::new(&x.attn, &x.cfg).unwrap().slots;
            let rows = random_rows(&mut r, &x, slots);
            (x, rows)
        };
        let dims = MobaGpuDims::new(&x.attn, &x.cfg).unwrap();
        let g = MobaGatherDims::new(&x.attn, &dims).unwrap();
        let (entries, work) = transpose_model(&x, &dims, &g, &rows);
        let sel = RowBlocks::new(x.cfg.block_n, dims.slots, rows).unwrap();
        let want = moba_gather_index_cpu(&x.attn, &sel).unwrap();
        assert_eq!(entries, want.entries, "case {case}: entries");
        assert_eq!(work, want.work, "case {case}: work items");
    }
}

/// The partials' layout: for every (row, slot), the offset the gather attention's epilogue
/// (`GatherProblem::store_o` / `store_lse`) and the count kernel (padding slots) write equals
/// the one `la_ring_gather` reads for that row with the plan's slot table (slot `j`: o at
/// `j * rows * head_dim`, lse at `j * rows`, rows `0..len`; varlen as one packed batch), each
/// position of the partial buffers is written once, and the merge's output row and LSE index
/// are the problem's.
#[test]
fn partial_layout_is_the_merge_layout() {
    let mut r = rng(0x1a7);
    for case in 0..30 {
        let x = problem(&mut r, 300, 900);
        let a = &x.attn;
        let dims = MobaGpuDims::new(a, &x.cfg).unwrap();
        let g = MobaGatherDims::new(a, &dims).unwrap();
        let (hq, d, tk) = (a.heads_q() as i64, a.head_dim() as i64, dims.slots as i64);
        let rows = g.rows as i64;
        // ring_gather's params as MobaGpuPlan's launch sets them.
        let (m_batch, len) = if a.is_varlen() {
            (1, a.total_q() as i64)
        } else {
            (a.batch() as i64, a.max_seqlen_q() as i64)
        };
        assert_eq!(
            m_batch * len * hq,
            rows,
            "case {case}: merge rows vs LSE rows"
        );
        let (mut seen_o, mut seen_l) = (
            vec![false; (tk * rows) as usize],
            vec![false; (tk * rows) as usize],
        );
        for (b, span) in a.spans().enumerate() {
            // packed_row0 of moba_gather.cu.
            let orow0 = if a.is_varlen() {
                span.q_start as i64
            } else {
                b as i64 * a.max_seqlen_q() as i64
            };
            for h in 0..hq {
                let lse_base = x.lse_base(b, h as usize) as i64;
                for i in 0..span.seqlen_q as i64 {
                    // The merge's item of this row: (b', h, i') with b' * heads + h = bh.
                    let (mb, mi) = if a.is_varlen() {
                        (0, span.q_start as i64 + i)
                    } else {
                        (b as i64, i)
                    };
                    let item = (mb * hq + h) * len + mi;
                    assert_eq!(item, lse_base + i, "case {case}: merged LSE index");
                    for j in 0..tk {
                        let store_o = (j * rows + (orow0 + i) * hq + h) * d;
                        let store_l = j * rows + lse_base + i;
                        let (s0, s1, row0, srows) = (j * rows * d, j * rows, 0, len);
                        let read_o = s0 + ((mb * srows + (mi - row0)) * hq + h) * d;
                        let read_l = s1 + (mb * hq + h) * srows + (mi - row0);
                        assert_eq!(store_o, read_o, "case {case}: o of ({b}, {h}, {i}, {j})");
                        assert_eq!(store_l, read_l, "case {case}: lse of ({b}, {h}, {i}, {j})");
                        let (po, pl) = ((store_o / d) as usize, store_l as usize);
                        assert!(!seen_o[po] && !seen_l[pl], "case {case}: written twice");
                        seen_o[po] = true;
                        seen_l[pl] = true;
                    }
                }
            }
        }
        assert!(
            seen_o.iter().all(|&s| s) && seen_l.iter().all(|&s| s),
            "case {case}: a partial the merge reads is never written"
        );
    }
}

/// `WarpWindowMask` (dense_mask.cuh) for one warp's rows: `prepare` / `prepare_positions`
/// with the launch's `window_left` / `window_right` / `sinks` (`Window::to_flash`), then
/// `interior` and `apply`.
struct WarpMask {
    /// Per row of the warp (16): the last and first visible key of the window.
    hi: Vec<i64>,
    lo: Vec<i64>,
    diag_first: i64,
    diag_last: i64,
    left: i64,
    right: i64,
    sinks: i64,
    sk: i64,
}

impl WarpMask {
    /// Rows at query positions `pos`, `first` / `last` the smallest / largest valid one.
    fn new(mask: &Mask, pos: &[i64], (first, last): (i64, i64), sq: i64, sk: i64) -> Self {
        let (left, right) = mask.window.to_flash();
        let (mut hi, mut lo) = (Vec::new(), Vec::new());
        for &p in pos {
            let diag = p + sk - sq;
            let mut hr = sk - 1;
            if right >= 0 {
                hr = hr.min(diag + right);
            }
            let lr = if left >= 0 {
                (diag - left).max(0).min(sk)
            } else {
                0
            };
            hi.push(hr.max(-1));
            lo.push(lr);
        }
        WarpMask {
            hi,
            lo,
            diag_first: first + sk - sq,
            diag_last: last + sk - sq,
            left,
            right,
            sinks: mask.sinks as i64,
            sk,
        }
    }
    fn interior(&self, n0: i64, bn: i64) -> bool {
        let n_end = n0 + bn;
        n_end <= self.sk
            && (self.right < 0 || n_end - 1 <= self.diag_first + self.right)
            && (self.left < 0 || n0 >= self.diag_last - self.left || n_end <= self.sinks)
    }
    /// Whether `apply` leaves key `j` of the tile at `n0` to row `r` of the warp.
    fn shows(&self, r: usize, n0: i64, bn: i64, j: i64) -> bool {
        self.interior(n0, bn) || (j <= self.hi[r] && (j >= self.lo[r] || j < self.sinks))
    }
}

/// Options of the attention models: causal, causal windows with and without sinks, a
/// two-sided window and no mask at all (MoBA's are causal; the kernels take any).
fn attention_options(r: &mut SmallRng) -> AttentionOptions {
    let w = r.random_range(1..400usize);
    match r.random_range(0..5) {
        0 => AttentionOptions::causal(),
        1 => AttentionOptions::causal().with_window(Window::new(Some(w), Some(0))),
        2 => AttentionOptions::causal()
            .with_window(Window::new(Some(w), Some(0)))
            .with_sinks(r.random_range(1..100)),
        3 => AttentionOptions::default().with_window(Window::new(Some(w), Some(w / 3))),
        _ => AttentionOptions::default(),
    }
}

/// For every (sequence, head): how often each (row, key) pair is computed unmasked, and
/// whether the reference shows it (key in the row's selection, element mask).
struct PairCount {
    sq: usize,
    sk: usize,
    count: Vec<u32>,
}

impl PairCount {
    fn new(sq: usize, sk: usize) -> Self {
        PairCount {
            sq,
            sk,
            count: vec![0; sq * sk],
        }
    }
    /// A computed, unmasked pair: keys past the sequence's end must never be.
    fn add(&mut self, i: usize, j: i64, what: &str) {
        assert!(
            j >= 0 && (j as usize) < self.sk,
            "{what}: key {j} past sk {}",
            self.sk
        );
        self.count[i * self.sk + j as usize] += 1;
    }
    /// Every shown pair computed exactly once, nothing else.
    fn check(&self, x: &Problem, rows: &RowBlocks, (b, h): (usize, usize), what: &str) {
        let (mask, bn) = (x.attn.mask(), x.cfg.block_n);
        for i in 0..self.sq {
            let list = rows.row(x.lse_base(b, h) + i).unwrap();
            for j in 0..self.sk {
                let want =
                    list.contains(&((j / bn) as i32)) && mask.visible(i, j, self.sq, self.sk);
                assert_eq!(
                    self.count[i * self.sk + j],
                    u32::from(want),
                    "{what}: ({b}, {h}) row {i} key {j}"
                );
            }
        }
    }
}

/// `moba_attention_kernel`'s visits (`MobaProblem`: `schedule`, `key0`, the per-row list scan
/// and the warp's skip, `WarpWindowMask::prepare` / `apply`) over the tile unions, with key
/// tiles of `bn_tile` keys (64 at head_dim 64 and 128, 32 at 256).
fn union_attention_model(x: &Problem, rows: &RowBlocks, bn_tile: usize, what: &str) {
    let a = &x.attn;
    let (bn, tk) = (x.cfg.block_n as i64, rows.top_k());
    let unions = moba_tile_unions(a, rows, GPU_TILE_ROWS).unwrap();
    let nt = a.max_seqlen_q().div_ceil(GPU_TILE_ROWS);
    let (tpb, bt) = (bn / bn_tile as i64, bn_tile as i64);
    let mask = a.mask();
    for (b, span) in a.spans().enumerate() {
        let (sq, sk) = (span.seqlen_q as i64, span.seqlen_k as i64);
        for h in 0..a.heads_q() {
            let mut pairs = PairCount::new(span.seqlen_q, span.seqlen_k);
            for xt in 0..nt {
                let m0 = (xt * GPU_TILE_ROWS) as i64;
                if m0 >= sq {
                    continue;
                }
                let list = &unions[(b * a.heads_q() + h) * nt + xt];
                let count = list.len() as i64;
                let n_tiles = if count == 0 {
                    0
                } else {
                    let start = list[count as usize - 1] as i64 * bn;
                    let drop = if start < sk && start + bn > sk {
                        tpb - (sk - start + bt - 1) / bt
                    } else {
                        0
                    };
                    count * tpb - drop
                };
                // rows_s: the 64 rows' lists, -1 past the tile's rows.
                let row_list = |r: i64| -> Vec<i32> {
                    if m0 + r < sq {
                        rows.row(x.lse_base(b, h) + (m0 + r) as usize)
                            .unwrap()
                            .to_vec()
                    } else {
                        vec![-1; tk]
                    }
                };
                let warps: Vec<WarpMask> = (0..4i64)
                    .map(|w| {
                        let r0 = m0 + 16 * w;
                        let pos: Vec<i64> = (r0..r0 + 16).collect();
                        WarpMask::new(&mask, &pos, (r0, (r0 + 15).min(sq - 1)), sq, sk)
                    })
                    .collect();
                for t in 0..n_tiles {
                    let (e, sub) = (t / tpb, t % tpb);
                    let kb = list[e as usize];
                    let n0 = (kb as i64 * bn + sub * bt).min(sk);
                    for (w, wm) in warps.iter().enumerate() {
                        let sel: Vec<bool> = (0..16)
                            .map(|r| {
                                let row = 16 * w as i64 + r;
                                if m0 + row >= sq {
                                    return true;
                                }
                                let mut s = false;
                                for &v in &row_list(row) {
                                    if v < 0 || v > kb {
                                        break;
                                    }
                                    s = v == kb;
                                }
                                s
                            })
                            .collect();
                        let all = sel.iter().all(|&s| s);
                        for (r, &s) in sel.iter().enumerate() {
                            let i = m0 + 16 * w as i64 + r as i64;
                            if i >= sq {
                                continue; // never stored
                            }
                            for j in n0..n0 + bt {
                                if (all || s) && wm.shows(r, n0, bt, j) {
                                    pairs.add(i as usize, j, what);
                                }
                            }
                        }
                    }
                }
            }
            pairs.check(x, rows, (b, h), what);
        }
    }
}

/// `moba_gather_attention_kernel`'s visits (`GatherProblem`: the work item's rows, the last
/// repeated to 64 and not stored; the block's key tiles; `prepare_positions` at the rows'
/// own positions) over the transpose of `rows`.
fn gather_attention_model(x: &Problem, rows: &RowBlocks, bn_tile: usize, what: &str) {
    let a = &x.attn;
    let (bn, tk, bt) = (x.cfg.block_n as i64, rows.top_k(), bn_tile as i64);
    let index = moba_gather_index_cpu(a, rows).unwrap();
    let mask = a.mask();
    for (b, span) in a.spans().enumerate() {
        let (sq, sk) = (span.seqlen_q as i64, span.seqlen_k as i64);
        for h in 0..a.heads_q() {
            let bh = b * a.heads_q() + h;
            let mut pairs = PairCount::new(span.seqlen_q, span.seqlen_k);
            for item in &index.work[bh] {
                let [kb, first, n, _] = *item;
                let ent = &index.entries[bh][first as usize..];
                let item_rows: Vec<i64> = (0..GPU_GATHER_ITEM_ROWS)
                    .map(|r| (ent[r.min(n as usize - 1)] as usize / tk) as i64)
                    .collect();
                let len = bn.min(sk - kb as i64 * bn);
                assert!(len > 0, "{what}: block {kb} past the sequence");
                for t in 0..(len + bt - 1) / bt {
                    let n0 = kb as i64 * bn + t * bt;
                    for w in 0..4 {
                        let wr = &item_rows[16 * w..16 * w + 16];
                        let bounds = (*wr.iter().min().unwrap(), *wr.iter().max().unwrap());
                        let wm = WarpMask::new(&mask, wr, bounds, sq, sk);
                        for (r, &i) in wr.iter().enumerate() {
                            if 16 * w + r >= n as usize {
                                continue; // the repeated row: computed, not stored
                            }
                            for j in n0..n0 + bt {
                                // load_rows zero-fills keys past sk; the mask must hide them.
                                if wm.shows(r, n0, bt, j) {
                                    pairs.add(i as usize, j, what);
                                }
                            }
                        }
                    }
                }
            }
            pairs.check(x, rows, (b, h), what);
        }
    }
}

/// Both attentions' visits, on the reference selection under random element masks: every
/// pair the selection and the mask show is computed unmasked exactly once, no other pair,
/// no key past a sequence's end (last partial blocks, varlen, `seqlen_q != seqlen_k`).
#[test]
fn attention_models_compute_exactly_the_shown_pairs() {
    let mut r = rng(0xa77e);
    for case in 0..40 {
        let opts = attention_options(&mut r);
        let x = problem_with(&mut r, 260, 1300, opts);
        let rows = moba_select_cpu(&x.attn, &x.cfg, x.q(), x.k()).unwrap();
        for bn_tile in [64, 32] {
            let what = format!("case {case} tile {bn_tile} {:?}", x.attn.mask());
            union_attention_model(&x, &rows, bn_tile, &format!("union {what}"));
            gather_attention_model(&x, &rows, bn_tile, &format!("gather {what}"));
        }
    }
}

/// `moba_select_tc_kernel`'s fragments: the 32-bit words each lane reads from the Q and
/// pooled-key tiles (row stride `D + 8` elements), combined by `mma.sync.m16n8k16.row.col` as
/// the PTX ISA lays out its fragments (lane `4g + t`: A rows `g`, `g + 8`, columns `2t, 2t + 1`
/// and `+ 8`; B column `g`, rows `2t, 2t + 1` and `+ 8`; C rows `g`, `g + 8`, columns `2t,
/// 2t + 1`), stored into the score tile as the kernel stores its accumulators: the tile must
/// be Q x pooled^T, every (row, block) of the 64 x 32 chunk, at head dims 64, 128, 256.
#[test]
fn tc_gate_fragments_compute_the_score_tile() {
    let mut r = rng(0x7c);
    for d in [64usize, 128, 256] {
        let stride = d + 8; // SelTcSmem::kStride, elements
        let kw_row = stride / 2; // words per row
        let val = |r: &mut SmallRng| r.random_range(-4i32..=4) as f64;
        // Shared tiles as elements; word w of a row is elements (2w, 2w + 1).
        let q: Vec<f64> = (0..GPU_TILE_ROWS * stride).map(|_| val(&mut r)).collect();
        let p: Vec<f64> = (0..GATE_CHUNK * stride).map(|_| val(&mut r)).collect();
        let word = |t: &[f64], w: usize| [t[2 * w], t[2 * w + 1]];
        let s_stride = GATE_CHUNK + 1; // SelTcSmem::kSStride
        let mut s = vec![f64::NAN; GPU_TILE_ROWS * s_stride];
        for warp in 0..4 {
            let mut acc = [[[0.0f64; 4]; 4]; 32]; // [lane][n-tile][c]
            for k0 in (0..d).step_by(16) {
                // Each lane's fragments, as the kernel indexes the words.
                let mut a = [[[0.0f64; 2]; 4]; 32];
                let mut bf = [[[[0.0f64; 2]; 2]; 4]; 32];
                for lane in 0..32 {
                    let (g, t) = (lane / 4, lane % 4);
                    let ra = 16 * warp + g;
                    let kw = k0 / 2 + t;
                    a[lane] = [
                        word(&q, ra * kw_row + kw),
                        word(&q, (ra + 8) * kw_row + kw),
                        word(&q, ra * kw_row + kw + 4),
                        word(&q, (ra + 8) * kw_row + kw + 4),
                    ];
                    for (j, b) in bf[lane].iter_mut().enumerate() {
                        let n = 8 * j + g;
                        *b = [word(&p, n * kw_row + kw), word(&p, n * kw_row + kw + 4)];
                    }
                }
                // The MMA per the PTX fragment layout.
                for j in 0..4 {
                    let (mut am, mut bm) = ([[0.0f64; 16]; 16], [[0.0f64; 8]; 16]);
                    for lane in 0..32 {
                        let (g, t) = (lane / 4, lane % 4);
                        for e in 0..2 {
                            am[g][2 * t + e] = a[lane][0][e];
                            am[g + 8][2 * t + e] = a[lane][1][e];
                            am[g][2 * t + 8 + e] = a[lane][2][e];
                            am[g + 8][2 * t + 8 + e] = a[lane][3][e];
                            bm[2 * t + e][g] = bf[lane][j][0][e];
                            bm[2 * t + 8 + e][g] = bf[lane][j][1][e];
                        }
                    }
                    let c = |row: usize, col: usize| {
                        (0..16).map(|k| am[row][k] * bm[k][col]).sum::<f64>()
                    };
                    for (lane, acc_l) in acc.iter_mut().enumerate() {
                        let (g, t) = (lane / 4, lane % 4);
                        acc_l[j][0] += c(g, 2 * t);
                        acc_l[j][1] += c(g, 2 * t + 1);
                        acc_l[j][2] += c(g + 8, 2 * t);
                        acc_l[j][3] += c(g + 8, 2 * t + 1);
                    }
                }
            }
            for (lane, acc_l) in acc.iter().enumerate() {
                let (g, t) = (lane / 4, lane % 4);
                let ra = 16 * warp + g;
                for (j, aj) in acc_l.iter().enumerate() {
                    let at = ra * s_stride + 8 * j + 2 * t;
                    s[at] = aj[0];
                    s[at + 1] = aj[1];
                    s[at + 8 * s_stride] = aj[2];
                    s[at + 8 * s_stride + 1] = aj[3];
                }
            }
        }
        for row in 0..GPU_TILE_ROWS {
            for blk in 0..GATE_CHUNK {
                let want: f64 = (0..d)
                    .map(|c| q[row * stride + c] * p[blk * stride + c])
                    .sum();
                assert_eq!(s[row * s_stride + blk], want, "d{d}: row {row} block {blk}");
            }
        }
    }
}
