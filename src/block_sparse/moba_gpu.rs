//! MoBA on the GPU (`kernels/moba.cu`): gating (mean-pooled keys, per-row top-k, per-tile
//! unions; or per query block, [`MobaGpuPlan::with_query_blocks`]) and the attention over the
//! per-row selections, on device buffers. The per-token gate scores on CUDA cores by
//! default, on tensor cores with [`MobaGate::TensorCore`] (opt-in, added 2026-12-05, also not
//! yet run on a GPU). The attention over a per-token selection is the per-tile union by
//! default, or the gather formulation with [`MobaAttention::Gather`] (opt-in, added
//! 2026-12-05, not yet run on a GPU; `super::moba_gather`).
//!
//! **NOT YET RUN ON A GPU** (compiled and register-checked only, 2026-12-04). Explicit
//! opt-in: only [`MobaGpuPlan::forward`] runs it; the CPU path ([`moba_attention`](super::moba::moba_attention),
//! [`BlockSparseAttention::forward_cpu`](super::BlockSparseAttention::forward_cpu))
//! is unchanged and remains the fallback.
//!
//! The selection is MoBA's per-token rule of [`moba_select_cpu`](super::moba::moba_select_cpu) with the same tie
//! rule (higher score first, lower block index on ties, NaN as `-inf`), but pooled keys and
//! scores are f32 (the CPU's are f64): a near-tie can flip between the two. The GPU tests
//! therefore compare the GPU's pooled keys with the CPU's within a tolerance, accept a GPU
//! choice that differs from the CPU's only where the two blocks' f64 scores are within a
//! tolerance of each other, and check the attention against the f64 reference run on the
//! GPU's own selection.

use super::RowBlocks;
use super::moba::MobaConfig;
use super::moba_gather::{MobaAttention, MobaGatherDims, MobaGatherIndex};
use crate::dense::FlashAttention;
use crate::dense::gpu::CuSeqlens;
use crate::element::{DType, Element};
use crate::error::{Error, Result};
use crate::gpu::{
    DeviceBuffer, DeviceBufferMut, check_attention_gpu, check_tensor_core_head_dim, cuda_call,
};
use crate::layout::{Strided, Strides};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use std::sync::Arc;

/// Largest `min(top_k, num_k_blocks)` the GPU gating takes (`LA_MOBA_MAX_TOP_K`).
pub const GPU_MAX_TOP_K: usize = 32;
/// Largest number of key blocks (`ceil(max_seqlen_k / block_n)`) the GPU gating takes
/// (`LA_MOBA_MAX_K_BLOCKS`: the per-tile union bitset lives in shared memory, 8 KiB).
pub const GPU_MAX_K_BLOCKS: usize = 65536;
/// Query rows per tile of the GPU kernels (`LA_MOBA_TILE_ROWS`): the unions are per tile of
/// this many rows, counted from row 0 of each sequence.
pub const GPU_TILE_ROWS: usize = 64;

/// How [`MobaGpuPlan`] scores the query rows against the pooled keys (per-token selection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MobaGate {
    /// f32 FMAs on CUDA cores (`moba_select_kernel`): the default.
    #[default]
    Simt,
    /// Tensor cores (`moba_select_tc_kernel`, mma.sync m16n8k16, f32 accumulators), **not
    /// yet run on a GPU**, explicit opt-in ([`MobaGpuPlan::with_gate`]). Each f32 pooled key
    /// is split into two f16/bf16 parts (`hi = T(p)`, `lo = T(p - hi)`) and the score is
    /// `q . hi + q . lo`: within about `2^-16 * sum |q_c p_c|` of the f32 score (the query
    /// is exact in its dtype), so the selection equals [`MobaGate::Simt`]'s except at
    /// near-ties (the same tie rule applies to the scores it computes). Per-token selection
    /// only.
    TensorCore,
}

/// The sizes of the GPU buffers of a MoBA problem, validated on the host
/// ([`MobaGpuDims::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MobaGpuDims {
    /// `ceil(max_seqlen_k / block_n)`.
    pub num_k_blocks: usize,
    /// Slots per row of the selection: `min(top_k, num_k_blocks)` (at least 1), the
    /// [`RowBlocks::top_k`] of the result, as [`moba_select_cpu`](super::moba::moba_select_cpu).
    pub slots: usize,
    /// Query tiles per (sequence, head): `ceil(max_seqlen_q / GPU_TILE_ROWS)`.
    pub num_tiles: usize,
    /// Entries per tile union: `min(num_k_blocks, GPU_TILE_ROWS * slots)`.
    pub union_width: usize,
}

