//! Paged prefill (`PagedPrefill`): the CPU path against the f64 reference and, bit for bit,
//! against dense attention (`FlashAttention::forward_cpu`) over the tokens gathered from the
//! pages; argument refusals; and the GPU kernel against the f64 reference (skipped without a
//! GPU, fails under LONGATTN_REQUIRE_GPU=1). Caches come from the shared fixture
//! (`common/paged.rs`): pages in a random order, K/V written through `append_cpu`.

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use longattn::reference::paged::paged_prefill_f64;
use longattn::{
    AttentionOptions, AttentionShape, Element, Error, F8E4M3, FlashAttention, KvPages, KvScales,
    PageTable, PagedCache, PagedLayout, PagedPrefill, SeqLens, Strided, Strides, Window, bf16, f16,
};
use std::sync::Arc;

mod common;
use common::paged::*;
use common::*;

/// Sequence lengths for a prefill of `q_len` tokens: an empty sequence and one shorter than
/// `q_len` (rows that see nothing under causal), `q_len == sk`, and longer prefixes.
fn seqlens_for(q_len: usize) -> Vec<usize> {
    vec![0, q_len / 2, q_len, q_len + 45, q_len + 300]
}

fn run_cpu<T: Element>(
    pf: &PagedPrefill,
    sc: &Scenario<T>,
    q: &[T],
    st: Strides,
    out_len: usize,
) -> (Vec<T>, Vec<f32>) {
    // Poison: every element must be written.
    let mut out = vec![T::from_f32(f32::NAN); out_len];
    let mut lse = vec![f32::NAN; pf.lse_len()];
    pf.forward_cpu(
        Strided::new(q, st),
        sc.kv(),
        Strided::new(&mut out[..], st),
        Some(&mut lse),
    )
    .unwrap();
    (out, lse)
}

/// Output values of the `[batch, q_len, heads_q, head_dim]` view `st` of `out`, contiguous.
fn view<T: Element>(out: &[T], st: Strides, dims: [usize; 4]) -> Vec<f64> {
    let [bn, sq, hq, d] = dims;
    let mut v = Vec::with_capacity(bn * sq * hq * d);
    for b in 0..bn {
        for i in 0..sq {
            for h in 0..hq {
                let o = (b as i64 * st.batch + i as i64 * st.seq + h as i64 * st.head) as usize;
                v.extend(out[o..o + d].iter().map(|x| x.to_f64()));
            }
        }
    }
    v
}

