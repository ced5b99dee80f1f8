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

use super::{BlockMask, BlockMaskDims, BlockMaskError, ListId, MAX_BLOCK_ENTRIES, classify_blocks};
use crate::mask::Mask;
use std::ops::Range;

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

/// Builds a mask (batch broadcast) listing, for each list, the key blocks of
/// `ranges(head, qb + shift)`: ranges of key block positions, in any order, overlapping or
/// reaching past the last block (clipped here), classified against the element mask.
/// `per_head`: one list set per head, else one shared. The cost is the number of ranges and
/// listed blocks, not the number of key blocks (a 1M-token window pattern at block 128 asks
/// ~8k lists for a few blocks each, not for 8k x 8k tests).
fn build(
    shape: &PatternShape,
    per_head: bool,
    ranges: impl Fn(usize, usize) -> Result<Vec<Range<usize>>, BlockMaskError>,
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
    BlockMask::try_from_lists(dims, |ListId { head, q_block, .. }| {
        let rows = q_block * block..((q_block + 1) * block).min(sq);
        let kbs = sorted_union(ranges(head, q_block + shift)?, dims.num_k_blocks);
        Ok(classify_blocks(&mask, rows, kbs, block, (sq, sk)))
    })
}

/// The blocks of `ranges` below `num_k_blocks`, increasing, each once.
fn sorted_union(mut ranges: Vec<Range<usize>>, num_k_blocks: usize) -> impl Iterator<Item = usize> {
    ranges.retain_mut(|r| {
        r.end = r.end.min(num_k_blocks);
        r.start < r.end
    });
    ranges.sort_unstable_by_key(|r| r.start);
    let mut next = 0; // first block not yet yielded
    ranges.into_iter().flat_map(move |r| {
        let from = r.start.max(next);
        next = next.max(r.end);
        from..r.end
    })
}

/// `qb - back ..= qb + ahead` as a range (saturating at 0, exclusive end).
fn around(qb: usize, back: usize, ahead: usize) -> Range<usize> {
    qb.saturating_sub(back)..qb.saturating_add(ahead).saturating_add(1)
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
    build(shape, false, |_, qb| {
        Ok(window_and_global(qb, window, global))
    })
}

/// Longformer's ranges for query block position `qb`: the window, the global key blocks, and
/// every block when `qb` is itself global.
fn window_and_global(qb: usize, window: usize, global: usize) -> Vec<Range<usize>> {
    let mut ranges = vec![around(qb, window, window), 0..global];
    if qb < global {
        ranges.push(0..usize::MAX);
    }
    ranges
}

