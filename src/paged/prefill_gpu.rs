//! GPU entry point of paged prefill: `PagedPrefill::forward_gpu`, the tensor-core kernel in
//! `kernels/paged_prefill.cu` (default) or, opted into with [`PagedPrefillKernel::Hopper`],
//! the Hopper kernel in `kernels/paged_prefill_wgmma.cu` (compiled only, never run on a GPU). Its previous version passed the GPU tests and memcheck on an
//! H200 (sm_90a build, 2026-12-04); the current `load_kv` (table reads before copies,
//! FastDiv) is **not yet verified on a GPU**, nor is the sm_80 build, nor the FP8 (e4m3)
//! cache kernels. Reachable only through this explicit call (nothing picks it automatically).
//!
//! Stream ordering: `forward_gpu` uploads the block table and `seqlens_k` to temporaries on
//! the caller's stream and queues the kernel after them on the same stream; cudarc frees the
//! temporaries stream-ordered after the launch (see `paged/gpu.rs`). `plan_gpu` uploads them
//! once into a [`PagedPrefillPlan`].

use super::prefill::{PagedPrefill, PagedPrefillKernel};
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
    /// Runs the kernel of [`PagedPrefill::kernel`]: the tensor-core kernel by default, the
    /// Hopper kernel ([`PagedPrefillKernel::Hopper`], compute capability 9.0, f16/bf16 caches
    /// of `T`, page sizes powers of two from 16; never run on a GPU yet) when asked for with
    /// [`PagedPrefill::with_kernel`]; what it cannot take is an [`Error::Unsupported`].
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
        super::gpu::check_gpu_cache(&self.cache, T::DTYPE, C::DTYPE)?;
        check_kernel_cache(self.kernel, T::DTYPE, C::DTYPE)
    }

    /// What the kernel supports: the cache's capacity and the query rows (packed total)
    /// within [`crate::gpu::GPU_MAX_POSITIONS`], f16/bf16, batch and heads_q within the grid's y/z limits
    /// (the dense checks), head_dim 64/128/256 (the CPU path takes any), and at most
    /// `i32::MAX` token slots in the cache (the kernel keeps a row's slot in 32 bits; at
    /// head_dim >= 64 that is a K cache of 256 GiB).
    fn check_gpu(&self, dtype: DType) -> Result<()> {
        let total_q = self
            .cu_q
            .as_ref()
            .map_or(self.q_len, |cu| cu.last().map_or(0, |&n| n as usize));
        super::gpu::check_gpu_positions_of(&self.cache, ("total_q", total_q))?;
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
        check_kernel_page_size(self.kernel, layout.page_size)
    }
}

/// The page sizes `kernel` takes: any for the tensor-core kernel; powers of two from 16 for
/// the Hopper kernel, which copies each page of a key tile (or the part of a page a tile
/// covers) as one bulk tensor copy whose box rows must divide, or be divided by, its key
/// tile (64 or 128 keys) and start on a 1024-byte swizzle atom (16 rows of 128 bytes are
/// 2048 bytes).
pub(crate) fn check_kernel_page_size(kernel: PagedPrefillKernel, page_size: usize) -> Result<()> {
    if kernel == PagedPrefillKernel::Hopper && (page_size < 16 || !page_size.is_power_of_two()) {
        return Err(Error::Unsupported(format!(
            "the Hopper paged prefill takes page sizes that are powers of two from 16 (one bulk \
             copy per page); page_size = {page_size} runs on PagedPrefillKernel::TensorCore"
        )));
    }
    Ok(())
}

