//! Ring (sequence-parallel) attention, per `semantics.md` ("Ring attention"): one sequence
//! of `seqlen` tokens is sharded over `world` ranks; each rank keeps its query shard while
//! the key/value shards travel around the ring (at step `t` rank `r` holds the shard of rank
//! `(r - t) mod world`), and every step computes partial attention at **global** positions
//! (so causal, window and sink masks use global indices) and merges it into the rank's
//! running `(o, lse)` with the LSE merge. A step whose shard is entirely masked for the
//! rank's queries is skipped, and so is a transfer no later rank needs.
//!
//! Here: the sharding schemes ([`Sharding`]: contiguous, zigzag, stripe), the ring
//! schedule ([`RingAttention::schedule`]: which steps compute, which transfers are needed,
//! the work per rank), the decomposition of a step into plain dense attention calls
//! ([`RingAttention::pieces`], [`block_pieces`]: a query block and a key block at global
//! positions become at most two [`FlashAttention`] problems whose
//! local `(left, right)` windows reproduce the global mask exactly), and the CPU driver over
//! simulated ranks ([`RingAttention::forward_cpu`]), which runs those pieces and merges them,
//! and equals single-device attention over the whole sequence with the same mask.

use crate::dense::{AttentionOptions, AttentionShape, FlashAttention};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::layout::{SeqLens, Strided, Strides, check_attention_args, check_heads};
use crate::mask::{Mask, Window};
use crate::softmax::merge_into_row;
use rayon::prelude::*;
use std::ops::Range;

pub mod comm;
pub mod gpu;
pub mod plan;
mod slots;
pub mod star;

pub use comm::{Bootstrap, RingComm, SelfComm};
pub use gpu::{
    InProcessRing, RankBuffers, RingElement, RingGpuReport, RingMerge, RingRank, RingRankWorkspace,
    RingStepTime, RingTimeline,
};
pub use plan::{KvBuffer, PlannedStep, RankPlan, Transfer, TransferCount};
pub use star::StarAttention;

/// Most ranks of a ring (the schedule holds `world^2` entries per table).
pub const MAX_RING_WORLD: usize = 4096;

/// How the tokens of the sequence are dealt to the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sharding {
    /// Rank `r` holds tokens `[r * seqlen / world, (r + 1) * seqlen / world)` (plain ring:
    /// under a causal mask rank `r` does `2r + 1` times the work of rank 0).
    Contiguous,
    /// The sequence is cut into `2 * world` chunks (chunk `c` = tokens `[c * seqlen / (2 *
    /// world), (c + 1) * seqlen / (2 * world))`) and rank `r` holds chunks `r` and
    /// `2 * world - 1 - r`: an early and a late chunk, so causal work is balanced.
    Zigzag,
    /// Token `t` lives on rank `t mod world`.
    Stripe,
}

/// The sharding of one sequence of `seqlen` tokens over `world` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RingLayout {
    seqlen: usize,
    world: usize,
    sharding: Sharding,
}

impl RingLayout {
    /// `world >= 1` ranks and `seqlen >= 1` tokens; a rank may hold no token when
    /// `seqlen < world` (zigzag: `seqlen < 2 * world`).
    pub fn new(seqlen: usize, world: usize, sharding: Sharding) -> Result<Self> {
        if world == 0 || seqlen == 0 {
            return Err(Error::Shape(format!(
                "ring layout: seqlen ({seqlen}) and world ({world}) must be >= 1"
            )));
        }
        if world > MAX_RING_WORLD {
            return Err(Error::Unsupported(format!(
                "ring layout: world ({world}) above MAX_RING_WORLD = {MAX_RING_WORLD}"
            )));
        }
        if seqlen > i32::MAX as usize {
            return Err(Error::Shape(format!(
                "ring layout: seqlen ({seqlen}) must fit in i32"
            )));
        }
        Ok(RingLayout {
            seqlen,
            world,
            sharding,
        })
    }