/// Dense attention of sequence `b` alone over its contiguous tokens (batch 1,
/// `seqlen_q = q_len`, `seqlen_k = seqlens_k[b]`): `(out [q_len, heads_q, d], lse [heads_q,
/// q_len])`.
fn dense_of_sequence<T: Element>(
    pf: &PagedPrefill,
    sc: &Scenario<T>,
    q: &[T],
    b: usize,
    opts: &AttentionOptions,
) -> (Vec<T>, Vec<f32>) {
    let c = pf.cache();
    let (hq, hkv, d, sq) = (pf.heads_q(), c.heads_kv(), c.head_dim(), pf.q_len());
    let sk = c.seqlen(b).unwrap();
    let attn = FlashAttention::new(
        &AttentionShape {
            batch: 1,
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
    .unwrap();
    let per_q = sq * hq * d;
    let mut out = vec![T::from_f32(f32::NAN); per_q];
    let mut lse = vec![f32::NAN; hq * sq];
    let qs = Strides::contiguous(sq, hq, d);
    let ks = Strides::contiguous(sk, hkv, d);
    attn.forward_cpu(
        Strided::new(&q[b * per_q..(b + 1) * per_q], qs),
        Strided::new(&sc.k_tokens[b][..], ks),
        Strided::new(&sc.v_tokens[b][..], ks),
        Strided::new(&mut out[..], qs),
        Some(&mut lse),
    )
    .unwrap();
    (out, lse)
}

#[test]
fn cpu_matches_reference_and_dense_over_gathered_tokens() {
    let mut cases = 0;
    for ps in [1, 16, 64, 256] {
        for q_len in [1, 7, 64, 97] {
            for (hkv, ratio, d) in [(2, 1, 16), (1, 4, 8), (2, 3, 24)] {
                let hq = hkv * ratio;
                let seqlens = seqlens_for(q_len);
                let seed = 1000 + ps as u64 * 7 + q_len as u64 * 13 + d as u64;
                let sc = scenario::<f32>(&seqlens, ps, hkv, d, seed);
                let mut r = rng(seed + 1);
                let q: Vec<f32> = random_vec(&mut r, seqlens.len() * q_len * hq * d);
                let st = q_strides(q_len, hq, d);
                for (name, opts) in prefill_masks((5, 2)) {
                    let pf = PagedPrefill::new(&sc.cache, hq, q_len, &opts).unwrap();
                    let what = format!("ps {ps} q_len {q_len} hkv {hkv} hq {hq} d {d} {name}");
                    let (out, lse) = run_cpu(&pf, &sc, &q, st, pf.out_len());
                    let (want, want_lse) =
                        paged_prefill_f64(&pf, Strided::new(&q[..], st), sc.kv()).unwrap();
                    let err = rel_l2(&to_f64(&out), &want);
                    assert!(err < 1e-5, "{what}: rel err {err}");
                    check_lse(&lse, &want_lse, 1e-4, &what);
                    // Dense over the gathered tokens, sequence by sequence: identical bits.
                    let per_q = q_len * hq * d;
                    for b in 0..seqlens.len() {
                        let (dout, dlse) = dense_of_sequence(&pf, &sc, &q, b, &opts);
                        let got = &out[b * per_q..(b + 1) * per_q];
                        assert!(
                            got.iter()
                                .zip(&dout)
                                .all(|(a, x)| a.to_bits() == x.to_bits()),
                            "{what}: sequence {b} differs from dense"
                        );
                        let got_lse = &lse[b * hq * q_len..(b + 1) * hq * q_len];
                        assert!(
                            got_lse
                                .iter()
                                .zip(&dlse)
                                .all(|(a, x)| a.to_bits() == x.to_bits()),
                            "{what}: sequence {b} LSE differs from dense"
                        );
                    }
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 4 * 4 * 3 * prefill_masks((5, 2)).len());
}

/// Row offsets of packed queries with these per-sequence counts.
fn cu_of(lens: &[usize]) -> Vec<i32> {
    std::iter::once(0)
        .chain(lens.iter().scan(0i32, |acc, &l| {
            *acc += l as i32;
            Some(*acc)
        }))
        .collect()
}

/// Sequence `b` of `sc` alone: a one-sequence cache over the same pages.
fn single_sequence(sc_cache: &PagedCache, b: usize) -> PagedCache {
    let m = sc_cache.max_pages_per_seq();
    PagedCache::new(
        sc_cache.layout(),
        PageTable {
            block_table: &sc_cache.block_table()[b * m..(b + 1) * m],
            max_pages_per_seq: m,
            seqlens_k: &sc_cache.seqlens_k()[b..b + 1],
        },
    )
    .unwrap()
}

/// Varlen prefill (a count per sequence, 0 included, some longer than the sequence's keys)
/// against the f64 reference, and each sequence's rows and LSE against the fixed-`q_len`
/// problem of that sequence alone (its own one-sequence cache): the packed layout, the
/// per-sequence bottom-right alignment and the `[heads_q, total_q]` LSE are all checked
/// against a problem that has no varlen in it.
#[test]
fn cpu_varlen_matches_each_sequence_alone() {
    for ps in [1, 16, 64] {
        for (hkv, ratio, d) in [(2, 1, 16), (1, 4, 8)] {
            let hq = hkv * ratio;
            let seqlens = [0usize, 5, 40, 100, 333];
            let lens = [0usize, 9, 40, 1, 97];
            let cu = cu_of(&lens);
            let total = cu[lens.len()] as usize;
            let seed = 5000 + ps as u64 + d as u64;
            let sc = scenario::<f32>(&seqlens, ps, hkv, d, seed);
            let q: Vec<f32> = random_vec(&mut rng(seed + 1), total * hq * d);
            let st = Strides::contiguous(total, hq, d);
            for (name, opts) in prefill_masks((5, 2)) {
                let what = format!("varlen ps {ps} hkv {hkv} hq {hq} d {d} {name}");
                let pf = PagedPrefill::new_varlen(&sc.cache, hq, &cu, &opts).unwrap();
                assert_eq!((pf.q_len(), pf.total_q()), (97, total), "{what}");
                let (out, lse) = run_cpu(&pf, &sc, &q, st, pf.out_len());
                let (want, want_lse) =
                    paged_prefill_f64(&pf, Strided::new(&q[..], st), sc.kv()).unwrap();
                let err = rel_l2(&to_f64(&out), &want);
                assert!(err < 1e-5, "{what}: rel err {err}");
                check_lse(&lse, &want_lse, 1e-4, &what);
                for (b, &len) in lens.iter().enumerate().filter(|(_, l)| **l > 0) {
                    let one = single_sequence(&sc.cache, b);
                    let alone = PagedPrefill::new(&one, hq, len, &opts).unwrap();
                    let r0 = cu[b] as usize;
                    let qb = &q[r0 * hq * d..(r0 + len) * hq * d];
                    let st1 = Strides::contiguous(len, hq, d);
                    let (w1, l1) =
                        paged_prefill_f64(&alone, Strided::new(qb, st1), sc.kv()).unwrap();
                    let got = &want[r0 * hq * d..(r0 + len) * hq * d];
                    let diff = got.iter().zip(&w1).map(|(a, x)| (a - x).abs());
                    assert!(
                        diff.fold(0.0, f64::max) < 1e-12,
                        "{what}: sequence {b} rows"
                    );
                    for h in 0..hq {
                        for i in 0..len {
                            let (a, x) = (want_lse[h * total + r0 + i], l1[h * len + i]);
                            assert!(
                                a == x || (a - x).abs() < 1e-12,
                                "{what}: sequence {b} head {h} row {i} lse {a} vs {x}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn varlen_constructor_refuses_bad_offsets() {
    let c = small_cache();
    let opts = AttentionOptions::causal();
    for (cu, why) in [
        (vec![0, 3], "entries"),
        (vec![0, 3, 5, 6], "entries"),
        (vec![1, 3, 5], "must be 0"),
        (vec![0, 4, 2], "decrease"),
        (vec![0, 0, 0], "total_q = 0"),
    ] {
        let err = PagedPrefill::new_varlen(&c, 2, &cu, &opts).unwrap_err();
        assert!(
            matches!(&err, Error::Shape(m) if m.contains(why)),
            "{cu:?}: {err}"
        );
    }
    let pf = PagedPrefill::new_varlen(&c, 2, &[0, 0, 5], &opts).unwrap();
    assert_eq!((pf.q_len(), pf.total_q(), pf.lse_len()), (5, 5, 10));
    // q/out are [total_q, heads_q, head_dim]: a [batch, q_len, ...] sized buffer is too
    // large to be refused, a packed one of 4 rows too small.
    let st = Strides::contiguous(4, 2, 8);
    let (q, mut out) = (vec![0f32; 4 * 2 * 8], vec![0f32; 4 * 2 * 8]);
    let kv = (vec![0f32; 4 * 4 * 2 * 8], vec![0f32; 4 * 4 * 2 * 8]);
    let r = pf.forward_cpu(
        Strided::new(&q[..], st),
        KvPages {
            k: &kv.0[..],
            v: &kv.1[..],
        },
        Strided::new(&mut out[..], st),
        None,
    );
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
}

#[test]
fn cpu_rows_that_see_nothing_give_zero_and_neg_inf() {
    // Sequence 0 is empty, sequence 1 holds 3 tokens for q_len 7: under causal the first 4
    // rows of sequence 1 see nothing.
    let (q_len, hq, d) = (7, 2, 8);
    let sc = scenario::<f32>(&[0, 3, 9], 4, 1, d, 5);
    let q: Vec<f32> = random_vec(&mut rng(6), 3 * q_len * hq * d);
    let pf = PagedPrefill::new(&sc.cache, hq, q_len, &AttentionOptions::causal()).unwrap();
    let st = q_strides(q_len, hq, d);
    let (out, lse) = run_cpu(&pf, &sc, &q, st, pf.out_len());
    for h in 0..hq {
        for i in 0..q_len {
            let empty = [(0, true), (1, i < 4), (2, false)];
            for (b, is_empty) in empty {
                let l = lse[(b * hq + h) * q_len + i];
                let o = &out[((b * q_len + i) * hq + h) * d..][..d];
                if is_empty {
                    assert_eq!(l, f32::NEG_INFINITY, "b {b} h {h} i {i}");
                    assert!(o.iter().all(|&x| x == 0.0), "b {b} h {h} i {i}");
                } else {
                    assert!(l.is_finite(), "b {b} h {h} i {i}");
                }
            }
        }
    }
}

#[test]
fn cpu_strided_views_and_half_types() {
    // q/out with padded rows and heads (a [batch, q_len, heads + 1, d + 8] view), bf16 and
    // f16 against the f64 reference of the same rounded inputs.
    fn check<T: Element>(tol: f64) {
        let (q_len, hkv, hq, d, ps) = (13, 2, 4, 32, 16);
        let sc = scenario::<T>(&[40, 13, 100], ps, hkv, d, 21);
        let st = Strides {
            batch: (q_len * (hq + 1) * (d + 8)) as i64,
            seq: ((hq + 1) * (d + 8)) as i64,
            head: (d + 8) as i64,
        };
        let len = 3 * st.batch as usize;
        let q: Vec<T> = random_vec(&mut rng(22), len);
        for (name, opts) in prefill_masks((5, 2)) {
            let pf = PagedPrefill::new(&sc.cache, hq, q_len, &opts).unwrap();
            let (out, lse) = run_cpu(&pf, &sc, &q, st, len);
            let (want, want_lse) =
                paged_prefill_f64(&pf, Strided::new(&q[..], st), sc.kv()).unwrap();
            let got = view(&out, st, [3, q_len, hq, d]);
            let err = rel_l2(&got, &want);
            assert!(err < tol, "{name}: rel err {err}");
            check_lse(&lse, &want_lse, 1e-3, &name);
        }
    }
    check::<f32>(1e-5);
    check::<bf16>(1e-2);
    check::<f16>(2e-3);
}

fn small_cache() -> PagedCache {
    PagedCache::new(
        PagedLayout {
            num_pages: 4,
            page_size: 4,
            heads_kv: 2,
            head_dim: 8,
        },
        PageTable {
            block_table: &[2, 0, 1, 3],
            max_pages_per_seq: 2,
            seqlens_k: &[6, 8],
        },
    )
    .unwrap()
}

#[test]
fn constructor_refuses_bad_problems() {
    let c = small_cache();
    let o = AttentionOptions::causal();
    let shape = |r: longattn::Result<PagedPrefill>| matches!(r, Err(Error::Shape(_)));
    let option = |r: longattn::Result<PagedPrefill>| matches!(r, Err(Error::InvalidOption(_)));
    assert!(shape(PagedPrefill::new(&c, 0, 4, &o)), "heads_q 0");
    assert!(shape(PagedPrefill::new(&c, 3, 4, &o)), "heads_q % heads_kv");
    assert!(shape(PagedPrefill::new(&c, 4, 0, &o)), "q_len 0");
    assert!(
        shape(PagedPrefill::new(&c, 4, i32::MAX as usize + 1, &o)),
        "q_len > i32"
    );
    assert!(
        shape(PagedPrefill::new(&c, usize::MAX - 1, 4, &o)),
        "heads_q > i32"
    );
    // q/out element counts that overflow.
    assert!(shape(PagedPrefill::new(
        &c,
        i32::MAX as usize - 1,
        i32::MAX as usize,
        &o
    )));
    assert!(
        option(PagedPrefill::new(&c, 4, 4, &o.with_scale(0.0))),
        "scale 0"
    );
    assert!(
        option(PagedPrefill::new(&c, 4, 4, &o.with_scale(f32::NAN))),
        "scale NaN"
    );
    assert!(
        option(PagedPrefill::new(&c, 4, 4, &o.with_softcap(-1.0))),
        "softcap < 0"
    );
    assert!(
        option(PagedPrefill::new(
            &c,
            4,
            4,
            &o.with_sinks(i32::MAX as usize + 1)
        )),
        "sinks > i32"
    );
    assert!(
        option(PagedPrefill::new(
            &c,
            4,
            4,
            &o.with_window(Window::new(Some(i32::MAX as usize + 1), None))
        )),
        "window > i32"
    );
    let pf = PagedPrefill::new(&c, 4, 3, &o).unwrap();
    assert_eq!(pf.group(), 2);
    assert_eq!(pf.kv_head(3), 1);
    assert_eq!(pf.out_len(), 2 * 3 * 4 * 8);
    assert_eq!(pf.lse_len(), 2 * 4 * 3);
    assert_eq!(pf.mask().window, Window::CAUSAL);
    // Default options are not causal (as dense), unlike decode.
    let full = PagedPrefill::new(&c, 4, 3, &AttentionOptions::default()).unwrap();
    assert_eq!(full.mask().window, Window::FULL);
}

#[test]
fn forward_cpu_refuses_bad_buffers() {
    let c = small_cache();
    let pf = PagedPrefill::new(&c, 4, 3, &AttentionOptions::causal()).unwrap();
    let n = pf.out_len();
    let st = Strides::contiguous(3, 4, 8);
    let q = vec![0.5f32; n];
    let kc = vec![0.25f32; c.layout().cache_len()];
    let kv = || KvPages {
        k: &kc[..],
        v: &kc[..],
    };
    let mut out = vec![0.0f32; n];
    let mut lse = vec![0.0f32; pf.lse_len()];
    // Short q, short out, short lse, wrong cache length, overlapping out, negative stride.
    assert!(matches!(
        pf.forward_cpu(
            Strided::new(&q[..n - 1], st),
            kv(),
            Strided::new(&mut out[..], st),
            None
        ),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        pf.forward_cpu(
            Strided::new(&q[..], st),
            kv(),
            Strided::new(&mut out[..n - 1], st),
            None
        ),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        pf.forward_cpu(
            Strided::new(&q[..], st),
            kv(),
            Strided::new(&mut out[..], st),
            Some(&mut lse[1..])
        ),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        pf.forward_cpu(
            Strided::new(&q[..], st),
            KvPages {
                k: &kc[1..],
                v: &kc[..]
            },
            Strided::new(&mut out[..], st),
            None
        ),
        Err(Error::Shape(_))
    ));
    let aliased = Strides { head: 0, ..st };
    assert!(matches!(
        pf.forward_cpu(
            Strided::new(&q[..], st),
            kv(),
            Strided::new(&mut out[..], aliased),
            None
        ),
        Err(Error::Stride(_))
    ));
    let negative = Strides { seq: -1, ..st };
    assert!(matches!(
        pf.forward_cpu(
            Strided::new(&q[..], negative),
            kv(),
            Strided::new(&mut out[..], st),
            None
        ),
        Err(Error::Stride(_))
    ));
    // Nothing was written by a refused call.
    assert!(out.iter().all(|&x| x == 0.0));
    pf.forward_cpu(
        Strided::new(&q[..], st),
        kv(),
        Strided::new(&mut out[..], st),
        Some(&mut lse),
    )
    .unwrap();
}

// ---------------------------------------------------------------------------------------
// GPU (explicit opt-in kernel; skipped without a GPU).

fn stream() -> Option<Arc<CudaStream>> {
    gpu_stream_or_skip("paged prefill GPU test")
}

fn up<T: DeviceRepr>(s: &Arc<CudaStream>, x: &[T]) -> CudaSlice<T> {
    s.clone_htod(x).unwrap()
}

/// Runs `pf` on the GPU into NaN-poisoned output and LSE, one-shot (`forward_gpu`) or
/// through a plan (`plan_gpu` + `PagedPrefillPlan::forward`).
fn run_gpu<T: Element + DeviceRepr, C: Element + DeviceRepr>(
    s: &Arc<CudaStream>,
    pf: &PagedPrefill,
    sc: &Scenario<T, C>,
    q: &[T],
    planned: bool,
) -> (Vec<T>, Vec<f32>) {
    let st = q_strides(pf.q_len(), pf.heads_q(), pf.cache().head_dim());
    run_gpu_strided(s, pf, sc, q, st, planned)
}

/// [`run_gpu`] with q/out strides `st`.
fn run_gpu_strided<T: Element + DeviceRepr, C: Element + DeviceRepr>(
    s: &Arc<CudaStream>,
    pf: &PagedPrefill,
    sc: &Scenario<T, C>,
    q: &[T],
    st: Strides,
    planned: bool,
) -> (Vec<T>, Vec<f32>) {
    let qd = up(s, q);
    let kd = up(s, &sc.k_cache);
    let vd = up(s, &sc.v_cache);
    // Poison: every element must be written.
    let mut od = up(s, &vec![T::from_f32(f32::NAN); pf.out_len()]);
    let mut ld = up(s, &vec![f32::NAN; pf.lse_len()]);
    let (gq, kv, gout) = (
        Strided::new(&qd, st),
        KvPages { k: &kd, v: &vd },
        Strided::new(&mut od, st),
    );
    if planned {
        let plan = pf.plan_gpu(s).unwrap();
        plan.forward(s, gq, kv, gout, Some(&mut ld)).unwrap();
    } else {
        pf.forward_gpu(s, gq, kv, gout, Some(&mut ld)).unwrap();
    }
    let out = s.clone_dtoh(&od).unwrap();
    let lse = s.clone_dtoh(&ld).unwrap();
    assert!(
        out.iter().all(|x| !x.to_f32().is_nan()),
        "unwritten (NaN) output"
    );
    assert!(lse.iter().all(|x| !x.is_nan()), "unwritten (NaN) lse");
    (out, lse)
}

fn gpu_sweep<T: Element + DeviceRepr>(s: &Arc<CudaStream>) {
    gpu_sweep_over::<T, T>(s, &[1, 16, 64, 256], &[1, 37, 64, 130], |_| None);
}

/// The prefill sweep over a cache of type `C` (`scales(heads_kv)` for an FP8 one).
fn gpu_sweep_over<T: Element + DeviceRepr, C: Element + DeviceRepr>(
    s: &Arc<CudaStream>,
    page_sizes: &[usize],
    q_lens: &[usize],
    scales: impl Fn(usize) -> Option<KvScales>,
) {
    for &ps in page_sizes {
        for (hkv, ratio, d) in [(2, 1, 128), (1, 4, 64), (2, 2, 256)] {
            for &q_len in q_lens {
                let hq = hkv * ratio;
                let seqlens = seqlens_for(q_len);
                let seed = 4000 + ps as u64 + d as u64 * 3 + q_len as u64 * 5;
                let sc = scenario_with::<T, C>(&seqlens, ps, hkv, d, seed, scales(hkv));
                let q: Vec<T> = random_vec(&mut rng(seed + 1), seqlens.len() * q_len * hq * d);
                let st = q_strides(q_len, hq, d);
                for (name, opts) in prefill_masks((5, 2)) {
                    let pf = PagedPrefill::new(&sc.cache, hq, q_len, &opts).unwrap();
                    let what = format!("gpu ps {ps} hkv {hkv} hq {hq} d {d} q_len {q_len} {name}");
                    let (out, lse) = run_gpu(s, &pf, &sc, &q, false);
                    // The plan runs the same kernel on the same tables: bit-identical.
                    if ps == 16 {
                        let planned = run_gpu(s, &pf, &sc, &q, true);
                        let same = planned
                            .0
                            .iter()
                            .zip(&out)
                            .all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits());
                        assert!(
                            same && planned.1 == lse,
                            "{what}: plan differs from one-shot"
                        );
                    }
                    let (want, want_lse) =
                        paged_prefill_f64(&pf, Strided::new(&q[..], st), sc.kv()).unwrap();
                    let err = rel_l2(&to_f64(&out), &want);
                    assert!(err < 2e-2, "{what}: rel err {err}");
                    check_lse(&lse, &want_lse, 2e-2, &what);
                }
            }
        }
    }
}

/// Varlen prefill on the GPU (counts 0, 1, odd, a full tile, more than a tile; some longer
/// than the sequence's keys), one-shot and planned, against the f64 reference.
fn gpu_varlen_sweep<T: Element + DeviceRepr>(s: &Arc<CudaStream>) {
    let seqlens = [3usize, 5, 100, 64, 400];
    let lens = [0usize, 9, 64, 1, 130];
    let cu = cu_of(&lens);
    let total = cu[lens.len()] as usize;
    for ps in [1, 16, 64, 256] {
        for (hkv, ratio, d) in [(2, 1, 128), (1, 4, 64), (2, 2, 256)] {
            let hq = hkv * ratio;
            let seed = 6000 + ps as u64 + d as u64;
            let sc = scenario::<T>(&seqlens, ps, hkv, d, seed);
            let q: Vec<T> = random_vec(&mut rng(seed + 1), total * hq * d);
            let st = Strides::contiguous(total, hq, d);
            for (name, opts) in prefill_masks((5, 2)) {
                let pf = PagedPrefill::new_varlen(&sc.cache, hq, &cu, &opts).unwrap();
                let (want, want_lse) =
                    paged_prefill_f64(&pf, Strided::new(&q[..], st), sc.kv()).unwrap();
                for planned in [false, true] {
                    let what = format!("gpu varlen ps {ps} hq {hq} d {d} {name} plan {planned}");
                    let (out, lse) = run_gpu_strided(s, &pf, &sc, &q, st, planned);
                    let err = rel_l2(&to_f64(&out), &want);
                    assert!(err < 2e-2, "{what}: rel err {err}");
                    check_lse(&lse, &want_lse, 2e-2, &what);
                }
            }
        }
    }
}

#[test]
fn gpu_prefill_matches_reference_bf16() {
    let Some(s) = stream() else { return };
    gpu_sweep::<bf16>(&s);
    gpu_varlen_sweep::<bf16>(&s);
}

#[test]
fn gpu_prefill_matches_reference_f16() {
    let Some(s) = stream() else { return };
    gpu_sweep::<f16>(&s);
}

/// Paged prefill over an FP8 e4m3 cache (kernels not yet run on a GPU) against the f64
/// reference of the dequantised cache; per-kv-head scales that saturate some values.
#[test]
fn gpu_fp8_prefill_matches_reference() {
    let Some(s) = stream() else { return };
    let scales = |hkv: usize| {
        let k = (0..hkv).map(|g| 1.0 / (300.0 + 200.0 * g as f32)).collect();
        let v = (0..hkv).map(|g| 1.0 / (700.0 - 150.0 * g as f32)).collect();
        Some(KvScales::new(k, v).unwrap())
    };
    gpu_sweep_over::<bf16, F8E4M3>(&s, &[1, 16, 64], &[1, 37, 130], scales);
    gpu_sweep_over::<f16, F8E4M3>(&s, &[16], &[64], scales);
}

/// A prefill plan captured once in a CUDA graph and replayed over fresh queries: no upload or
/// allocation happens inside `PagedPrefillPlan::forward`.
#[test]
fn gpu_prefill_plan_replays_in_a_cuda_graph() {
    let Some(ctx) = gpu_or_skip("gpu_prefill_plan_replays_in_a_cuda_graph") else {
        return;
    };
    let s = capture_stream(&ctx);
    let (q_len, hkv, hq, d) = (70usize, 2usize, 4usize, 128usize);
    let sc = scenario::<bf16>(&seqlens_for(q_len), 16, hkv, d, 77);
    let pf = PagedPrefill::new(&sc.cache, hq, q_len, &AttentionOptions::causal()).unwrap();
    let st = q_strides(q_len, hq, d);
    let (kd, vd) = (up(&s, &sc.k_cache), up(&s, &sc.v_cache));
    let mut qd = s.alloc_zeros::<bf16>(pf.out_len()).unwrap();
    let mut od = s.alloc_zeros::<bf16>(pf.out_len()).unwrap();
    let plan = pf.plan_gpu(&s).unwrap();
    let graph = capture_graph(&s, || {
        plan.forward(
            &s,
            Strided::new(&qd, st),
            KvPages { k: &kd, v: &vd },
            Strided::new(&mut od, st),
            None,
        )
        .unwrap();
    });
    for round in 0..3u64 {
        let q: Vec<bf16> = random_vec(&mut rng(300 + round), pf.out_len());
        s.memcpy_htod(&q, &mut qd).unwrap();
        s.memcpy_htod(&vec![bf16::NAN; pf.out_len()], &mut od)
            .unwrap();
        graph.launch().unwrap();
        let out = s.clone_dtoh(&od).unwrap();
        let (want, _) = paged_prefill_f64(&pf, Strided::new(&q[..], st), sc.kv()).unwrap();
        let err = rel_l2(&to_f64(&out), &want);
        assert!(err < 2e-2, "replay {round}: rel L2 {err}");
    }
}

#[test]
fn gpu_prefill_refuses_what_it_cannot_run() {
    let Some(s) = stream() else { return };
    // f32 and head dims other than 64/128/256 run on the CPU only.
    let sc = scenario::<f32>(&[10, 20], 16, 1, 64, 3);
    let pf = PagedPrefill::new(&sc.cache, 2, 5, &AttentionOptions::causal()).unwrap();
    let st = q_strides(5, 2, 64);
    let qd = up(&s, &vec![0.0f32; pf.out_len()]);
    let kd = up(&s, &sc.k_cache);
    let mut od = up(&s, &vec![0.0f32; pf.out_len()]);
    let r = pf.forward_gpu(
        &s,
        Strided::new(&qd, st),
        KvPages { k: &kd, v: &kd },
        Strided::new(&mut od, st),
        None,
    );
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    let sc = scenario::<bf16>(&[10, 20], 16, 1, 32, 3);
    let pf = PagedPrefill::new(&sc.cache, 2, 5, &AttentionOptions::causal()).unwrap();
    let st = q_strides(5, 2, 32);
    let qd = up(&s, &vec![bf16::ZERO; pf.out_len()]);
    let kd = up(&s, &sc.k_cache);
    let mut od = up(&s, &vec![bf16::ZERO; pf.out_len()]);
    let r = pf.forward_gpu(
        &s,
        Strided::new(&qd, st),
        KvPages { k: &kd, v: &kd },
        Strided::new(&mut od, st),
        None,
    );
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    // A short output buffer is refused before any pointer is taken.
    let r = pf.forward_gpu(
        &s,
        Strided::new(&qd, st),
        KvPages { k: &kd, v: &kd },
        Strided::new(&mut od.slice_mut(1..), st),
        None,
    );
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
}

/// `FastDiv` (kernels/include/longattn/paged_common.cuh), the page-size division of the paged
/// prefill's `load_kv` (not yet run on a GPU in that kernel) and of the decode kernel,
/// restated: `l = ceil(log2 d)` by the kernel's loop, `mul = ceil(2^(31 + l) / d)` (stored in
/// 32 bits), `u / d = (u * mul) >> (31 + l)`. The host passes every page size in `[1, 2^31)`
/// (`num_pages * page_size <= i32::MAX`) and the kernels divide key indices `u < 2^31` (below
/// `seqlens_k`, an i32). With `e = mul * d - 2^(31 + l)` (`0 <= e < d <= 2^l`) the quotient
/// is exact for every such `u` iff `(u * e) < (d - u % d) * 2^(31 + l)`, which
/// `e * (2^31 - 1) < 2^(31 + l)` guarantees: checked for every divisor up to 2^20, the
/// divisors around each power of two up to `i32::MAX` and a pseudo-random sample; plus the
/// quotients themselves for every page size up to 4096 (small dividends, and the largest
/// ones of every residue below 2^31) and at the edges for the other divisors.
#[test]
fn fastdiv_model_is_exact_for_every_page_size() {
    const LIMIT: u64 = 1 << 31; // dividends and divisors are below 2^31
    let magic = |d: u64| -> (u64, u32) {
        let mut l = 0u32;
        while (1u64 << l) < d {
            l += 1;
        }
        let mul = (1u64 << (31 + l)).div_ceil(d); // the kernel's (2^s + d - 1) / d
        assert!(
            mul <= u64::from(u32::MAX),
            "d {d}: multiplier {mul} past 32 bits"
        );
        (mul, 31 + l)
    };
    let div = |u: u64, (mul, shift): (u64, u32)| (u * mul) >> shift;
    let bound_holds = |d: u64| {
        let (mul, shift) = magic(d);
        let e = mul * d - (1u64 << shift);
        assert!(e < d, "d {d}: e {e}");
        assert!(
            u128::from(e) * u128::from(LIMIT - 1) < 1u128 << shift,
            "d {d}: the error term can reach the next integer"
        );
    };
    let quotients_hold = |d: u64, us: &mut dyn Iterator<Item = u64>| {
        let m = magic(d);
        for u in us {
            assert_eq!(div(u, m), u / d, "{u} / {d}");
        }
    };
    for d in 1..=1u64 << 20 {
        bound_holds(d);
    }
    let mut edges: Vec<u64> = (0..31)
        .flat_map(|k| [(1u64 << k) - 1, 1 << k, (1 << k) + 1])
        .chain([LIMIT - 1, LIMIT - 2, 3 * (1 << 29), 1_000_003, 123_456_789])
        .filter(|&d| (1..LIMIT).contains(&d))
        .collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    edges.extend((0..20_000).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        1 + x % (LIMIT - 1)
    }));
    for &d in &edges {
        bound_holds(d);
        let top = (LIMIT - 1) / d * d; // the largest multiple of d below 2^31
        quotients_hold(
            d,
            &mut [
                0,
                1,
                d - 1,
                d,
                d + 1,
                2 * d - 1,
                top.saturating_sub(1),
                top,
                LIMIT - 1,
            ]
            .into_iter()
            .filter(|&u| u < LIMIT),
        );
    }
    for d in 1..=4096u64 {
        // Small dividends, then the last 2d below 2^31: the largest u of every residue.
        quotients_hold(d, &mut (0..8 * d).chain(LIMIT - 2 * d..LIMIT));
    }
}
