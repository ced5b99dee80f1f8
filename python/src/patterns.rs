//! The block-sparse pattern constructors of `longattn::block_sparse::patterns` (Longformer,
//! BigBird, Sparse Transformer strided and fixed, Block-Attention, MSWA per-head windows,
//! DuoAttention streaming heads) as Python functions returning a block mask's CSR arrays.
//!
//! Each function takes the lengths, the pattern's parameters in blocks (square blocks of
//! `block` tokens), and the element-mask keywords the mask will be used with (`causal`,
//! `window`, `sinks`, read as `block_sparse` reads them): the mask is "the pattern AND that
//! element mask", element by element, and its `full` flags are exact only for those
//! keywords. So the returned dict holds them too, and `block_sparse(q, k, v, **mask,
//! scale=..., softcap=...)` cannot be called with other ones (a repeated keyword is a
//! `TypeError`).

use crate::{make_options, mask_err, to_py, try_collect};
use longattn::block_sparse::patterns::{self, PatternShape};
use longattn::{BlockMask, BlockMaskError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// A constructor's lengths, heads and block size: `(seqlen_q, seqlen_k, heads, block)`.
type Dims = (usize, usize, usize, usize);
/// A constructor's element-mask keywords, as `block_sparse` takes them: `(causal, window,
/// sinks)`.
type ElementMask = (bool, Option<(i64, i64)>, usize);

/// The keyword arguments of `block_sparse` for the mask `build` makes (without the GIL) of
/// the pattern shape of `dims` and the element mask of the keywords (built as
/// `block_sparse` builds its options): `offsets (lists + 1,)` int32, `indices (nnz,)` int32,
/// `full (nnz,)` bool, `block_m`, `block_n`, `mask_batch` (1), `mask_heads`, and the
/// element-mask keywords.
fn mask_kwargs<'py>(
    py: Python<'py>,
    (seqlen_q, seqlen_k, heads, block): Dims,
    (causal, window, sinks): ElementMask,
    build: impl FnOnce(&PatternShape) -> Result<BlockMask, BlockMaskError> + Send,
) -> PyResult<Bound<'py, PyDict>> {
    let shape = PatternShape {
        heads,
        seqlen_q,
        seqlen_k,
        block,
        mask: make_options(None, causal, window, None, sinks)?.effective_mask(),
    };
    let m = py.detach(|| build(&shape)).map_err(mask_err)?;
    let dims = m.dims();
    let copy = |name, x: &[i32]| {
        let data = try_collect(name, x.iter().copied())?;
        to_py(py, data, &[x.len()])
    };
    let full = try_collect("full", m.full_flags().iter().map(|&f| f != 0))?;
    let kw = PyDict::new(py);
    kw.set_item("offsets", copy("offsets", m.offsets())?)?;
    kw.set_item("indices", copy("indices", m.indices())?)?;
    kw.set_item("full", to_py(py, full, &[m.nnz()])?)?;
    kw.set_item("block_m", dims.block_m)?;
    kw.set_item("block_n", dims.block_n)?;
    kw.set_item("mask_batch", dims.batch)?;
    kw.set_item("mask_heads", dims.heads)?;
    kw.set_item("causal", causal)?;
    kw.set_item("window", window)?;
    kw.set_item("sinks", sinks)?;
    Ok(kw)
}

/// Longformer (Beltagy et al. 2020, "Longformer: The Long-Document Transformer"), in blocks:
/// query block `qb` (at key block position `qb' = qb + (seqlen_k - seqlen_q) / block`) sees
/// key block `kb` when `|qb' - kb| <= window_blocks`, `kb < global_blocks` or
/// `qb' < global_blocks`; AND the element mask of `causal`/`window`/`sinks`.
///
/// Returns the keyword arguments of `block_sparse`/`block_sparse_cuda`: `offsets
/// (num_q_blocks + 1,)` int32, `indices (nnz,)` int32, `full (nnz,)` bool (every element of
/// the block visible under the element mask), `block_m = block_n = block`, `mask_batch = 1`,
/// `mask_heads = 1` (broadcast), and `causal`, `window`, `sinks` as given. Requires
/// `seqlen_q <= seqlen_k` with a difference multiple of `block`; bad arguments raise
/// ValueError.
#[pyfunction]
#[pyo3(signature = (seqlen_q, seqlen_k, window_blocks, global_blocks, *, block=128, causal=false, window=None, sinks=0))]
#[allow(clippy::too_many_arguments)]
fn longformer_mask<'py>(
    py: Python<'py>,
    seqlen_q: usize,
    seqlen_k: usize,
    window_blocks: usize,
    global_blocks: usize,
    block: usize,
    causal: bool,
    window: Option<(i64, i64)>,
    sinks: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let dims = (seqlen_q, seqlen_k, 1, block);
    mask_kwargs(py, dims, (causal, window, sinks), |s| {
        patterns::longformer(s, window_blocks, global_blocks)
    })
}

