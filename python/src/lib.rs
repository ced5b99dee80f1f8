//! `longattn._longattn`: numpy entry points through the CPU path, and CUDA entry points over
//! raw device pointers taken from `__cuda_array_interface__` (see `cuda.rs`).
//!
//! Layouts are FlashAttention's: `q: (batch, seqlen_q, heads_q, head_dim)`, `k, v: (batch,
//! seqlen_k, heads_kv, head_dim)`; varlen packs `(total, heads, head_dim)`; paged caches are
//! `(num_pages, page_size, heads_kv, head_dim)`; neighborhood grids `(batch, *grid, heads,
//! head_dim)`; block-sparse masks CSR arrays over `(mask_batch, mask_heads, num_q_blocks)`
//! lists. Windows are FA2 `(left, right)` integers with `-1` unbounded; `causal` composes as in
//! FA2 (right = min(right, 0), left kept).

mod cuda;

use longattn::{
    AttentionOptions, AttentionShape, BlockMask, BlockMaskDims, BlockMaskError,
    BlockSparseAttention, Element, F8E4M3, FlashAttention, KvPages, KvScales,
    NeighborhoodAttention, NeighborhoodDim, NeighborhoodShape, PageTable, PagedCache, PagedDecode,
    PagedLayout, PagedPrefill, SeqLens, Strided, Strides, Window, f16,
};
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyAny;

pub(crate) fn err(e: longattn::Error) -> PyErr {
    PyValueError::new_err(format!("longattn: {e}"))
}

/// FA2 window integers plus `causal` into options (semantics.md composition).
pub(crate) fn make_options(
    scale: Option<f32>,
    causal: bool,
    window: Option<(i64, i64)>,
    softcap: Option<f32>,
    sinks: usize,
) -> PyResult<AttentionOptions> {
    let (left, right) = window.unwrap_or((-1, -1));
    let mut w = Window::from_flash(left, right).map_err(err)?;
    if causal {
        // FA2: right = min(right, 0), and right >= 0 (or unbounded) here.
        w.right = Some(0);
    }
    let mut o = AttentionOptions::default().with_window(w).with_sinks(sinks);
    o.scale = scale;
    o.softcap = softcap.filter(|&c| c != 0.0);
    Ok(o)
}

/// A numpy array as a contiguous host buffer of `T` and its dims.
struct Host<T> {
    data: Vec<T>,
    dims: Vec<usize>,
}

fn host<T: numpy::Element + Copy>(name: &str, a: &Bound<'_, PyAny>) -> PyResult<Host<T>> {
    let arr: PyReadonlyArrayDyn<T> = a.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a numpy array of the same dtype as q (float32 or float16)"
        ))
    })?;
    let dims = arr.shape().to_vec();
    let view = arr.as_array();
    let data = match view.as_slice() {
        Some(s) => s.to_vec(),
        None => view.iter().copied().collect(),
    };
    Ok(Host { data, dims })
}

fn ints(name: &str, a: &Bound<'_, PyAny>) -> PyResult<(Vec<i32>, Vec<usize>)> {
    let arr: PyReadonlyArrayDyn<i32> = a
        .extract()
        .map_err(|_| PyTypeError::new_err(format!("{name} must be a numpy int32 array")))?;
    let dims = arr.shape().to_vec();
    Ok((arr.as_array().iter().copied().collect(), dims))
}

fn dims_n<const N: usize>(name: &str, d: &[usize]) -> PyResult<[usize; N]> {
    d.try_into()
        .map_err(|_| PyValueError::new_err(format!("{name} must have {N} dims, got shape {d:?}")))
}

fn to_py<'py, T: numpy::Element>(
    py: Python<'py>,
    data: Vec<T>,
    dims: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    let a = ArrayD::from_shape_vec(IxDyn(dims), data)
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(a.into_pyarray(py).into_any())
}

fn is_f16(q: &Bound<'_, PyAny>) -> bool {
    q.extract::<PyReadonlyArrayDyn<f16>>().is_ok()
}

