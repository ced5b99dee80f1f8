//! Paged sparse decode on the GPU: append, Quest selection, decode and the plan/run split,
//! each against the CPU path or the f64 references (fixtures in `common/paged.rs`). The tests
//! run when a GPU is usable, print `SKIP (no GPU)` otherwise, and fail under
//! LONGATTN_REQUIRE_GPU=1.

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use longattn::PagedDecodePlan;
use longattn::reference::paged::{page_bounds, quest_scores_f64, quest_select_brute};
use longattn::{
    AttentionOptions, Element, Error, F8E4M3, GpuSelection, HeadPolicy, KvPages, KvScales,
    PageLists, PageMeta, PageTable, PagedCache, PagedDecode, SparsePolicy, StreamingConfig,
    Strided, Strides, bf16, f16,
};
use rand::Rng;
use std::sync::Arc;

mod common;
use common::paged::*;
use common::*;

fn stream() -> Option<Arc<CudaStream>> {
    gpu_stream_or_skip("paged GPU test")
}

fn up<T: DeviceRepr>(s: &Arc<CudaStream>, x: &[T]) -> CudaSlice<T> {
    s.clone_htod(x).unwrap()
}

/// `dec.select_gpu` on the device queries `qd` (strides `st`) and page bounds `kmin`, `kmax`.
fn select<T: Element + DeviceRepr, C: Element + DeviceRepr>(
    s: &Arc<CudaStream>,
    dec: &PagedDecode,
    qd: &CudaSlice<T>,
    st: Strides,
    (kmin, kmax): (&CudaSlice<C>, &CudaSlice<C>),
) -> GpuSelection {
    dec.select_gpu(s, Strided::new(qd, st), PageMeta { kmin, kmax })
        .unwrap()
}

/// bf16/f16 inputs, f32 accumulation: relative L2 bound vs the f64 reference.
const HALF_TOL: f64 = 2e-2;

fn run_gpu<T: Element + DeviceRepr, C: Element + DeviceRepr>(
    s: &Arc<CudaStream>,
    dec: &PagedDecode,
    sc: &Scenario<T, C>,
    q: &[T],
) -> (Vec<T>, Vec<f32>) {
    let (hq, ql, d) = (dec.heads_q(), dec.q_len(), sc.cache.head_dim());
    let st = q_strides(ql, hq, d);
    let qd = up(s, q);
    let kd = up(s, &sc.k_cache);
    let vd = up(s, &sc.v_cache);
    let mind = up(s, &sc.kmin);
    let maxd = up(s, &sc.kmax);
    // Poison: every element must be written.
    let mut od = up(s, &vec![T::from_f32(f32::NAN); dec.out_len()]);
    let mut ld = up(s, &vec![f32::NAN; dec.lse_len()]);
    dec.forward_gpu(
        s,
        Strided::new(&qd, st),
        KvPages { k: &kd, v: &vd },
        Some(PageMeta {
            kmin: &mind,
            kmax: &maxd,
        }),
        Strided::new(&mut od, st),
        Some(&mut ld),
    )
    .unwrap();
    let out = s.clone_dtoh(&od).unwrap();
    let lse = s.clone_dtoh(&ld).unwrap();
    assert!(
        out.iter().all(|x| !x.to_f32().is_nan()),
        "unwritten (NaN) output"
    );
    assert!(lse.iter().all(|x| !x.is_nan()), "unwritten (NaN) lse");
    (out, lse)
}

fn decode_sweep<T: Element + DeviceRepr>(s: &Arc<CudaStream>) {
    decode_sweep_over::<T, T>(
        s,
        &[(2, 1, 128), (2, 4, 64), (1, 4, 128), (2, 8, 32)],
        |_| None,
    );
}

