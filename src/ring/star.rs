//! Star Attention (Acharya et al., 2024), two phases over `world` ranks, causal throughout.
//!
//! The context of `context_len` tokens is cut into `world` contiguous blocks (block `r` =
//! tokens `[r * C / world, (r + 1) * C / world)`), block 0 being the **anchor**.
//! - Phase 1, context encoding, local (no communication): rank `r` attends its block's queries
//!   to the anchor's keys followed by its own block's keys, causally (the anchor precedes the
//!   block, so every anchor key is visible; rank 0 attends its block alone). Its output is
//!   phase 1's result for those tokens; the rank keeps its block's K/V as its cache.
//! - Phase 2, query encoding: the `query_len` query tokens (positions `C..C + query_len`)
//!   attend to every rank's cached block (entirely visible) and to their own K/V (causal among
//!   the query tokens, held by the last rank); the per-rank `(o, lse)` are combined with the
//!   LSE merge, which gives exact attention of the query over the whole sequence.
//!
//! The definition ([`StarAttention::context_attention`],
//! [`StarAttention::query_definition`]) is one dense problem per phase over concatenated
//! keys; the CPU paths ([`StarAttention::context_cpu`], [`StarAttention::query_cpu`]) and the
//! GPU paths (**verified on an H200, 2026-12-04**) compute phase 2 the distributed way (one partial
//! per rank, merged).

use super::RingShape;
use crate::dense::{AttentionOptions, FlashAttention};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::gpu::DeviceBufferMut;
use crate::layout::{Strided, Strides, check_heads};
use crate::mask::{Mask, Window};
use crate::softmax::merge_into_row;
use std::ops::Range;

/// Star Attention over one sequence: `context_len` context tokens on `world` ranks, then
/// `query_len` query tokens. Tensors: queries `[batch, L, heads_q, head_dim]` (strides), K/V
/// blocks contiguous `[batch, L, heads_kv, head_dim]`, LSE `[batch, heads_q, L]` f32.
#[derive(Debug, Clone)]
pub struct StarAttention {
    context_len: usize,
    world: usize,
    query_len: usize,
    shape: RingShape,
    scale: f32,
    softcap: Option<f32>,
}

impl StarAttention {
    /// `options` give the scale and softcap; Star Attention is causal, so the mask must be
    /// the default (it is taken as causal) or causal, however spelled (`causal` flag, window
    /// `(-1, 0)`, or both); any other window or sinks are an `InvalidOption` error.
    pub fn new(
        context_len: usize,
        world: usize,
        query_len: usize,
        shape: RingShape,
        options: &AttentionOptions,
    ) -> Result<Self> {
        check_heads(
            "star: ",
            shape.batch,
            shape.heads_q,
            shape.heads_kv,
            shape.head_dim,
        )?;
        if world == 0
            || context_len < world
            || context_len
                .checked_add(query_len)
                .is_none_or(|n| n > i32::MAX as usize)
        {
            return Err(Error::Shape(format!(
                "star: {context_len} context tokens over {world} ranks (every rank needs one) \
                 plus {query_len} query tokens must fit in i32"
            )));
        }
        // Causal however spelled (the flag, the window `(-1, 0)`, or neither, which is
        // taken as causal); a left bound, a right bound > 0 or sinks are not Star Attention.
        let m = options.effective_mask();
        if m.sinks != 0 || m.window.left.is_some() || !matches!(m.window.right, None | Some(0)) {
            return Err(Error::InvalidOption(format!(
                "star attention is causal: mask {m:?} is not supported"
            )));
        }
        Ok(StarAttention {
            context_len,
            world,
            query_len,
            shape,
            scale: options.resolve_scale(shape.head_dim)?,
            softcap: options.softcap,
        })
    }

    /// Number of ranks the context is split over.
    pub fn world(&self) -> usize {
        self.world
    }
    /// The problem dimensions.
    pub fn shape(&self) -> RingShape {
        self.shape
    }
    /// Query tokens appended after the context (positions `context_len..context_len + query_len`).
    pub fn query_len(&self) -> usize {
        self.query_len
    }

    /// Context tokens of rank `rank`'s block.
    pub fn block(&self, rank: usize) -> Range<usize> {
        // Past the last rank: empty (u128: `rank * context_len` may not fit in usize).
        let (c, n) = (self.context_len as u128, self.world as u128);
        let r = (rank as u128).min(n);
        (r * c / n) as usize..((r + 1).min(n) * c / n) as usize
    }

