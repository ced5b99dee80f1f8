//! `NeighborhoodAttention::forward_gpu`: validation, then the portable neighborhood kernel
//! (`kernels/neighborhood.cu`).
//!
//! **Not yet verified on a GPU**: the kernel compiles for sm_80 and sm_90a without spills and
//! its launcher refuses bad params on the CPU, but no GPU run has checked its output yet
//! (`tests/neighborhood_gpu.rs` does, on a machine with one). It runs only when a caller
//! asks for it by calling `forward_gpu`; nothing in the crate picks it automatically.

use crate::element::{DType, Element};
use crate::error::{Error, Result};
use crate::layout::{Strided, check_attention_args};
use crate::neighborhood::NeighborhoodAttention;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};
use std::sync::Arc;

/// Largest head dim of the neighborhood kernel.
pub const GPU_MAX_HEAD_DIM: usize = 256;
/// Grid y/z limit: heads and batch index the grid.
const GRID_LIMIT: usize = 65535;
/// Query tokens per block of the kernel (one warp each); the grid's x extent is the token
/// count over this, at most `i32::MAX`.
const TOKENS_PER_BLOCK: usize = 4;

impl NeighborhoodAttention {
    /// GPU forward pass on `stream` (the caller's; nothing is synchronized). **Compiled, not
    /// yet verified on a GPU.**
    ///
    /// `q`, `k`, `v`, `out` are device buffers laid out as for
    /// [`NeighborhoodAttention::forward_cpu`] (`[batch, X, (Y, (Z,)) heads, head_dim]` with
    /// element strides over (batch, token, head)); on the GPU pointers must be 16-byte
    /// aligned, strides multiples of 8 elements, `head_dim` a multiple of 8 up to 256; f16
    /// and bf16 only. `lse`, when given, receives the natural-log LSE in the layout of
    /// [`NeighborhoodAttention::lse_len`]. Every valid problem runs (any rank, kernel,
    /// dilation, causal and stride per dim, GQA, softcap) on the portable CUDA-core kernel.
    pub fn forward_gpu<T, I, O>(
        &self,
        stream: &Arc<CudaStream>,
        q: Strided<&I>,
        k: Strided<&I>,
        v: Strided<&I>,
        out: Strided<&mut O>,
        lse: Option<&mut CudaSlice<f32>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        I: DevicePtr<T>,
        O: DevicePtrMut<T>,
    {
        self.check_gpu_args::<T>(
            [
                (q.data.len(), &q.strides),
                (k.data.len(), &k.strides),
                (v.data.len(), &v.strides),
                (out.data.len(), &out.strides),
            ],
            lse.as_ref().map(|l| l.len()),
        )?;
        launch(self, stream, q, k, v, out, lse)
    }

    /// Every check of `forward_gpu` that needs no device pointer: the CPU path's argument
    /// check, then what the kernel supports.
    fn check_gpu_args<T: Element>(
        &self,
        bufs: [(usize, &crate::layout::Strides); 4],
        lse_len: Option<usize>,
    ) -> Result<()> {
        let n = self.tokens;
        check_attention_args(
            "",
            bufs,
            [self.batch, n, self.heads_q, self.head_dim],
            [self.batch, n, self.heads_kv, self.head_dim],
            lse_len.map(|l| (l, self.lse_len(), "[batch, heads_q, tokens]")),
        )?;
        if T::DTYPE == DType::F32 {
            return Err(Error::Unsupported(
                "neighborhood attention on the GPU takes f16 or bf16 (f32 runs on the CPU path)"
                    .into(),
            ));
        }
        if !self.head_dim.is_multiple_of(8) || self.head_dim > GPU_MAX_HEAD_DIM {
            return Err(Error::Unsupported(format!(
                "head_dim {} on the GPU: must be a multiple of 8 and at most {GPU_MAX_HEAD_DIM}",
                self.head_dim
            )));
        }
        if self.batch > GRID_LIMIT || self.heads_q > GRID_LIMIT {
            return Err(Error::Unsupported(format!(
                "batch ({}) and heads_q ({}) must be at most {GRID_LIMIT} on the GPU",
                self.batch, self.heads_q
            )));
        }
        if n.div_ceil(TOKENS_PER_BLOCK) > i32::MAX as usize {
            return Err(Error::Unsupported(format!(
                "{n} grid tokens: at most {} on the GPU",
                i32::MAX as usize * TOKENS_PER_BLOCK
            )));
        }
        Ok(())
    }
}

#[cfg(not(longattn_cuda))]
fn launch<T, I, O>(
    _attn: &NeighborhoodAttention,
    _stream: &Arc<CudaStream>,
    _q: Strided<&I>,
    _k: Strided<&I>,
    _v: Strided<&I>,
    _out: Strided<&mut O>,
    _lse: Option<&mut CudaSlice<f32>>,
) -> Result<()>
where
    T: Element + DeviceRepr,
    I: DevicePtr<T>,
    O: DevicePtrMut<T>,
{
    Err(Error::CudaNotCompiled)
}

/// The kernel's params with null pointers: dims padded in front to three (see
/// `kernels/include/longattn/neighborhood.h`), strides and options from `attn`.
#[cfg(longattn_cuda)]
fn params(attn: &NeighborhoodAttention, dtype: DType) -> crate::gpu::ffi::LaNeighborhoodParams {
    use super::schedule::padded_dims;
    let dims = padded_dims(attn);
    let per = |f: &dyn Fn(&super::NeighborhoodDim) -> usize| dims.each_ref().map(|d| f(d) as i32);
    crate::gpu::ffi::LaNeighborhoodParams {
        batch: attn.batch as i32,
        heads_q: attn.heads_q as i32,
        heads_kv: attn.heads_kv as i32,
        head_dim: attn.head_dim as i32,
        length: per(&|d| d.length),
        kernel: per(&|d| d.kernel),
        dilation: per(&|d| d.dilation),
        stride: per(&|d| d.stride),
        causal: per(&|d| d.causal as usize),
        tokens: attn.tokens as i64,
        scale: attn.scale,
        softcap: attn.softcap.unwrap_or(0.0),
        dtype: crate::gpu::la_dtype(dtype),
        ..Default::default()
    }
}

#[cfg(longattn_cuda)]
fn launch<T, I, O>(
    attn: &NeighborhoodAttention,
    stream: &Arc<CudaStream>,
    q: Strided<&I>,
    k: Strided<&I>,
    v: Strided<&I>,
    out: Strided<&mut O>,
    lse: Option<&mut CudaSlice<f32>>,
) -> Result<()>
where
    T: Element + DeviceRepr,
    I: DevicePtr<T>,
    O: DevicePtrMut<T>,
{
    use crate::gpu::{check_launch, check_vector_access, dtype_bytes, ffi};
    if attn.out_len() == 0 {
        return Ok(());
    }
    let bytes = dtype_bytes(T::DTYPE);
    let (q_ptr, _q_sync) = q.data.device_ptr(stream);
    let (k_ptr, _k_sync) = k.data.device_ptr(stream);
    let (v_ptr, _v_sync) = v.data.device_ptr(stream);
    let (o_ptr, _o_sync) = out.data.device_ptr_mut(stream);
    check_vector_access("q", q_ptr, &q.strides, bytes)?;
    check_vector_access("k", k_ptr, &k.strides, bytes)?;
    check_vector_access("v", v_ptr, &v.strides, bytes)?;
    check_vector_access("out", o_ptr, &out.strides, bytes)?;
    let (lse_ptr, _lse_sync) = match lse {
        Some(l) => {
            let (p, s) = l.device_ptr_mut(stream);
            (p, Some(s))
        }
        None => (0, None),
    };
    let params = ffi::LaNeighborhoodParams {
        q: q_ptr as *const _,
        k: k_ptr as *const _,
        v: v_ptr as *const _,
        o: o_ptr as *mut _,
        lse: lse_ptr as *mut f32,
        q_batch_stride: q.strides.batch,
        q_row_stride: q.strides.seq,
        q_head_stride: q.strides.head,
        k_batch_stride: k.strides.batch,
        k_row_stride: k.strides.seq,
        k_head_stride: k.strides.head,
        v_batch_stride: v.strides.batch,
        v_row_stride: v.strides.seq,
        v_head_stride: v.strides.head,
        o_batch_stride: out.strides.batch,
        o_row_stride: out.strides.seq,
        o_head_stride: out.strides.head,
        ..params(attn, T::DTYPE)
    };
    // SAFETY: every pointer comes from a live cudarc buffer whose extent was checked against
    // the strides above; the launch is ordered on `stream`, and the sync guards keep
    // cudarc's event tracking correct until the launch is queued.
    let code = unsafe { ffi::la_neighborhood_forward(&params, stream.cu_stream() as _) };
    check_launch("la_neighborhood_forward", code)
}

/// The C launcher refuses what the Rust API refuses before any CUDA call, so this runs
/// without a GPU.
#[cfg(all(test, longattn_cuda))]
mod c_entry_checks {
    use super::params;
    use crate::dense::AttentionOptions;
    use crate::element::DType;
    use crate::gpu::ffi;
    use crate::neighborhood::{NeighborhoodAttention, NeighborhoodDim, NeighborhoodShape};

