//! The GPU ring and Star Attention: every test but the NCCL one passed on an H200 (sm_90a
//! build) on 2026-12-04, memcheck clean; the NCCL test (feature `nccl`) has never been built
//! or run on a GPU (unverified). Without a GPU every test prints a `SKIP (no GPU)` line; with
//! `LONGATTN_REQUIRE_GPU=1` a missing GPU fails instead.
//!
//! The in-process ring (every rank on one GPU, transfers as device-to-device copies) equals
//! one dense kernel call over the whole sequence within the dense tolerance, for 1, 2, 3, 4
//! and 8 ranks, every sharding, several masks, lengths not divisible by the world, GQA, head
//! dims 64 and 128, with the running and the deferred merge; a window moves only the shards
//! it needs; Star Attention's GPU phases equal the CPU ones; the NCCL backend (feature
//! `nccl`) runs world 1 on one GPU. Added on 2026-12-05 and not yet run on a GPU: the
//! reusable working sets (`InProcessRing`, `RingRankWorkspace`), the deferred merge, the
//! timeline, and the coalesced pieces every test now runs.

mod common;

use common::ring::{RingInputs, ring_inputs, ring_shape};
use common::*;
use longattn::cudarc::driver::{CudaSlice, CudaStream};
use longattn::ring::{
    InProcessRing, RankBuffers, RingElement, RingGpuReport, RingMerge, RingRank, RingTimeline,
    SelfComm,
};
use longattn::*;
use std::sync::Arc;

struct Case<T> {
    ring: RingAttention,
    q: Vec<Vec<T>>,
    k: Vec<Vec<T>>,
    v: Vec<Vec<T>>,
    /// The single-kernel result over the whole sequence, in global order, and its LSE.
    want: Vec<f64>,
    want_lse: Vec<f32>,
}

fn case<T: RingElement>(
    stream: &Arc<CudaStream>,
    layout: RingLayout,
    shape: RingShape,
    opts: &AttentionOptions,
    seed: u64,
) -> Case<T> {
    let RingShape {
        batch,
        heads_q,
        heads_kv,
        head_dim: d,
    } = shape;
    let RingInputs {
        q,
        k,
        v,
        dense,
        qs,
        ks,
    } = ring_inputs::<T>(layout, shape, opts, seed);
    let (dq, dk, dv) = (
        stream.clone_htod(&q).unwrap(),
        stream.clone_htod(&k).unwrap(),
        stream.clone_htod(&v).unwrap(),
    );
    let mut dout: CudaSlice<T> = stream.alloc_zeros(dense.out_len()).unwrap();
    let mut dlse: CudaSlice<f32> = stream.alloc_zeros(dense.lse_len()).unwrap();
    dense
        .forward_gpu::<T, _, _>(
            stream,
            Strided::new(&dq, qs),
            Strided::new(&dk, ks),
            Strided::new(&dv, ks),
            Strided::new(&mut dout, qs),
            Some(&mut dlse),
        )
        .unwrap();
    let want = to_f64(&stream.clone_dtoh(&dout).unwrap());
    let want_lse = stream.clone_dtoh(&dlse).unwrap();
    let ring = RingAttention::new(layout, shape, opts).unwrap();
    Case {
        q: layout.shard(&q, batch, heads_q * d).unwrap(),
        k: layout.shard(&k, batch, heads_kv * d).unwrap(),
        v: layout.shard(&v, batch, heads_kv * d).unwrap(),
        ring,
        want,
        want_lse,
    }
}

