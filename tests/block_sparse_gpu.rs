//! GPU block-sparse attention (`BlockSparseAttention::forward_gpu`, the tensor-core kernel in
//! `kernels/block_sparse_mma.cu`) against the f64 reference: every pattern constructor, random
//! lists with random full/partial kinds (empty lists included) under no mask, causal,
//! window + sinks and window + softcap, shapes of 1 row, odd lengths, seqlen_q != seqlen_k in
//! both directions, lengths that are not multiples of the 64-row/64-key tiles, block sizes
//! 64/128/192/256, head dims 64/128/256, GQA, broadcast and per-head lists, varlen, f16 and
//! bf16, and the plan path; MoBA's gating and both of its attentions (union, and the opt-in
//! gather, against the f64 reference, the union path and the CPU model of its transpose).
//! Outputs and LSE are NaN-poisoned before each run. Without a GPU
//! every GPU test prints a `SKIP (no GPU)` line (with `LONGATTN_REQUIRE_GPU=1` a missing GPU
//! fails instead); the sweep's problems are still built and checked on the CPU here.

mod common;

use common::*;
use longattn::block_sparse::moba::{
    GPU_GATHER_MAX_K_BLOCKS, GPU_TILE_ROWS, MobaAttention, MobaConfig, MobaGate, MobaGatherDims,
    MobaGpuDims, MobaGpuPlan, moba_attention, moba_block_mask, moba_gather_index_cpu,
    moba_pooled_keys_cpu, moba_select_blocks_cpu, moba_select_cpu, moba_tile_unions,
};
use longattn::block_sparse::patterns::{self, PatternShape};
use longattn::block_sparse::{
    GPU_BLOCK_MULTIPLE, HOPPER_BLOCK_M_MULTIPLE, ListId, hopper_block_n_multiple,
};
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

/// A case's inputs on the device, the output and LSE NaN-poisoned.
struct OnDevice<T> {
    q: CudaSlice<T>,
    k: CudaSlice<T>,
    v: CudaSlice<T>,
    out: CudaSlice<T>,
    lse: CudaSlice<f32>,
}