/// A block mask's CSR arrays and block sizes, bound to a dense problem by [`Blocks::bind`]:
/// list `l` (row-major over `(mask_batch, mask_heads, num_q_blocks)`) is
/// `indices[offsets[l]..offsets[l + 1]]`, strictly increasing key blocks, `full[e]` marking
/// entry `e` Full (every key visible) rather than Partial (the options' element mask applies).
pub(crate) struct Blocks {
    pub(crate) offsets: Vec<i32>,
    pub(crate) indices: Vec<i32>,
    /// `None`: every entry Partial.
    pub(crate) full: Option<Vec<bool>>,
    pub(crate) block_m: usize,
    pub(crate) block_n: usize,
    pub(crate) mask_batch: usize,
    pub(crate) mask_heads: usize,
}

fn mask_err(e: BlockMaskError) -> PyErr {
    err(e.into())
}

impl Blocks {
    /// The block-sparse problem of `attn` restricted to these lists (validated by
    /// [`BlockMask::from_csr`] and [`BlockSparseAttention::new`]).
    fn bind(self, attn: FlashAttention) -> PyResult<BlockSparseAttention> {
        let dims = BlockMaskDims::for_lengths(
            self.mask_batch,
            self.mask_heads,
            attn.max_seqlen_q(),
            attn.max_seqlen_k(),
            self.block_m,
            self.block_n,
        )
        .map_err(mask_err)?;
        let full = self.full.unwrap_or_else(|| vec![false; self.indices.len()]);
        let mask = BlockMask::from_csr(dims, self.offsets, self.indices, full).map_err(mask_err)?;
        BlockSparseAttention::new(attn, mask).map_err(mask_err)
    }
}

/// A dense problem, or the block-sparse problem of one and a block mask: the same buffers.
pub(crate) enum DenseProblem {
    Dense(FlashAttention),
    BlockSparse(BlockSparseAttention),
}

impl DenseProblem {
    pub(crate) fn new(attn: FlashAttention, blocks: Option<Blocks>) -> PyResult<Self> {
        Ok(match blocks {
            None => DenseProblem::Dense(attn),
            Some(b) => DenseProblem::BlockSparse(b.bind(attn)?),
        })
    }

    /// The dense problem (shape and options).
    pub(crate) fn attn(&self) -> &FlashAttention {
        match self {
            DenseProblem::Dense(a) => a,
            DenseProblem::BlockSparse(bs) => bs.attention(),
        }
    }

    fn forward_cpu<T: Element>(
        &self,
        [q, k, v]: [Strided<&[T]>; 3],
        out: Strided<&mut [T]>,
        lse: Option<&mut [f32]>,
    ) -> longattn::Result<()> {
        match self {
            DenseProblem::Dense(a) => a.forward_cpu(q, k, v, out, lse),
            DenseProblem::BlockSparse(bs) => bs.forward_cpu(q, k, v, out, lse),
        }
    }
}

