//! Independent audit of the public CPU API against the shared specification
//! (`/work/shared/reference/semantics.md`, copied at the top of `docs/semantics.md`).
//!
//! The oracle here is written from the specification's text alone and shares nothing with the
//! crate: not `longattn::reference`, not `Mask::visible` or the neighbor / schedule helpers,
//! not `tests/common`. It is a brute-force f64 softmax over an explicit visibility predicate:
//!
//! - FlashAttention-2 windows `(left, right)` with `-1` unbounded, bottom-right aligned
//!   (`diag = i + sk - sq`), causal composed as `right = min(right, 0)` (0 when unbounded),
//!   sinks `j < sinks` visible unless right of the right bound;
//! - NATTEN per-dim windows (dilation groups, border shift, even kernels, stride centres,
//!   causal dims), the product over dims;
//! - paged token lookup `block_table[b][t / page_size]`, slot `t % page_size`; Quest scores
//!   `sum_c max(q_c kmax_c, q_c kmin_c)`, top-B with the newest page included;
//! - the LSE merge formula; ring shardings (contiguous, zigzag over `2N` chunks, stripe);
//! - block-sparse lists (`docs/semantics.md`, the crate's own extension of the specification):
//!   listed full blocks visible, listed partial blocks through the element mask.
//!
//! Inputs are uniform in [-1, 1) from fixed seeds and rounded to the element type first (so
//! the oracle sees exactly what the crate sees); outputs are poisoned with NaN, padded strides
//! carry NaN in the inputs' gaps and a sentinel in the output's gaps. A result passes when
//! nothing is NaN, rows the oracle leaves empty are exactly 0 with LSE exactly `-inf`, and the
//! relative L2 error (overall and per row) and the LSE error are within the element type's
//! tolerance. Hand-picked edge cases come first in each family, seeded random sweeps (shapes,
//! masks biased to small bounds, scales, softcaps, element types) after them.
//!
//! Where the specification is silent the crate's documented choices are what is checked:
//! paged prefill is dense attention (not causal by default), varlen LSE is `[hq, total_q]`,
//! uneven ring chunks end at `c * s / n`, Quest aggregates a group by max and keeps the
//! newest page among its `max(1, B)` pages. Not driven here (crate extensions, audited the same
//! way in `tests/semantics_audit_extensions.rs`): a decode right bound > 0 without causal, Quest
//! `sink_pages` and windowed Quest candidates, negative and zero strides, FP8, MoBA selection,
//! the remaining block patterns, Star attention.
#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

use longattn::block_sparse::ListId;
use longattn::{
    AttentionOptions, AttentionShape, BlockKind, BlockMask, BlockMaskDims, BlockSparseAttention,
    DType, Element, FlashAttention, HeadPolicy, KvPages, MergeShape, NeighborhoodAttention,
    NeighborhoodDim, NeighborhoodShape, PageMeta, PageTable, PagedCache, PagedDecode, PagedLayout,
    PagedPrefill, Partial, QuestConfig, RingAttention, RingLayout, RingShape, SeqLens, Sharding,
    SparsePolicy, StreamingConfig, Strided, Strides, Window, bf16, f16,
};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

// =======================================================================================
// Oracle: visibility
// =======================================================================================

/// A mask in the specification's integers: FlashAttention-2 `window_size = (left, right)`
/// (`-1` unbounded), `sinks` leading keys, and the `causal` flag.
#[derive(Clone, Copy, Debug)]
struct Vis {
    left: i64,
    right: i64,
    sinks: i64,
    causal: bool,
}

const fn vis(left: i64, right: i64, sinks: i64, causal: bool) -> Vis {
    Vis {
        left,
        right,
        sinks,
        causal,
    }
}

impl Vis {
    /// The right bound in force: causal sets it to `min(right, 0)`, 0 when unbounded.
    fn right_bound(&self) -> i64 {
        match (self.causal, self.right) {
            (false, r) => r,
            (true, -1) => 0,
            (true, r) => r.min(0),
        }
    }

    /// `visible(i, j)` for lengths `sq`, `sk`.
    fn sees(&self, i: usize, j: usize, sq: usize, sk: usize) -> bool {
        let (i, j, sq, sk) = (i as i64, j as i64, sq as i64, sk as i64);
        if j < 0 || j >= sk {
            return false;
        }
        let diag = i + sk - sq;
        let r = self.right_bound();
        let not_right = r == -1 || j <= diag + r;
        let not_left = self.left == -1 || diag - self.left <= j;
        not_right && (not_left || j < self.sinks)
    }

    fn options(&self, sc: Score) -> AttentionOptions {
        let mut o = AttentionOptions::default()
            .with_window(Window::from_flash(self.left, self.right).unwrap())
            .with_sinks(self.sinks as usize)
            .with_causal(self.causal);
        if let Some(s) = sc.scale {
            o = o.with_scale(s);
        }
        if let Some(c) = sc.cap {
            o = o.with_softcap(c);
        }
        o
    }
}

/// The masks every dense-like family is driven with: full, causal, the one- and two-token
/// windows written three ways, bounded both sides, unbounded left or right, causal windows,
/// sinks with and without causal / window (more sinks than keys too).
const MASKS: [Vis; 16] = [
    vis(-1, -1, 0, false),
    vis(-1, -1, 0, true),
    vis(-1, 0, 0, false),
    vis(0, 0, 0, false),
    vis(0, -1, 0, true),
    vis(1, 0, 0, false),
    vis(1, 5, 0, true),
    vis(2, 3, 0, false),
    vis(-1, 2, 0, false),
    vis(3, -1, 0, false),
    vis(3, -1, 0, true),
    vis(-1, -1, 2, true),
    vis(0, 0, 3, false),
    vis(2, 1, 2, false),
    vis(4, -1, 1, true),
    vis(1, 0, 40, false),
];

// =======================================================================================
// Oracle: attention
// =======================================================================================

/// Scale (`None`: `1/sqrt(head_dim)`) and Gemma-2 softcap.
#[derive(Clone, Copy, Debug)]
struct Score {
    scale: Option<f32>,
    cap: Option<f32>,
}

const PLAIN: Score = Score {
    scale: None,
    cap: None,
};
const CAPPED: Score = Score {
    scale: Some(0.7),
    cap: Some(1.5),
};

/// One query row over the keys `js`: softmax of `cap * tanh(scale * q.k / cap)`, natural-log
/// LSE; no key gives `(0, -inf)`.
fn attend_row<'a>(
    q: &[f64],
    js: &[usize],
    key: &dyn Fn(usize) -> (&'a [f64], &'a [f64]),
    sc: Score,
) -> (Vec<f64>, f64) {
    let d = q.len();
    if js.is_empty() {
        return (vec![0.0; d], f64::NEG_INFINITY);
    }
    let scale = sc.scale.map_or(1.0 / (d as f64).sqrt(), f64::from);
    let s: Vec<f64> = js
        .iter()
        .map(|&j| {
            let x = scale * q.iter().zip(key(j).0).map(|(a, b)| a * b).sum::<f64>();
            sc.cap.map_or(x, |c| c as f64 * (x / c as f64).tanh())
        })
        .collect();
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
    let mut o = vec![0.0; d];
    for (&j, &x) in js.iter().zip(&s) {
        let w = (x - m).exp() / z;
        for (oc, vc) in o.iter_mut().zip(key(j).1) {
            *oc += w * vc;
        }
    }
    (o, m + z.ln())
}

/// One sequence: `q: [sq, hq, d]`, `k, v: [sk, hkv, d]` contiguous, `sees(h, i, j)`.
/// Returns `out [sq, hq, d]`, `lse [hq, sq]`.
fn attend_seq(
    (q, k, v): (&[f64], &[f64], &[f64]),
    (sq, sk, hq, hkv, d): (usize, usize, usize, usize, usize),
    sc: Score,
    sees: &dyn Fn(usize, usize, usize) -> bool,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![f64::NAN; sq * hq * d];
    let mut lse = vec![f64::NAN; hq * sq];
    for h in 0..hq {
        let g = h / (hq / hkv);
        let key = |j: usize| {
            let o = (j * hkv + g) * d;
            (&k[o..o + d], &v[o..o + d])
        };
        for i in 0..sq {
            let js: Vec<usize> = (0..sk).filter(|&j| sees(h, i, j)).collect();
            let qo = (i * hq + h) * d;
            let (o, l) = attend_row(&q[qo..qo + d], &js, &key, sc);
            out[qo..qo + d].copy_from_slice(&o);
            lse[h * sq + i] = l;
        }
    }
    (out, lse)
}

/// The specification's merge of two partials (f64).
fn merge_oracle(oa: &[f64], la: f64, ob: &[f64], lb: f64) -> (Vec<f64>, f64) {
    if la == f64::NEG_INFINITY && lb == f64::NEG_INFINITY {
        return (vec![0.0; oa.len()], f64::NEG_INFINITY);
    }
    let m = la.max(lb);
    let lse = m + ((la - m).exp() + (lb - m).exp()).ln();
    let o = oa
        .iter()
        .zip(ob)
        .map(|(a, b)| (la - lse).exp() * a + (lb - lse).exp() * b)
        .collect();
    (o, lse)
}

// =======================================================================================
// Buffers and checks
// =======================================================================================

fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(0x5eed_a0d1 ^ seed)
}

/// `n` values uniform in [-1, 1), rounded to `T` (returned as the exact f64 of the `T`).
fn values<T: Element>(r: &mut SmallRng, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| T::from_f32(r.random_range(-1.0f32..1.0)).to_f32() as f64)
        .collect()
}

fn elems<T: Element>(x: &[f64]) -> Vec<T> {
    x.iter().map(|&v| T::from_f32(v as f32)).collect()
}

fn to_f64<T: Element>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| v.to_f32() as f64).collect()
}

/// Relative L2 tolerance of an output rounded to `T` (f32 accumulation inside).
fn tol<T: Element>() -> f64 {
    match T::DTYPE {
        DType::F32 => 3e-5,
        DType::F16 => 1.5e-3,
        _ => 1e-2,
    }
}

const OUT_GAP: f32 = 1234.5;

/// A `[b, s, h, d]` tensor in a buffer with optional gaps between heads, rows and batches
/// (gaps hold `gap`).
struct Padded<T> {
    data: Vec<T>,
    st: Strides,
}

impl<T: Element> Padded<T> {
    fn new(x: &[f64], (b, s, h, d): (usize, usize, usize, usize), pad: bool, gap: f32) -> Self {
        let p = usize::from(pad);
        let head = d + 3 * p;
        let seq = h * head + 2 * p;
        let batch = s * seq + 5 * p;
        let mut data = vec![T::from_f32(gap); b * batch];
        for bb in 0..b {
            for t in 0..s {
                for hh in 0..h {
                    let src = ((bb * s + t) * h + hh) * d;
                    let dst = bb * batch + t * seq + hh * head;
                    for c in 0..d {
                        data[dst + c] = T::from_f32(x[src + c] as f32);
                    }
                }
            }
        }
        let st = Strides {
            batch: batch as i64,
            seq: seq as i64,
            head: head as i64,
        };
        Padded { data, st }
    }

    fn view(&self) -> Strided<&[T]> {
        Strided::new(&self.data[..], self.st)
    }

    fn view_mut(&mut self) -> Strided<&mut [T]> {
        Strided::new(&mut self.data[..], self.st)
    }

    /// The tensor back as contiguous f64; panics if a gap was written.
    fn read(&self, (b, s, h, d): (usize, usize, usize, usize), what: &str) -> Vec<f64> {
        let (bs, ss, hs) = (
            self.st.batch as usize,
            self.st.seq as usize,
            self.st.head as usize,
        );
        let mut inside = vec![false; self.data.len()];
        let mut out = vec![0.0; b * s * h * d];
        for bb in 0..b {
            for t in 0..s {
                for hh in 0..h {
                    for c in 0..d {
                        let at = bb * bs + t * ss + hh * hs + c;
                        inside[at] = true;
                        out[((bb * s + t) * h + hh) * d + c] = self.data[at].to_f32() as f64;
                    }
                }
            }
        }
        for (at, x) in self.data.iter().enumerate() {
            assert!(
                inside[at] || x.to_f32() == T::from_f32(OUT_GAP).to_f32(),
                "{what}: wrote outside the tensor at {at}"
            );
        }
        out
    }
}