impl<T: Element + DeviceRepr> Inputs<T> {
    /// `q`, `k`, `v` uploaded on `stream`, the output and LSE filled with NaN.
    fn upload(&self, stream: &Arc<CudaStream>) -> OnDevice<T> {
        let attn = self.bs.attention();
        OnDevice {
            q: stream.clone_htod(&self.q).unwrap(),
            k: stream.clone_htod(&self.k).unwrap(),
            v: stream.clone_htod(&self.v).unwrap(),
            out: stream
                .clone_htod(&vec![T::from_f32(f32::NAN); attn.out_len()])
                .unwrap(),
            lse: stream.clone_htod(&vec![f32::NAN; attn.lse_len()]).unwrap(),
        }
    }
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
    /// `bs` (this problem, or another mask over it) on the CPU with these q, k, v, into a
    /// NaN-filled output and LSE; returns them (output as f64).
    fn forward_cpu(&self, bs: &BlockSparseAttention) -> (Vec<f64>, Vec<f32>) {
        let attn = bs.attention();
        let mut out = vec![T::from_f32(f32::NAN); attn.out_len()];
        let mut lse = vec![f32::NAN; attn.lse_len()];
        bs.forward_cpu(
            Strided::new(&self.q[..], self.qs),
            Strided::new(&self.k[..], self.ks),
            Strided::new(&self.v[..], self.ks),
            Strided::new(&mut out[..], self.qs),
            Some(&mut lse),
        )
        .unwrap();
        (to_f64(&out), lse)
    }

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
    let OnDevice {
        q: dq,
        k: dk,
        v: dv,
        out: mut dout,
        lse: mut dlse,
    } = x.upload(stream);
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

/// `bs.forward_gpu` reading q, k and v from `x` (strides `qs`, `ks`) and writing `out`, no
/// LSE (the refusals do not depend on the contents).
fn forward_one_buffer<T: Element + DeviceRepr>(
    stream: &Arc<CudaStream>,
    bs: &BlockSparseAttention,
    x: &CudaSlice<T>,
    out: &mut CudaSlice<T>,
    (qs, ks): (Strides, Strides),
) -> Result<()> {
    bs.forward_gpu(
        stream,
        Strided::new(x, qs),
        Strided::new(x, ks),
        Strided::new(x, ks),
        Strided::new(out, qs),
        None,
    )
}

/// Runs case `c` in dtype `T` on the GPU and checks it against the reference; returns the
/// relative error.
fn run_case<T: Element + DeviceRepr>(stream: &Arc<CudaStream>, seed: u64, c: &Case) -> f64 {
    check_case::<T>(stream, seed, c, &[BlockSparseKernel::TensorCore])[0].0
}

/// [`run_case`] on each of `kernels` (one set of inputs, one reference); returns each kernel's
/// relative error and outputs.
fn check_case<T: Element + DeviceRepr>(
    stream: &Arc<CudaStream>,
    seed: u64,
    c: &Case,
    kernels: &[BlockSparseKernel],
) -> Vec<(f64, Vec<f64>)> {
    let mut x = c.inputs::<T>(seed);
    let (want, want_lse) = x.reference();
    let lse_tol = 2e-3
        * (1.0
            + want_lse
                .iter()
                .filter(|v| v.is_finite())
                .fold(0.0f64, |a, &b| a.max(b.abs())));
    let mut results = Vec::new();
    for &kernel in kernels {
        x.bs = x.bs.clone().with_kernel(kernel);
        let (got, lse) = gpu_run(stream, &x, None).unwrap();
        let what = format!("{} d{} {} {kernel:?}", c.name, c.d, T::DTYPE);
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
        check_lse(&lse, &want_lse, lse_tol, &what);
        results.push((err, got));
    }
    results
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

/// Every pattern constructor over `shape` (4 heads), named: `bigbird_random` random blocks,
/// `fixed` the Sparse Transformer's (stride, summary) and `passages` the Block-Attention
/// passages (in blocks), chosen per block size so that every pattern is valid.
fn pattern_masks(
    shape: &PatternShape,
    bigbird_random: usize,
    fixed: (usize, usize),
    passages: &[usize],
    windows: &[usize],
) -> Vec<(&'static str, BlockMask)> {
    vec![
        ("longformer", patterns::longformer(shape, 1, 1).unwrap()),
        (
            "bigbird",
            patterns::bigbird(shape, 1, 1, bigbird_random, 42).unwrap(),
        ),
        (
            "strided",
            patterns::sparse_transformer_strided(shape, 2).unwrap(),
        ),
        (
            "fixed",
            patterns::sparse_transformer_fixed(shape, fixed.0, fixed.1).unwrap(),
        ),
        (
            "block-attention",
            patterns::block_attention(shape, passages).unwrap(),
        ),
        ("mswa", patterns::per_head_windows(shape, windows).unwrap()),
        (
            "duo",
            patterns::streaming_heads(shape, &[true, false, true, false], 1, 1).unwrap(),
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
        let masks = pattern_masks(&shape, 2, (3, 1), &[2, 1, nk - 3], &[1, 2, 3, 6]);
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

/// The block sizes and shapes of [`special_cases_with`].
struct Special {
    prefix: &'static str,
    /// Varlen batch: (seqlen_q, seqlen_k) per sequence, block sizes, list seed and the chance
    /// that a key block is listed.
    lens: Vec<(usize, usize)>,
    block: (usize, usize),
    seed: u64,
    listed: f64,
    /// Block size of the all-empty and Full-above-the-diagonal cases; the latter's length
    /// (three blocks) and head dim.
    edge_block: usize,
    full_len: usize,
    full_d: usize,
}

/// Varlen batch (a sequence of 0 queries included): each sequence's lists cover its own
/// blocks; every list empty; the upper-right blocks listed Full under causal options; every
/// block Partial (dense attention under the options' mask, several key tiles per row).
fn special_cases_with(sp: Special) -> Vec<Case> {
    let (bm, bn) = sp.block;
    let max_q = sp.lens.iter().map(|l| l.0).max().unwrap();
    let max_k = sp.lens.iter().map(|l| l.1).max().unwrap();
    let dims = BlockMaskDims::for_lengths(sp.lens.len(), 2, max_q, max_k, bm, bn).unwrap();
    let varlen_mask = {
        let lens = sp.lens.clone();
        let mut r = rng(sp.seed);
        BlockMask::from_lists(dims, |id| {
            let (sq, sk) = lens[id.batch];
            if id.q_block >= sq.div_ceil(bm) {
                return vec![];
            }
            (0..sk.div_ceil(bn))
                .filter_map(|kb| {
                    if !r.random_bool(sp.listed) {
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
    let p = sp.prefix;
    let mut cases = vec![];
    for (oname, opts) in option_sets() {
        cases.push(Case {
            name: format!("{p}varlen {oname}"),
            lens: sp.lens.clone(),
            varlen: true,
            hq: 2,
            hkv: 1,
            d: 128,
            opts,
            mask: varlen_mask.clone(),
        });
    }
    let eb = sp.edge_block;
    let empty_dims = BlockMaskDims::for_lengths(1, 1, 150, 90, eb, eb).unwrap();
    cases.push(Case {
        name: format!("{p}all lists empty"),
        lens: vec![(150, 90); 2],
        varlen: false,
        hq: 2,
        hkv: 2,
        d: 64,
        opts: AttentionOptions::causal(),
        mask: BlockMask::from_lists(empty_dims, |_| vec![]).unwrap(),
    });
    // Causal options with the blocks above the diagonal listed Full: their keys are visible.
    let n = sp.full_len;
    let full_dims = BlockMaskDims::for_lengths(1, 1, n, n, eb, eb).unwrap();
    cases.push(Case {
        name: format!("{p}full skips the element mask"),
        lens: vec![(n, n)],
        varlen: false,
        hq: 1,
        hkv: 1,
        d: sp.full_d,
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
    for (oname, opts) in option_sets() {
        let dims = BlockMaskDims::for_lengths(1, 1, 300, 333, 128, 128).unwrap();
        cases.push(Case {
            name: format!("{p}dense partial {oname}"),
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

/// [`special_cases_with`] at 64 x 64 blocks (the mma.sync kernel).
fn special_cases() -> Vec<Case> {
    special_cases_with(Special {
        prefix: "",
        lens: vec![(100, 130), (7, 300), (0, 5), (64, 64)],
        block: (64, 64),
        seed: 77,
        listed: 0.6,
        edge_block: 64,
        full_len: 192,
        full_d: 64,
    })
}

fn all_cases() -> Vec<Case> {
    let mut cases = pattern_cases();
    cases.extend(random_cases());
    cases.extend(special_cases());
    cases
}

/// The CPU path on `x` (f32) against the f64 reference: output within 2e-5 relative L2,
/// LSE within 1e-4.
fn cpu_matches_reference(x: &Inputs<f32>, name: &str) {
    let (want, want_lse) = x.reference();
    let (out, lse) = x.forward_cpu(&x.bs);
    let err = rel_l2(&out, &want);
    assert!(err < 2e-5, "{name}: CPU rel err {err}");
    check_lse(&lse, &want_lse, 1e-4, name);
}

/// Runs without a GPU: every case of the sweep is a valid problem and the CPU path agrees
/// with the f64 reference on it (so a GPU failure points at the GPU path).
#[test]
fn sweep_cases_are_valid_problems() {
    for (i, c) in all_cases().iter().enumerate() {
        let x = c.inputs::<f32>(3000 + i as u64);
        cpu_matches_reference(&x, &c.name);
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
    let Some(stream) = gpu_stream_or_skip("gpu_block_sparse_matches_reference_bf16") else {
        return;
    };
    let mut worst: f64 = 0.0;
    for (i, c) in all_cases().iter().enumerate() {
        worst = worst.max(run_case::<bf16>(&stream, 100 + i as u64, c));
    }
    eprintln!("block-sparse gpu bf16: worst rel err {worst:.2e}");
}

#[test]
fn gpu_block_sparse_matches_reference_f16() {
    let Some(stream) = gpu_stream_or_skip("gpu_block_sparse_matches_reference_f16") else {
        return;
    };
    let mut worst: f64 = 0.0;
    for (i, c) in all_cases().iter().enumerate() {
        worst = worst.max(run_case::<f16>(&stream, 600 + i as u64, c));
    }
    eprintln!("block-sparse gpu f16: worst rel err {worst:.2e}");
}

/// A plan replays the one-shot call bit for bit (same kernel, same inputs), twice.
/// `x` run twice through a plan equals its one-shot run bit for bit (output and LSE).
fn plan_replays_one_shot(stream: &Arc<CudaStream>, x: &Inputs<bf16>, name: &str) {
    let plan = x.bs.plan_gpu(stream).unwrap();
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let bits32 = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let once = gpu_run(stream, x, None).unwrap();
    for _ in 0..2 {
        let planned = gpu_run(stream, x, Some(&plan)).unwrap();
        assert_eq!(bits(&once.0), bits(&planned.0), "{name}");
        assert_eq!(bits32(&once.1), bits32(&planned.1), "{name}");
    }
}

#[test]
fn gpu_block_sparse_plan_matches_one_shot() {
    let Some(stream) = gpu_stream_or_skip("gpu_block_sparse_plan_matches_one_shot") else {
        return;
    };
    for c in special_cases().iter().take(2) {
        let x = c.inputs::<bf16>(42);
        plan_replays_one_shot(&stream, &x, &c.name);
    }
}

/// Refusals that need device buffers to call (the host-only ones are unit tests in
/// `src/block_sparse/gpu.rs`): f32, a misaligned pointer, MoBA rows, block sizes.
#[test]
fn gpu_block_sparse_refuses_what_it_cannot_run() {
    let Some(stream) = gpu_stream_or_skip("gpu_block_sparse_refuses_what_it_cannot_run") else {
        return;
    };
    let c = &random_cases()[16]; // shape 4, no mask: b 2, 64 x 64, hq 3, hkv 1, d 128
    let x = c.inputs::<bf16>(1);
    let a = x.bs.attention();
    let f: CudaSlice<f32> = stream.alloc_zeros(a.out_len()).unwrap();
    let mut fo: CudaSlice<f32> = stream.alloc_zeros(a.out_len()).unwrap();
    let r = forward_one_buffer(&stream, &x.bs, &f, &mut fo, (x.qs, x.ks));
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
    let r = forward_one_buffer(&stream, &moba, &buf, &mut out, (x.qs, x.ks));
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    let dims = BlockMaskDims::for_lengths(1, 1, 64, 64, 32, 32).unwrap();
    let small =
        BlockSparseAttention::new(a.clone(), BlockMask::dense(dims, BlockKind::Full).unwrap())
            .unwrap();
    let r = forward_one_buffer(&stream, &small, &buf, &mut out, (x.qs, x.ks));
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
}

// ---- The Hopper kernel (BlockSparseKernel::Hopper, block_sparse_wgmma.cu) -----------------

/// The GPU, if it is a Hopper; else prints why the test is skipped (a missing GPU fails with
/// `LONGATTN_REQUIRE_GPU=1`, a GPU of another compute capability does not).
fn hopper_or_skip(test: &str) -> Option<Arc<longattn::cudarc::driver::CudaContext>> {
    let ctx = gpu_or_skip(test)?;
    if !is_hopper() {
        println!("SKIP {test}: the Hopper kernel needs compute capability 9.0");
        return None;
    }
    Some(ctx)
}

/// Problems the Hopper kernel takes (block_m a multiple of 128, block_n of its key tile):
/// every pattern constructor at 128 x 128 blocks, with and without causal, over head dims
/// 64/128/256; random lists (empty ones included, random kinds) over shapes of 1 row, odd
/// lengths, seqlen_q above and below seqlen_k, block sizes up to 384 and several key tiles per
/// block, GQA, per-head and broadcast lists, under no mask, causal, window + sinks and window +
/// softcap; a varlen batch (a sequence of 0 queries, a 0-key sequence's empty lists); every
/// list empty; Full blocks above a causal diagonal; every block Partial.
fn hopper_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    // Patterns: 128-token blocks, seqlen_k - seqlen_q = 1 block (the constructors' rule),
    // neither length a multiple of 128.
    let (sq, sk, bl, hq) = (200usize, 328usize, 128usize, 4usize);
    let nk = sk.div_ceil(bl);
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
        let masks = pattern_masks(&shape, 1, (2, 1), &[1, 1, nk - 2], &[1, 2, 3, 4]);
        for (i, (name, mask)) in masks.into_iter().enumerate() {
            cases.push(Case {
                name: format!("hopper {name} opts {o}"),
                lens: vec![(sq, sk)],
                varlen: false,
                hq,
                hkv: 2,
                d: [64, 128, 256][(i + o) % 3],
                opts,
                mask,
            });
        }
    }
    // Random lists. (b, sq, sk, hq, hkv, d, block_m, block_n)
    let shapes = [
        (1, 1, 1, 1, 1, 64, 128, 128),
        (2, 37, 300, 2, 1, 128, 128, 256),
        (1, 300, 77, 4, 2, 64, 256, 128),
        (1, 130, 300, 2, 2, 256, 128, 192),
        (2, 128, 128, 3, 1, 128, 128, 128),
        (1, 257, 255, 2, 1, 256, 384, 64),
    ];
    for (n, &(b, sq, sk, hq, hkv, d, bm, bn)) in shapes.iter().enumerate() {
        for (o, (oname, opts)) in option_sets().into_iter().enumerate() {
            let (mb, mh) = if n % 2 == 0 { (b, hq) } else { (1, 1) };
            let dims = BlockMaskDims::for_lengths(mb, mh, sq, sk, bm, bn).unwrap();
            let nk = dims.num_k_blocks;
            cases.push(Case {
                name: format!("hopper random shape {n} {oname}"),
                lens: vec![(sq, sk); b],
                varlen: false,
                hq,
                hkv,
                d,
                opts,
                mask: random_mask((500 + n * 10 + o) as u64, dims, |_| nk),
            });
        }
    }
    cases.extend(special_cases_with(Special {
        prefix: "hopper ",
        lens: vec![(100, 130), (7, 300), (0, 5), (260, 200), (30, 0)],
        block: (128, 128),
        seed: 78,
        listed: 0.7,
        edge_block: 128,
        full_len: 384,
        full_d: 256,
    }));
    cases
}

/// Runs without a GPU: every Hopper case is a valid problem whose block sizes the Hopper
/// kernel takes, and the CPU path agrees with the f64 reference on it.
#[test]
fn hopper_cases_are_valid_problems() {
    for (i, c) in hopper_cases().iter().enumerate() {
        let x = c.inputs::<f32>(4000 + i as u64);
        cpu_matches_reference(&x, &c.name);
        let dims = x.bs.block_mask().dims();
        assert_eq!(dims.block_m % HOPPER_BLOCK_M_MULTIPLE, 0, "{}", c.name);
        assert_eq!(dims.block_n % hopper_block_n_multiple(c.d), 0, "{}", c.name);
    }
}

/// Runs without a GPU: the Hopper sweep reaches both cases of the kernel's tile count for a
/// key block of several key tiles (block_n > its key tile): a list whose last block ends
/// before the sequence's end (all its tiles visited; a negative tile drop there once scheduled
/// tiles past the list) and a list whose last block is the short final one with whole key
/// tiles past the end (those dropped).
#[test]
fn hopper_cases_reach_both_last_block_tile_counts() {
    let (mut before_end, mut dropped) = (false, false);
    for c in hopper_cases() {
        let dims = c.mask.dims();
        let tile = hopper_block_n_multiple(c.d);
        if dims.block_n == tile {
            continue;
        }
        for (b, &(sq, sk)) in c.lens.iter().enumerate() {
            for h in 0..c.hq {
                for qb in 0..sq.div_ceil(dims.block_m) {
                    let list = c.mask.list(b, h, qb).unwrap();
                    let Some((last, _)) = list.iter().last() else {
                        continue;
                    };
                    let start = last * dims.block_n;
                    before_end |= start + dims.block_n < sk;
                    dropped |= start < sk && sk - start <= dims.block_n - tile;
                }
            }
        }
    }
    assert!(
        before_end,
        "no multi-tile last block ending before the sequence's end"
    );
    assert!(dropped, "no short final block with key tiles past the end");
}

/// The Hopper kernel against the f64 reference over [`hopper_cases`] (NaN-poisoned outputs,
/// empty rows exactly 0 with LSE -inf), and against the verified mma.sync kernel on the same
/// inputs: the two differ only by accumulation order and tile sizes.
fn hopper_sweep<T: Element + DeviceRepr>(test: &str, seed: u64) {
    let Some(ctx) = hopper_or_skip(test) else {
        return;
    };
    let stream = ctx.default_stream();
    let (mut worst, mut worst_vs_mma): (f64, f64) = (0.0, 0.0);
    for (i, c) in hopper_cases().iter().enumerate() {
        let kernels = [BlockSparseKernel::Hopper, BlockSparseKernel::TensorCore];
        let r = check_case::<T>(&stream, seed + i as u64, c, &kernels);
        let (err, vs) = (r[0].0, rel_l2(&r[0].1, &r[1].1));
        assert!(
            vs < tolerance::<T>() / 2.0,
            "{} d{} {}: Hopper vs mma.sync rel diff {vs}",
            c.name,
            c.d,
            T::DTYPE
        );
        worst = worst.max(err);
        worst_vs_mma = worst_vs_mma.max(vs);
    }
    eprintln!(
        "block-sparse hopper {}: worst rel err {worst:.2e}, worst vs mma.sync {worst_vs_mma:.2e}",
        T::DTYPE
    );
}

#[test]
fn gpu_hopper_block_sparse_matches_reference_bf16() {
    hopper_sweep::<bf16>("gpu_hopper_block_sparse_matches_reference_bf16", 1100);
}

#[test]
fn gpu_hopper_block_sparse_matches_reference_f16() {
    hopper_sweep::<f16>("gpu_hopper_block_sparse_matches_reference_f16", 1600);
}

/// A Hopper plan replays the one-shot call bit for bit, twice (also the racecheck target of
/// the device script: the TMA rings and the list reads).
#[test]
fn gpu_hopper_block_sparse_plan_matches_one_shot() {
    let Some(ctx) = hopper_or_skip("gpu_hopper_block_sparse_plan_matches_one_shot") else {
        return;
    };
    let stream = ctx.default_stream();
    let cases = hopper_cases();
    for c in cases
        .iter()
        .filter(|c| c.name.starts_with("hopper varlen"))
        .take(2)
    {
        let mut x = c.inputs::<bf16>(43);
        x.bs = x.bs.clone().with_kernel(BlockSparseKernel::Hopper);
        plan_replays_one_shot(&stream, &x, &c.name);
    }
}

/// Refusals of the Hopper kernel that need device buffers: on a Hopper, K/V shared by the
/// batch (batch stride 0: legal, the mma.sync kernel runs it) and block sizes it does not take;
/// on any other GPU, every problem, naming the compute capability. All named
/// `Error::Unsupported`, never a launch.
#[test]
fn gpu_hopper_block_sparse_refuses_what_it_cannot_run() {
    let Some(stream) = gpu_stream_or_skip("gpu_hopper_block_sparse_refuses_what_it_cannot_run")
    else {
        return;
    };
    let (b, s, hq, hkv, d) = (2usize, 200usize, 4usize, 2usize, 128usize);
    let attn = FlashAttention::new(
        &AttentionShape {
            batch: b,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            seqlens: SeqLens::Fixed {
                seqlen_q: s,
                seqlen_k: s,
            },
        },
        &AttentionOptions::causal(),
    )
    .unwrap();
    let dims = BlockMaskDims::for_lengths(1, 1, s, s, 128, 128).unwrap();
    let bs = BlockSparseAttention::new(attn, BlockMask::dense(dims, BlockKind::Partial).unwrap())
        .unwrap();
    let hopper = bs.clone().with_kernel(BlockSparseKernel::Hopper);
    let qs = Strides::contiguous(s, hq, d);
    let ks = Strides::contiguous(s, hkv, d);
    let q: CudaSlice<bf16> = stream.alloc_zeros(b * s * hq * d).unwrap();
    let kv: CudaSlice<bf16> = stream.alloc_zeros(b * s * hkv * d).unwrap();
    let mut out: CudaSlice<bf16> = stream.alloc_zeros(b * s * hq * d).unwrap();
    let run = |bs: &BlockSparseAttention, ks: Strides, out: &mut CudaSlice<bf16>| {
        bs.forward_gpu(
            &stream,
            Strided::new(&q, qs),
            Strided::new(&kv, ks),
            Strided::new(&kv, ks),
            Strided::new(out, qs),
            None,
        )
    };
    let broadcast = Strides { batch: 0, ..ks };
    run(&bs, broadcast, &mut out).unwrap();
    let r = run(&hopper, broadcast, &mut out);
    assert!(
        matches!(&r, Err(Error::Unsupported(m)) if m.contains("batch stride")),
        "{r:?}"
    );
    let r = run(&hopper, ks, &mut out);
    if is_hopper() {
        r.unwrap();
    } else {
        assert!(
            matches!(&r, Err(Error::Unsupported(m)) if m.contains("compute capability")),
            "{r:?}"
        );
    }
    stream.synchronize().unwrap();
}

// ---- MoBA on the GPU (MobaGpuPlan: gating + per-row attention) ----------------------------

/// A MoBA problem: per-sequence `(seqlen_q, seqlen_k)`, fixed or varlen, heads, head dim,
/// `block_n`, `top_k`, options (causal unless stated).
struct MobaCase {
    name: &'static str,
    lens: Vec<(usize, usize)>,
    varlen: bool,
    hq: usize,
    hkv: usize,
    d: usize,
    block_n: usize,
    top_k: usize,
    opts: AttentionOptions,
}

impl MobaCase {
    fn case(&self) -> Case {
        // An empty mask of the right dims: Case binds one; MoBA builds its own.
        let sq = self.lens.iter().map(|l| l.0).max().unwrap();
        let sk = self.lens.iter().map(|l| l.1).max().unwrap();
        let dims = BlockMaskDims::for_lengths(1, 1, sq, sk, 64, 64).unwrap();
        Case {
            name: self.name.into(),
            lens: self.lens.clone(),
            varlen: self.varlen,
            hq: self.hq,
            hkv: self.hkv,
            d: self.d,
            opts: self.opts,
            mask: BlockMask::from_lists(dims, |_| Vec::new()).unwrap(),
        }
    }
    fn config(&self) -> MobaConfig {
        MobaConfig {
            block_n: self.block_n,
            top_k: self.top_k,
        }
    }
}

/// A causal MoBA case.
#[allow(clippy::too_many_arguments)]
fn moba_case(
    name: &'static str,
    lens: Vec<(usize, usize)>,
    varlen: bool,
    hq: usize,
    hkv: usize,
    d: usize,
    block_n: usize,
    top_k: usize,
) -> MobaCase {
    MobaCase {
        name,
        lens,
        varlen,
        hq,
        hkv,
        d,
        block_n,
        top_k,
        opts: AttentionOptions::causal(),
    }
}

/// Shapes: lengths not multiples of the block or the 64-row tile, seqlen_q != seqlen_k both
/// ways (rows before key 0 see nothing), a single row, GQA, varlen with a short sequence,
/// top_k 1 (own block only), top_k above the block count, top_k 32, no key at all, a sliding
/// window on top.
fn moba_cases() -> Vec<MobaCase> {
    let c = moba_case;
    let mut v = vec![
        c("square", vec![(300, 300); 2], false, 4, 2, 64, 64, 3),
        c("sk > sq", vec![(100, 613); 1], false, 2, 1, 128, 64, 4),
        c("sq > sk", vec![(333, 150); 2], false, 2, 2, 64, 64, 2),
        c("one row", vec![(1, 700); 1], false, 2, 1, 256, 128, 3),
        c("own only", vec![(200, 260); 1], false, 3, 1, 128, 64, 1),
        c("k > blocks", vec![(190, 190); 1], false, 2, 2, 64, 64, 10),
        c(
            "top 32",
            vec![(130, 64 * 40 + 7); 1],
            false,
            1,
            1,
            64,
            64,
            32,
        ),
        c("block 192", vec![(260, 900); 1], false, 2, 1, 256, 192, 3),
        c("no keys", vec![(50, 0); 2], false, 2, 1, 64, 64, 3),
        c(
            "varlen",
            vec![(70, 500), (5, 64), (129, 129), (40, 10)],
            true,
            4,
            2,
            128,
            64,
            3,
        ),
    ];
    let mut w = c("window", vec![(256, 640); 1], false, 2, 1, 64, 64, 4);
    w.opts = AttentionOptions::causal().with_window(Window::new(Some(150), Some(0)));
    v.push(w);
    v
}

/// The GPU gating (with `gate`) and attention of one case on inputs `x` of dtype `T`: pooled
/// keys against the CPU's (f64) within a tolerance; the selection against the CPU's, a
/// difference accepted only as a near-tie (both blocks' f64 scores within the f32 error
/// bound of each other: f32 GPU scores vs f64 CPU scores can flip those); the tile unions
/// exactly those of the GPU's own selection; the attention against the f64 reference on the
/// GPU's own selection. Outputs and LSE are NaN-poisoned. Returns (rel. error, near-tie
/// flips).
fn moba_run_on<T: Element + DeviceRepr>(
    stream: &Arc<CudaStream>,
    mc: &MobaCase,
    x: Inputs<T>,
    gate: MobaGate,
) -> (f64, usize) {
    let attn = x.bs.attention().clone();
    let cfg = mc.config();
    let what = format!("moba {} d{} {} {gate:?}", mc.name, mc.d, T::DTYPE);
    let plan = MobaGpuPlan::new(&attn, &cfg, stream)
        .unwrap()
        .with_gate(gate)
        .unwrap();
    assert_eq!(plan.gate(), gate);
    let (got, _) = moba_forward(stream, plan, &x);
    moba_check(mc, &x, got, &what)
}

/// What a MoBA run produced (GPU, or the CPU path for the checker's own test).
struct MobaResult {
    pooled: Vec<f32>,
    rows: RowBlocks,
    unions: Vec<Vec<i32>>,
    out: Vec<f64>,
    lse: Vec<f32>,
}

/// Uploads `x` (NaN-poisoned outputs), runs `plan` on it and reads everything back; returns
/// the plan too, for what else a caller reads from it.
fn moba_forward<T: Element + DeviceRepr>(
    stream: &Arc<CudaStream>,
    mut plan: MobaGpuPlan,
    x: &Inputs<T>,
) -> (MobaResult, MobaGpuPlan) {
    let OnDevice {
        q: dq,
        k: dk,
        v: dv,
        out: mut dout,
        lse: mut dlse,
    } = x.upload(stream);
    plan.forward::<T, CudaSlice<T>, CudaSlice<T>>(
        stream,
        Strided::new(&dq, x.qs),
        Strided::new(&dk, x.ks),
        Strided::new(&dv, x.ks),
        Strided::new(&mut dout, x.qs),
        Some(&mut dlse),
    )
    .unwrap();
    let res = MobaResult {
        pooled: plan.pooled_keys(stream).unwrap(),
        rows: plan.row_blocks(stream).unwrap(),
        unions: plan.tile_unions(stream).unwrap(),
        out: to_f64(&stream.clone_dtoh(&dout).unwrap()),
        lse: stream.clone_dtoh(&dlse).unwrap(),
    };
    (res, plan)
}

/// The checks of [`moba_run_on`] on a result; returns (rel. error, near-tie flips).
fn moba_check<T: Element>(
    mc: &MobaCase,
    x: &Inputs<T>,
    got: MobaResult,
    what: &str,
) -> (f64, usize) {
    let attn = x.bs.attention().clone();
    let cfg = mc.config();
    let q = || Strided::new(&x.q[..], x.qs);
    let k = || Strided::new(&x.k[..], x.ks);
    let nk = attn.max_seqlen_k().div_ceil(mc.block_n);
    // Pooled keys, for the blocks inside each sequence.
    let got_pool = &got.pooled;
    let want_pool = moba_pooled_keys_cpu(&attn, &cfg, q(), k()).unwrap();
    let (d, hkv) = (mc.d, mc.hkv);
    for (b, span) in attn.spans().enumerate() {
        for kvh in 0..hkv {
            for kb in 0..span.seqlen_k.div_ceil(mc.block_n) {
                for ch in 0..d {
                    let o = ((b * hkv + kvh) * nk + kb) * d + ch;
                    let (g, w) = (got_pool[o] as f64, want_pool[o]);
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{what}: pooled ({b}, {kvh}, {kb}, {ch}) {g} vs {w}"
                    );
                }
            }
        }
    }

    // Selection: equal to the CPU's up to near-ties.
    let got_rows = got.rows;
    let want_rows = moba_select_cpu(&attn, &cfg, q(), k()).unwrap();
    assert_eq!(got_rows.top_k(), want_rows.top_k(), "{what}: slots");
    let mut flips = 0;
    for (b, span) in attn.spans().enumerate() {
        for h in 0..mc.hq {
            let kvh = h / (mc.hq / hkv);
            for i in 0..span.seqlen_q {
                let r = lse_index(&attn, b, h, i);
                let (g, w) = (got_rows.row(r).unwrap(), want_rows.row(r).unwrap());
                if g == w {
                    continue;
                }
                assert_eq!(
                    g.len(),
                    w.len(),
                    "{what}: row ({b}, {h}, {i}) {g:?} vs {w:?}"
                );
                // Scores in f64 from the CPU's pooled keys, with the f32 error bound.
                let bb = if attn.is_varlen() { 0 } else { b } as i64;
                let qo = (bb * x.qs.batch
                    + (span.q_start + i) as i64 * x.qs.seq
                    + h as i64 * x.qs.head) as usize;
                let score = |kb: i32| -> (f64, f64) {
                    let po = ((b * hkv + kvh) * nk + kb as usize) * d;
                    let (mut s, mut mag) = (0.0, 0.0);
                    for ch in 0..d {
                        let t = x.q[qo + ch].to_f64() * want_pool[po + ch];
                        s += t;
                        mag += t.abs();
                    }
                    (s, mag)
                };
                let only_g: Vec<i32> = g.iter().copied().filter(|kb| !w.contains(kb)).collect();
                let only_w: Vec<i32> = w.iter().copied().filter(|kb| !g.contains(kb)).collect();
                for &a in &only_g {
                    let (sa, ma) = score(a);
                    // Each GPU-only block must be as good as some CPU-only block, up to the
                    // f32 accumulation error of both scores.
                    let ok = only_w.iter().any(|&bb| {
                        let (sb, mb) = score(bb);
                        (sa - sb).abs() <= 1e-5 * (ma + mb) + 1e-6
                    });
                    assert!(
                        ok,
                        "{what}: row ({b}, {h}, {i}) GPU {g:?} vs CPU {w:?} is not a near-tie"
                    );
                }
                flips += 1;
            }
        }
    }

    // Tile unions: exactly those of the GPU's own selection.
    assert_eq!(
        got.unions,
        moba_tile_unions(&attn, &got_rows, GPU_TILE_ROWS).unwrap(),
        "{what}: tile unions"
    );

    // Attention against the f64 reference on the GPU's selection.
    let mask = moba_block_mask(&attn, &got_rows, GPU_TILE_ROWS).unwrap();
    let bs = BlockSparseAttention::new(attn.clone(), mask)
        .unwrap()
        .with_row_blocks(got_rows)
        .unwrap();
    let (want, want_lse) =
        block_sparse_attention_f64(&bs, q(), k(), Strided::new(&x.v[..], x.ks)).unwrap();
    let (got, lse) = (got.out, got.lse);
    let nan = got.iter().filter(|v| v.is_nan()).count();
    assert_eq!(nan, 0, "{what}: {nan} outputs unwritten or NaN");
    let err = rel_l2(&got, &want);
    assert!(err < tolerance::<T>(), "{what}: rel err {err}");
    for (r, &l) in want_lse.iter().enumerate() {
        if l == f64::NEG_INFINITY {
            let (h, row) = lse_row(&bs, r);
            let o = (row * mc.hq + h) * d;
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
    check_lse(&lse, &want_lse, lse_tol, what);
    (err, flips)
}

/// LSE index of (sequence `b`, head `h`, row `i`).
fn lse_index(attn: &FlashAttention, b: usize, h: usize, i: usize) -> usize {
    if attn.is_varlen() {
        h * attn.total_q() + attn.span(b).unwrap().q_start + i
    } else {
        (b * attn.heads_q() + h) * attn.max_seqlen_q() + i
    }
}

/// The MoBA sweep is made of valid problems the GPU path takes, and the checker of
/// [`moba_run_on`] accepts the CPU path's own results (pooled keys rounded to f32, the CPU
/// selection and unions, the CPU attention): runs without a GPU.
#[test]
fn moba_cases_are_valid_gpu_problems() {
    for (i, mc) in moba_cases().iter().enumerate() {
        let x = mc.case().inputs::<bf16>(40 + i as u64);
        let attn = x.bs.attention();
        let cfg = mc.config();
        let dims = MobaGpuDims::new(attn, &cfg).unwrap();
        assert!(dims.slots <= mc.top_k.max(1), "{}", mc.name);
        let q = || Strided::new(&x.q[..], x.qs);
        let k = || Strided::new(&x.k[..], x.ks);
        let rows = moba_select_cpu(attn, &cfg, q(), k()).unwrap();
        let bs = moba_attention(attn, &cfg, GPU_TILE_ROWS, q(), k()).unwrap();
        let (out, lse) = x.forward_cpu(&bs);
        let got = MobaResult {
            pooled: moba_pooled_keys_cpu(attn, &cfg, q(), k())
                .unwrap()
                .iter()
                .map(|&v| v as f32)
                .collect(),
            unions: moba_tile_unions(attn, &rows, GPU_TILE_ROWS).unwrap(),
            rows,
            out,
            lse,
        };
        let (err, flips) = moba_check(mc, &x, got, mc.name);
        assert_eq!(flips, 0, "{}", mc.name);
        assert!(err < 1e-2, "{}: {err}", mc.name);
    }
}

/// [`moba_run_on`] over every MoBA case with `gate`, fresh inputs per case.
fn moba_sweep<T: Element + DeviceRepr>(test: &str, seed: u64, gate: MobaGate) {
    let Some(stream) = gpu_stream_or_skip(test) else {
        return;
    };
    let (mut worst, mut flips) = (0.0f64, 0);
    for (i, mc) in moba_cases().iter().enumerate() {
        let x = mc.case().inputs::<T>(seed + i as u64);
        let (e, f) = moba_run_on(&stream, mc, x, gate);
        worst = worst.max(e);
        flips += f;
    }
    eprintln!(
        "moba gpu {} {gate:?}: worst rel err {worst:.2e}, near-tie flips {flips}",
        T::DTYPE
    );
}

#[test]
fn gpu_moba_matches_cpu_selection_and_reference_bf16() {
    moba_sweep::<bf16>(
        "gpu_moba_matches_cpu_selection_and_reference_bf16",
        2000,
        MobaGate::Simt,
    );
}

#[test]
fn gpu_moba_matches_cpu_selection_and_reference_f16() {
    moba_sweep::<f16>(
        "gpu_moba_matches_cpu_selection_and_reference_f16",
        3000,
        MobaGate::Simt,
    );
}

/// Exact ties and NaN scores: with q = +-1 and every key 1 all scores of a row are equal in
/// f32 and f64 alike, so the GPU must pick the lowest block indices exactly as the CPU; a
/// key block holding a NaN has a NaN score, which ranks as -inf (picked last, only when slots
/// remain). Only the selection is compared (NaN keys make the attention NaN).
#[test]
fn gpu_moba_ties_and_nan_follow_the_rule() {
    let Some(stream) = gpu_stream_or_skip("gpu_moba_ties_and_nan_follow_the_rule") else {
        return;
    };
    let mc = moba_case("ties", vec![(200, 640)], false, 2, 1, 64, 64, 4);
    let c = mc.case();
    for nan_block in [None, Some(0usize), Some(5)] {
        let mut x = c.inputs::<bf16>(7);
        x.q.iter_mut()
            .for_each(|v| *v = bf16::from_f32(if v.to_f32() < 0.0 { -1.0 } else { 1.0 }));
        x.k.iter_mut().for_each(|v| *v = bf16::ONE);
        if let Some(kb) = nan_block {
            let at = (kb * 64) * mc.hkv * mc.d;
            x.k[at] = bf16::NAN;
        }
        let attn = x.bs.attention().clone();
        let cfg = mc.config();
        let dq = stream.clone_htod(&x.q).unwrap();
        let dk = stream.clone_htod(&x.k).unwrap();
        let dv = stream.clone_htod(&x.v).unwrap();
        let mut dout: CudaSlice<bf16> = stream.alloc_zeros(attn.out_len()).unwrap();
        let mut plan = MobaGpuPlan::new(&attn, &cfg, &stream).unwrap();
        plan.forward::<bf16, CudaSlice<bf16>, CudaSlice<bf16>>(
            &stream,
            Strided::new(&dq, x.qs),
            Strided::new(&dk, x.ks),
            Strided::new(&dv, x.ks),
            Strided::new(&mut dout, x.qs),
            None,
        )
        .unwrap();
        let got = plan.row_blocks(&stream).unwrap();
        let want = moba_select_cpu(
            &attn,
            &cfg,
            Strided::new(&x.q[..], x.qs),
            Strided::new(&x.k[..], x.ks),
        )
        .unwrap();
        assert_eq!(got, want, "nan block {nan_block:?}");
        // The last row (position 639, own block 9) takes blocks 0, 1, 2 by index, or skips a
        // NaN block among them.
        let last = got.row(attn.max_seqlen_q() - 1).unwrap();
        let expect: &[i32] = match nan_block {
            Some(0) => &[1, 2, 3, 9],
            _ => &[0, 1, 2, 9],
        };
        assert_eq!(last, expect, "nan block {nan_block:?}");
    }
}

/// A plan is reusable: a second forward on other inputs overwrites the first's selection
/// (its result equals a fresh plan's, bit for bit); host refusals need no pointer.
#[test]
fn gpu_moba_plan_reuse_and_refusals() {
    let Some(stream) = gpu_stream_or_skip("gpu_moba_plan_reuse_and_refusals") else {
        return;
    };
    let mc = &moba_cases()[0];
    let c = mc.case();
    let cfg = mc.config();
    let run = |plan: &mut MobaGpuPlan, seed: u64| {
        let x = c.inputs::<bf16>(seed);
        let dq = stream.clone_htod(&x.q).unwrap();
        let dk = stream.clone_htod(&x.k).unwrap();
        let dv = stream.clone_htod(&x.v).unwrap();
        let mut dout: CudaSlice<bf16> = stream.alloc_zeros(x.bs.attention().out_len()).unwrap();
        plan.forward::<bf16, CudaSlice<bf16>, CudaSlice<bf16>>(
            &stream,
            Strided::new(&dq, x.qs),
            Strided::new(&dk, x.ks),
            Strided::new(&dv, x.ks),
            Strided::new(&mut dout, x.qs),
            None,
        )
        .unwrap();
        (
            stream.clone_dtoh(&dout).unwrap(),
            plan.row_blocks(&stream).unwrap(),
        )
    };
    let attn = c.inputs::<bf16>(1).bs.attention().clone();
    let mut reused = MobaGpuPlan::new(&attn, &cfg, &stream).unwrap();
    let _ = run(&mut reused, 11);
    let second = run(&mut reused, 12);
    let fresh = run(&mut MobaGpuPlan::new(&attn, &cfg, &stream).unwrap(), 12);
    assert_eq!(second, fresh);

    // f32 and short buffers are refused before any pointer is taken.
    let x = c.inputs::<bf16>(1);
    let f: CudaSlice<f32> = stream.alloc_zeros(attn.out_len()).unwrap();
    let mut fo: CudaSlice<f32> = stream.alloc_zeros(attn.out_len()).unwrap();
    let r = reused.forward::<f32, _, _>(
        &stream,
        Strided::new(&f, x.qs),
        Strided::new(&f, x.ks),
        Strided::new(&f, x.ks),
        Strided::new(&mut fo, x.qs),
        None,
    );
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    let short: CudaSlice<bf16> = stream.alloc_zeros(10).unwrap();
    let mut out: CudaSlice<bf16> = stream.alloc_zeros(attn.out_len()).unwrap();
    let r = reused.forward::<bf16, _, _>(
        &stream,
        Strided::new(&short, x.qs),
        Strided::new(&short, x.ks),
        Strided::new(&short, x.ks),
        Strided::new(&mut out, x.qs),
        None,
    );
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    let mut lse: CudaSlice<f32> = stream.alloc_zeros(3).unwrap();
    let buf: CudaSlice<bf16> = stream.alloc_zeros(attn.out_len()).unwrap();
    let kv: CudaSlice<bf16> = stream.alloc_zeros(x.k.len()).unwrap();
    let r = reused.forward::<bf16, _, _>(
        &stream,
        Strided::new(&buf, x.qs),
        Strided::new(&kv, x.ks),
        Strided::new(&kv, x.ks),
        Strided::new(&mut out, x.qs),
        Some(&mut lse),
    );
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
}

// ---- MoBA at query-block granularity on the GPU ------------------------------------------

/// Query-block cases: the per-token shapes, each with a query block size (64, 128, 192),
/// causal only (under a window `moba_select_blocks_cpu` drops selected blocks the window hides
/// entirely, which the GPU lists keep and the element mask hides: same attention, different
/// lists; the per-token sweep covers the window).
fn moba_block_cases() -> Vec<(MobaCase, usize)> {
    let sizes = [64, 128, 64, 192, 64, 128, 64, 128, 64, 192];
    moba_cases()
        .into_iter()
        .filter(|mc| mc.name != "window")
        .zip(sizes)
        .collect()
}

/// The query-block lists of a result, per (sequence, head, query block): the union of the
/// block's first 64-row tile (every tile of the block holds the same list, checked).
fn block_lists(
    attn: &FlashAttention,
    unions: &[Vec<i32>],
    rows: &RowBlocks,
    bm: usize,
    what: &str,
) -> Vec<Vec<i32>> {
    let nt = attn.max_seqlen_q().div_ceil(GPU_TILE_ROWS);
    let nqb = attn.max_seqlen_q().div_ceil(bm);
    let mut lists = Vec::new();
    for (b, span) in attn.spans().enumerate() {
        for h in 0..attn.heads_q() {
            for qb in 0..nqb {
                let tiles = (qb * bm / GPU_TILE_ROWS..((qb + 1) * bm / GPU_TILE_ROWS).min(nt))
                    .map(|x| &unions[(b * attn.heads_q() + h) * nt + x])
                    .collect::<Vec<_>>();
                let list = if qb * bm >= span.seqlen_q {
                    Vec::new()
                } else {
                    tiles[0].clone()
                };
                for x in qb * bm / GPU_TILE_ROWS..((qb + 1) * bm / GPU_TILE_ROWS).min(nt) {
                    if x * GPU_TILE_ROWS < span.seqlen_q {
                        assert_eq!(
                            unions[(b * attn.heads_q() + h) * nt + x],
                            list,
                            "{what}: tile {x} of block {qb}"
                        );
                    }
                }
                for i in qb * bm..((qb + 1) * bm).min(span.seqlen_q) {
                    let r = lse_index(attn, b, h, i);
                    assert_eq!(rows.row(r).unwrap(), &list[..], "{what}: row {i}");
                }
                lists.push(list);
            }
        }
    }
    lists
}

/// Checks a query-block result against `moba_select_blocks_cpu` (up to near-ties of the
/// f64 gate on the block's mean query) and its attention against the f64 reference on its
/// own lists. Returns (rel. error, near-tie flips).
fn moba_blocks_check<T: Element>(
    mc: &MobaCase,
    bm: usize,
    x: &Inputs<T>,
    got: MobaResult,
    what: &str,
) -> (f64, usize) {
    let attn = x.bs.attention().clone();
    let cfg = mc.config();
    let q = || Strided::new(&x.q[..], x.qs);
    let k = || Strided::new(&x.k[..], x.ks);
    let (d, hkv, bn) = (mc.d, mc.hkv, mc.block_n);
    let nk = attn.max_seqlen_k().div_ceil(bn);
    let nqb = attn.max_seqlen_q().div_ceil(bm);
    let lists = block_lists(&attn, &got.unions, &got.rows, bm, what);
    let want = moba_select_blocks_cpu(&attn, &cfg, bm, q(), k()).unwrap();
    let pool = moba_pooled_keys_cpu(&attn, &cfg, q(), k()).unwrap();
    let mut flips = 0;
    for (b, span) in attn.spans().enumerate() {
        for h in 0..mc.hq {
            let kvh = h / (mc.hq / hkv);
            for qb in 0..nqb {
                let g = &lists[(b * mc.hq + h) * nqb + qb];
                let w = want.list(b, h, qb).unwrap().indices;
                if &g[..] == w {
                    continue;
                }
                assert_eq!(
                    g.len(),
                    w.len(),
                    "{what}: block ({b}, {h}, {qb}) {g:?} vs {w:?}"
                );
                // The block's mean query (f64) against the CPU's pooled keys.
                let rows = qb * bm..((qb + 1) * bm).min(span.seqlen_q);
                let bb = if attn.is_varlen() { 0 } else { b } as i64;
                let mq: Vec<f64> = (0..d)
                    .map(|ch| {
                        rows.clone()
                            .map(|i| {
                                let o = bb * x.qs.batch
                                    + (span.q_start + i) as i64 * x.qs.seq
                                    + h as i64 * x.qs.head;
                                x.q[o as usize + ch].to_f64()
                            })
                            .sum::<f64>()
                            / rows.len() as f64
                    })
                    .collect();
                let score = |kb: i32| -> (f64, f64) {
                    let po = ((b * hkv + kvh) * nk + kb as usize) * d;
                    (0..d).fold((0.0, 0.0), |(s, m), ch| {
                        let t = mq[ch] * pool[po + ch];
                        (s + t, m + t.abs())
                    })
                };
                let only_w: Vec<i32> = w.iter().copied().filter(|kb| !g.contains(kb)).collect();
                for a in g.iter().copied().filter(|kb| !w.contains(kb)) {
                    let (sa, ma) = score(a);
                    assert!(
                        only_w.iter().any(|&o| {
                            let (so, mo) = score(o);
                            (sa - so).abs() <= 1e-5 * (ma + mo) + 1e-6
                        }),
                        "{what}: block ({b}, {h}, {qb}) GPU {g:?} vs CPU {w:?} is not a near-tie"
                    );
                }
                flips += 1;
            }
        }
    }
    // Attention: the f64 reference on the result's own lists (all partial: the element
    // mask applies, as in the kernel).
    let dims = BlockMaskDims::for_lengths(
        attn.batch(),
        attn.heads_q(),
        attn.max_seqlen_q(),
        attn.max_seqlen_k(),
        bm,
        bn,
    )
    .unwrap();
    let mask = BlockMask::from_lists(dims, |id| {
        lists[(id.batch * mc.hq + id.head) * nqb + id.q_block]
            .iter()
            .map(|&kb| (kb as usize, BlockKind::Partial))
            .collect()
    })
    .unwrap();
    let bs = BlockSparseAttention::new(attn.clone(), mask).unwrap();
    let (want_o, want_lse) =
        block_sparse_attention_f64(&bs, q(), k(), Strided::new(&x.v[..], x.ks)).unwrap();
    let nan = got.out.iter().filter(|v| v.is_nan()).count();
    assert_eq!(nan, 0, "{what}: {nan} outputs unwritten or NaN");
    let err = rel_l2(&got.out, &want_o);
    assert!(err < tolerance::<T>(), "{what}: rel err {err}");
    let lse_tol = 2e-3
        * (1.0
            + want_lse
                .iter()
                .filter(|v| v.is_finite())
                .fold(0.0f64, |a, &b| a.max(b.abs())));
    check_lse(&got.lse, &want_lse, lse_tol, what);
    (err, flips)
}

/// The query-block checker accepts the CPU path's own results (runs without a GPU).
#[test]
fn moba_block_cases_are_valid_gpu_problems() {
    for (i, (mc, bm)) in moba_block_cases().iter().enumerate() {
        let x = mc.case().inputs::<bf16>(80 + i as u64);
        let attn = x.bs.attention();
        let cfg = mc.config();
        let dims = MobaGpuDims::for_query_blocks(attn, &cfg, *bm).unwrap();
        let q = || Strided::new(&x.q[..], x.qs);
        let k = || Strided::new(&x.k[..], x.ks);
        let mask = moba_select_blocks_cpu(attn, &cfg, *bm, q(), k()).unwrap();
        // What the GPU writes, from the CPU lists: each row its block's list, each tile its
        // block's list.
        let nt = attn.max_seqlen_q().div_ceil(GPU_TILE_ROWS);
        let mut blocks = vec![-1i32; attn.lse_len() * dims.slots];
        let mut unions = Vec::new();
        for (b, span) in attn.spans().enumerate() {
            for h in 0..mc.hq {
                for i in 0..span.seqlen_q {
                    let l = mask.list(b, h, i / bm).unwrap().indices;
                    let r = lse_index(attn, b, h, i);
                    blocks[r * dims.slots..][..l.len()].copy_from_slice(l);
                }
                for t in 0..nt {
                    unions.push(if t * GPU_TILE_ROWS < span.seqlen_q {
                        mask.list(b, h, t * GPU_TILE_ROWS / bm)
                            .unwrap()
                            .indices
                            .to_vec()
                    } else {
                        Vec::new()
                    });
                }
            }
        }
        let bs = BlockSparseAttention::new(attn.clone(), mask).unwrap();
        let (out, lse) = x.forward_cpu(&bs);
        let got = MobaResult {
            pooled: Vec::new(),
            rows: RowBlocks::new(mc.block_n, dims.slots, blocks).unwrap(),
            unions,
            out,
            lse,
        };
        let (err, flips) = moba_blocks_check(mc, *bm, &x, got, mc.name);
        assert_eq!(flips, 0, "{}", mc.name);
        assert!(err < 1e-2, "{}: {err}", mc.name);
    }
}

fn moba_blocks_sweep<T: Element + DeviceRepr>(test: &str, seed: u64) {
    let Some(stream) = gpu_stream_or_skip(test) else {
        return;
    };
    let (mut worst, mut flips) = (0.0f64, 0);
    for (i, (mc, bm)) in moba_block_cases().iter().enumerate() {
        let x = mc.case().inputs::<T>(seed + i as u64);
        let attn = x.bs.attention().clone();
        let what = format!("moba blocks {} bm {bm} d{} {}", mc.name, mc.d, T::DTYPE);
        let OnDevice {
            q: dq,
            k: dk,
            v: dv,
            out: mut dout,
            lse: mut dlse,
        } = x.upload(&stream);
        let mut plan = MobaGpuPlan::with_query_blocks(&attn, &mc.config(), *bm, &stream).unwrap();
        assert_eq!(plan.query_block(), Some(*bm));
        plan.forward::<T, CudaSlice<T>, CudaSlice<T>>(
            &stream,
            Strided::new(&dq, x.qs),
            Strided::new(&dk, x.ks),
            Strided::new(&dv, x.ks),
            Strided::new(&mut dout, x.qs),
            Some(&mut dlse),
        )
        .unwrap();
        let got = MobaResult {
            pooled: plan.pooled_keys(&stream).unwrap(),
            rows: plan.row_blocks(&stream).unwrap(),
            unions: plan.tile_unions(&stream).unwrap(),
            out: to_f64(&stream.clone_dtoh(&dout).unwrap()),
            lse: stream.clone_dtoh(&dlse).unwrap(),
        };
        let (e, f) = moba_blocks_check(mc, *bm, &x, got, &what);
        worst = worst.max(e);
        flips += f;
    }
    eprintln!(
        "moba blocks gpu {}: worst rel err {worst:.2e}, near-tie flips {flips}",
        T::DTYPE
    );
}

#[test]
fn gpu_moba_query_blocks_match_cpu_bf16() {
    moba_blocks_sweep::<bf16>("gpu_moba_query_blocks_match_cpu_bf16", 4000);
}

#[test]
fn gpu_moba_query_blocks_match_cpu_f16() {
    moba_blocks_sweep::<f16>("gpu_moba_query_blocks_match_cpu_f16", 5000);
}

/// `MobaGpuPlan::select` (the gate alone, which `family_bench` times for the gate share):
/// per-token and query-block plans, every per-token shape; after `select` the plan holds the
/// same pooled keys, row selections and tile unions as after `forward` on the same inputs
/// (bit for bit: the same launches), and the NaN-poisoned output and LSE are untouched (bit
/// for bit); a short buffer is refused by `select` as by `forward`.
#[test]
fn gpu_moba_select_alone_matches_forward() {
    let Some(stream) = gpu_stream_or_skip("gpu_moba_select_alone_matches_forward") else {
        return;
    };
    for (mc, bm) in moba_cases()
        .iter()
        .zip([None, Some(64), Some(128)].iter().cycle())
    {
        let x = mc.case().inputs::<bf16>(61);
        let attn = x.bs.attention().clone();
        let cfg = mc.config();
        // Query-block plans take causal lists only (see moba_block_cases).
        let bm = if mc.name == "window" { None } else { *bm };
        let what = format!("select {} block_m {bm:?}", mc.name);
        let plan = || match bm {
            None => MobaGpuPlan::new(&attn, &cfg, &stream).unwrap(),
            Some(m) => MobaGpuPlan::with_query_blocks(&attn, &cfg, m, &stream).unwrap(),
        };
        let OnDevice {
            q: dq,
            k: dk,
            v: dv,
            out: mut dout,
            lse: mut dlse,
        } = x.upload(&stream);
        let mut gate = plan();
        gate.select::<bf16, CudaSlice<bf16>, CudaSlice<bf16>>(
            &stream,
            Strided::new(&dq, x.qs),
            Strided::new(&dk, x.ks),
            Strided::new(&dv, x.ks),
            Strided::new(&mut dout, x.qs),
            Some(&mut dlse),
        )
        .unwrap();
        let out: Vec<bf16> = stream.clone_dtoh(&dout).unwrap();
        let lse: Vec<f32> = stream.clone_dtoh(&dlse).unwrap();
        assert!(
            out.iter().all(|o| o.to_f32().is_nan()),
            "{what}: out written"
        );
        assert!(lse.iter().all(|l| l.is_nan()), "{what}: lse written");
        let mut full = plan();
        full.forward::<bf16, CudaSlice<bf16>, CudaSlice<bf16>>(
            &stream,
            Strided::new(&dq, x.qs),
            Strided::new(&dk, x.ks),
            Strided::new(&dv, x.ks),
            Strided::new(&mut dout, x.qs),
            Some(&mut dlse),
        )
        .unwrap();
        assert_eq!(
            gate.row_blocks(&stream).unwrap(),
            full.row_blocks(&stream).unwrap(),
            "{what}: rows"
        );
        assert_eq!(
            gate.tile_unions(&stream).unwrap(),
            full.tile_unions(&stream).unwrap(),
            "{what}: unions"
        );
        let (pg, pf) = (
            gate.pooled_keys(&stream).unwrap(),
            full.pooled_keys(&stream).unwrap(),
        );
        // Blocks past a varlen sequence's end hold stale values (zeros in both fresh plans).
        assert!(
            pg.iter().zip(&pf).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: pooled keys"
        );
        let short: CudaSlice<bf16> = stream.alloc_zeros(10).unwrap();
        let r = gate.select::<bf16, _, _>(
            &stream,
            Strided::new(&short, x.qs),
            Strided::new(&dk, x.ks),
            Strided::new(&dv, x.ks),
            Strided::new(&mut dout, x.qs),
            None,
        );
        assert!(matches!(r, Err(Error::Shape(_))), "{what}: {r:?}");
    }
}

// ---- The tensor-core gate (MobaGate::TensorCore, opt-in) ---------------------------------

/// The tensor-core gate on random inputs, every per-token shape (head dims 64/128/256, GQA,
/// varlen, top_k 1..32, a window): the full check of [`moba_run_on`] (pooled keys, selection
/// equal to the f64 CPU selection up to near-ties, unions of its own selection, attention vs
/// the f64 reference, NaN-poisoned outputs). Its split pooled keys keep each score within
/// about 2^-16 of the magnitude sum, inside the near-tie bound of the check.
#[test]
fn gpu_moba_tc_gate_matches_cpu_selection_and_reference_bf16() {
    moba_sweep::<bf16>(
        "gpu_moba_tc_gate_matches_cpu_selection_and_reference_bf16",
        7000,
        MobaGate::TensorCore,
    );
}

#[test]
fn gpu_moba_tc_gate_matches_cpu_selection_and_reference_f16() {
    moba_sweep::<f16>(
        "gpu_moba_tc_gate_matches_cpu_selection_and_reference_f16",
        8000,
        MobaGate::TensorCore,
    );
}

/// Inputs on which every path scores exactly: queries with entries in {-2, ..., 2}, and each
/// key block's rows one vector with entries in {-2, ..., 2} (a different one per sequence, kv
/// head and block), so that the pooled keys are those integers exactly (f32 and f64) and
/// every score is an integer below 2^24 (exact in f32 whatever the order). The CPU selection
/// (ties to the lower block index among the many equal integer scores) is then the only
/// right answer for both gates: a wrong fragment, row, channel or block mapping changes the
/// scores and shows.
fn integer_inputs<T: Element>(mc: &MobaCase, seed: u64) -> Inputs<T> {
    let mut x = mc.case().inputs::<T>(seed);
    let mut r = rng(seed ^ 0x5eed);
    let mut int = || T::from_f32(r.random_range(-2i32..=2) as f32);
    for v in x.q.iter_mut() {
        *v = int();
    }
    let attn = x.bs.attention().clone();
    for (b, span) in attn.spans().enumerate() {
        let bb = if attn.is_varlen() { 0 } else { b } as i64;
        for kvh in 0..mc.hkv {
            for kb in 0..span.seqlen_k.div_ceil(mc.block_n) {
                let vec: Vec<T> = (0..mc.d).map(|_| int()).collect();
                for j in kb * mc.block_n..((kb + 1) * mc.block_n).min(span.seqlen_k) {
                    let o = (bb * x.ks.batch
                        + (span.k_start + j) as i64 * x.ks.seq
                        + kvh as i64 * x.ks.head) as usize;
                    x.k[o..o + mc.d].copy_from_slice(&vec);
                }
            }
        }
    }
    x
}

/// On [`integer_inputs`] both gates select exactly the CPU selection (no near-tie allowed)
/// and the same lists as each other, bf16 and f16, every per-token shape; the attention is
/// checked as in [`moba_run_on`].
#[test]
fn gpu_moba_tc_gate_exact_on_integer_scores() {
    let Some(stream) = gpu_stream_or_skip("gpu_moba_tc_gate_exact_on_integer_scores") else {
        return;
    };
    fn both<T: Element + DeviceRepr>(stream: &Arc<CudaStream>, mc: &MobaCase, seed: u64) {
        for gate in [MobaGate::Simt, MobaGate::TensorCore] {
            let (_, flips) = moba_run_on(stream, mc, integer_inputs::<T>(mc, seed), gate);
            assert_eq!(
                flips,
                0,
                "{} {} {gate:?}: selection differs",
                mc.name,
                T::DTYPE
            );
        }
    }
    for (i, mc) in moba_cases().iter().enumerate() {
        both::<bf16>(&stream, mc, 9000 + i as u64);
        both::<f16>(&stream, mc, 9100 + i as u64);
    }
}

/// `with_gate`: the default is `Simt`; a query-block plan refuses `TensorCore` (named error)
/// and keeps `Simt`.
#[test]
fn gpu_moba_gate_option() {
    let Some(stream) = gpu_stream_or_skip("gpu_moba_gate_option") else {
        return;
    };
    let mc = &moba_cases()[0];
    let attn = mc.case().attn();
    let cfg = mc.config();
    let plan = MobaGpuPlan::new(&attn, &cfg, &stream).unwrap();
    assert_eq!(plan.gate(), MobaGate::Simt);
    let blocks = MobaGpuPlan::with_query_blocks(&attn, &cfg, 64, &stream).unwrap();
    let r = blocks.with_gate(MobaGate::TensorCore);
    assert!(
        matches!(&r, Err(Error::Unsupported(m)) if m.contains("tensor-core")),
        "{r:?}"
    );
    let blocks = MobaGpuPlan::with_query_blocks(&attn, &cfg, 64, &stream).unwrap();
    assert_eq!(
        blocks.with_gate(MobaGate::Simt).unwrap().gate(),
        MobaGate::Simt
    );
}

/// The premise of [`gpu_moba_tc_gate_exact_on_integer_scores`], on the CPU: the pooled keys
/// of [`integer_inputs`] are integers (exact in f32), and the selections are not the trivial
/// lowest-index lists (so that a mis-mapped score would change them).
#[test]
fn integer_inputs_pool_to_integers() {
    let mut nontrivial = 0;
    for (i, mc) in moba_cases().iter().enumerate() {
        let x = integer_inputs::<f16>(mc, 9100 + i as u64);
        let attn = x.bs.attention();
        let cfg = mc.config();
        let q = || Strided::new(&x.q[..], x.qs);
        let k = || Strided::new(&x.k[..], x.ks);
        let pooled = moba_pooled_keys_cpu(attn, &cfg, q(), k()).unwrap();
        assert!(
            pooled.iter().all(|v| v.fract() == 0.0 && v.abs() <= 2.0),
            "{}: pooled keys not integers",
            mc.name
        );
        let rows = moba_select_cpu(attn, &cfg, q(), k()).unwrap();
        for r in 0..attn.lse_len() {
            let row = rows.row(r).unwrap();
            let Some((&own, earlier)) = row.split_last() else {
                continue;
            };
            let lowest: Vec<i32> = (0..earlier.len() as i32).collect();
            nontrivial += usize::from(earlier != &lowest[..] && own >= 0);
        }
    }
    assert!(nontrivial > 100, "{nontrivial} non-trivial rows");
}

// ---- MoBA's gather attention on the GPU (MobaAttention::Gather) ---------------------------

/// The gather sweep: every per-token case (GQA, varlen, window, seqlen_q != seqlen_k both
/// ways, no key, top_k 1 and 32) plus block sizes 64/128/512 at top_k 1..5 over lengths
/// that are not multiples of the block (the last block, a causal row's own, is partial),
/// a varlen batch with a sequence inside one block, head dims 64/128/256.
fn moba_gather_cases() -> Vec<MobaCase> {
    let mut v = moba_cases();
    let c = moba_case;
    let names512 = [
        "b512 top1",
        "b512 top2",
        "b512 top3",
        "b512 top4",
        "b512 top5",
    ];
    for (t, name) in names512.into_iter().enumerate() {
        v.push(c(name, vec![(2600, 2600)], false, 4, 2, 64, 512, t + 1));
    }
    let names128 = [
        "b128 top1",
        "b128 top2",
        "b128 top3",
        "b128 top4",
        "b128 top5",
    ];
    for (t, name) in names128.into_iter().enumerate() {
        v.push(c(
            name,
            vec![(700, 900), (130, 130), (64, 300), (1, 1)],
            true,
            4,
            1,
            128,
            128,
            t + 1,
        ));
    }
    v.push(c(
        "b64 top5 d256",
        vec![(1000, 1000); 2],
        false,
        2,
        1,
        256,
        64,
        5,
    ));
    v.push(c(
        "b64 top2 sq>sk",
        vec![(1100, 700)],
        false,
        2,
        2,
        128,
        64,
        2,
    ));
    v
}

/// Both attentions of one case on the same inputs (the same gate, hence the same
/// selection): the gather result through [`moba_check`] (selection vs the CPU's, attention
/// vs the f64 reference on the GPU's own selection, NaN-poisoned outputs, empty rows 0 /
/// -inf), its transpose equal to the CPU model of the GPU's selection, and its output and
/// LSE against the union path's. Returns the gather path's relative error.
fn moba_gather_run_on<T: Element + DeviceRepr>(
    stream: &Arc<CudaStream>,
    mc: &MobaCase,
    x: Inputs<T>,
) -> f64 {
    let attn = x.bs.attention().clone();
    let cfg = mc.config();
    let what = format!("moba gather {} d{} {}", mc.name, mc.d, T::DTYPE);
    let run = |attention: MobaAttention| {
        let plan = MobaGpuPlan::new(&attn, &cfg, stream)
            .unwrap()
            .with_attention(attention)
            .unwrap();
        assert_eq!(plan.attention(), attention);
        let (res, plan) = moba_forward(stream, plan, &x);
        let index =
            (attention == MobaAttention::Gather).then(|| plan.gather_index(stream).unwrap());
        (res, index)
    };
    let (union, _) = run(MobaAttention::Union);
    let (gather, index) = run(MobaAttention::Gather);
    assert_eq!(
        gather.rows, union.rows,
        "{what}: the same gate must select the same blocks"
    );
    assert_eq!(
        index.unwrap(),
        moba_gather_index_cpu(&attn, &gather.rows).unwrap(),
        "{what}: transpose vs the CPU model"
    );
    let diff = rel_l2(&gather.out, &union.out);
    assert!(
        diff < tolerance::<T>(),
        "{what}: gather vs union rel err {diff}"
    );
    for (r, (&g, &u)) in gather.lse.iter().zip(&union.lse).enumerate() {
        assert!(
            (g == u) || (g - u).abs() <= 1e-3 * (1.0 + u.abs()),
            "{what}: lse[{r}] gather {g} vs union {u}"
        );
    }
    moba_check(mc, &x, gather, &what).0
}

/// [`moba_gather_run_on`] over every gather case, fresh inputs per case.
fn moba_gather_sweep<T: Element + DeviceRepr>(test: &str, seed: u64) {
    let Some(stream) = gpu_stream_or_skip(test) else {
        return;
    };
    let mut worst = 0.0f64;
    for (i, mc) in moba_gather_cases().iter().enumerate() {
        let x = mc.case().inputs::<T>(seed + i as u64);
        worst = worst.max(moba_gather_run_on(&stream, mc, x));
    }
    eprintln!("moba gather gpu {}: worst rel err {worst:.2e}", T::DTYPE);
}

/// The gather sweep's problems are valid gather problems: sized by `MobaGatherDims`, and
/// the CPU model of the transpose covers the CPU selection (runs without a GPU).
#[test]
fn moba_gather_cases_are_valid_gpu_problems() {
    for (i, mc) in moba_gather_cases().iter().enumerate() {
        let x = mc.case().inputs::<bf16>(70 + i as u64);
        let attn = x.bs.attention();
        let cfg = mc.config();
        let dims = MobaGpuDims::new(attn, &cfg).unwrap();
        let g = MobaGatherDims::new(attn, &dims).unwrap();
        let rows = moba_select_cpu(
            attn,
            &cfg,
            Strided::new(&x.q[..], x.qs),
            Strided::new(&x.k[..], x.ks),
        )
        .unwrap();
        let index = moba_gather_index_cpu(attn, &rows).unwrap();
        let chosen = (0..attn.lse_len())
            .map(|r| rows.row(r).unwrap().iter().filter(|&&kb| kb >= 0).count())
            .sum::<usize>();
        assert_eq!(
            index.entries.iter().map(Vec::len).sum::<usize>(),
            chosen,
            "{}",
            mc.name
        );
        for w in &index.work {
            assert!(w.len() <= g.max_work, "{}", mc.name);
        }
    }
}

#[test]
fn gpu_moba_gather_matches_reference_and_union_bf16() {
    moba_gather_sweep::<bf16>("gpu_moba_gather_matches_reference_and_union_bf16", 5000);
}

#[test]
fn gpu_moba_gather_matches_reference_and_union_f16() {
    moba_gather_sweep::<f16>("gpu_moba_gather_matches_reference_and_union_f16", 6000);
}

/// A gather plan is reusable and deterministic: a second forward on other inputs equals a
/// fresh plan's, bit for bit (output and LSE), and a repeated forward repeats it; the
/// refusals: a query-block plan, `gather_index` on the union path, too many key blocks.
#[test]
fn gpu_moba_gather_plan_replay_and_refusals() {
    let Some(stream) = gpu_stream_or_skip("gpu_moba_gather_plan_replay_and_refusals") else {
        return;
    };
    let mc = &moba_gather_cases()[0];
    let c = mc.case();
    let cfg = mc.config();
    let run = |plan: &mut MobaGpuPlan, seed: u64| {
        let x = c.inputs::<bf16>(seed);
        let d = x.upload(&stream);
        let (dq, dk, dv, mut dout, mut dlse) = (d.q, d.k, d.v, d.out, d.lse);
        plan.forward::<bf16, CudaSlice<bf16>, CudaSlice<bf16>>(
            &stream,
            Strided::new(&dq, x.qs),
            Strided::new(&dk, x.ks),
            Strided::new(&dv, x.ks),
            Strided::new(&mut dout, x.qs),
            Some(&mut dlse),
        )
        .unwrap();
        (
            stream.clone_dtoh(&dout).unwrap(),
            stream.clone_dtoh(&dlse).unwrap(),
        )
    };
    let attn = c.inputs::<bf16>(1).bs.attention().clone();
    let gather = |s: &Arc<CudaStream>| {
        MobaGpuPlan::new(&attn, &cfg, s)
            .unwrap()
            .with_attention(MobaAttention::Gather)
            .unwrap()
    };
    let mut reused = gather(&stream);
    let _ = run(&mut reused, 21);
    let second = run(&mut reused, 22);
    let again = run(&mut reused, 22);
    let fresh = run(&mut gather(&stream), 22);
    assert_eq!(second.0, fresh.0);
    assert_eq!(
        second.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        fresh.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(second.0, again.0);
    // Back to the union path: the scratch is dropped, gather_index refused.
    let union = reused.with_attention(MobaAttention::Union).unwrap();
    assert_eq!(union.gather_dims(), None);
    let r = union.gather_index(&stream);
    assert!(matches!(r, Err(Error::InvalidOption(_))), "{r:?}");
    // Query blocks keep the union attention.
    let r = MobaGpuPlan::with_query_blocks(&attn, &cfg, 128, &stream)
        .unwrap()
        .with_attention(MobaAttention::Gather);
    assert!(
        matches!(&r, Err(Error::Unsupported(m)) if m.contains("per-token")),
        "{r:?}"
    );
    // 8193 key blocks: the union path takes them, the gather path does not.
    let many = MobaCase {
        lens: vec![(64, 64 * GPU_GATHER_MAX_K_BLOCKS + 1)],
        ..moba_cases().remove(0)
    }
    .case()
    .attn();
    let cfg64 = MobaConfig {
        block_n: 64,
        top_k: 2,
    };
    let r = MobaGpuPlan::new(&many, &cfg64, &stream)
        .unwrap()
        .with_attention(MobaAttention::Gather);
    assert!(
        matches!(&r, Err(Error::Unsupported(m)) if m.contains("key blocks")),
        "{r:?}"
    );
}