    /// Tokens in the whole sequence.
    pub fn seqlen(&self) -> usize {
        self.seqlen
    }
    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }
    /// How the sequence is split across the ranks.
    pub fn sharding(&self) -> Sharding {
        self.sharding
    }

    /// Global positions of rank `rank`'s tokens, ascending: its shard's row `i` is token
    /// `positions(rank)[i]` of the sequence.
    pub fn positions(&self, rank: usize) -> Vec<usize> {
        self.blocks(rank)
            .iter()
            .flat_map(|b| (0..b.len).map(move |i| b.pos0 + i * b.stride))
            .collect()
    }

    /// Rank `rank`'s shard as runs of evenly spaced positions (local rows in order).
    pub fn blocks(&self, rank: usize) -> Vec<GlobalBlock> {
        let (s, n) = (self.seqlen, self.world);
        if rank >= n {
            return Vec::new();
        }
        let cut = |parts: usize, c: usize| (c * s / parts, (c + 1) * s / parts);
        let runs = match self.sharding {
            Sharding::Contiguous => vec![cut(n, rank)],
            Sharding::Zigzag => vec![cut(2 * n, rank), cut(2 * n, 2 * n - 1 - rank)],
            Sharding::Stripe => {
                let len = (s - rank.min(s)).div_ceil(n);
                return vec![GlobalBlock {
                    row0: 0,
                    len,
                    pos0: rank,
                    stride: n,
                }];
            }
        };
        let mut row0 = 0;
        runs.into_iter()
            .map(|(a, b)| {
                let blk = GlobalBlock {
                    row0,
                    len: b - a,
                    pos0: a,
                    stride: 1,
                };
                row0 += b - a;
                blk
            })
            .collect()
    }

    /// Splits a contiguous `[batch, seqlen, row]` host tensor (`row` elements per token, e.g.
    /// `heads * head_dim`) into the ranks' contiguous `[batch, L_r, row]` shards.
    pub fn shard<T: Copy>(&self, x: &[T], batch: usize, row: usize) -> Result<Vec<Vec<T>>> {
        let need = self.whole_len(batch, row)?;
        if x.len() != need {
            return Err(Error::Shape(format!(
                "shard: the tensor holds {} elements, [batch, seqlen, row] = [{batch}, {}, {row}] \
                 needs {need}",
                x.len(),
                self.seqlen
            )));
        }
        if need == 0 {
            // No element (batch or row 0): nothing proportional to the sequence is built.
            return Ok(vec![Vec::new(); self.world]);
        }
        Ok((0..self.world)
            .map(|r| {
                let pos = self.positions(r);
                let mut out = Vec::with_capacity(batch * pos.len() * row);
                for b in 0..batch {
                    for &p in &pos {
                        let off = (b * self.seqlen + p) * row;
                        out.extend_from_slice(&x[off..off + row]);
                    }
                }
                out
            })
            .collect())
    }

    /// The inverse of [`RingLayout::shard`]: the ranks' `[batch, L_r, row]` shards back into
    /// one contiguous `[batch, seqlen, row]` tensor.
    pub fn unshard<T: Copy + Default>(
        &self,
        shards: &[Vec<T>],
        batch: usize,
        row: usize,
    ) -> Result<Vec<T>> {
        if shards.len() != self.world {
            return Err(Error::Shape(format!(
                "unshard: {} shards for a world of {} ranks",
                shards.len(),
                self.world
            )));
        }
        let whole = self.whole_len(batch, row)?;
        // Every shard is checked before anything is allocated; the output is then exactly
        // as large as the shards the caller passed.
        for (r, shard) in shards.iter().enumerate() {
            let need = self.shard_len(r) * batch * row; // <= whole: cannot overflow
            if shard.len() != need {
                return Err(Error::Shape(format!(
                    "unshard: shard {r} holds {} elements, [batch, L_r, row] needs {need}",
                    shard.len(),
                )));
            }
        }
        if whole == 0 {
            return Ok(Vec::new()); // no element: no walk over batch x positions
        }
        let mut x = vec![T::default(); whole];
        for (r, shard) in shards.iter().enumerate() {
            let pos = self.positions(r);
            for b in 0..batch {
                for (i, &p) in pos.iter().enumerate() {
                    let (src, dst) = ((b * pos.len() + i) * row, (b * self.seqlen + p) * row);
                    x[dst..dst + row].copy_from_slice(&shard[src..src + row]);
                }
            }
        }
        Ok(x)
    }

    /// Elements of a whole `[batch, seqlen, row]` tensor (an error if the count overflows).
    fn whole_len(&self, batch: usize, row: usize) -> Result<usize> {
        batch
            .checked_mul(self.seqlen)
            .and_then(|n| n.checked_mul(row))
            .ok_or_else(|| Error::Shape(format!("[{batch}, {}, {row}] overflows", self.seqlen)))
    }

    /// Tokens held by rank `rank`.
    pub fn shard_len(&self, rank: usize) -> usize {
        self.blocks(rank).iter().map(|b| b.len).sum()
    }

    /// The shard rank `rank` holds at ring step `step`: `(rank - step) mod world` (ranks and
    /// steps are taken modulo `world`).
    pub fn kv_source(&self, rank: usize, step: usize) -> usize {
        let n = self.world;
        (rank % n + n - step % n) % n
    }
}

/// Rows of a shard that hold evenly spaced global positions: local rows `row0..row0 + len`
/// are tokens `pos0, pos0 + stride, ...` (a contiguous or zigzag chunk has stride 1, a
/// stripe shard stride `world`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GlobalBlock {
    /// First local row of the block in the shard.
    pub row0: usize,
    /// Rows in the block.
    pub len: usize,
    /// Global position of the block's first row.
    pub pos0: usize,
    /// Global position step between consecutive rows.
    pub stride: usize,
}

