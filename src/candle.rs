//! candle ops with the arguments and layouts of `candle-flash-attn`, so that a model switches
//! by changing one import (`use longattn::candle as candle_flash_attn;`).
//!
//! - [`flash_attn`], [`flash_attn_windowed`], [`flash_attn_alibi_windowed_softcap`]:
//!   `q: (batch, seqlen_q, heads_q, head_dim)`, `k, v: (batch, seqlen_k, heads_kv, head_dim)`,
//!   output like `q`.
//! - [`flash_attn_varlen`], [`flash_attn_varlen_windowed`],
//!   [`flash_attn_varlen_alibi_windowed_softcap`]: packed `q: (total_q, heads_q, head_dim)`,
//!   `k, v: (total_k, heads_kv, head_dim)` with cumulative `seqlens_q`, `seqlens_k`
//!   (`u32` or `i32`, length `batch + 1`, starting at 0).
//! - [`paged_attn_decode`]: decode over a paged KV cache with `block_table` and `seqlens_k`
//!   tensors (the cache layout of [`crate::PagedCache`]: `(num_pages, page_size, heads_kv,
//!   head_dim)`); [`paged_attn_decode_fp8`] over a candle `F8E4M3` cache with per-kv-head
//!   `k_scale`/`v_scale` (semantics.md, "FP8 KV cache").
//! - [`paged_attn_prefill`]: chunked prefill / prefix caching over the same cache: any number
//!   of new query tokens per sequence (fixed or packed with `seqlens_q`), any window, an f16,
//!   bf16, f32 or `F8E4M3` cache.
//! - [`paged_attn_append`]: writes new tokens' K/V into that cache in place (and keeps the
//!   pages' Quest bounds), as [`PagedCache::append_cpu`] / [`PagedCache::append_gpu`]; an
//!   f16, bf16, f32 or `F8E4M3` cache.
//! - [`paged_attn_decode_with_policy`]: the decode with a policy per kv head (Full,
//!   Streaming, Quest over those bounds; [`PagedDecode::with_policy`]).
//! - [`neighborhood_attn`]: neighborhood attention (NATTEN) over a 1-D, 2-D or 3-D grid,
//!   `q: (batch, X, (Y, (Z,)) heads_q, head_dim)`, `k, v` alike with `heads_kv`, the
//!   per-dim kernel, dilation, stride and causal flag as [`NeighborhoodDim`]s.
//! - [`block_sparse_attn`]: block-sparse attention over a [`BlockMask`] (FlexAttention's
//!   `BlockMask`), shapes as [`flash_attn`], scale, softcap and element mask from
//!   [`AttentionOptions`].
//!
//! Semantics are FlashAttention-2's (`semantics.md`): `window_size_left/right` of `None` are
//! unbounded, `Some(n)` keeps keys `i + sk - sq - left ..= i + sk - sq + right` (bottom-right
//! aligned); `causal` is the window `(None, Some(0))`; a row with no visible key gives 0.
//! A window side larger than the longest key sequence is unbounded, as in candle-flash-attn.
//! `softcap` of `0.0` disables it (FA2's convention); ALiBi is not supported (an `alibi_slopes`
//! of `Some` is an error).
//!
//! Any strides with a contiguous last dim are accepted (for [`neighborhood_attn`], grid dims
//! that flatten into one token axis), and f32, f16 and bf16. The ops run on
//! candle CPU tensors through the problems' `forward_cpu` ([`FlashAttention::forward_cpu`],
//! [`PagedDecode::forward_cpu`], [`NeighborhoodAttention::forward_cpu`], ...; f32
//! accumulation). With the feature `candle-cuda` they also run on candle CUDA tensors
//! (f16/bf16), through this crate's GPU kernels on candle's stream (the `cuda` module; **not
//! yet run on a GPU**). candle-core's `cuda` feature enables cudarc's `dynamic-linking` and
//! `cuda-version-from-build-system`, which cudarc refuses next to this crate's default
//! `dynamic-loading`: depend on longattn with `default-features = false` then. Without
//! `candle-cuda`, a CUDA tensor gets candle's "no cuda implementation" error.
//! Invalid inputs give a candle error, never a panic. Forward only: no backward.

use crate::block_sparse::{BlockMask, BlockSparseAttention};
use crate::dense::{AttentionOptions, AttentionShape, FlashAttention};
use crate::element::{Element, F8E4M3};
use crate::layout::{SeqLens, Strided, Strides};
use crate::mask::Window;
use crate::neighborhood::{
    MAX_NEIGHBORHOOD_DIMS, NeighborhoodAttention, NeighborhoodDim, NeighborhoodShape,
};
use crate::paged::{
    KvPages, KvScales, PageMeta, PageTable, PagedCache, PagedDecode, PagedLayout, PagedPrefill,
    SparsePolicy,
};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp3, DType, InplaceOp1, Layout, Result, Shape, Storage, StorageRef, Tensor,
    bail,
};
use std::cell::Cell;

#[cfg(feature = "candle-cuda")]
mod cuda;

fn wrap(e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("longattn: {e}")).bt()
}

/// Element strides `(batch, seq, head)` of a rank-4 `(b, s, h, d)` layout or, with `packed`,
/// of a rank-3 `(total, h, d)` layout (batch stride 0); the last dim must be contiguous.
fn strides_of(name: &str, l: &Layout, packed: bool) -> Result<Strides> {
    let (dims, st) = (l.dims(), l.stride());
    let rank = if packed { 3 } else { 4 };
    if dims.len() != rank {
        bail!(
            "longattn: {name} must have rank {rank}, got shape {:?}",
            l.shape()
        )
    }
    if st[rank - 1] != 1 && dims[rank - 1] > 1 {
        bail!("longattn: the last dim of {name} must be contiguous, strides {st:?}")
    }
    let s = |i: usize| st[i] as i64;
    Ok(if packed {
        Strides {
            batch: 0,
            seq: s(0),
            head: s(1),
        }
    } else {
        Strides {
            batch: s(0),
            seq: s(1),
            head: s(2),
        }
    })
}

/// A storage's slice from the layout's start offset (its strides are checked later).
fn cpu_slice<'a, T: candle_core::WithDType>(
    name: &str,
    s: &'a CpuStorage,
    l: &Layout,
) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match data.get(l.start_offset()..) {
        Some(d) => Ok(d),
        None => bail!("longattn: {name} starts past its storage"),
    }
}

/// An integer rank-1 tensor (`u32`/`i32`/`i64`) as host i32 values: cumulative lengths, page
/// ids, lengths.
fn host_i32(name: &str, t: &Tensor) -> Result<Vec<i32>> {
    if t.rank() != 1 {
        bail!(
            "longattn: {name} must have rank 1, got shape {:?}",
            t.shape()
        )
    }
    let v: Vec<i64> = match t.dtype() {
        DType::U32 => t.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
        DType::I32 => t.to_vec1::<i32>()?.into_iter().map(i64::from).collect(),
        DType::I64 => t.to_vec1::<i64>()?,
        dt => bail!("longattn: {name} must be u32, i32 or i64, got {dt:?}"),
    };
    v.into_iter()
        .map(|x| {
            i32::try_from(x).map_err(|_| {
                candle_core::Error::Msg(format!("longattn: {name} value {x} exceeds i32"))
            })
        })
        .collect()
}

/// The FA2 window with candle-flash-attn's clamp: a side longer than `max_seqlen_k` is
/// unbounded (which also keeps it in range of the kernels' i32).
fn window(left: Option<usize>, right: Option<usize>, max_seqlen_k: usize) -> Window {
    let clamp = |w: Option<usize>| w.filter(|&w| w <= max_seqlen_k);
    Window::new(clamp(left), clamp(right))
}

fn options(
    scale: f32,
    (left, right): (Option<usize>, Option<usize>),
    softcap: Option<f32>,
    max_seqlen_k: usize,
) -> AttentionOptions {
    AttentionOptions {
        scale: Some(scale),
        softcap: softcap.filter(|&c| c != 0.0),
        ..AttentionOptions::default()
    }
    .with_window(window(left, right, max_seqlen_k))
}

/// Dense attention with fixed lengths (`q: (b, sq, hq, d)`, `k, v: (b, sk, hkv, d)`), as the
/// `CustomOp3` that [`flash_attn`] and friends apply.
#[derive(Debug, Clone)]
pub struct FlashAttn {
    /// Multiplier on `q . k` before the softmax (usually `1 / sqrt(head_dim)`).
    pub softmax_scale: f32,
    /// Keys visible to the left of the diagonal; `None` is unbounded.
    pub window_size_left: Option<usize>,
    /// Keys visible to the right of the diagonal; `None` is unbounded, `Some(0)` is causal.
    pub window_size_right: Option<usize>,
    /// Gemma-2 softcap; `None` or `Some(0.0)` disables it.
    pub softcap: Option<f32>,
}

/// Dense attention over packed sequences (`q: (total_q, hq, d)`, `k, v: (total_k, hkv, d)`),
/// as the `CustomOp3` that [`flash_attn_varlen`] and friends apply.
#[derive(Debug, Clone)]
pub struct FlashAttnVarlen {
    /// Multiplier on `q . k` before the softmax (usually `1 / sqrt(head_dim)`).
    pub softmax_scale: f32,
    /// Keys visible to the left of the diagonal; `None` is unbounded.
    pub window_size_left: Option<usize>,
    /// Keys visible to the right of the diagonal; `None` is unbounded, `Some(0)` is causal.
    pub window_size_right: Option<usize>,
    /// Gemma-2 softcap; `None` or `Some(0.0)` disables it.
    pub softcap: Option<f32>,
    /// Cumulative query lengths, `batch + 1` values from 0.
    pub cu_seqlens_q: Vec<i32>,
    /// Cumulative key lengths, `batch + 1` values from 0.
    pub cu_seqlens_k: Vec<i32>,
    /// Accepted for candle-flash-attn compatibility; the lengths come from the offsets.
    pub max_seqlen_q: usize,
    /// Longest key sequence, used (with the offsets) to clamp the window sides.
    pub max_seqlen_k: usize,
}

