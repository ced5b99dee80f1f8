//! Run-time device selection that never panics: a GPU when the kernels were compiled, libcuda
//! loads and a supported device exists; otherwise the CPU. `LONGATTN_REQUIRE_GPU=1` turns
//! "no GPU" into an error so that GPU test runs cannot silently fall back.

use crate::error::{Error, Result};
use cudarc::driver::CudaContext;
use std::sync::Arc;

/// Where a call runs.
#[derive(Debug, Clone)]
pub enum Device {
    /// The host CPU (the reference-semantics fallback).
    Cpu,
    /// A CUDA device, through its driver context.
    Cuda(Arc<CudaContext>),
}

/// Whether `LONGATTN_REQUIRE_GPU=1` is set.
pub fn gpu_required() -> bool {
    std::env::var("LONGATTN_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Whether this build contains the CUDA kernels.
pub const fn cuda_compiled() -> bool {
    cfg!(longattn_cuda)
}

/// The thread's current CUDA context, NULL when none is (or the driver is not initialised),
/// and NULL without reading it when this build has no kernels or libcuda does not load (so
/// that the C API can restore what it found, see `capi::CallerStream`).
pub(crate) fn current_context() -> cudarc::driver::sys::CUcontext {
    if !cuda_compiled() || !libcuda_present() {
        return std::ptr::null_mut();
    }
    cudarc::driver::result::ctx::get_current()
        .ok()
        .flatten()
        .unwrap_or(std::ptr::null_mut())
}

/// Whether libcuda loads, probed once per process: a failed probe tries every library name
/// on every search path again, milliseconds per call, and every GPU entry point (each C API
/// CUDA call twice) asks. With `dynamic-linking`/`static-linking` (chosen by the top crate)
/// libcuda is linked and there is nothing to probe: a binary without it does not start.
fn libcuda_present() -> bool {
    #[cfg(feature = "dynamic-loading")]
    {
        static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        // SAFETY: only probes for the driver library.
        *PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() })
    }
    #[cfg(not(feature = "dynamic-loading"))]
    true
}

/// Opens GPU `ordinal` if it can run the kernels (compute capability 8.x or 9.0).
pub fn open_gpu(ordinal: usize) -> Result<Arc<CudaContext>> {
    if !cuda_compiled() {
        return Err(Error::CudaNotCompiled);
    }
    // cudarc panics on first use without libcuda.
    if !libcuda_present() {
        return Err(Error::NoGpu("libcuda could not be loaded".into()));
    }
    let count = CudaContext::device_count().map_err(|e| Error::NoGpu(e.to_string()))?;
    if ordinal >= count.max(0) as usize {
        return Err(Error::NoGpu(format!(
            "device {ordinal} requested but {count} CUDA device(s) found"
        )));
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| Error::NoGpu(e.to_string()))?;
    let (major, minor) = ctx.compute_capability()?;
    if !(major == 8 || (major, minor) == (9, 0)) {
        return Err(Error::NoGpu(format!(
            "compute capability {major}.{minor}: the kernels are built for sm_80 and sm_90a"
        )));
    }
    Ok(ctx)
}

impl Device {
    /// GPU 0 when usable, else the CPU; an error only under `LONGATTN_REQUIRE_GPU=1`.
    pub fn best() -> Result<Device> {
        match open_gpu(0) {
            Ok(ctx) => Ok(Device::Cuda(ctx)),
            Err(e) if gpu_required() => Err(Error::NoGpu(format!(
                "LONGATTN_REQUIRE_GPU=1 but no GPU is usable: {e}"
            ))),
            Err(_) => Ok(Device::Cpu),
        }
    }

    /// A short description for logs and tables.
    pub fn describe(&self) -> String {
        match self {
            Device::Cpu => format!("CPU ({} threads)", rayon::current_num_threads()),
            Device::Cuda(ctx) => {
                let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
                let cc = ctx
                    .compute_capability()
                    .map(|(a, b)| format!("sm_{a}{b}"))
                    .unwrap_or_default();
                format!("{name} ({cc})")
            }
        }
    }
}