impl GlobalBlock {
    /// The global positions of the block's rows, in order.
    pub fn positions(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.len).map(|k| self.pos0 + k * self.stride)
    }

    /// How many of the block's positions lie in `range` (O(1)).
    pub fn count_in(&self, range: &Range<usize>) -> usize {
        if self.len == 0 || range.is_empty() {
            return 0;
        }
        let stride = self.stride.max(1);
        // First index k with pos0 + k*stride >= range.start, first with >= range.end.
        let first_at_least = |x: usize| -> usize {
            if x <= self.pos0 {
                0
            } else {
                (x - self.pos0).div_ceil(stride).min(self.len)
            }
        };
        first_at_least(range.end) - first_at_least(range.start)
    }
}

/// One plain dense attention problem of a ring step: the query rows `q_rows` of the rank's
/// shard against the key rows `k_rows` of the shard it holds, with `mask` in the local,
/// bottom-right aligned coordinates of that problem (`sq = q_rows.len()`, `sk =
/// k_rows.len()`). Its rows see exactly the keys of `k_rows` the global mask shows them; rows
/// past `q_rows` see none of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingPiece {
    /// Query rows of the rank's shard.
    pub q_rows: Range<usize>,
    /// Key rows of the held K/V shard.
    pub k_rows: Range<usize>,
    /// The element mask in the piece's local coordinates.
    pub mask: Mask,
}

/// Query rows `0..lq` against key rows `0..lk` where key `j` is visible to row `i` iff `lo
/// <= j - i <= hi` (`None`: unbounded): the rows and keys that can see anything, as a dense
/// problem with its local window. Trailing keys no row reaches and trailing rows that reach
/// no key are cut, which makes both window sides non-negative; `None` if nothing is visible.
fn band_piece(
    lq: usize,
    lk: usize,
    lo: Option<i64>,
    hi: Option<i64>,
) -> Option<(usize, usize, Window)> {
    let (lq, lk) = (lq as i64, lk as i64);
    let lk = hi.map_or(lk, |c| lk.min(lq + c));
    let lq = lo.map_or(lq, |a| lq.min(lk - a));
    if lq <= 0 || lk <= 0 || matches!((lo, hi), (Some(a), Some(c)) if a > c) {
        return None;
    }
    let diag = lk - lq; // the local diagonal's offset j - i
    // A left side >= lk - 1 (right side >= lq - 1) already shows every key to every row:
    // clamped there, the sides fit in i32 like the shard lengths, whatever the global window.
    let left = lo.map(|a| (diag - a).min(lk) as usize);
    let right = hi.map(|c| (c - diag).min(lq) as usize);
    Some((lq as usize, lk as usize, Window::new(left, right)))
}

/// The dense problems that compute attention of query block `q` over key block `k` (both at
/// global positions of one sequence of `seqlen` tokens, same stride) under `mask` (global,
/// `seqlen_q == seqlen_k == seqlen`): one piece for the window, plus one for the sink keys
/// when the window has a left bound (sinks left of it are visible too, up to the right
/// bound). Every returned piece has `sinks == 0` and window sides >= 0 (or unbounded), so
/// any dense kernel runs it; an empty list means the blocks see nothing of each other.
///
/// Errors: blocks that do not share one positive stride (both must come from one sharding),
/// positions, rows, lengths or strides past `i32::MAX`, window sides or sinks past
/// `i32::MAX` (the dense problems' limits).
pub fn block_pieces(q: GlobalBlock, k: GlobalBlock, mask: Mask) -> Result<Vec<RingPiece>> {
    if q.stride != k.stride || q.stride == 0 {
        return Err(Error::Shape(format!(
            "block_pieces: strides {} and {} must be equal and >= 1",
            q.stride, k.stride
        )));
    }
    let lim = i32::MAX as usize;
    for (name, b) in [("q", q), ("k", k)] {
        let end_row = b.row0.checked_add(b.len);
        let last_pos = b
            .len
            .checked_sub(1)
            .map(|n| n.checked_mul(b.stride).and_then(|x| x.checked_add(b.pos0)));
        if end_row.is_none_or(|e| e > lim)
            || last_pos.is_some_and(|p| p.is_none_or(|p| p > lim))
            || b.pos0 > lim
            || b.stride > lim
        {
            return Err(Error::Shape(format!(
                "block_pieces: {name} block {b:?} reaches past {lim} rows or positions"
            )));
        }
    }
    let sides = [mask.window.left, mask.window.right, Some(mask.sinks)];
    if sides.iter().flatten().any(|&x| x > lim) {
        return Err(Error::InvalidOption(format!(
            "block_pieces: window {:?} and sinks {} must be at most {lim}",
            mask.window, mask.sinks
        )));
    }
    Ok(pieces_unchecked(q, k, mask))
}

