//! The validated C API declared in `include/longattn.h`, built into the static and shared
//! libraries (`liblongattn.a`, `liblongattn.so`).
//!
//! Each entry point turns its C arguments into the safe Rust types (null pointers and
//! lengths checked first), runs the very same validation as the Rust API, returns a
//! `longattn_status` and leaves the error message for `longattn_last_error()` on the calling
//! thread. A panic (a bug) is caught and reported as `LONGATTN_ERR_INTERNAL`: nothing
//! unwinds into C.

use crate::block_sparse::BlockSparseAttention;
use crate::dense::{AttentionOptions, AttentionShape, FlashAttention};
use crate::element::{Element, F8E4M3};
use crate::error::Error;
use crate::layout::{SeqLens, Strided, Strides};
use crate::mask::Window;
use crate::neighborhood::NeighborhoodAttention;
use crate::paged::{
    KvPages, KvScales, PageMeta, PageTable, PagedCache, PagedDecode, PagedLayout, PagedPrefill,
};
use half::{bf16, f16};
use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// `longattn_status` (see `include/longattn.h`).
pub type Status = i32;
/// Success.
pub const LONGATTN_OK: Status = 0;
/// A required pointer argument is NULL.
pub const LONGATTN_ERR_NULL_POINTER: Status = 9;
/// A caught panic (a bug in longattn).
pub const LONGATTN_ERR_INTERNAL: Status = 10;

/// `longattn_dtype`.
pub type DTypeCode = i32;

/// `longattn_strides`: element strides of `[batch, seq, heads, head_dim]`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CStrides {
    /// Batch stride in elements.
    pub batch: i64,
    /// Sequence stride in elements.
    pub seq: i64,
    /// Head stride in elements.
    pub head: i64,
}

/// `longattn_tensor`: a read-only host buffer of `len` elements with its strides.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CTensor {
    /// First element.
    pub data: *const std::ffi::c_void,
    /// Elements the buffer holds.
    pub len: usize,
    /// Element strides.
    pub strides: CStrides,
}

/// `longattn_tensor_mut`: a writable host buffer of `len` elements with its strides.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CTensorMut {
    /// First element.
    pub data: *mut std::ffi::c_void,
    /// Elements the buffer holds.
    pub len: usize,
    /// Element strides.
    pub strides: CStrides,
}

/// `longattn_dense_desc`: shape and options of a dense problem.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CDenseDesc {
    /// Sequences.
    pub batch: usize,
    /// Query heads.
    pub heads_q: usize,
    /// Key/value heads (divides `heads_q`).
    pub heads_kv: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Queries per sequence (fixed lengths).
    pub seqlen_q: usize,
    /// Keys per sequence (fixed lengths).
    pub seqlen_k: usize,
    /// Varlen query offsets (`batch + 1` host values) or NULL.
    pub cu_seqlens_q: *const i32,
    /// Varlen key offsets (`batch + 1` host values) or NULL.
    pub cu_seqlens_k: *const i32,
    /// `q.k` multiplier; 0 means `1/sqrt(head_dim)`.
    pub scale: f32,
    /// Softcap; 0 means off.
    pub softcap: f32,
    /// Window left bound, -1 unbounded.
    pub window_left: i64,
    /// Window right bound, -1 unbounded.
    pub window_right: i64,
    /// Nonzero: causal, composed with the window as in FlashAttention-2.
    pub causal: i32,
    /// Always-visible leading keys.
    pub sinks: usize,
}

/// The one dtype dispatch of the C API: runs `$body` with `$t` bound to the element type of
/// the `longattn_dtype` code, or returns `Unsupported` for an unknown code.
macro_rules! with_dtype {
    ($code:expr, $t:ident => $body:expr) => {
        match $code {
            0 => {
                type $t = f32;
                $body
            }
            1 => {
                type $t = f16;
                $body
            }
            2 => {
                type $t = bf16;
                $body
            }
            code => Err(Error::Unsupported(format!(
                "dtype code {code}: expected LONGATTN_F32 (0), LONGATTN_F16 (1) or LONGATTN_BF16 (2)"
            ))
            .into()),
        }
    };
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let msg = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = msg);
}

/// The C status code of a Rust error.
pub fn status_of(err: &Error) -> Status {
    match err {
        Error::Shape(_) => 1,
        Error::Stride(_) => 2,
        Error::InvalidOption(_) => 3,
        Error::Index(_) => 4,
        Error::Unsupported(_) => 5,
        Error::CudaNotCompiled => 6,
        Error::NoGpu(_) => 7,
        Error::Cuda(_) | Error::CudaCall { .. } => 8,
    }
}

/// Why a C call failed before reaching the Rust API.
enum CallError {
    Null(&'static str),
    Api(Error),
}

impl From<Error> for CallError {
    fn from(e: Error) -> Self {
        CallError::Api(e)
    }
}

/// Runs `body`, records its error for `longattn_last_error` and maps it to a status.
fn guarded(body: impl FnOnce() -> Result<(), CallError>) -> Status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            set_last_error("");
            LONGATTN_OK
        }
        Ok(Err(CallError::Null(name))) => {
            set_last_error(&format!("{name} is NULL"));
            LONGATTN_ERR_NULL_POINTER
        }
        Ok(Err(CallError::Api(e))) => {
            set_last_error(&e.to_string());
            status_of(&e)
        }
        Err(_) => {
            set_last_error("internal error (a panic inside longattn; please report it)");
            LONGATTN_ERR_INTERNAL
        }
    }
}

/// `longattn_version()`: the crate version as a static C string.
#[unsafe(no_mangle)]
pub extern "C" fn longattn_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// `longattn_last_error()`: the last failure's message on this thread ("" if none).
#[unsafe(no_mangle)]
pub extern "C" fn longattn_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Builds the validated problem from a C descriptor.
///
/// # Safety
/// `desc` is NULL or valid; its `cu_seqlens_q/k`, when not NULL, point to `batch + 1`
/// readable `i32`s.
unsafe fn dense_problem(desc: *const CDenseDesc) -> Result<FlashAttention, CallError> {
    // SAFETY: NULL or valid by the contract.
    let desc = unsafe { desc.as_ref() }.ok_or(CallError::Null("desc"))?;
    let varlen = match (desc.cu_seqlens_q.is_null(), desc.cu_seqlens_k.is_null()) {
        (true, true) => None,
        (false, false) => {
            let n = desc.batch.checked_add(1).ok_or_else(|| {
                Error::Shape(format!("batch = {} overflows batch + 1", desc.batch))
            })?;
            // Bounded before the slices are formed: `n` i32s must be addressable.
            if n > isize::MAX as usize / 4 {
                return Err(Error::Shape(format!("batch = {} is too large", desc.batch)).into());
            }
            // SAFETY: the caller guarantees `n` readable values behind each pointer.
            unsafe {
                Some((
                    std::slice::from_raw_parts(desc.cu_seqlens_q, n),
                    std::slice::from_raw_parts(desc.cu_seqlens_k, n),
                ))
            }
        }
        (true, false) => return Err(CallError::Null("cu_seqlens_q (cu_seqlens_k is set)")),
        (false, true) => return Err(CallError::Null("cu_seqlens_k (cu_seqlens_q is set)")),
    };
    let seqlens = match varlen {
        Some((cu_seqlens_q, cu_seqlens_k)) => SeqLens::Varlen {
            cu_seqlens_q,
            cu_seqlens_k,
        },
        None => SeqLens::Fixed {
            seqlen_q: desc.seqlen_q,
            seqlen_k: desc.seqlen_k,
        },
    };
    let shape = AttentionShape {
        batch: desc.batch,
        heads_q: desc.heads_q,
        heads_kv: desc.heads_kv,
        head_dim: desc.head_dim,
        seqlens,
    };
    let options = AttentionOptions::default()
        .with_window(Window::from_flash(desc.window_left, desc.window_right)?)
        .with_causal(desc.causal != 0)
        .with_sinks(desc.sinks);
    let options = scale_softcap(options, desc.scale, desc.softcap);
    Ok(FlashAttention::new(&shape, &options)?)
}

/// `options` with the C descriptors' `scale` (0: `1/sqrt(head_dim)`) and `softcap` (0: off).
fn scale_softcap(mut options: AttentionOptions, scale: f32, softcap: f32) -> AttentionOptions {
    if scale != 0.0 {
        options = options.with_scale(scale);
    }
    if softcap != 0.0 {
        options = options.with_softcap(softcap);
    }
    options
}

