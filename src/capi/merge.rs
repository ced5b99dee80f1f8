//! LSE merge of partial attention results over disjoint key sets (split-KV, cascades, ring):
//! `(o_a, lse_a), (o_b, lse_b) -> (o, lse)` as [`MergeShape`] defines it.

use super::{
    CallError, DTypeCode, Status, borrow_device, byte_range, caller_stream, check_disjoint,
    guarded, host_slice, host_slice_mut, write_sizes,
};
use crate::element::Element;
use crate::error::Error;
use crate::merge::{MergeShape, Partial};
use half::{bf16, f16};

/// `longattn_merge_desc`: the shape of the partial results, `o: [batch, seqlen, heads,
/// head_dim]` contiguous, `lse: [batch, heads, seqlen]` f32 (the dense output layout; varlen:
/// `batch = 1`, `seqlen = total_q`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CMergeDesc {
    /// Batch entries.
    pub batch: usize,
    /// Query rows per batch entry.
    pub seqlen: usize,
    /// Heads.
    pub heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

/// `longattn_partial`: one partial result read by a merge (host or device, as the call).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CPartial {
    /// Output, `o_len` elements of the call's dtype.
    pub o: *const std::ffi::c_void,
    /// Elements in `o`.
    pub o_len: usize,
    /// LSE, `lse_len` floats.
    pub lse: *const f32,
    /// Floats in `lse`.
    pub lse_len: usize,
}

/// `longattn_partial_mut`: a partial result written by a merge.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CPartialMut {
    /// Output, `o_len` elements of the call's dtype.
    pub o: *mut std::ffi::c_void,
    /// Elements in `o`.
    pub o_len: usize,
    /// LSE, `lse_len` floats.
    pub lse: *mut f32,
    /// Floats in `lse`.
    pub lse_len: usize,
}

impl CPartial {
    /// Byte ranges of `o` and `lse` (`T`-sized elements in `o`), for the overlap checks.
    fn ranges<T>(&self, name: [&'static str; 2]) -> [((usize, usize), &'static str); 2] {
        [
            (
                byte_range(self.o, self.o_len, std::mem::size_of::<T>()),
                name[0],
            ),
            (byte_range(self.lse.cast(), self.lse_len, 4), name[1]),
        ]
    }
}

impl CPartialMut {
    fn as_const(&self) -> CPartial {
        CPartial {
            o: self.o.cast_const(),
            o_len: self.o_len,
            lse: self.lse.cast_const(),
            lse_len: self.lse_len,
        }
    }
}

/// The validated shape, and every named partial's lengths checked against it (before any
/// pointer is read).
///
/// # Safety
/// `desc` is NULL or valid.
unsafe fn merge_shape(
    desc: *const CMergeDesc,
    parts: &[(&CPartial, &str)],
) -> Result<MergeShape, CallError> {
    // SAFETY: NULL or valid by the contract.
    let d = unsafe { desc.as_ref() }.ok_or(CallError::Null("desc"))?;
    let shape = MergeShape {
        batch: d.batch,
        seqlen: d.seqlen,
        heads: d.heads,
        head_dim: d.head_dim,
    };
    shape.check("desc", shape.o_len(), shape.lse_len())?;
    for (p, name) in parts {
        shape.check(name, p.o_len, p.lse_len)?;
    }
    Ok(shape)
}

/// `longattn_merge_sizes()`: elements of an `o` buffer and of an `lse` buffer.
///
/// # Safety
/// `desc` is NULL or valid; the outputs are NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_merge_sizes(
    desc: *const CMergeDesc,
    o_len: *mut usize,
    lse_len: *mut usize,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or valid by the contract.
        let shape = unsafe { merge_shape(desc, &[]) }?;
        // SAFETY: NULL or writable by the contract.
        unsafe { write_sizes(&[(o_len, shape.o_len()), (lse_len, shape.lse_len())]) };
        Ok(())
    })
}

/// A partial's host slices.
///
/// # Safety
/// `p.o` holds `o_len` readable `T`, `p.lse` `lse_len` readable floats.
unsafe fn host_partial<'a, T>(
    p: &CPartial,
    names: [&'static str; 2],
) -> Result<Partial<&'a [T], &'a [f32]>, CallError> {
    // SAFETY: forwarded contract.
    unsafe {
        Ok(Partial {
            o: host_slice::<T>(p.o, p.o_len, names[0])?,
            lse: host_slice::<f32>(p.lse.cast(), p.lse_len, names[1])?,
        })
    }
}

/// A written partial's host slices (its two buffers checked disjoint from the rest).
///
/// # Safety
/// `p.o` holds `o_len` writable `T`, `p.lse` `lse_len` writable floats, aliased by nothing
/// else in the call.
unsafe fn host_partial_mut<'a, T>(
    p: &CPartialMut,
    names: [&'static str; 2],
) -> Result<Partial<&'a mut [T], &'a mut [f32]>, CallError> {
    // SAFETY: forwarded contract.
    unsafe {
        Ok(Partial {
            o: host_slice_mut::<T>(p.o, p.o_len, names[0])?,
            lse: host_slice_mut::<f32>(p.lse.cast(), p.lse_len, names[1])?,
        })
    }
}

