//! Conformance of the CPU paths with `semantics.md`, against oracles written from the text of
//! the semantics alone (not the crate's `reference` module nor `Mask::visible`):
//!
//! - visibility: `i + sk - sq - left <= j <= i + sk - sq + right`, `0 <= j < sk`, `-1`
//!   unbounded (FlashAttention integers); sinks `j < sinks` are visible too, subject to the
//!   right bound (the rule `src/mask.rs` documents: "sinks obey the right bound, which is
//!   causality when right = 0");
//! - a naive f64 softmax per query row (scale, Gemma-2 softcap), natural-log LSE, an empty row
//!   giving output 0 and LSE `-inf`;
//! - the LSE merge formula, paged token placement, Quest scores and top-B selection, ring
//!   shardings and step skipping.
//!
//! Inputs are uniform in [-1, 1) from fixed seeds; outputs are poisoned with NaN before each
//! call so that every element must be written; f32 results must be within 1e-4 relative L2
//! of the f64 oracle (overall and per row), empty rows exactly 0 with LSE exactly `-inf`.
#![allow(clippy::needless_range_loop)]

mod common;

use common::paged::shuffled_block_table;
use common::{cu_seqlens, random_vec, rng};
use longattn::{
    AttentionOptions, AttentionShape, FlashAttention, HeadPolicy, KvPages, Mask, MergeShape,
    PageMeta, PageTable, PagedCache, PagedDecode, PagedLayout, Partial, QuestConfig, RingAttention,
    RingLayout, RingShape, SeqLens, Sharding, SparsePolicy, StreamingConfig, Strided, Strides,
    Window,
};
use rand::Rng;
use rand::rngs::SmallRng;

const TOL: f64 = 1e-4;

// ---------------------------------------------------------------------------------------
// Oracle
// ---------------------------------------------------------------------------------------

/// A mask in FlashAttention's integers: `window_size = (left, right)`, `-1` unbounded, plus
/// `sinks` leading keys.
#[derive(Clone, Copy, Debug)]
struct Spec {
    left: i64,
    right: i64,
    sinks: usize,
}

fn spec(left: i64, right: i64, sinks: usize) -> Spec {
    Spec { left, right, sinks }
}

impl Spec {
    /// `visible(i, j)` for lengths `sq`, `sk`, bottom-right aligned.
    fn visible(&self, i: usize, j: usize, sq: usize, sk: usize) -> bool {
        if j >= sk {
            return false;
        }
        let (i, j, sq, sk) = (i as i64, j as i64, sq as i64, sk as i64);
        let diag = i + sk - sq;
        let left_ok = self.left == -1 || diag - self.left <= j;
        let right_ok = self.right == -1 || j <= diag + self.right;
        let sink = j < self.sinks as i64;
        right_ok && (left_ok || sink)
    }

    fn window(&self) -> Window {
        Window::from_flash(self.left, self.right).unwrap()
    }

    fn mask(&self) -> Mask {
        Mask::new(self.window(), self.sinks)
    }
}

/// Scale (`None`: `1/sqrt(head_dim)`) and softcap of the scores.
#[derive(Clone, Copy, Debug)]
struct Scoring {
    scale: Option<f32>,
    cap: Option<f32>,
}

const PLAIN: Scoring = Scoring {
    scale: None,
    cap: None,
};

impl Scoring {
    fn scale_f64(&self, d: usize) -> f64 {
        self.scale.map_or(1.0 / (d as f64).sqrt(), f64::from)
    }
    fn cap_f64(&self) -> Option<f64> {
        self.cap.map(f64::from)
    }
}

fn options(m: Spec, s: Scoring) -> AttentionOptions {
    let mut o = AttentionOptions::default()
        .with_window(m.window())
        .with_sinks(m.sinks);
    if let Some(x) = s.scale {
        o = o.with_scale(x);
    }
    if let Some(c) = s.cap {
        o = o.with_softcap(c);
    }
    o
}

/// Naive f64 attention of one query row over `(key, value)` rows: `s = scale * q.k`,
/// `s = cap * tanh(s / cap)` with a softcap, softmax, natural-log LSE. No key: `(0, -inf)`.
fn attend(q: &[f32], kv: &[(&[f32], &[f32])], scale: f64, cap: Option<f64>) -> (Vec<f64>, f64) {
    let d = q.len();
    if kv.is_empty() {
        return (vec![0.0; d], f64::NEG_INFINITY);
    }
    let s: Vec<f64> = kv
        .iter()
        .map(|(k, _)| {
            let dot: f64 = q.iter().zip(*k).map(|(&a, &b)| a as f64 * b as f64).sum();
            let x = scale * dot;
            cap.map_or(x, |c| c * (x / c).tanh())
        })
        .collect();
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = w.iter().sum();
    let mut o = vec![0.0; d];
    for ((_, v), &wj) in kv.iter().zip(&w) {
        for c in 0..d {
            o[c] += wj * v[c] as f64;
        }
    }
    o.iter_mut().for_each(|x| *x /= z);
    (o, m + z.ln())
}

/// The merge of `semantics.md`, in f64.
fn merge_f64(oa: &[f64], la: f64, ob: &[f64], lb: f64) -> (Vec<f64>, f64) {
    if la == f64::NEG_INFINITY && lb == f64::NEG_INFINITY {
        return (vec![0.0; oa.len()], f64::NEG_INFINITY);
    }
    let m = la.max(lb);
    let lse = m + ((la - m).exp() + (lb - m).exp()).ln();
    let (wa, wb) = ((la - lse).exp(), (lb - lse).exp());
    let o = oa.iter().zip(ob).map(|(a, b)| wa * a + wb * b).collect();
    (o, lse)
}