/// BigBird (Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences"), in blocks:
/// the `longformer_mask` pattern plus, for each (head, query block) with `qb' >=
/// global_blocks`, `random_blocks` distinct random key blocks, `bigbird_random_blocks(seed,
/// head, qb', num_k_blocks, random_blocks)`; AND the element mask.
///
/// Returns `block_sparse`'s keyword arguments as `longformer_mask` does, with one set of
/// lists per query head: `offsets (heads * num_q_blocks + 1,)`, `mask_heads = heads` (1
/// draws one set for every head).
#[pyfunction]
#[pyo3(signature = (seqlen_q, seqlen_k, window_blocks, global_blocks, random_blocks, *, heads=1, seed=0, block=128, causal=false, window=None, sinks=0))]
#[allow(clippy::too_many_arguments)]
fn bigbird_mask<'py>(
    py: Python<'py>,
    seqlen_q: usize,
    seqlen_k: usize,
    window_blocks: usize,
    global_blocks: usize,
    random_blocks: usize,
    heads: usize,
    seed: u64,
    block: usize,
    causal: bool,
    window: Option<(i64, i64)>,
    sinks: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let dims = (seqlen_q, seqlen_k, heads, block);
    mask_kwargs(py, dims, (causal, window, sinks), |s| {
        patterns::bigbird(s, window_blocks, global_blocks, random_blocks, seed)
    })
}

/// The random key blocks `bigbird_mask` adds for (`head`, query block position `q_block`,
/// i.e. `qb'`): `count` distinct blocks of `0..num_k_blocks` (all of them when `count >=
/// num_k_blocks`), increasing, from a partial Fisher-Yates shuffle driven by SplitMix64
/// seeded from `(seed, head, q_block)`. A list of ints.
#[pyfunction]
fn bigbird_random_blocks(
    seed: u64,
    head: usize,
    q_block: usize,
    num_k_blocks: usize,
    count: usize,
) -> PyResult<Vec<usize>> {
    patterns::bigbird_random_blocks(seed, head, q_block, num_k_blocks, count).map_err(mask_err)
}

/// Sparse Transformer, strided (Child et al. 2019, "Generating Long Sequences with Sparse
/// Transformers"), in blocks: query block `qb'` sees key block `kb` when `kb <= qb'` and
/// (`qb' - kb < stride` or `(qb' - kb) % stride == 0`); AND the element mask. `stride >= 1`.
///
/// Returns `block_sparse`'s keyword arguments as `longformer_mask` does (`mask_heads = 1`).
#[pyfunction]
#[pyo3(signature = (seqlen_q, seqlen_k, stride, *, block=128, causal=false, window=None, sinks=0))]
#[allow(clippy::too_many_arguments)]
fn sparse_transformer_strided_mask<'py>(
    py: Python<'py>,
    seqlen_q: usize,
    seqlen_k: usize,
    stride: usize,
    block: usize,
    causal: bool,
    window: Option<(i64, i64)>,
    sinks: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let dims = (seqlen_q, seqlen_k, 1, block);
    mask_kwargs(py, dims, (causal, window, sinks), |s| {
        patterns::sparse_transformer_strided(s, stride)
    })
}

/// Sparse Transformer, fixed (Child et al. 2019), in blocks: chunks of `stride` blocks;
/// query block `qb'` sees key block `kb` when `kb <= qb'` and (`kb // stride == qb' //
/// stride`, its own chunk, or `kb % stride >= stride - summary`, the last `summary` blocks of
/// every chunk); AND the element mask. `stride >= 1`.
///
/// Returns `block_sparse`'s keyword arguments as `longformer_mask` does (`mask_heads = 1`).
#[pyfunction]
#[pyo3(signature = (seqlen_q, seqlen_k, stride, summary, *, block=128, causal=false, window=None, sinks=0))]
#[allow(clippy::too_many_arguments)]
fn sparse_transformer_fixed_mask<'py>(
    py: Python<'py>,
    seqlen_q: usize,
    seqlen_k: usize,
    stride: usize,
    summary: usize,
    block: usize,
    causal: bool,
    window: Option<(i64, i64)>,
    sinks: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let dims = (seqlen_q, seqlen_k, 1, block);
    mask_kwargs(py, dims, (causal, window, sinks), |s| {
        patterns::sparse_transformer_fixed(s, stride, summary)
    })
}

