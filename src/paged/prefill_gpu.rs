//! GPU entry point of paged prefill: `PagedPrefill::forward_gpu`, the tensor-core kernel in
//! `kernels/paged_prefill.cu`. Its previous version passed the GPU tests and memcheck on an
//! H200 (sm_90a build, 2026-12-04); the current `load_kv` (table reads before copies,
//! FastDiv) is **not yet verified on a GPU**, nor is the sm_80 build, nor the FP8 (e4m3)
//! cache kernels. Reachable only through this explicit call (nothing picks it automatically).
//!
//! Stream ordering: `forward_gpu` uploads the block table and `seqlens_k` to temporaries on
//! the caller's stream and queues the kernel after them on the same stream; cudarc frees the
//! temporaries stream-ordered after the launch (see `paged/gpu.rs`). `plan_gpu` uploads them
//! once into a [`PagedPrefillPlan`].

use super::prefill::PagedPrefill;
use crate::element::{DType, Element};
use crate::error::{Error, Result};
use crate::gpu::{
    DeviceBuffer, DeviceBufferMut, check_attention_gpu, check_tensor_core_head_dim, cuda_call,
};
use crate::layout::{Strided, Strides};
use crate::paged::KvPages;
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use std::sync::Arc;

/// Query rows per prefill block (`LA_PAGED_PREFILL_ROWS` in paged_prefill.h).
#[cfg_attr(not(longattn_cuda), allow(dead_code))]
pub(crate) const PREFILL_ROWS_PER_BLOCK: usize = 64;

impl PagedPrefill {
    /// GPU prefill on `stream` (nothing is synchronized): buffers as for
    /// [`PagedPrefill::forward_cpu`], on the device; f16 or bf16, head_dim 64, 128 or 256,
    /// q/out strides multiples of 8 elements, 16-byte aligned pointers. Uploads the block
    /// table and `seqlens_k` on every call. Every argument is validated before any device
    /// pointer is taken.
    ///
    /// The cache (type `C`) holds `T`, or [`F8E4M3`](crate::F8E4M3) with the cache's
    /// [`KvScales`](super::KvScales) (dequantised in the kernel).
    ///
    /// Not yet verified on a GPU in its current form (the previous kernel was, on an H200,
    /// 2026-12-04; the FP8 kernels never ran; see the README): an explicit opt-in, never
    /// chosen automatically.
    pub fn forward_gpu<T, C, Q, K, O>(
        &self,
        stream: &Arc<CudaStream>,
        q: Strided<&Q>,
        kv: KvPages<&K>,
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
        self.check_gpu_call::<T, C>(q.extent(), &kv, out.extent(), lse.as_ref().map(|l| l.len()))?;
        let tables = PrefillTables::upload(self, stream)?;
        cuda_call!(
            imp::forward::<T, C, Q, K, O>,
            self,
            &tables,
            stream,
            q,
            kv,
            out,
            lse
        )
    }

    /// Checks what the GPU kernel takes (dtype aside: f16/bf16 is checked per call) and
    /// copies the block table and `seqlens_k` to the device once, on `stream`, for
    /// [`PagedPrefillPlan::forward`]: one plan per step (chunk), one `forward` per layer.
    pub fn plan_gpu(&self, stream: &Arc<CudaStream>) -> Result<PagedPrefillPlan> {
        self.check_gpu(DType::BF16)?;
        Ok(PagedPrefillPlan {
            pf: self.clone(),
            tables: PrefillTables::upload(self, stream)?,
        })
    }

    /// Every check of a GPU call that needs no device pointer: the buffers (as the CPU path),
    /// then what the kernel supports.
    fn check_gpu_call<T: Element, C: Element>(
        &self,
        q: (usize, &Strides),
        kv: &KvPages<&impl DeviceBuffer<C>>,
        out: (usize, &Strides),
        lse_len: Option<usize>,
    ) -> Result<()> {
        self.check_forward(q, out, lse_len, (kv.k.len(), kv.v.len()))?;
        self.check_gpu(T::DTYPE)?;
        super::gpu::check_gpu_cache(&self.cache, T::DTYPE, C::DTYPE)
    }

