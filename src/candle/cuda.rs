//! The ops' `cuda_fwd` (feature `candle-cuda`): this crate's GPU kernels on candle CUDA
//! tensors, launched on the tensors' device stream (candle's own), nothing synchronised, the
//! output a fresh candle CUDA tensor of q's shape and dtype.
//!
//! - Dense ([`super::FlashAttn`], [`super::FlashAttnVarlen`]):
//!   [`FlashAttention::forward_gpu`](crate::FlashAttention::forward_gpu) with the kernel that
//!   `Auto` picks; f16 or bf16 (f32 CUDA tensors get a named error: the kernels are
//!   half-precision), the GPU's stride and alignment rules (strides multiples of 8 elements).
//! - Block-sparse ([`super::BlockSparseAttn`]):
//!   [`BlockSparseAttention::forward_gpu`](crate::BlockSparseAttention::forward_gpu) (the
//!   mma.sync kernel; block sizes multiples of 64, head_dim 64, 128 or 256), f16 or bf16.
//! - Neighborhood ([`super::NeighborhoodAttn`]):
//!   [`NeighborhoodAttention::forward_gpu`](crate::NeighborhoodAttention::forward_gpu) with
//!   the kernel it picks (fused at head_dim 64 and 128, else portable), f16 or bf16.
//! - Paged decode and prefill ([`super::PagedAttnDecode`], [`super::PagedAttnPrefill`]):
//!   [`PagedDecode::forward_gpu`](crate::PagedDecode::forward_gpu) /
//!   [`PagedPrefill::forward_gpu`](crate::PagedPrefill::forward_gpu) over an f16/bf16 cache
//!   of q's dtype or an `F8E4M3` cache (candle's float8 storage reinterpreted as this crate's
//!   [`F8E4M3`], the same bits).
//!   [`super::paged_attn_decode_with_policy`] passes the Quest bounds as views of their
//!   storages (read-locked for the call).
//! - Paged append ([`super::paged_attn_append`]):
//!   [`PagedCache::append_gpu`](crate::PagedCache::append_gpu) from f16/bf16 tokens into
//!   caches (and Quest bounds) of their dtype or `F8E4M3`, written through views of candle's
//!   storages (which the nested in-place ops hold as `&mut`).
//!
//! The tables (varlen offsets, block table, `seqlens_k`, the block mask) are the host copies
//! the op holds; the one-shot GPU entry points upload them per call, so these ops are not
//! CUDA-graph capturable (engines capturing decode build a [`crate::PagedDecodePlan`]
//! instead).
//! **Not yet run on a GPU**: compiled and linted only (see the README).

use super::{Append, Paged, PagedProblem, Problem, QkvAttention, Written, wrap};
use crate::block_sparse::BlockSparseAttention;
use crate::dense::FlashAttention;
use crate::element::{Element, F8E4M3};
use crate::layout::Strided;
use crate::neighborhood::NeighborhoodAttention;
use crate::paged::{KvPages, PageMeta};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaStorage, CudaStorageSlice};
use candle_core::{DType, Layout, Result, Shape, Storage, StorageRef, bail};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};
use std::sync::Arc;

/// A storage (one of a candle op's inputs) and its layout.
type Input<'a> = (&'a CudaStorage, &'a Layout);

/// A storage's elements from the layout's start offset (strides are checked by the entry
/// points against the view's length).
fn view<'a, T: CudaDType>(name: &str, (s, l): Input<'a>) -> Result<CudaView<'a, T>> {
    s.as_cuda_slice::<T>()?
        .try_slice(l.start_offset()..)
        .ok_or_else(|| starts_past(name))
}

fn starts_past(name: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("longattn: {name} starts past its storage")).bt()
}

/// An `F8E4M3` storage as this crate's [`F8E4M3`] from the layout's start offset.
fn fp8_view<'a>(name: &str, (s, l): Input<'a>) -> Result<CudaView<'a, F8E4M3>> {
    let CudaStorageSlice::F8E4M3(slice) = &s.slice else {
        bail!("longattn: {name} must be f8e4m3, got {:?}", s.dtype())
    };
    let view = slice
        .try_slice(l.start_offset()..)
        .ok_or_else(|| starts_past(name))?;
    // SAFETY: candle's and this crate's e4m3 types are both one byte, `repr(transparent)`
    // over `u8`, and every bit pattern is a valid value of either; the length is unchanged.
    unsafe { view.transmute::<F8E4M3>(view.len()) }.ok_or_else(|| starts_past(name))
}

/// A zeroed output of `len` elements on the storage's device (a row the kernels leave
/// untouched, such as one past the last varlen offset, reads 0 as on the CPU path).
fn zeros<T: DeviceRepr + ValidAsZeroBits>(s: &CudaStorage, len: usize) -> Result<CudaSlice<T>> {
    s.device().alloc_zeros::<T>(len)
}

