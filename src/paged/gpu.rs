//! GPU entry points of the paged family: `PagedCache::append_gpu`,
//! `PagedDecode::select_gpu` and `PagedDecode::forward_gpu` (one-shot), and the plan/run
//! split behind them: [`PagedDecode::plan_gpu`] validates the tables, uploads them once and
//! allocates the scratch; [`PagedDecodePlan::forward`] / [`PagedDecodePlan::select`] /
//! [`PagedDecodePlan::append`] then only validate the tensor arguments and launch (no
//! host-to-device copy, no allocation). The one-shot methods build a temporary plan, so
//! there is one code path.
//!
//! # Lifetimes and stream ordering
//!
//! A plan owns its device buffers (tables, head kinds, page lists, Quest scores, split
//! partials) and the stream they were allocated on, and launches only on that stream. Its
//! buffers outlive every launch queued with them because (1) each kernel is queued on the
//! plan's stream, (2) cudarc frees a `CudaSlice` on drop with `cuMemFreeAsync` on the stream
//! that allocated it (the plan's stream), which the driver orders after the kernels queued
//! there before the drop (without stream-ordered allocation cudarc synchronizes that stream
//! before freeing), and (3) in cudarc's multi-stream mode every pointer taken here records
//! the usual read/write events, which a drop waits for too. Dropping a plan (or a one-shot
//! call returning) right after queueing its launches is therefore safe. Runs of one plan
//! take `&mut self`: calls are serialized on the host and, being on one stream, on the
//! device, so reusing the scratch between calls never races.

use crate::element::{DType, Element};
use crate::error::{Error, Result};
use crate::gpu::{
    DeviceBuffer, DeviceBufferMut, GRID_LIMIT, check_gpu_positions, check_grid_yz, check_half,
    check_head_dim, cuda_call,
};
use crate::layout::Strided;
use crate::paged::{KvPages, PageMeta, PagedCache, PagedDecode};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use std::sync::Arc;

/// Largest head dim of the paged kernels (one warp covers a key row with 16-byte loads).
pub const GPU_MAX_HEAD_DIM: usize = 256;

/// Quest selection on the device: `scores: [batch, heads_kv, max_pages_per_seq]` (`-inf`
/// where not a candidate or not a Quest head), `page_list: [batch, heads_kv,
/// max_pages_per_seq]` (the first `page_count[b * heads_kv + kvh]` entries are the selected
/// logical pages, ascending; only Quest heads' rows are written).
#[derive(Debug)]
pub struct GpuSelection {
    /// Aggregated Quest score per page, `[batch, heads_kv, max_pages_per_seq]`.
    pub scores: CudaSlice<f32>,
    /// Selected logical pages, `[batch, heads_kv, max_pages_per_seq]`; the first `page_count`
    /// entries of a row are valid.
    pub page_list: CudaSlice<i32>,
    /// Selected pages per (sequence, kv head), `[batch, heads_kv]`.
    pub page_count: CudaSlice<i32>,
}

/// A plan's Quest selection buffers (layout as [`GpuSelection`]); valid once the selection
/// launched by [`PagedDecodePlan::select`] or [`PagedDecodePlan::forward`] has run on the
/// plan's stream, overwritten by the plan's next run.
#[derive(Debug, Clone, Copy)]
pub struct GpuSelectionRef<'a> {
    /// Aggregated Quest score per page, `[batch, heads_kv, max_pages_per_seq]`.
    pub scores: &'a CudaSlice<f32>,
    /// Selected logical pages, `[batch, heads_kv, max_pages_per_seq]`; the first `page_count`
    /// entries of a row are valid.
    pub page_list: &'a CudaSlice<i32>,
    /// Selected pages per (sequence, kv head), `[batch, heads_kv]`.
    pub page_count: &'a CudaSlice<i32>,
}

/// A [`PagedDecode`] bound to device-resident tables and scratch on one stream (FlashInfer's
/// plan/run split): built once per step by [`PagedDecode::plan_gpu`] (validation, table,
/// head-kind and page-list uploads, scratch allocation, split count), then run per layer
/// with [`PagedDecodePlan::forward`] / [`PagedDecodePlan::select`] /
/// [`PagedDecodePlan::append`], which copy nothing host-to-device and allocate nothing.
///
/// The plan snapshots the decode problem (tables, policy, page lists) at creation: build a
/// new plan when `seqlens_k`, the block table or the lists change. See the module docs for
/// why its buffers outlive the launches queued with them.
#[derive(Debug)]
#[cfg_attr(not(longattn_cuda), allow(dead_code))]
pub struct PagedDecodePlan {
    decode: PagedDecode,
    stream: Arc<CudaStream>,
    what: PlanFor,
    splits: usize,
    /// [`SplitMerge::Balanced`](crate::paged::SplitMerge::Balanced): the pages per split
    /// ([`PagedDecode::balanced_splits`]); 0 for equal shares.
    pages_per_split: usize,
    block_table: CudaSlice<i32>,
    seqlens_k: CudaSlice<i32>,
    head_kind: CudaSlice<i32>,
    /// `[batch, heads_kv, max_pages_per_seq]` page lists and `[batch, heads_kv]` counts:
    /// Listed rows uploaded at plan time, Quest rows written by the selection kernel.
    lists: Option<(CudaSlice<i32>, CudaSlice<i32>)>,
    /// Quest scores `[batch, heads_kv, max_pages_per_seq]`.
    scores: Option<CudaSlice<f32>>,
    /// Split-KV scratch `[splits, batch, heads_q, q_len, head_dim]` and `[splits, batch,
    /// heads_q, q_len]` when `splits > 1`.
    partial: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
    /// The last append's `cu_seqlens_new` (host copy and device buffer).
    append_cu: Option<(Vec<i32>, CudaSlice<i32>)>,
    /// `[2, heads_kv]` K then V scales of an FP8 cache (ones when the cache has none).
    kv_scales: CudaSlice<f32>,
    /// [`SplitMerge::InKernel`](crate::paged::SplitMerge::InKernel) or
    /// [`SplitMerge::Balanced`](crate::paged::SplitMerge::Balanced) with `splits > 1`: the
    /// ticket counters (`[merge_counters_len]` i32), zeroed here once; every launch leaves
    /// them 0.
    merge_counters: Option<CudaSlice<i32>>,
    /// [`QuestKernel::V5`](crate::paged::QuestKernel::V5) with Quest heads: the ticket
    /// counters (`[batch, heads_kv]` i32, zeroed once, left 0 by every launch) and the pages
    /// per block.
    quest_v5: Option<(CudaSlice<i32>, usize)>,
}

/// What a plan allocates scratch for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(longattn_cuda), allow(dead_code))]
enum PlanFor {
    /// Decode (and selection, when there are Quest heads).
    Decode,
    /// Selection only (the one-shot `select_gpu`): scores and lists, no split partials.
    Select,
}

/// Every GPU check of a call with `T` queries over a cache of `C`, in this order: the query
/// type, the cache's positions (`rows`: see [`check_gpu_positions_of`]), head dim and grid, the
/// cache type.
fn check_gpu_types<T: Element, C: Element>(cache: &PagedCache, rows: (&str, usize)) -> Result<()> {
    check_gpu_dtype(T::DTYPE)?;
    check_gpu_shape(cache, rows)?;
    check_gpu_cache(cache, T::DTYPE, C::DTYPE)
}

