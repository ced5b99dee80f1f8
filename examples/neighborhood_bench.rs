//! GPU throughput of neighborhood attention against our dense kernel on the same grid, on the
//! problems of issue 13 (bf16). Prints one `BENCH {json}` line per (problem, implementation)
//! and one `NA {json}` line per problem with the speedup over dense and that speedup as a
//! fraction of the FLOP-bound ratio (dense pairs / visible pairs); the FlexAttention baseline
//! of the same problems is `scripts/torch_neighborhood_baseline.py`.
//!
//! TFLOP/s counts `4 * head_dim` FLOPs per visible (query, key) pair and head, for dense the
//! whole grid squared. Both neighborhood kernels are timed (`longattn-na-simt`, the portable
//! one; `longattn-na-mma`, the fused tensor-core one, head_dim 64/128, one-shot, and
//! `longattn-na-mma-plan`, the same through `plan_gpu`; `longattn-na-hopper`, the Hopper
//! wgmma + TMA kernel, opt-in `forward_gpu_hopper`, compute capability 9.0 only, not yet
//! verified: timed only, never the `NA` line's pick); the `NA` line's
//! speedup uses the fastest verified one, and gives the 64-row schedule's computed / visible
//! pair ratio (the fused kernel's overhead in FLOPs) and the Hopper boxes' ratio.
//! `cargo run --release --example neighborhood_bench [-- --quick]`.

use longattn::cudarc::driver::{CudaSlice, CudaStream};
use longattn::neighborhood::schedule::{
    HopperTiles, MMA_KEY_TILE, MMA_QUERY_ROWS, NeighborhoodSchedule, flop_bound_ratio,
    visible_flops,
};
use longattn::*;
use std::sync::Arc;

mod support;

struct Problem {
    name: String,
    dims: Vec<NeighborhoodDim>,
    heads: usize,
    d: usize,
}

/// Median milliseconds of `run` on `stream`: one warm-up, then repetitions sized to about
/// 0.2 s (3..=20).
fn time_ms(stream: &Arc<CudaStream>, run: impl FnMut() -> Result<()>) -> Result<f64> {
    support::time_ms(stream, 200.0, 20, run)
}