/// The GPU forward pass of the q, k, v ops' problems: their `forward_gpu` (no LSE), which
/// picks the kernel.
pub(super) trait QkvGpu {
    fn run_gpu<T: Element + DeviceRepr>(
        &self,
        stream: &Arc<CudaStream>,
        q: Strided<&CudaView<T>>,
        k: Strided<&CudaView<T>>,
        v: Strided<&CudaView<T>>,
        out: Strided<&mut CudaSlice<T>>,
    ) -> crate::Result<()>;
}

/// [`QkvGpu`] for types with the `forward_gpu(stream, q, k, v, out, lse)` of the dense
/// problems.
macro_rules! qkv_gpu {
    ($($t:ty),*) => {$(
        impl QkvGpu for $t {
            fn run_gpu<T: Element + DeviceRepr>(
                &self,
                stream: &Arc<CudaStream>,
                q: Strided<&CudaView<T>>,
                k: Strided<&CudaView<T>>,
                v: Strided<&CudaView<T>>,
                out: Strided<&mut CudaSlice<T>>,
            ) -> crate::Result<()> {
                self.forward_gpu::<T, _, _>(stream, q, k, v, out, None)
            }
        }
    )*};
}
qkv_gpu!(FlashAttention, BlockSparseAttention, NeighborhoodAttention);

/// A q, k, v op's GPU forward pass in `T` (f16 or bf16).
fn qkv_t<A, T>(p: &Problem<A>, q: Input, k: Input, v: Input) -> Result<CudaSlice<T>>
where
    A: QkvAttention + QkvGpu,
    T: Element + CudaDType + DeviceRepr + ValidAsZeroBits,
{
    let stream = q.0.device().cuda_stream();
    let (qv, kv, vv) = (view::<T>("q", q)?, view::<T>("k", k)?, view::<T>("v", v)?);
    let mut out = zeros::<T>(q.0, p.out_len)?;
    p.attn
        .run_gpu(
            &stream,
            Strided::new(&qv, p.q),
            Strided::new(&kv, p.k),
            Strided::new(&vv, p.v),
            Strided::new(&mut out, p.out),
        )
        .map_err(wrap)?;
    Ok(out)
}

/// `cuda_fwd` of the q, k, v ops (dense, block-sparse, neighborhood): q, k, v of one
/// half-precision dtype.
pub(super) fn qkv<A: QkvAttention + QkvGpu>(
    name: &str,
    p: &Problem<A>,
    q: Input,
    k: Input,
    v: Input,
) -> Result<(CudaStorage, Shape)> {
    let device = q.0.device().clone();
    let out = match (q.0.dtype(), k.0.dtype(), v.0.dtype()) {
        (DType::F16, DType::F16, DType::F16) => {
            CudaStorage::wrap_cuda_slice(qkv_t::<A, f16>(p, q, k, v)?, device)
        }
        (DType::BF16, DType::BF16, DType::BF16) => {
            CudaStorage::wrap_cuda_slice(qkv_t::<A, bf16>(p, q, k, v)?, device)
        }
        (a, b, c) => bail!(
            "longattn {name} on CUDA: q, k, v must share f16 or bf16 (the GPU kernels' types; \
             f32 runs on CPU tensors); got {a:?}, {b:?}, {c:?}"
        ),
    };
    Ok((out, p.out_shape.clone()))
}

impl Paged {
    /// The GPU forward pass of `q` (type `T`) over a cache of type `C`, on `stream`.
    fn forward_gpu<T, C>(
        &self,
        stream: &Arc<CudaStream>,
        q: &CudaView<T>,
        kv: KvPages<&CudaView<C>>,
        meta: Option<PageMeta<&CudaView<C>>>,
        out: &mut CudaSlice<T>,
    ) -> crate::Result<()>
    where
        T: Element + DeviceRepr,
        C: Element + DeviceRepr,
    {
        let (q, out) = (Strided::new(q, self.qs), Strided::new(out, self.os));
        match &self.problem {
            PagedProblem::Decode(p) => {
                p.forward_gpu_with::<T, C, _, _, _, _>(stream, q, kv, meta, out, None)
            }
            PagedProblem::Prefill(p) => p.forward_gpu::<T, C, _, _, _>(stream, q, kv, out, None),
        }
    }
}

/// A paged op's forward pass of `q` (type `T`) over a cache of type `C`, on q's device stream.
fn paged_t<T, C>(
    p: &Paged,
    q: Input,
    kv: KvPages<CudaView<C>>,
    meta: Option<PageMeta<CudaView<C>>>,
) -> Result<CudaSlice<T>>
where
    T: Element + CudaDType + DeviceRepr + ValidAsZeroBits,
    C: Element + DeviceRepr,
{
    let stream = q.0.device().cuda_stream();
    let qv = view::<T>("q", q)?;
    let mut out = zeros::<T>(q.0, p.out_len())?;
    let kv = KvPages { k: &kv.k, v: &kv.v };
    let meta = meta.as_ref().map(|m| PageMeta {
        kmin: &m.kmin,
        kmax: &m.kmax,
    });
    p.forward_gpu(&stream, &qv, kv, meta, &mut out)
        .map_err(wrap)?;
    Ok(out)
}

