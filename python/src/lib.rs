//! `longattn._longattn`: numpy entry points through the CPU path, and CUDA entry points over
//! raw device pointers taken from `__cuda_array_interface__` (see `cuda.rs`).
//!
//! Layouts are FlashAttention's: `q: (batch, seqlen_q, heads_q, head_dim)`, `k, v: (batch,
//! seqlen_k, heads_kv, head_dim)`; varlen packs `(total, heads, head_dim)`; paged caches are
//! `(num_pages, page_size, heads_kv, head_dim)` with Quest bounds `(num_pages, heads_kv,
//! head_dim)`, appended tokens packed `(total_new, heads_kv, head_dim)`; neighborhood grids
//! `(batch, *grid, heads, head_dim)`; block-sparse masks CSR arrays over `(mask_batch,
//! mask_heads, num_q_blocks)` lists; merged partials `o (batch, seqlen, heads, head_dim)` with
//! `lse (batch, heads, seqlen)`. Windows are FA2 `(left, right)` integers with `-1`
//! unbounded; `causal` composes as in FA2 (right = min(right, 0), left kept).

mod cuda;
mod patterns;

use longattn::{
    AttentionOptions, AttentionShape, BlockMask, BlockMaskDims, BlockMaskError,
    BlockSparseAttention, Element, F8E4M3, FlashAttention, HeadPolicy, KvPages, KvScales,
    MergeShape, NeighborhoodAttention, NeighborhoodDim, NeighborhoodShape, PageMeta, PageTable,
    PagedCache, PagedDecode, PagedLayout, PagedPrefill, Partial, QuestConfig, SeqLens,
    SparsePolicy, StreamingConfig, Strided, Strides, Window, f16,
};
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyMemoryError, PyTypeError, PyValueError};
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

/// `n` copies of `fill` (an output buffer), or a `MemoryError` when they do not fit: a
/// problem over broadcast views may be valid yet far beyond memory, and an infallible
/// allocation would abort the interpreter.
fn try_filled<T: Clone>(name: &str, n: usize, fill: T) -> PyResult<Vec<T>> {
    let mut v = reserve(name, n)?;
    v.resize(n, fill);
    Ok(v)
}

/// An array's elements copied into a new vector, or a `MemoryError` when they do not fit (a
/// broadcast view, e.g. `np.broadcast_to`, claims a shape whose copy may exceed memory).
fn try_collect<T>(name: &str, items: impl ExactSizeIterator<Item = T>) -> PyResult<Vec<T>> {
    let mut v = reserve(name, items.len())?;
    v.extend(items);
    Ok(v)
}

/// An empty vector with room for `n` elements, or a `MemoryError`: when the allocator refuses,
/// and, for a large request, when it exceeds what the machine has left ([`memory_left`]).
/// Linux overcommits: an allocation beyond free memory succeeds and the OOM killer ends the
/// process while the copy fills it, so the request is weighed before it is made.
fn reserve<T>(name: &str, n: usize) -> PyResult<Vec<T>> {
    let bytes = (n as u128) * (std::mem::size_of::<T>() as u128);
    if bytes >= GATED_BYTES && memory_left().is_some_and(|left| bytes > left as u128) {
        return Err(too_big(name, n));
    }
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| too_big(name, n))?;
    Ok(v)
}

/// Requests from this size on are weighed against [`memory_left`] (smaller ones skip reading
/// /proc: a whole decode step's buffers are usually below it).
const GATED_BYTES: u128 = 64 << 20;

/// Bytes this process can still fill before the kernel's OOM killer stops it: the smaller of
/// the machine's (`MemAvailable + SwapFree` of /proc/meminfo) and its cgroup's (v2
/// `memory.max - memory.current`, else v1 `memory.limit_in_bytes - memory.usage_in_bytes`);
/// `None` where neither can be read (not Linux). Python: `longattn._longattn._memory_left()`.
#[pyfunction]
#[pyo3(name = "_memory_left")]
fn memory_left() -> Option<u64> {
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let field = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                    .and_then(|rest| rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
                    .map(|kib| kib.saturating_mul(1024))
            };
            Some(field("MemAvailable")?.saturating_add(field("SwapFree").unwrap_or(0)))
        });
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
    };
    let cgroup = [
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ]
    .iter()
    // "max" (no limit) does not parse: no cgroup bound.
    .find_map(|(limit, used)| Some(read(limit)?.saturating_sub(read(used)?)));
    match (machine, cgroup) {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
    }
}