fn check_gpu_dtype(dtype: DType) -> Result<()> {
    check_half(dtype, "the paged kernels take", "path")
}

/// The cache element types of the paged GPU kernels: the q type itself, or FP8 e4m3 (append
/// and decode; the Quest kernel reads bounds of the q type), with scales only for FP8.
pub(super) fn check_gpu_cache(cache: &PagedCache, q: DType, kv: DType) -> Result<()> {
    if kv != q && kv != DType::F8E4M3 {
        return Err(Error::Unsupported(format!(
            "a {kv} cache with {q} queries on the GPU: the cache holds the query type or f8e4m3"
        )));
    }
    cache.scales_for(kv).map(|_| ())
}

/// The cache's positions within [`crate::gpu::GPU_MAX_POSITIONS`], then its head dim and
/// grid; `rows` as for [`check_gpu_positions_of`].
fn check_gpu_shape(cache: &PagedCache, rows: (&str, usize)) -> Result<()> {
    check_gpu_positions_of(cache, rows)?;
    check_head_dim(cache.head_dim(), GPU_MAX_HEAD_DIM)?;
    check_grid_yz(cache.batch(), ("heads_kv", cache.heads_kv()))
}

/// A paged call's positions within [`crate::gpu::GPU_MAX_POSITIONS`]: a sequence's capacity
/// `max_pages_per_seq * page_size` (which bounds its `seqlens_k` and every key position the
/// kernels compute) and `rows`, the call's (name, query or new-token rows).
pub(super) fn check_gpu_positions_of(cache: &PagedCache, rows: (&str, usize)) -> Result<()> {
    check_gpu_positions(
        "the paged kernels",
        &[
            (
                "max_pages_per_seq * page_size",
                cache.max_pages_per_seq() * cache.page_size(),
            ),
            rows,
        ],
    )
}

/// Validates an append's arguments (shared by the one-shot and the plan path); returns the
/// most pages one sequence's new tokens touch.
fn validate_append<T, C, I, O, M>(
    cache: &PagedCache,
    cu_seqlens_new: &[i32],
    k_new: &Strided<&I>,
    v_new: &Strided<&I>,
    kv: &KvPages<&mut O>,
    meta: &Option<PageMeta<&mut M>>,
) -> Result<usize>
where
    T: Element + DeviceRepr,
    C: Element + DeviceRepr,
    I: DeviceBuffer<T>,
    O: DeviceBufferMut<C>,
    M: DeviceBufferMut<C>,
{
    let max_touched = cache.check_append(
        cu_seqlens_new,
        k_new.extent(),
        v_new.extent(),
        (kv.k.len(), kv.v.len()),
        meta.as_ref().map(|m| (m.kmin.len(), m.kmax.len())),
    )?;
    let total_new = cu_seqlens_new.last().map_or(0, |&n| n as usize);
    check_gpu_types::<T, C>(cache, ("total_new", total_new))?;
    Ok(max_touched)
}

