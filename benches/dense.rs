//! Criterion benches of dense attention: the CPU path always, the GPU kernels when a GPU is
//! present. Throughput is reported as "elements/s" where one element is one FLOP
//! (`4 * head_dim` per visible query-key pair and head), i.e. FLOP/s.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use longattn::cudarc::driver::CudaSlice;
use longattn::*;

#[path = "../examples/support/mod.rs"]
mod support;

fn fill(n: usize, seed: u64) -> Vec<bf16> {
    support::uniform(n, seed)
}

fn flops(mask: &Mask, b: usize, h: usize, d: usize, s: usize) -> u64 {
    let pairs: usize = (0..s)
        .map(|i| (0..s).filter(|&j| mask.visible(i, j, s, s)).count())
        .sum();
    4 * (b * h * d * pairs) as u64
}

fn problem(b: usize, s: usize, h: usize, d: usize, opts: AttentionOptions) -> FlashAttention {
    let shape = AttentionShape {
        batch: b,
        heads_q: h,
        heads_kv: h,
        head_dim: d,
        seqlens: SeqLens::Fixed {
            seqlen_q: s,
            seqlen_k: s,
        },
    };
    FlashAttention::new(&shape, &opts).expect("valid problem")
}

fn cases() -> Vec<(&'static str, AttentionOptions)> {
    vec![
        ("full", AttentionOptions::default()),
        ("causal", AttentionOptions::causal()),
        (
            "window128",
            AttentionOptions::default().with_window(Window::causal_tokens(128).unwrap()),
        ),
    ]
}

/// Batch, sequence length, heads and head dim of the CPU benches.
const CPU_SHAPE: (usize, usize, usize, usize) = (1, 512, 4, 64);

/// The CPU cases at [`CPU_SHAPE`] in group `name`: `run(attn, strides)` is one forward.
fn bench_cpu_group(c: &mut Criterion, name: &str, mut run: impl FnMut(&FlashAttention, Strides)) {
    let mut group = c.benchmark_group(name);
    group.sample_size(10);
    let (b, s, h, d) = CPU_SHAPE;
    let st = Strides::contiguous(s, h, d);
    for (case, opts) in cases() {
        let attn = problem(b, s, h, d, opts);
        group.throughput(Throughput::Elements(flops(
            &opts.effective_mask(),
            b,
            h,
            d,
            s,
        )));
        group.bench_function(BenchmarkId::new(case, format!("s{s}_h{h}_d{d}")), |bench| {
            bench.iter(|| run(&attn, st))
        });
    }
    group.finish();
}

fn bench_cpu(c: &mut Criterion) {
    let n = CPU_SHAPE.0 * CPU_SHAPE.1 * CPU_SHAPE.2 * CPU_SHAPE.3;
    let (q, k, v) = (fill(n, 1), fill(n, 2), fill(n, 3));
    let mut out = vec![bf16::ZERO; n];
    bench_cpu_group(c, "dense_cpu_bf16", |attn, st| {
        attn.forward_cpu(
            Strided::new(&q[..], st),
            Strided::new(&k[..], st),
            Strided::new(&v[..], st),
            Strided::new(&mut out[..], st),
            None,
        )
        .unwrap()
    });
}

/// The FP8 CPU path on the cases of [`bench_cpu`]: e4m3 codes uniform in [-1, 1), per-tensor
/// descales (one value per kv head), bf16 out.
fn bench_cpu_fp8(c: &mut Criterion) {
    let n = CPU_SHAPE.0 * CPU_SHAPE.1 * CPU_SHAPE.2 * CPU_SHAPE.3;
    let codes = |seed| support::uniform::<F8E4M3>(n, seed);
    let (q, k, v) = (codes(1), codes(2), codes(3));
    let heads = CPU_SHAPE.0 * CPU_SHAPE.2;
    let (qd, kd, vd) = (
        vec![0.5f32; heads],
        vec![0.25f32; heads],
        vec![2.0f32; heads],
    );
    let mut out = vec![bf16::ZERO; n];
    bench_cpu_group(c, "dense_cpu_fp8", |attn, st| {
        let descales = Fp8Descales {
            q: &qd[..],
            k: &kd[..],
            v: &vd[..],
        };
        attn.forward_cpu_fp8(
            Strided::new(&q[..], st),
            Strided::new(&k[..], st),
            Strided::new(&v[..], st),
            descales,
            Strided::new(&mut out[..], st),
            None,
        )
        .unwrap()
    });
}

fn bench_gpu(c: &mut Criterion) {
    let ctx = match longattn::device::open_gpu(0) {
        Ok(ctx) => ctx,
        Err(e) => {
            println!("SKIP (no GPU) dense GPU benches: {e}");
            return;
        }
    };
    let stream = ctx.default_stream();
    let mut group = c.benchmark_group("dense_gpu_bf16");
    group.sample_size(10);
    let (b, s, h, d) = (4, 4096, 16, 128);
    let st = Strides::contiguous(s, h, d);
    let n = b * s * h * d;
    let q: CudaSlice<bf16> = stream.clone_htod(&fill(n, 1)).unwrap();
    let k: CudaSlice<bf16> = stream.clone_htod(&fill(n, 2)).unwrap();
    let v: CudaSlice<bf16> = stream.clone_htod(&fill(n, 3)).unwrap();
    let mut o: CudaSlice<bf16> = stream.alloc_zeros(n).unwrap();
    for (name, opts) in cases() {
        // Auto is the Hopper kernel on compute capability 9.0, the tensor-core kernel elsewhere.
        for kernel in [
            DenseKernel::Auto,
            DenseKernel::TensorCore,
            DenseKernel::Simt,
        ] {
            let attn = problem(b, s, h, d, opts).with_kernel(kernel);
            group.throughput(Throughput::Elements(flops(
                &opts.effective_mask(),
                b,
                h,
                d,
                s,
            )));
            let id = BenchmarkId::new(format!("{name}_{kernel:?}"), format!("b{b}_s{s}_h{h}_d{d}"));
            group.bench_function(id, |bench| {
                bench.iter(|| {
                    attn.forward_gpu(
                        &stream,
                        Strided::new(&q, st),
                        Strided::new(&k, st),
                        Strided::new(&v, st),
                        Strided::new(&mut o, st),
                        None,
                    )
                    .unwrap();
                    stream.synchronize().unwrap();
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_cpu, bench_cpu_fp8, bench_gpu);
criterion_main!(benches);
