//! Paged append: new tokens' K/V into their page slots (quantised for an FP8 cache), with the
//! Quest page metadata (`kmin`/`kmax`) updated when given.

use super::{
    CPagedDesc, CTensor, CallError, DTypeCode, RawMeta, Status, borrow_device, byte_range,
    caller_stream, check_disjoint, fp8_scales, guarded, host_slice, host_slice_mut, paged_cache,
    strides, table, write_sizes,
};
use crate::element::{Element, F8E4M3};
use crate::error::Error;
use crate::layout::Strided;
use crate::paged::{KvPages, KvScales, PageMeta, PagedCache};
use half::{bf16, f16};

/// `longattn_paged_kv_mut`: the writable buffers of a paged cache (host or device, as the
/// call): K and V caches of `cache_len` elements each and the optional Quest metadata.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CPagedKvMut {
    /// Key cache, `[num_pages, page_size, heads_kv, head_dim]`.
    pub k_cache: *mut std::ffi::c_void,
    /// Value cache, as `k_cache`.
    pub v_cache: *mut std::ffi::c_void,
    /// Elements in each of `k_cache`, `v_cache`.
    pub cache_len: usize,
    /// `[num_pages, heads_kv, head_dim]` per-page key minima, or NULL with `kmax` NULL.
    pub kmin: *mut std::ffi::c_void,
    /// Per-page key maxima, as `kmin`.
    pub kmax: *mut std::ffi::c_void,
    /// Elements in each of `kmin`, `kmax`.
    pub meta_len: usize,
}

/// `longattn_paged_cache_sizes()`: elements of one cache buffer and of one metadata buffer
/// (`kmin` or `kmax`) of `desc`'s cache; the decode fields are not read.
///
/// # Safety
/// `desc` is a valid descriptor (its tables readable); the outputs are NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_paged_cache_sizes(
    desc: *const CPagedDesc,
    cache_len: *mut usize,
    meta_len: *mut usize,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor by the contract.
        let (_, cache) = unsafe { paged_cache(desc, None) }?;
        let layout = cache.layout();
        // SAFETY: NULL or writable by the contract.
        unsafe {
            write_sizes(&[
                (cache_len, layout.cache_len()),
                (meta_len, layout.meta_len()),
            ])
        };
        Ok(())
    })
}

/// One validated append: the cache (with its FP8 scales) and the new tokens' offsets.
struct Append<'a> {
    cache: PagedCache,
    cu_seqlens_new: &'a [i32],
}

impl Append<'_> {
    /// # Safety
    /// `desc` as [`super::paged_problem`]; `cu_seqlens_new` NULL or `batch + 1` readable
    /// values.
    unsafe fn new(
        desc: *const CPagedDesc,
        cu_seqlens_new: *const i32,
        scales: Option<KvScales>,
    ) -> Result<Self, CallError> {
        // SAFETY: forwarded contract.
        let (_, cache) = unsafe { paged_cache(desc, scales) }?;
        let n = cache.batch() + 1; // batch is the length of a slice of i32: no overflow
        // SAFETY: `batch + 1` values by the contract.
        let cu_seqlens_new = unsafe { table(cu_seqlens_new, n, "cu_seqlens_new") }?;
        Ok(Append {
            cache,
            cu_seqlens_new,
        })
    }

    /// [`Append::new`] into an FP8 cache with the scales `(k, v)` (NULL or `heads_kv` floats
    /// each; both NULL: scale 1).
    ///
    /// # Safety
    /// As [`Append::new`], plus the scales.
    unsafe fn fp8(
        desc: *const CPagedDesc,
        cu_seqlens_new: *const i32,
        (k, v): (*const f32, *const f32),
    ) -> Result<Self, CallError> {
        // SAFETY: forwarded contract.
        unsafe { Self::new(desc, cu_seqlens_new, fp8_scales(desc, k, v)?) }
    }

    /// Every written buffer (caches, metadata) must overlap no other buffer of the call.
    fn check_disjoint<T, C>(
        &self,
        (k_new, v_new): &(CTensor, CTensor),
        kv: &CPagedKvMut,
        meta: Option<RawMeta>,
    ) -> Result<(), CallError> {
        let (t, c) = (std::mem::size_of::<T>(), std::mem::size_of::<C>());
        let cu = self.cu_seqlens_new;
        let mut writes = vec![
            Some((byte_range(kv.k_cache, kv.cache_len, c), "k_cache")),
            Some((byte_range(kv.v_cache, kv.cache_len, c), "v_cache")),
        ];
        writes.extend(meta.iter().flat_map(|m| m.ranges(c)).map(Some));
        check_disjoint(
            &writes,
            &[
                (byte_range(k_new.data, k_new.len, t), "k_new"),
                (byte_range(v_new.data, v_new.len, t), "v_new"),
                (
                    byte_range(cu.as_ptr().cast(), cu.len(), 4),
                    "cu_seqlens_new",
                ),
            ],
        )
    }
}