/// [`block_pieces`] for validated blocks and mask (all values within `i32::MAX`).
fn pieces_unchecked(q: GlobalBlock, k: GlobalBlock, mask: Mask) -> Vec<RingPiece> {
    if q.len == 0 || k.len == 0 {
        return Vec::new();
    }
    // Global: p_i - left <= t_j <= p_i + right with p_i = pos0_q + s i, t_j = pos0_k + s j,
    // i.e. ceil((dq - left) / s) <= j - i <= floor((dq + right) / s), dq = pos0_q - pos0_k.
    let s = q.stride as i64;
    let dq = q.pos0 as i64 - k.pos0 as i64;
    let lo = mask
        .window
        .left
        .map(|l| (dq - l as i64).div_euclid(s) + i64::from((dq - l as i64).rem_euclid(s) != 0));
    let hi = mask.window.right.map(|r| (dq + r as i64).div_euclid(s));
    // Sink keys t_j < sinks: j < ceil((sinks - pos0_k) / s).
    let sink_keys = if mask.window.left.is_some() && mask.sinks > k.pos0 {
        (mask.sinks - k.pos0).div_ceil(q.stride).min(k.len)
    } else {
        0
    };
    let mut pieces = Vec::new();
    let mut push = |k_first: usize, lk: usize, lo: Option<i64>, hi: Option<i64>| {
        let shift = k_first as i64; // band of j - i relative to the sub-block's first key
        if let Some((lq, lk, window)) =
            band_piece(q.len, lk, lo.map(|a| a - shift), hi.map(|c| c - shift))
        {
            pieces.push(RingPiece {
                q_rows: q.row0..q.row0 + lq,
                k_rows: k.row0 + k_first..k.row0 + k_first + lk,
                mask: Mask::new(window, 0),
            });
        }
    };
    if sink_keys > 0 {
        push(0, sink_keys, None, hi);
    }
    push(sink_keys, k.len - sink_keys, lo, hi);
    pieces
}

/// The pieces of one ring step with every pair whose union is itself one band problem
/// merged into it, until no pair merges: fewer, larger dense calls and fewer merges (a
/// zigzag shard's two chunks against an earlier shard are one full piece instead of two,
/// its own diagonal step one causal piece instead of three). Exact: [`union_piece`] merges
/// only when the union's window shows every key each piece showed and nothing else.
fn coalesce(mut pieces: Vec<RingPiece>) -> Vec<RingPiece> {
    'merge: loop {
        for a in 0..pieces.len() {
            for b in a + 1..pieces.len() {
                if let Some(u) = union_piece(&pieces[a], &pieces[b]) {
                    pieces[a] = u;
                    pieces.remove(b);
                    continue 'merge;
                }
            }
        }
        return pieces;
    }
}

