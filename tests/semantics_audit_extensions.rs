//! Independent audit of the crate's **extensions** of the shared specification: what
//! `tests/semantics_audit.rs` lists as "Not driven here". The definitions are the crate
//! extension sections of `docs/semantics.md` ("Extension: ...", "Decision: ...", "Block-sparse
//! masks", "MoBA selection", "Patterns", "FP8 KV cache", "FP8 dense forward", the NaN policy)
//! and the rustdoc of each public item; the specification at the top of that page wins.
//!
//! The oracle is written from those texts alone, brute force in f64, and shares nothing with
//! the crate (not `longattn::reference`, `Mask::visible`, the pattern builders, `tests/common`
//! or the other audit):
//!
//! - decode with an explicit right bound `r > 0` without causal (new token `i` sees up to `r`
//!   new tokens after it, sinks never right of the bound);
//! - Quest with `sink_pages` and candidates restricted to pages the base mask leaves visible:
//!   `K = min(max(B, #kept), #candidates)`, kept pages first, then score, then page index;
//! - strides: 0 broadcasts an input (an output that would alias itself is refused), a
//!   negative stride is a `Stride` error, on every API that takes strides;
//! - FP8: the e4m3 format from its bit layout, the dense FP8 forward's tiled P quantisation,
//!   the FP8 paged cache (append quantisation bits with f32 division, Quest bounds of the
//!   stored codes, decode / prefill over `code * scale`);
//! - MoBA selection per token and per query block, and the attention over it;
//! - the block patterns (Longformer, BigBird, Sparse Transformer strided / fixed,
//!   Block-Attention, MSWA, DuoAttention): lists, kinds and the attention;
//! - Star Attention's two phases.
//!
//! Inputs are seeded and rounded to the element type first; outputs are poisoned with NaN.
//! A result passes when nothing is NaN, rows the oracle leaves empty are exactly 0 with LSE
//! exactly `-inf`, and the relative L2 error (overall and per row) and the LSE error are
//! within the element type's tolerance. Bad inputs must give an `Err` (a panic fails).
#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

use longattn::block_sparse::moba::{moba_attention, moba_select_blocks_cpu, moba_select_cpu};
use longattn::block_sparse::patterns::{
    PatternShape, bigbird, bigbird_random_blocks, block_attention, longformer, per_head_windows,
    sparse_transformer_fixed, sparse_transformer_strided, streaming_heads,
};
use longattn::{
    AttentionOptions, AttentionShape, BlockKind, BlockMask, BlockSparseAttention, DType, Element,
    Error, F8E4M3, FP8_KEY_TILE, FP8_MAX_DESCALE, FlashAttention, Fp8Descales, HeadPolicy, KvPages,
    KvScales, MobaConfig, PageMeta, PageTable, PagedCache, PagedDecode, PagedLayout, PagedPrefill,
    QuestConfig, RingShape, SeqLens, SparsePolicy, StarAttention, Strided, Strides, Window, bf16,
    f16,
};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

// =======================================================================================
// Oracle: visibility, attention, checks
// =======================================================================================

/// FlashAttention-2 `window_size = (lo, hi)` (`-1` unbounded), `sink` leading keys, causal.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Win {
    lo: i64,
    hi: i64,
    sink: i64,
    causal: bool,
}

const fn win(lo: i64, hi: i64, sink: i64, causal: bool) -> Win {
    Win {
        lo,
        hi,
        sink,
        causal,
    }
}

impl Win {
    /// Right bound in force (`-1` unbounded): causal clips it to `min(hi, 0)`.
    fn hi_bound(&self) -> i64 {
        if !self.causal {
            self.hi
        } else if self.hi < 0 {
            0
        } else {
            self.hi.min(0)
        }
    }

    /// Key `j` visible to row `i` of an `sq` x `sk` problem (bottom-right aligned).
    fn shows(&self, i: usize, j: usize, sq: usize, sk: usize) -> bool {
        let (i, j, sq, sk) = (i as i64, j as i64, sq as i64, sk as i64);
        let at = i + sk - sq;
        let hi = self.hi_bound();
        let below_hi = hi < 0 || j <= at + hi;
        let above_lo = self.lo < 0 || j >= at - self.lo;
        (0..sk).contains(&j) && below_hi && (above_lo || j < self.sink)
    }

    fn opts(&self) -> AttentionOptions {
        AttentionOptions::default()
            .with_window(Window::from_flash(self.lo, self.hi).unwrap())
            .with_sinks(self.sink as usize)
            .with_causal(self.causal)
    }
}

/// A random mask for lengths up to `n`, bounds biased to small values.
fn any_win(r: &mut SmallRng, n: usize) -> Win {
    let side = |r: &mut SmallRng| match r.random_range(0..10) {
        0..3 => -1,
        3..7 => r.random_range(0..=4),
        _ => r.random_range(0..=n as i64 + 1),
    };
    let (lo, hi) = (side(r), side(r));
    let sink = [0, 0, 1, 3, n as i64][r.random_range(0..5)];
    win(lo, hi, sink, r.random_bool(0.5))
}

/// Scale (`None`: `1/sqrt(d)`) and softcap of the scores.
#[derive(Clone, Copy, Debug)]
struct Sc {
    scale: Option<f32>,
    cap: Option<f32>,
}

const NO_CAP: Sc = Sc {
    scale: None,
    cap: None,
};

fn any_sc(r: &mut SmallRng) -> Sc {
    Sc {
        scale: r.random_bool(0.5).then(|| r.random_range(0.1f32..1.5)),
        cap: r.random_bool(0.3).then(|| r.random_range(0.5f32..4.0)),
    }
}

impl Sc {
    fn apply(&self, o: AttentionOptions) -> AttentionOptions {
        let o = self.scale.map_or(o, |s| o.with_scale(s));
        self.cap.map_or(o, |c| o.with_softcap(c))
    }

    fn score(&self, d: usize, dot: f64) -> f64 {
        let x = self.scale.map_or(1.0 / (d as f64).sqrt(), f64::from) * dot;
        self.cap.map_or(x, |c| c as f64 * (x / c as f64).tanh())
    }
}

/// Softmax attention of one query row over `(score, value)` pairs; `(0, -inf)` when empty.
fn softmax_row(pairs: &[(f64, &[f64])], d: usize) -> (Vec<f64>, f64) {
    let mut o = vec![0.0; d];
    let Some(m) = pairs.iter().map(|p| p.0).reduce(f64::max) else {
        return (o, f64::NEG_INFINITY);
    };
    let z: f64 = pairs.iter().map(|p| (p.0 - m).exp()).sum();
    for (s, v) in pairs {
        let w = (s - m).exp() / z;
        o.iter_mut().zip(*v).for_each(|(a, b)| *a += w * b);
    }
    (o, m + z.ln())
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Contiguous f64 tensors of a fixed-length batch: `q [b, sq, hq, d]`, `k, v [b, sk, hkv, d]`.
struct Tensors {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
}

/// `(b, sq, sk, hq, hkv, d)`.
type Dims = (usize, usize, usize, usize, usize, usize);

/// The f64 attention of a fixed-length batch where row `i` of head `h` of sequence `bb` sees
/// key `j` iff `sees(bb, h, i, j)`: out `[b, sq, hq, d]`, LSE `[b, hq, sq]`.
fn attend(
    x: &Tensors,
    (b, sq, sk, hq, hkv, d): Dims,
    sc: Sc,
    sees: &dyn Fn(usize, usize, usize, usize) -> bool,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![f64::NAN; b * sq * hq * d];
    let mut lse = vec![f64::NAN; b * hq * sq];
    for bb in 0..b {
        for h in 0..hq {
            let g = h * hkv / hq;
            for i in 0..sq {
                let qo = ((bb * sq + i) * hq + h) * d;
                let qi = &x.q[qo..qo + d];
                let pairs: Vec<(f64, &[f64])> = (0..sk)
                    .filter(|&j| sees(bb, h, i, j))
                    .map(|j| {
                        let ko = ((bb * sk + j) * hkv + g) * d;
                        (sc.score(d, dot(qi, &x.k[ko..ko + d])), &x.v[ko..ko + d])
                    })
                    .collect();
                let (o, l) = softmax_row(&pairs, d);
                out[qo..qo + d].copy_from_slice(&o);
                lse[(bb * hq + h) * sq + i] = l;
            }
        }
    }
    (out, lse)
}

fn seeded(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(0xa0d1_7e57 ^ seed.wrapping_mul(0x9e37_79b9))
}

/// `n` values uniform in `[-1, 1)` rounded to `T`, as exact f64.
fn draw<T: Element>(r: &mut SmallRng, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| f64::from(T::from_f32(r.random_range(-1.0f32..1.0)).to_f32()))
        .collect()
}

fn tensors<T: Element>(r: &mut SmallRng, (b, sq, sk, hq, hkv, d): Dims) -> Tensors {
    Tensors {
        q: draw::<T>(r, b * sq * hq * d),
        k: draw::<T>(r, b * sk * hkv * d),
        v: draw::<T>(r, b * sk * hkv * d),
    }
}

fn cast<T: Element>(x: &[f64]) -> Vec<T> {
    x.iter().map(|&v| T::from_f32(v as f32)).collect()
}

fn widen<T: Element>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| f64::from(v.to_f32())).collect()
}

fn tol_of(dt: DType) -> f64 {
    match dt {
        DType::F32 => 3e-5,
        DType::F16 => 1.5e-3,
        _ => 1e-2,
    }
}

/// Compares `got` with the oracle: finite everywhere, oracle-empty rows (all 0) exactly 0,
/// relative L2 under `tol` overall and per row (plus `slack[row]`, the oracle's own
/// ambiguity, 0 unless given), LSE `-inf` exactly where the oracle's is, else within
/// `1e-4 (1 + |lse|)`.
fn verify_slack(
    what: &str,
    d: usize,
    tol: f64,
    (got, glse): (&[f64], &[f32]),
    (want, wlse): (&[f64], &[f64]),
    slack: Option<&[f64]>,
) {
    assert_eq!(got.len(), want.len(), "{what}: output length");
    assert_eq!(glse.len(), wlse.len(), "{what}: LSE length");
    assert!(
        got.iter().all(|x| x.is_finite()),
        "{what}: non-finite output"
    );
    let (mut err2, mut norm2) = (0.0, 0.0);
    for (row, (g, w)) in got.chunks(d).zip(want.chunks(d)).enumerate() {
        if w.iter().all(|&x| x == 0.0) {
            assert!(
                g.iter().all(|&x| x == 0.0),
                "{what}: row {row} not 0: {g:?}"
            );
        }
        let e: f64 = g.iter().zip(w).map(|(a, b)| (a - b).powi(2)).sum();
        let n: f64 = w.iter().map(|b| b * b).sum();
        let extra = slack.map_or(0.0, |s| s[row]);
        assert!(
            e.sqrt() <= 4.0 * tol * (n.sqrt() + 0.05) + extra,
            "{what}: row {row}: error {:e}, norm {:e}",
            e.sqrt(),
            n.sqrt()
        );
        err2 += e;
        norm2 += n;
    }
    if norm2 > 0.0 && slack.is_none() {
        let rel = (err2 / norm2).sqrt();
        assert!(rel <= tol, "{what}: relative L2 {rel:e} > {tol:e}");
    }
    for (n, (&g, &w)) in glse.iter().zip(wlse).enumerate() {
        if w == f64::NEG_INFINITY {
            assert_eq!(g, f32::NEG_INFINITY, "{what}: LSE {n} of an empty row");
        } else {
            assert!(
                g.is_finite() && (f64::from(g) - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what}: LSE {n} = {g}, want {w}"
            );
        }
    }
}

/// [`verify_slack`] without slack.
fn verify(what: &str, d: usize, tol: f64, got: (&[f64], &[f32]), want: (&[f64], &[f64])) {
    verify_slack(what, d, tol, got, want, None);
}

/// A validated dense problem of fixed lengths.
fn dense((b, sq, sk, hq, hkv, d): Dims, opts: &AttentionOptions) -> Result<FlashAttention, Error> {
    FlashAttention::new(
        &AttentionShape {
            batch: b,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            seqlens: SeqLens::Fixed {
                seqlen_q: sq,
                seqlen_k: sk,
            },
        },
        opts,
    )
}

fn contiguous((_, sq, sk, hq, hkv, d): Dims) -> (Strides, Strides) {
    (
        Strides::contiguous(sq, hq, d),
        Strides::contiguous(sk, hkv, d),
    )
}

/// Runs a dense-like CPU forward `f(q, k, v, out, lse)` on contiguous `T` buffers (output and
/// LSE poisoned): `(out [b, sq, hq, d], lse)`.
fn run_contiguous<T: Element>(
    x: &Tensors,
    dims: Dims,
    f: impl FnOnce(Strided<&[T]>, Strided<&[T]>, Strided<&[T]>, Strided<&mut [T]>, &mut [f32]),
) -> (Vec<f64>, Vec<f32>) {
    let (qs, ks) = contiguous(dims);
    let (q, k, v): (Vec<T>, Vec<T>, Vec<T>) = (cast(&x.q), cast(&x.k), cast(&x.v));
    let mut out = vec![T::from_f32(f32::NAN); x.q.len()];
    let mut lse = vec![f32::NAN; dims.0 * dims.3 * dims.1];
    f(
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
        Strided::new(&mut out[..], qs),
        &mut lse,
    );
    (widen(&out), lse)
}

/// `[0, a0, a0 + a1, ...]`.
fn offsets(lens: &[usize]) -> Vec<i32> {
    let mut v = vec![0i32];
    for &l in lens {
        v.push(v.last().unwrap() + l as i32);
    }
    v
}

fn is_stride_err<T>(r: Result<T, Error>) -> bool {
    matches!(r, Err(Error::Stride(_)))
}

// =======================================================================================
// Paged cache filled by the specification's mapping (not by the crate's append)
// =======================================================================================

/// Sequences of `lens[b]` tokens in pages of `ps` slots, placed by hand: token `t` of
/// sequence `b` in page `table[b][t / ps]`, slot `t % ps` (pages in random order, unused
/// slots and pages NaN). `k_val` / `v_val` hold what each token **means** (`code * scale`
/// for an FP8 cache with scales), `[s, hkv, d]` per sequence.
struct Pages<C> {
    lens: Vec<usize>,
    ps: usize,
    hkv: usize,
    d: usize,
    max_pages: usize,
    table: Vec<i32>,
    layout: PagedLayout,
    k_val: Vec<Vec<f64>>,
    v_val: Vec<Vec<f64>>,
    k: Vec<C>,
    v: Vec<C>,
    kmin: Vec<C>,
    kmax: Vec<C>,
    scales: Option<(Vec<f32>, Vec<f32>)>,
}

impl<C: Element> Pages<C> {
    /// Codes are `draw::<C>` values times `spread` (FP8: a wider range of codes), meaning
    /// `code * scale[g]` with `scales` (FP8 caches only), else the code itself.
    fn new(
        r: &mut SmallRng,
        lens: &[usize],
        ps: usize,
        (hkv, d): (usize, usize),
        spread: f32,
        scales: Option<(Vec<f32>, Vec<f32>)>,
    ) -> Self {
        let np: Vec<usize> = lens.iter().map(|l| l.div_ceil(ps)).collect();
        let max_pages = np.iter().copied().max().unwrap_or(0) + 1;
        let num_pages = np.iter().sum::<usize>() + 2;
        let mut ids: Vec<i32> = (0..num_pages as i32).collect();
        ids.shuffle(r);
        let mut table = vec![-1; lens.len() * max_pages];
        let mut it = ids.into_iter();
        for (b, &n) in np.iter().enumerate() {
            for lp in 0..n {
                table[b * max_pages + lp] = it.next().unwrap();
            }
        }
        let row = hkv * d;
        let nan = C::from_f32(f32::NAN);
        let mut p = Pages {
            lens: lens.to_vec(),
            ps,
            hkv,
            d,
            max_pages,
            table,
            layout: PagedLayout {
                num_pages,
                page_size: ps,
                heads_kv: hkv,
                head_dim: d,
            },
            k_val: Vec::new(),
            v_val: Vec::new(),
            k: vec![nan; num_pages * ps * row],
            v: vec![nan; num_pages * ps * row],
            kmin: vec![nan; num_pages * row],
            kmax: vec![nan; num_pages * row],
            scales,
        };
        for (b, &s) in lens.iter().enumerate() {
            let mut kv = [Vec::new(), Vec::new()];
            for (w, out) in kv.iter_mut().enumerate() {
                for t in 0..s {
                    for g in 0..hkv {
                        let scale = p.scales.as_ref().map_or(1.0, |sc| [&sc.0, &sc.1][w][g]);
                        for c in 0..d {
                            let code = C::from_f32(r.random_range(-1.0f32..1.0) * spread);
                            let at = p.at(b, t, g) + c;
                            [&mut p.k, &mut p.v][w][at] = code;
                            out.push(f64::from(code.to_f32()) * f64::from(scale));
                        }
                    }
                }
            }
            let [kv0, kv1] = kv;
            p.k_val.push(kv0);
            p.v_val.push(kv1);
            // Quest bounds: per-channel min / max of the stored codes of each page.
            for lp in 0..s.div_ceil(ps) {
                let page = p.table[b * max_pages + lp] as usize;
                for g in 0..hkv {
                    for c in 0..d {
                        let xs: Vec<f32> = (lp * ps..((lp + 1) * ps).min(s))
                            .map(|t| p.k[p.at(b, t, g) + c].to_f32())
                            .collect();
                        let m = (page * hkv + g) * d + c;
                        p.kmin[m] = C::from_f32(xs.iter().copied().fold(f32::INFINITY, f32::min));
                        p.kmax[m] =
                            C::from_f32(xs.iter().copied().fold(f32::NEG_INFINITY, f32::max));
                    }
                }
            }
        }
        p
    }

