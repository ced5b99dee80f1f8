//! The inputs of a ring test (`ring.rs`, `ring_gpu.rs`; the shape also `star.rs`,
//! `ring_plan.rs`): random q, k, v over the whole
//! sequence and its single-call dense definition.

use super::{random_vec, rng};
use longattn::{
    AttentionOptions, AttentionShape, Element, FlashAttention, RingLayout, RingShape, SeqLens,
    Strides,
};

/// Whole-sequence inputs: `q: [batch, s, heads_q, d]`, `k, v: [batch, s, heads_kv, d]`
/// contiguous (strides `qs`, `ks`), and `dense`, the same problem as one call.
pub struct RingInputs<T> {
    pub q: Vec<T>,
    pub k: Vec<T>,
    pub v: Vec<T>,
    pub dense: FlashAttention,
    pub qs: Strides,
    pub ks: Strides,
}

/// A [`RingShape`] in field order: batch, heads_q, heads_kv, head_dim.
pub fn ring_shape(batch: usize, heads_q: usize, heads_kv: usize, head_dim: usize) -> RingShape {
    RingShape {
        batch,
        heads_q,
        heads_kv,
        head_dim,
    }
}

/// Random q, k, v (seeded, drawn in that order) for `shape` over `layout.seqlen()` tokens,
/// with the dense definition under `opts`.
pub fn ring_inputs<T: Element>(
    layout: RingLayout,
    shape: RingShape,
    opts: &AttentionOptions,
    seed: u64,
) -> RingInputs<T> {
    let RingShape {
        batch,
        heads_q,
        heads_kv,
        head_dim: d,
    } = shape;
    let s = layout.seqlen();
    let mut r = rng(seed);
    let q: Vec<T> = random_vec(&mut r, batch * s * heads_q * d);
    let k: Vec<T> = random_vec(&mut r, batch * s * heads_kv * d);
    let v: Vec<T> = random_vec(&mut r, batch * s * heads_kv * d);
    let dense = FlashAttention::new(
        &AttentionShape {
            batch,
            heads_q,
            heads_kv,
            head_dim: d,
            seqlens: SeqLens::Fixed {
                seqlen_q: s,
                seqlen_k: s,
            },
        },
        opts,
    )
    .unwrap();
    let (qs, ks) = (
        Strides::contiguous(s, heads_q, d),
        Strides::contiguous(s, heads_kv, d),
    );
    RingInputs {
        q,
        k,
        v,
        dense,
        qs,
        ks,
    }
}