/// One piece over the bounding rectangle of `a` and `b` whose local window reproduces both
/// (and shows nothing in the rectangle's cells neither covers), if there is one.
///
/// In the rectangle's bottom-right aligned coordinates a key `j` is visible to row `i` iff
/// `d = j - i - (sk - sq)` lies in `[-left, right]`; each piece's window is such an interval
/// of `d` shifted by its offset in the rectangle. Within any sub-rectangle every `d` between
/// its corners occurs, so two windows agree there iff their intervals clipped to that range
/// agree: the union's interval is the hull of the pieces' clipped intervals, checked against
/// each piece and each uncovered cell.
fn union_piece(a: &RingPiece, b: &RingPiece) -> Option<RingPiece> {
    let overlap = |x: &Range<usize>, y: &Range<usize>| x.start < y.end && y.start < x.end;
    if overlap(&a.q_rows, &b.q_rows) && overlap(&a.k_rows, &b.k_rows) {
        return None;
    }
    let (q0, q1) = (
        a.q_rows.start.min(b.q_rows.start),
        a.q_rows.end.max(b.q_rows.end),
    );
    let (k0, k1) = (
        a.k_rows.start.min(b.k_rows.start),
        a.k_rows.end.max(b.k_rows.end),
    );
    let c = (k1 - k0) as i64 - (q1 - q0) as i64;
    // The range of d over rows `qr` and keys `kr` of the rectangle.
    let span = |qr: &Range<usize>, kr: &Range<usize>| {
        let (qs, ks) = ((qr.start - q0) as i64, (kr.start - k0) as i64);
        (
            ks - (qs + qr.len() as i64 - 1) - c,
            ks + kr.len() as i64 - 1 - qs - c,
        )
    };
    // A piece's visible interval of d, clipped to its rectangle.
    let clipped = |p: &RingPiece| {
        let (lo, hi) = span(&p.q_rows, &p.k_rows);
        let shift = lo - (1 - p.k_rows.len() as i64); // its own d is the union's d - shift
        let l = p.mask.window.left.map_or(lo, |l| lo.max(shift - l as i64));
        let h = p.mask.window.right.map_or(hi, |r| hi.min(shift + r as i64));
        (l, h)
    };
    let (ca, cb) = (clipped(a), clipped(b));
    if ca.0 > ca.1 || cb.0 > cb.1 || a.mask.sinks != 0 || b.mask.sinks != 0 {
        return None;
    }
    let (lo, hi) = (ca.0.min(cb.0), ca.1.max(cb.1));
    // The union's interval clipped to a cell, `None` if empty.
    let within =
        |(cl, ch): (i64, i64)| (lo.max(cl) <= hi.min(ch)).then(|| (lo.max(cl), hi.min(ch)));
    for (p, cp) in [(a, ca), (b, cb)] {
        if within(span(&p.q_rows, &p.k_rows)) != Some(cp) {
            return None;
        }
    }
    let cuts = |x: &Range<usize>, y: &Range<usize>, s: usize, e: usize| {
        let mut v = vec![s, e, x.start, x.end, y.start, y.end];
        v.sort_unstable();
        v.dedup();
        v
    };
    let (qc, kc) = (
        cuts(&a.q_rows, &b.q_rows, q0, q1),
        cuts(&a.k_rows, &b.k_rows, k0, k1),
    );
    for qw in qc.windows(2) {
        for kw in kc.windows(2) {
            let (qr, kr) = (qw[0]..qw[1], kw[0]..kw[1]);
            let inside = |p: &RingPiece| {
                p.q_rows.start <= qr.start
                    && qr.end <= p.q_rows.end
                    && p.k_rows.start <= kr.start
                    && kr.end <= p.k_rows.end
            };
            if !inside(a) && !inside(b) && within(span(&qr, &kr)).is_some() {
                return None;
            }
        }
    }
    let (dmin, dmax) = (1 - (k1 - k0) as i64, (q1 - q0) as i64 - 1);
    let left = (lo > dmin).then_some(-lo);
    let right = (hi < dmax).then_some(hi);
    if left.is_some_and(|l| l < 0) || right.is_some_and(|r| r < 0) {
        return None;
    }
    Some(RingPiece {
        q_rows: q0..q1,
        k_rows: k0..k1,
        mask: Mask::new(
            Window::new(left.map(|l| l as usize), right.map(|r| r as usize)),
            0,
        ),
    })
}

/// What the ring does, decided from the layout and the mask alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingSchedule {
    /// `[rank][step]`: whether rank `rank` computes at step `step` (some query of the rank
    /// sees some key of the shard it holds then); `false` steps are skipped.
    pub compute: Vec<Vec<bool>>,
    /// `[step][shard]` for steps `0..world - 1`: whether shard `shard` is sent on after
    /// step `step` (from rank `(shard + step) mod world` to the next), i.e. whether a rank
    /// it has not reached yet needs it.
    pub send: Vec<Vec<bool>>,
    /// `[rank]`: visible (query, key) pairs per (batch, head), the rank's share of the work.
    pub pairs: Vec<u64>,
}

impl RingSchedule {
    /// Most work on one rank over the mean work per rank (1.0 is perfect balance; the
    /// step time of a synchronous ring is set by the busiest rank).
    pub fn imbalance(&self) -> f64 {
        let total: u64 = self.pairs.iter().sum();
        if total == 0 {
            return 1.0;
        }
        let max = *self.pairs.iter().max().unwrap_or(&0) as f64;
        max * self.pairs.len() as f64 / total as f64
    }
}

/// Problem dimensions of a ring attention call (the sequence length is the layout's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingShape {
    /// Sequences in the batch.
    pub batch: usize,
    /// Query heads; a multiple of `heads_kv`.
    pub heads_q: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// Elements per head vector.
    pub head_dim: usize,
}

impl RingShape {
    /// The dense problem of `seqlen_q` queries over `seqlen_k` keys with these heads:
    /// `mask` as given (`causal` off: the mask says it), `scale` and `softcap`.
    pub(crate) fn attention(
        &self,
        seqlen_q: usize,
        seqlen_k: usize,
        mask: Mask,
        scale: f32,
        softcap: Option<f32>,
    ) -> Result<FlashAttention> {
        let RingShape {
            batch,
            heads_q,
            heads_kv,
            head_dim,
        } = *self;
        FlashAttention::new(
            &AttentionShape {
                batch,
                heads_q,
                heads_kv,
                head_dim,
                seqlens: SeqLens::Fixed { seqlen_q, seqlen_k },
            },
            &AttentionOptions {
                scale: Some(scale),
                mask,
                causal: false,
                softcap,
            },
        )
    }
}

