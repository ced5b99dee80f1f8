//! GPU block-sparse attention (`BlockSparseAttention::forward_gpu`, the tensor-core kernel in
//! `kernels/block_sparse_mma.cu`) against the f64 reference: every pattern constructor, random
//! lists with random full/partial kinds (empty lists included) under no mask, causal,
//! window + sinks and window + softcap, shapes of 1 row, odd lengths, seqlen_q != seqlen_k in
//! both directions, lengths that are not multiples of the 64-row/64-key tiles, block sizes
//! 64/128/192/256, head dims 64/128/256, GQA, broadcast and per-head lists, varlen, f16 and
//! bf16, and the plan path. Outputs and LSE are NaN-poisoned before each run. Without a GPU
//! every GPU test prints a `SKIP (no GPU)` line (with `LONGATTN_REQUIRE_GPU=1` a missing GPU
//! fails instead); the sweep's problems are still built and checked on the CPU here.

mod common;

use common::*;
use longattn::block_sparse::patterns::{self, PatternShape};
use longattn::block_sparse::{GPU_BLOCK_MULTIPLE, ListId};
use longattn::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use longattn::reference::block_sparse_attention_f64;
use longattn::*;
use rand::Rng;
use std::sync::Arc;

/// A problem: per-sequence `(seqlen_q, seqlen_k)` (fixed when `!varlen`: all equal), heads,
/// head dim, options, and its block mask (built from the bound dims).
struct Case {
    name: String,
    lens: Vec<(usize, usize)>,
    varlen: bool,
    hq: usize,
    hkv: usize,
    d: usize,
    opts: AttentionOptions,
    mask: BlockMask,
}

/// Host inputs of a case, contiguous (`[b, s, h, d]`, or packed rows with varlen).
struct Inputs<T> {
    bs: BlockSparseAttention,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    qs: Strides,
    ks: Strides,
}

impl Case {
    fn attn(&self) -> FlashAttention {
        let cu_q = cu_seqlens(&self.lens.iter().map(|l| l.0).collect::<Vec<_>>());
        let cu_k = cu_seqlens(&self.lens.iter().map(|l| l.1).collect::<Vec<_>>());
        let seqlens = if self.varlen {
            SeqLens::Varlen {
                cu_seqlens_q: &cu_q,
                cu_seqlens_k: &cu_k,
            }
        } else {
            SeqLens::Fixed {
                seqlen_q: self.lens[0].0,
                seqlen_k: self.lens[0].1,
            }
        };
        let shape = AttentionShape {
            batch: self.lens.len(),
            heads_q: self.hq,
            heads_kv: self.hkv,
            head_dim: self.d,
            seqlens,
        };
        FlashAttention::new(&shape, &self.opts).unwrap()
    }

    fn inputs<T: Element>(&self, seed: u64) -> Inputs<T> {
        let bs = BlockSparseAttention::new(self.attn(), self.mask.clone()).unwrap();
        let (rq, rk): (usize, usize) = if self.varlen {
            (
                self.lens.iter().map(|l| l.0).sum(),
                self.lens.iter().map(|l| l.1).sum(),
            )
        } else {
            let b = self.lens.len();
            (b * self.lens[0].0, b * self.lens[0].1)
        };
        let (sq, sk) = if self.varlen { (0, 0) } else { self.lens[0] };
        let mut r = rng(seed);
        Inputs {
            bs,
            q: random_vec(&mut r, rq * self.hq * self.d),
            k: random_vec(&mut r, rk * self.hkv * self.d),
            v: random_vec(&mut r, rk * self.hkv * self.d),
            qs: Strides::contiguous(sq, self.hq, self.d),
            ks: Strides::contiguous(sk, self.hkv, self.d),
        }
    }
}

impl<T: Element> Inputs<T> {
    fn reference(&self) -> (Vec<f64>, Vec<f64>) {
        block_sparse_attention_f64(
            &self.bs,
            Strided::new(&self.q[..], self.qs),
            Strided::new(&self.k[..], self.ks),
            Strided::new(&self.v[..], self.ks),
        )
        .unwrap()
    }
}