/// A validated problem `A` (dense, block-sparse or neighborhood attention) with the element
/// strides of q, k, v and of its output, a fresh contiguous tensor of q's shape holding
/// `out_len` elements (the problem's `out_len`).
struct Problem<A> {
    attn: A,
    q: Strides,
    k: Strides,
    v: Strides,
    out: Strides,
    out_len: usize,
    out_shape: Shape,
}

/// The forward pass the q, k, v ops share (no LSE), over q, k, v and out with element strides;
/// the GPU one is `cuda::QkvGpu`.
trait QkvAttention {
    /// [`FlashAttention::forward_cpu`] and its siblings.
    fn run_cpu<T: Element>(
        &self,
        q: Strided<&[T]>,
        k: Strided<&[T]>,
        v: Strided<&[T]>,
        out: Strided<&mut [T]>,
    ) -> crate::Result<()>;
}

/// [`QkvAttention`] for types with the `forward_cpu(q, k, v, out, lse)` of the dense
/// problems.
macro_rules! qkv_attention {
    ($($t:ty),*) => {$(
        impl QkvAttention for $t {
            fn run_cpu<T: Element>(
                &self,
                q: Strided<&[T]>,
                k: Strided<&[T]>,
                v: Strided<&[T]>,
                out: Strided<&mut [T]>,
            ) -> crate::Result<()> {
                self.forward_cpu(q, k, v, out, None)
            }
        }
    )*};
}
qkv_attention!(FlashAttention, BlockSparseAttention, NeighborhoodAttention);

impl Problem<FlashAttention> {
    /// The strides of q, k, v (rank 4, or rank 3 with `packed`; last dim contiguous).
    fn strides(
        q_l: &Layout,
        k_l: &Layout,
        v_l: &Layout,
        packed: bool,
    ) -> Result<(Strides, Strides, Strides)> {
        Ok((
            strides_of("q", q_l, packed)?,
            strides_of("k", k_l, packed)?,
            strides_of("v", v_l, packed)?,
        ))
    }

    /// Validates `shape` with `opts`; the output has the shape of q.
    fn new(
        shape: &AttentionShape,
        (q, k, v): (Strides, Strides, Strides),
        q_l: &Layout,
        opts: &AttentionOptions,
    ) -> Result<Self> {
        let attn = FlashAttention::new(shape, opts).map_err(wrap)?;
        let out_shape = q_l.shape().clone();
        Ok(Problem {
            out: contiguous_out(&attn, &out_shape),
            out_len: attn.out_len(),
            attn,
            q,
            k,
            v,
            out_shape,
        })
    }

    /// The fixed-length problem of `q: (b, sq, hq, d)`, `k, v: (b, sk, hkv, d)` with `opts`
    /// (`opts(sk)`: they may depend on the key length).
    fn fixed(
        q_l: &Layout,
        k_l: &Layout,
        v_l: &Layout,
        opts: impl FnOnce(usize) -> AttentionOptions,
    ) -> Result<Self> {
        let strides = Self::strides(q_l, k_l, v_l, false)?;
        let (b, sq, hq, d) = q_l.shape().dims4()?;
        let (bk, sk, hkv, dk) = k_l.shape().dims4()?;
        check_shapes((bk, dk) == (b, d), q_l, k_l, v_l)?;
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
        Self::new(&shape, strides, q_l, &opts(sk))
    }
}

/// Errors unless `same` (q and k agree where they must) and v has the shape of k.
fn check_shapes(same: bool, q_l: &Layout, k_l: &Layout, v_l: &Layout) -> Result<()> {
    if !same {
        bail!(
            "longattn: shape mismatch q {:?} and k {:?}",
            q_l.shape(),
            k_l.shape()
        )
    }
    if v_l.shape() != k_l.shape() {
        bail!(
            "longattn: shape mismatch k {:?} and v {:?}",
            k_l.shape(),
            v_l.shape()
        )
    }
    Ok(())
}

impl FlashAttn {
    fn problem(&self, q_l: &Layout, k_l: &Layout, v_l: &Layout) -> Result<Problem<FlashAttention>> {
        let window = (self.window_size_left, self.window_size_right);
        Problem::fixed(q_l, k_l, v_l, |sk| {
            options(self.softmax_scale, window, self.softcap, sk)
        })
    }
}

impl FlashAttnVarlen {
    fn problem(&self, q_l: &Layout, k_l: &Layout, v_l: &Layout) -> Result<Problem<FlashAttention>> {
        let strides = Problem::strides(q_l, k_l, v_l, true)?;
        let (_, hq, d) = q_l.shape().dims3()?;
        let (_, hkv, dk) = k_l.shape().dims3()?;
        check_shapes(dk == d, q_l, k_l, v_l)?;
        if self.cu_seqlens_q.is_empty() || self.cu_seqlens_q.len() != self.cu_seqlens_k.len() {
            bail!(
                "longattn: seqlens_q ({}) and seqlens_k ({}) must both have batch + 1 >= 1 values",
                self.cu_seqlens_q.len(),
                self.cu_seqlens_k.len()
            )
        }
        let shape = AttentionShape {
            batch: self.cu_seqlens_q.len() - 1,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            seqlens: SeqLens::Varlen {
                cu_seqlens_q: &self.cu_seqlens_q,
                cu_seqlens_k: &self.cu_seqlens_k,
            },
        };
        // Clamp the window by the real longest key sequence (the argument is advisory).
        let max_k = self
            .cu_seqlens_k
            .windows(2)
            .map(|w| (w[1] as i64 - w[0] as i64).max(0) as usize)
            .max()
            .unwrap_or(0)
            .max(self.max_seqlen_k);
        let window = (self.window_size_left, self.window_size_right);
        let opts = options(self.softmax_scale, window, self.softcap, max_k);
        Problem::new(&shape, strides, q_l, &opts)
    }
}

fn qkv_cpu_t<A: QkvAttention, T: Element + candle_core::WithDType>(
    p: &Problem<A>,
    q: (&CpuStorage, &Layout),
    k: (&CpuStorage, &Layout),
    v: (&CpuStorage, &Layout),
) -> Result<Vec<T>> {
    let q = cpu_slice::<T>("q", q.0, q.1)?;
    let k = cpu_slice::<T>("k", k.0, k.1)?;
    let v = cpu_slice::<T>("v", v.0, v.1)?;
    let mut out = vec![T::default(); p.out_len];
    p.attn
        .run_cpu(
            Strided::new(q, p.q),
            Strided::new(k, p.k),
            Strided::new(v, p.v),
            Strided::new(&mut out[..], p.out),
        )
        .map_err(wrap)?;
    Ok(out)
}

/// Strides of the contiguous output (shape of q).
fn contiguous_out(attn: &FlashAttention, out_shape: &Shape) -> Strides {
    let (hq, d) = (attn.heads_q(), attn.head_dim());
    match out_shape.rank() {
        3 => Strides {
            batch: 0,
            seq: (hq * d) as i64,
            head: d as i64,
        },
        _ => Strides::contiguous(attn.max_seqlen_q(), hq, d),
    }
}

/// `cpu_fwd` of the q, k, v ops: q, k, v of one of f32, f16, bf16.
fn qkv_cpu<A: QkvAttention>(
    name: &str,
    p: &Problem<A>,
    q: (&CpuStorage, &Layout),
    k: (&CpuStorage, &Layout),
    v: (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let out = match (q.0, k.0, v.0) {
        (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
            CpuStorage::F32(qkv_cpu_t::<A, f32>(p, q, k, v)?)
        }
        (CpuStorage::F16(_), CpuStorage::F16(_), CpuStorage::F16(_)) => {
            CpuStorage::F16(qkv_cpu_t::<A, half::f16>(p, q, k, v)?)
        }
        (CpuStorage::BF16(_), CpuStorage::BF16(_), CpuStorage::BF16(_)) => {
            CpuStorage::BF16(qkv_cpu_t::<A, half::bf16>(p, q, k, v)?)
        }
        (a, b, c) => bail!(
            "longattn {name}: q, k, v must share one of f32, f16, bf16; got {:?}, {:?}, {:?}",
            a.dtype(),
            b.dtype(),
            c.dtype()
        ),
    };
    Ok((out, p.out_shape.clone()))
}

/// The `CustomOp3` named `$name` of an op whose `problem` method validates the layouts:
/// `$cpu(name, &problem, q, k, v)` on CPU storage, `cuda::$cuda(...)` on CUDA storage.
macro_rules! custom_op3 {
    ($op:ty, $name:literal, $cpu:ident, $cuda:ident) => {
        impl CustomOp3 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                q: &CpuStorage,
                q_l: &Layout,
                k: &CpuStorage,
                k_l: &Layout,
                v: &CpuStorage,
                v_l: &Layout,
            ) -> Result<(CpuStorage, Shape)> {
                let p = self.problem(q_l, k_l, v_l)?;
                $cpu(self.name(), &p, (q, q_l), (k, k_l), (v, v_l))
            }

            #[cfg(feature = "candle-cuda")]
            fn cuda_fwd(
                &self,
                q: &candle_core::CudaStorage,
                q_l: &Layout,
                k: &candle_core::CudaStorage,
                k_l: &Layout,
                v: &candle_core::CudaStorage,
                v_l: &Layout,
            ) -> Result<(candle_core::CudaStorage, Shape)> {
                let p = self.problem(q_l, k_l, v_l)?;
                cuda::$cuda(self.name(), &p, (q, q_l), (k, k_l), (v, v_l))
            }
        }
    };
}
custom_op3!(FlashAttn, "longattn-flash-attn", qkv_cpu, qkv);
custom_op3!(FlashAttnVarlen, "longattn-flash-attn-varlen", qkv_cpu, qkv);

