//! Tensor layouts: element strides over a flat buffer, and sequence lengths (fixed or
//! packed "varlen"). Validation here is shared by the CPU and GPU paths.

use crate::element::Element;
use crate::error::{Error, Result};
use std::ops::Range;

/// Element strides of a `[batch, seq, heads, head_dim]` tensor; the head_dim stride is 1.
/// With varlen lengths the buffer is `[total_tokens, heads, head_dim]` and `batch` is unused.
/// Strides may be 0 (broadcast inputs) but not negative: a negative stride is a `Stride`
/// error (element `[0, 0, 0, 0]` is the start of the buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Strides {
    /// Elements between consecutive batch entries (unused with varlen).
    pub batch: i64,
    /// Elements between consecutive tokens.
    pub seq: i64,
    /// Elements between consecutive heads.
    pub head: i64,
}

impl Strides {
    /// Strides of a contiguous `[batch, seqlen, heads, head_dim]` tensor. Products that do
    /// not fit in an i64 saturate at `i64::MAX`, which every extent check then refuses
    /// (never a panic or a wrapped stride); [`Strides::try_contiguous`] reports them.
    pub fn contiguous(seqlen: usize, heads: usize, head_dim: usize) -> Self {
        // The exact product (a zero dim makes it 0 whatever the others), then saturated.
        let sat = |dims: &[usize]| -> i64 {
            dims.iter()
                .try_fold(1usize, |acc, &x| acc.checked_mul(x))
                .and_then(|n| i64::try_from(n).ok())
                .unwrap_or(i64::MAX)
        };
        Strides {
            batch: sat(&[seqlen, heads, head_dim]),
            seq: sat(&[heads, head_dim]),
            head: sat(&[head_dim]),
        }
    }

    /// [`Strides::contiguous`], with a `Shape` error where a stride does not fit in an i64.
    pub fn try_contiguous(seqlen: usize, heads: usize, head_dim: usize) -> Result<Self> {
        checked_elems(&[seqlen, heads, head_dim], "contiguous strides")?;
        checked_elems(&[heads, head_dim], "contiguous seq stride")?;
        Ok(Self::contiguous(seqlen, heads, head_dim))
    }

    /// Element offset of `[b, row, head, 0]` (strides are validated non-negative first).
    pub(crate) fn offset(&self, b: usize, row: usize, head: usize) -> usize {
        (b as i64 * self.batch + row as i64 * self.seq + head as i64 * self.head) as usize
    }
}

/// A tensor argument: a buffer (host slice or device slice) and its strides.
#[derive(Debug)]
pub struct Strided<D> {
    /// The buffer, starting at element `[0, 0, 0, 0]`.
    pub data: D,
    /// Element strides of the tensor in `data`.
    pub strides: Strides,
}

impl<D> Strided<D> {
    /// Pairs a buffer with its strides (checked when a forward pass takes it).
    pub fn new(data: D, strides: Strides) -> Self {
        Strided { data, strides }
    }

    /// `(elements, strides)`: the buffer's length and the strides, as the argument checks
    /// take them.
    pub(crate) fn extent(&self) -> (usize, &Strides)
    where
        D: std::ops::Deref<Target: crate::gpu::Elements>,
    {
        use crate::gpu::Elements;
        (self.data.elements(), &self.strides)
    }
}

impl<T: Element> Strided<&[T]> {
    /// Rows `rows` of head `head` of batch entry `b` as f32, `[rows.len(), head_dim]` (the
    /// CPU paths' working copy of one (sequence, head)).
    pub(crate) fn head_rows_f32(
        &self,
        b: usize,
        rows: Range<usize>,
        head: usize,
        head_dim: usize,
    ) -> Vec<f32> {
        let mut buf = Vec::with_capacity(rows.len() * head_dim);
        for row in rows {
            let off = self.strides.offset(b, row, head);
            buf.extend(self.data[off..off + head_dim].iter().map(|x| x.to_f32()));
        }
        buf
    }
}

impl<T: Element> Strided<&mut [T]> {
    /// Writes `src: [rows.len(), head_dim]` (f32) into rows `rows` of head `head` of batch
    /// entry `b`.
    pub(crate) fn store_head_rows(
        &mut self,
        b: usize,
        rows: Range<usize>,
        head: usize,
        head_dim: usize,
        src: &[f32],
    ) {
        for (row, x) in rows.zip(src.chunks_exact(head_dim)) {
            let off = self.strides.offset(b, row, head);
            for (y, &v) in self.data[off..off + head_dim].iter_mut().zip(x) {
                *y = T::from_f32(v);
            }
        }
    }
}

