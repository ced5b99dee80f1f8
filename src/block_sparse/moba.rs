//! MoBA block selection on the CPU (Lu et al. 2025, "MoBA: Mixture of Block Attention for
//! Long-Context LLMs", `moba_attn_varlen_naive` in MoonshotAI/MoBA).
//!
//! Keys are split into blocks of `block_n` ("chunk size"); each block is represented by the
//! mean of its keys (per kv head). A query at position `p` (bottom-right aligned:
//! `p = i + seqlen_k - seqlen_q`; a row with `p < 0` sees nothing) gates on
//! `s(kb) = q . mean(k[kb])` (no scale: it does not change the ranking) and attends to:
//! - its own block `p / block_n`, always, causally inside it (MoBA's gate is `+inf` there);
//! - the `top_k - 1` highest-scoring blocks among the blocks strictly before its own (MoBA's
//!   gate is `-inf` for its own-and-later blocks before the `+inf` override, so future blocks
//!   are never chosen); all of them when fewer exist.
//!
//! **Ties**: higher score first; equal scores go to the lower block index (`torch.topk` leaves
//! ties unspecified). A NaN score ranks as `-inf` (it is still chosen when slots remain, as
//! `torch.topk` would fill them). Scores and pooled keys are computed in f64 from the
//! elements, so the CPU selection is the reference a GPU selection is checked against.
//!
//! With GQA each query head selects on its kv head's pooled keys, independently of the other
//! heads of its group.
//!
//! On the GPU, [`MobaGpuPlan`] runs the same per-token selection (f32 pooled keys and scores,
//! same tie rule) and the attention over it on device buffers (**not yet run on a GPU**; see
//! `src/block_sparse/moba_gpu.rs`). [`moba_pooled_keys_cpu`] and [`moba_tile_unions`] are the
//! CPU counterparts of its intermediate results. Query-block granularity
//! ([`moba_select_blocks_cpu`]) runs on the GPU through [`MobaGpuPlan::with_query_blocks`].

use super::{
    BlockMask, BlockMaskDims, BlockMaskError, BlockSparseAttention, ListId, RowBlocks,
    classify_blocks,
};
use crate::dense::FlashAttention;
use crate::element::Element;
use crate::error::Result;
use crate::layout::Strided;
use std::cmp::Ordering;

pub use super::moba_gather::{
    GPU_GATHER_CHUNK_ROWS, GPU_GATHER_ITEM_ROWS, GPU_GATHER_MAX_K_BLOCKS, MobaAttention,
    MobaGatherDims, MobaGatherIndex, moba_gather_index_cpu,
};
pub use super::moba_gpu::{
    GPU_MAX_K_BLOCKS, GPU_MAX_TOP_K, GPU_TILE_ROWS, MobaGate, MobaGpuDims, MobaGpuPlan,
};

/// MoBA's two knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MobaConfig {
    /// Keys per block (MoBA's `moba_chunk_size`); the key block size of the mask.
    pub block_n: usize,
    /// Blocks per query, its own block included (MoBA's `moba_topk`); >= 1.
    pub top_k: usize,
}

impl MobaConfig {
    pub(crate) fn check(&self) -> Result<(), BlockMaskError> {
        for (name, value) in [("block_n", self.block_n), ("top_k", self.top_k)] {
            if value == 0 {
                return Err(BlockMaskError::BadDim {
                    name,
                    value,
                    why: "must be >= 1",
                });
            }
        }
        Ok(())
    }
}

/// The ranking of the tie rule: higher score first, then lower block index.
fn rank(a: &(f64, usize), b: &(f64, usize)) -> Ordering {
    let key = |s: f64| if s.is_nan() { f64::NEG_INFINITY } else { s };
    key(b.0).total_cmp(&key(a.0)).then(a.1.cmp(&b.1))
}

/// The `n` best of `cands` (score, block) under [`rank`], returned as block indices.
fn top_n(mut cands: Vec<(f64, usize)>, n: usize) -> Vec<usize> {
    cands.sort_by(rank);
    cands.into_iter().take(n).map(|(_, kb)| kb).collect()
}

