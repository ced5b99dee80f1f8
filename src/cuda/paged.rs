//! GPU entry points of the paged family: `PagedCache::append_gpu`,
//! `PagedDecode::select_gpu` and `PagedDecode::forward_gpu`: validation, then the launchers
//! of `kernels/paged.cu`. The tables are copied to the device on the caller's stream.

use crate::element::{DType, Element};
use crate::error::{Error, Result};
use crate::layout::Strided;
use crate::paged::{KvPages, PageMeta, PagedCache, PagedDecode};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};
use std::sync::Arc;

/// Largest head dim of the paged kernels (one warp covers a key row with 16-byte loads).
pub const GPU_MAX_HEAD_DIM: usize = 256;

/// Quest selection on the device: `scores: [batch, heads_kv, max_pages_per_seq]` (`-inf`
/// where not a candidate or not a Quest head), `page_list: [batch, heads_kv,
/// max_pages_per_seq]` (the first `page_count[b * heads_kv + kvh]` entries are the selected
/// logical pages, ascending; only Quest heads' rows are written).
#[derive(Debug)]
pub struct GpuSelection {
    pub scores: CudaSlice<f32>,
    pub page_list: CudaSlice<i32>,
    pub page_count: CudaSlice<i32>,
}

fn check_gpu_dims(cache: &PagedCache, dtype: DType) -> Result<()> {
    if dtype == DType::F32 {
        return Err(Error::Unsupported(
            "the paged kernels take f16 or bf16 (f32 runs on the CPU path)".into(),
        ));
    }
    let d = cache.head_dim();
    if !d.is_multiple_of(8) || d > GPU_MAX_HEAD_DIM {
        return Err(Error::Unsupported(format!(
            "head_dim {d} on the GPU: must be a multiple of 8 and at most {GPU_MAX_HEAD_DIM}"
        )));
    }
    if cache.batch() > 65535 || cache.heads_kv() > 65535 {
        return Err(Error::Unsupported(format!(
            "batch ({}) and heads_kv ({}) must be at most 65535 on the GPU",
            cache.batch(),
            cache.heads_kv()
        )));
    }
    Ok(())
}

