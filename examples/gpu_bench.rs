//! GPU throughput of the dense kernels on the shapes of the perf notes. Prints one
//! `BENCH {json}` line per (shape, kernel) so that scripts/bench_summary.py can join them
//! with the PyTorch baselines measured in the same run.
//!
//! TFLOP/s counts `4 * head_dim` FLOPs per visible (query, key) pair and head.
//! `cargo run --release --example gpu_bench [-- --quick]`; `GPU_BENCH_KERNELS=wgmma,mma,simt,
//! wgmma-window,wgmma-persistent,wgmma-wide` (default: all six) picks the kernels to time.
//!
//! `window*` rows also time `DenseKernel::HopperWindow` (`longattn-wgmma-window`: 64-key
//! tiles, per-half key ranges, persistent blocks; not yet run on a GPU), on those rows only.
//! Every dense, window and varlen row also times `DenseKernel::HopperPersistent`
//! (`longattn-wgmma-persistent`: the same persistent walk with 128-key tiles; not yet run on
//! a GPU). The d128 rows without a mask (`dense_d128_*_full`) also time
//! `DenseKernel::HopperWide` (`longattn-wgmma-wide`: 176-key tiles, full attention only; not
//! yet run on a GPU).
//!
//! `varlen64_d128_causal`: one packed batch of 64 sequences of 100-2000 tokens (a fixed
//! spread), 16 heads, causal, as a serving engine's prefill batch packs them.
//!
//! `shortq_*` rows: short query sequences (1-64 new tokens) over 4k-32k keys with GQA (32
//! query / 8 kv heads, d128, no mask), as chunked prefill and speculative decoding run them:
//! `DenseKernel::TensorCoreGqa` and `DenseKernel::HopperGqa` (query heads of a group packed
//! into one tile, `mma.sync` and Hopper; not yet run on a GPU) against the per-head kernels.
//!
//! `fp8_d{64,128,256}_*` rows: the FP8 (e4m3) forward (`FlashAttention::forward_gpu_fp8`, Hopper,
//! `longattn-wgmma-fp8`; not yet run on a GPU), V^T pre-pass and scratch included, with the
//! bf16 Hopper kernel timed on the same shape in the same run (`bf16_tflops`, `ratio_bf16`;
//! issue 16's target is ratio >= 1.5 at 16k).

use longattn::cudarc::driver::{CudaSlice, CudaStream};
use longattn::*;
use std::sync::Arc;

mod support;

fn lcg_fill(n: usize, seed: u64) -> Vec<bf16> {
    support::uniform(n, seed)
}

struct Case {
    name: String,
    b: usize,
    s: usize,
    h: usize,
    d: usize,
    opts: AttentionOptions,
}

fn time_case(stream: &Arc<CudaStream>, c: &Case, kernel: DenseKernel) -> Result<(f64, f64)> {
    let shape = AttentionShape {
        batch: c.b,
        heads_q: c.h,
        heads_kv: c.h,
        head_dim: c.d,
        seqlens: SeqLens::Fixed {
            seqlen_q: c.s,
            seqlen_k: c.s,
        },
    };
    let attn = FlashAttention::new(&shape, &c.opts)?.with_kernel(kernel);
    let st = Strides::contiguous(c.s, c.h, c.d);
    let n = c.b * c.s * c.h * c.d;
    let q: CudaSlice<bf16> = stream.clone_htod(&lcg_fill(n, 1))?;
    let k: CudaSlice<bf16> = stream.clone_htod(&lcg_fill(n, 2))?;
    let v: CudaSlice<bf16> = stream.clone_htod(&lcg_fill(n, 3))?;
    let mut o: CudaSlice<bf16> = stream.alloc_zeros(n)?;
    let ms = support::time_ms(stream, 300.0, 50, || {
        attn.forward_gpu(
            stream,
            Strided::new(&q, st),
            Strided::new(&k, st),
            Strided::new(&v, st),
            Strided::new(&mut o, st),
            None,
        )
    })?;
    let flops = 4.0
        * (c.b * c.h * c.d) as f64
        * support::visible_pairs(&c.opts.effective_mask(), c.s, c.s) as f64;
    Ok((ms, flops / ms / 1e9))
}