/// Checks `got` against the oracle (rows of `d`): no NaN/inf anywhere, empty rows (oracle
/// exactly 0) exactly 0, relative L2 under `tol` overall and (with a floor) per row; LSE with
/// exactly the oracle's `-inf` entries and within `1e-4 * (1 + |lse|)` elsewhere.
fn check(what: &str, d: usize, tol: f64, got: &[f64], want: &[f64], glse: &[f32], wlse: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: output length");
    assert_eq!(glse.len(), wlse.len(), "{what}: lse length");
    assert!(
        got.iter().all(|x| x.is_finite()),
        "{what}: non-finite output"
    );
    let (mut num, mut den) = (0.0, 0.0);
    for (r, (g, w)) in got.chunks(d).zip(want.chunks(d)).enumerate() {
        if w.iter().all(|&x| x == 0.0) {
            assert!(
                g.iter().all(|&x| x == 0.0),
                "{what}: row {r} must be 0: {g:?}"
            );
        }
        let e: f64 = g.iter().zip(w).map(|(a, b)| (a - b) * (a - b)).sum();
        let n: f64 = w.iter().map(|b| b * b).sum();
        assert!(
            e.sqrt() <= 4.0 * tol * (n.sqrt() + 0.05),
            "{what}: row {r} err {} vs norm {}",
            e.sqrt(),
            n.sqrt()
        );
        num += e;
        den += n;
    }
    if den > 0.0 {
        let err = (num / den).sqrt();
        assert!(err <= tol, "{what}: relative L2 {err:e} > {tol:e}");
    }
    for (n, (&g, &w)) in glse.iter().zip(wlse).enumerate() {
        assert!(!g.is_nan(), "{what}: lse[{n}] is NaN");
        if w == f64::NEG_INFINITY {
            assert_eq!(g, f32::NEG_INFINITY, "{what}: lse[{n}] of an empty row");
        } else {
            assert!(
                g.is_finite() && (g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what}: lse[{n}] = {g} vs {w}"
            );
        }
    }
}

/// Random q/k/v of a fixed-length batch, `[b, s, h, d]`.
struct Qkv {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
}

fn qkv<T: Element>(r: &mut SmallRng, nq: usize, nk: usize) -> Qkv {
    Qkv {
        q: values::<T>(r, nq),
        k: values::<T>(r, nk),
        v: values::<T>(r, nk),
    }
}

/// Oracle of a fixed-length batch under `sees(h, i, j)`: out `[b, sq, hq, d]`, LSE
/// `[b, hq, sq]`.
fn oracle_fixed(
    x: &Qkv,
    (b, sq, sk, hq, hkv, d): (usize, usize, usize, usize, usize, usize),
    sc: Score,
    sees: &dyn Fn(usize, usize, usize, usize) -> bool,
) -> (Vec<f64>, Vec<f64>) {
    let (qn, kn) = (sq * hq * d, sk * hkv * d);
    let (mut out, mut lse) = (Vec::new(), Vec::new());
    for bb in 0..b {
        let (o, l) = attend_seq(
            (
                &x.q[bb * qn..(bb + 1) * qn],
                &x.k[bb * kn..(bb + 1) * kn],
                &x.v[bb * kn..(bb + 1) * kn],
            ),
            (sq, sk, hq, hkv, d),
            sc,
            &|h, i, j| sees(bb, h, i, j),
        );
        out.extend(o);
        lse.extend(l);
    }
    (out, lse)
}

/// Oracle of a packed batch: sequence `b` has `lq[b]` query rows (packed `[total_q, hq, d]`
/// in `q`) and the keys / values `kv(b)` (`[lk[b], hkv, d]`). Out `[total_q, hq, d]`, LSE
/// `[hq, total_q]`.
fn oracle_varlen<'a>(
    q: &[f64],
    kv: &dyn Fn(usize) -> (&'a [f64], &'a [f64]),
    (lq, lk): (&[usize], &[usize]),
    (hq, hkv, d): (usize, usize, usize),
    sc: Score,
    sees: &dyn Fn(usize, usize, usize, usize) -> bool,
) -> (Vec<f64>, Vec<f64>) {
    let tq: usize = lq.iter().sum();
    let mut out = Vec::new();
    let mut lse = vec![f64::NAN; hq * tq];
    let mut q0 = 0;
    for (b, (&sq, &sk)) in lq.iter().zip(lk).enumerate() {
        let (k, v) = kv(b);
        let (o, l) = attend_seq(
            (&q[q0 * hq * d..(q0 + sq) * hq * d], k, v),
            (sq, sk, hq, hkv, d),
            sc,
            &|h, i, j| sees(b, h, i, j),
        );
        out.extend(o);
        for h in 0..hq {
            lse[h * tq + q0..h * tq + q0 + sq].copy_from_slice(&l[h * sq..(h + 1) * sq]);
        }
        q0 += sq;
    }
    (out, lse)
}

/// A packed LSE `[hq, batch * q_len]` of equal lengths as `[batch, hq, q_len]`.
fn lse_per_sequence(lse: &[f64], hq: usize, q_len: usize) -> Vec<f64> {
    let batch = lse.len() / (hq * q_len).max(1);
    let mut out = Vec::with_capacity(lse.len());
    for b in 0..batch {
        for h in 0..hq {
            out.extend_from_slice(&lse[h * batch * q_len + b * q_len..][..q_len]);
        }
    }
    out
}

// =======================================================================================
// Dense
// =======================================================================================

/// A validated dense problem.
fn problem(
    batch: usize,
    seqlens: SeqLens,
    (hq, hkv, d): (usize, usize, usize),
    opts: &AttentionOptions,
) -> FlashAttention {
    FlashAttention::new(
        &AttentionShape {
            batch,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            seqlens,
        },
        opts,
    )
    .unwrap()
}

/// A validated dense problem of fixed lengths, `dims = (b, sq, sk, hq, hkv, d)`.
fn dense_problem(
    (b, sq, sk, hq, hkv, d): (usize, usize, usize, usize, usize, usize),
    opts: &AttentionOptions,
) -> FlashAttention {
    problem(
        b,
        SeqLens::Fixed {
            seqlen_q: sq,
            seqlen_k: sk,
        },
        (hq, hkv, d),
        opts,
    )
}

/// The four tensors of a forward call and its LSE.
type Views<'a, T> = (
    Strided<&'a [T]>,
    Strided<&'a [T]>,
    Strided<&'a [T]>,
    Strided<&'a mut [T]>,
    &'a mut [f32],
);

/// Runs `forward` on `x` in (optionally) padded buffers, `dims = (b, sq, sk, hq, hkv, d)`:
/// `(out [b, sq, hq, d], lse [b, hq, sq])`; the output's gaps must stay untouched.
fn run_padded<T: Element>(
    x: &Qkv,
    (b, sq, sk, hq, hkv, d): (usize, usize, usize, usize, usize, usize),
    pad: bool,
    forward: impl FnOnce(Views<T>),
) -> (Vec<f64>, Vec<f32>) {
    let q = Padded::<T>::new(&x.q, (b, sq, hq, d), pad, f32::NAN);
    let k = Padded::<T>::new(&x.k, (b, sk, hkv, d), pad, f32::NAN);
    let v = Padded::<T>::new(&x.v, (b, sk, hkv, d), pad, f32::NAN);
    let poison = vec![f64::NAN; b * sq * hq * d];
    let mut out = Padded::<T>::new(&poison, (b, sq, hq, d), pad, OUT_GAP);
    let mut lse = vec![f32::NAN; b * hq * sq];
    forward((q.view(), k.view(), v.view(), out.view_mut(), &mut lse));
    (out.read((b, sq, hq, d), "forward"), lse)
}

/// Runs the dense CPU forward on padded buffers: `(out [b, sq, hq, d], lse [b, hq, sq])`.
fn dense_run<T: Element>(
    x: &Qkv,
    dims: (usize, usize, usize, usize, usize, usize),
    opts: &AttentionOptions,
    pad: bool,
) -> (Vec<f64>, Vec<f32>) {
    let attn = dense_problem(dims, opts);
    assert_eq!(attn.lse_len(), dims.0 * dims.3 * dims.1);
    run_padded::<T>(x, dims, pad, |(q, k, v, o, l)| {
        attn.forward_cpu(q, k, v, o, Some(l)).unwrap()
    })
}

fn dense_case<T: Element>(seed: u64, dims: (usize, usize, usize, usize, usize, usize), m: Vis) {
    let (b, sq, sk, hq, hkv, d) = dims;
    let mut r = rng(seed);
    let x = qkv::<T>(&mut r, b * sq * hq * d, b * sk * hkv * d);
    let sc = if seed.is_multiple_of(3) {
        CAPPED
    } else {
        PLAIN
    };
    let (want, wlse) = oracle_fixed(&x, dims, sc, &|_, _, i, j| m.sees(i, j, sq, sk));
    let (got, glse) = dense_run::<T>(&x, dims, &m.options(sc), seed % 2 == 1);
    let what = format!("dense {:?} {dims:?} {m:?} {sc:?}", T::DTYPE);
    check(&what, d, tol::<T>(), &got, &want, &glse, &wlse);
}

/// Every mask over lengths 1, 2, odd, `sq < sk` and `sq > sk` (rows before key 0 are empty
/// under causal), with MHA, GQA and MQA heads, f32 (strided with gaps on odd seeds, softcap
/// on every third).
#[test]
fn dense_masks_and_lengths_f32() {
    let lens = [
        (1, 1),
        (1, 2),
        (2, 1),
        (2, 2),
        (7, 7),
        (5, 13),
        (13, 5),
        (33, 47),
    ];
    let heads = [(1, 1, 8), (4, 2, 16), (3, 1, 8)];
    let mut seed = 0;
    for &(sq, sk) in &lens {
        for (n, &(hq, hkv, d)) in heads.iter().enumerate() {
            for m in MASKS {
                seed += 1;
                dense_case::<f32>(seed, (1 + n % 2, sq, sk, hq, hkv, d), m);
            }
        }
    }
}

/// Longer rows crossing the CPU tiles (and f16 / bf16) under a subset of masks.
#[test]
fn dense_tiles_and_half_types() {
    let lens = [(64, 64), (17, 100), (100, 31), (1, 90)];
    for (n, &(sq, sk)) in lens.iter().enumerate() {
        for (mi, m) in MASKS.iter().enumerate().filter(|(i, _)| i % 3 != 2) {
            let seed = 1000 + (n * 20 + mi) as u64;
            dense_case::<f32>(seed, (1, sq, sk, 4, 2, 32), *m);
            if mi % 2 == 0 {
                dense_case::<f16>(seed, (2, sq, sk, 2, 1, 16), *m);
            } else {
                dense_case::<bf16>(seed, (2, sq, sk, 2, 1, 16), *m);
            }
        }
    }
}

/// The window constructors say what the specification says: a causal window of W tokens is
/// `(W - 1, 0)`, causal + `(W - 1, -1)` is the same mask, and `Window::CAUSAL` is `(-1, 0)`.
#[test]
fn window_spellings_agree() {
    let (sq, sk, d) = (9, 12, 8);
    let dims = (1, sq, sk, 2, 1, d);
    let mut r = rng(77);
    let x = qkv::<f32>(&mut r, sq * 2 * d, sk * d);
    for w in 1..=3usize {
        let want = vis(w as i64 - 1, 0, 0, false);
        let (o, l) = oracle_fixed(&x, dims, PLAIN, &|_, _, i, j| want.sees(i, j, sq, sk));
        let spellings = [
            AttentionOptions::default().with_window(Window::causal_tokens(w).unwrap()),
            AttentionOptions::causal().with_window(Window::new(Some(w - 1), None)),
            AttentionOptions::default()
                .with_window(Window::new(Some(w - 1), None))
                .with_causal(true),
        ];
        for (n, opts) in spellings.iter().enumerate() {
            let (g, gl) = dense_run::<f32>(&x, dims, opts, false);
            check(&format!("W={w} spelling {n}"), d, 3e-5, &g, &o, &gl, &l);
        }
    }
    let causal = vis(-1, 0, 0, false);
    let (o, l) = oracle_fixed(&x, dims, PLAIN, &|_, _, i, j| causal.sees(i, j, sq, sk));
    for opts in [
        AttentionOptions::causal(),
        AttentionOptions::default().with_window(Window::CAUSAL),
    ] {
        let (g, gl) = dense_run::<f32>(&x, dims, &opts, false);
        check("causal spellings", d, 3e-5, &g, &o, &gl, &l);
    }
}

fn cu(lens: &[usize]) -> Vec<i32> {
    std::iter::once(0)
        .chain(lens.iter().scan(0, |acc, &l| {
            *acc += l;
            Some(*acc as i32)
        }))
        .collect()
}