fn no_alibi(alibi_slopes: Option<&Tensor>) -> Result<()> {
    if alibi_slopes.is_some() {
        bail!("longattn: ALiBi slopes are not supported")
    }
    Ok(())
}

/// FlashAttention-2: `softmax(q k^T * softmax_scale) v`, causal (bottom-right aligned) or
/// not. `q: (batch, seqlen_q, heads_q, head_dim)`, `k, v: (batch, seqlen_k, heads_kv,
/// head_dim)` with `heads_q % heads_kv == 0`; the result has the shape of `q`.
pub fn flash_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let right = causal.then_some(0);
    flash_attn_windowed(q, k, v, softmax_scale, None, right)
}

/// [`flash_attn`] with a sliding window: `None` is unbounded on that side; causal is
/// `(None, Some(0))`, a causal window of `W` tokens `(Some(W - 1), Some(0))`.
pub fn flash_attn_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> Result<Tensor> {
    let op = FlashAttn {
        softmax_scale,
        window_size_left,
        window_size_right,
        softcap: None,
    };
    q.apply_op3_no_bwd(k, v, &op)
}

/// [`flash_attn_windowed`] with a softcap (`0.0` disables it); `alibi_slopes` must be `None`.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_alibi_windowed_softcap(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: Option<&Tensor>,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
    softcap: f32,
) -> Result<Tensor> {
    no_alibi(alibi_slopes)?;
    let op = FlashAttn {
        softmax_scale,
        window_size_left,
        window_size_right,
        softcap: Some(softcap),
    };
    q.apply_op3_no_bwd(k, v, &op)
}

/// Varlen FlashAttention-2 over packed sequences: `q: (total_q, heads_q, head_dim)`,
/// `k, v: (total_k, heads_kv, head_dim)`; sequence `b` holds rows
/// `seqlens_q[b]..seqlens_q[b + 1]` of q (likewise k, v). `seqlens_q`, `seqlens_k`:
/// cumulative lengths (`u32` as in candle-flash-attn, or `i32`/`i64`), `batch + 1` values
/// from 0. Result: `(total_q, heads_q, head_dim)`.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let right = causal.then_some(0);
    flash_attn_varlen_windowed(
        q,
        k,
        v,
        seqlens_q,
        seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale,
        None,
        right,
    )
}

/// [`flash_attn_varlen`] with a sliding window (see [`flash_attn_windowed`]).
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_windowed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
) -> Result<Tensor> {
    varlen(
        q,
        k,
        v,
        seqlens_q,
        seqlens_k,
        (max_seqlen_q, max_seqlen_k),
        softmax_scale,
        (window_size_left, window_size_right),
        None,
    )
}

/// [`flash_attn_varlen_windowed`] with a softcap (`0.0` disables it); `alibi_slopes` must be
/// `None`.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_varlen_alibi_windowed_softcap(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    alibi_slopes: Option<&Tensor>,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    max_seqlen_q: usize,
    max_seqlen_k: usize,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    window_size_right: Option<usize>,
    softcap: f32,
) -> Result<Tensor> {
    no_alibi(alibi_slopes)?;
    varlen(
        q,
        k,
        v,
        seqlens_q,
        seqlens_k,
        (max_seqlen_q, max_seqlen_k),
        softmax_scale,
        (window_size_left, window_size_right),
        Some(softcap),
    )
}

#[allow(clippy::too_many_arguments)]
fn varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens_q: &Tensor,
    seqlens_k: &Tensor,
    (max_seqlen_q, max_seqlen_k): (usize, usize),
    softmax_scale: f32,
    (window_size_left, window_size_right): (Option<usize>, Option<usize>),
    softcap: Option<f32>,
) -> Result<Tensor> {
    let op = FlashAttnVarlen {
        softmax_scale,
        window_size_left,
        window_size_right,
        softcap,
        cu_seqlens_q: host_i32("seqlens_q", seqlens_q)?,
        cu_seqlens_k: host_i32("seqlens_k", seqlens_k)?,
        max_seqlen_q,
        max_seqlen_k,
    };
    q.apply_op3_no_bwd(k, v, &op)
}

/// Decode over a paged KV cache, as the `CustomOp3` on `(q, k_cache, v_cache)` that
/// [`paged_attn_decode`] applies. The tables are host copies.
#[derive(Debug, Clone)]
pub struct PagedAttnDecode {
    /// Multiplier on `q . k` before the softmax (usually `1 / sqrt(head_dim)`).
    pub softmax_scale: f32,
    /// Keys visible to the left of the diagonal (the right side is causal); `None` is unbounded.
    pub window_size_left: Option<usize>,
    /// Gemma-2 softcap; `None` or `Some(0.0)` disables it.
    pub softcap: Option<f32>,
    /// `(batch, max_pages_per_seq)` physical page ids, row-major.
    pub block_table: Vec<i32>,
    /// Columns of `block_table`: page slots per sequence.
    pub max_pages_per_seq: usize,
    /// Tokens in the cache per sequence, the new ones included.
    pub seqlens_k: Vec<i32>,
    /// Dequantisation scales of an `F8E4M3` cache (`None`: scale 1; refused for other
    /// cache dtypes).
    pub kv_scales: Option<KvScales>,
}

/// Prefill over a paged KV cache (chunked prefill, prefix caching), as the `CustomOp3` on
/// `(q, k_cache, v_cache)` that [`paged_attn_prefill`] applies. The tables are host copies.
#[derive(Debug, Clone)]
pub struct PagedAttnPrefill {
    /// Multiplier on `q . k` before the softmax (usually `1 / sqrt(head_dim)`).
    pub softmax_scale: f32,
    /// Keys visible to the left of the diagonal; `None` is unbounded.
    pub window_size_left: Option<usize>,
    /// Keys visible to the right of the diagonal; `None` is unbounded, `Some(0)` is causal.
    pub window_size_right: Option<usize>,
    /// Gemma-2 softcap; `None` or `Some(0.0)` disables it.
    pub softcap: Option<f32>,
    /// `(batch, max_pages_per_seq)` physical page ids, row-major.
    pub block_table: Vec<i32>,
    /// Columns of `block_table`: page slots per sequence.
    pub max_pages_per_seq: usize,
    /// Tokens in the cache per sequence, the new ones included.
    pub seqlens_k: Vec<i32>,
    /// Cumulative query rows (`batch + 1` values from 0) of a packed
    /// `q: (total_q, heads_q, head_dim)`; `None`: `q: (batch, q_len, heads_q, head_dim)`.
    pub cu_seqlens_q: Option<Vec<i32>>,
    /// Dequantisation scales of an `F8E4M3` cache (`None`: scale 1; refused for other
    /// cache dtypes).
    pub kv_scales: Option<KvScales>,
}

/// `block_table: (batch, max_pages_per_seq)` and `seqlens_k: (batch,)` as host values:
/// `(block_table, max_pages_per_seq, seqlens_k)`.
fn host_tables(block_table: &Tensor, seqlens_k: &Tensor) -> Result<(Vec<i32>, usize, Vec<i32>)> {
    if block_table.rank() != 2 {
        bail!(
            "longattn: block_table must be (batch, max_pages_per_seq), got {:?}",
            block_table.shape()
        )
    }
    Ok((
        host_i32("block_table", &block_table.flatten_all()?)?,
        block_table.dim(1)?,
        host_i32("seqlens_k", seqlens_k)?,
    ))
}

/// The validated cache of `k_cache, v_cache: (num_pages, page_size, heads_kv, head_dim)`
/// (contiguous, alike, `head_dim` q's `d`) over the host tables, with an FP8 cache's scales.
fn paged_cache(
    (k_l, v_l): (&Layout, &Layout),
    d: usize,
    table: PageTable,
    kv_scales: Option<&KvScales>,
) -> Result<PagedCache> {
    let (num_pages, page_size, hkv, dk) = k_l.shape().dims4()?;
    if dk != d {
        bail!(
            "longattn: head_dim mismatch: q has {d}, k_cache {:?}",
            k_l.shape()
        )
    }
    if v_l.shape() != k_l.shape() {
        bail!(
            "longattn: shape mismatch k_cache {:?} and v_cache {:?}",
            k_l.shape(),
            v_l.shape()
        )
    }
    for (name, l) in [("k_cache", k_l), ("v_cache", v_l)] {
        if !l.is_contiguous() {
            bail!("longattn: {name} must be contiguous (num_pages, page_size, heads_kv, head_dim)")
        }
    }
    let layout = PagedLayout {
        num_pages,
        page_size,
        heads_kv: hkv,
        head_dim: d,
    };
    let cache = PagedCache::new(layout, table).map_err(wrap)?;
    match kv_scales {
        Some(s) => cache.with_kv_scales(s.clone()).map_err(wrap),
        None => Ok(cache),
    }
}