/// Short queries: `sq` new tokens of 32 query heads over `sk` keys of 8 kv heads, d128, full
/// attention, batch 16; returns (ms, TFLOP/s over the sq * sk pairs).
fn time_short_query(
    stream: &Arc<CudaStream>,
    (sq, sk): (usize, usize),
    kernel: DenseKernel,
) -> Result<(f64, f64)> {
    let (b, hq, hkv, d) = (16usize, 32usize, 8usize, 128usize);
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
    let attn = FlashAttention::new(&shape, &AttentionOptions::default())?.with_kernel(kernel);
    let (qs, ks) = (
        Strides::contiguous(sq, hq, d),
        Strides::contiguous(sk, hkv, d),
    );
    let q: CudaSlice<bf16> = stream.clone_htod(&lcg_fill(b * sq * hq * d, 1))?;
    let k: CudaSlice<bf16> = stream.clone_htod(&lcg_fill(b * sk * hkv * d, 2))?;
    let v: CudaSlice<bf16> = stream.clone_htod(&lcg_fill(b * sk * hkv * d, 3))?;
    let mut o: CudaSlice<bf16> = stream.alloc_zeros(b * sq * hq * d)?;
    let ms = support::time_ms(stream, 300.0, 50, || {
        attn.forward_gpu(
            stream,
            Strided::new(&q, qs),
            Strided::new(&k, ks),
            Strided::new(&v, ks),
            Strided::new(&mut o, qs),
            None,
        )
    })?;
    let flops = 4.0 * (b * hq * d) as f64 * (sq * sk) as f64;
    Ok((ms, flops / ms / 1e9))
}

/// The varlen batch of the `varlen64_*` rows: 64 sequence lengths spread over 100..=2000
/// tokens by a fixed formula (`scripts/torch_baseline.py` uses the same one).
fn varlen_lengths() -> Vec<usize> {
    (0..64).map(|i| 100 + (i * 7919 + 13) % 1901).collect()
}

/// One packed varlen batch ([`varlen_lengths`], 16 heads, d128, causal, bf16, `[total,
/// heads, head_dim]`); returns (ms, TFLOP/s over the visible pairs of every sequence).
fn time_varlen(stream: &Arc<CudaStream>, kernel: DenseKernel) -> Result<(f64, f64)> {
    let (h, d) = (16usize, 128usize);
    let lens = varlen_lengths();
    let mut cu = vec![0i32];
    for &l in &lens {
        cu.push(cu[cu.len() - 1] + l as i32);
    }
    let total = *cu.last().unwrap_or(&0) as usize;
    let shape = AttentionShape {
        batch: lens.len(),
        heads_q: h,
        heads_kv: h,
        head_dim: d,
        seqlens: SeqLens::Varlen {
            cu_seqlens_q: &cu,
            cu_seqlens_k: &cu,
        },
    };
    let attn = FlashAttention::new(&shape, &AttentionOptions::causal())?.with_kernel(kernel);
    let st = Strides::contiguous(total, h, d);
    let n = total * h * d;
    let q: CudaSlice<bf16> = stream.clone_htod(&lcg_fill(n, 1))?;
    let k: CudaSlice<bf16> = stream.clone_htod(&lcg_fill(n, 2))?;
    let v: CudaSlice<bf16> = stream.clone_htod(&lcg_fill(n, 3))?;
    let mut o: CudaSlice<bf16> = stream.alloc_zeros(n)?;
    let ms = support::time_ms(stream, 300.0, 50, || {
        attn.forward_gpu(
            stream,
            Strided::new(&q, st),
            Strided::new(&k, st),
            Strided::new(&v, st),
            Strided::new(&mut o, st),
            None,
        )
    })?;
    let pairs: usize = lens.iter().map(|&l| l * (l + 1) / 2).sum();
    Ok((ms, 4.0 * (h * d) as f64 * pairs as f64 / ms / 1e9))
}

