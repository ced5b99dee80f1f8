//! Randomised robustness of the public CPU API: thousands of shapes, options, tables, policies
//! and buffer lengths, most of them invalid, drawn from a fixed seed. Each call must return
//! `Ok` or a named `Error`: never panic (overflow checks are on in the test profile), and an
//! `Ok` result never holds NaN. The explicit bad-input cases live in `dense_cpu.rs`,
//! `paged.rs`, `ring.rs` and `neighborhood.rs`; this sweeps the combinations between them.

mod common;

use common::*;
use longattn::*;
use rand::Rng;
use rand::rngs::SmallRng;
use std::panic::{AssertUnwindSafe, catch_unwind};

fn pick(r: &mut SmallRng, xs: &[usize]) -> usize {
    xs[r.random_range(0..xs.len())]
}

/// `n`, or one element short with probability `p` (a buffer that is too small).
fn maybe_short(r: &mut SmallRng, n: usize, p: f64) -> usize {
    if r.random_bool(p) {
        n.saturating_sub(1)
    } else {
        n
    }
}

/// What one random case ended in.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Rejected,
    ForwardError,
    Ok,
}

/// A forward call's outcome; an `Ok` one must have written no NaN.
fn outcome_of(done: Result<()>, out: &[bf16], lse: &[f32], case: u64) -> Outcome {
    match done {
        Ok(()) => {
            assert!(
                out.iter().all(|x| !x.to_f32().is_nan()) && !lse.iter().any(|x| x.is_nan()),
                "case {case}: NaN in an Ok result"
            );
            Outcome::Ok
        }
        Err(_) => Outcome::ForwardError,
    }
}

fn tally(outcomes: &mut [usize; 3], o: Outcome) {
    outcomes[o as usize] += 1;
}

/// Prints a sweep's outcome counts; a sweep must have exercised the computation itself, not
/// only the validation (more than 100 `Ok` cases).
fn report(family: &str, outcomes: [usize; 3]) {
    println!("{family} outcomes (rejected, forward error, ok): {outcomes:?}");
    assert!(
        outcomes[Outcome::Ok as usize] > 100,
        "{family}: too few valid cases: {outcomes:?}"
    );
}

#[test]
fn dense_api_never_panics_on_random_input() {
    let mut r = rng(7);
    let mut outcomes = [0usize; 3];
    for case in 0..4000u64 {
        let b = pick(&mut r, &[0, 1, 2, 3]);
        let hq = pick(&mut r, &[0, 1, 2, 3, 4, 8]);
        let hkv = pick(&mut r, &[0, 1, 2, 3, 4]);
        let d = pick(&mut r, &[0, 1, 7, 8, 16, 64, 300]);
        let sq = pick(&mut r, &[0, 1, 2, 5, 17]);
        let sk = pick(&mut r, &[0, 1, 3, 17]);
        let varlen = r.random_bool(0.3);
        // Offsets, sometimes decreasing or of the wrong length.
        let cq: Vec<i32> = (0..=b)
            .map(|i| (i * sq) as i32 - if r.random_bool(0.1) { 3 } else { 0 })
            .collect();
        let extra = usize::from(r.random_bool(0.1));
        let ck: Vec<i32> = (0..=b + extra).map(|i| (i * sk) as i32).collect();
        let seqlens = if varlen {
            SeqLens::Varlen {
                cu_seqlens_q: &cq,
                cu_seqlens_k: &ck,
            }
        } else {
            SeqLens::Fixed {
                seqlen_q: sq,
                seqlen_k: sk,
            }
        };
        let shape = AttentionShape {
            batch: b,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            seqlens,
        };
        let side = |r: &mut SmallRng| r.random_bool(0.5).then(|| pick(r, &[0, 1, 5, usize::MAX]));
        let (left, right) = (side(&mut r), side(&mut r));
        let mut opts = AttentionOptions::default()
            .with_window(Window::new(left, right))
            .with_sinks(pick(&mut r, &[0, 1, 4, usize::MAX]));
        let odd = [0.0f32, -1.0, f32::NAN, f32::INFINITY, 0.1, 30.0];
        if r.random_bool(0.2) {
            opts = opts.with_softcap(odd[r.random_range(0..odd.len())]);
        }
        if r.random_bool(0.2) {
            opts = opts.with_scale(odd[r.random_range(0..odd.len())]);
        }
        let mut rr = rng(case);
        let run = catch_unwind(AssertUnwindSafe(|| {
            let Ok(attn) = FlashAttention::new(&shape, &opts) else {
                return Outcome::Rejected;
            };
            let rows_q = if varlen { attn.total_q() } else { b * sq };
            let rows_k = if varlen {
                *ck.last().unwrap() as usize
            } else {
                b * sk
            };
            let (qs, ks) = if varlen {
                let packed = |h: usize| Strides {
                    batch: 0,
                    seq: (h * d) as i64,
                    head: d as i64,
                };
                (packed(hq), packed(hkv))
            } else {
                (
                    Strides::contiguous(sq, hq, d),
                    Strides::contiguous(sk, hkv, d),
                )
            };
            let q_len = maybe_short(&mut rr, rows_q * hq * d, 0.2);
            let kv_len = maybe_short(&mut rr, rows_k * hkv * d, 0.2);
            let q: Vec<bf16> = random_vec(&mut rr, q_len);
            let k: Vec<bf16> = random_vec(&mut rr, kv_len);
            let v: Vec<bf16> = random_vec(&mut rr, kv_len);
            let mut out = vec![bf16::ZERO; maybe_short(&mut rr, attn.out_len(), 0.2)];
            let mut lse = vec![0f32; maybe_short(&mut rr, attn.lse_len(), 0.2)];
            let q_strides = if rr.random_bool(0.1) {
                Strides {
                    batch: -1,
                    seq: 0,
                    head: 1,
                }
            } else {
                qs
            };
            let done = attn.forward_cpu(
                Strided::new(&q[..], q_strides),
                Strided::new(&k[..], ks),
                Strided::new(&v[..], ks),
                Strided::new(&mut out[..], qs),
                Some(&mut lse[..]),
            );
            outcome_of(done, &out, &lse, case)
        }));
        match run {
            Ok(o) => tally(&mut outcomes, o),
            Err(_) => panic!(
                "case {case} panicked: b={b} hq={hq} hkv={hkv} d={d} sq={sq} sk={sk} \
                 varlen={varlen} cq={cq:?} ck={ck:?} {opts:?}"
            ),
        }
    }
    report("dense", outcomes);
}

