//! CUDA entry points on any object exposing `__cuda_array_interface__` (torch CUDA tensors,
//! CuPy arrays; float16, float32 where a function takes it: LSEs, merged outputs, and uint8
//! for the FP8 e4m3 codes of a paged cache and its Quest bounds) or, where that is missing or
//! refuses the dtype (torch bfloat16), DLPack's `__dlpack__` (float16, bfloat16, float32,
//! uint8): the kernels read and write the caller's memory in place, ordered on an explicit
//! `stream` handle, else the interface's stream, else the legacy default stream (the Python
//! wrappers pass torch's current stream). A uint8 tensor is borrowed as
//! `CudaSlice<F8E4M3>` (`repr(transparent)` over u8) and only as a cache or its bounds; every
//! other tensor refuses it by name. Compiled, not exercised without a GPU (the FP8 paths are
//! not yet run on a GPU).
//!
//! What this relies on: the interface's `data` pointer and `strides` (or the DLPack tensor's)
//! describe live device memory of the declared extent on device `device` (the caller keeps
//! the tensors alive until the call returns; the launch is asynchronous and ordered on the
//! stream, as for any CUDA library call); the stream handle belongs to that device's primary
//! context (the one torch and CuPy use, which `open_gpu` retains). Nothing here
//! allocates or frees the caller's memory: `RawDevice` borrows it for one call, and a DLPack
//! capsule is kept unconsumed until the call returns (its producer frees only its own
//! bookkeeping then, never the tensor).

use crate::{
    Blocks, DenseProblem, NeighborhoodSpec, Paged, PagedKind, PagedProblem, PolicyArgs,
    check_meta_dims, dims_n, err, kv_scales, make_options, merge_shape, neighborhood_problem,
    paged_cache, paged_problem,
};
use longattn::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, sys};
use longattn::device::open_gpu;
use longattn::{
    AttentionOptions, AttentionShape, Element, F8E4M3, FlashAttention, KvPages, KvScales,
    NeighborhoodAttention, PageMeta, Partial, SeqLens, Strided, Strides, bf16, f16,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyAny, PyDict};
use std::sync::Arc;

/// A borrowed device buffer: `len` elements of `T` from the interface's pointer, seen as a
/// cudarc slice for one call and never freed here (dropped through [`CudaSlice::leak`], which
/// releases only cudarc's own bookkeeping). The GPU entry points take only cudarc's buffer
/// types, whose lengths they trust, so the borrow goes through cudarc's own constructor.
struct RawDevice<T>(Option<CudaSlice<T>>);

impl<T> RawDevice<T> {
    fn get(&self) -> &CudaSlice<T> {
        self.0.as_ref().expect("borrowed until dropped")
    }
    fn get_mut(&mut self) -> &mut CudaSlice<T> {
        self.0.as_mut().expect("borrowed until dropped")
    }
}

impl<T> Drop for RawDevice<T> {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.leak();
        }
    }
}

/// The element types the GPU entry points take: halves for attention, f32 for LSEs (and
/// merged outputs), uint8 for the FP8 e4m3 codes of a paged cache (and its Quest bounds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dt {
    F16,
    BF16,
    F32,
    U8,
}

/// The refusal of a tensor `name` of dtype `dt` (float32 or uint8) where the kernels take
/// halves.
fn not_half(name: &str, dt: Dt) -> PyErr {
    PyTypeError::new_err(match dt {
        Dt::U8 => format!(
            "{name}: uint8 (FP8 e4m3 codes) only for a paged cache (k_cache, v_cache) and its \
             kmin/kmax; float16 or bfloat16 here"
        ),
        _ => format!(
            "{name}: float32 unsupported here on the GPU (float16 or bfloat16; float32 runs on \
             the CPU path)"
        ),
    })
}

/// `c` (named `name`) holds halves: checked before any CUDA call.
fn check_half(name: &str, c: &Cai) -> PyResult<()> {
    match c.dtype {
        Dt::F16 | Dt::BF16 => Ok(()),
        dt => Err(not_half(name, dt)),
    }
}

/// A CUDA tensor, from a parsed `__cuda_array_interface__` (v2/v3) or DLPack capsule.
struct Cai {
    ptr: u64,
    readonly: bool,
    dims: Vec<usize>,
    /// Element strides (C-contiguous when the interface gives none).
    strides: Vec<i64>,
    dtype: Dt,
    stream: Option<usize>,
    /// The DLPack capsule describing the tensor, alive (unconsumed) until the call returns.
    _capsule: Option<Py<PyAny>>,
}

impl Cai {
    /// Elements from the pointer to one past the last element (strides are non-negative;
    /// saturated at `usize::MAX`, a length the stride checks then refuse).
    fn extent(&self) -> usize {
        if self.dims.contains(&0) {
            return 0;
        }
        let last = self
            .dims
            .iter()
            .zip(&self.strides)
            .map(|(&d, &s)| (d as u128 - 1) * s.max(0) as u128)
            .sum::<u128>();
        usize::try_from(last + 1).unwrap_or(usize::MAX)
    }
}

fn item<'py>(d: &Bound<'py, PyDict>, name: &str, k: &str) -> PyResult<Bound<'py, PyAny>> {
    d.get_item(k)?
        .ok_or_else(|| PyValueError::new_err(format!("{name}: interface lacks '{k}'")))
}

/// `obj` as a CUDA tensor on `device` of halves or float32 (uint8 refused by name: see
/// [`cache_cai`]).
fn cai(name: &str, obj: &Bound<'_, PyAny>, stream: Option<usize>, device: usize) -> PyResult<Cai> {
    let c = cache_cai(name, obj, stream, device)?;
    match c.dtype {
        Dt::U8 => Err(not_half(name, c.dtype)),
        _ => Ok(c),
    }
}

/// `obj` as a CUDA tensor on `device`, uint8 (FP8 codes) included: its
/// `__cuda_array_interface__`, else its DLPack capsule (made ready on `stream`, the handle the
/// call runs on; `None` is the legacy default).
fn cache_cai(
    name: &str,
    obj: &Bound<'_, PyAny>,
    stream: Option<usize>,
    device: usize,
) -> PyResult<Cai> {
    match obj.getattr("__cuda_array_interface__") {
        Ok(iface) => cuda_array_interface(name, &iface),
        Err(e) if obj.hasattr("__dlpack__")? => dlpack(name, obj, stream, device).map_err(|d| {
            PyTypeError::new_err(format!(
                "{name}: __cuda_array_interface__: {e}; DLPack: {d}"
            ))
        }),
        Err(_) => Err(PyTypeError::new_err(format!(
            "{name} has no __cuda_array_interface__ or __dlpack__ (a CUDA tensor?)"
        ))),
    }
}