fn too_big(name: &str, n: usize) -> PyErr {
    PyMemoryError::new_err(format!(
        "longattn: {name}: {n} elements do not fit in memory"
    ))
}

/// A numpy array as a contiguous host buffer of `T` and its dims.
struct Host<T> {
    data: Vec<T>,
    dims: Vec<usize>,
}

fn host<T: numpy::Element + Copy>(name: &str, a: &Bound<'_, PyAny>) -> PyResult<Host<T>> {
    host_as(name, a, "of the same dtype as q (float32 or float16)")
}

/// [`host`] with the expected dtype `what` in the error message.
fn host_as<T: numpy::Element + Copy>(
    name: &str,
    a: &Bound<'_, PyAny>,
    what: &str,
) -> PyResult<Host<T>> {
    let arr: PyReadonlyArrayDyn<T> = a
        .extract()
        .map_err(|_| PyTypeError::new_err(format!("{name} must be a numpy array {what}")))?;
    let dims = arr.shape().to_vec();
    let view = arr.as_array();
    let mut data = reserve(name, view.len())?;
    match view.as_slice() {
        Some(s) => data.extend_from_slice(s),
        None => data.extend(view.iter().copied()),
    }
    Ok(Host { data, dims })
}

fn ints(name: &str, a: &Bound<'_, PyAny>) -> PyResult<(Vec<i32>, Vec<usize>)> {
    let arr: PyReadonlyArrayDyn<i32> = a
        .extract()
        .map_err(|_| PyTypeError::new_err(format!("{name} must be a numpy int32 array")))?;
    let dims = arr.shape().to_vec();
    Ok((try_collect(name, arr.as_array().iter().copied())?, dims))
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
    let mut out = try_filled("out", attn.out_len(), T::default())?;
    let mut lse = try_filled("lse", attn.lse_len(), 0.0f32)?;
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
            Some(try_collect("full", arr.as_array().iter().copied())?)
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
/// the options; its kv heads follow `policy`, every head Full when `None`), or a prefill
/// chunk (`q (b, q_len, hq, d)`, or packed `(total_q, hq, d)` with `cu_seqlens_q`).
pub(crate) enum PagedKind {
    Decode { policy: Option<PolicyArgs> },
    Prefill { cu_seqlens_q: Option<Vec<i32>> },
}

/// The decode head policies of the Python keywords (see `paged_decode`), resolved against
/// the cache's kv heads by [`PolicyArgs::build`].
pub(crate) struct PolicyArgs {
    /// `"full"`, `"streaming"` or `"quest"`: one name for every kv head, or one per kv head.
    heads: Vec<String>,
    /// Quest tokens kept per (sequence, kv head); required when a head is Quest.
    quest_budget: Option<usize>,
    quest_sink_pages: usize,
    streaming: StreamingConfig,
}

impl PolicyArgs {
    /// The keywords of a decode call; `None` (every head Full, the other keywords unused)
    /// when `policy` is.
    pub(crate) fn new(
        policy: Option<&Bound<'_, PyAny>>,
        (quest_budget, quest_sink_pages): (Option<usize>, usize),
        (sinks, window): (usize, usize),
    ) -> PyResult<Option<Self>> {
        let Some(p) = policy else { return Ok(None) };
        let heads = match p.extract::<String>() {
            Ok(one) => vec![one],
            Err(_) => p.extract::<Vec<String>>().map_err(|_| {
                PyTypeError::new_err("policy must be a string or a list of strings (per kv head)")
            })?,
        };
        Ok(Some(PolicyArgs {
            heads,
            quest_budget,
            quest_sink_pages,
            streaming: StreamingConfig { sinks, window },
        }))
    }

    /// The policy of a cache with `heads_kv` kv heads (validated by
    /// [`PagedDecode::with_policy`]).
    fn build(self, heads_kv: usize) -> PyResult<SparsePolicy> {
        let heads = per_dim("policy", self.heads, heads_kv, "kv heads")?
            .iter()
            .map(|name| match name.as_str() {
                "full" => Ok(HeadPolicy::Full),
                "streaming" => Ok(HeadPolicy::Streaming),
                "quest" => Ok(HeadPolicy::Quest),
                other => Err(PyValueError::new_err(format!(
                    "policy '{other}': 'full', 'streaming' or 'quest'"
                ))),
            })
            .collect::<PyResult<Vec<_>>>()?;
        let quest = match self.quest_budget {
            Some(token_budget) => QuestConfig {
                token_budget,
                sink_pages: self.quest_sink_pages,
            },
            None if heads.contains(&HeadPolicy::Quest) => {
                return Err(PyValueError::new_err(
                    "quest heads need quest_budget (tokens kept per sequence and kv head)",
                ));
            }
            None => QuestConfig::default(),
        };
        Ok(SparsePolicy {
            heads,
            streaming: self.streaming,
            quest,
        })
    }
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

    /// The CPU pass; `meta` (the Quest bounds) only for a decode.
    fn forward_cpu<T: Element, C: Element>(
        &self,
        q: &[T],
        kv: KvPages<&[C]>,
        meta: Option<PageMeta<&[C]>>,
        out: &mut [T],
    ) -> longattn::Result<()> {
        let (q, out) = (Strided::new(q, self.qs), Strided::new(out, self.qs));
        match &self.problem {
            PagedProblem::Decode(p) => p.forward_cpu(q, kv, meta, out, None),
            PagedProblem::Prefill(p) => p.forward_cpu(q, kv, out, None),
        }
    }
}

/// The validated cache `(num_pages, page_size, hkv, d)` with host tables `block_table (b,
/// max_pages)` and `seqlens_k (b,)`, and the scales of an FP8 cache.
pub(crate) fn paged_cache(
    cache_dims: &[usize],
    block_table: (Vec<i32>, Vec<usize>),
    seqlens_k: &[i32],
    scales: Option<KvScales>,
) -> PyResult<PagedCache> {
    let [num_pages, page_size, heads_kv, head_dim] = dims_n::<4>("k_cache", cache_dims)?;
    let [b, max_pages] = dims_n::<2>("block_table", &block_table.1)?;
    if seqlens_k.len() != b {
        return Err(PyValueError::new_err(format!(
            "block_table {:?} and seqlens_k ({}): batch must agree",
            block_table.1,
            seqlens_k.len()
        )));
    }
    let layout = PagedLayout {
        num_pages,
        page_size,
        heads_kv,
        head_dim,
    };
    let table = PageTable {
        block_table: &block_table.0,
        max_pages_per_seq: max_pages,
        seqlens_k,
    };
    let cache = PagedCache::new(layout, table).map_err(err)?;
    match scales {
        Some(s) => cache.with_kv_scales(s).map_err(err),
        None => Ok(cache),
    }
}

/// `kmin` and `kmax` must be shaped `(num_pages, heads_kv, head_dim)` of a cache shaped
/// `cache` (`(num_pages, page_size, heads_kv, head_dim)`).
pub(crate) fn check_meta_dims(cache: &[usize], kmin: &[usize], kmax: &[usize]) -> PyResult<()> {
    let [num_pages, _, heads_kv, head_dim] = dims_n::<4>("k_cache", cache)?;
    let want = [num_pages, heads_kv, head_dim];
    if kmin != want || kmax != want {
        return Err(PyValueError::new_err(format!(
            "kmin {kmin:?} and kmax {kmax:?} must be (num_pages, heads_kv, head_dim) = {want:?}"
        )));
    }
    Ok(())
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
    let cache = paged_cache(cache_dims, block_table, &seqlens_k, scales)?;
    if cache.head_dim() != d || (!packed && rows != cache.batch()) {
        return Err(PyValueError::new_err(format!(
            "q {q_dims:?}, cache {cache_dims:?}, seqlens_k ({}): head_dim and batch must agree",
            seqlens_k.len()
        )));
    }
    let problem = match kind {
        PagedKind::Decode { policy } => {
            let decode = PagedDecode::new(&cache, hq, q_len, opts).map_err(err)?;
            PagedProblem::Decode(match policy {
                Some(p) => decode
                    .with_policy(p.build(cache.heads_kv())?)
                    .map_err(err)?,
                None => decode,
            })
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

/// An element type a cache array holds: q's own type, or FP8 e4m3 codes in a `uint8` array
/// (`torch.float8_e4m3fn` viewed as `uint8`).
trait CacheElem: Element {
    /// The numpy element type of the array.
    type Np: numpy::Element + Copy;
    /// The array's dtype, for error messages.
    const WHAT: &'static str;
    fn from_np(x: Self::Np) -> Self;
    fn to_np(self) -> Self::Np;
    /// The array's elements as `Self`, without a copy (`Self` has `Np`'s layout).
    fn view(x: &[Self::Np]) -> &[Self];
    /// [`CacheElem::view`], writable.
    fn view_mut(x: &mut [Self::Np]) -> &mut [Self];
}

macro_rules! numpy_cache_elem {
    ($($t:ty),*) => {$(
        impl CacheElem for $t {
            type Np = $t;
            const WHAT: &'static str = "of q's dtype (k_new's for an append)";
            fn from_np(x: $t) -> $t {
                x
            }
            fn to_np(self) -> $t {
                self
            }
            fn view(x: &[$t]) -> &[$t] {
                x
            }
            fn view_mut(x: &mut [$t]) -> &mut [$t] {
                x
            }
        }
    )*};
}
numpy_cache_elem!(f32, f16);

impl CacheElem for F8E4M3 {
    type Np = u8;
    const WHAT: &'static str = "uint8 (FP8 e4m3 codes, as k_cache)";
    fn from_np(x: u8) -> Self {
        F8E4M3::from_bits(x)
    }
    fn to_np(self) -> u8 {
        self.to_bits()
    }
    fn view(x: &[u8]) -> &[F8E4M3] {
        // SAFETY: F8E4M3 is `repr(transparent)` over u8: same size, alignment and validity.
        unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), x.len()) }
    }
    fn view_mut(x: &mut [u8]) -> &mut [F8E4M3] {
        // SAFETY: as `view`; the borrow of `x` is moved into the result.
        unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), x.len()) }
    }
}

