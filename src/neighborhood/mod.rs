//! Neighborhood attention in 1-D, 2-D and 3-D with NATTEN's semantics (`semantics.md`,
//! "Neighborhood attention"): every query token of a grid attends to the keys of its
//! neighborhood, the product over the grid's dims of a per-dim window set by a kernel size,
//! a dilation and a causal flag (and a stride for non-causal dims).
//!
//! Per dim of length `L`, kernel `k`, dilation `d`, position `x`: dilation group
//! `g = x mod d`, in-group index `i = x div d`, group length `Lg = ceil((L - g) / d)`,
//! `left = k div 2`, `right = k div 2 + (k mod 2) - 1`.
//! - Non-causal: `start = max(c - left, 0) + (c + right >= Lg ? Lg - right - c - 1 : 0)`,
//!   `end = start + k` with `c = min((i div s) * s + s div 2, Lg - 1)` for stride `s`
//!   (`c = i` when `s = 1`): the window shifts at the borders so that every query sees
//!   exactly `k` keys per dim (requires `k * d <= L`).
//! - Causal: `start = max(i - k + 1, 0)`, `end = i + 1` (fewer keys near the start).
//!
//! In-group key index `j` is position `j * d + g`. With `k = L`, no dilation and no causal
//! dim this is full self-attention.

mod gpu;
pub use gpu::NeighborhoodGpuPlan;
pub mod schedule;

use crate::dense::AttentionOptions;
use crate::dense::CPU_TILE_M;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::layout::{Strided, check_attention_args, check_heads};
use crate::mask::Mask;
use crate::softmax::{OnlineSoftmaxBlock, tile_scores};
use rayon::prelude::*;
use schedule::{NeighborhoodSchedule, QueryTile, padded_dims, unravel};
use std::ops::Range;

/// Most grid dims (1-D, 2-D or 3-D).
pub const MAX_NEIGHBORHOOD_DIMS: usize = 3;

/// One grid dim: its length and how its neighborhood is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NeighborhoodDim {
    /// Tokens along this dim (`L`).
    pub length: usize,
    /// Keys per query along this dim (`k`; fewer near the start of a causal dim).
    pub kernel: usize,
    /// Distance between neighbors (`d`); the dim splits into `d` interleaved groups.
    pub dilation: usize,
    /// Keys only at or before the query along this dim.
    pub causal: bool,
    /// Queries of a run of `stride` in-group positions share one window, centred on the
    /// run (non-causal dims only).
    pub stride: usize,
}

impl NeighborhoodDim {
    /// A non-causal dim of `length` tokens with kernel size `kernel`, no dilation, stride 1.
    pub fn new(length: usize, kernel: usize) -> Self {
        NeighborhoodDim {
            length,
            kernel,
            dilation: 1,
            causal: false,
            stride: 1,
        }
    }
    /// Sets the dilation (distance between neighbors).
    pub fn with_dilation(mut self, dilation: usize) -> Self {
        self.dilation = dilation;
        self
    }
    /// Sets whether the dim is causal (keys only at or before the query).
    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    /// Sets the stride (queries per shared window; non-causal dims only).
    pub fn with_stride(mut self, stride: usize) -> Self {
        self.stride = stride;
        self
    }

    fn check(&self, axis: usize) -> Result<()> {
        let NeighborhoodDim {
            length: l,
            kernel: k,
            dilation: d,
            causal,
            stride: s,
        } = *self;
        let bad = |msg: String| {
            Err(Error::InvalidOption(format!(
                "neighborhood dim {axis}: {msg}"
            )))
        };
        if l == 0 || l > i32::MAX as usize {
            return Err(Error::Shape(format!(
                "neighborhood dim {axis}: length {l} must be in 1..={}",
                i32::MAX
            )));
        }
        if k == 0 || d == 0 || s == 0 {
            return bad(format!(
                "kernel ({k}), dilation ({d}) and stride ({s}) must be >= 1"
            ));
        }
        if k.checked_mul(d).is_none_or(|kd| kd > l) {
            return bad(format!(
                "kernel * dilation = {k} * {d} exceeds the length {l} (every dilation group \
                 needs at least `kernel` tokens)"
            ));
        }
        if s > k {
            return bad(format!("stride {s} exceeds the kernel size {k}"));
        }
        if causal && s > 1 {
            return bad(format!(
                "stride {s} on a causal dim (strided windows are defined for non-causal dims)"
            ));
        }
        Ok(())
    }

