//! GPU throughput of the opt-in kernels on the shared tensor-core mainloop, each against the
//! dense kernels on the same work in the same run (bf16). Prints one `BENCH {json}` line per
//! (case, implementation), in the style of gpu_bench:
//! - `padded_*`: `DenseKernel::TensorCorePadded` at head dims 59..256 (96 and 192 padded to
//!   128 and 256; 59 and 111, not multiples of 8, on its element-wise variant, not yet
//!   verified on a GPU) against `TensorCore` and `Hopper` where they serve the head dim, and
//!   `HopperPersistent` (`longattn-wgmma-persistent`, head dims multiples of 8 up to 192,
//!   padded to 64 / 128 / 192 channels; not yet verified on a GPU);
//! - `bsparse_*`: `BlockSparseAttention` through a plan (128 x 128 blocks, random lists of a
//!   given density, all blocks Full; 16k, and 32k / 128k in group `bsparse_long`) on the
//!   mma.sync kernel and the Hopper kernel (`longattn-bsparse-wgmma`, not yet verified on a
//!   GPU), against dense full attention on the same sequence; `tflops` counts the visible
//!   pairs only, so equal TFLOP/s means time in proportion to density;
//! - `pprefill_*`: `PagedPrefill` over a shuffled page table (page sizes 1..256), one-shot
//!   (tables uploaded per call) and through a plan, against the dense tensor-core kernel on
//!   the same (contiguous) tokens and mask; at pages of 16 and 64 also over an FP8 e4m3
//!   cache (`longattn-pprefill-mma-fp8`, kernel not yet verified on a GPU); at pages of 16 and
//!   more also the Hopper kernel through a plan (`longattn-pprefill-wgmma-plan`, not yet run
//!   on a GPU) against the dense Hopper kernel on the same tokens (`longattn-wgmma`).
//! - `moba_*` (group `moba`): MoBA end to end through `MobaGpuPlan` (gating + attention, not
//!   yet run on a GPU) at 32k and 128k tokens, causal, GQA 32/8, d 128, blocks of 512 and
//!   4096 keys top-3 (and 128 top-8 at 32k), with the gate alone timed on the same call
//!   (`longattn-moba-gate`, its `gate_frac` of the end-to-end time; `longattn-moba-tc-gate`:
//!   the opt-in tensor-core gate alone, not yet run on a GPU, its `gate_frac` of the
//!   end-to-end time with the CUDA-core gate's time replaced by its own), against the dense
//!   causal kernels on the same sequence (`moba_dense_s*`). `tflops` counts the pairs the
//!   selection shows (see [`moba_pairs`]); `visit_frac` is those pairs over the pairs the
//!   attention kernel computes (64-row tiles x the keys of their unions).
//!   `longattn-moba-gather`: the same problems end to end (gate included) with the opt-in
//!   gather attention (`MobaAttention::Gather`, not yet run on a GPU); its `visit_frac` is
//!   the shown pairs over its work items' (64 rows x their block's keys, see
//!   [`moba_gather_pairs`]).
//!
//! TFLOP/s counts `4 * head_dim` FLOPs per visible (query, key) pair and head.
//! `cargo run --release --example family_bench`;
//! `FAMILY_BENCH=padded,bsparse,pprefill,bsparse_long,moba` (default: all) picks the groups.

use longattn::block_sparse::moba::{GPU_GATHER_ITEM_ROWS, GPU_TILE_ROWS, MobaAttention, MobaGate};
use longattn::cudarc::driver::{CudaSlice, CudaStream};
use longattn::*;
use std::sync::Arc;

mod support;

/// Median milliseconds of `run` over about 0.3 s (3..=50 runs) after one warm-up.
fn time_ms(stream: &Arc<CudaStream>, run: impl FnMut() -> Result<()>) -> Result<f64> {
    support::time_ms(stream, 300.0, 50, run)
}

