//! Criterion benches of the CPU paths of neighborhood and block-sparse attention.
//! Throughput is reported as "elements/s" where one element is one FLOP (`4 * head_dim` per
//! visible query-key pair and head), i.e. FLOP/s over the pairs the problem makes visible.

use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use longattn::neighborhood::schedule::visible_flops;
use longattn::*;

#[path = "../examples/support/mod.rs"]
mod support;

/// Benches one CPU forward pass, `forward(q, k, v, out)`, on bf16 tensors of strides `st`
/// (contiguous `[1, tokens, heads, head_dim]`), at `flops` FLOPs per call.
fn bench_forward(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: BenchmarkId,
    flops: u64,
    st: Strides,
    forward: impl Fn(
        Strided<&[bf16]>,
        Strided<&[bf16]>,
        Strided<&[bf16]>,
        Strided<&mut [bf16]>,
    ) -> Result<()>,
) {
    // One sequence: its elements are the batch stride.
    let n = st.batch as usize;
    let [q, k, v] = [1, 2, 3].map(|seed| support::uniform::<bf16>(n, seed));
    let mut out = vec![bf16::ZERO; n];
    group.throughput(Throughput::Elements(flops));
    group.bench_function(id, |bench| {
        bench.iter(|| {
            forward(
                Strided::new(&q[..], st),
                Strided::new(&k[..], st),
                Strided::new(&v[..], st),
                Strided::new(&mut out[..], st),
            )
            .unwrap()
        })
    });
}

/// Neighborhood problems: 1-D with a large kernel, 2-D with small and medium kernels, 3-D.
fn bench_neighborhood(c: &mut Criterion) {
    let mut group = c.benchmark_group("neighborhood_cpu_bf16");
    group.sample_size(10);
    let (h, d) = (2, 64);
    let cases: Vec<(&str, Vec<NeighborhoodDim>)> = vec![
        ("1d_4096_k255", vec![NeighborhoodDim::new(4096, 255)]),
        (
            "2d_64x64_k7",
            vec![NeighborhoodDim::new(64, 7), NeighborhoodDim::new(64, 7)],
        ),
        (
            "2d_64x64_k13",
            vec![NeighborhoodDim::new(64, 13), NeighborhoodDim::new(64, 13)],
        ),
        (
            "3d_8x16x16_k3x7x7",
            vec![
                NeighborhoodDim::new(8, 3),
                NeighborhoodDim::new(16, 7),
                NeighborhoodDim::new(16, 7),
            ],
        ),
    ];
    for (name, dims) in cases {
        let shape = NeighborhoodShape {
            batch: 1,
            heads_q: h,
            heads_kv: h,
            head_dim: d,
            dims: &dims,
        };
        let attn = NeighborhoodAttention::new(&shape, &AttentionOptions::default()).unwrap();
        let id = BenchmarkId::new(name, format!("h{h}_d{d}"));
        let flops = visible_flops(&attn) as u64;
        let st = Strides::contiguous(attn.tokens(), h, d);
        bench_forward(&mut group, id, flops, st, |q, k, v, o| {
            attn.forward_cpu(q, k, v, o, None)
        });
    }
    group.finish();
}

/// Block-sparse attention over 4096 causal tokens in 128-token blocks: every query block
/// takes its diagonal block (`Partial`, causal inside) and a fixed pseudo-random subset of
/// the earlier key blocks (`Full`), at about `percent` % of all blocks.
fn bench_block_sparse(c: &mut Criterion) {
    let mut group = c.benchmark_group("block_sparse_cpu_bf16");
    group.sample_size(10);
    let (s, h, d, blk) = (4096, 2, 64, 128);
    let st = Strides::contiguous(s, h, d);
    let shape = AttentionShape {
        batch: 1,
        heads_q: h,
        heads_kv: h,
        head_dim: d,
        seqlens: SeqLens::Fixed {
            seqlen_q: s,
            seqlen_k: s,
        },
    };
    let opts = AttentionOptions::causal();
    for percent in [10usize, 25] {
        let dims = BlockMaskDims::for_lengths(1, 1, s, s, blk, blk).unwrap();
        // Off-diagonal blocks are half of all blocks under causal: keep 2 * percent % of them.
        let keep = |qb: usize, kb: usize| (qb * 131 + kb * 71) % 100 < 2 * percent;
        let mask = BlockMask::from_lists(dims, |id| {
            let qb = id.q_block;
            (0..=qb)
                .filter(|&kb| kb == qb || keep(qb, kb))
                .map(|kb| {
                    let kind = if kb == qb {
                        BlockKind::Partial
                    } else {
                        BlockKind::Full
                    };
                    (kb, kind)
                })
                .collect()
        })
        .unwrap();
        // Visible pairs: a full block's rows x keys, the diagonal block's causal triangle.
        let pairs: usize = (0..dims.num_q_blocks)
            .map(|qb| {
                let list = mask.list(0, 0, qb).unwrap();
                list.iter()
                    .map(|(kb, kind)| match kind {
                        BlockKind::Full => blk * blk,
                        BlockKind::Partial => (qb == kb).then_some(blk * (blk + 1) / 2).unwrap(),
                    })
                    .sum::<usize>()
            })
            .sum();
        let attn =
            BlockSparseAttention::new(FlashAttention::new(&shape, &opts).unwrap(), mask.clone())
                .unwrap();
        let density = (100.0 * mask.density()).round();
        let id = BenchmarkId::new(format!("causal_{density}pct"), format!("s{s}_h{h}_d{d}"));
        let flops = (4 * h * d * pairs) as u64;
        bench_forward(&mut group, id, flops, st, |q, k, v, o| {
            attn.forward_cpu(q, k, v, o, None)
        });
    }
    group.finish();
}

criterion_group!(benches, bench_neighborhood, bench_block_sparse);
criterion_main!(benches);