/// Validated ring self-attention over `layout.seqlen()` tokens (the same sequence gives the
/// queries and the keys, so `seqlen_q == seqlen_k` and the diagonal is the main one).
///
/// Per rank `r` with `L_r = layout.shard_len(r)` tokens: `q, out: [batch, L_r, heads_q,
/// head_dim]`, `k, v: [batch, L_r, heads_kv, head_dim]` (element strides, last dim
/// contiguous), `lse: [batch, heads_q, L_r]` f32, natural log. Row `i` of a shard is global
/// token `layout.positions(r)[i]`.
#[derive(Debug, Clone)]
pub struct RingAttention {
    layout: RingLayout,
    shape: RingShape,
    mask: Mask,
    scale: f32,
    softcap: Option<f32>,
}

impl RingAttention {
    /// Validates `shape` and `options` over `layout` (heads, element counts, scale).
    pub fn new(layout: RingLayout, shape: RingShape, options: &AttentionOptions) -> Result<Self> {
        let RingShape {
            batch,
            heads_q,
            heads_kv,
            head_dim,
        } = shape;
        check_heads("ring: ", batch, heads_q, heads_kv, head_dim)?;
        let elems = [batch, layout.seqlen, heads_q.max(heads_kv), head_dim]
            .iter()
            .try_fold(1usize, |acc, &x| acc.checked_mul(x))
            .filter(|&n| n <= i64::MAX as usize);
        if elems.is_none() {
            return Err(Error::Shape(format!(
                "ring: {shape:?} over {} tokens has more elements than an i64 can index",
                layout.seqlen
            )));
        }
        let scale = options.resolve_scale(head_dim)?;
        Ok(RingAttention {
            layout,
            shape,
            mask: options.effective_mask(),
            scale,
            softcap: options.effective_softcap(),
        })
    }

    /// How the sequence is sharded over the ranks.
    pub fn layout(&self) -> &RingLayout {
        &self.layout
    }
    /// The problem dimensions.
    pub fn shape(&self) -> RingShape {
        self.shape
    }
    /// The global mask in force (the options' mask with `causal` folded in).
    pub fn mask(&self) -> Mask {
        self.mask
    }

    /// Elements of rank `rank`'s contiguous q or out shard.
    pub fn out_len(&self, rank: usize) -> usize {
        self.shape.batch * self.layout.shard_len(rank) * self.shape.heads_q * self.shape.head_dim
    }
    /// Elements of rank `rank`'s contiguous k or v shard.
    pub fn kv_len(&self, rank: usize) -> usize {
        self.shape.batch * self.layout.shard_len(rank) * self.shape.heads_kv * self.shape.head_dim
    }
    /// Values of rank `rank`'s LSE, `[batch, heads_q, L_r]`.
    pub fn lse_len(&self, rank: usize) -> usize {
        self.shape.batch * self.shape.heads_q * self.layout.shard_len(rank)
    }

    /// Keys of shard `blocks` that global query `i` sees: the sink keys left of the window
    /// plus the window's keys (which already hold every sink key inside it), counted per
    /// block in O(1) without listing positions.
    fn visible_count(&self, i: usize, blocks: &[GlobalBlock]) -> u64 {
        let s = self.layout.seqlen;
        let window = self.mask.window_range(i, s, s);
        let sinks = self.mask.sink_range_rows(i..i + 1, s, s);
        let sinks_left = if window.is_empty() {
            sinks
        } else {
            0..sinks.end.min(window.start)
        };
        blocks
            .iter()
            .map(|b| (b.count_in(&sinks_left) + b.count_in(&window)) as u64)
            .sum()
    }

    /// The schedule: which steps compute, which transfers are needed, work per rank.
    ///
    /// Cost: O(world * seqlen) time (every query position against every shard's blocks,
    /// O(1) each) and O(world²) memory (the `[rank][step]` and `[step][shard]` tables, at
    /// most [`MAX_RING_WORLD`]² entries each); nothing proportional to the sequence is
    /// allocated.
    pub fn schedule(&self) -> RingSchedule {
        let n = self.layout.world;
        let blocks: Vec<Vec<GlobalBlock>> = (0..n).map(|r| self.layout.blocks(r)).collect();
        // pairs[r][s]: visible pairs between rank r's queries and shard s's keys.
        let pairs: Vec<Vec<u64>> = (0..n)
            .map(|r| {
                (0..n)
                    .map(|s| {
                        blocks[r]
                            .iter()
                            .flat_map(|b| b.positions())
                            .map(|i| self.visible_count(i, &blocks[s]))
                            .sum()
                    })
                    .collect()
            })
            .collect();
        let compute = (0..n)
            .map(|r| {
                (0..n)
                    .map(|t| pairs[r][self.layout.kv_source(r, t)] > 0)
                    .collect()
            })
            .collect();
        // Shard s reaches rank (s + d) mod n after d steps; it is sent on after step t iff a
        // rank it reaches later (d > t) needs it: `last_need[s]` is the largest such d.
        let last_need: Vec<usize> = (0..n)
            .map(|s| {
                (1..n)
                    .rev()
                    .find(|&d| pairs[(s + d) % n][s] > 0)
                    .unwrap_or(0)
            })
            .collect();
        let send = (0..n.saturating_sub(1))
            .map(|t| (0..n).map(|s| last_need[s] > t).collect())
            .collect();
        RingSchedule {
            compute,
            send,
            pairs: pairs.iter().map(|row| row.iter().sum()).collect(),
        }
    }

