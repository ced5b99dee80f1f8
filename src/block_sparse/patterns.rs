//! Block-sparse pattern constructors: cheap CPU builders of a [`BlockMask`] for the patterns
//! of the literature, at block granularity (square blocks of `block` tokens).
//!
//! Each constructor decides which (query block, key block) pairs a pattern lists, then
//! intersects with the options' element mask: a listed pair is dropped when the mask hides
//! all of it, marked [`BlockKind::Full`](super::BlockKind::Full) only when the mask shows every element of it to every
//! row (so `Full` is exact, a pure hint), and [`BlockKind::Partial`](super::BlockKind::Partial) otherwise. So a pattern
//! with causal options is "the pattern AND causal", element by element.
//!
//! Block positions: query block `qb` sits at key block position `qb + shift` with
//! `shift = (seqlen_k - seqlen_q) / block` (bottom-right alignment, as the element mask);
//! the constructors require `seqlen_q <= seqlen_k` with a block-aligned difference (prefill,
//! or chunked prefill with block-aligned chunks). "Distance" below is `qb + shift - kb`.

use super::{BlockMask, BlockMaskDims, BlockMaskError, ListId, classify_blocks};
use crate::mask::Mask;
use std::cell::RefCell;

/// What every pattern needs: lengths, heads (lists are per query head where the pattern
/// varies by head, else broadcast), the square block size and the options' element mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PatternShape {
    /// Query heads (1 when the pattern is the same for every head).
    pub heads: usize,
    /// Query tokens per sequence.
    pub seqlen_q: usize,
    /// Key tokens per sequence.
    pub seqlen_k: usize,
    /// Square block size in tokens (query and key blocks).
    pub block: usize,
    /// The element mask of the `AttentionOptions` the mask will be used with.
    pub mask: Mask,
}

impl PatternShape {
    fn num_k_blocks(&self) -> usize {
        self.seqlen_k.div_ceil(self.block.max(1))
    }
}

/// Builds a mask (batch broadcast) listing `(qb, kb)` where `pred(head, qb + shift, kb)`,
/// classified against the element mask. `per_head`: one list set per head, else one shared.
fn build(
    shape: &PatternShape,
    per_head: bool,
    pred: impl Fn(usize, usize, usize) -> bool,
) -> Result<BlockMask, BlockMaskError> {
    let PatternShape {
        heads,
        seqlen_q: sq,
        seqlen_k: sk,
        block,
        mask,
    } = *shape;
    if sq > sk || !(sk - sq).is_multiple_of(block.max(1)) {
        return Err(BlockMaskError::BadDim {
            name: "seqlen_k - seqlen_q",
            value: sk.saturating_sub(sq),
            why: "must be >= 0 and a multiple of the block size for a block pattern",
        });
    }
    let dims =
        BlockMaskDims::for_lengths(1, if per_head { heads } else { 1 }, sq, sk, block, block)?;
    let shift = (sk - sq) / block;
    BlockMask::from_lists(dims, |ListId { head, q_block, .. }| {
        let rows = q_block * block..((q_block + 1) * block).min(sq);
        let kbs = (0..dims.num_k_blocks).filter(|&kb| pred(head, q_block + shift, kb));
        classify_blocks(&mask, rows, kbs, block, (sq, sk))
    })
}

fn at_least_one(name: &'static str, value: usize) -> Result<(), BlockMaskError> {
    if value == 0 {
        return Err(BlockMaskError::BadDim {
            name,
            value,
            why: "must be >= 1",
        });
    }
    Ok(())
}

/// Longformer (Beltagy et al. 2020, "Longformer: The Long-Document Transformer"), blocked as
/// in BigBird's ITC: a sliding window of `window` blocks on each side (`|qb' - kb| <= window`)
/// plus `global` global blocks at the start, which every query block attends to and which
/// attend to every key block.
pub fn longformer(
    shape: &PatternShape,
    window: usize,
    global: usize,
) -> Result<BlockMask, BlockMaskError> {
    build(shape, false, |_, qb, kb| {
        qb.abs_diff(kb) <= window || kb < global || qb < global
    })
}