/// The random key blocks BigBird adds for (`head`, query block position `q_block`): `count`
/// distinct blocks of `0..num_k_blocks` (all of them when `count >= num_k_blocks`), drawn by a
/// partial Fisher-Yates shuffle driven by SplitMix64 seeded from `(seed, head, q_block)`.
/// Public so that a test or an engine can re-derive the pattern.
///
/// Memory is O(`min(count, num_k_blocks)`); a draw above [`MAX_BLOCK_ENTRIES`] (more than a
/// list can hold) or one that cannot be allocated is a [`BlockMaskError::TooLarge`].
pub fn bigbird_random_blocks(
    seed: u64,
    head: usize,
    q_block: usize,
    num_k_blocks: usize,
    count: usize,
) -> Result<Vec<usize>, BlockMaskError> {
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
    let too_large = BlockMaskError::TooLarge {
        what: "the BigBird random block count",
    };
    if count > MAX_BLOCK_ENTRIES {
        return Err(too_large);
    }
    // Sparse Fisher-Yates: only the swapped positions are stored, so the cost is O(count).
    let mut swapped = std::collections::HashMap::new();
    let mut out = Vec::new();
    // Each draw stores at most two swapped positions.
    (swapped.try_reserve(count.saturating_mul(2)).ok())
        .and_then(|()| out.try_reserve_exact(count).ok())
        .ok_or(too_large)?;
    for p in 0..count {
        let r = p + (next() % (num_k_blocks - p) as u64) as usize;
        let at_r = *swapped.get(&r).unwrap_or(&r);
        let at_p = *swapped.get(&p).unwrap_or(&p);
        swapped.insert(r, at_p);
        out.push(at_r);
    }
    out.sort_unstable();
    Ok(out)
}

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
    build(shape, true, |h, qb| {
        let mut ranges = window_and_global(qb, window, global);
        if qb >= global {
            let drawn = bigbird_random_blocks(seed, h, qb, nk, random)?;
            ranges.extend(drawn.into_iter().map(|kb| kb..kb + 1));
        }
        Ok(ranges)
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
    build(shape, false, |_, qb| {
        let mut ranges = vec![around(qb, stride - 1, 0)];
        let behind = (qb % stride..=qb).step_by(stride);
        ranges.extend(behind.map(|kb| kb..kb + 1));
        Ok(ranges)
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
    // The summary blocks of a chunk start this far into it (== stride: none).
    let skip = stride.saturating_sub(summary);
    build(shape, false, |_, qb| {
        let own_chunk = qb - qb % stride..qb + 1;
        let mut ranges = vec![own_chunk.clone()];
        if skip < stride {
            // The earlier chunks (the own chunk is listed whole).
            let chunks = (0..own_chunk.start).step_by(stride);
            ranges.extend(chunks.map(|c| c + skip..c + stride));
        }
        Ok(ranges)
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
    build(shape, false, |_, qb| {
        let pq = ends.partition_point(|&e| e <= qb);
        let visited = match pq + 1 == passages.len() {
            true => 0..usize::MAX,
            false => pq.checked_sub(1).map_or(0, |p| ends[p])..ends[pq],
        };
        Ok(vec![visited])
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
    build(shape, true, |h, qb| Ok(vec![around(qb, windows[h] - 1, 0)]))
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
    build(shape, true, |h, qb| {
        let up_to_own = 0..qb + 1;
        Ok(match streaming[h] {
            false => vec![up_to_own],
            true => vec![0..sink.min(qb + 1), (qb + 1).saturating_sub(window)..qb + 1],
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pattern's lists equal its definition as a predicate on (head, query block
    /// position, key block), tested on every key block, for every small parameter set.
    #[test]
    fn lists_match_the_pattern_predicates() {
        let mut cases = 0;
        for (sq, sk) in [(1, 1), (3, 3), (5, 9), (9, 9), (2, 11), (12, 12), (0, 4)] {
            let shape = PatternShape {
                heads: 2,
                seqlen_q: sq,
                seqlen_k: sk,
                block: 1,
                mask: Mask::default(),
            };
            let nk = sk;
            let check = |m: BlockMask, pred: &dyn Fn(usize, usize, usize) -> bool, what| {
                let dims = m.dims();
                for h in 0..dims.heads {
                    for q in 0..dims.num_q_blocks {
                        let got: Vec<usize> =
                            m.list(0, h, q).unwrap().iter().map(|(kb, _)| kb).collect();
                        let want: Vec<usize> =
                            (0..nk).filter(|&kb| pred(h, q + sk - sq, kb)).collect();
                        assert_eq!(got, want, "{what} {sq}x{sk} head {h} q {q}");
                    }
                }
            };
            for a in 0..5 {
                for b in 0..5 {
                    cases += 1;
                    check(
                        longformer(&shape, a, b).unwrap(),
                        &|_, qb, kb| qb.abs_diff(kb) <= a || kb < b || qb < b,
                        format!("longformer {a} {b}"),
                    );
                    for seed in 0..3 {
                        let draw = |h, qb| bigbird_random_blocks(seed, h, qb, nk, b).unwrap();
                        check(
                            bigbird(&shape, a, 1, b, seed).unwrap(),
                            &|h, qb, kb| {
                                qb.abs_diff(kb) <= a
                                    || kb < 1
                                    || qb < 1
                                    || draw(h, qb).contains(&kb)
                            },
                            format!("bigbird {a} {b} {seed}"),
                        );
                    }
                    let Some(s) = a.checked_add(1) else { continue };
                    check(
                        sparse_transformer_strided(&shape, s).unwrap(),
                        &|_, qb, kb| kb <= qb && (qb - kb < s || (qb - kb).is_multiple_of(s)),
                        format!("strided {s}"),
                    );
                    check(
                        sparse_transformer_fixed(&shape, s, b).unwrap(),
                        &|_, qb, kb| kb <= qb && (kb / s == qb / s || b + kb % s >= s),
                        format!("fixed {s} {b}"),
                    );
                    check(
                        per_head_windows(&shape, &[s, b + 1]).unwrap(),
                        &|h, qb, kb| kb <= qb && qb - kb < [s, b + 1][h],
                        format!("windows {s} {b}"),
                    );
                    check(
                        streaming_heads(&shape, &[true, false], a, b).unwrap(),
                        &|h, qb, kb| kb <= qb && (h == 1 || kb < a || qb - kb < b),
                        format!("streaming {a} {b}"),
                    );
                }
            }
            // Every split of the key blocks into passages of 1..=3 blocks.
            let mut splits = vec![vec![]];
            while let Some(p) = splits.pop() {
                let used: usize = p.iter().sum();
                if used == nk {
                    let ends: Vec<usize> = p
                        .iter()
                        .scan(0, |e, &x| {
                            *e += x;
                            Some(*e)
                        })
                        .collect();
                    let passage = |kb: usize| ends.iter().position(|&e| kb < e).unwrap();
                    let last = p.len().wrapping_sub(1);
                    cases += 1;
                    check(
                        block_attention(&shape, &p).unwrap(),
                        &|_, qb, kb| passage(qb) == last || passage(qb) == passage(kb),
                        format!("passages {p:?}"),
                    );
                    continue;
                }
                for x in 1..=3.min(nk - used) {
                    splits.push([p.as_slice(), &[x]].concat());
                }
            }
        }
        assert!(cases > 300, "{cases}");
    }
}