/// Output (and LSE when asked) of a dense problem (block-sparse with `blocks`) on host
/// buffers.
#[allow(clippy::too_many_arguments)]
fn dense_impl<'py, T: Element + numpy::Element>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    cu: Option<(&Bound<'py, PyAny>, &Bound<'py, PyAny>)>,
    blocks: Option<Blocks>,
    opts: AttentionOptions,
    return_lse: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let (q, k, v) = (host::<T>("q", q)?, host::<T>("k", k)?, host::<T>("v", v)?);
    if k.dims != v.dims {
        return Err(PyValueError::new_err(format!(
            "k {:?} and v {:?} must have the same shape",
            k.dims, v.dims
        )));
    }
    let cu = match cu {
        Some((a, b)) => Some((ints("cu_seqlens_q", a)?.0, ints("cu_seqlens_k", b)?.0)),
        None => None,
    };
    let (shape, qs, ks) = match &cu {
        None => {
            let [b, sq, hq, d] = dims_n::<4>("q", &q.dims)?;
            let [bk, sk, hkv, dk] = dims_n::<4>("k", &k.dims)?;
            if (bk, dk) != (b, d) {
                return Err(PyValueError::new_err(format!(
                    "q {:?} and k {:?}: batch and head_dim must match",
                    q.dims, k.dims
                )));
            }
            let shape = AttentionShape {
                batch: b,
                heads_q: hq,
                heads_kv: hkv,
                head_dim: d,
                seqlens: SeqLens::Fixed {
                    seqlen_q: sq,
                    seqlen_k: sk,
                },
            };
            (
                shape,
                Strides::contiguous(sq, hq, d),
                Strides::contiguous(sk, hkv, d),
            )
        }
        Some((cq, ck)) => {
            let [_, hq, d] = dims_n::<3>("q", &q.dims)?;
            let [_, hkv, dk] = dims_n::<3>("k", &k.dims)?;
            if dk != d || cq.is_empty() {
                return Err(PyValueError::new_err(format!(
                    "q {:?} and k {:?}: head_dim must match, cu_seqlens non-empty",
                    q.dims, k.dims
                )));
            }
            let shape = AttentionShape {
                batch: cq.len() - 1,
                heads_q: hq,
                heads_kv: hkv,
                head_dim: d,
                seqlens: SeqLens::Varlen {
                    cu_seqlens_q: cq,
                    cu_seqlens_k: ck,
                },
            };
            let packed = |h: usize| Strides {
                batch: 0,
                seq: (h * d) as i64,
                head: d as i64,
            };
            (shape, packed(hq), packed(hkv))
        }
    };
    let problem = DenseProblem::new(FlashAttention::new(&shape, &opts).map_err(err)?, blocks)?;
    let attn = problem.attn();
    let mut out = vec![T::default(); attn.out_len()];
    let mut lse = vec![0.0f32; attn.lse_len()];
    py.detach(|| {
        let (q, k, v) = (&q.data[..], &k.data[..], &v.data[..]);
        let qkv = [
            Strided::new(q, qs),
            Strided::new(k, ks),
            Strided::new(v, ks),
        ];
        problem.forward_cpu(qkv, Strided::new(&mut out[..], qs), Some(&mut lse[..]))
    })
    .map_err(err)?;
    let o = to_py(py, out, &q.dims)?;
    if !return_lse {
        return Ok(o);
    }
    let lse_dims = match cu {
        None => vec![attn.batch(), attn.heads_q(), attn.max_seqlen_q()],
        Some(_) => vec![attn.heads_q(), attn.total_q()],
    };
    let l = to_py(py, lse, &lse_dims)?;
    Ok((o, l).into_pyobject(py)?.into_any())
}

/// Dense attention on numpy arrays (CPU): `q (b, sq, hq, d)`, `k, v (b, sk, hkv, d)`,
/// float32 or float16. Returns `out` like q, or `(out, lse)` with natural-log
/// `lse (b, hq, sq)` float32 when `return_lse`.
#[pyfunction]
#[pyo3(signature = (q, k, v, *, scale=None, causal=false, window=None, softcap=None, sinks=0, return_lse=false))]
#[allow(clippy::too_many_arguments)]
fn dense<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    scale: Option<f32>,
    causal: bool,
    window: Option<(i64, i64)>,
    softcap: Option<f32>,
    sinks: usize,
    return_lse: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let opts = make_options(scale, causal, window, softcap, sinks)?;
    if is_f16(q) {
        dense_impl::<f16>(py, q, k, v, None, None, opts, return_lse)
    } else {
        dense_impl::<f32>(py, q, k, v, None, None, opts, return_lse)
    }
}

/// Varlen dense attention on packed numpy arrays (CPU): `q (total_q, hq, d)`, `k, v
/// (total_k, hkv, d)`, `cu_seqlens_q`, `cu_seqlens_k` int32 `(batch + 1,)` from 0. LSE (when
/// asked) is `(hq, total_q)`.
#[pyfunction]
#[pyo3(signature = (q, k, v, cu_seqlens_q, cu_seqlens_k, *, scale=None, causal=false, window=None, softcap=None, sinks=0, return_lse=false))]
#[allow(clippy::too_many_arguments)]
fn dense_varlen<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    cu_seqlens_q: &Bound<'py, PyAny>,
    cu_seqlens_k: &Bound<'py, PyAny>,
    scale: Option<f32>,
    causal: bool,
    window: Option<(i64, i64)>,
    softcap: Option<f32>,
    sinks: usize,
    return_lse: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let opts = make_options(scale, causal, window, softcap, sinks)?;
    let cu = Some((cu_seqlens_q, cu_seqlens_k));
    if is_f16(q) {
        dense_impl::<f16>(py, q, k, v, cu, None, opts, return_lse)
    } else {
        dense_impl::<f32>(py, q, k, v, cu, None, opts, return_lse)
    }
}