    /// What the kernel supports: f16/bf16, batch and heads_q within the grid's y/z limits
    /// (the dense checks), head_dim 64/128/256 (the CPU path takes any), and at most
    /// `i32::MAX` token slots in the cache (the kernel keeps a row's slot in 32 bits; at
    /// head_dim >= 64 that is a K cache of 256 GiB).
    fn check_gpu(&self, dtype: DType) -> Result<()> {
        let d = self.cache.head_dim();
        check_attention_gpu("paged prefill", dtype, d, self.cache.batch(), self.heads_q)?;
        check_tensor_core_head_dim("paged prefill on the GPU takes", d)?;
        let layout = self.cache.layout();
        let slots = layout.num_pages.checked_mul(layout.page_size);
        if slots.is_none_or(|n| n > i32::MAX as usize) {
            return Err(Error::Unsupported(format!(
                "paged prefill on the GPU addresses at most {} token slots; this cache has \
                 {} pages of {}",
                i32::MAX,
                layout.num_pages,
                layout.page_size
            )));
        }
        Ok(())
    }
}

/// A [`PagedPrefill`] bound to device copies of its block table and `seqlens_k` (a snapshot
/// at creation, as [`crate::paged::PagedDecodePlan`]: build a new plan when they change):
/// [`PagedPrefillPlan::forward`] makes no allocation and no host-device copy, so a CUDA
/// graph can capture it. The tables live on the stream that built the plan; use the plan on
/// that stream (or order other streams after it). Not yet verified on a GPU.
#[derive(Debug)]
pub struct PagedPrefillPlan {
    pf: PagedPrefill,
    tables: PrefillTables,
}

impl PagedPrefillPlan {
    /// The validated problem.
    pub fn problem(&self) -> &PagedPrefill {
        &self.pf
    }

    /// [`PagedPrefill::forward_gpu`] without the per-call table uploads: validation (host
    /// only) and one launch on `stream`.
    pub fn forward<T, C, Q, K, O>(
        &self,
        stream: &Arc<CudaStream>,
        q: Strided<&Q>,
        kv: KvPages<&K>,
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
        let pf = &self.pf;
        pf.check_gpu_call::<T, C>(q.extent(), &kv, out.extent(), lse.as_ref().map(|l| l.len()))?;
        cuda_call!(
            imp::forward::<T, C, Q, K, O>,
            pf,
            &self.tables,
            stream,
            q,
            kv,
            out,
            lse
        )
    }
}

/// Device copies of a prefill's block table (`[batch, max_pages_per_seq]`), `seqlens_k`
/// (`[batch]`), the cache's `[2, heads_kv]` FP8 scales and, varlen, `cu_seqlens_q`
/// (`[batch + 1]`).
#[derive(Debug)]
#[cfg_attr(not(longattn_cuda), allow(dead_code))]
struct PrefillTables {
    block_table: CudaSlice<i32>,
    seqlens_k: CudaSlice<i32>,
    kv_scales: CudaSlice<f32>,
    cu_seqlens_q: Option<CudaSlice<i32>>,
}

impl PrefillTables {
    fn upload(pf: &PagedPrefill, stream: &Arc<CudaStream>) -> Result<Self> {
        let cache = pf.cache();
        Ok(PrefillTables {
            block_table: stream.clone_htod(cache.block_table())?,
            seqlens_k: stream.clone_htod(cache.seqlens_k())?,
            kv_scales: stream.clone_htod(&cache.kv_scales_flat())?,
            cu_seqlens_q: match pf.cu_seqlens_q() {
                Some(cu) => Some(stream.clone_htod(cu)?),
                None => None,
            },
        })
    }
}

#[cfg(longattn_cuda)]
mod imp {
    use super::*;
    use crate::gpu::ptr_mut_or_null;
    use crate::gpu::{
        check_aligned, check_launch, check_vector_access, dtype_bytes, ffi, kv_params, la_dtype,
    };
    use cudarc::driver::DevicePtr;

    const _: () = assert!(
        ffi::LA_PAGED_PREFILL_ROWS as usize == PREFILL_ROWS_PER_BLOCK,
        "PREFILL_ROWS_PER_BLOCK must equal LA_PAGED_PREFILL_ROWS (paged_prefill.h)"
    );