/// Writes each `(pointer, value)` whose pointer is not NULL.
///
/// # Safety
/// Each pointer is NULL or writable.
unsafe fn write_sizes(sizes: &[(*mut usize, usize)]) {
    for &(ptr, value) in sizes {
        if !ptr.is_null() {
            // SAFETY: non-NULL and writable by the contract.
            unsafe { *ptr = value };
        }
    }
}

/// The optional LSE output.
///
/// # Safety
/// `lse` is NULL or points to `len` writable floats.
unsafe fn lse_slice<'a>(lse: *mut f32, len: usize) -> Result<Option<&'a mut [f32]>, CallError> {
    if lse.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded contract.
    Ok(Some(unsafe {
        host_slice_mut::<f32>(lse.cast(), len, "lse")
    }?))
}

fn strides(s: CStrides) -> Strides {
    Strides {
        batch: s.batch,
        seq: s.seq,
        head: s.head,
    }
}

/// `longattn_dense_sizes()`: output and LSE lengths in elements.
///
/// # Safety
/// `desc` points to a valid descriptor (see [`CDenseDesc`]); `out_len`/`lse_len` are NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_dense_sizes(
    desc: *const CDenseDesc,
    out_len: *mut usize,
    lse_len: *mut usize,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor by the contract.
        let attn = unsafe { dense_problem(desc) }?;
        // SAFETY: NULL or writable by the contract.
        unsafe { write_sizes(&[(out_len, attn.out_len()), (lse_len, attn.lse_len())]) };
        Ok(())
    })
}

/// `q`, `k`, `v` on the device.
type DeviceQkv<'a, T> = (
    Strided<&'a cudarc::driver::CudaSlice<T>>,
    Strided<&'a cudarc::driver::CudaSlice<T>>,
    Strided<&'a cudarc::driver::CudaSlice<T>>,
);

/// A validated problem that maps `q, k, v` to `out` and the LSE with one signature (dense,
/// neighborhood, block-sparse: their Rust API; MoBA: its selection, then attention), so that
/// their C entry points share one dtype dispatch and one set of buffer checks.
trait Forward {
    /// The problem's `forward_cpu`.
    fn run_cpu<T: Element>(
        &self,
        q: Strided<&[T]>,
        k: Strided<&[T]>,
        v: Strided<&[T]>,
        out: Strided<&mut [T]>,
        lse: Option<&mut [f32]>,
    ) -> crate::Result<()>;

    /// The problem's `forward_gpu` on `stream`.
    fn run_gpu<T: Element + cudarc::driver::DeviceRepr>(
        &self,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        qkv: DeviceQkv<'_, T>,
        out: Strided<&mut cudarc::driver::CudaSlice<T>>,
        lse: Option<&mut dyn crate::DeviceBufferMut<f32>>,
    ) -> crate::Result<()>;
}

/// [`Forward`] for problem types whose inherent `forward_cpu` / `forward_gpu` have the
/// shared signature.
macro_rules! impl_forward {
    ($($problem:ty),*) => {$(
        impl Forward for $problem {
            fn run_cpu<T: Element>(
                &self,
                q: Strided<&[T]>,
                k: Strided<&[T]>,
                v: Strided<&[T]>,
                out: Strided<&mut [T]>,
                lse: Option<&mut [f32]>,
            ) -> crate::Result<()> {
                self.forward_cpu(q, k, v, out, lse)
            }

            fn run_gpu<T: Element + cudarc::driver::DeviceRepr>(
                &self,
                stream: &std::sync::Arc<cudarc::driver::CudaStream>,
                (q, k, v): DeviceQkv<'_, T>,
                out: Strided<&mut cudarc::driver::CudaSlice<T>>,
                lse: Option<&mut dyn crate::DeviceBufferMut<f32>>,
            ) -> crate::Result<()> {
                self.forward_gpu(stream, q, k, v, out, lse)
            }
        }
    )*};
}

impl_forward!(FlashAttention, NeighborhoodAttention, BlockSparseAttention);

/// # Safety
/// Each tensor's `data` points to `len` readable (writable for `out`) elements of `T`.
unsafe fn forward_cpu_typed<T: Element>(
    problem: &impl Forward,
    q: CTensor,
    k: CTensor,
    v: CTensor,
    out: CTensorMut,
    lse: Option<&mut [f32]>,
) -> Result<(), CallError> {
    let bytes = std::mem::size_of::<T>();
    check_writes_disjoint(
        byte_range(out.data, out.len, bytes),
        lse.as_deref(),
        &[
            (byte_range(q.data, q.len, bytes), "q"),
            (byte_range(k.data, k.len, bytes), "k"),
            (byte_range(v.data, v.len, bytes), "v"),
        ],
    )?;
    // SAFETY (all four): `len` elements by the contract, checked non-overlapping above.
    let (q_s, k_s, v_s, out_s) = unsafe {
        (
            host_slice::<T>(q.data, q.len, "q")?,
            host_slice::<T>(k.data, k.len, "k")?,
            host_slice::<T>(v.data, v.len, "v")?,
            host_slice_mut::<T>(out.data, out.len, "out")?,
        )
    };
    problem.run_cpu(
        Strided::new(q_s, strides(q.strides)),
        Strided::new(k_s, strides(k.strides)),
        Strided::new(v_s, strides(v.strides)),
        Strided::new(out_s, strides(out.strides)),
        lse,
    )?;
    Ok(())
}

/// A `q, k, v -> out, lse` call on host buffers: `problem` run on the element type of
/// `dtype` (f32, f16 or bf16).
///
/// # Safety
/// Each tensor's `data` points to `len` elements of `dtype` (`out` writable and not
/// overlapping the inputs); `lse` is NULL or `lse_len` writable floats.
unsafe fn cpu_entry(
    problem: &impl Forward,
    dtype: DTypeCode,
    (q, k, v): (CTensor, CTensor, CTensor),
    out: CTensorMut,
    (lse, lse_len): (*mut f32, usize),
) -> Result<(), CallError> {
    // SAFETY: NULL or `lse_len` writable floats by the contract.
    let lse = unsafe { lse_slice(lse, lse_len) }?;
    // SAFETY: the tensors hold `len` elements of `dtype` by the contract.
    unsafe { with_dtype!(dtype, T => forward_cpu_typed::<T>(problem, q, k, v, out, lse)) }
}

/// `[start, end)` byte addresses of a buffer (saturating: sizes are bounded later).
fn byte_range(data: *const std::ffi::c_void, len: usize, elem_bytes: usize) -> (usize, usize) {
    let start = data as usize;
    (start, start.saturating_add(len.saturating_mul(elem_bytes)))
}

/// A `&mut` slice must not alias any other slice of the call (the Rust API gets this from
/// the borrow checker): refuses an output (`out`, `lse`) that overlaps an input or the other
/// output, before any slice of them is formed.
fn check_writes_disjoint(
    out: (usize, usize),
    lse: Option<&[f32]>,
    inputs: &[((usize, usize), &str)],
) -> Result<(), CallError> {
    let lse = lse.map(|l| (byte_range(l.as_ptr().cast(), l.len(), 4), "lse"));
    check_disjoint(&[Some((out, "out")), lse], inputs)
}

/// Refuses a written byte range (the `Some` entries of `writes`) that overlaps an input or
/// another written range; addresses only, nothing is read.
fn check_disjoint(
    writes: &[Option<((usize, usize), &str)>],
    inputs: &[((usize, usize), &str)],
) -> Result<(), CallError> {
    let writes: Vec<_> = writes.iter().flatten().copied().collect();
    for (i, &(w, w_name)) in writes.iter().enumerate() {
        for &(r, r_name) in inputs.iter().chain(&writes[i + 1..]) {
            if w.0 < r.1 && r.0 < w.1 {
                return Err(Error::Shape(format!("{w_name} overlaps {r_name}")).into());
            }
        }
    }
    Ok(())
}

/// Checks the pointer, the alignment and the byte size, then forms the slice.
///
/// # Safety
/// `data` points to `len` readable elements of `T`.
unsafe fn host_slice<'a, T>(
    data: *const std::ffi::c_void,
    len: usize,
    name: &'static str,
) -> Result<&'a [T], CallError> {
    check_host_buffer::<T>(data, len, name)?;
    // SAFETY: non-NULL, aligned, size bounded; the caller guarantees the elements.
    Ok(unsafe { std::slice::from_raw_parts(data.cast::<T>(), len) })
}

