//! `FlashAttention::forward_gpu`: validation, then the dense launcher.

use crate::dense::{DenseKernel, FlashAttention};
use crate::element::DType;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::gpu::{
    DeviceBuffer, DeviceBufferMut, check_attention_gpu, check_gpu_positions, check_grid_yz,
    check_half, check_tensor_core_head_dim, cuda_call,
};
use crate::layout::Strided;
use crate::mask::Mask;
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use std::sync::Arc;

/// Largest head dim of any dense kernel.
pub const GPU_MAX_HEAD_DIM: usize = 256;

impl FlashAttention {
    /// GPU forward pass on `stream` (the caller's; nothing is synchronized).
    ///
    /// `q`, `k`, `v`, `out` are device buffers with element strides as for the CPU path;
    /// on the GPU pointers must be 16-byte aligned, strides multiples of 8 elements and
    /// `head_dim` a multiple of 8 up to 256; f16 and bf16 only. Head dims that are not a
    /// multiple of 8 (any up to 256, any strides) run with `DenseKernel::TensorCorePadded`
    /// only (explicit opt-in; not yet run on a GPU). `lse`, when given, receives
    /// the natural-log LSE in the layout of [`FlashAttention::lse_len`] (a `CudaSlice` or a
    /// view of a larger buffer). Varlen offsets are copied to the device on `stream` on every
    /// call; for CUDA-graph capture build a [`DenseGpuPlan`] once and call
    /// [`DenseGpuPlan::forward`], which copies and allocates nothing.
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
        self.check_gpu(&q, &k, &v, &out, lse.as_deref().map(|l| l.len()))?;
        cuda_call!(launch, self, stream, None::<&CuSeqlens>, q, k, v, out, lse)
    }

    /// Uploads the varlen offsets (if any) once, on `stream`, for [`DenseGpuPlan::forward`].
    pub fn plan_gpu(&self, stream: &Arc<CudaStream>) -> Result<DenseGpuPlan> {
        self.check_gpu_positions("dense attention")?;
        Ok(DenseGpuPlan {
            attn: self.clone(),
            cu_seqlens: self.upload_varlen(stream)?,
        })
    }

    /// The lengths and packed totals within [`crate::gpu::GPU_MAX_POSITIONS`] (`who` names
    /// the family in the error): every GPU entry point built on a `FlashAttention` runs this.
    pub(crate) fn check_gpu_positions(&self, who: &str) -> Result<()> {
        check_gpu_positions(
            who,
            &[
                ("seqlen_q", self.max_seqlen_q),
                ("seqlen_k", self.max_seqlen_k),
                ("total_q", self.total_q),
                ("total_k", self.total_k),
            ],
        )
    }

    /// Every check of a GPU call: lengths, buffer extents and strides, dtype, head dim, grid
    /// limits.
    fn check_gpu<T, I, O>(
        &self,
        q: &Strided<&I>,
        k: &Strided<&I>,
        v: &Strided<&I>,
        out: &Strided<&mut O>,
        lse_len: Option<usize>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        I: DeviceBuffer<T>,
        O: DeviceBufferMut<T>,
    {
        self.check_gpu_positions("dense attention")?;
        self.check_buffers(q.extent(), k.extent(), v.extent(), out.extent(), lse_len)?;
        check_dense_gpu(
            self.kernel,
            T::DTYPE,
            self.head_dim,
            self.batch,
            (self.heads_q, self.heads_kv),
        )?;
        check_dense_gpu_mask(self.kernel, &self.mask)
    }
}