impl MobaGpuDims {
    /// Checks everything the GPU path needs that is independent of the buffers and the
    /// dtype, and sizes its buffers: `config` valid, lengths within
    /// `i32::MAX - 2^16` (the GPU position limit), `block_n` a multiple of
    /// [`GPU_BLOCK_MULTIPLE`](super::GPU_BLOCK_MULTIPLE), head dim 64/128/256,
    /// `min(top_k, num_k_blocks) <= GPU_MAX_TOP_K`, `num_k_blocks <= GPU_MAX_K_BLOCKS`, batch
    /// and heads within the grid, buffer sizes within `i32`/`usize`. What the kernels do not
    /// take is `Error::Unsupported`; a bad config is `Error::InvalidOption`.
    pub fn new(attn: &FlashAttention, config: &MobaConfig) -> Result<Self> {
        config.check()?;
        attn.check_gpu_positions("MoBA")?;
        let block_n = config.block_n;
        if !block_n.is_multiple_of(super::GPU_BLOCK_MULTIPLE) {
            return Err(Error::Unsupported(format!(
                "MoBA on the GPU: block_n = {block_n} must be a multiple of 64"
            )));
        }
        check_tensor_core_head_dim("MoBA on the GPU takes", attn.head_dim())?;
        crate::gpu::check_grid_yz(attn.batch(), ("heads_q", attn.heads_q()))?;
        let num_k_blocks = attn.max_seqlen_k().div_ceil(block_n);
        if num_k_blocks > GPU_MAX_K_BLOCKS {
            return Err(Error::Unsupported(format!(
                "MoBA on the GPU: {num_k_blocks} key blocks, at most {GPU_MAX_K_BLOCKS}"
            )));
        }
        let slots = config.top_k.min(num_k_blocks).max(1);
        if slots > GPU_MAX_TOP_K {
            return Err(Error::Unsupported(format!(
                "MoBA on the GPU: top_k = {slots} (after the cap at the key block count), at \
                 most {GPU_MAX_TOP_K}"
            )));
        }
        let num_tiles = attn.max_seqlen_q().div_ceil(GPU_TILE_ROWS);
        let union_width = num_k_blocks.min(GPU_TILE_ROWS * slots);
        let dims = MobaGpuDims {
            num_k_blocks,
            slots,
            num_tiles,
            union_width,
        };
        // Every buffer's element count fits i32 index math in the kernels' 64-bit offsets;
        // the counts themselves must fit usize and the tile count i32.
        dims.pooled_len(attn)?;
        dims.rows_len(attn)?;
        dims.unions_len(attn)?;
        i32::try_from(num_tiles).map_err(|_| Error::Shape("MoBA: too many query tiles".into()))?;
        Ok(dims)
    }

    /// [`MobaGpuDims::new`] for selection at query-block granularity
    /// ([`moba_select_blocks_cpu`](super::moba::moba_select_blocks_cpu)) with query blocks of
    /// `block_m` rows: `block_m` a multiple of 64 as well, and the slots hold the longest list,
    /// `min(num_k_blocks, max(top_k, (block_m - 1) / block_n + 2))` (the diagonal blocks of a
    /// query block count against `top_k` but are always listed), at most [`GPU_MAX_TOP_K`].
    pub fn for_query_blocks(
        attn: &FlashAttention,
        config: &MobaConfig,
        block_m: usize,
    ) -> Result<Self> {
        config.check()?;
        if block_m == 0 || !block_m.is_multiple_of(super::GPU_BLOCK_MULTIPLE) {
            return Err(Error::Unsupported(format!(
                "MoBA on the GPU: block_m = {block_m} must be a multiple of 64"
            )));
        }
        // LaMobaParams::block_m is i32: a larger block_m would reach the kernel truncated
        // (2^32 + 64 as 64), and where the truncated list width still matched, the kernel
        // would gate 64-row blocks instead of one block holding every row.
        if i32::try_from(block_m).is_err() {
            return Err(Error::Unsupported(format!(
                "MoBA on the GPU: block_m = {block_m} does not fit i32"
            )));
        }
        let token = Self::new(
            attn,
            &MobaConfig {
                top_k: 1,
                ..*config
            },
        )?;
        let diag = (block_m - 1) / config.block_n + 2;
        let slots = config.top_k.max(diag).min(token.num_k_blocks).max(1);
        if slots > GPU_MAX_TOP_K {
            return Err(Error::Unsupported(format!(
                "MoBA on the GPU: {slots} blocks per query block list (top_k {} or the {diag} \
                 diagonal blocks, capped at the key block count), at most {GPU_MAX_TOP_K}",
                config.top_k
            )));
        }
        let dims = MobaGpuDims {
            slots,
            union_width: token.num_k_blocks.min(GPU_TILE_ROWS * slots),
            ..token
        };
        dims.rows_len(attn)?;
        dims.unions_len(attn)?;
        Ok(dims)
    }

    pub(crate) fn product(what: &str, dims: &[usize]) -> Result<usize> {
        dims.iter()
            .try_fold(1usize, |a, &x| a.checked_mul(x))
            .filter(|&n| n <= i64::MAX as usize)
            .ok_or_else(|| Error::Shape(format!("MoBA on the GPU: {what} overflows")))
    }
    /// `[batch, heads_kv, num_k_blocks, head_dim]` f32.
    fn pooled_len(&self, attn: &FlashAttention) -> Result<usize> {
        let d = [
            attn.batch(),
            attn.heads_kv(),
            self.num_k_blocks,
            attn.head_dim(),
        ];
        Self::product("pooled keys", &d)
    }
    /// `[rows, slots]` i32 (rows in LSE order).
    fn rows_len(&self, attn: &FlashAttention) -> Result<usize> {
        Self::product("row selections", &[attn.lse_len(), self.slots])
    }
    /// `[batch, heads_q, num_tiles]` (times `union_width` for the lists).
    fn unions_len(&self, attn: &FlashAttention) -> Result<usize> {
        let d = [
            attn.batch(),
            attn.heads_q(),
            self.num_tiles,
            self.union_width,
        ];
        Self::product("tile unions", &d)?;
        Self::product("tile unions", &d[..3])
    }
}

