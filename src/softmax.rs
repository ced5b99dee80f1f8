//! The one online-softmax state. It merges key tiles inside the CPU tiled reference, and in
//! its `(o, lse)` form it merges split-KV partials and ring steps. LSE is the natural log
//! throughout the crate.
//!
//! Empty rows (no visible key) are `(o = 0, lse = -inf)`; every merge keeps that form instead
//! of producing `NaN` from `-inf - -inf`.

mod kernels;

pub(crate) use kernels::dot_block;
use kernels::{TileScan, axpy, pv_block, scan, tile_weights};
use std::ops::Range;

/// Running state of one query row: max score `m`, sum of `exp(s - m)` `l`, and the
/// un-normalised output `acc = sum exp(s - m) * v`.
#[derive(Debug, Clone)]
pub struct OnlineSoftmax {
    /// Running max score (`-inf` before any key).
    pub m: f32,
    /// Running sum of `exp(s - m)`.
    pub l: f32,
    /// Un-normalised output `sum exp(s - m) * v`, `[head_dim]`.
    pub acc: Vec<f32>,
}

impl OnlineSoftmax {
    /// The empty state for a row of `head_dim` channels: `m = -inf`, `l = 0`, `acc = 0`.
    pub fn new(head_dim: usize) -> Self {
        OnlineSoftmax {
            m: f32::NEG_INFINITY,
            l: 0.0,
            acc: vec![0.0; head_dim],
        }
    }

    /// Folds in one tile: `scores[j]` (already scaled, `-inf` where masked) and the matching
    /// value rows `values(j)`.
    ///
    /// NaN policy (docs/semantics.md): a NaN score (a NaN in q or in a visible key) makes the
    /// whole row NaN, output and LSE, and stays NaN through later tiles; a NaN in a visible
    /// value row makes the affected output elements NaN. `f32::max` ignores NaN, so the NaN
    /// is caught explicitly instead of being skipped.
    pub fn update<'v>(&mut self, scores: &[f32], values: impl FnMut(usize) -> &'v [f32]) {
        self.update_weighted(scores, values, |p| p);
    }

    /// [`OnlineSoftmax::update`] where value `j` enters `acc` with weight `weight(p_j)`
    /// instead of `p_j = exp(s_j - m)`, while `l` sums the unquantised `p_j`: the FP8
    /// forward's P quantised for the PV product (docs/semantics.md, "FP8 dense forward").
    pub fn update_weighted<'v>(
        &mut self,
        scores: &[f32],
        mut values: impl FnMut(usize) -> &'v [f32],
        weight: impl Fn(f32) -> f32,
    ) {
        let t = scan(scores);
        let Some(m) = begin_tile(&mut self.m, &mut self.l, &mut self.acc, &t) else {
            return;
        };
        let mut buf = [0.0f32; WEIGHT_CHUNK];
        for (c, s) in scores.chunks(WEIGHT_CHUNK).enumerate() {
            let p = &mut buf[..s.len()];
            fold_weights(&mut self.l, m, s, p);
            for (j, (&s, &p)) in s.iter().zip(p.iter()).enumerate() {
                if s != f32::NEG_INFINITY {
                    axpy(&mut self.acc, weight(p), values(c * WEIGHT_CHUNK + j));
                }
            }
        }
    }

    /// Normalised output and natural-log LSE; an empty row gives `(0, -inf)`, a row that
    /// met a NaN score `(NaN, NaN)`.
    pub fn finish(&self) -> (Vec<f32>, f32) {
        let mut o = vec![0.0; self.acc.len()];
        let lse = finish_row(self.m, self.l, &self.acc, &mut o);
        (o, lse)
    }
}

/// The start of one tile for one row state `(m, l, acc)` whose tile scores have the scan
/// `t` (NaN policy of [`OnlineSoftmax::update_weighted`]): poisons the row on a NaN score,
/// else raises `m` to the tile's max and rescales `l` and `acc` to it. Returns the new max
/// when the tile's keys are to be folded in (`None`: the row is NaN, or no key is visible so
/// far).
fn begin_tile(m: &mut f32, l: &mut f32, acc: &mut [f32], t: &TileScan) -> Option<f32> {
    if l.is_nan() {
        return None;
    }
    if t.nan {
        *m = f32::NAN;
        *l = f32::NAN;
        acc.iter_mut().for_each(|a| *a = f32::NAN);
        return None;
    }
    let new_m = m.max(t.max);
    if new_m == f32::NEG_INFINITY {
        // Fully masked so far: exp(-inf - -inf) would be NaN.
        return None;
    }
    let alpha = (*m - new_m).exp();
    *l *= alpha;
    acc.iter_mut().for_each(|a| *a *= alpha);
    *m = new_m;
    Some(new_m)
}