    fn dense(&self, sq: usize, sk: usize, causal: bool) -> Result<FlashAttention> {
        let mask = if causal {
            Mask::new(Window::new(None, Some(0)), 0)
        } else {
            Mask::default()
        };
        self.shape.attention(sq, sk, mask, self.scale, self.softcap)
    }

    /// Phase 1 of rank `rank`: its block's queries over the keys `anchor ++ block` (`block`
    /// alone on rank 0), causal, bottom-right aligned (every anchor key is visible).
    pub fn context_attention(&self, rank: usize) -> Result<FlashAttention> {
        let lr = self.block(rank).len();
        let sk = if rank == 0 {
            lr
        } else {
            self.block(0).len() + lr
        };
        self.dense(lr, sk, true)
    }

    /// Phase 2's definition: the query tokens over every context key and their own, causal
    /// (bottom-right: every context key is visible). Keys `[batch, context_len + query_len,
    /// heads_kv, head_dim]`.
    pub fn query_definition(&self) -> Result<FlashAttention> {
        self.dense(self.query_len, self.context_len + self.query_len, true)
    }

    /// Phase 2's partial of rank `rank`: the queries over its cached block, all visible.
    pub fn query_partial(&self, rank: usize) -> Result<FlashAttention> {
        self.dense(self.query_len, self.block(rank).len(), false)
    }

    /// Phase 2's partial over the query's own keys (on the last rank), causal.
    pub fn query_self_partial(&self) -> Result<FlashAttention> {
        self.dense(self.query_len, self.query_len, true)
    }

    /// Phase 2's argument checks (block count, the buffers against
    /// [`StarAttention::query_definition`], each block's and the query's own K/V length) and
    /// its partials: one per rank over its block, then one over the query's own keys, each
    /// as `(problem, k, v, key count)`. `len` is a K/V buffer's element count.
    #[allow(clippy::type_complexity)]
    fn query_parts<B: Copy>(
        &self,
        q: (usize, &Strides),
        (k_blocks, v_blocks): (&[B], &[B]),
        (kq, vq): (B, B),
        out: (usize, &Strides),
        lse_len: Option<usize>,
        len: impl Fn(B) -> usize,
    ) -> Result<Vec<(FlashAttention, B, B, usize)>> {
        if k_blocks.len() != self.world || v_blocks.len() != self.world {
            return Err(Error::Shape(format!(
                "star: {} k and {} v blocks for {} ranks",
                k_blocks.len(),
                v_blocks.len(),
                self.world
            )));
        }
        let nq = self.query_len;
        let all = self.context_len + nq;
        let s_all = Strides::contiguous(all, self.shape.heads_kv, self.shape.head_dim);
        self.query_definition()?.check_buffers(
            q,
            (self.kv_elems(all), &s_all),
            (self.kv_elems(all), &s_all),
            out,
            lse_len,
        )?;
        let mut parts = Vec::with_capacity(self.world + 1);
        for r in 0..self.world {
            let lr = self.block(r).len();
            self.check_kv(
                &format!("block {r}"),
                lr,
                len(k_blocks[r]),
                len(v_blocks[r]),
            )?;
            parts.push((self.query_partial(r)?, k_blocks[r], v_blocks[r], lr));
        }
        self.check_kv("query", nq, len(kq), len(vq))?;
        parts.push((self.query_self_partial()?, kq, vq, nq));
        Ok(parts)
    }

    /// Elements of a contiguous K/V block of `len` tokens.
    fn kv_elems(&self, len: usize) -> usize {
        self.shape.batch * len * self.shape.heads_kv * self.shape.head_dim
    }

    fn check_kv(&self, what: &str, len: usize, k: usize, v: usize) -> Result<()> {
        let need = self.kv_elems(len);
        if k < need || v < need {
            return Err(Error::Shape(format!(
                "star: {what} k/v hold {k}/{v} elements, [batch, {len}, heads_kv, head_dim] \
                 needs {need}"
            )));
        }
        Ok(())
    }