fn cuda_array_interface(name: &str, iface: &Bound<'_, PyAny>) -> PyResult<Cai> {
    let d = iface.cast::<PyDict>()?;
    let get = |k: &str| item(d, name, k);
    let (ptr, readonly): (u64, bool) = get("data")?.extract()?;
    let dims: Vec<usize> = get("shape")?.extract()?;
    let typestr: String = get("typestr")?.extract()?;
    let (dtype, item) = match typestr.as_str() {
        "<f2" => (Dt::F16, 2),
        "<f4" => (Dt::F32, 4),
        "|u1" => (Dt::U8, 1),
        t => {
            return Err(PyTypeError::new_err(format!(
                "{name}: dtype '{t}' unsupported on the GPU (float16, float32 for LSEs, uint8 \
                 for FP8 cache codes; bfloat16 through DLPack)"
            )));
        }
    };
    let strides = match d.get_item("strides")? {
        Some(s) if !s.is_none() => {
            let bytes: Vec<i64> = s.extract()?;
            if bytes.len() != dims.len() {
                return Err(PyValueError::new_err(format!(
                    "{name}: strides {bytes:?} for shape {dims:?}: one stride per dim"
                )));
            }
            if bytes.iter().any(|&b| b < 0 || b % item != 0) {
                return Err(PyValueError::new_err(format!(
                    "{name}: strides {bytes:?} must be non-negative multiples of {item} bytes"
                )));
            }
            bytes.iter().map(|b| b / item).collect()
        }
        _ => contiguous_strides(&dims),
    };
    // v3: a `mask` other than None makes a masked array, whose masked-out elements the
    // kernels would read as data.
    if d.get_item("mask")?.is_some_and(|m| !m.is_none()) {
        return Err(PyValueError::new_err(format!(
            "{name}: masked arrays (__cuda_array_interface__ 'mask') are unsupported"
        )));
    }
    let stream = match d.get_item("stream")? {
        Some(s) if !s.is_none() => Some(s.extract()?),
        _ => None,
    };
    Ok(Cai {
        ptr,
        readonly,
        dims,
        strides,
        dtype,
        stream,
        _capsule: None,
    })
}

/// Row-major element strides of `dims`.
fn contiguous_strides(dims: &[usize]) -> Vec<i64> {
    let mut st = vec![1i64; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        // Saturated: a shape beyond i64 elements gives a stride the length checks refuse.
        let d = i64::try_from(dims[i + 1]).unwrap_or(i64::MAX);
        st[i] = st[i + 1].saturating_mul(d);
    }
    st
}

/// DLPack's `DLDevice`, `DLDataType` and `DLTensor` (dlpack.h, ABI stable since v0.2) and the
/// legacy `DLManagedTensor` a `"dltensor"` capsule holds.
#[repr(C)]
struct DlDevice {
    device_type: i32,
    device_id: i32,
}
#[repr(C)]
struct DlDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}
#[repr(C)]
struct DlTensor {
    data: *mut std::ffi::c_void,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}
#[repr(C)]
struct DlManagedTensor {
    dl_tensor: DlTensor,
    manager_ctx: *mut std::ffi::c_void,
    deleter: Option<unsafe extern "C" fn(*mut DlManagedTensor)>,
}
/// `kDLCUDA` and `kDLCUDAManaged`; `kDLUInt`, `kDLFloat` and `kDLBfloat`.
const DL_CUDA: i32 = 2;
const DL_CUDA_MANAGED: i32 = 13;
const DL_UINT: u8 = 1;
const DL_FLOAT: u8 = 2;
const DL_BFLOAT: u8 = 4;

fn dlpack(
    name: &str,
    obj: &Bound<'_, PyAny>,
    stream: Option<usize>,
    device: usize,
) -> PyResult<Cai> {
    // The device first: a producer may refuse a stream argument for host memory.
    let (device_type, device_id): (i32, i32) = obj.call_method0("__dlpack_device__")?.extract()?;
    if device_type != DL_CUDA && device_type != DL_CUDA_MANAGED {
        return Err(PyTypeError::new_err(format!(
            "{name} lives on DLPack device type {device_type}, not CUDA (2)"
        )));
    }
    if usize::try_from(device_id).ok() != Some(device) {
        return Err(PyValueError::new_err(format!(
            "{name} is on CUDA device {device_id}, the call runs on device {device}"
        )));
    }
    // DLPack's stream numbering: 1 is the legacy default stream (0 is not allowed).
    let kwargs = PyDict::new(obj.py());
    kwargs.set_item(
        "stream",
        match stream {
            None | Some(0) => 1,
            Some(s) => s,
        },
    )?;
    let capsule = obj.call_method("__dlpack__", (), Some(&kwargs))?;
    // SAFETY: a `"dltensor"` capsule holds a live `DLManagedTensor` (DLPack's contract) until
    // the capsule is consumed or destroyed; it is neither before `capsule` drops (held in the
    // returned `Cai`), and nothing below writes through the pointer.
    let managed = unsafe {
        pyo3::ffi::PyCapsule_GetPointer(capsule.as_ptr(), c"dltensor".as_ptr())
            .cast::<DlManagedTensor>()
            .as_ref()
    };
    let Some(managed) = managed else {
        // PyCapsule_GetPointer set an exception (a versioned or misnamed capsule).
        return Err(PyErr::take(obj.py()).unwrap_or_else(|| {
            PyTypeError::new_err(format!("{name}: __dlpack__ gave no \"dltensor\" capsule"))
        }));
    };
    let t = &managed.dl_tensor;
    let dtype = match (t.dtype.code, t.dtype.bits, t.dtype.lanes) {
        (DL_FLOAT, 16, 1) => Dt::F16,
        (DL_BFLOAT, 16, 1) => Dt::BF16,
        (DL_FLOAT, 32, 1) => Dt::F32,
        (DL_UINT, 8, 1) => Dt::U8,
        (code, bits, lanes) => {
            return Err(PyTypeError::new_err(format!(
                "{name}: DLPack dtype (code {code}, {bits} bits, {lanes} lanes) unsupported on \
                 the GPU (float16 or bfloat16; float32 for LSEs; uint8 for FP8 cache codes)"
            )));
        }
    };
    let rank = usize::try_from(t.ndim)
        .ok()
        .filter(|&r| r <= 8 && (r == 0 || !t.shape.is_null()))
        .ok_or_else(|| PyValueError::new_err(format!("{name}: DLPack ndim {}", t.ndim)))?;
    // SAFETY: `shape` (and `strides` when not null) point to `ndim` values (DLPack).
    let shape = unsafe { std::slice::from_raw_parts(t.shape, rank) };
    let dims = shape
        .iter()
        .map(|&n| usize::try_from(n))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| PyValueError::new_err(format!("{name}: DLPack shape {shape:?}")))?;
    let strides = if t.strides.is_null() {
        contiguous_strides(&dims)
    } else {
        // SAFETY: as above.
        let st = unsafe { std::slice::from_raw_parts(t.strides, rank) }.to_vec();
        if st.iter().any(|&x| x < 0) {
            return Err(PyValueError::new_err(format!(
                "{name}: strides {st:?} must be non-negative"
            )));
        }
        st
    };
    let ptr = (t.data as u64)
        .checked_add(t.byte_offset)
        .ok_or_else(|| PyValueError::new_err(format!("{name}: DLPack byte_offset overflows")))?;
    Ok(Cai {
        ptr,
        readonly: false,
        dims,
        strides,
        dtype,
        stream: None,
        _capsule: Some(capsule.unbind()),
    })
}