fn emit(name: &str, imp: &str, (b, s, h, d): (usize, usize, usize, usize), ms: f64, flops: f64) {
    println!(
        "BENCH {{\"name\":\"{name}\",\"impl\":\"{imp}\",\"b\":{b},\"s\":{s},\"h\":{h},\"d\":{d},\"ms\":{ms:.4},\"tflops\":{:.2}}}",
        flops / ms / 1e9
    );
}

fn upload(stream: &Arc<CudaStream>, n: usize, seed: u64) -> Result<CudaSlice<bf16>> {
    Ok(stream.clone_htod(&support::uniform::<bf16>(n, seed))?)
}

/// Times one dense kernel on `shape` (fixed lengths, GQA as the shape says) under `opts`.
fn dense_ms(
    stream: &Arc<CudaStream>,
    shape: &AttentionShape,
    opts: &AttentionOptions,
    kernel: DenseKernel,
) -> Result<f64> {
    let SeqLens::Fixed { seqlen_q, seqlen_k } = shape.seqlens else {
        unreachable!("fixed lengths only")
    };
    let (b, hq, hkv, d) = (shape.batch, shape.heads_q, shape.heads_kv, shape.head_dim);
    let attn = FlashAttention::new(shape, opts)?.with_kernel(kernel);
    let (qs, ks) = (
        Strides::contiguous(seqlen_q, hq, d),
        Strides::contiguous(seqlen_k, hkv, d),
    );
    let q = upload(stream, b * seqlen_q * hq * d, 1)?;
    let k = upload(stream, b * seqlen_k * hkv * d, 2)?;
    let v = upload(stream, b * seqlen_k * hkv * d, 3)?;
    let mut o: CudaSlice<bf16> = stream.alloc_zeros(b * seqlen_q * hq * d)?;
    time_ms(stream, || {
        attn.forward_gpu(
            stream,
            Strided::new(&q, qs),
            Strided::new(&k, ks),
            Strided::new(&v, ks),
            Strided::new(&mut o, qs),
            None,
        )
    })
}

/// The padded tensor-core kernel at every head dim it adds, against the kernels that serve
/// the head dim today, on 16k tokens (4 x 4096) and 2048 / d heads (rounded).
fn padded(stream: &Arc<CudaStream>) {
    let s = 4096;
    for d in [59usize, 64, 96, 111, 128, 192, 256] {
        for causal in [false, true] {
            let h = 2048usize.div_ceil(d);
            let shape = AttentionShape {
                batch: 4,
                heads_q: h,
                heads_kv: h,
                head_dim: d,
                seqlens: SeqLens::Fixed {
                    seqlen_q: s,
                    seqlen_k: s,
                },
            };
            let opts = if causal {
                AttentionOptions::causal()
            } else {
                AttentionOptions::default()
            };
            let name = format!(
                "padded_d{d}_s{s}_{}",
                if causal { "causal" } else { "full" }
            );
            let flops = 4.0
                * (4 * h * d) as f64
                * support::visible_pairs(&opts.effective_mask(), s, s) as f64;
            for (kernel, imp) in [
                (DenseKernel::TensorCorePadded, "longattn-mma-padded"),
                (DenseKernel::TensorCore, "longattn-mma"),
                (DenseKernel::Hopper, "longattn-wgmma"),
                (DenseKernel::HopperPersistent, "longattn-wgmma-persistent"),
                (DenseKernel::Simt, "longattn-simt"),
            ] {
                // SIMT only where no tensor-core kernel but the padded one serves the dim (and
                // only the padded kernel takes head dims that are not multiples of 8).
                if kernel == DenseKernel::Simt
                    && ([64, 128, 256].contains(&d) || !d.is_multiple_of(8))
                {
                    continue;
                }
                match dense_ms(stream, &shape, &opts, kernel) {
                    Ok(ms) => emit(&name, imp, (4, s, h, d), ms, flops),
                    Err(e) => println!("# {name} {imp}: {e}"),
                }
            }
        }
    }
}