/// The checks of a dense GPU call that do not depend on the buffers: dtype, grid limits, and
/// the head dims of `kernel`. Any head_dim up to 256 runs on `TensorCorePadded` (those that
/// are not multiples of 8 on its element-wise variant, explicitly only); the other kernels
/// take multiples of 8 (the tensor-core ones 64, 128 or 256).
pub(crate) fn check_dense_gpu(
    kernel: DenseKernel,
    dtype: DType,
    head_dim: usize,
    batch: usize,
    (heads_q, heads_kv): (usize, usize),
) -> Result<()> {
    if kernel == DenseKernel::TensorCorePadded {
        check_half(dtype, "dense attention on the GPU takes", "path")?;
        if head_dim == 0 || head_dim > GPU_MAX_HEAD_DIM {
            return Err(Error::Unsupported(format!(
                "head_dim {head_dim} on the GPU: must be at most {GPU_MAX_HEAD_DIM}"
            )));
        }
        return check_grid_yz(batch, ("heads_q", heads_q));
    }
    if !head_dim.is_multiple_of(8) && head_dim <= GPU_MAX_HEAD_DIM {
        return Err(Error::Unsupported(format!(
            "head_dim {head_dim} on the GPU: the {kernel:?} kernel takes multiples of 8 only; \
             other head dims run on DenseKernel::TensorCorePadded (explicit opt-in, not yet \
             verified on a GPU)"
        )));
    }
    check_attention_gpu("dense", dtype, head_dim, batch, heads_q)?;
    if matches!(
        kernel,
        DenseKernel::TensorCore | DenseKernel::Hopper | DenseKernel::HopperGqa
    ) {
        check_tensor_core_head_dim("the tensor-core kernels take", head_dim)?;
    }
    if kernel == DenseKernel::HopperWide && head_dim != WIDE_HEAD_DIM {
        return Err(Error::Unsupported(format!(
            "the HopperWide kernel takes head_dim {WIDE_HEAD_DIM} only, not {head_dim}"
        )));
    }
    if matches!(
        kernel,
        DenseKernel::HopperWindow | DenseKernel::HopperPersistent
    ) && head_dim > WALK_MAX_HEAD_DIM
    {
        return Err(Error::Unsupported(format!(
            "the {kernel:?} kernel takes head_dim up to {WALK_MAX_HEAD_DIM}, not {head_dim}"
        )));
    }
    let max_group = match kernel {
        DenseKernel::TensorCoreGqa => GQA_MAX_GROUP,
        DenseKernel::HopperGqa => HOPPER_GQA_MAX_GROUP,
        _ => usize::MAX,
    };
    if heads_q / heads_kv.max(1) > max_group {
        return Err(Error::Unsupported(format!(
            "the {kernel:?} kernel packs at most {max_group} query heads per kv head into a \
             tile, not {}",
            heads_q / heads_kv.max(1)
        )));
    }
    Ok(())
}

/// The mask check of a dense GPU call: [`DenseKernel::HopperWide`] runs full attention only
/// (`mask` is the mask in force, causal included): its 176-key tiles mask only the keys past
/// seqlen_k, so a causal mask, a window or sinks are refused by name. Every other kernel runs
/// every mask.
pub(crate) fn check_dense_gpu_mask(kernel: DenseKernel, mask: &Mask) -> Result<()> {
    if kernel == DenseKernel::HopperWide && *mask != Mask::default() {
        return Err(Error::Unsupported(format!(
            "the HopperWide kernel runs full attention only (no causal mask, window or sinks; \
             its 176-key tiles mask only the keys past seqlen_k), not {mask:?}"
        )));
    }
    Ok(())
}

/// The head dim of [`DenseKernel::HopperWide`] (its one tile, `WgDenseWide`).
const WIDE_HEAD_DIM: usize = 128;
/// Query heads per kv head that [`DenseKernel::TensorCoreGqa`] packs into one 64-row tile.
const GQA_MAX_GROUP: usize = 64;
/// Query heads per kv head that [`DenseKernel::HopperGqa`] packs into one 128-row tile.
const HOPPER_GQA_MAX_GROUP: usize = 128;
/// Largest head dim of the persistent Hopper walks ([`DenseKernel::HopperWindow`],
/// [`DenseKernel::HopperPersistent`]): their two Q buffers and two K/V stages of 64 keys
/// fill the shared memory at 192 channels.
const WALK_MAX_HEAD_DIM: usize = 192;

/// A dense problem bound to device-resident varlen offsets (FlashInfer's plan/run split):
/// [`DenseGpuPlan::forward`] makes no allocation and no host-device copy, so a CUDA graph
/// can capture it and replay it with new q/k/v contents (same shapes, same buffers or buffers
/// of the same extents). The offsets live on the stream that built the plan; use the plan on
/// that stream (or order other streams after it).
#[derive(Debug)]
pub struct DenseGpuPlan {
    attn: FlashAttention,
    cu_seqlens: Option<CuSeqlens>,
}

/// Varlen offsets on the device: `cu_seqlens_q`, `cu_seqlens_k`.
pub(crate) type CuSeqlens = (CudaSlice<i32>, CudaSlice<i32>);