/// `(batch, seq, head)` element strides of a rank-4 `(b, s, h, d)` or, `packed`, rank-3
/// `(total, h, d)` tensor whose last dim is contiguous.
fn strides4(name: &str, c: &Cai, packed: bool) -> PyResult<Strides> {
    let rank = if packed { 3 } else { 4 };
    if c.dims.len() != rank || (c.strides[rank - 1] != 1 && c.dims[rank - 1] > 1) {
        return Err(PyValueError::new_err(format!(
            "{name}: rank {rank} with a contiguous last dim expected, shape {:?} strides {:?}",
            c.dims, c.strides
        )));
    }
    let s = &c.strides;
    Ok(if packed {
        Strides {
            batch: 0,
            seq: s[0],
            head: s[1],
        }
    } else {
        Strides {
            batch: s[0],
            seq: s[1],
            head: s[2],
        }
    })
}

/// The context of `device` and the stream to run on: `stream` if given, else the interface's
/// (`None`: the legacy default stream, as the interface's v3 "no synchronization" means).
fn stream_for(device: usize, stream: Option<usize>, q: &Cai) -> PyResult<CallStream> {
    // Read before `open_gpu` binds its context, and only once libcuda is known to load.
    // SAFETY: only probes for the driver library.
    let saved = if longattn::device::cuda_compiled() && unsafe { sys::is_culib_present() } {
        longattn::cudarc::driver::result::ctx::get_current()
            .ok()
            .flatten()
            .unwrap_or(std::ptr::null_mut())
    } else {
        std::ptr::null_mut()
    };
    // `open_gpu`, not `CudaContext::new`: without libcuda cudarc panics on first use, and a
    // build without the kernels should say so.
    let ctx = open_gpu(device).map_err(err)?;
    let handle = stream.or(q.stream).unwrap_or(0);
    // SAFETY: the handle is the caller's stream on `device` (see the module docs); the
    // wrapper never destroys it.
    let stream = unsafe { ctx.wrap_borrowed_stream(handle as sys::CUstream) };
    Ok(CallStream {
        stream: std::mem::ManuallyDrop::new(stream),
        saved,
    })
}

/// The stream of one call (derefs to it), and the CUDA context that was current on the
/// thread before it, made current again when dropped. Opening the GPU and cudarc's calls
/// make `device`'s primary context current, and the CUDA runtime's current device is the
/// thread's current context: after `torch.cuda.set_device(1)` (or CuPy's `Device(1)`), a
/// call with `device=0` would otherwise leave torch's and CuPy's later allocations on GPU 0.
struct CallStream {
    stream: std::mem::ManuallyDrop<Arc<CudaStream>>,
    /// The caller's context (NULL: none was current).
    saved: sys::CUcontext,
}

impl std::ops::Deref for CallStream {
    type Target = Arc<CudaStream>;
    fn deref(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl Drop for CallStream {
    fn drop(&mut self) {
        // SAFETY: dropped once, here, never used after. First, because the last reference
        // to our context binds it again as it drops (cudarc).
        unsafe { std::mem::ManuallyDrop::drop(&mut self.stream) };
        // SAFETY: the caller's context (current, so alive, when the call began) or NULL
        // (unbinds ours); libcuda is loaded. A failure leaves our context current.
        let _ = unsafe { longattn::cudarc::driver::result::ctx::set_current(self.saved) };
    }
}

/// `c` borrowed on `stream` once its pointer is known to be memory of the stream's device.
///
/// `__cuda_array_interface__` names no device: a tensor of another GPU (torch `cuda:1` with
/// `device=0`) would otherwise reach a kernel of this device, whose reads of the peer's memory
/// fault (a sticky error that ends the process's context) or return garbage. The DLPack
/// path checked `device_id` already; its managed memory is left to that check.
fn raw<T>(name: &str, c: &Cai, stream: &Arc<CudaStream>) -> PyResult<RawDevice<T>> {
    if c._capsule.is_none() && c.extent() > 0 {
        let mut ordinal: i32 = -1;
        // SAFETY: the attribute is an `int`; `ordinal` outlives the call; `open_gpu` (in
        // `stream_for`) initialised the driver. Any pointer value is a valid query.
        let code = unsafe {
            sys::cuPointerGetAttribute(
                (&raw mut ordinal).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                c.ptr as sys::CUdeviceptr,
            )
        };
        let device = stream.context().ordinal();
        if code != sys::CUresult::CUDA_SUCCESS {
            return Err(PyValueError::new_err(format!(
                "{name}: {:#x} is not CUDA device memory ({code:?})",
                c.ptr
            )));
        }
        if usize::try_from(ordinal).ok() != Some(device) {
            return Err(PyValueError::new_err(format!(
                "{name} is on CUDA device {ordinal}, the call runs on device {device}"
            )));
        }
    }
    follow_producer(name, c, stream)?;
    // SAFETY: the interface describes live device memory of this extent on the stream's
    // device (checked above for the interface; see the module docs); `RawDevice` never
    // frees it.
    Ok(RawDevice(Some(unsafe {
        stream.upgrade_device_ptr::<T>(c.ptr as sys::CUdeviceptr, c.extent())
    })))
}

/// The same stream for the array interface (1: legacy default, 2: per-thread default) and
/// for the driver (0, the NULL handle, is the legacy default stream too).
fn same_stream(interface: usize, run: usize) -> bool {
    let legacy = |h: usize| if h == 0 { 1 } else { h };
    legacy(interface) == legacy(run)
}

/// Orders `stream` after the work queued so far on the stream `c`'s interface names (v3:
/// "the consumer must synchronise on it" before reading). A call on an explicit stream, or
/// on q's, would otherwise race a k, v or out still being produced on another stream.
fn follow_producer(name: &str, c: &Cai, stream: &Arc<CudaStream>) -> PyResult<()> {
    let Some(h) = c.stream else { return Ok(()) };
    if same_stream(h, stream.cu_stream() as usize) {
        return Ok(());
    }
    // SAFETY: the interface's stream is a live stream of this device's primary context (the
    // protocol; see the module docs); the wrapper never destroys it.
    let producer = unsafe { stream.context().wrap_borrowed_stream(h as sys::CUstream) };
    let sync = || -> Result<(), longattn::cudarc::driver::DriverError> {
        stream.wait(&producer.record_event(None)?)
    };
    sync().map_err(|e| PyValueError::new_err(format!("{name}: waiting for its stream {h:#x}: {e}")))
}

/// `x` (named `name`) has the dtype of `like` (named `like_name`).
fn check_same(name: &str, x: &Cai, (like_name, like): (&str, &Cai)) -> PyResult<()> {
    if x.dtype != like.dtype {
        return Err(PyTypeError::new_err(format!(
            "{name} has dtype {:?} but {like_name} has {:?}",
            x.dtype, like.dtype
        )));
    }
    Ok(())
}

/// A problem over q, k, v and out with element strides: its `forward_gpu` (no LSE).
trait QkvGpu {
    fn forward<T: Element + DeviceRepr>(
        &self,
        stream: &Arc<CudaStream>,
        qkv: [Strided<&CudaSlice<T>>; 3],
        out: Strided<&mut CudaSlice<T>>,
    ) -> longattn::Result<()>;
}

impl QkvGpu for DenseProblem {
    fn forward<T: Element + DeviceRepr>(
        &self,
        stream: &Arc<CudaStream>,
        [q, k, v]: [Strided<&CudaSlice<T>>; 3],
        out: Strided<&mut CudaSlice<T>>,
    ) -> longattn::Result<()> {
        match self {
            DenseProblem::Dense(a) => a.forward_gpu::<T, _, _>(stream, q, k, v, out, None),
            DenseProblem::BlockSparse(bs) => bs.forward_gpu::<T, _, _>(stream, q, k, v, out, None),
        }
    }
}

impl QkvGpu for NeighborhoodAttention {
    fn forward<T: Element + DeviceRepr>(
        &self,
        stream: &Arc<CudaStream>,
        [q, k, v]: [Strided<&CudaSlice<T>>; 3],
        out: Strided<&mut CudaSlice<T>>,
    ) -> longattn::Result<()> {
        self.forward_gpu::<T, _, _>(stream, q, k, v, out, None)
    }
}

/// CUDA tensors q, k, v and out with their element strides `(batch, seq, head)`.
type QkvArgs<'a> = [(&'a Cai, Strides); 4];