/// Per-(sequence, kv head) means of each key block, `[num_blocks, d]` in f64.
fn pooled<T: Element>(
    attn: &FlashAttention,
    x: &Strided<&[T]>,
    b: usize,
    head: usize,
    start: usize,
    len: usize,
    block: usize,
) -> Vec<f64> {
    let d = attn.head_dim();
    let mut out = vec![0.0f64; len.div_ceil(block) * d];
    for (blk, acc) in out.chunks_exact_mut(d).enumerate() {
        let rows = blk * block..((blk + 1) * block).min(len);
        let n = rows.len() as f64;
        for r in rows {
            let o = x.strides.offset(attn.batch_entry(b), start + r, head);
            for (a, e) in acc.iter_mut().zip(&x.data[o..o + d]) {
                *a += e.to_f64();
            }
        }
        acc.iter_mut().for_each(|a| *a /= n);
    }
    out
}

fn dot<T: Element>(q: &[T], pooled: &[f64]) -> f64 {
    q.iter().zip(pooled).map(|(a, b)| a.to_f64() * b).sum()
}

fn check_qk<T: Element>(attn: &FlashAttention, q: &Strided<&[T]>, k: &Strided<&[T]>) -> Result<()> {
    let (qa, ka) = (q.extent(), k.extent());
    attn.check_buffers(qa, ka, ka, qa, None)
}

/// MoBA's per-token selection for every (sequence, query head, row) of `attn`: padded
/// [`RowBlocks`] with `min(top_k, num_k_blocks)` slots per row (increasing block indices, `-1` padding).
pub fn moba_select_cpu<T: Element>(
    attn: &FlashAttention,
    config: &MobaConfig,
    q: Strided<&[T]>,
    k: Strided<&[T]>,
) -> Result<RowBlocks> {
    config.check()?;
    check_qk(attn, &q, &k)?;
    let MobaConfig { block_n, top_k } = *config;
    // No row can select more blocks than exist (MoBA's `min(moba_topk, num_block)`), so the
    // slots, and the allocation, are bounded by the problem, not by `top_k`.
    let top_k = top_k.min(attn.max_seqlen_k().div_ceil(block_n)).max(1);
    let d = attn.head_dim();
    let len = attn
        .lse_len()
        .checked_mul(top_k)
        .ok_or(BlockMaskError::TooLarge {
            what: "rows x top_k",
        })?;
    let mut blocks = vec![-1i32; len];
    if attn.max_seqlen_q() == 0 {
        // No query row anywhere: nothing to select. O(1): a fixed-length batch without rows
        // may declare any number of sequences (nothing bounds it by memory).
        return Ok(RowBlocks::new(block_n, top_k, blocks)?);
    }
    let group = attn.heads_q() / attn.heads_kv();
    for (b, span) in attn.spans().enumerate() {
        let (sq, sk) = (span.seqlen_q, span.seqlen_k);
        // A sequence without query rows selects nothing: no per-head work, so an empty
        // problem costs nothing however many heads it declares (as the dense path).
        if sq == 0 {
            continue;
        }
        for kvh in 0..attn.heads_kv() {
            let pk = pooled(attn, &k, b, kvh, span.k_start, sk, block_n);
            for h in kvh * group..(kvh + 1) * group {
                for i in 0..sq {
                    let Some(p) = (i + sk).checked_sub(sq) else {
                        continue;
                    };
                    let own = p / block_n;
                    let qo = q.strides.offset(attn.batch_entry(b), span.q_start + i, h);
                    let qi = &q.data[qo..qo + d];
                    let cands = (0..own)
                        .map(|kb| (dot(qi, &pk[kb * d..(kb + 1) * d]), kb))
                        .collect();
                    let mut sel = top_n(cands, top_k - 1);
                    sel.push(own);
                    sel.sort_unstable();
                    let r = attn.lse_index(b, h, i);
                    for (slot, kb) in blocks[r * top_k..].iter_mut().zip(sel) {
                        *slot = kb as i32;
                    }
                }
            }
        }
    }
    Ok(RowBlocks::new(block_n, top_k, blocks)?)
}

/// The dims of a block mask over `attn`'s lengths, one list set per query head.
fn mask_dims(
    attn: &FlashAttention,
    block_m: usize,
    block_n: usize,
) -> Result<BlockMaskDims, BlockMaskError> {
    let (sq, sk) = (attn.max_seqlen_q(), attn.max_seqlen_k());
    BlockMaskDims::for_lengths(attn.batch(), attn.heads_q(), sq, sk, block_m, block_n)
}