/// # Safety
/// `data` points to `len` writable elements of `T`, aliased by nothing else in the call.
unsafe fn host_slice_mut<'a, T>(
    data: *mut std::ffi::c_void,
    len: usize,
    name: &'static str,
) -> Result<&'a mut [T], CallError> {
    check_host_buffer::<T>(data, len, name)?;
    // SAFETY: as for `host_slice`, plus exclusive access by the contract.
    Ok(unsafe { std::slice::from_raw_parts_mut(data.cast::<T>(), len) })
}

fn check_host_buffer<T>(
    data: *const std::ffi::c_void,
    len: usize,
    name: &'static str,
) -> Result<(), CallError> {
    if data.is_null() {
        return Err(CallError::Null(name));
    }
    if !(data as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(Error::Stride(format!(
            "{name} is not aligned to {} bytes",
            std::mem::align_of::<T>()
        ))
        .into());
    }
    if len > isize::MAX as usize / std::mem::size_of::<T>() {
        return Err(Error::Shape(format!("{name} length {len} is too large")).into());
    }
    Ok(())
}

/// `longattn_dense_forward_cpu()`: dense attention on host buffers.
///
/// # Safety
/// `desc` is a valid descriptor; each tensor's `data` points to `len` elements of `dtype`
/// (`out` writable and not overlapping the inputs); `lse`, when not NULL, points to
/// `lse_len` writable floats.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_dense_forward_cpu(
    desc: *const CDenseDesc,
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
        let attn = unsafe { dense_problem(desc) }?;
        // SAFETY: the buffers as documented.
        unsafe { cpu_entry(&attn, dtype, (q, k, v), out, (lse, lse_len)) }
    })
}

/// A caller's device buffer seen as a cudarc slice for one call: never freed by longattn
/// (dropped through [`CudaSlice::leak`], which releases only cudarc's own bookkeeping).
struct Borrowed<T>(Option<cudarc::driver::CudaSlice<T>>);

impl<T> Borrowed<T> {
    fn get(&self) -> &cudarc::driver::CudaSlice<T> {
        self.0.as_ref().expect("borrowed until dropped")
    }
    fn get_mut(&mut self) -> &mut cudarc::driver::CudaSlice<T> {
        self.0.as_mut().expect("borrowed until dropped")
    }
}

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.leak();
        }
    }
}

/// # Safety
/// `data` is NULL (refused) or a device allocation of the stream's context holding `len`
/// elements of `T`, alive for the call.
unsafe fn borrow_device<T>(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    data: *const std::ffi::c_void,
    len: usize,
    name: &'static str,
) -> Result<Borrowed<T>, CallError> {
    if data.is_null() {
        return Err(CallError::Null(name));
    }
    if len > isize::MAX as usize / std::mem::size_of::<T>().max(1) {
        return Err(Error::Shape(format!("{name} length {len} is too large")).into());
    }
    // SAFETY: a live allocation of `len` elements by the contract; never freed (Borrowed).
    Ok(Borrowed(Some(unsafe {
        stream.upgrade_device_ptr::<T>(data as u64, len)
    })))
}

/// Device outputs (`out`, and `lse` when not NULL) must not overlap the inputs or each
/// other (addresses only: nothing is read).
fn check_device_writes_disjoint(
    out: (usize, usize),
    (lse, lse_len): (*mut f32, usize),
    inputs: &[((usize, usize), &str)],
) -> Result<(), CallError> {
    let lse_range = (!lse.is_null()).then(|| (byte_range(lse.cast(), lse_len, 4), "lse"));
    check_disjoint(&[Some((out, "out")), lse_range], inputs)
}

/// The device buffers of one C GPU call, borrowed for it: three inputs, the output and the
/// optional LSE.
struct DeviceCall<T, K> {
    /// q, then k and v (or the two caches) of element type `K`.
    inputs: (Borrowed<T>, [Borrowed<K>; 2]),
    out: Borrowed<T>,
    lse: Option<Borrowed<f32>>,
}