/// Whether a cache array holds FP8 e4m3 codes (a `uint8` array).
fn is_fp8(k_cache: &Bound<'_, PyAny>) -> bool {
    k_cache.extract::<PyReadonlyArrayDyn<u8>>().is_ok()
}

/// A cache array (or Quest bounds) read as `&[C]`: borrowed from numpy without a copy when it
/// is C-contiguous (a decode step must not cost the size of the whole cache), else copied.
struct CacheArray<'py, C: CacheElem> {
    arr: PyReadonlyArrayDyn<'py, C::Np>,
    copy: Option<Vec<C>>,
    dims: Vec<usize>,
}

/// A copy of a cache array's elements when it is not C-contiguous (None when it is: used in
/// place), allocated fallibly.
fn strided_copy<C: CacheElem>(
    name: &str,
    c_contiguous: bool,
    view: numpy::ndarray::ArrayViewD<'_, C::Np>,
) -> PyResult<Option<Vec<C>>> {
    match c_contiguous {
        true => Ok(None),
        false => Ok(Some(try_collect(
            name,
            view.iter().map(|&x| C::from_np(x)),
        )?)),
    }
}

fn cache_array<'py, C: CacheElem>(
    name: &str,
    a: &Bound<'py, PyAny>,
) -> PyResult<CacheArray<'py, C>> {
    let arr: PyReadonlyArrayDyn<'py, C::Np> = a
        .extract()
        .map_err(|_| PyTypeError::new_err(format!("{name} must be a numpy array {}", C::WHAT)))?;
    let copy = strided_copy::<C>(name, arr.is_c_contiguous(), arr.as_array())?;
    let dims = arr.shape().to_vec();
    Ok(CacheArray { arr, copy, dims })
}