/// How [`run_in_process`] runs the ring.
enum Run<'a, T> {
    /// `RingAttention::forward_gpu_in_process`.
    OneShot,
    /// `InProcessRing::forward` on a working set.
    On(&'a mut InProcessRing<T>),
    /// `InProcessRing::forward_timed` on a working set.
    Timed(&'a mut InProcessRing<T>),
}

/// Runs the in-process ring on `c` as `run` says and checks it (output and LSE) against the
/// single kernel; returns the launch report and, for a timed run, the timeline.
fn run_in_process<T: RingElement>(
    stream: &Arc<CudaStream>,
    c: &Case<T>,
    run: Run<'_, T>,
    what: &str,
) -> (RingGpuReport, Option<RingTimeline>) {
    let layout = *c.ring.layout();
    let RingShape {
        batch,
        heads_q,
        head_dim: d,
        ..
    } = c.ring.shape();
    let world = layout.world();
    let up = |x: &Vec<Vec<T>>| -> Vec<CudaSlice<T>> {
        x.iter().map(|s| stream.clone_htod(s).unwrap()).collect()
    };
    let (dq, dk, dv) = (up(&c.q), up(&c.k), up(&c.v));
    let mut dout: Vec<CudaSlice<T>> = (0..world)
        .map(|r| {
            stream
                .clone_htod(&vec![T::from_f32(f32::NAN); c.ring.out_len(r)])
                .unwrap()
        })
        .collect();
    let mut dlse: Vec<CudaSlice<f32>> = (0..world)
        .map(|r| {
            stream
                .clone_htod(&vec![f32::NAN; c.ring.lse_len(r)])
                .unwrap()
        })
        .collect();
    let report = {
        let mut ranks: Vec<RankBuffers<'_, T>> = dout
            .iter_mut()
            .zip(dlse.iter_mut())
            .enumerate()
            .map(|(r, (o, l))| {
                let st = Strides::contiguous(layout.shard_len(r), heads_q, d);
                RankBuffers {
                    q: Strided::new(&dq[r], st),
                    k: &dk[r],
                    v: &dv[r],
                    out: Strided::new(o, st),
                    lse: Some(l),
                }
            })
            .collect();
        match run {
            Run::OneShot => (
                c.ring.forward_gpu_in_process(stream, &mut ranks).unwrap(),
                None,
            ),
            Run::On(ws) => (ws.forward(stream, &mut ranks).unwrap(), None),
            Run::Timed(ws) => {
                let (report, timeline) = ws.forward_timed(stream, &mut ranks).unwrap();
                (report, Some(timeline))
            }
        }
    };
    let outs: Vec<Vec<T>> = dout.iter().map(|o| stream.clone_dtoh(o).unwrap()).collect();
    let got = to_f64(&layout.unshard(&outs, batch, heads_q * d).unwrap());
    let err = rel_l2(&got, &c.want);
    assert!(
        err < tolerance::<T>(),
        "{what}: rel l2 {err} vs the single kernel"
    );
    // LSE [batch, heads_q, L_r] per rank back into [batch, heads_q, seqlen].
    let s = layout.seqlen();
    let mut got_lse = vec![f32::NAN; c.want_lse.len()];
    for (r, dl) in dlse.iter().enumerate() {
        let l = stream.clone_dtoh(dl).unwrap();
        let pos = layout.positions(r);
        for bh in 0..batch * heads_q {
            for (i, &p) in pos.iter().enumerate() {
                got_lse[bh * s + p] = l[bh * pos.len() + i];
            }
        }
    }
    let want_lse: Vec<f64> = c.want_lse.iter().map(|&x| x as f64).collect();
    check_lse(&got_lse, &want_lse, 2e-3, what);
    report
}

fn masks() -> Vec<(&'static str, AttentionOptions)> {
    vec![
        ("full", AttentionOptions::default()),
        ("causal", AttentionOptions::causal()),
        (
            "window 100",
            AttentionOptions::default().with_window(Window::causal_tokens(100).unwrap()),
        ),
        (
            "window 64 + 4 sinks",
            AttentionOptions::default()
                .with_window(Window::causal_tokens(64).unwrap())
                .with_sinks(4),
        ),
        (
            "(37, 20)",
            AttentionOptions::default().with_window(Window::new(Some(37), Some(20))),
        ),
    ]
}

#[test]
fn in_process_ring_equals_the_single_kernel() {
    let Some(stream) = gpu_stream_or_skip("in_process_ring_equals_the_single_kernel") else {
        return;
    };
    let mut seed = 1;
    for d in [64, 128] {
        let shape = ring_shape(2, 4, 2, d);
        for world in [1, 2, 3, 4, 8] {
            for sharding in [Sharding::Contiguous, Sharding::Zigzag, Sharding::Stripe] {
                for (name, opts) in masks() {
                    // 517 tokens: not divisible by any world above 1.
                    let layout = RingLayout::new(517, world, sharding).unwrap();
                    seed += 1;
                    let c = case::<f16>(&stream, layout, shape, &opts, seed);
                    let what = format!("f16 d {d} world {world} {sharding:?} {name}");
                    run_in_process(&stream, &c, Run::OneShot, &what);
                    // The deferred merge (one gather per rank at the end) on a working set
                    // of its own, twice: the second time on fresh inputs.
                    let mut ws =
                        InProcessRing::<f16>::with_merge(&c.ring, &stream, RingMerge::Deferred)
                            .unwrap();
                    run_in_process(&stream, &c, Run::On(&mut ws), &format!("{what}, deferred"));
                    let c = case::<f16>(&stream, layout, shape, &opts, seed + 1000);
                    let what = format!("{what}, deferred, fresh inputs");
                    run_in_process(&stream, &c, Run::On(&mut ws), &what);
                }
            }
        }
    }
    let shape = ring_shape(1, 8, 1, 128);
    let layout = RingLayout::new(1000, 4, Sharding::Zigzag).unwrap();
    let c = case::<bf16>(&stream, layout, shape, &AttentionOptions::causal(), 99);
    run_in_process(&stream, &c, Run::OneShot, "bf16 MQA zigzag causal");
}

/// One working set, several calls: fresh inputs each time (poisoned outputs), the caller's
/// stream alternating between the default stream and a stream of its own, every mask of a
/// zigzag and a stripe ring; each call equals the single kernel, and the report does not
/// change between calls.
#[test]
fn in_process_ring_reuses_its_working_set() {
    let Some(ctx) = gpu_or_skip("in_process_ring_reuses_its_working_set") else {
        return;
    };
    let streams = [ctx.default_stream(), ctx.new_stream().unwrap()];
    let shape = ring_shape(2, 4, 1, 64);
    let mut seed = 300;
    for (world, sharding) in [(3, Sharding::Zigzag), (4, Sharding::Stripe)] {
        for (name, opts) in masks() {
            let layout = RingLayout::new(389, world, sharding).unwrap();
            let first = case::<bf16>(&streams[0], layout, shape, &opts, seed);
            let mut ws = InProcessRing::<bf16>::new(&first.ring, &streams[0]).unwrap();
            let what = format!("world {world} {sharding:?} {name}, call 0");
            let (report, _) = run_in_process(&streams[0], &first, Run::On(&mut ws), &what);
            for call in 1..4 {
                seed += 1;
                let stream = &streams[call % 2];
                let c = case::<bf16>(stream, layout, shape, &opts, seed);
                let what = format!("world {world} {sharding:?} {name}, call {call}");
                assert_eq!(
                    run_in_process(stream, &c, Run::On(&mut ws), &what).0,
                    report
                );
            }
        }
    }
}

/// A timed run equals the single kernel like any other, and its timeline has one entry per
/// computing step of every rank, with finite, non-negative times and no copy where the step
/// computes on the rank's own shard.
#[test]
fn in_process_ring_timeline_covers_every_computing_step() {
    let Some(stream) = gpu_stream_or_skip("in_process_ring_timeline_covers_every_computing_step")
    else {
        return;
    };
    let shape = ring_shape(1, 4, 2, 64);
    for (sharding, opts) in [
        (Sharding::Zigzag, AttentionOptions::causal()),
        (
            Sharding::Contiguous,
            AttentionOptions::default().with_window(Window::causal_tokens(300).unwrap()),
        ),
    ] {
        let layout = RingLayout::new(2000, 4, sharding).unwrap();
        let c = case::<f16>(&stream, layout, shape, &opts, 41);
        let mut ws = InProcessRing::<f16>::new(&c.ring, &stream).unwrap();
        let what = format!("timed {sharding:?}");
        let (report, timeline) = run_in_process(&stream, &c, Run::Timed(&mut ws), &what);
        let timeline = timeline.expect("a timed run returns its timeline");
        let steps = timeline.steps().unwrap();
        assert_eq!(steps.len(), report.computing_steps);
        let plans = c.ring.plans().unwrap();
        for s in &steps {
            let planned = &plans[s.rank].steps[s.step];
            assert!(planned.computes(), "{s:?}");
            for x in [s.compute_ms, s.wait_ms, s.copy_ms] {
                assert!(x.is_finite() && x >= 0.0, "{s:?}");
            }
            assert!(s.compute_ms > 0.0, "{s:?}");
            // A step on the rank's own shard had no copy (a received one's copy may time
            // as 0 at the events' resolution).
            assert!(planned.compute_after_recv || s.copy_ms == 0.0, "{s:?}");
        }
        let overlap = RingTimeline::overlap(&steps);
        assert!((0.0..=1.0).contains(&overlap), "{overlap}");
    }
}

#[test]
fn in_process_ring_moves_only_the_needed_shards() {
    let Some(stream) = gpu_stream_or_skip("in_process_ring_moves_only_the_needed_shards") else {
        return;
    };
    let shape = ring_shape(1, 2, 1, 64);
    let opts = AttentionOptions::default().with_window(Window::causal_tokens(4096).unwrap());
    let layout = RingLayout::new(16384, 8, Sharding::Contiguous).unwrap();
    let c = case::<f16>(&stream, layout, shape, &opts, 7);
    let (report, _) = run_in_process(&stream, &c, Run::OneShot, "window 4k over 8 ranks");
    assert_eq!(report.transfers.received, vec![0, 1, 2, 2, 2, 2, 2, 2]);
}

#[test]
fn star_attention_gpu_equals_cpu() {
    let Some(stream) = gpu_stream_or_skip("star_attention_gpu_equals_cpu") else {
        return;
    };
    let shape = ring_shape(2, 4, 2, 64);
    let (context, world, nq) = (1000, 4, 17);
    let star = StarAttention::new(context, world, nq, shape, &AttentionOptions::causal()).unwrap();
    let layout = RingLayout::new(context, world, Sharding::Contiguous).unwrap();
    let (rq, rk) = (shape.heads_q * 64, shape.heads_kv * 64);
    let mut g = rng(5);
    let kc: Vec<f16> = random_vec(&mut g, 2 * context * rk);
    let vc: Vec<f16> = random_vec(&mut g, 2 * context * rk);
    let qc: Vec<f16> = random_vec(&mut g, 2 * context * rq);
    let (qb, kb, vb) = (
        layout.shard(&qc, 2, rq).unwrap(),
        layout.shard(&kc, 2, rk).unwrap(),
        layout.shard(&vc, 2, rk).unwrap(),
    );
    let dk: Vec<CudaSlice<f16>> = kb.iter().map(|x| stream.clone_htod(x).unwrap()).collect();
    let dv: Vec<CudaSlice<f16>> = vb.iter().map(|x| stream.clone_htod(x).unwrap()).collect();
    for r in 0..world {
        let lr = star.block(r).len();
        let st = Strides::contiguous(lr, 4, 64);
        let mut want = vec![f16::ZERO; 2 * lr * rq];
        star.context_cpu(
            r,
            Strided::new(&qb[r][..], st),
            &kb[0],
            &vb[0],
            &kb[r],
            &vb[r],
            Strided::new(&mut want[..], st),
            None,
        )
        .unwrap();
        let dq = stream.clone_htod(&qb[r]).unwrap();
        let mut dout: CudaSlice<f16> = stream.alloc_zeros(2 * lr * rq).unwrap();
        star.context_gpu(
            &stream,
            r,
            Strided::new(&dq, st),
            &dk[0],
            &dv[0],
            &dk[r],
            &dv[r],
            Strided::new(&mut dout, st),
            None,
        )
        .unwrap();
        let got = to_f64(&stream.clone_dtoh(&dout).unwrap());
        let err = rel_l2(&got, &to_f64(&want));
        assert!(err < tolerance::<f16>(), "star phase 1 rank {r}: {err}");
    }
    let q: Vec<f16> = random_vec(&mut g, 2 * nq * rq);
    let kq: Vec<f16> = random_vec(&mut g, 2 * nq * rk);
    let vq: Vec<f16> = random_vec(&mut g, 2 * nq * rk);
    let st = Strides::contiguous(nq, 4, 64);
    let mut want = vec![f16::ZERO; 2 * nq * rq];
    let kr: Vec<&[f16]> = kb.iter().map(|x| &x[..]).collect();
    let vr: Vec<&[f16]> = vb.iter().map(|x| &x[..]).collect();
    star.query_cpu(
        Strided::new(&q[..], st),
        &kr,
        &vr,
        &kq,
        &vq,
        Strided::new(&mut want[..], st),
        None,
    )
    .unwrap();
    let (dq, dkq, dvq) = (
        stream.clone_htod(&q).unwrap(),
        stream.clone_htod(&kq).unwrap(),
        stream.clone_htod(&vq).unwrap(),
    );
    let mut dout: CudaSlice<f16> = stream.alloc_zeros(2 * nq * rq).unwrap();
    let dkr: Vec<&CudaSlice<f16>> = dk.iter().collect();
    let dvr: Vec<&CudaSlice<f16>> = dv.iter().collect();
    star.query_gpu(
        &stream,
        Strided::new(&dq, st),
        &dkr,
        &dvr,
        &dkq,
        &dvq,
        Strided::new(&mut dout, st),
        None,
    )
    .unwrap();
    let got = to_f64(&stream.clone_dtoh(&dout).unwrap());
    let err = rel_l2(&got, &to_f64(&want));
    assert!(err < tolerance::<f16>(), "star phase 2: {err}");
}

/// A rank driver alone (world 1 through SelfComm): the same result as one dense call.
#[test]
fn ring_rank_world_one_equals_the_single_kernel() {
    let Some(ctx) = gpu_or_skip("ring_rank_world_one_equals_the_single_kernel") else {
        return;
    };
    let stream = ctx.default_stream();
    let shape = ring_shape(1, 4, 4, 128);
    let layout = RingLayout::new(777, 1, Sharding::Contiguous).unwrap();
    let c = case::<f16>(&stream, layout, shape, &AttentionOptions::causal(), 3);
    let comm = SelfComm::new(ctx.new_stream().unwrap());
    let rank = RingRank::new(&c.ring, &comm).unwrap();
    let (dq, dk, dv) = (
        stream.clone_htod(&c.q[0]).unwrap(),
        stream.clone_htod(&c.k[0]).unwrap(),
        stream.clone_htod(&c.v[0]).unwrap(),
    );
    let mut dout: CudaSlice<f16> = stream.alloc_zeros(c.ring.out_len(0)).unwrap();
    let st = Strides::contiguous(777, 4, 128);
    rank.run(
        &stream,
        RankBuffers {
            q: Strided::new(&dq, st),
            k: &dk,
            v: &dv,
            out: Strided::new(&mut dout, st),
            lse: None,
        },
    )
    .unwrap();
    let got = to_f64(&stream.clone_dtoh(&dout).unwrap());
    let err = rel_l2(&got, &c.want);
    assert!(err < tolerance::<f16>(), "world 1 rank driver: {err}");
    // A working set built for another ring (longer shards) is refused before any launch.
    let other = RingAttention::new(
        RingLayout::new(778, 1, Sharding::Contiguous).unwrap(),
        shape,
        &AttentionOptions::causal(),
    )
    .unwrap();
    let other_rank = RingRank::new(&other, &comm).unwrap();
    let mut foreign = other_rank.workspace::<f16>(&stream).unwrap();
    let refused = rank.run_in(
        &mut foreign,
        &stream,
        RankBuffers {
            q: Strided::new(&dq, st),
            k: &dk,
            v: &dv,
            out: Strided::new(&mut dout, st),
            lse: None,
        },
    );
    assert!(matches!(refused, Err(Error::Shape(_))), "{refused:?}");
    // One working set per merge, fresh inputs each run, poisoned outputs and LSE.
    for (merge, seeds) in [(RingMerge::Running, 4..7), (RingMerge::Deferred, 7..10)] {
        let mut ws = rank.workspace_with::<f16>(&stream, merge).unwrap();
        for seed in seeds {
            let c = case::<f16>(&stream, layout, shape, &AttentionOptions::causal(), seed);
            let (dq, dk, dv) = (
                stream.clone_htod(&c.q[0]).unwrap(),
                stream.clone_htod(&c.k[0]).unwrap(),
                stream.clone_htod(&c.v[0]).unwrap(),
            );
            let mut dout = stream
                .clone_htod(&vec![f16::NAN; c.ring.out_len(0)])
                .unwrap();
            let mut dlse = stream
                .clone_htod(&vec![f32::NAN; c.ring.lse_len(0)])
                .unwrap();
            rank.run_in(
                &mut ws,
                &stream,
                RankBuffers {
                    q: Strided::new(&dq, st),
                    k: &dk,
                    v: &dv,
                    out: Strided::new(&mut dout, st),
                    lse: Some(&mut dlse),
                },
            )
            .unwrap();
            let got = to_f64(&stream.clone_dtoh(&dout).unwrap());
            let err = rel_l2(&got, &c.want);
            assert!(
                err < tolerance::<f16>(),
                "world 1 rank {merge:?}, seed {seed}: {err}"
            );
            let want_lse: Vec<f64> = c.want_lse.iter().map(|&x| x as f64).collect();
            let got_lse = stream.clone_dtoh(&dlse).unwrap();
            check_lse(
                &got_lse,
                &want_lse,
                2e-3,
                &format!("world 1 {merge:?} seed {seed}"),
            );
        }
    }
}

/// NCCL: world 1 on one GPU, and world N over every visible GPU (one thread per rank).
#[cfg(feature = "nccl")]
#[test]
fn nccl_ring_equals_the_single_kernel() {
    use longattn::ring::comm::{NcclComm, nccl_available};
    let Some(ctx) = gpu_or_skip("nccl_ring_equals_the_single_kernel") else {
        return;
    };
    if !nccl_available() {
        if longattn::device::gpu_required() {
            panic!("LONGATTN_REQUIRE_GPU=1 but libnccl cannot be loaded (see ring::comm)");
        }
        eprintln!("SKIP (no libnccl) nccl_ring_equals_the_single_kernel");
        return;
    }
    let gpus = longattn::cudarc::driver::CudaContext::device_count().unwrap_or(1) as usize;
    for world in [1, gpus] {
        let ctxs: Vec<_> = (0..world)
            .map(|i| longattn::device::open_gpu(i).unwrap())
            .collect();
        let shape = ring_shape(1, 4, 2, 64);
        let layout = RingLayout::new(1031, world, Sharding::Zigzag).unwrap();
        let c = case::<f16>(
            &ctx.default_stream(),
            layout,
            shape,
            &AttentionOptions::causal(),
            11,
        );
        let comms =
            NcclComm::local_ring(ctxs.iter().map(|x| x.new_stream().unwrap()).collect()).unwrap();
        let outs: Vec<Vec<f16>> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .enumerate()
                .map(|(r, comm)| {
                    let (c, ctx) = (&c, &ctxs[r]);
                    s.spawn(move || {
                        let stream = ctx.default_stream();
                        let st = Strides::contiguous(layout.shard_len(r), 4, 64);
                        let (dq, dk, dv) = (
                            stream.clone_htod(&c.q[r]).unwrap(),
                            stream.clone_htod(&c.k[r]).unwrap(),
                            stream.clone_htod(&c.v[r]).unwrap(),
                        );
                        let mut dout: CudaSlice<f16> =
                            stream.alloc_zeros(c.ring.out_len(r)).unwrap();
                        RingRank::new(&c.ring, &comm)
                            .unwrap()
                            .run(
                                &stream,
                                RankBuffers {
                                    q: Strided::new(&dq, st),
                                    k: &dk,
                                    v: &dv,
                                    out: Strided::new(&mut dout, st),
                                    lse: None,
                                },
                            )
                            .unwrap();
                        stream.clone_dtoh(&dout).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let got = to_f64(&layout.unshard(&outs, 1, 4 * 64).unwrap());
        let err = rel_l2(&got, &c.want);
        assert!(err < tolerance::<f16>(), "nccl world {world}: {err}");
        if gpus < 2 {
            eprintln!("SKIP (1 GPU visible) nccl ring with world > 1");
            break;
        }
    }
}