/// The longest sequence of `seqlens_k` (negative values count as 0; they are refused later).
fn longest(seqlens_k: &[i32]) -> usize {
    seqlens_k
        .iter()
        .map(|&s| s.max(0) as usize)
        .max()
        .unwrap_or(0)
}

/// A paged op's validated problem with the element strides of q and of its output (q's
/// shape, contiguous).
struct Paged {
    problem: PagedProblem,
    qs: Strides,
    os: Strides,
    /// A decode's Quest bounds `(kmin, kmax)`, read in the forward pass (storages of their
    /// own, checked by [`paged_attn_decode_with_policy`]).
    bounds: Option<(Tensor, Tensor)>,
}

enum PagedProblem {
    Decode(PagedDecode),
    Prefill(PagedPrefill),
}

impl Paged {
    /// Output elements (those of q).
    fn out_len(&self) -> usize {
        match &self.problem {
            PagedProblem::Decode(p) => p.out_len(),
            PagedProblem::Prefill(p) => p.out_len(),
        }
    }

    /// Read locks on the bounds' storages, with their layouts.
    fn read_bounds(&self) -> Option<PageMeta<(StorageRef<'_>, &Layout)>> {
        self.bounds.as_ref().map(|(kmin, kmax)| PageMeta {
            kmin: kmin.storage_and_layout(),
            kmax: kmax.storage_and_layout(),
        })
    }

    /// The CPU forward pass of `q` (type `T`) over a cache of type `C`.
    fn forward_cpu<T: Element, C: Element>(
        &self,
        q: &[T],
        kv: KvPages<&[C]>,
        meta: Option<PageMeta<&[C]>>,
        out: &mut [T],
    ) -> crate::Result<()> {
        let (q, out) = (Strided::new(q, self.qs), Strided::new(out, self.os));
        match &self.problem {
            PagedProblem::Decode(p) => p.forward_cpu(q, kv, meta, out, None),
            PagedProblem::Prefill(p) => p.forward_cpu(q, kv, out, None),
        }
    }
}

impl PagedAttnDecode {
    /// The op over `block_table: (batch, max_pages_per_seq)` and `seqlens_k: (batch,)`
    /// tensors, with the scale, left window and softcap of `paged_attn_decode`.
    fn from_tables(
        block_table: &Tensor,
        seqlens_k: &Tensor,
        kv_scales: Option<KvScales>,
        (softmax_scale, window_size_left, softcap): (f32, Option<usize>, Option<f32>),
    ) -> Result<Self> {
        let (block_table, max_pages_per_seq, seqlens_k) = host_tables(block_table, seqlens_k)?;
        Ok(PagedAttnDecode {
            softmax_scale,
            window_size_left,
            softcap,
            block_table,
            max_pages_per_seq,
            seqlens_k,
            kv_scales,
        })
    }

    fn problem(&self, q_l: &Layout, k_l: &Layout, v_l: &Layout) -> Result<Paged> {
        self.problem_with(q_l, (k_l, v_l), None)
    }

    /// The decode problem, with per-kv-head `policy` and its bounds when given.
    fn problem_with(
        &self,
        q_l: &Layout,
        (k_l, v_l): (&Layout, &Layout),
        policy: Option<&PolicyBounds>,
    ) -> Result<Paged> {
        let qs = strides_of("q", q_l, false)?;
        let (b, q_len, hq, d) = q_l.shape().dims4()?;
        if self.seqlens_k.len() != b {
            bail!(
                "longattn: seqlens_k has {} values but q has batch {b}",
                self.seqlens_k.len()
            )
        }
        let table = PageTable {
            block_table: &self.block_table,
            max_pages_per_seq: self.max_pages_per_seq,
            seqlens_k: &self.seqlens_k,
        };
        let cache = paged_cache((k_l, v_l), d, table, self.kv_scales.as_ref())?;
        let opts = options(
            self.softmax_scale,
            (self.window_size_left, Some(0)),
            self.softcap,
            longest(&self.seqlens_k),
        );
        let mut decode = PagedDecode::new(&cache, hq, q_len, &opts).map_err(wrap)?;
        if let Some(p) = policy {
            decode = decode.with_policy(p.policy.clone()).map_err(wrap)?;
        }
        Ok(Paged {
            problem: PagedProblem::Decode(decode),
            qs,
            os: Strides::contiguous(q_len, hq, d),
            bounds: policy.and_then(|p| p.bounds.clone()),
        })
    }
}

impl PagedAttnPrefill {
    fn problem(&self, q_l: &Layout, k_l: &Layout, v_l: &Layout) -> Result<Paged> {
        let packed = self.cu_seqlens_q.is_some();
        let qs = strides_of("q", q_l, packed)?;
        // `rows`: total_q when packed, else the batch.
        let (rows, q_len, hq, d) = if packed {
            let (total, hq, d) = q_l.shape().dims3()?;
            (total, 0, hq, d)
        } else {
            q_l.shape().dims4()?
        };
        let table = PageTable {
            block_table: &self.block_table,
            max_pages_per_seq: self.max_pages_per_seq,
            seqlens_k: &self.seqlens_k,
        };
        let cache = paged_cache((k_l, v_l), d, table, self.kv_scales.as_ref())?;
        let opts = options(
            self.softmax_scale,
            (self.window_size_left, self.window_size_right),
            self.softcap,
            longest(&self.seqlens_k),
        );
        let prefill = match &self.cu_seqlens_q {
            Some(cu) => {
                let total = cu.last().map_or(0, |&t| t.max(0) as usize);
                if total != rows {
                    bail!("longattn: q has {rows} rows but seqlens_q ends at {total}")
                }
                PagedPrefill::new_varlen(&cache, hq, cu, &opts)
            }
            None => {
                if rows != cache.batch() {
                    bail!(
                        "longattn: seqlens_k has {} values but q has batch {rows}",
                        cache.batch()
                    )
                }
                PagedPrefill::new(&cache, hq, q_len, &opts)
            }
        }
        .map_err(wrap)?;
        let os = if packed {
            Strides {
                batch: 0,
                seq: (hq * d) as i64,
                head: d as i64,
            }
        } else {
            Strides::contiguous(q_len, hq, d)
        };
        Ok(Paged {
            problem: PagedProblem::Prefill(prefill),
            qs,
            os,
            bounds: None,
        })
    }
}

fn paged_cpu_t<T: Element + candle_core::WithDType>(
    p: &Paged,
    q: (&CpuStorage, &Layout),
    k: (&CpuStorage, &Layout),
    v: (&CpuStorage, &Layout),
) -> Result<Vec<T>> {
    let k = cpu_slice::<T>("k_cache", k.0, k.1)?;
    let v = cpu_slice::<T>("v_cache", v.0, v.1)?;
    let bounds = p.read_bounds();
    let meta = match &bounds {
        Some(m) => Some(PageMeta {
            kmin: cpu_elems::<T>("kmin", &m.kmin)?,
            kmax: cpu_elems::<T>("kmax", &m.kmax)?,
        }),
        None => None,
    };
    paged_cpu_kv(p, q, KvPages { k, v }, meta)
}

/// A bound's CPU storage.
fn cpu_bound<'a>(name: &str, s: &'a Storage) -> Result<&'a CpuStorage> {
    match s {
        Storage::Cpu(s) => Ok(s),
        _ => bail!("longattn: {name} must be on the CPU, as q"),
    }
}

/// The elements of a contiguous read tensor (a bound), from its layout's start offset.
fn cpu_elems<'a, T: candle_core::WithDType>(
    name: &str,
    (s, l): &'a (StorageRef<'_>, &Layout),
) -> Result<&'a [T]> {
    let data = cpu_slice::<T>(name, cpu_bound(name, s)?, l)?;
    match data.get(..l.shape().elem_count()) {
        Some(d) => Ok(d),
        None => bail!("longattn: {name} ends past its storage"),
    }
}

/// An `F8E4M3` cache (candle's float8 type) as this crate's [`F8E4M3`], bit for bit.
fn fp8_cache(name: &str, s: &CpuStorage, l: &Layout) -> Result<Vec<F8E4M3>> {
    let CpuStorage::F8E4M3(data) = s else {
        bail!("longattn: {name} must be f8e4m3, got {:?}", s.dtype())
    };
    match data.get(l.start_offset()..) {
        Some(d) => Ok(d.iter().map(|x| F8E4M3::from_bits(x.to_bits())).collect()),
        None => bail!("longattn: {name} starts past its storage"),
    }
}

fn paged_cpu_fp8<T: Element + candle_core::WithDType>(
    p: &Paged,
    q: (&CpuStorage, &Layout),
    k: (&CpuStorage, &Layout),
    v: (&CpuStorage, &Layout),
) -> Result<Vec<T>> {
    let k = fp8_cache("k_cache", k.0, k.1)?;
    let v = fp8_cache("v_cache", v.0, v.1)?;
    let bounds = match p.read_bounds() {
        Some(m) => {
            let read = |name, (s, l): &(StorageRef, &Layout)| -> Result<Vec<F8E4M3>> {
                let mut b = fp8_cache(name, cpu_bound(name, s)?, l)?;
                b.truncate(l.shape().elem_count());
                Ok(b)
            };
            Some((read("kmin", &m.kmin)?, read("kmax", &m.kmax)?))
        }
        None => None,
    };
    let meta = bounds.as_ref().map(|(kmin, kmax)| PageMeta {
        kmin: &kmin[..],
        kmax: &kmax[..],
    });
    paged_cpu_kv(p, q, KvPages { k: &k, v: &v }, meta)
}