impl FlashAttention {
    /// Copies the varlen offsets to the device on `stream` (`None` for fixed lengths).
    pub(crate) fn upload_varlen(&self, stream: &Arc<CudaStream>) -> Result<Option<CuSeqlens>> {
        Ok(match &self.varlen {
            Some((cq, ck)) => Some((stream.clone_htod(cq)?, stream.clone_htod(ck)?)),
            None => None,
        })
    }
}

impl DenseGpuPlan {
    /// The validated problem.
    pub fn attention(&self) -> &FlashAttention {
        &self.attn
    }

    /// [`FlashAttention::forward_gpu`] without the per-call upload: validation (host only,
    /// no device call) and one launch on `stream`.
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
        self.attn
            .check_gpu(&q, &k, &v, &out, lse.as_deref().map(|l| l.len()))?;
        cuda_call!(
            launch,
            &self.attn,
            stream,
            self.cu_seqlens.as_ref(),
            q,
            k,
            v,
            out,
            lse,
        )
    }
}

#[cfg(longattn_cuda)]
#[allow(clippy::too_many_arguments)]
fn launch<T, I, O>(
    attn: &FlashAttention,
    stream: &Arc<CudaStream>,
    planned: Option<&CuSeqlens>,
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
    use crate::gpu::{QkvoPtrs, check_launch, ffi, ptr_mut_or_null, ptr_or_null, reason_text};
    if attn.total_q == 0 {
        return Ok(());
    }
    // The element-wise variant (head dims not a multiple of 8) needs no 16-byte alignment.
    let vector = attn.kernel != DenseKernel::TensorCorePadded || attn.head_dim.is_multiple_of(8);
    let ptrs = QkvoPtrs::with_access(stream, &q, &k, &v, (&mut *out.data, &out.strides), vector)?;
    // A plan's offsets are already on the device; a one-shot call uploads them here.
    let uploaded = match planned {
        Some(_) => None,
        None => attn.upload_varlen(stream)?,
    };
    let cu_seqlens = planned.or(uploaded.as_ref());
    let (cu_q, _cq_sync) = ptr_or_null(cu_seqlens.map(|(cq, _)| cq), stream);
    let (cu_k, _ck_sync) = ptr_or_null(cu_seqlens.map(|(_, ck)| ck), stream);
    let (lse_ptr, _lse_sync) = ptr_mut_or_null(lse, stream);
    let strides = [&q.strides, &k.strides, &v.strides, &out.strides];
    let params = ffi_params::<T>(attn, &ptrs, strides, (cu_q, cu_k), lse_ptr);
    let kernel = match attn.kernel {
        DenseKernel::Auto => ffi::LaDenseKernel::LA_DENSE_AUTO,
        DenseKernel::Simt => ffi::LaDenseKernel::LA_DENSE_SIMT,
        DenseKernel::TensorCore => ffi::LaDenseKernel::LA_DENSE_MMA,
        DenseKernel::Hopper => ffi::LaDenseKernel::LA_DENSE_WGMMA,
        DenseKernel::TensorCorePadded => ffi::LaDenseKernel::LA_DENSE_MMA_PADDED,
        DenseKernel::TensorCoreGqa => ffi::LaDenseKernel::LA_DENSE_MMA_GQA,
        DenseKernel::HopperWindow => ffi::LaDenseKernel::LA_DENSE_WGMMA_WINDOW,
        DenseKernel::HopperPersistent => ffi::LaDenseKernel::LA_DENSE_WGMMA_PERSISTENT,
        DenseKernel::HopperGqa => ffi::LaDenseKernel::LA_DENSE_WGMMA_GQA,
        DenseKernel::HopperWide => ffi::LaDenseKernel::LA_DENSE_WGMMA_WIDE,
    };
    // SAFETY: every pointer comes from a live cudarc buffer whose extent was checked against
    // the strides above; the launch is ordered on `stream`, and the sync guards keep
    // cudarc's event tracking correct until the launch is queued.
    let code =
        unsafe { ffi::la_dense_forward(&params, kernel, crate::gpu::launch_stream(stream)? as _) };
    // A kernel chosen by name that cannot take this problem here (Auto always finds one).
    if code == ffi::LA_DENSE_KERNEL_UNSUPPORTED as i32 {
        // SAFETY: `params` is the struct just launched with; the query reads only its scalars
        // and pointer values (for the TMA descriptors), never device memory, and returns a
        // static NUL-terminated string or NULL.
        let why = unsafe { reason_text(ffi::la_dense_kernel_unsupported_reason(&params, kernel)) };
        return Err(Error::Unsupported(format!(
            "the {:?} dense kernel cannot run this problem here: {why}",
            attn.kernel
        )));
    }
    check_launch("la_dense_forward", code)
}