/// The random key blocks BigBird adds for (`head`, query block position `q_block`): `count`
/// distinct blocks of `0..num_k_blocks` (all of them when `count >= num_k_blocks`), drawn by a
/// partial Fisher-Yates shuffle driven by SplitMix64 seeded from `(seed, head, q_block)`.
/// Public so that a test or an engine can re-derive the pattern.
pub fn bigbird_random_blocks(
    seed: u64,
    head: usize,
    q_block: usize,
    num_k_blocks: usize,
    count: usize,
) -> Vec<usize> {
    let mut state = seed
        ^ (head as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (q_block as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let count = count.min(num_k_blocks);
    // Sparse Fisher-Yates: only the swapped positions are stored, so the cost is O(count).
    let mut swapped = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(count);
    for p in 0..count {
        let r = p + (next() % (num_k_blocks - p) as u64) as usize;
        let at_r = *swapped.get(&r).unwrap_or(&r);
        let at_p = *swapped.get(&p).unwrap_or(&p);
        swapped.insert(r, at_p);
        out.push(at_r);
    }
    out.sort_unstable();
    out
}

/// The random blocks of one list: `((head, query block position), blocks)`.
type Draw = ((usize, usize), Vec<usize>);

/// BigBird (Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences"): the
/// [`longformer`] window and global blocks plus `random` random key blocks per (head, query
/// block) from [`bigbird_random_blocks`] with `seed` (per head: lists are per query head).
pub fn bigbird(
    shape: &PatternShape,
    window: usize,
    global: usize,
    random: usize,
    seed: u64,
) -> Result<BlockMask, BlockMaskError> {
    let nk = shape.num_k_blocks();
    // `build` asks list by list, so only the current list's draw is kept.
    let draw: RefCell<Option<Draw>> = RefCell::new(None);
    build(shape, true, |h, qb, kb| {
        if qb.abs_diff(kb) <= window || kb < global || qb < global {
            return true;
        }
        let mut draw = draw.borrow_mut();
        if draw.as_ref().is_none_or(|(at, _)| *at != (h, qb)) {
            *draw = Some(((h, qb), bigbird_random_blocks(seed, h, qb, nk, random)));
        }
        draw.as_ref()
            .is_some_and(|(_, d)| d.binary_search(&kb).is_ok())
    })
}

/// Sparse Transformer, strided (Child et al. 2019, "Generating Long Sequences with Sparse
/// Transformers"), blocked: with `stride` blocks, query block `qb'` attends to the previous
/// `stride` blocks (`0 <= qb' - kb < stride`) and to every block at a multiple of `stride`
/// behind it (`(qb' - kb) % stride == 0`); autoregressive (`kb <= qb'`).
pub fn sparse_transformer_strided(
    shape: &PatternShape,
    stride: usize,
) -> Result<BlockMask, BlockMaskError> {
    at_least_one("stride", stride)?;
    build(shape, false, |_, qb, kb| {
        kb <= qb && (qb - kb < stride || (qb - kb).is_multiple_of(stride))
    })
}

/// Sparse Transformer, fixed (Child et al. 2019), blocked: blocks form chunks of `stride`;
/// query block `qb'` attends to its own chunk (`kb / stride == qb' / stride`) and to the last
/// `summary` blocks of every chunk (`kb % stride >= stride - summary`); autoregressive.
pub fn sparse_transformer_fixed(
    shape: &PatternShape,
    stride: usize,
    summary: usize,
) -> Result<BlockMask, BlockMaskError> {
    at_least_one("stride", stride)?;
    build(shape, false, |_, qb, kb| {
        kb <= qb && (kb / stride == qb / stride || summary >= stride - kb % stride)
    })
}

/// Block-Attention for RAG (Sun et al. 2024, "Block-Attention for Efficient RAG"): the key
/// blocks are split into consecutive passages of `passages[p]` blocks (summing to the number
/// of key blocks); a query block attends within its own passage, and the last passage (the
/// user's query) attends to every block. Use causal options for the causal inside.
pub fn block_attention(
    shape: &PatternShape,
    passages: &[usize],
) -> Result<BlockMask, BlockMaskError> {
    let total = passages
        .iter()
        .try_fold(0usize, |a, &p| a.checked_add(p))
        .ok_or(BlockMaskError::TooLarge {
            what: "the sum of passage lengths",
        })?;
    if total != shape.num_k_blocks() || passages.contains(&0) {
        return Err(BlockMaskError::BadDim {
            name: "sum of passages (blocks)",
            value: total,
            why: "must equal the number of key blocks, with no empty passage",
        });
    }
    let ends: Vec<usize> = passages
        .iter()
        .scan(0, |a, &p| {
            *a += p;
            Some(*a)
        })
        .collect();
    let passage = |kb: usize| ends.partition_point(|&e| e <= kb);
    let last = passages.len().saturating_sub(1); // no passage: no key block to test
    build(shape, false, |_, qb, kb| {
        let pq = passage(qb);
        pq == last || pq == passage(kb)
    })
}

/// Per-head window sizes (MSWA: Xu et al. 2025, "MSWA: Refining Local Attention with
/// Multi-Scale Window Attention"), blocked: head `h` attends to the `windows[h]` blocks ending
/// at its own (`0 <= qb' - kb < windows[h]`). Token-exact per-head windows need a per-head
/// element mask, which the options do not carry; this is the block-granular form.
pub fn per_head_windows(
    shape: &PatternShape,
    windows: &[usize],
) -> Result<BlockMask, BlockMaskError> {
    if windows.len() != shape.heads {
        return Err(BlockMaskError::Mismatch {
            what: "windows per head",
            got: windows.len(),
            want: shape.heads,
        });
    }
    for &w in windows {
        at_least_one("window (blocks)", w)?;
    }
    build(shape, true, |h, qb, kb| kb <= qb && qb - kb < windows[h])
}

/// DuoAttention at prefill (Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM
/// Inference with Retrieval and Streaming Heads"): streaming heads (`streaming[h]`) attend to
/// `sink` leading blocks plus a window of `window` blocks ending at their own; the other
/// (retrieval) heads attend to every block up to their own. Use causal options.
pub fn streaming_heads(
    shape: &PatternShape,
    streaming: &[bool],
    sink: usize,
    window: usize,
) -> Result<BlockMask, BlockMaskError> {
    if streaming.len() != shape.heads {
        return Err(BlockMaskError::Mismatch {
            what: "streaming flags per head",
            got: streaming.len(),
            want: shape.heads,
        });
    }
    build(shape, true, |h, qb, kb| {
        kb <= qb && (!streaming[h] || kb < sink || qb - kb < window)
    })
}