    /// Phase 1 on the CPU for rank `rank`: `q` its block's queries, `anchor_k/v` block 0's
    /// K/V (ignored on rank 0), `k/v` its block's.
    #[allow(clippy::too_many_arguments)]
    pub fn context_cpu<T: Element>(
        &self,
        rank: usize,
        q: Strided<&[T]>,
        anchor_k: &[T],
        anchor_v: &[T],
        k: &[T],
        v: &[T],
        out: Strided<&mut [T]>,
        lse: Option<&mut [f32]>,
    ) -> Result<()> {
        if rank >= self.world {
            return Err(Error::Shape(format!("star: rank {rank} of {}", self.world)));
        }
        self.check_gpu_positions()?;
        let attn = self.context_attention(rank)?;
        let lr = self.block(rank).len();
        self.check_kv("block", lr, k.len(), v.len())?;
        let (hkv, d) = (self.shape.heads_kv, self.shape.head_dim);
        if rank == 0 {
            let s = Strides::contiguous(lr, hkv, d);
            return attn.forward_cpu(q, Strided::new(k, s), Strided::new(v, s), out, lse);
        }
        let la = self.block(0).len();
        self.check_kv("anchor", la, anchor_k.len(), anchor_v.len())?;
        let row = hkv * d;
        let kc = concat_rows(anchor_k, la, k, lr, self.shape.batch, row);
        let vc = concat_rows(anchor_v, la, v, lr, self.shape.batch, row);
        let s = Strides::contiguous(la + lr, hkv, d);
        attn.forward_cpu(q, Strided::new(&kc, s), Strided::new(&vc, s), out, lse)
    }

    /// Phase 2 on the CPU, the distributed way: one partial per rank over its cached block
    /// (`k_blocks[r]`, `v_blocks[r]`), one over the query's own K/V (`kq`, `vq`), merged
    /// with the LSE merge into an f32 state, written once in `T`.
    #[allow(clippy::too_many_arguments)]
    pub fn query_cpu<T: Element>(
        &self,
        q: Strided<&[T]>,
        k_blocks: &[&[T]],
        v_blocks: &[&[T]],
        kq: &[T],
        vq: &[T],
        mut out: Strided<&mut [T]>,
        lse: Option<&mut [f32]>,
    ) -> Result<()> {
        let RingShape {
            batch,
            heads_q,
            heads_kv,
            head_dim: d,
        } = self.shape;
        self.check_gpu_positions()?;
        let nq = self.query_len;
        let parts = self.query_parts(
            q.extent(),
            (k_blocks, v_blocks),
            (kq, vq),
            out.extent(),
            lse.as_ref().map(|l| l.len()),
            |x| x.len(),
        )?;
        let mut o = vec![0.0f32; batch * heads_q * nq * d];
        let mut l = vec![f32::NEG_INFINITY; batch * heads_q * nq];
        for (attn, k, v, lk) in parts {
            let s = Strides::contiguous(lk, heads_kv, d);
            let mut po = vec![T::default(); attn.out_len()];
            let mut pl = vec![0.0f32; attn.lse_len()];
            attn.forward_cpu(
                Strided::new(q.data, q.strides),
                Strided::new(k, s),
                Strided::new(v, s),
                Strided::new(&mut po[..], Strides::contiguous(nq, heads_q, d)),
                Some(&mut pl[..]),
            )?;
            for b in 0..batch {
                for h in 0..heads_q {
                    for i in 0..nq {
                        let li = (b * heads_q + h) * nq + i;
                        let src = ((b * nq + i) * heads_q + h) * d;
                        merge_into_row(
                            &mut o[li * d..(li + 1) * d],
                            &mut l[li],
                            po[src..src + d].iter().map(|x| x.to_f32()),
                            pl[li],
                        );
                    }
                }
            }
        }
        for b in 0..batch {
            for h in 0..heads_q {
                let src = (b * heads_q + h) * nq * d;
                out.store_head_rows(b, 0..nq, h, d, &o[src..src + nq * d]);
            }
        }
        if let Some(lse) = lse {
            lse[..l.len()].copy_from_slice(&l);
        }
        Ok(())
    }
}

/// `[batch, la, row] ++ [batch, lb, row]` along the rows, per batch entry.
pub(crate) fn concat_rows<T: Copy>(
    a: &[T],
    la: usize,
    b: &[T],
    lb: usize,
    batch: usize,
    row: usize,
) -> Vec<T> {
    let mut x = Vec::with_capacity(batch * (la + lb) * row);
    for i in 0..batch {
        x.extend_from_slice(&a[i * la * row..(i + 1) * la * row]);
        x.extend_from_slice(&b[i * lb * row..(i + 1) * lb * row]);
    }
    x
}

impl StarAttention {
    /// The global positions (`context_len + query_len`, which bound every piece's lengths)
    /// within [`crate::gpu::GPU_MAX_POSITIONS`]: both GPU phases run this first.
    fn check_gpu_positions(&self) -> Result<()> {
        crate::gpu::check_gpu_positions(
            "star attention",
            &[("context_len + query_len", self.context_len + self.query_len)],
        )
    }