/// The FP8 forward on `c` (d128, bf16 output): e4m3 codes of the bench's uniform values
/// times 8, descales 1/8; returns (ms, TFLOP/s over the visible pairs).
fn time_fp8(stream: &Arc<CudaStream>, c: &Case) -> Result<(f64, f64)> {
    let shape = AttentionShape {
        batch: c.b,
        heads_q: c.h,
        heads_kv: c.h,
        head_dim: c.d,
        seqlens: SeqLens::Fixed {
            seqlen_q: c.s,
            seqlen_k: c.s,
        },
    };
    let attn = FlashAttention::new(&shape, &c.opts)?;
    let st = Strides::contiguous(c.s, c.h, c.d);
    let n = c.b * c.s * c.h * c.d;
    let codes = |seed| -> Vec<F8E4M3> {
        lcg_fill(n, seed)
            .iter()
            .map(|x| F8E4M3::from_f32(x.to_f32() * 8.0))
            .collect()
    };
    let q: CudaSlice<F8E4M3> = stream.clone_htod(&codes(1))?;
    let k: CudaSlice<F8E4M3> = stream.clone_htod(&codes(2))?;
    let v: CudaSlice<F8E4M3> = stream.clone_htod(&codes(3))?;
    let descale: CudaSlice<f32> = stream.clone_htod(&vec![0.125f32; c.b * c.h])?;
    let mut o: CudaSlice<bf16> = stream.alloc_zeros(n)?;
    let ms = support::time_ms(stream, 300.0, 50, || {
        attn.forward_gpu_fp8(
            stream,
            Strided::new(&q, st),
            Strided::new(&k, st),
            Strided::new(&v, st),
            Fp8Descales {
                q: &descale,
                k: &descale,
                v: &descale,
            },
            Strided::new(&mut o, st),
            None,
        )
    })?;
    let flops = 4.0
        * (c.b * c.h * c.d) as f64
        * support::visible_pairs(&c.opts.effective_mask(), c.s, c.s) as f64;
    Ok((ms, flops / ms / 1e9))
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let ctx = longattn::device::open_gpu(0)?;
    let stream = ctx.default_stream();
    println!("# gpu_bench on {}", Device::Cuda(ctx.clone()).describe());
    let mut cases = Vec::new();
    // Dense: 16k tokens per batch (batch * seqlen = 16k), 2048 / d heads, as in FA's plots.
    let seqs: &[usize] = if quick {
        &[1024, 16384]
    } else {
        &[1024, 4096, 16384]
    };
    for &d in &[64usize, 128, 256] {
        for &s in seqs {
            for causal in [false, true] {
                let opts = if causal {
                    AttentionOptions::causal()
                } else {
                    AttentionOptions::default()
                };
                cases.push(Case {
                    name: format!("dense_d{d}_s{s}_{}", if causal { "causal" } else { "full" }),
                    b: 16384 / s,
                    s,
                    h: 2048 / d,
                    d,
                    opts,
                });
            }
        }
    }
    // Sliding windows (causal, W tokens) at 16k and 64k, d = 128.
    for &s in &[16384usize, 65536] {
        for &w in &[256usize, 1024, 4096] {
            cases.push(Case {
                name: format!("window{w}_d128_s{s}"),
                b: 1,
                s,
                h: 16,
                d: 128,
                opts: AttentionOptions::default().with_window(Window::causal_tokens(w)?),
            });
        }
    }
    // GPU_BENCH_KERNELS=wgmma,mma,simt,wgmma-window,wgmma-persistent,wgmma-wide (default: all)
    // picks the kernels to time.
    let wanted = std::env::var("GPU_BENCH_KERNELS")
        .unwrap_or_else(|_| "wgmma,mma,simt,wgmma-window,wgmma-persistent,wgmma-wide".into());
    let kernels: Vec<(DenseKernel, &str)> = [
        (DenseKernel::Hopper, "wgmma"),
        (DenseKernel::TensorCore, "mma"),
        (DenseKernel::Simt, "simt"),
        (DenseKernel::HopperWindow, "wgmma-window"),
        (DenseKernel::HopperPersistent, "wgmma-persistent"),
        (DenseKernel::HopperWide, "wgmma-wide"),
    ]
    .into_iter()
    .filter(|(_, name)| wanted.split(',').any(|w| w.trim() == *name))
    .collect();
    for c in &cases {
        for &(kernel, name) in &kernels {
            let label = format!("longattn-{name}");
            // The SIMT kernel is a correctness baseline: time it on the smaller cases only.
            if kernel == DenseKernel::Simt && c.s > 4096 && !c.name.starts_with("window") {
                continue;
            }
            // The window kernel is built for windows: time it on those rows only.
            if kernel == DenseKernel::HopperWindow && !c.name.starts_with("window") {
                continue;
            }
            // The wide-tile kernel runs d128 without a mask only.
            if kernel == DenseKernel::HopperWide
                && (c.d != 128 || c.opts.effective_mask() != Mask::default())
            {
                continue;
            }
            match time_case(&stream, c, kernel) {
                Ok((ms, tflops)) => println!(
                    "BENCH {{\"name\":\"{}\",\"impl\":\"{label}\",\"b\":{},\"s\":{},\"h\":{},\"d\":{},\"ms\":{ms:.4},\"tflops\":{tflops:.2}}}",
                    c.name, c.b, c.s, c.h, c.d
                ),
                Err(e) => println!("# {} {label}: {e}", c.name),
            }
        }
    }
    // FP8 (e4m3) at d 64/128/256 against the bf16 Hopper kernel on the same shape, in this run.
    for &d in &[64usize, 128, 256] {
        for &s in &[1024usize, 16384] {
            for causal in [false, true] {
                let c = Case {
                    name: format!("fp8_d{d}_s{s}_{}", if causal { "causal" } else { "full" }),
                    b: 16384 / s,
                    s,
                    h: 16,
                    d,
                    opts: AttentionOptions::default().with_causal(causal),
                };
                let bf16_tflops = time_case(&stream, &c, DenseKernel::Hopper).map(|r| r.1);
                match (time_fp8(&stream, &c), bf16_tflops) {
                    (Ok((ms, tflops)), Ok(bf)) => println!(
                        "BENCH {{\"name\":\"{}\",\"impl\":\"longattn-wgmma-fp8\",\"b\":{},\"s\":{},\"h\":{},\"d\":{},\"ms\":{ms:.4},\"tflops\":{tflops:.2},\"bf16_tflops\":{bf:.2},\"ratio_bf16\":{:.3}}}",
                        c.name,
                        c.b,
                        c.s,
                        c.h,
                        c.d,
                        tflops / bf
                    ),
                    (Err(e), _) | (_, Err(e)) => println!("# {} longattn-wgmma-fp8: {e}", c.name),
                }
            }
        }
    }
    // A packed varlen batch of 64 sequences of 100-2000 tokens (issue 16's varlen target).
    let total: usize = varlen_lengths().iter().sum();
    for (kernel, label) in [
        (DenseKernel::Hopper, "longattn-wgmma"),
        (DenseKernel::HopperPersistent, "longattn-wgmma-persistent"),
        (DenseKernel::TensorCore, "longattn-mma"),
    ] {
        match time_varlen(&stream, kernel) {
            Ok((ms, tflops)) => println!(
                "BENCH {{\"name\":\"varlen64_d128_causal\",\"impl\":\"{label}\",\"b\":64,\"s\":{total},\"h\":16,\"d\":128,\"ms\":{ms:.4},\"tflops\":{tflops:.2}}}"
            ),
            Err(e) => println!("# varlen64_d128_causal {label}: {e}"),
        }
    }
    for sk in [4096usize, 32768] {
        for sq in [1usize, 4, 16, 64] {
            let name = format!("shortq_q{sq}_k{sk}_d128");
            for (kernel, label) in [
                (DenseKernel::TensorCoreGqa, "longattn-mma-gqa"),
                (DenseKernel::HopperGqa, "longattn-wgmma-gqa"),
                (DenseKernel::Hopper, "longattn-wgmma"),
                (DenseKernel::TensorCore, "longattn-mma"),
            ] {
                match time_short_query(&stream, (sq, sk), kernel) {
                    Ok((ms, tflops)) => println!(
                        "BENCH {{\"name\":\"{name}\",\"impl\":\"{label}\",\"b\":16,\"s\":{sk},\"h\":32,\"d\":128,\"ms\":{ms:.4},\"tflops\":{tflops:.2}}}"
                    ),
                    Err(e) => println!("# {name} {label}: {e}"),
                }
            }
        }
    }
    Ok(())
}
