//! Two-pass f64 dense attention over every key (no tile skipping).

use crate::dense::FlashAttention;
use crate::element::Element;
use crate::error::Result;
use crate::layout::Strided;
use crate::reference::{attend_row, checked_out_strides};

/// Reference output of `attn`: `out` contiguous `[rows, heads_q, head_dim]` (rows =
/// `batch * seqlen_q`, or `total_q` with varlen) and LSE in the problem's LSE layout.
/// Empty rows give 0 and `-inf`.
pub fn dense_attention_f64<T: Element>(
    attn: &FlashAttention,
    q: Strided<&[T]>,
    k: Strided<&[T]>,
    v: Strided<&[T]>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let out_strides = checked_out_strides(attn, &q, &k, &v)?;
    let d = attn.head_dim();
    let mut out = vec![0.0f64; attn.out_len()];
    let mut lse = vec![f64::NEG_INFINITY; attn.lse_len()];
    let scale = attn.scale() as f64;
    let mask = attn.mask();
    // Only sequences with query rows: an empty one has nothing to compute, however many
    // heads (or, fixed-length, sequences) the problem declares.
    for (b, span) in attn.spans_with_rows() {
        let (sq, sk) = (span.seqlen_q, span.seqlen_k);
        let bb = attn.batch_entry(b);
        for h in 0..attn.heads_q() {
            let kvh = attn.kv_head(h);
            for i in 0..sq {
                let qo = q.strides.offset(bb, span.q_start + i, h);
                let qi = &q.data[qo..qo + d];
                let oo = out_strides.offset(bb, span.q_start + i, h);
                let (kd, vd) = (k.data, v.data);
                let key_at = |j: usize| k.strides.offset(bb, span.k_start + j, kvh);
                let value_at = |j: usize| v.strides.offset(bb, span.k_start + j, kvh);
                lse[attn.lse_index(b, h, i)] = attend_row(
                    qi,
                    sk,
                    |j| {
                        mask.visible(i, j, sq, sk)
                            .then(|| &kd[key_at(j)..key_at(j) + d])
                    },
                    |j| &vd[value_at(j)..value_at(j) + d],
                    scale,
                    attn.softcap(),
                    &mut out[oo..oo + d],
                );
            }
        }
    }
    Ok((out, lse))
}