    /// **Verified on an H200 (2026-12-04).** Phase 1 on the GPU for rank `rank` on `stream` (the
    /// anchor and block K/V are copied into one `[batch, la + lr, heads_kv, head_dim]`
    /// buffer, then one dense call). f16 or bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn context_gpu<T: super::gpu::RingElement>(
        &self,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        rank: usize,
        q: Strided<&cudarc::driver::CudaSlice<T>>,
        anchor_k: &cudarc::driver::CudaSlice<T>,
        anchor_v: &cudarc::driver::CudaSlice<T>,
        k: &cudarc::driver::CudaSlice<T>,
        v: &cudarc::driver::CudaSlice<T>,
        out: Strided<&mut cudarc::driver::CudaSlice<T>>,
        lse: Option<&mut cudarc::driver::CudaSlice<f32>>,
    ) -> Result<()> {
        if rank >= self.world {
            return Err(Error::Shape(format!("star: rank {rank} of {}", self.world)));
        }
        let attn = self.context_attention(rank)?;
        let lr = self.block(rank).len();
        self.check_kv("block", lr, k.len(), v.len())?;
        let (hkv, d) = (self.shape.heads_kv, self.shape.head_dim);
        if rank == 0 {
            let s = Strides::contiguous(lr, hkv, d);
            return attn.forward_gpu::<T, _, _>(
                stream,
                q,
                Strided::new(k, s),
                Strided::new(v, s),
                out,
                lse.map(|l| l as &mut dyn DeviceBufferMut<f32>),
            );
        }
        let la = self.block(0).len();
        self.check_kv("anchor", la, anchor_k.len(), anchor_v.len())?;
        let row = hkv * d;
        let mut kc = stream.alloc_zeros::<T>(self.kv_elems(la + lr))?;
        let mut vc = stream.alloc_zeros::<T>(self.kv_elems(la + lr))?;
        for (src_a, src_b, dst) in [(anchor_k, k, &mut kc), (anchor_v, v, &mut vc)] {
            for b in 0..self.shape.batch {
                let base = b * (la + lr) * row;
                stream.memcpy_dtod(
                    &src_a.slice(b * la * row..(b + 1) * la * row),
                    &mut dst.slice_mut(base..base + la * row),
                )?;
                stream.memcpy_dtod(
                    &src_b.slice(b * lr * row..(b + 1) * lr * row),
                    &mut dst.slice_mut(base + la * row..base + (la + lr) * row),
                )?;
            }
        }
        let s = Strides::contiguous(la + lr, hkv, d);
        attn.forward_gpu::<T, _, _>(
            stream,
            q,
            Strided::new(&kc, s),
            Strided::new(&vc, s),
            out,
            lse.map(|l| l as &mut dyn DeviceBufferMut<f32>),
        )
    }

    /// **Verified on an H200 (2026-12-04).** Phase 2 on the GPU on `stream`, the distributed way on
    /// one device: one dense partial per cached block and one over the query's own K/V, each
    /// merged into an f32 state (`kernels/ring_merge.cu`), written once in `T`. f16 or bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn query_gpu<T: super::gpu::RingElement>(
        &self,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        q: Strided<&cudarc::driver::CudaSlice<T>>,
        k_blocks: &[&cudarc::driver::CudaSlice<T>],
        v_blocks: &[&cudarc::driver::CudaSlice<T>],
        kq: &cudarc::driver::CudaSlice<T>,
        vq: &cudarc::driver::CudaSlice<T>,
        mut out: Strided<&mut cudarc::driver::CudaSlice<T>>,
        lse: Option<&mut cudarc::driver::CudaSlice<f32>>,
    ) -> Result<()> {
        let RingShape {
            heads_kv,
            head_dim: d,
            ..
        } = self.shape;
        let nq = self.query_len;
        let parts = self.query_parts(
            q.extent(),
            (k_blocks, v_blocks),
            (kq, vq),
            out.extent(),
            lse.as_ref().map(|l| l.len()),
            |x| x.len(),
        )?;
        let mut state = super::gpu::MergeState::<T>::new(stream, self.shape, nq, nq)?;
        for (attn, k, v, lk) in parts {
            let s = Strides::contiguous(lk, heads_kv, d);
            state.add_piece(
                stream,
                &attn,
                Strided::new(q.data, q.strides),
                Strided::new(k, s),
                Strided::new(v, s),
                self.shape,
                0,
                nq,
            )?;
        }
        state.finalize(stream, &mut out, lse, self.shape, nq)
    }
}
