//! The in-process GPU ring (every rank on one GPU, verified on an H200, 2026-12-04) against one
//! dense call over the same sequence, in the same run: 2, 4 and 8 ranks over 32k to 128k
//! tokens, causal zigzag and a 4k causal window (contiguous). Prints one `BENCH {json}` line
//! per case in the style of gpu_bench:
//! - `ring_ms`, `dense_ms`, `overhead_pct` = ring over dense - 1 (the cost of piece launches,
//!   merges and copies: on one GPU the ranks share the device, so the ring does the dense
//!   call's work plus that overhead); `ring_ms` runs one [`InProcessRing`] working set built
//!   before the timing (what an engine repeating the ring does);
//! - `deferred_ms`, `deferred_overhead_pct`: the same with `RingMerge::Deferred` (each piece
//!   into a slot of its own, one gather per rank at the end) instead of a merge per piece;
//! - `oneshot_ms`: `RingAttention::forward_gpu_in_process`, which builds the working set per
//!   call (streams, allocations; its first stream synchronises the context);
//! - `pieces` (dense launches, one merge each), `transfers` / `unskipped` (shards moved);
//! - `copy_ms`: the plan's copies alone, serially on one stream;
//! - from one `forward_timed` run of the deferred working set (events around each step's
//!   compute and each copy): `step_copy_ms` (the copies, timed where they ran), `wait_ms`
//!   (the time compute streams stood still before a step, waiting for its shard),
//!   `max_copy_over_compute` (the largest copy / compute ratio of a step: above 1 a copy
//!   cannot hide), `overlap` = `1 - exposed / step_copy_ms` (`RingTimeline::overlap`).
//!
//! `cargo run --release --example ring_bench [-- --quick]` (quick: 32k tokens, plus 8 ranks
//! at 64k causal zigzag and at 128k with the 4k window, the two targets).

use longattn::cudarc::driver::sys::CUevent_flags;
use longattn::cudarc::driver::{CudaSlice, CudaStream};
use longattn::ring::{InProcessRing, RankBuffers, RingMerge, RingStepTime, RingTimeline};
use longattn::*;
use std::sync::Arc;

mod support;

const REPS: usize = 3;

/// Mean milliseconds of `f` over REPS runs after one warm-up, timed with events on `stream`.
fn time_ms(stream: &Arc<CudaStream>, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let start = stream.record_event(flags)?;
    for _ in 0..REPS {
        f()?;
    }
    let end = stream.record_event(flags)?;
    end.synchronize()?;
    Ok(start.elapsed_ms(&end)? as f64 / REPS as f64)
}

/// Every rank's buffers: contiguous q/out shards `[1, L_r, heads_q, head_dim]`, no LSE.
fn rank_buffers<'a>(
    layout: &RingLayout,
    shape: RingShape,
    (q, k, v): Shards<'a>,
    out: &'a mut [CudaSlice<bf16>],
) -> Vec<RankBuffers<'a, bf16>> {
    out.iter_mut()
        .enumerate()
        .map(|(r, o)| {
            let st = Strides::contiguous(layout.shard_len(r), shape.heads_q, shape.head_dim);
            RankBuffers {
                q: Strided::new(&q[r], st),
                k: &k[r],
                v: &v[r],
                out: Strided::new(o, st),
                lse: None,
            }
        })
        .collect()
}

/// Per-rank `(q, k, v)` shards.
type Shards<'a> = (
    &'a [CudaSlice<bf16>],
    &'a [CudaSlice<bf16>],
    &'a [CudaSlice<bf16>],
);