/// Checks that the outputs do not overlap the inputs, then borrows every buffer of the call.
///
/// # Safety
/// Each `(data, len, _)` input and `out` are device allocations of the stream's context
/// holding `len` elements of `T`; `lse` is NULL or `lse_len` device floats; all alive for
/// the call.
unsafe fn borrow_call<T, K>(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    q: (*const std::ffi::c_void, usize, &'static str),
    kv: [(*const std::ffi::c_void, usize, &'static str); 2],
    out: CTensorMut,
    (lse, lse_len): (*mut f32, usize),
) -> Result<DeviceCall<T, K>, CallError> {
    let (bytes, kv_bytes) = (std::mem::size_of::<T>(), std::mem::size_of::<K>());
    let [k, v] = kv;
    check_device_writes_disjoint(
        byte_range(out.data, out.len, bytes),
        (lse, lse_len),
        &[
            (byte_range(q.0, q.1, bytes), q.2),
            (byte_range(k.0, k.1, kv_bytes), k.2),
            (byte_range(v.0, v.1, kv_bytes), v.2),
        ],
    )?;
    // SAFETY (all): device allocations of the stated lengths by the contract.
    unsafe {
        Ok(DeviceCall {
            inputs: (
                borrow_device::<T>(stream, q.0, q.1, q.2)?,
                [
                    borrow_device::<K>(stream, k.0, k.1, k.2)?,
                    borrow_device::<K>(stream, v.0, v.1, v.2)?,
                ],
            ),
            out: borrow_device::<T>(stream, out.data, out.len, "out")?,
            lse: match lse.is_null() {
                true => None,
                false => Some(borrow_device::<f32>(stream, lse.cast(), lse_len, "lse")?),
            },
        })
    }
}

/// The caller's stream of one C call (derefs to it), and the CUDA context that was current
/// on the calling thread before the call, made current again when dropped.
///
/// Opening the GPU and every cudarc call make `device`'s primary context current on the
/// thread. The CUDA runtime's current device *is* the thread's current context: a caller
/// that had selected another GPU (`cudaSetDevice(1)`, then a call with `device` 0), or a
/// driver-API caller with a context of its own, would otherwise find its later allocations
/// and launches on our device after the call returned.
pub(crate) struct CallerStream {
    stream: std::mem::ManuallyDrop<std::sync::Arc<cudarc::driver::CudaStream>>,
    /// The caller's context (NULL: none was current).
    saved: cudarc::driver::sys::CUcontext,
}

impl std::ops::Deref for CallerStream {
    type Target = std::sync::Arc<cudarc::driver::CudaStream>;
    fn deref(&self) -> &Self::Target {
        &self.stream
    }
}

impl Drop for CallerStream {
    fn drop(&mut self) {
        // SAFETY: dropped once, here, and never used after. First: the last reference to
        // our context binds it again when it drops (cudarc), which must precede the restore.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.stream) };
        // SAFETY: the caller's own context (alive: it was current when the call began) or
        // NULL, which unbinds ours; libcuda is loaded (the GPU was opened). An error cannot
        // be reported from here and leaves our context current.
        let _ = unsafe { cudarc::driver::result::ctx::set_current(self.saved) };
    }
}

/// The caller's stream on GPU `device` (its primary context), wrapped without ownership,
/// once every required buffer pointer is known non-NULL (so a NULL is refused before the
/// GPU is opened); the thread's current context is restored when it drops.
///
/// # Safety
/// `stream` is NULL (the legacy default stream) or a live stream of that context.
unsafe fn caller_stream(
    buffers: &[(*const std::ffi::c_void, &'static str)],
    device: i32,
    stream: *mut std::ffi::c_void,
) -> Result<CallerStream, CallError> {
    if let Some(&(_, name)) = buffers.iter().find(|(data, _)| data.is_null()) {
        return Err(CallError::Null(name));
    }
    let ordinal = usize::try_from(device)
        .map_err(|_| Error::NoGpu(format!("device {device} is not a device ordinal")))?;
    // Before `open_gpu` binds its context; only read once the driver is known to load.
    let saved = crate::device::current_context();
    let ctx = crate::device::open_gpu(ordinal)?;
    // SAFETY: by the contract; the wrapper does not own the stream.
    let stream = unsafe { ctx.wrap_borrowed_stream(stream as _) };
    Ok(CallerStream {
        stream: std::mem::ManuallyDrop::new(stream),
        saved,
    })
}

/// # Safety
/// As [`longattn_dense_forward_cuda`].
#[allow(clippy::too_many_arguments)]
unsafe fn forward_cuda_typed<T: Element + cudarc::driver::DeviceRepr>(
    problem: &impl Forward,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    q: CTensor,
    k: CTensor,
    v: CTensor,
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
) -> Result<(), CallError> {
    let kv = [(k.data, k.len, "k"), (v.data, v.len, "v")];
    // SAFETY: device allocations as documented by the caller's contract.
    let mut call =
        unsafe { borrow_call::<T, T>(stream, (q.data, q.len, "q"), kv, out, (lse, lse_len)) }?;
    let (bq, [bk, bv]) = &call.inputs;
    let lse_slice = call
        .lse
        .as_mut()
        .map(|b| b.get_mut() as &mut dyn crate::DeviceBufferMut<f32>);
    problem.run_gpu(
        stream,
        (
            Strided::new(bq.get(), strides(q.strides)),
            Strided::new(bk.get(), strides(k.strides)),
            Strided::new(bv.get(), strides(v.strides)),
        ),
        Strided::new(call.out.get_mut(), strides(out.strides)),
        lse_slice,
    )?;
    Ok(())
}

/// A `q, k, v -> out, lse` call on device buffers of GPU `device`, queued on `stream`
/// (every buffer pointer checked non-NULL before the GPU is opened): `problem` run on the
/// element type of `dtype`.
///
/// # Safety
/// As [`longattn_dense_forward_cuda`] for the buffers and the stream.
unsafe fn cuda_entry(
    problem: &impl Forward,
    dtype: DTypeCode,
    (q, k, v): (CTensor, CTensor, CTensor),
    out: CTensorMut,
    (lse, lse_len): (*mut f32, usize),
    (device, stream): (i32, *mut std::ffi::c_void),
) -> Result<(), CallError> {
    let buffers = [
        (q.data, "q"),
        (k.data, "k"),
        (v.data, "v"),
        (out.data.cast_const(), "out"),
    ];
    // SAFETY: NULL or a live stream of that device's primary context by the contract.
    let stream = unsafe { caller_stream(&buffers, device, stream) }?;
    // SAFETY: the tensors are device allocations of `dtype` by the contract.
    unsafe {
        with_dtype!(dtype, T => forward_cuda_typed::<T>(problem, &stream, q, k, v, out, lse, lse_len))
    }
}

/// `longattn_dense_forward_cuda()`: dense attention on device buffers of GPU `device`,
/// queued on `stream` (a `CUstream`/`cudaStream_t` of that device's primary context, the one
/// the CUDA runtime and PyTorch use; NULL: the legacy default stream); nothing is
/// synchronized. Validated as `longattn_dense_forward_cpu` (plus the GPU kernels' limits)
/// before any device pointer is touched. f16 or bf16.
///
/// # Safety
/// `desc` is a valid descriptor (its varlen offsets are host arrays); each tensor's `data`
/// is a device allocation of `device` holding `len` elements of `dtype` (`out` not
/// overlapping the inputs), alive until the queued work completes; `lse`, when not NULL, a
/// device allocation of `lse_len` floats; `stream` is NULL or a live stream of that context.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_dense_forward_cuda(
    desc: *const CDenseDesc,
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
        let attn = unsafe { dense_problem(desc) }?;
        let gpu = (device, stream);
        // SAFETY: device buffers and stream as documented.
        unsafe { cuda_entry(&attn, dtype, (q, k, v), out, (lse, lse_len), gpu) }
    })
}

/// `longattn_paged_desc`: a paged cache's geometry and tables, and one decode step.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CPagedDesc {
    /// Pages in the cache.
    pub num_pages: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Sequences.
    pub batch: usize,
    /// `[batch, max_pages_per_seq]` page ids (host).
    pub block_table: *const i32,
    /// Columns of `block_table`.
    pub max_pages_per_seq: usize,
    /// `[batch]` tokens per sequence (host), the new ones included.
    pub seqlens_k: *const i32,
    /// Query heads.
    pub heads_q: usize,
    /// New tokens per sequence.
    pub q_len: usize,
    /// `q.k` multiplier; 0 means `1/sqrt(head_dim)`.
    pub scale: f32,
    /// Softcap; 0 means off.
    pub softcap: f32,
    /// Window left bound, -1 unbounded.
    pub window_left: i64,
    /// Window right bound, -1 unbounded (decode: becomes 0, causal among the new tokens).
    pub window_right: i64,
    /// Always-visible leading keys.
    pub sinks: usize,
}

/// Forms a host slice of `n` `i32`s from a C table pointer (NULL and size checked).
///
/// # Safety
/// `data`, when not NULL, points to `n` readable values.
unsafe fn table<'a>(
    data: *const i32,
    n: usize,
    name: &'static str,
) -> Result<&'a [i32], CallError> {
    // SAFETY: forwarded contract.
    unsafe { host_slice::<i32>(data.cast(), n, name) }
}

/// Builds the validated decode step from a C descriptor.
///
/// # Safety
/// `desc` is NULL or valid: its `block_table` and `seqlens_k` point to
/// `batch * max_pages_per_seq` and `batch` values.
unsafe fn paged_problem(desc: *const CPagedDesc) -> Result<PagedDecode, CallError> {
    // SAFETY: forwarded contract.
    unsafe { paged_problem_with(desc, None) }
}

/// [`paged_problem`] over a cache with FP8 dequantisation scales.
///
/// # Safety
/// As [`paged_problem`].
unsafe fn paged_problem_with(
    desc: *const CPagedDesc,
    scales: Option<KvScales>,
) -> Result<PagedDecode, CallError> {
    // SAFETY: forwarded contract.
    let (desc, cache, options) = unsafe { paged_parts(desc, scales) }?;
    Ok(PagedDecode::new(
        &cache,
        desc.heads_q,
        desc.q_len,
        &options,
    )?)
}

/// The descriptor, its validated cache (with `scales`) and its options (window as given).
///
/// # Safety
/// As [`paged_problem`].
unsafe fn paged_parts<'a>(
    desc: *const CPagedDesc,
    scales: Option<KvScales>,
) -> Result<(&'a CPagedDesc, PagedCache, AttentionOptions), CallError> {
    // SAFETY: forwarded contract.
    let (desc, cache) = unsafe { paged_cache(desc, scales) }?;
    let options = AttentionOptions::default()
        .with_window(Window::from_flash(desc.window_left, desc.window_right)?)
        .with_sinks(desc.sinks);
    Ok((
        desc,
        cache,
        scale_softcap(options, desc.scale, desc.softcap),
    ))
}

/// The descriptor and its validated cache (geometry and tables, with `scales`); the decode
/// fields (`heads_q`, `q_len`, the options) are not read.
///
/// # Safety
/// As [`paged_problem`].
unsafe fn paged_cache<'a>(
    desc: *const CPagedDesc,
    scales: Option<KvScales>,
) -> Result<(&'a CPagedDesc, PagedCache), CallError> {
    // SAFETY: NULL or valid by the contract.
    let desc = unsafe { desc.as_ref() }.ok_or(CallError::Null("desc"))?;
    let entries = desc
        .batch
        .checked_mul(desc.max_pages_per_seq)
        .ok_or_else(|| Error::Shape("batch * max_pages_per_seq overflows".into()))?;
    // SAFETY: sizes as documented; NULL and size checked inside.
    let (block_table, seqlens_k) = unsafe {
        (
            table(desc.block_table, entries, "block_table")?,
            table(desc.seqlens_k, desc.batch, "seqlens_k")?,
        )
    };
    let layout = PagedLayout {
        num_pages: desc.num_pages,
        page_size: desc.page_size,
        heads_kv: desc.heads_kv,
        head_dim: desc.head_dim,
    };
    let cache = PagedCache::new(
        layout,
        PageTable {
            block_table,
            max_pages_per_seq: desc.max_pages_per_seq,
            seqlens_k,
        },
    )?;
    let cache = match scales {
        Some(s) => cache.with_kv_scales(s)?,
        None => cache,
    };
    Ok((desc, cache))
}

