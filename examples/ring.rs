//! Ring attention over every visible GPU (the in-process ring is verified on an H200,
//! 2026-12-04; the **NCCL modes are not verified**: never run on a GPU). Three modes:
//! - torchrun-style, one process per GPU (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//!   `MASTER_PORT` set; needs `--features nccl`): rank 0 hands out the NCCL id over TCP,
//!   every rank runs its shard and checks it against single-device attention on its GPU
//!   (launched by torchrun, whose store holds `MASTER_PORT`: set `LONGATTN_RING_PORT` to a
//!   free port);
//! - one process driving all local GPUs (`--features nccl`, no `RANK`): one thread per GPU;
//! - without the `nccl` feature: the in-process ring on GPU 0 (ranks as streams), 4 ranks.
//!
//! Every mode prints each rank's time and its steps (computing / skipped, transfers), the
//! error against one dense call over the whole sequence, and, for the in-process ring, the
//! overlap estimate of examples/ring_bench.rs.
//!
//! libnccl: see `longattn::ring::comm` (cudarc loads `libnccl.so`; the PyPI wheel ships
//! `libnccl.so.2`: link it as `libnccl.so` in a directory on `LD_LIBRARY_PATH`).
//!
//! `cargo run --release --features nccl --example ring`, or per process:
//! `RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 target/release/examples/ring`.

use longattn::cudarc::driver::{CudaSlice, CudaStream};
use longattn::*;
use std::sync::Arc;

mod support;

const SEQLEN: usize = 16384 + 123;
const SHAPE: RingShape = RingShape {
    batch: 1,
    heads_q: 16,
    heads_kv: 4,
    head_dim: 128,
};

struct Problem {
    q: Vec<bf16>,
    k: Vec<bf16>,
    v: Vec<bf16>,
}

fn problem() -> Problem {
    let RingShape {
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        ..
    } = SHAPE;
    Problem {
        q: support::uniform(SEQLEN * hq * d, 11),
        k: support::uniform(SEQLEN * hkv * d, 12),
        v: support::uniform(SEQLEN * hkv * d, 13),
    }
}

fn options() -> AttentionOptions {
    AttentionOptions::causal()
}

/// One dense call over the whole sequence on `stream`: the reference every rank checks.
fn single_device(stream: &Arc<CudaStream>, p: &Problem) -> Result<Vec<bf16>> {
    let RingShape {
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        ..
    } = SHAPE;
    let dense = FlashAttention::new(
        &AttentionShape {
            batch: 1,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            seqlens: SeqLens::Fixed {
                seqlen_q: SEQLEN,
                seqlen_k: SEQLEN,
            },
        },
        &options(),
    )?;
    let (dq, dk, dv) = (
        stream.clone_htod(&p.q)?,
        stream.clone_htod(&p.k)?,
        stream.clone_htod(&p.v)?,
    );
    let mut out: CudaSlice<bf16> = stream.alloc_zeros(dense.out_len())?;
    let (qs, ks) = (
        Strides::contiguous(SEQLEN, hq, d),
        Strides::contiguous(SEQLEN, hkv, d),
    );
    dense.forward_gpu::<bf16, _, _>(
        stream,
        Strided::new(&dq, qs),
        Strided::new(&dk, ks),
        Strided::new(&dv, ks),
        Strided::new(&mut out, qs),
        None,
    )?;
    Ok(stream.clone_dtoh(&out)?)
}