    const INVALID_VALUE: i32 = 1; // cudaErrorInvalidValue

    fn valid() -> ffi::LaNeighborhoodParams {
        let dims = [
            NeighborhoodDim::new(9, 3).with_dilation(2),
            NeighborhoodDim::new(7, 4).with_causal(true),
        ];
        let attn = NeighborhoodAttention::new(
            &NeighborhoodShape {
                batch: 2,
                heads_q: 4,
                heads_kv: 2,
                head_dim: 64,
                dims: &dims,
            },
            &AttentionOptions::default(),
        )
        .unwrap();
        params(&attn, DType::BF16)
    }

    #[test]
    fn params_are_padded_to_three_dims() {
        let p = valid();
        assert_eq!(p.length, [1, 9, 7]);
        assert_eq!(p.kernel, [1, 3, 4]);
        assert_eq!(p.dilation, [1, 2, 1]);
        assert_eq!(p.stride, [1, 1, 1]);
        assert_eq!(p.causal, [0, 0, 1]);
        assert_eq!(p.tokens, 63);
    }

    #[test]
    fn entry_refuses_bad_params() {
        let v = valid();
        let mut cases: Vec<(&str, ffi::LaNeighborhoodParams)> = vec![
            ("null pointers with work", v),
            ("heads_kv 0", ffi::LaNeighborhoodParams { heads_kv: 0, ..v }),
            ("gqa ratio", ffi::LaNeighborhoodParams { heads_kv: 3, ..v }),
            ("head_dim 12", ffi::LaNeighborhoodParams { head_dim: 12, ..v }),
            ("head_dim 264", ffi::LaNeighborhoodParams { head_dim: 264, ..v }),
            ("batch < 0", ffi::LaNeighborhoodParams { batch: -1, ..v }),
            (
                "f32",
                ffi::LaNeighborhoodParams {
                    dtype: ffi::LaDtype::LA_F32,
                    ..v
                },
            ),
            ("scale nan", ffi::LaNeighborhoodParams { scale: f32::NAN, ..v }),
            ("scale 0", ffi::LaNeighborhoodParams { scale: 0.0, ..v }),
            ("softcap nan", ffi::LaNeighborhoodParams { softcap: f32::NAN, ..v }),
            ("tokens", ffi::LaNeighborhoodParams { tokens: 64, ..v }),
            ("stride < 0", ffi::LaNeighborhoodParams { k_row_stride: -8, ..v }),
        ];
        let mut dim = |name: &'static str, f: &dyn Fn(&mut ffi::LaNeighborhoodParams)| {
            let mut p = v;
            f(&mut p);
            cases.push((name, p));
        };
        dim("kernel * dilation > length", &|p| p.kernel[1] = 5);
        dim("kernel 0", &|p| p.kernel[2] = 0);
        dim("dilation 0", &|p| p.dilation[0] = 0);
        dim("stride > kernel", &|p| p.stride[1] = 4);
        dim("stride on a causal dim", &|p| p.stride[2] = 2);
        dim("causal 2", &|p| p.causal[1] = 2);
        dim("length 0", &|p| p.length[0] = 0);
        for (name, p) in cases {
            // SAFETY: the params are refused before any pointer is read or CUDA is called.
            let code = unsafe { ffi::la_neighborhood_forward(&p, std::ptr::null_mut()) };
            assert_eq!(code, INVALID_VALUE, "{name}");
        }
        // SAFETY: a NULL params pointer is refused.
        let code = unsafe { ffi::la_neighborhood_forward(std::ptr::null(), std::ptr::null_mut()) };
        assert_eq!(code, INVALID_VALUE);
    }
}