/// Keys per [`tile_weights`] call: a row's tile is weighted in chunks of this many keys.
const WEIGHT_CHUNK: usize = 64;

/// The weights of one row's tile after [`begin_tile`] returned the max `m`:
/// `p[j] = exp(scores[j] - m)` (0 for `-inf`) and `l += sum p_j`, one [`tile_weights`] sum
/// per `WEIGHT_CHUNK` keys. Shared by [`OnlineSoftmax`] and [`OnlineSoftmaxBlock`], so both
/// sum `l` alike.
fn fold_weights(l: &mut f32, m: f32, scores: &[f32], p: &mut [f32]) {
    for (s, p) in scores.chunks(WEIGHT_CHUNK).zip(p.chunks_mut(WEIGHT_CHUNK)) {
        *l += tile_weights(s, m, p);
    }
}

/// Writes the normalised output of the row state `(m, l, acc)` into `o` and returns its
/// LSE: `(0, -inf)` for an empty row, `(NaN, NaN)` for a row that met a NaN score.
fn finish_row(m: f32, l: f32, acc: &[f32], o: &mut [f32]) -> f32 {
    if l.is_nan() {
        o.fill(f32::NAN);
        return f32::NAN;
    }
    if l == 0.0 {
        o.fill(0.0);
        return f32::NEG_INFINITY;
    }
    let inv = 1.0 / l;
    for (o, a) in o.iter_mut().zip(acc) {
        *o = a * inv;
    }
    m + l.ln()
}

/// The online-softmax states of a block of query rows that visit the same key tiles (the
/// row blocks of the dense, block-sparse and neighborhood CPU paths): row `r` is an
/// [`OnlineSoftmax`] with the bits it would have row by row, but each tile's P.V product runs
/// as one [`pv_block`] (every value row loaded once for all rows) whenever every row of the
/// block takes every key of the tile or the tile's value rows are all finite.
pub(crate) struct OnlineSoftmaxBlock {
    d: usize,
    /// Running max per row, `[rows]`.
    m: Vec<f32>,
    /// Running `sum exp(s - m)` per row, `[rows]`.
    l: Vec<f32>,
    /// Un-normalised outputs, `[rows, d]`.
    acc: Vec<f32>,
    /// The tile's `exp(s - m)`, `[rows, keys]` (scratch).
    p: Vec<f32>,
}

impl OnlineSoftmaxBlock {
    /// Empty states of `rows` rows of `d` channels.
    pub(crate) fn new(rows: usize, d: usize) -> Self {
        OnlineSoftmaxBlock {
            d,
            m: vec![f32::NEG_INFINITY; rows],
            l: vec![0.0; rows],
            acc: vec![0.0; rows * d],
            p: Vec::new(),
        }
    }

    /// Folds in one tile: `scores: [rows, keys]` (scaled, `-inf` where masked) and the value
    /// rows `values: [keys, d]`. Row `r` ends with the bits of [`OnlineSoftmax::update`] on
    /// `scores[r]`: the same rescale and `l` sum, and P.V adds in key order either way.
    pub(crate) fn update(&mut self, scores: &[f32], values: &[f32]) {
        self.update_weighted(scores, values, |p| p);
    }

    /// [`OnlineSoftmaxBlock::update`] where value `j` enters row `r`'s `acc` with weight
    /// `weight(p_rj)` while `l` sums the unquantised `p_rj` (the FP8 forward's e4m3 P): row
    /// `r` ends with the bits of [`OnlineSoftmax::update_weighted`] on `scores[r]`. `weight`
    /// must map 0 to +0 (a skipped key's weight then adds nothing, as below).
    pub(crate) fn update_weighted(
        &mut self,
        scores: &[f32],
        values: &[f32],
        weight: impl Fn(f32) -> f32,
    ) {
        let d = self.d;
        let rows = self.m.len();
        let keys = values.len() / d;
        self.p.clear();
        self.p.resize(rows * keys, 0.0);
        // Every row takes every key: no NaN or empty row, no skipped (-inf) score.
        let mut every = true;
        for (r, (s, p)) in scores
            .chunks_exact(keys)
            .zip(self.p.chunks_exact_mut(keys))
            .enumerate()
        {
            let acc = &mut self.acc[r * d..(r + 1) * d];
            let t = scan(s);
            let Some(m) = begin_tile(&mut self.m[r], &mut self.l[r], acc, &t) else {
                every = false;
                continue;
            };
            fold_weights(&mut self.l[r], m, s, p);
            p.iter_mut().for_each(|p| *p = weight(*p));
            every &= !t.skipped;
        }
        // A key a row skips has weight 0, and `acc + 0 * v` is `acc` bit for bit when `v` is
        // finite and `acc` is not -0 (it starts at +0, a sum is -0 only from two -0's; only a
        // rescale that underflows a negative `acc` makes one, and then the two results differ
        // in the sign of that zero alone), so a masked tile runs as one `pv_block` too unless
        // a value row holds an inf or NaN, which only the rows that take it may see.
        if every || all_finite(values) {
            pv_block(&mut self.acc, &self.p, values, d);
            return;
        }
        // Row by row over the keys each row takes, as `OnlineSoftmax::update_weighted` does.
        for r in 0..rows {
            if self.l[r].is_nan() || self.m[r] == f32::NEG_INFINITY {
                continue;
            }
            let acc = &mut self.acc[r * d..(r + 1) * d];
            for (j, (&s, &p)) in scores[r * keys..(r + 1) * keys]
                .iter()
                .zip(&self.p[r * keys..(r + 1) * keys])
                .enumerate()
            {
                if s != f32::NEG_INFINITY {
                    axpy(acc, p, &values[j * d..(j + 1) * d]);
                }
            }
        }
    }