impl<C: CacheElem> CacheArray<'_, C> {
    fn data(&self) -> &[C] {
        match &self.copy {
            Some(v) => v,
            // C-contiguous (checked at extraction): as_slice succeeds.
            None => C::view(self.arr.as_slice().unwrap_or(&[])),
        }
    }
}

/// A writable numpy array of `C`, held mutably borrowed from extraction to
/// [`Writable::store`]: written in place when C-contiguous, else through a copy that `store`
/// writes back.
struct Writable<'py, C: CacheElem> {
    arr: PyReadwriteArrayDyn<'py, C::Np>,
    copy: Option<Vec<C>>,
    dims: Vec<usize>,
}

fn writable<'py, C: CacheElem>(name: &str, a: &Bound<'py, PyAny>) -> PyResult<Writable<'py, C>> {
    let arr: PyReadwriteArrayDyn<'py, C::Np> = a.extract().map_err(|e| {
        PyTypeError::new_err(format!(
            "{name} must be a writable numpy array {}, no other argument's array: {e}",
            C::WHAT
        ))
    })?;
    let copy = strided_copy::<C>(name, arr.is_c_contiguous(), arr.as_array())?;
    let dims = arr.shape().to_vec();
    Ok(Writable { arr, copy, dims })
}

impl<C: CacheElem> Writable<'_, C> {
    fn data_mut(&mut self) -> &mut [C] {
        match &mut self.copy {
            Some(v) => v,
            // C-contiguous (checked at extraction): as_slice_mut succeeds.
            None => C::view_mut(self.arr.as_slice_mut().unwrap_or(&mut [])),
        }
    }

    /// Writes a copy back (nothing to do for an array written in place).
    fn store(mut self) {
        if let Some(copy) = self.copy.take() {
            for (dst, x) in self.arr.as_array_mut().iter_mut().zip(copy) {
                *dst = x.to_np();
            }
        }
    }
}