/// Varlen batches with empty sequences on either side (LSE `[hq, total_q]`).
#[test]
fn dense_varlen_with_empty_sequences() {
    let cases: [(&[usize], &[usize]); 3] = [
        (&[3, 0, 5, 1, 9], &[4, 6, 0, 9, 2]),
        (&[0, 0, 2], &[0, 3, 0]),
        (&[1, 20], &[20, 1]),
    ];
    let (hq, hkv, d) = (4, 2, 8);
    for (n, (lq, lk)) in cases.iter().enumerate() {
        let (cq, ck) = (cu(lq), cu(lk));
        let (tq, tk) = (*cq.last().unwrap() as usize, *ck.last().unwrap() as usize);
        let mut r = rng(2000 + n as u64);
        let x = qkv::<f32>(&mut r, tq * hq * d, tk * hkv * d);
        for (mi, m) in MASKS.iter().enumerate() {
            let sc = if mi % 4 == 1 { CAPPED } else { PLAIN };
            let kv = |b: usize| {
                let k = ck[b] as usize * hkv * d..ck[b + 1] as usize * hkv * d;
                (&x.k[k.clone()], &x.v[k])
            };
            let (want, wlse) =
                oracle_varlen(&x.q, &kv, (lq, lk), (hq, hkv, d), sc, &|b, _, i, j| {
                    m.sees(i, j, lq[b], lk[b])
                });
            let attn = problem(
                lq.len(),
                SeqLens::Varlen {
                    cu_seqlens_q: &cq,
                    cu_seqlens_k: &ck,
                },
                (hq, hkv, d),
                &m.options(sc),
            );
            let pad = mi % 2 == 1;
            let q = Padded::<f32>::new(&x.q, (1, tq, hq, d), pad, f32::NAN);
            let k = Padded::<f32>::new(&x.k, (1, tk, hkv, d), pad, f32::NAN);
            let v = Padded::<f32>::new(&x.v, (1, tk, hkv, d), pad, f32::NAN);
            let mut out =
                Padded::<f32>::new(&vec![f64::NAN; tq * hq * d], (1, tq, hq, d), pad, OUT_GAP);
            let mut lse = vec![f32::NAN; hq * tq];
            attn.forward_cpu(q.view(), k.view(), v.view(), out.view_mut(), Some(&mut lse))
                .unwrap();
            let got = out.read((1, tq, hq, d), "varlen");
            let what = format!("varlen {lq:?}/{lk:?} {m:?} {sc:?}");
            check(&what, d, 3e-5, &got, &want, &lse, &wlse);
        }
    }
}

// =======================================================================================
// Merge
// =======================================================================================