/// The cache types `kernel` takes for queries of `dtype`: the tensor-core kernel any that
/// `check_gpu_cache` accepts; the Hopper kernel only a cache of `dtype` itself (its copies
/// land in the wgmma tiles unconverted, so an FP8 cache stays on the tensor-core kernel).
pub(crate) fn check_kernel_cache(
    kernel: PagedPrefillKernel,
    dtype: DType,
    cache: DType,
) -> Result<()> {
    if kernel == PagedPrefillKernel::Hopper && cache != dtype {
        return Err(Error::Unsupported(format!(
            "the Hopper paged prefill reads caches of q's dtype ({dtype:?}) only; a {cache:?} \
             cache runs on PagedPrefillKernel::TensorCore"
        )));
    }
    Ok(())
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
    use crate::gpu::{check_launch, ffi, la_dtype, ptr_or_null, reason_text};
    use crate::paged::gpu::imp::AttnPtrs;

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
        let device_tables = (&tables.block_table, &tables.seqlens_k, &tables.kv_scales);
        let out_ptr = (&mut *out.data, &out.strides);
        let ptrs = AttnPtrs::new(pf.cache(), stream, device_tables, (&q, &kv), out_ptr, lse)?;
        let (cu, _cu_sync) = ptr_or_null(tables.cu_seqlens_q.as_ref(), stream);
        let (wl, wr) = pf.mask().window.to_flash();
        let params = ffi::LaPagedPrefillParams {
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
            kv_dtype: ptrs.kv.0,
            kv_scales: ptrs.kv.1,
        };
        let cu_stream = crate::gpu::launch_stream(stream)? as _;
        match pf.kernel {
            PagedPrefillKernel::TensorCore => {
                // SAFETY: q/out extents, the LSE length, the cache lengths and every page id
                // below seqlens_k were validated on the host; the kernel reads q and the cache
                // and writes out/lse only, ordered on `stream` after the table uploads.
                let code = unsafe { ffi::la_paged_prefill(&params, cu_stream) };
                check_launch("la_paged_prefill", code)
            }
            PagedPrefillKernel::Hopper => {
                // SAFETY: as above (the same params; the kernel reads only the pages of keys
                // below seqlens_k).
                let code = unsafe { ffi::la_paged_prefill_wgmma(&params, cu_stream) };
                // cudaErrorNotSupported: refused before any launch, with a reason.
                if code == ffi::LA_DENSE_KERNEL_UNSUPPORTED as i32 {
                    // SAFETY: the params just passed; the query reads their scalars and
                    // pointer values only and returns a static NUL-terminated string or NULL.
                    let why = unsafe {
                        reason_text(ffi::la_paged_prefill_wgmma_unsupported_reason(&params))
                    };
                    return Err(Error::Unsupported(format!(
                        "the Hopper paged prefill kernel cannot run this problem here: {why}"
                    )));
                }
                check_launch("la_paged_prefill_wgmma", code)
            }
        }
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

/// The host-side checks of the kernel choice (no GPU needed).
#[cfg(test)]
mod kernel_choice {
    use super::{check_kernel_cache, check_kernel_page_size};
    use crate::paged::{PageTable, PagedCache, PagedLayout, PagedPrefill, PagedPrefillKernel};
    use crate::{AttentionOptions, DType, Error};

    fn prefill(page_size: usize, kernel: PagedPrefillKernel) -> PagedPrefill {
        let layout = PagedLayout {
            num_pages: 4,
            page_size,
            heads_kv: 1,
            head_dim: 128,
        };
        let table = PageTable {
            block_table: &[3, 1],
            max_pages_per_seq: 2,
            seqlens_k: &[page_size as i32 + 1],
        };
        let cache = PagedCache::new(layout, table).unwrap();
        PagedPrefill::new(&cache, 2, 3, &AttentionOptions::causal())
            .unwrap()
            .with_kernel(kernel)
    }

    fn unsupported(r: crate::Result<()>, what: &str) {
        assert!(
            matches!(&r, Err(Error::Unsupported(m)) if m.contains(what)),
            "{r:?}"
        );
    }

    #[test]
    fn default_kernel_is_the_tensor_core_one() {
        let pf = prefill(16, PagedPrefillKernel::TensorCore);
        assert_eq!(pf.kernel(), PagedPrefillKernel::TensorCore);
        assert_eq!(
            PagedPrefillKernel::default(),
            PagedPrefillKernel::TensorCore
        );
        let built = PagedPrefill::new(pf.cache(), 2, 3, &AttentionOptions::causal()).unwrap();
        assert_eq!(built.kernel(), PagedPrefillKernel::TensorCore);
        assert_eq!(
            built.with_kernel(PagedPrefillKernel::Hopper).kernel(),
            PagedPrefillKernel::Hopper
        );
    }

    #[test]
    fn hopper_takes_power_of_two_pages_from_16() {
        for ps in [16, 32, 64, 128, 256, 512, 1024] {
            check_kernel_page_size(PagedPrefillKernel::Hopper, ps).unwrap();
            prefill(ps, PagedPrefillKernel::Hopper)
                .check_gpu(DType::BF16)
                .unwrap();
        }
        for ps in [1, 2, 4, 8, 12, 24, 48, 96, 100, 129, 192, 384] {
            unsupported(
                check_kernel_page_size(PagedPrefillKernel::Hopper, ps),
                "powers of two from 16",
            );
            // The whole GPU check refuses it too (plan_gpu and forward_gpu run it first).
            unsupported(
                prefill(ps, PagedPrefillKernel::Hopper).check_gpu(DType::F16),
                "powers of two from 16",
            );
            // The tensor-core kernel takes any page size.
            check_kernel_page_size(PagedPrefillKernel::TensorCore, ps).unwrap();
            prefill(ps, PagedPrefillKernel::TensorCore)
                .check_gpu(DType::F16)
                .unwrap();
        }
    }

    #[test]
    fn hopper_reads_caches_of_q_dtype_only() {
        for t in [DType::F16, DType::BF16] {
            check_kernel_cache(PagedPrefillKernel::Hopper, t, t).unwrap();
            check_kernel_cache(PagedPrefillKernel::TensorCore, t, DType::F8E4M3).unwrap();
            unsupported(
                check_kernel_cache(PagedPrefillKernel::Hopper, t, DType::F8E4M3),
                "caches of q's dtype",
            );
        }
        unsupported(
            check_kernel_cache(PagedPrefillKernel::Hopper, DType::F16, DType::BF16),
            "caches of q's dtype",
        );
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
        // The Hopper launcher runs the same check first.
        for (name, p) in &cases {
            // SAFETY: as above.
            let code = unsafe { ffi::la_paged_prefill_wgmma(p, std::ptr::null_mut()) };
            assert_eq!(code, INVALID_VALUE, "wgmma {name}");
            assert_eq!(reason(p), "its parameters are invalid", "wgmma {name}");
        }
        // SAFETY: a null params pointer is refused.
        let code = unsafe { ffi::la_paged_prefill_wgmma(std::ptr::null(), std::ptr::null_mut()) };
        assert_eq!(code, INVALID_VALUE, "wgmma null params");
    }

    /// The Hopper launcher's reason for `p` ("" for none).
    fn reason(p: *const ffi::LaPagedPrefillParams) -> String {
        // SAFETY: the query reads the params' scalars only (and device attributes) and
        // returns a static NUL-terminated string or NULL.
        let r = unsafe { ffi::la_paged_prefill_wgmma_unsupported_reason(p) };
        if r.is_null() {
            String::new()
        } else {
            // SAFETY: non-null, static and NUL-terminated.
            unsafe { std::ffi::CStr::from_ptr(r) }
                .to_string_lossy()
                .into_owned()
        }
    }

    /// Valid params the Hopper kernel does not take are refused with cudaErrorNotSupported
    /// (801) and a reason, before any device call (these checks precede the device query).
    #[test]
    fn paged_prefill_wgmma_refuses_what_it_does_not_take() {
        const NOT_SUPPORTED: i32 = ffi::LA_DENSE_KERNEL_UNSUPPORTED as i32;
        let mut cases: Vec<(&str, ffi::LaPagedPrefillParams, &str)> = Vec::new();
        let mut add = |name, f: &dyn Fn(&mut ffi::LaPagedPrefillParams), why| {
            let mut p = valid();
            f(&mut p);
            cases.push((name, p, why));
        };
        add(
            "fp8 cache",
            &|p| {
                p.kv_dtype = ffi::LaDtype::LA_F8E4M3;
                p.kv_scales = 256usize as *const f32;
            },
            "FP8",
        );
        for ps in [1, 8, 24, 48, 100] {
            add(
                "page size",
                &move |p| p.cache.page_size = ps,
                "powers of two",
            );
        }
        for (name, p, why) in &cases {
            assert!(reason(p).contains(why), "{name}: {}", reason(p));
            // SAFETY: refused before any pointer is read or any launch.
            let code = unsafe { ffi::la_paged_prefill_wgmma(p, std::ptr::null_mut()) };
            assert_eq!(code, NOT_SUPPORTED, "{name}");
        }
        // SAFETY: a null params pointer is refused.
        let r = unsafe { ffi::la_paged_prefill_wgmma_unsupported_reason(std::ptr::null()) };
        assert!(!r.is_null());
        // Cache types that la_paged_prefill refuses as invalid are invalid here too.
        let mut mixed = valid();
        mixed.kv_dtype = ffi::LaDtype::LA_F16;
        let mut fp8_no_scales = valid();
        fp8_no_scales.kv_dtype = ffi::LaDtype::LA_F8E4M3;
        for (name, p) in [
            ("f16 cache, bf16 q", mixed),
            ("fp8 without scales", fp8_no_scales),
        ] {
            // SAFETY: refused before any pointer is read.
            let code = unsafe { ffi::la_paged_prefill_wgmma(&p, std::ptr::null_mut()) };
            assert_eq!(code, INVALID_VALUE, "{name}");
            // SAFETY: as above.
            let code = unsafe { ffi::la_paged_prefill(&p, std::ptr::null_mut()) };
            assert_eq!(code, INVALID_VALUE, "mma {name}");
        }
    }
}