/// MoBA (gating + attention) on the GPU for one problem, with its device scratch buffers:
/// the pooled keys `[batch, heads_kv, num_k_blocks, head_dim]` f32, the per-row selections
/// `[rows, slots]` i32 ([`RowBlocks`] layout, rows in LSE order), and the per-64-row-tile
/// unions `[batch, heads_q, num_tiles, union_width]` i32 with their counts
/// `[batch, heads_q, num_tiles]` ([`MobaGpuDims`]). [`MobaGpuPlan::forward`] allocates and
/// copies nothing (CUDA-graph capturable). The buffers live on the stream that built the
/// plan; use the plan on that stream. **NOT YET RUN ON A GPU.**
#[derive(Debug)]
pub struct MobaGpuPlan {
    attn: FlashAttention,
    config: MobaConfig,
    /// Query-block granularity: rows per query block (else per-token selection).
    block_m: Option<usize>,
    gate: MobaGate,
    dims: MobaGpuDims,
    bufs: Buffers,
    /// The gather attention's scratch ([`MobaAttention::Gather`]); `None`: the union path.
    gather: Option<GatherBuffers>,
}

#[derive(Debug)]
#[cfg_attr(not(longattn_cuda), allow(dead_code))]
struct Buffers {
    pooled: CudaSlice<f32>,
    rows: CudaSlice<i32>,
    union_blocks: CudaSlice<i32>,
    union_count: CudaSlice<i32>,
    cu_seqlens: Option<CuSeqlens>,
}

/// The gather attention's scratch ([`MobaGatherDims`], `LaMobaGatherParams`): the transpose
/// (counts, entries, work items and their counts), the partials (`[slots, rows, head_dim]` in
/// the output dtype, 2 bytes, and `[slots, rows]` f32) and the merge's slot table
/// ([`super::moba_gather::merge_table`]).
#[derive(Debug)]
#[cfg_attr(not(longattn_cuda), allow(dead_code))]
struct GatherBuffers {
    dims: MobaGatherDims,
    counts: CudaSlice<i32>,
    entries: CudaSlice<i32>,
    work: CudaSlice<i32>,
    work_count: CudaSlice<i32>,
    partial_o: CudaSlice<u16>,
    partial_lse: CudaSlice<f32>,
    slots: CudaSlice<i64>,
    segments: CudaSlice<i32>,
    slot_list: CudaSlice<i32>,
}

impl GatherBuffers {
    fn new(attn: &FlashAttention, dims: &MobaGpuDims, stream: &Arc<CudaStream>) -> Result<Self> {
        let g = MobaGatherDims::new(attn, dims)?;
        let (slots, segments, slot_list) = super::moba_gather::merge_table(attn, dims, &g)?;
        let n = |len: usize| len.max(1);
        Ok(GatherBuffers {
            dims: g,
            counts: stream.alloc_zeros::<i32>(n(g.counts_len(attn, dims)?))?,
            entries: stream.alloc_zeros::<i32>(n(g.entries_len(dims)?))?,
            work: stream.alloc_zeros::<i32>(n(g.work_len(attn)?))?,
            work_count: stream.alloc_zeros::<i32>(n(attn.batch() * attn.heads_q()))?,
            partial_o: stream.alloc_zeros::<u16>(n(g.partial_o_len(attn, dims)?))?,
            partial_lse: stream.alloc_zeros::<f32>(n(g.partial_lse_len(dims)?))?,
            slots: stream.clone_htod(&slots)?,
            segments: stream.clone_htod(&segments)?,
            slot_list: stream.clone_htod(&slot_list)?,
        })
    }
}

impl MobaGpuPlan {
    /// Validates `attn` and `config` on the host ([`MobaGpuDims::new`]), then allocates the
    /// scratch buffers and copies the varlen offsets on `stream`. `attn`'s options are the
    /// element mask applied with the selection (MoBA's are causal).
    pub fn new(
        attn: &FlashAttention,
        config: &MobaConfig,
        stream: &Arc<CudaStream>,
    ) -> Result<Self> {
        let dims = MobaGpuDims::new(attn, config)?;
        Self::build(attn, config, None, dims, stream)
    }

    /// [`MobaGpuPlan::new`] with selection at query-block granularity: each query block of
    /// `block_m` rows (a multiple of 64) selects once, on the mean of its rows, exactly as
    /// [`moba_select_blocks_cpu`](super::moba::moba_select_blocks_cpu) (f32 here), and all its
    /// rows get its list ([`MobaGpuDims::for_query_blocks`]). The attention is the same.
    pub fn with_query_blocks(
        attn: &FlashAttention,
        config: &MobaConfig,
        block_m: usize,
        stream: &Arc<CudaStream>,
    ) -> Result<Self> {
        let dims = MobaGpuDims::for_query_blocks(attn, config, block_m)?;
        Self::build(attn, config, Some(block_m), dims, stream)
    }

    fn build(
        attn: &FlashAttention,
        config: &MobaConfig,
        block_m: Option<usize>,
        dims: MobaGpuDims,
        stream: &Arc<CudaStream>,
    ) -> Result<Self> {
        // At least one element each, so the kernels never see a null array.
        let n = |len: usize| len.max(1);
        let bufs = Buffers {
            pooled: stream.alloc_zeros::<f32>(n(dims.pooled_len(attn)?))?,
            rows: stream.alloc_zeros::<i32>(n(dims.rows_len(attn)?))?,
            union_blocks: stream
                .alloc_zeros::<i32>(n(dims.unions_len(attn)? * dims.union_width))?,
            union_count: stream.alloc_zeros::<i32>(n(dims.unions_len(attn)?))?,
            cu_seqlens: attn.upload_varlen(stream)?,
        };
        Ok(MobaGpuPlan {
            attn: attn.clone(),
            config: *config,
            block_m,
            gate: MobaGate::Simt,
            dims,
            bufs,
            gather: None,
        })
    }