/// Runs `x` on the GPU (one-shot, or through a plan) into NaN-poisoned output and LSE.
fn gpu_run<T: Element + DeviceRepr>(
    stream: &Arc<CudaStream>,
    x: &Inputs<T>,
    plan: Option<&BlockSparseGpuPlan>,
) -> Result<(Vec<f64>, Vec<f32>)> {
    let attn = x.bs.attention();
    let dq = stream.clone_htod(&x.q).unwrap();
    let dk = stream.clone_htod(&x.k).unwrap();
    let dv = stream.clone_htod(&x.v).unwrap();
    let mut dout = stream
        .clone_htod(&vec![T::from_f32(f32::NAN); attn.out_len()])
        .unwrap();
    let mut dlse = stream.clone_htod(&vec![f32::NAN; attn.lse_len()]).unwrap();
    let (q, k, v) = (
        Strided::new(&dq, x.qs),
        Strided::new(&dk, x.ks),
        Strided::new(&dv, x.ks),
    );
    let out = Strided::new(&mut dout, x.qs);
    match plan {
        Some(p) => {
            p.forward::<T, CudaSlice<T>, CudaSlice<T>>(stream, q, k, v, out, Some(&mut dlse))
        }
        None => x.bs.forward_gpu(stream, q, k, v, out, Some(&mut dlse)),
    }?;
    let out = stream.clone_dtoh(&dout).unwrap();
    Ok((to_f64(&out), stream.clone_dtoh(&dlse).unwrap()))
}

/// Runs case `c` in dtype `T` on the GPU and checks it against the reference; returns the
/// relative error.
fn run_case<T: Element + DeviceRepr>(stream: &Arc<CudaStream>, seed: u64, c: &Case) -> f64 {
    let x = c.inputs::<T>(seed);
    let (want, want_lse) = x.reference();
    let (got, lse) = gpu_run(stream, &x, None).unwrap();
    let what = format!("{} d{} {}", c.name, c.d, T::DTYPE);
    let nan = got.iter().filter(|v| v.is_nan()).count();
    assert_eq!(nan, 0, "{what}: {nan} outputs unwritten or NaN");
    let err = rel_l2(&got, &want);
    assert!(err < tolerance::<T>(), "{what}: rel err {err}");
    // Rows without a visible key are exactly 0.
    let d = c.d;
    for (r, &l) in want_lse.iter().enumerate() {
        if l == f64::NEG_INFINITY {
            let (h, row) = lse_row(&x.bs, r);
            let o = (row * c.hq + h) * d;
            assert!(
                got[o..o + d].iter().all(|&v| v == 0.0),
                "{what}: empty row {row} head {h} not 0"
            );
        }
    }
    let lse_tol = 2e-3
        * (1.0
            + want_lse
                .iter()
                .filter(|v| v.is_finite())
                .fold(0.0f64, |a, &b| a.max(b.abs())));
    check_lse(&lse, &want_lse, lse_tol, &what);
    err
}

/// (head, packed query row) of LSE index `r`.
fn lse_row(bs: &BlockSparseAttention, r: usize) -> (usize, usize) {
    let a = bs.attention();
    if a.is_varlen() {
        (r / a.total_q(), r % a.total_q())
    } else {
        let sq = a.max_seqlen_q();
        let (bh, i) = (r / sq, r % sq);
        (bh % a.heads_q(), (bh / a.heads_q()) * sq + i)
    }
}

/// Random lists: each list keeps each key block with a per-list probability (0 included:
/// empty lists), random kinds.
fn random_mask(seed: u64, dims: BlockMaskDims, key_blocks: impl Fn(ListId) -> usize) -> BlockMask {
    let mut r = rng(seed);
    BlockMask::from_lists(dims, |id| {
        let p = [0.0, 0.2, 0.5, 1.0][r.random_range(0..4)];
        (0..key_blocks(id))
            .filter_map(|kb| {
                if !r.random_bool(p) {
                    return None;
                }
                let kind = if r.random_bool(0.5) {
                    BlockKind::Full
                } else {
                    BlockKind::Partial
                };
                Some((kb, kind))
            })
            .collect()
    })
    .unwrap()
}
fn option_sets() -> Vec<(&'static str, AttentionOptions)> {
    vec![
        ("none", AttentionOptions::default()),
        ("causal", AttentionOptions::causal()),
        (
            "window+sinks",
            AttentionOptions::default()
                .with_window(Window::new(Some(70), Some(0)))
                .with_sinks(5),
        ),
        (
            "window+softcap",
            AttentionOptions::default()
                .with_window(Window::new(Some(100), Some(30)))
                .with_softcap(5.0),
        ),
    ]
}