    /// Offset of (sequence `b`, token `t`, kv head `g`, channel 0) by the specification.
    fn at(&self, b: usize, t: usize, g: usize) -> usize {
        let page = self.table[b * self.max_pages + t / self.ps] as usize;
        ((page * self.ps + t % self.ps) * self.hkv + g) * self.d
    }

    fn cache_with(&self, lens: &[usize]) -> Result<PagedCache, Error> {
        let sl: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let c = PagedCache::new(
            self.layout,
            PageTable {
                block_table: &self.table,
                max_pages_per_seq: self.max_pages,
                seqlens_k: &sl,
            },
        )?;
        match &self.scales {
            Some((k, v)) => c.with_kv_scales(KvScales::new(k.clone(), v.clone())?),
            None => Ok(c),
        }
    }

    fn cache(&self) -> PagedCache {
        self.cache_with(&self.lens).unwrap()
    }

    fn pages(&self) -> KvPages<&[C]> {
        KvPages {
            k: &self.k[..],
            v: &self.v[..],
        }
    }

    fn meta(&self) -> PageMeta<&[C]> {
        PageMeta {
            kmin: &self.kmin[..],
            kmax: &self.kmax[..],
        }
    }

    /// The f64 attention of `lq[b]` query rows per sequence (packed `[total, hq, d]` in
    /// `q`) over the meaning of the cache: out packed like q, LSE `[hq, lq[b]]` per sequence
    /// concatenated (decode's `[batch, hq, q_len]` when the lengths are equal).
    fn attend(
        &self,
        q: &[f64],
        hq: usize,
        lq: &[usize],
        sc: Sc,
        sees: &dyn Fn(usize, usize, usize, usize) -> bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let (hkv, d) = (self.hkv, self.d);
        let (mut out, mut lse) = (Vec::new(), Vec::new());
        let mut q0 = 0;
        for (b, &n) in lq.iter().enumerate() {
            let x = Tensors {
                q: q[q0 * hq * d..(q0 + n) * hq * d].to_vec(),
                k: self.k_val[b].clone(),
                v: self.v_val[b].clone(),
            };
            let dims = (1, n, self.lens[b], hq, hkv, d);
            let (o, l) = attend(&x, dims, sc, &|_, h, i, j| sees(b, h, i, j));
            out.extend(o);
            lse.extend(l);
            q0 += n;
        }
        (out, lse)
    }
}

/// Runs `dec.forward_cpu` (queries and output in `T`, contiguous, poisoned output).
fn decode_cpu<T: Element, C: Element>(
    p: &Pages<C>,
    dec: &PagedDecode,
    q: &[f64],
) -> (Vec<f64>, Vec<f32>) {
    let qs = Strides::contiguous(dec.q_len(), dec.heads_q(), p.d);
    let qt: Vec<T> = cast(q);
    let mut out = vec![T::from_f32(f32::NAN); dec.out_len()];
    let mut lse = vec![f32::NAN; dec.lse_len()];
    dec.forward_cpu(
        Strided::new(&qt[..], qs),
        p.pages(),
        Some(p.meta()),
        Strided::new(&mut out[..], qs),
        Some(&mut lse),
    )
    .unwrap();
    (widen(&out), lse)
}

/// The decode mask of `m`: an unbounded right side becomes 0 (causal among the new tokens),
/// an explicit right bound is kept (then clipped by causal as usual).
fn decode_win(m: Win) -> Win {
    Win {
        hi: m.hi.max(0),
        ..m
    }
}

// =======================================================================================
// Decode: an explicit right bound without causal (docs "Extension: decode and an explicit
// right bound")
// =======================================================================================

fn decode_case<T: Element, C: Element>(
    p: &Pages<C>,
    q: &[f64],
    (hq, q_len): (usize, usize),
    (m, sc, splits): (Win, Sc, Option<usize>),
    what: &str,
) {
    let dm = decode_win(m);
    let lq = vec![q_len; p.lens.len()];
    let (want, wlse) = p.attend(q, hq, &lq, sc, &|b, _, i, j| {
        dm.shows(i, j, q_len, p.lens[b])
    });
    let dec = PagedDecode::new(&p.cache(), hq, q_len, &sc.apply(m.opts()))
        .unwrap()
        .with_splits(splits)
        .unwrap();
    let (got, glse) = decode_cpu::<T, C>(p, &dec, q);
    let what = format!("{what} {m:?} {sc:?} splits {splits:?}");
    verify(&what, p.d, tol_of(T::DTYPE), (&got, &glse), (&want, &wlse));
}

/// New token `i` also sees up to `r` new tokens after it (never past the last key), sinks
/// only up to the same bound; causal still clips `r` to 0 and an unbounded right side is 0.
/// Page sizes 1 to 16, sequences empty and shorter than `q_len` (rows before key 0 empty),
/// q_len up to 16, GQA, splits.
#[test]
fn decode_right_bound_without_causal() {
    let masks = [
        win(-1, 1, 0, false),
        win(0, 2, 0, false),
        win(3, 4, 2, false),
        win(-1, 20, 3, false),
        win(2, 1, 5, false),
        win(0, 0, 1, false),
        win(1, 3, 0, true),
        win(-1, -1, 2, false),
        win(4, -1, 0, true),
    ];
    let lens = [0usize, 1, 2, 3, 17, 40];
    let mut r = seeded(1);
    for (n, ps) in [1usize, 2, 5, 16].into_iter().enumerate() {
        let (hq, hkv, d) = [(2, 1, 8), (6, 3, 5), (4, 4, 16), (3, 1, 1)][n];
        let p = Pages::<f32>::new(&mut r, &lens, ps, (hkv, d), 1.0, None);
        for q_len in [1usize, 2, 5, 16] {
            let q = draw::<f32>(&mut r, lens.len() * q_len * hq * d);
            for (mi, &m) in masks.iter().enumerate() {
                let sc = if mi % 3 == 0 { any_sc(&mut r) } else { NO_CAP };
                let splits = [None, Some(1), Some(3)][mi % 3];
                let what = format!("decode r>0 ps {ps} q_len {q_len} hq {hq}/{hkv}");
                decode_case::<f32, f32>(&p, &q, (hq, q_len), (m, sc, splits), &what);
            }
        }
    }
    // Half-precision queries and caches, random right bounds.
    for n in 0..40u64 {
        let ps = r.random_range(1..=9);
        let lens: Vec<usize> = (0..r.random_range(1..=3))
            .map(|_| r.random_range(0..=30))
            .collect();
        let q_len = r.random_range(1..=16);
        let m = win(
            [-1, 0, 2, 7][r.random_range(0..4)],
            r.random_range(1..=18),
            r.random_range(0..=4),
            false,
        );
        let sc = any_sc(&mut r);
        let what = format!("decode r>0 sweep {n} ps {ps} lens {lens:?} q_len {q_len}");
        if n % 2 == 0 {
            let p = Pages::<bf16>::new(&mut r, &lens, ps, (2, 8), 1.0, None);
            let q = draw::<f16>(&mut r, lens.len() * q_len * 4 * 8);
            decode_case::<f16, bf16>(&p, &q, (4, q_len), (m, sc, Some(2)), &what);
        } else {
            let p = Pages::<f16>::new(&mut r, &lens, ps, (1, 8), 1.0, None);
            let q = draw::<bf16>(&mut r, lens.len() * q_len * 3 * 8);
            decode_case::<bf16, f16>(&p, &q, (3, q_len), (m, sc, None), &what);
        }
    }
}

// =======================================================================================
// Quest: sink pages and windowed candidates (docs "Decision: Quest GQA aggregation and ties")
// =======================================================================================

/// The documented selection of one (sequence, kv head): `(selected pages ascending, scores
/// per logical page (None: not a candidate), ambiguous)`; ambiguous when a score at the cut
/// is within f32 noise of the next one (then only the count and the kept pages are fixed).
fn quest_pick<C: Element>(
    p: &Pages<C>,
    q: &[f64],
    (hq, q_len): (usize, usize),
    (base, cfg): (Win, QuestConfig),
    (b, g): (usize, usize),
) -> (Vec<usize>, Vec<Option<f64>>, bool) {
    let (ps, d, hkv, sk) = (p.ps, p.d, p.hkv, p.lens[b]);
    let np = sk.div_ceil(ps);
    let group = hq / hkv;
    let kscale = p.scales.as_ref().map_or(1.0, |s| f64::from(s.0[g]));
    let score = |lp: usize| -> f64 {
        let page = p.table[b * p.max_pages + lp] as usize;
        let mo = (page * hkv + g) * d;
        let mut best = f64::NEG_INFINITY;
        for i in 0..q_len {
            for h in g * group..(g + 1) * group {
                let qo = ((b * q_len + i) * hq + h) * d;
                let s: f64 = (0..d)
                    .map(|c| {
                        let (lo, hi) = (p.kmin[mo + c].to_f32(), p.kmax[mo + c].to_f32());
                        (q[qo + c] * f64::from(hi)).max(q[qo + c] * f64::from(lo))
                    })
                    .sum();
                best = best.max(kscale * s);
            }
        }
        best
    };
    let cand: Vec<usize> = (0..np)
        .filter(|&lp| {
            (lp * ps..((lp + 1) * ps).min(sk))
                .any(|j| (0..q_len).any(|i| base.shows(i, j, q_len, sk)))
        })
        .collect();
    let mut scores = vec![None; np];
    for &lp in &cand {
        scores[lp] = Some(score(lp));
    }
    let newest = sk.checked_sub(1).map(|t| t / ps);
    let kept = |lp: usize| lp < cfg.sink_pages || Some(lp) == newest;
    let n_kept = cand.iter().filter(|&&lp| kept(lp)).count();
    let budget = (cfg.token_budget / ps).max(1);
    let k = budget.max(n_kept).min(cand.len());
    let mut order: Vec<(bool, f64, usize)> = cand
        .iter()
        .map(|&lp| (kept(lp), scores[lp].unwrap(), lp))
        .collect();
    order.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.total_cmp(&a.1)).then(a.2.cmp(&b.2)));
    let ambiguous = k > n_kept
        && k < order.len()
        && (order[k - 1].1 - order[k].1).abs() <= 1e-4 * (1.0 + order[k].1.abs());
    let mut sel: Vec<usize> = order[..k].iter().map(|x| x.2).collect();
    sel.sort_unstable();
    (sel, scores, ambiguous)
}

/// One decode under a per-head policy with Quest heads: the selection (pages and the
/// reported scores, `-inf` off the candidates) and the attention (base mask AND selected
/// page for Quest heads, base mask for Full heads).
fn quest_case<T: Element, C: Element>(
    p: &Pages<C>,
    q: &[f64],
    (hq, q_len): (usize, usize),
    (base, sc, heads, cfg): (Win, Sc, Vec<HeadPolicy>, QuestConfig),
    what: &str,
) {
    let (hkv, d, ps) = (p.hkv, p.d, p.ps);
    let what = format!("{what} {base:?} {cfg:?} {heads:?}");
    let policy = SparsePolicy {
        heads: heads.clone(),
        quest: cfg,
        ..SparsePolicy::default()
    };
    let dec = PagedDecode::new(&p.cache(), hq, q_len, &sc.apply(base.opts()))
        .unwrap()
        .with_policy(policy)
        .unwrap();
    let dm = decode_win(base);
    let qt: Vec<T> = cast(q);
    let sel = dec
        .select_cpu(
            Strided::new(&qt[..], Strides::contiguous(q_len, hq, d)),
            p.meta(),
        )
        .unwrap();
    let mut chosen = vec![Vec::new(); p.lens.len() * hkv];
    for b in 0..p.lens.len() {
        for g in (0..hkv).filter(|&g| heads[g] == HeadPolicy::Quest) {
            let (want, scores, ambiguous) = quest_pick(p, q, (hq, q_len), (dm, cfg), (b, g));
            let got: Vec<usize> = sel
                .pages
                .get(b, g)
                .unwrap()
                .iter()
                .map(|&x| x as usize)
                .collect();
            for (lp, s) in scores.iter().enumerate() {
                let gs = sel.scores[(b * hkv + g) * p.max_pages + lp];
                match s {
                    None => assert_eq!(gs, f32::NEG_INFINITY, "{what}: score ({b},{g},{lp})"),
                    Some(s) => assert!(
                        (f64::from(gs) - s).abs() <= 1e-4 * (1.0 + s.abs()),
                        "{what}: score ({b},{g},{lp}) {gs} vs {s}"
                    ),
                }
            }
            if ambiguous {
                assert_eq!(got.len(), want.len(), "{what}: count ({b},{g})");
            } else {
                assert_eq!(got, want, "{what}: pages of ({b},{g})");
            }
            chosen[b * hkv + g] = got;
        }
    }
    let lq = vec![q_len; p.lens.len()];
    let (want, wlse) = p.attend(q, hq, &lq, sc, &|b, h, i, j| {
        let g = h * hkv / hq;
        dm.shows(i, j, q_len, p.lens[b])
            && (heads[g] != HeadPolicy::Quest || chosen[b * hkv + g].contains(&(j / ps)))
    });
    let (got, glse) = decode_cpu::<T, C>(p, &dec, q);
    verify(&what, d, tol_of(T::DTYPE), (&got, &glse), (&want, &wlse));
}

/// Quest with `sink_pages` (kept beyond the budget) and windows / sinks in the base mask
/// (candidates only the pages with a visible key): hand-picked cases, then a random sweep.
#[test]
fn quest_sink_pages_and_windowed_candidates() {
    let mut r = seeded(2);
    let lens = [37usize, 1, 0, 12, 64];
    let (hq, hkv, d) = (4, 2, 8);
    let bases = [
        win(-1, -1, 0, false),
        win(9, 0, 0, false),
        win(5, -1, 4, true),
        win(20, 2, 0, false),
        win(0, 0, 1, false),
        win(3, 1, 9, false),
    ];
    for ps in [1usize, 4, 7] {
        let p = Pages::<f32>::new(&mut r, &lens, ps, (hkv, d), 1.0, None);
        for q_len in [1usize, 3] {
            let q = draw::<f32>(&mut r, lens.len() * q_len * hq * d);
            for (bi, &base) in bases.iter().enumerate() {
                for (token_budget, sink_pages) in [(0, 0), (0, 2), (8, 1), (16, 3), (1000, 2)] {
                    let heads = if bi % 2 == 0 {
                        vec![HeadPolicy::Quest; hkv]
                    } else {
                        vec![HeadPolicy::Full, HeadPolicy::Quest]
                    };
                    let cfg = QuestConfig {
                        token_budget,
                        sink_pages,
                    };
                    let what = format!("quest ps {ps} q_len {q_len}");
                    quest_case::<f32, f32>(&p, &q, (hq, q_len), (base, NO_CAP, heads, cfg), &what);
                }
            }
        }
    }
    for n in 0..120u64 {
        let ps = r.random_range(1..=8);
        let hkv = r.random_range(1..=3);
        let (hq, d) = (hkv * r.random_range(1..=2), [1, 4, 8][r.random_range(0..3)]);
        let lens: Vec<usize> = (0..r.random_range(1..=3))
            .map(|_| r.random_range(0..=60))
            .collect();
        let q_len = r.random_range(1..=6);
        let mut base = any_win(&mut r, 60);
        base.hi = [-1, 0, 1, 3][r.random_range(0..4)];
        let cfg = QuestConfig {
            token_budget: r.random_range(0..=80),
            sink_pages: r.random_range(0..=4),
        };
        let heads: Vec<HeadPolicy> = (0..hkv)
            .map(|_| [HeadPolicy::Quest, HeadPolicy::Full][usize::from(r.random_bool(0.3))])
            .collect();
        let sc = any_sc(&mut r);
        let p = Pages::<f32>::new(&mut r, &lens, ps, (hkv, d), 1.0, None);
        let q = draw::<f32>(&mut r, lens.len() * q_len * hq * d);
        let what = format!("quest sweep {n} ps {ps} lens {lens:?} q_len {q_len} hq {hq}/{hkv}");
        quest_case::<f32, f32>(&p, &q, (hq, q_len), (base, sc, heads, cfg), &what);
    }
}

// =======================================================================================
// FP8 e4m3 (docs "FP8 KV cache (e4m3) and its scales")
// =======================================================================================

/// The value of an e4m3 bit pattern, from the format: 1 sign, 4 exponent bits (bias 7), 3
/// mantissa bits, exponent 0 subnormal (`m * 2^-9`), `S.1111.111` NaN, no infinities.
fn e4m3_value(bits: u8) -> f64 {
    let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (i32::from((bits >> 3) & 15), f64::from(bits & 7));
    if e == 15 && m == 7.0 {
        return f64::NAN;
    }
    sign * if e == 0 {
        m * 2f64.powi(-9)
    } else {
        (1.0 + m / 8.0) * 2f64.powi(e - 7)
    }
}