/// The host-side checks of `forward_gpu`, which need no device.
#[cfg(test)]
mod host_checks {
    use crate::dense::AttentionOptions;
    use half::{bf16, f16};
    use crate::error::Error;
    use crate::layout::Strides;
    use crate::neighborhood::{NeighborhoodAttention, NeighborhoodDim, NeighborhoodShape};

    fn attn(head_dim: usize, batch: usize) -> NeighborhoodAttention {
        let dims = [NeighborhoodDim::new(6, 3), NeighborhoodDim::new(5, 2)];
        NeighborhoodAttention::new(
            &NeighborhoodShape {
                batch,
                heads_q: 2,
                heads_kv: 1,
                head_dim,
                dims: &dims,
            },
            &AttentionOptions::default(),
        )
        .unwrap()
    }

    fn bufs(a: &NeighborhoodAttention) -> (usize, Strides, usize, Strides) {
        let (n, d) = (a.tokens(), a.head_dim());
        (
            a.out_len(),
            Strides::contiguous(n, a.heads_q(), d),
            a.batch() * n * a.heads_kv() * d,
            Strides::contiguous(n, a.heads_kv(), d),
        )
    }

    fn check<T: crate::element::Element>(
        a: &NeighborhoodAttention,
        lse: Option<usize>,
    ) -> crate::error::Result<()> {
        let (ql, qs, kl, ks) = bufs(a);
        a.check_gpu_args::<T>([(ql, &qs), (kl, &ks), (kl, &ks), (ql, &qs)], lse)
    }

    #[test]
    fn supported_problems_pass() {
        for d in [8, 24, 32, 64, 128, 136, 256] {
            let a = attn(d, 2);
            check::<bf16>(&a, None).unwrap();
            check::<f16>(&a, Some(a.lse_len())).unwrap();
        }
    }

    #[test]
    fn unsupported_problems_are_refused() {
        let a = attn(64, 1);
        assert!(matches!(check::<f32>(&a, None), Err(Error::Unsupported(_))));
        for d in [12, 264] {
            assert!(matches!(
                check::<bf16>(&attn(d, 1), None),
                Err(Error::Unsupported(_))
            ));
        }
        assert!(matches!(
            check::<bf16>(&attn(8, 65536), None),
            Err(Error::Unsupported(_))
        ));
        // Wrong LSE length and short buffers: the CPU path's argument errors.
        assert!(check::<bf16>(&a, Some(a.lse_len() - 1)).is_err());
        let (ql, qs, kl, ks) = bufs(&a);
        assert!(
            a.check_gpu_args::<bf16>([(ql, &qs), (kl - 1, &ks), (kl, &ks), (ql, &qs)], None)
                .is_err()
        );
    }
}