/// `longattn_paged_sizes()`: elements of a cache buffer, the output and the LSE.
///
/// # Safety
/// `desc` is a valid descriptor (see [`CPagedDesc`]); the outputs are NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_paged_sizes(
    desc: *const CPagedDesc,
    cache_len: *mut usize,
    out_len: *mut usize,
    lse_len: *mut usize,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor by the contract.
        let decode = unsafe { paged_problem(desc) }?;
        let cache = decode.cache().layout().cache_len();
        // SAFETY: NULL or writable by the contract.
        unsafe {
            write_sizes(&[
                (cache_len, cache),
                (out_len, decode.out_len()),
                (lse_len, decode.lse_len()),
            ])
        };
        Ok(())
    })
}

/// A validated paged call of the C API: a decode step (with the Quest metadata of a policy
/// decode) or a prefill over the cache.
enum PagedOp {
    Decode(PagedDecode, Option<RawMeta>),
    Prefill(PagedPrefill),
}

/// Quest metadata buffers of a C call: `kmin`, `kmax` hold `len` elements of the cache's
/// element type each (host or device, as the call's cache).
#[derive(Debug, Clone, Copy)]
struct RawMeta {
    kmin: *const std::ffi::c_void,
    kmax: *const std::ffi::c_void,
    len: usize,
}

impl RawMeta {
    /// Both pointers or neither: the metadata of `len` elements, or none.
    fn new(
        (kmin, kmax): (*const std::ffi::c_void, *const std::ffi::c_void),
        len: usize,
    ) -> Result<Option<Self>, CallError> {
        match (kmin.is_null(), kmax.is_null()) {
            (true, true) => Ok(None),
            (false, false) => Ok(Some(RawMeta { kmin, kmax, len })),
            (true, false) => Err(CallError::Null("kmin (kmax is set)")),
            (false, true) => Err(CallError::Null("kmax (kmin is set)")),
        }
    }

    /// The two buffers as byte ranges of `elem_bytes`-byte elements, for the overlap checks.
    fn ranges(&self, elem_bytes: usize) -> [((usize, usize), &'static str); 2] {
        [
            (byte_range(self.kmin, self.len, elem_bytes), "kmin"),
            (byte_range(self.kmax, self.len, elem_bytes), "kmax"),
        ]
    }
}

impl PagedOp {
    fn meta(&self) -> Option<RawMeta> {
        match self {
            PagedOp::Decode(_, meta) => *meta,
            PagedOp::Prefill(_) => None,
        }
    }

    fn forward_cpu<T: Element, C: Element>(
        &self,
        q: Strided<&[T]>,
        kv: KvPages<&[C]>,
        meta: Option<PageMeta<&[C]>>,
        out: Strided<&mut [T]>,
        lse: Option<&mut [f32]>,
    ) -> crate::Result<()> {
        match self {
            PagedOp::Decode(d, _) => d.forward_cpu(q, kv, meta, out, lse),
            PagedOp::Prefill(p) => p.forward_cpu(q, kv, out, lse),
        }
    }

    fn forward_gpu<T, C>(
        &self,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        q: Strided<&cudarc::driver::CudaSlice<T>>,
        kv: KvPages<&cudarc::driver::CudaSlice<C>>,
        meta: Option<PageMeta<&cudarc::driver::CudaSlice<C>>>,
        out: Strided<&mut cudarc::driver::CudaSlice<T>>,
        lse: Option<&mut dyn crate::DeviceBufferMut<f32>>,
    ) -> crate::Result<()>
    where
        T: Element + cudarc::driver::DeviceRepr,
        C: Element + cudarc::driver::DeviceRepr,
    {
        match self {
            PagedOp::Decode(d, _) => d.forward_gpu(stream, q, kv, meta, out, lse),
            PagedOp::Prefill(p) => p.forward_gpu(stream, q, kv, out, lse),
        }
    }
}

/// # Safety
/// As [`longattn_paged_decode_cpu`], with `T` the element type of `dtype`.
#[allow(clippy::too_many_arguments)]
unsafe fn paged_cpu_typed<T: Element, C: Element>(
    op: &PagedOp,
    q: CTensor,
    (k_cache, v_cache, cache_len): (*const std::ffi::c_void, *const std::ffi::c_void, usize),
    out: CTensorMut,
    lse: Option<&mut [f32]>,
) -> Result<(), CallError> {
    let (bytes, cache_bytes) = (std::mem::size_of::<T>(), std::mem::size_of::<C>());
    let meta = op.meta();
    let mut inputs = vec![
        (byte_range(q.data, q.len, bytes), "q"),
        (byte_range(k_cache, cache_len, cache_bytes), "k_cache"),
        (byte_range(v_cache, cache_len, cache_bytes), "v_cache"),
    ];
    inputs.extend(meta.iter().flat_map(|m| m.ranges(cache_bytes)));
    check_writes_disjoint(
        byte_range(out.data, out.len, bytes),
        lse.as_deref(),
        &inputs,
    )?;
    // SAFETY: `len` elements each by the contract; `out` checked disjoint from the rest.
    let (q_s, k_s, v_s, out_s) = unsafe {
        (
            host_slice::<T>(q.data, q.len, "q")?,
            host_slice::<C>(k_cache, cache_len, "k_cache")?,
            host_slice::<C>(v_cache, cache_len, "v_cache")?,
            host_slice_mut::<T>(out.data, out.len, "out")?,
        )
    };
    let meta = match meta {
        // SAFETY: `len` elements of the cache type each by the contract.
        Some(m) => Some(unsafe {
            PageMeta {
                kmin: host_slice::<C>(m.kmin, m.len, "kmin")?,
                kmax: host_slice::<C>(m.kmax, m.len, "kmax")?,
            }
        }),
        None => None,
    };
    op.forward_cpu(
        Strided::new(q_s, strides(q.strides)),
        KvPages { k: k_s, v: v_s },
        meta,
        Strided::new(out_s, strides(out.strides)),
        lse,
    )?;
    Ok(())
}

/// `longattn_paged_decode_cpu()`: one decode step over a paged cache on host buffers.
///
/// # Safety
/// `desc` is a valid descriptor; `q` and `out` hold `len` elements of `dtype` (`out`
/// writable, not overlapping the inputs); `k_cache` and `v_cache` hold `cache_len` elements;
/// `lse`, when not NULL, `lse_len` writable floats.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn longattn_paged_decode_cpu(
    desc: *const CPagedDesc,
    dtype: DTypeCode,
    q: CTensor,
    k_cache: *const std::ffi::c_void,
    v_cache: *const std::ffi::c_void,
    cache_len: usize,
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor by the contract.
        let op = PagedOp::Decode(unsafe { paged_problem(desc) }?, None);
        let kv = (k_cache, v_cache, cache_len);
        // SAFETY: buffers as documented for `dtype`.
        unsafe { paged_cpu_entry(&op, dtype, q, (kv, false), out, (lse, lse_len)) }
    })
}

/// # Safety
/// As [`longattn_paged_decode_cuda`].
#[allow(clippy::too_many_arguments)]
unsafe fn paged_cuda_typed<T, C>(
    op: &PagedOp,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    q: CTensor,
    (k_cache, v_cache, cache_len): (*const std::ffi::c_void, *const std::ffi::c_void, usize),
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
) -> Result<(), CallError>
where
    T: Element + cudarc::driver::DeviceRepr,
    C: Element + cudarc::driver::DeviceRepr,
{
    let kv = [
        (k_cache, cache_len, "k_cache"),
        (v_cache, cache_len, "v_cache"),
    ];
    // SAFETY: device allocations as documented by the caller's contract.
    let mut call =
        unsafe { borrow_call::<T, C>(stream, (q.data, q.len, "q"), kv, out, (lse, lse_len)) }?;
    let meta = match op.meta() {
        Some(m) => {
            let out_range = byte_range(out.data, out.len, std::mem::size_of::<T>());
            let ranges = m.ranges(std::mem::size_of::<C>());
            check_device_writes_disjoint(out_range, (lse, lse_len), &ranges)?;
            // SAFETY: device allocations of `len` cache elements by the contract.
            Some(unsafe {
                (
                    borrow_device::<C>(stream, m.kmin, m.len, "kmin")?,
                    borrow_device::<C>(stream, m.kmax, m.len, "kmax")?,
                )
            })
        }
        None => None,
    };
    let (bq, [bk, bv]) = &call.inputs;
    let lse_slice = call
        .lse
        .as_mut()
        .map(|b| b.get_mut() as &mut dyn crate::DeviceBufferMut<f32>);
    op.forward_gpu(
        stream,
        Strided::new(bq.get(), strides(q.strides)),
        KvPages {
            k: bk.get(),
            v: bv.get(),
        },
        meta.as_ref().map(|(kmin, kmax)| PageMeta {
            kmin: kmin.get(),
            kmax: kmax.get(),
        }),
        Strided::new(call.out.get_mut(), strides(out.strides)),
        lse_slice,
    )?;
    Ok(())
}