/// The CPU forward pass of `q` (type `T`) over a cache of type `C`.
fn paged_cpu_kv<T: Element + candle_core::WithDType, C: Element>(
    p: &Paged,
    q: (&CpuStorage, &Layout),
    kv: KvPages<&[C]>,
    meta: Option<PageMeta<&[C]>>,
) -> Result<Vec<T>> {
    let q = cpu_slice::<T>("q", q.0, q.1)?;
    let mut out = vec![T::default(); p.out_len()];
    p.forward_cpu(q, kv, meta, &mut out).map_err(wrap)?;
    Ok(out)
}

/// `cpu_fwd` of the paged ops: the cache holds q's dtype, or f8e4m3.
fn paged_cpu(
    name: &str,
    p: &Paged,
    q: (&CpuStorage, &Layout),
    k: (&CpuStorage, &Layout),
    v: (&CpuStorage, &Layout),
) -> Result<(CpuStorage, Shape)> {
    // `$run::<T>` for q's element type `T`.
    macro_rules! by_q_dtype {
        ($run:ident) => {
            match q.0 {
                CpuStorage::F32(_) => CpuStorage::F32($run::<f32>(p, q, k, v)?),
                CpuStorage::F16(_) => CpuStorage::F16($run::<half::f16>(p, q, k, v)?),
                CpuStorage::BF16(_) => CpuStorage::BF16($run::<half::bf16>(p, q, k, v)?),
                other => bail!(
                    "longattn {name}: q must be f32, f16 or bf16, got {:?}",
                    other.dtype()
                ),
            }
        };
    }
    let out = match (k.0.dtype(), v.0.dtype()) {
        (DType::F8E4M3, DType::F8E4M3) => by_q_dtype!(paged_cpu_fp8),
        (a, b) if a == q.0.dtype() && b == a => by_q_dtype!(paged_cpu_t),
        (a, b) => bail!(
            "longattn {name}: k_cache, v_cache must be of q's dtype ({:?}) or both f8e4m3; \
             got {a:?}, {b:?}",
            q.0.dtype()
        ),
    };
    Ok((out, q.1.shape().clone()))
}

custom_op3!(
    PagedAttnDecode,
    "longattn-paged-attn-decode",
    paged_cpu,
    paged
);
custom_op3!(
    PagedAttnPrefill,
    "longattn-paged-attn-prefill",
    paged_cpu,
    paged
);

/// Decode attention over a paged KV cache (FlashAttention's `flash_attn_with_kvcache` with a
/// `block_table`, cache already appended): `q: (batch, q_len, heads_q, head_dim)` new tokens
/// (`q_len` 1..=16), `k_cache, v_cache: (num_pages, page_size, heads_kv, head_dim)`
/// contiguous, `block_table: (batch, max_pages_per_seq)` page ids, `seqlens_k: (batch,)`
/// tokens per sequence counting the new ones (integer dtypes `u32`, `i32`, `i64`). Queries are
/// causal among the new tokens (bottom-right aligned); `window_size_left` bounds the window
/// (`Some(W - 1)` for `W` tokens); `softcap` `None` or `0.0` disables it. Result: the shape
/// of `q`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attn_decode(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_table: &Tensor,
    seqlens_k: &Tensor,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    softcap: Option<f32>,
) -> Result<Tensor> {
    let settings = (softmax_scale, window_size_left, softcap);
    let op = PagedAttnDecode::from_tables(block_table, seqlens_k, None, settings)?;
    q.apply_op3_no_bwd(k_cache, v_cache, &op)
}

/// [`paged_attn_decode`] over an FP8 cache: `k_cache, v_cache` of dtype `F8E4M3` (q and the
/// result f32, f16 or bf16), a stored value meaning `value * k_scales[kv head]` (keys) or
/// `value * v_scales[kv head]` (values), `k_scales, v_scales: [heads_kv]` > 0 and at most `f32::MAX / 448`
/// (vLLM's `k_scale`/`v_scale`, per head; repeat one value for a per-layer scale).
#[allow(clippy::too_many_arguments)]
pub fn paged_attn_decode_fp8(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_table: &Tensor,
    seqlens_k: &Tensor,
    (k_scales, v_scales): (&[f32], &[f32]),
    softmax_scale: f32,
    window_size_left: Option<usize>,
    softcap: Option<f32>,
) -> Result<Tensor> {
    for (name, t) in [("k_cache", k_cache), ("v_cache", v_cache)] {
        if t.dtype() != DType::F8E4M3 {
            bail!("longattn: {name} must be f8e4m3, got {:?}", t.dtype())
        }
    }
    let scales = KvScales::new(k_scales.to_vec(), v_scales.to_vec()).map_err(wrap)?;
    let settings = (softmax_scale, window_size_left, softcap);
    let op = PagedAttnDecode::from_tables(block_table, seqlens_k, Some(scales), settings)?;
    q.apply_op3_no_bwd(k_cache, v_cache, &op)
}

/// A decode's per-kv-head policy and the Quest bounds it reads.
#[derive(Debug, Clone)]
struct PolicyBounds {
    policy: SparsePolicy,
    bounds: Option<(Tensor, Tensor)>,
}

/// [`PagedAttnDecode`] with per-kv-head policies, as the `CustomOp3` on
/// `(q, k_cache, v_cache)` that [`paged_attn_decode_with_policy`] applies.
struct PagedAttnDecodePolicy {
    decode: PagedAttnDecode,
    policy: PolicyBounds,
}

impl PagedAttnDecodePolicy {
    fn problem(&self, q_l: &Layout, k_l: &Layout, v_l: &Layout) -> Result<Paged> {
        self.decode
            .problem_with(q_l, (k_l, v_l), Some(&self.policy))
    }
}

custom_op3!(
    PagedAttnDecodePolicy,
    "longattn-paged-attn-decode-policy",
    paged_cpu,
    paged
);

/// [`paged_attn_decode`] (or, with `kv_scales`, [`paged_attn_decode_fp8`]) with a policy per
/// kv head ([`PagedDecode::with_policy`]): `Full` heads attend to every visible page,
/// `Streaming` heads to the sinks and recent window of `policy.streaming`, `Quest` heads to
/// the top pages of `policy.quest` scored against the pages' key bounds
/// `bounds = Some((kmin, kmax))`, contiguous `(num_pages, heads_kv, head_dim)` of the
/// cache's dtype, as [`paged_attn_append`] keeps them (required when a head is `Quest`).
/// `Listed` heads need page lists, which this op does not take (an error). The bounds are
/// read in the forward pass and must not share a storage with q or the caches (refused).
/// On CUDA the Quest heads run the selection kernel first, as
/// [`PagedDecode::forward_gpu`] (**not yet run on a GPU** through this op).
#[allow(clippy::too_many_arguments)]
pub fn paged_attn_decode_with_policy(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_table: &Tensor,
    seqlens_k: &Tensor,
    policy: &SparsePolicy,
    bounds: Option<(&Tensor, &Tensor)>,
    kv_scales: Option<(&[f32], &[f32])>,
    softmax_scale: f32,
    window_size_left: Option<usize>,
    softcap: Option<f32>,
) -> Result<Tensor> {
    let kv_scales = kv_scales
        .map(|(k, v)| KvScales::new(k.to_vec(), v.to_vec()))
        .transpose()
        .map_err(wrap)?;
    let settings = (softmax_scale, window_size_left, softcap);
    let decode = PagedAttnDecode::from_tables(block_table, seqlens_k, kv_scales, settings)?;
    if let Some((kmin, kmax)) = bounds {
        check_bounds((kmin, kmax), k_cache, &[q, k_cache, v_cache])?;
    }
    let op = PagedAttnDecodePolicy {
        decode,
        policy: PolicyBounds {
            policy: policy.clone(),
            bounds: bounds.map(|(a, b)| (a.clone(), b.clone())),
        },
    };
    q.apply_op3_no_bwd(k_cache, v_cache, &op)
}

/// Refuses Quest bounds that are not contiguous `(num_pages, heads_kv, head_dim)` of
/// `k_cache`'s dtype and device, or that share a storage with each other or with `others`.
fn check_bounds(
    (kmin, kmax): (&Tensor, &Tensor),
    k_cache: &Tensor,
    others: &[&Tensor],
) -> Result<()> {
    let (num_pages, _, hkv, d) = k_cache.dims4()?;
    let mut seen: Vec<usize> = others.iter().map(|t| storage_id(t)).collect();
    for (name, t) in [("kmin", kmin), ("kmax", kmax)] {
        if t.dims() != [num_pages, hkv, d] || !t.is_contiguous() {
            bail!(
                "longattn: {name} must be contiguous (num_pages, heads_kv, head_dim) = {:?}, \
                 got {:?} strides {:?}",
                [num_pages, hkv, d],
                t.shape(),
                t.stride()
            )
        }
        if t.dtype() != k_cache.dtype() || !t.device().same_device(k_cache.device()) {
            bail!(
                "longattn: {name} must have k_cache's dtype and device ({:?}), got {:?}",
                k_cache.dtype(),
                t.dtype()
            )
        }
        let id = storage_id(t);
        if seen.contains(&id) {
            bail!("longattn: {name} shares its storage with another argument")
        }
        seen.push(id);
    }
    Ok(())
}