/// Random splits of the keys into disjoint subsets (some empty), each subset's partial from
/// the crate's dense forward; merged pairwise, chained in random order and grouping, the
/// result equals the oracle over all keys. The formula itself against the f64 merge on
/// partials that include empty (`-inf`) ones, both-empty giving 0 and `-inf`.
#[test]
fn merge_partials() {
    let (b, sq, sk, hq, hkv, d) = (2, 5, 23, 4, 2, 8);
    let dims = (b, sq, sk, hq, hkv, d);
    let ms = MergeShape {
        batch: b,
        seqlen: sq,
        heads: hq,
        head_dim: d,
    };
    for seed in 0..6u64 {
        let mut r = rng(3000 + seed);
        let x = qkv::<f32>(&mut r, b * sq * hq * d, b * sk * hkv * d);
        let (want, wlse) = oracle_fixed(&x, dims, PLAIN, &|_, _, _, _| true);
        let parts = 1 + seed as usize % 4;
        let owner: Vec<usize> = (0..sk).map(|_| r.random_range(0..parts + 1)).collect();
        let mut partials: Vec<(Vec<f32>, Vec<f32>)> = (0..=parts)
            .map(|p| {
                // Keep only this part's keys: a per-key mask through the oracle of the spec
                // (keys of other parts are moved out by a sub-batch of the kept keys).
                let keep: Vec<usize> = (0..sk).filter(|&j| owner[j] == p).collect();
                let pick = |t: &[f64]| -> Vec<f64> {
                    let row = hkv * d;
                    (0..b)
                        .flat_map(|bb| keep.iter().map(move |&j| (bb, j)))
                        .flat_map(|(bb, j)| {
                            t[(bb * sk + j) * row..(bb * sk + j + 1) * row].to_vec()
                        })
                        .collect()
                };
                let sub = Qkv {
                    q: x.q.clone(),
                    k: pick(&x.k),
                    v: pick(&x.v),
                };
                let (o, l) = dense_run::<f32>(
                    &sub,
                    (b, sq, keep.len(), hq, hkv, d),
                    &AttentionOptions::default(),
                    false,
                );
                (o.iter().map(|&v| v as f32).collect(), l)
            })
            .collect();
        partials.shuffle(&mut r);
        // Chain with merge_into_cpu.
        let mut acc = (
            vec![0.0f32; ms.o_len()],
            vec![f32::NEG_INFINITY; ms.lse_len()],
        );
        for p in &partials {
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
        let what = format!("merge chain seed {seed} parts {parts}");
        check(&what, d, 3e-5, &to_f64(&acc.0), &want, &acc.1, &wlse);
        // Tree with merge_cpu: reduce pairs until one is left.
        while partials.len() > 1 {
            let a = partials.pop().unwrap();
            let c = partials.pop().unwrap();
            let mut o = vec![f32::NAN; ms.o_len()];
            let mut l = vec![f32::NAN; ms.lse_len()];
            ms.merge_cpu(
                Partial {
                    o: &c.0[..],
                    lse: &c.1[..],
                },
                Partial {
                    o: &a.0[..],
                    lse: &a.1[..],
                },
                Partial {
                    o: &mut o[..],
                    lse: &mut l[..],
                },
            )
            .unwrap();
            partials.insert(r.random_range(0..=partials.len()), (o, l));
        }
        let what = format!("merge tree seed {seed} parts {parts}");
        check(
            &what,
            d,
            3e-5,
            &to_f64(&partials[0].0),
            &want,
            &partials[0].1,
            &wlse,
        );
    }
    // The formula on hand-made partials: finite, empty and far-apart LSEs.
    let ms = MergeShape {
        batch: 1,
        seqlen: 6,
        heads: 1,
        head_dim: 4,
    };
    let ninf = f32::NEG_INFINITY;
    let la = [0.5f32, ninf, 3.0, ninf, -80.0, 40.0];
    let lb = [-1.25f32, 2.0, ninf, ninf, 10.0, 40.0];
    let mut r = rng(3100);
    let mut oa: Vec<f32> = (0..24).map(|_| r.random_range(-1.0..1.0)).collect();
    let mut ob: Vec<f32> = (0..24).map(|_| r.random_range(-1.0..1.0)).collect();
    for row in 0..6 {
        // An empty partial has output 0.
        if la[row] == ninf {
            oa[row * 4..row * 4 + 4].fill(0.0);
        }
        if lb[row] == ninf {
            ob[row * 4..row * 4 + 4].fill(0.0);
        }
    }
    let mut o = vec![f32::NAN; 24];
    let mut l = vec![f32::NAN; 6];
    ms.merge_cpu(
        Partial {
            o: &oa[..],
            lse: &la[..],
        },
        Partial {
            o: &ob[..],
            lse: &lb[..],
        },
        Partial {
            o: &mut o[..],
            lse: &mut l[..],
        },
    )
    .unwrap();
    let (mut want, mut wlse) = (Vec::new(), Vec::new());
    for row in 0..6 {
        let (wo, wl) = merge_oracle(
            &to_f64(&oa[row * 4..row * 4 + 4]),
            la[row] as f64,
            &to_f64(&ob[row * 4..row * 4 + 4]),
            lb[row] as f64,
        );
        want.extend(wo);
        wlse.push(wl);
    }
    check("merge formula", 4, 1e-6, &to_f64(&o), &want, &l, &wlse);
}

// =======================================================================================
// Neighborhood (NATTEN)
// =======================================================================================

/// Whether position `y` is in the neighborhood of position `x` along one dim, from the
/// specification's steps 1-5.
fn na_sees(dim: &NeighborhoodDim, x: usize, y: usize) -> bool {
    let (l, k, d, s) = (
        dim.length as i64,
        dim.kernel as i64,
        dim.dilation as i64,
        dim.stride as i64,
    );
    let (x, y) = (x as i64, y as i64);
    let g = x % d;
    if y % d != g {
        return false;
    }
    let (i, j) = (x / d, y / d);
    let lg = (l - g + d - 1) / d;
    let (start, end) = if dim.causal {
        ((i - k + 1).max(0), i + 1)
    } else {
        let left = k / 2;
        let right = k / 2 + (k % 2) - 1;
        let c = ((i / s) * s + s / 2).min(lg - 1);
        let shift = if c + right >= lg {
            lg - right - c - 1
        } else {
            0
        };
        let start = (c - left).max(0) + shift;
        (start, start + k)
    };
    start <= j && j < end
}

/// Row-major coordinates of a flat token.
fn coords(dims: &[NeighborhoodDim], mut t: usize) -> Vec<usize> {
    let mut c = vec![0; dims.len()];
    for a in (0..dims.len()).rev() {
        c[a] = t % dims[a].length;
        t /= dims[a].length;
    }
    c
}

fn neighborhood_case<T: Element>(
    seed: u64,
    dims: &[NeighborhoodDim],
    (b, hq, hkv, d): (usize, usize, usize, usize),
) {
    let n: usize = dims.iter().map(|x| x.length).product();
    let mut r = rng(seed);
    let x = qkv::<T>(&mut r, b * n * hq * d, b * n * hkv * d);
    let sc = if seed.is_multiple_of(2) {
        CAPPED
    } else {
        PLAIN
    };
    let cs: Vec<Vec<usize>> = (0..n).map(|t| coords(dims, t)).collect();
    let sees = |_: usize, _: usize, i: usize, j: usize| {
        dims.iter()
            .enumerate()
            .all(|(a, dim)| na_sees(dim, cs[i][a], cs[j][a]))
    };
    // Non-causal dims: exactly prod(k) keys (causal dims: fewer near the start).
    for i in 0..n {
        let count = (0..n).filter(|&j| sees(0, 0, i, j)).count();
        let most: usize = dims.iter().map(|x| x.kernel).product();
        if dims.iter().all(|x| !x.causal) {
            assert_eq!(count, most, "{dims:?}: token {i}");
        } else {
            assert!((1..=most).contains(&count), "{dims:?}: token {i}");
        }
    }
    let (want, wlse) = oracle_fixed(&x, (b, n, n, hq, hkv, d), sc, &sees);
    let attn = NeighborhoodAttention::new(
        &NeighborhoodShape {
            batch: b,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            dims,
        },
        &Vis::options(&vis(-1, -1, 0, false), sc),
    )
    .unwrap();
    let dims = (b, n, n, hq, hkv, d);
    let (got, lse) = run_padded::<T>(&x, dims, seed.is_multiple_of(3), |(q, k, v, o, l)| {
        attn.forward_cpu(q, k, v, o, Some(l)).unwrap()
    });
    check(
        &format!("NA {:?} {dims:?} {sc:?}", T::DTYPE),
        d,
        tol::<T>(),
        &got,
        &want,
        &lse,
        &wlse,
    );
}

fn nd(l: usize, k: usize, dil: usize, s: usize, causal: bool) -> NeighborhoodDim {
    NeighborhoodDim::new(l, k)
        .with_dilation(dil)
        .with_stride(s)
        .with_causal(causal)
}

/// 1-D: odd and even kernels, dilation with lengths not divisible by it, strides, causal;
/// k == L (full attention); length 1.
#[test]
fn neighborhood_1d() {
    let cases = [
        nd(1, 1, 1, 1, false),
        nd(2, 2, 1, 1, false),
        nd(9, 3, 1, 1, false),
        nd(9, 4, 1, 1, false),
        nd(10, 4, 2, 1, false),
        nd(11, 3, 3, 1, false),
        nd(13, 2, 4, 1, false),
        nd(14, 5, 2, 3, false),
        nd(12, 4, 1, 2, false),
        nd(17, 4, 1, 4, false),
        nd(11, 3, 2, 1, true),
        nd(9, 4, 1, 1, true),
        nd(7, 7, 1, 1, false),
        nd(6, 6, 1, 1, true),
    ];
    for (n, dim) in cases.iter().enumerate() {
        neighborhood_case::<f32>(4000 + n as u64, &[*dim], (1 + n % 2, 2, 1, 8));
    }
}

/// 2-D and 3-D grids mixing the per-dim settings, GQA.
#[test]
fn neighborhood_2d_3d() {
    let cases: [&[NeighborhoodDim]; 7] = [
        &[nd(5, 3, 1, 1, false), nd(6, 2, 1, 1, false)],
        &[nd(7, 3, 2, 1, false), nd(8, 4, 1, 2, false)],
        &[nd(6, 3, 1, 1, true), nd(7, 4, 1, 1, false)],
        &[nd(5, 5, 1, 1, false), nd(4, 4, 1, 1, false)],
        &[
            nd(4, 2, 1, 1, false),
            nd(5, 3, 1, 1, true),
            nd(7, 2, 3, 1, false),
        ],
        &[
            nd(3, 3, 1, 1, false),
            nd(5, 2, 2, 2, false),
            nd(4, 3, 1, 1, true),
        ],
        &[
            nd(3, 3, 1, 1, false),
            nd(4, 4, 1, 1, false),
            nd(2, 2, 1, 1, false),
        ],
    ];
    for (n, dims) in cases.iter().enumerate() {
        neighborhood_case::<f32>(4100 + n as u64, dims, (1, 4, 2, 8));
    }
}

// =======================================================================================
// Paged cache: append, decode, Quest, streaming heads, prefill
// =======================================================================================

/// Sequences' tokens (`[s, hkv, d]` each) placed by the crate's append into pages in random
/// order; `block_table` rows padded with `-1`.
struct Paged<C = f32> {
    lens: Vec<usize>,
    ps: usize,
    hkv: usize,
    d: usize,
    k_tok: Vec<Vec<f64>>,
    v_tok: Vec<Vec<f64>>,
    table: Vec<i32>,
    max_pages: usize,
    layout: PagedLayout,
    k_cache: Vec<C>,
    v_cache: Vec<C>,
    kmin: Vec<C>,
    kmax: Vec<C>,
}

impl<C: Element> Paged<C> {
    fn cache(&self, lens: &[usize]) -> PagedCache {
        let sl: Vec<i32> = lens.iter().map(|&s| s as i32).collect();
        PagedCache::new(
            self.layout,
            PageTable {
                block_table: &self.table,
                max_pages_per_seq: self.max_pages,
                seqlens_k: &sl,
            },
        )
        .unwrap()
    }

    /// The page and slot of token `t` of sequence `b`, by the specification.
    fn slot(&self, b: usize, t: usize) -> (usize, usize) {
        (
            self.table[b * self.max_pages + t / self.ps] as usize,
            t % self.ps,
        )
    }
}

/// Builds a cache with two appends per sequence (a random prefix, then the rest) and checks
/// the placement and the Quest bounds against the specification.
fn paged<C: Element>(
    r: &mut SmallRng,
    lens: &[usize],
    ps: usize,
    hkv: usize,
    d: usize,
) -> Paged<C> {
    let pages: Vec<usize> = lens.iter().map(|s| s.div_ceil(ps)).collect();
    let max_pages = pages.iter().copied().max().unwrap_or(0) + 1;
    let num_pages = pages.iter().sum::<usize>() + 3;
    let mut ids: Vec<i32> = (0..num_pages as i32).collect();
    ids.shuffle(r);
    let mut table = vec![-1i32; lens.len() * max_pages];
    let mut next = ids.into_iter();
    for (b, &np) in pages.iter().enumerate() {
        for lp in 0..np {
            table[b * max_pages + lp] = next.next().unwrap();
        }
    }
    let layout = PagedLayout {
        num_pages,
        page_size: ps,
        heads_kv: hkv,
        head_dim: d,
    };
    let row = hkv * d;
    let mut p = Paged {
        lens: lens.to_vec(),
        ps,
        hkv,
        d,
        k_tok: lens.iter().map(|&s| values::<C>(r, s * row)).collect(),
        v_tok: lens.iter().map(|&s| values::<C>(r, s * row)).collect(),
        table,
        max_pages,
        layout,
        k_cache: vec![C::from_f32(f32::NAN); num_pages * ps * row],
        v_cache: vec![C::from_f32(f32::NAN); num_pages * ps * row],
        kmin: vec![C::from_f32(f32::NAN); num_pages * row],
        kmax: vec![C::from_f32(f32::NAN); num_pages * row],
    };
    let cut: Vec<usize> = lens.iter().map(|&s| r.random_range(0..=s)).collect();
    for (from, to) in [(vec![0; lens.len()], cut.clone()), (cut, lens.to_vec())] {
        let n: Vec<usize> = from.iter().zip(&to).map(|(a, b)| b - a).collect();
        let cun = cu(&n);
        let take = |tok: &[Vec<f64>]| -> Vec<f32> {
            (0..lens.len())
                .flat_map(|b| tok[b][from[b] * row..to[b] * row].iter().map(|&x| x as f32))
                .collect()
        };
        let (kn, vn) = (take(&p.k_tok), take(&p.v_tok));
        let st = Strides {
            batch: 0,
            seq: row as i64,
            head: d as i64,
        };
        p.cache(&to)
            .append_cpu(
                &cun,
                Strided::new(&kn[..], st),
                Strided::new(&vn[..], st),
                KvPages {
                    k: &mut p.k_cache[..],
                    v: &mut p.v_cache[..],
                },
                Some(PageMeta {
                    kmin: &mut p.kmin[..],
                    kmax: &mut p.kmax[..],
                }),
            )
            .unwrap();
    }
    for (b, &s) in lens.iter().enumerate() {
        for t in 0..s {
            let (page, slot) = p.slot(b, t);
            let at = (page * ps + slot) * row;
            assert_eq!(
                to_f64(&p.k_cache[at..at + row]),
                p.k_tok[b][t * row..(t + 1) * row],
                "append ps {ps}: k of token {t} of sequence {b}"
            );
            assert_eq!(
                to_f64(&p.v_cache[at..at + row]),
                p.v_tok[b][t * row..(t + 1) * row],
                "append ps {ps}: v of token {t} of sequence {b}"
            );
        }
        for lp in 0..s.div_ceil(ps) {
            let page = p.table[b * max_pages + lp] as usize;
            let toks = lp * ps..((lp + 1) * ps).min(s);
            for c in 0..row {
                let xs = toks.clone().map(|t| p.k_tok[b][t * row + c]);
                let lo = xs.clone().fold(f64::INFINITY, f64::min);
                let hi = xs.fold(f64::NEG_INFINITY, f64::max);
                let at = page * row + c;
                assert_eq!(
                    (p.kmin[at].to_f32() as f64, p.kmax[at].to_f32() as f64),
                    (lo, hi),
                    "append ps {ps}: bounds of page {lp} of sequence {b}, channel {c}"
                );
            }
        }
    }
    p
}

/// Oracle of `q_len` new rows per sequence (the last `q_len` positions): sequence `b`'s
/// query head `h` sees key `j` when `sees(b, h, i, j)`. Out `[batch, q_len, hq, d]`, LSE
/// `[batch, hq, q_len]`.
fn paged_oracle<C: Element>(
    p: &Paged<C>,
    q: &[f64],
    hq: usize,
    q_len: usize,
    sc: Score,
    sees: &dyn Fn(usize, usize, usize, usize) -> bool,
) -> (Vec<f64>, Vec<f64>) {
    let lq = vec![q_len; p.lens.len()];
    let kv = |b: usize| (&p.k_tok[b][..], &p.v_tok[b][..]);
    let (out, lse) = oracle_varlen(q, &kv, (&lq, &p.lens), (hq, p.hkv, p.d), sc, sees);
    (out, lse_per_sequence(&lse, hq, q_len))
}

fn decode_run<T: Element, C: Element>(
    p: &Paged<C>,
    dec: &PagedDecode,
    q: &[f64],
    hq: usize,
    q_len: usize,
) -> (Vec<f64>, Vec<f32>) {
    let batch = p.lens.len();
    let qs = Strides::contiguous(q_len, hq, p.d);
    let qf: Vec<T> = elems(q);
    let mut out = vec![T::from_f32(f32::NAN); batch * q_len * hq * p.d];
    let mut lse = vec![f32::NAN; batch * hq * q_len];
    dec.forward_cpu(
        Strided::new(&qf[..], qs),
        KvPages {
            k: &p.k_cache[..],
            v: &p.v_cache[..],
        },
        Some(PageMeta {
            kmin: &p.kmin[..],
            kmax: &p.kmax[..],
        }),
        Strided::new(&mut out[..], qs),
        Some(&mut lse),
    )
    .unwrap();
    (to_f64(&out), lse)
}

/// Paged decode of `q` (`[batch, q_len, hq, d]` in `T`) over `p` == the oracle of the last
/// `q_len` positions, causal among the new tokens (the causal flag composed with `m`).
fn decode_check<T: Element, C: Element>(
    p: &Paged<C>,
    q: &[f64],
    (hq, q_len): (usize, usize),
    m: Vis,
    sc: Score,
    splits: Option<usize>,
    what: &str,
) {
    let causal = Vis { causal: true, ..m };
    let (want, wlse) = paged_oracle(p, q, hq, q_len, sc, &|b, _, i, j| {
        causal.sees(i, j, q_len, p.lens[b])
    });
    let dec = PagedDecode::new(&p.cache(&p.lens), hq, q_len, &m.options(sc))
        .unwrap()
        .with_splits(splits)
        .unwrap();
    let (got, glse) = decode_run::<T, C>(p, &dec, q, hq, q_len);
    let what = format!(
        "{what} {:?}/{:?} {m:?} {sc:?} {splits:?}",
        T::DTYPE,
        C::DTYPE
    );
    check(&what, p.d, tol::<T>(), &got, &want, &glse, &wlse);
}

/// Decode masks: the specification's decode is causal among the new tokens, so only windows
/// whose right bound is unbounded or 0 are driven (an explicit right bound > 0 is a crate
/// extension), with sinks.
const DECODE_MASKS: [Vis; 6] = [
    vis(-1, -1, 0, false),
    vis(-1, 0, 0, false),
    vis(0, 0, 0, true),
    vis(1, -1, 0, false),
    vis(4, 0, 2, false),
    vis(2, -1, 5, true),
];

/// Paged decode == dense attention of the last `q_len` positions over the gathered tokens,
/// causal among the new tokens, page sizes 1, 3, 16, random page order, sequences empty and
/// shorter than `q_len`, GQA/MQA, softcap, forced KV splits.
#[test]
fn paged_decode() {
    let lens = [1usize, 0, 2, 29, 70];
    let mut seed = 5000;
    for ps in [1usize, 3, 16] {
        for &(hq, hkv, d) in &[(4usize, 2usize, 8usize), (3, 1, 16)] {
            seed += 1;
            let mut r = rng(seed);
            let p = paged::<f32>(&mut r, &lens, ps, hkv, d);
            for q_len in [1usize, 3] {
                let q = values::<f32>(&mut r, lens.len() * q_len * hq * d);
                for (mi, m) in DECODE_MASKS.iter().enumerate() {
                    let sc = if mi % 3 == 1 { CAPPED } else { PLAIN };
                    for splits in [None, Some(2)] {
                        let what = format!("decode ps {ps} hq {hq}/{hkv} q_len {q_len}");
                        decode_check::<f32, f32>(&p, &q, (hq, q_len), *m, sc, splits, &what);
                    }
                }
            }
        }
    }
}

/// Quest per the specification: score `sum_c max(q_c kmax_c, q_c kmin_c)` per page (the
/// group's query heads and rows aggregated by max, the crate's stated choice), `B =
/// token_budget / page_size` pages with the newest page always among them. Returns the
/// selected logical pages per `(b, kv head)` and the pages whose rank is within `1e-5` of the
/// cut (where f32 scores may order differently).
fn quest_oracle<C: Element>(
    p: &Paged<C>,
    q: &[f64],
    hq: usize,
    q_len: usize,
    budget: usize,
) -> Vec<(Vec<usize>, Vec<usize>)> {
    let (hkv, d, ps) = (p.hkv, p.d, p.ps);
    let group = hq / hkv;
    let mut res = Vec::new();
    for (b, &sk) in p.lens.iter().enumerate() {
        for g in 0..hkv {
            let np = sk.div_ceil(ps);
            if np == 0 {
                res.push((Vec::new(), Vec::new()));
                continue;
            }
            let newest = (sk - 1) / ps;
            let score = |lp: usize| -> f64 {
                let (page, _) = p.slot(b, lp * ps);
                let mut best = f64::NEG_INFINITY;
                for i in 0..q_len {
                    for h in g * group..(g + 1) * group {
                        let qo = ((b * q_len + i) * hq + h) * d;
                        let mo = (page * hkv + g) * d;
                        let s: f64 = (0..d)
                            .map(|c| {
                                let qc = q[qo + c];
                                (qc * p.kmax[mo + c].to_f32() as f64)
                                    .max(qc * p.kmin[mo + c].to_f32() as f64)
                            })
                            .sum();
                        best = best.max(s);
                    }
                }
                best
            };
            let mut others: Vec<(f64, usize)> = (0..np)
                .filter(|&lp| lp != newest)
                .map(|lp| (score(lp), lp))
                .collect();
            others.sort_by(|a, b| b.0.total_cmp(&a.0));
            let take = (budget / ps).max(1).min(np) - 1;
            let mut sel: Vec<usize> = others[..take].iter().map(|x| x.1).collect();
            sel.push(newest);
            sel.sort();
            let near: Vec<usize> =
                match (take.checked_sub(1).map(|t| others[t].0), others.get(take)) {
                    (Some(lo), Some(hi)) if lo - hi.0 < 1e-5 => others
                        .iter()
                        .filter(|x| (x.0 - lo).abs() < 1e-5 || (x.0 - hi.0).abs() < 1e-5)
                        .map(|x| x.1)
                        .collect(),
                    _ => Vec::new(),
                };
            res.push((sel, near));
        }
    }
    res
}

/// One decode launch under `policy` (full, streaming and Quest heads; base mask `base`):
/// the Quest selections equal the specification's top-B with the newest page (where no
/// near-tie of f32 scores makes the order ambiguous) and every head's output the oracle's.
fn policy_check(
    p: &Paged,
    q: &[f64],
    (hq, q_len): (usize, usize),
    policy: &SparsePolicy,
    (base, sc): (Vis, Score),
    what: &str,
) {
    let (hkv, d, ps, lens) = (p.hkv, p.d, p.ps, &p.lens);
    let SparsePolicy {
        heads,
        streaming,
        quest,
    } = policy;
    let what = format!("{what} {heads:?} {streaming:?} {quest:?} {base:?} {sc:?}");
    let dec = PagedDecode::new(&p.cache(&p.lens), hq, q_len, &base.options(sc))
        .unwrap()
        .with_policy(policy.clone())
        .unwrap();
    let qsel = quest_oracle(p, q, hq, q_len, quest.token_budget);
    let mut pages: Vec<Vec<usize>> = qsel.iter().map(|x| x.0.clone()).collect();
    if heads.contains(&HeadPolicy::Quest) {
        let qf: Vec<f32> = elems(q);
        let sel = dec
            .select_cpu(
                Strided::new(&qf[..], Strides::contiguous(q_len, hq, d)),
                PageMeta {
                    kmin: &p.kmin[..],
                    kmax: &p.kmax[..],
                },
            )
            .unwrap();
        for b in 0..lens.len() {
            for g in (0..hkv).filter(|&g| heads[g] == HeadPolicy::Quest) {
                let got: Vec<usize> = sel
                    .pages
                    .get(b, g)
                    .unwrap()
                    .iter()
                    .map(|&x| x as usize)
                    .collect();
                let (want, near) = &qsel[b * hkv + g];
                if near.is_empty() {
                    assert_eq!(&got, want, "{what}: Quest pages of ({b}, {g})");
                } else {
                    assert_eq!(got.len(), want.len(), "{what}: Quest count of ({b}, {g})");
                }
                pages[b * hkv + g] = got;
            }
        }
    }
    let base_dec = Vis {
        causal: true,
        ..base
    };
    let stream = vis(
        streaming.window as i64 - 1,
        0,
        streaming.sinks as i64,
        false,
    );
    let (want, wlse) = paged_oracle(p, q, hq, q_len, sc, &|b, h, i, j| {
        let (g, sk) = (h / (hq / hkv), lens[b]);
        match heads[g] {
            HeadPolicy::Streaming => stream.sees(i, j, q_len, sk),
            HeadPolicy::Quest => {
                base_dec.sees(i, j, q_len, sk) && pages[b * hkv + g].contains(&(j / ps))
            }
            _ => base_dec.sees(i, j, q_len, sk),
        }
    });
    let (got, glse) = decode_run::<f32, f32>(p, &dec, q, hq, q_len);
    check(&what, d, 3e-5, &got, &want, &glse, &wlse);
}

/// Quest selection and the attention over the selected pages, with budgets below one page,
/// of a few pages and beyond the sequence; then one launch mixing full, streaming (sinks +
/// recent window) and Quest heads.
#[test]
fn paged_quest_and_streaming() {
    let lens = [40usize, 7, 1, 0, 100];
    let (hq, hkv, d) = (6, 3, 8);
    let mut r = rng(6000);
    let full = vis(-1, -1, 0, false);
    for ps in [1usize, 3, 16] {
        let p = paged::<f32>(&mut r, &lens, ps, hkv, d);
        for q_len in [1usize, 2] {
            let q = values::<f32>(&mut r, lens.len() * q_len * hq * d);
            let what = format!("quest ps {ps} q_len {q_len}");
            for token_budget in [0usize, 5, 16, 48, 1000] {
                let policy =
                    SparsePolicy::uniform(hkv, HeadPolicy::Quest).with_quest(QuestConfig {
                        token_budget,
                        sink_pages: 0,
                    });
                policy_check(&p, &q, (hq, q_len), &policy, (full, PLAIN), &what);
            }
            let policy = SparsePolicy {
                heads: vec![HeadPolicy::Full, HeadPolicy::Streaming, HeadPolicy::Quest],
                streaming: StreamingConfig {
                    sinks: 2,
                    window: 5,
                },
                quest: QuestConfig {
                    token_budget: 2 * ps,
                    sink_pages: 0,
                },
            };
            policy_check(&p, &q, (hq, q_len), &policy, (full, CAPPED), &what);
        }
    }
}

/// Paged prefill of `q` over `p` == the oracle: `lq[b]` rows for sequence `b`, packed
/// (`PagedPrefill::new_varlen`, LSE `[hq, total_q]`) when `varlen`, else `lq[0]` rows each
/// (`PagedPrefill::new`, `[batch, q_len, hq, d]`, LSE `[batch, hq, q_len]`).
fn prefill_check(
    p: &Paged,
    q: &[f64],
    hq: usize,
    (lq, varlen): (&[usize], bool),
    m: Vis,
    sc: Score,
    what: &str,
) {
    let d = p.d;
    let kv = |b: usize| (&p.k_tok[b][..], &p.v_tok[b][..]);
    let (want, mut wlse) =
        oracle_varlen(q, &kv, (lq, &p.lens), (hq, p.hkv, d), sc, &|b, _, i, j| {
            m.sees(i, j, lq[b], p.lens[b])
        });
    let cache = p.cache(&p.lens);
    let cq = cu(lq);
    let pre = if varlen {
        PagedPrefill::new_varlen(&cache, hq, &cq, &m.options(sc))
    } else {
        wlse = lse_per_sequence(&wlse, hq, lq[0]);
        PagedPrefill::new(&cache, hq, lq[0], &m.options(sc))
    }
    .unwrap();
    let qf: Vec<f32> = elems(q);
    let qs = Strides {
        batch: (lq[0] * hq * d) as i64,
        seq: (hq * d) as i64,
        head: d as i64,
    };
    let mut out = vec![f32::NAN; pre.out_len()];
    let mut lse = vec![f32::NAN; pre.lse_len()];
    pre.forward_cpu(
        Strided::new(&qf[..], qs),
        KvPages {
            k: &p.k_cache[..],
            v: &p.v_cache[..],
        },
        Strided::new(&mut out[..], qs),
        Some(&mut lse),
    )
    .unwrap();
    let what = format!("{what} rows {lq:?} varlen {varlen} {m:?} {sc:?}");
    check(&what, d, 3e-5, &to_f64(&out), &want, &lse, &wlse);
}

/// Paged prefill == dense attention (`seqlen_q = q_len`, `seqlen_k = seqlens_k[b]`) over the
/// gathered tokens: default not causal, every mask, sequences shorter than `q_len` and empty;
/// varlen chunks with zero-length entries.
#[test]
fn paged_prefill() {
    let lens = [9usize, 0, 3, 33];
    let (hq, hkv, d) = (4, 2, 8);
    let mut r = rng(7000);
    for ps in [1usize, 3, 16] {
        let p = paged::<f32>(&mut r, &lens, ps, hkv, d);
        let q = values::<f32>(&mut r, lens.len() * 5 * hq * d);
        for (mi, m) in MASKS.iter().enumerate() {
            let sc = if mi % 5 == 2 { CAPPED } else { PLAIN };
            prefill_check(
                &p,
                &q,
                hq,
                (&[5; 4], false),
                *m,
                sc,
                &format!("prefill ps {ps}"),
            );
        }
        // Varlen: q_len_b = 2, 0, 4, 1.
        let q = values::<f32>(&mut r, 7 * hq * d);
        for m in [
            vis(-1, -1, 0, true),
            vis(1, 1, 1, false),
            vis(-1, -1, 0, false),
        ] {
            prefill_check(
                &p,
                &q,
                hq,
                (&[2, 0, 4, 1], true),
                m,
                PLAIN,
                &format!("prefill ps {ps}"),
            );
        }
    }
}

// =======================================================================================
// Ring
// =======================================================================================

/// The specification's shardings (chunk boundaries `c * s / n`, the crate's documented
/// rounding for lengths not divisible by the chunk count).
fn ring_positions(s: usize, world: usize, sharding: Sharding, rank: usize) -> Vec<usize> {
    let chunk = |c: usize, n: usize| c * s / n..(c + 1) * s / n;
    match sharding {
        Sharding::Contiguous => chunk(rank, world).collect(),
        Sharding::Zigzag => chunk(rank, 2 * world)
            .chain(chunk(2 * world - 1 - rank, 2 * world))
            .collect(),
        Sharding::Stripe => (rank..s).step_by(world).collect(),
    }
}

/// A ring problem: `b` sequences of `s` tokens over `world` ranks.
#[derive(Clone, Copy, Debug)]
struct RingCase {
    b: usize,
    s: usize,
    world: usize,
    sharding: Sharding,
    heads: (usize, usize, usize),
}

/// Ring forward over simulated ranks (shards in `T`) == single-device attention over the
/// whole sequence with the same (global-position) mask; the layout's positions are the
/// specification's sharding; each rank meets every shard once and skips exactly the steps
/// whose shard has no key visible to its queries, and a shard is sent on exactly while a rank
/// it reaches later needs it. Partials are rounded to `T` before each
/// merge (as a dense call returns them): twice the dense tolerance.
fn ring_check<T: Element>(r: &mut SmallRng, c: RingCase, m: Vis, sc: Score) {
    let RingCase {
        b,
        s,
        world,
        sharding,
        heads: (hq, hkv, d),
    } = c;
    let x = qkv::<T>(r, b * s * hq * d, b * s * hkv * d);
    let (want, wlse) = oracle_fixed(&x, (b, s, s, hq, hkv, d), sc, &|_, _, i, j| {
        m.sees(i, j, s, s)
    });
    let what = format!("ring {:?} {c:?} {m:?} {sc:?}", T::DTYPE);
    let layout = RingLayout::new(s, world, sharding).unwrap();
    let pos: Vec<Vec<usize>> = (0..world)
        .map(|rk| ring_positions(s, world, sharding, rk))
        .collect();
    let ring = RingAttention::new(
        layout,
        RingShape {
            batch: b,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
        },
        &m.options(sc),
    )
    .unwrap();
    let sched = ring.schedule();
    for rk in 0..world {
        assert_eq!(
            layout.positions(rk),
            pos[rk],
            "{what}: positions of rank {rk}"
        );
        let mut met: Vec<usize> = (0..world).map(|t| layout.kv_source(rk, t)).collect();
        for (t, &src) in met.iter().enumerate() {
            let needed = pos[rk]
                .iter()
                .any(|&i| pos[src].iter().any(|&j| m.sees(i, j, s, s)));
            assert_eq!(sched.compute[rk][t], needed, "{what}: rank {rk} step {t}");
        }
        met.sort();
        assert_eq!(
            met,
            (0..world).collect::<Vec<_>>(),
            "{what}: shards of rank {rk}"
        );
    }
    // A shard travels on after step t exactly when a rank holding it at a later step needs it.
    let holder = |sh: usize, t: usize| {
        (0..world)
            .find(|&rk| layout.kv_source(rk, t) == sh)
            .unwrap()
    };
    for t in 0..world.saturating_sub(1) {
        for sh in 0..world {
            let later = (t + 1..world).any(|u| {
                let rk = holder(sh, u);
                pos[rk]
                    .iter()
                    .any(|&i| pos[sh].iter().any(|&j| m.sees(i, j, s, s)))
            });
            assert_eq!(
                sched.send[t][sh], later,
                "{what}: send of shard {sh} after step {t}"
            );
        }
    }
    // Shards [b, shard_len, h, d] (outputs poisoned), then back to global order.
    let shard = |t: &[f64], h: usize, p: &[usize]| -> Padded<T> {
        let rw = h * d;
        let v: Vec<f64> = (0..b)
            .flat_map(|bb| p.iter().map(move |&i| (bb * s + i) * rw))
            .flat_map(|o| t[o..o + rw].to_vec())
            .collect();
        Padded::new(&v, (b, p.len(), h, d), false, f32::NAN)
    };
    let qs: Vec<_> = pos.iter().map(|p| shard(&x.q, hq, p)).collect();
    let ks: Vec<_> = pos.iter().map(|p| shard(&x.k, hkv, p)).collect();
    let vs: Vec<_> = pos.iter().map(|p| shard(&x.v, hkv, p)).collect();
    let poison = vec![f64::NAN; b * s * hq * d];
    let mut os: Vec<_> = pos.iter().map(|p| shard(&poison, hq, p)).collect();
    let mut ls: Vec<Vec<f32>> = pos
        .iter()
        .map(|p| vec![f32::NAN; b * hq * p.len()])
        .collect();
    let qv: Vec<_> = qs.iter().map(Padded::view).collect();
    let kv: Vec<_> = ks.iter().map(Padded::view).collect();
    let vv: Vec<_> = vs.iter().map(Padded::view).collect();
    let mut ov: Vec<_> = os.iter_mut().map(Padded::view_mut).collect();
    let mut lv: Vec<&mut [f32]> = ls.iter_mut().map(|l| &mut l[..]).collect();
    ring.forward_cpu(&qv, &kv, &vv, &mut ov, Some(&mut lv))
        .unwrap();
    let mut got = vec![f64::NAN; want.len()];
    let mut glse = vec![f32::NAN; wlse.len()];
    let rw = hq * d;
    for (rk, p) in pos.iter().enumerate() {
        let o = to_f64(&os[rk].data);
        for bb in 0..b {
            for (li, &t) in p.iter().enumerate() {
                got[(bb * s + t) * rw..][..rw]
                    .copy_from_slice(&o[(bb * p.len() + li) * rw..][..rw]);
                for h in 0..hq {
                    glse[(bb * hq + h) * s + t] = ls[rk][(bb * hq + h) * p.len() + li];
                }
            }
        }
    }
    check(&what, d, 2.0 * tol::<T>(), &got, &want, &glse, &wlse);
}

/// Hand-picked ring problems: lengths 1, 2, odd and even, worlds 1 to 4 (ranks without
/// tokens included), every sharding, full / causal / windows / sinks.
#[test]
fn ring_equals_single_device() {
    let ring_masks = [
        vis(-1, -1, 0, false),
        vis(-1, -1, 0, true),
        vis(0, 0, 0, false),
        vis(1, 0, 0, false),
        vis(2, 3, 1, false),
        vis(3, -1, 2, true),
        vis(-1, 1, 0, false),
    ];
    let mut r = rng(8000);
    for s in [1usize, 2, 7, 24, 37] {
        for (mi, m) in ring_masks.iter().enumerate() {
            let sc = if mi == 3 { CAPPED } else { PLAIN };
            for world in [1usize, 2, 3, 4] {
                for sharding in [Sharding::Contiguous, Sharding::Zigzag, Sharding::Stripe] {
                    let c = RingCase {
                        b: 2,
                        s,
                        world,
                        sharding,
                        heads: (4, 2, 8),
                    };
                    ring_check::<f32>(&mut r, c, *m, sc);
                }
            }
        }
    }
}

// =======================================================================================
// Block-sparse (docs/semantics.md, a crate extension of the specification)
// =======================================================================================

type Lists = Vec<Vec<(usize, BlockKind)>>;

/// A block mask whose list `id` keeps each of the first `blocks(id)` key blocks with
/// probability `density`, each full or partial at random; also returns the lists.
fn random_lists(
    r: &mut SmallRng,
    dims: BlockMaskDims,
    density: f64,
    blocks: impl Fn(ListId) -> usize,
) -> (BlockMask, Lists) {
    let mut lists = Vec::new();
    let mask = BlockMask::from_lists(dims, |id| {
        let l: Vec<(usize, BlockKind)> = (0..blocks(id))
            .filter(|_| r.random_bool(density))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|kb| {
                (
                    kb,
                    [BlockKind::Full, BlockKind::Partial][r.random_range(0..2)],
                )
            })
            .collect();
        lists.push(l.clone());
        l
    })
    .unwrap();
    (mask, lists)
}