/// The numpy arguments of a paged decode or prefill.
struct PagedArrays<'a, 'py> {
    q: &'a Bound<'py, PyAny>,
    kv: (&'a Bound<'py, PyAny>, &'a Bound<'py, PyAny>),
    /// `(block_table, seqlens_k)`.
    tables: (&'a Bound<'py, PyAny>, &'a Bound<'py, PyAny>),
    /// The Quest bounds `(kmin, kmax)` (decode only).
    meta: Option<(&'a Bound<'py, PyAny>, &'a Bound<'py, PyAny>)>,
}

/// `kmin` and `kmax`: both or neither.
pub(crate) fn meta_pair<'a, 'py>(
    kmin: Option<&'a Bound<'py, PyAny>>,
    kmax: Option<&'a Bound<'py, PyAny>>,
) -> PyResult<Option<(&'a Bound<'py, PyAny>, &'a Bound<'py, PyAny>)>> {
    match (kmin, kmax) {
        (None, None) => Ok(None),
        (Some(lo), Some(hi)) => Ok(Some((lo, hi))),
        _ => Err(PyValueError::new_err("kmin and kmax go together")),
    }
}

/// [`paged_impl`] in q's element type (float16, else float32) over the cache's (q's, or FP8
/// e4m3 from `uint8` arrays).
fn paged_run<'py>(
    py: Python<'py>,
    kind: PagedKind,
    a: PagedArrays<'_, 'py>,
    opts: AttentionOptions,
    scales: Option<KvScales>,
) -> PyResult<Bound<'py, PyAny>> {
    match (is_f16(a.q), is_fp8(a.kv.0)) {
        (true, true) => paged_impl::<f16, F8E4M3>(py, kind, a, opts, scales),
        (true, false) => paged_impl::<f16, f16>(py, kind, a, opts, scales),
        (false, true) => paged_impl::<f32, F8E4M3>(py, kind, a, opts, scales),
        (false, false) => paged_impl::<f32, f32>(py, kind, a, opts, scales),
    }
}

/// The CPU forward pass of a paged problem of `kind` on numpy arrays.
fn paged_impl<'py, T: Element + numpy::Element, C: CacheElem>(
    py: Python<'py>,
    kind: PagedKind,
    a: PagedArrays<'_, 'py>,
    opts: AttentionOptions,
    scales: Option<KvScales>,
) -> PyResult<Bound<'py, PyAny>> {
    let q = host::<T>("q", a.q)?;
    let k = cache_array::<C>("k_cache", a.kv.0)?;
    let v = cache_array::<C>("v_cache", a.kv.1)?;
    if k.dims != v.dims {
        return Err(PyValueError::new_err(
            "k_cache and v_cache must have the same shape and dtype",
        ));
    }
    let meta = match a.meta {
        Some((lo, hi)) => Some((cache_array::<C>("kmin", lo)?, cache_array::<C>("kmax", hi)?)),
        None => None,
    };
    let paged = paged_problem(
        kind,
        &q.dims,
        &k.dims,
        ints("block_table", a.tables.0)?,
        ints("seqlens_k", a.tables.1)?.0,
        &opts,
        scales,
    )?;
    if let Some((lo, hi)) = &meta {
        check_meta_dims(&k.dims, &lo.dims, &hi.dims)?;
    }
    let mut out = try_filled("out", paged.out_len(), T::default())?;
    let meta = meta.as_ref().map(|(lo, hi)| PageMeta {
        kmin: lo.data(),
        kmax: hi.data(),
    });
    let kv = KvPages {
        k: k.data(),
        v: v.data(),
    };
    py.detach(|| paged.forward_cpu(&q.data, kv, meta, &mut out))
        .map_err(err)?;
    to_py(py, out, &q.dims)
}