/// Every pattern constructor, with and without causal, head dims 64 and 128.
fn pattern_cases() -> Vec<Case> {
    // seqlen_k - seqlen_q = 2 blocks of 64; neither length a multiple of 64.
    let (sq, sk, bl, hq): (usize, usize, usize, usize) = (200, 328, 64, 4);
    let nk = sk.div_ceil(bl);
    let mut cases = Vec::new();
    for (o, opts) in [AttentionOptions::default(), AttentionOptions::causal()]
        .into_iter()
        .enumerate()
    {
        let shape = PatternShape {
            heads: hq,
            seqlen_q: sq,
            seqlen_k: sk,
            block: bl,
            mask: opts.effective_mask(),
        };
        let masks = vec![
            ("longformer", patterns::longformer(&shape, 1, 1).unwrap()),
            ("bigbird", patterns::bigbird(&shape, 1, 1, 2, 42).unwrap()),
            (
                "strided",
                patterns::sparse_transformer_strided(&shape, 2).unwrap(),
            ),
            (
                "fixed",
                patterns::sparse_transformer_fixed(&shape, 3, 1).unwrap(),
            ),
            (
                "block-attention",
                patterns::block_attention(&shape, &[2, 1, nk - 3]).unwrap(),
            ),
            (
                "mswa",
                patterns::per_head_windows(&shape, &[1, 2, 3, 6]).unwrap(),
            ),
            (
                "duo",
                patterns::streaming_heads(&shape, &[true, false, true, false], 1, 1).unwrap(),
            ),
        ];
        for (i, (name, mask)) in masks.into_iter().enumerate() {
            cases.push(Case {
                name: format!("{name} opts {o}"),
                lens: vec![(sq, sk); 2],
                varlen: false,
                hq,
                hkv: 2,
                d: if i % 2 == 0 { 64 } else { 128 },
                opts,
                mask,
            });
        }
    }
    cases
}

/// Random lists over shapes of 1 row, odd lengths, seqlen_q above and below seqlen_k, every
/// head dim and several block sizes, under each option set.
fn random_cases() -> Vec<Case> {
    // (b, sq, sk, hq, hkv, d, block_m, block_n)
    let shapes = [
        (1, 1, 1, 1, 1, 64, 64, 64),
        (2, 37, 129, 2, 1, 128, 64, 128),
        (1, 200, 77, 4, 2, 64, 128, 64),
        (1, 130, 300, 2, 2, 256, 64, 192),
        (2, 64, 64, 3, 1, 128, 64, 64),
        (1, 257, 255, 2, 1, 64, 256, 128),
    ];
    let mut cases = Vec::new();
    for (n, &(b, sq, sk, hq, hkv, d, bm, bn)) in shapes.iter().enumerate() {
        for (o, (oname, opts)) in option_sets().into_iter().enumerate() {
            // Per-head lists for even shapes, one broadcast list set for odd ones.
            let (mb, mh) = if n % 2 == 0 { (b, hq) } else { (1, 1) };
            let dims = BlockMaskDims::for_lengths(mb, mh, sq, sk, bm, bn).unwrap();
            let nk = dims.num_k_blocks;
            cases.push(Case {
                name: format!("random shape {n} {oname}"),
                lens: vec![(sq, sk); b],
                varlen: false,
                hq,
                hkv,
                d,
                opts,
                mask: random_mask((n * 10 + o) as u64, dims, |_| nk),
            });
        }
    }
    cases
}