/// `p` on the caller's buffers of q, k, v and out, in q's dtype, on `stream`.
fn qkv_gpu<P: QkvGpu>(p: &P, stream: &Arc<CudaStream>, args: QkvArgs) -> PyResult<()> {
    fn run<P: QkvGpu, T: Element + DeviceRepr>(
        p: &P,
        stream: &Arc<CudaStream>,
        [(q, qs), (k, ks), (v, vs), (o, os)]: QkvArgs,
    ) -> PyResult<()> {
        let (rq, rk, rv) = (
            raw::<T>("q", q, stream)?,
            raw::<T>("k", k, stream)?,
            raw::<T>("v", v, stream)?,
        );
        let mut ro = raw::<T>("out", o, stream)?;
        let qkv = [
            Strided::new(rq.get(), qs),
            Strided::new(rk.get(), ks),
            Strided::new(rv.get(), vs),
        ];
        p.forward(stream, qkv, Strided::new(ro.get_mut(), os))
            .map_err(err)
    }
    match args[0].0.dtype {
        Dt::F16 => run::<P, f16>(p, stream, args),
        Dt::BF16 => run::<P, bf16>(p, stream, args),
        dt => Err(not_half("q", dt)),
    }
}

/// The CUDA tensors q, k, v, out of one dtype, `out` writable and shaped like q, v like k.
fn qkv_tensors(
    (q, k, v, out): (
        &Bound<'_, PyAny>,
        &Bound<'_, PyAny>,
        &Bound<'_, PyAny>,
        &Bound<'_, PyAny>,
    ),
    stream: Option<usize>,
    device: usize,
) -> PyResult<[Cai; 4]> {
    let arr = |name: &str, x: &Bound<'_, PyAny>| cai(name, x, stream, device);
    let (cq, ck, cv, co) = (arr("q", q)?, arr("k", k)?, arr("v", v)?, arr("out", out)?);
    check_half("q", &cq)?;
    for (n, x) in [("k", &ck), ("v", &cv), ("out", &co)] {
        check_same(n, x, ("q", &cq))?;
    }
    if co.readonly {
        return Err(PyValueError::new_err("out is read-only"));
    }
    if co.dims != cq.dims || ck.dims != cv.dims {
        return Err(PyValueError::new_err(
            "out must be shaped like q, and v like k",
        ));
    }
    Ok([cq, ck, cv, co])
}

/// Dense attention (block-sparse with `blocks`) on CUDA tensors `(q, k, v, out)`, fixed
/// lengths or packed with `cu`, on `(stream, device)`.
fn dense_cuda_common(
    tensors: (
        &Bound<'_, PyAny>,
        &Bound<'_, PyAny>,
        &Bound<'_, PyAny>,
        &Bound<'_, PyAny>,
    ),
    cu: Option<(Vec<i32>, Vec<i32>)>,
    blocks: Option<Blocks>,
    opts: AttentionOptions,
    (stream, device): (Option<usize>, usize),
) -> PyResult<()> {
    let [cq, ck, cv, co] = qkv_tensors(tensors, stream, device)?;
    let packed = cu.is_some();
    let (qs, ks, vs, os) = (
        strides4("q", &cq, packed)?,
        strides4("k", &ck, packed)?,
        strides4("v", &cv, packed)?,
        strides4("out", &co, packed)?,
    );
    let shape = match &cu {
        None => {
            let [b, sq, hq, d] = dims_n::<4>("q", &cq.dims)?;
            let [_, sk, hkv, _] = dims_n::<4>("k", &ck.dims)?;
            if ck.dims[0] != b || ck.dims[3] != d {
                return Err(PyValueError::new_err(
                    "q and k: batch and head_dim must match",
                ));
            }
            AttentionShape {
                batch: b,
                heads_q: hq,
                heads_kv: hkv,
                head_dim: d,
                seqlens: SeqLens::Fixed {
                    seqlen_q: sq,
                    seqlen_k: sk,
                },
            }
        }
        Some((a, b)) => {
            let [_, hq, d] = dims_n::<3>("q", &cq.dims)?;
            let [_, hkv, _] = dims_n::<3>("k", &ck.dims)?;
            if ck.dims[2] != d || a.is_empty() {
                return Err(PyValueError::new_err("q and k: head_dim must match"));
            }
            AttentionShape {
                batch: a.len() - 1,
                heads_q: hq,
                heads_kv: hkv,
                head_dim: d,
                seqlens: SeqLens::Varlen {
                    cu_seqlens_q: a,
                    cu_seqlens_k: b,
                },
            }
        }
    };
    let problem = DenseProblem::new(FlashAttention::new(&shape, &opts).map_err(err)?, blocks)?;
    let s = stream_for(device, stream, &cq)?;
    qkv_gpu(&problem, &s, [(&cq, qs), (&ck, ks), (&cv, vs), (&co, os)])
}