/// The e4m3 code of `x`: the nearest finite value, ties to the even code; magnitudes of at
/// least 464 and infinities saturate to 448; NaN stays NaN and the sign (of -0 too) is kept.
fn e4m3_code(x: f64) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if x.is_nan() {
        return 0x7f | sign;
    }
    if a >= 464.0 {
        return 0x7e | sign;
    }
    let best = (0..=0x7eu8)
        .min_by(|&c, &e| {
            let (dc, de) = ((e4m3_value(c) - a).abs(), (e4m3_value(e) - a).abs());
            dc.total_cmp(&de).then((c & 1).cmp(&(e & 1)))
        })
        .unwrap();
    best | sign
}

fn e4m3_round(x: f64) -> f64 {
    e4m3_value(e4m3_code(x))
}

/// Every code decodes as the format says; `from_f32` rounds every code value, every midpoint
/// between neighbours, their f32 neighbours, the saturation edge, infinities, NaN, signed
/// zeros and random values of every magnitude as the format says (round to nearest even,
/// saturating).
#[test]
fn fp8_e4m3_conversions() {
    for bits in 0..=255u8 {
        let (got, want) = (F8E4M3::from_bits(bits).to_f32(), e4m3_value(bits));
        assert!(
            f64::from(got) == want || (got.is_nan() && want.is_nan()),
            "code {bits:#x}: {got} vs {want}"
        );
        assert_eq!(F8E4M3::from_bits(bits).is_nan(), want.is_nan());
    }
    let vals: Vec<f64> = (0..=0x7eu8).map(e4m3_value).collect();
    let mut xs: Vec<f32> = vals.iter().map(|&v| v as f32).collect();
    xs.extend(vals.windows(2).map(|w| ((w[0] + w[1]) / 2.0) as f32));
    xs.extend([
        448.0,
        463.99,
        464.0,
        465.0,
        480.0,
        1e30,
        f32::MAX,
        f32::INFINITY,
    ]);
    xs.extend([
        f32::MIN_POSITIVE,
        1e-45,
        2f32.powi(-10),
        2f32.powi(-10) * 1.0001,
    ]);
    let mut r = seeded(3);
    xs.extend((0..3000).map(|_| r.random_range(-1.0f32..1.0) * 2f32.powi(r.random_range(-12..10))));
    for x in xs {
        for y in [
            x,
            -x,
            f32::from_bits(x.to_bits() + 1),
            f32::from_bits(x.to_bits().max(1) - 1),
        ] {
            for z in [y, -y] {
                let got = F8E4M3::from_f32(z).to_bits();
                assert_eq!(got, e4m3_code(f64::from(z)), "from_f32({z:e})");
            }
        }
    }
    assert_eq!(F8E4M3::from_f32(f32::NAN).to_bits() & 0x7f, 0x7f);
    assert_eq!(F8E4M3::from_f32(-f32::NAN).to_bits(), 0xff);
    assert_eq!(F8E4M3::from_f32(-0.0).to_bits(), 0x80);
    assert_eq!(F8E4M3::from_f32(f32::NEG_INFINITY).to_bits(), 0xfe);
}

// =======================================================================================
// FP8 dense forward (docs "FP8 dense forward")
// =======================================================================================

/// Whether f32 noise on `p` could round it to a different e4m3 value.
fn fp8_ambiguous(p: f64) -> bool {
    e4m3_code(p * (1.0 + 1e-5)) != e4m3_code(p * (1.0 - 1e-5))
}

/// The FP8 definition in f64 over codes: scores `scale * qd * kd * (q . k)` (softcap
/// after), keys in tiles of `FP8_KEY_TILE` from key 0, per tile the running max `m`, `p =
/// exp(s - m)` summed unquantised into `l`, `e4m3(p) * v` into `acc`; `o = acc * vd / l`,
/// `lse = m + ln l`. Also returns per row the output change that a one-step e4m3 rounding
/// difference of the near-midpoint `p` could make (f32 `p` may round the other way).
fn fp8_attend(
    x: &Tensors,
    (b, sq, sk, hq, hkv, d): Dims,
    (qd, kd, vd): (&[f32], &[f32], &[f32]),
    sc: Sc,
    sees: &dyn Fn(usize, usize, usize) -> bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; b * sq * hq * d];
    let mut lse = vec![f64::NEG_INFINITY; b * hq * sq];
    let mut slack = vec![0.0; b * sq * hq];
    for bb in 0..b {
        for h in 0..hq {
            let at = bb * hkv + h * hkv / hq;
            let g = h * hkv / hq;
            let qk = f64::from(qd[at]) * f64::from(kd[at]);
            for i in 0..sq {
                let qo = ((bb * sq + i) * hq + h) * d;
                let (mut m, mut l, mut acc, mut amb) = (f64::NEG_INFINITY, 0.0, vec![0.0; d], 0.0);
                for tile in (0..sk).step_by(FP8_KEY_TILE) {
                    let js: Vec<usize> = (tile..(tile + FP8_KEY_TILE).min(sk))
                        .filter(|&j| sees(h, i, j))
                        .collect();
                    if js.is_empty() {
                        continue;
                    }
                    let ko = |j: usize| ((bb * sk + j) * hkv + g) * d;
                    let s: Vec<f64> = js
                        .iter()
                        .map(|&j| {
                            let raw = dot(&x.q[qo..qo + d], &x.k[ko(j)..ko(j) + d]);
                            sc.score(d, qk * raw)
                        })
                        .collect();
                    let mt = s.iter().copied().fold(m, f64::max);
                    let decay = (m - mt).exp();
                    l *= decay;
                    amb *= decay;
                    acc.iter_mut().for_each(|a| *a *= decay);
                    for (&j, &sj) in js.iter().zip(&s) {
                        let p = (sj - mt).exp();
                        l += p;
                        let v = &x.v[ko(j)..ko(j) + d];
                        let p8 = e4m3_round(p);
                        acc.iter_mut().zip(v).for_each(|(a, vc)| *a += p8 * vc);
                        if fp8_ambiguous(p) {
                            amb += p / 8.0 * dot(v, v).sqrt();
                        }
                    }
                    m = mt;
                }
                if l > 0.0 {
                    let v = f64::from(vd[at]);
                    for c in 0..d {
                        out[qo + c] = acc[c] * v / l;
                    }
                    lse[(bb * hq + h) * sq + i] = m + l.ln();
                    slack[(bb * sq + i) * hq + h] = amb * v / l;
                }
            }
        }
    }
    (out, lse, slack)
}

/// Random e4m3 codes, values in `[-spread, spread)`, as exact f64.
fn codes(r: &mut SmallRng, n: usize, spread: f32) -> Vec<f64> {
    (0..n)
        .map(|_| f64::from(F8E4M3::from_f32(r.random_range(-spread..spread)).to_f32()))
        .collect()
}

/// `attn.forward_cpu_fp8` over the codes of `x` (strides `[q, k, v, out]`, descales `[q, k,
/// v]`) into a NaN-poisoned `O` output of `out_len` elements: `(out, lse)`.
fn fp8_forward<O: Element>(
    attn: &FlashAttention,
    x: &Tensors,
    [qs, ks, vs, os]: [Strides; 4],
    [dq, dk, dv]: [&[f32]; 3],
    out_len: usize,
) -> Result<(Vec<f64>, Vec<f32>), Error> {
    let (q, k, v): (Vec<F8E4M3>, Vec<F8E4M3>, Vec<F8E4M3>) = (cast(&x.q), cast(&x.k), cast(&x.v));
    let mut out = vec![O::from_f32(f32::NAN); out_len];
    let mut lse = vec![f32::NAN; attn.lse_len()];
    attn.forward_cpu_fp8(
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], vs),
        Fp8Descales {
            q: dq,
            k: dk,
            v: dv,
        },
        Strided::new(&mut out[..], os),
        Some(&mut lse),
    )?;
    Ok((widen(&out), lse))
}

fn fp8_case<O: Element>(r: &mut SmallRng, dims: Dims, m: Win, sc: Sc, what: &str) {
    let (b, sq, sk, hq, hkv, d) = dims;
    let x = Tensors {
        q: codes(r, b * sq * hq * d, 4.0),
        k: codes(r, b * sk * hkv * d, 4.0),
        v: codes(r, b * sk * hkv * d, 4.0),
    };
    let desc = |r: &mut SmallRng, lo: f32, hi: f32| -> Vec<f32> {
        (0..b * hkv).map(|_| r.random_range(lo..hi)).collect()
    };
    let (qd, kd, vd) = (desc(r, 0.05, 0.5), desc(r, 0.05, 0.5), desc(r, 0.1, 2.0));
    let (want, wlse, slack) = fp8_attend(&x, dims, (&qd, &kd, &vd), sc, &|_, i, j| {
        m.shows(i, j, sq, sk)
    });
    let attn = dense(dims, &sc.apply(m.opts())).unwrap();
    let (qs, ks) = contiguous(dims);
    let (got, lse) =
        fp8_forward::<O>(&attn, &x, [qs, ks, ks, qs], [&qd, &kd, &vd], x.q.len()).unwrap();
    let what = format!("{what} {:?} {dims:?} {m:?} {sc:?}", O::DTYPE);
    // Rounding the output to O is within its tolerance of each row's norm.
    let slack: Vec<f64> = slack.iter().map(|s| s * 1.01).collect();
    verify_slack(
        &what,
        d,
        tol_of(O::DTYPE),
        (&got, &lse),
        (&want, &wlse),
        Some(&slack),
    );
    // Without near-midpoint P values the whole output is within the tolerance as well.
    if slack.iter().all(|&s| s == 0.0) {
        verify(&what, d, tol_of(O::DTYPE), (&got, &lse), (&want, &wlse));
    }
}

/// The FP8 forward against the f64 definition: no key, lengths crossing the 128-key tiles (1, 2,
/// 127, 128, 129, 300), `sq != sk`, every kind of mask (rows before key 0 and rows whose
/// keys all lie in a later tile included), GQA, softcap, descales per (batch, kv head), bf16
/// and f16 output.
#[test]
fn fp8_dense_forward() {
    let mut r = seeded(4);
    let shapes = [
        (1, 1, 1, 1, 1, 8),
        (2, 2, 2, 4, 2, 16),
        (1, 3, 0, 2, 1, 8),
        (1, 3, 129, 2, 1, 8),
        (2, 130, 128, 2, 2, 4),
        (1, 40, 300, 3, 1, 16),
        (1, 300, 127, 1, 1, 3),
        (2, 7, 257, 4, 1, 8),
    ];
    let masks = [
        win(-1, -1, 0, false),
        win(-1, -1, 0, true),
        win(0, 0, 0, false),
        win(130, 0, 2, false),
        win(5, 140, 0, false),
        win(1, -1, 129, true),
    ];
    for (n, &dims) in shapes.iter().enumerate() {
        for (mi, &m) in masks.iter().enumerate() {
            let sc = if (n + mi) % 3 == 0 {
                any_sc(&mut r)
            } else {
                NO_CAP
            };
            if (n + mi) % 2 == 0 {
                fp8_case::<bf16>(&mut r, dims, m, sc, "fp8 dense");
            } else {
                fp8_case::<f16>(&mut r, dims, m, sc, "fp8 dense");
            }
        }
    }
    for n in 0..30 {
        let dims = (
            r.random_range(1..=2),
            r.random_range(1..=40),
            r.random_range(0..=200),
            2,
            1,
            [1, 5, 8][n % 3],
        );
        let m = any_win(&mut r, 200);
        let sc = any_sc(&mut r);
        fp8_case::<bf16>(&mut r, dims, m, sc, &format!("fp8 dense sweep {n}"));
    }
}

/// NaN codes under the NaN policy: a NaN in a query row makes that row (and only it) NaN,
/// output and LSE; a NaN key hidden from every other row changes nothing there.
#[test]
fn fp8_dense_nan_codes() {
    let dims = (1, 6, 6, 2, 1, 8);
    let mut r = seeded(5);
    let mut x = Tensors {
        q: codes(&mut r, 6 * 2 * 8, 2.0),
        k: codes(&mut r, 6 * 8, 2.0),
        v: codes(&mut r, 6 * 8, 2.0),
    };
    let ones = [1.0f32];
    let causal = win(-1, -1, 0, true);
    let (want, wlse, _) = fp8_attend(&x, dims, (&ones, &ones, &ones), NO_CAP, &|_, i, j| {
        causal.shows(i, j, 6, 6)
    });
    x.q[3] = f64::NAN; // row 0, head 0
    x.k[5 * 8 + 2] = f64::NAN; // key 5: visible to row 5 only
    let attn = dense(dims, &causal.opts()).unwrap();
    let (qs, ks) = contiguous(dims);
    let st = [qs, ks, ks, qs];
    let (got, lse) = fp8_forward::<bf16>(&attn, &x, st, [&ones; 3], x.q.len()).unwrap();
    for i in 0..6 {
        for h in 0..2 {
            let o = (i * 2 + h) * 8;
            let (row, l) = (&got[o..o + 8], lse[h * 6 + i]);
            if (i, h) == (0, 0) || i == 5 {
                assert!(
                    row.iter().all(|x| x.is_nan()) && l.is_nan(),
                    "row {i} head {h}"
                );
            } else {
                let what = format!("fp8 NaN policy row {i} head {h}");
                let wl = [wlse[h * 6 + i]];
                verify(&what, 8, 1e-2, (row, &[l]), (&want[o..o + 8], &wl));
            }
        }
    }
}

// =======================================================================================
// FP8 paged cache: append, Quest bounds, decode and prefill with scales
// =======================================================================================

/// Appends `T` tokens into an FP8 cache in two steps (a random prefix, then the rest) and
/// checks every stored code against `e4m3(f32(x) / scale)` (f32 division; one head's scale
/// small enough to saturate) and the Quest bounds against the min / max of the stored values
/// of each page's filled slots. Without scales the scale is 1.
fn fp8_append_case<T: Element>(r: &mut SmallRng, lens: &[usize], ps: usize, with_scales: bool) {
    let (hkv, d) = (3, 5);
    let row = hkv * d;
    let np: Vec<usize> = lens.iter().map(|l| l.div_ceil(ps)).collect();
    let max_pages = np.iter().copied().max().unwrap_or(0).max(1);
    let num_pages = np.iter().sum::<usize>() + 1;
    let mut ids: Vec<i32> = (0..num_pages as i32).collect();
    ids.shuffle(r);
    let mut table = vec![-1i32; lens.len() * max_pages];
    let mut it = ids.into_iter();
    for (b, &n) in np.iter().enumerate() {
        for lp in 0..n {
            table[b * max_pages + lp] = it.next().unwrap();
        }
    }
    let scales = (vec![0.01f32, 0.0021, 1.0], vec![0.03f32, 0.5, 0.0017]);
    let (ks, vs) = if with_scales {
        scales.clone()
    } else {
        (vec![1.0; hkv], vec![1.0; hkv])
    };
    let layout = PagedLayout {
        num_pages,
        page_size: ps,
        heads_kv: hkv,
        head_dim: d,
    };
    let toks: Vec<[Vec<f64>; 2]> = lens
        .iter()
        .map(|&s| [draw::<T>(r, s * row), draw::<T>(r, s * row)])
        .collect();
    let nan = F8E4M3::from_bits(0x7f);
    let (mut kc, mut vc) = (
        vec![nan; num_pages * ps * row],
        vec![nan; num_pages * ps * row],
    );
    let (mut kmin, mut kmax) = (vec![nan; num_pages * row], vec![nan; num_pages * row]);
    let cut: Vec<usize> = lens.iter().map(|&s| r.random_range(0..=s)).collect();
    for (from, to) in [(vec![0; lens.len()], cut.clone()), (cut, lens.to_vec())] {
        let sl: Vec<i32> = to.iter().map(|&l| l as i32).collect();
        let mut cache = PagedCache::new(
            layout,
            PageTable {
                block_table: &table,
                max_pages_per_seq: max_pages,
                seqlens_k: &sl,
            },
        )
        .unwrap();
        if with_scales {
            cache = cache
                .with_kv_scales(KvScales::new(scales.0.clone(), scales.1.clone()).unwrap())
                .unwrap();
        }
        let n: Vec<usize> = from.iter().zip(&to).map(|(a, b)| b - a).collect();
        let new = |w: usize| -> Vec<T> {
            (0..lens.len())
                .flat_map(|b| cast::<T>(&toks[b][w][from[b] * row..to[b] * row]))
                .collect()
        };
        let (kn, vn) = (new(0), new(1));
        let st = Strides::contiguous(0, hkv, d);
        cache
            .append_cpu(
                &offsets(&n),
                Strided::new(&kn[..], st),
                Strided::new(&vn[..], st),
                KvPages {
                    k: &mut kc[..],
                    v: &mut vc[..],
                },
                Some(PageMeta {
                    kmin: &mut kmin[..],
                    kmax: &mut kmax[..],
                }),
            )
            .unwrap();
    }
    let what = format!(
        "fp8 append {:?} ps {ps} lens {lens:?} scales {with_scales}",
        T::DTYPE
    );
    for (b, &s) in lens.iter().enumerate() {
        for t in 0..s {
            let page = table[b * max_pages + t / ps] as usize;
            for g in 0..hkv {
                let at = ((page * ps + t % ps) * hkv + g) * d;
                for c in 0..d {
                    let x = |w: usize| toks[b][w][(t * hkv + g) * d + c] as f32;
                    let want_k = e4m3_code(f64::from(x(0) / ks[g]));
                    let want_v = e4m3_code(f64::from(x(1) / vs[g]));
                    assert_eq!(kc[at + c].to_bits(), want_k, "{what}: k ({b},{t},{g},{c})");
                    assert_eq!(vc[at + c].to_bits(), want_v, "{what}: v ({b},{t},{g},{c})");
                }
            }
        }
        for lp in 0..s.div_ceil(ps) {
            let page = table[b * max_pages + lp] as usize;
            for g in 0..hkv {
                for c in 0..d {
                    let xs: Vec<f64> = (lp * ps..((lp + 1) * ps).min(s))
                        .map(|t| e4m3_value(kc[((page * ps + t % ps) * hkv + g) * d + c].to_bits()))
                        .collect();
                    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let m = (page * hkv + g) * d + c;
                    assert_eq!(
                        (f64::from(kmin[m].to_f32()), f64::from(kmax[m].to_f32())),
                        (lo, hi),
                        "{what}: bounds of page {lp} of {b}, head {g}, channel {c}"
                    );
                }
            }
        }
    }
}

