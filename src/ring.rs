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
//! the work per rank), and the CPU driver over simulated ranks
//! ([`RingAttention::forward_cpu`]), whose result equals single-device attention over the
//! whole sequence with the same mask.

use crate::dense::AttentionOptions;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::layout::{Strided, Strides, check_extent, check_no_overlap};
use crate::mask::Mask;
use crate::softmax::{OnlineSoftmax, merge_weights, softcapped};
use rayon::prelude::*;
use std::ops::Range;

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
        if seqlen > i32::MAX as usize || world > i32::MAX as usize {
            return Err(Error::Shape(format!(
                "ring layout: seqlen ({seqlen}) and world ({world}) must fit in i32"
            )));
        }
        Ok(RingLayout {
            seqlen,
            world,
            sharding,
        })
    }

    pub fn seqlen(&self) -> usize {
        self.seqlen
    }
    pub fn world(&self) -> usize {
        self.world
    }
    pub fn sharding(&self) -> Sharding {
        self.sharding
    }

    /// Global positions of rank `rank`'s tokens, ascending: its shard's row `i` is token
    /// `positions(rank)[i]` of the sequence.
    pub fn positions(&self, rank: usize) -> Vec<usize> {
        let (s, n) = (self.seqlen, self.world);
        if rank >= n {
            return Vec::new();
        }
        let cut = |parts: usize, c: usize| c * s / parts..(c + 1) * s / parts;
        match self.sharding {
            Sharding::Contiguous => cut(n, rank).collect(),
            Sharding::Zigzag => cut(2 * n, rank)
                .chain(cut(2 * n, 2 * n - 1 - rank))
                .collect(),
            Sharding::Stripe => (rank..s).step_by(n).collect(),
        }
    }

    /// Tokens held by rank `rank`.
    pub fn shard_len(&self, rank: usize) -> usize {
        self.positions(rank).len()
    }

    /// The shard rank `rank` holds at ring step `step`: `(rank - step) mod world`.
    pub fn kv_source(&self, rank: usize, step: usize) -> usize {
        (rank + self.world - step % self.world) % self.world
    }
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
    pub batch: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
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
    pub fn new(layout: RingLayout, shape: RingShape, options: &AttentionOptions) -> Result<Self> {
        let RingShape {
            batch,
            heads_q,
            heads_kv,
            head_dim,
        } = shape;
        if batch == 0 || heads_q == 0 || heads_kv == 0 || head_dim == 0 {
            return Err(Error::Shape(format!(
                "ring: batch ({batch}), heads_q ({heads_q}), heads_kv ({heads_kv}) and \
                 head_dim ({head_dim}) must all be >= 1"
            )));
        }
        if heads_q % heads_kv != 0 {
            return Err(Error::Shape(format!(
                "ring: heads_q ({heads_q}) must be a multiple of heads_kv ({heads_kv})"
            )));
        }
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
            mask: options.mask,
            scale,
            softcap: options.softcap,
        })
    }

    pub fn layout(&self) -> &RingLayout {
        &self.layout
    }
    pub fn shape(&self) -> RingShape {
        self.shape
    }
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

    /// Keys of the (sorted) global positions `keys` that global query `i` sees: the
    /// window's index range, and the sink keys left of it (every sink key inside the
    /// window's range is in the first range already).
    fn visible_ranges(&self, i: usize, keys: &[usize]) -> [Range<usize>; 2] {
        let s = self.layout.seqlen;
        let local = |r: Range<usize>| {
            keys.partition_point(|&p| p < r.start)..keys.partition_point(|&p| p < r.end)
        };
        let window = self.mask.window_range(i, s, s);
        let sinks = self.mask.sink_range_rows(i..i + 1, s, s);
        let sinks_left = if window.is_empty() {
            sinks
        } else {
            0..sinks.end.min(window.start)
        };
        [local(sinks_left), local(window)]
    }

    /// The schedule: which steps compute, which transfers are needed, work per rank.
    pub fn schedule(&self) -> RingSchedule {
        let n = self.layout.world;
        let pos: Vec<Vec<usize>> = (0..n).map(|r| self.layout.positions(r)).collect();
        // pairs[r][s]: visible pairs between rank r's queries and shard s's keys.
        let pairs: Vec<Vec<u64>> = (0..n)
            .map(|r| {
                (0..n)
                    .map(|s| {
                        pos[r]
                            .iter()
                            .map(|&i| {
                                let [a, b] = self.visible_ranges(i, &pos[s]);
                                (a.len() + b.len()) as u64
                            })
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
        let send = (0..n.saturating_sub(1))
            .map(|t| {
                (0..n)
                    .map(|s| (t + 1..n).any(|later| pairs[(s + later) % n][s] > 0))
                    .collect()
            })
            .collect();
        RingSchedule {
            compute,
            send,
            pairs: pairs.iter().map(|row| row.iter().sum()).collect(),
        }
    }

    fn check_shards<T: Element>(
        &self,
        q: &[Strided<&[T]>],
        k: &[Strided<&[T]>],
        v: &[Strided<&[T]>],
        out: &[Strided<&mut [T]>],
        lse: Option<&[&mut [f32]]>,
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
            let qd = [batch, len, heads_q, head_dim];
            let kd = [batch, len, heads_kv, head_dim];
            check_extent(&format!("q[{r}]"), &q[r].strides, qd, q[r].data.len())?;
            check_extent(&format!("k[{r}]"), &k[r].strides, kd, k[r].data.len())?;
            check_extent(&format!("v[{r}]"), &v[r].strides, kd, v[r].data.len())?;
            let o = &out[r];
            check_extent(&format!("out[{r}]"), &o.strides, qd, o.data.len())?;
            check_no_overlap(&format!("out[{r}]"), &o.strides, qd)?;
            if let Some(l) = lse
                && l[r].len() < self.lse_len(r)
            {
                return Err(Error::Shape(format!(
                    "lse[{r}] holds {} values but [batch, heads_q, L_r] needs {}",
                    l[r].len(),
                    self.lse_len(r)
                )));
            }
        }
        Ok(())
    }

    /// CPU ring over simulated ranks (also the fallback without a GPU): every rank runs the
    /// ring steps of [`RingAttention::schedule`] in order, computing each step's partial
    /// attention at global positions (online softmax, f32) and merging it into its running
    /// `(o, lse)`; parallel over (rank, batch, head). A query with no visible key gives 0
    /// and LSE `-inf`.
    pub fn forward_cpu<T: Element>(
        &self,
        q: &[Strided<&[T]>],
        k: &[Strided<&[T]>],
        v: &[Strided<&[T]>],
        out: &mut [Strided<&mut [T]>],
        mut lse: Option<&mut [&mut [f32]]>,
    ) -> Result<()> {
        self.check_shards(q, k, v, out, lse.as_deref())?;
        let n = self.layout.world;
        let RingShape {
            batch,
            heads_q,
            heads_kv,
            head_dim: d,
        } = self.shape;
        let group = heads_q / heads_kv;
        let pos: Vec<Vec<usize>> = (0..n).map(|r| self.layout.positions(r)).collect();
        let schedule = self.schedule();
        let row = |st: &Strides, b: usize, i: usize, h: usize| {
            (b as i64 * st.batch + i as i64 * st.seq + h as i64 * st.head) as usize
        };
        let tasks: Vec<(usize, usize, usize)> = (0..n)
            .flat_map(|r| (0..batch).flat_map(move |b| (0..heads_q).map(move |h| (r, b, h))))
            .collect();
        let results: Vec<(Vec<f32>, Vec<f32>)> = tasks
            .par_iter()
            .map(|&(r, b, h)| {
                let load = |t: &Strided<&[T]>, len: usize, head: usize| {
                    let mut buf = Vec::with_capacity(len * d);
                    for i in 0..len {
                        let off = row(&t.strides, b, i, head);
                        buf.extend(t.data[off..off + d].iter().map(|x| x.to_f32()));
                    }
                    buf
                };
                let lq = pos[r].len();
                let qh = load(&q[r], lq, h);
                let mut o = vec![0.0f32; lq * d];
                let mut l = vec![f32::NEG_INFINITY; lq];
                for step in 0..n {
                    if !schedule.compute[r][step] {
                        continue;
                    }
                    let s = self.layout.kv_source(r, step);
                    let ls = pos[s].len();
                    let kh = load(&k[s], ls, h / group);
                    let vh = load(&v[s], ls, h / group);
                    for (i, &gi) in pos[r].iter().enumerate() {
                        let (po, pl) =
                            self.partial_row(&qh[i * d..(i + 1) * d], gi, &pos[s], &kh, &vh);
                        let (wa, wb, merged) = merge_weights(l[i], pl);
                        for (a, &x) in o[i * d..(i + 1) * d].iter_mut().zip(&po) {
                            *a = wa * *a + wb * x;
                        }
                        l[i] = merged;
                    }
                }
                (o, l)
            })
            .collect();
        for (&(r, b, h), (o, l)) in tasks.iter().zip(results) {
            let lq = pos[r].len();
            let dst = &mut out[r];
            for i in 0..lq {
                let off = row(&dst.strides, b, i, h);
                for (y, &x) in dst.data[off..off + d]
                    .iter_mut()
                    .zip(&o[i * d..(i + 1) * d])
                {
                    *y = T::from_f32(x);
                }
            }
            if let Some(lse) = lse.as_deref_mut() {
                lse[r][(b * heads_q + h) * lq..(b * heads_q + h + 1) * lq].copy_from_slice(&l);
            }
        }
        Ok(())
    }

    /// One query row (global position `gi`, `q: [d]`) against one shard (`keys`: global
    /// positions, `k, v: [len, d]`): the partial `(o, lse)` over the keys it sees there.
    fn partial_row(
        &self,
        q: &[f32],
        gi: usize,
        keys: &[usize],
        k: &[f32],
        v: &[f32],
    ) -> (Vec<f32>, f32) {
        let d = q.len();
        let s = self.layout.seqlen;
        let mut state = OnlineSoftmax::new(d);
        let mut scores = Vec::new();
        for range in self.visible_ranges(gi, keys) {
            scores.clear();
            scores.extend(range.clone().map(|j| {
                if self.mask.visible(gi, keys[j], s, s) {
                    let dot: f32 = q
                        .iter()
                        .zip(&k[j * d..(j + 1) * d])
                        .map(|(a, b)| a * b)
                        .sum();
                    softcapped(dot * self.scale, self.softcap)
                } else {
                    f32::NEG_INFINITY
                }
            }));
            let base = range.start;
            state.update(&scores, |j| &v[(base + j) * d..(base + j + 1) * d]);
        }
        state.finish()
    }
}
