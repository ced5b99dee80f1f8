//! Property tests (issue 11): every public constructor and CPU entry point of each family
//! with extreme values (0, 1, `usize::MAX`, `i64::MIN`, NaN, ±inf, subnormals, huge and
//! overlapping strides, short buffers, hostile C pointers). Each call must return an error
//! or a correct result: never panic (the test profile keeps overflow checks on), abort or
//! make a huge allocation (the global allocator below refuses any single allocation above
//! [`ALLOC_CAP`], which aborts the binary loudly). Where a call succeeds on a small shape,
//! the result is compared against the f64 references of `longattn::reference`.
//!
//! Extreme sizes stay on paths that must fail validation or that cost nothing (accessors,
//! constructors); what really runs is bounded (a handful of tokens). Fixed case counts and
//! no persistence keep CI deterministic; longer runs use the `fuzz/` targets (fuzz/README.md).

use longattn::block_sparse::moba::{self, MobaConfig};
use longattn::block_sparse::patterns::{self, PatternShape};
use longattn::capi;
use longattn::neighborhood::schedule;
use longattn::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use std::alloc::{GlobalAlloc, Layout, System};

/// Largest single allocation any call may make here (the biggest legitimate buffer of the
/// suite is a few KiB): more means a size that validation did not bound.
const ALLOC_CAP: usize = 256 << 20;

struct Capped;

// SAFETY: forwards to the system allocator; refuses (null) what is above the cap, which
// makes the standard library abort with "memory allocation of N bytes failed".
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_CAP {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_CAP {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOC_CAP {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Capped = Capped;

/// A fixed number of cases, a fixed seed and no persistence file: CI runs the same cases
/// every time (the `fuzz/` targets explore further).
fn run<S: Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x1_0a77),
        ..Config::default()
    })
    .run(&strategy, test)
    .unwrap();
}

/// Sizes: the edges and a few small values.
fn size() -> impl Strategy<Value = usize> + Clone {
    prop_oneof![
        4 => 0usize..6,
        1 => Just(usize::MAX),
        1 => Just(i32::MAX as usize),
        1 => Just(i32::MAX as usize + 1),
        1 => Just(i64::MAX as usize),
        1 => Just(1usize << 40),
        1 => Just(65_536usize),
    ]
}

/// Floats for scale and softcap: ordinary values and every edge.
fn float() -> impl Strategy<Value = f32> + Clone {
    prop_oneof![
        4 => 0.05f32..4.0,
        1 => -4.0f32..0.0,
        1 => Just(0.0f32),
        1 => Just(-0.0f32),
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(f32::MAX),
        1 => Just(f32::MIN_POSITIVE),
        1 => Just(1e-40f32),
        1 => Just(MAX_SCALE),
        1 => Just(MAX_SCALE * 2.0),
    ]
}

fn stride() -> impl Strategy<Value = i64> + Clone {
    prop_oneof![
        4 => 0i64..40,
        1 => Just(i64::MIN),
        1 => Just(i64::MAX),
        1 => Just(-1i64),
        1 => Just(1i64 << 40),
        1 => Just(i64::MAX / 2 + 1),
    ]
}

fn strides() -> impl Strategy<Value = Strides> + Clone {
    (stride(), stride(), stride()).prop_map(|(batch, seq, head)| Strides { batch, seq, head })
}

fn side() -> impl Strategy<Value = Option<usize>> + Clone {
    prop_oneof![2 => Just(None), 1 => (0usize..4).prop_map(Some), 1 => size().prop_map(Some)]
}

fn options() -> impl Strategy<Value = AttentionOptions> + Clone {
    (
        prop::option::weighted(0.3, float()),
        prop::option::weighted(0.3, float()),
        (side(), side(), prop_oneof![3 => Just(0usize), 1 => size()]),
        any::<bool>(),
    )
        .prop_map(|(scale, softcap, (l, r, sinks), causal)| AttentionOptions {
            scale,
            softcap,
            mask: Mask::new(Window::new(l, r), sinks),
            causal,
        })
}

/// Options a neighborhood or star problem accepts (no window, no sinks) but extreme values.
fn plain_options() -> impl Strategy<Value = AttentionOptions> + Clone {
    (
        prop::option::weighted(0.3, float()),
        prop::option::weighted(0.3, float()),
    )
        .prop_map(|(scale, softcap)| AttentionOptions {
            scale,
            softcap,
            ..Default::default()
        })
}

/// Deterministic small values for a buffer of `n` elements.
fn data(n: usize, salt: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * salt + salt).sin()).collect()
}

/// Whether the comparison with the f64 reference is meaningful: a moderate scale (a huge
/// one makes the softmax an argmax whose winner f32 rounding may pick differently).
fn comparable(scale: f32) -> bool {
    scale <= 8.0
}

/// `got` (f32) against `want` (f64): NaN where the reference is NaN, close elsewhere.
fn check_close(got: &[f32], want: &[f64], what: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len(), "{} lengths", what);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() || g.is_nan() {
            prop_assert!(g.is_nan() && w.is_nan(), "{what}[{i}]: {g} vs {w}");
        } else if w.is_infinite() || g.is_infinite() {
            prop_assert!(g as f64 == w, "{what}[{i}]: {g} vs {w}");
        } else {
            prop_assert!(
                (g as f64 - w).abs() <= 2e-3 * (1.0 + w.abs()),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }
    Ok(())
}

/// Every element offset of a `[outer, seq, heads, head_dim]` view, or `None` when a stride
/// is negative or an offset overflows (the brute-force oracle of the layout checks).
fn offsets(s: &Strides, dims: [usize; 4]) -> Option<Vec<i128>> {
    if s.batch < 0 || s.seq < 0 || s.head < 0 {
        return None;
    }
    let mut v = Vec::new();
    for b in 0..dims[0] {
        for i in 0..dims[1] {
            for h in 0..dims[2] {
                for c in 0..dims[3] {
                    v.push(
                        b as i128 * s.batch as i128
                            + i as i128 * s.seq as i128
                            + h as i128 * s.head as i128
                            + c as i128,
                    );
                }
            }
        }
    }
    Some(v)
}

/// Reads a `[outer, seq, heads, head_dim]` view into a contiguous vector.
fn gather(buf: &[f32], s: &Strides, dims: [usize; 4]) -> Vec<f32> {
    offsets(s, dims)
        .unwrap()
        .into_iter()
        .map(|o| buf[o as usize])
        .collect()
}

// ---------------------------------------------------------------------------------------
// Dense
// ---------------------------------------------------------------------------------------

#[test]
fn prop_dense_constructor_and_accessors() {
    let case = (
        (size(), size(), size(), size()),
        (size(), size()),
        options(),
    );
    run(3000, case, |((b, hq, hkv, d), (sq, sk), o)| {
        let shape = AttentionShape {
            batch: b,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            seqlens: SeqLens::Fixed {
                seqlen_q: sq,
                seqlen_k: sk,
            },
        };
        if let Ok(a) = FlashAttention::new(&shape, &o) {
            prop_assert!(b >= 1 && hq >= 1 && hkv >= 1 && d >= 1 && hq % hkv == 0);
            let out = (b as u128) * (sq as u128) * (hq as u128) * (d as u128);
            prop_assert_eq!(a.out_len() as u128, out);
            prop_assert_eq!(a.lse_len() as u128, (b * sq) as u128 * hq as u128);
            prop_assert!(out <= i64::MAX as u128);
            prop_assert!(a.scale().is_finite() && a.scale() > 0.0 && a.scale() <= MAX_SCALE);
            if let Some(c) = a.softcap() {
                prop_assert!(c.is_finite() && c > 0.0 && (a.scale() / c).is_finite());
            }
            prop_assert!(a.span(usize::MAX).is_none());
            prop_assert!(a.span(b).is_none());
            prop_assert!(a.span(b - 1).is_some());
            prop_assert_eq!(a.spans().len(), b);
            prop_assert!(a.kv_head(hq - 1) < hkv);
            let _ = a.kv_head(usize::MAX);
            prop_assert_eq!(
                (a.max_seqlen_q(), a.max_seqlen_k(), a.total_q()),
                (sq, sk, sq)
            );
        }
        // Size helpers never panic; the checked one agrees with the saturating one.
        let c = Strides::contiguous(sq, hq, d);
        if let Ok(t) = Strides::try_contiguous(sq, hq, d) {
            prop_assert_eq!(t, c);
            prop_assert_eq!(t.batch as u128, sq as u128 * hq as u128 * d as u128);
        }
        Ok(())
    });
}

