//! The decode opt-ins of issue 17 (kernels not yet run on a GPU): the in-kernel split merge
//! (`SplitMerge::InKernel`, one launch per decode step) and Quest selection v5
//! (`QuestKernel::V5`, scoring and selection in one launch with ticket counters). Each is
//! checked against the default GPU path on the same inputs and against the f64 references,
//! into NaN-poisoned outputs, and replayed through one plan several times (the ticket
//! counters must be back at 0 after every launch, or the next launch merges/selects
//! nothing and the poison stays). The tests print `SKIP (no GPU)` without a GPU and fail
//! under LONGATTN_REQUIRE_GPU=1.

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use longattn::reference::paged::quest_select_brute;
use longattn::{
    AttentionOptions, Element, F8E4M3, KvScales, PageLists, PageMeta, PagedDecode, PagedDecodePlan,
    QuestKernel, SplitMerge, Strided, bf16, f16,
};
use rand::Rng;
use std::sync::Arc;

mod common;
use common::paged::*;
use common::*;

fn stream() -> Option<Arc<CudaStream>> {
    gpu_stream_or_skip("paged v5 GPU test")
}

fn up<T: DeviceRepr>(s: &Arc<CudaStream>, x: &[T]) -> CudaSlice<T> {
    s.clone_htod(x).unwrap()
}

/// bf16/f16 inputs, f32 accumulation: relative L2 bound vs the f64 reference.
const HALF_TOL: f64 = 2e-2;
/// The in-kernel merge vs the merge kernel: the same partials summed in another order, then
/// rounded to bf16/f16 (an element may move by one unit in the last place).
const SAME_TOL: f64 = 4e-3;

/// One `plan.forward` into NaN-poisoned out/lse; asserts every element was written.
fn forward<T: Element + DeviceRepr, C: Element + DeviceRepr>(
    s: &Arc<CudaStream>,
    plan: &mut PagedDecodePlan,
    b: &DeviceCache<C>,
    q: &[T],
    what: &str,
) -> (Vec<T>, Vec<f32>) {
    let dec = plan.decode().clone();
    let st = q_strides(dec.q_len(), dec.heads_q(), dec.cache().head_dim());
    let qd = up(s, q);
    let mut od = up(s, &vec![T::from_f32(f32::NAN); dec.out_len()]);
    let mut ld = up(s, &vec![f32::NAN; dec.lse_len()]);
    plan.forward(
        Strided::new(&qd, st),
        b.kv(),
        Some(b.meta()),
        Strided::new(&mut od, st),
        Some(&mut ld),
    )
    .unwrap();
    let out = s.clone_dtoh(&od).unwrap();
    let lse = s.clone_dtoh(&ld).unwrap();
    assert!(
        out.iter().all(|x| !x.to_f32().is_nan()),
        "{what}: unwritten (NaN) output"
    );
    assert!(
        lse.iter().all(|x| !x.is_nan()),
        "{what}: unwritten (NaN) lse"
    );
    (out, lse)
}