    /// Positions along this dim that position `x` attends to: `range` of in-group indices,
    /// key position `j * dilation + group` for `j` in `range`. Errors on an invalid dim or
    /// `x >= length`.
    pub fn window(&self, x: usize) -> Result<(Range<usize>, usize)> {
        self.check(0)?;
        if x >= self.length {
            return Err(Error::Index(format!(
                "position {x} outside a dim of length {}",
                self.length
            )));
        }
        Ok(self.window_unchecked(x))
    }

    /// [`NeighborhoodDim::window`] of a validated dim and an in-range position.
    fn window_unchecked(&self, x: usize) -> (Range<usize>, usize) {
        let (l, k, d, s) = (self.length, self.kernel, self.dilation, self.stride);
        let g = x % d;
        let i = x / d;
        let lg = (l - g).div_ceil(d);
        if self.causal {
            return ((i + 1).saturating_sub(k)..i + 1, g);
        }
        let (left, right) = (k / 2, k / 2 + k % 2 - 1);
        let c = ((i / s) * s + s / 2).min(lg - 1);
        let start = if c + right >= lg {
            // Shifted left at the end border: the window ends at the group's last index.
            lg - k
        } else {
            c.saturating_sub(left)
        };
        (start..start + k, g)
    }
}

/// One dim of a neighborhood: in-group indices `range` of dilation group `group`.
#[derive(Debug, Clone, Default)]
struct Axis {
    range: Range<usize>,
    group: usize,
    dilation: usize,
    length: usize,
}

/// The keys of one query's neighborhood in ascending flat-token order (row-major over the
/// per-dim windows), produced lazily; see [`NeighborhoodAttention::neighbors`].
#[derive(Debug, Clone)]
pub struct Neighbors {
    axes: [Axis; MAX_NEIGHBORHOOD_DIMS],
    rank: usize,
    /// The per-dim in-group indices of the next key.
    next: [usize; MAX_NEIGHBORHOOD_DIMS],
    remaining: usize,
}

impl Iterator for Neighbors {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let axes = &self.axes[..self.rank];
        let key = axes.iter().zip(&self.next).fold(0, |flat, (x, &j)| {
            flat * x.length + j * x.dilation + x.group
        });
        // Advance like an odometer, the last dim fastest.
        for a in (0..self.rank).rev() {
            self.next[a] += 1;
            if self.next[a] < axes[a].range.end {
                break;
            }
            self.next[a] = axes[a].range.start;
        }
        Some(key)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Neighbors {}

/// Problem dimensions: `q, out: [batch, tokens, heads_q, head_dim]`, `k, v: [batch, tokens,
/// heads_kv, head_dim]`, where `tokens = prod(dims[a].length)` is the grid in row-major
/// order (the last dim fastest), i.e. `[batch, X, (Y, (Z,)) heads, head_dim]` with the grid
/// flattened into the token axis; element strides over (batch, token, head), last dim
/// contiguous.
#[derive(Debug, Clone, Copy)]
pub struct NeighborhoodShape<'a> {
    /// Sequences in the batch.
    pub batch: usize,
    /// Query heads; a multiple of `heads_kv`.
    pub heads_q: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// Elements per head vector.
    pub head_dim: usize,
    /// 1 to 3 grid dims, outermost first.
    pub dims: &'a [NeighborhoodDim],
}

/// Validated neighborhood attention.
#[derive(Debug, Clone)]
pub struct NeighborhoodAttention {
    batch: usize,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    dims: Vec<NeighborhoodDim>,
    tokens: usize,
    scale: f32,
    softcap: Option<f32>,
}