    /// Normalised outputs into `out: [rows, d]` and LSEs into `lse: [rows]` (as
    /// [`OnlineSoftmax::finish`]).
    pub(crate) fn finish(&self, out: &mut [f32], lse: &mut [f32]) {
        let d = self.d;
        for (r, (o, lse)) in out.chunks_exact_mut(d).zip(lse).enumerate() {
            *lse = finish_row(self.m[r], self.l[r], &self.acc[r * d..(r + 1) * d], o);
        }
    }
}

/// Whether every value of `x` is finite: eight lanes of `0 * x` (0, or NaN for an inf or a
/// NaN) summed, so the check vectorizes instead of branching per value.
fn all_finite(x: &[f32]) -> bool {
    let mut lanes = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder().iter().all(|v| v.is_finite());
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v * 0.0;
        }
    }
    tail && lanes.iter().all(|&l| l == 0.0)
}

/// Scores of a block of query rows against a tile of keys, the first step of one tile of
/// every blocked CPU path (dense, block-sparse, neighborhood): `q: [rows.len(), d]`, keys
/// `keys` of `k: [_, d]`, into `scores: [rows.len(), keys.len()]`, scaled by `scale`,
/// softcapped, and `-inf` where the key is not visible to the row. Row `i` sees the keys of
/// `seen(i) = (window, sink_end)`: `j < sink_end || window.contains(&j)` (a dense row's
/// window and sinks, a block-sparse row's block, a neighborhood row's window along a line
/// of keys). Masked keys never reach a score, whatever their values.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile_scores(
    q: &[f32],
    k: &[f32],
    d: usize,
    (scale, cap): (f32, Option<f32>),
    rows: Range<usize>,
    keys: Range<usize>,
    seen: impl Fn(usize) -> (Range<usize>, usize),
    scores: &mut [f32],
) {
    dot_block(q, &k[keys.start * d..keys.end * d], d, scores);
    for (i, row) in rows.zip(scores.chunks_exact_mut(keys.len())) {
        let (window, sink_end) = seen(i);
        let all = keys.end <= sink_end || (window.start <= keys.start && keys.end <= window.end);
        if all && cap.is_none() {
            row.iter_mut().for_each(|s| *s *= scale);
            continue;
        }
        for (s, j) in row.iter_mut().zip(keys.clone()) {
            *s = if j < sink_end || window.contains(&j) {
                softcapped(*s * scale, cap)
            } else {
                f32::NEG_INFINITY
            };
        }
    }
}

/// The attention score of one scaled logit `x = scale * q.k`: Gemma 2's softcap
/// `cap * tanh(x / cap)` when a cap is given, else `x` (shared by the dense, paged and
/// neighborhood CPU paths).
pub(crate) fn softcapped(x: f32, softcap: Option<f32>) -> f32 {
    match softcap {
        Some(cap) => cap * (x / cap).tanh(),
        None => x,
    }
}

/// Weights `(w_a, w_b, lse)` that merge two partial results over disjoint key sets:
/// `o = w_a * o_a + w_b * o_b`. Both empty gives `(0, 0, -inf)`; a NaN LSE on either side
/// gives NaN weights and LSE (the NaN policy: `max` alone would drop it).
pub fn merge_weights(lse_a: f32, lse_b: f32) -> (f32, f32, f32) {
    if lse_a.is_nan() || lse_b.is_nan() {
        return (f32::NAN, f32::NAN, f32::NAN);
    }
    let m = lse_a.max(lse_b);
    if m == f32::NEG_INFINITY {
        return (0.0, 0.0, f32::NEG_INFINITY);
    }
    let ea = (lse_a - m).exp();
    let eb = (lse_b - m).exp();
    let lse = m + (ea + eb).ln();
    ((lse_a - lse).exp(), (lse_b - lse).exp(), lse)
}