/// Checks `got` against the oracle: every element written and finite, empty rows (oracle
/// exactly 0) exactly 0, relative L2 under `TOL` overall and per row of `d` (per row with a floor); LSE with the
/// same `-inf` pattern and within `TOL` (relative above 1) elsewhere.
fn compare(what: &str, d: usize, got: &[f32], want: &[f64], got_lse: &[f32], want_lse: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: out length");
    assert_eq!(got_lse.len(), want_lse.len(), "{what}: lse length");
    let (mut num, mut den) = (0.0, 0.0);
    for (r, (g, w)) in got.chunks(d).zip(want.chunks(d)).enumerate() {
        let (mut rn, mut rd) = (0.0, 0.0);
        for (c, (&g, &w)) in g.iter().zip(w).enumerate() {
            assert!(
                g.is_finite(),
                "{what}: out row {r} [{c}] = {g} (not written?)"
            );
            if w == 0.0 {
                assert_eq!(g, 0.0, "{what}: out row {r} [{c}] of an empty row");
            }
            rn += (g as f64 - w).powi(2);
            rd += w * w;
        }
        // Per row, relative with a floor: a row whose values cancel to near 0 (tiny d)
        // is held to an absolute L2 error of TOL * 0.1 * sqrt(d).
        let e = rn.sqrt() / rd.sqrt().max(0.1 * (d as f64).sqrt());
        assert!(e < TOL, "{what}: row {r} rel L2 {e}: got {g:?} want {w:?}");
        num += rn;
        den += rd;
    }
    if den > 0.0 {
        let e = (num / den).sqrt();
        assert!(e < TOL, "{what}: rel L2 {e}");
    }
    for (x, (&g, &w)) in got_lse.iter().zip(want_lse).enumerate() {
        assert!(!g.is_nan(), "{what}: lse[{x}] is NaN (not written?)");
        if w == f64::NEG_INFINITY {
            assert_eq!(g, f32::NEG_INFINITY, "{what}: lse[{x}] of an empty row");
        } else {
            assert!(
                g.is_finite() && (g as f64 - w).abs() <= TOL * w.abs().max(1.0),
                "{what}: lse[{x}] = {g}, want {w}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Dense, fixed lengths
// ---------------------------------------------------------------------------------------

struct Dense {
    b: usize,
    sq: usize,
    sk: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn dense(seed: u64, dims: (usize, usize, usize, usize, usize, usize)) -> Dense {
    let (b, sq, sk, hq, hkv, d) = dims;
    let mut r = rng(seed);
    Dense {
        b,
        sq,
        sk,
        hq,
        hkv,
        d,
        q: random_vec(&mut r, b * sq * hq * d),
        k: random_vec(&mut r, b * sk * hkv * d),
        v: random_vec(&mut r, b * sk * hkv * d),
    }
}

impl Dense {
    fn attn(&self, opts: &AttentionOptions) -> FlashAttention {
        let shape = AttentionShape {
            batch: self.b,
            heads_q: self.hq,
            heads_kv: self.hkv,
            head_dim: self.d,
            seqlens: SeqLens::Fixed {
                seqlen_q: self.sq,
                seqlen_k: self.sk,
            },
        };
        FlashAttention::new(&shape, opts).unwrap()
    }

    /// CPU forward into NaN-poisoned contiguous `out` and `lse`.
    fn run(&self, opts: &AttentionOptions) -> (Vec<f32>, Vec<f32>) {
        let attn = self.attn(opts);
        let qs = Strides::contiguous(self.sq, self.hq, self.d);
        let ks = Strides::contiguous(self.sk, self.hkv, self.d);
        let mut out = vec![f32::NAN; self.b * self.sq * self.hq * self.d];
        let mut lse = vec![f32::NAN; self.b * self.hq * self.sq];
        assert_eq!(attn.out_len(), out.len());
        assert_eq!(attn.lse_len(), lse.len());
        attn.forward_cpu(
            Strided::new(&self.q[..], qs),
            Strided::new(&self.k[..], ks),
            Strided::new(&self.v[..], ks),
            Strided::new(&mut out[..], qs),
            Some(&mut lse),
        )
        .unwrap();
        (out, lse)
    }

    /// Oracle: out `[b, sq, hq, d]`, LSE `[b, hq, sq]`.
    fn oracle(&self, m: Spec, s: Scoring) -> (Vec<f64>, Vec<f64>) {
        let (sq, sk, hq, hkv, d) = (self.sq, self.sk, self.hq, self.hkv, self.d);
        let group = hq / hkv;
        let mut out = vec![f64::NAN; self.b * sq * hq * d];
        let mut lse = vec![f64::NAN; self.b * hq * sq];
        for b in 0..self.b {
            for h in 0..hq {
                let g = h / group;
                for i in 0..sq {
                    let kv: Vec<(&[f32], &[f32])> = (0..sk)
                        .filter(|&j| m.visible(i, j, sq, sk))
                        .map(|j| {
                            let o = ((b * sk + j) * hkv + g) * d;
                            (&self.k[o..o + d], &self.v[o..o + d])
                        })
                        .collect();
                    let qo = ((b * sq + i) * hq + h) * d;
                    let (o, l) = attend(&self.q[qo..qo + d], &kv, s.scale_f64(d), s.cap_f64());
                    out[qo..qo + d].copy_from_slice(&o);
                    lse[(b * hq + h) * sq + i] = l;
                }
            }
        }
        (out, lse)
    }

    fn check(&self, m: Spec, s: Scoring, what: &str) {
        let (got, got_lse) = self.run(&options(m, s));
        let (want, want_lse) = self.oracle(m, s);
        let what = format!(
            "{what} dims {:?} {m:?} {s:?}",
            (self.b, self.sq, self.sk, self.hq, self.hkv, self.d)
        );
        compare(&what, self.d, &got, &want, &got_lse, &want_lse);
    }
}

#[test]
fn oracle_and_crate_on_hand_computed_cases() {
    // One query, two keys, d = 1, scale 1: s = (0.5, -0.5), out = tanh(0.5),
    // lse = ln(e^0.5 + e^-0.5).
    let c = Dense {
        b: 1,
        sq: 1,
        sk: 2,
        hq: 1,
        hkv: 1,
        d: 1,
        q: vec![1.0],
        k: vec![0.5, -0.5],
        v: vec![1.0, -1.0],
    };
    let s = Scoring {
        scale: Some(1.0),
        cap: None,
    };
    let want_o = 0.5f64.tanh();
    let want_l = (0.5f64.exp() + (-0.5f64).exp()).ln();
    let (o, l) = c.oracle(spec(-1, -1, 0), s);
    assert!((o[0] - want_o).abs() < 1e-12 && (l[0] - want_l).abs() < 1e-12);
    let (go, gl) = c.run(&options(spec(-1, -1, 0), s));
    assert!((go[0] as f64 - want_o).abs() < 1e-6, "{go:?}");
    assert!((gl[0] as f64 - want_l).abs() < 1e-6, "{gl:?}");
    // Causal with sq = 1 < sk = 2: the single (last) query sees every key.
    let (go, _) = c.run(&options(spec(-1, 0, 0), s));
    assert!((go[0] as f64 - want_o).abs() < 1e-6);
    // Window (0, 0): only key sk - sq + i = 1: out = v1 = -1, lse = s1 = -0.5.
    let (go, gl) = c.run(&options(spec(0, 0, 0), s));
    assert_eq!((go[0], gl[0]), (-1.0, -0.5));
    // Window (0, 0) with sinks 1: keys {0, 1}, as the full row.
    let (go, _) = c.run(&options(spec(0, 0, 1), s));
    assert!((go[0] as f64 - want_o).abs() < 1e-6);
    // Softcap 0.25: s = 0.25 tanh(+-2), out = tanh(0.25 tanh 2).
    let cap = Scoring {
        scale: Some(1.0),
        cap: Some(0.25),
    };
    let (go, _) = c.run(&options(spec(-1, -1, 0), cap));
    assert!((go[0] as f64 - (0.25 * 2f64.tanh()).tanh()).abs() < 1e-6);
    // Two queries over one key, causal: row 0 has diag -1 and sees nothing.
    let c = Dense {
        b: 1,
        sq: 2,
        sk: 1,
        hq: 1,
        hkv: 1,
        d: 1,
        q: vec![0.3, 0.7],
        k: vec![0.9],
        v: vec![0.25],
    };
    let (go, gl) = c.run(&options(spec(-1, 0, 0), PLAIN));
    assert_eq!(go, vec![0.0, 0.25]);
    assert_eq!(gl[0], f32::NEG_INFINITY);
    assert!((gl[1] as f64 - 0.7 * 0.9).abs() < 1e-6);
}

#[test]
fn window_constructors_match_flash_integers() {
    assert_eq!(Window::CAUSAL, Window::from_flash(-1, 0).unwrap());
    assert_eq!(Window::FULL, Window::from_flash(-1, -1).unwrap());
    assert_eq!(
        Window::causal_tokens(1).unwrap(),
        Window::from_flash(0, 0).unwrap()
    );
    assert_eq!(
        Window::causal_tokens(2).unwrap(),
        Window::from_flash(1, 0).unwrap()
    );
    assert_eq!(
        Window::from_flash(0, -1).unwrap(),
        Window::new(Some(0), None)
    );
    assert_eq!(
        AttentionOptions::causal().effective_mask(),
        spec(-1, 0, 0).mask()
    );
}

/// W = 1 and W = 2 windows, computed by hand: with `(0, 0)` row `i` (sq = sk) sees key `i`
/// only, so out = v_i and lse = scale q_i.k_i; with `(1, 0)` row 0 sees key 0 only and row
/// `i > 0` keys `i - 1` and `i`.
#[test]
fn one_and_two_token_windows_by_hand() {
    let c = dense(11, (1, 9, 9, 2, 1, 8));
    let d = c.d;
    let scale = 1.0 / (d as f64).sqrt();
    let dot = |i: usize, h: usize, j: usize| -> f64 {
        (0..d)
            .map(|x| c.q[(i * 2 + h) * d + x] as f64 * c.k[j * d + x] as f64)
            .sum::<f64>()
            * scale
    };
    let (o1, l1) =
        c.run(&AttentionOptions::default().with_window(Window::causal_tokens(1).unwrap()));
    let (o2, l2) =
        c.run(&AttentionOptions::default().with_window(Window::causal_tokens(2).unwrap()));
    for i in 0..9 {
        for h in 0..2 {
            let row = (i * 2 + h) * d;
            for x in 0..d {
                assert!((o1[row + x] - c.v[i * d + x]).abs() < 1e-6, "W=1 row {i}");
            }
            assert!(
                (l1[h * 9 + i] as f64 - dot(i, h, i)).abs() < 1e-5,
                "W=1 lse {i}"
            );
            if i == 0 {
                for x in 0..d {
                    assert!((o2[row + x] - c.v[x]).abs() < 1e-6, "W=2 row 0");
                }
                assert!((l2[h * 9] as f64 - dot(0, h, 0)).abs() < 1e-5);
            } else {
                let (a, b) = (dot(i, h, i - 1), dot(i, h, i));
                let m = a.max(b);
                let (wa, wb) = ((a - m).exp(), (b - m).exp());
                for x in 0..d {
                    let want =
                        (wa * c.v[(i - 1) * d + x] as f64 + wb * c.v[i * d + x] as f64) / (wa + wb);
                    assert!((o2[row + x] as f64 - want).abs() < 1e-5, "W=2 row {i}");
                }
                let want_l = m + (wa + wb).ln();
                assert!((l2[h * 9 + i] as f64 - want_l).abs() < 1e-5, "W=2 lse {i}");
            }
        }
    }
}

/// Every (shape, window, sinks, scoring) combination against the oracle. Shapes cover
/// sq > sk and sq < sk (bottom-right alignment, fully masked leading rows), several CPU
/// tiles, odd head dims, MHA, GQA (2, 3) and MQA (5, 8).
#[test]
fn dense_fixed_lengths_match_oracle() {
    let shapes = [
        (2, 9, 4, 4, 2, 16),
        (1, 3, 11, 5, 1, 8),
        (1, 37, 70, 6, 2, 24),
        (2, 70, 33, 2, 2, 40),
        (1, 1, 1, 1, 1, 1),
        (1, 20, 20, 4, 4, 3),
        (1, 5, 130, 8, 1, 64),
        (1, 17, 1, 2, 1, 8),
    ];
    let windows = [
        (-1, -1),
        (-1, 0),
        (0, 0),
        (1, 0),
        (0, -1),
        (2, 3),
        (-1, 2),
        (5, -1),
        (3, 0),
        (0, 4),
        (40, 0),
    ];
    let scorings = [
        PLAIN,
        Scoring {
            // Scales are positive (issue 11: a non-positive scale is refused).
            scale: Some(0.8),
            cap: None,
        },
        Scoring {
            scale: None,
            cap: Some(0.5),
        },
        Scoring {
            scale: Some(2.5),
            cap: Some(3.0),
        },
    ];
    for (n, &dims) in shapes.iter().enumerate() {
        let c = dense(1000 + n as u64, dims);
        for &(l, r) in &windows {
            // Sinks: none, a few, more than sk.
            for sinks in [0, 2, dims.2 + 5] {
                for s in &scorings {
                    c.check(spec(l, r, sinks), *s, "dense");
                }
            }
        }
    }
}

/// Random shapes (zero lengths included), windows, sinks and GQA ratios.
#[test]
fn dense_random_sweep() {
    let mut r = rng(1500);
    let side = |r: &mut SmallRng| -> i64 {
        match r.random_range(0..4) {
            0 => -1,
            1 => r.random_range(0..3),
            _ => r.random_range(0..40),
        }
    };
    for n in 0..300u64 {
        let hkv = r.random_range(1..=3);
        let dims = (
            r.random_range(1..=2),
            r.random_range(0..=80),
            r.random_range(0..=80),
            hkv * r.random_range(1..=3),
            hkv,
            r.random_range(1..=16),
        );
        let c = dense(1600 + n, dims);
        let sinks = [0, 1, r.random_range(0..50)][r.random_range(0..3)];
        let m = spec(side(&mut r), side(&mut r), sinks);
        let s = if r.random_range(0..3) == 0 {
            Scoring {
                scale: Some(r.random_range(0.01..2.0)),
                cap: Some(r.random_range(0.2..5.0)),
            }
        } else {
            PLAIN
        };
        c.check(m, s, &format!("sweep {n}"));
    }
}

/// Hand-checked visibility patterns of the oracle itself, so that the sweep above rests on
/// the text of the semantics.
#[test]
fn oracle_visibility_patterns() {
    let seen = |m: Spec, i: usize, sq: usize, sk: usize| -> Vec<usize> {
        (0..sk).filter(|&j| m.visible(i, j, sq, sk)).collect()
    };
    // Causal sq = 2, sk = 5: row 0 sees 0..=3, row 1 all.
    assert_eq!(seen(spec(-1, 0, 0), 0, 2, 5), vec![0, 1, 2, 3]);
    assert_eq!(seen(spec(-1, 0, 0), 1, 2, 5), vec![0, 1, 2, 3, 4]);
    // Causal sq = 5, sk = 2: rows 0..=2 see nothing, row 3 key 0, row 4 keys 0, 1.
    for i in 0..3 {
        assert!(seen(spec(-1, 0, 0), i, 5, 2).is_empty());
    }
    assert_eq!(seen(spec(-1, 0, 0), 3, 5, 2), vec![0]);
    // W = 2 with 2 sinks, sq = sk = 8: row 6 sees {0, 1, 5, 6}; row 0 only key 0.
    assert_eq!(seen(spec(1, 0, 2), 6, 8, 8), vec![0, 1, 5, 6]);
    assert_eq!(seen(spec(1, 0, 2), 0, 8, 8), vec![0]);
    // Sinks larger than sk under causality: the causal row.
    assert_eq!(seen(spec(0, 0, 50), 2, 4, 4), vec![0, 1, 2]);
    // Non-causal window (1, 1) with 2 sinks, sq = 8, sk = 4 (diag -4): row 0 has right
    // bound -3, so not even the sinks; row 4 sees {0, 1}; row 6 sees {0, 1, 2, 3}.
    assert!(seen(spec(1, 1, 2), 0, 8, 4).is_empty());
    assert_eq!(seen(spec(1, 1, 2), 4, 8, 4), vec![0, 1]);
    assert_eq!(seen(spec(1, 1, 2), 6, 8, 4), vec![0, 1, 2, 3]);
    // (0, -1): key >= diagonal.
    assert_eq!(seen(spec(0, -1, 0), 1, 3, 5), vec![3, 4]);
    assert_eq!(seen(spec(0, -1, 1), 1, 3, 5), vec![0, 3, 4]);
}

/// Sinks with non-causal windows follow the documented rule: a sink key is visible when it
/// is within the right bound (`j <= i + sk - sq + right`), whatever the left bound. The
/// semantics only state the causal case (`right = 0`); for `right > 0` a sink beyond the
/// right bound (e.g. sq = sk = 4, window (0, 1), 3 sinks: key 2 for row 0) is not visible.
#[test]
fn sinks_with_non_causal_windows() {
    for (n, &(sq, sk)) in [(8, 4), (4, 8), (12, 12), (40, 9)].iter().enumerate() {
        let c = dense(2000 + n as u64, (1, sq, sk, 2, 1, 8));
        for (l, r) in [(1, 1), (0, 2), (2, -1), (0, -1), (3, 5)] {
            for sinks in [1, 3, sk + 2] {
                c.check(spec(l, r, sinks), PLAIN, "sinks non-causal");
            }
        }
    }
}

/// q, k, v as slices of one fused `[batch, seq, hq + 2 hkv, d]` buffer with padding per
/// token, and an output with padded strides: the padding is never written.
#[test]
fn fused_qkv_strides() {
    let (b, s, hq, hkv, d, pad) = (2, 21, 4, 2, 16, 5);
    let row = (hq + 2 * hkv) * d + pad;
    let mut r = rng(3000);
    let fused: Vec<f32> = random_vec(&mut r, b * s * row);
    let st = Strides {
        batch: (s * row) as i64,
        seq: row as i64,
        head: d as i64,
    };
    let out_row = hq * d + 3;
    let os = Strides {
        batch: (s * out_row) as i64 + 7,
        seq: out_row as i64,
        head: d as i64,
    };
    let out_len = (b - 1) * os.batch as usize + s * out_row;
    // The same problem, contiguous, for the oracle.
    let gather = |h0: usize, heads: usize| -> Vec<f32> {
        let mut x = Vec::new();
        for t in 0..b * s {
            x.extend_from_slice(&fused[t * row + h0 * d..t * row + (h0 + heads) * d]);
        }
        x
    };
    let c = Dense {
        b,
        sq: s,
        sk: s,
        hq,
        hkv,
        d,
        q: gather(0, hq),
        k: gather(hq, hkv),
        v: gather(hq + hkv, hkv),
    };
    for m in [spec(-1, 0, 0), spec(3, 0, 2), spec(-1, -1, 0)] {
        let attn = c.attn(&options(m, PLAIN));
        let mut out = vec![f32::NAN; out_len];
        let mut lse = vec![f32::NAN; attn.lse_len()];
        attn.forward_cpu(
            Strided::new(&fused[..], st),
            Strided::new(&fused[hq * d..], st),
            Strided::new(&fused[(hq + hkv) * d..], st),
            Strided::new(&mut out[..], os),
            Some(&mut lse),
        )
        .unwrap();
        let mut got = Vec::new();
        let mut written = vec![false; out_len];
        for bb in 0..b {
            for t in 0..s {
                let o = bb * os.batch as usize + t * out_row;
                got.extend_from_slice(&out[o..o + hq * d]);
                written[o..o + hq * d].iter_mut().for_each(|w| *w = true);
            }
        }
        for (x, (&w, &v)) in written.iter().zip(&out).enumerate() {
            if !w {
                assert!(v.is_nan(), "padding element {x} of out was written");
            }
        }
        let (want, want_lse) = c.oracle(m, PLAIN);
        compare(&format!("fused {m:?}"), d, &got, &want, &lse, &want_lse);
    }
}

/// Zero strides are valid input strides: one query row broadcast over the heads (head stride
/// 0) and one K/V sequence shared by the batch (batch stride 0).
///
/// Not asserted: negative strides. The semantics allow arbitrary i64 element strides, but
/// `forward_cpu` rejects a negative stride with `Error::Stride` ("negative strides are not
/// supported", `src/layout.rs`).
#[test]
fn zero_strides_broadcast_inputs() {
    let (b, sq, sk, hq, hkv, d) = (2, 7, 12, 3, 1, 8);
    let mut r = rng(3500);
    let q1: Vec<f32> = random_vec(&mut r, b * sq * d); // [b, sq, 1, d]
    let k1: Vec<f32> = random_vec(&mut r, sk * hkv * d); // [1, sk, hkv, d]
    let v1: Vec<f32> = random_vec(&mut r, sk * hkv * d);
    let qs = Strides {
        batch: (sq * d) as i64,
        seq: d as i64,
        head: 0,
    };
    let ks = Strides {
        batch: 0,
        ..Strides::contiguous(sk, hkv, d)
    };
    let mut q = Vec::new();
    for t in 0..b * sq {
        for _ in 0..hq {
            q.extend_from_slice(&q1[t * d..(t + 1) * d]);
        }
    }
    let c = Dense {
        b,
        sq,
        sk,
        hq,
        hkv,
        d,
        q,
        k: k1.repeat(b),
        v: v1.repeat(b),
    };
    for m in [spec(-1, 0, 0), spec(2, 1, 1)] {
        let attn = c.attn(&options(m, PLAIN));
        let os = Strides::contiguous(sq, hq, d);
        let mut out = vec![f32::NAN; attn.out_len()];
        let mut lse = vec![f32::NAN; attn.lse_len()];
        attn.forward_cpu(
            Strided::new(&q1[..], qs),
            Strided::new(&k1[..], ks),
            Strided::new(&v1[..], ks),
            Strided::new(&mut out[..], os),
            Some(&mut lse),
        )
        .unwrap();
        let (want, want_lse) = c.oracle(m, PLAIN);
        compare(
            &format!("zero strides {m:?}"),
            d,
            &out,
            &want,
            &lse,
            &want_lse,
        );
    }
}

// ---------------------------------------------------------------------------------------
// Dense, varlen
// ---------------------------------------------------------------------------------------

/// Packed batches with empty query and empty key sequences; LSE is `[heads_q, total_q]`
/// (the crate's documented varlen layout).
#[test]
fn varlen_with_empty_sequences() {
    let cases: [(&[usize], &[usize]); 3] = [
        (&[3, 0, 5, 1, 17], &[4, 6, 0, 9, 40]),
        (&[0, 0, 2], &[0, 3, 0]),
        (&[33, 1], &[1, 33]),
    ];
    let (hq, hkv, d) = (6, 2, 8);
    for (n, (lq, lk)) in cases.iter().enumerate() {
        let (cq, ck) = (cu_seqlens(lq), cu_seqlens(lk));
        let batch = lq.len();
        let (tq, tk) = (cq[batch] as usize, ck[batch] as usize);
        let mut r = rng(4000 + n as u64);
        let q: Vec<f32> = random_vec(&mut r, tq * hq * d);
        let k: Vec<f32> = random_vec(&mut r, tk * hkv * d);
        let v: Vec<f32> = random_vec(&mut r, tk * hkv * d);
        let qs = Strides {
            batch: 0,
            seq: (hq * d) as i64,
            head: d as i64,
        };
        let ks = Strides {
            batch: 0,
            seq: (hkv * d) as i64,
            head: d as i64,
        };
        for m in [
            spec(-1, 0, 0),
            spec(1, 0, 0),
            spec(-1, -1, 0),
            spec(2, 3, 2),
            spec(0, 0, 5),
        ] {
            for s in [
                PLAIN,
                Scoring {
                    scale: Some(0.3),
                    cap: Some(1.0),
                },
            ] {
                let attn = FlashAttention::new(
                    &AttentionShape {
                        batch,
                        heads_q: hq,
                        heads_kv: hkv,
                        head_dim: d,
                        seqlens: SeqLens::Varlen {
                            cu_seqlens_q: &cq,
                            cu_seqlens_k: &ck,
                        },
                    },
                    &options(m, s),
                )
                .unwrap();
                assert_eq!(attn.lse_len(), hq * tq);
                let mut out = vec![f32::NAN; tq * hq * d];
                let mut lse = vec![f32::NAN; hq * tq];
                attn.forward_cpu(
                    Strided::new(&q[..], qs),
                    Strided::new(&k[..], ks),
                    Strided::new(&v[..], ks),
                    Strided::new(&mut out[..], qs),
                    Some(&mut lse),
                )
                .unwrap();
                let mut want = vec![f64::NAN; out.len()];
                let mut want_lse = vec![f64::NAN; lse.len()];
                for bb in 0..batch {
                    let (q0, k0) = (cq[bb] as usize, ck[bb] as usize);
                    let (sq, sk) = (lq[bb], lk[bb]);
                    for h in 0..hq {
                        let g = h / (hq / hkv);
                        for i in 0..sq {
                            let kv: Vec<(&[f32], &[f32])> = (0..sk)
                                .filter(|&j| m.visible(i, j, sq, sk))
                                .map(|j| {
                                    let o = ((k0 + j) * hkv + g) * d;
                                    (&k[o..o + d], &v[o..o + d])
                                })
                                .collect();
                            let qo = ((q0 + i) * hq + h) * d;
                            let (o, l) = attend(&q[qo..qo + d], &kv, s.scale_f64(d), s.cap_f64());
                            want[qo..qo + d].copy_from_slice(&o);
                            want_lse[h * tq + q0 + i] = l;
                        }
                    }
                }
                compare(
                    &format!("varlen {lq:?}/{lk:?} {m:?} {s:?}"),
                    d,
                    &out,
                    &want,
                    &lse,
                    &want_lse,
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Merge
// ---------------------------------------------------------------------------------------

/// Dense full attention of `c`'s queries over the key subset `keys` (positions of `c`'s
/// keys): out `[b, sq, hq, d]` and LSE `[b, hq, sq]` from the crate.
fn partial_over(c: &Dense, keys: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let row = c.hkv * c.d;
    let pick = |x: &[f32]| -> Vec<f32> {
        let mut out = Vec::new();
        for b in 0..c.b {
            for &j in keys {
                let o = (b * c.sk + j) * row;
                out.extend_from_slice(&x[o..o + row]);
            }
        }
        out
    };
    let sub = Dense {
        b: c.b,
        sq: c.sq,
        sk: keys.len(),
        hq: c.hq,
        hkv: c.hkv,
        d: c.d,
        q: c.q.clone(),
        k: pick(&c.k),
        v: pick(&c.v),
    };
    sub.run(&AttentionOptions::default())
}

fn merge(
    ms: &MergeShape,
    a: &(Vec<f32>, Vec<f32>),
    b: &(Vec<f32>, Vec<f32>),
) -> (Vec<f32>, Vec<f32>) {
    let mut o = vec![f32::NAN; ms.o_len()];
    let mut l = vec![f32::NAN; ms.lse_len()];
    ms.merge_cpu(
        Partial {
            o: &a.0[..],
            lse: &a.1[..],
        },
        Partial {
            o: &b.0[..],
            lse: &b.1[..],
        },
        Partial {
            o: &mut o[..],
            lse: &mut l[..],
        },
    )
    .unwrap();
    (o, l)
}

/// Random splits of the keys into three disjoint subsets (some possibly empty): merging the
/// partials in any order and grouping equals the unsplit oracle.
#[test]
fn merge_split_equals_unsplit() {
    let dims = (2, 6, 29, 4, 2, 8);
    let c = dense(5000, dims);
    let ms = MergeShape {
        batch: c.b,
        seqlen: c.sq,
        heads: c.hq,
        head_dim: c.d,
    };
    let (want, want_lse) = c.oracle(spec(-1, -1, 0), PLAIN);
    let mut r = rng(5001);
    for trial in 0..12 {
        let mut parts: [Vec<usize>; 3] = Default::default();
        for j in 0..c.sk {
            // Trials 0 and 1 leave a part empty.
            let p = match trial {
                0 => r.random_range(0..2),
                1 => 2,
                _ => r.random_range(0..3),
            };
            parts[p].push(j);
        }
        let [a, b, cc] = parts.map(|keys| partial_over(&c, &keys));
        let orders = [
            merge(&ms, &merge(&ms, &a, &b), &cc),
            merge(&ms, &a, &merge(&ms, &b, &cc)),
            merge(&ms, &merge(&ms, &cc, &a), &b),
            merge(&ms, &b, &merge(&ms, &cc, &a)),
            merge(&ms, &merge(&ms, &b, &a), &cc),
        ];
        for (n, (o, l)) in orders.iter().enumerate() {
            compare(
                &format!("merge trial {trial} order {n}"),
                c.d,
                o,
                &want,
                l,
                &want_lse,
            );
        }
        // merge_into_cpu agrees with merge_cpu.
        let mut acc = a.clone();
        for p in [&b, &cc] {
            ms.merge_into_cpu(
                Partial {
                    o: &mut acc.0[..],
                    lse: &mut acc.1[..],
                },
                Partial {
                    o: &p.0[..],
                    lse: &p.1[..],
                },
            )
            .unwrap();
        }
        compare("merge_into", c.d, &acc.0, &want, &acc.1, &want_lse);
    }
}

/// The merge formula on given values: random LSEs (some `-inf`, some far apart), both-empty
/// rows give exactly `o = 0`, `lse = -inf` even with finite garbage in `o`; commutativity.
#[test]
fn merge_formula_edge_cases() {
    let ms = MergeShape {
        batch: 2,
        seqlen: 7,
        heads: 3,
        head_dim: 5,
    };
    let mut r = rng(6000);
    let oa: Vec<f32> = random_vec(&mut r, ms.o_len());
    let ob: Vec<f32> = random_vec(&mut r, ms.o_len());
    let ninf = f32::NEG_INFINITY;
    let special = [
        (ninf, ninf),
        (ninf, 0.3),
        (-2.0, ninf),
        (80.0, -80.0),
        (-300.0, 300.0),
        (88.0, 88.0),
        (-100.0, -100.5),
    ];
    let mut la = vec![0.0f32; ms.lse_len()];
    let mut lb = vec![0.0f32; ms.lse_len()];
    for x in 0..ms.lse_len() {
        let (a, b) = special
            .get(x)
            .copied()
            .unwrap_or_else(|| (r.random_range(-5.0..5.0), r.random_range(-5.0..5.0)));
        la[x] = a;
        lb[x] = b;
    }
    let a = (oa, la);
    let b = (ob, lb);
    let (o, l) = merge(&ms, &a, &b);
    let (o2, l2) = merge(&ms, &b, &a);
    let d = ms.head_dim;
    let mut want = vec![0.0; ms.o_len()];
    let mut want_lse = vec![0.0; ms.lse_len()];
    for bb in 0..ms.batch {
        for s in 0..ms.seqlen {
            for h in 0..ms.heads {
                let li = (bb * ms.heads + h) * ms.seqlen + s;
                let oi = ((bb * ms.seqlen + s) * ms.heads + h) * d;
                let f =
                    |x: &[f32]| -> Vec<f64> { x[oi..oi + d].iter().map(|&v| v as f64).collect() };
                let (mo, ml) = merge_f64(&f(&a.0), a.1[li] as f64, &f(&b.0), b.1[li] as f64);
                want[oi..oi + d].copy_from_slice(&mo);
                want_lse[li] = ml;
            }
        }
    }
    compare("merge formula", d, &o, &want, &l, &want_lse);
    compare("merge formula (b, a)", d, &o2, &want, &l2, &want_lse);
    // Row 0 (batch 0, seq 0, head 0) is the both-empty one.
    assert!(o[..d].iter().all(|&x| x == 0.0) && l[0] == ninf);
}

/// A partial over zero keys (seqlen_k = 0) is empty everywhere and is the merge identity.
#[test]
fn empty_partial_is_merge_identity() {
    let c = dense(7000, (2, 5, 13, 2, 2, 8));
    let empty = partial_over(&c, &[]);
    assert!(empty.0.iter().all(|&x| x == 0.0));
    assert!(empty.1.iter().all(|&x| x == f32::NEG_INFINITY));
    let full = c.run(&AttentionOptions::default());
    let ms = MergeShape {
        batch: c.b,
        seqlen: c.sq,
        heads: c.hq,
        head_dim: c.d,
    };
    let (want, want_lse) = c.oracle(spec(-1, -1, 0), PLAIN);
    let (o, l) = merge(&ms, &empty, &full);
    compare("empty + full", c.d, &o, &want, &l, &want_lse);
    let (o, l) = merge(&ms, &full, &empty);
    compare("full + empty", c.d, &o, &want, &l, &want_lse);
    let (o, l) = merge(&ms, &empty, &empty);
    assert!(o.iter().all(|&x| x == 0.0) && l.iter().all(|&x| x == f32::NEG_INFINITY));
}

// ---------------------------------------------------------------------------------------
// Paged cache and decode
// ---------------------------------------------------------------------------------------

/// A paged cache written directly by the placement rule of the semantics (token `t` of
/// sequence `b` in page `block_table[b][t / page_size]`, slot `t % page_size`, NHD), with
/// pages scattered, garbage in every unused slot, and the Quest bounds of every used page
/// (per-channel min/max of its keys).
struct Paged {
    cache: PagedCache,
    seqlens: Vec<usize>,
    ps: usize,
    hkv: usize,
    d: usize,
    k_cache: Vec<f32>,
    v_cache: Vec<f32>,
    kmin: Vec<f32>,
    kmax: Vec<f32>,
    /// `[seqlen, hkv, d]` per sequence.
    k_tok: Vec<Vec<f32>>,
    v_tok: Vec<Vec<f32>>,
    table: Vec<i32>,
    max_pages: usize,
    num_pages: usize,
}

fn paged(seqlens: &[usize], ps: usize, hkv: usize, d: usize, seed: u64) -> Paged {
    let mut r = rng(seed);
    let row = hkv * d;
    let k_tok: Vec<Vec<f32>> = seqlens
        .iter()
        .map(|&s| random_vec(&mut r, s * row))
        .collect();
    let v_tok: Vec<Vec<f32>> = seqlens
        .iter()
        .map(|&s| random_vec(&mut r, s * row))
        .collect();
    paged_from(seqlens, ps, hkv, d, k_tok, v_tok, &mut r)
}

fn paged_from(
    seqlens: &[usize],
    ps: usize,
    hkv: usize,
    d: usize,
    k_tok: Vec<Vec<f32>>,
    v_tok: Vec<Vec<f32>>,
    r: &mut SmallRng,
) -> Paged {
    let pages: Vec<usize> = seqlens.iter().map(|s| s.div_ceil(ps)).collect();
    let max_pages = pages.iter().copied().max().unwrap_or(0) + 2;
    let num_pages = pages.iter().sum::<usize>() + 4;
    let table = shuffled_block_table(&pages, max_pages, num_pages, r);
    let layout = PagedLayout {
        num_pages,
        page_size: ps,
        heads_kv: hkv,
        head_dim: d,
    };
    let mut k_cache: Vec<f32> = random_vec(r, num_pages * ps * hkv * d);
    let mut v_cache: Vec<f32> = random_vec(r, num_pages * ps * hkv * d);
    let mut kmin = vec![-9.0f32; num_pages * hkv * d];
    let mut kmax = vec![9.0f32; num_pages * hkv * d];
    let mut bounds_set = vec![false; num_pages * hkv];
    for (b, &s) in seqlens.iter().enumerate() {
        for t in 0..s {
            let page = table[b * max_pages + t / ps] as usize;
            let slot = t % ps;
            for g in 0..hkv {
                let dst = ((page * ps + slot) * hkv + g) * d;
                let src = (t * hkv + g) * d;
                k_cache[dst..dst + d].copy_from_slice(&k_tok[b][src..src + d]);
                v_cache[dst..dst + d].copy_from_slice(&v_tok[b][src..src + d]);
                let mo = (page * hkv + g) * d;
                let fresh = !bounds_set[page * hkv + g];
                bounds_set[page * hkv + g] = true;
                for c in 0..d {
                    let x = k_tok[b][src + c];
                    if fresh {
                        kmin[mo + c] = x;
                        kmax[mo + c] = x;
                    } else {
                        kmin[mo + c] = kmin[mo + c].min(x);
                        kmax[mo + c] = kmax[mo + c].max(x);
                    }
                }
            }
        }
    }
    let sl: Vec<i32> = seqlens.iter().map(|&s| s as i32).collect();
    let cache = PagedCache::new(
        layout,
        PageTable {
            block_table: &table,
            max_pages_per_seq: max_pages,
            seqlens_k: &sl,
        },
    )
    .unwrap();
    Paged {
        cache,
        seqlens: seqlens.to_vec(),
        ps,
        hkv,
        d,
        k_cache,
        v_cache,
        kmin,
        kmax,
        k_tok,
        v_tok,
        table,
        max_pages,
        num_pages,
    }
}

/// Decode queries `[batch, q_len, hq, d]` and their problem.
struct DecodeCase<'a> {
    p: &'a Paged,
    hq: usize,
    q_len: usize,
    q: Vec<f32>,
}

impl DecodeCase<'_> {
    fn qs(&self) -> Strides {
        Strides::contiguous(self.q_len, self.hq, self.p.d)
    }

    fn run(&self, dec: &PagedDecode, meta: bool) -> (Vec<f32>, Vec<f32>) {
        let p = self.p;
        let batch = p.seqlens.len();
        let mut out = vec![f32::NAN; batch * self.q_len * self.hq * p.d];
        let mut lse = vec![f32::NAN; batch * self.hq * self.q_len];
        assert_eq!(dec.out_len(), out.len());
        assert_eq!(dec.lse_len(), lse.len());
        dec.forward_cpu(
            Strided::new(&self.q[..], self.qs()),
            KvPages {
                k: &p.k_cache[..],
                v: &p.v_cache[..],
            },
            meta.then_some(PageMeta {
                kmin: &p.kmin[..],
                kmax: &p.kmax[..],
            }),
            Strided::new(&mut out[..], self.qs()),
            Some(&mut lse),
        )
        .unwrap();
        (out, lse)
    }

    /// Oracle over the contiguous tokens: kv head `g` uses mask `masks[g]` and reads key `j`
    /// only if `page_ok(b, g, j / page_size)`. Out `[batch, q_len, hq, d]`, LSE
    /// `[batch, hq, q_len]`.
    fn oracle(
        &self,
        masks: &[Spec],
        s: Scoring,
        page_ok: &dyn Fn(usize, usize, usize) -> bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let p = self.p;
        let (hq, ql, d, hkv) = (self.hq, self.q_len, p.d, p.hkv);
        let batch = p.seqlens.len();
        let mut out = vec![f64::NAN; batch * ql * hq * d];
        let mut lse = vec![f64::NAN; batch * hq * ql];
        for b in 0..batch {
            let sk = p.seqlens[b];
            for i in 0..ql {
                for h in 0..hq {
                    let g = h / (hq / hkv);
                    let kv: Vec<(&[f32], &[f32])> = (0..sk)
                        .filter(|&j| masks[g].visible(i, j, ql, sk) && page_ok(b, g, j / p.ps))
                        .map(|j| {
                            let o = (j * hkv + g) * d;
                            (&p.k_tok[b][o..o + d], &p.v_tok[b][o..o + d])
                        })
                        .collect();
                    let qo = ((b * ql + i) * hq + h) * d;
                    let (o, l) = attend(&self.q[qo..qo + d], &kv, s.scale_f64(d), s.cap_f64());
                    out[qo..qo + d].copy_from_slice(&o);
                    lse[(b * hq + h) * ql + i] = l;
                }
            }
        }
        (out, lse)
    }
}

fn decode_case(p: &Paged, hq: usize, q_len: usize, seed: u64) -> DecodeCase<'_> {
    let mut r = rng(seed);
    let q = random_vec(&mut r, p.seqlens.len() * q_len * hq * p.d);
    DecodeCase { p, hq, q_len, q }
}

/// Decode queries are causal among the new tokens: a window with no right bound decodes as
/// right = 0 (an explicit right bound is kept).
fn decode_mask(m: Spec) -> Spec {
    if m.right < 0 {
        Spec { right: 0, ..m }
    } else {
        m
    }
}

/// Paged decode == the oracle over the same tokens laid out contiguously, for odd page sizes,
/// q_len 1..=16 (causal among the new tokens, bottom-right aligned, also when the options
/// leave the right side unbounded), windows with sinks,
/// GQA/MQA, softcap and scale, forced KV splits; sequences shorter than q_len and empty.
#[test]
fn paged_decode_matches_oracle() {
    let seqlens = [1usize, 37, 250, 0, 5, 16];
    let masks = [
        spec(-1, 0, 0),
        spec(6, 0, 3),
        spec(0, 0, 0),
        spec(1, 0, 20),
        spec(-1, -1, 0),
        spec(3, 2, 2),
    ];
    let heads = [(4, 2, 8), (3, 3, 24), (8, 1, 16)];
    let mut seed = 8000;
    for ps in [1usize, 3, 16, 100] {
        for (n, &(hq, hkv, d)) in heads.iter().enumerate() {
            let p = paged(&seqlens, ps, hkv, d, seed);
            seed += 1;
            for q_len in [1usize, 2, 5, 16] {
                let case = decode_case(&p, hq, q_len, seed);
                seed += 1;
                for (mi, m) in masks.iter().enumerate() {
                    let s = if (mi + n) % 3 == 2 {
                        Scoring {
                            scale: Some(0.6),
                            cap: Some(2.0),
                        }
                    } else {
                        PLAIN
                    };
                    let masks_g = vec![decode_mask(*m); hkv];
                    let (want, want_lse) = case.oracle(&masks_g, s, &|_, _, _| true);
                    for splits in [None, Some(3)] {
                        let dec = PagedDecode::new(&p.cache, hq, q_len, &options(*m, s))
                            .unwrap()
                            .with_splits(splits)
                            .unwrap();
                        let (got, lse) = case.run(&dec, false);
                        compare(
                            &format!(
                                "paged ps {ps} hq {hq} hkv {hkv} q_len {q_len} {m:?} {s:?} splits {splits:?}"
                            ),
                            d,
                            &got,
                            &want,
                            &lse,
                            &want_lse,
                        );
                    }
                }
            }
        }
    }
}

/// One launch mixing a full head, a streaming head (its own window + sinks replacing the base
/// mask) and a Quest head.
#[test]
fn paged_mixed_head_policies() {
    let (hq, hkv, d) = (6, 3, 8);
    for ps in [1usize, 3, 16] {
        let p = paged(&[90, 7, 200], ps, hkv, d, 9000 + ps as u64);
        for q_len in [1usize, 4] {
            let case = decode_case(&p, hq, q_len, 9100 + ps as u64);
            let base = spec(-1, 0, 0);
            let streaming = StreamingConfig {
                sinks: 2,
                window: 5,
            };
            let quest = QuestConfig {
                token_budget: 40,
                sink_pages: 1,
            };
            let policy = SparsePolicy {
                heads: vec![HeadPolicy::Full, HeadPolicy::Streaming, HeadPolicy::Quest],
                streaming,
                quest,
            };
            let dec = PagedDecode::new(&p.cache, hq, q_len, &options(base, PLAIN))
                .unwrap()
                .with_policy(policy)
                .unwrap();
            let (_, sel) = quest_oracle(&case, base, quest);
            let masks = [base, spec(4, 0, 2), base];
            let (want, want_lse) = case.oracle(&masks, PLAIN, &|b, g, page| {
                g != 2 || sel[b * hkv + g].contains(&page)
            });
            let (got, lse) = case.run(&dec, true);
            compare(
                &format!("mixed ps {ps} q_len {q_len}"),
                d,
                &got,
                &want,
                &lse,
                &want_lse,
            );
        }
    }
}

/// Quest oracle per (sequence, kv head): candidates are the pages with a key the base mask
/// leaves visible to some row; score `S(p) = sum_c max(q_c kmax_c, q_c kmin_c)` aggregated by
/// max over the group's query heads and the q_len rows (the crate's documented choice);
/// kept: the newest token's page and the first `sink_pages` pages; `K = min(max(B, #kept),
/// #candidates)` with `B = max(1, budget / page_size)`, ordered kept first, then score, then
/// lower page index. Returns scores `[batch, hkv, max_pages]` and the selected pages.
fn quest_oracle(case: &DecodeCase, base: Spec, cfg: QuestConfig) -> (Vec<f64>, Vec<Vec<usize>>) {
    let p = case.p;
    let (hq, ql, d, hkv, ps) = (case.hq, case.q_len, p.d, p.hkv, p.ps);
    let group = hq / hkv;
    let batch = p.seqlens.len();
    let mut scores = vec![f64::NEG_INFINITY; batch * hkv * p.max_pages];
    let mut sel = Vec::new();
    for b in 0..batch {
        let sk = p.seqlens[b];
        for g in 0..hkv {
            let cand: Vec<usize> = (0..sk.div_ceil(ps))
                .filter(|&lp| {
                    (lp * ps..((lp + 1) * ps).min(sk))
                        .any(|j| (0..ql).any(|i| base.visible(i, j, ql, sk)))
                })
                .collect();
            for &lp in &cand {
                let page = p.table[b * p.max_pages + lp] as usize;
                let mo = (page * hkv + g) * d;
                let mut best = f64::NEG_INFINITY;
                for i in 0..ql {
                    for gh in 0..group {
                        let qo = ((b * ql + i) * hq + g * group + gh) * d;
                        let sc: f64 = (0..d)
                            .map(|c| {
                                let q = case.q[qo + c] as f64;
                                (q * p.kmax[mo + c] as f64).max(q * p.kmin[mo + c] as f64)
                            })
                            .sum();
                        best = best.max(sc);
                    }
                }
                scores[(b * hkv + g) * p.max_pages + lp] = best;
            }
            let newest = (sk > 0).then(|| (sk - 1) / ps);
            let kept = |lp: usize| lp < cfg.sink_pages || Some(lp) == newest;
            let n_kept = cand.iter().filter(|&&lp| kept(lp)).count();
            let budget = (cfg.token_budget / ps).max(1);
            let k = budget.max(n_kept).min(cand.len());
            let sc = |lp: usize| scores[(b * hkv + g) * p.max_pages + lp];
            let mut order = cand.clone();
            order.sort_by(|&a, &c| {
                kept(c)
                    .cmp(&kept(a))
                    .then(sc(c).partial_cmp(&sc(a)).unwrap())
                    .then(a.cmp(&c))
            });
            let mut chosen: Vec<usize> = order[..k].to_vec();
            chosen.sort_unstable();
            if let Some(nw) = newest
                && cand.contains(&nw)
            {
                assert!(chosen.contains(&nw), "oracle: newest page must be selected");
            }
            sel.push(chosen);
        }
    }
    (scores, sel)
}

fn check_quest(case: &DecodeCase, base: Spec, cfg: QuestConfig, what: &str) {
    let p = case.p;
    let hkv = p.hkv;
    let dec = PagedDecode::new(&p.cache, case.hq, case.q_len, &options(base, PLAIN))
        .unwrap()
        .with_policy(SparsePolicy::uniform(hkv, HeadPolicy::Quest).with_quest(cfg))
        .unwrap();
    let got = dec
        .select_cpu(
            Strided::new(&case.q[..], case.qs()),
            PageMeta {
                kmin: &p.kmin[..],
                kmax: &p.kmax[..],
            },
        )
        .unwrap();
    let (want_scores, want_sel) = quest_oracle(case, base, cfg);
    assert_eq!(got.scores.len(), want_scores.len(), "{what}: scores length");
    for (x, (&g, &w)) in got.scores.iter().zip(&want_scores).enumerate() {
        if w == f64::NEG_INFINITY {
            assert_eq!(
                g,
                f32::NEG_INFINITY,
                "{what}: score[{x}] of a non-candidate"
            );
        } else {
            assert!(
                (g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
                "{what}: score[{x}] = {g}, want {w}"
            );
        }
    }
    for b in 0..p.seqlens.len() {
        for g in 0..hkv {
            let got_pages: Vec<usize> = got
                .pages
                .get(b, g)
                .unwrap()
                .iter()
                .map(|&x| x as usize)
                .collect();
            assert_eq!(
                got_pages,
                want_sel[b * hkv + g],
                "{what}: selection of sequence {b} kv head {g}"
            );
        }
    }
    // Decode over the selection == the oracle restricted to the selected pages.
    let (want, want_lse) = case.oracle(&vec![base; hkv], PLAIN, &|b, g, page| {
        want_sel[b * hkv + g].contains(&page)
    });
    for splits in [None, Some(2)] {
        let (out, lse) = case.run(&dec.clone().with_splits(splits).unwrap(), true);
        compare(
            &format!("{what} decode splits {splits:?}"),
            p.d,
            &out,
            &want,
            &lse,
            &want_lse,
        );
    }
}

/// Quest scores, top-B selection (newest page always in, sink pages, budgets below one page
/// and above the candidate count) and the decode over the selection.
#[test]
fn quest_selection_matches_oracle() {
    let seqlens = [37usize, 250, 5, 0, 64];
    let mut seed = 10_000;
    for ps in [1usize, 3, 16] {
        for (hq, hkv) in [(4, 2), (6, 3), (4, 1)] {
            let p = paged(&seqlens, ps, hkv, 8, seed);
            seed += 1;
            for q_len in [1usize, 4] {
                let case = decode_case(&p, hq, q_len, seed);
                seed += 1;
                for base in [spec(-1, 0, 0), spec(39, 0, 3)] {
                    for token_budget in [0, 1, 3 * ps, 50, 1000] {
                        for sink_pages in [0, 1, 2] {
                            let cfg = QuestConfig {
                                token_budget,
                                sink_pages,
                            };
                            check_quest(
                                &case,
                                base,
                                cfg,
                                &format!(
                                    "quest ps {ps} hq {hq} hkv {hkv} q_len {q_len} {base:?} {cfg:?}"
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Ties are broken towards the lower page index: every key equal makes every page score the
/// same, so the selection is the kept pages plus the lowest-index others.
#[test]
fn quest_ties_prefer_lower_pages() {
    let (ps, hkv, d) = (4usize, 1, 8);
    let seqlens = [41usize, 9];
    let mut r = rng(11_000);
    let key: Vec<f32> = random_vec(&mut r, d);
    let k_tok: Vec<Vec<f32>> = seqlens.iter().map(|&s| key.repeat(s)).collect();
    let v_tok: Vec<Vec<f32>> = seqlens.iter().map(|&s| random_vec(&mut r, s * d)).collect();
    let p = paged_from(&seqlens, ps, hkv, d, k_tok, v_tok, &mut r);
    let case = decode_case(&p, 2, 1, 11_001);
    for (sink_pages, budget, want0) in [
        (0, 3 * ps, vec![0, 1, 10]),
        (1, 3 * ps, vec![0, 1, 10]),
        (2, 4 * ps, vec![0, 1, 2, 10]),
        (0, 1, vec![10]),
        (3, 1, vec![0, 1, 2, 10]),
    ] {
        let cfg = QuestConfig {
            token_budget: budget,
            sink_pages,
        };
        let (_, sel) = quest_oracle(&case, spec(-1, 0, 0), cfg);
        assert_eq!(sel[0], want0, "oracle {cfg:?}");
        check_quest(&case, spec(-1, 0, 0), cfg, &format!("ties {cfg:?}"));
    }
}

/// Appending in chunks (a prefill chunk, then 1..=3 tokens per step) into garbage-filled
/// buffers writes each token at the slot the placement rule gives and leaves each page's
/// bounds equal to the per-channel min/max of its keys.
#[test]
fn append_places_tokens_and_bounds() {
    for ps in [1usize, 3, 16, 100] {
        let seqlens = [0usize, 1, 57, 230];
        let (hkv, d) = (2, 8);
        let p = paged(&seqlens, ps, hkv, d, 12_000 + ps as u64);
        let layout = p.cache.layout();
        let mut r = rng(12_100);
        let mut k_cache: Vec<f32> = random_vec(&mut r, layout.cache_len());
        let mut v_cache: Vec<f32> = random_vec(&mut r, layout.cache_len());
        let mut kmin = vec![-5.0f32; layout.meta_len()];
        let mut kmax = vec![5.0f32; layout.meta_len()];
        let row = hkv * d;
        let mut done = vec![0usize; seqlens.len()];
        loop {
            let chunk: Vec<usize> = seqlens
                .iter()
                .zip(&done)
                .map(|(&s, &dn)| (if dn == 0 { 10 } else { r.random_range(1..=3) }).min(s - dn))
                .collect();
            if chunk.iter().all(|&c| c == 0) {
                break;
            }
            let now: Vec<i32> = done
                .iter()
                .zip(&chunk)
                .map(|(a, c)| (a + c) as i32)
                .collect();
            let cache = PagedCache::new(
                layout,
                PageTable {
                    block_table: &p.table,
                    max_pages_per_seq: p.max_pages,
                    seqlens_k: &now,
                },
            )
            .unwrap();
            let mut kn = Vec::new();
            let mut vn = Vec::new();
            for b in 0..seqlens.len() {
                kn.extend_from_slice(&p.k_tok[b][done[b] * row..(done[b] + chunk[b]) * row]);
                vn.extend_from_slice(&p.v_tok[b][done[b] * row..(done[b] + chunk[b]) * row]);
            }
            let st = Strides::contiguous(1, hkv, d);
            cache
                .append_cpu(
                    &cu_seqlens(&chunk),
                    Strided::new(&kn[..], st),
                    Strided::new(&vn[..], st),
                    KvPages {
                        k: &mut k_cache[..],
                        v: &mut v_cache[..],
                    },
                    Some(PageMeta {
                        kmin: &mut kmin[..],
                        kmax: &mut kmax[..],
                    }),
                )
                .unwrap();
            for b in 0..seqlens.len() {
                done[b] += chunk[b];
            }
        }
        // Every token at its slot.
        for (b, &s) in seqlens.iter().enumerate() {
            for t in 0..s {
                let page = p.table[b * p.max_pages + t / ps] as usize;
                let o = (page * ps + t % ps) * row;
                assert_eq!(&k_cache[o..o + row], &p.k_tok[b][t * row..(t + 1) * row]);
                assert_eq!(&v_cache[o..o + row], &p.v_tok[b][t * row..(t + 1) * row]);
            }
        }
        // Bounds of every used page (the directly computed ones).
        let mut used = vec![false; p.num_pages];
        for (b, &s) in seqlens.iter().enumerate() {
            for lp in 0..s.div_ceil(ps) {
                used[p.table[b * p.max_pages + lp] as usize] = true;
            }
        }
        for page in (0..p.num_pages).filter(|&x| used[x]) {
            let o = page * row;
            assert_eq!(
                &kmin[o..o + row],
                &p.kmin[o..o + row],
                "kmin page {page} ps {ps}"
            );
            assert_eq!(
                &kmax[o..o + row],
                &p.kmax[o..o + row],
                "kmax page {page} ps {ps}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Ring attention
// ---------------------------------------------------------------------------------------

/// Shardings per the semantics and the crate's chunk boundaries (`c * seqlen / parts`):
/// contiguous, zigzag (chunks `r` and `2N - 1 - r` of 2N), stripe (`t mod N`).
#[test]
fn ring_shardings() {
    for s in [1usize, 5, 12, 13, 40] {
        for world in [1usize, 2, 3, 4, 5] {
            let chunk = |parts: usize, c: usize| c * s / parts..(c + 1) * s / parts;
            for r in 0..world {
                let cont = RingLayout::new(s, world, Sharding::Contiguous).unwrap();
                assert_eq!(cont.positions(r), chunk(world, r).collect::<Vec<_>>());
                let zz = RingLayout::new(s, world, Sharding::Zigzag).unwrap();
                let want: Vec<usize> = chunk(2 * world, r)
                    .chain(chunk(2 * world, 2 * world - 1 - r))
                    .collect();
                assert_eq!(zz.positions(r), want, "zigzag s {s} world {world} rank {r}");
                let st = RingLayout::new(s, world, Sharding::Stripe).unwrap();
                let want: Vec<usize> = (0..s).filter(|t| t % world == r).collect();
                assert_eq!(st.positions(r), want);
            }
        }
    }
}

/// Ring attention == the oracle over the whole sequence, for every sharding, world sizes
/// with empty ranks, and masks with global positions; the schedule computes exactly the steps
/// whose shard has a visible key for the rank's queries, and sends a shard on exactly when a
/// later rank needs it.
#[test]
fn ring_matches_oracle_and_skips_masked_steps() {
    let (batch, hq, hkv, d) = (2, 4, 2, 8);
    let masks = [
        (spec(-1, -1, 0), PLAIN),
        (spec(-1, 0, 0), PLAIN),
        (spec(0, 0, 0), PLAIN),
        (spec(1, 0, 0), PLAIN),
        (spec(3, 2, 2), PLAIN),
        (spec(0, -1, 3), PLAIN),
        (spec(-1, 2, 1), PLAIN),
        (spec(4, 0, 2), PLAIN),
        (spec(1, 1, 4), PLAIN),
        (
            spec(-1, 0, 0),
            Scoring {
                scale: Some(1.7),
                cap: Some(2.0),
            },
        ),
    ];
    for (seed, s) in (13_000..).zip([1usize, 5, 13, 40]) {
        let c = dense(seed, (batch, s, s, hq, hkv, d));
        for &(m, sc) in &masks {
            let (want, want_lse) = c.oracle(m, sc);
            for world in [1usize, 2, 3, 5] {
                for sharding in [Sharding::Contiguous, Sharding::Zigzag, Sharding::Stripe] {
                    let layout = RingLayout::new(s, world, sharding).unwrap();
                    let ring = RingAttention::new(
                        layout,
                        RingShape {
                            batch,
                            heads_q: hq,
                            heads_kv: hkv,
                            head_dim: d,
                        },
                        &options(m, sc),
                    )
                    .unwrap();
                    let what = format!("ring s {s} world {world} {sharding:?} {m:?} {sc:?}");
                    let pos: Vec<Vec<usize>> = (0..world).map(|r| layout.positions(r)).collect();
                    // Schedule against the oracle's visibility.
                    let sees = |r: usize, src: usize| {
                        pos[r]
                            .iter()
                            .any(|&i| pos[src].iter().any(|&j| m.visible(i, j, s, s)))
                    };
                    let sched = ring.schedule();
                    for r in 0..world {
                        for t in 0..world {
                            let src = (r + world - t) % world;
                            assert_eq!(layout.kv_source(r, t), src);
                            assert_eq!(
                                sched.compute[r][t],
                                sees(r, src),
                                "{what}: compute[{r}][{t}]"
                            );
                        }
                    }
                    for t in 0..world.saturating_sub(1) {
                        for sh in 0..world {
                            let need = (t + 1..world).any(|later| sees((sh + later) % world, sh));
                            assert_eq!(sched.send[t][sh], need, "{what}: send[{t}][{sh}]");
                        }
                    }
                    // Shards, poisoned outputs.
                    let gather = |x: &[f32], heads: usize, p: &[usize]| -> Vec<f32> {
                        let rw = heads * d;
                        let mut out = Vec::new();
                        for b in 0..batch {
                            for &t in p {
                                out.extend_from_slice(&x[(b * s + t) * rw..(b * s + t + 1) * rw]);
                            }
                        }
                        out
                    };
                    let qsh: Vec<Vec<f32>> = pos.iter().map(|p| gather(&c.q, hq, p)).collect();
                    let ksh: Vec<Vec<f32>> = pos.iter().map(|p| gather(&c.k, hkv, p)).collect();
                    let vsh: Vec<Vec<f32>> = pos.iter().map(|p| gather(&c.v, hkv, p)).collect();
                    let mut osh: Vec<Vec<f32>> = (0..world)
                        .map(|r| vec![f32::NAN; ring.out_len(r)])
                        .collect();
                    let mut lsh: Vec<Vec<f32>> = (0..world)
                        .map(|r| vec![f32::NAN; ring.lse_len(r)])
                        .collect();
                    let st = |r: usize, h: usize| Strides::contiguous(pos[r].len(), h, d);
                    let qv: Vec<_> = (0..world)
                        .map(|r| Strided::new(&qsh[r][..], st(r, hq)))
                        .collect();
                    let kv: Vec<_> = (0..world)
                        .map(|r| Strided::new(&ksh[r][..], st(r, hkv)))
                        .collect();
                    let vv: Vec<_> = (0..world)
                        .map(|r| Strided::new(&vsh[r][..], st(r, hkv)))
                        .collect();
                    let mut ov: Vec<_> = osh
                        .iter_mut()
                        .enumerate()
                        .map(|(r, o)| Strided::new(&mut o[..], st(r, hq)))
                        .collect();
                    let mut lv: Vec<&mut [f32]> = lsh.iter_mut().map(|l| &mut l[..]).collect();
                    ring.forward_cpu(&qv, &kv, &vv, &mut ov, Some(&mut lv))
                        .unwrap();
                    // Back to global order: out [b, s, hq, d], lse [b, hq, s].
                    let mut got = vec![f32::NAN; want.len()];
                    let mut got_lse = vec![f32::NAN; want_lse.len()];
                    for r in 0..world {
                        let lr = pos[r].len();
                        for b in 0..batch {
                            for (i, &t) in pos[r].iter().enumerate() {
                                let rw = hq * d;
                                got[(b * s + t) * rw..(b * s + t + 1) * rw].copy_from_slice(
                                    &osh[r][(b * lr + i) * rw..(b * lr + i + 1) * rw],
                                );
                                for h in 0..hq {
                                    got_lse[(b * hq + h) * s + t] = lsh[r][(b * hq + h) * lr + i];
                                }
                            }
                        }
                    }
                    compare(&what, d, &got, &want, &got_lse, &want_lse);
                }
            }
        }
    }
}
