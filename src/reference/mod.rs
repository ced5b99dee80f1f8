//! Naive references in f64: the oracles every kernel and the CPU fallback are checked
//! against. They favour obviousness over speed: two passes per row, every key tested
//! against the mask, no tiling.

pub mod block_sparse;
pub mod dense;
pub mod dense_fp8;
pub mod neighborhood;
pub mod paged;

pub use block_sparse::block_sparse_attention_f64;
pub use dense::dense_attention_f64;
pub use dense_fp8::{Fp8PRule, dense_fp8_attention_f64};
pub use neighborhood::neighborhood_attention_f64;

use crate::dense::FlashAttention;
use crate::element::Element;
use crate::error::Result;
use crate::layout::{Strided, Strides};

/// The references' output strides for `attn` (contiguous `[batch, seqlen_q, heads_q,
/// head_dim]`, batch stride 0 with varlen), once `q`, `k`, `v` passed the CPU path's
/// argument checks against them.
pub(crate) fn checked_out_strides<T>(
    attn: &FlashAttention,
    q: &Strided<&[T]>,
    k: &Strided<&[T]>,
    v: &Strided<&[T]>,
) -> Result<Strides> {
    let mut out = Strides::contiguous(attn.max_seqlen_q(), attn.heads_q(), attn.head_dim());
    if attn.is_varlen() {
        out.batch = 0;
    }
    let out_extent = (attn.out_len(), &out);
    attn.check_buffers(q.extent(), k.extent(), v.extent(), out_extent, None)?;
    Ok(out)
}

/// One query row `q` over keys `0..n`, two passes in f64: `key(j)` is key `j`'s row, or
/// `None` where the mask hides it; `value(j)` its value row. Adds the normalised output into
/// `out` (left untouched for a row with no visible key) and returns the natural-log LSE
/// (`-inf` for an empty row).
pub(crate) fn attend_row<'a, T: Element>(
    q: &[T],
    n: usize,
    key: impl Fn(usize) -> Option<&'a [T]>,
    value: impl Fn(usize) -> &'a [T],
    scale: f64,
    softcap: Option<f32>,
    out: &mut [f64],
) -> f64 {
    attend_row_dequant(q, n, key, value, (1.0, 1.0), scale, softcap, out)
}

/// [`attend_row`] over stored keys and values of another element type `C` that mean
/// `stored * kv_scale.0` (keys) and `stored * kv_scale.1` (values): an FP8 cache.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_row_dequant<'a, T: Element, C: Element>(
    q: &[T],
    n: usize,
    key: impl Fn(usize) -> Option<&'a [C]>,
    value: impl Fn(usize) -> &'a [C],
    (k_scale, v_scale): (f64, f64),
    scale: f64,
    softcap: Option<f32>,
    out: &mut [f64],
) -> f64 {
    let scores: Vec<Option<f64>> = (0..n)
        .map(|j| {
            key(j).map(|k| {
                let dot: f64 = q
                    .iter()
                    .zip(k)
                    .map(|(a, b)| a.to_f64() * (b.to_f64() * k_scale))
                    .sum();
                match softcap {
                    Some(cap) => cap as f64 * (dot * scale / cap as f64).tanh(),
                    None => dot * scale,
                }
            })
        })
        .collect();
    // NaN policy (docs/semantics.md): a NaN score of a visible key makes the row NaN.
    if scores.iter().flatten().any(|s| s.is_nan()) {
        out.iter_mut().for_each(|o| *o = f64::NAN);
        return f64::NAN;
    }
    let m = scores
        .iter()
        .flatten()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let l: f64 = scores.iter().flatten().map(|s| (s - m).exp()).sum();
    for (j, s) in scores.iter().enumerate() {
        if let Some(s) = s {
            let p = (s - m).exp() / l;
            for (acc, x) in out.iter_mut().zip(value(j)) {
                *acc += p * (x.to_f64() * v_scale);
            }
        }
    }
    m + l.ln()
}