/// Random 128 x 128 block lists of `density` over one 16k sequence, 16 heads, d 128; every
/// listed block Full (no element mask), one list set per head. Each mask runs on the mma.sync
/// kernel (`longattn-bsparse-mma`) and the Hopper kernel (`longattn-bsparse-wgmma`, not yet
/// verified on a GPU; a line `# ...` where it cannot run), next to the dense kernels on the
/// same sequence.
fn block_sparse(stream: &Arc<CudaStream>) -> Result<()> {
    block_sparse_at(stream, 16384, &[0.05, 0.1, 0.25, 0.5, 1.0])
}

/// [`block_sparse`] at the long lengths, 32k and 128k tokens, densities 5-50% (group
/// `bsparse_long`, run last: it takes longest).
fn block_sparse_long(stream: &Arc<CudaStream>) -> Result<()> {
    for s in [32768usize, 131072] {
        block_sparse_at(stream, s, &[0.05, 0.1, 0.25, 0.5])?;
    }
    Ok(())
}

/// The block-sparse rows of one sequence length `s` (see [`block_sparse`]).
fn block_sparse_at(stream: &Arc<CudaStream>, s: usize, densities: &[f64]) -> Result<()> {
    let (h, d, blk) = (16usize, 128usize, 128usize);
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
    let opts = AttentionOptions::default();
    let st = Strides::contiguous(s, h, d);
    let n = s * h * d;
    let (q, k, v) = (
        upload(stream, n, 1)?,
        upload(stream, n, 2)?,
        upload(stream, n, 3)?,
    );
    let mut o: CudaSlice<bf16> = stream.alloc_zeros(n)?;
    let dense_flops = 4.0 * (h * d) as f64 * (s * s) as f64;
    for (kernel, imp) in [
        (DenseKernel::TensorCore, "longattn-mma"),
        (DenseKernel::Hopper, "longattn-wgmma"),
    ] {
        match dense_ms(stream, &shape, &opts, kernel) {
            Ok(ms) => emit(
                &format!("bsparse_dense_s{s}"),
                imp,
                (1, s, h, d),
                ms,
                dense_flops,
            ),
            Err(e) => println!("# bsparse_dense_s{s} {imp}: {e}"),
        }
    }
    for &density in densities {
        let dims = BlockMaskDims::for_lengths(1, h, s, s, blk, blk)?;
        let nk = dims.num_k_blocks;
        let mut state = 7u64 + (density * 1000.0) as u64;
        let mut listed = 0u64;
        let mask = BlockMask::from_lists(dims, |_| {
            let kept: Vec<(usize, BlockKind)> = (0..nk)
                .filter(|_| {
                    (support::lcg(&mut state) >> 11) as f64 / (1u64 << 53) as f64 <= density
                })
                .map(|kb| (kb, BlockKind::Full))
                .collect();
            listed += kept.len() as u64;
            kept
        })?;
        let bs = BlockSparseAttention::new(FlashAttention::new(&shape, &opts)?, mask)?;
        let flops = 4.0 * d as f64 * (listed * (blk * blk) as u64) as f64;
        let name = format!("bsparse_b128_density{}_s{s}", (density * 100.0).round());
        for (kernel, imp) in [
            (BlockSparseKernel::TensorCore, "longattn-bsparse-mma"),
            (BlockSparseKernel::Hopper, "longattn-bsparse-wgmma"),
        ] {
            let timed = bs
                .clone()
                .with_kernel(kernel)
                .plan_gpu(stream)
                .and_then(|plan| {
                    time_ms(stream, || {
                        plan.forward::<bf16, _, _>(
                            stream,
                            Strided::new(&q, st),
                            Strided::new(&k, st),
                            Strided::new(&v, st),
                            Strided::new(&mut o, st),
                            None,
                        )
                    })
                });
            match timed {
                Ok(ms) => emit(&name, imp, (1, s, h, d), ms, flops),
                Err(e) => println!("# {name} {imp}: {e}"),
            }
        }
    }
    Ok(())
}