impl PagedCache {
    /// GPU append (see [`PagedCache::append_cpu`] for the semantics and the metadata
    /// definition). `cu_seqlens_new` is a host array; `k_new, v_new: [total_new, heads_kv,
    /// head_dim]` device buffers with strides that are multiples of 8 elements.
    pub fn append_gpu<T, I, O>(
        &self,
        stream: &Arc<CudaStream>,
        cu_seqlens_new: &[i32],
        k_new: Strided<&I>,
        v_new: Strided<&I>,
        cache: KvPages<&mut O>,
        meta: Option<PageMeta<&mut CudaSlice<f32>>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        I: DevicePtr<T>,
        O: DevicePtrMut<T>,
    {
        let max_touched = self.check_append(
            cu_seqlens_new,
            (k_new.data.len(), &k_new.strides),
            (v_new.data.len(), &v_new.strides),
        )?;
        self.check_kv(cache.k.len(), cache.v.len())?;
        if let Some(m) = &meta {
            self.check_meta(m.kmin.len(), m.kmax.len())?;
        }
        check_gpu_dims(self, T::DTYPE)?;
        imp::append::<T, I, O>(
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
    /// Quest scoring and top-B selection on the GPU (same selection as
    /// [`PagedDecode::select_cpu`]; scores may differ by float summation order).
    pub fn select_gpu<T, I>(
        &self,
        stream: &Arc<CudaStream>,
        q: Strided<&I>,
        meta: PageMeta<&CudaSlice<f32>>,
    ) -> Result<GpuSelection>
    where
        T: Element + DeviceRepr,
        I: DevicePtr<T>,
    {
        self.check_io((q.data.len(), &q.strides), None, None)?;
        self.cache.check_meta(meta.kmin.len(), meta.kmax.len())?;
        check_gpu_dims(&self.cache, T::DTYPE)?;
        imp::select::<T, I>(self, stream, q, meta)
    }

    /// GPU decode on `stream` (nothing is synchronized). Buffers as for
    /// [`PagedDecode::forward_cpu`], on the device: q/out strides multiples of 8 elements,
    /// 16-byte aligned pointers, f16 or bf16, head_dim a multiple of 8 up to 256. Quest heads
    /// run the selection kernel first; the split count is [`PagedDecode::splits_for`] the
    /// device's SM count.
    pub fn forward_gpu<T, I, O>(
        &self,
        stream: &Arc<CudaStream>,
        q: Strided<&I>,
        kv: KvPages<&I>,
        meta: Option<PageMeta<&CudaSlice<f32>>>,
        out: Strided<&mut O>,
        lse: Option<&mut CudaSlice<f32>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        I: DevicePtr<T>,
        O: DevicePtrMut<T>,
    {
        self.check_io(
            (q.data.len(), &q.strides),
            Some((out.data.len(), &out.strides)),
            lse.as_ref().map(|l| l.len()),
        )?;
        self.cache.check_kv(kv.k.len(), kv.v.len())?;
        if let Some(m) = &meta {
            self.cache.check_meta(m.kmin.len(), m.kmax.len())?;
        }
        self.check_policy_inputs(meta.is_some())?;
        check_gpu_dims(&self.cache, T::DTYPE)?;
        let row_blocks = (self.q_len * self.group()).div_ceil(crate::paged::DECODE_ROWS_PER_BLOCK);
        if self.cache.heads_kv() * row_blocks > 65535 {
            return Err(Error::Unsupported(format!(
                "heads_kv ({}) * row blocks ({row_blocks}) exceeds the grid limit 65535",
                self.cache.heads_kv()
            )));
        }
        imp::decode::<T, I, O>(self, stream, q, kv, meta, out, lse)
    }
}

#[cfg(not(longattn_cuda))]
mod imp {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    pub(super) fn append<T, I, O>(
        _: &PagedCache,
        _: &Arc<CudaStream>,
        _: &[i32],
        _: Strided<&I>,
        _: Strided<&I>,
        _: KvPages<&mut O>,
        _: Option<PageMeta<&mut CudaSlice<f32>>>,
        _: usize,
    ) -> Result<()>
    where
        I: DevicePtr<T>,
        O: DevicePtrMut<T>,
    {
        Err(Error::CudaNotCompiled)
    }

    pub(super) fn select<T, I>(
        _: &PagedDecode,
        _: &Arc<CudaStream>,
        _: Strided<&I>,
        _: PageMeta<&CudaSlice<f32>>,
    ) -> Result<GpuSelection>
    where
        I: DevicePtr<T>,
    {
        Err(Error::CudaNotCompiled)
    }

    pub(super) fn decode<T, I, O>(
        _: &PagedDecode,
        _: &Arc<CudaStream>,
        _: Strided<&I>,
        _: KvPages<&I>,
        _: Option<PageMeta<&CudaSlice<f32>>>,
        _: Strided<&mut O>,
        _: Option<&mut CudaSlice<f32>>,
    ) -> Result<()>
    where
        I: DevicePtr<T>,
        O: DevicePtrMut<T>,
    {
        Err(Error::CudaNotCompiled)
    }
}

#[cfg(longattn_cuda)]
mod imp {
    use super::*;
    use crate::cuda::{ALIGN_BYTES, check_launch, check_vector_access, dtype_bytes, ffi, la_dtype};
    use crate::layout::Strides;
    use crate::paged::HeadPolicy;
    use cudarc::driver::sys::CUdevice_attribute;

    fn check_aligned(name: &str, ptr: u64) -> Result<()> {
        if !ptr.is_multiple_of(ALIGN_BYTES) {
            return Err(Error::Stride(format!(
                "{name} device pointer {ptr:#x} is not {ALIGN_BYTES}-byte aligned"
            )));
        }
        Ok(())
    }

    /// Device copies of the tables; kept alive until the launches are queued.
    struct Tables {
        block_table: CudaSlice<i32>,
        seqlens_k: CudaSlice<i32>,
    }

    fn upload_tables(cache: &PagedCache, stream: &Arc<CudaStream>) -> Result<Tables> {
        Ok(Tables {
            block_table: stream.clone_htod(cache.block_table())?,
            seqlens_k: stream.clone_htod(cache.seqlens_k())?,
        })
    }

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

    fn head_kinds(decode: &PagedDecode) -> Vec<i32> {
        decode
            .policy()
            .heads
            .iter()
            .map(|p| match p {
                HeadPolicy::Full => ffi::LaHeadKind::LA_HEAD_FULL as i32,
                HeadPolicy::Listed => ffi::LaHeadKind::LA_HEAD_PAGES as i32,
                HeadPolicy::Streaming => ffi::LaHeadKind::LA_HEAD_STREAMING as i32,
                HeadPolicy::Quest => ffi::LaHeadKind::LA_HEAD_QUEST as i32,
            })
            .collect()
    }

    /// Strides of a `[rows, heads, dim]` packed tensor checked for 16-byte vectors (the
    /// batch stride is unused).
    fn packed(s: &Strides) -> Strides {
        Strides { batch: 0, ..*s }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn append<T, I, O>(
        cache: &PagedCache,
        stream: &Arc<CudaStream>,
        cu_seqlens_new: &[i32],
        k_new: Strided<&I>,
        v_new: Strided<&I>,
        kv: KvPages<&mut O>,
        meta: Option<PageMeta<&mut CudaSlice<f32>>>,
        max_touched: usize,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        I: DevicePtr<T>,
        O: DevicePtrMut<T>,
    {
        if max_touched == 0 {
            return Ok(());
        }
        let bytes = dtype_bytes(T::DTYPE);
        let tables = upload_tables(cache, stream)?;
        let cu = stream.clone_htod(cu_seqlens_new)?;
        let (kn, _s1) = k_new.data.device_ptr(stream);
        let (vn, _s2) = v_new.data.device_ptr(stream);
        check_vector_access("k_new", kn, &packed(&k_new.strides), bytes)?;
        check_vector_access("v_new", vn, &packed(&v_new.strides), bytes)?;
        let KvPages { k, v } = kv;
        let (kc, _s3) = k.device_ptr_mut(stream);
        let (vc, _s4) = v.device_ptr_mut(stream);
        check_aligned("k_cache", kc)?;
        check_aligned("v_cache", vc)?;
        let (bt, _s5) = tables.block_table.device_ptr(stream);
        let (sl, _s6) = tables.seqlens_k.device_ptr(stream);
        let (cu_ptr, _s7) = cu.device_ptr(stream);
        let mut meta = meta;
        let (kmin, kmax, _s8, _s9) = match meta.as_mut() {
            Some(m) => {
                let (a, sa) = m.kmin.device_ptr_mut(stream);
                let (b, sb) = m.kmax.device_ptr_mut(stream);
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
            kmin: kmin as *mut f32,
            kmax: kmax as *mut f32,
            max_pages_touched: max_touched as i32,
            dtype: la_dtype(T::DTYPE),
        };
        // SAFETY: extents, page ids and writer uniqueness were validated on the host; the
        // launch is ordered on `stream` after the table uploads.
        let code = unsafe { ffi::la_paged_append(&params, stream.cu_stream() as _) };
        check_launch("la_paged_append", code)
    }

    /// Runs the Quest kernel into `page_list`/`page_count` (and returns the scores).
    #[allow(clippy::too_many_arguments)]
    fn quest_into<T, I>(
        decode: &PagedDecode,
        stream: &Arc<CudaStream>,
        tables: &Tables,
        kinds: &CudaSlice<i32>,
        q: &Strided<&I>,
        meta: &PageMeta<&CudaSlice<f32>>,
        page_list: &mut CudaSlice<i32>,
        page_count: &mut CudaSlice<i32>,
    ) -> Result<CudaSlice<f32>>
    where
        T: Element + DeviceRepr,
        I: DevicePtr<T>,
    {
        let cache = decode.cache();
        let n = cache.batch() * cache.heads_kv() * cache.max_pages_per_seq();
        let mut scores = stream.alloc_zeros::<f32>(n)?;
        let (qp, _s1) = q.data.device_ptr(stream);
        let (bt, _s2) = tables.block_table.device_ptr(stream);
        let (sl, _s3) = tables.seqlens_k.device_ptr(stream);
        let (kmin, _s4) = meta.kmin.device_ptr(stream);
        let (kmax, _s5) = meta.kmax.device_ptr(stream);
        check_aligned("kmin", kmin)?;
        check_aligned("kmax", kmax)?;
        let (kd, _s6) = kinds.device_ptr(stream);
        let (sc, _s7) = scores.device_ptr_mut(stream);
        let (pl, _s8) = page_list.device_ptr_mut(stream);
        let (pc, _s9) = page_count.device_ptr_mut(stream);
        let (wl, wr) = decode.base_mask().window.to_flash();
        let quest = decode.policy().quest;
        let params = ffi::LaQuestParams {
            cache: la_cache(cache, 0, 0, bt, sl),
            q: qp as *const _,
            q_batch_stride: q.strides.batch,
            q_row_stride: q.strides.seq,
            q_head_stride: q.strides.head,
            q_len: decode.q_len() as i32,
            heads_q: decode.heads_q() as i32,
            kmin: kmin as *const f32,
            kmax: kmax as *const f32,
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
        };
        // SAFETY: q extent and the metadata length were validated; the kernel writes only
        // rows of Quest heads within [batch, heads_kv, max_pages_per_seq].
        let code = unsafe { ffi::la_paged_quest_select(&params, stream.cu_stream() as _) };
        check_launch("la_paged_quest_select", code)?;
        drop((_s7, _s8, _s9));
        Ok(scores)
    }

    pub(super) fn select<T, I>(
        decode: &PagedDecode,
        stream: &Arc<CudaStream>,
        q: Strided<&I>,
        meta: PageMeta<&CudaSlice<f32>>,
    ) -> Result<GpuSelection>
    where
        T: Element + DeviceRepr,
        I: DevicePtr<T>,
    {
        let cache = decode.cache();
        let tables = upload_tables(cache, stream)?;
        let kinds = stream.clone_htod(&head_kinds(decode))?;
        let n = cache.batch() * cache.heads_kv();
        let mut page_list = stream.alloc_zeros::<i32>(n * cache.max_pages_per_seq())?;
        let mut page_count = stream.alloc_zeros::<i32>(n)?;
        let scores = quest_into::<T, I>(
            decode,
            stream,
            &tables,
            &kinds,
            &q,
            &meta,
            &mut page_list,
            &mut page_count,
        )?;
        Ok(GpuSelection {
            scores,
            page_list,
            page_count,
        })
    }

    pub(super) fn decode<T, I, O>(
        decode: &PagedDecode,
        stream: &Arc<CudaStream>,
        q: Strided<&I>,
        kv: KvPages<&I>,
        meta: Option<PageMeta<&CudaSlice<f32>>>,
        out: Strided<&mut O>,
        lse: Option<&mut CudaSlice<f32>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        I: DevicePtr<T>,
        O: DevicePtrMut<T>,
    {
        let cache = decode.cache();
        let bytes = dtype_bytes(T::DTYPE);
        let (hkv, mp) = (cache.heads_kv(), cache.max_pages_per_seq());
        let tables = upload_tables(cache, stream)?;
        let kinds_host = head_kinds(decode);
        let kinds = stream.clone_htod(&kinds_host)?;
        // Page lists: explicit lists for Listed heads; Quest heads' rows come from the kernel.
        let listed = decode.policy().heads.contains(&HeadPolicy::Listed);
        let mut lists: Option<(CudaSlice<i32>, CudaSlice<i32>)> = None;
        if listed || decode.needs_meta() {
            let mut pl = vec![0i32; cache.batch() * hkv * mp];
            let mut pc = vec![0i32; cache.batch() * hkv];
            if let Some(given) = decode.lists.as_ref() {
                for b in 0..cache.batch() {
                    for kvh in 0..hkv {
                        if decode.policy().heads[kvh] == HeadPolicy::Listed {
                            let l = given.get(b, kvh);
                            let row = (b * hkv + kvh) * mp;
                            for (dst, &p) in pl[row..row + l.len()].iter_mut().zip(l) {
                                *dst = p as i32;
                            }
                            pc[b * hkv + kvh] = l.len() as i32;
                        }
                    }
                }
            }
            lists = Some((stream.clone_htod(&pl)?, stream.clone_htod(&pc)?));
        }
        if let (Some(m), Some((pl, pc))) = (meta.as_ref(), lists.as_mut())
            && decode.needs_meta()
        {
            quest_into::<T, I>(decode, stream, &tables, &kinds, &q, m, pl, pc)?;
        }
        let sm_count = stream
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as usize;
        let splits = decode.splits_for(sm_count);
        let partial = if splits > 1 {
            let rows = splits * decode.lse_len();
            Some((
                stream.alloc_zeros::<f32>(rows * cache.head_dim())?,
                stream.alloc_zeros::<f32>(rows)?,
            ))
        } else {
            None
        };
        let (qp, _s1) = q.data.device_ptr(stream);
        let (kc, _s2) = kv.k.device_ptr(stream);
        let (vc, _s3) = kv.v.device_ptr(stream);
        let (op, _s4) = out.data.device_ptr_mut(stream);
        check_vector_access("q", qp, &q.strides, bytes)?;
        check_vector_access("out", op, &out.strides, bytes)?;
        check_aligned("k_cache", kc)?;
        check_aligned("v_cache", vc)?;
        let (lp, _s5) = match lse {
            Some(l) => {
                let (p, s) = l.device_ptr_mut(stream);
                (p, Some(s))
            }
            None => (0, None),
        };
        let (bt, _s6) = tables.block_table.device_ptr(stream);
        let (sl, _s7) = tables.seqlens_k.device_ptr(stream);
        let (kd, _s8) = kinds.device_ptr(stream);
        let (pl, _s9, pc, _s10) = match lists.as_ref() {
            Some((pl, pc)) => {
                let (a, sa) = pl.device_ptr(stream);
                let (b, sb) = pc.device_ptr(stream);
                (a, Some(sa), b, Some(sb))
            }
            None => (0, None, 0, None),
        };
        let mut partial = partial;
        let (opart, _s11, lpart, _s12) = match partial.as_mut() {
            Some((o, l)) => {
                let (a, sa) = o.device_ptr_mut(stream);
                let (b, sb) = l.device_ptr_mut(stream);
                (a, Some(sa), b, Some(sb))
            }
            None => (0, None, 0, None),
        };
        let (wl, wr) = decode.base_mask().window.to_flash();
        let streaming = decode.policy().streaming;
        let has_streaming = decode.policy().heads.contains(&HeadPolicy::Streaming);
        let params = ffi::LaPagedDecodeParams {
            cache: la_cache(cache, kc, vc, bt, sl),
            q: qp as *const _,
            o: op as *mut _,
            lse: lp as *mut f32,
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
        };
        // SAFETY: every extent, page id and page list was validated on the host; the
        // kernels read the cache and write out/lse (and the split scratch) only, ordered on
        // `stream` after the uploads and the Quest selection.
        let code = unsafe { ffi::la_paged_decode(&params, stream.cu_stream() as _) };
        check_launch("la_paged_decode", code)
    }
}
