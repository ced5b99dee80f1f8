//! CUDA entry points on any object exposing `__cuda_array_interface__` (torch CUDA tensors,
//! CuPy arrays): the kernels read and write the caller's memory in place, ordered on the
//! interface's stream (or an explicit `stream` handle). Compiled, not exercised without a GPU.
//!
//! What this relies on: the interface's `data` pointer and `strides` describe live device
//! memory of the declared extent on device `device` (the caller keeps the tensors alive until
//! the call returns; the launch is asynchronous and ordered on the stream, as for any CUDA
//! library call); the stream handle belongs to that device's primary context (the one torch
//! and CuPy use, which `CudaContext::new` retains). Nothing here allocates or frees the
//! caller's memory: `RawDevice` borrows it for one call.

use crate::{decode_problem, dims_n, err, make_options};
use longattn::cudarc::driver::{CudaContext, CudaSlice, CudaStream, sys};
use longattn::{
    AttentionOptions, AttentionShape, Element, FlashAttention, KvPages, SeqLens, Strided, Strides,
    f16,
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

/// A parsed `__cuda_array_interface__` (v2/v3).
struct Cai {
    ptr: u64,
    readonly: bool,
    dims: Vec<usize>,
    /// Element strides (C-contiguous when the interface gives none).
    strides: Vec<i64>,
    typestr: String,
    stream: Option<usize>,
}

impl Cai {
    /// Elements from the pointer to one past the last element.
    fn extent(&self) -> usize {
        if self.dims.contains(&0) {
            return 0;
        }
        1 + self
            .dims
            .iter()
            .zip(&self.strides)
            .map(|(&d, &s)| (d - 1) * s as usize)
            .sum::<usize>()
    }
}

fn item<'py>(d: &Bound<'py, PyDict>, name: &str, k: &str) -> PyResult<Bound<'py, PyAny>> {
    d.get_item(k)?
        .ok_or_else(|| PyValueError::new_err(format!("{name}: interface lacks '{k}'")))
}

