//! f64 reference of the FP8 dense forward (docs/semantics.md, "FP8 dense forward"): every
//! key of a row tested against the mask, scores in f64 over the exact codes, and P quantised
//! per 128-key tile against the running max (`p8` rounded to e4m3 from the f64 `p`). Two
//! other rules of P, [`Fp8PRule::FinalMax`] and [`Fp8PRule::Unquantised`], exist for the
//! tests: the first shows that the tile rule matters, the second is plain attention over the
//! dequantised inputs (the format's error is measured against it).

use crate::dense::fp8::check_descales_host;
use crate::dense::{FP8_KEY_TILE, FlashAttention, Fp8Descales};
use crate::element::{DType, Element, F8E4M3};
use crate::error::Result;
use crate::layout::Strided;
use crate::reference::checked_out_strides;

/// How the reference weights value `j` in the PV sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8PRule {
    /// The definition: `e4m3(exp(s_j - m_t))` with `m_t` the running max after the
    /// 128-key tile holding key `j`; earlier tiles rescaled by `exp(m_{t-1} - m_t)`.
    TileRunningMax,
    /// `e4m3(exp(s_j - m))` with `m` the row's final max (not the definition: for tests).
    FinalMax,
    /// `exp(s_j - m)` unquantised: plain attention over the dequantised inputs.
    Unquantised,
}

/// e4m3 rounding (nearest, ties to even) of `p` in `[0, 1]`, in f64 without a detour through
/// f32 (which could round twice). Below 2^-6 the spacing is 2^-9 (subnormals); in the
/// binade `[2^e, 2^(e+1))` it is `2^(e-3)`.
fn e4m3_round_unit(p: f64) -> f64 {
    debug_assert!((0.0..=1.0).contains(&p));
    if p == 0.0 {
        return 0.0;
    }
    let e = (p.log2().floor() as i32).max(-6);
    // log2 may be off by one next to a power of two: fix the binade exactly.
    let e = if e > -6 && p < 2f64.powi(e) {
        e - 1
    } else if p >= 2f64.powi(e + 1) {
        e + 1
    } else {
        e
    };
    let spacing = 2f64.powi(e.max(-6) - 3);
    (p / spacing).round_ties_even() * spacing
}

/// Reference output and LSE of the FP8 problem `attn` over e4m3 codes `q`, `k`, `v` with
/// host `descales`: `out` contiguous `[rows, heads_q, head_dim]` (rows = `batch * seqlen_q`,
/// or `total_q` with varlen), LSE in the problem's layout (natural log, from the unquantised
/// `p`); empty rows give 0 and `-inf`, a NaN score makes the row NaN. `rule` picks the P of
/// the PV sum ([`Fp8PRule::TileRunningMax`] is the definition). Validates as the CPU path.
pub fn dense_fp8_attention_f64(
    attn: &FlashAttention,
    q: Strided<&[F8E4M3]>,
    k: Strided<&[F8E4M3]>,
    v: Strided<&[F8E4M3]>,
    descales: Fp8Descales<&[f32]>,
    rule: Fp8PRule,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let out_strides = checked_out_strides(attn, &q, &k, &v)?;
    check_descales_host(attn, DType::BF16, &descales)?;
    let d = attn.head_dim();
    let mut out = vec![0.0f64; attn.out_len()];
    let mut lse = vec![f64::NEG_INFINITY; attn.lse_len()];
    let mask = attn.mask();
    let group = attn.heads_q() / attn.heads_kv();
    let code = |x: &F8E4M3| x.to_f64();
    // Only sequences with query rows: an empty one has nothing to compute, however many
    // heads (or, fixed-length, sequences) the problem declares.
    for (b, span) in attn.spans_with_rows() {
        let (sq, sk) = (span.seqlen_q, span.seqlen_k);
        let bb = attn.batch_entry(b);
        for h in 0..attn.heads_q() {
            let kvh = h / group;
            let at = b * attn.heads_kv() + kvh;
            let qk_scale = attn.scale() as f64 * descales.q[at] as f64 * descales.k[at] as f64;
            let v_descale = descales.v[at] as f64;
            for i in 0..sq {
                let qo = q.strides.offset(bb, span.q_start + i, h);
                let qi = &q.data[qo..qo + d];
                let scores: Vec<Option<f64>> = (0..sk)
                    .map(|j| {
                        mask.visible(i, j, sq, sk).then(|| {
                            let ko = k.strides.offset(bb, span.k_start + j, kvh);
                            let dot: f64 = qi
                                .iter()
                                .zip(&k.data[ko..ko + d])
                                .map(|(a, b)| code(a) * code(b))
                                .sum();
                            match attn.softcap() {
                                Some(cap) => cap as f64 * (dot * qk_scale / cap as f64).tanh(),
                                None => dot * qk_scale,
                            }
                        })
                    })
                    .collect();
                let oo = out_strides.offset(bb, span.q_start + i, h);
                let row = &mut out[oo..oo + d];
                let value = |j: usize| {
                    let vo = v.strides.offset(bb, span.k_start + j, kvh);
                    &v.data[vo..vo + d]
                };
                lse[attn.lse_index(b, h, i)] = fp8_row(&scores, value, rule, v_descale, row);
            }
        }
    }
    Ok((out, lse))
}