/// Sequence lengths of a batch.
#[derive(Debug, Clone, Copy)]
pub enum SeqLens<'a> {
    /// Every sequence has `seqlen_q` queries and `seqlen_k` keys.
    Fixed {
        /// Queries per sequence.
        seqlen_q: usize,
        /// Keys per sequence.
        seqlen_k: usize,
    },
    /// Packed batch: sequence `b` holds rows `cu[b]..cu[b + 1]` of a `[total, heads, dim]`
    /// buffer. Both arrays have length `batch + 1`, start at 0 and never decrease.
    Varlen {
        /// Cumulative query lengths, `batch + 1` values.
        cu_seqlens_q: &'a [i32],
        /// Cumulative key lengths, `batch + 1` values.
        cu_seqlens_k: &'a [i32],
    },
}

/// Per-sequence placement: the first packed row and the length, for q and for k.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSpan {
    /// First query row of the sequence in the packed buffer (0 with fixed lengths).
    pub q_start: usize,
    /// Queries in the sequence.
    pub seqlen_q: usize,
    /// First key row of the sequence in the packed buffer (0 with fixed lengths).
    pub k_start: usize,
    /// Keys in the sequence.
    pub seqlen_k: usize,
}

/// The one element-count helper: the product of `dims`, or a `Shape` error naming `what`
/// when it overflows or exceeds `i64::MAX` (the kernels index elements with i64).
pub(crate) fn checked_elems(dims: &[usize], what: &str) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &x| acc.checked_mul(x))
        .filter(|&n| n <= i64::MAX as usize)
        .ok_or_else(|| {
            Error::Shape(format!(
                "{what}: the product of {dims:?} does not fit in an i64 element index"
            ))
        })
}

pub(crate) fn check_cu_seqlens(cu: &[i32], batch: usize, name: &str) -> Result<()> {
    if batch.checked_add(1) != Some(cu.len()) {
        return Err(Error::Index(format!(
            "{name} has length {} but batch + 1 (batch = {batch}) was expected",
            cu.len(),
        )));
    }
    if cu[0] != 0 {
        return Err(Error::Index(format!("{name}[0] = {} but must be 0", cu[0])));
    }
    if let Some(b) = cu.windows(2).position(|w| w[1] < w[0]) {
        return Err(Error::Index(format!(
            "{name} decreases at index {}: {} > {}",
            b + 1,
            cu[b],
            cu[b + 1]
        )));
    }
    Ok(())
}

/// Checks that every element of a `[outer, seq, heads, head_dim]` view lies inside a buffer of
/// `len` elements. `outer` is the batch for fixed lengths and 1 for packed (varlen) buffers.
pub(crate) fn check_extent(
    name: &str,
    strides: &Strides,
    dims: [usize; 4],
    len: usize,
) -> Result<()> {
    let [outer, seq, heads, head_dim] = dims;
    for (s, n) in [
        (strides.batch, "batch"),
        (strides.seq, "seq"),
        (strides.head, "head"),
    ] {
        if s < 0 {
            return Err(Error::Stride(format!(
                "{name} {n} stride is {s}; negative strides are not supported"
            )));
        }
    }
    if dims.contains(&0) {
        return Ok(());
    }
    let last = (outer as i128 - 1) * strides.batch as i128
        + (seq as i128 - 1) * strides.seq as i128
        + (heads as i128 - 1) * strides.head as i128
        + head_dim as i128
        - 1;
    if last >= len as i128 {
        return Err(Error::Shape(format!(
            "{name} reaches element {last} (dims {dims:?}, strides {strides:?}) but its \
             buffer holds {len} elements"
        )));
    }
    Ok(())
}

/// The head layout every attention problem checks: `batch`, `heads_q`, `heads_kv` and
/// `head_dim` at least 1, and `heads_q` a multiple of `heads_kv` (GQA/MQA). `family` starts
/// the messages.
pub(crate) fn check_heads(
    family: &str,
    batch: usize,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
) -> Result<()> {
    if batch == 0 || heads_q == 0 || heads_kv == 0 || head_dim == 0 {
        return Err(Error::Shape(format!(
            "{family}batch ({batch}), heads_q ({heads_q}), heads_kv ({heads_kv}) and head_dim \
             ({head_dim}) must all be >= 1"
        )));
    }
    if !heads_q.is_multiple_of(heads_kv) {
        return Err(Error::Shape(format!(
            "{family}GQA needs heads_q % heads_kv == 0, got heads_q = {heads_q}, heads_kv = \
             {heads_kv}"
        )));
    }
    Ok(())
}