/// Dense attention on CUDA tensors, written into `out` (shaped like q), ordered on the
/// tensors' stream (from `__cuda_array_interface__`) or `stream` (a `cudaStream_t` as int).
#[pyfunction]
#[pyo3(signature = (q, k, v, out, *, scale=None, causal=false, window=None, softcap=None, sinks=0, stream=None, device=0))]
#[allow(clippy::too_many_arguments)]
fn dense_cuda(
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    scale: Option<f32>,
    causal: bool,
    window: Option<(i64, i64)>,
    softcap: Option<f32>,
    sinks: usize,
    stream: Option<usize>,
    device: usize,
) -> PyResult<()> {
    let opts = make_options(scale, causal, window, softcap, sinks)?;
    dense_cuda_common((q, k, v, out), None, None, opts, (stream, device))
}

/// Varlen dense attention on packed CUDA tensors; `cu_seqlens_q/k` are host int sequences
/// (copied to the device on the stream).
#[pyfunction]
#[pyo3(signature = (q, k, v, out, cu_seqlens_q, cu_seqlens_k, *, scale=None, causal=false, window=None, softcap=None, sinks=0, stream=None, device=0))]
#[allow(clippy::too_many_arguments)]
fn dense_varlen_cuda(
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    cu_seqlens_q: Vec<i32>,
    cu_seqlens_k: Vec<i32>,
    scale: Option<f32>,
    causal: bool,
    window: Option<(i64, i64)>,
    softcap: Option<f32>,
    sinks: usize,
    stream: Option<usize>,
    device: usize,
) -> PyResult<()> {
    let opts = make_options(scale, causal, window, softcap, sinks)?;
    let cu = Some((cu_seqlens_q, cu_seqlens_k));
    dense_cuda_common((q, k, v, out), cu, None, opts, (stream, device))
}

/// Block-sparse attention on CUDA tensors `(b, s, h, d)` (see `block_sparse`), written into
/// `out` (shaped like q); `offsets`, `indices`, `full` are host sequences (copied to the
/// device on the stream); block sizes multiples of 64, head_dim 64, 128 or 256.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, offsets, indices, *, full=None, block_m=128, block_n=128, mask_batch=1, mask_heads=1, scale=None, causal=false, window=None, softcap=None, sinks=0, stream=None, device=0))]
#[allow(clippy::too_many_arguments)]
fn block_sparse_cuda(
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    offsets: Vec<i32>,
    indices: Vec<i32>,
    full: Option<Vec<bool>>,
    block_m: usize,
    block_n: usize,
    mask_batch: usize,
    mask_heads: usize,
    scale: Option<f32>,
    causal: bool,
    window: Option<(i64, i64)>,
    softcap: Option<f32>,
    sinks: usize,
    stream: Option<usize>,
    device: usize,
) -> PyResult<()> {
    let opts = make_options(scale, causal, window, softcap, sinks)?;
    let blocks = Blocks {
        offsets,
        indices,
        full,
        block_m,
        block_n,
        mask_batch,
        mask_heads,
    };
    dense_cuda_common((q, k, v, out), None, Some(blocks), opts, (stream, device))
}

/// `(batch, token, head)` element strides of a `(batch, *grid, heads, head_dim)` tensor whose
/// grid dims flatten into one token axis (row-major, as in a contiguous tensor or a slice of
/// its heads) and whose last dim is contiguous.
fn grid_strides(name: &str, c: &Cai) -> PyResult<Strides> {
    let (dims, st, r) = (&c.dims, &c.strides, c.dims.len());
    let bad = || {
        PyValueError::new_err(format!(
            "{name}: (batch, *grid, heads, head_dim) with a contiguous last dim and grid dims \
             that flatten into one token axis expected, shape {dims:?} strides {st:?}"
        ))
    };
    if r < 4 || (st[r - 1] != 1 && dims[r - 1] > 1) {
        return Err(bad());
    }
    // The token stride is that of the innermost grid dim longer than 1; every outer one must
    // step over the tokens inside it.
    let (mut token, mut inner) = (None, 1i64);
    for a in (1..r - 2).rev() {
        if dims[a] > 1 {
            let t = *token.get_or_insert(st[a]);
            if t.checked_mul(inner) != Some(st[a]) {
                return Err(bad());
            }
        }
        inner = inner.saturating_mul(i64::try_from(dims[a]).unwrap_or(i64::MAX));
    }
    Ok(Strides {
        batch: st[0],
        seq: token.unwrap_or(st[r - 3]),
        head: st[r - 2],
    })
}

/// Neighborhood attention on CUDA tensors `(batch, *grid, heads, head_dim)` (see
/// `neighborhood`), written into `out` (shaped like q); the kernel is the one
/// `NeighborhoodAttention::forward_gpu` picks (head_dim a multiple of 8 up to 256).
#[pyfunction]
#[pyo3(signature = (q, k, v, out, kernel_size, *, dilation=vec![1], causal=vec![false], stride=vec![1], scale=None, softcap=None, stream=None, device=0))]
#[allow(clippy::too_many_arguments)]
fn neighborhood_cuda(
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    kernel_size: Vec<usize>,
    dilation: Vec<usize>,
    causal: Vec<bool>,
    stride: Vec<usize>,
    scale: Option<f32>,
    softcap: Option<f32>,
    stream: Option<usize>,
    device: usize,
) -> PyResult<()> {
    let opts = make_options(scale, false, None, softcap, 0)?;
    let spec = NeighborhoodSpec {
        kernel_size,
        dilation,
        causal,
        stride,
    };
    let [cq, ck, cv, co] = qkv_tensors((q, k, v, out), stream, device)?;
    let attn = neighborhood_problem((&cq.dims, &ck.dims, &cv.dims), spec, &opts)?;
    let (qs, ks, vs, os) = (
        grid_strides("q", &cq)?,
        grid_strides("k", &ck)?,
        grid_strides("v", &cv)?,
        grid_strides("out", &co)?,
    );
    let s = stream_for(device, stream, &cq)?;
    qkv_gpu(&attn, &s, [(&cq, qs), (&ck, ks), (&cv, vs), (&co, os)])
}