/// A paged C call on host buffers: `op` over the cache `kv` (`C` = the q type, or e4m3 with
/// `fp8`), dispatched on `dtype`.
///
/// # Safety
/// As [`longattn_paged_decode_cpu`] (or its FP8 / prefill twins) for the buffers.
unsafe fn paged_cpu_entry(
    op: &PagedOp,
    dtype: DTypeCode,
    q: CTensor,
    (kv, fp8): (
        (*const std::ffi::c_void, *const std::ffi::c_void, usize),
        bool,
    ),
    out: CTensorMut,
    (lse, lse_len): (*mut f32, usize),
) -> Result<(), CallError> {
    // SAFETY: NULL or `lse_len` writable floats by the contract.
    let lse = unsafe { lse_slice(lse, lse_len) }?;
    // SAFETY: buffers as documented for `dtype` (and e4m3 bytes with `fp8`).
    unsafe {
        match fp8 {
            true => with_dtype!(dtype, T => paged_cpu_typed::<T, F8E4M3>(op, q, kv, out, lse)),
            false => with_dtype!(dtype, T => paged_cpu_typed::<T, T>(op, q, kv, out, lse)),
        }
    }
}

/// A paged C call on device buffers of GPU `device`, queued on `stream` (as
/// [`paged_cpu_entry`]; every pointer checked non-NULL before the GPU is opened).
///
/// # Safety
/// As [`longattn_paged_decode_cuda`] (or its FP8 / prefill twins) for the buffers.
unsafe fn paged_cuda_entry(
    op: &PagedOp,
    dtype: DTypeCode,
    q: CTensor,
    (kv, fp8): (
        (*const std::ffi::c_void, *const std::ffi::c_void, usize),
        bool,
    ),
    out: CTensorMut,
    (lse, lse_len): (*mut f32, usize),
    (device, stream): (i32, *mut std::ffi::c_void),
) -> Result<(), CallError> {
    let mut buffers = vec![
        (q.data, "q"),
        (kv.0, "k_cache"),
        (kv.1, "v_cache"),
        (out.data, "out"),
    ];
    buffers.extend(
        op.meta()
            .iter()
            .flat_map(|m| [(m.kmin, "kmin"), (m.kmax, "kmax")]),
    );
    // SAFETY: NULL or a live stream of that device's primary context by the contract.
    let stream = unsafe { caller_stream(&buffers, device, stream) }?;
    // SAFETY: device buffers as documented for `dtype` (and e4m3 bytes with `fp8`).
    unsafe {
        match fp8 {
            true => {
                with_dtype!(dtype, T => paged_cuda_typed::<T, F8E4M3>(op, &stream, q, kv, out, lse, lse_len))
            }
            false => {
                with_dtype!(dtype, T => paged_cuda_typed::<T, T>(op, &stream, q, kv, out, lse, lse_len))
            }
        }
    }
}

/// `longattn_paged_decode_cuda()`: paged decode on device buffers of GPU `device`, queued on
/// `stream` (as [`longattn_dense_forward_cuda`]); the descriptor's block table and
/// `seqlens_k` stay host arrays (validated, then uploaded on `stream` per call). f16 or bf16.
///
/// # Safety
/// `desc` is a valid descriptor; `q`, `out` (not overlapping the inputs), `k_cache`,
/// `v_cache` (`cache_len` elements each) and `lse` (NULL or `lse_len` floats) are device
/// allocations of `device` holding elements of `dtype`, alive until the queued work
/// completes; `stream` is NULL or a live stream of that device's primary context.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_paged_decode_cuda(
    desc: *const CPagedDesc,
    dtype: DTypeCode,
    q: CTensor,
    k_cache: *const std::ffi::c_void,
    v_cache: *const std::ffi::c_void,
    cache_len: usize,
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
    device: i32,
    stream: *mut std::ffi::c_void,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor by the contract.
        let op = PagedOp::Decode(unsafe { paged_problem(desc) }?, None);
        let kv = (k_cache, v_cache, cache_len);
        let gpu = (device, stream);
        // SAFETY: device buffers and stream as documented for `dtype`.
        unsafe { paged_cuda_entry(&op, dtype, q, (kv, false), out, (lse, lse_len), gpu) }
    })
}

/// `longattn_fp8_cache`: a paged K/V cache in FP8 e4m3 (docs/semantics.md, "FP8 KV cache"):
/// `k_cache`, `v_cache` hold `cache_len` e4m3 bytes each (`[num_pages, page_size, heads_kv,
/// head_dim]`); a stored value means `value * k_scales[kv head]` (keys) or
/// `value * v_scales[kv head]` (values). The scales are host arrays of `heads_kv` floats,
/// > 0 and at most `f32::MAX / 448`, or both NULL (scale 1).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CFp8Cache {
    /// Key cache, `cache_len` e4m3 codes.
    pub k_cache: *const std::ffi::c_void,
    /// Value cache, `cache_len` e4m3 codes.
    pub v_cache: *const std::ffi::c_void,
    /// Codes in each of `k_cache`, `v_cache`.
    pub cache_len: usize,
    /// `[heads_kv]` key scales (host), or NULL with `v_scales` NULL.
    pub k_scales: *const f32,
    /// `[heads_kv]` value scales (host), or NULL with `k_scales` NULL.
    pub v_scales: *const f32,
}

/// The decode step of `desc` over the FP8 cache's scales.
///
/// # Safety
/// `desc` as [`paged_problem`]; the cache's scales NULL or `heads_kv` readable floats.
unsafe fn fp8_problem(
    desc: *const CPagedDesc,
    cache: &CFp8Cache,
) -> Result<PagedDecode, CallError> {
    // SAFETY: forwarded contract.
    let scales = unsafe { fp8_scales(desc, cache.k_scales, cache.v_scales) }?;
    // SAFETY: forwarded contract.
    unsafe { paged_problem_with(desc, scales) }
}

/// The FP8 dequantisation scales of `desc`'s cache: `heads_kv` host floats each, or none
/// (both NULL: scale 1).
///
/// # Safety
/// `desc` NULL or valid; `k_scales`, `v_scales` NULL or `heads_kv` readable floats each.
unsafe fn fp8_scales(
    desc: *const CPagedDesc,
    k_scales: *const f32,
    v_scales: *const f32,
) -> Result<Option<KvScales>, CallError> {
    // SAFETY: NULL or valid by the contract.
    let heads_kv = unsafe { desc.as_ref() }
        .ok_or(CallError::Null("desc"))?
        .heads_kv;
    // Bounded before the scales are read and copied (the kernels' grid limit).
    if heads_kv > u16::MAX as usize {
        let msg = format!("heads_kv = {heads_kv}: at most {} kv heads", u16::MAX);
        return Err(Error::Shape(msg).into());
    }
    Ok(match (k_scales.is_null(), v_scales.is_null()) {
        (true, true) => None,
        (false, true) => return Err(CallError::Null("v_scales (k_scales is set)")),
        (true, false) => return Err(CallError::Null("k_scales (v_scales is set)")),
        (false, false) => {
            // SAFETY: `heads_kv` floats each by the contract (a wrong `heads_kv` is refused
            // by the descriptor's own checks only after this read: the caller's contract).
            let (k, v) = unsafe {
                (
                    host_slice::<f32>(k_scales.cast(), heads_kv, "k_scales")?,
                    host_slice::<f32>(v_scales.cast(), heads_kv, "v_scales")?,
                )
            };
            Some(KvScales::new(k.to_vec(), v.to_vec())?)
        }
    })
}