/// Paged prefill of a `q_len`-token chunk at the end of a `context`-token sequence (causal,
/// GQA 32/8, d 128) over pages in shuffled order, against the dense tensor-core kernel on the
/// same tokens stored contiguously.
fn paged_prefill(stream: &Arc<CudaStream>) -> Result<()> {
    let (hq, hkv, d) = (32usize, 8usize, 128usize);
    let opts = AttentionOptions::causal();
    for (batch, q_len, context) in [(1usize, 2048usize, 16384usize), (2, 8192, 8192)] {
        let flops = 4.0
            * (batch * hq * d) as f64
            * support::visible_pairs(&opts.effective_mask(), q_len, context) as f64;
        let name = format!("pprefill_q{q_len}_ctx{context}_b{batch}");
        let shape = AttentionShape {
            batch,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            seqlens: SeqLens::Fixed {
                seqlen_q: q_len,
                seqlen_k: context,
            },
        };
        match dense_ms(stream, &shape, &opts, DenseKernel::TensorCore) {
            Ok(ms) => emit(&name, "longattn-mma", (batch, q_len, hq, d), ms, flops),
            Err(e) => println!("# {name} dense: {e}"),
        }
        // The reference of the Hopper paged prefill: the dense Hopper kernel, same tokens.
        match dense_ms(stream, &shape, &opts, DenseKernel::Hopper) {
            Ok(ms) => emit(&name, "longattn-wgmma", (batch, q_len, hq, d), ms, flops),
            Err(e) => println!("# {name} dense wgmma: {e}"),
        }
        for page_size in [1usize, 16, 64, 256] {
            let per_seq = context.div_ceil(page_size);
            let num_pages = batch * per_seq;
            // Pages in a fixed pseudo-random order (a Fisher-Yates shuffle of 0..num_pages).
            let mut table: Vec<i32> = (0..num_pages as i32).collect();
            let mut state = page_size as u64;
            for i in (1..num_pages).rev() {
                let j = (support::lcg(&mut state) >> 33) as usize % (i + 1);
                table.swap(i, j);
            }
            let layout = PagedLayout {
                num_pages,
                page_size,
                heads_kv: hkv,
                head_dim: d,
            };
            let seqlens = vec![i32::try_from(context).expect("context fits i32"); batch];
            let cache = PagedCache::new(
                layout,
                PageTable {
                    block_table: &table,
                    max_pages_per_seq: per_seq,
                    seqlens_k: &seqlens,
                },
            )?;
            let pf = PagedPrefill::new(&cache, hq, q_len, &opts)?;
            let kc = upload(stream, layout.cache_len(), 2)?;
            let vc = upload(stream, layout.cache_len(), 3)?;
            let qs = Strides::contiguous(q_len, hq, d);
            let q = upload(stream, pf.out_len(), 1)?;
            let mut o: CudaSlice<bf16> = stream.alloc_zeros(pf.out_len())?;
            let ms = time_ms(stream, || {
                pf.forward_gpu::<bf16, bf16, _, _, _>(
                    stream,
                    Strided::new(&q, qs),
                    KvPages { k: &kc, v: &vc },
                    Strided::new(&mut o, qs),
                    None,
                )
            })?;
            emit(
                &format!("{name}_ps{page_size}"),
                "longattn-pprefill-mma",
                (batch, q_len, hq, d),
                ms,
                flops,
            );
            // Through a plan (tables uploaded once): what an engine runs per layer.
            let plan = pf.plan_gpu(stream)?;
            let ms = time_ms(stream, || {
                plan.forward::<bf16, bf16, _, _, _>(
                    stream,
                    Strided::new(&q, qs),
                    KvPages { k: &kc, v: &vc },
                    Strided::new(&mut o, qs),
                    None,
                )
            })?;
            emit(
                &format!("{name}_ps{page_size}"),
                "longattn-pprefill-mma-plan",
                (batch, q_len, hq, d),
                ms,
                flops,
            );
            // The Hopper kernel (TMA copies of whole pages, not yet run on a GPU) through a
            // plan, at the page sizes it takes (powers of two from 16).
            if page_size >= 16 {
                let hopper = pf.clone().with_kernel(PagedPrefillKernel::Hopper);
                let ran = hopper.plan_gpu(stream).and_then(|plan| {
                    time_ms(stream, || {
                        plan.forward::<bf16, bf16, _, _, _>(
                            stream,
                            Strided::new(&q, qs),
                            KvPages { k: &kc, v: &vc },
                            Strided::new(&mut o, qs),
                            None,
                        )
                    })
                });
                match ran {
                    Ok(ms) => emit(
                        &format!("{name}_ps{page_size}"),
                        "longattn-pprefill-wgmma-plan",
                        (batch, q_len, hq, d),
                        ms,
                        flops,
                    ),
                    Err(e) => println!("# {name}_ps{page_size} wgmma: {e}"),
                }
            }
            // Over an FP8 e4m3 copy of the cache (random codes, scale 1/448): half the K/V
            // bytes, a conversion pass per tile.
            if page_size == 16 || page_size == 64 {
                let fp8 = cache.clone().with_kv_scales(KvScales::uniform(
                    hkv,
                    1.0 / 448.0,
                    1.0 / 448.0,
                )?)?;
                let pf8 = PagedPrefill::new(&fp8, hq, q_len, &opts)?;
                let codes = |seed: u64| -> Result<CudaSlice<F8E4M3>> {
                    let mut st = seed;
                    let host: Vec<F8E4M3> = (0..layout.cache_len())
                        .map(|_| F8E4M3::from_bits((support::lcg(&mut st) >> 56) as u8 & 0x7e))
                        .collect();
                    Ok(stream.clone_htod(&host)?)
                };
                let (k8, v8) = (codes(5)?, codes(6)?);
                let ms = time_ms(stream, || {
                    pf8.forward_gpu::<bf16, F8E4M3, _, _, _>(
                        stream,
                        Strided::new(&q, qs),
                        KvPages { k: &k8, v: &v8 },
                        Strided::new(&mut o, qs),
                        None,
                    )
                })?;
                emit(
                    &format!("{name}_ps{page_size}"),
                    "longattn-pprefill-mma-fp8",
                    (batch, q_len, hq, d),
                    ms,
                    flops,
                );
            }
        }
    }
    Ok(())
}

