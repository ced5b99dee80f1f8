//! The deferred merge's slot table ([`super::RingMerge::Deferred`]): one output slot per piece
//! of a rank's whole ring, and for each range of shard rows the slots that cover it, so that
//! one launch at the end (`la_ring_gather`, `kernels/ring_merge.cu`) combines every row's
//! partial results in a single pass instead of a merge per piece.
//!
//! Layout (the kernel's, `kernels/include/longattn/ring.h`): slot `s` holds the piece's
//! output `[batch, rows, heads_q, head_dim]` (contiguous, the output dtype) at element
//! `o_offset` of one buffer and its LSE `[batch, heads_q, rows]` (f32) at `lse_offset` of
//! another; slots follow the plan's order (steps, then pieces). Host logic only: tested on
//! the CPU against the ring's CPU result.

use super::RingShape;
use super::plan::RankPlan;
use crate::error::{Error, Result};
use crate::layout::checked_elems;

/// One rank's slots and row segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotTable {
    /// `[slot][4]`, flat: `(o_offset, lse_offset, row0, rows)`.
    pub(crate) slots: Vec<i64>,
    /// `[segment][4]`, flat: `(start, end, first, count)`; shard rows `start..end` are
    /// covered by `list[first..first + count]`. Sorted, tiling `0..L_r` (at least one).
    pub(crate) segments: Vec<i32>,
    /// Slot indices, per segment.
    pub(crate) list: Vec<i32>,
    /// Elements of the output slots (output dtype) and of the LSE slots (f32).
    pub(crate) o_elems: usize,
    pub(crate) lse_elems: usize,
    /// `[step]`: the index of the step's first slot.
    pub(crate) step_first: Vec<usize>,
}

/// `x` as an `i32` field of the kernel's tables.
fn to_i32(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::Shape(format!("ring slot table: {what} {x} exceeds i32")))
}

/// `x` as an `i64` element offset.
fn to_i64(x: usize) -> Result<i64> {
    i64::try_from(x).map_err(|_| Error::Shape(format!("ring slot table: offset {x} exceeds i64")))
}

impl SlotTable {
    /// The table of `plan` (a rank with `len` shard rows) for `shape`.
    pub(crate) fn new(plan: &RankPlan, shape: RingShape, len: usize) -> Result<Self> {
        let RingShape {
            batch,
            heads_q,
            head_dim,
            ..
        } = shape;
        let row_o = checked_elems(&[batch, heads_q, head_dim], "ring slot row")?;
        let row_lse = checked_elems(&[batch, heads_q], "ring slot row")?;
        let (mut slots, mut step_first) = (Vec::new(), Vec::with_capacity(plan.steps.len()));
        let (mut o_elems, mut lse_elems) = (0usize, 0usize);
        let mut ranges = Vec::new();
        let overflow = || Error::Shape("ring slot table: the slots exceed usize".into());
        for step in &plan.steps {
            step_first.push(ranges.len());
            for piece in &step.pieces {
                let rows = &piece.q_rows;
                if rows.is_empty() || rows.end > len {
                    return Err(Error::Shape(format!(
                        "ring slot table: piece rows {rows:?} outside the shard's {len}"
                    )));
                }
                slots.extend([
                    to_i64(o_elems)?,
                    to_i64(lse_elems)?,
                    rows.start as i64,
                    rows.len() as i64,
                ]);
                o_elems = rows
                    .len()
                    .checked_mul(row_o)
                    .and_then(|n| n.checked_add(o_elems))
                    .ok_or_else(overflow)?;
                lse_elems = rows
                    .len()
                    .checked_mul(row_lse)
                    .and_then(|n| n.checked_add(lse_elems))
                    .ok_or_else(overflow)?;
                ranges.push(rows.clone());
            }
        }
        to_i64(o_elems)?;
        to_i32(ranges.len(), "slot count")?;
        // Segment bounds: every piece's first and past-the-end row, and the shard's ends.
        let mut bounds: Vec<usize> = ranges.iter().flat_map(|r| [r.start, r.end]).collect();
        bounds.extend([0, len]);
        bounds.sort_unstable();
        bounds.dedup();
        let (mut segments, mut list) = (Vec::new(), Vec::new());
        for w in bounds.windows(2) {
            let (start, end) = (w[0], w[1]);
            let first = list.len();
            for (s, r) in ranges.iter().enumerate() {
                if r.start <= start && end <= r.end {
                    list.push(s as i32);
                }
            }
            segments.extend([
                to_i32(start, "row")?,
                to_i32(end, "row")?,
                to_i32(first, "list index")?,
                to_i32(list.len() - first, "slot count")?,
            ]);
        }
        if segments.is_empty() {
            // An empty shard: one empty segment keeps the kernel's search in bounds.
            segments.extend([0, 0, 0, 0]);
        }
        Ok(SlotTable {
            slots,
            segments,
            list,
            o_elems,
            lse_elems,
            step_first,
        })
    }