/// `longattn_paged_decode_fp8_cpu()`: [`longattn_paged_decode_cpu`] over an FP8 e4m3 cache
/// (`q`, `out` of `dtype`: f32, f16 or bf16).
///
/// # Safety
/// `desc` is a valid descriptor; `q` and `out` hold `len` elements of `dtype` (`out`
/// writable, not overlapping the inputs); the cache as documented on [`CFp8Cache`]; `lse`,
/// when not NULL, `lse_len` writable floats.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_paged_decode_fp8_cpu(
    desc: *const CPagedDesc,
    dtype: DTypeCode,
    q: CTensor,
    cache: CFp8Cache,
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor and scales by the contract.
        let op = PagedOp::Decode(unsafe { fp8_problem(desc, &cache) }?, None);
        let kv = (cache.k_cache, cache.v_cache, cache.cache_len);
        // SAFETY: buffers as documented.
        unsafe { paged_cpu_entry(&op, dtype, q, (kv, true), out, (lse, lse_len)) }
    })
}

/// `longattn_paged_decode_fp8_cuda()`: [`longattn_paged_decode_cuda`] over an FP8 e4m3 cache
/// on the device (`q`, `out` f16 or bf16; the scales stay host arrays, uploaded per call).
/// The FP8 decode kernel is **not yet verified on a GPU**.
///
/// # Safety
/// As [`longattn_paged_decode_cuda`], with `k_cache` and `v_cache` device allocations of
/// `cache_len` e4m3 bytes and the scales as documented on [`CFp8Cache`].
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn longattn_paged_decode_fp8_cuda(
    desc: *const CPagedDesc,
    dtype: DTypeCode,
    q: CTensor,
    cache: CFp8Cache,
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
    device: i32,
    stream: *mut std::ffi::c_void,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor and scales by the contract.
        let op = PagedOp::Decode(unsafe { fp8_problem(desc, &cache) }?, None);
        let kv = (cache.k_cache, cache.v_cache, cache.cache_len);
        let gpu = (device, stream);
        // SAFETY: device buffers and stream as documented.
        unsafe { paged_cuda_entry(&op, dtype, q, (kv, true), out, (lse, lse_len), gpu) }
    })
}

/// `longattn_fp8_quantize()`: `dst[i] = e4m3(src[i] / scale)` for `i < n` (round to nearest
/// even, saturating at +-448, NaN kept): the bytes an FP8 cache holds for `src`, as the
/// crate's own append writes them.
///
/// # Safety
/// `src` holds `n` readable floats, `dst` `n` writable bytes (not overlapping `src`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_fp8_quantize(
    src: *const f32,
    n: usize,
    scale: f32,
    dst: *mut u8,
) -> Status {
    guarded(|| {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(
                Error::InvalidOption(format!("scale {scale} must be finite and > 0")).into(),
            );
        }
        check_writes_disjoint(
            byte_range(dst.cast(), n, 1),
            None,
            &[(byte_range(src.cast(), n, 4), "src")],
        )?;
        // SAFETY: `n` floats and `n` bytes by the contract, checked disjoint.
        let (src, dst) = unsafe {
            (
                host_slice::<f32>(src.cast(), n, "src")?,
                host_slice_mut::<u8>(dst.cast(), n, "dst")?,
            )
        };
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = F8E4M3::from_f32(x / scale).to_bits();
        }
        Ok(())
    })
}

/// The validated paged prefill of `desc` (its window as given: `-1` unbounded, causal is
/// `(-1, 0)`): `desc.q_len` rows per sequence, or with `cu_seqlens_q` (`batch + 1` offsets)
/// packed rows of varying counts.
///
/// # Safety
/// As [`paged_problem`]; `cu_seqlens_q` NULL or `batch + 1` readable values.
unsafe fn prefill_problem(
    desc: *const CPagedDesc,
    cu_seqlens_q: *const i32,
) -> Result<PagedPrefill, CallError> {
    // SAFETY: forwarded contract.
    let (desc, cache, options) = unsafe { paged_parts(desc, None) }?;
    if cu_seqlens_q.is_null() {
        return Ok(PagedPrefill::new(
            &cache,
            desc.heads_q,
            desc.q_len,
            &options,
        )?);
    }
    let n = desc
        .batch
        .checked_add(1)
        .ok_or_else(|| Error::Shape("batch + 1 overflows".into()))?;
    // SAFETY: `batch + 1` values by the contract.
    let cu = unsafe { table(cu_seqlens_q, n, "cu_seqlens_q") }?;
    Ok(PagedPrefill::new_varlen(
        &cache,
        desc.heads_q,
        cu,
        &options,
    )?)
}

/// `longattn_paged_prefill_sizes()`: elements of a cache buffer, the output and the LSE of a
/// paged prefill.
///
/// # Safety
/// As [`longattn_paged_prefill_cpu`] for `desc` and `cu_seqlens_q`; the outputs are NULL or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_paged_prefill_sizes(
    desc: *const CPagedDesc,
    cu_seqlens_q: *const i32,
    cache_len: *mut usize,
    out_len: *mut usize,
    lse_len: *mut usize,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor and offsets by the contract.
        let pf = unsafe { prefill_problem(desc, cu_seqlens_q) }?;
        let cache = pf.cache().layout().cache_len();
        // SAFETY: NULL or writable by the contract.
        unsafe {
            write_sizes(&[
                (cache_len, cache),
                (out_len, pf.out_len()),
                (lse_len, pf.lse_len()),
            ])
        };
        Ok(())
    })
}

/// `longattn_paged_prefill_cpu()`: attention of new query tokens over their sequences' paged
/// K/V (chunked prefill, prefix caching; the cache already holds the new tokens), on host
/// buffers: dense attention over the gathered tokens.
///
/// # Safety
/// `desc` is a valid descriptor; `cu_seqlens_q` NULL or `batch + 1` readable offsets; `q`
/// and `out` hold `len` elements of `dtype` (`out` writable, not overlapping the inputs);
/// `k_cache` and `v_cache` hold `cache_len` elements; `lse`, when not NULL, `lse_len`
/// writable floats.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn longattn_paged_prefill_cpu(
    desc: *const CPagedDesc,
    cu_seqlens_q: *const i32,
    dtype: DTypeCode,
    q: CTensor,
    k_cache: *const std::ffi::c_void,
    v_cache: *const std::ffi::c_void,
    cache_len: usize,
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor and offsets by the contract.
        let op = PagedOp::Prefill(unsafe { prefill_problem(desc, cu_seqlens_q) }?);
        let kv = (k_cache, v_cache, cache_len);
        // SAFETY: buffers as documented for `dtype`.
        unsafe { paged_cpu_entry(&op, dtype, q, (kv, false), out, (lse, lse_len)) }
    })
}

/// `longattn_paged_prefill_cuda()`: [`longattn_paged_prefill_cpu`] on device buffers of GPU
/// `device`, queued on `stream` (as [`longattn_paged_decode_cuda`]; f16 or bf16, head_dim
/// 64/128/256). The paged prefill kernel's current version is **not yet verified on a GPU**.
///
/// # Safety
/// As [`longattn_paged_decode_cuda`], with `cu_seqlens_q` NULL or `batch + 1` host offsets.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn longattn_paged_prefill_cuda(
    desc: *const CPagedDesc,
    cu_seqlens_q: *const i32,
    dtype: DTypeCode,
    q: CTensor,
    k_cache: *const std::ffi::c_void,
    v_cache: *const std::ffi::c_void,
    cache_len: usize,
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
    device: i32,
    stream: *mut std::ffi::c_void,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor and offsets by the contract.
        let op = PagedOp::Prefill(unsafe { prefill_problem(desc, cu_seqlens_q) }?);
        let kv = (k_cache, v_cache, cache_len);
        let gpu = (device, stream);
        // SAFETY: device buffers and stream as documented for `dtype`.
        unsafe { paged_cuda_entry(&op, dtype, q, (kv, false), out, (lse, lse_len), gpu) }
    })
}

/// `longattn_fp8_descales`: FlashAttention-3's descale factors of an FP8 dense call (docs/
/// semantics.md, "FP8 dense forward"), `[batch, heads_kv]` f32 each: a code of query head `h`
/// means `code * q[b, h / group]`, key and value codes of kv head `g` `code * k[b, g]` and
/// `code * v[b, g]`. Host arrays for the CPU call, device arrays for the CUDA call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CFp8Descales {
    /// Query descales.
    pub q: *const f32,
    /// Key descales.
    pub k: *const f32,
    /// Value descales.
    pub v: *const f32,
}