/// The (query, key) pairs MoBA shows and the pairs its attention kernel computes, from the
/// plan's selection after a forward, for one sequence (`batch` 1, `seqlen_q == seqlen_k ==
/// s`, causal, the only shape the `moba` rows run):
/// - shown: row `i` (position `p = i`) sees key `j` of each selected block `kb` iff `j <= p`,
///   so a block adds `min((kb + 1) * block_n, s, p + 1) - kb * block_n` keys (saturating).
///   Every row selects `min(top_k, own + 1)` blocks, its own among them, so the count does
///   not depend on which blocks win; the PyTorch baseline counts the same pairs from its own
///   selection;
/// - computed: each 64-row tile visits every key of its union's blocks (masked per row), so
///   a tile adds 64 x the keys of its union (clipped at `s`).
fn moba_pairs(plan: &MobaGpuPlan, stream: &Arc<CudaStream>, s: usize) -> Result<(u64, u64)> {
    let bn = plan.config().block_n;
    let keys = |kb: usize, end: usize| end.min((kb + 1) * bn).saturating_sub(kb * bn) as u64;
    let rows = plan.row_blocks(stream)?;
    let mut shown = 0u64;
    for r in 0..plan.problem().lse_len() {
        let p = r % s; // rows in LSE order [batch 1, heads_q, s]
        let list = rows.row(r).unwrap_or_default();
        shown += list.iter().map(|&kb| keys(kb as usize, p + 1)).sum::<u64>();
    }
    let computed = plan
        .tile_unions(stream)?
        .iter()
        .map(|u| GPU_TILE_ROWS as u64 * u.iter().map(|&kb| keys(kb as usize, s)).sum::<u64>())
        .sum();
    Ok((shown, computed))
}