/// `||got - want|| / ||want||` of rank `rank`'s shard against the whole reference.
fn shard_error(layout: &RingLayout, rank: usize, got: &[bf16], want: &[bf16]) -> f64 {
    let row = SHAPE.heads_q * SHAPE.head_dim;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (i, &p) in layout.positions(rank).iter().enumerate() {
        for x in 0..row {
            let (g, w) = (got[i * row + x].to_f64(), want[p * row + x].to_f64());
            num += (g - w) * (g - w);
            den += w * w;
        }
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn describe_plan(plan: &RankPlan) -> String {
    format!(
        "computes at steps {:?}, receives shards {:?}, sends {:?}",
        plan.computing_steps(),
        plan.received(),
        plan.sent()
    )
}

fn in_process(world: usize) -> Result<()> {
    let ctx = longattn::device::open_gpu(0)?;
    let stream = ctx.default_stream();
    let p = problem();
    let want = single_device(&stream, &p)?;
    let layout = RingLayout::new(SEQLEN, world, Sharding::Zigzag)?;
    let ring = RingAttention::new(layout, SHAPE, &options())?;
    let (hq, hkv, d) = (SHAPE.heads_q, SHAPE.heads_kv, SHAPE.head_dim);
    let up = |x: Vec<Vec<bf16>>| -> Result<Vec<CudaSlice<bf16>>> {
        x.iter().map(|s| Ok(stream.clone_htod(s)?)).collect()
    };
    let (rq, rk, rv) = (
        up(layout.shard(&p.q, 1, hq * d)?)?,
        up(layout.shard(&p.k, 1, hkv * d)?)?,
        up(layout.shard(&p.v, 1, hkv * d)?)?,
    );
    let mut ro: Vec<CudaSlice<bf16>> = (0..world)
        .map(|r| Ok(stream.alloc_zeros(ring.out_len(r))?))
        .collect::<Result<_>>()?;
    let t0 = std::time::Instant::now();
    let report = {
        let mut ranks: Vec<ring::RankBuffers<'_, bf16>> = ro
            .iter_mut()
            .enumerate()
            .map(|(r, o)| {
                let st = Strides::contiguous(layout.shard_len(r), hq, d);
                ring::RankBuffers {
                    q: Strided::new(&rq[r], st),
                    k: &rk[r],
                    v: &rv[r],
                    out: Strided::new(o, st),
                    lse: None,
                }
            })
            .collect();
        ring.forward_gpu_in_process(&stream, &mut ranks)?
    };
    stream.synchronize()?;
    println!(
        "in-process ring, {world} ranks on one GPU: {:.3} ms (first call, host clock), {} pieces, {} of {} transfers",
        t0.elapsed().as_secs_f64() * 1e3,
        report.pieces,
        report.transfers.total,
        report.transfers.unskipped
    );
    for (r, plan) in ring.plans()?.iter().enumerate() {
        let got = stream.clone_dtoh(&ro[r])?;
        println!(
            "rank {r}: rel err {:.2e} vs single device; {}",
            shard_error(&layout, r, &got, &want),
            describe_plan(plan)
        );
    }
    println!("(step times and overlap: examples/ring_bench.rs)");
    Ok(())
}

#[cfg(feature = "nccl")]
fn run_rank(
    ring: &RingAttention,
    comm: &longattn::ring::comm::NcclComm,
    ctx: &Arc<longattn::cudarc::driver::CudaContext>,
    p: &Problem,
) -> Result<()> {
    use longattn::ring::{RingComm, RingRank};
    let stream = ctx.default_stream();
    let want = single_device(&stream, p)?;
    let layout = *ring.layout();
    let r = comm.rank();
    let (hq, hkv, d) = (SHAPE.heads_q, SHAPE.heads_kv, SHAPE.head_dim);
    let (dq, dk, dv) = (
        stream.clone_htod(&layout.shard(&p.q, 1, hq * d)?[r])?,
        stream.clone_htod(&layout.shard(&p.k, 1, hkv * d)?[r])?,
        stream.clone_htod(&layout.shard(&p.v, 1, hkv * d)?[r])?,
    );
    let mut out: CudaSlice<bf16> = stream.alloc_zeros(ring.out_len(r))?;
    let st = Strides::contiguous(layout.shard_len(r), hq, d);
    let rank = RingRank::new(ring, comm)?;
    stream.synchronize()?;
    let t0 = std::time::Instant::now();
    let pieces = rank.run(
        &stream,
        ring::RankBuffers {
            q: Strided::new(&dq, st),
            k: &dk,
            v: &dv,
            out: Strided::new(&mut out, st),
            lse: None,
        },
    )?;
    stream.synchronize()?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let got = stream.clone_dtoh(&out)?;
    println!(
        "rank {r}: {ms:.3} ms, {pieces} pieces, rel err {:.2e} vs single device; {}",
        shard_error(&layout, r, &got, &want),
        describe_plan(rank.plan())
    );
    Ok(())
}

#[cfg(feature = "nccl")]
fn main() -> Result<()> {
    use longattn::ring::comm::{Bootstrap, NcclComm};
    let p = problem();
    if std::env::var_os("RANK").is_some() {
        let boot = Bootstrap::from_env()?;
        let ctx = longattn::device::open_gpu(boot.local_rank)?;
        let comm = NcclComm::from_bootstrap(&boot, &ctx, std::time::Duration::from_secs(120))?;
        let layout = RingLayout::new(SEQLEN, boot.world, Sharding::Zigzag)?;
        let ring = RingAttention::new(layout, SHAPE, &options())?;
        return run_rank(&ring, &comm, &ctx, &p);
    }
    let gpus = longattn::cudarc::driver::CudaContext::device_count()? as usize;
    println!("# ring over {gpus} local GPU(s), one thread per GPU, NCCL");
    let ctxs: Vec<_> = (0..gpus)
        .map(longattn::device::open_gpu)
        .collect::<Result<_>>()?;
    let comms = NcclComm::local_ring(
        ctxs.iter()
            .map(|c| c.new_stream())
            .collect::<std::result::Result<_, _>>()?,
    )?;
    let layout = RingLayout::new(SEQLEN, gpus, Sharding::Zigzag)?;
    let ring = RingAttention::new(layout, SHAPE, &options())?;
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .zip(&ctxs)
            .map(|(comm, ctx)| {
                let (ring, p) = (&ring, &p);
                s.spawn(move || run_rank(ring, &comm, ctx, p))
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("rank thread panicked"))
    })?;
    in_process(4)
}

#[cfg(not(feature = "nccl"))]
fn main() -> Result<()> {
    println!("# built without the nccl feature: the in-process ring on GPU 0 only");
    in_process(4)
}