impl PagedCache {
    /// GPU append (see [`PagedCache::append_cpu`] for the semantics and the metadata
    /// definition). `cu_seqlens_new` is a host array; `k_new, v_new: [total_new, heads_kv,
    /// head_dim]` device buffers with strides that are multiples of 8 elements. The cache
    /// holds `T` (copied) or [`F8E4M3`](crate::F8E4M3) (quantised with the cache's
    /// [`KvScales`](super::KvScales); **not yet run on a GPU**). Uploads the tables on every
    /// call; [`PagedDecodePlan::append`] reuses a plan's.
    pub fn append_gpu<T, C, I, O>(
        &self,
        stream: &Arc<CudaStream>,
        cu_seqlens_new: &[i32],
        k_new: Strided<&I>,
        v_new: Strided<&I>,
        cache: KvPages<&mut O>,
        meta: Option<PageMeta<&mut CudaSlice<C>>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        C: Element + DeviceRepr,
        I: DeviceBuffer<T>,
        O: DeviceBufferMut<C>,
    {
        self.append_gpu_into::<T, C, I, O, CudaSlice<C>>(
            stream,
            cu_seqlens_new,
            k_new,
            v_new,
            cache,
            meta,
        )
    }

    /// [`PagedCache::append_gpu`] with bounds in any writable device buffer (views too: the
    /// candle op's bounds are views of candle's storage).
    pub(crate) fn append_gpu_into<T, C, I, O, M>(
        &self,
        stream: &Arc<CudaStream>,
        cu_seqlens_new: &[i32],
        k_new: Strided<&I>,
        v_new: Strided<&I>,
        cache: KvPages<&mut O>,
        meta: Option<PageMeta<&mut M>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        C: Element + DeviceRepr,
        I: DeviceBuffer<T>,
        O: DeviceBufferMut<C>,
        M: DeviceBufferMut<C>,
    {
        let max_touched =
            validate_append::<T, C, I, O, M>(self, cu_seqlens_new, &k_new, &v_new, &cache, &meta)?;
        if max_touched == 0 {
            return Ok(());
        }
        cuda_call!(
            imp::append_oneshot::<T, C, I, O, M>,
            self,
            stream,
            cu_seqlens_new,
            k_new,
            v_new,
            cache,
            meta,
            max_touched,
        )
    }
}

impl PagedDecode {
    /// Builds a [`PagedDecodePlan`] on `stream`: validates the problem for the GPU (head dim,
    /// batch/heads and grid limits, page lists present for Listed heads), uploads the block
    /// table, `seqlens_k`, head kinds and the Listed heads' page lists, allocates the Quest
    /// scores/page lists (worst case `max_pages_per_seq` per (sequence, kv head)) and the
    /// split-KV partials for [`PagedDecode::splits_for`] the device's SM count. The uploads
    /// are queued on `stream` (pageable host memory: staged synchronously by the driver).
    pub fn plan_gpu(&self, stream: &Arc<CudaStream>) -> Result<PagedDecodePlan> {
        self.plan_gpu_for(stream, PlanFor::Decode)
    }

    fn plan_gpu_for(&self, stream: &Arc<CudaStream>, what: PlanFor) -> Result<PagedDecodePlan> {
        check_gpu_shape(&self.cache, ("q_len", self.q_len))?;
        if what == PlanFor::Decode {
            self.check_lists_given()?;
            self.check_grid()?;
        }
        cuda_call!(imp::plan, self, stream, what)
    }

    fn check_grid(&self) -> Result<()> {
        let row_blocks = (self.q_len * self.group()).div_ceil(crate::paged::DECODE_ROWS_PER_BLOCK);
        if self.cache.heads_kv() * row_blocks > GRID_LIMIT {
            return Err(Error::Unsupported(format!(
                "heads_kv ({}) * row blocks ({row_blocks}) exceeds the grid limit {GRID_LIMIT}",
                self.cache.heads_kv()
            )));
        }
        Ok(())
    }

    /// Quest scoring and top-B selection on the GPU (same selection as
    /// [`PagedDecode::select_cpu`]; scores may differ by float summation order). One-shot:
    /// builds a temporary plan; [`PagedDecodePlan::select`] reuses one.
    pub fn select_gpu<T, C, I>(
        &self,
        stream: &Arc<CudaStream>,
        q: Strided<&I>,
        meta: PageMeta<&CudaSlice<C>>,
    ) -> Result<GpuSelection>
    where
        T: Element + DeviceRepr,
        C: Element + DeviceRepr,
        I: DeviceBuffer<T>,
    {
        self.check_select(q.extent(), (meta.kmin.len(), meta.kmax.len()))?;
        check_gpu_types::<T, C>(&self.cache, ("q_len", self.q_len))?;
        let mut plan = self.plan_gpu_for(stream, PlanFor::Select)?;
        let () = cuda_call!(imp::select::<T, C, I, CudaSlice<C>>, &mut plan, &q, &meta)?;
        plan.into_selection()
    }

    /// GPU decode on `stream` (nothing is synchronized). Buffers as for
    /// [`PagedDecode::forward_cpu`], on the device: q/out strides multiples of 8 elements,
    /// 16-byte aligned pointers, f16 or bf16, head_dim a multiple of 8 up to 256; the cache
    /// (type `C`) holds `T` or [`F8E4M3`](crate::F8E4M3) with the cache's
    /// [`KvScales`](super::KvScales) (the FP8 kernels are **not yet run on a GPU**). Quest heads run the selection kernel first; the split count
    /// is [`PagedDecode::splits_for`] the device's SM count. One-shot: builds a temporary
    /// [`PagedDecodePlan`] (table uploads and scratch allocation per call); engines calling
    /// decode per layer with the same tables should build the plan once with
    /// [`PagedDecode::plan_gpu`].
    pub fn forward_gpu<T, C, Q, K, O>(
        &self,
        stream: &Arc<CudaStream>,
        q: Strided<&Q>,
        kv: KvPages<&K>,
        meta: Option<PageMeta<&CudaSlice<C>>>,
        out: Strided<&mut O>,
        lse: Option<&mut dyn DeviceBufferMut<f32>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        C: Element + DeviceRepr,
        Q: DeviceBuffer<T>,
        K: DeviceBuffer<C>,
        O: DeviceBufferMut<T>,
    {
        self.forward_gpu_with::<T, C, Q, K, O, CudaSlice<C>>(stream, q, kv, meta, out, lse)
    }

    /// [`PagedDecode::forward_gpu`] with bounds in any device buffer (views too: the candle
    /// op's bounds are views of candle's storage).
    pub(crate) fn forward_gpu_with<T, C, Q, K, O, M>(
        &self,
        stream: &Arc<CudaStream>,
        q: Strided<&Q>,
        kv: KvPages<&K>,
        meta: Option<PageMeta<&M>>,
        out: Strided<&mut O>,
        lse: Option<&mut dyn DeviceBufferMut<f32>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        C: Element + DeviceRepr,
        Q: DeviceBuffer<T>,
        K: DeviceBuffer<C>,
        O: DeviceBufferMut<T>,
        M: DeviceBuffer<C>,
    {
        // The tensor checks first, then the plan (tables, grid), then the launches.
        self.validate_forward::<T, C, Q, K, O, M>(&q, &kv, &meta, &out, &lse)?;
        let mut plan = self.plan_gpu_for(stream, PlanFor::Decode)?;
        cuda_call!(
            imp::decode::<T, C, Q, K, O, M>,
            &mut plan,
            q,
            kv,
            meta,
            out,
            lse
        )
    }

    fn validate_forward<T, C, Q, K, O, M>(
        &self,
        q: &Strided<&Q>,
        kv: &KvPages<&K>,
        meta: &Option<PageMeta<&M>>,
        out: &Strided<&mut O>,
        lse: &Option<&mut dyn DeviceBufferMut<f32>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        C: Element + DeviceRepr,
        Q: DeviceBuffer<T>,
        K: DeviceBuffer<C>,
        O: DeviceBufferMut<T>,
        M: DeviceBuffer<C>,
    {
        self.check_forward(
            q.extent(),
            out.extent(),
            lse.as_ref().map(|l| l.len()),
            (kv.k.len(), kv.v.len()),
            meta.as_ref().map(|m| (m.kmin.len(), m.kmax.len())),
        )?;
        check_gpu_types::<T, C>(&self.cache, ("q_len", self.q_len))
    }
}

impl PagedDecodePlan {
    /// The decode problem the plan was built for (a snapshot of the tables and policy).
    pub fn decode(&self) -> &PagedDecode {
        &self.decode
    }
    /// The stream every run of this plan launches on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// Split count of [`PagedDecodePlan::forward`] (1 for a selection-only plan).
    pub fn splits(&self) -> usize {
        self.splits
    }
    /// Whether [`PagedDecodePlan::forward`] merges its splits inside the decode kernel (one
    /// launch): [`SplitMerge::InKernel`](crate::paged::SplitMerge::InKernel) or
    /// [`SplitMerge::Balanced`](crate::paged::SplitMerge::Balanced), and more than one split.
    pub fn merges_in_kernel(&self) -> bool {
        self.merge_counters.is_some()
    }
    /// Pages per split of [`SplitMerge::Balanced`](crate::paged::SplitMerge::Balanced)
    /// (`None`: equal shares of each block's pages).
    pub fn pages_per_split(&self) -> Option<usize> {
        (self.pages_per_split > 0).then_some(self.pages_per_split)
    }
    /// Pages per block of the [`QuestKernel::V5`](crate::paged::QuestKernel::V5) selection
    /// (`None`: the two-kernel selection, or no Quest heads).
    pub fn quest_v5_pages_per_block(&self) -> Option<usize> {
        self.quest_v5.as_ref().map(|(_, chunk)| *chunk)
    }
    /// Device copies of the block table and `seqlens_k`.
    pub fn tables(&self) -> (&CudaSlice<i32>, &CudaSlice<i32>) {
        (&self.block_table, &self.seqlens_k)
    }
    /// The Quest selection buffers (`None` without Quest heads): what the last
    /// [`PagedDecodePlan::select`] or [`PagedDecodePlan::forward`] queued on the plan's
    /// stream writes there (read them after that work, e.g. with a `clone_dtoh` on the same
    /// stream).
    pub fn selection(&self) -> Option<GpuSelectionRef<'_>> {
        let scores = self.scores.as_ref()?;
        let (page_list, page_count) = self.lists.as_ref()?;
        Some(GpuSelectionRef {
            scores,
            page_list,
            page_count,
        })
    }

    fn into_selection(self) -> Result<GpuSelection> {
        match (self.scores, self.lists) {
            (Some(scores), Some((page_list, page_count))) => Ok(GpuSelection {
                scores,
                page_list,
                page_count,
            }),
            _ => Err(Error::InvalidOption(
                "the plan has no Quest selection buffers".into(),
            )),
        }
    }

    /// Quest scoring and top-B selection into the plan's buffers (see
    /// [`PagedDecode::select_gpu`]), on the plan's stream; no copy, no allocation. Errors
    /// when the plan has no Quest heads (a decode plan allocates selection buffers only for
    /// them).
    pub fn select<T, C, I>(
        &mut self,
        q: Strided<&I>,
        meta: PageMeta<&CudaSlice<C>>,
    ) -> Result<GpuSelectionRef<'_>>
    where
        T: Element + DeviceRepr,
        C: Element + DeviceRepr,
        I: DeviceBuffer<T>,
    {
        self.decode
            .check_select(q.extent(), (meta.kmin.len(), meta.kmax.len()))?;
        check_gpu_types::<T, C>(&self.decode.cache, ("q_len", self.decode.q_len))?;
        if self.scores.is_none() || self.lists.is_none() {
            return Err(Error::InvalidOption(
                "this plan has no Quest heads to select pages for".into(),
            ));
        }
        let () = cuda_call!(imp::select::<T, C, I, CudaSlice<C>>, self, &q, &meta)?;
        Ok(self.selection().expect("checked above"))
    }

    /// Decode on the plan's stream (nothing is synchronized; see
    /// [`PagedDecode::forward_gpu`] for the buffers), reusing the plan's tables and scratch:
    /// no host-to-device copy, no allocation. The tensor arguments are validated on every
    /// call. Quest heads run the selection into the plan's buffers first.
    pub fn forward<T, C, Q, K, O>(
        &mut self,
        q: Strided<&Q>,
        kv: KvPages<&K>,
        meta: Option<PageMeta<&CudaSlice<C>>>,
        out: Strided<&mut O>,
        lse: Option<&mut dyn DeviceBufferMut<f32>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        C: Element + DeviceRepr,
        Q: DeviceBuffer<T>,
        K: DeviceBuffer<C>,
        O: DeviceBufferMut<T>,
    {
        self.decode
            .validate_forward::<T, C, Q, K, O, CudaSlice<C>>(&q, &kv, &meta, &out, &lse)?;
        if self.what != PlanFor::Decode {
            return Err(Error::InvalidOption(
                "a selection-only plan cannot run the decode".into(),
            ));
        }
        cuda_call!(
            imp::decode::<T, C, Q, K, O, CudaSlice<C>>,
            self,
            q,
            kv,
            meta,
            out,
            lse
        )
    }

    /// Append on the plan's stream with the plan's device tables (see
    /// [`PagedCache::append_gpu`]; the plan's `seqlens_k` must already count the new
    /// tokens, as for the one-shot call). `cu_seqlens_new` is validated on the host and
    /// uploaded only when it differs from the previous append's (an engine appends with the
    /// same offsets for every layer of a step).
    pub fn append<T, C, I, O>(
        &mut self,
        cu_seqlens_new: &[i32],
        k_new: Strided<&I>,
        v_new: Strided<&I>,
        cache: KvPages<&mut O>,
        meta: Option<PageMeta<&mut CudaSlice<C>>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        C: Element + DeviceRepr,
        I: DeviceBuffer<T>,
        O: DeviceBufferMut<C>,
    {
        let max_touched = validate_append::<T, C, I, O, CudaSlice<C>>(
            &self.decode.cache,
            cu_seqlens_new,
            &k_new,
            &v_new,
            &cache,
            &meta,
        )?;
        if max_touched == 0 {
            return Ok(());
        }
        cuda_call!(
            imp::append_plan::<T, C, I, O, CudaSlice<C>>,
            self,
            cu_seqlens_new,
            k_new,
            v_new,
            cache,
            meta,
            max_touched
        )
    }
}

#[cfg(longattn_cuda)]
pub(super) mod imp {
    use super::*;
    use crate::gpu::{
        check_aligned, check_launch, check_vector_access, dtype_bytes, ffi, kv_params, la_dtype,
        ptr_mut_or_null, ptr_or_null,
    };
    use crate::layout::Strides;
    use crate::paged::{HeadPolicy, QuestKernel, SplitMerge};
    use cudarc::driver::sys::CUdevice_attribute;
    use cudarc::driver::{DevicePtr, DevicePtrMut, SyncOnDrop};

    // The host's split and grid arithmetic assumes the kernel's rows per decode block.
    const _: () = assert!(
        ffi::LA_PAGED_DECODE_ROWS as usize == crate::paged::DECODE_ROWS_PER_BLOCK,
        "DECODE_ROWS_PER_BLOCK must equal LA_PAGED_DECODE_ROWS (paged.h)"
    );
    // The Quest v5 chunk sizing (quest_v5_pages_per_block) assumes the kernel's bounds.
    const _: () = assert!(
        ffi::LA_QUEST_V5_CHUNK_ALIGN as usize == crate::paged::QUEST_V5_CHUNK_ALIGN
            && ffi::LA_QUEST_V5_MAX_CHUNK as usize == crate::paged::QUEST_V5_MAX_CHUNK,
        "QUEST_V5_* must equal LA_QUEST_V5_* (paged.h)"
    );

    fn la_cache(cache: &PagedCache, k: u64, v: u64, bt: u64, sl: u64) -> ffi::LaPagedCache {
        ffi::LaPagedCache {
            k_cache: k as *mut _,
            v_cache: v as *mut _,
            block_table: bt as *const i32,
            seqlens_k: sl as *const i32,
            batch: cache.batch() as i32,
            num_pages: cache.layout().num_pages as i32,
            page_size: cache.page_size() as i32,
            heads_kv: cache.heads_kv() as i32,
            head_dim: cache.head_dim() as i32,
            max_pages_per_seq: cache.max_pages_per_seq() as i32,
        }
    }

    /// A cache's device tables: the block table, `seqlens_k` and the `[2, heads_kv]` FP8
    /// scales (ones when the cache has none).
    pub(in crate::paged) type DeviceTables<'a> =
        (&'a CudaSlice<i32>, &'a CudaSlice<i32>, &'a CudaSlice<f32>);

    /// The pointers every paged attention launch (decode and prefill) passes: `q` and `out`
    /// checked for the kernels' 16-byte vector access, then the K/V caches for 16-byte
    /// alignment (in that order), the optional LSE, and the cache with the device tables
    /// (block table, `seqlens_k`, the `[2, heads_kv]` FP8 scales), with the sync guards
    /// that keep cudarc's event tracking correct until the launch is queued (keep the value
    /// alive until then).
    pub(in crate::paged) struct AttnPtrs<'a> {
        /// The cache: K/V pointers, tables and geometry.
        pub cache: ffi::LaPagedCache,
        /// Device pointer of `q`.
        pub q: u64,
        /// Device pointer of `out`.
        pub o: u64,
        /// Device pointer of the LSE output (0: none).
        pub lse: u64,
        /// `kv_dtype` and `kv_scales` of the params (see [`kv_params`]).
        pub kv: (ffi::LaDtype, *const f32),
        _sync: [SyncOnDrop<'a>; 7],
        _lse_sync: Option<SyncOnDrop<'a>>,
    }

    impl<'a> AttnPtrs<'a> {
        /// Takes the pointers on `stream` and checks them (see the type's docs).
        pub(in crate::paged) fn new<T, C, Q, K, O, L>(
            cache: &PagedCache,
            stream: &'a CudaStream,
            (block_table, seqlens_k, kv_scales): DeviceTables<'a>,
            (q, kv): (&'a Strided<&Q>, &'a KvPages<&K>),
            (out, out_strides): (&'a mut O, &Strides),
            lse: Option<&'a mut L>,
        ) -> Result<Self>
        where
            T: Element,
            C: Element,
            Q: DeviceBuffer<T>,
            K: DeviceBuffer<C>,
            O: DeviceBufferMut<T>,
            L: DevicePtrMut<f32> + ?Sized,
        {
            let bytes = dtype_bytes(T::DTYPE);
            let (qp, s1) = q.data.device_ptr(stream);
            let (kc, s2) = kv.k.device_ptr(stream);
            let (vc, s3) = kv.v.device_ptr(stream);
            let (op, s4) = out.device_ptr_mut(stream);
            check_vector_access("q", qp, &q.strides, bytes)?;
            check_vector_access("out", op, out_strides, bytes)?;
            check_aligned("k_cache", kc)?;
            check_aligned("v_cache", vc)?;
            let (lp, lse_sync) = ptr_mut_or_null(lse, stream);
            let (bt, s5) = block_table.device_ptr(stream);
            let (sl, s6) = seqlens_k.device_ptr(stream);
            let (ks, s7) = kv_scales.device_ptr(stream);
            Ok(AttnPtrs {
                cache: la_cache(cache, kc, vc, bt, sl),
                q: qp,
                o: op,
                lse: lp,
                kv: kv_params::<C>(ks),
                _sync: [s1, s2, s3, s4, s5, s6, s7],
                _lse_sync: lse_sync,
            })
        }
    }

    fn head_kinds(decode: &PagedDecode) -> Vec<i32> {
        (0..decode.cache().heads_kv())
            .map(|kvh| match decode.head_policy_at(kvh) {
                HeadPolicy::Full => ffi::LaHeadKind::LA_HEAD_FULL as i32,
                HeadPolicy::Listed => ffi::LaHeadKind::LA_HEAD_PAGES as i32,
                HeadPolicy::Streaming => ffi::LaHeadKind::LA_HEAD_STREAMING as i32,
                HeadPolicy::Quest => ffi::LaHeadKind::LA_HEAD_QUEST as i32,
            })
            .collect()
    }

    /// Host page lists: the Listed heads' explicit lists (Quest rows left for the kernel).
    fn listed_rows(decode: &PagedDecode) -> (Vec<i32>, Vec<i32>) {
        let cache = decode.cache();
        let (hkv, mp) = (cache.heads_kv(), cache.max_pages_per_seq());
        let mut pl = vec![0i32; cache.batch() * hkv * mp];
        let mut pc = vec![0i32; cache.batch() * hkv];
        if let Some(given) = decode.lists.as_ref() {
            for b in 0..cache.batch() {
                for kvh in 0..hkv {
                    if decode.head_policy_at(kvh) == HeadPolicy::Listed {
                        let l = given.list(b, kvh);
                        let row = (b * hkv + kvh) * mp;
                        for (dst, &p) in pl[row..row + l.len()].iter_mut().zip(l) {
                            *dst = p as i32;
                        }
                        pc[b * hkv + kvh] = l.len() as i32;
                    }
                }
            }
        }
        (pl, pc)
    }

    pub(super) fn plan(
        decode: &PagedDecode,
        stream: &Arc<CudaStream>,
        what: PlanFor,
    ) -> Result<PagedDecodePlan> {
        let cache = decode.cache();
        let (hkv, mp) = (cache.heads_kv(), cache.max_pages_per_seq());
        let n = cache.batch() * hkv;
        let block_table = stream.clone_htod(cache.block_table())?;
        let seqlens_k = stream.clone_htod(cache.seqlens_k())?;
        let head_kind = stream.clone_htod(&head_kinds(decode))?;
        let kv_scales = stream.clone_htod(&cache.kv_scales_flat())?;
        let quest = decode.needs_meta();
        let listed = decode.has_heads(HeadPolicy::Listed);
        let sm_count = stream
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as usize;
        let quest_v5 = if quest && decode.quest_kernel() == QuestKernel::V5 {
            let chunk = decode.quest_v5_pages_per_block(sm_count);
            Some((stream.alloc_zeros::<i32>(n)?, chunk))
        } else {
            None
        };
        let (lists, scores, splits, partial) = match what {
            PlanFor::Select => (
                Some((
                    stream.alloc_zeros::<i32>(n * mp)?,
                    stream.alloc_zeros::<i32>(n)?,
                )),
                Some(stream.alloc_zeros::<f32>(n * mp)?),
                (1, 0),
                None,
            ),
            PlanFor::Decode => {
                let lists = if listed || quest {
                    let (pl, pc) = listed_rows(decode);
                    Some((stream.clone_htod(&pl)?, stream.clone_htod(&pc)?))
                } else {
                    None
                };
                let scores = if quest {
                    Some(stream.alloc_zeros::<f32>(n * mp)?)
                } else {
                    None
                };
                let (splits, pages_per_split) = match decode.merge() {
                    SplitMerge::Balanced => decode.balanced_splits(sm_count),
                    SplitMerge::Kernel | SplitMerge::InKernel => (decode.splits_for(sm_count), 0),
                };
                let partial = if splits > 1 {
                    let rows = splits * decode.lse_len();
                    Some((
                        stream.alloc_zeros::<f32>(rows * cache.head_dim())?,
                        stream.alloc_zeros::<f32>(rows)?,
                    ))
                } else {
                    None
                };
                (lists, scores, (splits, pages_per_split), partial)
            }
        };
        let (splits, pages_per_split) = splits;
        let merge_counters =
            if what == PlanFor::Decode && splits > 1 && decode.merge() != SplitMerge::Kernel {
                Some(stream.alloc_zeros::<i32>(decode.merge_counters_len())?)
            } else {
                None
            };
        Ok(PagedDecodePlan {
            decode: decode.clone(),
            stream: stream.clone(),
            what,
            splits,
            pages_per_split,
            block_table,
            seqlens_k,
            head_kind,
            lists,
            scores,
            partial,
            append_cu: None,
            kv_scales,
            merge_counters,
            quest_v5,
        })
    }

    /// Strides of a `[rows, heads, dim]` packed tensor checked for 16-byte vectors (the
    /// batch stride is unused).
    fn packed(s: &Strides) -> Strides {
        Strides { batch: 0, ..*s }
    }

    /// The append launch, with device tables and offsets already on `stream`.
    #[allow(clippy::too_many_arguments)]
    fn append_launch<T, C, I, O, M>(
        cache: &PagedCache,
        stream: &Arc<CudaStream>,
        (block_table, seqlens_k, kv_scales): DeviceTables<'_>,
        cu: &CudaSlice<i32>,
        k_new: Strided<&I>,
        v_new: Strided<&I>,
        kv: KvPages<&mut O>,
        meta: Option<PageMeta<&mut M>>,
        max_touched: usize,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        C: Element + DeviceRepr,
        I: DeviceBuffer<T>,
        O: DeviceBufferMut<C>,
        M: DeviceBufferMut<C>,
    {
        let bytes = dtype_bytes(T::DTYPE);
        let (kn, _s1) = k_new.data.device_ptr(stream);
        let (vn, _s2) = v_new.data.device_ptr(stream);
        check_vector_access("k_new", kn, &packed(&k_new.strides), bytes)?;
        check_vector_access("v_new", vn, &packed(&v_new.strides), bytes)?;
        let KvPages { k, v } = kv;
        let (kc, _s3) = k.device_ptr_mut(stream);
        let (vc, _s4) = v.device_ptr_mut(stream);
        check_aligned("k_cache", kc)?;
        check_aligned("v_cache", vc)?;
        let (bt, _s5) = block_table.device_ptr(stream);
        let (sl, _s6) = seqlens_k.device_ptr(stream);
        let (cu_ptr, _s7) = cu.device_ptr(stream);
        let (ks, _s10) = kv_scales.device_ptr(stream);
        let (kv_dtype, kv_scales) = kv_params::<C>(ks);
        let mut meta = meta;
        let (kmin, kmax, _s8, _s9) = match meta.as_mut() {
            Some(m) => {
                let (a, sa) = m.kmin.device_ptr_mut(stream);
                let (b, sb) = m.kmax.device_ptr_mut(stream);
                check_aligned("kmin", a)?;
                check_aligned("kmax", b)?;
                (a, b, Some(sa), Some(sb))
            }
            None => (0, 0, None, None),
        };
        let params = ffi::LaPagedAppendParams {
            cache: la_cache(cache, kc, vc, bt, sl),
            k_new: kn as *const _,
            v_new: vn as *const _,
            k_new_row_stride: k_new.strides.seq,
            k_new_head_stride: k_new.strides.head,
            v_new_row_stride: v_new.strides.seq,
            v_new_head_stride: v_new.strides.head,
            cu_seqlens_new: cu_ptr as *const i32,
            kmin: kmin as *mut _,
            kmax: kmax as *mut _,
            max_pages_touched: max_touched as i32,
            dtype: la_dtype(T::DTYPE),
            kv_dtype,
            kv_scales,
        };
        // SAFETY: extents, page ids and writer uniqueness were validated on the host; the
        // launch is ordered on `stream` after the uploads of the tables and offsets.
        let code =
            unsafe { ffi::la_paged_append(&params, crate::gpu::launch_stream(stream)? as _) };
        check_launch("la_paged_append", code)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn append_oneshot<T, C, I, O, M>(
        cache: &PagedCache,
        stream: &Arc<CudaStream>,
        cu_seqlens_new: &[i32],
        k_new: Strided<&I>,
        v_new: Strided<&I>,
        kv: KvPages<&mut O>,
        meta: Option<PageMeta<&mut M>>,
        max_touched: usize,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        C: Element + DeviceRepr,
        I: DeviceBuffer<T>,
        O: DeviceBufferMut<C>,
        M: DeviceBufferMut<C>,
    {
        // Temporaries freed stream-ordered after the launch (see the module docs).
        let bt = stream.clone_htod(cache.block_table())?;
        let sl = stream.clone_htod(cache.seqlens_k())?;
        let scales = stream.clone_htod(&cache.kv_scales_flat())?;
        let cu = stream.clone_htod(cu_seqlens_new)?;
        append_launch::<T, C, I, O, M>(
            cache,
            stream,
            (&bt, &sl, &scales),
            &cu,
            k_new,
            v_new,
            kv,
            meta,
            max_touched,
        )
    }

    pub(super) fn append_plan<T, C, I, O, M>(
        plan: &mut PagedDecodePlan,
        cu_seqlens_new: &[i32],
        k_new: Strided<&I>,
        v_new: Strided<&I>,
        kv: KvPages<&mut O>,
        meta: Option<PageMeta<&mut M>>,
        max_touched: usize,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        C: Element + DeviceRepr,
        I: DeviceBuffer<T>,
        O: DeviceBufferMut<C>,
        M: DeviceBufferMut<C>,
    {
        let stale = plan
            .append_cu
            .as_ref()
            .is_none_or(|(host, _)| host.as_slice() != cu_seqlens_new);
        if stale {
            // Replacing the buffer frees the old one stream-ordered, after earlier appends.
            let dev = plan.stream.clone_htod(cu_seqlens_new)?;
            plan.append_cu = Some((cu_seqlens_new.to_vec(), dev));
        }
        let PagedDecodePlan {
            decode,
            stream,
            block_table,
            seqlens_k,
            append_cu,
            kv_scales,
            ..
        } = plan;
        let (_, cu) = append_cu.as_ref().expect("uploaded above");
        append_launch::<T, C, I, O, M>(
            &decode.cache,
            stream,
            (block_table, seqlens_k, kv_scales),
            cu,
            k_new,
            v_new,
            kv,
            meta,
            max_touched,
        )
    }

    /// Runs the Quest kernel into the plan's scores, page lists and counts; the bounds are
    /// of the cache's type `C` (`T` or FP8, checked by every caller).
    pub(super) fn select<T, C, I, M>(
        plan: &mut PagedDecodePlan,
        q: &Strided<&I>,
        meta: &PageMeta<&M>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        C: Element + DeviceRepr,
        I: DeviceBuffer<T>,
        M: DeviceBuffer<C>,
    {
        let PagedDecodePlan {
            decode,
            stream,
            block_table,
            seqlens_k,
            head_kind,
            lists,
            scores,
            kv_scales,
            quest_v5,
            ..
        } = plan;
        let (Some(scores), Some((page_list, page_count))) = (scores.as_mut(), lists.as_mut())
        else {
            return Err(Error::InvalidOption(
                "this plan has no Quest selection buffers".into(),
            ));
        };
        let cache = decode.cache();
        let (qp, _s1) = q.data.device_ptr(stream);
        let (bt, _s2) = block_table.device_ptr(stream);
        let (sl, _s3) = seqlens_k.device_ptr(stream);
        let (kmin, _s4) = meta.kmin.device_ptr(stream);
        let (kmax, _s5) = meta.kmax.device_ptr(stream);
        check_aligned("kmin", kmin)?;
        check_aligned("kmax", kmax)?;
        let (kd, _s6) = head_kind.device_ptr(stream);
        let (sc, _s7) = scores.device_ptr_mut(stream);
        let (pl, _s8) = page_list.device_ptr_mut(stream);
        let (pc, _s9) = page_count.device_ptr_mut(stream);
        let (ks, _s10) = kv_scales.device_ptr(stream);
        let (kv_dtype, kv_scales) = kv_params::<C>(ks);
        let (wl, wr) = decode.base_mask().window.to_flash();
        let quest = decode.quest_config();
        let params = ffi::LaQuestParams {
            cache: la_cache(cache, 0, 0, bt, sl),
            q: qp as *const _,
            q_batch_stride: q.strides.batch,
            q_row_stride: q.strides.seq,
            q_head_stride: q.strides.head,
            q_len: decode.q_len() as i32,
            heads_q: decode.heads_q() as i32,
            kmin: kmin as *const _,
            kmax: kmax as *const _,
            head_kind: kd as *const i32,
            scores: sc as *mut f32,
            page_list: pl as *mut i32,
            page_count: pc as *mut i32,
            budget_pages: quest.budget_pages(cache.page_size()) as i32,
            sink_pages: quest.sink_pages as i32,
            window_left: wl as i32,
            window_right: wr as i32,
            sinks: decode.base_mask().sinks as i32,
            dtype: la_dtype(T::DTYPE),
            kv_dtype,
            kv_scales,
        };
        if let Some((counters, chunk)) = quest_v5.as_mut() {
            let (ct, _s11) = counters.device_ptr_mut(stream);
            let params = ffi::LaQuestV5Params {
                quest: params,
                select_counters: ct as *mut i32,
                pages_per_block: *chunk as i32,
            };
            // SAFETY: as below; the counters are the plan's [batch, heads_kv] scratch, zero
            // between launches (zeroed at plan creation, reset by each launch's last blocks).
            let code = unsafe {
                ffi::la_paged_quest_select_v5(&params, crate::gpu::launch_stream(stream)? as _)
            };
            return check_launch("la_paged_quest_select_v5", code);
        }
        // SAFETY: q extent and the metadata length were validated; the kernel writes only
        // within the plan's [batch, heads_kv, max_pages_per_seq] buffers (Quest heads' rows
        // of the lists), ordered on the plan's stream.
        let code =
            unsafe { ffi::la_paged_quest_select(&params, crate::gpu::launch_stream(stream)? as _) };
        check_launch("la_paged_quest_select", code)
    }

    pub(super) fn decode<T, C, Q, K, O, M>(
        plan: &mut PagedDecodePlan,
        q: Strided<&Q>,
        kv: KvPages<&K>,
        meta: Option<PageMeta<&M>>,
        out: Strided<&mut O>,
        lse: Option<&mut dyn DeviceBufferMut<f32>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        C: Element + DeviceRepr,
        Q: DeviceBuffer<T>,
        K: DeviceBuffer<C>,
        O: DeviceBufferMut<T>,
        M: DeviceBuffer<C>,
    {
        if plan.decode.needs_meta() {
            let m = meta.as_ref().expect("validated: Quest heads have metadata");
            select::<T, C, Q, M>(plan, &q, m)?;
        }
        let PagedDecodePlan {
            decode,
            stream,
            splits,
            block_table,
            seqlens_k,
            head_kind,
            lists,
            partial,
            kv_scales,
            merge_counters,
            pages_per_split,
            ..
        } = plan;
        let splits = *splits;
        let mp = decode.cache().max_pages_per_seq();
        let tables = (&*block_table, &*seqlens_k, &*kv_scales);
        let out_ptr = (&mut *out.data, &out.strides);
        let ptrs = AttnPtrs::new(decode.cache(), stream, tables, (&q, &kv), out_ptr, lse)?;
        let (kd, _s8) = head_kind.device_ptr(stream);
        let lists = lists.as_ref();
        let (pl, _s9) = ptr_or_null(lists.map(|(pl, _)| pl), stream);
        let (pc, _s10) = ptr_or_null(lists.map(|(_, pc)| pc), stream);
        let (opart, _s11, lpart, _s12) = match partial.as_mut() {
            Some((o, l)) if splits > 1 => {
                let (a, sa) = o.device_ptr_mut(stream);
                let (b, sb) = l.device_ptr_mut(stream);
                (a, Some(sa), b, Some(sb))
            }
            _ => (0, None, 0, None),
        };
        let (wl, wr) = decode.base_mask().window.to_flash();
        let streaming = decode.streaming_config();
        let has_streaming = decode.has_heads(HeadPolicy::Streaming);
        let params = ffi::LaPagedDecodeParams {
            cache: ptrs.cache,
            q: ptrs.q as *const _,
            o: ptrs.o as *mut _,
            lse: ptrs.lse as *mut f32,
            q_batch_stride: q.strides.batch,
            q_row_stride: q.strides.seq,
            q_head_stride: q.strides.head,
            o_batch_stride: out.strides.batch,
            o_row_stride: out.strides.seq,
            o_head_stride: out.strides.head,
            q_len: decode.q_len() as i32,
            heads_q: decode.heads_q() as i32,
            head_kind: kd as *const i32,
            page_list: pl as *const i32,
            page_count: pc as *const i32,
            page_list_stride: mp as i32,
            window_left: wl as i32,
            window_right: wr as i32,
            sinks: decode.base_mask().sinks as i32,
            streaming_window: if has_streaming {
                streaming.window as i32
            } else {
                1
            },
            streaming_sinks: streaming.sinks as i32,
            scale: decode.scale(),
            softcap: decode.softcap().unwrap_or(0.0),
            num_splits: splits as i32,
            o_partial: opart as *mut f32,
            lse_partial: lpart as *mut f32,
            dtype: la_dtype(T::DTYPE),
            kv_dtype: ptrs.kv.0,
            kv_scales: ptrs.kv.1,
        };
        if let Some(counters) = merge_counters.as_mut() {
            let (ct, _s14) = counters.device_ptr_mut(stream);
            let params = ffi::LaPagedDecodeMergeParams {
                decode: params,
                merge_counters: ct as *mut i32,
                // At most max_pages_per_seq (balanced_splits), which fits i32 (checked).
                pages_per_split: *pages_per_split as i32,
            };
            // SAFETY: as below; the counters are the plan's [merge_counters_len] scratch for
            // this plan's grid, zero between launches (zeroed at plan creation, reset by each
            // launch's merging blocks).
            let code = unsafe {
                ffi::la_paged_decode_inmerge(&params, crate::gpu::launch_stream(stream)? as _)
            };
            return check_launch("la_paged_decode_inmerge", code);
        }
        // SAFETY: every extent, page id and page list was validated on the host (at plan
        // creation for the tables and lists, per call for the tensors); the split scratch
        // was sized for `splits` at plan creation; the kernels read the cache and write
        // out/lse (and the scratch) only, ordered on the plan's stream after its uploads and
        // the Quest selection.
        let code =
            unsafe { ffi::la_paged_decode(&params, crate::gpu::launch_stream(stream)? as _) };
        check_launch("la_paged_decode", code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paged::{KvScales, PageTable, PagedLayout};

    /// A cache whose per-sequence capacity (`max_pages_per_seq * page_size`) fits i32 but not
    /// the GPU's position limit is refused for the GPU by name, before any device call; so
    /// are query rows past the limit.
    #[test]
    fn paged_capacity_past_the_gpu_limit_is_refused() {
        let layout = PagedLayout {
            num_pages: 1,
            page_size: (1 << 30) - 1,
            heads_kv: 1,
            head_dim: 64,
        };
        let table = PageTable {
            block_table: &[0, 0],
            max_pages_per_seq: 2,
            seqlens_k: &[1],
        };
        let big = PagedCache::new(layout, table).unwrap();
        let e = check_gpu_shape(&big, ("q_len", 1));
        assert!(
            matches!(&e, Err(Error::Unsupported(m)) if m.contains("max_pages_per_seq * page_size")),
            "{e:?}"
        );
        let over = crate::gpu::GPU_MAX_POSITIONS + 1;
        let e = check_gpu_shape(&cache(), ("q_len", over));
        assert!(
            matches!(&e, Err(Error::Unsupported(m)) if m.contains("q_len")),
            "{e:?}"
        );
        assert!(check_gpu_shape(&cache(), ("q_len", 1)).is_ok());
    }

    fn cache() -> PagedCache {
        let layout = PagedLayout {
            num_pages: 2,
            page_size: 4,
            heads_kv: 2,
            head_dim: 8,
        };
        let table = PageTable {
            block_table: &[0, 1],
            max_pages_per_seq: 2,
            seqlens_k: &[6],
        };
        PagedCache::new(layout, table).unwrap()
    }

    /// The GPU's cache types: the query type, or FP8 (with or without scales); scales only
    /// on FP8; no other pairing.
    #[test]
    fn gpu_cache_types() {
        let plain = cache();
        let scaled = plain
            .clone()
            .with_kv_scales(KvScales::uniform(2, 0.5, 0.25).unwrap())
            .unwrap();
        for q in [DType::F16, DType::BF16] {
            assert!(check_gpu_cache(&plain, q, q).is_ok());
            assert!(check_gpu_cache(&plain, q, DType::F8E4M3).is_ok());
            assert!(check_gpu_cache(&scaled, q, DType::F8E4M3).is_ok());
            assert!(matches!(
                check_gpu_cache(&scaled, q, q),
                Err(Error::InvalidOption(_))
            ));
            assert!(matches!(
                check_gpu_cache(&plain, q, DType::F32),
                Err(Error::Unsupported(_))
            ));
        }
        assert!(check_gpu_cache(&plain, DType::F16, DType::BF16).is_err());
        // The query side stays f16/bf16 only, whatever the cache.
        assert!(check_gpu_dtype(DType::F8E4M3).is_err());
        assert!(check_gpu_dtype(DType::F32).is_err());
    }
}

/// The opt-in entry points (`la_paged_decode_inmerge`, `la_paged_quest_select_v5`) refuse
/// bad arguments before any CUDA call and accept good ones (without a GPU the call then
/// fails in CUDA with another code), so these run without a GPU.
#[cfg(all(test, longattn_cuda))]
mod c_entry_checks {
    use crate::gpu::ffi;

    const INVALID_VALUE: i32 = 1; // cudaErrorInvalidValue

    #[test]
    fn opt_in_entries_check_their_arguments() {
        if crate::device::open_gpu(0).is_ok() {
            return;
        }
        let (table, seqlens, kind) = ([0i32], [16i32], [3i32]); // LA_HEAD_QUEST
        let (q, meta) = ([0u16; 64], [0u16; 64]);
        let (mut o, mut kv) = ([0u16; 64], [0u16; 16 * 64]);
        let (mut scores, mut list, mut count) = ([0f32; 1], [0i32; 1], [0i32; 1]);
        let (mut o_part, mut lse_part, mut counters) = ([0f32; 128], [0f32; 2], [0i32; 1]);
        let cache = ffi::LaPagedCache {
            k_cache: kv.as_mut_ptr().cast(),
            v_cache: kv.as_mut_ptr().cast(),
            batch: 1,
            num_pages: 1,
            page_size: 16,
            heads_kv: 1,
            head_dim: 64,
            max_pages_per_seq: 1,
            block_table: table.as_ptr(),
            seqlens_k: seqlens.as_ptr(),
        };
        let decode = ffi::LaPagedDecodeParams {
            cache,
            q: q.as_ptr().cast(),
            o: o.as_mut_ptr().cast(),
            q_batch_stride: 64,
            q_row_stride: 64,
            q_head_stride: 64,
            o_batch_stride: 64,
            o_row_stride: 64,
            o_head_stride: 64,
            q_len: 1,
            heads_q: 1,
            window_left: -1,
            window_right: 0,
            streaming_window: 1,
            scale: 0.125,
            num_splits: 2,
            o_partial: o_part.as_mut_ptr(),
            lse_partial: lse_part.as_mut_ptr(),
            dtype: ffi::LaDtype::LA_BF16,
            kv_dtype: ffi::LaDtype::LA_BF16,
            ..Default::default()
        };
        let merged = ffi::LaPagedDecodeMergeParams {
            decode,
            merge_counters: counters.as_mut_ptr(),
            pages_per_split: 0,
        };
        // SAFETY (every call below): no GPU is usable, so no kernel runs and no pointer is
        // read on a device; the host checks read only the params structs.
        let run = |p: &ffi::LaPagedDecodeMergeParams| unsafe {
            ffi::la_paged_decode_inmerge(p, std::ptr::null_mut())
        };
        let code = run(&merged);
        assert_ne!(
            code, INVALID_VALUE,
            "valid in-kernel merge arguments refused"
        );
        assert_ne!(code, 0, "a launch without a GPU cannot succeed");
        // SAFETY: as above.
        let null = unsafe { ffi::la_paged_decode_inmerge(std::ptr::null(), std::ptr::null_mut()) };
        assert_eq!(null, INVALID_VALUE);
        let no_counters = ffi::LaPagedDecodeMergeParams {
            merge_counters: std::ptr::null_mut(),
            ..merged
        };
        assert_eq!(
            run(&no_counters),
            INVALID_VALUE,
            "split merge without counters"
        );
        let balanced = ffi::LaPagedDecodeMergeParams {
            pages_per_split: 3,
            ..merged
        };
        assert_ne!(run(&balanced), INVALID_VALUE, "balanced splits refused");
        let negative = ffi::LaPagedDecodeMergeParams {
            pages_per_split: -1,
            ..merged
        };
        assert_eq!(run(&negative), INVALID_VALUE, "negative pages per split");
        // One split needs no counters (the plain kernel runs).
        let one_split = ffi::LaPagedDecodeMergeParams {
            decode: ffi::LaPagedDecodeParams {
                num_splits: 1,
                ..decode
            },
            merge_counters: std::ptr::null_mut(),
            pages_per_split: 0,
        };
        assert_ne!(run(&one_split), INVALID_VALUE);
        // The decode checks apply: no partials with splits, an FP8 cache without scales.
        for bad in [
            ffi::LaPagedDecodeParams {
                o_partial: std::ptr::null_mut(),
                ..decode
            },
            ffi::LaPagedDecodeParams {
                kv_dtype: ffi::LaDtype::LA_F8E4M3,
                ..decode
            },
            ffi::LaPagedDecodeParams {
                scale: 0.0,
                ..decode
            },
        ] {
            let p = ffi::LaPagedDecodeMergeParams {
                decode: bad,
                ..merged
            };
            assert_eq!(run(&p), INVALID_VALUE);
        }

        let quest = ffi::LaQuestParams {
            cache,
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
        let v5 = ffi::LaQuestV5Params {
            quest,
            select_counters: counters.as_mut_ptr(),
            pages_per_block: 64,
        };
        // SAFETY: as above.
        let run = |p: &ffi::LaQuestV5Params| unsafe {
            ffi::la_paged_quest_select_v5(p, std::ptr::null_mut())
        };
        let code = run(&v5);
        assert_ne!(code, INVALID_VALUE, "valid v5 arguments refused");
        assert_ne!(code, 0, "a launch without a GPU cannot succeed");
        for chunk in [64, 128, 1024] {
            let p = ffi::LaQuestV5Params {
                pages_per_block: chunk,
                ..v5
            };
            assert_ne!(run(&p), INVALID_VALUE, "chunk {chunk} refused");
        }
        for chunk in [0, -64, 32, 65, 100, 1088, 2048] {
            let p = ffi::LaQuestV5Params {
                pages_per_block: chunk,
                ..v5
            };
            assert_eq!(run(&p), INVALID_VALUE, "chunk {chunk} accepted");
        }
        let no_counters = ffi::LaQuestV5Params {
            select_counters: std::ptr::null_mut(),
            ..v5
        };
        assert_eq!(run(&no_counters), INVALID_VALUE);
        let no_scores = ffi::LaQuestV5Params {
            quest: ffi::LaQuestParams {
                scores: std::ptr::null_mut(),
                ..quest
            },
            ..v5
        };
        assert_eq!(run(&no_scores), INVALID_VALUE);
        // SAFETY: as above.
        let null = unsafe { ffi::la_paged_quest_select_v5(std::ptr::null(), std::ptr::null_mut()) };
        assert_eq!(null, INVALID_VALUE);
    }
}