/// Paged decode on CUDA tensors (`q`, contiguous `k_cache`/`v_cache`, `out` like q);
/// `block_table` (a host `(batch, max_pages)` nested int sequence) and `seqlens_k` (host ints)
/// are the tables. The cache holds q's dtype, or FP8 e4m3 codes (`uint8`) with `k_scales`,
/// `v_scales` as `paged_decode` takes them (default 1). Head policies as `paged_decode`;
/// `kmin`/`kmax` contiguous CUDA tensors of the cache's dtype (e4m3 codes for an FP8 cache).
#[pyfunction]
#[pyo3(signature = (q, k_cache, v_cache, out, block_table, seqlens_k, *, scale=None, window_left=-1, softcap=None, sinks=0, k_scales=None, v_scales=None, policy=None, quest_budget=None, quest_sink_pages=0, streaming_sinks=4, streaming_window=1024, kmin=None, kmax=None, stream=None, device=0))]
#[allow(clippy::too_many_arguments)]
fn paged_decode_cuda(
    q: &Bound<'_, PyAny>,
    k_cache: &Bound<'_, PyAny>,
    v_cache: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    block_table: Vec<Vec<i32>>,
    seqlens_k: Vec<i32>,
    scale: Option<f32>,
    window_left: i64,
    softcap: Option<f32>,
    sinks: usize,
    k_scales: Option<Vec<f32>>,
    v_scales: Option<Vec<f32>>,
    policy: Option<&Bound<'_, PyAny>>,
    quest_budget: Option<usize>,
    quest_sink_pages: usize,
    streaming_sinks: usize,
    streaming_window: usize,
    kmin: Option<&Bound<'_, PyAny>>,
    kmax: Option<&Bound<'_, PyAny>>,
    stream: Option<usize>,
    device: usize,
) -> PyResult<()> {
    let opts = make_options(scale, true, Some((window_left, 0)), softcap, sinks)?;
    let policy = PolicyArgs::new(
        policy,
        (quest_budget, quest_sink_pages),
        (streaming_sinks, streaming_window),
    )?;
    let tensors = (q, k_cache, v_cache, out);
    paged_cuda(
        PagedKind::Decode { policy },
        tensors,
        crate::meta_pair(kmin, kmax)?,
        (block_table, seqlens_k),
        kv_scales(k_scales, v_scales)?,
        &opts,
        (stream, device),
    )
}

/// Paged prefill on CUDA tensors (chunked prefill, prefix caching; see `paged_prefill`):
/// `q`, `out` `(b, q_len, hq, d)` or packed `(total_q, hq, d)` with `cu_seqlens_q` (host ints,
/// `b + 1` from 0), contiguous `k_cache`/`v_cache` of q's dtype or FP8 e4m3 codes (`uint8`,
/// with `k_scales`/`v_scales` as `paged_decode_cuda`), host tables as `paged_decode_cuda`.
/// Not causal by default.
#[pyfunction]
#[pyo3(signature = (q, k_cache, v_cache, out, block_table, seqlens_k, *, cu_seqlens_q=None, scale=None, causal=false, window=None, softcap=None, sinks=0, k_scales=None, v_scales=None, stream=None, device=0))]
#[allow(clippy::too_many_arguments)]
fn paged_prefill_cuda(
    q: &Bound<'_, PyAny>,
    k_cache: &Bound<'_, PyAny>,
    v_cache: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    block_table: Vec<Vec<i32>>,
    seqlens_k: Vec<i32>,
    cu_seqlens_q: Option<Vec<i32>>,
    scale: Option<f32>,
    causal: bool,
    window: Option<(i64, i64)>,
    softcap: Option<f32>,
    sinks: usize,
    k_scales: Option<Vec<f32>>,
    v_scales: Option<Vec<f32>>,
    stream: Option<usize>,
    device: usize,
) -> PyResult<()> {
    let opts = make_options(scale, causal, window, softcap, sinks)?;
    let tensors = (q, k_cache, v_cache, out);
    let kind = PagedKind::Prefill { cu_seqlens_q };
    paged_cuda(
        kind,
        tensors,
        None,
        (block_table, seqlens_k),
        kv_scales(k_scales, v_scales)?,
        &opts,
        (stream, device),
    )
}

/// Whether a tensor is C-contiguous (dims of 1 may have any stride).
fn contiguous(c: &Cai) -> bool {
    let mut st = 1i64;
    c.dims.iter().zip(&c.strides).rev().all(|(&d, &s)| {
        let ok = d <= 1 || s == st;
        st = st.saturating_mul(i64::try_from(d).unwrap_or(i64::MAX));
        ok
    })
}

/// A host `(batch, max_pages)` block table as the flat table and its dims.
fn flat_table(block_table: Vec<Vec<i32>>) -> PyResult<(Vec<i32>, Vec<usize>)> {
    let rows = block_table.len();
    let max_pages = block_table.first().map_or(0, |r| r.len());
    if block_table.iter().any(|r| r.len() != max_pages) {
        return Err(PyValueError::new_err(
            "block_table rows must have one length",
        ));
    }
    Ok((
        block_table.into_iter().flatten().collect(),
        vec![rows, max_pages],
    ))
}

/// The caches `k`, `v` (`k_cache`, `v_cache`) of a call whose halves are `x` (named `name`):
/// both of `x`'s dtype, or both FP8 e4m3 codes (`uint8`: the only caches that `scales`, when
/// given, describe); contiguous, alike and, when `writable`, not read-only. Checked before
/// any CUDA call.
fn check_cache(
    (name, x): (&str, &Cai),
    [k, v]: [&Cai; 2],
    scales: bool,
    writable: bool,
) -> PyResult<()> {
    if k.dtype != Dt::U8 {
        check_half("k_cache", k)?;
        check_same("k_cache", k, (name, x))?;
        if scales {
            return Err(PyValueError::new_err(
                "k_scales and v_scales describe an FP8 cache (uint8 e4m3 codes), but k_cache \
                 holds halves",
            ));
        }
    }
    check_same("v_cache", v, ("k_cache", k))?;
    if [k, v]
        .iter()
        .any(|c| !contiguous(c) || (writable && c.readonly))
        || k.dims != v.dims
    {
        return Err(PyValueError::new_err(format!(
            "k_cache and v_cache must be contiguous{} and alike",
            if writable { ", writable" } else { "" }
        )));
    }
    Ok(())
}

/// `$run::<T, C>($args)` with `T` the half type of `$x` (a [`Cai`] named `$name`) and `C` the
/// element type of the cache `$cache`: `T`, or [`F8E4M3`] for `uint8` codes.
macro_rules! paged_dispatch {
    ($run:ident, $name:expr, $x:expr, $cache:expr, ($($arg:expr),* $(,)?)) => {
        match ($x.dtype, $cache.dtype == Dt::U8) {
            (Dt::F16, false) => $run::<f16, f16>($($arg),*),
            (Dt::F16, true) => $run::<f16, F8E4M3>($($arg),*),
            (Dt::BF16, false) => $run::<bf16, bf16>($($arg),*),
            (Dt::BF16, true) => $run::<bf16, F8E4M3>($($arg),*),
            (dt, _) => Err(not_half($name, dt)),
        }
    };
}