/// The block mask of per-tile unions for per-row selections `rows` (from
/// [`moba_select_cpu`]): query block `qb` (of `block_m` rows) lists the union of its rows'
/// blocks, each `Full` when the options' element mask shows all of it to every row of the
/// tile, else `Partial`. With `rows` attached (see [`moba_attention`]) each row is then masked
/// to its own selection.
pub fn moba_block_mask(
    attn: &FlashAttention,
    rows: &RowBlocks,
    block_m: usize,
) -> Result<BlockMask, BlockMaskError> {
    let block_n = rows.block_n();
    let dims = mask_dims(attn, block_m, block_n)?;
    super::check_row_blocks(attn, rows)?;
    let mask = attn.mask();
    BlockMask::from_lists(
        dims,
        |ListId {
             batch,
             head,
             q_block,
         }| {
            let span = attn.span_of(batch);
            let (sq, sk) = (span.seqlen_q, span.seqlen_k);
            let tile = q_block * block_m..((q_block + 1) * block_m).min(sq);
            let mut union: Vec<usize> = tile
                .clone()
                .flat_map(|i| rows.row_at(attn.lse_index(batch, head, i)).iter())
                .map(|&kb| kb as usize)
                .collect();
            union.sort_unstable();
            union.dedup();
            classify_blocks(&mask, tile, union, block_n, (sq, sk))
        },
    )
}

/// The mean of every key block per (sequence, kv head) in f64, `[batch, heads_kv,
/// num_k_blocks, head_dim]` with `num_k_blocks = ceil(max_seqlen_k / block_n)` (blocks past a
/// varlen sequence's end are 0): the pooled keys MoBA's gate scores against, in the layout of
/// [`MobaGpuPlan::pooled_keys`]. `q` is only validated (the signature of
/// [`moba_select_cpu`]).
pub fn moba_pooled_keys_cpu<T: Element>(
    attn: &FlashAttention,
    config: &MobaConfig,
    q: Strided<&[T]>,
    k: Strided<&[T]>,
) -> Result<Vec<f64>> {
    config.check()?;
    check_qk(attn, &q, &k)?;
    let (d, nk) = (
        attn.head_dim(),
        attn.max_seqlen_k().div_ceil(config.block_n),
    );
    let len = [attn.batch(), attn.heads_kv(), nk, d]
        .iter()
        .try_fold(1usize, |a, &x| a.checked_mul(x))
        .ok_or(BlockMaskError::TooLarge {
            what: "pooled keys",
        })?;
    let mut out = vec![0.0f64; len];
    if len == 0 {
        // No key block or no channel: nothing to pool. O(1): a fixed-length batch without
        // keys may declare any number of sequences and heads (nothing bounds them by memory),
        // while otherwise the (sequence, kv head) pairs are bounded by `len`.
        return Ok(out);
    }
    for (b, span) in attn.spans().enumerate() {
        for kvh in 0..attn.heads_kv() {
            let pk = pooled(
                attn,
                &k,
                b,
                kvh,
                span.k_start,
                span.seqlen_k,
                config.block_n,
            );
            let at = (b * attn.heads_kv() + kvh) * nk * d;
            out[at..at + pk.len()].copy_from_slice(&pk);
        }
    }
    Ok(out)
}