/// Whether key `j`'s block (of `bn` keys) is in `list`.
fn listed(list: &[(usize, BlockKind)], bn: usize, j: usize) -> bool {
    list.iter().any(|&(kb, _)| kb == j / bn)
}

/// Whether key `j`'s block is in `list` as a full block.
fn listed_full(list: &[(usize, BlockKind)], bn: usize, j: usize) -> bool {
    list.contains(&(j / bn, BlockKind::Full))
}

/// Random CSR lists (per batch entry and head, or broadcast) with random full / partial
/// kinds, block sizes 1, 3, 16 and unequal lengths: the crate equals the oracle with key `j`
/// visible to row `i` iff its block is listed for `i`'s block and (full, or the element mask
/// shows it).
#[test]
fn block_sparse_random_lists() {
    let (hq, hkv, d) = (4, 2, 8);
    let mut seed = 9000;
    for &(sq, sk) in &[(1usize, 1usize), (7, 19), (40, 13), (33, 33)] {
        for &(bm, bn) in &[(1usize, 1usize), (3, 16), (16, 3), (5, 7)] {
            for (mi, m) in MASKS.iter().enumerate().filter(|(i, _)| (i + bm) % 3 == 0) {
                seed += 1;
                let mut r = rng(seed);
                let b = 2;
                let (mb, mh) = if seed % 2 == 0 { (b, hq) } else { (1, 1) };
                let dims = BlockMaskDims::for_lengths(mb, mh, sq, sk, bm, bn).unwrap();
                let density = [0.0, 0.3, 0.7, 1.0][mi % 4];
                let (mask, lists) = random_lists(&mut r, dims, density, |_| dims.num_k_blocks);
                let x = qkv::<f32>(&mut r, b * sq * hq * d, b * sk * hkv * d);
                let sc = if mi % 2 == 0 { CAPPED } else { PLAIN };
                let nqb = dims.num_q_blocks;
                let sees = |bb: usize, h: usize, i: usize, j: usize| {
                    let l = ((bb % mb) * mh + h % mh) * nqb + i / bm;
                    listed(&lists[l], bn, j)
                        && (listed_full(&lists[l], bn, j) || m.sees(i, j, sq, sk))
                };
                let problem = (b, sq, sk, hq, hkv, d);
                let bs = BlockSparseAttention::new(dense_problem(problem, &m.options(sc)), mask)
                    .unwrap();
                let what = format!(
                    "block-sparse {sq}x{sk} blocks {bm}x{bn} bcast {} {m:?}",
                    mb == 1
                );
                block_sparse_check(&bs, &x, problem, (sc, seed.is_multiple_of(3)), &sees, &what);
            }
        }
    }
}