/// The in-kernel merge's result equals the merge kernel's up to summation order.
fn same_as_default<T: Element>(got: &(Vec<T>, Vec<f32>), want: &(Vec<T>, Vec<f32>), what: &str) {
    let err = rel_l2(&to_f64(&got.0), &to_f64(&want.0));
    assert!(
        err <= SAME_TOL,
        "{what}: in-kernel vs kernel merge rel L2 {err}"
    );
    for (a, b) in got.1.iter().zip(&want.1) {
        assert!(
            a == b || (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
            "{what}: lse {a} vs {b}"
        );
    }
}

/// In-kernel merge (`merge`: `InKernel` or `Balanced`) vs the f64 reference and vs the
/// merge kernel, one plan replayed `replays` times with new queries (the counters must reset
/// after each launch).
#[allow(clippy::too_many_arguments)]
fn check_merge<T: Element + DeviceRepr, C: Element + DeviceRepr>(
    s: &Arc<CudaStream>,
    dec: &PagedDecode,
    sc: &Scenario<T, C>,
    b: &DeviceCache<C>,
    merge: SplitMerge,
    seed: u64,
    replays: u64,
    what: &str,
) {
    let mut merged = dec.clone().with_merge(merge).plan_gpu(s).unwrap();
    let mut plain = dec.plan_gpu(s).unwrap();
    if merge == SplitMerge::InKernel {
        assert_eq!(merged.splits(), plain.splits());
        assert_eq!(merged.pages_per_split(), None);
    } else {
        assert!(merged.pages_per_split().is_some(), "{what}");
    }
    assert_eq!(merged.merges_in_kernel(), merged.splits() > 1, "{what}");
    let n = dec.out_len();
    for round in 0..replays {
        let q: Vec<T> = random_vec(&mut rng(seed + round), n);
        let what = format!("{what} round {round}");
        let got = forward(s, &mut merged, b, &q, &what);
        let want = forward(s, &mut plain, b, &q, &what);
        same_as_default(&got, &want, &what);
        if dec.needs_meta() {
            continue; // the Quest heads' reference needs the selection (gpu_quest_v5_* below)
        }
        let (reference, ref_lse) = decode_reference(dec, sc, &q, None);
        let err = rel_l2(&to_f64(&got.0), &reference);
        assert!(err < HALF_TOL, "{what}: rel L2 {err} vs f64");
        check_lse(&got.1, &ref_lse, 2e-2, &what);
    }
}

/// Page sizes 1/16/64, batch 1 (one long sequence: many splits per row group) and several
/// (empty and short sequences: splits with no pages, lse = -inf partials), GQA ratios 1/4/8,
/// head dims 64/128/256, q_len 1 and 4 (two row groups at ratio 4), masks with windows,
/// sinks and softcap, forced split counts 2/5/33 and the automatic one.
#[test]
fn gpu_inkernel_merge_matches_reference() {
    let Some(s) = stream() else { return };
    for (seqlens, ps) in [
        (&[0usize, 1, 77, 300, 1030][..], 1),
        (&[0, 1, 77, 300, 1030][..], 16),
        (&[5000][..], 16),
        (&[2, 700, 4100][..], 64),
    ] {
        for &(hkv, ratio, d) in &[(2, 1, 128), (1, 4, 64), (2, 8, 256)] {
            let hq = hkv * ratio;
            let seed = 7 + ps as u64 + d as u64;
            let sc = scenario::<bf16>(seqlens, ps, hkv, d, seed);
            let b = DeviceCache::upload(&s, &sc);
            for q_len in [1, 4] {
                for (name, opts) in masks().into_iter().step_by(2) {
                    for splits in [None, Some(2), Some(5), Some(33)] {
                        let dec = PagedDecode::new(&sc.cache, hq, q_len, &opts)
                            .unwrap()
                            .with_splits(splits)
                            .unwrap();
                        let what = format!(
                            "batch {} ps {ps} hkv {hkv} ratio {ratio} d {d} q_len {q_len} \
                             {name} splits {splits:?}",
                            seqlens.len()
                        );
                        check_merge(&s, &dec, &sc, &b, SplitMerge::InKernel, seed, 1, &what);
                    }
                }
            }
        }
    }
}

/// f16, and an FP8 e4m3 cache (its own kernels, v_scale applied to the partials before the
/// merge), with a plan replayed four times.
#[test]
fn gpu_inkernel_merge_f16_fp8_and_replays() {
    let Some(s) = stream() else { return };
    let seqlens = [3usize, 900, 2600];
    let (hkv, hq, d, ps) = (2, 8, 128, 16);
    let sc = scenario::<f16>(&seqlens, ps, hkv, d, 31);
    let b = DeviceCache::upload(&s, &sc);
    let dec = PagedDecode::new(&sc.cache, hq, 2, &AttentionOptions::causal())
        .unwrap()
        .with_splits(Some(7))
        .unwrap();
    check_merge(
        &s,
        &dec,
        &sc,
        &b,
        SplitMerge::InKernel,
        40,
        4,
        "f16 replays",
    );

    let scales = KvScales::uniform(hkv, 1.0 / 400.0, 1.0 / 300.0).unwrap();
    for (d, ps) in [(128, 16), (72, 1), (64, 64)] {
        let sc = scenario_with::<bf16, F8E4M3>(&seqlens, ps, hkv, d, 32, Some(scales.clone()));
        let b = DeviceCache::upload(&s, &sc);
        let dec = PagedDecode::new(&sc.cache, hq, 1, &AttentionOptions::causal())
            .unwrap()
            .with_splits(Some(9))
            .unwrap();
        let what = format!("fp8 d {d} ps {ps}");
        check_merge(&s, &dec, &sc, &b, SplitMerge::InKernel, 50, 3, &what);
    }
}

/// Balanced splits (`SplitMerge::Balanced`): batches of mixed lengths (empty, 1-token and
/// long sequences side by side, so some blocks run one split and write directly while others
/// split and merge, and blocks past their own split count exit), page sizes 1/16/64, GQA
/// ratios 1/4/8, head dims 64/128/256, q_len 1 and 3, masks, the automatic split count and
/// forced ones; then an FP8 cache and an f16 plan replayed four times.
#[test]
fn gpu_balanced_splits_match_reference() {
    let Some(s) = stream() else { return };
    for (seqlens, ps) in [
        (&[0usize, 1, 77, 300, 1030, 9000][..], 16),
        (&[3, 700, 20000, 40][..], 64),
        (&[0, 2, 3000][..], 1),
    ] {
        for &(hkv, ratio, d) in &[(2, 4, 128), (1, 8, 64), (2, 1, 256)] {
            let hq = hkv * ratio;
            let seed = 61 + ps as u64 + d as u64;
            let sc = scenario::<bf16>(seqlens, ps, hkv, d, seed);
            let b = DeviceCache::upload(&s, &sc);
            for q_len in [1, 3] {
                for (name, opts) in masks().into_iter().step_by(3) {
                    for splits in [None, Some(3), Some(17)] {
                        let dec = PagedDecode::new(&sc.cache, hq, q_len, &opts)
                            .unwrap()
                            .with_splits(splits)
                            .unwrap();
                        let what = format!(
                            "balanced {seqlens:?} ps {ps} hkv {hkv} ratio {ratio} d {d} \
                             q_len {q_len} {name} splits {splits:?}"
                        );
                        check_merge(&s, &dec, &sc, &b, SplitMerge::Balanced, seed, 1, &what);
                    }
                }
            }
        }
    }
}

/// Balanced splits over an FP8 cache and an f16 plan replayed four times (mixed lengths:
/// one block splits and merges, the others write directly).
#[test]
fn gpu_balanced_splits_fp8_and_replays() {
    let Some(s) = stream() else { return };
    let seqlens = [1usize, 5000, 64, 300];
    let (hkv, hq, ps) = (2, 8, 16);
    let scales = KvScales::uniform(hkv, 1.0 / 400.0, 1.0 / 300.0).unwrap();
    let sc = scenario_with::<bf16, F8E4M3>(&seqlens, ps, hkv, 128, 71, Some(scales));
    let b = DeviceCache::upload(&s, &sc);
    let dec = PagedDecode::new(&sc.cache, hq, 1, &AttentionOptions::causal()).unwrap();
    check_merge(
        &s,
        &dec,
        &sc,
        &b,
        SplitMerge::Balanced,
        72,
        2,
        "balanced fp8",
    );
    let sc = scenario::<f16>(&seqlens, ps, hkv, 128, 73);
    let b = DeviceCache::upload(&s, &sc);
    let dec = PagedDecode::new(&sc.cache, hq, 2, &AttentionOptions::causal()).unwrap();
    check_merge(
        &s,
        &dec,
        &sc,
        &b,
        SplitMerge::Balanced,
        74,
        4,
        "balanced f16 replays",
    );
}

/// Every head kind in one launch (Full, Streaming, Quest, Listed) with both opt-ins, against
/// the default plan on the same queries; and a CUDA graph of that plan replayed three times.
#[test]
fn gpu_both_opt_ins_mixed_policies_and_graph() {
    let Some(ctx) = gpu_or_skip("gpu_both_opt_ins_mixed_policies_and_graph") else {
        return;
    };
    let s = capture_stream(&ctx);
    let seqlens = [0usize, 7, 250, 97, 1500];
    for ps in [1, 16, 64] {
        let (hkv, ratio, d, q_len) = (4, 2, 128, 3);
        let hq = hkv * ratio;
        let sc = scenario::<bf16>(&seqlens, ps, hkv, d, 4321 + ps as u64);
        let b = DeviceCache::upload(&s, &sc);
        let dec = mixed_decode(&sc.cache, hq, q_len, &AttentionOptions::causal())
            .with_splits(Some(4))
            .unwrap();
        let opt = dec
            .clone()
            .with_merge(SplitMerge::InKernel)
            .with_quest_kernel(QuestKernel::V5);
        let mut plan = opt.plan_gpu(&s).unwrap();
        let mut plain = dec.plan_gpu(&s).unwrap();
        assert!(plan.merges_in_kernel() && plan.quest_v5_pages_per_block().is_some());
        let n = dec.out_len();
        for round in 0..3 {
            let q: Vec<bf16> = random_vec(&mut rng(900 + round), n);
            let what = format!("mixed ps {ps} round {round}");
            let got = forward(&s, &mut plan, &b, &q, &what);
            let want = forward(&s, &mut plain, &b, &q, &what);
            same_as_default(&got, &want, &what);
        }
        if ps != 16 {
            continue;
        }
        // The graph: one capture of both launches, replayed with new queries.
        let st = q_strides(q_len, hq, d);
        let mut qd = up(&s, &vec![bf16::ZERO; n]);
        let mut od = up(&s, &vec![bf16::ZERO; n]);
        let mut ld = up(&s, &vec![0f32; dec.lse_len()]);
        let graph = capture_graph(&s, || {
            plan.forward(
                Strided::new(&qd, st),
                b.kv(),
                Some(b.meta()),
                Strided::new(&mut od, st),
                Some(&mut ld),
            )
            .unwrap();
        });
        for round in 0..3u64 {
            let q: Vec<bf16> = random_vec(&mut rng(700 + round), n);
            s.memcpy_htod(&q, &mut qd).unwrap();
            s.memcpy_htod(&vec![bf16::NAN; n], &mut od).unwrap();
            s.memcpy_htod(&vec![f32::NAN; dec.lse_len()], &mut ld)
                .unwrap();
            graph.launch().unwrap();
            let got = (s.clone_dtoh(&od).unwrap(), s.clone_dtoh(&ld).unwrap());
            assert!(
                got.0.iter().all(|x| !x.is_nan()),
                "graph replay {round}: NaN"
            );
            let want = forward(&s, &mut plain, &b, &q, "graph want");
            same_as_default(&got, &want, &format!("graph replay {round}"));
        }
    }
}

/// Selection of one plan: (scores, page lists per row, counts).
fn select<T: Element + DeviceRepr, C: Element + DeviceRepr>(
    s: &Arc<CudaStream>,
    plan: &mut PagedDecodePlan,
    q: &CudaSlice<T>,
    meta: (&CudaSlice<C>, &CudaSlice<C>),
) -> (Vec<f32>, Vec<i32>, Vec<i32>) {
    let dec = plan.decode().clone();
    let st = q_strides(dec.q_len(), dec.heads_q(), dec.cache().head_dim());
    let g = plan
        .select(
            Strided::new(q, st),
            PageMeta {
                kmin: meta.0,
                kmax: meta.1,
            },
        )
        .unwrap();
    (
        s.clone_dtoh(g.scores).unwrap(),
        s.clone_dtoh(g.page_list).unwrap(),
        s.clone_dtoh(g.page_count).unwrap(),
    )
}

/// V5 vs the two-kernel selection on the same inputs: bit-identical scores (the same
/// arithmetic), identical page lists and counts, and the lists are the documented top-B of
/// those scores (`quest_select_brute`). The v5 plan is replayed `replays` times with the
/// same query (its counters must reset) and with NaN-poisoned scratch in between.
#[allow(clippy::too_many_arguments)]
fn check_v5<T: Element + DeviceRepr, C: Element + DeviceRepr>(
    s: &Arc<CudaStream>,
    dec: &PagedDecode,
    q: &[T],
    meta: (&CudaSlice<C>, &CudaSlice<C>),
    brute: bool,
    replays: usize,
    what: &str,
) {
    let mut v5 = dec
        .clone()
        .with_quest_kernel(QuestKernel::V5)
        .plan_gpu(s)
        .unwrap();
    let mut two = dec.plan_gpu(s).unwrap();
    let qd = up(s, q);
    let want = select(s, &mut two, &qd, meta);
    let cache = dec.cache();
    let (hkv, mp) = (cache.heads_kv(), cache.max_pages_per_seq());
    for round in 0..replays {
        let got = select(s, &mut v5, &qd, meta);
        let what = format!("{what} round {round}");
        for (i, (a, b)) in got.0.iter().zip(&want.0).enumerate() {
            assert!(a.to_bits() == b.to_bits(), "{what}: score {i}: {a} vs {b}");
        }
        assert_eq!(got.2, want.2, "{what}: page counts");
        for row in 0..cache.batch() * hkv {
            let n = want.2[row] as usize;
            let (g, w) = (
                &got.1[row * mp..row * mp + n],
                &want.1[row * mp..row * mp + n],
            );
            assert_eq!(g, w, "{what}: row {row}");
            if brute {
                let scores: Vec<f64> = got.0[row * mp..(row + 1) * mp]
                    .iter()
                    .map(|&x| x as f64)
                    .collect();
                let best = quest_select_brute(dec, row / hkv, &scores);
                let g: Vec<u32> = g.iter().map(|&p| p as u32).collect();
                assert_eq!(g, best, "{what}: row {row} vs the documented order");
            }
        }
    }
}

/// Random bounds: page sizes 1/16/64, batch 1 and several, GQA 4 and 8, q_len 1 and 3 (24
/// rows at ratio 8: two scoring passes), budgets below, at and above the candidates,
/// sink pages, windows (fewer candidates than pages), head dims 64/128/256.
#[test]
fn gpu_quest_v5_matches_two_kernel_selection() {
    let Some(s) = stream() else { return };
    for (seqlens, ps) in [
        (&[1usize, 40, 300, 2050][..], 1),
        (&[1, 40, 300, 2050][..], 16),
        (&[9000][..], 16),
        (&[3, 5000, 700][..], 64),
    ] {
        for &(hkv, ratio, d) in &[(2, 4, 64), (1, 8, 128), (2, 2, 256)] {
            let hq = hkv * ratio;
            let sc = scenario::<bf16>(seqlens, ps, hkv, d, 55 + ps as u64 + d as u64);
            let (mn, mx) = (up(&s, &sc.kmin), up(&s, &sc.kmax));
            for q_len in [1, 3] {
                for (budget, sinkp) in [(ps, 0), (8 * ps, 1), (256, 2), (100_000, 0)] {
                    for (name, opts) in [
                        ("causal", AttentionOptions::causal()),
                        (
                            "window+sinks",
                            AttentionOptions::causal()
                                .with_window(longattn::Window::causal_tokens(600).unwrap())
                                .with_sinks(5),
                        ),
                    ] {
                        let mut r = rng(ps as u64 + budget as u64);
                        let q: Vec<bf16> = random_vec(&mut r, seqlens.len() * q_len * hq * d);
                        let dec = PagedDecode::new(&sc.cache, hq, q_len, &opts)
                            .unwrap()
                            .with_policy(quest_policy(hkv, budget, sinkp))
                            .unwrap();
                        let what = format!(
                            "batch {} ps {ps} hkv {hkv} ratio {ratio} d {d} q_len {q_len} \
                             budget {budget} sink pages {sinkp} {name}",
                            seqlens.len()
                        );
                        let brute = seqlens.iter().all(|&n| n.div_ceil(ps) <= 3000);
                        check_v5(&s, &dec, &q, (&mn, &mx), brute, 2, &what);
                    }
                }
            }
        }
    }
}

/// Page size 1 with rows longer than the v5 selection stages in shared memory (8,192 pages),
/// many blocks per row, and scores with many exact ties (bounds in {-1, 0, 1}; q all ones:
/// small integer sums; q zero: every score 0), where the lowest page indices must win; f16
/// and an FP8 cache's bounds.
#[test]
fn gpu_quest_v5_long_rows_ties_and_fp8() {
    let Some(s) = stream() else { return };
    let seqlens = [3000usize, 9000, 20000];
    let (hkv, ratio, d, ps) = (2, 2, 8, 1);
    let hq = hkv * ratio;
    let mut r = rng(4243);
    let cache = table_cache(&seqlens, ps, hkv, d, &mut r);
    let kmin: Vec<f16> = (0..cache.layout().meta_len())
        .map(|_| f16::from_f32(r.random_range(-1i32..=1) as f32))
        .collect();
    let (mn, mx) = (up(&s, &kmin), up(&s, &kmin));
    let n_q = seqlens.len() * hq * d;
    let queries: [Vec<f16>; 3] = [
        random_vec(&mut r, n_q),
        vec![f16::ONE; n_q],
        vec![f16::ZERO; n_q],
    ];
    for (qi, q) in queries.iter().enumerate() {
        for (budget, sinkp) in [(1, 0), (2048, 3), (8191, 0), (12000, 1)] {
            let dec = PagedDecode::new(&cache, hq, 1, &AttentionOptions::causal())
                .unwrap()
                .with_policy(quest_policy(hkv, budget, sinkp))
                .unwrap();
            let what = format!("ties query {qi} budget {budget} sink pages {sinkp}");
            check_v5(&s, &dec, q, (&mn, &mx), false, 3, &what);
        }
    }
    // FP8 bounds (the scaled e4m3 scores) over a scenario.
    let scales = KvScales::uniform(2, 1.0 / 400.0, 1.0 / 300.0).unwrap();
    for ps in [16, 64] {
        let sc =
            scenario_with::<bf16, F8E4M3>(&[40, 3000, 1030], ps, 2, 128, 9, Some(scales.clone()));
        let (mn, mx) = (up(&s, &sc.kmin), up(&s, &sc.kmax));
        let q: Vec<bf16> = random_vec(&mut rng(ps as u64), 3 * 8 * 128);
        let dec = PagedDecode::new(&sc.cache, 8, 1, &AttentionOptions::causal())
            .unwrap()
            .with_policy(quest_policy(2, 4 * ps, 1))
            .unwrap();
        check_v5(&s, &dec, &q, (&mn, &mx), true, 2, &format!("fp8 ps {ps}"));
    }
}

/// Quest decode end to end with both opt-ins: the output equals the f64 reference over the
/// pages the (v5) selection kept, batch 1 x 9k and several sequences, page 16 and 64.
#[test]
fn gpu_quest_v5_decode_matches_reference() {
    let Some(s) = stream() else { return };
    for (seqlens, ps) in [(&[9000usize][..], 16), (&[40, 3000, 1030][..], 64)] {
        let (hkv, hq, d) = (2, 8, 128);
        let sc = scenario::<bf16>(seqlens, ps, hkv, d, 77);
        let b = DeviceCache::upload(&s, &sc);
        let q: Vec<bf16> = random_vec(&mut rng(3), seqlens.len() * hq * d);
        let dec = PagedDecode::new(&sc.cache, hq, 1, &AttentionOptions::causal())
            .unwrap()
            .with_policy(quest_policy(hkv, 2048, 1))
            .unwrap()
            .with_merge(SplitMerge::InKernel)
            .with_quest_kernel(QuestKernel::V5);
        let mut plan = dec.plan_gpu(&s).unwrap();
        for round in 0..3 {
            let what = format!("quest decode ps {ps} round {round}");
            let (out, lse) = forward(&s, &mut plan, &b, &q, &what);
            let sel = plan.selection().unwrap();
            let (pl, pc) = (
                s.clone_dtoh(sel.page_list).unwrap(),
                s.clone_dtoh(sel.page_count).unwrap(),
            );
            let mp = sc.cache.max_pages_per_seq();
            let lists: Vec<Vec<usize>> = (0..seqlens.len() * hkv)
                .map(|row| {
                    pl[row * mp..row * mp + pc[row] as usize]
                        .iter()
                        .map(|&p| p as usize)
                        .collect()
                })
                .collect();
            let selected = PageLists::new(seqlens.len(), hkv, lists).unwrap();
            let (want, want_lse) = decode_reference(&dec, &sc, &q, Some(&selected));
            let err = rel_l2(&to_f64(&out), &want);
            assert!(err < HALF_TOL, "{what}: rel L2 {err}");
            check_lse(&lse, &want_lse, 2e-2, &what);
        }
    }
}
