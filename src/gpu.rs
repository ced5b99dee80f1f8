//! Shared GPU glue: the generated FFI and the device-side checks that every family's GPU
//! entry point (`dense/gpu.rs`, `merge/gpu.rs`, `paged/gpu.rs`) runs before a pointer
//! reaches a kernel.
//!
//! Layering (like cudarc): `ffi` (bindgen from `kernels/include/longattn/*.h`) -> this
//! module's checked launchers -> the safe `forward_gpu`/`merge_gpu` methods.

#[cfg(longattn_cuda)]
#[allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    clippy::all
)]
pub(crate) mod ffi {
    include!(concat!(env!("OUT_DIR"), "/ffi.rs"));
}

#[cfg(longattn_cuda)]
use crate::{
    element::DType,
    error::{Error, Result},
    layout::Strides,
};

#[cfg(longattn_cuda)]
/// Vector loads in the kernels move 16 bytes: pointers and strides must allow that.
pub(crate) const ALIGN_BYTES: u64 = 16;

#[cfg(longattn_cuda)]
/// Checks a device pointer for the kernels' 16-byte vector loads.
pub(crate) fn check_aligned(name: &str, ptr: u64) -> Result<()> {
    if !ptr.is_multiple_of(ALIGN_BYTES) {
        return Err(Error::Stride(format!(
            "{name} device pointer {ptr:#x} is not {ALIGN_BYTES}-byte aligned"
        )));
    }
    Ok(())
}

#[cfg(longattn_cuda)]
/// Checks a device pointer and strides for the kernels' 16-byte vector loads.
pub(crate) fn check_vector_access(
    name: &str,
    ptr: u64,
    strides: &Strides,
    elem_bytes: usize,
) -> Result<()> {
    check_aligned(name, ptr)?;
    let per_vec = ALIGN_BYTES as i64 / elem_bytes as i64;
    for (s, n) in [
        (strides.batch, "batch"),
        (strides.seq, "seq"),
        (strides.head, "head"),
    ] {
        if s % per_vec != 0 {
            return Err(Error::Stride(format!(
                "{name} {n} stride {s} must be a multiple of {per_vec} elements on the GPU"
            )));
        }
    }
    Ok(())
}

#[cfg(longattn_cuda)]
pub(crate) fn la_dtype(dtype: DType) -> ffi::LaDtype {
    match dtype {
        DType::F16 => ffi::LaDtype::LA_F16,
        DType::BF16 => ffi::LaDtype::LA_BF16,
        DType::F32 => ffi::LaDtype::LA_F32,
    }
}

/// `cudaErrorNotSupported`: a launcher's answer when the device cannot run the kernel it
/// needs (compute capability, opt-in shared memory per block, no code in the fatbinary).
#[cfg(longattn_cuda)]
const CUDA_ERROR_NOT_SUPPORTED: i32 = 801;

/// Turns a launcher's `cudaError_t` into a `Result` that keeps the operation and the code:
/// `cudaErrorNotSupported` (the device's shared-memory or architecture limits) is
/// [`Error::Unsupported`], any other code [`Error::CudaCall`].
#[cfg(longattn_cuda)]
pub(crate) fn check_launch(what: &str, code: i32) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: la_error_string returns a static NUL-terminated string for any code.
    let message = unsafe { std::ffi::CStr::from_ptr(ffi::la_error_string(code)) }
        .to_string_lossy()
        .into_owned();
    if code == CUDA_ERROR_NOT_SUPPORTED {
        return Err(Error::Unsupported(format!(
            "{what}: this device cannot run the kernel (shared memory per block or compute \
             capability): {message}"
        )));
    }
    Err(Error::CudaCall {
        op: what.to_string(),
        code,
        message,
    })
}

#[cfg(longattn_cuda)]
/// Bytes per element of `dtype`.
pub(crate) fn dtype_bytes(dtype: DType) -> usize {
    match dtype {
        DType::F16 | DType::BF16 => 2,
        DType::F32 => 4,
    }
}