/// Block-Attention for RAG (Sun et al. 2024, "Block-Attention for Efficient RAG"): the key
/// blocks split into consecutive passages of `passages[p]` blocks (a sequence of ints >= 1
/// summing to `ceil(seqlen_k / block)`); a query block at `qb'` sees the blocks of its own
/// passage, and one in the last passage (the user's query) sees every block; AND the element
/// mask (use `causal=True` for the causal inside).
///
/// Returns `block_sparse`'s keyword arguments as `longformer_mask` does (`mask_heads = 1`).
#[pyfunction]
#[pyo3(signature = (seqlen_q, seqlen_k, passages, *, block=128, causal=false, window=None, sinks=0))]
#[allow(clippy::too_many_arguments)]
fn block_attention_mask<'py>(
    py: Python<'py>,
    seqlen_q: usize,
    seqlen_k: usize,
    passages: Vec<usize>,
    block: usize,
    causal: bool,
    window: Option<(i64, i64)>,
    sinks: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let dims = (seqlen_q, seqlen_k, 1, block);
    mask_kwargs(py, dims, (causal, window, sinks), |s| {
        patterns::block_attention(s, &passages)
    })
}

/// Per-head windows (MSWA: Xu et al. 2025, "MSWA: Refining Local Attention with Multi-Scale
/// Window Attention"), in blocks: head `h` sees key block `kb` from query block `qb'` when
/// `0 <= qb' - kb < windows[h]` (each `>= 1`); AND the element mask (shared by every head).
/// `heads` defaults to `len(windows)` and must equal it.
///
/// Returns `block_sparse`'s keyword arguments as `longformer_mask` does, one set of lists
/// per query head: `offsets (heads * num_q_blocks + 1,)`, `mask_heads = heads`.
#[pyfunction]
#[pyo3(signature = (seqlen_q, seqlen_k, windows, *, heads=None, block=128, causal=false, window=None, sinks=0))]
#[allow(clippy::too_many_arguments)]
fn per_head_windows_mask<'py>(
    py: Python<'py>,
    seqlen_q: usize,
    seqlen_k: usize,
    windows: Vec<usize>,
    heads: Option<usize>,
    block: usize,
    causal: bool,
    window: Option<(i64, i64)>,
    sinks: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let dims = (seqlen_q, seqlen_k, heads.unwrap_or(windows.len()), block);
    mask_kwargs(py, dims, (causal, window, sinks), |s| {
        patterns::per_head_windows(s, &windows)
    })
}

/// DuoAttention at prefill (Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM
/// Inference with Retrieval and Streaming Heads"), in blocks: a streaming head
/// (`streaming[h]` true) sees key block `kb` from query block `qb'` when `kb <= qb'` and
/// (`kb < sink_blocks` or `qb' - kb < window_blocks`); a retrieval head sees every `kb <=
/// qb'`; AND the element mask (use `causal=True`). `heads` defaults to `len(streaming)` and
/// must equal it.
///
/// Returns `block_sparse`'s keyword arguments as `per_head_windows_mask` does (`mask_heads =
/// heads`).
#[pyfunction]
#[pyo3(signature = (seqlen_q, seqlen_k, streaming, sink_blocks, window_blocks, *, heads=None, block=128, causal=false, window=None, sinks=0))]
#[allow(clippy::too_many_arguments)]
fn streaming_heads_mask<'py>(
    py: Python<'py>,
    seqlen_q: usize,
    seqlen_k: usize,
    streaming: Vec<bool>,
    sink_blocks: usize,
    window_blocks: usize,
    heads: Option<usize>,
    block: usize,
    causal: bool,
    window: Option<(i64, i64)>,
    sinks: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let dims = (seqlen_q, seqlen_k, heads.unwrap_or(streaming.len()), block);
    mask_kwargs(py, dims, (causal, window, sinks), |s| {
        patterns::streaming_heads(s, &streaming, sink_blocks, window_blocks)
    })
}

/// Adds the constructors to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(longformer_mask, m)?)?;
    m.add_function(wrap_pyfunction!(bigbird_mask, m)?)?;
    m.add_function(wrap_pyfunction!(bigbird_random_blocks, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_transformer_strided_mask, m)?)?;
    m.add_function(wrap_pyfunction!(sparse_transformer_fixed_mask, m)?)?;
    m.add_function(wrap_pyfunction!(block_attention_mask, m)?)?;
    m.add_function(wrap_pyfunction!(per_head_windows_mask, m)?)?;
    m.add_function(wrap_pyfunction!(streaming_heads_mask, m)?)?;
    Ok(())
}