const A: [&str; 2] = ["a.o", "a.lse"];
const B: [&str; 2] = ["b.o", "b.lse"];
const OUT: [&str; 2] = ["out.o", "out.lse"];
const ACC: [&str; 2] = ["acc.o", "acc.lse"];
const PART: [&str; 2] = ["part.o", "part.lse"];

/// The written partial must overlap neither itself (`o` vs `lse`) nor a read one.
fn check_merge_disjoint<T>(
    w: &CPartialMut,
    w_names: [&'static str; 2],
    reads: &[(&CPartial, [&'static str; 2])],
) -> Result<(), CallError> {
    let [wo, wl] = w.as_const().ranges::<T>(w_names);
    let reads: Vec<_> = reads.iter().flat_map(|(p, n)| p.ranges::<T>(*n)).collect();
    check_disjoint(&[Some(wo), Some(wl)], &reads)
}

/// # Safety
/// As [`longattn_merge_cpu`], with `T` the element type of `dtype`.
unsafe fn merge_cpu_typed<T: Element>(
    shape: &MergeShape,
    a: &CPartial,
    b: &CPartial,
    out: &CPartialMut,
) -> Result<(), CallError> {
    check_merge_disjoint::<T>(out, OUT, &[(a, A), (b, B)])?;
    // SAFETY: lengths by the contract; the written partial checked disjoint above.
    let (a, b, out) = unsafe {
        (
            host_partial::<T>(a, A)?,
            host_partial::<T>(b, B)?,
            host_partial_mut::<T>(out, OUT)?,
        )
    };
    shape.merge_cpu(a, b, out)?;
    Ok(())
}

/// # Safety
/// As [`longattn_merge_into_cpu`], with `T` the element type of `dtype`.
unsafe fn merge_into_cpu_typed<T: Element>(
    shape: &MergeShape,
    acc: &CPartialMut,
    part: &CPartial,
) -> Result<(), CallError> {
    check_merge_disjoint::<T>(acc, ACC, &[(part, PART)])?;
    // SAFETY: lengths by the contract; the written partial checked disjoint above.
    let (acc, part) = unsafe {
        (
            host_partial_mut::<T>(acc, ACC)?,
            host_partial::<T>(part, PART)?,
        )
    };
    shape.merge_into_cpu(acc, part)?;
    Ok(())
}

/// `longattn_merge_cpu()`: `out = merge(a, b)` on host buffers of `dtype` (f32, f16 or bf16;
/// LSEs f32).
///
/// # Safety
/// `desc` is valid; each partial's `o` holds `o_len` elements of `dtype` and its `lse`
/// `lse_len` floats; `out`'s buffers writable and overlapping no other buffer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_merge_cpu(
    desc: *const CMergeDesc,
    dtype: DTypeCode,
    a: CPartial,
    b: CPartial,
    out: CPartialMut,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or valid by the contract.
        let shape =
            unsafe { merge_shape(desc, &[(&a, "a"), (&b, "b"), (&out.as_const(), "out")]) }?;
        // SAFETY: buffers as documented for `dtype`.
        unsafe { with_dtype!(dtype, T => merge_cpu_typed::<T>(&shape, &a, &b, &out)) }
    })
}

/// `longattn_merge_into_cpu()`: `acc = merge(acc, part)` in place on host buffers.
///
/// # Safety
/// As [`longattn_merge_cpu`], with `acc` read and written, overlapping no `part` buffer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_merge_into_cpu(
    desc: *const CMergeDesc,
    dtype: DTypeCode,
    acc: CPartialMut,
    part: CPartial,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or valid by the contract.
        let shape = unsafe { merge_shape(desc, &[(&acc.as_const(), "acc"), (&part, "part")]) }?;
        // SAFETY: buffers as documented for `dtype`.
        unsafe { with_dtype!(dtype, T => merge_into_cpu_typed::<T>(&shape, &acc, &part)) }
    })
}

/// A borrowed device partial: `o` and `lse`.
type DevicePartial<T> = (super::Borrowed<T>, super::Borrowed<f32>);