#[test]
fn fp8_cache_append_quantisation() {
    let mut r = seeded(6);
    for ps in [1usize, 3, 8] {
        for scales in [true, false] {
            fp8_append_case::<f32>(&mut r, &[5, 0, 17, 1], ps, scales);
            fp8_append_case::<bf16>(&mut r, &[9, 2], ps, scales);
            fp8_append_case::<f16>(&mut r, &[0, 12], ps, scales);
        }
    }
}

/// Decode, Quest (scores are `k_scale * sum_c max(q_c kmax_c, q_c kmin_c)` over the stored
/// codes) and paged prefill over an FP8 cache == attention over `code * scale`.
#[test]
fn fp8_cache_decode_quest_prefill() {
    let mut r = seeded(7);
    for n in 0..30u64 {
        let ps = r.random_range(1..=9);
        let hkv = r.random_range(1..=3);
        let (hq, d) = (hkv * r.random_range(1..=2), [3, 8][r.random_range(0..2)]);
        let lens: Vec<usize> = (0..r.random_range(1..=3))
            .map(|_| r.random_range(0..=40))
            .collect();
        let scales = match n % 3 {
            0 => None,
            _ => Some((
                (0..hkv).map(|_| r.random_range(0.01f32..0.2)).collect(),
                (0..hkv).map(|_| r.random_range(0.01f32..0.2)).collect(),
            )),
        };
        let p = Pages::<F8E4M3>::new(&mut r, &lens, ps, (hkv, d), 12.0, scales);
        let q_len = r.random_range(1..=5);
        let sc = any_sc(&mut r);
        let what = format!("fp8 cache {n} ps {ps} lens {lens:?} hq {hq}/{hkv} q_len {q_len}");
        let mut m = any_win(&mut r, 40);
        m.hi = [-1, 0, 2][r.random_range(0..3)];
        let q = draw::<f32>(&mut r, lens.len() * q_len * hq * d);
        decode_case::<f32, F8E4M3>(&p, &q, (hq, q_len), (m, sc, Some(2)), &what);
        let qh = draw::<bf16>(&mut r, lens.len() * q_len * hq * d);
        let cfg = QuestConfig {
            token_budget: r.random_range(0..=30),
            sink_pages: r.random_range(0..=2),
        };
        let heads = vec![HeadPolicy::Quest; hkv];
        quest_case::<bf16, F8E4M3>(&p, &qh, (hq, q_len), (m, sc, heads, cfg), &what);
        // Prefill: dense semantics over the gathered tokens, packed rows per sequence.
        let lq: Vec<usize> = lens.iter().map(|_| r.random_range(0..=6)).collect();
        if lq.iter().sum::<usize>() > 0 {
            let m = any_win(&mut r, 40);
            let q = draw::<f16>(&mut r, lq.iter().sum::<usize>() * hq * d);
            prefill_case::<f16, F8E4M3>(&p, &q, hq, &lq, (m, sc), &what);
        }
    }
}

/// Per-sequence LSE blocks `[hq, lq[b]]` (concatenated) as one varlen LSE `[hq, total_q]`.
fn pack_lse(blocks: &[f64], lq: &[usize], hq: usize) -> Vec<f64> {
    let total: usize = lq.iter().sum();
    let mut packed = vec![f64::NAN; hq * total];
    let (mut q0, mut at) = (0, 0);
    for &n in lq {
        for h in 0..hq {
            packed[h * total + q0..h * total + q0 + n].copy_from_slice(&blocks[at..at + n]);
            at += n;
        }
        q0 += n;
    }
    packed
}

/// Paged prefill (varlen, `lq[b]` rows of sequence `b`, LSE `[hq, total_q]`) == dense
/// attention of the last `lq[b]` positions over the cache's meaning.
fn prefill_case<T: Element, C: Element>(
    p: &Pages<C>,
    q: &[f64],
    hq: usize,
    lq: &[usize],
    (m, sc): (Win, Sc),
    what: &str,
) {
    let d = p.d;
    let (want, wlse) = p.attend(q, hq, lq, sc, &|b, _, i, j| m.shows(i, j, lq[b], p.lens[b]));
    let packed = pack_lse(&wlse, lq, hq);
    let pre = PagedPrefill::new_varlen(&p.cache(), hq, &offsets(lq), &sc.apply(m.opts())).unwrap();
    let qs = Strides::contiguous(0, hq, d);
    let qt: Vec<T> = cast(q);
    let mut out = vec![T::from_f32(f32::NAN); pre.out_len()];
    let mut lse = vec![f32::NAN; pre.lse_len()];
    pre.forward_cpu(
        Strided::new(&qt[..], qs),
        p.pages(),
        Strided::new(&mut out[..], qs),
        Some(&mut lse),
    )
    .unwrap();
    let what = format!("{what} prefill {lq:?} {m:?}");
    let got = widen(&out);
    verify(&what, d, tol_of(T::DTYPE), (&got, &lse), (&want, &packed));
}

/// Scales out of their domain, of the wrong length, or on a cache that is not FP8 are
/// errors (at construction, or at append / decode / select / prefill time for the type).
#[test]
fn fp8_cache_scale_probes() {
    let max = f32::MAX / 448.0;
    for (k, v) in [
        (vec![], vec![]),
        (vec![1.0], vec![1.0, 1.0]),
        (vec![0.0], vec![1.0]),
        (vec![1.0], vec![-1.0]),
        (vec![f32::NAN], vec![1.0]),
        (vec![f32::INFINITY], vec![1.0]),
        (vec![1.0], vec![max * 1.001]),
    ] {
        assert!(KvScales::new(k.clone(), v.clone()).is_err(), "{k:?} {v:?}");
    }
    assert!(KvScales::new(vec![max], vec![f32::MIN_POSITIVE]).is_ok());
    assert!(KvScales::uniform(usize::MAX, 1.0, 1.0).is_err());
    assert!(KvScales::uniform(2, 0.0, 1.0).is_err());
    let mut r = seeded(8);
    let p = Pages::<f32>::new(&mut r, &[5, 3], 2, (2, 4), 1.0, None);
    let cache = p.cache();
    assert!(
        cache
            .clone()
            .with_kv_scales(KvScales::uniform(3, 1.0, 1.0).unwrap())
            .is_err()
    );
    let scaled = cache
        .with_kv_scales(KvScales::uniform(2, 0.5, 0.5).unwrap())
        .unwrap();
    let q = [0.5f32; 2 * 2 * 4];
    let qs = Strides::contiguous(1, 2, 4);
    let dec = PagedDecode::new(&scaled, 2, 1, &AttentionOptions::default()).unwrap();
    let mut out = vec![0.0f32; q.len()];
    let opt = |e: Result<(), Error>| matches!(e, Err(Error::InvalidOption(_)));
    assert!(opt(dec.forward_cpu(
        Strided::new(&q[..], qs),
        p.pages(),
        None,
        Strided::new(&mut out[..], qs),
        None,
    )));
    let quest = dec
        .clone()
        .with_policy(SparsePolicy::uniform(2, HeadPolicy::Quest))
        .unwrap();
    assert!(matches!(
        quest.select_cpu(Strided::new(&q[..], qs), p.meta()),
        Err(Error::InvalidOption(_))
    ));
    let pre = PagedPrefill::new(&scaled, 2, 1, &AttentionOptions::default()).unwrap();
    assert!(opt(pre.forward_cpu(
        Strided::new(&q[..], qs),
        p.pages(),
        Strided::new(&mut out[..], qs),
        None,
    )));
    let (mut k, mut v) = (p.k.clone(), p.v.clone());
    let new = [0.25f32; 2 * 4];
    let sl = [5i32, 3];
    let grown = PagedCache::new(
        p.layout,
        PageTable {
            block_table: &p.table,
            max_pages_per_seq: p.max_pages,
            seqlens_k: &sl,
        },
    )
    .unwrap()
    .with_kv_scales(KvScales::uniform(2, 0.5, 0.5).unwrap())
    .unwrap();
    assert!(opt(grown.append_cpu(
        &[0, 1, 1],
        Strided::new(&new[..], Strides::contiguous(0, 2, 4)),
        Strided::new(&new[..], Strides::contiguous(0, 2, 4)),
        KvPages {
            k: &mut k[..],
            v: &mut v[..],
        },
        None::<PageMeta<&mut [f32]>>,
    )));
}

// =======================================================================================
// Strides (docs "Extension: strides"): 0 broadcasts an input, negative is a Stride error
// =======================================================================================

/// Broadcast inputs through stride 0: one query for every batch entry (batch stride 0), one
/// key shared by both kv heads (head stride 0), one value row for every key (seq stride 0),
/// against the oracle over the explicitly repeated tensors; the same in the FP8 forward,
/// paged decode (one query for every sequence and head), prefill and append (one key vector
/// for every kv head). An output with stride 0 on an axis longer than 1 aliases itself: a
/// `Stride` error.
#[test]
fn zero_strides_broadcast() {
    let mut r = seeded(9);
    let (b, sq, sk, hq, hkv, d) = (3, 5, 7, 4, 2, 8);
    let dims = (b, sq, sk, hq, hkv, d);
    let qb = draw::<f32>(&mut r, sq * hq * d); // [sq, hq, d], batch stride 0
    let kb = draw::<f32>(&mut r, b * sk * d); // [b, sk, d], head stride 0
    let vb = draw::<f32>(&mut r, b * hkv * d); // [b, hkv, d], seq stride 0
    let mut x = Tensors {
        q: Vec::new(),
        k: Vec::new(),
        v: Vec::new(),
    };
    for bb in 0..b {
        x.q.extend_from_slice(&qb);
        for j in 0..sk {
            for _ in 0..hkv {
                x.k.extend_from_slice(&kb[(bb * sk + j) * d..][..d]);
            }
            x.v.extend_from_slice(&vb[bb * hkv * d..][..hkv * d]);
        }
    }
    let qs = Strides {
        batch: 0,
        seq: (hq * d) as i64,
        head: d as i64,
    };
    let ks = Strides {
        batch: (sk * d) as i64,
        seq: d as i64,
        head: 0,
    };
    let vs = Strides {
        batch: (hkv * d) as i64,
        seq: 0,
        head: d as i64,
    };
    let m = win(2, 1, 1, false);
    let (want, wlse) = attend(&x, dims, NO_CAP, &|_, _, i, j| m.shows(i, j, sq, sk));
    let attn = dense(dims, &m.opts()).unwrap();
    let os = Strides::contiguous(sq, hq, d);
    let (qf, kf, vf): (Vec<f32>, Vec<f32>, Vec<f32>) = (cast(&qb), cast(&kb), cast(&vb));
    let mut out = vec![f32::NAN; b * sq * hq * d];
    let mut lse = vec![f32::NAN; attn.lse_len()];
    attn.forward_cpu(
        Strided::new(&qf[..], qs),
        Strided::new(&kf[..], ks),
        Strided::new(&vf[..], vs),
        Strided::new(&mut out[..], os),
        Some(&mut lse),
    )
    .unwrap();
    let got = widen(&out);
    verify("dense broadcast", d, 3e-5, (&got, &lse), (&want, &wlse));
    // The output may not alias itself: stride 0 on the batch, seq or head axis.
    for bad in [
        Strides { batch: 0, ..os },
        Strides { seq: 0, ..os },
        Strides { head: 0, ..os },
        Strides { seq: 3, ..os },
    ] {
        let res = attn.forward_cpu(
            Strided::new(&qf[..], qs),
            Strided::new(&kf[..], ks),
            Strided::new(&vf[..], vs),
            Strided::new(&mut out[..], bad),
            None,
        );
        assert!(is_stride_err(res), "dense output strides {bad:?}");
    }
    // FP8: the same broadcast of codes.
    let c = |v: &[f64]| -> Vec<f64> { v.iter().map(|&x| e4m3_round(x * 4.0)).collect() };
    let x8 = Tensors {
        q: c(&x.q),
        k: c(&x.k),
        v: c(&x.v),
    };
    let compact = Tensors {
        q: c(&qb),
        k: c(&kb),
        v: c(&vb),
    };
    let ones = vec![0.25f32; b * hkv];
    let (want, wlse, slack) = fp8_attend(&x8, dims, (&ones, &ones, &ones), NO_CAP, &|_, i, j| {
        m.shows(i, j, sq, sk)
    });
    let n = b * sq * hq * d;
    let (got, lse) = fp8_forward::<bf16>(&attn, &compact, [qs, ks, vs, os], [&ones; 3], n).unwrap();
    let slack: Vec<f64> = slack.iter().map(|s| s * 1.01).collect();
    verify_slack(
        "fp8 broadcast",
        d,
        1e-2,
        (&got, &lse),
        (&want, &wlse),
        Some(&slack),
    );
    let aliased = [qs, ks, vs, Strides { seq: 0, ..os }];
    let res = fp8_forward::<bf16>(&attn, &compact, aliased, [&ones; 3], n);
    assert!(is_stride_err(res), "fp8 output stride 0");

    // Paged decode and prefill: one query vector for every sequence, row and head.
    let lens = [6usize, 0, 11];
    let p = Pages::<f32>::new(&mut r, &lens, 4, (2, d), 1.0, None);
    let one = draw::<f32>(&mut r, d);
    let q_len = 3;
    let q_all: Vec<f64> = (0..lens.len() * q_len * hq)
        .flat_map(|_| one.clone())
        .collect();
    let bq = Strides {
        batch: 0,
        seq: 0,
        head: 0,
    };
    let qf: Vec<f32> = cast(&one);
    let dec = PagedDecode::new(&p.cache(), hq, q_len, &AttentionOptions::default()).unwrap();
    let dm = decode_win(win(-1, -1, 0, false));
    let lq = vec![q_len; lens.len()];
    let (want, wlse) = p.attend(&q_all, hq, &lq, NO_CAP, &|b, _, i, j| {
        dm.shows(i, j, q_len, lens[b])
    });
    let dos = Strides::contiguous(q_len, hq, d);
    let mut out = vec![f32::NAN; dec.out_len()];
    let mut lse = vec![f32::NAN; dec.lse_len()];
    dec.forward_cpu(
        Strided::new(&qf[..], bq),
        p.pages(),
        None,
        Strided::new(&mut out[..], dos),
        Some(&mut lse),
    )
    .unwrap();
    let got = widen(&out);
    verify("decode broadcast", d, 3e-5, (&got, &lse), (&want, &wlse));
    let res = dec.forward_cpu(
        Strided::new(&qf[..], bq),
        p.pages(),
        None,
        Strided::new(&mut out[..], Strides { head: 0, ..dos }),
        None,
    );
    assert!(is_stride_err(res), "decode output head stride 0");
    let pre = PagedPrefill::new(&p.cache(), hq, q_len, &AttentionOptions::causal()).unwrap();
    let causal = win(-1, -1, 0, true);
    let (want, wlse) = p.attend(&q_all, hq, &lq, NO_CAP, &|b, _, i, j| {
        causal.shows(i, j, q_len, lens[b])
    });
    pre.forward_cpu(
        Strided::new(&qf[..], bq),
        p.pages(),
        Strided::new(&mut out[..], dos),
        Some(&mut lse),
    )
    .unwrap();
    let got = widen(&out);
    verify("prefill broadcast", d, 3e-5, (&got, &lse), (&want, &wlse));
    let res = pre.forward_cpu(
        Strided::new(&qf[..], bq),
        p.pages(),
        Strided::new(&mut out[..], Strides { batch: 0, ..dos }),
        None,
    );
    assert!(is_stride_err(res), "prefill output batch stride 0");

    // Append: one key / value vector for both kv heads of each new token.
    let (ps, hkv) = (3, 2);
    let sl = [4i32];
    let layout = PagedLayout {
        num_pages: 2,
        page_size: ps,
        heads_kv: hkv,
        head_dim: d,
    };
    let cache = PagedCache::new(
        layout,
        PageTable {
            block_table: &[1, 0],
            max_pages_per_seq: 2,
            seqlens_k: &sl,
        },
    )
    .unwrap();
    let kn = draw::<f32>(&mut r, 4 * d);
    let knf: Vec<f32> = cast(&kn);
    let st = Strides {
        batch: 0,
        seq: d as i64,
        head: 0,
    };
    let (mut k, mut v) = (
        vec![f32::NAN; layout.cache_len()],
        vec![f32::NAN; layout.cache_len()],
    );
    cache
        .append_cpu(
            &[0, 4],
            Strided::new(&knf[..], st),
            Strided::new(&knf[..], st),
            KvPages {
                k: &mut k[..],
                v: &mut v[..],
            },
            None::<PageMeta<&mut [f32]>>,
        )
        .unwrap();
    for t in 0..4 {
        let page = [1, 0][t / ps];
        for g in 0..hkv {
            let at = ((page * ps + t % ps) * hkv + g) * d;
            assert_eq!(
                widen(&k[at..at + d]),
                kn[t * d..(t + 1) * d],
                "append k ({t},{g})"
            );
            assert_eq!(
                widen(&v[at..at + d]),
                kn[t * d..(t + 1) * d],
                "append v ({t},{g})"
            );
        }
    }
}