#[test]
fn prop_window_and_mask_helpers() {
    let flash = prop_oneof![
        Just(i64::MIN),
        Just(i64::MAX),
        Just(-2i64),
        Just(-1i64),
        0i64..5,
        Just(i32::MAX as i64),
        Just(i32::MAX as i64 + 1)
    ];
    // The mask helpers take positions inside validated lengths (at most i32::MAX).
    let pos = prop_oneof![3 => 0usize..40, 1 => Just(i32::MAX as usize), 1 => Just(0usize)];
    let case = (
        (flash.clone(), flash),
        size(),
        (side(), side(), size()),
        (pos.clone(), pos.clone(), pos.clone(), pos),
        prop_oneof![1usize..70, Just(i32::MAX as usize)],
    );
    run(
        2000,
        case,
        |((l, r), tokens, (wl, wr, sinks), (i, j, sq, sk), bn)| {
            if let Ok(w) = Window::from_flash(l, r) {
                prop_assert!((-1..=i32::MAX as i64).contains(&l));
                prop_assert_eq!(w.to_flash(), (l, r));
            }
            if let Ok(w) = Window::causal_tokens(tokens) {
                prop_assert_eq!(w, Window::new(Some(tokens - 1), Some(0)));
            }
            let m = Mask::new(Window::new(wl, wr), sinks);
            let mask = Mask::new(
                Window::new(
                    wl.map(|x| x.min(i32::MAX as usize)),
                    wr.map(|x| x.min(i32::MAX as usize)),
                ),
                sinks.min(i32::MAX as usize),
            );
            let _ = m == mask;
            let _ = mask.visible(i, j, sq, sk);
            if i < sq && sk <= 64 {
                let win = mask.window_range(i, sq, sk);
                for jj in 0..sk {
                    if win.contains(&jj) {
                        prop_assert!(mask.visible(i, jj, sq, sk));
                    }
                }
                let rows = i..(i + 3).min(sq);
                let tiles = mask.key_tiles(rows.clone(), sq, sk, bn);
                for jj in 0..sk {
                    if rows.clone().any(|ii| mask.visible(ii, jj, sq, sk)) {
                        prop_assert!(tiles.iter().any(|t| t == jj / bn), "key {jj}");
                    }
                }
                prop_assert!(tiles.count() <= sk.div_ceil(bn));
            }
            Ok(())
        },
    );
}

#[test]
fn prop_dense_varlen_constructor() {
    let cu = prop::collection::vec(
        prop_oneof![
            1 => Just(i32::MIN),
            1 => Just(i32::MAX),
            1 => Just(-1),
            6 => 0i32..9
        ],
        0..6,
    );
    let case = (
        prop_oneof![3 => 0usize..6, 1 => size()],
        cu.clone(),
        cu,
        options(),
    );
    run(2000, case, |(b, mut cq, mut ck, o)| {
        // Half the cases get sorted offsets from 0, which the constructor should accept.
        if b % 2 == 0 {
            for cu in [&mut cq, &mut ck] {
                cu.iter_mut().for_each(|x| *x = x.rem_euclid(9));
                cu.sort();
                if let Some(x) = cu.first_mut() {
                    *x = 0;
                }
            }
        }
        let shape = AttentionShape {
            batch: b,
            heads_q: 2,
            heads_kv: 1,
            head_dim: 4,
            seqlens: SeqLens::Varlen {
                cu_seqlens_q: &cq,
                cu_seqlens_k: &ck,
            },
        };
        if let Ok(a) = FlashAttention::new(&shape, &o) {
            prop_assert!(a.is_varlen());
            prop_assert_eq!(cq.len(), b + 1);
            prop_assert_eq!(a.total_q(), cq[b] as usize);
            prop_assert_eq!(a.out_len(), cq[b] as usize * 8);
            prop_assert_eq!(a.lse_len(), cq[b] as usize * 2);
            for (i, s) in a.spans().enumerate() {
                prop_assert_eq!(s.q_start, cq[i] as usize);
                prop_assert_eq!(s.seqlen_q, (cq[i + 1] - cq[i]) as usize);
                prop_assert_eq!(s.k_start, ck[i] as usize);
                prop_assert_eq!(s.seqlen_k, (ck[i + 1] - ck[i]) as usize);
            }
            prop_assert!(a.span(b).is_none());
        }
        Ok(())
    });
}

/// Inputs of a small problem, with at most one injected non-finite value.
fn inputs(
    nq: usize,
    nk: usize,
    poison: Option<(u8, usize, f32)>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut q, mut k, mut v) = (data(nq, 0.31), data(nk, 0.17), data(nk, 0.23));
    if let Some((which, at, x)) = poison {
        let t = match which % 3 {
            0 => &mut q,
            1 => &mut k,
            _ => &mut v,
        };
        if !t.is_empty() {
            let n = t.len();
            t[at % n] = x;
        }
    }
    (q, k, v)
}

fn poison() -> impl Strategy<Value = Option<(u8, usize, f32)>> + Clone {
    prop::option::weighted(
        0.25,
        (
            any::<u8>(),
            any::<usize>(),
            prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)],
        ),
    )
}