/// The CUDA tensors `kmin`, `kmax` (both or neither): contiguous, of the cache's dtype (e4m3
/// codes for an FP8 cache) and, when `writable`, not read-only.
fn meta_tensors(
    meta: Option<(&Bound<'_, PyAny>, &Bound<'_, PyAny>)>,
    cache: &Cai,
    writable: bool,
    (stream, device): (Option<usize>, usize),
) -> PyResult<Option<(Cai, Cai)>> {
    let Some((lo, hi)) = meta else {
        return Ok(None);
    };
    let (lo, hi) = (
        cache_cai("kmin", lo, stream, device)?,
        cache_cai("kmax", hi, stream, device)?,
    );
    for (n, x) in [("kmin", &lo), ("kmax", &hi)] {
        check_same(n, x, ("k_cache", cache))?;
        if !contiguous(x) || (writable && x.readonly) {
            return Err(PyValueError::new_err(format!(
                "{n} must be contiguous{}",
                if writable { " and writable" } else { "" }
            )));
        }
    }
    check_meta_dims(&cache.dims, &lo.dims, &hi.dims)?;
    Ok(Some((lo, hi)))
}

/// The paged problem of `kind` on CUDA tensors `(q, k_cache, v_cache, out)` (and the Quest
/// bounds `meta` of a decode) with host tables `(block_table, seqlens_k)` and the `scales` of
/// an FP8 cache, on `(stream, device)`.
fn paged_cuda(
    kind: PagedKind,
    (q, k_cache, v_cache, out): (
        &Bound<'_, PyAny>,
        &Bound<'_, PyAny>,
        &Bound<'_, PyAny>,
        &Bound<'_, PyAny>,
    ),
    meta: Option<(&Bound<'_, PyAny>, &Bound<'_, PyAny>)>,
    (block_table, seqlens_k): (Vec<Vec<i32>>, Vec<i32>),
    scales: Option<KvScales>,
    opts: &AttentionOptions,
    (stream, device): (Option<usize>, usize),
) -> PyResult<()> {
    let arr = |name: &str, x: &Bound<'_, PyAny>| cai(name, x, stream, device);
    let (cq, co) = (arr("q", q)?, arr("out", out)?);
    let (ck, cv) = (
        cache_cai("k_cache", k_cache, stream, device)?,
        cache_cai("v_cache", v_cache, stream, device)?,
    );
    check_half("q", &cq)?;
    check_same("out", &co, ("q", &cq))?;
    if co.readonly || co.dims != cq.dims {
        return Err(PyValueError::new_err(
            "out must be writable and shaped like q",
        ));
    }
    check_cache(("q", &cq), [&ck, &cv], scales.is_some(), false)?;
    let packed = matches!(
        kind,
        PagedKind::Prefill {
            cu_seqlens_q: Some(_)
        }
    );
    let paged = paged_problem(
        kind,
        &cq.dims,
        &ck.dims,
        flat_table(block_table)?,
        seqlens_k,
        opts,
        scales,
    )?;
    let meta = meta_tensors(meta, &ck, false, (stream, device))?;
    let (qs, os) = (strides4("q", &cq, packed)?, strides4("out", &co, packed)?);
    let s = stream_for(device, stream, &cq)?;
    let args = (&*s, (&cq, qs), (&ck, &cv), meta.as_ref(), (&co, os));
    paged_dispatch!(paged_gpu, "q", cq, ck, (&paged, args))
}

