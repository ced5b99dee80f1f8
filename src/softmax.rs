//! The one online-softmax state. It merges key tiles inside the CPU tiled reference, and in
//! its `(o, lse)` form it merges split-KV partials and ring steps. LSE is the natural log
//! throughout the crate.
//!
//! Empty rows (no visible key) are `(o = 0, lse = -inf)`; every merge keeps that form instead
//! of producing `NaN` from `-inf - -inf`.

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
        if self.l.is_nan() {
            return;
        }
        if scores.iter().any(|s| s.is_nan()) {
            self.m = f32::NAN;
            self.l = f32::NAN;
            self.acc.iter_mut().for_each(|a| *a = f32::NAN);
            return;
        }
        let tile_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let new_m = self.m.max(tile_max);
        if new_m == f32::NEG_INFINITY {
            // Fully masked so far: exp(-inf - -inf) would be NaN.
            return;
        }
        let alpha = (self.m - new_m).exp();
        self.l *= alpha;
        self.acc.iter_mut().for_each(|a| *a *= alpha);
        for (j, &s) in scores.iter().enumerate() {
            if s == f32::NEG_INFINITY {
                continue;
            }
            let p = (s - new_m).exp();
            self.l += p;
            let w = weight(p);
            for (a, &v) in self.acc.iter_mut().zip(values(j)) {
                *a += w * v;
            }
        }
        self.m = new_m;
    }

    /// Normalised output and natural-log LSE; an empty row gives `(0, -inf)`, a row that
    /// met a NaN score `(NaN, NaN)`.
    pub fn finish(&self) -> (Vec<f32>, f32) {
        if self.l.is_nan() {
            return (vec![f32::NAN; self.acc.len()], f32::NAN);
        }
        if self.l == 0.0 {
            return (vec![0.0; self.acc.len()], f32::NEG_INFINITY);
        }
        let inv = 1.0 / self.l;
        (
            self.acc.iter().map(|a| a * inv).collect(),
            self.m + self.l.ln(),
        )
    }
}

/// `sum_c a[c] * b[c]` over `min(a.len(), b.len())` channels, `b` converted by `to_f32`:
/// the score dot product of every CPU path (dense, FP8, paged decode, neighborhood), one
/// summation order for all so that paths that must agree bit for bit do. Eight interleaved
/// partial sums, combined pairwise, then the tail (vectorisable; the tour's CPU rows measured
/// within run-to-run noise of the left-to-right sum it replaced, whose chains the CPU
/// already overlapped across keys).
#[inline]
pub(crate) fn dot_by<B: Copy>(a: &[f32], b: &[B], to_f32: impl Fn(B) -> f32) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(&x, &y)| x * to_f32(y))
        .sum();
    for (ca, cb) in a8.zip(b8) {
        for l in 0..8 {
            acc[l] += ca[l] * to_f32(cb[l]);
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// [`dot_by`] of two f32 rows.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_by(a, b, |x| x)
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