    /// The problem.
    pub fn problem(&self) -> &FlashAttention {
        &self.attn
    }
    /// The MoBA configuration.
    pub fn config(&self) -> MobaConfig {
        self.config
    }
    /// The buffer sizes.
    pub fn dims(&self) -> MobaGpuDims {
        self.dims
    }
    /// Rows per query block at query-block granularity; `None` for per-token selection.
    pub fn query_block(&self) -> Option<usize> {
        self.block_m
    }
    /// How the gate scores ([`MobaGate::Simt`] unless [`MobaGpuPlan::with_gate`] chose).
    pub fn gate(&self) -> MobaGate {
        self.gate
    }

    /// How the attention runs ([`MobaAttention::Union`] unless
    /// [`MobaGpuPlan::with_attention`] chose).
    pub fn attention(&self) -> MobaAttention {
        if self.gather.is_some() {
            MobaAttention::Gather
        } else {
            MobaAttention::Union
        }
    }
    /// The gather attention's scratch sizes (`None` on the union path).
    pub fn gather_dims(&self) -> Option<MobaGatherDims> {
        self.gather.as_ref().map(|g| g.dims)
    }

    /// The plan with its attention run as `attention`: [`MobaAttention::Gather`] is the
    /// opt-in gather formulation (**not yet run on a GPU**), which allocates its scratch
    /// here ([`MobaGatherDims::new`], on the stream that built the plan); per-token
    /// selection only (`Error::Unsupported` for a query-block plan, whose rows share their
    /// lists, so the union path computes no pair it does not show). [`MobaAttention::Union`]
    /// frees that scratch.
    pub fn with_attention(mut self, attention: MobaAttention) -> Result<Self> {
        self.gather = match attention {
            MobaAttention::Union => None,
            MobaAttention::Gather => {
                if self.block_m.is_some() {
                    return Err(Error::Unsupported(
                        "MoBA on the GPU: the gather attention takes per-token selection only; \
                         query blocks keep the union attention"
                            .into(),
                    ));
                }
                let stream = self.bufs.pooled.stream().clone();
                Some(GatherBuffers::new(&self.attn, &self.dims, &stream)?)
            }
        };
        Ok(self)
    }

    /// The transpose of the last [`MobaGpuPlan::forward`]'s selection on the gather path,
    /// copied to the host (synchronizes `stream`; [`MobaGatherIndex`], equal to
    /// [`moba_gather_index_cpu`](super::moba::moba_gather_index_cpu) of
    /// [`MobaGpuPlan::row_blocks`]). `Error::InvalidOption` on the union path.
    pub fn gather_index(&self, stream: &Arc<CudaStream>) -> Result<MobaGatherIndex> {
        let g = self.gather.as_ref().ok_or_else(|| {
            Error::InvalidOption("MoBA: gather_index needs MobaAttention::Gather".into())
        })?;
        let entries = stream.clone_dtoh(&g.entries)?;
        let work = stream.clone_dtoh(&g.work)?;
        let count = stream.clone_dtoh(&g.work_count)?;
        super::moba_gather::index_from_device(
            &self.attn, &self.dims, &g.dims, &entries, &work, &count,
        )
    }

    /// The plan with its per-token gate scored by `gate`; [`MobaGate::TensorCore`] is the
    /// opt-in tensor-core gate (**not yet run on a GPU**). A query-block plan
    /// ([`MobaGpuPlan::with_query_blocks`]) takes [`MobaGate::Simt`] only
    /// (`Error::Unsupported` otherwise: its gate scores one mean query per block, not a tile).
    pub fn with_gate(mut self, gate: MobaGate) -> Result<Self> {
        if gate == MobaGate::TensorCore && self.block_m.is_some() {
            return Err(Error::Unsupported(
                "MoBA on the GPU: the tensor-core gate scores per-token selection only, not \
                 query blocks"
                    .into(),
            ));
        }
        self.gate = gate;
        Ok(self)
    }