// =======================================================================================
// Random sweeps (shapes, masks and scores nobody chose)
// =======================================================================================

/// A random mask for lengths up to `n`: each side unbounded or a bound in `0..=n + 1` (often
/// small), sinks (often 0, often few) up to `n + 1`, causal or not.
fn random_vis(r: &mut SmallRng, n: usize) -> Vis {
    let n = n as i64;
    // Unbounded, a small bound (where off-by-ones live) or any bound up to n + 1.
    let side = |r: &mut SmallRng| match r.random_range(0..20) {
        0..6 => -1,
        6..13 => r.random_range(0..=8),
        _ => r.random_range(0..=n + 1),
    };
    let (left, right) = (side(r), side(r));
    let sinks = match r.random_range(0..4) {
        0 | 1 => 0,
        2 => r.random_range(1..=8),
        _ => r.random_range(0..=n + 1),
    };
    vis(left, right, sinks, r.random_bool(0.5))
}

fn random_score(r: &mut SmallRng) -> Score {
    Score {
        scale: r.random_bool(0.5).then(|| r.random_range(0.05f32..2.0)),
        cap: r.random_bool(0.4).then(|| r.random_range(0.3f32..5.0)),
    }
}

fn random_heads(r: &mut SmallRng) -> (usize, usize, usize) {
    let hkv = r.random_range(1..=3);
    let d = [1usize, 3, 8, 16, 40][r.random_range(0..5)];
    (hkv * r.random_range(1..=3), hkv, d)
}

/// Fixed-length dense problems of random lengths (0 to 48, unequal), heads, head dims (odd
/// included), masks, scales, softcaps, element types and strides.
#[test]
fn dense_random_sweep() {
    let mut r = rng(10_000);
    for n in 0..1200u64 {
        let (sq, sk) = (r.random_range(1..=48), r.random_range(0..=48));
        let (hq, hkv, d) = random_heads(&mut r);
        let b = r.random_range(1..=2);
        let m = random_vis(&mut r, sq.max(sk));
        let sc = random_score(&mut r);
        let dims = (b, sq, sk, hq, hkv, d);
        let pad = r.random_bool(0.5);
        let seed = r.random();
        let what = format!("dense sweep {n} {dims:?} {m:?} {sc:?}");
        match n % 3 {
            0 => sweep_one::<f32>(seed, dims, m, sc, pad, &what),
            1 => sweep_one::<f16>(seed, dims, m, sc, pad, &what),
            _ => sweep_one::<bf16>(seed, dims, m, sc, pad, &what),
        }
    }
}

fn sweep_one<T: Element>(
    seed: u64,
    dims: (usize, usize, usize, usize, usize, usize),
    m: Vis,
    sc: Score,
    pad: bool,
    what: &str,
) {
    let (b, sq, sk, hq, hkv, d) = dims;
    let mut r = rng(seed);
    let x = qkv::<T>(&mut r, b * sq * hq * d, b * sk * hkv * d);
    let (want, wlse) = oracle_fixed(&x, dims, sc, &|_, _, i, j| m.sees(i, j, sq, sk));
    let (got, glse) = dense_run::<T>(&x, dims, &m.options(sc), pad);
    check(what, d, tol::<T>(), &got, &want, &glse, &wlse);
}

/// 1 to 3 random valid NATTEN dims (lengths up to `most[rank - 1]`; kernel, dilation with
/// `k * d <= L`, stride `<= k` on non-causal dims, causal per dim).
fn random_na_dims(r: &mut SmallRng, most: [usize; 3]) -> Vec<NeighborhoodDim> {
    let rank = r.random_range(1..=3);
    (0..rank)
        .map(|_| {
            let l = r.random_range(1..=most[rank - 1]);
            let k = r.random_range(1..=l);
            let dil = r.random_range(1..=l / k);
            let causal = r.random_bool(0.3);
            let s = if causal { 1 } else { r.random_range(1..=k) };
            nd(l, k, dil, s, causal)
        })
        .collect()
}

/// Random valid NATTEN dims (1-D to 3-D; kernel, dilation with `k * d <= L`, stride `<= k`
/// on non-causal dims, causal per dim).
#[test]
fn neighborhood_random_sweep() {
    let mut r = rng(11_000);
    for n in 0..200u64 {
        let dims = random_na_dims(&mut r, [24, 9, 5]);
        let hkv = r.random_range(1..=2);
        let case = match n % 4 {
            1 => neighborhood_case::<f16>,
            3 => neighborhood_case::<bf16>,
            _ => neighborhood_case::<f32>,
        };
        case(11_000 + n, &dims, (r.random_range(1..=2), 2 * hkv, hkv, 8));
    }
}

/// Random ring problems: lengths 1 to 40, worlds 1 to 6, every sharding, random heads,
/// masks and scores, f32 / f16 / bf16.
#[test]
fn ring_random_sweep() {
    let mut r = rng(12_000);
    for n in 0..200usize {
        let c = RingCase {
            b: 1,
            s: r.random_range(1..=40),
            world: r.random_range(1..=6),
            sharding: [Sharding::Contiguous, Sharding::Zigzag, Sharding::Stripe][n % 3],
            heads: random_heads(&mut r),
        };
        let m = random_vis(&mut r, c.s);
        let sc = random_score(&mut r);
        match n % 4 {
            1 => ring_check::<f16>(&mut r, c, m, sc),
            3 => ring_check::<bf16>(&mut r, c, m, sc),
            _ => ring_check::<f32>(&mut r, c, m, sc),
        }
    }
}

