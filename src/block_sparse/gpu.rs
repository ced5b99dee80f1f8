//! `BlockSparseAttention::forward_gpu`: validation, then the block-sparse tensor-core kernel
//! (`kernels/block_sparse_mma.cu`, the shared mma.sync mainloop iterating each query block's
//! listed key blocks), or, asked for by name ([`BlockSparseKernel::Hopper`]), the Hopper kernel
//! (`kernels/block_sparse_wgmma.cu`, the wgmma mainloop over the same lists; **not yet run on
//! a GPU**).
//!
//! **Verified on an H200 (sm_90a build) on 2026-12-04**: `tests/block_sparse_gpu.rs` passed
//! (worst rel. error bf16 2.38e-3, f16 3.03e-4), compute-sanitizer memcheck clean, racecheck
//! of the plan test 0 hazards. The sm_80 (Ampere) build has not run on a GPU. It runs only
//! when a caller asks for it by calling [`BlockSparseAttention::forward_gpu`] or a
//! [`BlockSparseGpuPlan`]; nothing in the crate picks it automatically.

use super::{BlockSparseAttention, BlockSparseKernel};
use crate::dense::gpu::CuSeqlens;
use crate::element::{DType, Element};
use crate::error::{Error, Result};
use crate::gpu::{
    DeviceBuffer, DeviceBufferMut, check_attention_gpu, check_tensor_core_head_dim, cuda_call,
};
use crate::layout::{Strided, Strides};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use std::sync::Arc;

/// Head dims of the block-sparse kernels.
pub const GPU_HEAD_DIMS: [usize; 3] = crate::gpu::TENSOR_CORE_HEAD_DIMS;

/// [`BlockSparseKernel::Hopper`] takes `block_m` multiples of this: its query tile (128 rows,
/// one wgmma row block per consumer warpgroup), so that a tile lies inside one query block.
pub const HOPPER_BLOCK_M_MULTIPLE: usize = 128;

/// [`BlockSparseKernel::Hopper`] takes `block_n` multiples of this at `head_dim`: its key tile
/// (128 keys at head_dim 64 and 128, 64 at 256, where the shared-memory rings hold less), so
/// that a key tile lies inside one key block.
pub const fn hopper_block_n_multiple(head_dim: usize) -> usize {
    if head_dim > 128 { 64 } else { 128 }
}

/// Largest stride, in bytes, of a tensor map dimension (the copy engine's 2^40 limit).
const TMA_MAX_STRIDE_BYTES: i64 = 1 << 40;

