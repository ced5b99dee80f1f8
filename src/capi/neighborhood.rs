//! Neighborhood attention (1-D to 3-D grids, NATTEN's semantics) on host or device buffers:
//! `longattn_neighborhood_{sizes,forward_cpu,forward_cuda}` over [`NeighborhoodAttention`].

use super::{
    CTensor, CTensorMut, CallError, DTypeCode, Status, cpu_entry, cuda_entry, guarded,
    scale_softcap, write_sizes,
};
use crate::dense::AttentionOptions;
use crate::error::Error;
use crate::neighborhood::{
    MAX_NEIGHBORHOOD_DIMS, NeighborhoodAttention, NeighborhoodDim, NeighborhoodShape,
};

/// `longattn_neighborhood_dim`: one grid dim ([`NeighborhoodDim`]).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CNeighborhoodDim {
    /// Tokens along the dim.
    pub length: usize,
    /// Keys per query along the dim.
    pub kernel: usize,
    /// Distance between neighbors; 0 means 1.
    pub dilation: usize,
    /// Queries per shared window (non-causal dims); 0 means 1.
    pub stride: usize,
    /// Nonzero: keys only at or before the query along this dim.
    pub causal: i32,
}

/// `longattn_neighborhood_desc`: `q, out: [batch, X, (Y, (Z,)) heads_q, head_dim]`, `k, v`
/// with `heads_kv`, the grid flattened into the token axis (row-major, last dim fastest);
/// `dims[..rank]` are the grid dims, outermost first.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CNeighborhoodDesc {
    /// Sequences (grids).
    pub batch: usize,
    /// Query heads.
    pub heads_q: usize,
    /// Key/value heads (divides `heads_q`).
    pub heads_kv: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Grid dims in use, 1 to 3.
    pub rank: usize,
    /// The grid dims; entries past `rank` are not read.
    pub dims: [CNeighborhoodDim; MAX_NEIGHBORHOOD_DIMS],
    /// `q.k` multiplier; 0 means `1/sqrt(head_dim)`.
    pub scale: f32,
    /// Softcap; 0 means off.
    pub softcap: f32,
}

/// Builds the validated problem from a C descriptor.
///
/// # Safety
/// `desc` is NULL or valid.
unsafe fn neighborhood_problem(
    desc: *const CNeighborhoodDesc,
) -> Result<NeighborhoodAttention, CallError> {
    // SAFETY: NULL or valid by the contract.
    let desc = unsafe { desc.as_ref() }.ok_or(CallError::Null("desc"))?;
    let dims = desc.dims.get(..desc.rank).ok_or_else(|| {
        Error::Unsupported(format!(
            "neighborhood: rank {}: 1 to {MAX_NEIGHBORHOOD_DIMS} grid dims supported",
            desc.rank
        ))
    })?;
    let dims: Vec<NeighborhoodDim> = dims
        .iter()
        .map(|d| {
            NeighborhoodDim::new(d.length, d.kernel)
                .with_dilation(d.dilation.max(1))
                .with_stride(d.stride.max(1))
                .with_causal(d.causal != 0)
        })
        .collect();
    let shape = NeighborhoodShape {
        batch: desc.batch,
        heads_q: desc.heads_q,
        heads_kv: desc.heads_kv,
        head_dim: desc.head_dim,
        dims: &dims,
    };
    let options = scale_softcap(AttentionOptions::default(), desc.scale, desc.softcap);
    Ok(NeighborhoodAttention::new(&shape, &options)?)
}

/// `longattn_neighborhood_sizes()`: elements of the output (`q` too) and of the LSE.
///
/// # Safety
/// `desc` is NULL or valid; the outputs are NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_neighborhood_sizes(
    desc: *const CNeighborhoodDesc,
    out_len: *mut usize,
    lse_len: *mut usize,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor by the contract.
        let na = unsafe { neighborhood_problem(desc) }?;
        // SAFETY: NULL or writable by the contract.
        unsafe { write_sizes(&[(out_len, na.out_len()), (lse_len, na.lse_len())]) };
        Ok(())
    })
}

/// `longattn_neighborhood_forward_cpu()`: neighborhood attention on host buffers
/// ([`NeighborhoodAttention::forward_cpu`]; f32, f16 or bf16). LSE `[batch, heads_q, tokens]`.
///
/// # Safety
/// `desc` is a valid descriptor; each tensor's `data` points to `len` elements of `dtype`
/// (`out` writable and not overlapping the inputs); `lse`, when not NULL, points to
/// `lse_len` writable floats.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_neighborhood_forward_cpu(
    desc: *const CNeighborhoodDesc,
    dtype: DTypeCode,
    q: CTensor,
    k: CTensor,
    v: CTensor,
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor by the contract.
        let na = unsafe { neighborhood_problem(desc) }?;
        // SAFETY: the buffers as documented.
        unsafe { cpu_entry(&na, dtype, (q, k, v), out, (lse, lse_len)) }
    })
}

/// `longattn_neighborhood_forward_cuda()`: [`longattn_neighborhood_forward_cpu`] on device
/// buffers of GPU `device`, queued on `stream` as [`super::longattn_dense_forward_cuda`]
/// ([`NeighborhoodAttention::forward_gpu`]: f16 or bf16, head_dim a multiple of 8 up to 256,
/// 16-byte aligned buffers, strides multiples of 8). **Not yet run on a GPU** through the C
/// API.
///
/// # Safety
/// As [`super::longattn_dense_forward_cuda`] with a neighborhood descriptor.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_neighborhood_forward_cuda(
    desc: *const CNeighborhoodDesc,
    dtype: DTypeCode,
    q: CTensor,
    k: CTensor,
    v: CTensor,
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
    device: i32,
    stream: *mut std::ffi::c_void,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor by the contract.
        let na = unsafe { neighborhood_problem(desc) }?;
        let gpu = (device, stream);
        // SAFETY: device buffers and stream as documented.
        unsafe { cuda_entry(&na, dtype, (q, k, v), out, (lse, lse_len), gpu) }
    })
}