/// The cache's metadata, both pointers or neither.
fn meta_of(kv: &CPagedKvMut) -> Result<Option<RawMeta>, CallError> {
    RawMeta::new((kv.kmin.cast_const(), kv.kmax.cast_const()), kv.meta_len)
}

/// # Safety
/// As [`longattn_paged_append_cpu`], with `T` the new tokens' and `C` the cache's type.
unsafe fn append_cpu_typed<T: Element, C: Element>(
    a: &Append,
    (k_new, v_new): (CTensor, CTensor),
    kv: CPagedKvMut,
) -> Result<(), CallError> {
    let meta = meta_of(&kv)?;
    a.check_disjoint::<T, C>(&(k_new, v_new), &kv, meta)?;
    // SAFETY (all): `len` elements each by the contract, the written ones checked disjoint.
    let (k_s, v_s, kc, vc) = unsafe {
        (
            host_slice::<T>(k_new.data, k_new.len, "k_new")?,
            host_slice::<T>(v_new.data, v_new.len, "v_new")?,
            host_slice_mut::<C>(kv.k_cache, kv.cache_len, "k_cache")?,
            host_slice_mut::<C>(kv.v_cache, kv.cache_len, "v_cache")?,
        )
    };
    let meta = match meta {
        // SAFETY: `len` writable elements each by the contract, checked disjoint.
        Some(m) => Some(unsafe {
            PageMeta {
                kmin: host_slice_mut::<C>(m.kmin.cast_mut(), m.len, "kmin")?,
                kmax: host_slice_mut::<C>(m.kmax.cast_mut(), m.len, "kmax")?,
            }
        }),
        None => None,
    };
    a.cache.append_cpu(
        a.cu_seqlens_new,
        Strided::new(k_s, strides(k_new.strides)),
        Strided::new(v_s, strides(v_new.strides)),
        KvPages { k: kc, v: vc },
        meta,
    )?;
    Ok(())
}

/// # Safety
/// As [`longattn_paged_append_cuda`], with `T` the new tokens' and `C` the cache's type.
unsafe fn append_cuda_typed<T, C>(
    a: &Append,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    (k_new, v_new): (CTensor, CTensor),
    kv: CPagedKvMut,
) -> Result<(), CallError>
where
    T: Element + cudarc::driver::DeviceRepr,
    C: Element + cudarc::driver::DeviceRepr,
{
    let meta = meta_of(&kv)?;
    a.check_disjoint::<T, C>(&(k_new, v_new), &kv, meta)?;
    // SAFETY (all): device allocations of the stated lengths by the contract, the written
    // ones checked disjoint; never freed here (Borrowed).
    let (bk_new, bv_new, mut bk, mut bv) = unsafe {
        (
            borrow_device::<T>(stream, k_new.data, k_new.len, "k_new")?,
            borrow_device::<T>(stream, v_new.data, v_new.len, "v_new")?,
            borrow_device::<C>(stream, kv.k_cache, kv.cache_len, "k_cache")?,
            borrow_device::<C>(stream, kv.v_cache, kv.cache_len, "v_cache")?,
        )
    };
    let mut meta = match meta {
        // SAFETY: as above, `len` elements each.
        Some(m) => Some(unsafe {
            (
                borrow_device::<C>(stream, m.kmin, m.len, "kmin")?,
                borrow_device::<C>(stream, m.kmax, m.len, "kmax")?,
            )
        }),
        None => None,
    };
    a.cache.append_gpu::<T, C, _, _>(
        stream,
        a.cu_seqlens_new,
        Strided::new(bk_new.get(), strides(k_new.strides)),
        Strided::new(bv_new.get(), strides(v_new.strides)),
        KvPages {
            k: bk.get_mut(),
            v: bv.get_mut(),
        },
        meta.as_mut().map(|(kmin, kmax)| PageMeta {
            kmin: kmin.get_mut(),
            kmax: kmax.get_mut(),
        }),
    )?;
    Ok(())
}