/// The stream, q with its strides, the cache, the Quest bounds and out with its strides of a
/// paged call.
type PagedGpuArgs<'a> = (
    &'a Arc<CudaStream>,
    (&'a Cai, Strides),
    (&'a Cai, &'a Cai),
    Option<&'a (Cai, Cai)>,
    (&'a Cai, Strides),
);

/// A paged problem in `T` over a cache (and Quest bounds) of `C`.
fn paged_gpu<T: Element + DeviceRepr, C: Element + DeviceRepr>(
    paged: &Paged,
    (stream, (q, qs), (k, v), meta, (o, os)): PagedGpuArgs,
) -> PyResult<()> {
    let (rq, rk, rv) = (
        raw::<T>("q", q, stream)?,
        raw::<C>("k_cache", k, stream)?,
        raw::<C>("v_cache", v, stream)?,
    );
    let rmeta = meta
        .map(|(lo, hi)| {
            PyResult::Ok((raw::<C>("kmin", lo, stream)?, raw::<C>("kmax", hi, stream)?))
        })
        .transpose()?;
    let mut ro = raw::<T>("out", o, stream)?;
    let (q, out) = (Strided::new(rq.get(), qs), Strided::new(ro.get_mut(), os));
    let kv = KvPages {
        k: rk.get(),
        v: rv.get(),
    };
    let meta = rmeta.as_ref().map(|(lo, hi)| PageMeta {
        kmin: lo.get(),
        kmax: hi.get(),
    });
    match &paged.problem {
        PagedProblem::Decode(p) => p.forward_gpu::<T, C, _, _, _>(stream, q, kv, meta, out, None),
        PagedProblem::Prefill(p) => p.forward_gpu::<T, C, _, _, _>(stream, q, kv, out, None),
    }
    .map_err(err)
}

/// Appends new tokens to a paged cache of CUDA tensors in place (see `paged_append` for the
/// semantics): `k_new, v_new (total_new, hkv, d)` float16 or bfloat16 (last dim contiguous,
/// strides multiples of 8 elements), contiguous writable `k_cache`/`v_cache` of their dtype or
/// of FP8 e4m3 codes (`uint8`, quantised with `k_scales`/`v_scales` as `paged_append` does)
/// and optional `kmin`/`kmax` of the cache's dtype; host tables as `paged_decode_cuda`,
/// `cu_seqlens_new` host ints.
#[pyfunction]
#[pyo3(signature = (k_new, v_new, k_cache, v_cache, block_table, seqlens_k, cu_seqlens_new, *, kmin=None, kmax=None, k_scales=None, v_scales=None, stream=None, device=0))]
#[allow(clippy::too_many_arguments)]
fn paged_append_cuda(
    k_new: &Bound<'_, PyAny>,
    v_new: &Bound<'_, PyAny>,
    k_cache: &Bound<'_, PyAny>,
    v_cache: &Bound<'_, PyAny>,
    block_table: Vec<Vec<i32>>,
    seqlens_k: Vec<i32>,
    cu_seqlens_new: Vec<i32>,
    kmin: Option<&Bound<'_, PyAny>>,
    kmax: Option<&Bound<'_, PyAny>>,
    k_scales: Option<Vec<f32>>,
    v_scales: Option<Vec<f32>>,
    stream: Option<usize>,
    device: usize,
) -> PyResult<()> {
    let arr = |name: &str, x: &Bound<'_, PyAny>| cai(name, x, stream, device);
    let (ck, cv) = (
        cache_cai("k_cache", k_cache, stream, device)?,
        cache_cai("v_cache", v_cache, stream, device)?,
    );
    let (kn, vn) = (arr("k_new", k_new)?, arr("v_new", v_new)?);
    check_half("k_new", &kn)?;
    check_same("v_new", &vn, ("k_new", &kn))?;
    let scales = kv_scales(k_scales, v_scales)?;
    check_cache(("k_new", &kn), [&ck, &cv], scales.is_some(), true)?;
    let cache = paged_cache(&ck.dims, flat_table(block_table)?, &seqlens_k, scales)?;
    let meta = meta_tensors(crate::meta_pair(kmin, kmax)?, &ck, true, (stream, device))?;
    crate::new_token_strides(&cache, &kn.dims, &vn.dims, &cu_seqlens_new)?;
    let (ks, vs) = (strides4("k_new", &kn, true)?, strides4("v_new", &vn, true)?);
    let s = stream_for(device, stream, &ck)?;
    fn run<T: Element + DeviceRepr, C: Element + DeviceRepr>(
        cache: &longattn::PagedCache,
        s: &Arc<CudaStream>,
        cu: &[i32],
        [(kn, ks), (vn, vs)]: [(&Cai, Strides); 2],
        [k, v]: [&Cai; 2],
        meta: Option<&(Cai, Cai)>,
    ) -> PyResult<()> {
        let (rkn, rvn) = (raw::<T>("k_new", kn, s)?, raw::<T>("v_new", vn, s)?);
        let (mut rk, mut rv) = (raw::<C>("k_cache", k, s)?, raw::<C>("v_cache", v, s)?);
        let mut rmeta = meta
            .map(|(lo, hi)| PyResult::Ok((raw::<C>("kmin", lo, s)?, raw::<C>("kmax", hi, s)?)))
            .transpose()?;
        let kv = KvPages {
            k: rk.get_mut(),
            v: rv.get_mut(),
        };
        let meta = rmeta.as_mut().map(|(lo, hi)| PageMeta {
            kmin: lo.get_mut(),
            kmax: hi.get_mut(),
        });
        let (kn, vn) = (Strided::new(rkn.get(), ks), Strided::new(rvn.get(), vs));
        cache
            .append_gpu::<T, C, _, _>(s, cu, kn, vn, kv, meta)
            .map_err(err)
    }
    let (new, kv, meta) = ([(&kn, ks), (&vn, vs)], [&ck, &cv], meta.as_ref());
    let cu = &cu_seqlens_new[..];
    paged_dispatch!(run, "k_new", kn, ck, (&cache, &s, cu, new, kv, meta))
}

/// Merges two partial results on CUDA tensors into `o_out`, `lse_out` (see `merge`):
/// contiguous `o_* (batch, seqlen, heads, head_dim)` of one dtype (float16, bfloat16 or
/// float32), contiguous float32 `lse_* (batch, heads, seqlen)`; the outputs may be `o_a` and
/// `lse_a` themselves (accumulating in place).
#[pyfunction]
#[pyo3(signature = (o_a, lse_a, o_b, lse_b, o_out, lse_out, *, stream=None, device=0))]
#[allow(clippy::too_many_arguments)]
fn merge_cuda(
    o_a: &Bound<'_, PyAny>,
    lse_a: &Bound<'_, PyAny>,
    o_b: &Bound<'_, PyAny>,
    lse_b: &Bound<'_, PyAny>,
    o_out: &Bound<'_, PyAny>,
    lse_out: &Bound<'_, PyAny>,
    stream: Option<usize>,
    device: usize,
) -> PyResult<()> {
    let arr = |name: &str, x: &Bound<'_, PyAny>| cai(name, x, stream, device);
    let (oa, ob, oo) = (arr("o_a", o_a)?, arr("o_b", o_b)?, arr("o_out", o_out)?);
    let (la, lb, lo) = (
        arr("lse_a", lse_a)?,
        arr("lse_b", lse_b)?,
        arr("lse_out", lse_out)?,
    );
    check_same("o_b", &ob, ("o_a", &oa))?;
    check_same("o_out", &oo, ("o_a", &oa))?;
    for (n, x) in [("lse_a", &la), ("lse_b", &lb), ("lse_out", &lo)] {
        if x.dtype != Dt::F32 {
            return Err(PyTypeError::new_err(format!(
                "{n} has dtype {:?}: LSEs are float32",
                x.dtype
            )));
        }
    }
    let all = [&oa, &ob, &oo, &la, &lb, &lo];
    if all.iter().any(|c| !contiguous(c)) || oo.readonly || lo.readonly {
        return Err(PyValueError::new_err(
            "merge tensors must be contiguous, o_out and lse_out writable",
        ));
    }
    let shape = merge_shape([&oa.dims, &ob.dims], [&la.dims, &lb.dims])?;
    if oo.dims != oa.dims || lo.dims != la.dims {
        return Err(PyValueError::new_err(
            "o_out must be shaped like o_a and lse_out like lse_a",
        ));
    }
    let s = stream_for(device, stream, &oa)?;
    fn run<T: Element + DeviceRepr>(
        shape: &longattn::MergeShape,
        s: &Arc<CudaStream>,
        [oa, la, ob, lb, oo, lo]: [&Cai; 6],
    ) -> PyResult<()> {
        let (roa, rob, mut roo) = (
            raw::<T>("o_a", oa, s)?,
            raw::<T>("o_b", ob, s)?,
            raw::<T>("o_out", oo, s)?,
        );
        let (rla, rlb, mut rlo) = (
            raw::<f32>("lse_a", la, s)?,
            raw::<f32>("lse_b", lb, s)?,
            raw::<f32>("lse_out", lo, s)?,
        );
        let a = Partial {
            o: roa.get(),
            lse: rla.get(),
        };
        let b = Partial {
            o: rob.get(),
            lse: rlb.get(),
        };
        let out = Partial {
            o: roo.get_mut(),
            lse: rlo.get_mut(),
        };
        shape.merge_gpu(s, a, b, out).map_err(err)
    }
    let args = [&oa, &la, &ob, &lb, &oo, &lo];
    match oa.dtype {
        Dt::F16 => run::<f16>(&shape, &s, args),
        Dt::BF16 => run::<bf16>(&shape, &s, args),
        Dt::F32 => run::<f32>(&shape, &s, args),
        Dt::U8 => Err(not_half("o_a", Dt::U8)),
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(dense_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(dense_varlen_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(paged_decode_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(paged_prefill_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(paged_append_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(merge_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(block_sparse_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(neighborhood_cuda, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::same_stream;

    /// The interface's 1 and the driver's NULL are both the legacy default stream; 2 (per
    /// thread) and real handles compare as they are.
    #[test]
    fn interface_stream_numbers_match_driver_handles() {
        assert!(same_stream(1, 0) && same_stream(1, 1));
        assert!(same_stream(2, 2) && !same_stream(2, 0) && !same_stream(1, 2));
        assert!(same_stream(0x7f00, 0x7f00) && !same_stream(0x7f00, 0));
    }
}