/// Varlen batch (a sequence of 0 queries included): each sequence's lists cover its own
/// blocks; every list empty; the upper-right blocks listed Full under causal options.
fn special_cases() -> Vec<Case> {
    let lens: Vec<(usize, usize)> = vec![(100, 130), (7, 300), (0, 5), (64, 64)];
    let (bm, bn) = (64, 64);
    let dims = BlockMaskDims::for_lengths(4, 2, 100, 300, bm, bn).unwrap();
    let varlen_mask = {
        let lens = lens.clone();
        let mut r = rng(77);
        BlockMask::from_lists(dims, |id| {
            let (sq, sk) = lens[id.batch];
            if id.q_block >= sq.div_ceil(bm) {
                return vec![];
            }
            (0..sk.div_ceil(bn))
                .filter_map(|kb| {
                    if !r.random_bool(0.6) {
                        return None;
                    }
                    let kind = if r.random_bool(0.3) {
                        BlockKind::Full
                    } else {
                        BlockKind::Partial
                    };
                    Some((kb, kind))
                })
                .collect()
        })
        .unwrap()
    };
    let mut cases = vec![];
    for (oname, opts) in option_sets() {
        cases.push(Case {
            name: format!("varlen {oname}"),
            lens: lens.clone(),
            varlen: true,
            hq: 2,
            hkv: 1,
            d: 128,
            opts,
            mask: varlen_mask.clone(),
        });
    }
    let empty_dims = BlockMaskDims::for_lengths(1, 1, 150, 90, 64, 64).unwrap();
    cases.push(Case {
        name: "all lists empty".into(),
        lens: vec![(150, 90); 2],
        varlen: false,
        hq: 2,
        hkv: 2,
        d: 64,
        opts: AttentionOptions::causal(),
        mask: BlockMask::from_lists(empty_dims, |_| vec![]).unwrap(),
    });
    // Causal options with the blocks above the diagonal listed Full: their keys are visible.
    let full_dims = BlockMaskDims::for_lengths(1, 1, 192, 192, 64, 64).unwrap();
    cases.push(Case {
        name: "full skips the element mask".into(),
        lens: vec![(192, 192)],
        varlen: false,
        hq: 1,
        hkv: 1,
        d: 64,
        opts: AttentionOptions::causal(),
        mask: BlockMask::from_lists(full_dims, |id| {
            (0..3)
                .map(|kb| {
                    let kind = if kb > id.q_block {
                        BlockKind::Full
                    } else {
                        BlockKind::Partial
                    };
                    (kb, kind)
                })
                .collect()
        })
        .unwrap(),
    });
    // Every block Partial: dense attention under the options' mask, several key tiles per
    // row (interior-tile shortcut and boundary tiles).
    for (oname, opts) in option_sets() {
        let dims = BlockMaskDims::for_lengths(1, 1, 300, 333, 128, 128).unwrap();
        cases.push(Case {
            name: format!("dense partial {oname}"),
            lens: vec![(300, 333)],
            varlen: false,
            hq: 2,
            hkv: 1,
            d: 64,
            opts,
            mask: BlockMask::dense(dims, BlockKind::Partial).unwrap(),
        });
    }
    cases
}

fn all_cases() -> Vec<Case> {
    let mut cases = pattern_cases();
    cases.extend(random_cases());
    cases.extend(special_cases());
    cases
}

/// Runs without a GPU: every case of the sweep is a valid problem and the CPU path agrees
/// with the f64 reference on it (so a GPU failure points at the GPU path).
#[test]
fn sweep_cases_are_valid_problems() {
    for (i, c) in all_cases().iter().enumerate() {
        let x = c.inputs::<f32>(3000 + i as u64);
        let (want, want_lse) = x.reference();
        let attn = x.bs.attention();
        let mut out = vec![f32::NAN; attn.out_len()];
        let mut lse = vec![f32::NAN; attn.lse_len()];
        x.bs.forward_cpu(
            Strided::new(&x.q[..], x.qs),
            Strided::new(&x.k[..], x.ks),
            Strided::new(&x.v[..], x.ks),
            Strided::new(&mut out[..], x.qs),
            Some(&mut lse),
        )
        .unwrap();
        let err = rel_l2(&to_f64(&out), &want);
        assert!(err < 2e-5, "{}: CPU rel err {err}", c.name);
        check_lse(&lse, &want_lse, 1e-4, &c.name);
        assert_eq!(
            x.bs.block_mask().dims().block_m % GPU_BLOCK_MULTIPLE,
            0,
            "{}",
            c.name
        );
        x.bs.block_mask().dims().check_gpu_block_sizes().unwrap();
    }
}
#[test]
fn gpu_block_sparse_matches_reference_bf16() {
    let Some(ctx) = gpu_or_skip("gpu_block_sparse_matches_reference_bf16") else {
        return;
    };
    let stream = ctx.default_stream();
    let mut worst: f64 = 0.0;
    for (i, c) in all_cases().iter().enumerate() {
        worst = worst.max(run_case::<bf16>(&stream, 100 + i as u64, c));
    }
    eprintln!("block-sparse gpu bf16: worst rel err {worst:.2e}");
}