/// The key blocks each query tile of `tile_rows` rows must visit for per-row selections
/// `rows`: the sorted union of its rows' lists, one list per (sequence, query head, tile),
/// row-major over `[batch, heads_q, ceil(max_seqlen_q / tile_rows)]` (tiles past a varlen
/// sequence's end are empty). With `tile_rows = GPU_TILE_ROWS` this is what
/// [`MobaGpuPlan::tile_unions`] returns; it is also the block list of [`moba_block_mask`]
/// before the options' mask drops blocks it hides entirely.
pub fn moba_tile_unions(
    attn: &FlashAttention,
    rows: &RowBlocks,
    tile_rows: usize,
) -> Result<Vec<Vec<i32>>, BlockMaskError> {
    if tile_rows == 0 {
        return Err(BlockMaskError::BadDim {
            name: "tile_rows",
            value: 0,
            why: "must be >= 1",
        });
    }
    super::check_row_blocks(attn, rows)?;
    let nt = attn.max_seqlen_q().div_ceil(tile_rows);
    let mut lists = Vec::new();
    if nt == 0 {
        // No query row anywhere: no list, whatever the heads (their loop would be empty).
        return Ok(lists);
    }
    for (b, span) in attn.spans().enumerate() {
        for h in 0..attn.heads_q() {
            for x in 0..nt {
                let tile =
                    (x * tile_rows).min(span.seqlen_q)..((x + 1) * tile_rows).min(span.seqlen_q);
                let mut union: Vec<i32> = tile
                    .flat_map(|i| rows.row_at(attn.lse_index(b, h, i)).iter().copied())
                    .collect();
                union.sort_unstable();
                union.dedup();
                lists.push(union);
            }
        }
    }
    Ok(lists)
}

/// MoBA attention as a block-sparse problem: the per-token selection, its per-tile block
/// mask (query tiles of `block_m` rows) and the per-row masks, bound to `attn` (whose options
/// should be causal, as MoBA's are).
pub fn moba_attention<T: Element>(
    attn: &FlashAttention,
    config: &MobaConfig,
    block_m: usize,
    q: Strided<&[T]>,
    k: Strided<&[T]>,
) -> Result<BlockSparseAttention> {
    let rows = moba_select_cpu(attn, config, q, k)?;
    let mask = moba_block_mask(attn, &rows, block_m)?;
    Ok(BlockSparseAttention::new(attn.clone(), mask)?.with_row_blocks(rows)?)
}

/// MoBA's selection at query-block granularity: each query block of `block_m` rows gates on
/// the mean of its queries (f64) against the pooled keys. Its rows occupy positions
/// `p0..=p1` (bottom-right aligned, clamped at 0); the key blocks meeting `[p0, p1]` are
/// always listed (the diagonal blocks), and `top_k` minus their number (saturating) more are
/// chosen among the blocks ending at or before `p0` with the same ranking and tie rule. A
/// block whose rows all lie before key 0 (`p1 < 0`) lists nothing. Kinds follow the options'
/// element mask as in [`moba_block_mask`].
pub fn moba_select_blocks_cpu<T: Element>(
    attn: &FlashAttention,
    config: &MobaConfig,
    block_m: usize,
    q: Strided<&[T]>,
    k: Strided<&[T]>,
) -> Result<BlockMask> {
    config.check()?;
    check_qk(attn, &q, &k)?;
    let MobaConfig { block_n, top_k } = *config;
    let dims = mask_dims(attn, block_m, block_n)?;
    let mask = attn.mask();
    let d = attn.head_dim();
    Ok(BlockMask::from_lists(
        dims,
        |ListId {
             batch,
             head,
             q_block,
         }| {
            let span = attn.span_of(batch);
            let (sq, sk) = (span.seqlen_q, span.seqlen_k);
            let tile = q_block * block_m..((q_block + 1) * block_m).min(sq);
            let (Some(p1), false) = ((tile.end + sk).checked_sub(sq + 1), tile.is_empty()) else {
                return Vec::new();
            };
            let p0 = (tile.start + sk).saturating_sub(sq);
            // Pooled keys are recomputed per list: cheap next to attention, and no per-mask cache.
            let pk = pooled(
                attn,
                &k,
                batch,
                attn.kv_head(head),
                span.k_start,
                sk,
                block_n,
            );
            let pq = pooled(
                attn,
                &q,
                batch,
                head,
                span.q_start + tile.start,
                tile.len(),
                block_m,
            );
            let diag = p0 / block_n..p1 / block_n + 1;
            let cands = (0..p0 / block_n)
                .map(|kb| {
                    let s: f64 = pq
                        .iter()
                        .zip(&pk[kb * d..(kb + 1) * d])
                        .map(|(a, b)| a * b)
                        .sum();
                    (s, kb)
                })
                .collect();
            let mut sel = top_n(cands, top_k.saturating_sub(diag.len()));
            sel.extend(diag);
            sel.sort_unstable();
            classify_blocks(&mask, tile, sel, block_n, (sq, sk))
        },
    )?)
}