/// `s` with its `axis` (0 batch, 1 seq, 2 head) stride negated (made -1 when 0).
fn negate(s: Strides, axis: usize) -> Strides {
    let n = |x: i64| if x == 0 { -1 } else { -x };
    match axis {
        0 => Strides {
            batch: n(s.batch),
            ..s
        },
        1 => Strides { seq: n(s.seq), ..s },
        _ => Strides {
            head: n(s.head),
            ..s
        },
    }
}

/// A negative stride on any axis of any tensor argument is a `Stride` error, never a panic:
/// dense (16-bit and FP8), block-sparse, MoBA selection, paged decode / Quest selection /
/// prefill / append, Star Attention's two phases.
#[test]
fn negative_strides_rejected() {
    let mut r = seeded(10);
    let dims = (2, 4, 6, 2, 1, 8);
    let (qs, ks) = contiguous(dims);
    let x = tensors::<f32>(&mut r, dims);
    let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (cast(&x.q), cast(&x.k), cast(&x.v));
    let (q8, k8): (Vec<F8E4M3>, Vec<F8E4M3>) = (cast(&x.q), cast(&x.k));
    let attn = dense(dims, &AttentionOptions::causal()).unwrap();
    let ones = [1.0f32; 2];
    let desc = Fp8Descales {
        q: &ones[..],
        k: &ones[..],
        v: &ones[..],
    };
    let bs = BlockSparseAttention::new(
        attn.clone(),
        BlockMask::dense(
            longattn::BlockMaskDims::for_lengths(1, 1, 4, 6, 2, 3).unwrap(),
            BlockKind::Partial,
        )
        .unwrap(),
    )
    .unwrap();
    let moba = MobaConfig {
        block_n: 2,
        top_k: 2,
    };
    for axis in 0..3 {
        for arg in 0..4 {
            let st = |n: usize, s: Strides| if n == arg { negate(s, axis) } else { s };
            let mut out = vec![0.0f32; x.q.len()];
            let mut o16 = vec![bf16::ZERO; x.q.len()];
            let what = format!("axis {axis} argument {arg}");
            let res = attn.forward_cpu(
                Strided::new(&q[..], st(0, qs)),
                Strided::new(&k[..], st(1, ks)),
                Strided::new(&v[..], st(2, ks)),
                Strided::new(&mut out[..], st(3, qs)),
                None,
            );
            assert!(is_stride_err(res), "dense {what}");
            let res = attn.forward_cpu_fp8(
                Strided::new(&q8[..], st(0, qs)),
                Strided::new(&k8[..], st(1, ks)),
                Strided::new(&k8[..], st(2, ks)),
                desc,
                Strided::new(&mut o16[..], st(3, qs)),
                None,
            );
            assert!(is_stride_err(res), "fp8 {what}");
            let res = bs.forward_cpu(
                Strided::new(&q[..], st(0, qs)),
                Strided::new(&k[..], st(1, ks)),
                Strided::new(&v[..], st(2, ks)),
                Strided::new(&mut out[..], st(3, qs)),
                None,
            );
            assert!(is_stride_err(res), "block-sparse {what}");
            if arg < 2 {
                let res = moba_select_cpu(
                    &attn,
                    &moba,
                    Strided::new(&q[..], st(0, qs)),
                    Strided::new(&k[..], st(1, ks)),
                );
                assert!(is_stride_err(res), "moba select {what}");
                let res = moba_select_blocks_cpu(
                    &attn,
                    &moba,
                    2,
                    Strided::new(&q[..], st(0, qs)),
                    Strided::new(&k[..], st(1, ks)),
                );
                assert!(is_stride_err(res), "moba blocks {what}");
            }
        }
    }
    // Paged.
    let p = Pages::<f32>::new(&mut r, &[5, 2], 2, (1, 8), 1.0, None);
    let hq = 2;
    let qd = draw::<f32>(&mut r, 2 * 2 * hq * 8);
    let qf: Vec<f32> = cast(&qd);
    let ds = Strides::contiguous(2, hq, 8);
    let dec = PagedDecode::new(&p.cache(), hq, 2, &AttentionOptions::default())
        .unwrap()
        .with_policy(SparsePolicy::uniform(1, HeadPolicy::Quest))
        .unwrap();
    let pre = PagedPrefill::new(&p.cache(), hq, 2, &AttentionOptions::default()).unwrap();
    for axis in 0..3 {
        let mut out = vec![0.0f32; qf.len()];
        let bad = negate(ds, axis);
        for (qs_, os_) in [(bad, ds), (ds, bad)] {
            let res = dec.forward_cpu(
                Strided::new(&qf[..], qs_),
                p.pages(),
                Some(p.meta()),
                Strided::new(&mut out[..], os_),
                None,
            );
            assert!(is_stride_err(res), "decode axis {axis}");
            let res = pre.forward_cpu(
                Strided::new(&qf[..], qs_),
                p.pages(),
                Strided::new(&mut out[..], os_),
                None,
            );
            assert!(is_stride_err(res), "prefill axis {axis}");
        }
        let res = dec.select_cpu(Strided::new(&qf[..], bad), p.meta());
        assert!(is_stride_err(res), "select axis {axis}");
        let cache = p.cache_with(&[6, 2]).unwrap();
        let new = [0.5f32; 8];
        let ns = Strides::contiguous(0, 1, 8);
        let (mut k, mut v) = (p.k.clone(), p.v.clone());
        for (a, b_) in [(negate(ns, axis), ns), (ns, negate(ns, axis))] {
            let res = cache.append_cpu(
                &[0, 1, 1],
                Strided::new(&new[..], a),
                Strided::new(&new[..], b_),
                KvPages {
                    k: &mut k[..],
                    v: &mut v[..],
                },
                None::<PageMeta<&mut [f32]>>,
            );
            assert!(is_stride_err(res), "append axis {axis}");
        }
    }
    // Star.
    let shape = RingShape {
        batch: 1,
        heads_q: 2,
        heads_kv: 1,
        head_dim: 8,
    };
    let star = StarAttention::new(4, 2, 2, shape, &AttentionOptions::causal()).unwrap();
    let kv = vec![0.5f32; 2 * 8];
    let qv = [0.5f32; 2 * 2 * 8];
    let ss = Strides::contiguous(2, 2, 8);
    for axis in 0..3 {
        let bad = negate(ss, axis);
        for (qs_, os_) in [(bad, ss), (ss, bad)] {
            let mut out = vec![0.0f32; qv.len()];
            let res = star.context_cpu(
                1,
                Strided::new(&qv[..], qs_),
                &kv,
                &kv,
                &kv,
                &kv,
                Strided::new(&mut out[..], os_),
                None,
            );
            assert!(is_stride_err(res), "star context axis {axis}");
            let res = star.query_cpu(
                Strided::new(&qv[..], qs_),
                &[&kv[..], &kv[..]],
                &[&kv[..], &kv[..]],
                &kv,
                &kv,
                Strided::new(&mut out[..], os_),
                None,
            );
            assert!(is_stride_err(res), "star query axis {axis}");
        }
    }
}

// =======================================================================================
// Star Attention (src/ring/star.rs rustdoc)
// =======================================================================================

/// Rows `rows` of sequence-major `[b, len, h, d]` tensor `t` as `[b, rows.len(), h, d]`.
fn take_rows(
    t: &[f64],
    (b, len, h, d): (usize, usize, usize, usize),
    rows: std::ops::Range<usize>,
) -> Vec<f64> {
    (0..b)
        .flat_map(|bb| t[(bb * len + rows.start) * h * d..(bb * len + rows.end) * h * d].to_vec())
        .collect()
}

/// `lse [b, hq, len]` restricted to positions `rows`.
fn take_lse(
    l: &[f64],
    (b, hq, len): (usize, usize, usize),
    rows: std::ops::Range<usize>,
) -> Vec<f64> {
    (0..b * hq)
        .flat_map(|bh| l[bh * len + rows.start..bh * len + rows.end].to_vec())
        .collect()
}

/// Star Attention over `context` tokens on `world` ranks and `nq` query tokens: phase 1
/// rank `r` (block `r * C / world .. (r + 1) * C / world`) gives its block's rows attention
/// over the anchor (block 0, all visible) and its own block up to the row (causal); phase 2
/// gives the query rows causal attention over the whole sequence. The oracle runs both on the
/// global positions.
fn star_case<T: Element>(
    r: &mut SmallRng,
    (context, world, nq): (usize, usize, usize),
    (b, hq, hkv, d): (usize, usize, usize, usize),
    sc: Sc,
) {
    let len = context + nq;
    let dims = (b, len, len, hq, hkv, d);
    let x = tensors::<T>(r, dims);
    let block = |rank: usize| rank * context / world..(rank + 1) * context / world;
    let rank_of = |i: usize| (0..world).find(|&rk| block(rk).contains(&i));
    let anchor = block(0).end;
    let (want, wlse) = attend(&x, dims, sc, &|_, _, i, j| match rank_of(i) {
        Some(rk) => j <= i && (j < anchor || j >= block(rk).start),
        None => j <= i,
    });
    let shape = RingShape {
        batch: b,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
    };
    let opts = if world % 2 == 0 {
        AttentionOptions::causal()
    } else {
        AttentionOptions::default()
    };
    let star = StarAttention::new(context, world, nq, shape, &sc.apply(opts)).unwrap();
    let what = format!(
        "star C {context} world {world} nq {nq} {:?} {sc:?}",
        T::DTYPE
    );
    let kv_rows = |t: &[f64], rows| -> Vec<T> { cast(&take_rows(t, (b, len, hkv, d), rows)) };
    let (ak, av) = (kv_rows(&x.k, block(0)), kv_rows(&x.v, block(0)));
    for rank in 0..world {
        let rows = block(rank);
        assert_eq!(star.block(rank), rows, "{what}: block {rank}");
        let lr = rows.len();
        let q: Vec<T> = cast(&take_rows(&x.q, (b, len, hq, d), rows.clone()));
        let (k, v) = (kv_rows(&x.k, rows.clone()), kv_rows(&x.v, rows.clone()));
        let qs = Strides::contiguous(lr, hq, d);
        let mut out = vec![T::from_f32(f32::NAN); q.len()];
        let mut lse = vec![f32::NAN; b * hq * lr];
        star.context_cpu(
            rank,
            Strided::new(&q[..], qs),
            &ak,
            &av,
            &k,
            &v,
            Strided::new(&mut out[..], qs),
            Some(&mut lse),
        )
        .unwrap();
        let w = take_rows(&want, (b, len, hq, d), rows.clone());
        let wl = take_lse(&wlse, (b, hq, len), rows);
        let what = format!("{what}: phase 1 rank {rank}");
        verify(&what, d, tol_of(T::DTYPE), (&widen(&out), &lse), (&w, &wl));
    }
    let blocks: Vec<[Vec<T>; 2]> = (0..world)
        .map(|rk| [kv_rows(&x.k, block(rk)), kv_rows(&x.v, block(rk))])
        .collect();
    let kb: Vec<&[T]> = blocks.iter().map(|x| &x[0][..]).collect();
    let vb: Vec<&[T]> = blocks.iter().map(|x| &x[1][..]).collect();
    let q: Vec<T> = cast(&take_rows(&x.q, (b, len, hq, d), context..len));
    let (kq, vq) = (kv_rows(&x.k, context..len), kv_rows(&x.v, context..len));
    let qs = Strides::contiguous(nq, hq, d);
    let mut out = vec![T::from_f32(f32::NAN); q.len()];
    let mut lse = vec![f32::NAN; b * hq * nq];
    star.query_cpu(
        Strided::new(&q[..], qs),
        &kb,
        &vb,
        &kq,
        &vq,
        Strided::new(&mut out[..], qs),
        Some(&mut lse),
    )
    .unwrap();
    let w = take_rows(&want, (b, len, hq, d), context..len);
    let wl = take_lse(&wlse, (b, hq, len), context..len);
    // The partials are rounded to T before the merge: twice the tolerance.
    let what = format!("{what}: phase 2");
    let got = widen(&out);
    verify(&what, d, 2.0 * tol_of(T::DTYPE), (&got, &lse), (&w, &wl));
}

/// Both phases against the oracle: contexts of 1, 2, odd and uneven lengths over 1 to 4
/// ranks, 1 to 5 query tokens, GQA, softcap, f32 and bf16.
#[test]
fn star_attention_phases() {
    let mut r = seeded(11);
    for context in [1usize, 2, 7, 13, 40] {
        for world in (1..=4).filter(|&w| w <= context) {
            for nq in [1usize, 2, 5] {
                let sc = if (context + world + nq) % 3 == 0 {
                    any_sc(&mut r)
                } else {
                    NO_CAP
                };
                star_case::<f32>(&mut r, (context, world, nq), (2, 4, 2, 8), sc);
            }
        }
    }
    for n in 0..10 {
        let context = r.random_range(1..=30);
        let world = r.random_range(1..=context.min(5));
        let nq = r.random_range(1..=6);
        let sc = any_sc(&mut r);
        let heads = [(1, 1, 3), (3, 1, 8), (2, 2, 16)][n % 3];
        star_case::<bf16>(
            &mut r,
            (context, world, nq),
            (1, heads.0, heads.1, heads.2),
            sc,
        );
    }
}

/// Star Attention is causal: the default and the causal options (however spelled) are
/// accepted, anything else is an error; sizes that do not fit (no rank, ranks without a
/// token, lengths past i32) and buffers of the wrong count or length are errors.
#[test]
fn star_attention_probes() {
    let shape = RingShape {
        batch: 1,
        heads_q: 2,
        heads_kv: 1,
        head_dim: 4,
    };
    let new = |c, w, nq, o: &AttentionOptions| StarAttention::new(c, w, nq, shape, o);
    let causal_spellings = [
        AttentionOptions::default(),
        AttentionOptions::causal(),
        AttentionOptions::default().with_window(Window::CAUSAL),
        AttentionOptions::causal().with_window(Window::CAUSAL),
    ];
    for o in &causal_spellings {
        assert!(new(4, 2, 1, o).is_ok(), "{o:?}");
    }
    for o in [
        AttentionOptions::default().with_window(Window::new(Some(3), Some(0))),
        AttentionOptions::causal().with_sinks(2),
        AttentionOptions::default().with_window(Window::new(None, Some(2))),
        AttentionOptions::default().with_scale(f32::NAN),
    ] {
        assert!(new(4, 2, 1, &o).is_err(), "{o:?}");
    }
    let o = AttentionOptions::causal();
    for (c, w, nq) in [
        (4, 0, 1),
        (3, 4, 1),
        (0, 1, 1),
        (i32::MAX as usize, 1, 1),
        (usize::MAX, 1, usize::MAX),
    ] {
        assert!(new(c, w, nq, &o).is_err(), "C {c} world {w} nq {nq}");
    }
    for bad in [
        RingShape { batch: 0, ..shape },
        RingShape {
            heads_kv: 0,
            ..shape
        },
        RingShape {
            heads_q: 3,
            heads_kv: 2,
            ..shape
        },
        RingShape {
            head_dim: 0,
            ..shape
        },
    ] {
        assert!(StarAttention::new(4, 2, 1, bad, &o).is_err(), "{bad:?}");
    }
    let star = new(5, 2, 2, &o).unwrap();
    let row = 4; // heads_kv * head_dim
    let (b0, b1) = (star.block(0).len(), star.block(1).len());
    assert_eq!((b0, b1), (2, 3));
    assert!(star.block(2).is_empty() && star.block(usize::MAX).is_empty());
    let kv0 = vec![0.5f32; b0 * row];
    let kv1 = vec![0.5f32; b1 * row];
    let kq = vec![0.5f32; 2 * row];
    let q = [0.5f32; 3 * 2 * 4];
    let qs = Strides::contiguous(3, 2, 4);
    // Phase 1: a rank past the last, a short block, a short anchor, a short output, a short
    // LSE: `(rank, anchor k, block k, output length, LSE length)`.
    type Call<'a> = (usize, &'a [f32], &'a [f32], usize, Option<usize>);
    let calls: [Call; 5] = [
        (2, &kv0, &kv1, q.len(), None),
        (1, &kv0, &kv0, q.len(), None),
        (1, &kv0[..row], &kv1, q.len(), None),
        (1, &kv0, &kv1, 4, None),
        (1, &kv0, &kv1, q.len(), Some(1)),
    ];
    for (n, (rank, anchor, k, out_len, lse_len)) in calls.into_iter().enumerate() {
        let mut out = vec![0.0f32; out_len];
        let mut lse = vec![0.0f32; lse_len.unwrap_or(0)];
        let res = star.context_cpu(
            rank,
            Strided::new(&q[..], qs),
            anchor,
            &kv0,
            k,
            &kv1,
            Strided::new(&mut out[..], qs),
            lse_len.map(|_| &mut lse[..]),
        );
        assert!(res.is_err(), "phase 1 call {n}");
    }
    // Phase 2: wrong block count, a short block, a short own K/V.
    let q2 = [0.5f32; 2 * 2 * 4];
    let q2s = Strides::contiguous(2, 2, 4);
    let mut out2 = vec![0.0f32; q2.len()];
    let calls: [(&[&[f32]], &[f32]); 4] = [
        (&[&kv0[..]], &kq[..]),
        (&[&kv0[..], &kv1[..], &kv1[..]], &kq[..]),
        (&[&kv0[..], &kv0[..]], &kq[..]),
        (&[&kv0[..], &kv1[..]], &kq[..row]),
    ];
    for (n, (blocks, own)) in calls.iter().enumerate() {
        let res = star.query_cpu(
            Strided::new(&q2[..], q2s),
            blocks,
            blocks,
            own,
            own,
            Strided::new(&mut out2[..], q2s),
            None,
        );
        assert!(res.is_err(), "phase 2 call {n}");
    }
    assert!(
        star.query_cpu(
            Strided::new(&q2[..], q2s),
            &[&kv0[..], &kv1[..]],
            &[&kv0[..], &kv1[..]],
            &kq,
            &kq,
            Strided::new(&mut out2[..], q2s),
            None
        )
        .is_ok()
    );
    // Sizes whose element counts overflow: refused at construction or by each call.
    let huge = RingShape {
        batch: 1 << 31,
        heads_q: 1 << 20,
        heads_kv: 1 << 20,
        head_dim: 1 << 40,
    };
    if let Ok(s) = StarAttention::new(4, 2, 1, huge, &o) {
        let mut out = [0.0f32; 8];
        let z = Strides::contiguous(2, 1, 4);
        let res = s.context_cpu(
            1,
            Strided::new(&q[..], z),
            &kv0,
            &kv0,
            &kv1,
            &kv1,
            Strided::new(&mut out[..], z),
            None,
        );
        assert!(res.is_err(), "huge phase 1");
        let res = s.query_cpu(
            Strided::new(&q[..], z),
            &[&kv0[..], &kv1[..]],
            &[&kv0[..], &kv1[..]],
            &kq,
            &kq,
            Strided::new(&mut out[..], z),
            None,
        );
        assert!(res.is_err(), "huge phase 2");
    }
    // No query token: accepted or refused, never a panic.
    if let Ok(s) = new(4, 2, 0, &o) {
        let mut none: Vec<f32> = Vec::new();
        let z = Strides::contiguous(0, 2, 4);
        let kv = vec![0.5f32; 2 * row];
        let _ = s.query_cpu(
            Strided::new(&[][..], z),
            &[&kv[..], &kv[..]],
            &[&kv[..], &kv[..]],
            &[],
            &[],
            Strided::new(&mut none[..], z),
            None,
        );
    }
}