#[test]
fn prop_dense_forward_is_an_error_or_correct() {
    let case = (
        (
            1usize..3,
            1usize..3,
            1usize..3,
            prop_oneof![Just(1usize), Just(2), Just(8)],
        ),
        (0usize..6, 0usize..6),
        options(),
        prop::option::weighted(0.4, strides()),
        (0usize..3, any::<bool>(), poison()),
    );
    run(
        800,
        case,
        |((b, g, hkv, d), (sq, sk), o, out_strides, (short, with_lse, poison))| {
            let hq = g * hkv;
            let shape = AttentionShape {
                batch: b,
                heads_q: hq,
                heads_kv: hkv,
                head_dim: d,
                seqlens: SeqLens::Fixed {
                    seqlen_q: sq,
                    seqlen_k: sk,
                },
            };
            let Ok(attn) = FlashAttention::new(&shape, &o) else {
                return Ok(());
            };
            let (qs, ks) = (
                Strides::contiguous(sq, hq, d),
                Strides::contiguous(sk, hkv, d),
            );
            let (q, k, v) = inputs(attn.out_len(), b * sk * hkv * d, poison);
            let os = out_strides.unwrap_or(qs);
            let out_len = if out_strides.is_some() {
                300 - short
            } else {
                attn.out_len().saturating_sub(short)
            };
            let mut out = vec![0.0f32; out_len];
            let mut lse = vec![0.0f32; attn.lse_len().saturating_sub(short)];
            let r = attn.forward_cpu(
                Strided::new(&q[..], qs),
                Strided::new(&k[..], ks),
                Strided::new(&v[..], ks),
                Strided::new(&mut out[..], os),
                with_lse.then_some(&mut lse[..]),
            );
            // The layout oracle: Ok iff every out element is in the buffer, out does not
            // alias itself, and the LSE is long enough.
            let dims = [b, sq, hq, d];
            let valid_out = offsets(&os, dims).is_some_and(|offs| {
                let mut sorted = offs.clone();
                sorted.sort();
                sorted.dedup();
                sorted.len() == offs.len() && offs.iter().all(|&x| x < out_len as i128)
            });
            let valid_lse = !with_lse || lse.len() >= attn.lse_len();
            prop_assert_eq!(r.is_ok(), valid_out && valid_lse, "{:?}", r);
            if r.is_ok() && comparable(attn.scale()) {
                let (want, want_lse) = reference::dense_attention_f64(
                    &attn,
                    Strided::new(&q[..], qs),
                    Strided::new(&k[..], ks),
                    Strided::new(&v[..], ks),
                )
                .unwrap();
                check_close(&gather(&out, &os, dims), &want, "out")?;
                if with_lse {
                    check_close(&lse, &want_lse, "lse")?;
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------
// Merge
// ---------------------------------------------------------------------------------------

#[test]
fn prop_merge_is_an_error_or_correct() {
    let lse = prop_oneof![
        4 => -3.0f32..3.0,
        1 => Just(f32::NEG_INFINITY),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NAN)
    ];
    let dim = prop_oneof![3 => 0usize..3, 1 => size()];
    let case = (
        (dim.clone(), dim.clone(), dim.clone(), dim),
        (any::<bool>(), 0usize..40, 0usize..10),
        (lse.clone(), lse),
    );
    run(
        2000,
        case,
        |((batch, seqlen, heads, head_dim), (exact, ol, ll), (la, lb))| {
            let m = MergeShape {
                batch,
                seqlen,
                heads,
                head_dim,
            };
            let (o_len, lse_len) = (m.o_len(), m.lse_len());
            // Exact lengths when they are small, else arbitrary small buffers.
            let (ol, ll) = if exact && o_len <= 64 && lse_len <= 64 {
                (o_len, lse_len)
            } else {
                (ol, ll)
            };
            let a_o = data(ol, 0.5);
            let b_o = data(ol, 0.9);
            let (a_l, b_l) = (vec![la; ll], vec![lb; ll]);
            let mut o = vec![0.0f32; ol];
            let mut l = vec![0.0f32; ll];
            let r = m.merge_cpu(
                Partial {
                    o: &a_o[..],
                    lse: &a_l[..],
                },
                Partial {
                    o: &b_o[..],
                    lse: &b_l[..],
                },
                Partial {
                    o: &mut o[..],
                    lse: &mut l[..],
                },
            );
            if r.is_ok() {
                let want_o = batch as u128 * seqlen as u128 * heads as u128 * head_dim as u128;
                prop_assert_eq!(ol as u128, want_o);
                prop_assert_eq!(ll as u128, batch as u128 * seqlen as u128 * heads as u128);
                let (wa, wb, want) = softmax::merge_weights(la, lb);
                for &x in &l {
                    prop_assert!(x.to_bits() == want.to_bits() || (x.is_nan() && want.is_nan()));
                }
                for (i, &x) in o.iter().enumerate() {
                    let w = wa * a_o[i] + wb * b_o[i];
                    prop_assert!(x == w || (x.is_nan() && w.is_nan()), "{x} vs {w}");
                }
            }
            let mut acc_o = a_o.clone();
            let mut acc_l = a_l.clone();
            let r2 = m.merge_into_cpu(
                Partial {
                    o: &mut acc_o[..],
                    lse: &mut acc_l[..],
                },
                Partial {
                    o: &b_o[..],
                    lse: &b_l[..],
                },
            );
            prop_assert_eq!(r.is_ok(), r2.is_ok());
            if r2.is_ok() {
                prop_assert!(
                    acc_o
                        .iter()
                        .zip(&o)
                        .all(|(a, b)| a.to_bits() == b.to_bits())
                );
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------
// Paged
// ---------------------------------------------------------------------------------------

fn head_policy() -> impl Strategy<Value = HeadPolicy> + Clone {
    prop_oneof![
        Just(HeadPolicy::Full),
        Just(HeadPolicy::Streaming),
        Just(HeadPolicy::Quest),
        Just(HeadPolicy::Listed)
    ]
}

#[test]
fn prop_paged_constructors_and_accessors() {
    let table = prop::collection::vec(
        prop_oneof![1 => Just(-1i32), 1 => Just(i32::MAX), 1 => Just(i32::MIN), 6 => 0i32..4],
        0..9,
    );
    let seqlens = prop::collection::vec(
        prop_oneof![1 => Just(-1i32), 1 => Just(i32::MAX), 6 => 0i32..9],
        0..4,
    );
    let dim = prop_oneof![3 => 1usize..5, 1 => size()];
    let case = (
        (dim.clone(), dim.clone(), dim.clone(), dim.clone()),
        (dim.clone(), table, seqlens),
        (dim, size(), options()),
        (size(), size(), prop::option::of(size())),
    );
    run(
        3000,
        case,
        |((np, ps, hkv, d), (mp, bt, sl), (hq, ql, o), (x, y, splits))| {
            let layout = PagedLayout {
                num_pages: np,
                page_size: ps,
                heads_kv: hkv,
                head_dim: d,
            };
            let _ = (layout.cache_len(), layout.meta_len());
            // (`cache_len`/`meta_len` saturate for layouts that `PagedCache::new` refuses.)
            if let Some(off) = layout.slot_offset(x, y, x) {
                prop_assert!(
                    off.checked_add(d).is_some_and(|e| e <= layout.cache_len())
                        || layout.cache_len() == usize::MAX
                );
            }
            if let Some(off) = layout.meta_offset(x, y) {
                prop_assert!(
                    off.checked_add(d).is_some_and(|e| e <= layout.meta_len())
                        || layout.meta_len() == usize::MAX
                );
            }
            let Ok(cache) = PagedCache::new(
                layout,
                PageTable {
                    block_table: &bt,
                    max_pages_per_seq: mp,
                    seqlens_k: &sl,
                },
            ) else {
                return Ok(());
            };
            let b = cache.batch();
            prop_assert_eq!(b, sl.len());
            prop_assert!(cache.seqlen(b).is_none() && cache.seqlen(usize::MAX).is_none());
            prop_assert!(cache.pages_of(usize::MAX).is_none());
            prop_assert!(cache.page_id(usize::MAX, 0).is_none());
            prop_assert!(cache.page_id(0, usize::MAX).is_none());
            prop_assert!(cache.token_offset(0, usize::MAX, 0).is_none());
            prop_assert!(cache.token_offset(0, 0, usize::MAX).is_none());
            for bi in 0..b {
                let n = cache.seqlen(bi).unwrap();
                for lp in 0..cache.pages_of(bi).unwrap() {
                    prop_assert!(cache.page_id(bi, lp).unwrap() < np);
                }
                for j in 0..n {
                    let off = cache.token_offset(bi, j, hkv - 1).unwrap();
                    prop_assert!(off + d <= layout.cache_len());
                }
            }
            let Ok(dec) = PagedDecode::new(&cache, hq, ql, &o) else {
                return Ok(());
            };
            prop_assert!((1..=paged::MAX_Q_LEN).contains(&ql));
            let _ = (dec.out_len(), dec.lse_len(), dec.group(), dec.needs_meta());
            let _ = (dec.splits_for(x), dec.splits_for(usize::MAX));
            let _ = (dec.kv_bytes_read(y), dec.kv_bytes_read(usize::MAX));
            let _ = (dec.kv_head(usize::MAX), dec.max_block_work_pages());
            let _ = (dec.mask_of(0), dec.mask_of(hkv - 1), dec.base_mask());
            if let Ok(d2) = dec.clone().with_splits(splits) {
                let s = d2.splits_for(x);
                prop_assert!((1..=65535).contains(&s));
            }
            Ok(())
        },
    );
}

#[test]
fn prop_paged_forward_append_select() {
    let case = (
        (
            1usize..6,
            1usize..4,
            1usize..3,
            prop_oneof![Just(1usize), Just(4)],
        ),
        (1usize..3, 1usize..3, prop::collection::vec(0i32..9, 1..3)),
        (
            options(),
            1usize..3,
            prop::collection::vec(head_policy(), 1..3),
        ),
        (
            (prop_oneof![Just(0usize), Just(1), Just(3), size()], size()),
            (prop_oneof![Just(0usize), Just(2), Just(5), size()], size()),
            prop::option::of(prop_oneof![1usize..4, size()]),
        ),
        (poison(), any::<u64>(), 0usize..3),
    );
    run(
        800,
        case,
        |(
            (np, ps, hkv, d),
            (g, ql, sl),
            (o, mp_extra, pol),
            ((sw, ss), (tb, sp), splits),
            (poison, seed, short),
        )| {
            let hq = g * hkv;
            let b = sl.len();
            let mp = sl
                .iter()
                .map(|&s| (s as usize).div_ceil(ps))
                .max()
                .unwrap_or(0)
                + mp_extra;
            // Page ids drawn from the seed (valid or one past the end).
            let mut st = seed;
            let bt: Vec<i32> = (0..b * mp)
                .map(|_| {
                    st = st
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((st >> 33) % (np as u64 + u64::from(seed % 7 == 0))) as i32
                })
                .collect();
            let layout = PagedLayout {
                num_pages: np,
                page_size: ps,
                heads_kv: hkv,
                head_dim: d,
            };
            let Ok(cache) = PagedCache::new(
                layout,
                PageTable {
                    block_table: &bt,
                    max_pages_per_seq: mp,
                    seqlens_k: &sl,
                },
            ) else {
                return Ok(());
            };
            let Ok(dec) = PagedDecode::new(&cache, hq, ql, &o) else {
                return Ok(());
            };
            let mut heads: Vec<HeadPolicy> = (0..hkv).map(|i| pol[i % pol.len()]).collect();
            if seed % 5 == 0 {
                heads.push(HeadPolicy::Full); // wrong length
            }
            let policy = SparsePolicy {
                heads,
                streaming: StreamingConfig {
                    sinks: ss,
                    window: sw,
                },
                quest: QuestConfig {
                    token_budget: tb,
                    sink_pages: sp,
                },
            };
            let Ok(dec) = dec.with_policy(policy) else {
                return Ok(());
            };
            let Ok(dec) = dec.with_splits(splits) else {
                return Ok(());
            };
            // Explicit page lists for the Listed heads: every logical page of the sequence.
            let lists: Vec<Vec<usize>> = (0..b * hkv)
                .map(|i| (0..cache.pages_of(i / hkv).unwrap()).rev().collect())
                .collect();
            let lists = PageLists::new(b, hkv, lists).unwrap();
            let dec = dec.with_page_lists(lists.clone()).unwrap();
            for kvh in 0..hkv {
                let _ = dec.mask_of(kvh);
            }
            let _ = (
                dec.kv_bytes_read(2),
                dec.splits_for(132),
                dec.max_block_work_pages(),
            );

            let cl = layout.cache_len();
            let mut k = data(cl, 0.3);
            let mut v = data(cl, 0.7);
            let (q, _, _) = inputs(dec.out_len(), 0, poison);
            // Append: the newest token of every sequence, then the metadata.
            let new_rows: Vec<i32> = std::iter::once(0)
                .chain(sl.iter().scan(0, |a, &s| {
                    *a += i32::from(s > 0);
                    Some(*a)
                }))
                .collect();
            let n_new = *new_rows.last().unwrap() as usize;
            let kn = data(n_new * hkv * d, 1.3);
            let ns = Strides::contiguous(0, hkv, d);
            let ml = layout.meta_len();
            let (mut kmin, mut kmax) = (vec![0.0f32; ml], vec![0.0f32; ml]);
            let ra = cache.append_cpu(
                &new_rows,
                Strided::new(&kn[..], ns),
                Strided::new(&kn[..], ns),
                KvPages {
                    k: &mut k[..],
                    v: &mut v[..],
                },
                Some(PageMeta {
                    kmin: &mut kmin[..],
                    kmax: &mut kmax[..],
                }),
            );
            // Two sequences writing one page in one append is refused (Index): skip those.
            if let Err(e) = ra {
                prop_assert!(matches!(e, Error::Index(_)), "{e:?}");
                return Ok(());
            }
            let qs = Strides::contiguous(ql, hq, d);
            let sel = dec.select_cpu(
                Strided::new(&q[..], qs),
                PageMeta {
                    kmin: &kmin[..],
                    kmax: &kmax[..],
                },
            );
            let mut out = vec![0.0f32; dec.out_len()];
            let mut lse = vec![0.0f32; dec.lse_len().saturating_sub(short)];
            let r = dec.forward_cpu(
                Strided::new(&q[..], qs),
                KvPages {
                    k: &k[..],
                    v: &v[..],
                },
                Some(PageMeta {
                    kmin: &kmin[..],
                    kmax: &kmax[..],
                }),
                Strided::new(&mut out[..], qs),
                Some(&mut lse[..]),
            );
            prop_assert_eq!(r.is_ok(), short == 0, "{:?}", r);
            if r.is_ok() && comparable(dec.scale()) {
                let sel = sel.unwrap();
                // Quest heads read their selection, Listed heads their lists.
                let mut merged: Vec<Vec<usize>> = Vec::new();
                for bi in 0..b {
                    for kvh in 0..hkv {
                        let l = match dec.head_policy(kvh).unwrap() {
                            HeadPolicy::Quest => sel.pages.get(bi, kvh).unwrap(),
                            _ => lists.get(bi, kvh).unwrap(),
                        };
                        merged.push(l.iter().map(|&p| p as usize).collect());
                    }
                }
                let merged = PageLists::new(b, hkv, merged).unwrap();
                let (want, want_lse) = reference::paged::paged_decode_f64(
                    &dec,
                    Strided::new(&q[..], qs),
                    KvPages {
                        k: &k[..],
                        v: &v[..],
                    },
                    reference::paged::decode_visible(&dec, Some(&merged)),
                )
                .unwrap();
                check_close(&out, &want, "paged out")?;
                check_close(&lse, &want_lse, "paged lse")?;
            }
            Ok(())
        },
    );
}

#[test]
fn prop_page_lists_and_quest_config() {
    let case = (
        (
            size(),
            size(),
            prop::collection::vec(prop::collection::vec(size(), 0..3), 0..5),
        ),
        (size(), size()),
    );
    run(2000, case, |((b, h, lists), (tb, ps))| {
        let n = lists.len();
        if let Ok(pl) = PageLists::new(b, h, lists) {
            prop_assert_eq!(b * h, n);
            prop_assert!(pl.get(b, 0).is_none() && pl.get(0, usize::MAX).is_none());
            let _ = pl.max_len();
        }
        let bp = QuestConfig {
            token_budget: tb,
            sink_pages: 0,
        }
        .budget_pages(ps);
        prop_assert!(bp >= 1);
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------
// Ring and Star
// ---------------------------------------------------------------------------------------

fn sharding() -> impl Strategy<Value = Sharding> + Clone {
    prop_oneof![
        Just(Sharding::Contiguous),
        Just(Sharding::Zigzag),
        Just(Sharding::Stripe)
    ]
}

#[test]
fn prop_ring_layout_and_sharding() {
    let world = prop_oneof![
        4 => 1usize..9,
        1 => Just(0usize),
        1 => Just(MAX_RING_WORLD),
        1 => Just(MAX_RING_WORLD + 1),
        1 => Just(usize::MAX)
    ];
    let case = (
        prop_oneof![3 => 1usize..40, 1 => size()],
        world,
        sharding(),
        (size(), size()),
        (
            prop_oneof![2 => 0usize..3, 1 => size()],
            prop_oneof![2 => 0usize..3, 1 => size()],
        ),
    );
    run(1500, case, |(seqlen, w, sh, (rank, step), (batch, row))| {
        let Ok(layout) = RingLayout::new(seqlen, w, sh) else {
            return Ok(());
        };
        prop_assert!((1..=MAX_RING_WORLD).contains(&w) && seqlen <= i32::MAX as usize);
        prop_assert!(layout.kv_source(rank, step) < w);
        prop_assert_eq!(layout.shard_len(usize::MAX), 0);
        let _ = layout.blocks(rank);
        if seqlen <= 64 && w <= 16 {
            let total: usize = (0..w).map(|r| layout.shard_len(r)).sum();
            prop_assert_eq!(total, seqlen);
            let mut all: Vec<usize> = (0..w).flat_map(|r| layout.positions(r)).collect();
            all.sort();
            prop_assert_eq!(all, (0..seqlen).collect::<Vec<_>>());
            // A small tensor round-trips.
            let (bb, rr) = (batch.min(3), row.min(3));
            let x: Vec<u16> = (0..bb * seqlen * rr).map(|i| i as u16).collect();
            let shards = layout.shard(&x, bb, rr).unwrap();
            prop_assert_eq!(layout.unshard(&shards, bb, rr).unwrap(), x);
        }
        // Extreme batch and row sizes on empty inputs: an error or empty shards, at no cost.
        if let Ok(shards) = layout.shard::<u8>(&[], batch, row) {
            prop_assert!(shards.len() == w && shards.iter().all(|s| s.is_empty()));
        }
        let empty = vec![Vec::<u8>::new(); w.min(16)];
        if let Ok(x) = layout.unshard(&empty, batch, row) {
            prop_assert!(x.is_empty());
        }
        let _ = layout.unshard(&[vec![0u8; 3]], batch, row);
        Ok(())
    });
}

#[test]
fn prop_block_pieces() {
    let n = prop_oneof![3 => 0usize..20, 1 => size()];
    let blk = (n.clone(), n.clone(), n.clone(), n.clone()).prop_map(|(row0, len, pos0, stride)| {
        GlobalBlock {
            row0,
            len,
            pos0,
            stride,
        }
    });
    let mask = (side(), side(), prop_oneof![3 => 0usize..3, 1 => size()])
        .prop_map(|(l, r, s)| Mask::new(Window::new(l, r), s));
    run(2000, (blk.clone(), blk, mask), |(q, k, mask)| {
        if let Ok(pieces) = block_pieces(q, k, mask) {
            prop_assert!(q.stride == k.stride && q.stride >= 1);
            for p in &pieces {
                prop_assert!(p.q_rows.end <= q.row0 + q.len || p.q_rows.is_empty());
                prop_assert_eq!(p.mask.sinks, 0);
            }
        }
        let _ = q.count_in(&(k.pos0..k.row0));
        Ok(())
    });
}

#[test]
fn prop_ring_attention_constructor_and_schedule() {
    let dim = prop_oneof![3 => 1usize..4, 1 => size()];
    let case = (
        (
            prop_oneof![3 => 1usize..40, 1 => size()],
            1usize..9,
            sharding(),
        ),
        (dim.clone(), dim.clone(), dim.clone(), dim),
        options(),
        (size(), size()),
    );
    run(
        1500,
        case,
        |((seqlen, w, sh), (b, hq, hkv, d), o, (rank, step))| {
            let Ok(layout) = RingLayout::new(seqlen, w, sh) else {
                return Ok(());
            };
            let shape = RingShape {
                batch: b,
                heads_q: hq,
                heads_kv: hkv,
                head_dim: d,
            };
            let Ok(ring) = RingAttention::new(layout, shape, &o) else {
                return Ok(());
            };
            let _ = (ring.out_len(rank), ring.kv_len(rank), ring.lse_len(rank));
            prop_assert_eq!(ring.out_len(usize::MAX), 0);
            prop_assert!(ring.pieces(rank, step).is_empty() || (rank < w && step < w));
            let _ = ring.kv_strides(rank);
            prop_assert!(ring.rank_plan(usize::MAX).is_err() || seqlen > 64);
            if seqlen <= 64 {
                let sch = ring.schedule();
                prop_assert_eq!(sch.compute.len(), w);
                prop_assert!(sch.imbalance() >= 1.0 - 1e-9 || sch.pairs.iter().all(|&p| p == 0));
                let plans = ring.plans().unwrap();
                let count = RingAttention::check_plans(&plans).unwrap();
                prop_assert!(count.total <= count.unskipped);
                prop_assert!(ring.rank_plan_with(w, &sch).is_err());
            }
            Ok(())
        },
    );
}

#[test]
fn prop_ring_forward_matches_dense() {
    let case = (
        (1usize..12, 1usize..5, sharding()),
        (
            1usize..3,
            1usize..3,
            1usize..3,
            prop_oneof![Just(1usize), Just(4)],
        ),
        options(),
        (any::<bool>(), 0usize..2),
    );
    run(
        300,
        case,
        |((seqlen, w, sh), (b, g, hkv, d), o, (planned, short))| {
            let hq = g * hkv;
            let layout = RingLayout::new(seqlen, w, sh).unwrap();
            let shape = RingShape {
                batch: b,
                heads_q: hq,
                heads_kv: hkv,
                head_dim: d,
            };
            let Ok(ring) = RingAttention::new(layout, shape, &o) else {
                return Ok(());
            };
            let dense = FlashAttention::new(
                &AttentionShape {
                    batch: b,
                    heads_q: hq,
                    heads_kv: hkv,
                    head_dim: d,
                    seqlens: SeqLens::Fixed {
                        seqlen_q: seqlen,
                        seqlen_k: seqlen,
                    },
                },
                &o,
            );
            let dense = dense.expect("a valid ring problem is a valid dense problem");
            let (q, k, v) = inputs(dense.out_len(), b * seqlen * hkv * d, None);
            let qs = layout.shard(&q, b, hq * d).unwrap();
            let ks = layout.shard(&k, b, hkv * d).unwrap();
            let vs = layout.shard(&v, b, hkv * d).unwrap();
            let mut outs: Vec<Vec<f32>> = (0..w).map(|r| vec![0.0; ring.out_len(r)]).collect();
            let mut lses: Vec<Vec<f32>> = (0..w)
                .map(|r| vec![0.0; ring.lse_len(r).saturating_sub(short)])
                .collect();
            let st = |r: usize, h: usize| Strides::contiguous(layout.shard_len(r), h, d);
            let qv: Vec<_> = (0..w)
                .map(|r| Strided::new(&qs[r][..], st(r, hq)))
                .collect();
            let kv: Vec<_> = (0..w)
                .map(|r| Strided::new(&ks[r][..], st(r, hkv)))
                .collect();
            let vv: Vec<_> = (0..w)
                .map(|r| Strided::new(&vs[r][..], st(r, hkv)))
                .collect();
            let mut ov: Vec<_> = outs
                .iter_mut()
                .enumerate()
                .map(|(r, x)| Strided::new(&mut x[..], st(r, hq)))
                .collect();
            let mut lv: Vec<&mut [f32]> = lses.iter_mut().map(|x| &mut x[..]).collect();
            let r = if planned {
                let kf: Vec<&[f32]> = ks.iter().map(|x| &x[..]).collect();
                let vf: Vec<&[f32]> = vs.iter().map(|x| &x[..]).collect();
                ring.forward_cpu_planned(&qv, &kf, &vf, &mut ov, Some(&mut lv[..]))
                    .map(|_| ())
            } else {
                ring.forward_cpu(&qv, &kv, &vv, &mut ov, Some(&mut lv[..]))
            };
            drop(ov);
            let some_lse_short = short > 0 && (0..w).any(|r| ring.lse_len(r) > 0);
            prop_assert_eq!(r.is_ok(), !some_lse_short, "{:?}", r);
            if r.is_ok() && comparable(dense.scale()) {
                let got = layout.unshard(&outs, b, hq * d).unwrap();
                let (want, _) = reference::dense_attention_f64(
                    &dense,
                    Strided::new(&q[..], Strides::contiguous(seqlen, hq, d)),
                    Strided::new(&k[..], Strides::contiguous(seqlen, hkv, d)),
                    Strided::new(&v[..], Strides::contiguous(seqlen, hkv, d)),
                )
                .unwrap();
                check_close(&got, &want, "ring out")?;
            }
            Ok(())
        },
    );
}

#[test]
fn prop_star_attention() {
    let dim = prop_oneof![3 => 1usize..3, 1 => size()];
    let case = (
        (size(), size(), size()),
        (dim.clone(), dim.clone(), dim.clone(), dim),
        plain_options(),
        any::<bool>(),
        size(),
    );
    run(
        1500,
        case,
        |((c, w, ql), (b, hq, hkv, d), mut o, causal, rank)| {
            o.causal = causal;
            let shape = RingShape {
                batch: b,
                heads_q: hq,
                heads_kv: hkv,
                head_dim: d,
            };
            let Ok(star) = StarAttention::new(c, w, ql, shape, &o) else {
                return Ok(());
            };
            prop_assert!(w >= 1 && c >= w);
            let _ = (star.world(), star.shape(), star.query_len());
            let blk = star.block(rank);
            prop_assert!(blk.start <= blk.end && blk.end <= c);
            let _ = star.block(w - 1);
            let _ = star.context_attention(rank);
            let _ = star.context_attention(0);
            let _ = star.query_partial(rank);
            let _ = star.query_definition();
            let _ = star.query_self_partial();
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------
// Neighborhood
// ---------------------------------------------------------------------------------------

#[test]
fn prop_neighborhood_constructor_and_neighbors() {
    let n = prop_oneof![4 => 1usize..6, 1 => size()];
    let dim = (n.clone(), n.clone(), n.clone(), any::<bool>(), n).prop_map(
        |(length, kernel, dilation, causal, stride)| NeighborhoodDim {
            length,
            kernel,
            dilation,
            causal,
            stride,
        },
    );
    let hd = prop_oneof![3 => 1usize..3, 1 => size()];
    let case = (
        prop::collection::vec(dim, 0..5),
        (hd.clone(), hd.clone(), hd.clone(), hd),
        options(),
        size(),
    );
    run(2000, case, |(dims, (b, hq, hkv, d), o, token)| {
        for dm in &dims {
            if let Ok((range, group)) = dm.window(token) {
                prop_assert!(range.len() <= dm.kernel && group < dm.dilation);
            }
            let _ = dm.window(0);
        }
        let shape = NeighborhoodShape {
            batch: b,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            dims: &dims,
        };
        let Ok(na) = NeighborhoodAttention::new(&shape, &o) else {
            return Ok(());
        };
        let tokens = na.tokens();
        let _ = (na.out_len(), na.lse_len(), na.scale(), na.softcap());
        prop_assert!(na.neighbors(tokens).is_err() && na.neighbors(usize::MAX).is_err());
        let kernel: usize = dims.iter().map(|d| d.kernel).product();
        for t in [0, token % tokens, tokens - 1] {
            let nb = na.neighbors(t).unwrap();
            prop_assert!(nb.len() <= kernel);
            if nb.len() <= 512 {
                let keys: Vec<usize> = nb.collect();
                prop_assert!(keys.iter().all(|&k| k < tokens));
            }
        }
        if tokens <= 256 {
            let _ = (
                schedule::visible_pairs(&na),
                schedule::flop_bound_ratio(&na),
            );
            let _ = schedule::NeighborhoodSchedule::new(&na, 64, 64);
            let _ = schedule::NeighborhoodSchedule::new(&na, token, token);
            let _ = schedule::NeighborhoodSchedule::with_tile(&na, [token, 1, 1], 64);
        }
        Ok(())
    });
}

#[test]
fn prop_neighborhood_forward_is_an_error_or_correct() {
    let dim = (1usize..7, 1usize..4, 1usize..3, any::<bool>(), 1usize..3).prop_map(
        |(length, kernel, dilation, causal, stride)| NeighborhoodDim {
            length,
            kernel,
            dilation,
            causal,
            stride,
        },
    );
    let case = (
        prop::collection::vec(dim, 1..3),
        (
            1usize..3,
            1usize..3,
            1usize..3,
            prop_oneof![Just(1usize), Just(4)],
        ),
        plain_options(),
        (0usize..2, poison()),
    );
    run(500, case, |(dims, (b, g, hkv, d), o, (short, poison))| {
        let hq = g * hkv;
        let shape = NeighborhoodShape {
            batch: b,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            dims: &dims,
        };
        let Ok(na) = NeighborhoodAttention::new(&shape, &o) else {
            return Ok(());
        };
        let n = na.tokens();
        let (qs, ks) = (
            Strides::contiguous(n, hq, d),
            Strides::contiguous(n, hkv, d),
        );
        let (q, k, v) = inputs(na.out_len(), b * n * hkv * d, poison);
        let mut out = vec![0.0f32; na.out_len() - short];
        let mut lse = vec![0.0f32; na.lse_len()];
        let r = na.forward_cpu(
            Strided::new(&q[..], qs),
            Strided::new(&k[..], ks),
            Strided::new(&v[..], ks),
            Strided::new(&mut out[..], qs),
            Some(&mut lse[..]),
        );
        prop_assert_eq!(r.is_ok(), short == 0, "{:?}", r);
        if r.is_ok() && comparable(na.scale()) {
            let (want, want_lse) = reference::neighborhood_attention_f64(
                &na,
                Strided::new(&q[..], qs),
                Strided::new(&k[..], ks),
                Strided::new(&v[..], ks),
            )
            .unwrap();
            check_close(&out, &want, "na out")?;
            check_close(&lse, &want_lse, "na lse")?;
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------
// Block-sparse, MoBA, patterns
// ---------------------------------------------------------------------------------------

#[test]
fn prop_block_mask_constructors() {
    let n = prop_oneof![3 => 0usize..4, 1 => size()];
    let idx = prop_oneof![6 => 0i32..4, 1 => Just(-1i32), 1 => Just(i32::MAX), 1 => Just(i32::MIN)];
    let case = (
        (
            n.clone(),
            n.clone(),
            n.clone(),
            n.clone(),
            n.clone(),
            n.clone(),
        ),
        (
            prop::collection::vec(idx.clone(), 0..8),
            prop::collection::vec(idx, 0..8),
            any::<u64>(),
        ),
        (n.clone(), n.clone(), n),
    );
    run(
        2000,
        case,
        |((b, h, sq, sk, bm, bn), (offs, ind, seed), (x, y, z))| {
            let Ok(dims) = BlockMaskDims::for_lengths(b, h, sq, sk, bm, bn) else {
                return Ok(());
            };
            prop_assert_eq!(dims.num_q_blocks, sq.div_ceil(bm));
            let _ = dims.check_gpu_block_sizes();
            let Ok(lists) = dims.num_lists() else {
                return Ok(());
            };
            let full: Vec<bool> = ind.iter().map(|&i| i % 2 == 0).collect();
            if let Ok(m) = BlockMask::from_csr(dims, offs.clone(), ind.clone(), full.clone()) {
                prop_assert_eq!(m.offsets().len(), lists + 1);
                prop_assert!(m.list(x, y, z).is_none() || (z < dims.num_q_blocks));
                prop_assert!(m.list(0, 0, usize::MAX).is_none());
                let _ = (m.nnz(), m.density());
            }
            if lists <= 64 && dims.num_k_blocks <= 64 {
                let built = BlockMask::from_lists(dims, |id| {
                    let s = seed.wrapping_add((id.batch * 31 + id.head * 7 + id.q_block) as u64);
                    (0..dims.num_k_blocks)
                        .filter(|kb| (s >> (kb % 64)) & 1 == 1)
                        .map(|kb| {
                            (
                                kb,
                                if s & 2 == 0 {
                                    BlockKind::Full
                                } else {
                                    BlockKind::Partial
                                },
                            )
                        })
                        .collect()
                })
                .unwrap();
                let again = BlockMask::from_csr(
                    dims,
                    built.offsets().to_vec(),
                    built.indices().to_vec(),
                    built.full_flags().iter().map(|&f| f != 0).collect(),
                )
                .unwrap();
                prop_assert_eq!(again.indices(), built.indices());
                let dense = BlockMask::dense(dims, BlockKind::Partial).unwrap();
                prop_assert_eq!(dense.nnz(), lists * dims.num_k_blocks);
                if lists * dims.num_k_blocks <= 4096 {
                    prop_assert!(dense.to_flex_parts().is_ok());
                }
            }
            // Lists that name blocks past the end are refused (a valid mask costs its lists:
            // only small ones are built).
            if lists <= 4096 {
                let bad =
                    BlockMask::from_lists(dims, |_| vec![(dims.num_k_blocks, BlockKind::Full)]);
                prop_assert!(bad.is_err() || lists == 0);
            }
            let huge = BlockMask::from_lists(dims, |_| vec![(usize::MAX, BlockKind::Full)]);
            prop_assert!(huge.is_err() || lists == 0);
            Ok(())
        },
    );
}

fn dense_attn(
    b: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    sq: usize,
    sk: usize,
    o: &AttentionOptions,
) -> Option<FlashAttention> {
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
        o,
    )
    .ok()
}

#[test]
fn prop_block_sparse_and_moba_forward() {
    let case = (
        (
            1usize..3,
            1usize..3,
            1usize..3,
            prop_oneof![Just(1usize), Just(4)],
        ),
        (0usize..9, 0usize..9, 1usize..5, 1usize..5),
        options(),
        (
            any::<u64>(),
            prop_oneof![3 => 1usize..4, 1 => size()],
            prop_oneof![3 => 1usize..4, 1 => size()],
        ),
        poison(),
    );
    run(
        500,
        case,
        |((b, g, hkv, d), (sq, sk, bm, bn), o, (seed, top_k, mbn), poison)| {
            let hq = g * hkv;
            let Some(attn) = dense_attn(b, hq, hkv, d, sq, sk, &o) else {
                return Ok(());
            };
            let Ok(dims) = BlockMaskDims::for_lengths(b, hq, sq, sk, bm, bn) else {
                return Ok(());
            };
            let mask = BlockMask::from_lists(dims, |id| {
                let s = seed.rotate_left((id.batch * 13 + id.head * 5 + id.q_block) as u32 % 64);
                (0..dims.num_k_blocks)
                    .filter(|kb| (s >> (kb % 64)) & 1 == 1)
                    .map(|kb| {
                        (
                            kb,
                            if (s >> 7) & 1 == 0 {
                                BlockKind::Full
                            } else {
                                BlockKind::Partial
                            },
                        )
                    })
                    .collect()
            })
            .unwrap();
            let (qs, ks) = (
                Strides::contiguous(sq, hq, d),
                Strides::contiguous(sk, hkv, d),
            );
            let (q, k, v) = inputs(attn.out_len(), b * sk * hkv * d, poison);
            let bs = BlockSparseAttention::new(attn.clone(), mask).unwrap();
            let mut out = vec![0.0f32; attn.out_len()];
            let mut lse = vec![0.0f32; attn.lse_len()];
            bs.forward_cpu(
                Strided::new(&q[..], qs),
                Strided::new(&k[..], ks),
                Strided::new(&v[..], ks),
                Strided::new(&mut out[..], qs),
                Some(&mut lse[..]),
            )
            .unwrap();
            if comparable(attn.scale()) {
                let (want, want_lse) = reference::block_sparse_attention_f64(
                    &bs,
                    Strided::new(&q[..], qs),
                    Strided::new(&k[..], ks),
                    Strided::new(&v[..], ks),
                )
                .unwrap();
                check_close(&out, &want, "block-sparse out")?;
                check_close(&lse, &want_lse, "block-sparse lse")?;
            }
            // MoBA with extreme block and top-k values.
            let cfg = MobaConfig {
                block_n: mbn,
                top_k,
            };
            let sel = moba::moba_select_cpu(
                &attn,
                &cfg,
                Strided::new(&q[..], qs),
                Strided::new(&k[..], ks),
            );
            let _ = moba::moba_select_blocks_cpu(
                &attn,
                &cfg,
                bm,
                Strided::new(&q[..], qs),
                Strided::new(&k[..], ks),
            );
            if let Ok(rows) = sel {
                let _ = (rows.block_n(), rows.top_k(), rows.blocks().len());
                let _ = moba::moba_block_mask(&attn, &rows, bm);
                let _ = moba::moba_block_mask(&attn, &rows, usize::MAX);
                let _ = RowBlocks::new(rows.block_n(), rows.top_k(), rows.blocks().to_vec());
            }
            if let Ok(moba_attn) = moba::moba_attention(
                &attn,
                &cfg,
                bm,
                Strided::new(&q[..], qs),
                Strided::new(&k[..], ks),
            ) {
                let mut out = vec![0.0f32; attn.out_len()];
                moba_attn
                    .forward_cpu(
                        Strided::new(&q[..], qs),
                        Strided::new(&k[..], ks),
                        Strided::new(&v[..], ks),
                        Strided::new(&mut out[..], qs),
                        None,
                    )
                    .unwrap();
                if comparable(attn.scale()) {
                    let (want, _) = reference::block_sparse_attention_f64(
                        &moba_attn,
                        Strided::new(&q[..], qs),
                        Strided::new(&k[..], ks),
                        Strided::new(&v[..], ks),
                    )
                    .unwrap();
                    check_close(&out, &want, "moba out")?;
                }
            }
            Ok(())
        },
    );
}

#[test]
fn prop_row_blocks() {
    let case = (
        prop_oneof![3 => 1usize..4, 1 => size()],
        prop_oneof![3 => 1usize..4, 1 => size()],
        prop::collection::vec(prop_oneof![Just(-1i32), 0i32..5, Just(i32::MAX)], 0..9),
        (1usize..3, 0usize..6, 0usize..6),
    );
    run(1500, case, |(bn, top_k, blocks, (hq, sq, sk))| {
        let Ok(rows) = RowBlocks::new(bn, top_k, blocks) else {
            return Ok(());
        };
        let Some(attn) = dense_attn(1, hq, 1, 4, sq, sk, &AttentionOptions::causal()) else {
            return Ok(());
        };
        let Ok(dims) = BlockMaskDims::for_lengths(1, 1, sq, sk, 4, bn) else {
            return Ok(());
        };
        let mask = BlockMask::dense(dims, BlockKind::Partial).unwrap();
        if let Ok(bs) = BlockSparseAttention::new(attn, mask)
            && let Ok(bs) = bs.with_row_blocks(rows)
        {
            let r = bs.row_blocks().unwrap();
            prop_assert_eq!(r.blocks().len(), hq * sq * r.top_k());
        }
        Ok(())
    });
}

#[test]
fn prop_patterns() {
    let n = prop_oneof![4 => 0usize..5, 1 => size()];
    let small = prop_oneof![4 => 0usize..12, 1 => size()];
    let case = (
        (small.clone(), small.clone(), small, n.clone()),
        (side(), side()),
        (n.clone(), n.clone(), n.clone(), any::<u64>()),
        prop::collection::vec(n, 0..4),
    );
    run(
        2000,
        case,
        |((heads, sq, sk, block), (l, r), (a, bb, c, seed), list)| {
            // Patterns build one list per query block and test every key block: a valid shape
            // is built only when small; shapes past the block-count limits must be refused.
            let (nq, nk) = (sq.div_ceil(block.max(1)), sk.div_ceil(block.max(1)));
            let refused =
                nq > block_sparse::MAX_BLOCK_ENTRIES || nk > block_sparse::MAX_BLOCK_ENTRIES;
            // `classify` walks every query row of a block: the cost is `seqlen_q * nk` per head.
            let small = nq.saturating_mul(nk) <= 4096 && sq.saturating_mul(nk) <= 1 << 14;
            let shape = PatternShape {
                heads,
                seqlen_q: sq,
                seqlen_k: sk,
                block,
                mask: Mask::new(Window::new(l, r), 0),
            };
            let mut masks = Vec::new();
            if small || refused {
                masks.push(patterns::longformer(&shape, a, bb));
                masks.push(patterns::sparse_transformer_strided(&shape, a));
                masks.push(patterns::sparse_transformer_fixed(&shape, a, bb));
                masks.push(patterns::block_attention(&shape, &list));
                masks.push(patterns::per_head_windows(&shape, &list));
                masks.push(patterns::streaming_heads(
                    &shape,
                    &[true, false][..heads.min(2)],
                    a,
                    bb,
                ));
            }
            if (small && heads.saturating_mul(sq).saturating_mul(nk) <= 1 << 14) || refused {
                masks.push(patterns::bigbird(&shape, a, bb, c.min(64), seed));
            }
            for m in masks.into_iter().flatten() {
                prop_assert!(!refused);
                let nkb = m.dims().num_k_blocks;
                prop_assert!(m.indices().iter().all(|&i| (i as usize) < nkb));
            }
            let drawn = patterns::bigbird_random_blocks(seed, a, bb, nk, c.min(64)).unwrap();
            prop_assert!(drawn.len() <= c.min(64) && drawn.iter().all(|&x| x < nk));
            prop_assert!(drawn.windows(2).all(|w| w[0] < w[1]));
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------
// C API, called from Rust with hostile descriptors, pointers and sizes (only those the C
// contract lets a caller pass: NULL, misaligned, huge lengths that must be refused before
// any slice is formed, overlapping buffers, and real buffers of their true length).
// ---------------------------------------------------------------------------------------

fn c_strides(s: Strides) -> capi::CStrides {
    capi::CStrides {
        batch: s.batch,
        seq: s.seq,
        head: s.head,
    }
}

fn last_error() -> String {
    // SAFETY: a valid NUL-terminated string owned by this thread.
    unsafe { std::ffi::CStr::from_ptr(capi::longattn_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn prop_capi_dense() {
    let f = prop_oneof![
        4 => 0.1f32..2.0,
        1 => Just(0.0f32),
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(-1.0f32),
        1 => Just(1e-40f32)
    ];
    let win =
        prop_oneof![4 => -1i64..3, 1 => Just(i64::MIN), 1 => Just(i64::MAX), 1 => Just(-2i64)];
    let small = prop_oneof![6 => 0usize..4, 1 => size()];
    let case = (
        (
            small.clone(),
            small.clone(),
            small.clone(),
            small.clone(),
            small.clone(),
            small,
        ),
        (
            f.clone(),
            f,
            win.clone(),
            win,
            any::<bool>(),
            prop_oneof![3 => Just(0usize), 1 => size()],
        ),
        (
            prop_oneof![6 => 0i32..3, 1 => Just(-1i32), 1 => Just(i32::MAX)],
            0u8..8,
            any::<bool>(),
        ),
    );
    run(
        1500,
        case,
        |(
            (b, hq, hkv, d, sq, sk),
            (scale, cap, wl, wr, causal, sinks),
            (dtype, hostile, varlen),
        )| {
            // Varlen offsets: real arrays of `batch + 1` values when batch is small.
            let cu: Vec<i32> = (0..=b.min(8)).map(|i| (i * sq.min(4)) as i32).collect();
            let use_cu = varlen && b <= 8;
            let desc = capi::CDenseDesc {
                batch: b,
                heads_q: hq,
                heads_kv: hkv,
                head_dim: d,
                seqlen_q: sq,
                seqlen_k: sk,
                cu_seqlens_q: if use_cu {
                    cu.as_ptr()
                } else {
                    std::ptr::null()
                },
                cu_seqlens_k: if use_cu {
                    cu.as_ptr()
                } else {
                    std::ptr::null()
                },
                scale,
                softcap: cap,
                window_left: wl,
                window_right: wr,
                causal: i32::from(causal),
                sinks,
            };
            let (mut out_len, mut lse_len) = (usize::MAX, usize::MAX);
            // SAFETY: a valid descriptor and writable outputs (or NULL).
            let st = unsafe { capi::longattn_dense_sizes(&desc, &mut out_len, &mut lse_len) };
            prop_assert_ne!(st, capi::LONGATTN_ERR_INTERNAL, "{}", last_error());
            // SAFETY: NULL descriptor and NULL outputs are part of the contract.
            let null = unsafe {
                capi::longattn_dense_sizes(
                    std::ptr::null(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            prop_assert_eq!(null, capi::LONGATTN_ERR_NULL_POINTER);
            prop_assert!(!last_error().is_empty());
            if st != capi::LONGATTN_OK || out_len > 4096 || lse_len > 4096 {
                return Ok(());
            }
            let rows_k = if use_cu {
                cu[b] as usize
            } else {
                b.saturating_mul(sk)
            };
            let elems_k = rows_k.saturating_mul(hkv).saturating_mul(d);
            if elems_k > 4096 {
                return Ok(());
            }
            let q = data(out_len, 0.3);
            let k = data(elems_k, 0.5);
            let v = data(elems_k, 0.7);
            let mut out = vec![0.0f32; out_len + 2];
            let mut lse = vec![0.0f32; lse_len + 2];
            let (qs, ks) = if use_cu {
                let mut a = Strides::contiguous(0, hq, d);
                let mut c = Strides::contiguous(0, hkv, d);
                a.batch = 0;
                c.batch = 0;
                (a, c)
            } else {
                (
                    Strides::contiguous(sq, hq, d),
                    Strides::contiguous(sk, hkv, d),
                )
            };
            let t = |x: &[f32], s: Strides| capi::CTensor {
                data: x.as_ptr().cast(),
                len: x.len(),
                strides: c_strides(s),
            };
            let mut ot = capi::CTensorMut {
                data: out.as_mut_ptr().cast(),
                len: out_len,
                strides: c_strides(qs),
            };
            let mut qt = t(&q, qs);
            let (mut lp, mut ll) = (lse.as_mut_ptr(), lse_len);
            // One hostile change per case (0: none).
            let f32_code = 0;
            let code = match hostile {
                1 => dtype, // unknown codes must be refused; f16/bf16 codes read f32 bytes as
                // 2-byte elements of the same buffers, sized by `len`: still in bounds
                2 => {
                    qt.data = std::ptr::null();
                    f32_code
                }
                3 => {
                    // Misaligned for f32 (length 0, so nothing would be read anyway).
                    qt.data = std::ptr::dangling::<u8>().cast();
                    qt.len = 0;
                    f32_code
                }
                4 => {
                    qt.len = usize::MAX; // refused before any slice is formed
                    f32_code
                }
                5 => {
                    // out overlaps lse (same buffer).
                    ot.data = lse.as_mut_ptr().cast();
                    ot.len = out_len.min(lse_len);
                    f32_code
                }
                6 => {
                    lp = std::ptr::null_mut();
                    ll = usize::MAX; // NULL lse: no LSE, whatever the length
                    f32_code
                }
                7 => {
                    ll = lse_len.saturating_sub(1);
                    f32_code
                }
                _ => f32_code,
            };
            // SAFETY: every pointer is NULL, refused before use, or a live buffer of `len`
            // elements (a 2-byte dtype code reads the f32 buffers as half as many bytes).
            let st = unsafe {
                capi::longattn_dense_forward_cpu(&desc, code, qt, t(&k, ks), t(&v, ks), ot, lp, ll)
            };
            prop_assert_ne!(st, capi::LONGATTN_ERR_INTERNAL, "{}", last_error());
            let must_fail = match hostile {
                1 => !(0..3).contains(&dtype),
                2..=4 => true,
                5 => out_len > 0,
                7 => lse_len > 0,
                _ => false,
            };
            if must_fail {
                prop_assert_ne!(st, capi::LONGATTN_OK);
                prop_assert!(!last_error().is_empty());
            }
            if matches!(hostile, 0 | 6) {
                prop_assert_eq!(st, capi::LONGATTN_OK, "{}", last_error());
                prop_assert!(
                    out[out_len..].iter().all(|&x| x == 0.0),
                    "out written past its length"
                );
            }
            Ok(())
        },
    );
}

#[test]
fn prop_capi_paged() {
    let small = prop_oneof![6 => 1usize..4, 1 => Just(0usize), 1 => size()];
    let case = (
        (small.clone(), small.clone(), small.clone(), small.clone()),
        (0usize..3, small.clone(), small),
        (
            prop::collection::vec(prop_oneof![0i32..4, Just(-1), Just(i32::MAX)], 0..9),
            prop::collection::vec(prop_oneof![0i32..6, Just(-1), Just(i32::MAX)], 0..3),
        ),
        (
            prop_oneof![Just(0.0f32), Just(f32::NAN), 0.1f32..2.0],
            -2i64..3,
            0u8..5,
        ),
    );
    run(
        1500,
        case,
        |((np, ps, hkv, d), (_, hq, ql), (bt, sl), (scale, wl, hostile))| {
            // The tables' true sizes bound what the descriptor may claim.
            let b = sl.len();
            let mp = bt.len().checked_div(b).unwrap_or(bt.len()).max(1);
            let bt: Vec<i32> = bt
                .into_iter()
                .chain(std::iter::repeat(0))
                .take(b * mp)
                .collect();
            let mut desc = capi::CPagedDesc {
                num_pages: np,
                page_size: ps,
                heads_kv: hkv,
                head_dim: d,
                batch: b,
                block_table: bt.as_ptr(),
                max_pages_per_seq: mp,
                seqlens_k: sl.as_ptr(),
                heads_q: hq,
                q_len: ql,
                scale,
                softcap: 0.0,
                window_left: wl,
                window_right: -1,
                sinks: 0,
            };
            match hostile {
                1 => desc.block_table = std::ptr::null(),
                2 => {
                    desc.batch = usize::MAX; // batch * max_pages_per_seq overflows or is refused
                    desc.max_pages_per_seq = usize::MAX;
                }
                3 => desc.seqlens_k = std::ptr::null(),
                _ => {}
            }
            let (mut cl, mut ol, mut ll) = (0usize, 0usize, 0usize);
            // SAFETY: the tables hold what the descriptor says (or are NULL / refused).
            let st = unsafe { capi::longattn_paged_sizes(&desc, &mut cl, &mut ol, &mut ll) };
            prop_assert_ne!(st, capi::LONGATTN_ERR_INTERNAL, "{}", last_error());
            if (1..=3).contains(&hostile)
                && !(hostile == 3 && b == 0)
                && !(hostile == 1 && b * mp == 0)
            {
                prop_assert_ne!(st, capi::LONGATTN_OK);
            }
            if st != capi::LONGATTN_OK || cl > 4096 || ol > 4096 {
                return Ok(());
            }
            let kc = data(cl, 0.2);
            let q = data(ol, 0.4);
            let mut out = vec![0.0f32; ol];
            let mut lse = vec![0.0f32; ll];
            let qs = Strides::contiguous(ql, hq, d);
            let qt = capi::CTensor {
                data: q.as_ptr().cast(),
                len: q.len(),
                strides: c_strides(qs),
            };
            let ot = capi::CTensorMut {
                data: if hostile == 4 {
                    kc.as_ptr() as *mut _
                } else {
                    out.as_mut_ptr().cast()
                },
                len: if hostile == 4 { kc.len() } else { ol },
                strides: c_strides(qs),
            };
            // SAFETY: live buffers of their true lengths; hostile 4 aliases out with the cache
            // and must be refused before any slice is formed.
            let st = unsafe {
                capi::longattn_paged_decode_cpu(
                    &desc,
                    0,
                    qt,
                    kc.as_ptr().cast(),
                    kc.as_ptr().cast(),
                    cl,
                    ot,
                    lse.as_mut_ptr(),
                    ll,
                )
            };
            prop_assert_ne!(st, capi::LONGATTN_ERR_INTERNAL, "{}", last_error());
            if hostile == 4 && cl > 0 && ol > 0 {
                prop_assert_ne!(st, capi::LONGATTN_OK);
            }
            Ok(())
        },
    );
}

/// FP8 cache: `KvScales` accepts exactly finite positive scales for 1..=65535 heads (nothing
/// allocated otherwise), and a decode over arbitrary e4m3 bytes (NaN and +-448 codes
/// included) with arbitrary valid scales is an error or the f64 reference's result of the
/// dequantised cache; `F8E4M3::from_f32` of any f32 decodes back to a value no farther from
/// it than the neighbouring codes (or saturates at +-448, or stays NaN).
#[test]
fn prop_fp8_cache_is_an_error_or_correct() {
    use longattn::reference::paged::{decode_visible, paged_decode_f64};
    let case = (
        (size(), float(), float()),
        (0usize..13, 1usize..5, any::<u64>()),
        (any::<u32>(), float()),
    );
    run(
        400,
        case,
        |((heads, ks, vs), (seqlen, page_size, seed), (bits, scale))| {
            // Scales: > 0 and every code finite once scaled (448 * x finite).
            let valid = |x: f32| x > 0.0 && (x * F8E4M3::MAX).is_finite();
            let uniform = KvScales::uniform(heads, ks, vs);
            prop_assert_eq!(
                uniform.is_ok(),
                (1..=65535).contains(&heads) && valid(ks) && valid(vs),
                "uniform({}, {}, {})",
                heads,
                ks,
                vs
            );
            // The conversion: a decoded code is the nearest (or saturated / NaN).
            let x = f32::from_bits(bits);
            let y = F8E4M3::from_f32(x).to_f32();
            if x.is_nan() {
                prop_assert!(y.is_nan());
            } else if x.abs() >= 464.0 {
                prop_assert_eq!(y, 448.0f32.copysign(x));
            } else {
                // The spacing of e4m3 around |x| is at most 2^(e-3) with e = floor(log2 |x|)
                // (2^-9 below 2^-6): the rounding error is at most half of it.
                let e = (x.abs().max(2f32.powi(-6))).log2().floor();
                prop_assert!(
                    (y - x).abs() <= 2f32.powf(e - 4.0) * 1.0001,
                    "{} -> {}",
                    x,
                    y
                );
            }
            // A decode over hostile codes with valid scales.
            let (Ok(scales), true) = (KvScales::uniform(2, ks, vs), scale.min(8.0) > 0.0) else {
                return Ok(());
            };
            let layout = PagedLayout {
                num_pages: 4,
                page_size,
                heads_kv: 2,
                head_dim: 8,
            };
            let table = [2i32, 0, 3, 1];
            let max_pages = 4;
            if seqlen.div_ceil(page_size) > max_pages {
                return Ok(());
            }
            let sl = [seqlen as i32];
            let pt = PageTable {
                block_table: &table,
                max_pages_per_seq: max_pages,
                seqlens_k: &sl,
            };
            let cache = PagedCache::new(layout, pt)
                .unwrap()
                .with_kv_scales(scales)
                .unwrap();
            let mut st = seed;
            let mut byte = || {
                st = st
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                F8E4M3::from_bits((st >> 56) as u8)
            };
            let n = layout.cache_len();
            let (k, v): (Vec<F8E4M3>, Vec<F8E4M3>) = (
                (0..n).map(|_| byte()).collect(),
                (0..n).map(|_| byte()).collect(),
            );
            let opts = AttentionOptions::default().with_scale(scale.min(8.0));
            let dec = PagedDecode::new(&cache, 4, 1, &opts).unwrap();
            let q = data(4 * 8, 0.37);
            let qs = Strides::contiguous(1, 4, 8);
            let mut out = vec![f32::NAN; dec.out_len()];
            let r = dec.forward_cpu(
                Strided::new(&q[..], qs),
                KvPages {
                    k: &k[..],
                    v: &v[..],
                },
                None,
                Strided::new(&mut out[..], qs),
                None,
            );
            prop_assert!(r.is_ok(), "{:?}", r);
            let (want, _) = paged_decode_f64(
                &dec,
                Strided::new(&q[..], qs),
                KvPages {
                    k: &k[..],
                    v: &v[..],
                },
                decode_visible(&dec, None),
            )
            .unwrap();
            if comparable(scale * ks * 448.0) {
                check_close(&out, &want, "fp8 decode")?;
            }
            Ok(())
        },
    );
}