    /// Gating then attention on `stream` (the caller's; nothing is synchronized), two kernel
    /// launches for the gating and one for the attention (the gather attention: three for
    /// the transpose, one for the attention, one for the merge):
    /// - `q: [batch, seqlen_q, heads_q, head_dim]` (or `[total_q, heads_q, head_dim]` with
    ///   varlen), `k, v: [batch, seqlen_k, heads_kv, head_dim]` (or `[total_k, ...]`), `out`
    ///   like `q`, `lse: [batch, heads_q, seqlen_q]` (or `[heads_q, total_q]`) f32, optional;
    ///   element strides, pointers 16-byte aligned, strides multiples of 8 elements;
    /// - f16 or bf16; a device of compute capability 8.0 or newer.
    ///
    /// Row `i` sees key `j` iff `j`'s block is in the row's selection (its own block plus the
    /// `top_k - 1` best earlier blocks by `q_i . mean(k[block])`) and the options' element
    /// mask shows `(i, j)`; a row that sees nothing gets output 0 and LSE `-inf`. The
    /// selection stays in the plan ([`MobaGpuPlan::row_blocks`]). Every check happens on the
    /// host before any device pointer is taken; errors, never panics.
    pub fn forward<T, I, O>(
        &mut self,
        stream: &Arc<CudaStream>,
        q: Strided<&I>,
        k: Strided<&I>,
        v: Strided<&I>,
        out: Strided<&mut O>,
        lse: Option<&mut dyn DeviceBufferMut<f32>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        I: DeviceBuffer<T>,
        O: DeviceBufferMut<T>,
    {
        self.check(
            T::DTYPE,
            [q.extent(), k.extent(), v.extent(), out.extent()],
            lse.as_ref().map(|l| l.len()),
        )?;
        cuda_call!(
            launch,
            self,
            stream,
            q,
            k,
            v,
            out,
            lse,
            Stages::GateAndAttention
        )
    }

    /// The gating of [`MobaGpuPlan::forward`] alone (pooling and selection, the same
    /// launches; the attention is not launched): the selection is left in the plan
    /// ([`MobaGpuPlan::row_blocks`]) and `out` and `lse` are not written. It takes
    /// `forward`'s arguments and runs its checks, so that a caller times the gate of exactly
    /// the call it makes (`family_bench` reports the gate's share of the end-to-end time
    /// this way). **NOT YET RUN ON A GPU.**
    pub fn select<T, I, O>(
        &mut self,
        stream: &Arc<CudaStream>,
        q: Strided<&I>,
        k: Strided<&I>,
        v: Strided<&I>,
        out: Strided<&mut O>,
        lse: Option<&mut dyn DeviceBufferMut<f32>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        I: DeviceBuffer<T>,
        O: DeviceBufferMut<T>,
    {
        self.check(
            T::DTYPE,
            [q.extent(), k.extent(), v.extent(), out.extent()],
            lse.as_ref().map(|l| l.len()),
        )?;
        cuda_call!(launch, self, stream, q, k, v, out, lse, Stages::Gate)
    }

    /// Every check of [`MobaGpuPlan::forward`] that needs no device pointer: the buffers'
    /// extents and strides (as the CPU path), then dtype, head dim and grid limits.
    pub(crate) fn check(
        &self,
        dtype: DType,
        bufs: [(usize, &Strides); 4],
        lse_len: Option<usize>,
    ) -> Result<()> {
        let a = &self.attn;
        a.check_buffers(bufs[0], bufs[1], bufs[2], bufs[3], lse_len)?;
        check_attention_gpu("MoBA", dtype, a.head_dim, a.batch, a.heads_q)
    }

    /// The selection of the last [`MobaGpuPlan::forward`], copied to the host (synchronizes
    /// `stream`): [`RowBlocks`] with `block_n` and [`MobaGpuDims::slots`] slots per row,
    /// validated against the problem.
    pub fn row_blocks(&self, stream: &Arc<CudaStream>) -> Result<RowBlocks> {
        let mut blocks = stream.clone_dtoh(&self.bufs.rows)?;
        blocks.truncate(self.dims.rows_len(&self.attn)?);
        let rows = RowBlocks::new(self.config.block_n, self.dims.slots, blocks)?;
        super::check_row_blocks(&self.attn, &rows)?;
        Ok(rows)
    }

    /// The pooled keys of the last [`MobaGpuPlan::forward`] (synchronizes `stream`):
    /// `[batch, heads_kv, num_k_blocks, head_dim]` f32, the mean of each key block (blocks
    /// past a varlen sequence's end hold stale values), the layout of
    /// [`moba_pooled_keys_cpu`](super::moba::moba_pooled_keys_cpu).
    pub fn pooled_keys(&self, stream: &Arc<CudaStream>) -> Result<Vec<f32>> {
        let mut pooled = stream.clone_dtoh(&self.bufs.pooled)?;
        pooled.truncate(self.dims.pooled_len(&self.attn)?);
        Ok(pooled)
    }

    /// The key blocks each 64-row tile visited in the last [`MobaGpuPlan::forward`]
    /// (synchronizes `stream`): one increasing list per (sequence, query head, tile),
    /// row-major over `[batch, heads_q, num_tiles]`, empty for tiles past a varlen
    /// sequence's end; the layout of [`moba_tile_unions`](super::moba::moba_tile_unions).
    pub fn tile_unions(&self, stream: &Arc<CudaStream>) -> Result<Vec<Vec<i32>>> {
        let counts = stream.clone_dtoh(&self.bufs.union_count)?;
        let blocks = stream.clone_dtoh(&self.bufs.union_blocks)?;
        let (nt, w) = (self.dims.num_tiles, self.dims.union_width);
        let mut lists = Vec::with_capacity(self.dims.unions_len(&self.attn)?);
        for (b, span) in self.attn.spans().enumerate() {
            for h in 0..self.attn.heads_q() {
                for x in 0..nt {
                    let t = (b * self.attn.heads_q() + h) * nt + x;
                    if x * GPU_TILE_ROWS >= span.seqlen_q {
                        lists.push(Vec::new());
                        continue;
                    }
                    let n = usize::try_from(counts[t]).unwrap_or(0).min(w);
                    lists.push(blocks[t * w..t * w + n].to_vec());
                }
            }
        }
        Ok(lists)
    }
}

/// The launches of one call: [`MobaGpuPlan::select`] stops after the gating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stages {
    Gate,
    GateAndAttention,
}

#[cfg(longattn_cuda)]
#[allow(clippy::too_many_arguments)]
fn launch<T, I, O>(
    plan: &mut MobaGpuPlan,
    stream: &Arc<CudaStream>,
    q: Strided<&I>,
    k: Strided<&I>,
    v: Strided<&I>,
    out: Strided<&mut O>,
    lse: Option<&mut dyn DeviceBufferMut<f32>>,
    stages: Stages,
) -> Result<()>
where
    T: Element + DeviceRepr,
    I: DeviceBuffer<T>,
    O: DeviceBufferMut<T>,
{
    use crate::dense::gpu::ffi_params;
    use crate::gpu::{QkvoPtrs, check_launch, ffi, ptr_mut_or_null, ptr_or_null};
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    let attn = &plan.attn;
    if attn.total_q == 0 {
        return Ok(());
    }
    let ptrs = QkvoPtrs::new(stream, &q, &k, &v, (&mut *out.data, &out.strides))?;
    let bufs = &mut plan.bufs;
    let cu = bufs.cu_seqlens.as_ref();
    let (cu_q, _cq_sync) = ptr_or_null(cu.map(|(cq, _)| cq), stream);
    let (cu_k, _ck_sync) = ptr_or_null(cu.map(|(_, ck)| ck), stream);
    let (lse_ptr, _lse_sync) = ptr_mut_or_null(lse, stream);
    let (pooled, _pooled_sync) = bufs.pooled.device_ptr_mut(stream);
    let (rows, _rows_sync) = bufs.rows.device_ptr_mut(stream);
    let (union_blocks, _ub_sync) = bufs.union_blocks.device_ptr_mut(stream);
    let (union_count, _uc_sync) = bufs.union_count.device_ptr_mut(stream);
    let strides = [&q.strides, &k.strides, &v.strides, &out.strides];
    let d = plan.dims;
    // Dims fit i32: MobaGpuDims::new bounds the block and tile counts, top_k and the width.
    let params = ffi::LaMobaParams {
        dense: ffi_params::<T>(attn, &ptrs, strides, (cu_q, cu_k), lse_ptr),
        pooled: pooled as *mut f32,
        row_blocks: rows as *mut i32,
        union_blocks: union_blocks as *mut i32,
        union_count: union_count as *mut i32,
        num_k_blocks: d.num_k_blocks as i32,
        block_n: plan.config.block_n as i32,
        top_k: d.slots as i32,
        num_tiles: d.num_tiles as i32,
        union_width: d.union_width as i32,
        block_m: plan.block_m.unwrap_or(0) as i32,
        select_k: plan.config.top_k.min(i32::MAX as usize) as i32,
    };
    let unsupported = |code: i32| {
        (code == ffi::LA_DENSE_KERNEL_UNSUPPORTED as i32).then(|| {
            Error::Unsupported(
                "MoBA on the GPU needs a device of compute capability 8.0 or newer with its \
                 shared memory"
                    .into(),
            )
        })
    };
    let s = crate::gpu::launch_stream(stream)? as _;
    // SAFETY: every pointer comes from a live cudarc buffer whose extent was checked against
    // the strides (q, k, v, out, lse) or that the plan sized from the same validated dims
    // (pooled, rows, unions); both launches are ordered on `stream`, and the sync guards
    // keep cudarc's event tracking correct until they are queued.
    let (code, what) = unsafe {
        match (plan.block_m, plan.gate) {
            (None, MobaGate::Simt) => (ffi::la_moba_select(&params, s), "la_moba_select"),
            (None, MobaGate::TensorCore) => {
                (ffi::la_moba_select_tc(&params, s), "la_moba_select_tc")
            }
            (Some(_), _) => (
                ffi::la_moba_select_blocks(&params, s),
                "la_moba_select_blocks",
            ),
        }
    };
    if let Some(e) = unsupported(code) {
        return Err(e);
    }
    check_launch(what, code)?;
    if stages == Stages::Gate {
        return Ok(());
    }
    let Some(g) = plan.gather.as_mut() else {
        // SAFETY: as above; the attention reads the selections the select launch writes, in
        // stream order.
        let code =
            unsafe { ffi::la_moba_attention(&params, crate::gpu::launch_stream(stream)? as _) };
        if let Some(e) = unsupported(code) {
            return Err(e);
        }
        return check_launch("la_moba_attention", code);
    };
    let (counts, _c_sync) = g.counts.device_ptr_mut(stream);
    let (entries, _e_sync) = g.entries.device_ptr_mut(stream);
    let (work, _w_sync) = g.work.device_ptr_mut(stream);
    let (work_count, _wc_sync) = g.work_count.device_ptr_mut(stream);
    let (partial_o, _po_sync) = g.partial_o.device_ptr_mut(stream);
    let (partial_lse, _pl_sync) = g.partial_lse.device_ptr_mut(stream);
    let gd = g.dims;
    // Fit i32 / i64: MobaGatherDims::new checked them.
    let gp = ffi::LaMobaGatherParams {
        moba: params,
        counts: counts as *mut i32,
        entries: entries as *mut i32,
        work: work as *mut i32,
        work_count: work_count as *mut i32,
        partial_o: partial_o as *mut _,
        partial_lse: partial_lse as *mut f32,
        rows: gd.rows as i64,
        num_chunks: gd.num_chunks as i32,
        max_work: gd.max_work as i32,
    };
    // SAFETY: as above; the scratch was sized by MobaGatherDims from the same dims and
    // problem; the transpose reads the selections of the select launch, in stream order.
    let code = unsafe { ffi::la_moba_gather_index(&gp, s) };
    if let Some(e) = unsupported(code) {
        return Err(e);
    }
    check_launch("la_moba_gather_index", code)?;
    // SAFETY: as above; the attention reads the transpose, in stream order.
    let code = unsafe { ffi::la_moba_gather_attention(&gp, s) };
    if let Some(e) = unsupported(code) {
        return Err(e);
    }
    check_launch("la_moba_gather_attention", code)?;
    // The merge: every (row, slot) partial was written (chosen slots by the attention,
    // padding slots by the transpose), one segment lists all slots (merge_table).
    let (slots, _s_sync) = g.slots.device_ptr(stream);
    let (segments, _sg_sync) = g.segments.device_ptr(stream);
    let (slot_list, _sl_sync) = g.slot_list.device_ptr(stream);
    let os = &out.strides;
    let merge = ffi::LaRingGatherParams {
        slots_o: partial_o as *const _,
        slots_lse: partial_lse as *const f32,
        slots: slots as *const i64,
        segments: segments as *const i32,
        slot_list: slot_list as *const i32,
        out: params.dense.o,
        lse: params.dense.lse,
        out_batch_stride: if attn.is_varlen() { 0 } else { os.batch },
        out_row_stride: os.seq,
        out_head_stride: os.head,
        segment_count: 1,
        batch: if attn.is_varlen() {
            1
        } else {
            attn.batch() as i32
        },
        heads: attn.heads_q() as i32,
        len: super::moba_gather::merge_len(attn) as i32,
        head_dim: attn.head_dim() as i32,
        dtype: params.dense.dtype,
    };
    // SAFETY: out and lse were checked against the problem (forward's check); the slot
    // table lies in the partial buffers (merge_table, tested); in stream order after the
    // attention.
    let code = unsafe { ffi::la_ring_gather(&merge, s) };
    check_launch("la_ring_gather", code)
}

/// Valid-looking MoBA params over dangling pointers (batch 1, 100 x 300 tokens, 2/1 heads,
/// d64, bf16, causal, 5 key blocks of 64, top-3), for tests of the C launchers' argument
/// checks, which refuse bad params before any pointer is touched.
#[cfg(all(test, longattn_cuda))]
pub(super) fn fake_moba_params(block_m: i32) -> crate::gpu::ffi::LaMobaParams {
    use crate::gpu::ffi;
    let fake = std::ptr::NonNull::<u64>::dangling().as_ptr();
    let dense = ffi::LaDenseParams {
        q: fake as *const _,
        k: fake as *const _,
        v: fake as *const _,
        o: fake as *mut _,
        batch: 1,
        seqlen_q: 100,
        seqlen_k: 300,
        heads_q: 2,
        heads_kv: 1,
        head_dim: 64,
        total_q: 100,
        total_k: 300,
        window_left: -1,
        window_right: 0,
        scale: 0.125,
        dtype: ffi::LaDtype::LA_BF16,
        ..Default::default()
    };
    ffi::LaMobaParams {
        dense,
        pooled: fake as *mut f32,
        row_blocks: fake as *mut i32,
        union_blocks: fake as *mut i32,
        union_count: fake as *mut i32,
        num_k_blocks: 5,
        block_n: 64,
        top_k: 3,
        num_tiles: 2,
        union_width: 5,
        block_m,
        select_k: 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::{AttentionOptions, AttentionShape};
    use crate::layout::SeqLens;

    fn attn(sq: usize, sk: usize, d: usize) -> FlashAttention {
        FlashAttention::new(
            &AttentionShape {
                batch: 2,
                heads_q: 4,
                heads_kv: 2,
                head_dim: d,
                seqlens: SeqLens::Fixed {
                    seqlen_q: sq,
                    seqlen_k: sk,
                },
            },
            &AttentionOptions::causal(),
        )
        .unwrap()
    }

    #[test]
    fn dims_size_the_buffers() {
        let cfg = MobaConfig {
            block_n: 128,
            top_k: 3,
        };
        let d = MobaGpuDims::new(&attn(200, 1000, 64), &cfg).unwrap();
        assert_eq!(
            d,
            MobaGpuDims {
                num_k_blocks: 8,
                slots: 3,
                num_tiles: 4,
                union_width: 8,
            }
        );
        // top_k capped at the key block count; an empty key side keeps one slot.
        let d = MobaGpuDims::new(&attn(64, 100, 128), &cfg).unwrap();
        assert_eq!((d.num_k_blocks, d.slots, d.union_width), (1, 1, 1));
        let d = MobaGpuDims::new(&attn(64, 0, 256), &cfg).unwrap();
        assert_eq!((d.num_k_blocks, d.slots, d.union_width), (0, 1, 0));
        let cfg = MobaConfig {
            block_n: 64,
            top_k: 32,
        };
        let d = MobaGpuDims::new(&attn(10, 1 << 16, 64), &cfg).unwrap();
        assert_eq!((d.slots, d.union_width), (32, 1024));
    }

    #[test]
    fn query_block_dims_hold_the_longest_list() {
        let cfg = MobaConfig {
            block_n: 64,
            top_k: 2,
        };
        // block_m 128 over 64-key blocks: up to 3 diagonal blocks, more than top_k.
        let d = MobaGpuDims::for_query_blocks(&attn(200, 1000, 64), &cfg, 128).unwrap();
        assert_eq!((d.num_k_blocks, d.slots, d.union_width), (16, 3, 16));
        let cfg = MobaConfig {
            block_n: 64,
            top_k: 6,
        };
        let d = MobaGpuDims::for_query_blocks(&attn(200, 1000, 64), &cfg, 64).unwrap();
        assert_eq!(d.slots, 6);
        // Capped at the key block count.
        let d = MobaGpuDims::for_query_blocks(&attn(200, 130, 64), &cfg, 64).unwrap();
        assert_eq!(d.slots, 3);
        for bm in [0, 32, 96, (1 << 32) + 64] {
            let r = MobaGpuDims::for_query_blocks(&attn(200, 1000, 64), &cfg, bm);
            assert!(
                matches!(&r, Err(Error::Unsupported(m)) if m.contains("block_m")),
                "{bm}: {r:?}"
            );
        }
        // 64 * 31 = 1984 rows over 64-key blocks: 32 diagonal blocks fit, 33 do not.
        let cfg1 = MobaConfig {
            block_n: 64,
            top_k: 1,
        };
        let long = attn(64, 64 * 40, 64);
        assert_eq!(
            MobaGpuDims::for_query_blocks(&long, &cfg1, 64 * 31)
                .unwrap()
                .slots,
            32
        );
        let r = MobaGpuDims::for_query_blocks(&long, &cfg1, 64 * 32);
        assert!(matches!(&r, Err(Error::Unsupported(_))), "{r:?}");
    }

    #[test]
    fn dims_refuse_what_the_kernels_do_not_take() {
        let ok = MobaConfig {
            block_n: 128,
            top_k: 4,
        };
        let unsupported = |a: &FlashAttention, c: &MobaConfig, what: &str| {
            let r = MobaGpuDims::new(a, c);
            assert!(
                matches!(&r, Err(Error::Unsupported(m)) if m.contains(what)),
                "{what}: {r:?}"
            );
        };
        for block_n in [32, 96, 100] {
            unsupported(
                &attn(64, 512, 64),
                &MobaConfig { block_n, ..ok },
                "multiple of 64",
            );
        }
        for d in [32, 96, 40] {
            unsupported(&attn(64, 512, d), &ok, "head_dim");
        }
        let big = MobaConfig {
            block_n: 64,
            top_k: 33,
        };
        unsupported(&attn(64, 64 * 40, 64), &big, "top_k = 33");
        // 33 requested but only 20 blocks: 20 slots, accepted.
        MobaGpuDims::new(&attn(64, 64 * 20, 64), &big).unwrap();
        let many = MobaConfig {
            block_n: 64,
            top_k: 2,
        };
        unsupported(&attn(64, 64 * 65537, 64), &many, "key blocks");
        for bad in [
            MobaConfig {
                block_n: 0,
                top_k: 1,
            },
            MobaConfig {
                block_n: 64,
                top_k: 0,
            },
        ] {
            let r = MobaGpuDims::new(&attn(64, 64, 64), &bad);
            assert!(matches!(r, Err(Error::InvalidOption(_))), "{bad:?}: {r:?}");
        }
    }

    /// The C launchers refuse bad params before any CUDA call (so this runs without a GPU).
    #[cfg(longattn_cuda)]
    #[test]
    fn c_entries_refuse_bad_params() {
        use crate::gpu::ffi;
        const INVALID_VALUE: i32 = 1; // cudaErrorInvalidValue
        let ok = fake_moba_params(128);
        let cases = [
            ffi::LaMobaParams {
                pooled: std::ptr::null_mut(),
                ..ok
            },
            ffi::LaMobaParams {
                union_count: std::ptr::null_mut(),
                ..ok
            },
            ffi::LaMobaParams { block_n: 96, ..ok },
            ffi::LaMobaParams {
                num_k_blocks: 4,
                ..ok
            },
            ffi::LaMobaParams { top_k: 0, ..ok },
            ffi::LaMobaParams { top_k: 6, ..ok },
            ffi::LaMobaParams { num_tiles: 1, ..ok },
            ffi::LaMobaParams {
                union_width: 4,
                ..ok
            },
            ffi::LaMobaParams {
                dense: ffi::LaDenseParams {
                    heads_kv: 0,
                    ..ok.dense
                },
                ..ok
            },
        ];
        for (i, p) in cases.iter().enumerate() {
            // SAFETY: the params are refused before any pointer is read or CUDA is called.
            let (s, t, a) = unsafe {
                (
                    ffi::la_moba_select(p, std::ptr::null_mut()),
                    ffi::la_moba_select_tc(p, std::ptr::null_mut()),
                    ffi::la_moba_attention(p, std::ptr::null_mut()),
                )
            };
            assert_eq!(
                (s, t, a),
                (INVALID_VALUE, INVALID_VALUE, INVALID_VALUE),
                "case {i}"
            );
        }
        // Query-block granularity: block_m and the list width (top_k) checked too. Here
        // (block_m 128, block_n 64) a list holds up to 3 diagonal blocks.
        for p in [
            ffi::LaMobaParams { block_m: 96, ..ok },
            ffi::LaMobaParams { block_m: 0, ..ok },
            ffi::LaMobaParams { select_k: 0, ..ok },
            ffi::LaMobaParams { select_k: 4, ..ok },
        ] {
            // SAFETY: refused before any pointer is read or CUDA is called.
            let code = unsafe { ffi::la_moba_select_blocks(&p, std::ptr::null_mut()) };
            assert_eq!(code, INVALID_VALUE, "{p:?}");
        }
        // SAFETY: a NULL params pointer is refused.
        let code = unsafe { ffi::la_moba_select(std::ptr::null(), std::ptr::null_mut()) };
        assert_eq!(code, INVALID_VALUE);
        // SAFETY: as above.
        let code = unsafe { ffi::la_moba_select_tc(std::ptr::null(), std::ptr::null_mut()) };
        assert_eq!(code, INVALID_VALUE);
        // No work (batch 0): success without a launch.
        let empty = ffi::LaMobaParams {
            dense: ffi::LaDenseParams {
                batch: 0,
                ..ok.dense
            },
            ..ok
        };
        // SAFETY: nothing to run: returns before any pointer is read or CUDA is called.
        let code = unsafe { ffi::la_moba_select(&empty, std::ptr::null_mut()) };
        assert_eq!(code, 0);
        // SAFETY: as above.
        let code = unsafe { ffi::la_moba_select_tc(&empty, std::ptr::null_mut()) };
        assert_eq!(code, 0);
    }
}