    pub(super) fn forward<T, C, Q, K, O>(
        pf: &PagedPrefill,
        tables: &PrefillTables,
        stream: &Arc<CudaStream>,
        q: Strided<&Q>,
        kv: KvPages<&K>,
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
        let cache = pf.cache();
        let bytes = dtype_bytes(T::DTYPE);
        let (qp, _s1) = q.data.device_ptr(stream);
        let (kc, _s2) = kv.k.device_ptr(stream);
        let (vc, _s3) = kv.v.device_ptr(stream);
        let (op, _s4) = out.data.device_ptr_mut(stream);
        check_vector_access("q", qp, &q.strides, bytes)?;
        check_vector_access("out", op, &out.strides, bytes)?;
        check_aligned("k_cache", kc)?;
        check_aligned("v_cache", vc)?;
        let (lp, _s5) = ptr_mut_or_null(lse, stream);
        let (bt, _s6) = tables.block_table.device_ptr(stream);
        let (sl, _s7) = tables.seqlens_k.device_ptr(stream);
        let (cu, _s8) = crate::gpu::ptr_or_null(tables.cu_seqlens_q.as_ref(), stream);
        let (ks, _s9) = tables.kv_scales.device_ptr(stream);
        let (kv_dtype, kv_scales) = kv_params::<C>(ks);
        let (wl, wr) = pf.mask().window.to_flash();
        let params = ffi::LaPagedPrefillParams {
            cache: ffi::LaPagedCache {
                k_cache: kc as *mut _,
                v_cache: vc as *mut _,
                block_table: bt as *const i32,
                seqlens_k: sl as *const i32,
                batch: cache.batch() as i32,
                num_pages: cache.layout().num_pages as i32,
                page_size: cache.page_size() as i32,
                heads_kv: cache.heads_kv() as i32,
                head_dim: cache.head_dim() as i32,
                max_pages_per_seq: cache.max_pages_per_seq() as i32,
            },
            q: qp as *const _,
            o: op as *mut _,
            lse: lp as *mut f32,
            q_batch_stride: q.strides.batch,
            q_row_stride: q.strides.seq,
            q_head_stride: q.strides.head,
            o_batch_stride: out.strides.batch,
            o_row_stride: out.strides.seq,
            o_head_stride: out.strides.head,
            q_len: pf.q_len() as i32,
            cu_seqlens_q: cu as *const i32,
            // Read with cu_seqlens_q only: its last entry (an i32).
            total_q: pf.cu_seqlens_q().map_or(0, |cu| cu[cu.len() - 1]),
            heads_q: pf.heads_q() as i32,
            window_left: wl as i32,
            window_right: wr as i32,
            sinks: pf.mask().sinks as i32,
            scale: pf.scale(),
            softcap: pf.softcap().unwrap_or(0.0),
            dtype: la_dtype(T::DTYPE),
            kv_dtype,
            kv_scales,
        };
        // SAFETY: q/out extents, the LSE length, the cache lengths and every page id below
        // seqlens_k were validated on the host; the kernel reads q and the cache and writes
        // out/lse only, ordered on `stream` after the table uploads.
        let code = unsafe { ffi::la_paged_prefill(&params, stream.cu_stream() as _) };
        check_launch("la_paged_prefill", code)
    }
}

/// The slot limit of `check_gpu` (a cache of 2^32 slots cannot be allocated, so no buffer
/// test reaches it).
#[cfg(test)]
mod slot_limit {
    use crate::paged::{PageTable, PagedCache, PagedLayout, PagedPrefill};
    use crate::{AttentionOptions, DType, Error};

    fn prefill(num_pages: usize, page_size: usize) -> PagedPrefill {
        let layout = PagedLayout {
            num_pages,
            page_size,
            heads_kv: 1,
            head_dim: 64,
        };
        let table = PageTable {
            block_table: &[0],
            max_pages_per_seq: 1,
            seqlens_k: &[1],
        };
        let cache = PagedCache::new(layout, table).unwrap();
        PagedPrefill::new(&cache, 1, 1, &AttentionOptions::causal()).unwrap()
    }