#[test]
fn gpu_block_sparse_matches_reference_f16() {
    let Some(ctx) = gpu_or_skip("gpu_block_sparse_matches_reference_f16") else {
        return;
    };
    let stream = ctx.default_stream();
    let mut worst: f64 = 0.0;
    for (i, c) in all_cases().iter().enumerate() {
        worst = worst.max(run_case::<f16>(&stream, 600 + i as u64, c));
    }
    eprintln!("block-sparse gpu f16: worst rel err {worst:.2e}");
}

/// A plan replays the one-shot call bit for bit (same kernel, same inputs), twice.
#[test]
fn gpu_block_sparse_plan_matches_one_shot() {
    let Some(ctx) = gpu_or_skip("gpu_block_sparse_plan_matches_one_shot") else {
        return;
    };
    let stream = ctx.default_stream();
    for c in special_cases().iter().take(2) {
        let x = c.inputs::<bf16>(42);
        let plan = x.bs.plan_gpu(&stream).unwrap();
        let once = gpu_run(&stream, &x, None).unwrap();
        for _ in 0..2 {
            let planned = gpu_run(&stream, &x, Some(&plan)).unwrap();
            assert_eq!(
                once.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                planned.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{}",
                c.name
            );
            assert_eq!(
                once.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                planned.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{}",
                c.name
            );
        }
    }
}

/// Refusals that need device buffers to call (the host-only ones are unit tests in
/// `src/block_sparse/gpu.rs`): f32, a misaligned pointer, MoBA rows, block sizes.
#[test]
fn gpu_block_sparse_refuses_what_it_cannot_run() {
    let Some(ctx) = gpu_or_skip("gpu_block_sparse_refuses_what_it_cannot_run") else {
        return;
    };
    let stream = ctx.default_stream();
    let c = &random_cases()[16]; // shape 4, no mask: b 2, 64 x 64, hq 3, hkv 1, d 128
    let x = c.inputs::<bf16>(1);
    let a = x.bs.attention();
    let f: CudaSlice<f32> = stream.alloc_zeros(a.out_len()).unwrap();
    let mut fo: CudaSlice<f32> = stream.alloc_zeros(a.out_len()).unwrap();
    let r = x.bs.forward_gpu(
        &stream,
        Strided::new(&f, x.qs),
        Strided::new(&f, x.ks),
        Strided::new(&f, x.ks),
        Strided::new(&mut fo, x.qs),
        None,
    );
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    let buf: CudaSlice<bf16> = stream.alloc_zeros(a.out_len() + 8).unwrap();
    let mut out: CudaSlice<bf16> = stream.alloc_zeros(a.out_len()).unwrap();
    let r = x.bs.forward_gpu(
        &stream,
        Strided::new(&buf.slice(1..), x.qs),
        Strided::new(&buf.slice(..), x.ks),
        Strided::new(&buf.slice(..), x.ks),
        Strided::new(&mut out, x.qs),
        None,
    );
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    let rows = RowBlocks::new(64, 1, vec![0; a.lse_len()]).unwrap();
    let moba = x.bs.clone().with_row_blocks(rows).unwrap();
    let r = moba.forward_gpu(
        &stream,
        Strided::new(&buf, x.qs),
        Strided::new(&buf, x.ks),
        Strided::new(&buf, x.ks),
        Strided::new(&mut out, x.qs),
        None,
    );
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    let dims = BlockMaskDims::for_lengths(1, 1, 64, 64, 32, 32).unwrap();
    let small =
        BlockSparseAttention::new(a.clone(), BlockMask::dense(dims, BlockKind::Full).unwrap())
            .unwrap();
    let r = small.forward_gpu(
        &stream,
        Strided::new(&buf, x.qs),
        Strided::new(&buf, x.ks),
        Strided::new(&buf, x.ks),
        Strided::new(&mut out, x.qs),
        None,
    );
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
}