/// Block-sparse attention on numpy arrays (CPU; FlexAttention's `BlockMask`, FlashInfer's
/// BSR): `dense` (`q (b, sq, hq, d)`, `k, v (b, sk, hkv, d)`, the same options) over the key
/// blocks a CSR block mask lists for each query block. List `l`, row-major over `(mask_batch,
/// mask_heads, ceil(sq / block_m))` (`mask_batch` 1 or b, `mask_heads` 1 or hq: 1
/// broadcasts), is `indices[offsets[l]:offsets[l + 1]]` (int32 arrays), strictly increasing
/// blocks of `block_n` keys; `full` (a bool array, one per index; `None`: all False) marks a
/// block Full (every key visible) rather than Partial (window, causal and sinks apply). A row
/// with no visible key gives 0 (LSE -inf).
#[pyfunction]
#[pyo3(signature = (q, k, v, offsets, indices, *, full=None, block_m=128, block_n=128, mask_batch=1, mask_heads=1, scale=None, causal=false, window=None, softcap=None, sinks=0, return_lse=false))]
#[allow(clippy::too_many_arguments)]
fn block_sparse<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    offsets: &Bound<'py, PyAny>,
    indices: &Bound<'py, PyAny>,
    full: Option<&Bound<'py, PyAny>>,
    block_m: usize,
    block_n: usize,
    mask_batch: usize,
    mask_heads: usize,
    scale: Option<f32>,
    causal: bool,
    window: Option<(i64, i64)>,
    softcap: Option<f32>,
    sinks: usize,
    return_lse: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let opts = make_options(scale, causal, window, softcap, sinks)?;
    let full = match full {
        Some(f) => {
            let arr: PyReadonlyArrayDyn<bool> = f
                .extract()
                .map_err(|_| PyTypeError::new_err("full must be a numpy bool array"))?;
            Some(arr.as_array().iter().copied().collect())
        }
        None => None,
    };
    let blocks = Some(Blocks {
        offsets: ints("offsets", offsets)?.0,
        indices: ints("indices", indices)?.0,
        full,
        block_m,
        block_n,
        mask_batch,
        mask_heads,
    });
    if is_f16(q) {
        dense_impl::<f16>(py, q, k, v, None, blocks, opts, return_lse)
    } else {
        dense_impl::<f32>(py, q, k, v, None, blocks, opts, return_lse)
    }
}

/// Which paged problem: a decode step (`q (b, q_len, hq, d)`, causal among the new tokens by
/// the options), or a prefill chunk (`q (b, q_len, hq, d)`, or packed `(total_q, hq, d)` with
/// `cu_seqlens_q`).
pub(crate) enum PagedKind {
    Decode,
    Prefill { cu_seqlens_q: Option<Vec<i32>> },
}

/// A validated paged problem with the element strides of q and of its output (q's shape,
/// contiguous).
pub(crate) struct Paged {
    pub(crate) problem: PagedProblem,
    pub(crate) qs: Strides,
}

pub(crate) enum PagedProblem {
    Decode(PagedDecode),
    Prefill(PagedPrefill),
}

impl Paged {
    /// Output elements (those of q).
    pub(crate) fn out_len(&self) -> usize {
        match &self.problem {
            PagedProblem::Decode(p) => p.out_len(),
            PagedProblem::Prefill(p) => p.out_len(),
        }
    }

    fn forward_cpu<T: Element, C: Element>(
        &self,
        q: &[T],
        kv: KvPages<&[C]>,
        out: &mut [T],
    ) -> longattn::Result<()> {
        let (q, out) = (Strided::new(q, self.qs), Strided::new(out, self.qs));
        match &self.problem {
            PagedProblem::Decode(p) => p.forward_cpu(q, kv, None, out, None),
            PagedProblem::Prefill(p) => p.forward_cpu(q, kv, out, None),
        }
    }
}

