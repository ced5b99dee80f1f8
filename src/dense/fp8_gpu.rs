//! `FlashAttention::forward_gpu_fp8`: the FP8 (e4m3) dense forward on Hopper
//! (`kernels/dense_wgmma_fp8.cu`, explicit opt-in, **not yet run on a GPU**): validation,
//! the V^T scratch (stream-ordered), one call of the C launcher (pre-pass + attention kernel).

use crate::dense::{FlashAttention, Fp8Descales};
use crate::element::{Element, F8E4M3};
use crate::error::{Error, Result};
use crate::gpu::{DeviceBuffer, DeviceBufferMut, check_grid_yz, cuda_call};
use crate::layout::Strided;
use cudarc::driver::{CudaStream, DeviceRepr};
use std::sync::Arc;

/// The largest head dim of the FP8 kernel; it takes every multiple of
/// [`FP8_GPU_HEAD_DIM_MULTIPLE`] up to this, padded inside the kernel to 64, 128 or 256
/// channels (zero-filled by the copy engine, no copy of the caller's tensors).
pub const FP8_GPU_MAX_HEAD_DIM: usize = 256;
/// The FP8 kernel's head dims are multiples of this: its V^T pre-pass moves rows in 16-byte
/// vectors and the copy engine needs row strides in multiples of 16 bytes.
pub const FP8_GPU_HEAD_DIM_MULTIPLE: usize = 16;

/// Keys between consecutive sequences' regions in the V^T scratch beyond their rounding to
/// 16 (`LA_FP8_VT_SEQ_GAP` in `kernels/include/longattn/dense_fp8.h`): sequence `b` starts at
/// `round_up_16(k0_b) + 144 b`, after the previous one's keys rounded up to whole 128-key
/// tiles (at most `k0_b + 144 b - 2`).
const VT_SEQ_GAP: usize = 144;

impl FlashAttention {
    /// GPU FP8 forward on `stream` (the caller's; nothing is synchronized), Hopper only
    /// (compute capability 9.0, sm_90a), head_dim a multiple of 16 up to 256 (64, 128 and 256
    /// native; others padded inside the kernel to the next of them): **explicit opt-in, not
    /// yet run on a GPU**; the CPU path [`FlashAttention::forward_cpu_fp8`] defines the same
    /// arithmetic.
    ///
    /// `q: [batch, seqlen_q, heads_q, d]`, `k, v: [batch, seqlen_k, heads_kv, d]` device
    /// e4m3 codes (or packed varlen rows) with 16-byte aligned pointers and strides that are
    /// multiples of 16 elements; `descales` device f32 buffers of `batch * heads_kv` values
    /// each ([`Fp8Descales`]: FlashAttention-3's shape, read by the kernel, so a CUDA graph
    /// can replay the call with new values); `out` like q in bf16 or f16 (16-byte aligned,
    /// strides multiples of 8); `lse` (optional) f32 natural log in the layout of
    /// [`FlashAttention::lse_len`].
    ///
    /// Every length, stride, type and shape is checked before any pointer is taken. The
    /// descale *values* live on the device and are not inspected (that would need a
    /// device-to-host copy per call): the caller guarantees what the CPU path checks
    /// (finite, positive, at most [`crate::dense::FP8_MAX_DESCALE`]). A scratch of
    /// `heads_kv * d * vt_keys` bytes (about the size of v) for V^T is allocated on
    /// `stream` (stream-ordered) and freed after the launch; varlen offsets are uploaded on
    /// `stream` per call.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_gpu_fp8<O, I, OB, D>(
        &self,
        stream: &Arc<CudaStream>,
        q: Strided<&I>,
        k: Strided<&I>,
        v: Strided<&I>,
        descales: Fp8Descales<&D>,
        out: Strided<&mut OB>,
        lse: Option<&mut dyn DeviceBufferMut<f32>>,
    ) -> Result<()>
    where
        O: Element + DeviceRepr,
        I: DeviceBuffer<F8E4M3>,
        OB: DeviceBufferMut<O>,
        D: DeviceBuffer<f32>,
    {
        self.check_buffers(
            q.extent(),
            k.extent(),
            v.extent(),
            out.extent(),
            lse.as_deref().map(|l| l.len()),
        )?;
        self.check_fp8_args(
            O::DTYPE,
            [
                descales.q.elements(),
                descales.k.elements(),
                descales.v.elements(),
            ],
        )?;
        let vt_keys = self.check_fp8_gpu()?;
        cuda_call!(
            launch_fp8, self, stream, q, k, v, descales, out, lse, vt_keys
        )
    }

    /// The shape checks of a GPU FP8 call (no device call): the lengths (within
    /// [`crate::gpu::GPU_MAX_POSITIONS`]), the head dim, the grid limits,
    /// and the V^T scratch's row length `vt_keys` (returned), which the kernel indexes with
    /// i32 and the copy engine needs below 2^31.
    pub(crate) fn check_fp8_gpu(&self) -> Result<usize> {
        self.check_gpu_positions("FP8 attention")?;
        if self.head_dim > FP8_GPU_MAX_HEAD_DIM
            || !self.head_dim.is_multiple_of(FP8_GPU_HEAD_DIM_MULTIPLE)
        {
            return Err(Error::Unsupported(format!(
                "the FP8 kernel takes head dims that are multiples of \
                 {FP8_GPU_HEAD_DIM_MULTIPLE} up to {FP8_GPU_MAX_HEAD_DIM}, not {}",
                self.head_dim
            )));
        }
        check_grid_yz(self.batch, ("heads_q", self.heads_q))?;
        let too_long = || {
            Error::Unsupported(format!(
                "the FP8 kernel's V^T scratch rows (keys of every sequence, each rounded up, plus \
                 {VT_SEQ_GAP} per sequence) must stay below 2^31"
            ))
        };
        let rows_k = match self.varlen {
            Some(_) => Some(self.total_k),
            None => self.batch.checked_mul(self.max_seqlen_k),
        };
        let vt_keys = rows_k
            .and_then(|r| r.checked_next_multiple_of(16))
            .and_then(|r| r.checked_add(self.batch.checked_mul(VT_SEQ_GAP)?))
            .and_then(|r| r.checked_next_multiple_of(16))
            .filter(|&r| r < 1 << 31)
            .ok_or_else(too_long)?;
        crate::layout::checked_elems(
            &[self.heads_kv, self.head_dim, vt_keys],
            "FP8 V^T scratch bytes",
        )?;
        Ok(vt_keys)
    }
}

