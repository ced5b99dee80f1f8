//! `MergeShape::merge_gpu` / `merge_into_gpu`: validation, then the merge launcher.

use crate::element::Element;
use crate::error::Result;
use crate::gpu::{DeviceBuffer, DeviceBufferMut, cuda_call};
use crate::merge::{MergeShape, Partial};
use cudarc::driver::{CudaStream, DeviceRepr};
use std::sync::Arc;

impl MergeShape {
    /// `out = merge(a, b)` on `stream`. `o` buffers are `[batch, seqlen, heads, head_dim]`
    /// contiguous (f16, bf16 or f32), LSE buffers `[batch, heads, seqlen]` f32.
    pub fn merge_gpu<T, I, L, O, M>(
        &self,
        stream: &Arc<CudaStream>,
        a: Partial<&I, &L>,
        b: Partial<&I, &L>,
        out: Partial<&mut O, &mut M>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        I: DeviceBuffer<T>,
        L: DeviceBuffer<f32>,
        O: DeviceBufferMut<T>,
        M: DeviceBufferMut<f32>,
    {
        self.check("a", a.o.len(), a.lse.len())?;
        self.check("b", b.o.len(), b.lse.len())?;
        self.check("out", out.o.len(), out.lse.len())?;
        let (a_o, _s1) = a.o.device_ptr(stream);
        let (a_l, _s2) = a.lse.device_ptr(stream);
        let (b_o, _s3) = b.o.device_ptr(stream);
        let (b_l, _s4) = b.lse.device_ptr(stream);
        let (o_o, _s5) = out.o.device_ptr_mut(stream);
        let (o_l, _s6) = out.lse.device_ptr_mut(stream);
        cuda_call!(launch::<T>, self, stream, [a_o, a_l, b_o, b_l, o_o, o_l])
    }

    /// `acc = merge(acc, part)` in place on `stream`.
    pub fn merge_into_gpu<T, A, L, P, Q>(
        &self,
        stream: &Arc<CudaStream>,
        acc: Partial<&mut A, &mut L>,
        part: Partial<&P, &Q>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        A: DeviceBufferMut<T>,
        L: DeviceBufferMut<f32>,
        P: DeviceBuffer<T>,
        Q: DeviceBuffer<f32>,
    {
        self.check("acc", acc.o.len(), acc.lse.len())?;
        self.check("part", part.o.len(), part.lse.len())?;
        let (acc_o, _s1) = acc.o.device_ptr_mut(stream);
        let (acc_l, _s2) = acc.lse.device_ptr_mut(stream);
        let (p_o, _s3) = part.o.device_ptr(stream);
        let (p_l, _s4) = part.lse.device_ptr(stream);
        cuda_call!(
            launch::<T>,
            self,
            stream,
            [acc_o, acc_l, p_o, p_l, acc_o, acc_l]
        )
    }
}

/// `ptrs`: a.o, a.lse, b.o, b.lse, out.o, out.lse (out may alias a).
#[cfg(longattn_cuda)]
fn launch<T: Element>(shape: &MergeShape, stream: &Arc<CudaStream>, ptrs: [u64; 6]) -> Result<()> {
    use crate::gpu::{check_launch, ffi, la_dtype};
    if shape.lse_len() == 0 {
        return Ok(());
    }
    let params = ffi::LaMergeParams {
        a_o: ptrs[0] as *const _,
        a_lse: ptrs[1] as *const f32,
        b_o: ptrs[2] as *const _,
        b_lse: ptrs[3] as *const f32,
        out_o: ptrs[4] as *mut _,
        out_lse: ptrs[5] as *mut f32,
        batch: shape.batch as i32,
        seqlen: shape.seqlen as i32,
        heads: shape.heads as i32,
        head_dim: shape.head_dim as i32,
        dtype: la_dtype(T::DTYPE),
    };
    // SAFETY: buffer lengths were checked against the shape; the kernel reads and writes
    // each element once, so out aliasing a is safe.
    let code = unsafe { ffi::la_merge(&params, crate::gpu::launch_stream(stream)? as _) };
    check_launch("la_merge", code)
}