/// The validated paged problem from host tables: `block_table (b, max_pages)` and
/// `seqlens_k (b,)` over a cache `(num_pages, page_size, hkv, d)`.
pub(crate) fn paged_problem(
    kind: PagedKind,
    q_dims: &[usize],
    cache_dims: &[usize],
    block_table: (Vec<i32>, Vec<usize>),
    seqlens_k: Vec<i32>,
    opts: &AttentionOptions,
    scales: Option<KvScales>,
) -> PyResult<Paged> {
    let packed = matches!(
        kind,
        PagedKind::Prefill {
            cu_seqlens_q: Some(_)
        }
    );
    // `rows`: the batch, or total_q when packed.
    let (rows, q_len, hq, d) = if packed {
        let [total, hq, d] = dims_n::<3>("q", q_dims)?;
        (total, 0, hq, d)
    } else {
        let [b, q_len, hq, d] = dims_n::<4>("q", q_dims)?;
        (b, q_len, hq, d)
    };
    let [num_pages, page_size, hkv, dk] = dims_n::<4>("k_cache", cache_dims)?;
    let [b, max_pages] = dims_n::<2>("block_table", &block_table.1)?;
    if dk != d || seqlens_k.len() != b || (!packed && rows != b) {
        return Err(PyValueError::new_err(format!(
            "q {q_dims:?}, cache {cache_dims:?}, block_table {:?}, seqlens_k ({}): head_dim and \
             batch must agree",
            block_table.1,
            seqlens_k.len()
        )));
    }
    let layout = PagedLayout {
        num_pages,
        page_size,
        heads_kv: hkv,
        head_dim: d,
    };
    let table = PageTable {
        block_table: &block_table.0,
        max_pages_per_seq: max_pages,
        seqlens_k: &seqlens_k,
    };
    let cache = PagedCache::new(layout, table).map_err(err)?;
    let cache = match scales {
        Some(s) => cache.with_kv_scales(s).map_err(err)?,
        None => cache,
    };
    let problem = match kind {
        PagedKind::Decode => {
            PagedProblem::Decode(PagedDecode::new(&cache, hq, q_len, opts).map_err(err)?)
        }
        PagedKind::Prefill { cu_seqlens_q: None } => {
            PagedProblem::Prefill(PagedPrefill::new(&cache, hq, q_len, opts).map_err(err)?)
        }
        PagedKind::Prefill {
            cu_seqlens_q: Some(cu),
        } => {
            if cu.last().is_none_or(|&t| t < 0 || t as usize != rows) {
                return Err(PyValueError::new_err(format!(
                    "q has {rows} rows but cu_seqlens_q ends at {:?}",
                    cu.last()
                )));
            }
            PagedProblem::Prefill(PagedPrefill::new_varlen(&cache, hq, &cu, opts).map_err(err)?)
        }
    };
    let qs = if packed {
        Strides {
            batch: 0,
            seq: (hq * d) as i64,
            head: d as i64,
        }
    } else {
        Strides::contiguous(q_len, hq, d)
    };
    Ok(Paged { problem, qs })
}

/// A cache array as the decode reads it: elements of q's type `T`, or FP8 e4m3 codes (from a
/// `uint8` array).
enum CacheData<T> {
    Same(Vec<T>),
    Fp8(Vec<F8E4M3>),
}

fn cache_array<T: numpy::Element + Copy>(
    name: &str,
    a: &Bound<'_, PyAny>,
    fp8: bool,
) -> PyResult<(CacheData<T>, Vec<usize>)> {
    if fp8 {
        let h = host::<u8>(name, a)?;
        let codes = h.data.into_iter().map(F8E4M3::from_bits).collect();
        Ok((CacheData::Fp8(codes), h.dims))
    } else {
        let h = host::<T>(name, a)?;
        Ok((CacheData::Same(h.data), h.dims))
    }
}

/// [`paged_impl`] in q's element type (float16, else float32).
fn paged_run<'py>(
    py: Python<'py>,
    kind: PagedKind,
    (q, k_cache, v_cache): (&Bound<'py, PyAny>, &Bound<'py, PyAny>, &Bound<'py, PyAny>),
    (block_table, seqlens_k): (&Bound<'py, PyAny>, &Bound<'py, PyAny>),
    opts: AttentionOptions,
    scales: Option<KvScales>,
) -> PyResult<Bound<'py, PyAny>> {
    let (bt, sl) = (block_table, seqlens_k);
    if is_f16(q) {
        paged_impl::<f16>(py, kind, q, k_cache, v_cache, bt, sl, opts, scales)
    } else {
        paged_impl::<f32>(py, kind, q, k_cache, v_cache, bt, sl, opts, scales)
    }
}

