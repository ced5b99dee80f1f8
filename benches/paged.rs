//! Criterion benches of paged decode: the CPU path always, the GPU kernels when a GPU is
//! present. Throughput is KV bytes read (`Throughput::Bytes`, each selected page's K and V
//! once per (sequence, kv head, row block)), i.e. achieved memory bandwidth. The GPU timing
//! includes the per-call table uploads and, for Quest, the selection kernel.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use longattn::cudarc::driver::CudaSlice;
use longattn::*;

#[path = "../examples/support/mod.rs"]
mod support;
use support::uniform as fill;

/// A full cache: `batch` sequences of `seqlen` tokens, pages assigned in reverse order so
/// that a sequence's pages are not contiguous in memory.
fn cache(batch: usize, seqlen: usize, page_size: usize, heads_kv: usize, d: usize) -> PagedCache {
    let pages = seqlen.div_ceil(page_size);
    let num_pages = batch * pages;
    let table: Vec<i32> = (0..num_pages as i32).rev().collect();
    let seqlens = vec![seqlen as i32; batch];
    PagedCache::new(
        PagedLayout {
            num_pages,
            page_size,
            heads_kv,
            head_dim: d,
        },
        PageTable {
            block_table: &table,
            max_pages_per_seq: pages,
            seqlens_k: &seqlens,
        },
    )
    .expect("valid cache")
}

/// (name, policy) for `heads_kv` heads: dense, Quest top-1024 tokens, streaming 1024 + 4
/// sinks, and a DuoAttention-like half/half mix.
fn policies(heads_kv: usize) -> Vec<(&'static str, SparsePolicy)> {
    let quest = QuestConfig {
        token_budget: 1024,
        sink_pages: 1,
    };
    let streaming = StreamingConfig {
        sinks: 4,
        window: 1024,
    };
    let mut mixed = SparsePolicy::uniform(heads_kv, HeadPolicy::Quest);
    for h in 0..heads_kv / 2 {
        mixed.heads[h] = HeadPolicy::Streaming;
    }
    vec![
        ("full", SparsePolicy::uniform(heads_kv, HeadPolicy::Full)),
        (
            "quest1024",
            SparsePolicy::uniform(heads_kv, HeadPolicy::Quest).with_quest(quest),
        ),
        (
            "streaming1024",
            SparsePolicy::uniform(heads_kv, HeadPolicy::Streaming).with_streaming(streaming),
        ),
        ("mixed", mixed.with_quest(quest).with_streaming(streaming)),
    ]
}

/// Valid Quest bounds for `len` metadata values: `kmin` random, `kmax = kmin + 2`.
fn bounds(len: usize) -> (Vec<bf16>, Vec<bf16>) {
    let kmin: Vec<bf16> = fill::<f32>(len, 3)
        .iter()
        .map(|x| bf16::from_f32(x - 1.0))
        .collect();
    let kmax = kmin
        .iter()
        .map(|x| bf16::from_f32(x.to_f32() + 2.0))
        .collect();
    (kmin, kmax)
}

fn bench_cpu(c: &mut Criterion) {
    let mut group = c.benchmark_group("paged_decode_cpu_bf16");
    group.sample_size(10);
    let (b, s, hkv, hq, d, ps) = (2, 4096, 2, 8, 64, 16);
    let cache = cache(b, s, ps, hkv, d);
    let layout = cache.layout();
    let k: Vec<bf16> = fill(layout.cache_len(), 1);
    let v: Vec<bf16> = fill(layout.cache_len(), 2);
    let (kmin, kmax) = bounds(layout.meta_len());
    let q: Vec<bf16> = fill(b * hq * d, 4);
    let st = Strides::contiguous(1, hq, d);
    let mut out = vec![bf16::ZERO; b * hq * d];
    for (name, policy) in policies(hkv) {
        let dec = PagedDecode::new(&cache, hq, 1, &AttentionOptions::causal())
            .unwrap()
            .with_policy(policy)
            .unwrap();
        group.throughput(Throughput::Bytes(dec.kv_bytes_read(2) as u64));
        let id = BenchmarkId::new(name, format!("b{b}_s{s}_hq{hq}_hkv{hkv}_d{d}_ps{ps}"));
        group.bench_function(id, |bench| {
            bench.iter(|| {
                dec.forward_cpu(
                    Strided::new(&q[..], st),
                    KvPages {
                        k: &k[..],
                        v: &v[..],
                    },
                    Some(PageMeta {
                        kmin: &kmin[..],
                        kmax: &kmax[..],
                    }),
                    Strided::new(&mut out[..], st),
                    None,
                )
                .unwrap()
            })
        });
    }
    group.finish();
}

fn bench_gpu(c: &mut Criterion) {
    let ctx = match longattn::device::open_gpu(0) {
        Ok(ctx) => ctx,
        Err(e) => {
            println!("SKIP (no GPU) paged GPU benches: {e}");
            return;
        }
    };
    let stream = ctx.default_stream();
    let mut group = c.benchmark_group("paged_decode_gpu_bf16");
    group.sample_size(10);
    // (batch, seqlen, page size): a serving batch, and one long sequence (split-KV).
    for (b, s, ps) in [(16, 8192, 16), (16, 8192, 64), (1, 131072, 16)] {
        let (hkv, hq, d) = (8, 32, 128);
        let cache = cache(b, s, ps, hkv, d);
        let layout = cache.layout();
        let k: CudaSlice<bf16> = stream
            .clone_htod(&fill::<bf16>(layout.cache_len(), 1))
            .unwrap();
        let v: CudaSlice<bf16> = stream
            .clone_htod(&fill::<bf16>(layout.cache_len(), 2))
            .unwrap();
        let (kmin_h, kmax_h) = bounds(layout.meta_len());
        let kmin = stream.clone_htod(&kmin_h).unwrap();
        let kmax = stream.clone_htod(&kmax_h).unwrap();
        let q: CudaSlice<bf16> = stream.clone_htod(&fill::<bf16>(b * hq * d, 4)).unwrap();
        let st = Strides::contiguous(1, hq, d);
        let mut o: CudaSlice<bf16> = stream.alloc_zeros(b * hq * d).unwrap();
        for (name, policy) in policies(hkv) {
            let dec = PagedDecode::new(&cache, hq, 1, &AttentionOptions::causal())
                .unwrap()
                .with_policy(policy)
                .unwrap();
            group.throughput(Throughput::Bytes(dec.kv_bytes_read(2) as u64));
            let id = BenchmarkId::new(name, format!("b{b}_s{s}_hq{hq}_hkv{hkv}_d{d}_ps{ps}"));
            group.bench_function(id, |bench| {
                bench.iter(|| {
                    dec.forward_gpu(
                        &stream,
                        Strided::new(&q, st),
                        KvPages { k: &k, v: &v },
                        Some(PageMeta {
                            kmin: &kmin,
                            kmax: &kmax,
                        }),
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

criterion_group!(benches, bench_cpu, bench_gpu);
criterion_main!(benches);