fn cai(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<Cai> {
    let iface = obj.getattr("__cuda_array_interface__").map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} has no __cuda_array_interface__ (a CUDA tensor?)"
        ))
    })?;
    let d = iface.cast::<PyDict>()?;
    let get = |k: &str| item(d, name, k);
    let (ptr, readonly): (u64, bool) = get("data")?.extract()?;
    let dims: Vec<usize> = get("shape")?.extract()?;
    let typestr: String = get("typestr")?.extract()?;
    let item = match typestr.as_str() {
        "<f2" => 2,
        "<f4" => 4,
        t => {
            return Err(PyTypeError::new_err(format!(
                "{name}: dtype '{t}' unsupported (float16 on the GPU)"
            )));
        }
    };
    let strides = match d.get_item("strides")? {
        Some(s) if !s.is_none() => {
            let bytes: Vec<i64> = s.extract()?;
            if bytes.iter().any(|&b| b < 0 || b % item != 0) {
                return Err(PyValueError::new_err(format!(
                    "{name}: strides {bytes:?} must be non-negative multiples of {item} bytes"
                )));
            }
            bytes.iter().map(|b| b / item).collect()
        }
        _ => {
            let mut st = vec![1i64; dims.len()];
            for i in (0..dims.len().saturating_sub(1)).rev() {
                st[i] = st[i + 1] * dims[i + 1] as i64;
            }
            st
        }
    };
    let stream = match d.get_item("stream")? {
        Some(s) if !s.is_none() => Some(s.extract()?),
        _ => None,
    };
    Ok(Cai {
        ptr,
        readonly,
        dims,
        strides,
        typestr,
        stream,
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
fn stream_for(device: usize, stream: Option<usize>, q: &Cai) -> PyResult<Arc<CudaStream>> {
    let ctx = CudaContext::new(device).map_err(|e| PyValueError::new_err(format!("{e:?}")))?;
    let handle = stream.or(q.stream).unwrap_or(0);
    // SAFETY: the handle is the caller's stream on `device` (see the module docs); the
    // wrapper never destroys it.
    Ok(unsafe { ctx.wrap_borrowed_stream(handle as sys::CUstream) })
}

fn raw<T>(c: &Cai, stream: &Arc<CudaStream>) -> RawDevice<T> {
    // SAFETY: the interface describes live device memory of this extent on the stream's
    // device (see the module docs); `RawDevice` never frees it.
    RawDevice(Some(unsafe {
        stream.upgrade_device_ptr::<T>(c.ptr as sys::CUdeviceptr, c.extent())
    }))
}

fn check_same(name: &str, q: &Cai, x: &Cai) -> PyResult<()> {
    if x.typestr != q.typestr {
        return Err(PyTypeError::new_err(format!(
            "{name} has dtype {} but q has {}",
            x.typestr, q.typestr
        )));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn dense_gpu<T: Element + longattn::cudarc::driver::DeviceRepr>(
    attn: &FlashAttention,
    stream: &Arc<CudaStream>,
    (q, qs): (&Cai, Strides),
    (k, ks): (&Cai, Strides),
    (v, vs): (&Cai, Strides),
    (o, os): (&Cai, Strides),
) -> PyResult<()> {
    let (rq, rk, rv) = (
        raw::<T>(q, stream),
        raw::<T>(k, stream),
        raw::<T>(v, stream),
    );
    let mut ro = raw::<T>(o, stream);
    attn.forward_gpu::<T, _, _>(
        stream,
        Strided::new(rq.get(), qs),
        Strided::new(rk.get(), ks),
        Strided::new(rv.get(), vs),
        Strided::new(ro.get_mut(), os),
        None,
    )
    .map_err(err)
}

#[allow(clippy::too_many_arguments)]
fn dense_cuda_common(
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    cu: Option<(Vec<i32>, Vec<i32>)>,
    opts: AttentionOptions,
    stream: Option<usize>,
    device: usize,
) -> PyResult<()> {
    let (cq, ck, cv, co) = (cai("q", q)?, cai("k", k)?, cai("v", v)?, cai("out", out)?);
    for (n, x) in [("k", &ck), ("v", &cv), ("out", &co)] {
        check_same(n, &cq, x)?;
    }
    if co.readonly {
        return Err(PyValueError::new_err("out is read-only"));
    }
    if co.dims != cq.dims || ck.dims != cv.dims {
        return Err(PyValueError::new_err(
            "out must be shaped like q, and v like k",
        ));
    }
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
    let attn = FlashAttention::new(&shape, &opts).map_err(err)?;
    let s = stream_for(device, stream, &cq)?;
    match cq.typestr.as_str() {
        "<f2" => dense_gpu::<f16>(&attn, &s, (&cq, qs), (&ck, ks), (&cv, vs), (&co, os)),
        t => Err(PyTypeError::new_err(format!(
            "dtype '{t}': the GPU kernels take float16 here (float32 runs on the CPU path)"
        ))),
    }
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
    dense_cuda_common(q, k, v, out, None, opts, stream, device)
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
    dense_cuda_common(q, k, v, out, cu, opts, stream, device)
}

/// Paged decode on CUDA tensors (`q`, contiguous `k_cache`/`v_cache`, `out` like q);
/// `block_table` (a host `(batch, max_pages)` nested int sequence) and `seqlens_k` (host ints)
/// are the tables.
#[pyfunction]
#[pyo3(signature = (q, k_cache, v_cache, out, block_table, seqlens_k, *, scale=None, window_left=-1, softcap=None, sinks=0, stream=None, device=0))]
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
    stream: Option<usize>,
    device: usize,
) -> PyResult<()> {
    let opts = make_options(scale, true, Some((window_left, 0)), softcap, sinks)?;
    let (cq, ck, cv, co) = (
        cai("q", q)?,
        cai("k_cache", k_cache)?,
        cai("v_cache", v_cache)?,
        cai("out", out)?,
    );
    for (n, x) in [("k_cache", &ck), ("v_cache", &cv), ("out", &co)] {
        check_same(n, &cq, x)?;
    }
    let contiguous = |c: &Cai| {
        let mut st = 1i64;
        c.dims.iter().zip(&c.strides).rev().all(|(&d, &s)| {
            let ok = d <= 1 || s == st;
            st *= d as i64;
            ok
        })
    };
    if co.readonly
        || co.dims != cq.dims
        || ck.dims != cv.dims
        || !contiguous(&ck)
        || !contiguous(&cv)
    {
        return Err(PyValueError::new_err(
            "out must be writable and shaped like q; k_cache and v_cache contiguous and alike",
        ));
    }
    let rows = block_table.len();
    let max_pages = block_table.first().map_or(0, |r| r.len());
    if block_table.iter().any(|r| r.len() != max_pages) {
        return Err(PyValueError::new_err(
            "block_table rows must have one length",
        ));
    }
    let flat: Vec<i32> = block_table.into_iter().flatten().collect();
    let decode = decode_problem(
        &cq.dims,
        &ck.dims,
        (flat, vec![rows, max_pages]),
        seqlens_k,
        &opts,
        None,
    )?;
    let (qs, os) = (strides4("q", &cq, false)?, strides4("out", &co, false)?);
    let s = stream_for(device, stream, &cq)?;
    match cq.typestr.as_str() {
        "<f2" => {
            let (rq, rk, rv) = (
                raw::<f16>(&cq, &s),
                raw::<f16>(&ck, &s),
                raw::<f16>(&cv, &s),
            );
            let mut ro = raw::<f16>(&co, &s);
            decode
                .forward_gpu::<f16, f16, _, _, _>(
                    &s,
                    Strided::new(rq.get(), qs),
                    KvPages {
                        k: rk.get(),
                        v: rv.get(),
                    },
                    None,
                    Strided::new(ro.get_mut(), os),
                    None,
                )
                .map_err(err)
        }
        t => Err(PyTypeError::new_err(format!(
            "dtype '{t}': the GPU kernels take float16 here"
        ))),
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(dense_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(dense_varlen_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(paged_decode_cuda, m)?)?;
    Ok(())
}