/// Descales per tensor of an FP8 dense call: `batch * heads_kv`.
fn descale_len(attn: &FlashAttention) -> Result<usize, CallError> {
    attn.batch()
        .checked_mul(attn.heads_kv())
        .ok_or_else(|| Error::Shape("batch * heads_kv overflows".into()).into())
}

/// The inputs of an FP8 dense call as byte ranges (q, k, v: one byte per code; the three
/// descale arrays: `n` floats each), for the overlap checks.
fn fp8_input_ranges(
    q: &CTensor,
    k: &CTensor,
    v: &CTensor,
    descales: &CFp8Descales,
    n: usize,
) -> [((usize, usize), &'static str); 6] {
    [
        (byte_range(q.data, q.len, 1), "q"),
        (byte_range(k.data, k.len, 1), "k"),
        (byte_range(v.data, v.len, 1), "v"),
        (byte_range(descales.q.cast(), n, 4), "q_descale"),
        (byte_range(descales.k.cast(), n, 4), "k_descale"),
        (byte_range(descales.v.cast(), n, 4), "v_descale"),
    ]
}

/// # Safety
/// As [`longattn_dense_fp8_forward_cpu`], with `O` the output's element type.
unsafe fn dense_fp8_cpu_typed<O: Element>(
    attn: &FlashAttention,
    (q, k, v): (CTensor, CTensor, CTensor),
    descales: CFp8Descales,
    out: CTensorMut,
    lse: Option<&mut [f32]>,
) -> Result<(), CallError> {
    let n = descale_len(attn)?;
    check_writes_disjoint(
        byte_range(out.data, out.len, std::mem::size_of::<O>()),
        lse.as_deref(),
        &fp8_input_ranges(&q, &k, &v, &descales, n),
    )?;
    // SAFETY (all): `len` codes, `n` descales and `out.len` elements by the contract; the
    // output checked not to overlap any input above.
    let (q_s, k_s, v_s, dq, dk, dv, out_s) = unsafe {
        (
            host_slice::<F8E4M3>(q.data, q.len, "q")?,
            host_slice::<F8E4M3>(k.data, k.len, "k")?,
            host_slice::<F8E4M3>(v.data, v.len, "v")?,
            host_slice::<f32>(descales.q.cast(), n, "q_descale")?,
            host_slice::<f32>(descales.k.cast(), n, "k_descale")?,
            host_slice::<f32>(descales.v.cast(), n, "v_descale")?,
            host_slice_mut::<O>(out.data, out.len, "out")?,
        )
    };
    attn.forward_cpu_fp8(
        Strided::new(q_s, strides(q.strides)),
        Strided::new(k_s, strides(k.strides)),
        Strided::new(v_s, strides(v.strides)),
        crate::dense::Fp8Descales {
            q: dq,
            k: dk,
            v: dv,
        },
        Strided::new(out_s, strides(out.strides)),
        lse,
    )?;
    Ok(())
}

/// `longattn_dense_fp8_forward_cpu()`: dense attention over FP8 e4m3 codes (`q`, `k`, `v`:
/// `len` one-byte codes each, strides in elements = bytes) with FlashAttention-3 descales,
/// on the CPU; `out` of `out_dtype` (f16 or bf16; f32 is refused as by the Rust API).
///
/// # Safety
/// `desc` is a valid descriptor; `q`, `k`, `v` point to `len` readable bytes each; the
/// descales to `batch * heads_kv` readable floats each; `out` to `len` writable elements of
/// `out_dtype`, overlapping no input; `lse`, when not NULL, to `lse_len` writable floats.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn longattn_dense_fp8_forward_cpu(
    desc: *const CDenseDesc,
    out_dtype: DTypeCode,
    q: CTensor,
    k: CTensor,
    v: CTensor,
    descales: CFp8Descales,
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor by the contract.
        let attn = unsafe { dense_problem(desc) }?;
        // SAFETY: NULL or `lse_len` writable floats by the contract.
        let lse = unsafe { lse_slice(lse, lse_len) }?;
        // SAFETY: the buffers as documented.
        unsafe {
            with_dtype!(out_dtype, O => dense_fp8_cpu_typed::<O>(&attn, (q, k, v), descales, out, lse))
        }
    })
}

/// # Safety
/// As [`longattn_dense_fp8_forward_cuda`], with `O` the output's element type.
unsafe fn dense_fp8_cuda_typed<O: Element + cudarc::driver::DeviceRepr>(
    attn: &FlashAttention,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    (q, k, v): (CTensor, CTensor, CTensor),
    descales: CFp8Descales,
    out: CTensorMut,
    (lse, lse_len): (*mut f32, usize),
) -> Result<(), CallError> {
    let n = descale_len(attn)?;
    check_device_writes_disjoint(
        byte_range(out.data, out.len, std::mem::size_of::<O>()),
        (lse, lse_len),
        &fp8_input_ranges(&q, &k, &v, &descales, n),
    )?;
    // SAFETY (all): device allocations of the stated lengths by the contract, alive for the
    // call; never freed here (Borrowed).
    let (bq, bk, bv, dq, dk, dv, mut bout, mut blse) = unsafe {
        (
            borrow_device::<F8E4M3>(stream, q.data, q.len, "q")?,
            borrow_device::<F8E4M3>(stream, k.data, k.len, "k")?,
            borrow_device::<F8E4M3>(stream, v.data, v.len, "v")?,
            borrow_device::<f32>(stream, descales.q.cast(), n, "q_descale")?,
            borrow_device::<f32>(stream, descales.k.cast(), n, "k_descale")?,
            borrow_device::<f32>(stream, descales.v.cast(), n, "v_descale")?,
            borrow_device::<O>(stream, out.data, out.len, "out")?,
            match lse.is_null() {
                true => None,
                false => Some(borrow_device::<f32>(stream, lse.cast(), lse_len, "lse")?),
            },
        )
    };
    attn.forward_gpu_fp8::<O, _, _, _>(
        stream,
        Strided::new(bq.get(), strides(q.strides)),
        Strided::new(bk.get(), strides(k.strides)),
        Strided::new(bv.get(), strides(v.strides)),
        crate::dense::Fp8Descales {
            q: dq.get(),
            k: dk.get(),
            v: dv.get(),
        },
        Strided::new(bout.get_mut(), strides(out.strides)),
        blse.as_mut()
            .map(|b| b.get_mut() as &mut dyn crate::DeviceBufferMut<f32>),
    )?;
    Ok(())
}

/// `longattn_dense_fp8_forward_cuda()`: [`longattn_dense_fp8_forward_cpu`] on device buffers
/// of GPU `device` (the descales too: device arrays, as FlashAttention-3 takes them, so a
/// CUDA graph replays the call with new values), queued on `stream` (as
/// [`longattn_dense_forward_cuda`]); Hopper only (compute capability 9.0). The FP8 kernel is
/// **not yet verified on a GPU**. The descale values are not inspected (device memory): the
/// caller guarantees finite values in (0, FLT_MAX / 448].
///
/// # Safety
/// As [`longattn_dense_forward_cuda`], with `q`, `k`, `v` device allocations of `len` e4m3
/// bytes, the descales of `batch * heads_kv` floats each, `out` of `out_dtype` elements.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn longattn_dense_fp8_forward_cuda(
    desc: *const CDenseDesc,
    out_dtype: DTypeCode,
    q: CTensor,
    k: CTensor,
    v: CTensor,
    descales: CFp8Descales,
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
    device: i32,
    stream: *mut std::ffi::c_void,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor by the contract.
        let attn = unsafe { dense_problem(desc) }?;
        let buffers = [
            (q.data, "q"),
            (k.data, "k"),
            (v.data, "v"),
            (descales.q.cast(), "q_descale"),
            (descales.k.cast(), "k_descale"),
            (descales.v.cast(), "v_descale"),
            (out.data.cast_const(), "out"),
        ];
        // SAFETY: NULL or a live stream of that device's primary context by the contract.
        let stream = unsafe { caller_stream(&buffers, device, stream) }?;
        let lse = (lse, lse_len);
        // SAFETY: the buffers as documented.
        unsafe {
            with_dtype!(out_dtype, O => dense_fp8_cuda_typed::<O>(&attn, &stream, (q, k, v), descales, out, lse))
        }
    })
}

mod append;
mod block_sparse;
mod merge;
mod neighborhood;
mod policy;

pub use append::*;
pub use block_sparse::*;
pub use merge::*;
pub use neighborhood::*;
pub use policy::*;