/// The append entry on host buffers: the cache holds `dtype` (or e4m3 with `fp8`).
///
/// # Safety
/// As [`longattn_paged_append_cpu`] / [`longattn_paged_append_fp8_cpu`].
unsafe fn append_cpu_entry(
    a: &Append,
    dtype: DTypeCode,
    kv_new: (CTensor, CTensor),
    (kv, fp8): (CPagedKvMut, bool),
) -> Result<(), CallError> {
    // SAFETY: buffers as documented for `dtype` (and e4m3 bytes with `fp8`).
    unsafe {
        match fp8 {
            true => with_dtype!(dtype, T => append_cpu_typed::<T, F8E4M3>(a, kv_new, kv)),
            false => with_dtype!(dtype, T => append_cpu_typed::<T, T>(a, kv_new, kv)),
        }
    }
}

/// The append entry on device buffers of GPU `device`, queued on `stream` (every pointer
/// checked non-NULL before the GPU is opened).
///
/// # Safety
/// As [`longattn_paged_append_cuda`] / [`longattn_paged_append_fp8_cuda`].
unsafe fn append_cuda_entry(
    a: &Append,
    dtype: DTypeCode,
    kv_new: (CTensor, CTensor),
    (kv, fp8): (CPagedKvMut, bool),
    (device, stream): (i32, *mut std::ffi::c_void),
) -> Result<(), CallError> {
    meta_of(&kv)?;
    let buffers = [
        (kv_new.0.data, "k_new"),
        (kv_new.1.data, "v_new"),
        (kv.k_cache.cast_const(), "k_cache"),
        (kv.v_cache.cast_const(), "v_cache"),
    ];
    // SAFETY: NULL or a live stream of that device's primary context by the contract.
    let stream = unsafe { caller_stream(&buffers, device, stream) }?;
    // SAFETY: device buffers as documented for `dtype` (and e4m3 bytes with `fp8`).
    unsafe {
        match fp8 {
            true => {
                with_dtype!(dtype, T => append_cuda_typed::<T, F8E4M3>(a, &stream, kv_new, kv))
            }
            false => with_dtype!(dtype, T => append_cuda_typed::<T, T>(a, &stream, kv_new, kv)),
        }
    }
}

/// `longattn_paged_append_cpu()`: writes new tokens' K/V (`[total_new, heads_kv,
/// head_dim]`, sequence `b`'s rows `cu_seqlens_new[b]..cu_seqlens_new[b + 1]`) into their
/// page slots (positions `seqlens_k[b] - n_b..seqlens_k[b]`), and updates `kmin`/`kmax`
/// when given ([`PagedCache::append_cpu`]). Host buffers of `dtype`.
///
/// # Safety
/// `desc` is a valid descriptor; `cu_seqlens_new` NULL or `batch + 1` readable offsets;
/// `k_new`, `v_new` hold `len` elements of `dtype`; the cache's buffers hold `cache_len` /
/// `meta_len` writable elements of `dtype` (NULL metadata: none), overlapping no other buffer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_paged_append_cpu(
    desc: *const CPagedDesc,
    cu_seqlens_new: *const i32,
    dtype: DTypeCode,
    k_new: CTensor,
    v_new: CTensor,
    cache: CPagedKvMut,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor and offsets by the contract.
        let a = unsafe { Append::new(desc, cu_seqlens_new, None) }?;
        // SAFETY: buffers as documented for `dtype`.
        unsafe { append_cpu_entry(&a, dtype, (k_new, v_new), (cache, false)) }
    })
}