/// The dense kernels' params for `attn` (also the dense part of the block-sparse params):
/// the checked pointers of `ptrs`, the strides of q, k, v, out (in that order; batch strides
/// 0 with varlen), device varlen offsets `cu` (0 = null: fixed lengths) and `lse` (0 = none).
#[cfg(longattn_cuda)]
pub(crate) fn ffi_params<T: Element>(
    attn: &FlashAttention,
    ptrs: &crate::gpu::QkvoPtrs<'_>,
    [qs, ks, vs, os]: [&crate::layout::Strides; 4],
    (cu_q, cu_k): (u64, u64),
    lse: u64,
) -> crate::gpu::ffi::LaDenseParams {
    let (window_left, window_right) = attn.mask.window.to_flash();
    let varlen = attn.varlen.is_some();
    let batch_stride = |s: i64| if varlen { 0 } else { s };
    crate::gpu::ffi::LaDenseParams {
        q: ptrs.q as *const _,
        k: ptrs.k as *const _,
        v: ptrs.v as *const _,
        o: ptrs.o as *mut _,
        lse: lse as *mut f32,
        cu_seqlens_q: cu_q as *const i32,
        cu_seqlens_k: cu_k as *const i32,
        q_batch_stride: batch_stride(qs.batch),
        q_row_stride: qs.seq,
        q_head_stride: qs.head,
        k_batch_stride: batch_stride(ks.batch),
        k_row_stride: ks.seq,
        k_head_stride: ks.head,
        v_batch_stride: batch_stride(vs.batch),
        v_row_stride: vs.seq,
        v_head_stride: vs.head,
        o_batch_stride: batch_stride(os.batch),
        o_row_stride: os.seq,
        o_head_stride: os.head,
        batch: attn.batch as i32,
        seqlen_q: attn.max_seqlen_q as i32,
        seqlen_k: attn.max_seqlen_k as i32,
        heads_q: attn.heads_q as i32,
        heads_kv: attn.heads_kv as i32,
        head_dim: attn.head_dim as i32,
        total_q: attn.total_q as i32,
        total_k: attn.total_k as i32,
        window_left: window_left as i32,
        window_right: window_right as i32,
        sinks: attn.mask.sinks as i32,
        scale: attn.scale,
        softcap: attn.softcap.unwrap_or(0.0),
        dtype: crate::gpu::la_dtype(T::DTYPE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::Window;

    /// Which kernels take which head dims, decided before any device call (no GPU needed).
    #[test]
    fn head_dims_per_kernel() {
        let ok = |k, d| check_dense_gpu(k, DType::BF16, d, 1, (1, 1)).is_ok();
        for d in [1, 3, 59, 111, 200, 255, 256, 8, 96] {
            assert!(ok(DenseKernel::TensorCorePadded, d), "padded d{d}");
        }
        assert!(!ok(DenseKernel::TensorCorePadded, 0));
        assert!(!ok(DenseKernel::TensorCorePadded, 257));
        for k in [DenseKernel::Auto, DenseKernel::Simt] {
            assert!(ok(k, 96) && ok(k, 8) && ok(k, 256), "{k:?}");
            for d in [1, 59, 111, 255] {
                let e = check_dense_gpu(k, DType::BF16, d, 1, (1, 1)).unwrap_err();
                assert!(
                    matches!(&e, Error::Unsupported(m) if m.contains("TensorCorePadded")),
                    "{k:?} d{d}: {e:?}"
                );
            }
            assert!(!ok(k, 264));
        }
        for k in [DenseKernel::TensorCore, DenseKernel::Hopper] {
            assert!(ok(k, 128) && !ok(k, 96) && !ok(k, 59), "{k:?}");
        }
        // f32, and grids the kernels cannot index, stay refused on the padded kernel too.
        let padded = |t, b| check_dense_gpu(DenseKernel::TensorCorePadded, t, 59, b, (1, 1));
        assert!(padded(DType::F32, 1).is_err() && padded(DType::F16, 1 << 20).is_err());
    }

    /// The GQA-packed kernel: multiples of 8 up to 256, at most 64 query heads per kv head.
    #[test]
    fn gqa_packing_limits() {
        let gqa =
            |d, hq, hkv| check_dense_gpu(DenseKernel::TensorCoreGqa, DType::F16, d, 2, (hq, hkv));
        assert!(gqa(128, 32, 8).is_ok() && gqa(40, 7, 1).is_ok() && gqa(256, 64, 1).is_ok());
        assert!(gqa(64, 1, 1).is_ok()); // no GQA: one head per tile row
        let e = gqa(128, 128, 1).unwrap_err();
        assert!(
            matches!(&e, Error::Unsupported(m) if m.contains("at most 64")),
            "{e:?}"
        );
        assert!(gqa(59, 8, 1).is_err() && gqa(264, 8, 1).is_err());
        // The Hopper packing: head_dim 64/128/256, at most 128 query heads per kv head.
        let hopper =
            |d, hq, hkv| check_dense_gpu(DenseKernel::HopperGqa, DType::BF16, d, 2, (hq, hkv));
        assert!(
            hopper(128, 28, 4).is_ok() && hopper(64, 128, 1).is_ok() && hopper(256, 8, 8).is_ok()
        );
        assert!(hopper(96, 8, 1).is_err() && hopper(40, 4, 1).is_err());
        let e = hopper(128, 129, 1).unwrap_err();
        assert!(
            matches!(&e, Error::Unsupported(m) if m.contains("at most 128")),
            "{e:?}"
        );
    }

    /// The persistent Hopper kernels (window and dense walks) take head dims that are
    /// multiples of 8 up to 192 (padded to 64, 128 or 192 channels), and refuse the rest by
    /// name before any device call.
    #[test]
    fn hopper_walk_head_dims() {
        for kernel in [DenseKernel::HopperWindow, DenseKernel::HopperPersistent] {
            let walk = |d| check_dense_gpu(kernel, DType::BF16, d, 1, (4, 2));
            for d in [8, 40, 64, 96, 128, 136, 160, 192] {
                assert!(walk(d).is_ok(), "{kernel:?} d{d}");
            }
            let name = format!("{kernel:?}");
            for d in [200, 256, 59, 193] {
                let e = walk(d).unwrap_err();
                assert!(
                    matches!(&e, Error::Unsupported(m) if m.contains(&name) || m.contains("multiples of 8")),
                    "{name} d{d}: {e:?}"
                );
            }
            assert!(check_dense_gpu(kernel, DType::F32, 128, 1, (1, 1)).is_err());
        }
    }

    /// The wide-tile Hopper kernel: f16/bf16 at head_dim 128 only, full attention only (any
    /// causal mask, window or sinks refused by name, before any device call); scale, softcap,
    /// GQA and batch limits as the other kernels.
    #[test]
    fn hopper_wide_takes_d128_full_attention_only() {
        let wide = DenseKernel::HopperWide;
        let dims = |t, d| check_dense_gpu(wide, t, d, 2, (8, 2));
        assert!(dims(DType::BF16, 128).is_ok() && dims(DType::F16, 128).is_ok());
        for (t, d) in [
            (DType::BF16, 64),
            (DType::F16, 256),
            (DType::BF16, 96),
            (DType::F32, 128),
        ] {
            assert!(
                matches!(dims(t, d), Err(Error::Unsupported(_))),
                "{t:?} d{d}"
            );
        }
        let e = dims(DType::BF16, 64).unwrap_err();
        assert!(
            matches!(&e, Error::Unsupported(m) if m.contains("HopperWide") && m.contains("128")),
            "{e:?}"
        );
        assert!(check_dense_gpu(wide, DType::BF16, 128, 1 << 20, (1, 1)).is_err());
        let mask = |left, right, sinks| Mask {
            window: Window::new(left, right),
            sinks,
        };
        assert!(check_dense_gpu_mask(wide, &Mask::default()).is_ok());
        for m in [
            mask(None, Some(0), 0),
            mask(Some(255), Some(0), 0),
            mask(Some(100), None, 0),
            mask(None, Some(5), 0),
            mask(None, None, 4),
            mask(None, Some(0), 4),
        ] {
            let e = check_dense_gpu_mask(wide, &m).unwrap_err();
            assert!(
                matches!(&e, Error::Unsupported(s) if s.contains("full attention only")),
                "{m:?}: {e:?}"
            );
            // Every other kernel runs every mask.
            for k in [
                DenseKernel::Auto,
                DenseKernel::Hopper,
                DenseKernel::HopperPersistent,
            ] {
                assert!(check_dense_gpu_mask(k, &m).is_ok(), "{k:?} {m:?}");
            }
        }
    }
}