/// One row: `scores[j]` (`None` where masked), values `value(j)` (codes), writes
/// `acc * v_descale / l` into `out` and returns `m + ln l`.
fn fp8_row<'a>(
    scores: &[Option<f64>],
    value: impl Fn(usize) -> &'a [F8E4M3],
    rule: Fp8PRule,
    v_descale: f64,
    out: &mut [f64],
) -> f64 {
    if scores.iter().flatten().any(|s| s.is_nan()) {
        out.iter_mut().for_each(|o| *o = f64::NAN);
        return f64::NAN;
    }
    let final_max = scores
        .iter()
        .flatten()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    if final_max == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let (mut m, mut l) = (f64::NEG_INFINITY, 0.0f64);
    let mut acc = vec![0.0f64; out.len()];
    for (t, tile) in scores.chunks(FP8_KEY_TILE).enumerate() {
        let tile_max = tile
            .iter()
            .flatten()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        let new_m = match rule {
            Fp8PRule::TileRunningMax => m.max(tile_max),
            Fp8PRule::FinalMax | Fp8PRule::Unquantised => final_max,
        };
        if new_m == f64::NEG_INFINITY {
            continue; // nothing visible yet: the tile changes nothing
        }
        let alpha = (m - new_m).exp(); // 0 before the first visible key
        l *= alpha;
        acc.iter_mut().for_each(|a| *a *= alpha);
        for (jj, s) in tile.iter().enumerate() {
            let Some(s) = s else { continue };
            let p = (s - new_m).exp();
            l += p;
            let w = match rule {
                Fp8PRule::Unquantised => p,
                Fp8PRule::TileRunningMax | Fp8PRule::FinalMax => e4m3_round_unit(p),
            };
            for (a, x) in acc.iter_mut().zip(value(t * FP8_KEY_TILE + jj)) {
                *a += w * x.to_f64();
            }
        }
        m = new_m;
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = a * v_descale / l;
    }
    m + l.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f64 rounding agrees with the crate's f32 conversion wherever `p` is an f32 (no
    /// double rounding there), at every binade and at the ties.
    #[test]
    fn e4m3_round_unit_matches_the_f32_conversion() {
        let mut p = 1.0f32;
        while p > 1e-4 {
            for x in [p, p * 0.97, p * 0.9375, p * 0.53, p * 0.5 + p / 32.0] {
                let want = F8E4M3::from_f32(x).to_f32() as f64;
                assert_eq!(e4m3_round_unit(x as f64), want, "p = {x:e}");
            }
            p *= 0.61;
        }
        assert_eq!(e4m3_round_unit(0.0), 0.0);
        assert_eq!(e4m3_round_unit(1.0), 1.0);
        // A tie below 1: 0.96875 lies halfway between 0.9375 and 1.0 (mantissa 7 is odd).
        assert_eq!(e4m3_round_unit(0.96875), 1.0);
        // The smallest subnormal 2^-9, and half of it (a tie to even: 0).
        assert_eq!(e4m3_round_unit(2f64.powi(-9)), 2f64.powi(-9));
        assert_eq!(e4m3_round_unit(2f64.powi(-10)), 0.0);
    }
}