/// The checks every attention call runs on its tensor arguments (`(elements, strides)` of q,
/// k, v and out): each covers its dims (`q_dims` for q and out, `kv_dims` for k and v), out
/// does not overlap itself, and the LSE buffer, when given as `(elements, needed, layout)`,
/// is long enough. `tag` follows the argument names in messages (e.g. `"[2]"` for rank 2).
pub(crate) fn check_attention_args(
    tag: &str,
    [q, k, v, out]: [(usize, &Strides); 4],
    q_dims: [usize; 4],
    kv_dims: [usize; 4],
    lse: Option<(usize, usize, &str)>,
) -> Result<()> {
    check_extent(&format!("q{tag}"), q.1, q_dims, q.0)?;
    check_extent(&format!("k{tag}"), k.1, kv_dims, k.0)?;
    check_extent(&format!("v{tag}"), v.1, kv_dims, v.0)?;
    check_extent(&format!("out{tag}"), out.1, q_dims, out.0)?;
    check_no_overlap(&format!("out{tag}"), out.1, q_dims, out.0)?;
    if let Some((have, need, layout)) = lse
        && have < need
    {
        return Err(Error::Shape(format!(
            "lse{tag} holds {have} values but {layout} needs {need}"
        )));
    }
    Ok(())
}

/// Checks that no two elements of an output view share an address (a written tensor must
/// not overlap itself). Exact: any layout whose rows are disjoint is accepted, including
/// disjoint interleaved views of one buffer.
///
/// Fast path: sorted by stride, each stride covers the extent of the dims inside it (nested
/// strides, every usual layout). Otherwise the rows are checked one by one: after the extent
/// check every element lies in `0..len`, so more than `len / head_dim` rows must collide
/// (pigeonhole); up to that bound the row starts are sorted and must be `head_dim` apart, in
/// memory no larger than the buffer the caller passed.
pub(crate) fn check_no_overlap(
    name: &str,
    strides: &Strides,
    dims: [usize; 4],
    len: usize,
) -> Result<()> {
    let [outer, seq, heads, head_dim] = dims;
    if dims.contains(&0) {
        return Ok(()); // no element, nothing can overlap
    }
    let mut axes: Vec<(i64, usize)> = [
        (strides.batch, outer),
        (strides.seq, seq),
        (strides.head, heads),
    ]
    .into_iter()
    .filter(|&(_, n)| n > 1)
    .collect();
    axes.sort();
    let mut extent = head_dim as i64;
    let nested = axes.iter().all(|&(stride, n)| {
        let ok = stride >= extent;
        extent = extent.saturating_add(stride.saturating_mul(n as i64 - 1));
        ok
    });
    if nested {
        return Ok(());
    }
    let overlap = || {
        Err(Error::Stride(format!(
            "{name} strides {strides:?} make elements overlap for dims {dims:?}; an output \
             must not alias itself"
        )))
    };
    let rows = outer.saturating_mul(seq).saturating_mul(heads);
    if rows.saturating_mul(head_dim) > len {
        return overlap();
    }
    let mut starts: Vec<usize> = Vec::with_capacity(rows);
    for b in 0..outer {
        for s in 0..seq {
            for h in 0..heads {
                starts.push(strides.offset(b, s, h));
            }
        }
    }
    starts.sort_unstable();
    if starts.windows(2).any(|w| w[1] - w[0] < head_dim) {
        return overlap();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_and_overlap() {
        let s = Strides::contiguous(4, 2, 8);
        assert!(check_extent("q", &s, [3, 4, 2, 8], 3 * 64).is_ok());
        assert!(check_extent("q", &s, [3, 4, 2, 8], 3 * 64 - 1).is_err());
        assert!(check_no_overlap("o", &s, [3, 4, 2, 8], 3 * 64).is_ok());
        let bad = Strides {
            batch: 64,
            seq: 16,
            head: 4,
        };
        assert!(check_no_overlap("o", &bad, [3, 4, 2, 8], 1000).is_err());
        // Disjoint but not nested: rows of head 1 sit between rows of head 0.
        let interleaved = Strides {
            batch: 0,
            seq: 16,
            head: 24,
        };
        assert!(check_no_overlap("o", &interleaved, [1, 3, 2, 8], 64).is_ok());
        let clash = Strides {
            batch: 0,
            seq: 16,
            head: 20,
        };
        assert!(check_no_overlap("o", &clash, [1, 3, 2, 8], 64).is_err());
        let neg = Strides {
            batch: -1,
            seq: 16,
            head: 8,
        };
        assert!(check_extent("q", &neg, [3, 4, 2, 8], 1000).is_err());
    }

    #[test]
    fn cu_seqlens_checks() {
        assert!(check_cu_seqlens(&[0, 3, 3, 7], 3, "cu").is_ok());
        assert!(check_cu_seqlens(&[0, 3, 7], 3, "cu").is_err());
        assert!(check_cu_seqlens(&[1, 3, 3, 7], 3, "cu").is_err());
        assert!(check_cu_seqlens(&[0, 3, 2, 7], 3, "cu").is_err());
    }
}