/// The pairs the gather attention computes (`MobaAttention::Gather`, after a forward): each
/// work item is a full 64-row tile over its block's keys (clipped at `s`; a short item
/// repeats a row), so an item adds 64 x the block's keys.
fn moba_gather_pairs(plan: &MobaGpuPlan, stream: &Arc<CudaStream>, s: usize) -> Result<u64> {
    let bn = plan.config().block_n;
    let keys = |kb: usize| s.min((kb + 1) * bn).saturating_sub(kb * bn) as u64;
    Ok(plan
        .gather_index(stream)?
        .work
        .iter()
        .flatten()
        .map(|it| GPU_GATHER_ITEM_ROWS as u64 * keys(it[0] as usize))
        .sum())
}

/// MoBA end to end (gating + attention, `MobaGpuPlan::forward`) and its gate alone
/// (`MobaGpuPlan::select`, the same launches without the attention) on one 32k or 128k
/// sequence, causal, 32 query / 8 kv heads, d 128, uniform random inputs; then the dense
/// causal kernels on the same sequence (`moba_dense_s*`: what MoBA saves).
fn moba(stream: &Arc<CudaStream>) -> Result<()> {
    let (hq, hkv, d) = (32usize, 8usize, 128usize);
    let opts = AttentionOptions::causal();
    for s in [32768usize, 131072] {
        let shape = AttentionShape {
            batch: 1,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            seqlens: SeqLens::Fixed {
                seqlen_q: s,
                seqlen_k: s,
            },
        };
        let attn = FlashAttention::new(&shape, &opts)?;
        let (qs, ks) = (
            Strides::contiguous(s, hq, d),
            Strides::contiguous(s, hkv, d),
        );
        let q = upload(stream, s * hq * d, 1)?;
        let k = upload(stream, s * hkv * d, 2)?;
        let v = upload(stream, s * hkv * d, 3)?;
        let mut o: CudaSlice<bf16> = stream.alloc_zeros(s * hq * d)?;
        let mut configs = vec![(512usize, 3usize), (4096, 3)];
        if s == 32768 {
            configs.insert(0, (128, 8));
        }
        for (block_n, top_k) in configs {
            let name = format!("moba_b{block_n}_top{top_k}_s{s}");
            let ran = (|| -> Result<(f64, f64, u64, u64)> {
                let mut plan = MobaGpuPlan::new(&attn, &MobaConfig { block_n, top_k }, stream)?;
                let e2e = time_ms(stream, || {
                    plan.forward::<bf16, _, _>(
                        stream,
                        Strided::new(&q, qs),
                        Strided::new(&k, ks),
                        Strided::new(&v, ks),
                        Strided::new(&mut o, qs),
                        None,
                    )
                })?;
                let (shown, computed) = moba_pairs(&plan, stream, s)?;
                let mut select = |plan: &mut MobaGpuPlan| {
                    time_ms(stream, || {
                        plan.select::<bf16, _, _>(
                            stream,
                            Strided::new(&q, qs),
                            Strided::new(&k, ks),
                            Strided::new(&v, ks),
                            Strided::new(&mut o, qs),
                            None,
                        )
                    })
                };
                let gate = select(&mut plan)?;
                // The opt-in tensor-core gate (not yet run on a GPU), timed alone.
                let mut tc = plan.with_gate(MobaGate::TensorCore)?;
                match select(&mut tc) {
                    Ok(tc_gate) => println!(
                        "BENCH {{\"name\":\"{name}\",\"impl\":\"longattn-moba-tc-gate\",\"b\":1,\"s\":{s},\"h\":{hq},\"d\":{d},\"ms\":{tc_gate:.4},\"gate_frac\":{:.4}}}",
                        tc_gate / (e2e - gate + tc_gate)
                    ),
                    Err(e) => println!("# {name} longattn-moba-tc-gate: {e}"),
                }
                Ok((e2e, gate, shown, computed))
            })();
            match ran {
                Ok((e2e, gate, shown, computed)) => {
                    println!(
                        "BENCH {{\"name\":\"{name}\",\"impl\":\"longattn-moba\",\"b\":1,\"s\":{s},\"h\":{hq},\"d\":{d},\"ms\":{e2e:.4},\"tflops\":{:.2},\"visit_frac\":{:.4}}}",
                        4.0 * d as f64 * shown as f64 / e2e / 1e9,
                        shown as f64 / computed.max(1) as f64
                    );
                    println!(
                        "BENCH {{\"name\":\"{name}\",\"impl\":\"longattn-moba-gate\",\"b\":1,\"s\":{s},\"h\":{hq},\"d\":{d},\"ms\":{gate:.4},\"gate_frac\":{:.4}}}",
                        gate / e2e
                    );
                }
                Err(e) => println!("# {name} longattn-moba: {e}"),
            }
            // The opt-in gather attention (not yet run on a GPU), end to end with its gate.
            let gathered = (|| -> Result<(f64, u64, u64)> {
                let mut plan = MobaGpuPlan::new(&attn, &MobaConfig { block_n, top_k }, stream)?
                    .with_attention(MobaAttention::Gather)?;
                let e2e = time_ms(stream, || {
                    plan.forward::<bf16, _, _>(
                        stream,
                        Strided::new(&q, qs),
                        Strided::new(&k, ks),
                        Strided::new(&v, ks),
                        Strided::new(&mut o, qs),
                        None,
                    )
                })?;
                let (shown, _) = moba_pairs(&plan, stream, s)?;
                Ok((e2e, shown, moba_gather_pairs(&plan, stream, s)?))
            })();
            match gathered {
                Ok((e2e, shown, computed)) => println!(
                    "BENCH {{\"name\":\"{name}\",\"impl\":\"longattn-moba-gather\",\"b\":1,\"s\":{s},\"h\":{hq},\"d\":{d},\"ms\":{e2e:.4},\"tflops\":{:.2},\"visit_frac\":{:.4}}}",
                    4.0 * d as f64 * shown as f64 / e2e / 1e9,
                    shown as f64 / computed.max(1) as f64
                ),
                Err(e) => println!("# {name} longattn-moba-gather: {e}"),
            }
        }
        let dense_flops =
            4.0 * (hq * d) as f64 * support::visible_pairs(&opts.effective_mask(), s, s) as f64;
        for (kernel, imp) in [
            (DenseKernel::TensorCore, "longattn-mma"),
            (DenseKernel::Hopper, "longattn-wgmma"),
        ] {
            match dense_ms(stream, &shape, &opts, kernel) {
                Ok(ms) => emit(
                    &format!("moba_dense_s{s}"),
                    imp,
                    (1, s, hq, d),
                    ms,
                    dense_flops,
                ),
                Err(e) => println!("# moba_dense_s{s} {imp}: {e}"),
            }
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let ctx = longattn::device::open_gpu(0)?;
    let stream = ctx.default_stream();
    println!(
        "# family_bench on {} (opt-in kernels, first GPU runs)",
        Device::Cuda(ctx.clone()).describe()
    );
    let wanted = std::env::var("FAMILY_BENCH")
        .unwrap_or_else(|_| "padded,bsparse,pprefill,bsparse_long,moba".into());
    let on = |g: &str| wanted.split(',').any(|w| w.trim() == g);
    if on("padded") {
        padded(&stream);
    }
    if on("bsparse")
        && let Err(e) = block_sparse(&stream)
    {
        println!("# bsparse: {e}");
    }
    if on("pprefill")
        && let Err(e) = paged_prefill(&stream)
    {
        println!("# pprefill: {e}");
    }
    if on("bsparse_long")
        && let Err(e) = block_sparse_long(&stream)
    {
        println!("# bsparse_long: {e}");
    }
    if on("moba")
        && let Err(e) = moba(&stream)
    {
        println!("# moba: {e}");
    }
    Ok(())
}