/// The CPU forward pass of a paged problem of `kind` on numpy arrays.
#[allow(clippy::too_many_arguments)]
fn paged_impl<'py, T: Element + numpy::Element>(
    py: Python<'py>,
    kind: PagedKind,
    q: &Bound<'py, PyAny>,
    k_cache: &Bound<'py, PyAny>,
    v_cache: &Bound<'py, PyAny>,
    block_table: &Bound<'py, PyAny>,
    seqlens_k: &Bound<'py, PyAny>,
    opts: AttentionOptions,
    scales: Option<KvScales>,
) -> PyResult<Bound<'py, PyAny>> {
    let q = host::<T>("q", q)?;
    // A uint8 cache holds e4m3 codes (torch.float8_e4m3fn viewed as uint8).
    let fp8 = k_cache.extract::<PyReadonlyArrayDyn<u8>>().is_ok();
    let (k, k_dims) = cache_array::<T>("k_cache", k_cache, fp8)?;
    let (v, v_dims) = cache_array::<T>("v_cache", v_cache, fp8)?;
    if k_dims != v_dims {
        return Err(PyValueError::new_err(
            "k_cache and v_cache must have the same shape and dtype",
        ));
    }
    let paged = paged_problem(
        kind,
        &q.dims,
        &k_dims,
        ints("block_table", block_table)?,
        ints("seqlens_k", seqlens_k)?.0,
        &opts,
        scales,
    )?;
    let mut out = vec![T::default(); paged.out_len()];
    py.detach(|| match (&k, &v) {
        (CacheData::Same(k), CacheData::Same(v)) => {
            paged.forward_cpu(&q.data, KvPages { k, v }, &mut out)
        }
        (CacheData::Fp8(k), CacheData::Fp8(v)) => {
            paged.forward_cpu(&q.data, KvPages { k, v }, &mut out)
        }
        _ => Err(longattn::Error::Shape(
            "k_cache and v_cache must have the same dtype".into(),
        )),
    })
    .map_err(err)?;
    to_py(py, out, &q.dims)
}

/// `k_scales`, `v_scales` of an FP8 cache: both or neither.
fn kv_scales(k_scales: Option<Vec<f32>>, v_scales: Option<Vec<f32>>) -> PyResult<Option<KvScales>> {
    match (k_scales, v_scales) {
        (None, None) => Ok(None),
        (Some(k), Some(v)) => Ok(Some(KvScales::new(k, v).map_err(err)?)),
        _ => Err(PyValueError::new_err("k_scales and v_scales go together")),
    }
}

/// Decode over a paged KV cache on numpy arrays (CPU): `q (b, q_len, hq, d)` new tokens,
/// `k_cache, v_cache (num_pages, page_size, hkv, d)` of q's dtype, or `uint8` arrays of FP8
/// e4m3 codes with `k_scales, v_scales (hkv,)` dequantisation scales (default 1),
/// `block_table (b, max_pages)` int32, `seqlens_k (b,)` int32 counting the new tokens. Causal
/// among the new tokens; `window_left` bounds the window (`W - 1` for W tokens, -1
/// unbounded).
#[pyfunction]
#[pyo3(signature = (q, k_cache, v_cache, block_table, seqlens_k, *, scale=None, window_left=-1, softcap=None, sinks=0, k_scales=None, v_scales=None))]
#[allow(clippy::too_many_arguments)]
fn paged_decode<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k_cache: &Bound<'py, PyAny>,
    v_cache: &Bound<'py, PyAny>,
    block_table: &Bound<'py, PyAny>,
    seqlens_k: &Bound<'py, PyAny>,
    scale: Option<f32>,
    window_left: i64,
    softcap: Option<f32>,
    sinks: usize,
    k_scales: Option<Vec<f32>>,
    v_scales: Option<Vec<f32>>,
) -> PyResult<Bound<'py, PyAny>> {
    let opts = make_options(scale, true, Some((window_left, 0)), softcap, sinks)?;
    let scales = kv_scales(k_scales, v_scales)?;
    let (kind, tables) = (PagedKind::Decode, (block_table, seqlens_k));
    paged_run(py, kind, (q, k_cache, v_cache), tables, opts, scales)
}