/// `k_scales`, `v_scales` of an FP8 cache: both or neither.
pub(crate) fn kv_scales(
    k_scales: Option<Vec<f32>>,
    v_scales: Option<Vec<f32>>,
) -> PyResult<Option<KvScales>> {
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
///
/// Head policies (`None`: every kv head reads every visible page, as without them):
/// `policy` is "full", "streaming" or "quest" for every kv head, or a list of one per kv
/// head. A streaming head sees the first `streaming_sinks` tokens and the last
/// `streaming_window` (the current one included) instead of the window above; a Quest head
/// sees the visible keys of the `max(1, quest_budget // page_size)` pages of highest score
/// `S(p) = sum_c max(q_c * kmax_c, q_c * kmin_c)` (max over the kv head's query heads and
/// new tokens), the newest page and the first `quest_sink_pages` pages always kept; it needs
/// `quest_budget` (tokens) and the bounds `kmin, kmax (num_pages, hkv, d)` of the cache's
/// dtype that `paged_append` maintains.
#[pyfunction]
#[pyo3(signature = (q, k_cache, v_cache, block_table, seqlens_k, *, scale=None, window_left=-1, softcap=None, sinks=0, k_scales=None, v_scales=None, policy=None, quest_budget=None, quest_sink_pages=0, streaming_sinks=4, streaming_window=1024, kmin=None, kmax=None))]
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
    policy: Option<&Bound<'py, PyAny>>,
    quest_budget: Option<usize>,
    quest_sink_pages: usize,
    streaming_sinks: usize,
    streaming_window: usize,
    kmin: Option<&Bound<'py, PyAny>>,
    kmax: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let opts = make_options(scale, true, Some((window_left, 0)), softcap, sinks)?;
    let scales = kv_scales(k_scales, v_scales)?;
    let policy = PolicyArgs::new(
        policy,
        (quest_budget, quest_sink_pages),
        (streaming_sinks, streaming_window),
    )?;
    let a = PagedArrays {
        q,
        kv: (k_cache, v_cache),
        tables: (block_table, seqlens_k),
        meta: meta_pair(kmin, kmax)?,
    };
    paged_run(py, PagedKind::Decode { policy }, a, opts, scales)
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
    let a = PagedArrays {
        q,
        kv: (k_cache, v_cache),
        tables: (block_table, seqlens_k),
        meta: None,
    };
    paged_run(py, PagedKind::Prefill { cu_seqlens_q }, a, opts, scales)
}

/// `(rows, heads_kv, head_dim)` new tokens of a cache: `k_new` and `v_new` shaped
/// `(cu_seqlens_new[-1], heads_kv, head_dim)`; returns their element strides.
pub(crate) fn new_token_strides(
    cache: &PagedCache,
    k_new: &[usize],
    v_new: &[usize],
    cu_seqlens_new: &[i32],
) -> PyResult<Strides> {
    let (hkv, d) = (cache.heads_kv(), cache.head_dim());
    let total = cu_seqlens_new.last().map(|&t| t as i64);
    let want =
        |dims: &[usize]| dims.len() == 3 && dims[1..] == [hkv, d] && Some(dims[0] as i64) == total;
    if !want(k_new) || !want(v_new) {
        return Err(PyValueError::new_err(format!(
            "k_new {k_new:?} and v_new {v_new:?} must be (cu_seqlens_new[-1] = {total:?}, \
             heads_kv = {hkv}, head_dim = {d})"
        )));
    }
    Ok(Strides {
        batch: 0,
        seq: (hkv * d) as i64,
        head: d as i64,
    })
}

/// The numpy arguments of an append.
struct AppendArrays<'a, 'py> {
    kv_new: (&'a Bound<'py, PyAny>, &'a Bound<'py, PyAny>),
    kv: (&'a Bound<'py, PyAny>, &'a Bound<'py, PyAny>),
    /// `(block_table, seqlens_k, cu_seqlens_new)`.
    tables: [&'a Bound<'py, PyAny>; 3],
    meta: Option<(&'a Bound<'py, PyAny>, &'a Bound<'py, PyAny>)>,
}