    /// Validates the per-rank arguments: `(elements, strides)` of every q, k, v and out
    /// shard and the length of every LSE buffer (any buffer kind: host or device).
    pub(crate) fn check_shards(
        &self,
        q: &[(usize, Strides)],
        k: &[(usize, Strides)],
        v: &[(usize, Strides)],
        out: &[(usize, Strides)],
        lse: Option<&[usize]>,
    ) -> Result<()> {
        let n = self.layout.world;
        for (name, count) in [
            ("q", q.len()),
            ("k", k.len()),
            ("v", v.len()),
            ("out", out.len()),
            ("lse", lse.map_or(n, |l| l.len())),
        ] {
            if count != n {
                return Err(Error::Shape(format!(
                    "ring: {count} {name} shards given for a world of {n} ranks"
                )));
            }
        }
        let RingShape {
            batch,
            heads_q,
            heads_kv,
            head_dim,
        } = self.shape;
        for r in 0..n {
            let len = self.layout.shard_len(r);
            check_attention_args(
                &format!("[{r}]"),
                [
                    (q[r].0, &q[r].1),
                    (k[r].0, &k[r].1),
                    (v[r].0, &v[r].1),
                    (out[r].0, &out[r].1),
                ],
                [batch, len, heads_q, head_dim],
                [batch, len, heads_kv, head_dim],
                lse.map(|l| (l[r], self.lse_len(r), "[batch, heads_q, L_r]")),
            )?;
        }
        Ok(())
    }

    /// The dense problems rank `rank` runs at ring step `step` (none when the step is
    /// skipped): [`block_pieces`] of each of its query blocks against each block of the
    /// shard it holds then ([`RingLayout::kv_source`]), with every two whose union is one
    /// band problem merged (exactly the same visible pairs, fewer and larger calls).
    pub fn pieces(&self, rank: usize, step: usize) -> Vec<RingPiece> {
        if rank >= self.layout.world || step >= self.layout.world {
            return Vec::new();
        }
        let kv = self.layout.blocks(self.layout.kv_source(rank, step));
        coalesce(
            self.layout
                .blocks(rank)
                .into_iter()
                .flat_map(|q| {
                    kv.iter()
                        .flat_map(move |&k| pieces_unchecked(q, k, self.mask))
                })
                .collect(),
        )
    }

    /// CPU ring over simulated ranks: every rank runs the ring steps in order; each step's
    /// [`RingAttention::pieces`] are plain [`FlashAttention::forward_cpu`] calls on row
    /// ranges of the shards, whose `(o, lse)` (the output rounded to `T`, as a dense call
    /// returns it) are merged into the rank's running f32 state (the LSE merge). Parallel over ranks
    /// (and over (batch, head) inside each dense call). A query with no visible key gives 0
    /// and LSE `-inf`.
    pub fn forward_cpu<T: Element>(
        &self,
        q: &[Strided<&[T]>],
        k: &[Strided<&[T]>],
        v: &[Strided<&[T]>],
        out: &mut [Strided<&mut [T]>],
        mut lse: Option<&mut [&mut [f32]]>,
    ) -> Result<()> {
        let dims = |t: &[Strided<&[T]>]| {
            t.iter()
                .map(|x| (x.data.len(), x.strides))
                .collect::<Vec<_>>()
        };
        let out_dims: Vec<_> = out.iter().map(|x| (x.data.len(), x.strides)).collect();
        let lse_lens: Option<Vec<usize>> =
            lse.as_deref().map(|l| l.iter().map(|x| x.len()).collect());
        self.check_shards(&dims(q), &dims(k), &dims(v), &out_dims, lse_lens.as_deref())?;
        let states: Vec<(Vec<f32>, Vec<f32>)> = (0..self.layout.world)
            .into_par_iter()
            .map(|r| self.rank_cpu(r, q, k, v))
            .collect::<Result<_>>()?;
        for (r, (o, l)) in states.into_iter().enumerate() {
            self.store_state_cpu(
                r,
                &o,
                &l,
                &mut out[r],
                lse.as_deref_mut().map(|x| &mut *x[r]),
            );
        }
        Ok(())
    }