#[test]
fn paged_api_never_panics_on_random_input() {
    let mut r = rng(11);
    let mut outcomes = [0usize; 3];
    for case in 0..3000u64 {
        let ps = pick(&mut r, &[0, 1, 1, 3, 3, 16, 16, 16]);
        let hkv = pick(&mut r, &[0, 1, 1, 1, 2, 2]);
        let d = pick(&mut r, &[0, 8, 8, 16, 16, 40]);
        let num_pages = pick(&mut r, &[0, 4, 9, 9, 40, 40]);
        let batch = pick(&mut r, &[0, 1, 1, 2, 2, 2]);
        let max_pages = pick(&mut r, &[0, 3, 5, 5, 8, 8]);
        // Tables with the odd -1, out-of-range id or extra entry; lengths up to the row.
        let extra = usize::from(r.random_bool(0.03));
        let table: Vec<i32> = (0..batch * max_pages + extra)
            .map(|_| match r.random_range(0..50) {
                0 => -1,
                1 => num_pages as i32,
                _ => r.random_range(0..num_pages.max(1) as i32),
            })
            .collect();
        let seqlens: Vec<i32> = (0..batch)
            .map(|_| r.random_range(-1..(max_pages * ps.max(1)) as i32 + 2))
            .collect();
        let layout = PagedLayout {
            num_pages,
            page_size: ps,
            heads_kv: hkv,
            head_dim: d,
        };
        let hq = pick(&mut r, &[0, 1, 2, 2, 3, 4, 4]);
        let q_len = pick(&mut r, &[0, 1, 1, 2, 4, 17]);
        let policy = match r.random_range(0..4) {
            0 => HeadPolicy::Full,
            1 => HeadPolicy::Streaming,
            2 => HeadPolicy::Quest,
            _ => HeadPolicy::Listed,
        };
        let streaming = StreamingConfig {
            sinks: pick(&mut r, &[0, 1, 100]),
            window: pick(&mut r, &[0, 1, 8]),
        };
        let quest = QuestConfig {
            token_budget: pick(&mut r, &[0, 1, 16, 100]),
            sink_pages: pick(&mut r, &[0, 1, 3]),
        };
        let sinks = pick(&mut r, &[0, 1, 100]);
        let mut rr = rng(case);
        let run = catch_unwind(AssertUnwindSafe(|| {
            let tables = PageTable {
                block_table: &table,
                max_pages_per_seq: max_pages,
                seqlens_k: &seqlens,
            };
            let Ok(cache) = PagedCache::new(layout, tables) else {
                return Outcome::Rejected;
            };
            let opts = AttentionOptions::causal().with_sinks(sinks);
            let decode = PagedDecode::new(&cache, hq, q_len, &opts).and_then(|dec| {
                dec.with_policy(
                    SparsePolicy::uniform(hkv, policy)
                        .with_streaming(streaming)
                        .with_quest(quest),
                )
            });
            let decode = if policy == HeadPolicy::Listed {
                // Lists of 0-3 pages, sometimes past a sequence's last page.
                let lists = (0..batch * hkv)
                    .map(|i| (0..i % 4).map(|x| 2 * x).collect())
                    .collect();
                decode.and_then(|dec| dec.with_page_lists(PageLists::new(batch, hkv, lists)?))
            } else {
                decode
            };
            let Ok(decode) = decode else {
                return Outcome::Rejected;
            };
            let q_elems = maybe_short(&mut rr, batch * q_len * hq * d, 0.1);
            let q: Vec<bf16> = random_vec(&mut rr, q_elems);
            let k: Vec<bf16> = random_vec(&mut rr, layout.cache_len());
            let v: Vec<bf16> = random_vec(&mut rr, layout.cache_len());
            let kmin: Vec<bf16> = random_vec(&mut rr, layout.meta_len());
            let kmax: Vec<bf16> = kmin
                .iter()
                .map(|x| bf16::from_f32(x.to_f32() + 1.0))
                .collect();
            let meta = || PageMeta {
                kmin: &kmin[..],
                kmax: &kmax[..],
            };
            let qs = Strides::contiguous(q_len, hq, d);
            let mut out = vec![bf16::ZERO; decode.out_len()];
            let mut lse = vec![0f32; decode.lse_len()];
            let _ = decode.select_cpu(Strided::new(&q[..], qs), meta());
            let done = decode.forward_cpu(
                Strided::new(&q[..], qs),
                KvPages {
                    k: &k[..],
                    v: &v[..],
                },
                rr.random_bool(0.8).then(meta),
                Strided::new(&mut out[..], qs),
                Some(&mut lse[..]),
            );
            outcome_of(done, &out, &lse, case)
        }));
        match run {
            Ok(o) => tally(&mut outcomes, o),
            Err(_) => panic!(
                "case {case} panicked: {layout:?} batch={batch} max_pages={max_pages} \
                 table={table:?} seqlens={seqlens:?} hq={hq} q_len={q_len} {policy:?} \
                 {streaming:?} {quest:?} sinks={sinks}"
            ),
        }
    }
    report("paged", outcomes);
}