/// Folds a partial result `(part, part_lse)` over keys disjoint from those already in the
/// running f32 state `(acc, acc_lse)` into that state (the [`merge_weights`] algebra).
pub(crate) fn merge_into_row(
    acc: &mut [f32],
    acc_lse: &mut f32,
    part: impl IntoIterator<Item = f32>,
    part_lse: f32,
) {
    let (wa, wb, lse) = merge_weights(*acc_lse, part_lse);
    for (a, x) in acc.iter_mut().zip(part) {
        *a = wa * *a + wb * x;
    }
    *acc_lse = lse;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::element::{Element, F8E4M3};

    #[test]
    fn merge_weights_edge_cases() {
        let ninf = f32::NEG_INFINITY;
        assert_eq!(merge_weights(ninf, ninf), (0.0, 0.0, ninf));
        let (wa, wb, lse) = merge_weights(1.5, ninf);
        assert_eq!((wa, wb, lse), (1.0, 0.0, 1.5));
        let (wa, wb, lse) = merge_weights(0.0, 0.0);
        assert!((wa - 0.5).abs() < 1e-7 && (wb - 0.5).abs() < 1e-7);
        assert!((lse - 2f32.ln()).abs() < 1e-7);
    }

    /// A block of rows that skip different keys (one row skipping every key of the first
    /// tile) ends with the bits of each row alone, whether the tile's value rows are finite
    /// (one `pv_block`) or a skipped one holds an inf or NaN (row by row, never seen), with
    /// P as is and rounded to e4m3 for P.V (the FP8 path's `update_weighted`).
    #[test]
    fn masked_row_blocks_equal_rows_alone() {
        let (rows, keys, d) = (5, 9, 11);
        let x = |i: usize| ((i * 37 % 17) as f32 - 8.0) / 7.0;
        let scores: Vec<f32> = (0..rows * keys)
            .map(|i| {
                let (r, j) = (i / keys, i % keys);
                if r == 0 || (j + r) % 3 == 0 {
                    f32::NEG_INFINITY
                } else {
                    x(i)
                }
            })
            .collect();
        let weights: [fn(f32) -> f32; 2] = [|p| p, |p| F8E4M3::from_f32(p).to_f32()];
        for (poison, weight) in [None, Some(f32::INFINITY), Some(f32::NAN)]
            .into_iter()
            .flat_map(|p| weights.map(|w| (p, w)))
        {
            let mut values: Vec<f32> = (0..keys * d).map(|i| x(i + 5)).collect();
            if let Some(p) = poison {
                // Key 0: skipped by rows 0 and 3 only.
                values[2] = p;
            }
            let mut block = OnlineSoftmaxBlock::new(rows, d);
            block.update_weighted(&scores, &values, weight);
            let second: Vec<f32> = scores.iter().map(|s| s * 0.5 + 1.0).collect();
            block.update_weighted(&second, &values, weight);
            let (mut o, mut l) = (vec![0.0; rows * d], vec![0.0; rows]);
            block.finish(&mut o, &mut l);
            for r in 0..rows {
                let mut one = OnlineSoftmax::new(d);
                for s in [&scores, &second] {
                    let values = |j: usize| &values[j * d..(j + 1) * d];
                    one.update_weighted(&s[r * keys..(r + 1) * keys], values, weight);
                }
                let (want, want_lse) = one.finish();
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&o[r * d..(r + 1) * d]),
                    bits(&want),
                    "{poison:?} row {r}"
                );
                assert_eq!(l[r].to_bits(), want_lse.to_bits(), "{poison:?} row {r}");
            }
            if poison.is_some() {
                assert!(
                    o[3 * d..4 * d].iter().all(|v| v.is_finite()),
                    "row 3 skips key 0"
                );
            }
        }
    }

    #[test]
    fn nan_scores_poison_the_row_and_stay() {
        let mut s = OnlineSoftmax::new(2);
        s.update(&[f32::NAN, f32::NAN], |_| &[1.0, 2.0]);
        s.update(&[0.5, 1.0], |_| &[1.0, 2.0]);
        let (o, lse) = s.finish();
        assert!(o.iter().all(|x| x.is_nan()) && lse.is_nan());
        let (wa, wb, lse) = merge_weights(f32::NAN, f32::NEG_INFINITY);
        assert!(wa.is_nan() && wb.is_nan() && lse.is_nan());
    }

    #[test]
    fn fully_masked_state_is_zero_and_neg_inf() {
        let mut s = OnlineSoftmax::new(3);
        s.update(&[f32::NEG_INFINITY; 4], |_| &[1.0, 2.0, 3.0]);
        let (o, lse) = s.finish();
        assert_eq!(o, vec![0.0; 3]);
        assert_eq!(lse, f32::NEG_INFINITY);
    }
}