// =======================================================================================
// MoBA selection (docs "MoBA selection")
// =======================================================================================

/// Mean of key block `kb` (`bn` keys, the last one short) of kv head `g` over `[sk, hkv, d]`.
fn block_mean(
    k: &[f64],
    (sk, hkv, d): (usize, usize, usize),
    g: usize,
    kb: usize,
    bn: usize,
) -> Vec<f64> {
    let rows = kb * bn..((kb + 1) * bn).min(sk);
    let mut m = vec![0.0; d];
    for j in rows.clone() {
        m.iter_mut()
            .zip(&k[(j * hkv + g) * d..][..d])
            .for_each(|(a, b)| *a += b);
    }
    m.iter_mut().for_each(|a| *a /= rows.len() as f64);
    m
}

/// The `n` best blocks of `(score, block)`: higher score first (NaN as -inf), equal scores to
/// the lower block; `None` when the cut falls between two scores that differ by f64
/// rounding noise only (either order is right).
fn best_blocks(mut c: Vec<(f64, usize)>, n: usize) -> Option<Vec<usize>> {
    let key = |s: f64| if s.is_nan() { f64::NEG_INFINITY } else { s };
    c.sort_by(|a, b| key(b.0).total_cmp(&key(a.0)).then(a.1.cmp(&b.1)));
    if n > 0 && n < c.len() {
        let (x, y) = (key(c[n - 1].0), key(c[n].0));
        if x != y && (x - y).abs() <= 1e-9 * (1.0 + x.abs()) {
            return None;
        }
    }
    Some(c.into_iter().take(n).map(|x| x.1).collect())
}

/// MoBA's per-token selection of every row of one sequence (`q [sq, hq, d]`, `k [sk, hkv,
/// d]`): `sel[h][i]` sorted (empty when `p < 0`), `None` where a near-tie makes it ambiguous.
fn moba_rows(
    q: &[f64],
    k: &[f64],
    (sq, sk, hq, hkv, d): (usize, usize, usize, usize, usize),
    (bn, top_k): (usize, usize),
) -> Vec<Vec<Option<Vec<usize>>>> {
    (0..hq)
        .map(|h| {
            let g = h * hkv / hq;
            (0..sq)
                .map(|i| {
                    let Some(p) = (i + sk).checked_sub(sq) else {
                        return Some(Vec::new());
                    };
                    let own = p / bn;
                    let qi = &q[(i * hq + h) * d..][..d];
                    let c = (0..own)
                        .map(|kb| (dot(qi, &block_mean(k, (sk, hkv, d), g, kb, bn)), kb))
                        .collect();
                    let mut sel = best_blocks(c, top_k - 1)?;
                    sel.push(own);
                    sel.sort_unstable();
                    Some(sel)
                })
                .collect()
        })
        .collect()
}

/// Per-token MoBA: `moba_select_cpu` gives each row its own block plus the `top_k - 1` best
/// earlier blocks (ties to the lower block, `min(top_k, blocks)` slots, `-1` padding), and
/// `moba_attention` attends to the element mask AND the row's selection.
fn moba_token_case(
    r: &mut SmallRng,
    dims: Dims,
    (bn, top_k, bm): (usize, usize, usize),
    m: Win,
    tied: bool,
    what: &str,
) {
    let (b, sq, sk, hq, hkv, d) = dims;
    let mut x = tensors::<f32>(r, dims);
    if tied {
        // Every key block a copy of the first: all gates tie.
        for bb in 0..b {
            for j in bn..sk {
                for c in 0..hkv * d {
                    x.k[(bb * sk + j) * hkv * d + c] = x.k[(bb * sk + j % bn) * hkv * d + c];
                }
            }
        }
    }
    let attn = dense(dims, &m.opts()).unwrap();
    let (qs, ks) = contiguous(dims);
    let (qf, kf): (Vec<f32>, Vec<f32>) = (cast(&x.q), cast(&x.k));
    let cfg = MobaConfig { block_n: bn, top_k };
    let rows = moba_select_cpu(
        &attn,
        &cfg,
        Strided::new(&qf[..], qs),
        Strided::new(&kf[..], ks),
    )
    .unwrap();
    let slots = top_k.min(sk.div_ceil(bn)).max(1);
    assert_eq!(
        (rows.block_n(), rows.top_k()),
        (bn, slots),
        "{what}: row list shape"
    );
    let mut sel = Vec::new();
    for bb in 0..b {
        let qn = sq * hq * d;
        let kn = sk * hkv * d;
        let want = moba_rows(
            &x.q[bb * qn..][..qn],
            &x.k[bb * kn..][..kn],
            (sq, sk, hq, hkv, d),
            (bn, top_k),
        );
        for h in 0..hq {
            for i in 0..sq {
                let at = (bb * hq + h) * sq + i;
                let padded = &rows.blocks()[at * slots..(at + 1) * slots];
                let got: Vec<usize> = padded
                    .iter()
                    .filter(|&&x| x >= 0)
                    .map(|&x| x as usize)
                    .collect();
                assert!(
                    padded[got.len()..].iter().all(|&x| x == -1),
                    "{what}: padding of row ({bb},{h},{i}): {padded:?}"
                );
                if let Some(w) = &want[h][i] {
                    assert_eq!(&got, w, "{what}: selection of row ({bb},{h},{i}) {m:?}");
                }
                sel.push(got);
            }
        }
    }
    let bs = moba_attention(
        &attn,
        &cfg,
        bm,
        Strided::new(&qf[..], qs),
        Strided::new(&kf[..], ks),
    )
    .unwrap();
    let sees = |bb: usize, h: usize, i: usize, j: usize| {
        m.shows(i, j, sq, sk) && sel[(bb * hq + h) * sq + i].contains(&(j / bn))
    };
    block_sparse_vs(&bs, &x, dims, &sees, &format!("{what} {m:?}"));
}

/// MoBA's query-block selection: block `qb` of `bm` rows at positions `p0..=p1` (bottom-right,
/// `p0` clamped at 0; nothing when `p1 < 0`) gates on the mean of its rows' queries; the key
/// blocks meeting `[p0, p1]` are listed, plus `top_k - their number` best blocks ending at or
/// before `p0`; pairs the element mask hides entirely are dropped, pairs it shows entirely
/// are full. Then the attention over the mask.
fn moba_block_case(
    r: &mut SmallRng,
    dims: Dims,
    (bn, top_k, bm): (usize, usize, usize),
    m: Win,
    what: &str,
) {
    let (b, sq, sk, hq, hkv, d) = dims;
    let x = tensors::<f32>(r, dims);
    let attn = dense(dims, &m.opts()).unwrap();
    let (qs, ks) = contiguous(dims);
    let (qf, kf): (Vec<f32>, Vec<f32>) = (cast(&x.q), cast(&x.k));
    let cfg = MobaConfig { block_n: bn, top_k };
    let mask = moba_select_blocks_cpu(
        &attn,
        &cfg,
        bm,
        Strided::new(&qf[..], qs),
        Strided::new(&kf[..], ks),
    )
    .unwrap();
    let mut lists = Vec::new();
    for bb in 0..b {
        let kseq = &x.k[bb * sk * hkv * d..][..sk * hkv * d];
        for h in 0..hq {
            for qb in 0..sq.div_ceil(bm) {
                let tile = qb * bm..((qb + 1) * bm).min(sq);
                let got: Vec<(usize, BlockKind)> = mask.list(bb, h, qb).unwrap().iter().collect();
                let Some(p1) = (tile.end - 1 + sk).checked_sub(sq) else {
                    assert!(
                        got.is_empty(),
                        "{what}: block ({bb},{h},{qb}) before key 0: {got:?}"
                    );
                    lists.push(got);
                    continue;
                };
                let p0 = (tile.start + sk).saturating_sub(sq);
                let mut gate = vec![0.0; d];
                for i in tile.clone() {
                    let qi = &x.q[((bb * sq + i) * hq + h) * d..][..d];
                    gate.iter_mut()
                        .zip(qi)
                        .for_each(|(a, b)| *a += b / tile.len() as f64);
                }
                let diag: Vec<usize> = (0..sk.div_ceil(bn))
                    .filter(|&kb| kb * bn <= p1 && p0 < (kb + 1) * bn)
                    .collect();
                let cands = (0..sk.div_ceil(bn))
                    .filter(|&kb| (kb + 1) * bn - 1 <= p0 && !diag.contains(&kb))
                    .map(|kb| {
                        (
                            dot(&gate, &block_mean(kseq, (sk, hkv, d), h * hkv / hq, kb, bn)),
                            kb,
                        )
                    })
                    .collect();
                let Some(mut want) = best_blocks(cands, top_k.saturating_sub(diag.len())) else {
                    lists.push(got);
                    continue;
                };
                want.extend(diag);
                want.sort_unstable();
                let want: Vec<(usize, BlockKind)> = want
                    .into_iter()
                    .filter_map(|kb| {
                        classify_pair(m, tile.clone(), kb * bn..((kb + 1) * bn).min(sk), (sq, sk))
                            .map(|k| (kb, k))
                    })
                    .collect();
                assert_eq!(got, want, "{what}: list ({bb},{h},{qb}) {m:?}");
                lists.push(got);
            }
        }
    }
    let nqb = sq.div_ceil(bm);
    let bs = BlockSparseAttention::new(attn, mask).unwrap();
    let sees = |bb: usize, h: usize, i: usize, j: usize| {
        let l = &lists[(bb * hq + h) * nqb + i / bm];
        l.iter()
            .any(|&(kb, kind)| kb == j / bn && (kind == BlockKind::Full || m.shows(i, j, sq, sk)))
    };
    block_sparse_vs(&bs, &x, dims, &sees, &format!("{what} {m:?}"));
}

/// Runs `bs` on `x` (f32, contiguous, poisoned output) against the oracle of `sees`.
fn block_sparse_vs(
    bs: &BlockSparseAttention,
    x: &Tensors,
    dims: Dims,
    sees: &dyn Fn(usize, usize, usize, usize) -> bool,
    what: &str,
) {
    let (want, wlse) = attend(x, dims, NO_CAP, sees);
    let (got, glse) = run_contiguous::<f32>(x, dims, |q, k, v, o, l| {
        bs.forward_cpu(q, k, v, o, Some(l)).unwrap()
    });
    verify(what, dims.5, 3e-5, (&got, &glse), (&want, &wlse));
}

/// How the element mask covers `rows` x `keys`: `None` when it hides every pair, `Full` when
/// it shows every pair, else `Partial`.
fn classify_pair(
    m: Win,
    rows: std::ops::Range<usize>,
    keys: std::ops::Range<usize>,
    (sq, sk): (usize, usize),
) -> Option<BlockKind> {
    let seen: Vec<bool> = rows
        .flat_map(|i| keys.clone().map(move |j| m.shows(i, j, sq, sk)))
        .collect();
    if !seen.contains(&true) {
        None
    } else if seen.iter().all(|&s| s) {
        Some(BlockKind::Full)
    } else {
        Some(BlockKind::Partial)
    }
}

#[test]
fn moba_selection_and_attention() {
    let mut r = seeded(12);
    let causal = win(-1, -1, 0, true);
    let cases = [
        ((1, 1, 1, 1, 1, 4), (1, 1, 1)),
        ((1, 2, 2, 2, 1, 4), (1, 3, 2)),
        ((2, 9, 9, 2, 1, 8), (2, 2, 4)),
        ((1, 13, 29, 4, 2, 8), (4, 3, 5)),
        ((1, 29, 13, 2, 2, 3), (3, 8, 7)),
        ((2, 33, 33, 2, 1, 8), (5, 1, 16)),
        ((1, 17, 40, 1, 1, 8), (6, 100, 3)),
    ];
    for (n, &(dims, cfg)) in cases.iter().enumerate() {
        for m in [causal, win(6, 0, 2, false), win(3, -1, 0, true)] {
            let what = format!("moba token {n} {dims:?} {cfg:?}");
            moba_token_case(&mut r, dims, cfg, m, false, &what);
            moba_token_case(&mut r, dims, cfg, m, true, &format!("{what} tied"));
            moba_block_case(
                &mut r,
                dims,
                cfg,
                m,
                &format!("moba block {n} {dims:?} {cfg:?}"),
            );
        }
    }
    for n in 0..40 {
        let dims = (
            r.random_range(1..=2),
            r.random_range(1..=40),
            r.random_range(1..=40),
            2,
            [1, 2][n % 2],
            8,
        );
        let cfg = (
            r.random_range(1..=8),
            r.random_range(1..=5),
            r.random_range(1..=9),
        );
        let mut m = any_win(&mut r, 40);
        m.causal = true;
        moba_token_case(
            &mut r,
            dims,
            cfg,
            m,
            n % 5 == 0,
            &format!("moba token sweep {n}"),
        );
        moba_block_case(&mut r, dims, cfg, m, &format!("moba block sweep {n}"));
    }
}

/// A NaN gate ranks as `-inf`: a key block holding a NaN is chosen only after every finite
/// block (and still chosen when slots remain).
#[test]
fn moba_nan_gate_ranks_last() {
    let (sq, sk, d, bn) = (1, 20, 4, 4);
    let dims = (1, sq, sk, 1, 1, d);
    let mut k: Vec<f32> = (0..sk * d).map(|i| (i as f32 * 0.37).sin()).collect();
    k[d + 1] = f32::NAN; // block 0
    let q = vec![1.0f32; d];
    let attn = dense(dims, &AttentionOptions::causal()).unwrap();
    let (qs, ks) = contiguous(dims);
    let finite = |top_k| {
        let c = MobaConfig { block_n: bn, top_k };
        moba_select_cpu(
            &attn,
            &c,
            Strided::new(&q[..], qs),
            Strided::new(&k[..], ks),
        )
        .unwrap()
    };
    let row = |top_k| finite(top_k).row(0).unwrap().to_vec();
    let kd: Vec<f64> = k.iter().map(|&x| f64::from(x)).collect();
    let qd = vec![1.0; d];
    let want = moba_rows(&qd, &kd, (sq, sk, 1, 1, d), (bn, 4))
        .remove(0)
        .remove(0)
        .unwrap();
    assert!(!want.contains(&0));
    assert_eq!(row(4).iter().map(|&x| x as usize).collect::<Vec<_>>(), want);
    assert!(
        row(5).contains(&0),
        "all blocks selected once the slots allow"
    );
}