/// [`PagedCache::append_cpu`] of `T` tokens into a cache of `C`, in place.
fn append_impl<T: Element + numpy::Element, C: CacheElem>(
    py: Python<'_>,
    a: AppendArrays<'_, '_>,
    scales: Option<KvScales>,
) -> PyResult<()> {
    let (k_new, v_new) = (
        host::<T>("k_new", a.kv_new.0)?,
        host::<T>("v_new", a.kv_new.1)?,
    );
    let mut k = writable::<C>("k_cache", a.kv.0)?;
    let mut v = writable::<C>("v_cache", a.kv.1)?;
    let mut meta = match a.meta {
        Some((lo, hi)) => Some((writable::<C>("kmin", lo)?, writable::<C>("kmax", hi)?)),
        None => None,
    };
    if k.dims != v.dims {
        return Err(PyValueError::new_err(
            "k_cache and v_cache must have the same shape and dtype",
        ));
    }
    let [bt, sl, cu] = a.tables;
    let cu = ints("cu_seqlens_new", cu)?.0;
    let cache = paged_cache(
        &k.dims,
        ints("block_table", bt)?,
        &ints("seqlens_k", sl)?.0,
        scales,
    )?;
    if let Some((lo, hi)) = &meta {
        check_meta_dims(&k.dims, &lo.dims, &hi.dims)?;
    }
    let s = new_token_strides(&cache, &k_new.dims, &v_new.dims, &cu)?;
    let m = meta.as_mut().map(|(lo, hi)| PageMeta {
        kmin: lo.data_mut(),
        kmax: hi.data_mut(),
    });
    let kv = KvPages {
        k: k.data_mut(),
        v: v.data_mut(),
    };
    py.detach(|| {
        let (kn, vn) = (
            Strided::new(&k_new.data[..], s),
            Strided::new(&v_new.data[..], s),
        );
        cache.append_cpu(&cu, kn, vn, kv, m)
    })
    .map_err(err)?;
    k.store();
    v.store();
    if let Some((lo, hi)) = meta {
        lo.store();
        hi.store();
    }
    Ok(())
}

/// Appends new tokens to a paged KV cache in place (CPU; the writes an engine does before
/// `paged_decode` / `paged_prefill`): `k_new, v_new (total_new, hkv, d)` float32 or float16,
/// sequence `b`'s rows `cu_seqlens_new[b]:cu_seqlens_new[b + 1]` (int32 `(b + 1,)` from 0)
/// going to positions `seqlens_k[b] - n_b .. seqlens_k[b]`: **`seqlens_k` already counts the
/// new tokens** (the lengths after the append, as the decode then reads them). The writable
/// `k_cache, v_cache (num_pages, page_size, hkv, d)` hold the new tokens' dtype, or are `uint8`
/// arrays of FP8 e4m3 codes of `x / k_scales[g]` (`v_scales` alike; `fp8_quantize`'s
/// rounding). `kmin, kmax (num_pages, hkv, d)`, writable of the cache's dtype, are the Quest
/// bounds: per channel, the min/max of the stored keys of each page's filled slots; an
/// append writing slot 0 of a page restarts its bounds (a reused page forgets its previous
/// owner), others widen them. Two sequences writing one page in one call are refused. The
/// arrays are written in place when C-contiguous (no copy of the cache: an append costs the
/// new tokens), else through a copy written back whole.
#[pyfunction]
#[pyo3(signature = (k_new, v_new, k_cache, v_cache, block_table, seqlens_k, cu_seqlens_new, *, kmin=None, kmax=None, k_scales=None, v_scales=None))]
#[allow(clippy::too_many_arguments)]
fn paged_append<'py>(
    py: Python<'py>,
    k_new: &Bound<'py, PyAny>,
    v_new: &Bound<'py, PyAny>,
    k_cache: &Bound<'py, PyAny>,
    v_cache: &Bound<'py, PyAny>,
    block_table: &Bound<'py, PyAny>,
    seqlens_k: &Bound<'py, PyAny>,
    cu_seqlens_new: &Bound<'py, PyAny>,
    kmin: Option<&Bound<'py, PyAny>>,
    kmax: Option<&Bound<'py, PyAny>>,
    k_scales: Option<Vec<f32>>,
    v_scales: Option<Vec<f32>>,
) -> PyResult<()> {
    let scales = kv_scales(k_scales, v_scales)?;
    let a = AppendArrays {
        kv_new: (k_new, v_new),
        kv: (k_cache, v_cache),
        tables: [block_table, seqlens_k, cu_seqlens_new],
        meta: meta_pair(kmin, kmax)?,
    };
    match (is_f16(k_new), is_fp8(k_cache)) {
        (true, true) => append_impl::<f16, F8E4M3>(py, a, scales),
        (true, false) => append_impl::<f16, f16>(py, a, scales),
        (false, true) => append_impl::<f32, F8E4M3>(py, a, scales),
        (false, false) => append_impl::<f32, f32>(py, a, scales),
    }
}