    /// Slot `s`'s `(o_offset, lse_offset, row0, rows)`.
    pub(crate) fn slot(&self, s: usize) -> [usize; 4] {
        let x = &self.slots[4 * s..4 * s + 4];
        [x[0] as usize, x[1] as usize, x[2] as usize, x[3] as usize]
    }

    /// Segments, `(start, end, slots)`.
    #[cfg(test)]
    fn segments(&self) -> impl Iterator<Item = (usize, usize, &[i32])> {
        self.segments.chunks(4).map(|s| {
            let (first, count) = (s[2] as usize, s[3] as usize);
            (
                s[0] as usize,
                s[1] as usize,
                &self.list[first..first + count],
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Strided, Strides};
    use crate::ring::{RingAttention, RingLayout, Sharding};
    use crate::{AttentionOptions, Window};

    fn rings() -> Vec<RingAttention> {
        let shape = RingShape {
            batch: 2,
            heads_q: 3,
            heads_kv: 1,
            head_dim: 8,
        };
        let masks = [
            AttentionOptions::default(),
            AttentionOptions::causal(),
            AttentionOptions::default().with_window(Window::causal_tokens(9).unwrap()),
            AttentionOptions::default()
                .with_window(Window::causal_tokens(5).unwrap())
                .with_sinks(3),
            AttentionOptions::default().with_window(Window::new(Some(7), Some(4))),
        ];
        let mut out = Vec::new();
        for world in [1, 2, 3, 5] {
            for sharding in [Sharding::Contiguous, Sharding::Zigzag, Sharding::Stripe] {
                for opts in &masks {
                    let layout = RingLayout::new(53, world, sharding).unwrap();
                    out.push(RingAttention::new(layout, shape, opts).unwrap());
                }
            }
        }
        out
    }

    /// Every row's covering slots are exactly the pieces whose rows hold it, the segments
    /// tile the shard, the slots tile their buffers.
    #[test]
    fn segments_cover_each_row_with_its_pieces() {
        for ring in rings() {
            for plan in ring.plans().unwrap() {
                let len = ring.layout().shard_len(plan.rank);
                let t = SlotTable::new(&plan, ring.shape(), len).unwrap();
                let pieces: Vec<_> = plan.steps.iter().flat_map(|s| &s.pieces).collect();
                assert_eq!(t.slots.len(), 4 * pieces.len());
                let mut next = 0;
                for (start, end, slots) in t.segments() {
                    assert_eq!(start, next, "segments tile the shard");
                    assert!(start < end || len == 0);
                    next = end;
                    for i in start..end {
                        let want: Vec<i32> = (0..pieces.len() as i32)
                            .filter(|&s| pieces[s as usize].q_rows.contains(&i))
                            .collect();
                        assert_eq!(slots, &want[..], "rank {} row {i}", plan.rank);
                    }
                }
                assert_eq!(next, len);
                let (mut o, mut l) = (0, 0);
                for (s, p) in pieces.iter().enumerate() {
                    let [oo, lo, row0, rows] = t.slot(s);
                    assert_eq!((oo, lo, row0, rows), (o, l, p.q_rows.start, p.q_rows.len()));
                    o += rows * 2 * 3 * 8;
                    l += rows * 2 * 3;
                }
                assert_eq!((t.o_elems, t.lse_elems), (o, l));
                let firsts: Vec<usize> = plan
                    .steps
                    .iter()
                    .scan(0, |n, s| {
                        let f = *n;
                        *n += s.pieces.len();
                        Some(f)
                    })
                    .collect();
                assert_eq!(t.step_first, firsts);
            }
        }
    }

    /// The deferred merge on the CPU: every piece into its slot (the dense CPU path, f32),
    /// then each row combined from its segment's slots with the gather kernel's arithmetic;
    /// equal to the running merge of the same pieces (the CPU ring's `merge_piece_cpu`),
    /// output and LSE.
    #[test]
    fn gathered_slots_equal_the_running_merge() {
        use rand::{Rng, SeedableRng};
        for (n, ring) in rings().into_iter().enumerate() {
            let RingShape {
                batch,
                heads_q,
                heads_kv,
                head_dim: d,
            } = ring.shape();
            let layout = *ring.layout();
            let mut g = rand::rngs::StdRng::seed_from_u64(n as u64);
            let mut shard = |r: usize, heads: usize| -> Vec<f32> {
                (0..batch * layout.shard_len(r) * heads * d)
                    .map(|_| g.random_range(-1.0..1.0))
                    .collect()
            };
            let world = layout.world();
            let qs: Vec<_> = (0..world).map(|r| shard(r, heads_q)).collect();
            let ks: Vec<_> = (0..world).map(|r| shard(r, heads_kv)).collect();
            let vs: Vec<_> = (0..world).map(|r| shard(r, heads_kv)).collect();
            for plan in ring.plans().unwrap() {
                let r = plan.rank;
                let len = layout.shard_len(r);
                let t = SlotTable::new(&plan, ring.shape(), len).unwrap();
                let qst = Strides::contiguous(len, heads_q, d);
                let q = Strided::new(&qs[r][..], qst);
                let (mut so, mut sl) = (vec![f32::NAN; t.o_elems], vec![f32::NAN; t.lse_elems]);
                let (mut want_o, mut want_l) = ring.empty_state(r);
                let pieces = plan
                    .steps
                    .iter()
                    .flat_map(|st| st.pieces.iter().map(|p| (st.source, p)));
                for (slot, (src, piece)) in pieces.enumerate() {
                    let kst = ring.kv_strides(src);
                    let (k, v) = (
                        Strided::new(&ks[src][..], kst),
                        Strided::new(&vs[src][..], kst),
                    );
                    ring.merge_piece_cpu(r, piece, &q, &k, &v, &mut want_o, &mut want_l)
                        .unwrap();
                    let [oo, lo, _, rows] = t.slot(slot);
                    let attn = ring.piece_attention(piece).unwrap();
                    let row = |st: &Strides, r0: usize| (r0 as i64 * st.seq) as usize;
                    attn.forward_cpu(
                        Strided::new(&qs[r][row(&qst, piece.q_rows.start)..], qst),
                        Strided::new(&ks[src][row(&kst, piece.k_rows.start)..], kst),
                        Strided::new(&vs[src][row(&kst, piece.k_rows.start)..], kst),
                        Strided::new(
                            &mut so[oo..oo + attn.out_len()],
                            Strides::contiguous(rows, heads_q, d),
                        ),
                        Some(&mut sl[lo..lo + attn.lse_len()]),
                    )
                    .unwrap();
                }
                // The gather kernel's arithmetic, row by row; the running state's layout is
                // [batch, heads_q, len, head_dim] and [batch, heads_q, len].
                let mut err = 0.0f32;
                for (start, end, slots) in t.segments() {
                    for i in start..end {
                        for bh in 0..batch * heads_q {
                            let (b, h) = (bh / heads_q, bh % heads_q);
                            let parts: Vec<(f32, usize)> = slots
                                .iter()
                                .map(|&x| {
                                    let [oo, lo, row0, rows] = t.slot(x as usize);
                                    let li = i - row0;
                                    (
                                        sl[lo + bh * rows + li],
                                        oo + ((b * rows + li) * heads_q + h) * d,
                                    )
                                })
                                .collect();
                            let m = parts.iter().fold(f32::NEG_INFINITY, |a, p| a.max(p.0));
                            let w = |l: f32| {
                                if m == f32::NEG_INFINITY {
                                    0.0
                                } else {
                                    (l - m).exp()
                                }
                            };
                            let sum: f32 = parts.iter().map(|p| w(p.0)).sum();
                            let lse = if sum > 0.0 {
                                m + sum.ln()
                            } else {
                                f32::NEG_INFINITY
                            };
                            let si = bh * len + i;
                            assert!(
                                lse == want_l[si] || (lse - want_l[si]).abs() < 1e-5,
                                "{layout:?} rank {r} row {i}: lse {lse} vs {}",
                                want_l[si]
                            );
                            for c in 0..d {
                                let acc: f32 = parts.iter().map(|&(l, o)| w(l) * so[o + c]).sum();
                                let got = if sum > 0.0 { acc / sum } else { 0.0 };
                                err = err.max((got - want_o[si * d + c]).abs());
                            }
                        }
                    }
                }
                assert!(
                    err < 1e-5,
                    "{layout:?} rank {r}: max |gathered - running| = {err}"
                );
            }
        }
    }
}
