//! Shared GPU glue: the generated FFI and the device-side checks that every family's GPU
//! entry point (`dense/gpu.rs`, `merge/gpu.rs`, `paged/gpu.rs`) runs before a pointer
//! reaches a kernel.
//!
//! Layering (like cudarc): `ffi` (bindgen from `kernels/include/longattn/*.h`) -> this
//! module's checked launchers -> the safe `forward_gpu`/`merge_gpu` methods.

use crate::element::DType;
#[cfg(longattn_cuda)]
use crate::element::Element;
use crate::error::{Error, Result};
#[cfg(longattn_cuda)]
use crate::layout::{Strided, Strides};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
#[cfg(longattn_cuda)]
use cudarc::driver::{CudaStream, SyncOnDrop};

/// Grid y/z limit: the dense and neighborhood kernels index heads and the batch with them.
pub(crate) const GRID_LIMIT: usize = 65535;

/// Headroom below `i32::MAX` that [`GPU_MAX_POSITIONS`] keeps for the kernels' 32-bit tile
/// arithmetic. The kernels hold keys, query rows and positions in `int` and add at most a
/// tile to a value that the host bounds by a length, a packed total, a paged capacity or a
/// position: a tile start plus a row or key inside it (query tiles of at most 192 rows,
/// key tiles of at most 176 keys), e.g. `j = n0 + r0 + ...` in
/// `paged_prefill.cu`'s `load_kv_t` with `n0 < sk`. 2^16 covers the largest tile more than
/// 300 times over. Windows and sinks need no margin: every kernel combines them with positions
/// in 64-bit (`Mask::visible` and `key_tiles` in `mask.cuh`, `WarpWindowMask::prepare`, the
/// paged decode bounds) or only compares them.
pub(crate) const GPU_POSITION_MARGIN: usize = 1 << 16;

/// Most query rows, keys, positions (one past the last), packed totals (`total_q`,
/// `total_k`) or paged capacity (`max_pages_per_seq * page_size`) per sequence that the GPU
/// entry points take: `i32::MAX - ` [`GPU_POSITION_MARGIN`] (2^31 - 1 - 2^16), so that no
/// `int` tile arithmetic of a kernel overflows. The CPU path takes lengths up to `i32::MAX`.
pub(crate) const GPU_MAX_POSITIONS: usize = i32::MAX as usize - GPU_POSITION_MARGIN;

/// `Error::Unsupported` naming the first `(name, value)` of `values` (lengths, key counts,
/// packed totals, one past a largest position) above [`GPU_MAX_POSITIONS`]: every family's
/// GPU validation calls this before any allocation, upload or launch.
pub(crate) fn check_gpu_positions(who: &str, values: &[(&str, usize)]) -> Result<()> {
    match values.iter().find(|&&(_, v)| v > GPU_MAX_POSITIONS) {
        Some((name, v)) => Err(Error::Unsupported(format!(
            "{who} on the GPU: {name} = {v} exceeds {GPU_MAX_POSITIONS} (i32::MAX - \
             {GPU_POSITION_MARGIN}: the kernels' 32-bit tile arithmetic); the CPU path takes it"
        ))),
        None => Ok(()),
    }
}

/// Refuses every element type but f16 and bf16 on the GPU:
/// `"{who} f16 or bf16 ({dtype} runs on the CPU {cpu})"`.
pub(crate) fn check_half(dtype: DType, who: &str, cpu: &str) -> Result<()> {
    if !matches!(dtype, DType::F16 | DType::BF16) {
        return Err(Error::Unsupported(format!(
            "{who} f16 or bf16 ({dtype} runs on the CPU {cpu})"
        )));
    }
    Ok(())
}

/// The GPU kernels' head dims: multiples of 8 (16-byte rows) up to `max`.
pub(crate) fn check_head_dim(head_dim: usize, max: usize) -> Result<()> {
    if !head_dim.is_multiple_of(8) || head_dim > max {
        return Err(Error::Unsupported(format!(
            "head_dim {head_dim} on the GPU: must be a multiple of 8 and at most {max}"
        )));
    }
    Ok(())
}