/// `longattn_paged_append_cuda()`: [`longattn_paged_append_cpu`] on device buffers of GPU
/// `device` (f16 or bf16, strides multiples of 8 elements; `cu_seqlens_new` and the
/// descriptor's tables stay host arrays), queued on `stream` as
/// [`super::longattn_dense_forward_cuda`]. **Not yet run on a GPU** through the C API.
///
/// # Safety
/// As [`longattn_paged_append_cpu`], with every buffer a device allocation of `device`
/// alive until the queued work completes; `stream` NULL or a live stream of that device's
/// primary context.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn longattn_paged_append_cuda(
    desc: *const CPagedDesc,
    cu_seqlens_new: *const i32,
    dtype: DTypeCode,
    k_new: CTensor,
    v_new: CTensor,
    cache: CPagedKvMut,
    device: i32,
    stream: *mut std::ffi::c_void,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor and offsets by the contract.
        let a = unsafe { Append::new(desc, cu_seqlens_new, None) }?;
        let gpu = (device, stream);
        // SAFETY: device buffers and stream as documented for `dtype`.
        unsafe { append_cuda_entry(&a, dtype, (k_new, v_new), (cache, false), gpu) }
    })
}

/// `longattn_paged_append_fp8_cpu()`: [`longattn_paged_append_cpu`] into an FP8 e4m3 cache:
/// a value `x` of kv head `g` is stored as `e4m3(x / k_scales[g])` (V alike; as
/// [`super::longattn_fp8_quantize`]), the metadata holds e4m3 bytes (the bounds of the stored
/// codes). `k_new`, `v_new` of `dtype` (f32, f16 or bf16); scales as in `longattn_fp8_cache`.
///
/// # Safety
/// As [`longattn_paged_append_cpu`], with the cache's buffers holding e4m3 bytes and the
/// scales NULL or `heads_kv` readable floats each.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn longattn_paged_append_fp8_cpu(
    desc: *const CPagedDesc,
    cu_seqlens_new: *const i32,
    dtype: DTypeCode,
    k_new: CTensor,
    v_new: CTensor,
    cache: CPagedKvMut,
    k_scales: *const f32,
    v_scales: *const f32,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor, offsets and scales by the contract.
        let a = unsafe { Append::fp8(desc, cu_seqlens_new, (k_scales, v_scales)) }?;
        // SAFETY: buffers as documented.
        unsafe { append_cpu_entry(&a, dtype, (k_new, v_new), (cache, true)) }
    })
}

/// `longattn_paged_append_fp8_cuda()`: [`longattn_paged_append_fp8_cpu`] on device buffers
/// (the scales stay host arrays), as [`longattn_paged_append_cuda`]. **Not yet run on a
/// GPU**.
///
/// # Safety
/// As [`longattn_paged_append_cuda`] and [`longattn_paged_append_fp8_cpu`].
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn longattn_paged_append_fp8_cuda(
    desc: *const CPagedDesc,
    cu_seqlens_new: *const i32,
    dtype: DTypeCode,
    k_new: CTensor,
    v_new: CTensor,
    cache: CPagedKvMut,
    k_scales: *const f32,
    v_scales: *const f32,
    device: i32,
    stream: *mut std::ffi::c_void,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor, offsets and scales by the contract.
        let a = unsafe { Append::fp8(desc, cu_seqlens_new, (k_scales, v_scales)) }?;
        let gpu = (device, stream);
        // SAFETY: device buffers and stream as documented.
        unsafe { append_cuda_entry(&a, dtype, (k_new, v_new), (cache, true), gpu) }
    })
}