/// A bound (read under its own lock) as a CUDA storage with its layout.
fn bound<'a>(name: &str, (s, l): &'a (StorageRef<'_>, &'a Layout)) -> Result<Input<'a>> {
    match &**s {
        Storage::Cuda(s) => Ok((s, l)),
        _ => bail!("longattn: {name} must be on q's CUDA device"),
    }
}

/// The first `l`'s element count of `v` (a contiguous bound's exact elements: the decode
/// checks the bounds' lengths).
fn elems<'a, C>(name: &str, v: CudaView<'a, C>, l: &Layout) -> Result<CudaView<'a, C>> {
    v.try_slice(..l.shape().elem_count()).ok_or_else(|| {
        candle_core::Error::Msg(format!("longattn: {name} ends past its storage")).bt()
    })
}

/// `cuda_fwd` of the paged ops: q f16 or bf16, the cache of q's dtype or f8e4m3.
pub(super) fn paged(
    name: &str,
    p: &Paged,
    q: Input,
    k: Input,
    v: Input,
) -> Result<(CudaStorage, Shape)> {
    let device = q.0.device().clone();
    // `$t` for q's element type, over a cache of `$c` read by `$view`.
    let bounds = p.read_bounds();
    macro_rules! run {
        ($t:ty, $c:ty, $view:expr) => {{
            let kv = KvPages {
                k: $view("k_cache", k)?,
                v: $view("v_cache", v)?,
            };
            let read = |name, b| -> Result<CudaView<$c>> {
                let (s, l) = bound(name, b)?;
                elems(name, $view(name, (s, l))?, l)
            };
            let meta = match &bounds {
                Some(m) => Some(PageMeta {
                    kmin: read("kmin", &m.kmin)?,
                    kmax: read("kmax", &m.kmax)?,
                }),
                None => None,
            };
            CudaStorage::wrap_cuda_slice(paged_t::<$t, $c>(p, q, kv, meta)?, device)
        }};
    }
    use DType::{BF16, F8E4M3 as E4M3, F16};
    let (qt, kt, vt) = (q.0.dtype(), k.0.dtype(), v.0.dtype());
    let out = match (qt, kt, vt) {
        (F16, F16, F16) => run!(f16, f16, view::<f16>),
        (BF16, BF16, BF16) => run!(bf16, bf16, view::<bf16>),
        (F16, E4M3, E4M3) => run!(f16, F8E4M3, fp8_view),
        (BF16, E4M3, E4M3) => run!(bf16, F8E4M3, fp8_view),
        _ => bail!(
            "longattn {name} on CUDA: q must be f16 or bf16 and k_cache, v_cache of q's \
             dtype or both f8e4m3; got {qt:?}, {kt:?}, {vt:?}"
        ),
    };
    Ok((out, q.1.shape().clone()))
}

/// A written storage (held as `&mut` by candle's in-place op) and its layout.
type Output<'a> = (&'a mut CudaStorage, &'a Layout);

/// The caches and bounds on CUDA.
type CudaWritten<'a> = Written<'a, &'a mut CudaStorage>;

/// A written tensor's elements (contiguous from the layout's start offset) as a view.
fn view_mut<'a, T: CudaDType>(name: &str, (s, l): Output<'a>) -> Result<CudaViewMut<'a, T>> {
    let start = l.start_offset();
    s.as_cuda_slice_mut::<T>()?
        .try_slice_mut(start..start + l.shape().elem_count())
        .ok_or_else(|| starts_past(name))
}

/// A written `F8E4M3` tensor's elements (candle's float8 type) as a view; see [`as_fp8`].
macro_rules! fp8_range {
    ($name:literal, $out:expr) => {{
        let (s, l): Output = $out;
        let dtype = s.dtype();
        let CudaStorageSlice::F8E4M3(slice) = &mut s.slice else {
            bail!("longattn: {} must be f8e4m3, got {dtype:?}", $name)
        };
        let start = l.start_offset();
        slice
            .try_slice_mut(start..start + l.shape().elem_count())
            .ok_or_else(|| starts_past($name))?
    }};
}