/// The merge of `o (batch, seqlen, heads, head_dim)` partials (`o_a`, `o_b` alike) with LSE
/// `(batch, heads, seqlen)`.
pub(crate) fn merge_shape(o: [&[usize]; 2], lse: [&[usize]; 2]) -> PyResult<MergeShape> {
    let [batch, seqlen, heads, head_dim] = dims_n::<4>("o_a", o[0])?;
    let want = [batch, heads, seqlen];
    if o[1] != o[0] || lse.iter().any(|l| *l != want) {
        return Err(PyValueError::new_err(format!(
            "o_a {:?}, o_b {:?}: (batch, seqlen, heads, head_dim) alike; lse_a {:?}, lse_b {:?}: \
             (batch, heads, seqlen) = {want:?}",
            o[0], o[1], lse[0], lse[1]
        )));
    }
    Ok(MergeShape {
        batch,
        seqlen,
        heads,
        head_dim,
    })
}

fn merge_impl<'py, T: Element + numpy::Element>(
    py: Python<'py>,
    [o_a, lse_a, o_b, lse_b]: [&Bound<'py, PyAny>; 4],
) -> PyResult<Bound<'py, PyAny>> {
    let (oa, ob) = (host::<T>("o_a", o_a)?, host::<T>("o_b", o_b)?);
    let f32_array = "of float32";
    let la = host_as::<f32>("lse_a", lse_a, f32_array)?;
    let lb = host_as::<f32>("lse_b", lse_b, f32_array)?;
    let shape = merge_shape([&oa.dims, &ob.dims], [&la.dims, &lb.dims])?;
    let mut o = try_filled("o", shape.o_len(), T::default())?;
    let mut lse = try_filled("lse", shape.lse_len(), 0.0f32)?;
    let a = Partial {
        o: &oa.data[..],
        lse: &la.data[..],
    };
    let b = Partial {
        o: &ob.data[..],
        lse: &lb.data[..],
    };
    let out = Partial {
        o: &mut o[..],
        lse: &mut lse[..],
    };
    py.detach(|| shape.merge_cpu(a, b, out)).map_err(err)?;
    let (o, lse) = (to_py(py, o, &oa.dims)?, to_py(py, lse, &la.dims)?);
    Ok((o, lse).into_pyobject(py)?.into_any())
}

/// Merges two partial attention results over disjoint key sets (CPU; split-KV, cascade or
/// prefix + suffix attention): `o_a, o_b (batch, seqlen, heads, head_dim)` float32 or float16
/// (one dtype), `lse_a, lse_b (batch, heads, seqlen)` float32 natural-log LSEs as `dense` and
/// `paged_*` return them. Returns `(o, lse)`: `lse = log(exp(lse_a) + exp(lse_b))`, `o =
/// exp(lse_a - lse) o_a + exp(lse_b - lse) o_b` (f32 arithmetic); two empty rows (both LSEs
/// -inf) give `o = 0`, `lse = -inf`.
#[pyfunction]
fn merge<'py>(
    py: Python<'py>,
    o_a: &Bound<'py, PyAny>,
    lse_a: &Bound<'py, PyAny>,
    o_b: &Bound<'py, PyAny>,
    lse_b: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let args = [o_a, lse_a, o_b, lse_b];
    if is_f16(o_a) {
        merge_impl::<f16>(py, args)
    } else {
        merge_impl::<f32>(py, args)
    }
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

/// One value for each of `n` `what`s: `v` itself, or its single value repeated.
fn per_dim<T: Clone>(name: &str, v: Vec<T>, n: usize, what: &str) -> PyResult<Vec<T>> {
    match v.len() {
        1 => Ok(vec![v[0].clone(); n]),
        m if m == n => Ok(v),
        m => Err(PyValueError::new_err(format!(
            "{name} has {m} values for {n} {what}"
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
        per_dim("kernel_size", spec.kernel_size, n, "grid dims")?,
        per_dim("dilation", spec.dilation, n, "grid dims")?,
        per_dim("causal", spec.causal, n, "grid dims")?,
        per_dim("stride", spec.stride, n, "grid dims")?,
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
    let mut out = try_filled("out", attn.out_len(), T::default())?;
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
    m.add_function(wrap_pyfunction!(memory_left, m)?)?;
    m.add_function(wrap_pyfunction!(dense, m)?)?;
    m.add_function(wrap_pyfunction!(dense_varlen, m)?)?;
    m.add_function(wrap_pyfunction!(paged_decode, m)?)?;
    m.add_function(wrap_pyfunction!(paged_prefill, m)?)?;
    m.add_function(wrap_pyfunction!(paged_append, m)?)?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(fp8_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(neighborhood, m)?)?;
    m.add_function(wrap_pyfunction!(block_sparse, m)?)?;
    patterns::register(m)?;
    cuda::register(m)?;
    Ok(())
}