/// Random paged decode problems: page sizes 1 to 20, q_len 1 to 16, random lengths (some
/// shorter than q_len or empty), decode masks (right bound unbounded or 0), forced splits.
#[test]
fn paged_decode_random_sweep() {
    let mut r = rng(13_000);
    for n in 0..150u64 {
        match n % 5 {
            1 => decode_one::<f32, bf16>(&mut r, n, 60, 20),
            2 => decode_one::<f16, f16>(&mut r, n, 60, 20),
            3 => decode_one::<bf16, f32>(&mut r, n, 60, 20),
            _ => decode_one::<f32, f32>(&mut r, n, 60, 20),
        }
    }
}

/// One random decode problem, queries and output in `T`, the cache in `C`.
fn decode_one<T: Element, C: Element>(r: &mut SmallRng, n: u64, max_len: usize, max_ps: usize) {
    let ps = r.random_range(1..=max_ps);
    let (hq, hkv, d) = random_heads(r);
    let lens: Vec<usize> = (0..r.random_range(1..=3))
        .map(|_| r.random_range(0..=max_len))
        .collect();
    let p = paged::<C>(r, &lens, ps, hkv, d);
    let q_len = r.random_range(1..=16);
    // Causal clips any right bound to 0; without it only -1 and 0 are the specification's
    // decode (a right bound > 0 without causal is a crate extension).
    let mut m = random_vis(r, max_len);
    if !m.causal {
        m.right = [-1, 0][r.random_range(0..2)];
    }
    let sc = random_score(r);
    let q = values::<T>(r, lens.len() * q_len * hq * d);
    let splits = r.random_bool(0.5).then(|| r.random_range(1..=16));
    let what = format!("decode sweep {n} ps {ps} lens {lens:?} hq {hq}/{hkv} q_len {q_len}");
    decode_check::<T, C>(&p, &q, (hq, q_len), m, sc, splits, &what);
}

/// Random paged prefill problems (dense semantics over the gathered tokens, any mask).
#[test]
fn paged_prefill_random_sweep() {
    let mut r = rng(14_000);
    for n in 0..150u64 {
        let ps = r.random_range(1..=20);
        let (hq, hkv, d) = random_heads(&mut r);
        let batch = r.random_range(1..=3);
        let lens: Vec<usize> = (0..batch).map(|_| r.random_range(0..=50)).collect();
        let p = paged::<f32>(&mut r, &lens, ps, hkv, d);
        let varlen = r.random_bool(0.3);
        let lq: Vec<usize> = if varlen {
            (0..batch).map(|_| r.random_range(0..=20)).collect()
        } else {
            vec![r.random_range(1..=20); batch]
        };
        if lq.iter().sum::<usize>() == 0 {
            continue; // a prefill needs a query row
        }
        let m = random_vis(&mut r, 50);
        let sc = random_score(&mut r);
        let q = values::<f32>(&mut r, lq.iter().sum::<usize>() * hq * d);
        let what = format!("prefill sweep {n} ps {ps} lens {lens:?} hq {hq}/{hkv}");
        prefill_check(&p, &q, hq, (&lq, varlen), m, sc, &what);
    }
}

/// Block-sparse over a varlen batch: each sequence uses the leading blocks of its own
/// lengths (lists past its last query block empty, indices below its key block count).
#[test]
fn block_sparse_varlen() {
    let (hq, hkv, d) = (2, 1, 8);
    let mut r = rng(15_000);
    for n in 0..60u64 {
        let batch = r.random_range(1..=4);
        let lq: Vec<usize> = (0..batch).map(|_| r.random_range(0..=30)).collect();
        let lk: Vec<usize> = (0..batch).map(|_| r.random_range(0..=30)).collect();
        let (cq, ck) = (cu(&lq), cu(&lk));
        let (tq, tk) = (*cq.last().unwrap() as usize, *ck.last().unwrap() as usize);
        if tq == 0 {
            continue;
        }
        let (bm, bn) = (r.random_range(1..=8), r.random_range(1..=8));
        let m = random_vis(&mut r, 30);
        let (mq, mk) = (*lq.iter().max().unwrap(), *lk.iter().max().unwrap());
        let dims = BlockMaskDims::for_lengths(batch, hq, mq, mk, bm, bn).unwrap();
        let (mask, lists) = random_lists(&mut r, dims, 0.6, |id| {
            if id.q_block < lq[id.batch].div_ceil(bm) {
                lk[id.batch].div_ceil(bn)
            } else {
                0
            }
        });
        let x = qkv::<f32>(&mut r, tq * hq * d, tk * hkv * d);
        let kv = |b: usize| {
            let k = ck[b] as usize * hkv * d..ck[b + 1] as usize * hkv * d;
            (&x.k[k.clone()], &x.v[k])
        };
        let (want, wlse) =
            oracle_varlen(&x.q, &kv, (&lq, &lk), (hq, hkv, d), PLAIN, &|b, h, i, j| {
                let l = &lists[(b * hq + h) * dims.num_q_blocks + i / bm];
                listed(l, bn, j) && (listed_full(l, bn, j) || m.sees(i, j, lq[b], lk[b]))
            });
        let attn = problem(
            batch,
            SeqLens::Varlen {
                cu_seqlens_q: &cq,
                cu_seqlens_k: &ck,
            },
            (hq, hkv, d),
            &m.options(PLAIN),
        );
        let bs = BlockSparseAttention::new(attn, mask).unwrap();
        let (qf, kf, vf): (Vec<f32>, Vec<f32>, Vec<f32>) = (elems(&x.q), elems(&x.k), elems(&x.v));
        let st = |h: usize| Strides {
            batch: 0,
            seq: (h * d) as i64,
            head: d as i64,
        };
        let mut out = vec![f32::NAN; tq * hq * d];
        let mut lse = vec![f32::NAN; hq * tq];
        bs.forward_cpu(
            Strided::new(&qf[..], st(hq)),
            Strided::new(&kf[..], st(hkv)),
            Strided::new(&vf[..], st(hkv)),
            Strided::new(&mut out[..], st(hq)),
            Some(&mut lse),
        )
        .unwrap();
        let what = format!("block-sparse varlen {n} {lq:?}/{lk:?} blocks {bm}x{bn} {m:?}");
        check(&what, d, 3e-5, &to_f64(&out), &want, &lse, &wlse);
    }
}

/// The C entry point `longattn_dense_forward_cpu` with the specification's integers
/// (`window_left/right`, `-1` unbounded, `causal`, `sinks`, scale and softcap 0 = default/off).
#[test]
fn c_dense_forward_random_sweep() {
    use longattn::capi::{
        CDenseDesc, CStrides, CTensor, CTensorMut, LONGATTN_OK, longattn_dense_forward_cpu,
    };
    let mut r = rng(16_000);
    for n in 0..200u64 {
        let (sq, sk) = (r.random_range(1..=40), r.random_range(0..=40));
        let (hq, hkv, d) = random_heads(&mut r);
        let b = r.random_range(1..=2);
        let m = random_vis(&mut r, sq.max(sk));
        let sc = random_score(&mut r);
        let x = qkv::<f32>(&mut r, b * sq * hq * d, b * sk * hkv * d);
        let dims = (b, sq, sk, hq, hkv, d);
        let (want, wlse) = oracle_fixed(&x, dims, sc, &|_, _, i, j| m.sees(i, j, sq, sk));
        let desc = CDenseDesc {
            batch: b,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            seqlen_q: sq,
            seqlen_k: sk,
            cu_seqlens_q: std::ptr::null(),
            cu_seqlens_k: std::ptr::null(),
            scale: sc.scale.unwrap_or(0.0),
            softcap: sc.cap.unwrap_or(0.0),
            window_left: m.left,
            window_right: m.right,
            causal: i32::from(m.causal),
            sinks: m.sinks as usize,
        };
        let (qf, kf, vf): (Vec<f32>, Vec<f32>, Vec<f32>) = (elems(&x.q), elems(&x.k), elems(&x.v));
        let cs = |s: usize, h: usize| CStrides {
            batch: (s * h * d) as i64,
            seq: (h * d) as i64,
            head: d as i64,
        };
        let t = |x: &[f32], s, h| CTensor {
            data: x.as_ptr().cast(),
            len: x.len(),
            strides: cs(s, h),
        };
        let mut out = vec![f32::NAN; b * sq * hq * d];
        let mut lse = vec![f32::NAN; b * hq * sq];
        // SAFETY: every pointer is a live buffer of the stated length; out does not alias.
        let status = unsafe {
            longattn_dense_forward_cpu(
                &desc,
                0,
                t(&qf, sq, hq),
                t(&kf, sk, hkv),
                t(&vf, sk, hkv),
                CTensorMut {
                    data: out.as_mut_ptr().cast(),
                    len: out.len(),
                    strides: cs(sq, hq),
                },
                lse.as_mut_ptr(),
                lse.len(),
            )
        };
        let what = format!("C dense sweep {n} {dims:?} {m:?} {sc:?}");
        assert_eq!(status, LONGATTN_OK, "{what}");
        check(&what, d, 3e-5, &to_f64(&out), &want, &lse, &wlse);
    }
}

/// Writes `x: [b, s, h, d]` (contiguous) into `buf` at `base` with element strides `st`.
fn place(
    x: &[f64],
    (b, s, h, d): (usize, usize, usize, usize),
    st: Strides,
    buf: &mut [f32],
    base: usize,
) {
    for bb in 0..b {
        for t in 0..s {
            for hh in 0..h {
                let at = base
                    + (bb as i64 * st.batch + t as i64 * st.seq + hh as i64 * st.head) as usize;
                let src = ((bb * s + t) * h + hh) * d;
                for c in 0..d {
                    buf[at + c] = x[src + c] as f32;
                }
            }
        }
    }
}

/// "Batch/seq/head strides are arbitrary": q, k, v as slices of one fused QKV buffer
/// `[b, s, hq + 2 hkv, d]` (GQA), and every tensor head-major `[b, h, s, d]`, output included.
#[test]
fn dense_fused_and_head_major_strides() {
    let mut r = rng(17_000);
    for n in 0..30u64 {
        let s = r.random_range(1..=30);
        let (hq, hkv, d) = random_heads(&mut r);
        let b = r.random_range(1..=2);
        let m = random_vis(&mut r, s);
        let sc = random_score(&mut r);
        let x = qkv::<f32>(&mut r, b * s * hq * d, b * s * hkv * d);
        let dims = (b, s, s, hq, hkv, d);
        let (want, wlse) = oracle_fixed(&x, dims, sc, &|_, _, i, j| m.sees(i, j, s, s));
        let attn = dense_problem((b, s, s, hq, hkv, d), &m.options(sc));
        // Fused QKV.
        let row = (hq + 2 * hkv) * d;
        let fused = Strides {
            batch: (s * row) as i64,
            seq: row as i64,
            head: d as i64,
        };
        let mut buf = vec![f32::NAN; b * s * row];
        place(&x.q, (b, s, hq, d), fused, &mut buf, 0);
        place(&x.k, (b, s, hkv, d), fused, &mut buf, hq * d);
        place(&x.v, (b, s, hkv, d), fused, &mut buf, (hq + hkv) * d);
        let mut out = vec![f32::NAN; b * s * hq * d];
        let mut lse = vec![f32::NAN; b * hq * s];
        attn.forward_cpu(
            Strided::new(&buf[..], fused),
            Strided::new(&buf[hq * d..], fused),
            Strided::new(&buf[(hq + hkv) * d..], fused),
            Strided::new(&mut out[..], Strides::contiguous(s, hq, d)),
            Some(&mut lse),
        )
        .unwrap();
        let what = format!("fused qkv {n} {dims:?} {m:?} {sc:?}");
        check(&what, d, 3e-5, &to_f64(&out), &want, &lse, &wlse);
        // Head-major [b, h, s, d].
        let hm = |h: usize| Strides {
            batch: (h * s * d) as i64,
            seq: d as i64,
            head: (s * d) as i64,
        };
        let mut qb = vec![f32::NAN; b * s * hq * d];
        let mut kb = vec![f32::NAN; b * s * hkv * d];
        let mut vb = vec![f32::NAN; b * s * hkv * d];
        place(&x.q, (b, s, hq, d), hm(hq), &mut qb, 0);
        place(&x.k, (b, s, hkv, d), hm(hkv), &mut kb, 0);
        place(&x.v, (b, s, hkv, d), hm(hkv), &mut vb, 0);
        let mut out = vec![f32::NAN; b * s * hq * d];
        let mut lse = vec![f32::NAN; b * hq * s];
        attn.forward_cpu(
            Strided::new(&qb[..], hm(hq)),
            Strided::new(&kb[..], hm(hkv)),
            Strided::new(&vb[..], hm(hkv)),
            Strided::new(&mut out[..], hm(hq)),
            Some(&mut lse),
        )
        .unwrap();
        // Back to [b, s, hq, d].
        let mut got = vec![f64::NAN; out.len()];
        for bb in 0..b {
            for t in 0..s {
                for h in 0..hq {
                    let src = ((bb * hq + h) * s + t) * d;
                    let dst = ((bb * s + t) * hq + h) * d;
                    for c in 0..d {
                        got[dst + c] = out[src + c] as f64;
                    }
                }
            }
        }
        let what = format!("head-major {n} {dims:?} {m:?} {sc:?}");
        check(&what, d, 3e-5, &got, &want, &lse, &wlse);
    }
}