#[cfg(longattn_cuda)]
#[allow(clippy::too_many_arguments)]
fn launch_fp8<O, I, OB, D>(
    attn: &FlashAttention,
    stream: &Arc<CudaStream>,
    q: Strided<&I>,
    k: Strided<&I>,
    v: Strided<&I>,
    descales: Fp8Descales<&D>,
    out: Strided<&mut OB>,
    lse: Option<&mut dyn DeviceBufferMut<f32>>,
    vt_keys: usize,
) -> Result<()>
where
    O: Element + DeviceRepr,
    I: DeviceBuffer<F8E4M3>,
    OB: DeviceBufferMut<O>,
    D: DeviceBuffer<f32>,
{
    use crate::dense::gpu::ffi_params;
    use crate::gpu::{QkvoPtrs, check_launch, ffi, ptr_mut_or_null, ptr_or_null, reason_text};
    if attn.total_q == 0 {
        return Ok(());
    }
    let ptrs = QkvoPtrs::with_access::<F8E4M3, O, I, OB>(
        stream,
        &q,
        &k,
        &v,
        (&mut *out.data, &out.strides),
        true,
    )?;
    let uploaded = attn.upload_varlen(stream)?;
    let (cu_q, _cq_sync) = ptr_or_null(uploaded.as_ref().map(|(cq, _)| cq), stream);
    let (cu_k, _ck_sync) = ptr_or_null(uploaded.as_ref().map(|(_, ck)| ck), stream);
    let (lse_ptr, _lse_sync) = ptr_mut_or_null(lse, stream);
    let (qd, _qd_sync) = ptr_or_null(Some(descales.q), stream);
    let (kd, _kd_sync) = ptr_or_null(Some(descales.k), stream);
    let (vd, _vd_sync) = ptr_or_null(Some(descales.v), stream);
    let bytes = attn.heads_kv * attn.head_dim * vt_keys; // checked in check_fp8_gpu
    // SAFETY: uninitialised device memory of `bytes` bytes, never read by the host; the
    // pre-pass writes every byte the attention kernel reads (each sequence's whole 128-key
    // tiles, zeros past its end) before it, in stream order.
    let mut vt = unsafe { stream.alloc::<u8>(bytes) }?;
    let (vt_ptr, _vt_sync) = ptr_mut_or_null(Some(&mut vt), stream);
    let strides = [&q.strides, &k.strides, &v.strides, &out.strides];
    let params = ffi::LaDenseFp8Params {
        base: ffi_params::<O>(attn, &ptrs, strides, (cu_q, cu_k), lse_ptr),
        q_descale: qd as *const f32,
        k_descale: kd as *const f32,
        v_descale: vd as *const f32,
        vt: vt_ptr as *mut _,
        vt_keys: vt_keys as i64,
    };
    // SAFETY: every pointer comes from a live cudarc buffer whose extent was checked against
    // the strides (q, k, v, out, lse), the descale lengths against batch * heads_kv, and the
    // scratch covers heads_kv * head_dim * vt_keys bytes; both launches are ordered on `stream`,
    // and the sync guards keep cudarc's event tracking correct until they are queued.
    let code =
        unsafe { ffi::la_dense_fp8_forward(&params, crate::gpu::launch_stream(stream)? as _) };
    if code == ffi::LA_DENSE_KERNEL_UNSUPPORTED as i32 {
        // SAFETY: `params` as launched; the query reads only scalars and pointer values and
        // returns a static NUL-terminated string or NULL.
        let why = unsafe { reason_text(ffi::la_dense_fp8_unsupported_reason(&params)) };
        return Err(Error::Unsupported(format!(
            "the FP8 dense kernel cannot run this problem here: {why}"
        )));
    }
    check_launch("la_dense_fp8_forward", code)
}