impl NeighborhoodAttention {
    /// `options` gives the scale and softcap; its mask must stay unset (the neighborhood is
    /// the mask).
    pub fn new(shape: &NeighborhoodShape, options: &AttentionOptions) -> Result<Self> {
        let NeighborhoodShape {
            batch,
            heads_q,
            heads_kv,
            head_dim,
            dims,
        } = *shape;
        check_heads("neighborhood: ", batch, heads_q, heads_kv, head_dim)?;
        if dims.len() > MAX_NEIGHBORHOOD_DIMS {
            return Err(Error::Unsupported(format!(
                "neighborhood: {} grid dims, at most {MAX_NEIGHBORHOOD_DIMS} supported",
                dims.len()
            )));
        }
        if dims.is_empty() {
            return Err(Error::Shape(format!(
                "neighborhood: {} grid dims given, 1 to {MAX_NEIGHBORHOOD_DIMS} supported",
                dims.len()
            )));
        }
        for (axis, dim) in dims.iter().enumerate() {
            dim.check(axis)?;
        }
        if options.effective_mask() != Mask::default() {
            return Err(Error::InvalidOption(format!(
                "neighborhood: the kernel sizes define the mask; window and sinks must be \
                 unset (got {:?})",
                options.effective_mask()
            )));
        }
        let tokens = dims
            .iter()
            .try_fold(1usize, |acc, d| acc.checked_mul(d.length))
            .filter(|&t| {
                [batch, t, heads_q.max(heads_kv), head_dim]
                    .iter()
                    .try_fold(1usize, |acc, &x| acc.checked_mul(x))
                    .is_some_and(|n| n <= i64::MAX as usize)
            })
            .ok_or_else(|| {
                Error::Shape(format!(
                    "neighborhood: the grid {dims:?} has more elements than an i64 can index"
                ))
            })?;
        let scale = options.resolve_scale(head_dim)?;
        Ok(NeighborhoodAttention {
            batch,
            heads_q,
            heads_kv,
            head_dim,
            dims: dims.to_vec(),
            tokens,
            scale,
            softcap: options.effective_softcap(),
        })
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Query heads.
    pub fn heads_q(&self) -> usize {
        self.heads_q
    }
    /// Key/value heads.
    pub fn heads_kv(&self) -> usize {
        self.heads_kv
    }
    /// Elements per head vector.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// The softcap in force (`None` when off).
    pub fn softcap(&self) -> Option<f32> {
        self.softcap
    }
    /// The grid dims, outermost first.
    pub fn dims(&self) -> &[NeighborhoodDim] {
        &self.dims
    }
    /// Grid tokens per sequence (the product of the dim lengths).
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    /// The resolved multiplier of `q.k`.
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// Elements of a contiguous q or out.
    pub fn out_len(&self) -> usize {
        self.batch * self.tokens * self.heads_q * self.head_dim
    }
    /// Values of the LSE, `[batch, heads_q, tokens]`.
    pub fn lse_len(&self) -> usize {
        self.batch * self.heads_q * self.tokens
    }

    /// Grid coordinates of flat token `t` (row-major, last dim fastest).
    fn coords(&self, mut t: usize) -> [usize; MAX_NEIGHBORHOOD_DIMS] {
        let mut c = [0; MAX_NEIGHBORHOOD_DIMS];
        for (a, dim) in self.dims.iter().enumerate().rev() {
            c[a] = t % dim.length;
            t /= dim.length;
        }
        c
    }

    /// Flat token indices of the keys query token `token` attends to, in ascending order, as
    /// a lazy iterator (a neighborhood may hold up to `tokens()` keys: nothing is allocated).
    /// Errors when `token >= tokens()`.
    pub fn neighbors(&self, token: usize) -> Result<Neighbors> {
        if token >= self.tokens {
            return Err(Error::Index(format!(
                "token {token} outside a grid of {} tokens",
                self.tokens
            )));
        }
        Ok(self.neighbors_unchecked(token))
    }

    /// [`NeighborhoodAttention::neighbors`] of an in-range token.
    fn neighbors_unchecked(&self, token: usize) -> Neighbors {
        let c = self.coords(token);
        let mut axes: [Axis; MAX_NEIGHBORHOOD_DIMS] = Default::default();
        for (a, dim) in self.dims.iter().enumerate() {
            let (range, group) = dim.window_unchecked(c[a]);
            axes[a] = Axis {
                range,
                group,
                dilation: dim.dilation,
                length: dim.length,
            };
        }
        let remaining = axes[..self.dims.len()]
            .iter()
            .map(|x| x.range.len())
            .product();
        let next = axes.each_ref().map(|x| x.range.start);
        Neighbors {
            axes,
            rank: self.dims.len(),
            next,
            remaining,
        }
    }

    /// CPU forward pass, f32 accumulation, parallel over (batch, head) and over the query
    /// tiles of each head: the query tiles of [`NeighborhoodSchedule`] (boxes of
    /// `CPU_TILE_M` in-group positions of one dilation group), each tile's rows together
    /// against its key box in chunks of keys, masked per row (`tile_cpu`). A query always
    /// sees at least itself, so no row is empty.
    pub fn forward_cpu<T: Element>(
        &self,
        q: Strided<&[T]>,
        k: Strided<&[T]>,
        v: Strided<&[T]>,
        out: Strided<&mut [T]>,
        lse: Option<&mut [f32]>,
    ) -> Result<()> {
        let (n, d) = (self.tokens, self.head_dim);
        check_attention_args(
            "",
            [q.extent(), k.extent(), v.extent(), out.extent()],
            [self.batch, n, self.heads_q, d],
            [self.batch, n, self.heads_kv, d],
            lse.as_ref()
                .map(|l| (l.len(), self.lse_len(), "[batch, heads_q, tokens]")),
        )?;
        // Query tiles of `CPU_TILE_M` rows shaped for the fewest computed pairs (the CPU
        // scores no padding keys: a short last key tile stays short, hence key tile 1).
        let tile = schedule::choose_query_tile(self, CPU_TILE_M, 1)?;
        // The schedule's own key tiles are the largest it takes, so that it holds a few per
        // query tile whatever the kernel; each query tile cuts its box into CPU key tiles
        // when it runs (memory per tile, not per grid x kernel).
        let sched = NeighborhoodSchedule::with_tile(self, tile, schedule::MAX_TILE)?;
        let group = self.heads_q / self.heads_kv;
        let tasks: Vec<(usize, usize)> = (0..self.batch)
            .flat_map(|b| (0..self.heads_q).map(move |h| (b, h)))
            .collect();
        let results: Vec<(Vec<f32>, Vec<f32>)> = tasks
            .par_iter()
            .map(|&(b, h)| {
                let kvh = h / group;
                let qh = q.head_rows_f32(b, 0..n, h, d);
                let (kh, vh) = (
                    k.head_rows_f32(b, 0..n, kvh, d),
                    v.head_rows_f32(b, 0..n, kvh, d),
                );
                let tiles: Vec<_> = sched
                    .tiles
                    .par_iter()
                    .map(|t| self.tile_cpu(&sched, t, &qh, &kh, &vh))
                    .collect();
                let mut o = vec![0.0f32; n * d];
                let mut l = vec![f32::NEG_INFINITY; n];
                for (tokens, ot, lt) in tiles {
                    for (r, &t) in tokens.iter().enumerate() {
                        o[t * d..(t + 1) * d].copy_from_slice(&ot[r * d..(r + 1) * d]);
                        l[t] = lt[r];
                    }
                }
                (o, l)
            })
            .collect();
        let mut out = out;
        let mut lse = lse;
        for (&(b, h), (o, l)) in tasks.iter().zip(results) {
            out.store_head_rows(b, 0..n, h, d, &o);
            if let Some(lse) = lse.as_deref_mut() {
                let base = (b * self.heads_q + h) * n;
                lse[base..base + n].copy_from_slice(&l);
            }
        }
        Ok(())
    }

    /// One query tile `qt` of `sched` for one (batch, head) (`q, k, v: [tokens, d]` in f32):
    /// returns its valid rows' tokens, outputs `[rows, d]` and LSEs `[rows]`.
    ///
    /// The rows visit `qt`'s key box together in flat chunks of `NEIGHBORHOOD_CPU_KEY_TILE` keys
    /// (`push_key_tiles`, which marks the interior ones): a chunk inside one line of the box (fixed
    /// in-group indices in the outer dims) with no dilation along the last dim is one run of rows
    /// of `k` and `v`, any other chunk is gathered. Per row, the keys it sees on a line of the box
    /// are one interval (its window along the last dim, when the line lies in its window in the
    /// outer dims; none otherwise): every other score of a boundary chunk is `-inf`, and an
    /// interior chunk needs no mask.
    fn tile_cpu(
        &self,
        sched: &NeighborhoodSchedule,
        qt: &QueryTile,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> (Vec<usize>, Vec<f32>, Vec<f32>) {
        let d = self.head_dim;
        let dims = padded_dims(self);
        let tokens: Vec<usize> = (0..sched.rows)
            .filter_map(|r| sched.row_token(qt, r))
            .collect();
        let rows = tokens.len();
        // Per row, its window per padded dim (in-group indices).
        let lengths = dims.map(|dim| dim.length);
        let windows: Vec<[Range<usize>; MAX_NEIGHBORHOOD_DIMS]> = tokens
            .iter()
            .map(|&t| {
                let c = unravel(t, lengths);
                std::array::from_fn(|a| dims[a].window_unchecked(c[a]).0)
            })
            .collect();
        let mut qr = Vec::with_capacity(rows * d);
        for &t in &tokens {
            qr.extend_from_slice(&q[t * d..(t + 1) * d]);
        }
        let [e0, e1, line] = qt.keys.each_ref().map(|r| r.len());
        let dilation = dims[2].dilation;
        // Token of key `f` of the box (row-major, `line` keys per line).
        let key = |f: usize| sched.key_token(qt, f - f % line) + (f % line) * dilation;
        let cap = NEIGHBORHOOD_CPU_KEY_TILE * d;
        let (mut kg, mut vg) = (Vec::with_capacity(cap), Vec::with_capacity(cap));
        let mut state = OnlineSoftmaxBlock::new(rows, d);
        let mut scores = [0.0f32; CPU_TILE_M * NEIGHBORHOOD_CPU_KEY_TILE];
        let params = (self.scale, self.softcap);
        debug_assert!(rows <= CPU_TILE_M && e0 * e1 * line == qt.key_count());
        let mut key_tiles = Vec::new();
        schedule::push_key_tiles(qt, NEIGHBORHOOD_CPU_KEY_TILE, &mut key_tiles);
        for kt in &key_tiles {
            let keys = kt.start..kt.start + kt.len;
            let (kt_k, kt_v) = if dilation == 1 && kt.start / line == (keys.end - 1) / line {
                let first = key(kt.start);
                let run = first * d..(first + kt.len) * d;
                (&k[run.clone()], &v[run])
            } else {
                kg.clear();
                vg.clear();
                for (_, seg) in line_segments(keys.clone(), line) {
                    let first = key(seg.start);
                    if dilation == 1 {
                        let run = first * d..(first + seg.len()) * d;
                        kg.extend_from_slice(&k[run.clone()]);
                        vg.extend_from_slice(&v[run]);
                        continue;
                    }
                    for t in (0..seg.len()).map(|x| first + x * dilation) {
                        kg.extend_from_slice(&k[t * d..(t + 1) * d]);
                        vg.extend_from_slice(&v[t * d..(t + 1) * d]);
                    }
                }
                (&kg[..], &vg[..])
            };
            let scores = &mut scores[..rows * kt.len];
            let all = 0..kt.len;
            tile_scores(
                &qr,
                kt_k,
                d,
                params,
                0..rows,
                all.clone(),
                |_| (all.clone(), 0),
                scores,
            );
            if !kt.interior {
                for (row, w) in scores.chunks_exact_mut(kt.len).zip(&windows) {
                    mask_lines(row, keys.clone(), line, |n| {
                        let (j0, j1) = (qt.keys[0].start + n / e1, qt.keys[1].start + n % e1);
                        let on = w[0].contains(&j0) && w[1].contains(&j1);
                        let start = qt.keys[2].start;
                        if on {
                            w[2].start - start..w[2].end - start
                        } else {
                            0..0
                        }
                    });
                }
            }
            state.update(scores, kt_v);
        }
        let mut o = vec![0.0f32; rows * d];
        let mut l = vec![f32::NEG_INFINITY; rows];
        state.finish(&mut o, &mut l);
        (tokens, o, l)
    }
}

/// Keys per key tile of the CPU path: the flat chunks of a query tile's key box that its
/// rows score together. 128 (8 KiB of scores for `CPU_TILE_M` rows, 32 KiB each of keys and
/// values at d64, in L2) measured a little faster than 64 on the 1-D and 2-D k13 benches
/// (fewer short edge chunks and per-tile rescales) and level on the others.
const NEIGHBORHOOD_CPU_KEY_TILE: usize = 128;

/// The pieces of keys `keys` of a key box of lines of `line` keys (row-major), one per line
/// they touch: `(line n, its keys in keys)`.
fn line_segments(keys: Range<usize>, line: usize) -> impl Iterator<Item = (usize, Range<usize>)> {
    let lines = keys.start / line..keys.end.div_ceil(line);
    lines.map(move |n| {
        (
            n,
            (n * line).max(keys.start)..((n + 1) * line).min(keys.end),
        )
    })
}

/// Sets to `-inf` the scores `row` of one query row for keys `keys` of a key box of lines of
/// `line` keys, except on each line `n` the keys at positions `seen(n)` along the line.
fn mask_lines(
    row: &mut [f32],
    keys: Range<usize>,
    line: usize,
    seen: impl Fn(usize) -> Range<usize>,
) {
    for (n, seg) in line_segments(keys.clone(), line) {
        let w = seen(n);
        // The visible part of the segment, relative to the tile.
        let lo = (n * line + w.start).clamp(seg.start, seg.end) - keys.start;
        let hi = (n * line + w.end).clamp(seg.start, seg.end) - keys.start;
        let (lo, hi) = (lo, hi.max(lo));
        row[seg.start - keys.start..lo].fill(f32::NEG_INFINITY);
        row[hi..seg.end - keys.start].fill(f32::NEG_INFINITY);
    }
}