/// Prefill attention over a paged KV cache (chunked prefill, prefix caching: FlashAttention's
/// `flash_attn_with_kvcache` with a `block_table`, FlashInfer's batch prefill with paged KV),
/// the cache already holding the new tokens: dense attention of each sequence's queries over
/// its `seqlens_k[b]` tokens gathered from the pages, the new tokens being the last ones
/// (causal, `window_size_right = Some(0)`, is bottom-right aligned).
///
/// `q: (batch, q_len, heads_q, head_dim)`, or with `seqlens_q` (cumulative row offsets,
/// `batch + 1` values from 0, any integer dtype) packed `q: (total_q, heads_q, head_dim)`;
/// `k_cache, v_cache: (num_pages, page_size, heads_kv, head_dim)` contiguous, of q's dtype or
/// `F8E4M3` with `kv_scales = Some((k_scales, v_scales))` per kv head (`None`: scale 1);
/// `block_table: (batch, max_pages_per_seq)`, `seqlens_k: (batch,)`. Windows as
/// [`flash_attn_windowed`]; `softcap` `None` or `0.0` disables it. Result: the shape of `q`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attn_prefill(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_table: &Tensor,
    seqlens_k: &Tensor,
    seqlens_q: Option<&Tensor>,
    kv_scales: Option<(&[f32], &[f32])>,
    softmax_scale: f32,
    (window_size_left, window_size_right): (Option<usize>, Option<usize>),
    softcap: Option<f32>,
) -> Result<Tensor> {
    let (block_table, max_pages_per_seq, seqlens_k) = host_tables(block_table, seqlens_k)?;
    let kv_scales = kv_scales
        .map(|(k, v)| KvScales::new(k.to_vec(), v.to_vec()))
        .transpose()
        .map_err(wrap)?;
    let op = PagedAttnPrefill {
        softmax_scale,
        window_size_left,
        window_size_right,
        softcap,
        block_table,
        max_pages_per_seq,
        seqlens_k,
        cu_seqlens_q: seqlens_q.map(|t| host_i32("seqlens_q", t)).transpose()?,
        kv_scales,
    };
    q.apply_op3_no_bwd(k_cache, v_cache, &op)
}

/// A validated paged append: the cache (its `seqlens_k` counting the new tokens, an FP8
/// cache's scales), the new tokens' offsets and the element strides of `k_new`, `v_new`.
struct Append {
    cache: PagedCache,
    cu_seqlens_new: Vec<i32>,
    k_new: Strides,
    v_new: Strides,
}

/// A tensor's storage, write-locked by candle for an in-place op.
enum StorageMut<'a> {
    Cpu(&'a mut CpuStorage),
    #[cfg(feature = "candle-cuda")]
    Cuda(&'a mut candle_core::CudaStorage),
}

/// The in-place op that hands the storage of the tensor it is applied to (candle holds the
/// write lock for the call) to `f`, once.
struct WriteLock<F> {
    f: Cell<Option<F>>,
}

impl<F: FnOnce(StorageMut<'_>) -> Result<()>> WriteLock<F> {
    fn run(&self, s: StorageMut<'_>) -> Result<()> {
        match self.f.take() {
            Some(f) => f(s),
            None => bail!("longattn paged_attn_append: a storage was handed over twice"),
        }
    }
}

impl<F: FnOnce(StorageMut<'_>) -> Result<()>> InplaceOp1 for WriteLock<F> {
    fn name(&self) -> &'static str {
        "longattn-paged-attn-append"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, _: &Layout) -> Result<()> {
        self.run(StorageMut::Cpu(s))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, _: &Layout) -> Result<()> {
        self.run(StorageMut::Cuda(s))
    }
}

/// `f` on `t`'s storage under candle's write lock (the layout is `t.layout()`).
fn with_storage_mut(t: &Tensor, f: impl FnOnce(StorageMut<'_>) -> Result<()>) -> Result<()> {
    t.inplace_op1(&WriteLock {
        f: Cell::new(Some(f)),
    })
}

/// The identity of `t`'s storage (the address of the `Storage` behind its lock): equal for
/// tensors that are views of one storage. The read lock is released before returning.
fn storage_id(t: &Tensor) -> usize {
    let (s, _) = t.storage_and_layout();
    std::ptr::from_ref::<Storage>(&s).addr()
}

/// The written tensors (role index, tensor), in the order of their storage ids, locked one
/// inside the other; `f` gets their storages with their roles.
fn with_written(
    written: &[(usize, &Tensor)],
    f: impl FnOnce(Vec<(usize, StorageMut<'_>)>) -> Result<()>,
) -> Result<()> {
    match *written {
        [(ra, a), (rb, b)] => {
            with_storage_mut(a, |x| with_storage_mut(b, |y| f(vec![(ra, x), (rb, y)])))
        }
        [(ra, a), (rb, b), (rc, c), (rd, d)] => with_storage_mut(a, |x| {
            with_storage_mut(b, |y| {
                with_storage_mut(c, |z| {
                    with_storage_mut(d, |w| f(vec![(ra, x), (rb, y), (rc, z), (rd, w)]))
                })
            })
        }),
        _ => bail!("longattn paged_attn_append: 2 or 4 written tensors"),
    }
}

/// A CPU cache element: its candle storage as a `&mut` slice of `Self`.
trait CpuCache: Element {
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
}

macro_rules! cpu_cache {
    ($($t:ty => $v:ident),*) => {$(
        impl CpuCache for $t {
            fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$v(v) => Some(v),
                    _ => None,
                }
            }
        }
    )*};
}
cpu_cache!(f32 => F32, half::f16 => F16, half::bf16 => BF16);

impl CpuCache for F8E4M3 {
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
        let CpuStorage::F8E4M3(data) = s else {
            return None;
        };
        // One byte per element (as `repr(transparent)` over `u8` makes it), checked anyway.
        if size_of_val(data.as_slice()) != data.len() {
            return None;
        }
        let (ptr, len) = (data.as_mut_ptr(), data.len());
        // SAFETY: candle's `float8::F8E4M3` and this crate's `F8E4M3` are both
        // `repr(transparent)` over `u8` (size and alignment 1) and every bit pattern is a
        // valid value of either, so the same `len` bytes are `len` valid `F8E4M3`s; the result
        // reborrows `data` exclusively for its own lifetime, so nothing else reads or writes
        // them meanwhile.
        Some(unsafe { std::slice::from_raw_parts_mut(ptr.cast::<F8E4M3>(), len) })
    }
}

/// The `len` elements of a written tensor from its layout's start offset (caches and bounds
/// are contiguous).
fn cpu_mut<'a, C: CpuCache>(name: &str, s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [C]> {
    let dtype = s.dtype();
    let Some(data) = C::slice_mut(s) else {
        bail!("longattn: {name} must be {}, got {dtype:?}", C::DTYPE)
    };
    let range = l.start_offset()..l.start_offset() + l.shape().elem_count();
    match data.get_mut(range) {
        Some(d) => Ok(d),
        None => bail!("longattn: {name} ends past its storage"),
    }
}

impl Append {
    /// [`PagedCache::append_cpu`] of new tokens of type `T` into a cache of type `C`.
    fn cpu_t<T: Element + candle_core::WithDType, C: CpuCache>(
        &self,
        new: KvPages<(&CpuStorage, &Layout)>,
        Written { kv, meta }: Written<&mut CpuStorage>,
    ) -> Result<()> {
        let k_new = cpu_slice::<T>("k_new", new.k.0, new.k.1)?;
        let v_new = cpu_slice::<T>("v_new", new.v.0, new.v.1)?;
        let kv = KvPages {
            k: cpu_mut::<C>("k_cache", kv.k.0, kv.k.1)?,
            v: cpu_mut::<C>("v_cache", kv.v.0, kv.v.1)?,
        };
        let meta = match meta {
            Some(m) => Some(PageMeta {
                kmin: cpu_mut::<C>("kmin", m.kmin.0, m.kmin.1)?,
                kmax: cpu_mut::<C>("kmax", m.kmax.0, m.kmax.1)?,
            }),
            None => None,
        };
        self.cache
            .append_cpu(
                &self.cu_seqlens_new,
                Strided::new(k_new, self.k_new),
                Strided::new(v_new, self.v_new),
                kv,
                meta,
            )
            .map_err(wrap)
    }

    /// The CPU append: new tokens f32, f16 or bf16, the cache (and bounds) of their dtype or
    /// f8e4m3 (dtypes checked by [`paged_attn_append`]).
    fn cpu(&self, new: KvPages<(&CpuStorage, &Layout)>, w: Written<&mut CpuStorage>) -> Result<()> {
        use half::{bf16, f16};
        match (new.k.0.dtype(), w.kv.k.0.dtype()) {
            (DType::F32, DType::F32) => self.cpu_t::<f32, f32>(new, w),
            (DType::F16, DType::F16) => self.cpu_t::<f16, f16>(new, w),
            (DType::BF16, DType::BF16) => self.cpu_t::<bf16, bf16>(new, w),
            (DType::F32, DType::F8E4M3) => self.cpu_t::<f32, F8E4M3>(new, w),
            (DType::F16, DType::F8E4M3) => self.cpu_t::<f16, F8E4M3>(new, w),
            (DType::BF16, DType::F8E4M3) => self.cpu_t::<bf16, F8E4M3>(new, w),
            (a, b) => bail!("longattn paged_attn_append: {a:?} tokens into a {b:?} cache"),
        }
    }