/// Random per-head policies in one launch (full, streaming with random sinks and window,
/// Quest with random budgets), GQA, q_len up to 16, page sizes 1 to 20: Quest selections
/// against the specification's top-B (newest page included) and every head's output against
/// the oracle. With no Quest head, the base mask is a random decode mask (streaming heads
/// replace it with their own).
#[test]
fn paged_policy_random_sweep() {
    let mut r = rng(18_000);
    for n in 0..80u64 {
        let ps = r.random_range(1..=20);
        let (hq, hkv, d) = random_heads(&mut r);
        let lens: Vec<usize> = (0..r.random_range(1..=3))
            .map(|_| r.random_range(0..=80))
            .collect();
        let p = paged::<f32>(&mut r, &lens, ps, hkv, d);
        let q_len = r.random_range(1..=16);
        let heads: Vec<HeadPolicy> = (0..hkv)
            .map(|_| {
                [HeadPolicy::Full, HeadPolicy::Streaming, HeadPolicy::Quest][r.random_range(0..3)]
            })
            .collect();
        let streaming = StreamingConfig {
            sinks: r.random_range(0..=6),
            window: r.random_range(1..=20),
        };
        let quest = QuestConfig {
            token_budget: r.random_range(0..=100),
            sink_pages: 0,
        };
        let base = if heads.contains(&HeadPolicy::Quest) {
            vis(-1, -1, 0, true)
        } else {
            let mut m = random_vis(&mut r, 80);
            if !m.causal {
                m.right = [-1, 0][r.random_range(0..2)];
            }
            m
        };
        let sc = random_score(&mut r);
        let q = values::<f32>(&mut r, lens.len() * q_len * hq * d);
        let policy = SparsePolicy {
            heads,
            streaming,
            quest,
        };
        let what = format!("policy sweep {n} ps {ps} lens {lens:?} hq {hq}/{hkv} q_len {q_len}");
        policy_check(&p, &q, (hq, q_len), &policy, (base, sc), &what);
    }
}

/// Longer sequences (CPU tiles of 16 rows x 32 keys, several sink tiles, windows starting
/// inside a sink tile), dense and paged decode.
#[test]
fn long_sequences_sweep() {
    let mut r = rng(19_000);
    for n in 0..30u64 {
        let (sq, sk) = (r.random_range(1..=200), r.random_range(1..=300));
        let (hq, hkv) = (2, 1);
        let m = random_vis(&mut r, sq.max(sk));
        let sc = random_score(&mut r);
        let dims = (1, sq, sk, hq, hkv, 8);
        let seed = r.random();
        let what = format!("long dense {n} {dims:?} {m:?} {sc:?}");
        sweep_one::<f32>(seed, dims, m, sc, n % 2 == 0, &what);
    }
    for n in 0..20u64 {
        decode_one::<f32, f32>(&mut r, 1000 + n, 700, 40);
    }
}

/// The public helpers that expose the semantics agree with the oracle: `Mask::visible` of
/// `AttentionOptions::effective_mask` (causal composition included), `Mask::window_range`
/// (the window alone), `Mask::key_tiles` (every tile holding a visible key of the rows is
/// visited, none twice), `NeighborhoodAttention::neighbors`, `PagedCache::token_offset`.
#[test]
fn public_helpers_match_the_oracle() {
    let mut r = rng(20_000);
    for n in 0..400 {
        let (sq, sk) = (r.random_range(0..=40), r.random_range(0..=40));
        let m = random_vis(&mut r, sq.max(sk));
        let mask = m.options(PLAIN).effective_mask();
        let what = format!("helpers {n} {sq}x{sk} {m:?}");
        let alone = Vis { sinks: 0, ..m };
        for i in 0..sq {
            for j in 0..sk + 2 {
                assert_eq!(
                    mask.visible(i, j, sq, sk),
                    m.sees(i, j, sq, sk),
                    "{what}: ({i}, {j})"
                );
            }
            let range = mask.window_range(i, sq, sk);
            let want: Vec<usize> = (0..sk).filter(|&j| alone.sees(i, j, sq, sk)).collect();
            assert_eq!(range.collect::<Vec<_>>(), want, "{what}: window_range({i})");
        }
        let bn = r.random_range(1..=9);
        let lo = r.random_range(0..=sq);
        let rows = lo..r.random_range(lo..=sq);
        let tiles: Vec<usize> = mask.key_tiles(rows.clone(), sq, sk, bn).iter().collect();
        let mut sorted = tiles.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            tiles.len(),
            "{what}: a tile visited twice: {tiles:?}"
        );
        for i in rows.clone() {
            for j in (0..sk).filter(|&j| m.sees(i, j, sq, sk)) {
                assert!(
                    tiles.contains(&(j / bn)),
                    "{what}: rows {rows:?} key {j} in tile {} not visited ({tiles:?}, bn {bn})",
                    j / bn
                );
            }
        }
    }
    for n in 0..100 {
        let dims = random_na_dims(&mut r, [30, 10, 6]);
        let attn = NeighborhoodAttention::new(
            &NeighborhoodShape {
                batch: 1,
                heads_q: 1,
                heads_kv: 1,
                head_dim: 1,
                dims: &dims,
            },
            &AttentionOptions::default(),
        )
        .unwrap();
        let tokens: usize = dims.iter().map(|x| x.length).product();
        for t in 0..tokens {
            let ct = coords(&dims, t);
            let want: Vec<usize> = (0..tokens)
                .filter(|&u| {
                    let cu = coords(&dims, u);
                    dims.iter()
                        .enumerate()
                        .all(|(a, dim)| na_sees(dim, ct[a], cu[a]))
                })
                .collect();
            let got: Vec<usize> = attn.neighbors(t).unwrap().collect();
            assert_eq!(got, want, "neighbors {n} {dims:?} token {t}");
        }
    }
    for ps in [1usize, 3, 16] {
        let lens = [0usize, 5, 33, 1];
        let p = paged::<f32>(&mut r, &lens, ps, 2, 4);
        let cache = p.cache(&lens);
        for (b, &s) in lens.iter().enumerate() {
            for j in 0..s + 2 {
                for g in 0..2 {
                    let want = (j < s).then(|| {
                        let (page, slot) = p.slot(b, j);
                        ((page * ps + slot) * 2 + g) * 4
                    });
                    assert_eq!(
                        cache.token_offset(b, j, g),
                        want,
                        "token_offset ps {ps} ({b}, {j}, {g})"
                    );
                }
            }
        }
    }
}

/// Runs a block-sparse problem (fixed lengths, f32, padded buffers when `pad`) and checks
/// it against the oracle with `sees(b, h, i, j)`.
fn block_sparse_check(
    bs: &BlockSparseAttention,
    x: &Qkv,
    dims: (usize, usize, usize, usize, usize, usize),
    (sc, pad): (Score, bool),
    sees: &dyn Fn(usize, usize, usize, usize) -> bool,
    what: &str,
) {
    let (want, wlse) = oracle_fixed(x, dims, sc, sees);
    let (got, lse) = run_padded::<f32>(x, dims, pad, |(q, k, v, o, l)| {
        bs.forward_cpu(q, k, v, o, Some(l)).unwrap()
    });
    check(what, dims.5, 3e-5, &got, &want, &lse, &wlse);
}

/// Per-row selections (MoBA, `docs/semantics.md`): key `j` is visible to row `i` only if its
/// block is also in row `i`'s padded list; and the pattern constructors (Longformer, Sparse
/// Transformer strided / fixed, `qb' = qb + (sk - sq) / block`) list exactly their formula's
/// pairs, marking full only blocks the element mask shows entirely (so the result is the
/// formula AND the element mask).
#[test]
fn block_sparse_rows_and_patterns() {
    use longattn::RowBlocks;
    use longattn::block_sparse::patterns::{
        PatternShape, longformer, sparse_transformer_fixed, sparse_transformer_strided,
    };
    let (hq, hkv, d) = (2, 1, 8);
    let mut r = rng(21_000);
    for n in 0..40u64 {
        let (sq, sk) = (r.random_range(1..=40), r.random_range(1..=40));
        let (bm, bn) = (r.random_range(1..=8), r.random_range(1..=8));
        let b = 2;
        let dims = (b, sq, sk, hq, hkv, d);
        let m = random_vis(&mut r, 40);
        let bd = BlockMaskDims::for_lengths(1, 1, sq, sk, bm, bn).unwrap();
        let top_k = r.random_range(1..=4);
        // Row lists: sorted random blocks, -1 padded.
        let rows: Vec<Vec<usize>> = (0..b * hq * sq)
            .map(|_| {
                let mut l: Vec<usize> = (0..bd.num_k_blocks)
                    .filter(|_| r.random_bool(0.5))
                    .collect();
                l.shuffle(&mut r);
                l.truncate(top_k);
                l.sort();
                l
            })
            .collect();
        let flat: Vec<i32> = rows
            .iter()
            .flat_map(|l| (0..top_k).map(|c| l.get(c).map_or(-1, |&x| x as i32)))
            .collect();
        let kinds: Vec<BlockKind> = (0..bd.num_k_blocks)
            .map(|_| {
                if r.random_bool(0.5) {
                    BlockKind::Full
                } else {
                    BlockKind::Partial
                }
            })
            .collect();
        let mask =
            BlockMask::from_lists(bd, |_| kinds.iter().copied().enumerate().collect()).unwrap();
        let bs = BlockSparseAttention::new(dense_problem(dims, &m.options(PLAIN)), mask)
            .unwrap()
            .with_row_blocks(RowBlocks::new(bn, top_k, flat).unwrap())
            .unwrap();
        let x = qkv::<f32>(&mut r, b * sq * hq * d, b * sk * hkv * d);
        let sees = |bb: usize, h: usize, i: usize, j: usize| {
            rows[(bb * hq + h) * sq + i].contains(&(j / bn))
                && (kinds[j / bn] == BlockKind::Full || m.sees(i, j, sq, sk))
        };
        block_sparse_check(
            &bs,
            &x,
            dims,
            (PLAIN, n % 2 == 0),
            &sees,
            &format!("row blocks {n} {dims:?} {bm}x{bn} top {top_k} {m:?}"),
        );
    }
    for n in 0..60u64 {
        let block = r.random_range(1..=6);
        let sq = r.random_range(1..=36);
        let sk = sq + block * r.random_range(0..=3);
        let dims = (1, sq, sk, hq, hkv, d);
        let m = random_vis(&mut r, sk);
        let shape = PatternShape {
            heads: 1,
            seqlen_q: sq,
            seqlen_k: sk,
            block,
            mask: m.options(PLAIN).effective_mask(),
        };
        let (w, g, s, c) = (
            r.random_range(0..=3),
            r.random_range(0..=2),
            r.random_range(1..=4),
            r.random_range(0..=4),
        );
        let shift = (sk - sq) / block;
        let (mask, pair): (BlockMask, Box<dyn Fn(usize, usize) -> bool>) = match n % 3 {
            0 => (
                longformer(&shape, w, g).unwrap(),
                Box::new(move |qb, kb| qb.abs_diff(kb) <= w || kb < g || qb < g),
            ),
            1 => (
                sparse_transformer_strided(&shape, s).unwrap(),
                Box::new(move |qb, kb| kb <= qb && (qb - kb < s || (qb - kb) % s == 0)),
            ),
            _ => (
                sparse_transformer_fixed(&shape, s, c).unwrap(),
                Box::new(move |qb, kb| kb <= qb && (kb / s == qb / s || kb % s + c >= s)),
            ),
        };
        let bs = BlockSparseAttention::new(dense_problem(dims, &m.options(PLAIN)), mask).unwrap();
        let x = qkv::<f32>(&mut r, sq * hq * d, sk * hkv * d);
        let sees = |_: usize, _: usize, i: usize, j: usize| {
            pair(i / block + shift, j / block) && m.sees(i, j, sq, sk)
        };
        block_sparse_check(
            &bs,
            &x,
            dims,
            (PLAIN, n % 2 == 0),
            &sees,
            &format!("pattern {n} {dims:?} block {block} (w {w} g {g} s {s} c {c}) {m:?}"),
        );
    }
}