#[test]
fn ring_api_never_panics_on_random_input() {
    let mut r = rng(11);
    let mut outcomes = [0usize; 3];
    let shardings = [Sharding::Contiguous, Sharding::Zigzag, Sharding::Stripe];
    for case in 0..3000u64 {
        let seqlen = pick(&mut r, &[0, 1, 2, 7, 7, 33, 33]);
        let world = pick(&mut r, &[0, 1, 2, 3, 3, 5, 5]);
        let sharding = shardings[r.random_range(0..3)];
        let shape = RingShape {
            batch: pick(&mut r, &[0, 1, 1, 2, 2]),
            heads_q: pick(&mut r, &[0, 2, 4, 4, 4]),
            heads_kv: pick(&mut r, &[0, 1, 2, 2, 3]),
            head_dim: pick(&mut r, &[0, 1, 8, 8, 24, 24, usize::MAX]),
        };
        let side = |r: &mut SmallRng| {
            r.random_bool(0.5)
                .then(|| pick(r, &[0, 1, 5, 5, 9, usize::MAX]))
        };
        let (left, right) = (side(&mut r), side(&mut r));
        let mut opts = AttentionOptions::default()
            .with_window(Window::new(left, right))
            .with_sinks(pick(&mut r, &[0, 0, 1, 4, usize::MAX]));
        let odd = [0.0f32, -1.0, f32::NAN, f32::INFINITY, 0.1, 30.0];
        if r.random_bool(0.1) {
            opts = opts.with_softcap(odd[r.random_range(0..odd.len())]);
        }
        // Shard counts off by one now and then.
        let shards = (world as i64 + [0, 0, 0, -1, 1][r.random_range(0..5)]).max(0) as usize;
        let mut rr = rng(case);
        let run = catch_unwind(AssertUnwindSafe(|| {
            let Ok(layout) = RingLayout::new(seqlen, world, sharding) else {
                return Outcome::Rejected;
            };
            let Ok(ring) = RingAttention::new(layout, shape, &opts) else {
                return Outcome::Rejected;
            };
            let d = shape.head_dim;
            let st = |rank: usize, h: usize| Strides::contiguous(layout.shard_len(rank), h, d);
            let q: Vec<Vec<bf16>> = (0..shards)
                .map(|k| random_vec(&mut rr, ring.out_len(k)))
                .collect();
            let kv: Vec<Vec<bf16>> = (0..shards)
                .map(|k| {
                    let n = maybe_short(&mut rr, ring.kv_len(k), 0.05);
                    random_vec(&mut rr, n)
                })
                .collect();
            let mut out: Vec<Vec<bf16>> = (0..shards)
                .map(|k| vec![bf16::ZERO; maybe_short(&mut rr, ring.out_len(k), 0.05)])
                .collect();
            let mut lse: Vec<Vec<f32>> = (0..shards)
                .map(|k| vec![0f32; maybe_short(&mut rr, ring.lse_len(k), 0.05)])
                .collect();
            let qv: Vec<_> = (0..shards)
                .map(|k| Strided::new(&q[k][..], st(k, shape.heads_q)))
                .collect();
            let kvv: Vec<_> = (0..shards)
                .map(|k| Strided::new(&kv[k][..], st(k, shape.heads_kv)))
                .collect();
            let mut ov: Vec<_> = out
                .iter_mut()
                .enumerate()
                .map(|(k, o)| Strided::new(&mut o[..], st(k, shape.heads_q)))
                .collect();
            let mut lv: Vec<&mut [f32]> = lse.iter_mut().map(|l| &mut l[..]).collect();
            let done = ring.forward_cpu(&qv, &kvv, &kvv, &mut ov, Some(&mut lv));
            drop(ov);
            let flat_out: Vec<bf16> = out.concat();
            let flat_lse: Vec<f32> = lse.concat();
            outcome_of(done, &flat_out, &flat_lse, case)
        }));
        match run {
            Ok(o) => tally(&mut outcomes, o),
            Err(_) => panic!(
                "case {case} panicked: seqlen={seqlen} world={world} {sharding:?} {shape:?} \
                 shards={shards} {opts:?}"
            ),
        }
    }
    report("ring", outcomes);
}