#[cfg(test)]
mod tests {
    use crate::dense::{AttentionOptions, AttentionShape, FlashAttention};
    use crate::error::Error;
    use crate::layout::SeqLens;

    fn attn(batch: usize, d: usize, lens: SeqLens<'_>) -> FlashAttention {
        let shape = AttentionShape {
            batch,
            heads_q: 4,
            heads_kv: 2,
            head_dim: d,
            seqlens: lens,
        };
        FlashAttention::new(&shape, &AttentionOptions::default()).unwrap()
    }

    /// Head dims that are not multiples of 16 are refused by name, every multiple of 16 up
    /// to 256 passes, and the scratch row length covers every sequence's rounded keys plus
    /// the gaps (no GPU needed).
    #[test]
    fn fp8_gpu_shape_checks() {
        let fixed = |sk| SeqLens::Fixed {
            seqlen_q: 5,
            seqlen_k: sk,
        };
        for d in [8, 40, 72, 136, 250] {
            let e = attn(1, d, fixed(1)).check_fp8_gpu().unwrap_err();
            assert!(
                matches!(&e, Error::Unsupported(m) if m.contains("multiples of 16")),
                "{e:?}"
            );
        }
        for d in (16..=256).step_by(16) {
            assert_eq!(attn(1, d, fixed(1)).check_fp8_gpu().unwrap(), 160, "d{d}");
        }
        assert_eq!(attn(3, 128, fixed(100)).check_fp8_gpu().unwrap(), 304 + 432);
        assert_eq!(attn(1, 128, fixed(0)).check_fp8_gpu().unwrap(), 144);
        let (cq, ck) = ([0, 3, 4], [0, 130, 131]);
        let varlen = SeqLens::Varlen {
            cu_seqlens_q: &cq,
            cu_seqlens_k: &ck,
        };
        assert_eq!(attn(2, 128, varlen).check_fp8_gpu().unwrap(), 144 + 288);
        // Within the kernels' position limit, past the scratch's 2^31 rows.
        let e = attn(2, 128, fixed(1 << 30)).check_fp8_gpu().unwrap_err();
        assert!(
            matches!(&e, Error::Unsupported(m) if m.contains("2^31")),
            "{e:?}"
        );
        let e = attn(1, 128, fixed(i32::MAX as usize))
            .check_fp8_gpu()
            .unwrap_err();
        assert!(
            matches!(&e, Error::Unsupported(m) if m.contains("seqlen_k")),
            "{e:?}"
        );
        let e = attn(70000, 128, fixed(1)).check_fp8_gpu().unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    }

    /// The scratch layout (dense_fp8.h): each sequence's region, rounded up to whole 128-key
    /// tiles, ends before the next one starts and inside the row.
    #[test]
    fn vt_regions_are_disjoint() {
        let start = |k0: usize, b: usize| k0.next_multiple_of(16) + super::VT_SEQ_GAP * b;
        for lens in [
            vec![1usize, 1, 1],
            vec![127, 129, 0, 255, 1000],
            vec![16; 9],
        ] {
            let ck: Vec<i32> = std::iter::once(0)
                .chain(lens.iter().scan(0, |a, &l| {
                    *a += l as i32;
                    Some(*a)
                }))
                .collect();
            let cq = vec![0; lens.len() + 1];
            let a = attn(
                lens.len(),
                128,
                SeqLens::Varlen {
                    cu_seqlens_q: &cq,
                    cu_seqlens_k: &ck,
                },
            );
            let vt_keys = a.check_fp8_gpu().unwrap();
            for b in 0..lens.len() {
                let end = start(ck[b] as usize, b) + lens[b].next_multiple_of(128);
                let next = if b + 1 < lens.len() {
                    start(ck[b + 1] as usize, b + 1)
                } else {
                    vt_keys
                };
                assert!(end <= next, "{lens:?} b{b}: {end} > {next}");
            }
        }
    }
}