/// The batch and a head count index grid y/z: at most [`GRID_LIMIT`] each.
pub(crate) fn check_grid_yz(batch: usize, (heads_name, heads): (&str, usize)) -> Result<()> {
    if batch > GRID_LIMIT || heads > GRID_LIMIT {
        return Err(Error::Unsupported(format!(
            "batch ({batch}) and {heads_name} ({heads}) must be at most {GRID_LIMIT} on the GPU"
        )));
    }
    Ok(())
}

/// Head dims of the tensor-core kernels' tile configurations (`DenseTraits*` in
/// `kernels/include/longattn/mma_mainloop.cuh`, and the Hopper kernel's).
pub(crate) const TENSOR_CORE_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// `Error::Unsupported` unless `head_dim` is one of [`TENSOR_CORE_HEAD_DIMS`]:
/// "`{what}` take(s) head_dim 64, 128 or 256, not `{head_dim}`".
pub(crate) fn check_tensor_core_head_dim(what: &str, head_dim: usize) -> Result<()> {
    if TENSOR_CORE_HEAD_DIMS.contains(&head_dim) {
        return Ok(());
    }
    Err(Error::Unsupported(format!(
        "{what} head_dim 64, 128 or 256, not {head_dim}"
    )))
}

/// The checks the dense and neighborhood entry points share, in this order: f16/bf16
/// (`"{family} attention on the GPU takes ..."`), the head dim (up to
/// [`crate::dense::GPU_MAX_HEAD_DIM`]), batch and `heads_q` within the grid.
pub(crate) fn check_attention_gpu(
    family: &str,
    dtype: DType,
    head_dim: usize,
    batch: usize,
    heads_q: usize,
) -> Result<()> {
    check_half(
        dtype,
        &format!("{family} attention on the GPU takes"),
        "path",
    )?;
    check_head_dim(head_dim, crate::dense::GPU_MAX_HEAD_DIM)?;
    check_grid_yz(batch, ("heads_q", heads_q))
}

/// Calls a launcher of the CUDA build: `cuda_call!(f, args...)` is `f(args...)`. In the
/// CPU-only build the launchers do not exist; the call only borrows its arguments and is
/// `Err(Error::CudaNotCompiled)`.
#[cfg(longattn_cuda)]
macro_rules! cuda_call {
    ($f:expr $(, $arg:expr)* $(,)?) => {
        $f($($arg),*)
    };
}
#[cfg(not(longattn_cuda))]
macro_rules! cuda_call {
    ($f:expr $(, $arg:expr)* $(,)?) => {{
        let _ = ($(&$arg,)*);
        Err($crate::error::Error::CudaNotCompiled)
    }};
}
pub(crate) use cuda_call;

mod sealed {
    /// Implemented only for cudarc's own buffer types.
    pub trait Sealed: Elements {}

    /// A buffer's length in elements: host slices and cudarc's buffer types (see
    /// [`crate::layout::Strided::extent`]).
    pub trait Elements {
        fn elements(&self) -> usize;
    }
}
pub(crate) use sealed::Elements;

impl<T> Elements for [T] {
    fn elements(&self) -> usize {
        self.len()
    }
}
impl<T> Elements for CudaSlice<T> {
    fn elements(&self) -> usize {
        self.len()
    }
}
impl<T> Elements for CudaView<'_, T> {
    fn elements(&self) -> usize {
        self.len()
    }
}
impl<T> Elements for CudaViewMut<'_, T> {
    fn elements(&self) -> usize {
        self.len()
    }
}

/// A device buffer the GPU entry points read: cudarc's `CudaSlice`, `CudaView` or
/// `CudaViewMut`. The length checks of every entry point trust `len()`; cudarc's
/// `DevicePtr` is a safe trait that any type can implement with a wrong length, so the
/// entry points take only these sealed types (memory safety through the safe API).
///
/// No other type can be made one (the seal is private to this crate):
///
/// ```compile_fail
/// struct Pretender; // would report any length it likes
/// impl longattn::DeviceBuffer<f32> for Pretender {}
/// ```
pub trait DeviceBuffer<T>: DevicePtr<T> + sealed::Sealed {}