#[test]
fn neighborhood_api_never_panics_on_random_input() {
    let mut r = rng(13);
    let mut outcomes = [0usize; 3];
    for case in 0..8000u64 {
        let ndims = pick(&mut r, &[0, 1, 1, 1, 2, 2, 3, 4]);
        let dims: Vec<NeighborhoodDim> = (0..ndims)
            .map(|_| {
                NeighborhoodDim::new(
                    pick(&mut r, &[0, 1, 3, 6, 9]),
                    pick(&mut r, &[0, 1, 2, 3, 5]),
                )
                .with_dilation(pick(&mut r, &[0, 1, 1, 1, 1, 2, 3]))
                .with_causal(r.random_bool(0.2))
                .with_stride(pick(&mut r, &[0, 1, 1, 1, 1, 1, 2, 3]))
            })
            .collect();
        let shape = NeighborhoodShape {
            batch: pick(&mut r, &[0, 1, 1, 2]),
            heads_q: pick(&mut r, &[0, 2, 4, 4]),
            heads_kv: pick(&mut r, &[0, 1, 2, 2, 2, 3]),
            head_dim: pick(&mut r, &[0, 8, 8, 24, 24, usize::MAX]),
            dims: &dims,
        };
        let mut opts = AttentionOptions::default();
        if r.random_bool(0.1) {
            opts = opts.with_sinks(1);
        }
        let odd = [0.0f32, -1.0, f32::NAN, f32::INFINITY, 0.1, 30.0];
        if r.random_bool(0.1) {
            opts = opts.with_softcap(odd[r.random_range(0..odd.len())]);
        }
        let mut rr = rng(case);
        let run = catch_unwind(AssertUnwindSafe(|| {
            let Ok(na) = NeighborhoodAttention::new(&shape, &opts) else {
                return Outcome::Rejected;
            };
            let (n, d) = (na.tokens(), shape.head_dim);
            let (qs, ks) = (
                Strides::contiguous(n, shape.heads_q, d),
                Strides::contiguous(n, shape.heads_kv, d),
            );
            let kv_len = maybe_short(&mut rr, shape.batch * n * shape.heads_kv * d, 0.1);
            let q: Vec<bf16> = random_vec(&mut rr, na.out_len());
            let k: Vec<bf16> = random_vec(&mut rr, kv_len);
            let v: Vec<bf16> = random_vec(&mut rr, kv_len);
            let mut out = vec![bf16::ZERO; maybe_short(&mut rr, na.out_len(), 0.1)];
            let mut lse = vec![0f32; maybe_short(&mut rr, na.lse_len(), 0.1)];
            let done = na.forward_cpu(
                Strided::new(&q[..], qs),
                Strided::new(&k[..], ks),
                Strided::new(&v[..], ks),
                Strided::new(&mut out[..], qs),
                Some(&mut lse[..]),
            );
            outcome_of(done, &out, &lse, case)
        }));
        match run {
            Ok(o) => tally(&mut outcomes, o),
            Err(_) => panic!("case {case} panicked: {dims:?} {shape:?} {opts:?}"),
        }
    }
    report("neighborhood", outcomes);
}