fn bench(stream: &Arc<CudaStream>, p: &Problem) -> Result<()> {
    let na = NeighborhoodAttention::new(
        &NeighborhoodShape {
            batch: 1,
            heads_q: p.heads,
            heads_kv: p.heads,
            head_dim: p.d,
            dims: &p.dims,
        },
        &AttentionOptions::default(),
    )?;
    let n = na.tokens();
    let st = Strides::contiguous(n, p.heads, p.d);
    let len = na.out_len();
    let q: CudaSlice<bf16> = stream.clone_htod(&support::uniform(len, 1))?;
    let k: CudaSlice<bf16> = stream.clone_htod(&support::uniform(len, 2))?;
    let v: CudaSlice<bf16> = stream.clone_htod(&support::uniform(len, 3))?;
    let mut o: CudaSlice<bf16> = stream.alloc_zeros(len)?;
    let na_ms = time_ms(stream, || {
        na.forward_gpu_portable(
            stream,
            Strided::new(&q, st),
            Strided::new(&k, st),
            Strided::new(&v, st),
            Strided::new(&mut o, st),
            None,
        )
    })?;
    let fused_ms = if [64, 128].contains(&p.d) {
        Some(time_ms(stream, || {
            na.forward_gpu_fused(
                stream,
                Strided::new(&q, st),
                Strided::new(&k, st),
                Strided::new(&v, st),
                Strided::new(&mut o, st),
                None,
            )
        })?)
    } else {
        None
    };
    // The planned call (schedule built and uploaded once): what an engine runs per layer.
    let plan = na.plan_gpu(stream)?;
    let plan_ms = if plan.uses_fused() {
        Some(time_ms(stream, || {
            plan.forward(
                stream,
                Strided::new(&q, st),
                Strided::new(&k, st),
                Strided::new(&v, st),
                Strided::new(&mut o, st),
                None,
            )
        })?)
    } else {
        None
    };
    // The Hopper kernel where it runs (compute capability 9.0, head_dim 64/128); a refusal
    // is printed, not fatal.
    let hopper_ms = match time_ms(stream, || {
        na.forward_gpu_hopper(
            stream,
            Strided::new(&q, st),
            Strided::new(&k, st),
            Strided::new(&v, st),
            Strided::new(&mut o, st),
            None,
        )
    }) {
        Ok(ms) => Some(ms),
        Err(Error::Unsupported(why)) => {
            println!("# {}: longattn-na-hopper not run: {why}", p.name);
            None
        }
        Err(e) => return Err(e),
    };
    let na_flops = visible_flops(&na);
    let line = |imp: &str, ms: f64, flops: f64| {
        println!(
            "BENCH {{\"name\":\"{}\",\"impl\":\"{imp}\",\"b\":1,\"s\":{n},\"h\":{},\"d\":{},\"ms\":{ms:.4},\"tflops\":{:.2}}}",
            p.name,
            p.heads,
            p.d,
            flops / ms / 1e9
        )
    };
    line("longattn-na-simt", na_ms, na_flops);
    if let Some(ms) = fused_ms {
        line("longattn-na-mma", ms, na_flops);
    }
    if let Some(ms) = plan_ms {
        line("longattn-na-mma-plan", ms, na_flops);
    }
    if let Some(ms) = hopper_ms {
        line("longattn-na-hopper", ms, na_flops);
    }

    let dense = FlashAttention::new(
        &AttentionShape {
            batch: 1,
            heads_q: p.heads,
            heads_kv: p.heads,
            head_dim: p.d,
            seqlens: SeqLens::Fixed {
                seqlen_q: n,
                seqlen_k: n,
            },
        },
        &AttentionOptions::default(),
    )?;
    let dense_ms = time_ms(stream, || {
        dense.forward_gpu(
            stream,
            Strided::new(&q, st),
            Strided::new(&k, st),
            Strided::new(&v, st),
            Strided::new(&mut o, st),
            None,
        )
    })?;
    let dense_flops = 4.0 * (p.heads * p.d) as f64 * (n as f64) * (n as f64);
    line("longattn-dense", dense_ms, dense_flops);

    let ratio = flop_bound_ratio(&na);
    let best_ms = [fused_ms, plan_ms]
        .into_iter()
        .flatten()
        .fold(na_ms, f64::min);
    let speedup = dense_ms / best_ms;
    let sched = NeighborhoodSchedule::new(&na, MMA_QUERY_ROWS, MMA_KEY_TILE)?;
    let computed = sched.computed_pairs() as f64 * (p.heads) as f64 * 4.0 * p.d as f64;
    let hopper = HopperTiles::new(&na).ok();
    let hopper_computed = hopper.map_or(0.0, |t| {
        t.computed_pairs() as f64 * (p.heads) as f64 * 4.0 * p.d as f64
    });
    let hopper_speedup = hopper_ms.map_or(0.0, |ms| dense_ms / ms);
    println!(
        "NA {{\"name\":\"{}\",\"speedup_over_dense\":{speedup:.2},\"flop_bound_ratio\":{ratio:.2},\"fraction_of_bound\":{:.3},\"mma_tile\":\"{:?}\",\"mma_computed_over_visible\":{:.2},\"hopper_speedup_over_dense\":{hopper_speedup:.2},\"hopper_query_box\":\"{:?}\",\"hopper_key_box\":\"{:?}\",\"hopper_computed_over_visible\":{:.2}}}",
        p.name,
        speedup / ratio,
        sched.tile,
        computed / na_flops,
        hopper.map(|t| t.query),
        hopper.map(|t| t.key),
        hopper_computed / na_flops
    );
    Ok(())
}

fn problems(quick: bool) -> Vec<Problem> {
    let nd = NeighborhoodDim::new;
    let mut out = vec![Problem {
        name: "na1d_32768_k2048_d128".into(),
        dims: vec![nd(32768, 2048)],
        heads: 16,
        d: 128,
    }];
    let sides: &[usize] = if quick { &[128] } else { &[64, 128] };
    for &side in sides {
        for k in [7, 13, 31] {
            for d in [64, 128] {
                out.push(Problem {
                    name: format!("na2d_{side}x{side}_k{k}_d{d}"),
                    dims: vec![nd(side, k), nd(side, k)],
                    heads: 2048 / d,
                    d,
                });
            }
        }
    }
    for (kt, kh) in [(3, 7), (8, 16)] {
        out.push(Problem {
            name: format!("na3d_16x64x64_k{kt}x{kh}x{kh}_d128"),
            dims: vec![nd(16, kt), nd(64, kh), nd(64, kh)],
            heads: 16,
            d: 128,
        });
    }
    out
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let ctx = longattn::device::open_gpu(0)?;
    let stream = ctx.default_stream();
    println!(
        "# neighborhood_bench on {} (neighborhood: portable, fused and Hopper kernels)",
        Device::Cuda(ctx.clone()).describe()
    );
    for p in problems(quick) {
        if let Err(e) = bench(&stream, &p) {
            println!("# {}: {e}", p.name);
        }
    }
    Ok(())
}