fn bench(
    stream: &Arc<CudaStream>,
    name: &str,
    seqlen: usize,
    world: usize,
    sharding: Sharding,
    opts: &AttentionOptions,
) -> Result<String> {
    let shape = RingShape {
        batch: 1,
        heads_q: 16,
        heads_kv: 4,
        head_dim: 128,
    };
    let (hq, hkv, d) = (shape.heads_q, shape.heads_kv, shape.head_dim);
    let layout = RingLayout::new(seqlen, world, sharding)?;
    let ring = RingAttention::new(layout, shape, opts)?;
    let dense = FlashAttention::new(
        &AttentionShape {
            batch: 1,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            seqlens: SeqLens::Fixed {
                seqlen_q: seqlen,
                seqlen_k: seqlen,
            },
        },
        opts,
    )?;
    let q: Vec<bf16> = support::uniform(seqlen * hq * d, 1);
    let k: Vec<bf16> = support::uniform(seqlen * hkv * d, 2);
    let v: Vec<bf16> = support::uniform(seqlen * hkv * d, 3);
    // Dense over the whole sequence.
    let (dq, dk, dv) = (
        stream.clone_htod(&q)?,
        stream.clone_htod(&k)?,
        stream.clone_htod(&v)?,
    );
    let mut dout: CudaSlice<bf16> = stream.alloc_zeros(dense.out_len())?;
    let (qs, ks) = (
        Strides::contiguous(seqlen, hq, d),
        Strides::contiguous(seqlen, hkv, d),
    );
    let dense_ms = time_ms(stream, || {
        dense.forward_gpu::<bf16, _, _>(
            stream,
            Strided::new(&dq, qs),
            Strided::new(&dk, ks),
            Strided::new(&dv, ks),
            Strided::new(&mut dout, qs),
            None,
        )
    })?;
    drop((dq, dk, dv, dout));
    // The ring.
    let up = |x: Vec<Vec<bf16>>| -> Result<Vec<CudaSlice<bf16>>> {
        x.iter().map(|s| Ok(stream.clone_htod(s)?)).collect()
    };
    let rq = up(layout.shard(&q, 1, hq * d)?)?;
    let rk = up(layout.shard(&k, 1, hkv * d)?)?;
    let rv = up(layout.shard(&v, 1, hkv * d)?)?;
    let mut ro: Vec<CudaSlice<bf16>> = (0..world)
        .map(|r| Ok(stream.alloc_zeros(ring.out_len(r))?))
        .collect::<Result<_>>()?;
    let shards = (&rq[..], &rk[..], &rv[..]);
    let mut ws = InProcessRing::<bf16>::new(&ring, stream)?;
    let mut report = None;
    let ring_ms = time_ms(stream, || {
        report = Some(ws.forward(stream, &mut rank_buffers(&layout, shape, shards, &mut ro))?);
        Ok(())
    })?;
    drop(ws);
    let mut ws = InProcessRing::<bf16>::with_merge(&ring, stream, RingMerge::Deferred)?;
    let deferred_ms = time_ms(stream, || {
        ws.forward(stream, &mut rank_buffers(&layout, shape, shards, &mut ro))?;
        Ok(())
    })?;
    // One timed run: per step, compute time, the wait for its shard, the copy's time.
    let (_, timeline) =
        ws.forward_timed(stream, &mut rank_buffers(&layout, shape, shards, &mut ro))?;
    let steps = timeline.steps()?;
    let overlap = RingTimeline::overlap(&steps);
    let sum = |f: fn(&RingStepTime) -> f32| steps.iter().map(|s| f(s) as f64).sum::<f64>();
    let (wait_ms, step_copy_ms) = (sum(|s| s.wait_ms), sum(|s| s.copy_ms));
    let copy_over_compute = steps
        .iter()
        .filter(|s| s.copy_ms > 0.0)
        .map(|s| s.copy_ms / s.compute_ms.max(1e-6))
        .fold(0.0f32, f32::max);
    drop(ws);
    let oneshot_ms = time_ms(stream, || {
        ring.forward_gpu_in_process(stream, &mut rank_buffers(&layout, shape, shards, &mut ro))?;
        Ok(())
    })?;
    let report = report.expect("the ring ran");
    // The plan's copies alone, serially.
    let plans = ring.plans()?;
    let mut scratch: CudaSlice<bf16> =
        stream.alloc_zeros((0..world).map(|r| ring.kv_len(r)).max().unwrap_or(1))?;
    let copy_ms = time_ms(stream, || {
        for p in &plans {
            for s in p.steps.iter().filter_map(|s| s.recv) {
                let n = ring.kv_len(s.shard);
                for src in [&rk[s.shard], &rv[s.shard]] {
                    stream.memcpy_dtod(&src.slice(..n), &mut scratch.slice_mut(..n))?;
                }
            }
        }
        Ok(())
    })?;
    Ok(format!(
        "BENCH {{\"name\":\"{name}\",\"impl\":\"longattn-ring-inprocess\",\"s\":{seqlen},\"world\":{world},\"h\":{hq},\"hkv\":{hkv},\"d\":{d},\"ring_ms\":{ring_ms:.4},\"deferred_ms\":{deferred_ms:.4},\"deferred_overhead_pct\":{:.1},\"oneshot_ms\":{oneshot_ms:.4},\"dense_ms\":{dense_ms:.4},\"overhead_pct\":{:.1},\"pieces\":{},\"transfers\":{},\"unskipped\":{},\"copy_ms\":{copy_ms:.4},\"step_copy_ms\":{step_copy_ms:.4},\"wait_ms\":{wait_ms:.4},\"max_copy_over_compute\":{copy_over_compute:.2},\"overlap\":{overlap:.2}}}",
        (deferred_ms / dense_ms - 1.0) * 100.0,
        (ring_ms / dense_ms - 1.0) * 100.0,
        report.pieces,
        report.transfers.total,
        report.transfers.unskipped,
    ))
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let ctx = longattn::device::open_gpu(0)?;
    let stream = ctx.default_stream();
    println!(
        "# ring_bench on {} (in-process ring)",
        Device::Cuda(ctx.clone()).describe()
    );
    let zigzag = || {
        (
            "causal_zigzag",
            Sharding::Zigzag,
            AttentionOptions::causal(),
        )
    };
    let window = || -> Result<_> {
        Ok((
            "window4096_contiguous",
            Sharding::Contiguous,
            AttentionOptions::default().with_window(Window::causal_tokens(4096)?),
        ))
    };
    // (tokens, ranks, case): every case at 32k, and the two targets (8 ranks: causal
    // zigzag at 64k, window 4k at 16k tokens per rank) in the quick run; 64k and 128k at
    // every world otherwise.
    let mut runs = Vec::new();
    for world in [2usize, 4, 8] {
        runs.push((32768, world, zigzag()));
        runs.push((32768, world, window()?));
    }
    if quick {
        runs.push((65536, 8, zigzag()));
        runs.push((131072, 8, window()?));
    } else {
        for s in [65536, 131072] {
            for world in [2usize, 4, 8] {
                runs.push((s, world, zigzag()));
                runs.push((s, world, window()?));
            }
        }
    }
    for (s, world, (name, sharding, opts)) in runs {
        let name = format!("ring_{name}_s{s}_w{world}");
        match bench(&stream, &name, s, world, sharding, &opts) {
            Ok(line) => println!("{line}"),
            Err(e) => println!("# {name}: {e}"),
        }
    }
    Ok(())
}