    /// The dense problem of one piece: its rows and keys, its local mask, the ring's scale
    /// and softcap.
    pub(crate) fn piece_attention(&self, piece: &RingPiece) -> Result<FlashAttention> {
        // The piece's mask is already in local coordinates, causality included.
        self.shape.attention(
            piece.q_rows.len(),
            piece.k_rows.len(),
            piece.mask,
            self.scale,
            self.softcap,
        )
    }

    /// Rows `row0..` of a shard tensor as a tensor of its own (strides are >= 0).
    fn from_row<'a, T>(t: &Strided<&'a [T]>, row0: usize) -> Strided<&'a [T]> {
        Strided::new(&t.data[(row0 as i64 * t.strides.seq) as usize..], t.strides)
    }

    /// An empty running state of rank `rank`: `o [batch, heads_q, L_r, head_dim]` zeros and
    /// `lse [batch, heads_q, L_r]` `-inf`.
    pub(crate) fn empty_state(&self, rank: usize) -> (Vec<f32>, Vec<f32>) {
        let n = self.lse_len(rank);
        (
            vec![0.0f32; n * self.shape.head_dim],
            vec![f32::NEG_INFINITY; n],
        )
    }

    /// Runs one piece on the CPU (rank `r`'s queries `q`, the held shard's `k`, `v`) and
    /// merges its `(o, lse)` (the output rounded to `T`, as a dense call returns it) into
    /// the rank's running state `(o, l)` of [`RingAttention::empty_state`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn merge_piece_cpu<T: Element>(
        &self,
        r: usize,
        piece: &RingPiece,
        q: &Strided<&[T]>,
        k: &Strided<&[T]>,
        v: &Strided<&[T]>,
        o: &mut [f32],
        l: &mut [f32],
    ) -> Result<()> {
        let RingShape {
            batch,
            heads_q,
            head_dim: d,
            ..
        } = self.shape;
        let len = self.layout.shard_len(r);
        let sq = piece.q_rows.len();
        let attn = self.piece_attention(piece)?;
        let mut po = vec![T::default(); attn.out_len()];
        let mut pl = vec![0.0f32; attn.lse_len()];
        attn.forward_cpu(
            Self::from_row(q, piece.q_rows.start),
            Self::from_row(k, piece.k_rows.start),
            Self::from_row(v, piece.k_rows.start),
            Strided::new(&mut po[..], Strides::contiguous(sq, heads_q, d)),
            Some(&mut pl[..]),
        )?;
        for b in 0..batch {
            for h in 0..heads_q {
                for i in 0..sq {
                    let li = (b * heads_q + h) * len + piece.q_rows.start + i;
                    let src = ((b * sq + i) * heads_q + h) * d;
                    merge_into_row(
                        &mut o[li * d..(li + 1) * d],
                        &mut l[li],
                        po[src..src + d].iter().map(|x| x.to_f32()),
                        pl[(b * heads_q + h) * sq + i],
                    );
                }
            }
        }
        Ok(())
    }

    /// Writes rank `r`'s final state into its output (rounded to `T`) and LSE.
    pub(crate) fn store_state_cpu<T: Element>(
        &self,
        r: usize,
        o: &[f32],
        l: &[f32],
        out: &mut Strided<&mut [T]>,
        lse: Option<&mut [f32]>,
    ) {
        let RingShape {
            batch,
            heads_q,
            head_dim,
            ..
        } = self.shape;
        let len = self.layout.shard_len(r);
        for b in 0..batch {
            for h in 0..heads_q {
                let src = (b * heads_q + h) * len * head_dim;
                out.store_head_rows(b, 0..len, h, head_dim, &o[src..src + len * head_dim]);
            }
        }
        if let Some(lse) = lse {
            lse[..l.len()].copy_from_slice(l);
        }
    }

    /// One rank's ring on the CPU: the running `(o [batch, heads_q, L_r, head_dim], lse
    /// [batch, heads_q, L_r])` after every step.
    fn rank_cpu<T: Element>(
        &self,
        r: usize,
        q: &[Strided<&[T]>],
        k: &[Strided<&[T]>],
        v: &[Strided<&[T]>],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut o, mut l) = self.empty_state(r);
        for step in 0..self.layout.world {
            let s = self.layout.kv_source(r, step);
            for piece in self.pieces(r, step) {
                self.merge_piece_cpu(r, &piece, &q[r], &k[s], &v[s], &mut o, &mut l)?;
            }
        }
        Ok((o, l))
    }
}