/// A device buffer the GPU entry points write: cudarc's `CudaSlice` or `CudaViewMut`.
pub trait DeviceBufferMut<T>: DevicePtrMut<T> + sealed::Sealed {}

impl<T> sealed::Sealed for CudaSlice<T> {}
impl<T> sealed::Sealed for CudaView<'_, T> {}
impl<T> sealed::Sealed for CudaViewMut<'_, T> {}
impl<T> DeviceBuffer<T> for CudaSlice<T> {}
impl<T> DeviceBuffer<T> for CudaView<'_, T> {}
impl<T> DeviceBuffer<T> for CudaViewMut<'_, T> {}
impl<T> DeviceBufferMut<T> for CudaSlice<T> {}
impl<T> DeviceBufferMut<T> for CudaViewMut<'_, T> {}

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
/// Vector loads in the kernels move 16 bytes: pointers and strides must allow that.
pub(crate) const ALIGN_BYTES: u64 = 16;

#[cfg(longattn_cuda)]
/// Checks a device pointer for the kernels' 16-byte vector loads.
pub(crate) fn check_aligned(name: &str, ptr: u64) -> Result<()> {
    // A valid layout the kernels cannot address: Unsupported (the CPU path takes it).
    if !ptr.is_multiple_of(ALIGN_BYTES) {
        return Err(Error::Unsupported(format!(
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
            return Err(Error::Unsupported(format!(
                "{name} {n} stride {s} must be a multiple of {per_vec} elements on the GPU"
            )));
        }
    }
    Ok(())
}

/// `stream`'s handle for a launcher, with the stream's context made current on this thread
/// first. The launchers use the CUDA runtime, which works in the thread's current context (or
/// makes device 0's primary context current when there is none): a caller that last touched
/// another GPU on this thread, or a fresh thread whose first CUDA call is the launch, would
/// otherwise set kernel attributes and query limits on another device and queue on a stream
/// of a context that is not current. cudarc binds before its own calls; the launchers are
/// not cudarc's, so every launch site takes its handle here.
#[cfg(longattn_cuda)]
pub(crate) fn launch_stream(stream: &CudaStream) -> Result<cudarc::driver::sys::CUstream> {
    stream.context().bind_to_thread()?;
    Ok(stream.cu_stream())
}

#[cfg(longattn_cuda)]
pub(crate) fn la_dtype(dtype: DType) -> ffi::LaDtype {
    match dtype {
        DType::F16 => ffi::LaDtype::LA_F16,
        DType::BF16 => ffi::LaDtype::LA_BF16,
        DType::F32 => ffi::LaDtype::LA_F32,
        DType::F8E4M3 => ffi::LaDtype::LA_F8E4M3,
    }
}

/// `kv_dtype` and `kv_scales` of the paged params for a cache of type `C` (the scales'
/// device pointer only for FP8; the kernels of a cache of the query type never read it).
#[cfg(longattn_cuda)]
pub(crate) fn kv_params<C: Element>(scales: u64) -> (ffi::LaDtype, *const f32) {
    let fp8 = C::DTYPE == DType::F8E4M3;
    (
        la_dtype(C::DTYPE),
        if fp8 {
            scales as *const f32
        } else {
            std::ptr::null()
        },
    )
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

/// The text of a launcher's `la_*_unsupported_reason` answer: the reason it gave, or "the
/// device rejected it" for none.
///
/// # Safety
/// `reason` is NULL or a static NUL-terminated string (what those queries return).
#[cfg(longattn_cuda)]
pub(crate) unsafe fn reason_text(
    reason: *const std::ffi::c_char,
) -> std::borrow::Cow<'static, str> {
    if reason.is_null() {
        return "the device rejected it".into();
    }
    // SAFETY: non-null, static and NUL-terminated by the contract.
    unsafe { std::ffi::CStr::from_ptr(reason) }.to_string_lossy()
}

#[cfg(longattn_cuda)]
/// Bytes per element of `dtype`.
pub(crate) fn dtype_bytes(dtype: DType) -> usize {
    match dtype {
        DType::F8E4M3 => 1,
        DType::F16 | DType::BF16 => 2,
        DType::F32 => 4,
    }
}

/// Device pointers of an attention call's `q`, `k`, `v`, `out`, each checked for the kernels'
/// 16-byte vector access, with the sync guards that keep cudarc's event tracking correct
/// until the launch is queued (keep the value alive until then).
#[cfg(longattn_cuda)]
pub(crate) struct QkvoPtrs<'a> {
    /// Device pointer of `q`.
    pub q: u64,
    /// Device pointer of `k`.
    pub k: u64,
    /// Device pointer of `v`.
    pub v: u64,
    /// Device pointer of `out`.
    pub o: u64,
    _sync: [SyncOnDrop<'a>; 4],
}

#[cfg(longattn_cuda)]
impl<'a> QkvoPtrs<'a> {
    /// Takes the pointers of `q`, `k`, `v`, `out` (in that order) on `stream`, then checks
    /// them and their strides (in that order) for the kernels' 16-byte vector accesses.
    pub(crate) fn new<T, I, O>(
        stream: &'a CudaStream,
        q: &'a Strided<&I>,
        k: &'a Strided<&I>,
        v: &'a Strided<&I>,
        out: (&'a mut O, &Strides),
    ) -> Result<Self>
    where
        T: Element,
        I: DeviceBuffer<T>,
        O: DeviceBufferMut<T>,
    {
        Self::with_access(stream, q, k, v, out, true)
    }

    /// [`QkvoPtrs::new`], checking the 16-byte vector accesses only when `vector` (a kernel
    /// that moves single elements needs none: cudarc's typed buffers are element-aligned).
    /// The output's element type `U` may differ from the inputs' `T` (the FP8 forward).
    pub(crate) fn with_access<T, U, I, O>(
        stream: &'a CudaStream,
        q: &'a Strided<&I>,
        k: &'a Strided<&I>,
        v: &'a Strided<&I>,
        (out, out_strides): (&'a mut O, &Strides),
        vector: bool,
    ) -> Result<Self>
    where
        T: Element,
        U: Element,
        I: DeviceBuffer<T>,
        O: DeviceBufferMut<U>,
    {
        let bytes = dtype_bytes(T::DTYPE);
        let (q_ptr, q_sync) = q.data.device_ptr(stream);
        let (k_ptr, k_sync) = k.data.device_ptr(stream);
        let (v_ptr, v_sync) = v.data.device_ptr(stream);
        let (o_ptr, o_sync) = out.device_ptr_mut(stream);
        if vector {
            check_vector_access("q", q_ptr, &q.strides, bytes)?;
            check_vector_access("k", k_ptr, &k.strides, bytes)?;
            check_vector_access("v", v_ptr, &v.strides, bytes)?;
            check_vector_access("out", o_ptr, out_strides, dtype_bytes(U::DTYPE))?;
        }
        Ok(QkvoPtrs {
            q: q_ptr,
            k: k_ptr,
            v: v_ptr,
            o: o_ptr,
            _sync: [q_sync, k_sync, v_sync, o_sync],
        })
    }
}

/// The device pointer of an optional read buffer and its sync guard: `(0, None)` (a null
/// pointer for the kernel) when absent.
#[cfg(longattn_cuda)]
pub(crate) fn ptr_or_null<'a, T, B>(
    buf: Option<&'a B>,
    stream: &'a CudaStream,
) -> (u64, Option<SyncOnDrop<'a>>)
where
    B: DevicePtr<T> + ?Sized,
{
    match buf {
        Some(b) => {
            let (p, s) = b.device_ptr(stream);
            (p, Some(s))
        }
        None => (0, None),
    }
}

/// The device pointer of an optional written buffer (an LSE output, scratch) and its sync
/// guard: `(0, None)` (a null pointer for the kernel) when absent.
#[cfg(longattn_cuda)]
pub(crate) fn ptr_mut_or_null<'a, T, B>(
    buf: Option<&'a mut B>,
    stream: &'a CudaStream,
) -> (u64, Option<SyncOnDrop<'a>>)
where
    B: DevicePtrMut<T> + ?Sized,
{
    match buf {
        Some(b) => {
            let (p, s) = b.device_ptr_mut(stream);
            (p, Some(s))
        }
        None => (0, None),
    }
}

#[cfg(test)]
mod position_limit {
    use super::*;
    use crate::dense::{AttentionOptions, AttentionShape, FlashAttention};
    use crate::layout::SeqLens;

    /// The limit is `i32::MAX - 2^16`, inclusive; the first value past it is named.
    #[test]
    fn gpu_positions_limit_is_inclusive_and_named() {
        assert_eq!(GPU_MAX_POSITIONS, (1 << 31) - 1 - (1 << 16));
        assert!(check_gpu_positions("x", &[("a", 0), ("b", GPU_MAX_POSITIONS)]).is_ok());
        let e = check_gpu_positions("x", &[("a", 1), ("b", GPU_MAX_POSITIONS + 1), ("c", 1)]);
        let Err(Error::Unsupported(m)) = e else {
            panic!("{e:?}")
        };
        assert!(
            m.contains("b = 2147418112") && m.contains("2147418111"),
            "{m}"
        );
    }

    /// A dense problem of `i32::MAX` keys (reachable with broadcast K/V strides) is valid on
    /// the CPU and refused for the GPU, by its lengths or its packed totals.
    #[test]
    fn dense_lengths_past_the_limit_are_refused_for_the_gpu() {
        let attn = |batch, seqlens| {
            let shape = AttentionShape {
                batch,
                heads_q: 1,
                heads_kv: 1,
                head_dim: 64,
                seqlens,
            };
            FlashAttention::new(&shape, &AttentionOptions::default()).unwrap()
        };
        let fixed = |sq, sk| SeqLens::Fixed {
            seqlen_q: sq,
            seqlen_k: sk,
        };
        let refused = |a: FlashAttention, name: &str| {
            let e = a.check_gpu_positions("dense attention");
            assert!(
                matches!(&e, Err(Error::Unsupported(m)) if m.contains(name)),
                "{name}: {e:?}"
            );
        };
        refused(attn(1, fixed(1, i32::MAX as usize)), "seqlen_k");
        refused(attn(1, fixed(GPU_MAX_POSITIONS + 1, 1)), "seqlen_q");
        assert!(
            attn(3, fixed(GPU_MAX_POSITIONS, GPU_MAX_POSITIONS))
                .check_gpu_positions("dense attention")
                .is_ok()
        );
        // Varlen: each sequence within the limit, the packed keys past it.
        let half = (GPU_MAX_POSITIONS / 2 + 1) as i32;
        let (cq, ck) = ([0, 1, 2], [0, half, 2 * half]);
        let varlen = SeqLens::Varlen {
            cu_seqlens_q: &cq,
            cu_seqlens_k: &ck,
        };
        refused(attn(2, varlen), "total_k");
    }
}

/// The C launchers refuse bad arguments before any CUDA call, so these run without a GPU.
#[cfg(all(test, longattn_cuda))]
mod c_entry_checks {
    use super::ffi;

    const INVALID_VALUE: i32 = 1; // cudaErrorInvalidValue

    fn dense() -> ffi::LaDenseParams {
        ffi::LaDenseParams {
            batch: 1,
            seqlen_q: 4,
            seqlen_k: 4,
            heads_q: 2,
            heads_kv: 1,
            head_dim: 64,
            total_q: 4,
            total_k: 4,
            window_left: -1,
            window_right: -1,
            scale: 0.125,
            dtype: ffi::LaDtype::LA_BF16,
            ..Default::default()
        }
    }

    #[test]
    fn dense_entry_refuses_what_the_rust_api_refuses() {
        let cases: Vec<(&str, ffi::LaDenseParams)> = vec![
            (
                "heads_kv 0",
                ffi::LaDenseParams {
                    heads_kv: 0,
                    ..dense()
                },
            ),
            (
                "gqa ratio",
                ffi::LaDenseParams {
                    heads_kv: 3,
                    ..dense()
                },
            ),
            (
                "head_dim 0",
                ffi::LaDenseParams {
                    head_dim: 0,
                    ..dense()
                },
            ),
            (
                "batch < 0",
                ffi::LaDenseParams {
                    batch: -1,
                    ..dense()
                },
            ),
            (
                "window -2",
                ffi::LaDenseParams {
                    window_left: -2,
                    ..dense()
                },
            ),
            (
                "sinks < 0",
                ffi::LaDenseParams {
                    sinks: -1,
                    ..dense()
                },
            ),
            (
                "scale nan",
                ffi::LaDenseParams {
                    scale: f32::NAN,
                    ..dense()
                },
            ),
            (
                "scale 0",
                ffi::LaDenseParams {
                    scale: 0.0,
                    ..dense()
                },
            ),
            (
                "softcap nan",
                ffi::LaDenseParams {
                    softcap: f32::NAN,
                    ..dense()
                },
            ),
            (
                "softcap 1e-40",
                ffi::LaDenseParams {
                    softcap: 1e-40,
                    ..dense()
                },
            ),
            (
                "stride < 0",
                ffi::LaDenseParams {
                    q_row_stride: -8,
                    ..dense()
                },
            ),
            // Null q/k/v/o with work to do.
            ("null pointers", dense()),
        ];
        for (name, p) in cases {
            // SAFETY: the params are refused before any pointer is read or CUDA is called.
            let code = unsafe {
                ffi::la_dense_forward(&p, ffi::LaDenseKernel::LA_DENSE_AUTO, std::ptr::null_mut())
            };
            assert_eq!(code, INVALID_VALUE, "{name}");
            // SAFETY: as above.
            let ok =
                unsafe { ffi::la_dense_kernel_supports(&p, ffi::LaDenseKernel::LA_DENSE_SIMT) };
            assert_eq!(ok, 0, "{name}");
        }
        // SAFETY: a NULL params pointer is refused.
        let code = unsafe {
            ffi::la_dense_forward(
                std::ptr::null(),
                ffi::LaDenseKernel::LA_DENSE_AUTO,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(code, INVALID_VALUE);
    }

    #[test]
    fn merge_and_paged_entries_refuse_bad_arguments() {
        let merge = ffi::LaMergeParams {
            batch: 1,
            seqlen: 2,
            heads: 1,
            head_dim: 0,
            dtype: ffi::LaDtype::LA_F16,
            ..Default::default()
        };
        // SAFETY: refused before any pointer is read.
        assert_eq!(
            unsafe { ffi::la_merge(&merge, std::ptr::null_mut()) },
            INVALID_VALUE
        );
        let merge = ffi::LaMergeParams {
            head_dim: 8,
            ..merge
        }; // NULL buffers with work
        // SAFETY: as above.
        assert_eq!(
            unsafe { ffi::la_merge(&merge, std::ptr::null_mut()) },
            INVALID_VALUE
        );
        // SAFETY: as above.
        assert_eq!(
            unsafe { ffi::la_merge(std::ptr::null(), std::ptr::null_mut()) },
            INVALID_VALUE
        );

        let decode = ffi::LaPagedDecodeParams {
            q_len: 1,
            heads_q: 4,
            num_splits: 1,
            scale: 0.1,
            window_left: -1,
            window_right: 0,
            streaming_window: 1,
            dtype: ffi::LaDtype::LA_BF16,
            cache: ffi::LaPagedCache {
                batch: 1,
                num_pages: 1,
                page_size: 16,
                heads_kv: 0, // divides heads_q
                head_dim: 64,
                max_pages_per_seq: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        // SAFETY: refused before any pointer is read.
        assert_eq!(
            unsafe { ffi::la_paged_decode(&decode, std::ptr::null_mut()) },
            INVALID_VALUE
        );
        // SAFETY: as above.
        assert_eq!(
            unsafe { ffi::la_paged_decode(std::ptr::null(), std::ptr::null_mut()) },
            INVALID_VALUE
        );
        let append = ffi::LaPagedAppendParams {
            cache: decode.cache,
            max_pages_touched: 1,
            dtype: ffi::LaDtype::LA_BF16,
            ..Default::default()
        };
        // SAFETY: as above.
        assert_eq!(
            unsafe { ffi::la_paged_append(&append, std::ptr::null_mut()) },
            INVALID_VALUE
        );
        let quest = ffi::LaQuestParams {
            cache: decode.cache,
            q_len: 1,
            heads_q: 4,
            dtype: ffi::LaDtype::LA_BF16,
            ..Default::default()
        };
        // SAFETY: as above.
        assert_eq!(
            unsafe { ffi::la_paged_quest_select(&quest, std::ptr::null_mut()) },
            INVALID_VALUE
        );
    }

    /// Quest selection reads the page table and key metadata, never K/V: a call without K/V
    /// pointers passes the argument check (the H200 run of 2026-12-04 caught the check
    /// refusing it). Without a GPU the call then fails in CUDA with another code; with one,
    /// tests/paged_gpu.rs runs the selection itself.
    #[test]
    fn quest_select_needs_no_kv_pointers() {
        if crate::device::open_gpu(0).is_ok() {
            return;
        }
        let (table, seqlens, kind) = ([0i32], [16i32], [3i32]); // LA_HEAD_QUEST
        let (q, meta) = ([0u16; 64], [0u16; 64]);
        let (mut scores, mut list, mut count) = ([0f32; 1], [0i32; 1], [0i32; 1]);
        let quest = ffi::LaQuestParams {
            cache: ffi::LaPagedCache {
                batch: 1,
                num_pages: 1,
                page_size: 16,
                heads_kv: 1,
                head_dim: 64,
                max_pages_per_seq: 1,
                block_table: table.as_ptr(),
                seqlens_k: seqlens.as_ptr(),
                ..Default::default()
            },
            q: q.as_ptr().cast(),
            q_row_stride: 64,
            q_head_stride: 64,
            q_batch_stride: 64,
            q_len: 1,
            heads_q: 1,
            kmin: meta.as_ptr().cast(),
            kmax: meta.as_ptr().cast(),
            head_kind: kind.as_ptr(),
            scores: scores.as_mut_ptr(),
            page_list: list.as_mut_ptr(),
            page_count: count.as_mut_ptr(),
            budget_pages: 1,
            window_left: -1,
            window_right: 0,
            dtype: ffi::LaDtype::LA_BF16,
            kv_dtype: ffi::LaDtype::LA_BF16,
            ..Default::default()
        };
        // SAFETY (all three calls): no GPU is usable, so no kernel runs and no pointer is
        // read on a device; the host check reads only the params struct.
        let code = unsafe { ffi::la_paged_quest_select(&quest, std::ptr::null_mut()) };
        assert_ne!(code, INVALID_VALUE, "valid Quest arguments refused");
        assert_ne!(code, 0, "a launch without a GPU cannot succeed");
        // FP8 bounds need their scales; a bounds type other than q's or e4m3 is refused.
        let scales = [1.0f32; 2];
        let fp8 = ffi::LaQuestParams {
            kv_dtype: ffi::LaDtype::LA_F8E4M3,
            ..quest
        };
        let code = unsafe { ffi::la_paged_quest_select(&fp8, std::ptr::null_mut()) };
        assert_eq!(code, INVALID_VALUE, "FP8 bounds without scales accepted");
        let fp8 = ffi::LaQuestParams {
            kv_scales: scales.as_ptr(),
            ..fp8
        };
        let code = unsafe { ffi::la_paged_quest_select(&fp8, std::ptr::null_mut()) };
        assert_ne!(code, INVALID_VALUE, "valid FP8 Quest arguments refused");
        let f16_bounds = ffi::LaQuestParams {
            kv_dtype: ffi::LaDtype::LA_F16,
            ..quest
        };
        let code = unsafe { ffi::la_paged_quest_select(&f16_bounds, std::ptr::null_mut()) };
        assert_eq!(
            code, INVALID_VALUE,
            "f16 bounds under bf16 queries accepted"
        );
    }
}