    /// The append on the written storages (`locked`: k_cache, v_cache and the bounds, with
    /// their roles 0..4, locked by [`with_written`]) and the read ones of `k_new`, `v_new`.
    fn run(&self, t: &AppendTensors, mut locked: Vec<(usize, StorageMut<'_>)>) -> Result<()> {
        locked.sort_by_key(|&(role, _)| role);
        let mut locked = locked.into_iter().map(|(_, s)| s);
        let (Some(k), Some(v)) = (locked.next(), locked.next()) else {
            bail!("longattn paged_attn_append: k_cache and v_cache are written")
        };
        let meta = locked
            .next()
            .zip(locked.next())
            .zip(t.bounds)
            .map(|((a, b), (al, bl))| PageMeta {
                kmin: (a, al.layout()),
                kmax: (b, bl.layout()),
            });
        let written = Written {
            kv: KvPages {
                k: (k, t.k_cache.layout()),
                v: (v, t.v_cache.layout()),
            },
            meta,
        };
        let (kg, kl) = t.k_new.storage_and_layout();
        // k_new and v_new may share a storage: one read lock then (a second `read` of one
        // lock could wait behind a queued writer).
        let vg = (!t.new_shared).then(|| t.v_new.storage_and_layout().0);
        let vn: &Storage = vg.as_deref().unwrap_or(&kg);
        let vl = t.v_new.layout();
        match (&*kg, vn) {
            (Storage::Cpu(kn), Storage::Cpu(vn)) => {
                let w = written.backend(StorageMut::cpu)?;
                self.cpu(
                    KvPages {
                        k: (kn, kl),
                        v: (vn, vl),
                    },
                    w,
                )
            }
            #[cfg(feature = "candle-cuda")]
            (Storage::Cuda(kn), Storage::Cuda(vn)) => {
                let w = written.backend(StorageMut::cuda)?;
                cuda::append(
                    self,
                    KvPages {
                        k: (kn, kl),
                        v: (vn, vl),
                    },
                    w,
                )
            }
            _ => Err(devices_differ()),
        }
    }
}

/// The written tensors' storages (`S`: [`StorageMut`], or `&mut` one backend's) with their
/// layouts: the caches and, when kept, the Quest bounds.
struct Written<'l, S> {
    kv: KvPages<(S, &'l Layout)>,
    meta: Option<PageMeta<(S, &'l Layout)>>,
}

impl<'l, 's> Written<'l, StorageMut<'s>> {
    /// The storages of one backend (`take`: `S` or an error).
    fn backend<S>(
        self,
        take: fn(StorageMut<'s>) -> Result<&'s mut S>,
    ) -> Result<Written<'l, &'s mut S>> {
        let kv = KvPages {
            k: (take(self.kv.k.0)?, self.kv.k.1),
            v: (take(self.kv.v.0)?, self.kv.v.1),
        };
        let meta = match self.meta {
            Some(m) => Some(PageMeta {
                kmin: (take(m.kmin.0)?, m.kmin.1),
                kmax: (take(m.kmax.0)?, m.kmax.1),
            }),
            None => None,
        };
        Ok(Written { kv, meta })
    }
}

fn devices_differ() -> candle_core::Error {
    candle_core::Error::Msg(
        "longattn paged_attn_append: k_new, v_new, k_cache, v_cache and the bounds must be \
         on one device"
            .into(),
    )
    .bt()
}

impl<'a> StorageMut<'a> {
    fn cpu(self) -> Result<&'a mut CpuStorage> {
        match self {
            StorageMut::Cpu(s) => Ok(s),
            #[cfg(feature = "candle-cuda")]
            StorageMut::Cuda(_) => Err(devices_differ()),
        }
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda(self) -> Result<&'a mut candle_core::CudaStorage> {
        match self {
            StorageMut::Cuda(s) => Ok(s),
            StorageMut::Cpu(_) => Err(devices_differ()),
        }
    }
}

/// The tensors of one [`paged_attn_append`] call.
struct AppendTensors<'t> {
    k_new: &'t Tensor,
    v_new: &'t Tensor,
    k_cache: &'t Tensor,
    v_cache: &'t Tensor,
    bounds: Option<(&'t Tensor, &'t Tensor)>,
    /// `k_new` and `v_new` are views of one storage.
    new_shared: bool,
}

impl<'t> AppendTensors<'t> {
    /// Refuses tensors on other devices than `k_cache`'s, and written tensors (caches,
    /// bounds) that share their storage with any other argument: candle would deadlock on
    /// the storage's lock, and the written data would alias. Returns the written tensors
    /// (role, tensor) in the order of their storage ids, candle's locking order.
    fn check_storages(&mut self) -> Result<Vec<(usize, &'t Tensor)>> {
        let mut all = vec![("k_cache", self.k_cache), ("v_cache", self.v_cache)];
        if let Some((kmin, kmax)) = self.bounds {
            all.extend([("kmin", kmin), ("kmax", kmax)]);
        }
        let written = all.len();
        all.extend([("k_new", self.k_new), ("v_new", self.v_new)]);
        for (name, t) in &all {
            if !t.device().same_device(self.k_cache.device()) {
                bail!(
                    "longattn paged_attn_append: {name} is on {:?}, k_cache on {:?}",
                    t.device().location(),
                    self.k_cache.device().location()
                )
            }
        }
        let ids: Vec<usize> = all.iter().map(|(_, t)| storage_id(t)).collect();
        for w in 0..written {
            if let Some(o) = (0..all.len()).find(|&o| o != w && ids[o] == ids[w]) {
                bail!(
                    "longattn paged_attn_append: {} and {} share one storage; the written \
                     tensors (k_cache, v_cache, kmin, kmax) must each have their own",
                    all[w].0,
                    all[o].0
                )
            }
        }
        let mut order: Vec<(usize, &'t Tensor)> = all[..written]
            .iter()
            .enumerate()
            .map(|(r, (_, t))| (r, *t))
            .collect();
        order.sort_by_key(|&(r, _)| ids[r]);
        self.new_shared = ids[written] == ids[written + 1];
        Ok(order)
    }
}

impl Append {
    /// Validates the tensors against the host tables: `k_new, v_new: (total_new, heads_kv,
    /// head_dim)` (f32, f16 or bf16, last dim contiguous, `total_new` the last offset),
    /// `k_cache, v_cache` contiguous of their dtype or f8e4m3 ([`paged_cache`]), the bounds
    /// `(num_pages, heads_kv, head_dim)` contiguous of the cache's dtype.
    fn new(
        t: &AppendTensors,
        table: PageTable,
        cu_seqlens_new: Vec<i32>,
        kv_scales: Option<&KvScales>,
    ) -> Result<Self> {
        let (new, cache) = (t.k_new.dtype(), t.k_cache.dtype());
        if !matches!(new, DType::F32 | DType::F16 | DType::BF16) || t.v_new.dtype() != new {
            bail!(
                "longattn paged_attn_append: k_new, v_new must share f32, f16 or bf16; got \
                 {new:?}, {:?}",
                t.v_new.dtype()
            )
        }
        if (cache != new && cache != DType::F8E4M3) || t.v_cache.dtype() != cache {
            bail!(
                "longattn paged_attn_append: k_cache, v_cache must share the new tokens' dtype \
                 ({new:?}) or f8e4m3; got {cache:?}, {:?}",
                t.v_cache.dtype()
            )
        }
        let (_, _, hkv, d) = t.k_cache.dims4()?;
        let cache = paged_cache(
            (t.k_cache.layout(), t.v_cache.layout()),
            d,
            table,
            kv_scales,
        )?;
        let total = cu_seqlens_new.last().map_or(0, |&n| n.max(0) as usize);
        for (name, x) in [("k_new", t.k_new), ("v_new", t.v_new)] {
            if x.dims() != [total, hkv, d] {
                bail!(
                    "longattn paged_attn_append: {name} must be (total_new, heads_kv, \
                     head_dim) = {:?}, got {:?}",
                    [total, hkv, d],
                    x.shape()
                )
            }
        }
        if let Some(bounds) = t.bounds {
            // Their storages were checked by `check_storages`.
            check_bounds(bounds, t.k_cache, &[])?;
        }
        Ok(Append {
            cache,
            cu_seqlens_new,
            k_new: strides_of("k_new", t.k_new.layout(), true)?,
            v_new: strides_of("v_new", t.v_new.layout(), true)?,
        })
    }
}

/// Appends new tokens to a paged KV cache in place (vLLM's `reshape_and_cache_flash`,
/// [`PagedCache::append_cpu`] / [`PagedCache::append_gpu`]): sequence `b`'s rows
/// `cu_seqlens_new[b]..cu_seqlens_new[b + 1]` of `k_new, v_new: (total_new, heads_kv,
/// head_dim)` go to its positions `seqlens_k[b] - n_b..seqlens_k[b]` (`seqlens_k: (batch,)`
/// already counts them), through `block_table: (batch, max_pages_per_seq)`, in
/// `k_cache, v_cache: (num_pages, page_size, heads_kv, head_dim)` (contiguous; the tensors
/// [`paged_attn_decode`] takes). With `bounds = Some((kmin, kmax))`, contiguous
/// `(num_pages, heads_kv, head_dim)` of the cache's dtype, the pages' Quest key bounds are
/// kept too (an append writing slot 0 of a page restarts them). Integer tables in `u32`,
/// `i32` or `i64`, read on the host.
///
/// The new tokens are f32, f16 or bf16 (f16 or bf16 on CUDA); the caches hold their dtype
/// (copied exactly) or `F8E4M3`, storing `x / scale` of the kv head's `kv_scales`
/// (`None`: scale 1; refused for other caches) as [`paged_attn_decode_fp8`] reads them.
///
/// Every written tensor (`k_cache`, `v_cache`, `kmin`, `kmax`) must have its own storage,
/// shared with no other argument (not two views of one tensor): such calls are refused.
/// candle's in-place ops write one tensor, so the op nests them: `k_cache`'s holds its
/// storage's write lock while `v_cache`'s (then the bounds') run inside it, in the order of
/// the storages' addresses (candle's own lock order), and the innermost reads `k_new`,
/// `v_new`; the crate's safe append then gets every storage as `&mut`. On CUDA the append
/// runs on candle's stream (**not yet run on a GPU**). Nothing is written when validation
/// fails.
#[allow(clippy::too_many_arguments)]
pub fn paged_attn_append(
    k_new: &Tensor,
    v_new: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    block_table: &Tensor,
    seqlens_k: &Tensor,
    cu_seqlens_new: &Tensor,
    bounds: Option<(&Tensor, &Tensor)>,
    kv_scales: Option<(&[f32], &[f32])>,
) -> Result<()> {
    let (block_table, max_pages_per_seq, seqlens_k) = host_tables(block_table, seqlens_k)?;
    let cu_seqlens_new = host_i32("cu_seqlens_new", cu_seqlens_new)?;
    let kv_scales = kv_scales
        .map(|(k, v)| KvScales::new(k.to_vec(), v.to_vec()))
        .transpose()
        .map_err(wrap)?;
    let mut t = AppendTensors {
        k_new,
        v_new,
        k_cache,
        v_cache,
        bounds,
        new_shared: false,
    };
    let written = t.check_storages()?;
    let table = PageTable {
        block_table: &block_table,
        max_pages_per_seq,
        seqlens_k: &seqlens_k,
    };
    let append = Append::new(&t, table, cu_seqlens_new, kv_scales.as_ref())?;
    with_written(&written, |w| append.run(&t, w))
}

/// Neighborhood attention as the `CustomOp3` that [`neighborhood_attn`] applies:
/// `q: (batch, X, (Y, (Z,)) heads_q, head_dim)`, `k, v` alike with `heads_kv`.
#[derive(Debug, Clone)]
pub struct NeighborhoodAttn {
    /// One per grid dim, outermost first; each `length` is that dim of q.
    pub dims: Vec<NeighborhoodDim>,
    /// Multiplier on `q . k` before the softmax (usually `1 / sqrt(head_dim)`).
    pub softmax_scale: f32,
    /// Gemma-2 softcap; `None` or `Some(0.0)` disables it.
    pub softcap: Option<f32>,
}

/// Element strides `(batch, token, head)` of a `(batch, X, (Y, (Z,)) heads, head_dim)` layout
/// whose grid dims flatten into one token axis (row-major: a contiguous tensor, or a view of
/// one that keeps the grid whole, such as a slice of heads or of the batch); the last dim
/// must be contiguous.
fn grid_strides(name: &str, l: &Layout) -> Result<Strides> {
    let (dims, st) = (l.dims(), l.stride());
    let r = dims.len();
    if st[r - 1] != 1 && dims[r - 1] > 1 {
        bail!("longattn: the last dim of {name} must be contiguous, strides {st:?}")
    }
    // The token stride is that of the innermost grid dim longer than 1; every outer one must
    // step over the tokens inside it.
    let (mut token, mut inner) = (None, 1usize);
    for a in (1..r - 2).rev() {
        if dims[a] > 1 {
            let t = *token.get_or_insert(st[a]);
            if t.checked_mul(inner) != Some(st[a]) {
                bail!(
                    "longattn: the grid dims of {name} must flatten into one token axis, \
                     shape {:?} strides {st:?}",
                    l.shape()
                )
            }
        }
        inner *= dims[a];
    }
    Ok(Strides {
        batch: st[0] as i64,
        seq: token.unwrap_or(st[r - 3]) as i64,
        head: st[r - 2] as i64,
    })
}

impl NeighborhoodAttn {
    fn problem(
        &self,
        q_l: &Layout,
        k_l: &Layout,
        v_l: &Layout,
    ) -> Result<Problem<NeighborhoodAttention>> {
        let (qd, kd) = (q_l.dims(), k_l.dims());
        let r = qd.len();
        if !(4..=3 + MAX_NEIGHBORHOOD_DIMS).contains(&r) {
            bail!(
                "longattn: q must be (batch, X, (Y, (Z,)) heads, head_dim) with 1 to \
                 {MAX_NEIGHBORHOOD_DIMS} grid dims, got shape {:?}",
                q_l.shape()
            )
        }
        let same = kd.len() == r && kd[..r - 2] == qd[..r - 2] && kd[r - 1] == qd[r - 1];
        check_shapes(same, q_l, k_l, v_l)?;
        let grid = &qd[1..r - 2];
        if self.dims.len() != grid.len() || self.dims.iter().zip(grid).any(|(d, &l)| d.length != l)
        {
            bail!(
                "longattn: the neighborhood dims' lengths {:?} must be q's grid {grid:?}",
                self.dims.iter().map(|d| d.length).collect::<Vec<_>>()
            )
        }
        let (q, k, v) = (
            grid_strides("q", q_l)?,
            grid_strides("k", k_l)?,
            grid_strides("v", v_l)?,
        );
        let (hq, d) = (qd[r - 2], qd[r - 1]);
        let shape = NeighborhoodShape {
            batch: qd[0],
            heads_q: hq,
            heads_kv: kd[r - 2],
            head_dim: d,
            dims: &self.dims,
        };
        let opts = AttentionOptions {
            scale: Some(self.softmax_scale),
            softcap: self.softcap.filter(|&c| c != 0.0),
            ..AttentionOptions::default()
        };
        let attn = NeighborhoodAttention::new(&shape, &opts).map_err(wrap)?;
        Ok(Problem {
            out: Strides::contiguous(attn.tokens(), hq, d),
            out_len: attn.out_len(),
            attn,
            q,
            k,
            v,
            out_shape: q_l.shape().clone(),
        })
    }
}

/// Block-sparse attention as the `CustomOp3` that [`block_sparse_attn`] applies:
/// `q: (batch, seqlen_q, heads_q, head_dim)`, `k, v: (batch, seqlen_k, heads_kv, head_dim)`.
#[derive(Debug, Clone)]
pub struct BlockSparseAttn {
    /// The listed key blocks of each (batch, query head, query block), bound to the problem by
    /// [`BlockSparseAttention::new`].
    pub mask: BlockMask,
    /// Scale, softcap and the element mask (window, sinks, causal) of `Partial` blocks.
    pub options: AttentionOptions,
}

impl BlockSparseAttn {
    fn problem(
        &self,
        q_l: &Layout,
        k_l: &Layout,
        v_l: &Layout,
    ) -> Result<Problem<BlockSparseAttention>> {
        let p = Problem::fixed(q_l, k_l, v_l, |_| self.options)?;
        let attn =
            BlockSparseAttention::new(p.attn, self.mask.clone()).map_err(|e| wrap(e.into()))?;
        Ok(Problem {
            attn,
            q: p.q,
            k: p.k,
            v: p.v,
            out: p.out,
            out_len: p.out_len,
            out_shape: p.out_shape,
        })
    }
}

custom_op3!(NeighborhoodAttn, "longattn-neighborhood-attn", qkv_cpu, qkv);
custom_op3!(BlockSparseAttn, "longattn-block-sparse-attn", qkv_cpu, qkv);

/// Neighborhood attention (NATTEN's semantics, `semantics.md`): every query token of a 1-D,
/// 2-D or 3-D grid attends to the keys of its neighborhood, cut per grid dim by `dims`
/// (kernel size, dilation, stride, causal; each `length` must be that dim of q).
/// `q: (batch, X, (Y, (Z,)) heads_q, head_dim)`, `k, v: (batch, X, (Y, (Z,)) heads_kv,
/// head_dim)` with `heads_q % heads_kv == 0`, the grid dims of each flattening into one token
/// axis (row-major, as in a contiguous tensor); `softcap` `None` or `0.0` disables it. Result:
/// the shape of `q`. On CUDA, [`NeighborhoodAttention::forward_gpu`] picks the kernel.
pub fn neighborhood_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: &[NeighborhoodDim],
    softmax_scale: f32,
    softcap: Option<f32>,
) -> Result<Tensor> {
    let op = NeighborhoodAttn {
        dims: dims.to_vec(),
        softmax_scale,
        softcap,
    };
    q.apply_op3_no_bwd(k, v, &op)
}

/// Block-sparse attention (FlexAttention's `BlockMask`, FlashInfer's BSR prefill): dense
/// attention over the key blocks `mask` lists for each query block, `Full` blocks whole and
/// `Partial` ones under the element mask of `options` (window, sinks, causal; scale and
/// softcap too: [`crate::block_sparse`]). `q: (batch, seqlen_q, heads_q, head_dim)`,
/// `k, v: (batch, seqlen_k, heads_kv, head_dim)`; `mask` covers `seqlen_q x seqlen_k`
/// (`BlockMaskDims::for_lengths`) with batch and heads equal to the problem's or 1
/// (broadcast). A row with no visible key gives 0. Result: the shape of `q`. On CUDA,
/// [`BlockSparseAttention::forward_gpu`] (block sizes multiples of 64, head_dim 64, 128 or
/// 256).
pub fn block_sparse_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &BlockMask,
    options: &AttentionOptions,
) -> Result<Tensor> {
    let op = BlockSparseAttn {
        mask: mask.clone(),
        options: *options,
    };
    q.apply_op3_no_bwd(k, v, &op)
}
