//! Two-pass f64 block-sparse attention, written from the definition in `block_sparse`:
//! key `j` is visible to row `i` iff its key block is listed for `i`'s query block (and, with
//! a per-row selection, in `i`'s own list) and the block is `Full` or the element mask shows
//! `(i, j)`. Every key of every row is tested; no tile skipping.

use crate::block_sparse::{BlockKind, BlockSparseAttention};
use crate::element::Element;
use crate::error::Result;
use crate::layout::Strided;
use crate::reference::{attend_row, checked_out_strides};

/// Reference output of `bs`: `out` contiguous `[rows, heads_q, head_dim]` (rows =
/// `batch * seqlen_q`, or `total_q` with varlen) and LSE in the problem's LSE layout.
/// Empty rows give 0 and `-inf`.
pub fn block_sparse_attention_f64<T: Element>(
    bs: &BlockSparseAttention,
    q: Strided<&[T]>,
    k: Strided<&[T]>,
    v: Strided<&[T]>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let attn = bs.attention();
    let out_strides = checked_out_strides(attn, &q, &k, &v)?;
    let d = attn.head_dim();
    let dims = bs.block_mask().dims();
    let mut out = vec![0.0f64; attn.out_len()];
    let mut lse = vec![f64::NEG_INFINITY; attn.lse_len()];
    let mask = attn.mask();
    // Only sequences with query rows: an empty one has nothing to compute, however many
    // heads (or, fixed-length, sequences) the problem declares.
    for (b, span) in attn.spans_with_rows() {
        let (sq, sk) = (span.seqlen_q, span.seqlen_k);
        let bb = attn.batch_entry(b);
        for h in 0..attn.heads_q() {
            let kvh = attn.kv_head(h);
            for i in 0..sq {
                // kind[kb]: how key block kb is listed for row i's query block, if at all.
                let mut kind = vec![None; dims.num_k_blocks];
                for (kb, kd) in bs.block_mask().bound_list(b, h, i / dims.block_m).iter() {
                    kind[kb] = Some(kd);
                }
                let row = attn.lse_index(b, h, i);
                if let Some(rows) = bs.row_blocks() {
                    let own = rows.row_at(row);
                    for (kb, slot) in kind.iter_mut().enumerate() {
                        if !own.contains(&(kb as i32)) {
                            *slot = None;
                        }
                    }
                }
                let visible = |j: usize| match kind[j / dims.block_n] {
                    Some(BlockKind::Full) => true,
                    Some(BlockKind::Partial) => mask.visible(i, j, sq, sk),
                    None => false,
                };
                let qo = q.strides.offset(bb, span.q_start + i, h);
                let oo = out_strides.offset(bb, span.q_start + i, h);
                let key_at = |j: usize| k.strides.offset(bb, span.k_start + j, kvh);
                let value_at = |j: usize| v.strides.offset(bb, span.k_start + j, kvh);
                lse[row] = attend_row(
                    &q.data[qo..qo + d],
                    sk,
                    |j| visible(j).then(|| &k.data[key_at(j)..key_at(j) + d]),
                    |j| &v.data[value_at(j)..value_at(j) + d],
                    attn.scale() as f64,
                    attn.softcap(),
                    &mut out[oo..oo + d],
                );
            }
        }
    }
    Ok((out, lse))
}