/// Prefill over a paged KV cache on numpy arrays (CPU; chunked prefill, prefix caching): the
/// cache already holds the new tokens, each sequence's queries attend to its `seqlens_k`
/// tokens gathered from the pages as dense attention does, the new tokens being the last ones
/// (`causal` is bottom-right aligned). `q (b, q_len, hq, d)`, or packed `(total_q, hq, d)` with
/// `cu_seqlens_q` int32 `(b + 1,)` from 0; cache and tables as `paged_decode`. Not causal by
/// default (as `dense`).
#[pyfunction]
#[pyo3(signature = (q, k_cache, v_cache, block_table, seqlens_k, *, cu_seqlens_q=None, scale=None, causal=false, window=None, softcap=None, sinks=0, k_scales=None, v_scales=None))]
#[allow(clippy::too_many_arguments)]
fn paged_prefill<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k_cache: &Bound<'py, PyAny>,
    v_cache: &Bound<'py, PyAny>,
    block_table: &Bound<'py, PyAny>,
    seqlens_k: &Bound<'py, PyAny>,
    cu_seqlens_q: Option<&Bound<'py, PyAny>>,
    scale: Option<f32>,
    causal: bool,
    window: Option<(i64, i64)>,
    softcap: Option<f32>,
    sinks: usize,
    k_scales: Option<Vec<f32>>,
    v_scales: Option<Vec<f32>>,
) -> PyResult<Bound<'py, PyAny>> {
    let opts = make_options(scale, causal, window, softcap, sinks)?;
    let scales = kv_scales(k_scales, v_scales)?;
    let cu_seqlens_q = match cu_seqlens_q {
        Some(c) => Some(ints("cu_seqlens_q", c)?.0),
        None => None,
    };
    let kind = PagedKind::Prefill { cu_seqlens_q };
    let tables = (block_table, seqlens_k);
    paged_run(py, kind, (q, k_cache, v_cache), tables, opts, scales)
}

/// FP8 e4m3 codes of `x / scale` (float32 array in, uint8 array of the same shape out):
/// round to nearest even, saturating at +-448, NaN kept; the bytes an FP8 cache holds.
#[pyfunction]
fn fp8_quantize<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    scale: f32,
) -> PyResult<Bound<'py, PyAny>> {
    if !(scale.is_finite() && scale > 0.0) {
        return Err(PyValueError::new_err(format!(
            "scale {scale} must be finite and > 0"
        )));
    }
    let x = host::<f32>("x", x)?;
    let codes: Vec<u8> = x
        .data
        .iter()
        .map(|&v| F8E4M3::from_f32(v / scale).to_bits())
        .collect();
    to_py(py, codes, &x.dims)
}

fn per_dim<T: Copy>(name: &str, v: Vec<T>, n: usize) -> PyResult<Vec<T>> {
    match v.len() {
        1 => Ok(vec![v[0]; n]),
        m if m == n => Ok(v),
        m => Err(PyValueError::new_err(format!(
            "{name} has {m} values for {n} grid dims"
        ))),
    }
}

/// The per-grid-dim settings of a neighborhood call: one value for every dim or one per dim.
pub(crate) struct NeighborhoodSpec {
    pub(crate) kernel_size: Vec<usize>,
    pub(crate) dilation: Vec<usize>,
    pub(crate) causal: Vec<bool>,
    pub(crate) stride: Vec<usize>,
}

