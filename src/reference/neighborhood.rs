//! Two-pass f64 neighborhood attention: every query over the keys of its neighborhood
//! ([`NeighborhoodAttention::neighbors`]), no tiling.

use crate::element::Element;
use crate::error::Result;
use crate::layout::{Strided, Strides, check_attention_args};
use crate::neighborhood::NeighborhoodAttention;
use crate::reference::attend_row;

/// Reference output of `na`: `out` contiguous `[batch, tokens, heads_q, head_dim]` and LSE
/// `[batch, heads_q, tokens]` (natural log).
pub fn neighborhood_attention_f64<T: Element>(
    na: &NeighborhoodAttention,
    q: Strided<&[T]>,
    k: Strided<&[T]>,
    v: Strided<&[T]>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (b, n, hq, hkv, d) = (
        na.batch(),
        na.tokens(),
        na.heads_q(),
        na.heads_kv(),
        na.head_dim(),
    );
    let out_strides = Strides::contiguous(n, hq, d);
    check_attention_args(
        "",
        [
            q.extent(),
            k.extent(),
            v.extent(),
            (na.out_len(), &out_strides),
        ],
        [b, n, hq, d],
        [b, n, hkv, d],
        None,
    )?;
    let mut out = vec![0.0f64; na.out_len()];
    let mut lse = vec![f64::NEG_INFINITY; na.lse_len()];
    for bb in 0..b {
        for t in 0..n {
            let keys: Vec<usize> = na.neighbors(t)?.collect();
            for h in 0..hq {
                let kvh = h / (hq / hkv);
                let qo = q.strides.offset(bb, t, h);
                let oo = out_strides.offset(bb, t, h);
                let at = |x: &Strided<&[T]>, j: usize| x.strides.offset(bb, keys[j], kvh);
                lse[(bb * hq + h) * n + t] = attend_row(
                    &q.data[qo..qo + d],
                    keys.len(),
                    |j| Some(&k.data[at(&k, j)..at(&k, j) + d]),
                    |j| &v.data[at(&v, j)..at(&v, j) + d],
                    na.scale() as f64,
                    na.softcap(),
                    &mut out[oo..oo + d],
                );
            }
        }
    }
    Ok((out, lse))
}
