//! Merging partial attention results over disjoint key sets (split-KV decode, ring steps,
//! cascades), per `semantics.md`:
//! `lse = M + ln(exp(lse_a - M) + exp(lse_b - M))`, `o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b`
//! with `M = max(lse_a, lse_b)`; two empty rows give `o = 0`, `lse = -inf`.

mod gpu;

use crate::element::Element;
use crate::error::{Error, Result};
use crate::layout::checked_elems;
use crate::softmax::merge_weights;

/// Layout of the partial results being merged:
/// `o: [batch, seqlen, heads, head_dim]` contiguous, `lse: [batch, heads, seqlen]` f32,
/// natural log (the dense kernels' output layout; for a varlen result use `batch = 1`,
/// `seqlen = total_q`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeShape {
    /// Batch entries (1 for a varlen result).
    pub batch: usize,
    /// Query rows per batch entry (`total_q` for a varlen result).
    pub seqlen: usize,
    /// Heads.
    pub heads: usize,
    /// Elements per head vector.
    pub head_dim: usize,
}

/// One partial result: output and its LSE.
#[derive(Debug)]
pub struct Partial<O, L> {
    /// Output, `[batch, seqlen, heads, head_dim]`.
    pub o: O,
    /// Log-sum-exp of the scores (natural log), `[batch, heads, seqlen]`, f32.
    pub lse: L,
}

impl MergeShape {
    /// Elements of an `o` buffer; saturates at `usize::MAX` for a shape whose product
    /// overflows (such a shape fails every merge's validation, never wraps around).
    pub fn o_len(&self) -> usize {
        checked_elems(&[self.batch, self.seqlen, self.heads, self.head_dim], "")
            .unwrap_or(usize::MAX)
    }
    /// Values of an `lse` buffer (saturating like [`MergeShape::o_len`]).
    pub fn lse_len(&self) -> usize {
        checked_elems(&[self.batch, self.heads, self.seqlen], "").unwrap_or(usize::MAX)
    }

    pub(crate) fn check(&self, name: &str, o_len: usize, lse_len: usize) -> Result<()> {
        if self.head_dim == 0 {
            return Err(Error::Shape("merge head_dim must be >= 1".into()));
        }
        if [self.batch, self.seqlen, self.heads, self.head_dim]
            .iter()
            .any(|&x| x > i32::MAX as usize)
        {
            return Err(Error::Shape(format!(
                "merge shape {self:?} must fit in i32"
            )));
        }
        // The products are checked before any length is compared: a wrapped product could
        // otherwise match a small buffer and send the kernel out of bounds.
        checked_elems(
            &[self.batch, self.seqlen, self.heads, self.head_dim],
            "merge o elements",
        )?;
        if o_len != self.o_len() {
            return Err(Error::Shape(format!(
                "{name}.o holds {o_len} elements but [batch, seqlen, heads, head_dim] = {:?} needs {}",
                [self.batch, self.seqlen, self.heads, self.head_dim],
                self.o_len()
            )));
        }
        if lse_len != self.lse_len() {
            return Err(Error::Shape(format!(
                "{name}.lse holds {lse_len} values but [batch, heads, seqlen] needs {}",
                self.lse_len()
            )));
        }
        Ok(())
    }

    /// Every (row `r = b * seqlen + s`, head `h`) in `o` order: the index of its LSE value
    /// and the range of its `head_dim` output elements.
    fn row_heads(&self) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> + '_ {
        let d = self.head_dim;
        (0..self.batch * self.seqlen).flat_map(move |r| {
            let (b, s) = (r / self.seqlen, r % self.seqlen);
            (0..self.heads).map(move |h| {
                let base = (r * self.heads + h) * d;
                ((b * self.heads + h) * self.seqlen + s, base..base + d)
            })
        })
    }

    /// `out = merge(a, b)` on the CPU.
    pub fn merge_cpu<T: Element>(
        &self,
        a: Partial<&[T], &[f32]>,
        b: Partial<&[T], &[f32]>,
        out: Partial<&mut [T], &mut [f32]>,
    ) -> Result<()> {
        self.check("a", a.o.len(), a.lse.len())?;
        self.check("b", b.o.len(), b.lse.len())?;
        self.check("out", out.o.len(), out.lse.len())?;
        if self.o_len() == 0 {
            return Ok(()); // no row holds an element (the row loop would not be bounded)
        }
        for (li, xs) in self.row_heads() {
            let (wa, wb, lse) = merge_weights(a.lse[li], b.lse[li]);
            for x in xs {
                out.o[x] = T::from_f32(wa * a.o[x].to_f32() + wb * b.o[x].to_f32());
            }
            out.lse[li] = lse;
        }
        Ok(())
    }

    /// `acc = merge(acc, part)` in place on the CPU.
    pub fn merge_into_cpu<T: Element>(
        &self,
        acc: Partial<&mut [T], &mut [f32]>,
        part: Partial<&[T], &[f32]>,
    ) -> Result<()> {
        self.check("acc", acc.o.len(), acc.lse.len())?;
        self.check("part", part.o.len(), part.lse.len())?;
        if self.o_len() == 0 {
            return Ok(()); // no row holds an element (the row loop would not be bounded)
        }
        for (li, xs) in self.row_heads() {
            let (wa, wb, lse) = merge_weights(acc.lse[li], part.lse[li]);
            for x in xs {
                acc.o[x] = T::from_f32(wa * acc.o[x].to_f32() + wb * part.o[x].to_f32());
            }
            acc.lse[li] = lse;
        }
        Ok(())
    }
}