/// The validated neighborhood problem of `q`, `k`, `v` shaped `(batch, *grid, heads,
/// head_dim)` (1 to 3 grid dims; k and v alike, sharing q's batch, grid and head_dim).
pub(crate) fn neighborhood_problem(
    (q, k, v): (&[usize], &[usize], &[usize]),
    spec: NeighborhoodSpec,
    opts: &AttentionOptions,
) -> PyResult<NeighborhoodAttention> {
    let r = q.len();
    if !(4..=6).contains(&r) || k.len() != r || k != v {
        return Err(PyValueError::new_err(format!(
            "q {q:?}, k {k:?}, v {v:?}: (batch, *grid, heads, head_dim) with 1 to 3 grid dims, k \
             and v alike"
        )));
    }
    let grid = &q[1..r - 2];
    if k[..r - 2] != q[..r - 2] || k[r - 1] != q[r - 1] {
        return Err(PyValueError::new_err(
            "q and k must share batch, grid and head_dim",
        ));
    }
    let n = grid.len();
    let (ks, ds, cs, ss) = (
        per_dim("kernel_size", spec.kernel_size, n)?,
        per_dim("dilation", spec.dilation, n)?,
        per_dim("causal", spec.causal, n)?,
        per_dim("stride", spec.stride, n)?,
    );
    let dims: Vec<NeighborhoodDim> = (0..n)
        .map(|i| {
            NeighborhoodDim::new(grid[i], ks[i])
                .with_dilation(ds[i])
                .with_causal(cs[i])
                .with_stride(ss[i])
        })
        .collect();
    let shape = NeighborhoodShape {
        batch: q[0],
        heads_q: q[r - 2],
        heads_kv: k[r - 2],
        head_dim: q[r - 1],
        dims: &dims,
    };
    NeighborhoodAttention::new(&shape, opts).map_err(err)
}

fn neighborhood_impl<'py, T: Element + numpy::Element>(
    py: Python<'py>,
    (q, k, v): (&Bound<'py, PyAny>, &Bound<'py, PyAny>, &Bound<'py, PyAny>),
    spec: NeighborhoodSpec,
    opts: AttentionOptions,
) -> PyResult<Bound<'py, PyAny>> {
    let (q, k, v) = (host::<T>("q", q)?, host::<T>("k", k)?, host::<T>("v", v)?);
    let attn = neighborhood_problem((&q.dims, &k.dims, &v.dims), spec, &opts)?;
    let (n, d) = (attn.tokens(), attn.head_dim());
    let (qs, kvs) = (
        Strides::contiguous(n, attn.heads_q(), d),
        Strides::contiguous(n, attn.heads_kv(), d),
    );
    let mut out = vec![T::default(); attn.out_len()];
    py.detach(|| {
        attn.forward_cpu(
            Strided::new(&q.data[..], qs),
            Strided::new(&k.data[..], kvs),
            Strided::new(&v.data[..], kvs),
            Strided::new(&mut out[..], qs),
            None,
        )
    })
    .map_err(err)?;
    to_py(py, out, &q.dims)
}

/// Neighborhood attention (NATTEN semantics) on numpy arrays (CPU): `q, k, v (batch, *grid,
/// heads, head_dim)` with a 1-D, 2-D or 3-D grid. `kernel_size`, `dilation`, `causal`,
/// `stride`: one value for every dim or one per dim.
#[pyfunction]
#[pyo3(signature = (q, k, v, kernel_size, *, dilation=vec![1], causal=vec![false], stride=vec![1], scale=None, softcap=None))]
#[allow(clippy::too_many_arguments)]
fn neighborhood<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    kernel_size: Vec<usize>,
    dilation: Vec<usize>,
    causal: Vec<bool>,
    stride: Vec<usize>,
    scale: Option<f32>,
    softcap: Option<f32>,
) -> PyResult<Bound<'py, PyAny>> {
    let opts = make_options(scale, false, None, softcap, 0)?;
    let spec = NeighborhoodSpec {
        kernel_size,
        dilation,
        causal,
        stride,
    };
    if is_f16(q) {
        neighborhood_impl::<f16>(py, (q, k, v), spec, opts)
    } else {
        neighborhood_impl::<f32>(py, (q, k, v), spec, opts)
    }
}

#[pymodule]
fn _longattn(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(dense, m)?)?;
    m.add_function(wrap_pyfunction!(dense_varlen, m)?)?;
    m.add_function(wrap_pyfunction!(paged_decode, m)?)?;
    m.add_function(wrap_pyfunction!(paged_prefill, m)?)?;
    m.add_function(wrap_pyfunction!(fp8_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(neighborhood, m)?)?;
    m.add_function(wrap_pyfunction!(block_sparse, m)?)?;
    cuda::register(m)?;
    Ok(())
}