impl BlockSparseAttention {
    /// GPU forward pass on `stream` (the caller's; nothing is synchronized). **Verified on an
    /// H200 (2026-12-04; sm_80 not run); explicit opt-in only.**
    ///
    /// Buffers as for [`FlashAttention::forward_gpu`](crate::FlashAttention::forward_gpu):
    /// device buffers with element strides, pointers 16-byte aligned, strides multiples of 8
    /// elements; f16 and bf16; `head_dim` 64, 128 or 256; block sizes multiples of
    /// [`GPU_BLOCK_MULTIPLE`](super::GPU_BLOCK_MULTIPLE); a device of compute capability 8.0
    /// or newer. A per-row selection ([`RowBlocks`](super::RowBlocks), MoBA) attached to the
    /// problem runs on the CPU only (MoBA on the GPU is
    /// [`MobaGpuPlan`](super::moba::MobaGpuPlan)). Anything else the kernel does not take is `Error::Unsupported` (checked before
    /// any pointer is touched).
    ///
    /// Runs the kernel chosen with [`BlockSparseAttention::with_kernel`]: the verified
    /// mma.sync kernel by default, [`BlockSparseKernel::Hopper`] (not yet run on a GPU) only
    /// when asked for, with its own restrictions checked here too.
    ///
    /// The block mask (CSR offsets, indices, full flags) and the varlen offsets are copied to
    /// the device on `stream` on every call; [`BlockSparseAttention::plan_gpu`] copies them
    /// once for repeated calls (and CUDA-graph capture).
    pub fn forward_gpu<T, I, O>(
        &self,
        stream: &Arc<CudaStream>,
        q: Strided<&I>,
        k: Strided<&I>,
        v: Strided<&I>,
        out: Strided<&mut O>,
        lse: Option<&mut dyn DeviceBufferMut<f32>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        I: DeviceBuffer<T>,
        O: DeviceBufferMut<T>,
    {
        self.check_gpu(
            T::DTYPE,
            [q.extent(), k.extent(), v.extent(), out.extent()],
            lse.as_ref().map(|l| l.len()),
        )?;
        cuda_call!(launch, self, stream, None::<&DeviceMask>, q, k, v, out, lse)
    }

    /// Checks what the GPU kernel supports (everything but the buffers) and copies the block
    /// mask and the varlen offsets to the device once, on `stream`, for
    /// [`BlockSparseGpuPlan::forward`].
    pub fn plan_gpu(&self, stream: &Arc<CudaStream>) -> Result<BlockSparseGpuPlan> {
        self.check_gpu_problem()?;
        Ok(BlockSparseGpuPlan {
            bs: self.clone(),
            mask: DeviceMask::upload(self, stream)?,
        })
    }

    /// What the kernel takes, independent of the buffers: lengths within
    /// `i32::MAX - 2^16` (the GPU position limit, docs/semantics.md), no per-row selection, block sizes
    /// multiples of 64, head dim 64/128/256; for [`BlockSparseKernel::Hopper`] also block
    /// sizes multiples of its tiles ([`HOPPER_BLOCK_M_MULTIPLE`], [`hopper_block_n_multiple`]).
    fn check_gpu_problem(&self) -> Result<()> {
        self.attn.check_gpu_positions("block-sparse attention")?;
        if self.rows.is_some() {
            return Err(Error::Unsupported(
                "per-row block selection runs on the CPU only".into(),
            ));
        }
        let d = self.mask.dims;
        d.check_gpu_block_sizes()
            .map_err(|e| Error::Unsupported(e.to_string()))?;
        check_tensor_core_head_dim("the block-sparse kernel takes", self.attn.head_dim)?;
        if self.kernel == BlockSparseKernel::Hopper {
            let tile_n = hopper_block_n_multiple(self.attn.head_dim);
            for (name, value, tile, what) in [
                ("block_m", d.block_m, HOPPER_BLOCK_M_MULTIPLE, "query tile"),
                ("block_n", d.block_n, tile_n, "key tile at this head_dim"),
            ] {
                if !value.is_multiple_of(tile) {
                    return Err(Error::Unsupported(format!(
                        "the Hopper block-sparse kernel takes {name} a multiple of {tile} (its \
                         {what}), not {value}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// For [`BlockSparseKernel::Hopper`]: whether the copy engine can address q, k and v
    /// (`bufs`: q, k, v, out as for [`Self::check_gpu`]), as `tma_host::operand_mappable`:
    /// every stride of a dimension longer than 1 positive and below 2^40 bytes (the 16-byte
    /// multiples are every GPU kernel's rule, checked with the pointers). Elements are 2 bytes
    /// (f16 / bf16, checked before).
    fn check_hopper_strides(&self, bufs: &[(usize, &Strides); 4]) -> Result<()> {
        let a = &self.attn;
        let varlen = a.is_varlen();
        let (q_rows, k_rows) = if varlen {
            (a.total_q, a.total_k)
        } else {
            (a.max_seqlen_q, a.max_seqlen_k)
        };
        let batch = if varlen { 1 } else { a.batch };
        let operands = [
            ("q", bufs[0].1, q_rows, a.heads_q),
            ("k", bufs[1].1, k_rows, a.heads_kv),
            ("v", bufs[2].1, k_rows, a.heads_kv),
        ];
        for (name, st, rows, heads) in operands {
            for (dim, stride, extent) in [
                ("seq", st.seq, rows),
                ("head", st.head, heads),
                ("batch", st.batch, batch),
            ] {
                let bytes = stride.checked_mul(2);
                let ok = extent <= 1 || bytes.is_some_and(|b| b > 0 && b < TMA_MAX_STRIDE_BYTES);
                if !ok {
                    return Err(Error::Unsupported(format!(
                        "the Hopper block-sparse kernel's copy engine cannot address {name}: its \
                         {dim} stride {stride} must be positive and below 2^40 bytes"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Every check of a GPU call that needs no device pointer, in this order: the problem
    /// ([`Self::check_gpu_problem`]), the buffers' extents and strides (as the CPU path), then
    /// dtype, head dim and grid limits, and for [`BlockSparseKernel::Hopper`] the strides its
    /// copy engine needs.
    pub(crate) fn check_gpu(
        &self,
        dtype: DType,
        bufs: [(usize, &Strides); 4],
        lse_len: Option<usize>,
    ) -> Result<()> {
        self.check_gpu_problem()?;
        let a = &self.attn;
        a.check_buffers(bufs[0], bufs[1], bufs[2], bufs[3], lse_len)?;
        check_attention_gpu("block-sparse", dtype, a.head_dim, a.batch, a.heads_q)?;
        if self.kernel == BlockSparseKernel::Hopper {
            self.check_hopper_strides(&bufs)?;
        }
        Ok(())
    }
}

/// A block-sparse problem bound to its device-resident block mask and varlen offsets:
/// [`BlockSparseGpuPlan::forward`] makes no allocation and no host-device copy, so a CUDA
/// graph can capture it. The arrays live on the stream that built the plan; use the plan on
/// that stream (or order other streams after it). **Verified on an H200 (2026-12-04).**
#[derive(Debug)]
pub struct BlockSparseGpuPlan {
    bs: BlockSparseAttention,
    mask: DeviceMask,
}

impl BlockSparseGpuPlan {
    /// The validated problem.
    pub fn problem(&self) -> &BlockSparseAttention {
        &self.bs
    }

    /// [`BlockSparseAttention::forward_gpu`] without the per-call uploads: validation (host
    /// only) and one launch on `stream`.
    pub fn forward<T, I, O>(
        &self,
        stream: &Arc<CudaStream>,
        q: Strided<&I>,
        k: Strided<&I>,
        v: Strided<&I>,
        out: Strided<&mut O>,
        lse: Option<&mut dyn DeviceBufferMut<f32>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        I: DeviceBuffer<T>,
        O: DeviceBufferMut<T>,
    {
        self.bs.check_gpu(
            T::DTYPE,
            [q.extent(), k.extent(), v.extent(), out.extent()],
            lse.as_ref().map(|l| l.len()),
        )?;
        cuda_call!(
            launch,
            &self.bs,
            stream,
            Some(&self.mask),
            q,
            k,
            v,
            out,
            lse
        )
    }
}

/// The block mask's CSR arrays and the varlen offsets on the device. `indices` and `full`
/// hold at least one element (a mask with no listed block uploads one unused entry), so
/// the kernel never sees a null array.
#[derive(Debug)]
#[cfg_attr(not(longattn_cuda), allow(dead_code))]
struct DeviceMask {
    offsets: CudaSlice<i32>,
    indices: CudaSlice<i32>,
    full: CudaSlice<u8>,
    cu_seqlens: Option<CuSeqlens>,
}

impl DeviceMask {
    fn upload(bs: &BlockSparseAttention, stream: &Arc<CudaStream>) -> Result<Self> {
        let m = &bs.mask;
        let (indices, full) = if m.indices.is_empty() {
            (stream.clone_htod(&[0i32])?, stream.clone_htod(&[0u8])?)
        } else {
            (stream.clone_htod(&m.indices)?, stream.clone_htod(&m.full)?)
        };
        Ok(DeviceMask {
            offsets: stream.clone_htod(&m.offsets)?,
            indices,
            full,
            cu_seqlens: bs.attn.upload_varlen(stream)?,
        })
    }
}

#[cfg(longattn_cuda)]
#[allow(clippy::too_many_arguments)]
fn launch<T, I, O>(
    bs: &BlockSparseAttention,
    stream: &Arc<CudaStream>,
    planned: Option<&DeviceMask>,
    q: Strided<&I>,
    k: Strided<&I>,
    v: Strided<&I>,
    out: Strided<&mut O>,
    lse: Option<&mut dyn DeviceBufferMut<f32>>,
) -> Result<()>
where
    T: Element + DeviceRepr,
    I: DeviceBuffer<T>,
    O: DeviceBufferMut<T>,
{
    use crate::dense::gpu::ffi_params;
    use crate::gpu::{QkvoPtrs, check_launch, ffi, ptr_mut_or_null, ptr_or_null, reason_text};
    use cudarc::driver::DevicePtr;
    let attn = &bs.attn;
    if attn.total_q == 0 {
        return Ok(());
    }
    let ptrs = QkvoPtrs::new(stream, &q, &k, &v, (&mut *out.data, &out.strides))?;
    // A plan's arrays are already on the device; a one-shot call uploads them here.
    let uploaded = match planned {
        Some(_) => None,
        None => Some(DeviceMask::upload(bs, stream)?),
    };
    let dm = planned.or(uploaded.as_ref()).expect("planned or uploaded");
    let cu = dm.cu_seqlens.as_ref();
    let (cu_q, _cq_sync) = ptr_or_null(cu.map(|(cq, _)| cq), stream);
    let (cu_k, _ck_sync) = ptr_or_null(cu.map(|(_, ck)| ck), stream);
    let (lse_ptr, _lse_sync) = ptr_mut_or_null(lse, stream);
    let (offsets, _off_sync) = dm.offsets.device_ptr(stream);
    let (indices, _idx_sync) = dm.indices.device_ptr(stream);
    let (full, _full_sync) = dm.full.device_ptr(stream);
    let strides = [&q.strides, &k.strides, &v.strides, &out.strides];
    let d = bs.mask.dims;
    // Dims fit i32: BlockMaskDims::num_lists and the problem's lengths are checked.
    let params = ffi::LaBlockSparseParams {
        dense: ffi_params::<T>(attn, &ptrs, strides, (cu_q, cu_k), lse_ptr),
        offsets: offsets as *const i32,
        indices: indices as *const i32,
        full: full as *const u8,
        mask_batch: d.batch as i32,
        mask_heads: d.heads as i32,
        num_q_blocks: d.num_q_blocks as i32,
        num_k_blocks: d.num_k_blocks as i32,
        block_m: d.block_m as i32,
        block_n: d.block_n as i32,
    };
    // SAFETY: every pointer comes from a live cudarc buffer whose extent was checked against
    // the strides (q, k, v, out, lse) or that holds the validated block mask of `bs` (whose
    // dims were checked against the problem in `BlockSparseAttention::new`); the launch is
    // ordered on `stream`, and the sync guards keep cudarc's event tracking correct until it
    // is queued.
    let code = match bs.kernel {
        // SAFETY: see above.
        BlockSparseKernel::TensorCore => unsafe {
            ffi::la_block_sparse_mma_forward(&params, crate::gpu::launch_stream(stream)? as _)
        },
        // SAFETY: see above.
        BlockSparseKernel::Hopper => unsafe {
            ffi::la_block_sparse_wgmma_forward(&params, crate::gpu::launch_stream(stream)? as _)
        },
    };
    if code == ffi::LA_DENSE_KERNEL_UNSUPPORTED as i32 {
        return Err(Error::Unsupported(match bs.kernel {
            BlockSparseKernel::TensorCore => "the block-sparse kernel needs a device of compute \
                                              capability 8.0 or newer with its shared memory"
                .into(),
            BlockSparseKernel::Hopper => {
                // SAFETY: `params` is the struct just launched with; the query reads only its
                // scalars and pointer values (for the tensor maps), never device memory, and
                // returns a static NUL-terminated string or NULL.
                let why =
                    unsafe { reason_text(ffi::la_block_sparse_wgmma_unsupported_reason(&params)) };
                format!("the Hopper block-sparse kernel cannot run this problem here: {why}")
            }
        }));
    }
    check_launch(
        match bs.kernel {
            BlockSparseKernel::TensorCore => "la_block_sparse_mma_forward",
            BlockSparseKernel::Hopper => "la_block_sparse_wgmma_forward",
        },
        code,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_sparse::{BlockKind, BlockMask, BlockMaskDims, RowBlocks};
    use crate::dense::{AttentionOptions, AttentionShape, FlashAttention};
    use crate::layout::SeqLens;

    fn problem(sq: usize, sk: usize, d: usize, block: (usize, usize)) -> BlockSparseAttention {
        let attn = FlashAttention::new(
            &AttentionShape {
                batch: 2,
                heads_q: 4,
                heads_kv: 2,
                head_dim: d,
                seqlens: SeqLens::Fixed {
                    seqlen_q: sq,
                    seqlen_k: sk,
                },
            },
            &AttentionOptions::causal(),
        )
        .unwrap();
        let dims = BlockMaskDims::for_lengths(1, 4, sq, sk, block.0, block.1).unwrap();
        let mask = BlockMask::dense(dims, BlockKind::Partial).unwrap();
        BlockSparseAttention::new(attn, mask).unwrap()
    }

    fn check(bs: &BlockSparseAttention, dtype: DType) -> Result<()> {
        let a = bs.attention();
        let qs = Strides::contiguous(a.max_seqlen_q(), a.heads_q(), a.head_dim());
        let ks = Strides::contiguous(a.max_seqlen_k(), a.heads_kv(), a.head_dim());
        let (nq, nk) = (
            a.out_len(),
            a.batch() * a.max_seqlen_k() * a.heads_kv() * a.head_dim(),
        );
        bs.check_gpu(
            dtype,
            [(nq, &qs), (nk, &ks), (nk, &ks), (nq, &qs)],
            Some(a.lse_len()),
        )
    }

    #[test]
    fn gpu_checks_accept_what_the_kernel_runs() {
        for d in GPU_HEAD_DIMS {
            for block in [(64, 64), (128, 128), (64, 192), (256, 64)] {
                let bs = problem(200, 300, d, block);
                check(&bs, DType::BF16).unwrap();
                check(&bs, DType::F16).unwrap();
            }
        }
    }

    #[test]
    fn gpu_checks_refuse_before_any_device_call() {
        // Block sizes the CPU path takes but the kernel does not.
        for block in [(32, 64), (64, 96), (100, 128)] {
            let r = check(&problem(200, 300, 64, block), DType::BF16);
            assert!(
                matches!(&r, Err(Error::Unsupported(m)) if m.contains("multiple of 64")),
                "{block:?}: {r:?}"
            );
        }
        // f32 is CPU-only; head dims without a kernel configuration.
        let r = check(&problem(64, 64, 64, (64, 64)), DType::F32);
        assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
        for d in [32, 96, 40] {
            let r = check(&problem(64, 64, d, (64, 64)), DType::BF16);
            assert!(
                matches!(&r, Err(Error::Unsupported(m)) if m.contains("head_dim")),
                "{d}: {r:?}"
            );
        }
        // Buffers too small.
        let bs = problem(200, 300, 64, (64, 64));
        let a = bs.attention();
        let qs = Strides::contiguous(200, 4, 64);
        let ks = Strides::contiguous(300, 2, 64);
        let r = bs.check_gpu(
            DType::BF16,
            [
                (10, &qs),
                (a.out_len(), &ks),
                (a.out_len(), &ks),
                (a.out_len(), &qs),
            ],
            None,
        );
        assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
        // Wrong LSE length.
        let nk = 2 * 300 * 2 * 64;
        let r = bs.check_gpu(
            DType::BF16,
            [(a.out_len(), &qs), (nk, &ks), (nk, &ks), (a.out_len(), &qs)],
            Some(a.lse_len() - 1),
        );
        assert!(r.is_err(), "{r:?}");
        // Per-row selection (MoBA) stays on the CPU.
        let rows = RowBlocks::new(64, 1, vec![-1; a.lse_len()]).unwrap();
        let moba = bs.clone().with_row_blocks(rows).unwrap();
        let r = check(&moba, DType::BF16);
        assert!(
            matches!(&r, Err(Error::Unsupported(m)) if m.contains("CPU only")),
            "{r:?}"
        );
    }

    #[test]
    fn hopper_checks_accept_what_the_kernel_runs() {
        assert_eq!(
            problem(64, 64, 64, (64, 64)).kernel(),
            BlockSparseKernel::TensorCore
        );
        for d in GPU_HEAD_DIMS {
            let bn = hopper_block_n_multiple(d);
            for block in [(128, bn), (256, bn), (128, 2 * bn), (384, 3 * bn)] {
                let bs = problem(200, 300, d, block).with_kernel(BlockSparseKernel::Hopper);
                assert_eq!(bs.kernel(), BlockSparseKernel::Hopper);
                check(&bs, DType::BF16).unwrap();
                check(&bs, DType::F16).unwrap();
            }
        }
        // Varlen: the batch stride is never used (0 is fine), as for the copy engine's map.
        let cu_q = [0, 70, 200];
        let cu_k = [0, 300, 310];
        let attn = FlashAttention::new(
            &AttentionShape {
                batch: 2,
                heads_q: 2,
                heads_kv: 1,
                head_dim: 128,
                seqlens: SeqLens::Varlen {
                    cu_seqlens_q: &cu_q,
                    cu_seqlens_k: &cu_k,
                },
            },
            &AttentionOptions::causal(),
        )
        .unwrap();
        let dims = BlockMaskDims::for_lengths(1, 1, 130, 300, 128, 128).unwrap();
        // Sequence 0 has one query block: the second block's list stays empty.
        let mask = BlockMask::from_lists(dims, |id| {
            if id.q_block == 0 {
                vec![(0, BlockKind::Partial)]
            } else {
                vec![]
            }
        })
        .unwrap();
        let bs = BlockSparseAttention::new(attn, mask)
            .unwrap()
            .with_kernel(BlockSparseKernel::Hopper);
        let qs = Strides {
            batch: 0,
            ..Strides::contiguous(0, 2, 128)
        };
        let ks = Strides {
            batch: 0,
            ..Strides::contiguous(0, 1, 128)
        };
        let (nq, nk) = (200 * 2 * 128, 310 * 128);
        bs.check_gpu(
            DType::BF16,
            [(nq, &qs), (nk, &ks), (nk, &ks), (nq, &qs)],
            Some(bs.attention().lse_len()),
        )
        .unwrap();
    }

    #[test]
    fn hopper_checks_refuse_before_any_device_call() {
        // Block sizes the mma.sync kernel takes and the Hopper kernel does not.
        for (d, block, why) in [
            (64, (64, 128), "block_m a multiple of 128"),
            (128, (192, 128), "block_m a multiple of 128"),
            (256, (64, 64), "block_m a multiple of 128"),
            (64, (128, 64), "block_n a multiple of 128"),
            (128, (128, 192), "block_n a multiple of 128"),
            (128, (256, 320), "block_n a multiple of 128"),
        ] {
            let bs = problem(200, 300, d, block);
            check(&bs, DType::BF16).unwrap();
            let r = check(&bs.with_kernel(BlockSparseKernel::Hopper), DType::BF16);
            assert!(
                matches!(&r, Err(Error::Unsupported(m)) if m.contains(why)),
                "d{d} {block:?}: {r:?}"
            );
        }
        // What both kernels refuse stays refused first (block sizes of 64, head dims, f32).
        let r = check(
            &problem(64, 64, 64, (32, 64)).with_kernel(BlockSparseKernel::Hopper),
            DType::BF16,
        );
        assert!(
            matches!(&r, Err(Error::Unsupported(m)) if m.contains("multiple of 64")),
            "{r:?}"
        );
        let r = check(
            &problem(64, 64, 96, (128, 128)).with_kernel(BlockSparseKernel::Hopper),
            DType::BF16,
        );
        assert!(
            matches!(&r, Err(Error::Unsupported(m)) if m.contains("head_dim")),
            "{r:?}"
        );
        let r = check(
            &problem(64, 64, 64, (128, 128)).with_kernel(BlockSparseKernel::Hopper),
            DType::F32,
        );
        assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
        // Strides the copy engine cannot address: K and V shared by the batch (batch stride 0)
        // and a K whose rows all alias (seq stride 0). The mma.sync kernel takes both.
        let bs = problem(200, 300, 64, (128, 128));
        let hopper = bs.clone().with_kernel(BlockSparseKernel::Hopper);
        let a = bs.attention();
        let qs = Strides::contiguous(200, 4, 64);
        let ks = Strides::contiguous(300, 2, 64);
        let nk = 2 * 300 * 2 * 64;
        for (name, kst, vst, why) in [
            (
                "batch-broadcast k/v",
                Strides { batch: 0, ..ks },
                Strides { batch: 0, ..ks },
                "cannot address k: its batch stride 0",
            ),
            (
                "aliased v rows",
                ks,
                Strides { seq: 0, ..ks },
                "cannot address v: its seq stride 0",
            ),
        ] {
            let bufs = [
                (a.out_len(), &qs),
                (nk, &kst),
                (nk, &vst),
                (a.out_len(), &qs),
            ];
            bs.check_gpu(DType::BF16, bufs, Some(a.lse_len())).unwrap();
            let r = hopper.check_gpu(DType::BF16, bufs, Some(a.lse_len()));
            assert!(
                matches!(&r, Err(Error::Unsupported(m)) if m.contains(why)),
                "{name}: {r:?}"
            );
        }
        // plan_gpu's check (before it uploads anything) refuses the same block sizes.
        let r = problem(200, 300, 64, (64, 64))
            .with_kernel(BlockSparseKernel::Hopper)
            .check_gpu_problem();
        assert!(
            matches!(&r, Err(Error::Unsupported(m)) if m.contains("Hopper")),
            "{r:?}"
        );
    }

    /// A block-sparse C launcher (`la_block_sparse_*_forward`).
    #[cfg(longattn_cuda)]
    type CLauncher = unsafe extern "C" fn(
        *const crate::gpu::ffi::LaBlockSparseParams,
        crate::gpu::ffi::cudaStream_t,
    ) -> std::os::raw::c_int;

    #[cfg(longattn_cuda)]
    const INVALID_VALUE: i32 = 1; // cudaErrorInvalidValue

    /// Valid params over dangling (non-null) pointers: 100 x 200, 2 query heads, d64, bf16,
    /// 64 x 64 blocks. Every use below returns before a pointer is read.
    #[cfg(longattn_cuda)]
    fn c_params() -> crate::gpu::ffi::LaBlockSparseParams {
        use crate::gpu::ffi;
        let fake = std::ptr::NonNull::<u64>::dangling().as_ptr();
        let dense = ffi::LaDenseParams {
            q: fake as *const _,
            k: fake as *const _,
            v: fake as *const _,
            o: fake as *mut _,
            batch: 1,
            seqlen_q: 100,
            seqlen_k: 200,
            heads_q: 2,
            heads_kv: 1,
            head_dim: 64,
            total_q: 100,
            total_k: 200,
            window_left: -1,
            window_right: 0,
            scale: 0.125,
            dtype: ffi::LaDtype::LA_BF16,
            ..Default::default()
        };
        ffi::LaBlockSparseParams {
            dense,
            offsets: fake as *const i32,
            indices: fake as *const i32,
            full: fake as *const u8,
            mask_batch: 1,
            mask_heads: 2,
            num_q_blocks: 2,
            num_k_blocks: 4,
            block_m: 64,
            block_n: 64,
        }
    }

    /// The C launcher refuses bad params before any CUDA call (so this runs without a GPU).
    #[cfg(longattn_cuda)]
    #[test]
    fn c_entry_refuses_bad_params() {
        c_launcher_refuses_bad_params(crate::gpu::ffi::la_block_sparse_mma_forward);
    }

    /// The Hopper launcher refuses the same bad params, and what it does not take (block
    /// sizes, f32, head dims) with LA_DENSE_KERNEL_UNSUPPORTED and a reason, before any CUDA
    /// call.
    #[cfg(longattn_cuda)]
    #[test]
    fn c_hopper_entry_refuses_bad_params_and_unsupported_shapes() {
        use crate::gpu::ffi;
        c_launcher_refuses_bad_params(ffi::la_block_sparse_wgmma_forward);
        let ok = c_params();
        let unsupported = ffi::LA_DENSE_KERNEL_UNSUPPORTED as i32;
        let with_dense = |f: &dyn Fn(&mut ffi::LaDenseParams)| {
            let mut p = ffi::LaBlockSparseParams {
                block_m: 128,
                block_n: 128,
                num_q_blocks: 1,
                num_k_blocks: 2,
                ..ok
            };
            f(&mut p.dense);
            p
        };
        let cases: Vec<(&str, ffi::LaBlockSparseParams, &str)> = vec![
            ("block_m 64", ok, "block_m a multiple of 128"),
            (
                "block_m 192",
                ffi::LaBlockSparseParams {
                    block_m: 192,
                    num_q_blocks: 1,
                    block_n: 128,
                    num_k_blocks: 2,
                    ..ok
                },
                "block_m a multiple of 128",
            ),
            (
                "block_n 64 at d64",
                ffi::LaBlockSparseParams {
                    block_m: 128,
                    num_q_blocks: 1,
                    ..ok
                },
                "block_n a multiple of its key tile",
            ),
            (
                "block_n 192 at d128",
                ffi::LaBlockSparseParams {
                    block_m: 128,
                    num_q_blocks: 1,
                    block_n: 192,
                    num_k_blocks: 2,
                    dense: ffi::LaDenseParams {
                        head_dim: 128,
                        scale: 0.08,
                        ..ok.dense
                    },
                    ..ok
                },
                "block_n a multiple of its key tile",
            ),
            (
                "f32",
                with_dense(&|d| d.dtype = ffi::LaDtype::LA_F32),
                "f16 or bf16",
            ),
            (
                "head_dim 96",
                with_dense(&|d| d.head_dim = 96),
                "head_dim 64",
            ),
        ];
        for (name, p, why) in cases {
            // SAFETY: refused on its scalars before any pointer is read or CUDA is called.
            let code = unsafe { ffi::la_block_sparse_wgmma_forward(&p, std::ptr::null_mut()) };
            assert_eq!(code, unsupported, "{name}");
            // SAFETY: as above; returns a static NUL-terminated string.
            let reason = unsafe { ffi::la_block_sparse_wgmma_unsupported_reason(&p) };
            assert!(!reason.is_null(), "{name}");
            // SAFETY: non-null, static, NUL-terminated.
            let reason = unsafe { std::ffi::CStr::from_ptr(reason) }.to_string_lossy();
            assert!(reason.contains(why), "{name}: {reason}");
        }
        let bad = ffi::LaBlockSparseParams { block_m: 0, ..ok };
        // SAFETY: invalid params are named without reading a pointer; NULL likewise.
        let reason = unsafe { ffi::la_block_sparse_wgmma_unsupported_reason(&bad) };
        assert!(!reason.is_null());
        // SAFETY: non-null, static, NUL-terminated.
        let reason = unsafe { std::ffi::CStr::from_ptr(reason) }.to_string_lossy();
        assert!(reason.contains("invalid"), "{reason}");
        // SAFETY: a NULL params pointer is refused.
        let null = unsafe { ffi::la_block_sparse_wgmma_unsupported_reason(std::ptr::null()) };
        assert!(!null.is_null());
    }

    /// The checks both launchers share: each case is refused with cudaErrorInvalidValue, NULL
    /// params too, and batch 0 succeeds without a launch.
    #[cfg(longattn_cuda)]
    fn c_launcher_refuses_bad_params(launch: CLauncher) {
        use crate::gpu::ffi;
        let ok = c_params();
        let dense = ok.dense;
        let cases: Vec<(&str, ffi::LaBlockSparseParams)> = vec![
            (
                "null offsets",
                ffi::LaBlockSparseParams {
                    offsets: std::ptr::null(),
                    ..ok
                },
            ),
            (
                "null q",
                ffi::LaBlockSparseParams {
                    dense: ffi::LaDenseParams {
                        q: std::ptr::null(),
                        ..dense
                    },
                    ..ok
                },
            ),
            (
                "block_m 32",
                ffi::LaBlockSparseParams {
                    block_m: 32,
                    num_q_blocks: 4,
                    ..ok
                },
            ),
            (
                "block_n 96",
                ffi::LaBlockSparseParams {
                    block_n: 96,
                    num_k_blocks: 3,
                    ..ok
                },
            ),
            ("block_n 0", ffi::LaBlockSparseParams { block_n: 0, ..ok }),
            (
                "num_q_blocks",
                ffi::LaBlockSparseParams {
                    num_q_blocks: 3,
                    ..ok
                },
            ),
            (
                "num_k_blocks",
                ffi::LaBlockSparseParams {
                    num_k_blocks: 3,
                    ..ok
                },
            ),
            (
                "mask_heads 3",
                ffi::LaBlockSparseParams {
                    mask_heads: 3,
                    ..ok
                },
            ),
            (
                "mask_batch 0",
                ffi::LaBlockSparseParams {
                    mask_batch: 0,
                    ..ok
                },
            ),
            (
                "heads_kv 0",
                ffi::LaBlockSparseParams {
                    dense: ffi::LaDenseParams {
                        heads_kv: 0,
                        ..dense
                    },
                    ..ok
                },
            ),
            (
                "scale nan",
                ffi::LaBlockSparseParams {
                    dense: ffi::LaDenseParams {
                        scale: f32::NAN,
                        ..dense
                    },
                    ..ok
                },
            ),
            (
                "window -2",
                ffi::LaBlockSparseParams {
                    dense: ffi::LaDenseParams {
                        window_left: -2,
                        ..dense
                    },
                    ..ok
                },
            ),
        ];
        for (name, p) in cases {
            // SAFETY: the params are refused before any pointer is read or CUDA is called.
            let code = unsafe { launch(&p, std::ptr::null_mut()) };
            assert_eq!(code, INVALID_VALUE, "{name}");
        }
        // SAFETY: a NULL params pointer is refused.
        let code = unsafe { launch(std::ptr::null(), std::ptr::null_mut()) };
        assert_eq!(code, INVALID_VALUE);
        // No work (batch 0): success without a launch, whatever the pointers.
        let empty = ffi::LaBlockSparseParams {
            dense: ffi::LaDenseParams { batch: 0, ..dense },
            mask_batch: 1,
            ..ok
        };
        // SAFETY: nothing to run: returns before any pointer is read or CUDA is called.
        let code = unsafe { launch(&empty, std::ptr::null_mut()) };
        assert_eq!(code, 0);
    }
}