    #[test]
    fn gpu_path_refuses_caches_past_i32_slots() {
        let err = prefill(1 << 30, 4).check_gpu(DType::BF16).unwrap_err();
        assert!(
            matches!(&err, Error::Unsupported(m) if m.contains("token slots")),
            "{err}"
        );
        // At the limit the slot check passes (what fails then, if anything, is not it).
        if let Err(e) = prefill((i32::MAX as usize) / 4, 4).check_gpu(DType::BF16) {
            assert!(!e.to_string().contains("token slots"), "{e}");
        }
    }
}

/// The C launcher refuses bad scalar arguments before any CUDA call, so these run without a
/// GPU.
#[cfg(all(test, longattn_cuda))]
mod c_entry_checks {
    use crate::gpu::ffi;

    const INVALID_VALUE: i32 = 1; // cudaErrorInvalidValue

    fn valid() -> ffi::LaPagedPrefillParams {
        // Dangling but non-null, aligned pointers: a refused call never touches them.
        let p = 256usize as *mut std::ffi::c_void;
        ffi::LaPagedPrefillParams {
            cache: ffi::LaPagedCache {
                k_cache: p,
                v_cache: p,
                block_table: p as *const i32,
                seqlens_k: p as *const i32,
                batch: 2,
                num_pages: 4,
                page_size: 16,
                heads_kv: 2,
                head_dim: 128,
                max_pages_per_seq: 2,
            },
            q: p,
            o: p,
            lse: std::ptr::null_mut(),
            q_batch_stride: 4 * 128 * 8,
            q_row_stride: 4 * 128,
            q_head_stride: 128,
            o_batch_stride: 4 * 128 * 8,
            o_row_stride: 4 * 128,
            o_head_stride: 128,
            q_len: 8,
            heads_q: 4,
            cu_seqlens_q: std::ptr::null(),
            total_q: 0,
            window_left: -1,
            window_right: 0,
            sinks: 0,
            scale: 0.088,
            softcap: 0.0,
            dtype: ffi::LaDtype::LA_BF16,
            kv_dtype: ffi::LaDtype::LA_BF16,
            kv_scales: std::ptr::null(),
        }
    }

    #[test]
    fn paged_prefill_entry_refuses_bad_arguments() {
        let mut cases: Vec<(&str, ffi::LaPagedPrefillParams)> = Vec::new();
        let mut add = |name, f: &dyn Fn(&mut ffi::LaPagedPrefillParams)| {
            let mut p = valid();
            f(&mut p);
            cases.push((name, p));
        };
        add("q_len 0", &|p| p.q_len = 0);
        add("heads_q 0", &|p| p.heads_q = 0);
        add("gqa ratio", &|p| p.heads_q = 3);
        add("heads_q > grid", &|p| {
            p.heads_q = 65536;
            p.cache.heads_kv = 1;
        });
        add("head_dim 96", &|p| p.cache.head_dim = 96);
        add("head_dim 32", &|p| p.cache.head_dim = 32);
        add("page_size 0", &|p| p.cache.page_size = 0);
        add("batch 0", &|p| p.cache.batch = 0);
        add("null q", &|p| p.q = std::ptr::null());
        add("null o", &|p| p.o = std::ptr::null_mut());
        add("null table", &|p| p.cache.block_table = std::ptr::null());
        add("window -2", &|p| p.window_left = -2);
        add("sinks < 0", &|p| p.sinks = -1);
        add("scale 0", &|p| p.scale = 0.0);
        add("scale NaN", &|p| p.scale = f32::NAN);
        add("softcap NaN", &|p| p.softcap = f32::NAN);
        add("negative stride", &|p| p.q_row_stride = -1);
        add("f32", &|p| p.dtype = ffi::LaDtype::LA_F32);
        add("varlen total_q < 0", &|p| {
            p.cu_seqlens_q = 256usize as *const i32;
            p.total_q = -1;
        });
        add("slots > i32", &|p| {
            p.cache.num_pages = 1 << 30;
            p.cache.page_size = 4;
        });
        for (name, p) in &cases {
            // SAFETY: the launcher rejects these before reading any pointer.
            let code = unsafe { ffi::la_paged_prefill(p, std::ptr::null_mut()) };
            assert_eq!(code, INVALID_VALUE, "{name}");
        }
        // SAFETY: a null params pointer is refused.
        let code = unsafe { ffi::la_paged_prefill(std::ptr::null(), std::ptr::null_mut()) };
        assert_eq!(code, INVALID_VALUE, "null params");
    }
}