/// An `F8E4M3` view of candle's float8 view (`S`, a one-byte type).
///
/// # Safety
/// Every bit pattern of `S` must be a valid `S` (candle's `float8::F8E4M3`,
/// `repr(transparent)` over `u8`).
unsafe fn as_fp8<'b, S>(
    name: &str,
    v: &'b mut CudaViewMut<'_, S>,
) -> Result<CudaViewMut<'b, F8E4M3>> {
    if size_of::<S>() != 1 {
        bail!("longattn: {name} is not one byte per element")
    }
    let n = v.len();
    // SAFETY: `S` and this crate's `F8E4M3` are one byte each, valid for every bit pattern
    // (by the caller and `repr(transparent)` over `u8`), so the same `n` bytes are `n` valid
    // `F8E4M3`s; the view reborrows `v` exclusively.
    unsafe { v.transmute_mut::<F8E4M3>(n) }.ok_or_else(|| starts_past(name))
}

impl Append {
    /// [`PagedCache::append_gpu`](crate::PagedCache::append_gpu) of `T` tokens into a `C`
    /// cache, on `stream`.
    fn gpu<'a, T, C>(
        &self,
        stream: &Arc<CudaStream>,
        new: KvPages<Input>,
        mut kv: KvPages<CudaViewMut<'a, C>>,
        mut bounds: Option<(CudaViewMut<'a, C>, CudaViewMut<'a, C>)>,
    ) -> Result<()>
    where
        T: Element + CudaDType + DeviceRepr,
        C: Element + DeviceRepr,
    {
        let (k_new, v_new) = (view::<T>("k_new", new.k)?, view::<T>("v_new", new.v)?);
        let kv = KvPages {
            k: &mut kv.k,
            v: &mut kv.v,
        };
        let meta = bounds.as_mut().map(|(kmin, kmax)| PageMeta { kmin, kmax });
        self.cache
            .append_gpu_into::<T, C, _, _, _>(
                stream,
                &self.cu_seqlens_new,
                Strided::new(&k_new, self.k_new),
                Strided::new(&v_new, self.v_new),
                kv,
                meta,
            )
            .map_err(wrap)
    }

    /// The append into a cache of the tokens' dtype `T`.
    fn gpu_same<T>(
        &self,
        stream: &Arc<CudaStream>,
        new: KvPages<Input>,
        Written { kv, meta }: CudaWritten,
    ) -> Result<()>
    where
        T: Element + CudaDType + DeviceRepr,
    {
        let kv = KvPages {
            k: view_mut::<T>("k_cache", kv.k)?,
            v: view_mut::<T>("v_cache", kv.v)?,
        };
        let bounds = match meta {
            Some(m) => Some((
                view_mut::<T>("kmin", m.kmin)?,
                view_mut::<T>("kmax", m.kmax)?,
            )),
            None => None,
        };
        self.gpu::<T, T>(stream, new, kv, bounds)
    }

    /// The append into an `F8E4M3` cache.
    fn gpu_fp8<T>(
        &self,
        stream: &Arc<CudaStream>,
        new: KvPages<Input>,
        Written { kv, meta }: CudaWritten,
    ) -> Result<()>
    where
        T: Element + CudaDType + DeviceRepr,
    {
        let mut k8 = fp8_range!("k_cache", kv.k);
        let mut v8 = fp8_range!("v_cache", kv.v);
        let mut bounds8 = match meta {
            Some(m) => Some((fp8_range!("kmin", m.kmin), fp8_range!("kmax", m.kmax))),
            None => None,
        };
        // SAFETY (all): the views are of candle's `float8::F8E4M3` storage.
        let kv = unsafe {
            KvPages {
                k: as_fp8("k_cache", &mut k8)?,
                v: as_fp8("v_cache", &mut v8)?,
            }
        };
        let bounds = match bounds8.as_mut() {
            Some((a, b)) => Some(unsafe { (as_fp8("kmin", a)?, as_fp8("kmax", b)?) }),
            None => None,
        };
        self.gpu::<T, F8E4M3>(stream, new, kv, bounds)
    }
}

/// The paged append on CUDA storages: f16/bf16 tokens into a cache (and bounds) of their
/// dtype or f8e4m3, on the cache's device stream.
pub(super) fn append(a: &Append, new: KvPages<Input>, w: CudaWritten) -> Result<()> {
    let stream = w.kv.k.0.device().cuda_stream();
    use DType::{BF16, F8E4M3 as E4M3, F16};
    match (new.k.0.dtype(), w.kv.k.0.dtype()) {
        (F16, F16) => a.gpu_same::<f16>(&stream, new, w),
        (BF16, BF16) => a.gpu_same::<bf16>(&stream, new, w),
        (F16, E4M3) => a.gpu_fp8::<f16>(&stream, new, w),
        (BF16, E4M3) => a.gpu_fp8::<bf16>(&stream, new, w),
        (t, c) => bail!(
            "longattn paged_attn_append on CUDA: f16 or bf16 tokens (the GPU kernels' types; \
             f32 runs on CPU tensors) into a cache of their dtype or f8e4m3; got {t:?} into {c:?}"
        ),
    }
}