/// The decode sweep over a cache of element type `C` (`scales(heads_kv)` for an FP8 one).
fn decode_sweep_over<T: Element + DeviceRepr, C: Element + DeviceRepr>(
    s: &Arc<CudaStream>,
    heads_dims: &[(usize, usize, usize)],
    scales: impl Fn(usize) -> Option<KvScales>,
) {
    let seqlens = [0usize, 1, 77, 300, 1030];
    for ps in [1, 16, 64, 256] {
        for &(hkv, ratio, d) in heads_dims {
            let hq = hkv * ratio;
            let seed = 77 + ps as u64 + d as u64;
            let sc = scenario_with::<T, C>(&seqlens, ps, hkv, d, seed, scales(hkv));
            for q_len in [1, 4] {
                let mut r = rng(ps as u64 * 3 + q_len as u64);
                let q: Vec<T> = random_vec(&mut r, seqlens.len() * q_len * hq * d);
                for (name, opts) in masks() {
                    let what = format!(
                        "{:?} ({} cache) ps {ps} hkv {hkv} ratio {ratio} d {d} q_len {q_len} \
                         {name}",
                        T::DTYPE,
                        C::DTYPE
                    );
                    let dec = PagedDecode::new(&sc.cache, hq, q_len, &opts).unwrap();
                    let (want, want_lse) = decode_reference(&dec, &sc, &q, None);
                    for splits in [None, Some(1), Some(5)] {
                        let dec = dec.clone().with_splits(splits).unwrap();
                        let (out, lse) = run_gpu(s, &dec, &sc, &q);
                        let err = rel_l2(&to_f64(&out), &want);
                        assert!(err < HALF_TOL, "{what} splits {splits:?}: rel L2 {err}");
                        check_lse(&lse, &want_lse, 2e-2, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn gpu_decode_matches_reference() {
    let Some(s) = stream() else { return };
    decode_sweep::<bf16>(&s);
    decode_sweep::<f16>(&s);
}

/// FP8 e4m3 cache (kernels not yet run on a GPU): the same sweep against the f64 reference
/// of the dequantised cache, head dims that are and are not multiples of 16 (the e4m3 ring
/// copies 8 bytes = 8 channels at a time), per-kv-head scales that saturate some values.
#[test]
fn gpu_fp8_decode_matches_reference() {
    let Some(s) = stream() else { return };
    let dims = [(2, 1, 128), (1, 4, 256), (2, 8, 72), (2, 2, 40)];
    decode_sweep_over::<bf16, F8E4M3>(&s, &dims, |hkv| Some(fp8_scales(hkv)));
    decode_sweep_over::<f16, F8E4M3>(&s, &dims, |hkv| Some(fp8_scales(hkv)));
}

/// Quest over an FP8 cache (kernel not yet run on a GPU): the GPU scores equal the CPU ones
/// (scaled e4m3 bounds) up to summation order, the GPU selection is the top-B of its own
/// scores, and the Quest decode equals the reference over the pages it selected.
#[test]
fn gpu_fp8_quest_matches_cpu() {
    let Some(s) = stream() else { return };
    let seqlens = [40usize, 300, 1030];
    let (hkv, hq, d) = (2, 8, 128);
    for ps in [16, 64] {
        let sc = scenario_with::<bf16, F8E4M3>(&seqlens, ps, hkv, d, 9, Some(fp8_scales(hkv)));
        let mut r = rng(ps as u64);
        let q: Vec<bf16> = random_vec(&mut r, seqlens.len() * hq * d);
        let dec = PagedDecode::new(&sc.cache, hq, 1, &AttentionOptions::causal())
            .unwrap()
            .with_policy(quest_policy(hkv, 4 * ps, 1))
            .unwrap();
        let st = q_strides(1, hq, d);
        let cpu = dec.select_cpu(Strided::new(&q[..], st), sc.meta()).unwrap();
        let (qd, mn, mx) = (up(&s, &q), up(&s, &sc.kmin), up(&s, &sc.kmax));
        let gpu = select(&s, &dec, &qd, st, (&mn, &mx));
        let scores = s.clone_dtoh(&gpu.scores).unwrap();
        let (pl, pc) = (
            s.clone_dtoh(&gpu.page_list).unwrap(),
            s.clone_dtoh(&gpu.page_count).unwrap(),
        );
        let mp = sc.cache.max_pages_per_seq();
        let mut lists = Vec::new();
        for b in 0..seqlens.len() {
            let n_pages = sc.cache.pages_of(b).unwrap();
            for kvh in 0..hkv {
                let row = (b * hkv + kvh) * mp;
                for p in 0..n_pages {
                    let (g, c) = (scores[row + p], cpu.scores[row + p]);
                    assert!(
                        (g - c).abs() <= 1e-3 * (1.0 + c.abs()),
                        "ps {ps} score {g} vs {c}"
                    );
                }
                let got: Vec<u32> = pl[row..row + pc[b * hkv + kvh] as usize]
                    .iter()
                    .map(|&p| p as u32)
                    .collect();
                let want = top_pages_by_sort(n_pages, &scores[row..row + mp], 1, 4);
                assert_eq!(got, want, "ps {ps} b {b} kvh {kvh}");
                lists.push(got.iter().map(|&p| p as usize).collect::<Vec<_>>());
            }
        }
        let selected = PageLists::new(seqlens.len(), hkv, lists).unwrap();
        let (want, want_lse) = decode_reference(&dec, &sc, &q, Some(&selected));
        let (out, lse) = run_gpu(&s, &dec, &sc, &q);
        let err = rel_l2(&to_f64(&out), &want);
        assert!(err < HALF_TOL, "ps {ps}: quest decode rel L2 {err}");
        check_lse(&lse, &want_lse, 2e-2, "fp8 quest");
    }
}

/// One small FP8 decode (d 72: the 8-byte copies' partial 16-byte rows; 3 splits; window +
/// sinks) for compute-sanitizer's racecheck in the device script.
#[test]
fn gpu_fp8_decode_one_case() {
    let Some(s) = stream() else { return };
    let (hkv, hq, d, q_len) = (2, 8, 72, 2);
    let sc = scenario_with::<bf16, F8E4M3>(&[300, 45], 16, hkv, d, 3, Some(fp8_scales(hkv)));
    let mut r = rng(5);
    let q: Vec<bf16> = random_vec(&mut r, 2 * q_len * hq * d);
    let opts = AttentionOptions::causal()
        .with_window(longattn::Window::causal_tokens(100).unwrap())
        .with_sinks(3);
    let dec = PagedDecode::new(&sc.cache, hq, q_len, &opts)
        .unwrap()
        .with_splits(Some(3))
        .unwrap();
    let (want, want_lse) = decode_reference(&dec, &sc, &q, None);
    let (out, lse) = run_gpu(&s, &dec, &sc, &q);
    let err = rel_l2(&to_f64(&out), &want);
    assert!(err < HALF_TOL, "fp8 one case: rel L2 {err}");
    check_lse(&lse, &want_lse, 2e-2, "fp8 one case");
}

/// Scales for inputs in (-1, 1): the largest maps to about 300-700 (some values saturate).
fn fp8_scales(hkv: usize) -> KvScales {
    let k: Vec<f32> = (0..hkv).map(|g| 1.0 / (300.0 + 200.0 * g as f32)).collect();
    let v: Vec<f32> = (0..hkv).map(|g| 1.0 / (700.0 - 150.0 * g as f32)).collect();
    KvScales::new(k, v).unwrap()
}

#[test]
fn gpu_append_matches_cpu() {
    let Some(s) = stream() else { return };
    append_replay::<bf16, bf16>(&s, |_| None);
}

/// FP8 append (kernel not yet run on a GPU): bit-exact with the CPU path, bounds included.
#[test]
fn gpu_fp8_append_matches_cpu() {
    let Some(s) = stream() else { return };
    append_replay::<bf16, F8E4M3>(&s, |hkv| Some(fp8_scales(hkv)));
    append_replay::<f16, F8E4M3>(&s, |hkv| Some(fp8_scales(hkv)));
    append_special_values::<f16>(&s);
    append_special_values::<bf16>(&s);
}

/// FP8 append of the values where the device and the CPU could part: NaN of both signs (a
/// NaN keeps its sign: the device's division and cvt give the canonical 0x7f), +-0,
/// +-inf and magnitudes past 448 (saturation), the underflow edge 2^-10 and subnormals
/// (scale 1), all in one page with a NaN-only channel; caches and bounds bit-identical.
fn append_special_values<T: Element + DeviceRepr + PartialEq>(s: &Arc<CudaStream>) {
    let (ps, d) = (4usize, 8usize);
    let layout = longattn::PagedLayout {
        num_pages: 1,
        page_size: ps,
        heads_kv: 1,
        head_dim: d,
    };
    let cache = PagedCache::new(
        layout,
        PageTable {
            block_table: &[0],
            max_pages_per_seq: 1,
            seqlens_k: &[ps as i32],
        },
    )
    .unwrap()
    .with_kv_scales(KvScales::uniform(1, 1.0, 1.0).unwrap())
    .unwrap();
    let neg_nan = T::from_f32(-f32::NAN);
    assert!(
        neg_nan.to_f32().is_sign_negative(),
        "{:?}: -NaN input",
        T::DTYPE
    );
    let values = [
        T::from_f32(f32::NAN),
        neg_nan,
        T::from_f32(0.0),
        T::from_f32(-0.0),
        T::from_f32(f32::INFINITY),
        T::from_f32(f32::NEG_INFINITY),
        T::from_f32(500.0),
        T::from_f32(-470.0),
        T::from_f32(2f32.powi(-10)),
        T::from_f32(-3.0 * 2f32.powi(-10)),
        T::from_f32(2f32.powi(-8)),
        T::from_f32(-2f32.powi(-7) * 1.3),
    ];
    // Token t, channel c: values[(3 t + 5 c) % 12]; channel 7 NaN of alternating signs.
    let k: Vec<T> = (0..ps * d)
        .map(|i| {
            let (t, c) = (i / d, i % d);
            if c == 7 {
                if t % 2 == 0 { values[0] } else { neg_nan }
            } else {
                values[(3 * t + 5 * c) % values.len()]
            }
        })
        .collect();
    let v: Vec<T> = k.iter().rev().copied().collect();
    let cu = [0i32, ps as i32];
    let zero = vec![F8E4M3::from_bits(0); layout.cache_len()];
    let (mut ck, mut cv) = (zero.clone(), zero.clone());
    let (mut lo, mut hi) = (vec![F8E4M3::default(); d], vec![F8E4M3::default(); d]);
    let (mut kd, mut vd) = (up(s, &zero), up(s, &zero));
    let nan = vec![F8E4M3::from_bits(0x7f); d];
    let (mut mind, mut maxd) = (up(s, &nan), up(s, &nan));
    append_both(
        s,
        &cache,
        (&cu, &k, &v, Strides::contiguous(1, 1, d)),
        [&mut ck, &mut cv, &mut lo, &mut hi],
        [&mut kd, &mut vd, &mut mind, &mut maxd],
    );
    assert_eq!(ck[7].to_bits(), 0x7f, "CPU: +NaN");
    assert_eq!(ck[d + 7].to_bits(), 0xff, "CPU: -NaN keeps its sign");
    let bits = |x: &[F8E4M3]| x.iter().map(|c| c.to_bits()).collect::<Vec<_>>();
    let what = format!("{:?} special values", T::DTYPE);
    assert_eq!(
        bits(&s.clone_dtoh(&kd).unwrap()),
        bits(&ck),
        "{what}: k cache"
    );
    assert_eq!(
        bits(&s.clone_dtoh(&vd).unwrap()),
        bits(&cv),
        "{what}: v cache"
    );
    assert_eq!(
        bits(&s.clone_dtoh(&mind).unwrap()),
        bits(&lo),
        "{what}: kmin"
    );
    assert_eq!(
        bits(&s.clone_dtoh(&maxd).unwrap()),
        bits(&hi),
        "{what}: kmax"
    );
}

/// Appends from garbage on both paths (a prefill, then a decode step) into a cache of type
/// `C`; caches and metadata must be identical.
fn append_replay<T: Element + DeviceRepr + PartialEq, C: Element + DeviceRepr + PartialEq>(
    s: &Arc<CudaStream>,
    scales: impl Fn(usize) -> Option<KvScales>,
) {
    let s = s.clone();
    for ps in [1, 16, 64, 256] {
        let (hkv, d) = (2, 64);
        let sc = scenario::<T>(&[3, 200, 0, 513], ps, hkv, d, 4 + ps as u64);
        // Replay: from garbage, append everything in one prefill then one decode step, on
        // both paths; caches and metadata must be identical.
        let layout = sc.cache.layout();
        let mut r = rng(ps as u64);
        let garbage: Vec<C> = random_vec(&mut r, layout.cache_len());
        let seqlens: Vec<usize> = (0..sc.cache.batch())
            .map(|b| sc.cache.seqlen(b).unwrap())
            .collect();
        let row = hkv * d;
        let mut cpu_k = garbage.clone();
        let mut cpu_v = garbage.clone();
        let mut cpu_min = vec![C::from_f32(0.0); layout.meta_len()];
        let mut cpu_max = vec![C::from_f32(0.0); layout.meta_len()];
        let mut kd = up(&s, &garbage);
        let mut vd = up(&s, &garbage);
        let mut mind = up(&s, &vec![C::from_f32(f32::NAN); layout.meta_len()]);
        let mut maxd = up(&s, &vec![C::from_f32(f32::NAN); layout.meta_len()]);
        for step in 0..2 {
            let upto: Vec<usize> = seqlens
                .iter()
                .map(|&n| if step == 0 { n.saturating_sub(1) } else { n })
                .collect();
            let from: Vec<usize> = seqlens
                .iter()
                .map(|&n| if step == 0 { 0 } else { n.saturating_sub(1) })
                .collect();
            let sl: Vec<i32> = upto.iter().map(|&x| x as i32).collect();
            let cache = PagedCache::new(
                layout,
                PageTable {
                    block_table: sc.cache.block_table(),
                    max_pages_per_seq: sc.cache.max_pages_per_seq(),
                    seqlens_k: &sl,
                },
            )
            .unwrap();
            let cache = match scales(hkv) {
                Some(x) => cache.with_kv_scales(x).unwrap(),
                None => cache,
            };
            let mut cu = vec![0i32];
            let mut kn = Vec::new();
            let mut vn = Vec::new();
            for b in 0..seqlens.len() {
                kn.extend_from_slice(&sc.k_tokens[b][from[b] * row..upto[b] * row]);
                vn.extend_from_slice(&sc.v_tokens[b][from[b] * row..upto[b] * row]);
                cu.push(cu[b] + (upto[b] - from[b]) as i32);
            }
            append_both(
                &s,
                &cache,
                (&cu, &kn, &vn, Strides::contiguous(1, hkv, d)),
                [&mut cpu_k, &mut cpu_v, &mut cpu_min, &mut cpu_max],
                [&mut kd, &mut vd, &mut mind, &mut maxd],
            );
        }
        let gk: Vec<C> = s.clone_dtoh(&kd).unwrap();
        let gv: Vec<C> = s.clone_dtoh(&vd).unwrap();
        assert!(
            gk == cpu_k && gv == cpu_v,
            "{} cache ps {ps}: cache contents differ",
            C::DTYPE
        );
        let gmin = s.clone_dtoh(&mind).unwrap();
        let gmax = s.clone_dtoh(&maxd).unwrap();
        for (page, kvh, lo, hi) in page_bounds(&sc.cache, &gk) {
            let mo = layout.meta_offset(page, kvh).unwrap();
            assert_eq!(&gmin[mo..mo + d], &lo[..], "ps {ps} page {page}");
            assert_eq!(&gmax[mo..mo + d], &hi[..], "ps {ps} page {page}");
            assert_eq!(&cpu_min[mo..mo + d], &lo[..]);
        }
    }
}

/// Appends rows `k`, `v` (offsets `cu`, strides `st`) into `cache` on the CPU path (into
/// `cpu`: k cache, v cache, kmin, kmax) and on the GPU (into `gpu`, the same four).
fn append_both<T: Element + DeviceRepr, C: Element + DeviceRepr>(
    s: &Arc<CudaStream>,
    cache: &PagedCache,
    (cu, k, v, st): (&[i32], &[T], &[T], Strides),
    cpu: [&mut Vec<C>; 4],
    gpu: [&mut CudaSlice<C>; 4],
) {
    let [ck, cv, lo, hi] = cpu;
    cache
        .append_cpu(
            cu,
            Strided::new(k, st),
            Strided::new(v, st),
            KvPages {
                k: &mut ck[..],
                v: &mut cv[..],
            },
            Some(PageMeta {
                kmin: &mut lo[..],
                kmax: &mut hi[..],
            }),
        )
        .unwrap();
    let [kd, vd, mind, maxd] = gpu;
    let (knd, vnd) = (up(s, k), up(s, v));
    cache
        .append_gpu(
            s,
            cu,
            Strided::new(&knd, st),
            Strided::new(&vnd, st),
            KvPages { k: kd, v: vd },
            Some(PageMeta {
                kmin: mind,
                kmax: maxd,
            }),
        )
        .unwrap();
}

/// The documented selection order restated as a sort (kept pages, then higher score in
/// the float total order, then lower page index), for rows too long for the brute-force
/// oracle; every page is a candidate (q_len 1, causal, no window).
fn top_pages_by_sort(n_pages: usize, scores: &[f32], sink_pages: usize, budget: usize) -> Vec<u32> {
    let kept = |p: usize| p < sink_pages || p + 1 == n_pages;
    let mut all: Vec<usize> = (0..n_pages).collect();
    let n_kept = all.iter().filter(|&&p| kept(p)).count();
    let k = budget.max(n_kept).min(n_pages);
    all.sort_by(|&a, &b| {
        kept(b)
            .cmp(&kept(a))
            .then(scores[b].total_cmp(&scores[a]))
            .then(a.cmp(&b))
    });
    let mut out: Vec<u32> = all[..k].iter().map(|&p| p as u32).collect();
    out.sort_unstable();
    out
}

/// Page size 1 with rows longer than the selection kernel stages in shared memory, and
/// scores with many exact ties (bounds in {-1, 0, 1}, q all ones: small integer sums; q
/// zero: every score 0), where the lowest page indices must win.
#[test]
fn gpu_quest_selection_long_rows_and_ties() {
    let Some(s) = stream() else { return };
    let seqlens = [3000usize, 9000, 20000];
    let (hkv, ratio, d, ps) = (2, 2, 8, 1);
    let hq = hkv * ratio;
    let mut r = rng(4242);
    let cache = table_cache(&seqlens, ps, hkv, d, &mut r);
    let max_pages = cache.max_pages_per_seq();
    let kmin: Vec<bf16> = (0..cache.layout().meta_len())
        .map(|_| bf16::from_f32(r.random_range(-1i32..=1) as f32))
        .collect();
    let kmax = kmin.clone();
    let (mind, maxd) = (up(&s, &kmin), up(&s, &kmax));
    let n_q = seqlens.len() * hq * d;
    let queries: [Vec<bf16>; 3] = [
        random_vec(&mut r, n_q),
        vec![bf16::ONE; n_q],
        vec![bf16::ZERO; n_q],
    ];
    for (qi, q) in queries.iter().enumerate() {
        for (budget, sinkp) in [(1, 0), (2048, 3), (8191, 0), (12000, 1)] {
            let dec = PagedDecode::new(&cache, hq, 1, &AttentionOptions::causal())
                .unwrap()
                .with_policy(quest_policy(hkv, budget, sinkp))
                .unwrap();
            let qd = up(&s, q);
            let g = select(&s, &dec, &qd, q_strides(1, hq, d), (&mind, &maxd));
            let scores = s.clone_dtoh(&g.scores).unwrap();
            let list = s.clone_dtoh(&g.page_list).unwrap();
            let count = s.clone_dtoh(&g.page_count).unwrap();
            for (b, &n_pages) in seqlens.iter().enumerate() {
                for kvh in 0..hkv {
                    let row = (b * hkv + kvh) * max_pages;
                    let want =
                        top_pages_by_sort(n_pages, &scores[row..row + n_pages], sinkp, budget);
                    let n = count[b * hkv + kvh] as usize;
                    let got: Vec<u32> = list[row..row + n].iter().map(|&p| p as u32).collect();
                    assert!(
                        got == want,
                        "query {qi} budget {budget} sink pages {sinkp} b {b} kvh {kvh}: \
                         {} pages selected, {} expected",
                        got.len(),
                        want.len()
                    );
                }
            }
        }
    }
}

#[test]
fn gpu_quest_selection_is_top_b_of_its_scores() {
    let Some(s) = stream() else { return };
    let seqlens = [1usize, 40, 300, 2050];
    for ps in [1, 16, 64, 256] {
        let (hkv, ratio, d) = (2, 4, 64);
        let hq = hkv * ratio;
        let sc = scenario::<bf16>(&seqlens, ps, hkv, d, 55 + ps as u64);
        for q_len in [1, 3] {
            for (budget, sinkp) in [(ps, 0), (8 * ps, 1), (256, 2)] {
                let mut r = rng(ps as u64 + budget as u64);
                let q: Vec<bf16> = random_vec(&mut r, seqlens.len() * q_len * hq * d);
                let dec = PagedDecode::new(&sc.cache, hq, q_len, &AttentionOptions::causal())
                    .unwrap()
                    .with_policy(quest_policy(hkv, budget, sinkp))
                    .unwrap();
                let st = q_strides(q_len, hq, d);
                let qd = up(&s, &q);
                let (mind, maxd) = (up(&s, &sc.kmin), up(&s, &sc.kmax));
                let g = select(&s, &dec, &qd, st, (&mind, &maxd));
                let scores = s.clone_dtoh(&g.scores).unwrap();
                let list = s.clone_dtoh(&g.page_list).unwrap();
                let count = s.clone_dtoh(&g.page_count).unwrap();
                let ref_scores =
                    quest_scores_f64(&dec, Strided::new(&q[..], st), sc.meta()).unwrap();
                let mp = sc.cache.max_pages_per_seq();
                for b in 0..seqlens.len() {
                    for kvh in 0..hkv {
                        let row = (b * hkv + kvh) * mp;
                        let gs: Vec<f64> =
                            scores[row..row + mp].iter().map(|&x| x as f64).collect();
                        for p in 0..sc.cache.pages_of(b).unwrap() {
                            let w = ref_scores[row + p];
                            assert!(
                                (gs[p] - w).abs() <= 1e-3 * (1.0 + w.abs()),
                                "score {} vs {w}",
                                gs[p]
                            );
                        }
                        let want = quest_select_brute(&dec, b, &gs);
                        let n = count[b * hkv + kvh] as usize;
                        let got: Vec<u32> = list[row..row + n].iter().map(|&p| p as u32).collect();
                        assert_eq!(
                            got, want,
                            "ps {ps} q_len {q_len} budget {budget} b {b} kvh {kvh}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn gpu_mixed_policies_match_reference() {
    let Some(s) = stream() else { return };
    let seqlens = [0usize, 7, 250, 97, 1500];
    for ps in [1, 16, 64, 256] {
        for q_len in [1, 5] {
            let (hkv, ratio, d) = (4, 2, 128);
            let hq = hkv * ratio;
            let sc = scenario::<bf16>(&seqlens, ps, hkv, d, 4321 + ps as u64);
            let mut r = rng(ps as u64 + 7);
            let q: Vec<bf16> = random_vec(&mut r, seqlens.len() * q_len * hq * d);
            let dec = mixed_decode(&sc.cache, hq, q_len, &AttentionOptions::causal());
            let st = q_strides(q_len, hq, d);
            // The GPU's own Quest selection defines the visible pages of the Quest head.
            let qd = up(&s, &q);
            let (mind, maxd) = (up(&s, &sc.kmin), up(&s, &sc.kmax));
            let g = select(&s, &dec, &qd, st, (&mind, &maxd));
            let list = s.clone_dtoh(&g.page_list).unwrap();
            let count = s.clone_dtoh(&g.page_count).unwrap();
            let mp = sc.cache.max_pages_per_seq();
            let mut lists = Vec::new();
            for b in 0..seqlens.len() {
                for h in 0..hkv {
                    let row = (b * hkv + h) * mp;
                    lists.push(match h {
                        2 => list[row..row + count[b * hkv + h] as usize]
                            .iter()
                            .map(|&p| p as usize)
                            .collect(),
                        3 => (0..sc.cache.pages_of(b).unwrap())
                            .filter(|p| p % 3 != 1)
                            .collect(),
                        _ => vec![],
                    });
                }
            }
            let sel = PageLists::new(seqlens.len(), hkv, lists).unwrap();
            let (want, want_lse) = decode_reference(&dec, &sc, &q, Some(&sel));
            for splits in [None, Some(3)] {
                let dec = dec.clone().with_splits(splits).unwrap();
                let (out, lse) = run_gpu(&s, &dec, &sc, &q);
                let err = rel_l2(&to_f64(&out), &want);
                assert!(
                    err < 2e-2,
                    "ps {ps} q_len {q_len} splits {splits:?}: rel L2 {err}"
                );
                check_lse(&lse, &want_lse, 2e-2, "gpu mixed");
            }
        }
    }
}

/// Decode through a plan: (out, lse) read back after the call.
fn plan_forward<T: Element + DeviceRepr>(
    s: &Arc<CudaStream>,
    plan: &mut PagedDecodePlan,
    bufs: &DeviceCache<T>,
    q: &CudaSlice<T>,
) -> (Vec<T>, Vec<f32>) {
    let dec = plan.decode().clone();
    let st = q_strides(dec.q_len(), dec.heads_q(), dec.cache().head_dim());
    let mut od = up(s, &vec![T::from_f32(f32::NAN); dec.out_len()]);
    let mut ld = up(s, &vec![f32::NAN; dec.lse_len()]);
    plan.forward(
        Strided::new(q, st),
        bufs.kv(),
        Some(bufs.meta()),
        Strided::new(&mut od, st),
        Some(&mut ld),
    )
    .unwrap();
    (s.clone_dtoh(&od).unwrap(), s.clone_dtoh(&ld).unwrap())
}

fn same<T: Element>(got: &(Vec<T>, Vec<f32>), want: &(Vec<T>, Vec<f32>), what: &str) {
    assert!(
        got.0.iter().all(|x| !x.to_f32().is_nan()),
        "{what}: unwritten output"
    );
    let err = rel_l2(&to_f64(&got.0), &to_f64(&want.0));
    assert!(err <= 1e-6, "{what}: plan vs one-shot rel L2 {err}");
    for (a, b) in got.1.iter().zip(&want.1) {
        assert!(
            a == b || (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
            "{what}: lse {a} vs {b}"
        );
    }
}

/// CUDA-graph safety (issue 12): a decode plan with every head kind (Full, Streaming,
/// Quest with its in-plan selection, Listed) and forced splits (the merge kernel) is
/// captured once into a graph on its stream, then replayed with new queries; each replay
/// equals the plan's own uncaptured call with the same queries.
#[test]
fn gpu_paged_plan_replays_in_a_cuda_graph() {
    let Some(ctx) = gpu_or_skip("gpu_paged_plan_replays_in_a_cuda_graph") else {
        return;
    };
    let s = capture_stream(&ctx);
    let seqlens = [7usize, 250, 1500];
    let (hkv, ratio, d, ps, q_len) = (4, 2, 128, 16, 2);
    let hq = hkv * ratio;
    let sc = scenario::<bf16>(&seqlens, ps, hkv, d, 77);
    let bufs = DeviceCache::upload(&s, &sc);
    let dec = mixed_decode(&sc.cache, hq, q_len, &AttentionOptions::causal())
        .with_splits(Some(3))
        .unwrap();
    let mut plan = dec.plan_gpu(&s).unwrap();
    let n = seqlens.len() * q_len * hq * d;
    let st = q_strides(q_len, hq, d);
    let mut qd = up(&s, &vec![bf16::ZERO; n]);
    let mut od = up(&s, &vec![bf16::ZERO; dec.out_len()]);
    let mut ld = up(&s, &vec![0f32; dec.lse_len()]);
    let graph = capture_graph(&s, || {
        plan.forward(
            Strided::new(&qd, st),
            bufs.kv(),
            Some(bufs.meta()),
            Strided::new(&mut od, st),
            Some(&mut ld),
        )
        .unwrap();
    });
    for round in 0..3u64 {
        let q: Vec<bf16> = random_vec(&mut rng(300 + round), n);
        s.memcpy_htod(&q, &mut qd).unwrap();
        s.memcpy_htod(&vec![bf16::NAN; dec.out_len()], &mut od)
            .unwrap();
        s.memcpy_htod(&vec![f32::NAN; dec.lse_len()], &mut ld)
            .unwrap();
        graph.launch().unwrap();
        let got = (s.clone_dtoh(&od).unwrap(), s.clone_dtoh(&ld).unwrap());
        let want = plan_forward(&s, &mut plan, &bufs, &qd);
        same(&got, &want, &format!("graph replay {round}"));
    }
}

#[test]
fn gpu_plan_reuse_matches_one_shot() {
    let Some(s) = stream() else { return };
    let sms = s
        .context()
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .unwrap() as usize;
    let seqlens = [0usize, 7, 250, 1500, 4100];
    let (hkv, ratio, d, ps) = (4, 2, 128, 16);
    let hq = hkv * ratio;
    let sc = scenario::<bf16>(&seqlens, ps, hkv, d, 2024);
    let bufs = DeviceCache::upload(&s, &sc);
    for q_len in [1, 3] {
        let n = seqlens.len() * q_len * hq * d;
        let q1: Vec<bf16> = random_vec(&mut rng(71 + q_len as u64), n);
        let q2: Vec<bf16> = random_vec(&mut rng(97 + q_len as u64), n);
        let (qd1, qd2) = (up(&s, &q1), up(&s, &q2));
        let opts = AttentionOptions::causal();
        let quest = PagedDecode::new(&sc.cache, hq, q_len, &opts)
            .unwrap()
            .with_policy(quest_policy(hkv, 1024, 1))
            .unwrap();
        let streaming = PagedDecode::new(&sc.cache, hq, q_len, &opts)
            .unwrap()
            .with_policy(
                SparsePolicy::uniform(hkv, HeadPolicy::Streaming).with_streaming(StreamingConfig {
                    sinks: 4,
                    window: 1000,
                }),
            )
            .unwrap();
        let cases = [
            ("mixed", mixed_decode(&sc.cache, hq, q_len, &opts)),
            ("quest", quest),
            ("streaming", streaming),
            (
                "full",
                PagedDecode::new(&sc.cache, hq, q_len, &opts).unwrap(),
            ),
            (
                "mixed forced 3",
                mixed_decode(&sc.cache, hq, q_len, &opts)
                    .with_splits(Some(3))
                    .unwrap(),
            ),
        ];
        for (name, dec) in cases {
            let what = format!("{name} q_len {q_len}");
            let mut plan = dec.plan_gpu(&s).unwrap();
            assert_eq!(plan.splits(), dec.splits_for(sms), "{what}");
            if matches!(name, "quest" | "streaming") && 2 * sms > 20 {
                // Sparse heads alone still split (20 blocks; 4100 tokens: Quest 64
                // pages, streaming 65 pages = 4 splits of >= 256 keys).
                assert!(plan.splits() > 1, "{what}: {} splits", plan.splits());
            }
            let one1 = run_gpu(&s, &dec, &sc, &q1);
            let one2 = run_gpu(&s, &dec, &sc, &q2);
            // Two calls with q1, one with q2, q1 again: scratch and selection reuse
            // must not leak between calls.
            same(&plan_forward(&s, &mut plan, &bufs, &qd1), &one1, &what);
            same(&plan_forward(&s, &mut plan, &bufs, &qd1), &one1, &what);
            same(&plan_forward(&s, &mut plan, &bufs, &qd2), &one2, &what);
            same(&plan_forward(&s, &mut plan, &bufs, &qd1), &one1, &what);
            if dec.needs_meta() {
                // The plan's selection equals the one-shot selection (both q).
                let st = q_strides(q_len, hq, d);
                for qd in [&qd2, &qd1] {
                    let g = dec
                        .select_gpu::<bf16, bf16, _>(&s, Strided::new(qd, st), bufs.meta())
                        .unwrap();
                    let sel = plan
                        .select::<bf16, bf16, _>(Strided::new(qd, st), bufs.meta())
                        .unwrap();
                    let count = s.clone_dtoh(sel.page_count).unwrap();
                    let list = s.clone_dtoh(sel.page_list).unwrap();
                    let scores = s.clone_dtoh(sel.scores).unwrap();
                    let want_count = s.clone_dtoh(&g.page_count).unwrap();
                    let want_list = s.clone_dtoh(&g.page_list).unwrap();
                    assert_eq!(scores, s.clone_dtoh(&g.scores).unwrap(), "{what}");
                    let mp = sc.cache.max_pages_per_seq();
                    for b in 0..seqlens.len() {
                        for h in 0..hkv {
                            if dec.head_policy(h) != Some(HeadPolicy::Quest) {
                                continue;
                            }
                            let i = b * hkv + h;
                            assert_eq!(count[i], want_count[i], "{what} b {b} h {h}");
                            let row = i * mp..i * mp + count[i] as usize;
                            assert_eq!(&list[row.clone()], &want_list[row], "{what}");
                        }
                    }
                }
                // A decode after a standalone selection still selects for its own q.
                same(&plan_forward(&s, &mut plan, &bufs, &qd2), &one2, &what);
            } else {
                let st = q_strides(q_len, hq, d);
                let r = plan.select::<bf16, bf16, _>(Strided::new(&qd1, st), bufs.meta());
                assert!(r.is_err(), "{what}: select without Quest heads");
            }
            // Bad tensors are still rejected per call.
            let short = up(&s, &[bf16::from_f32(0.0); 8]);
            let mut od = up(&s, &vec![bf16::from_f32(0.0); dec.out_len()]);
            let st = q_strides(q_len, hq, d);
            let r = plan.forward(
                Strided::new(&short, st),
                bufs.kv(),
                Some(bufs.meta()),
                Strided::new(&mut od, st),
                None,
            );
            assert!(matches!(r, Err(Error::Shape(_))), "{what}: short q");
        }
    }
    // Append through a plan (twice: the offsets are uploaded once) == one-shot append.
    let layout = sc.cache.layout();
    let garbage: Vec<bf16> = random_vec(&mut rng(5), layout.cache_len());
    let row = hkv * d;
    let mut cu = vec![0i32];
    let (mut kn, mut vn) = (Vec::new(), Vec::new());
    for (b, &n) in seqlens.iter().enumerate() {
        kn.extend_from_slice(&sc.k_tokens[b][..n * row]);
        vn.extend_from_slice(&sc.v_tokens[b][..n * row]);
        cu.push(cu[b] + n as i32);
    }
    let (knd, vnd) = (up(&s, &kn), up(&s, &vn));
    let st = Strides::contiguous(1, hkv, d);
    let nan = vec![bf16::NAN; layout.meta_len()];
    let run = |plan: Option<&mut PagedDecodePlan>| {
        let (mut k, mut v) = (up(&s, &garbage), up(&s, &garbage));
        let (mut lo, mut hi) = (up(&s, &nan), up(&s, &nan));
        let reps = if plan.is_some() { 2 } else { 1 };
        let mut plan = plan;
        for _ in 0..reps {
            let kv = KvPages {
                k: &mut k,
                v: &mut v,
            };
            let meta = Some(PageMeta {
                kmin: &mut lo,
                kmax: &mut hi,
            });
            let (a, b) = (Strided::new(&knd, st), Strided::new(&vnd, st));
            match plan.as_deref_mut() {
                Some(p) => p.append(&cu, a, b, kv, meta).unwrap(),
                None => sc.cache.append_gpu(&s, &cu, a, b, kv, meta).unwrap(),
            }
        }
        (
            s.clone_dtoh(&k).unwrap(),
            s.clone_dtoh(&v).unwrap(),
            s.clone_dtoh(&lo).unwrap(),
            s.clone_dtoh(&hi).unwrap(),
        )
    };
    let mut plan = PagedDecode::new(&sc.cache, hq, 1, &AttentionOptions::causal())
        .unwrap()
        .plan_gpu(&s)
        .unwrap();
    let want = run(None);
    let got = run(Some(&mut plan));
    assert!(
        got.0 == want.0 && got.1 == want.1,
        "plan append: cache differs"
    );
    // Bitwise: pages no sequence uses keep their NaN poison in both runs.
    let bits = |x: &[bf16]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert!(bits(&got.2) == bits(&want.2), "plan append: kmin differs");
    assert!(bits(&got.3) == bits(&want.3), "plan append: kmax differs");
}

/// A decode over `q` (one token per sequence) and the cache `k` (as K and V), with optional
/// bounds: what the GPU entry point answers.
fn decode_answer<T: Element + DeviceRepr, C: Element + DeviceRepr>(
    s: &Arc<CudaStream>,
    dec: &PagedDecode,
    q: &[T],
    k: &[C],
    bounds: Option<(&[C], &[C])>,
) -> Result<(), Error> {
    let st = Strides::contiguous(1, dec.heads_q(), dec.cache().head_dim());
    let (qd, kd) = (up(s, q), up(s, k));
    let bounds = bounds.map(|(a, b)| (up(s, a), up(s, b)));
    let mut o = up(s, &vec![T::from_f32(0.0); dec.out_len()]);
    dec.forward_gpu(
        s,
        Strided::new(&qd, st),
        KvPages { k: &kd, v: &kd },
        bounds.as_ref().map(|(a, b)| PageMeta { kmin: a, kmax: b }),
        Strided::new(&mut o, st),
        None,
    )
}

#[test]
fn gpu_rejects_bad_inputs() {
    let Some(s) = stream() else { return };
    let causal = AttentionOptions::causal();
    let sc = scenario::<f32>(&[10], 16, 1, 8, 1);
    let dec = PagedDecode::new(&sc.cache, 1, 1, &causal).unwrap();
    let r = decode_answer(&s, &dec, &[0.0f32; 8], &sc.k_cache, None);
    assert!(
        matches!(r, Err(Error::Unsupported(_))),
        "f32 must be rejected on the GPU"
    );
    let sc = scenario::<bf16>(&[10], 16, 1, 12, 1);
    let dec = PagedDecode::new(&sc.cache, 1, 1, &causal).unwrap();
    let r = decode_answer(&s, &dec, &[bf16::from_f32(0.0); 12], &sc.k_cache, None);
    assert!(
        matches!(r, Err(Error::Unsupported(_))),
        "head_dim 12 must be rejected"
    );

    // Cache types: an f32 cache under bf16 queries, scales on a bf16 cache.
    let sc = scenario_with::<bf16, F8E4M3>(&[40], 16, 1, 8, 1, Some(fp8_scales(1)));
    let q = [bf16::from_f32(0.1); 8];
    let dec = PagedDecode::new(&sc.cache, 1, 1, &causal).unwrap();
    let k32 = vec![0.0f32; sc.cache.layout().cache_len()];
    let r = decode_answer(&s, &dec, &q, &k32, None);
    assert!(matches!(r, Err(Error::Unsupported(_))), "f32 cache: {r:?}");
    let half = scenario::<bf16>(&[40], 16, 1, 8, 1);
    let scaled = half.cache.clone().with_kv_scales(fp8_scales(1)).unwrap();
    let dec = PagedDecode::new(&scaled, 1, 1, &causal).unwrap();
    let r = decode_answer(&s, &dec, &q, &half.k_cache, None);
    assert!(
        matches!(r, Err(Error::InvalidOption(_))),
        "scales on bf16: {r:?}"
    );
}