/// Bad MoBA arguments are errors: zero block or top-k, zero query block, buffers too short.
#[test]
fn moba_probes() {
    let dims = (1, 4, 6, 2, 1, 4);
    let attn = dense(dims, &AttentionOptions::causal()).unwrap();
    let (qs, ks) = contiguous(dims);
    let (q, k) = ([0.5f32; 4 * 2 * 4], [0.5f32; 6 * 4]);
    // Whether each of the three entry points refuses `(config, block_m, q len, k len)`.
    let refused = |(block_n, top_k, bm, qn, kn): (usize, usize, usize, usize, usize)| {
        let c = MobaConfig { block_n, top_k };
        let (qv, kv) = (|| Strided::new(&q[..qn], qs), || Strided::new(&k[..kn], ks));
        [
            moba_select_cpu(&attn, &c, qv(), kv()).is_err(),
            moba_select_blocks_cpu(&attn, &c, bm, qv(), kv()).is_err(),
            moba_attention(&attn, &c, bm, qv(), kv()).is_err(),
        ]
    };
    let (nq, nk) = (q.len(), k.len());
    assert_eq!(refused((2, 2, 2, nq, nk)), [false; 3]);
    assert_eq!(refused((0, 1, 2, nq, nk)), [true; 3], "block_n 0");
    assert_eq!(refused((2, 0, 2, nq, nk)), [true; 3], "top_k 0");
    assert_eq!(refused((2, 2, 0, nq, nk)), [false, true, true], "block_m 0");
    assert_eq!(refused((2, 2, 2, 5, nk)), [true; 3], "short q");
    assert_eq!(refused((2, 2, 2, nq, nk - 1)), [true; 3], "short k");
    assert_eq!(
        refused((usize::MAX, usize::MAX, usize::MAX, nq, nk)),
        [false; 3]
    );
    let huge = MobaConfig {
        block_n: usize::MAX,
        top_k: usize::MAX,
    };
    let rows = moba_select_cpu(
        &attn,
        &huge,
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
    );
    assert_eq!(rows.unwrap().top_k(), 1, "one key block: one slot");
}

// =======================================================================================
// Block patterns (docs "Patterns")
// =======================================================================================

/// A pattern's pairs at block granularity: `pair(head, qb', kb)` with `qb' = qb + (sk - sq) /
/// block`, intersected with the element mask `m` (hidden pairs dropped, fully shown pairs
/// full): the crate's lists must be exactly these, and the attention the element mask AND
/// the listed blocks.
fn pattern_check(
    r: &mut SmallRng,
    mask: &BlockMask,
    (sq, sk, block, heads): (usize, usize, usize, usize),
    m: Win,
    pair: &dyn Fn(usize, usize, usize) -> bool,
    what: &str,
) {
    let shift = (sk - sq) / block;
    for h in 0..heads {
        for qb in 0..sq.div_ceil(block) {
            let rows = qb * block..((qb + 1) * block).min(sq);
            let want: Vec<(usize, BlockKind)> = (0..sk.div_ceil(block))
                .filter(|&kb| pair(h, qb + shift, kb))
                .filter_map(|kb| {
                    classify_pair(
                        m,
                        rows.clone(),
                        kb * block..((kb + 1) * block).min(sk),
                        (sq, sk),
                    )
                    .map(|k| (kb, k))
                })
                .collect();
            let got: Vec<(usize, BlockKind)> = mask.list(0, h, qb).unwrap().iter().collect();
            assert_eq!(got, want, "{what}: head {h} query block {qb} {m:?}");
        }
    }
    let (hkv, d) = (1, 4);
    let dims = (1, sq, sk, heads, hkv, d);
    let x = tensors::<f32>(r, dims);
    let bs = BlockSparseAttention::new(dense(dims, &m.opts()).unwrap(), mask.clone()).unwrap();
    let sees = |_: usize, h: usize, i: usize, j: usize| {
        pair(h, i / block + shift, j / block) && m.shows(i, j, sq, sk)
    };
    block_sparse_vs(&bs, &x, dims, &sees, &format!("{what} {m:?}"));
}

/// Every pattern constructor over random lengths (`sq <= sk`, block-aligned difference),
/// blocks 1 to 6 (the last block short), random parameters and element masks.
#[test]
fn block_patterns() {
    let mut r = seeded(13);
    for n in 0..210u64 {
        let block = r.random_range(1..=6);
        let sq = r.random_range(1..=30);
        let sk = sq + block * r.random_range(0..=3);
        let heads = r.random_range(1..=3);
        let m = if n % 4 == 0 {
            win(-1, -1, 0, true)
        } else {
            any_win(&mut r, sk)
        };
        let shape = PatternShape {
            heads,
            seqlen_q: sq,
            seqlen_k: sk,
            block,
            mask: m.opts().effective_mask(),
        };
        let nk = sk.div_ceil(block);
        let (w, g) = (r.random_range(0..=3), r.random_range(0..=2));
        let (s, c) = (r.random_range(1..=4), r.random_range(0..=4));
        let what = format!("pattern {n} {sq}x{sk} block {block} heads {heads}");
        match n % 7 {
            0 => {
                let mask = longformer(&shape, w, g).unwrap();
                let pair =
                    move |_: usize, qb: usize, kb: usize| qb.abs_diff(kb) <= w || kb < g || qb < g;
                pattern_check(
                    &mut r,
                    &mask,
                    (sq, sk, block, heads),
                    m,
                    &pair,
                    &format!("{what} longformer w {w} g {g}"),
                );
            }
            1 => {
                let (rand, seed) = (r.random_range(0..=3), r.random());
                let mask = bigbird(&shape, w, g, rand, seed).unwrap();
                let pair = move |h: usize, qb: usize, kb: usize| {
                    qb.abs_diff(kb) <= w
                        || kb < g
                        || qb < g
                        || bigbird_random_blocks(seed, h, qb, nk, rand)
                            .unwrap()
                            .contains(&kb)
                };
                pattern_check(
                    &mut r,
                    &mask,
                    (sq, sk, block, heads),
                    m,
                    &pair,
                    &format!("{what} bigbird w {w} g {g} r {rand}"),
                );
            }
            2 => {
                let mask = sparse_transformer_strided(&shape, s).unwrap();
                let pair = move |_: usize, qb: usize, kb: usize| {
                    kb <= qb && (qb - kb < s || (qb - kb).is_multiple_of(s))
                };
                pattern_check(
                    &mut r,
                    &mask,
                    (sq, sk, block, heads),
                    m,
                    &pair,
                    &format!("{what} strided s {s}"),
                );
            }
            3 => {
                let mask = sparse_transformer_fixed(&shape, s, c).unwrap();
                let pair = move |_: usize, qb: usize, kb: usize| {
                    kb <= qb && (kb / s == qb / s || (kb % s) as i64 >= s as i64 - c as i64)
                };
                pattern_check(
                    &mut r,
                    &mask,
                    (sq, sk, block, heads),
                    m,
                    &pair,
                    &format!("{what} fixed s {s} c {c}"),
                );
            }
            4 => {
                // Random passages summing to the key block count.
                let mut passages = Vec::new();
                let mut left = nk;
                while left > 0 {
                    let p = r.random_range(1..=left.min(3));
                    passages.push(p);
                    left -= p;
                }
                let mask = block_attention(&shape, &passages).unwrap();
                let starts: Vec<usize> = passages
                    .iter()
                    .scan(0, |a, &p| {
                        *a += p;
                        Some(*a - p)
                    })
                    .collect();
                let passage_of = move |kb: usize| starts.iter().rposition(|&st| st <= kb).unwrap();
                let last = passages.len() - 1;
                let pair = move |_: usize, qb: usize, kb: usize| {
                    passage_of(qb) == last || passage_of(qb) == passage_of(kb)
                };
                pattern_check(
                    &mut r,
                    &mask,
                    (sq, sk, block, heads),
                    m,
                    &pair,
                    &format!("{what} block-attention {passages:?}"),
                );
            }
            5 => {
                let windows: Vec<usize> = (0..heads).map(|_| r.random_range(1..=4)).collect();
                let mask = per_head_windows(&shape, &windows).unwrap();
                let ws = windows.clone();
                let pair = move |h: usize, qb: usize, kb: usize| kb <= qb && qb - kb < ws[h];
                pattern_check(
                    &mut r,
                    &mask,
                    (sq, sk, block, heads),
                    m,
                    &pair,
                    &format!("{what} mswa {windows:?}"),
                );
            }
            _ => {
                let streaming: Vec<bool> = (0..heads).map(|_| r.random_bool(0.6)).collect();
                let (sink, window) = (r.random_range(0..=2), r.random_range(0..=3));
                let mask = streaming_heads(&shape, &streaming, sink, window).unwrap();
                let st = streaming.clone();
                let pair = move |h: usize, qb: usize, kb: usize| {
                    kb <= qb && (!st[h] || kb < sink || qb - kb < window)
                };
                pattern_check(
                    &mut r,
                    &mask,
                    (sq, sk, block, heads),
                    m,
                    &pair,
                    &format!("{what} duo {streaming:?} sink {sink} w {window}"),
                );
            }
        }
    }
}

/// BigBird's documented generator: `min(count, blocks)` distinct sorted blocks in range,
/// the same for the same `(seed, head, q_block)`, spread over every block.
#[test]
fn bigbird_random_blocks_contract() {
    let mut hits = [0usize; 10];
    for seed in 0..40u64 {
        for h in 0..3 {
            for qb in 0..5 {
                for (nk, count) in [(10, 3), (4, 9), (1, 1), (7, 0), (0, 2)] {
                    let v = bigbird_random_blocks(seed, h, qb, nk, count).unwrap();
                    assert_eq!(v.len(), count.min(nk), "{seed} {h} {qb} {nk} {count}");
                    assert!(v.windows(2).all(|w| w[0] < w[1]) && v.iter().all(|&x| x < nk));
                    assert_eq!(v, bigbird_random_blocks(seed, h, qb, nk, count).unwrap());
                    if nk == 10 {
                        v.iter().for_each(|&x| hits[x] += 1);
                    }
                }
            }
        }
    }
    assert!(hits.iter().all(|&n| n > 100), "every block drawn: {hits:?}");
    assert!(
        bigbird_random_blocks(1, usize::MAX, usize::MAX, usize::MAX, 3)
            .unwrap()
            .len()
            == 3
    );
    // More blocks than a list can hold: refused before anything is allocated.
    assert!(matches!(
        bigbird_random_blocks(1, 0, 0, usize::MAX, usize::MAX),
        Err(longattn::BlockMaskError::TooLarge { .. })
    ));
}

/// Bad pattern arguments are errors: `sq > sk`, a difference not a multiple of the block,
/// block 0, stride 0, per-head arguments of the wrong length, windows of 0 blocks,
/// passages not summing to the key blocks (or empty ones, or overflowing).
#[test]
fn block_pattern_probes() {
    let shape = |sq, sk, block, heads| PatternShape {
        heads,
        seqlen_q: sq,
        seqlen_k: sk,
        block,
        mask: AttentionOptions::causal().effective_mask(),
    };
    for s in [shape(9, 8, 2, 1), shape(4, 9, 2, 1), shape(4, 8, 0, 1)] {
        assert!(longformer(&s, 1, 1).is_err(), "{s:?}");
        assert!(bigbird(&s, 1, 1, 1, 7).is_err(), "{s:?}");
        assert!(sparse_transformer_strided(&s, 2).is_err(), "{s:?}");
        assert!(sparse_transformer_fixed(&s, 2, 1).is_err(), "{s:?}");
        assert!(block_attention(&s, &[1, 1, 1, 1]).is_err(), "{s:?}");
        assert!(per_head_windows(&s, &[1]).is_err(), "{s:?}");
        assert!(streaming_heads(&s, &[true], 1, 1).is_err(), "{s:?}");
    }
    let s = shape(8, 8, 2, 2);
    assert!(sparse_transformer_strided(&s, 0).is_err());
    assert!(sparse_transformer_fixed(&s, 0, 1).is_err());
    assert!(per_head_windows(&s, &[1]).is_err());
    assert!(per_head_windows(&s, &[1, 0]).is_err());
    assert!(streaming_heads(&s, &[true, false, true], 1, 1).is_err());
    for passages in [&[1usize, 2][..], &[4, 0], &[], &[usize::MAX, 5], &[2, 2, 1]] {
        assert!(block_attention(&s, passages).is_err(), "{passages:?}");
    }
    assert!(block_attention(&s, &[4]).is_ok());
    for heads in [0, usize::MAX] {
        let s = shape(8, 8, 2, heads);
        assert!(bigbird(&s, 1, 1, 1, 3).is_err(), "heads {heads}");
        assert!(per_head_windows(&s, &[]).is_err(), "heads {heads}");
        assert!(streaming_heads(&s, &[], 1, 1).is_err(), "heads {heads}");
    }
    assert!(longformer(&shape(0, 0, 3, 1), 1, 1).is_ok());
}

// =======================================================================================
// Bad inputs: every one an Err, never a panic
// =======================================================================================

/// Paged decode / Quest / prefill / append and the cache itself on out-of-range, overflowing,
/// zero and inconsistent sizes.
#[test]
fn paged_bad_inputs() {
    let big = i32::MAX as usize + 1;
    let layout = PagedLayout {
        num_pages: 4,
        page_size: 2,
        heads_kv: 1,
        head_dim: 4,
    };
    let table = [0i32, 1, 2, 3];
    let sl = [3i32, 2];
    let pt = |block_table, max_pages_per_seq, seqlens_k| PageTable {
        block_table,
        max_pages_per_seq,
        seqlens_k,
    };
    let bad_layouts = [
        PagedLayout {
            page_size: 0,
            ..layout
        },
        PagedLayout {
            heads_kv: 0,
            ..layout
        },
        PagedLayout {
            head_dim: 0,
            ..layout
        },
        PagedLayout {
            num_pages: big,
            ..layout
        },
        PagedLayout {
            head_dim: usize::MAX,
            heads_kv: usize::MAX,
            ..layout
        },
        PagedLayout {
            page_size: big,
            ..layout
        },
    ];
    for l in bad_layouts {
        assert!(PagedCache::new(l, pt(&table, 2, &sl)).is_err(), "{l:?}");
    }
    let bad_tables: [(&[i32], usize, &[i32]); 7] = [
        (&table, 0, &sl),
        (&table, 2, &[]),
        (&table[..3], 2, &sl),
        (&table, 2, &[-1, 2]),
        (&table, 2, &[5, 2]),
        (&[0, 1, 4, 3], 2, &sl),
        (&[0, 1, -1, 3], 2, &sl),
    ];
    for (t, mp, s) in bad_tables {
        assert!(
            PagedCache::new(layout, pt(t, mp, s)).is_err(),
            "{t:?} {mp} {s:?}"
        );
    }
    assert!(PagedCache::new(layout, pt(&[0; 2], 1, &[0, 0])).is_ok());
    let cache = PagedCache::new(layout, pt(&table, 2, &sl)).unwrap();
    let o = AttentionOptions::default();
    assert!(PagedDecode::new(&cache, 0, 1, &o).is_err());
    assert!(PagedDecode::new(&cache, big, 1, &o).is_err());
    assert!(PagedDecode::new(&cache, 2, 0, &o).is_err());
    assert!(PagedDecode::new(&cache, 2, 17, &o).is_err());
    assert!(PagedDecode::new(&cache, 2, 1, &o.with_scale(0.0)).is_err());
    assert!(PagedDecode::new(&cache, 2, 1, &o.with_sinks(big)).is_err());
    assert!(
        PagedDecode::new(
            &cache,
            2,
            1,
            &o.with_window(Window::new(Some(big), Some(1)))
        )
        .is_err()
    );
    assert!(PagedDecode::new(&cache, 2, 1, &o.with_window(Window::new(None, Some(big)))).is_err());
    let dec = PagedDecode::new(&cache, 2, 2, &o).unwrap();
    assert!(dec.clone().with_splits(Some(0)).is_err());
    assert!(dec.clone().with_splits(Some(65536)).is_err());
    let quest = |token_budget, sink_pages| {
        SparsePolicy::uniform(1, HeadPolicy::Quest).with_quest(QuestConfig {
            token_budget,
            sink_pages,
        })
    };
    assert!(
        dec.clone()
            .with_policy(SparsePolicy::uniform(2, HeadPolicy::Full))
            .is_err()
    );
    assert!(dec.clone().with_policy(quest(big, 0)).is_err());
    assert!(dec.clone().with_policy(quest(0, big)).is_err());
    let streaming = |window| {
        SparsePolicy::uniform(1, HeadPolicy::Streaming)
            .with_streaming(longattn::StreamingConfig { sinks: 1, window })
    };
    assert!(dec.clone().with_policy(streaming(0)).is_err());
    assert!(dec.clone().with_policy(streaming(big)).is_err());
    // Buffers: q / out / lse / cache / meta of the wrong length; Quest without metadata.
    let n = dec.out_len();
    let (q, kc, meta) = (
        vec![0.5f32; n],
        vec![0.5f32; layout.cache_len()],
        vec![0.5f32; layout.meta_len()],
    );
    let qs = Strides::contiguous(2, 2, 4);
    let qdec = dec.clone().with_policy(quest(4, 1)).unwrap();
    let run = |d: &PagedDecode, qn: usize, on: usize, ln: usize, kn: usize, mn: Option<usize>| {
        let mut out = vec![0.0f32; on];
        let mut lse = vec![0.0f32; ln];
        d.forward_cpu(
            Strided::new(&q[..qn], qs),
            KvPages {
                k: &kc[..kn],
                v: &kc[..],
            },
            mn.map(|m| PageMeta {
                kmin: &meta[..m],
                kmax: &meta[..],
            }),
            Strided::new(&mut out[..], qs),
            Some(&mut lse),
        )
    };
    let (ln, kn, mn) = (dec.lse_len(), kc.len(), meta.len());
    assert!(run(&dec, n, n, ln, kn, None).is_ok());
    assert!(run(&qdec, n, n, ln, kn, Some(mn)).is_ok());
    for (qn, on, l, k, m) in [
        (n - 1, n, ln, kn, None),
        (n, n - 1, ln, kn, None),
        (n, n, ln - 1, kn, None),
        (n, n, ln, kn - 1, None),
    ] {
        assert!(
            run(&dec, qn, on, l, k, m).is_err(),
            "decode {qn} {on} {l} {k}"
        );
    }
    assert!(
        run(&qdec, n, n, ln, kn, None).is_err(),
        "Quest without metadata"
    );
    assert!(
        run(&qdec, n, n, ln, kn, Some(mn - 1)).is_err(),
        "short metadata"
    );
    assert!(
        qdec.select_cpu(
            Strided::new(&q[..n - 1], qs),
            PageMeta {
                kmin: &meta[..],
                kmax: &meta[..]
            }
        )
        .is_err()
    );
    assert!(
        qdec.select_cpu(
            Strided::new(&q[..], qs),
            PageMeta {
                kmin: &meta[..1],
                kmax: &meta[..]
            }
        )
        .is_err()
    );
    // Prefill.
    assert!(PagedPrefill::new(&cache, 2, 0, &o).is_err());
    assert!(PagedPrefill::new(&cache, 0, 1, &o).is_err());
    assert!(PagedPrefill::new(&cache, 2, 1, &o.with_sinks(big)).is_err());
    for cu in [
        &[0, 1][..],
        &[0, 2, 1],
        &[1, 2, 3],
        &[0, 0, 0],
        &[0, -1, 2],
        &[0, i32::MAX, -2],
    ] {
        assert!(
            PagedPrefill::new_varlen(&cache, 2, cu, &o).is_err(),
            "{cu:?}"
        );
    }
    let pre = PagedPrefill::new_varlen(&cache, 2, &[0, 1, 3], &o).unwrap();
    let mut out = vec![0.0f32; pre.out_len()];
    let ps = Strides::contiguous(0, 2, 4);
    assert!(
        pre.forward_cpu(
            Strided::new(&q[..pre.out_len() - 1], ps),
            KvPages {
                k: &kc[..],
                v: &kc[..]
            },
            Strided::new(&mut out[..], ps),
            None
        )
        .is_err()
    );
    let mut short = vec![0.0f32; 1];
    assert!(
        pre.forward_cpu(
            Strided::new(&q[..pre.out_len()], ps),
            KvPages {
                k: &kc[..],
                v: &kc[..]
            },
            Strided::new(&mut out[..], ps),
            Some(&mut short)
        )
        .is_err()
    );
    // Append: malformed cu_seqlens, more new tokens than the sequence holds, one page
    // written by two sequences, short inputs, caches and metadata of the wrong length.
    let (mut k, mut v) = (kc.clone(), kc.clone());
    let (mut kmin, mut kmax) = (meta.clone(), meta.clone());
    let new = [0.25f32; 5 * 4];
    let ns = Strides::contiguous(0, 1, 4);
    let shared = PagedCache::new(layout, pt(&[0, 1, 1, 3], 2, &[4, 4])).unwrap();
    let mut append = |c: &PagedCache, cu: &[i32], nn: usize, kn: usize, mn: usize| {
        c.append_cpu(
            cu,
            Strided::new(&new[..nn], ns),
            Strided::new(&new[..], ns),
            KvPages {
                k: &mut k[..kn],
                v: &mut v[..],
            },
            Some(PageMeta {
                kmin: &mut kmin[..mn],
                kmax: &mut kmax[..],
            }),
        )
    };
    let (kn, mn) = (kc.len(), meta.len());
    assert!(append(&cache, &[0, 3, 5], 20, kn, mn).is_ok());
    for (cu, nn, k_, m_) in [
        (&[0, 3][..], 20, kn, mn),
        (&[0, 4, 5], 20, kn, mn),
        (&[1, 3, 5], 20, kn, mn),
        (&[0, 3, 2], 20, kn, mn),
        (&[0, 3, 5], 19, kn, mn),
        (&[0, 3, 5], 20, kn - 1, mn),
        (&[0, 3, 5], 20, kn, mn - 1),
        (&[0, i32::MAX, 5], 20, kn, mn),
    ] {
        assert!(
            append(&cache, cu, nn, k_, m_).is_err(),
            "append {cu:?} {nn} {k_} {m_}"
        );
    }
    assert!(
        append(&shared, &[0, 1, 5], 20, kn, mn).is_err(),
        "page 1 written twice"
    );
}