/// # Safety
/// `p`'s buffers are device allocations of the stream's context of the stated lengths,
/// alive for the call.
unsafe fn borrow_partial<T>(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    p: &CPartial,
    names: [&'static str; 2],
) -> Result<DevicePartial<T>, CallError> {
    // SAFETY: forwarded contract.
    unsafe {
        Ok((
            borrow_device::<T>(stream, p.o, p.o_len, names[0])?,
            borrow_device::<f32>(stream, p.lse.cast(), p.lse_len, names[1])?,
        ))
    }
}

/// The caller's stream, every buffer of the partials checked non-NULL first.
///
/// # Safety
/// As [`super::caller_stream`].
unsafe fn merge_stream(
    parts: &[(&CPartial, [&'static str; 2])],
    (device, stream): (i32, *mut std::ffi::c_void),
) -> Result<super::CallerStream, CallError> {
    let buffers: Vec<_> = parts
        .iter()
        .flat_map(|(p, n)| [(p.o, n[0]), (p.lse.cast(), n[1])])
        .collect();
    // SAFETY: forwarded contract.
    unsafe { caller_stream(&buffers, device, stream) }
}

/// # Safety
/// As [`longattn_merge_cuda`], with `T` the element type of `dtype`.
unsafe fn merge_cuda_typed<T: Element + cudarc::driver::DeviceRepr>(
    shape: &MergeShape,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    (a, b): (&CPartial, &CPartial),
    out: &CPartialMut,
) -> Result<(), CallError> {
    check_merge_disjoint::<T>(out, OUT, &[(a, A), (b, B)])?;
    // SAFETY: device allocations of the stated lengths by the contract.
    let (a, b, mut out) = unsafe {
        (
            borrow_partial::<T>(stream, a, A)?,
            borrow_partial::<T>(stream, b, B)?,
            borrow_partial::<T>(stream, &out.as_const(), OUT)?,
        )
    };
    shape.merge_gpu::<T, _, _, _, _>(
        stream,
        Partial {
            o: a.0.get(),
            lse: a.1.get(),
        },
        Partial {
            o: b.0.get(),
            lse: b.1.get(),
        },
        Partial {
            o: out.0.get_mut(),
            lse: out.1.get_mut(),
        },
    )?;
    Ok(())
}

/// # Safety
/// As [`longattn_merge_into_cuda`], with `T` the element type of `dtype`.
unsafe fn merge_into_cuda_typed<T: Element + cudarc::driver::DeviceRepr>(
    shape: &MergeShape,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    acc: &CPartialMut,
    part: &CPartial,
) -> Result<(), CallError> {
    check_merge_disjoint::<T>(acc, ACC, &[(part, PART)])?;
    // SAFETY: device allocations of the stated lengths by the contract.
    let (mut acc, part) = unsafe {
        (
            borrow_partial::<T>(stream, &acc.as_const(), ACC)?,
            borrow_partial::<T>(stream, part, PART)?,
        )
    };
    shape.merge_into_gpu::<T, _, _, _, _>(
        stream,
        Partial {
            o: acc.0.get_mut(),
            lse: acc.1.get_mut(),
        },
        Partial {
            o: part.0.get(),
            lse: part.1.get(),
        },
    )?;
    Ok(())
}

/// `longattn_merge_cuda()`: [`longattn_merge_cpu`] on device buffers of GPU `device` (f32,
/// f16 or bf16), queued on `stream` as [`super::longattn_dense_forward_cuda`]. **Not yet run
/// on a GPU** through the C API.
///
/// # Safety
/// As [`longattn_merge_cpu`], with every buffer a device allocation of `device` alive until
/// the queued work completes; `stream` NULL or a live stream of that device's primary
/// context.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_merge_cuda(
    desc: *const CMergeDesc,
    dtype: DTypeCode,
    a: CPartial,
    b: CPartial,
    out: CPartialMut,
    device: i32,
    stream: *mut std::ffi::c_void,
) -> Status {
    guarded(|| {
        let w = out.as_const();
        // SAFETY: NULL or valid by the contract.
        let shape = unsafe { merge_shape(desc, &[(&a, "a"), (&b, "b"), (&w, "out")]) }?;
        // SAFETY: NULL or a live stream of that device's primary context by the contract.
        let stream = unsafe { merge_stream(&[(&a, A), (&b, B), (&w, OUT)], (device, stream)) }?;
        // SAFETY: device buffers as documented for `dtype`.
        unsafe { with_dtype!(dtype, T => merge_cuda_typed::<T>(&shape, &stream, (&a, &b), &out)) }
    })
}

/// `longattn_merge_into_cuda()`: [`longattn_merge_into_cpu`] on device buffers, as
/// [`longattn_merge_cuda`]. **Not yet run on a GPU** through the C API.
///
/// # Safety
/// As [`longattn_merge_cuda`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_merge_into_cuda(
    desc: *const CMergeDesc,
    dtype: DTypeCode,
    acc: CPartialMut,
    part: CPartial,
    device: i32,
    stream: *mut std::ffi::c_void,
) -> Status {
    guarded(|| {
        let w = acc.as_const();
        // SAFETY: NULL or valid by the contract.
        let shape = unsafe { merge_shape(desc, &[(&w, "acc"), (&part, "part")]) }?;
        // SAFETY: NULL or a live stream of that device's primary context by the contract.
        let stream = unsafe { merge_stream(&[(&w, ACC), (&part, PART)], (device, stream)) }?;
        // SAFETY: device buffers as documented for `dtype`.
        unsafe { with_dtype!(dtype, T => merge_into_cuda_typed::<T>(&shape, &stream, &acc, &part)) }
    })
}