/// The FP8 forward's own arguments: output type, descale counts and values.
#[test]
fn fp8_dense_bad_inputs() {
    let dims = (2, 3, 5, 2, 1, 4);
    let attn = dense(dims, &AttentionOptions::default()).unwrap();
    let (qs, ks) = contiguous(dims);
    let q = [F8E4M3::from_f32(0.5); 2 * 3 * 2 * 4];
    let k = [F8E4M3::from_f32(0.5); 2 * 5 * 4];
    let ok = [1.0f32; 2];
    let run = |d: [&[f32]; 3], o: &mut [bf16]| {
        attn.forward_cpu_fp8(
            Strided::new(&q[..], qs),
            Strided::new(&k[..], ks),
            Strided::new(&k[..], ks),
            Fp8Descales {
                q: d[0],
                k: d[1],
                v: d[2],
            },
            Strided::new(o, qs),
            None,
        )
    };
    let mut out = vec![bf16::ZERO; q.len()];
    assert!(run([&ok, &ok, &ok], &mut out).is_ok());
    assert!(run([&[FP8_MAX_DESCALE, 1.0], &ok, &ok], &mut out).is_ok());
    for bad in [
        &[1.0f32][..],
        &[1.0; 3],
        &[0.0, 1.0],
        &[-1.0, 1.0],
        &[f32::NAN, 1.0],
        &[f32::INFINITY, 1.0],
        &[FP8_MAX_DESCALE * 1.01, 1.0],
    ] {
        for at in 0..3 {
            let mut d = [&ok[..], &ok[..], &ok[..]];
            d[at] = bad;
            assert!(run(d, &mut out).is_err(), "descale {at} = {bad:?}");
        }
    }
    assert!(run([&ok, &ok, &ok], &mut out[..5]).is_err());
    let mut o32 = vec![0.0f32; q.len()];
    let res = attn.forward_cpu_fp8(
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&k[..], ks),
        Fp8Descales {
            q: &ok[..],
            k: &ok[..],
            v: &ok[..],
        },
        Strided::new(&mut o32[..], qs),
        None,
    );
    assert!(matches!(res, Err(Error::Unsupported(_))), "f32 output");
    let mut lse = vec![0.0f32; attn.lse_len() - 1];
    let res = attn.forward_cpu_fp8(
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&k[..], ks),
        Fp8Descales {
            q: &ok[..],
            k: &ok[..],
            v: &ok[..],
        },
        Strided::new(&mut out[..], qs),
        Some(&mut lse),
    );
    assert!(res.is_err(), "short LSE");
}

// =======================================================================================
// Varlen: FP8 descales per sequence, MoBA over packed sequences; NaN keys in Quest bounds
// =======================================================================================

/// A varlen dense problem over `lq`, `lk` (packed `[total, h, d]`).
fn varlen(
    lq: &[usize],
    lk: &[usize],
    (hq, hkv, d): (usize, usize, usize),
    o: &AttentionOptions,
) -> FlashAttention {
    let (cq, ck) = (offsets(lq), offsets(lk));
    FlashAttention::new(
        &AttentionShape {
            batch: lq.len(),
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            seqlens: SeqLens::Varlen {
                cu_seqlens_q: &cq,
                cu_seqlens_k: &ck,
            },
        },
        o,
    )
    .unwrap()
}

/// Sequence `b`'s rows of a packed `[total, h, d]` tensor.
fn seq_rows(t: &[f64], lens: &[usize], b: usize, hd: usize) -> Vec<f64> {
    let s: usize = lens[..b].iter().sum();
    t[s * hd..(s + lens[b]) * hd].to_vec()
}

/// Sequence `b` of a packed batch (`lq`, `lk` rows per sequence) and its dims.
fn seq_of(
    x: &Tensors,
    (lq, lk): (&[usize], &[usize]),
    b: usize,
    (hq, hkv, d): (usize, usize, usize),
) -> (Tensors, Dims) {
    let xb = Tensors {
        q: seq_rows(&x.q, lq, b, hq * d),
        k: seq_rows(&x.k, lk, b, hkv * d),
        v: seq_rows(&x.v, lk, b, hkv * d),
    };
    (xb, (1, lq[b], lk[b], hq, hkv, d))
}

/// FP8 over a packed batch: sequence `b` uses descales `[b, kv head]`; LSE `[hq, total_q]`.
#[test]
fn fp8_dense_varlen() {
    let mut r = seeded(14);
    let (hq, hkv, d) = (4, 2, 8);
    for (lq, lk) in [
        (vec![3usize, 0, 7], vec![5usize, 4, 0]),
        (vec![1, 130], vec![200, 129]),
    ] {
        let (tq, tk) = (lq.iter().sum::<usize>(), lk.iter().sum::<usize>());
        let x = Tensors {
            q: codes(&mut r, tq * hq * d, 4.0),
            k: codes(&mut r, tk * hkv * d, 4.0),
            v: codes(&mut r, tk * hkv * d, 4.0),
        };
        let n = lq.len() * hkv;
        let desc: Vec<Vec<f32>> = (0..3)
            .map(|_| (0..n).map(|_| r.random_range(0.05f32..0.6)).collect())
            .collect();
        let m = win(-1, -1, 1, true);
        let (mut want, mut blocks, mut slack) = (Vec::new(), Vec::new(), Vec::new());
        for b in 0..lq.len() {
            let (xb, db) = seq_of(&x, (&lq, &lk), b, (hq, hkv, d));
            let ds = |i: usize| &desc[i][b * hkv..(b + 1) * hkv];
            let (o, l, s) = fp8_attend(&xb, db, (ds(0), ds(1), ds(2)), NO_CAP, &|_, i, j| {
                m.shows(i, j, lq[b], lk[b])
            });
            want.extend(o);
            blocks.extend(l);
            slack.extend(s.iter().map(|s| s * 1.01));
        }
        let wlse = pack_lse(&blocks, &lq, hq);
        let attn = varlen(&lq, &lk, (hq, hkv, d), &m.opts());
        let (qs, ks) = (
            Strides::contiguous(0, hq, d),
            Strides::contiguous(0, hkv, d),
        );
        let ds = [&desc[0][..], &desc[1][..], &desc[2][..]];
        let (got, lse) = fp8_forward::<f16>(&attn, &x, [qs, ks, ks, qs], ds, x.q.len()).unwrap();
        let what = format!("fp8 varlen {lq:?}/{lk:?}");
        verify_slack(
            &what,
            d,
            tol_of(DType::F16),
            (&got, &lse),
            (&want, &wlse),
            Some(&slack),
        );
    }
}

/// MoBA over a packed batch: per-token lists in the varlen LSE row order (`[hq, total_q]`),
/// per-block lists per sequence (empty past its last query block), and the attention.
#[test]
fn moba_varlen() {
    let mut r = seeded(15);
    let (hq, hkv, d) = (2, 1, 4);
    for n in 0..30 {
        let batch = r.random_range(1..=3);
        let lq: Vec<usize> = (0..batch).map(|_| r.random_range(0..=20)).collect();
        let lk: Vec<usize> = (0..batch).map(|_| r.random_range(0..=25)).collect();
        let (tq, tk) = (lq.iter().sum::<usize>(), lk.iter().sum::<usize>());
        if tq == 0 {
            continue;
        }
        let (bn, top_k, bm) = (
            r.random_range(1..=5),
            r.random_range(1..=4),
            r.random_range(1..=6),
        );
        let x = Tensors {
            q: draw::<f32>(&mut r, tq * hq * d),
            k: draw::<f32>(&mut r, tk * hkv * d),
            v: draw::<f32>(&mut r, tk * hkv * d),
        };
        let m = win(-1, -1, 0, true);
        let attn = varlen(&lq, &lk, (hq, hkv, d), &m.opts());
        let (qs, ks) = (
            Strides::contiguous(0, hq, d),
            Strides::contiguous(0, hkv, d),
        );
        let (qf, kf, vf): (Vec<f32>, Vec<f32>, Vec<f32>) = (cast(&x.q), cast(&x.k), cast(&x.v));
        let cfg = MobaConfig { block_n: bn, top_k };
        let what = format!("moba varlen {n} {lq:?}/{lk:?} bn {bn} top {top_k} bm {bm}");
        let rows = moba_select_cpu(
            &attn,
            &cfg,
            Strided::new(&qf[..], qs),
            Strided::new(&kf[..], ks),
        )
        .unwrap();
        let slots = rows.top_k();
        let mut sel = vec![Vec::new(); hq * tq];
        let mut q0 = 0;
        for b in 0..batch {
            let (qb, kb) = (
                seq_rows(&x.q, &lq, b, hq * d),
                seq_rows(&x.k, &lk, b, hkv * d),
            );
            let want = moba_rows(&qb, &kb, (lq[b], lk[b], hq, hkv, d), (bn, top_k));
            for h in 0..hq {
                for i in 0..lq[b] {
                    let at = h * tq + q0 + i;
                    let got: Vec<usize> = rows.blocks()[at * slots..(at + 1) * slots]
                        .iter()
                        .filter(|&&x| x >= 0)
                        .map(|&x| x as usize)
                        .collect();
                    if let Some(w) = &want[h][i] {
                        assert_eq!(&got, w, "{what}: row ({b},{h},{i})");
                    }
                    sel[at] = got;
                }
            }
            q0 += lq[b];
        }
        let bs = moba_attention(
            &attn,
            &cfg,
            bm,
            Strided::new(&qf[..], qs),
            Strided::new(&kf[..], ks),
        )
        .unwrap();
        let mut out = vec![f32::NAN; x.q.len()];
        let mut lse = vec![f32::NAN; attn.lse_len()];
        bs.forward_cpu(
            Strided::new(&qf[..], qs),
            Strided::new(&kf[..], ks),
            Strided::new(&vf[..], ks),
            Strided::new(&mut out[..], qs),
            Some(&mut lse),
        )
        .unwrap();
        let (mut want, mut blocks) = (Vec::new(), Vec::new());
        for b in 0..batch {
            let (xb, db) = seq_of(&x, (&lq, &lk), b, (hq, hkv, d));
            let q0: usize = lq[..b].iter().sum();
            let (o, l) = attend(&xb, db, NO_CAP, &|_, h, i, j| {
                m.shows(i, j, lq[b], lk[b]) && sel[h * tq + q0 + i].contains(&(j / bn))
            });
            want.extend(o);
            blocks.extend(l);
        }
        let wlse = pack_lse(&blocks, &lq, hq);
        verify(&what, d, 3e-5, (&widen(&out), &lse), (&want, &wlse));
        // Query-block lists: per sequence, empty past its own last query block.
        let mask = moba_select_blocks_cpu(
            &attn,
            &cfg,
            bm,
            Strided::new(&qf[..], qs),
            Strided::new(&kf[..], ks),
        )
        .unwrap();
        let nqb = lq.iter().max().unwrap().div_ceil(bm);
        for b in 0..batch {
            for h in 0..hq {
                for qb in 0..nqb {
                    let l = mask.list(b, h, qb).unwrap();
                    if qb >= lq[b].div_ceil(bm) {
                        assert!(
                            l.is_empty(),
                            "{what}: list ({b},{h},{qb}) past the sequence"
                        );
                    }
                    assert!(
                        l.indices
                            .iter()
                            .all(|&kb| (kb as usize) < lk[b].div_ceil(bn)),
                        "{what}: list ({b},{h},{qb}) past the keys"
                    );
                }
            }
        }
        BlockSparseAttention::new(attn, mask).unwrap();
    }
}

/// A NaN key is skipped by the Quest bounds (docs "FP8 KV cache"): a channel whose keys in a
/// page are all NaN has bounds `(+inf, -inf)`, which are `(448, -448)` in e4m3; other keys of
/// the page still bound their channel.
#[test]
fn quest_bounds_skip_nan_keys() {
    fn case<C: Element>(hi: f32) {
        let layout = PagedLayout {
            num_pages: 1,
            page_size: 4,
            heads_kv: 1,
            head_dim: 2,
        };
        let cache = PagedCache::new(
            layout,
            PageTable {
                block_table: &[0],
                max_pages_per_seq: 1,
                seqlens_k: &[3],
            },
        )
        .unwrap();
        // Channel 0 all NaN; channel 1 NaN, 0.5, -0.25.
        let k = [f32::NAN, f32::NAN, f32::NAN, 0.5, f32::NAN, -0.25];
        let st = Strides::contiguous(0, 1, 2);
        let (mut kc, mut vc) = (vec![C::default(); 8], vec![C::default(); 8]);
        let (mut lo, mut up) = (vec![C::default(); 2], vec![C::default(); 2]);
        cache
            .append_cpu(
                &[0, 3],
                Strided::new(&k[..], st),
                Strided::new(&k[..], st),
                KvPages {
                    k: &mut kc[..],
                    v: &mut vc[..],
                },
                Some(PageMeta {
                    kmin: &mut lo[..],
                    kmax: &mut up[..],
                }),
            )
            .unwrap();
        let what = format!("{:?}", C::DTYPE);
        assert_eq!(
            (lo[0].to_f32(), up[0].to_f32()),
            (hi, -hi),
            "{what}: all-NaN channel"
        );
        assert_eq!(
            (lo[1].to_f32(), up[1].to_f32()),
            (-0.25, 0.5),
            "{what}: NaN skipped"
        );
    }
    case::<f32>(f32::INFINITY);
    case::<f16>(f32::INFINITY);
    case::<F8E4M3>(448.0);
}
