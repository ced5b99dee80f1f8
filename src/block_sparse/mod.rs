//! Block-sparse attention (issue 15): attention computed only on listed blocks of the score
//! matrix, as FlexAttention's `BlockMask` and FlashInfer's BSR prefill do.
//!
//! A [`BlockMask`] holds, for each (batch, query head, query block), the sorted list of key
//! blocks to visit in CSR form (offsets + indices), each entry marked [`BlockKind::Full`] or
//! [`BlockKind::Partial`]. Query blocks are `block_m` query rows, key blocks `block_n` keys,
//! counted from row 0 and key 0 of each sequence (the last block of each may be short).
//!
//! Visibility of key `j` for query row `i` (query block `i / block_m`, key block
//! `j / block_n`), with the problem's element mask `mask` (window, sinks, causal):
//! - the key block is not listed for the query block: hidden;
//! - listed as `Full`: visible (the element mask is **not** applied: FlexAttention's
//!   "full blocks skip `mask_mod`"; the pattern constructors mark a block full only when every
//!   element of it is visible under the options' mask, so for them `Full` is a pure hint);
//! - listed as `Partial`: visible iff `mask.visible(i, j)`;
//! - with a per-row selection ([`RowBlocks`], MoBA), the key block must also be in row `i`'s
//!   own list; the selection filters blocks and does not change `Full`/`Partial`.
//!
//! A row with no visible key gives output 0 and LSE `-inf`, as everywhere in the crate.
//!
//! The CPU path here and `reference::block_sparse_attention_f64` implement exactly this; the
//! GPU path ([`BlockSparseAttention::forward_gpu`], explicit opt-in, **verified on an H200
//! (2026-12-04)**) iterates the same lists as the key-tile schedule of the shared tensor-core
//! mainloop (`kernels/block_sparse_mma.cu`); [`BlockSparseKernel::Hopper`] (explicit opt-in,
//! **not yet run on a GPU**) runs the same lists on the Hopper wgmma mainloop
//! (`kernels/block_sparse_wgmma.cu`). MoBA's per-row selections run on the GPU only
//! through [`moba::MobaGpuPlan`] (gating and per-row-masked attention on device buffers,
//! `kernels/moba.cu`, **not yet run on a GPU**; the opt-in gather attention,
//! [`moba::MobaAttention::Gather`], `kernels/moba_gather.cu`, likewise); attached to a [`BlockSparseAttention`] they
//! run on the CPU.

mod gpu;
pub mod moba;
mod moba_gather;
mod moba_gpu;
pub mod patterns;

pub use gpu::{
    BlockSparseGpuPlan, GPU_HEAD_DIMS, HOPPER_BLOCK_M_MULTIPLE, hopper_block_n_multiple,
};

use crate::dense::{CPU_TILE_M, CPU_TILE_N, FlashAttention};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::layout::Strided;
use crate::mask::Mask;
use crate::softmax::OnlineSoftmaxBlock;
use rayon::prelude::*;
use std::fmt;
use std::ops::Range;

/// Default query and key block size in tokens (FlexAttention's and FlashInfer's default).
pub const DEFAULT_BLOCK: usize = 128;
/// Block sizes the GPU kernel accepts are multiples of this (the CPU path and the
/// reference accept any block size >= 1).
pub const GPU_BLOCK_MULTIPLE: usize = 64;
/// Upper bound on the number of lists and of listed blocks: offsets and indices are `i32`
/// (the C ABI of the kernels).
pub const MAX_BLOCK_ENTRIES: usize = i32::MAX as usize;

/// How the element mask applies inside a listed key block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockKind {
    /// Every element of the block is visible; the options' mask is not applied.
    Full,
    /// The options' element mask (causal, window, sinks) applies inside the block.
    Partial,
}

/// One list of a [`BlockMask`]: (batch entry, query head, query block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListId {
    /// Batch entry (0 when the mask broadcasts over the batch).
    pub batch: usize,
    /// Query head (0 when the mask broadcasts over the heads).
    pub head: usize,
    /// Query block index.
    pub q_block: usize,
}

impl fmt::Display for ListId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "(batch {}, head {}, query block {})",
            self.batch, self.head, self.q_block
        )
    }
}

/// Named errors of block masks and per-row selections. Converts into
/// [`Error::Index`] (or [`Error::InvalidOption`] for option values) for `?`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockMaskError {
    /// A block size, count or `top_k` is out of its domain.
    #[error("block mask: {name} = {value} {why}")]
    BadDim {
        /// Name of the offending parameter.
        name: &'static str,
        /// Its value.
        value: usize,
        /// Why the value is rejected.
        why: &'static str,
    },
    /// The number of lists or listed blocks does not fit in `i32`.
    #[error("block mask: {what} overflows the i32 limit {MAX_BLOCK_ENTRIES}")]
    TooLarge {
        /// What overflowed (lists or listed blocks).
        what: &'static str,
    },
    /// `offsets` does not have one entry per list plus one.
    #[error("block mask: offsets has length {got}, want lists + 1 = {want}")]
    OffsetsLength {
        /// Length of `offsets` given.
        got: usize,
        /// Expected length (number of lists + 1).
        want: usize,
    },
    /// `offsets[0] != 0`, or an offset decreases, or the last one is not `indices.len()`.
    #[error("block mask: offsets[{at}] = {value} is invalid ({why})")]
    BadOffset {
        /// Position in `offsets`.
        at: usize,
        /// The offset found there.
        value: i64,
        /// Why it is invalid.
        why: &'static str,
    },
    /// `full` flags and `indices` differ in length.
    #[error("block mask: {got} full/partial flags for {want} indices")]
    FlagsLength {
        /// Number of `full` flags.
        got: usize,
        /// Number of `indices` (one flag each).
        want: usize,
    },
    /// A key block index is negative or `>= num_k_blocks` (of the mask, or of a varlen
    /// sequence).
    #[error("block mask: list {list} holds key block {index}, outside 0..{num_k_blocks}")]
    IndexOutOfRange {
        /// The list holding the index.
        list: ListId,
        /// The out-of-range key block index.
        index: i64,
        /// Number of key blocks the index must be below.
        num_k_blocks: usize,
    },
    /// A list is not in increasing order.
    #[error("block mask: list {list} is not sorted at position {position}")]
    Unsorted {
        /// The unsorted list.
        list: ListId,
        /// Position within the list where the order breaks.
        position: usize,
    },
    /// A key block appears twice in one list.
    #[error("block mask: list {list} lists key block {index} twice")]
    Duplicate {
        /// The list holding the duplicate.
        list: ListId,
        /// The key block index listed twice.
        index: i64,
    },
    /// A varlen sequence has fewer query blocks than the mask, and a list past its end is
    /// not empty.
    #[error("block mask: list {list} lies past the sequence's last query block but is not empty")]
    ListPastEnd {
        /// The non-empty list past the sequence's end.
        list: ListId,
    },
    /// The mask's dims do not match the attention problem.
    #[error("block mask: {what} = {got} does not match the problem's {want}")]
    Mismatch {
        /// Which dim mismatches.
        what: &'static str,
        /// The mask's value.
        got: usize,
        /// The problem's value.
        want: usize,
    },
    /// A per-row selection is malformed (MoBA's [`RowBlocks`]).
    #[error("row selection: row {row}: {why}")]
    BadRow {
        /// LSE row index of the malformed list.
        row: usize,
        /// What is wrong with it.
        why: String,
    },
}

impl From<BlockMaskError> for Error {
    fn from(e: BlockMaskError) -> Self {
        match e {
            BlockMaskError::BadDim { .. } => Error::InvalidOption(e.to_string()),
            BlockMaskError::Mismatch { .. } | BlockMaskError::TooLarge { .. } => {
                Error::Shape(e.to_string())
            }
            _ => Error::Index(e.to_string()),
        }
    }
}

/// Shape of a [`BlockMask`]: `batch x heads x num_q_blocks` lists over `num_k_blocks` key
/// blocks. `batch` and `heads` may be 1 to broadcast one set of lists over every batch entry
/// or every query head (as FlexAttention's `B = 1` / `H = 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockMaskDims {
    /// Batch entries (1 broadcasts over the batch).
    pub batch: usize,
    /// Query heads (1 broadcasts over the heads).
    pub heads: usize,
    /// Query blocks per sequence (lists per (batch, head)).
    pub num_q_blocks: usize,
    /// Key blocks per sequence (key block indices lie in `0..num_k_blocks`).
    pub num_k_blocks: usize,
    /// Query rows per query block.
    pub block_m: usize,
    /// Keys per key block.
    pub block_n: usize,
}

impl BlockMaskDims {
    /// Dims covering `seqlen_q` x `seqlen_k` with the given block sizes (the block counts
    /// round up: the last block of each side may be short).
    pub fn for_lengths(
        batch: usize,
        heads: usize,
        seqlen_q: usize,
        seqlen_k: usize,
        block_m: usize,
        block_n: usize,
    ) -> Result<Self, BlockMaskError> {
        for (name, value) in [("block_m", block_m), ("block_n", block_n)] {
            if value == 0 {
                return Err(BlockMaskError::BadDim {
                    name,
                    value,
                    why: "must be >= 1",
                });
            }
        }
        let dims = BlockMaskDims {
            batch,
            heads,
            num_q_blocks: seqlen_q.div_ceil(block_m),
            num_k_blocks: seqlen_k.div_ceil(block_n),
            block_m,
            block_n,
        };
        dims.check()?;
        Ok(dims)
    }

    /// Number of lists, checked against [`MAX_BLOCK_ENTRIES`].
    pub fn num_lists(&self) -> Result<usize, BlockMaskError> {
        self.batch
            .checked_mul(self.heads)
            .and_then(|x| x.checked_mul(self.num_q_blocks))
            .filter(|&n| n <= MAX_BLOCK_ENTRIES)
            .ok_or(BlockMaskError::TooLarge {
                what: "the number of lists",
            })
    }

    /// Whether the GPU kernel (opt-in; verified on an H200) takes these block sizes: multiples
    /// of [`GPU_BLOCK_MULTIPLE`]. The CPU path takes any size.
    pub fn check_gpu_block_sizes(&self) -> Result<(), BlockMaskError> {
        for (name, value) in [("block_m", self.block_m), ("block_n", self.block_n)] {
            if value == 0 || !value.is_multiple_of(GPU_BLOCK_MULTIPLE) {
                return Err(BlockMaskError::BadDim {
                    name,
                    value,
                    why: "must be a multiple of 64 for the GPU kernels",
                });
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<(), BlockMaskError> {
        for (name, value) in [
            ("batch", self.batch),
            ("heads", self.heads),
            ("block_m", self.block_m),
            ("block_n", self.block_n),
        ] {
            if value == 0 {
                return Err(BlockMaskError::BadDim {
                    name,
                    value,
                    why: "must be >= 1",
                });
            }
        }
        if self.num_k_blocks > MAX_BLOCK_ENTRIES {
            return Err(BlockMaskError::TooLarge {
                what: "num_k_blocks",
            });
        }
        self.block_m
            .checked_mul(self.num_q_blocks)
            .zip(self.block_n.checked_mul(self.num_k_blocks))
            .ok_or(BlockMaskError::TooLarge {
                what: "block size x block count",
            })?;
        self.num_lists().map(|_| ())
    }

    fn list_id(&self, list: usize) -> ListId {
        let q_block = list % self.num_q_blocks.max(1);
        let bh = list / self.num_q_blocks.max(1);
        ListId {
            batch: bh / self.heads,
            head: bh % self.heads,
            q_block,
        }
    }
}

/// Block-sparse mask in CSR form: list `(b, h, qb)` (row-major over
/// `[batch, heads, num_q_blocks]`) is `indices[offsets[l]..offsets[l + 1]]`, strictly
/// increasing key block indices, with `full[e] != 0` marking entry `e` as [`BlockKind::Full`].
/// The arrays are `i32`/`u8` as the kernels will read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMask {
    dims: BlockMaskDims,
    offsets: Vec<i32>,
    indices: Vec<i32>,
    full: Vec<u8>,
}

/// One list of a [`BlockMask`]: key block indices and their kinds.
#[derive(Debug, Clone, Copy)]
pub struct BlockList<'a> {
    /// Key block indices, strictly increasing.
    pub indices: &'a [i32],
    /// Per-index flag: nonzero marks the block [`BlockKind::Full`], 0 [`BlockKind::Partial`].
    pub full: &'a [u8],
}

impl<'a> BlockList<'a> {
    /// Number of listed key blocks.
    pub fn len(&self) -> usize {
        self.indices.len()
    }
    /// Whether the list holds no key block.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
    /// `(key block, kind)` in increasing key block order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, BlockKind)> + 'a {
        self.indices.iter().zip(self.full).map(|(&kb, &f)| {
            let kind = if f != 0 {
                BlockKind::Full
            } else {
                BlockKind::Partial
            };
            (kb as usize, kind)
        })
    }
}

impl BlockMask {
    /// A mask from CSR arrays, validated: `offsets` has `lists + 1` entries, starts at 0,
    /// never decreases and ends at `indices.len()`; every list is strictly increasing
    /// (unsorted and duplicated entries are distinct errors) and in `0..num_k_blocks`;
    /// `full` has one flag per index. Costs one pass over the arrays and allocates nothing.
    pub fn from_csr(
        dims: BlockMaskDims,
        offsets: Vec<i32>,
        indices: Vec<i32>,
        full: Vec<bool>,
    ) -> Result<Self, BlockMaskError> {
        dims.check()?;
        let lists = dims.num_lists()?;
        if indices.len() > MAX_BLOCK_ENTRIES {
            return Err(BlockMaskError::TooLarge {
                what: "the number of listed blocks",
            });
        }
        if offsets.len() != lists + 1 {
            return Err(BlockMaskError::OffsetsLength {
                got: offsets.len(),
                want: lists + 1,
            });
        }
        if full.len() != indices.len() {
            return Err(BlockMaskError::FlagsLength {
                got: full.len(),
                want: indices.len(),
            });
        }
        if offsets[0] != 0 {
            return Err(BlockMaskError::BadOffset {
                at: 0,
                value: offsets[0] as i64,
                why: "must be 0",
            });
        }
        for (l, w) in offsets.windows(2).enumerate() {
            if w[1] < w[0] {
                return Err(BlockMaskError::BadOffset {
                    at: l + 1,
                    value: w[1] as i64,
                    why: "offsets decrease",
                });
            }
        }
        if offsets[lists] as usize != indices.len() {
            return Err(BlockMaskError::BadOffset {
                at: lists,
                value: offsets[lists] as i64,
                why: "the last offset must equal the number of indices",
            });
        }
        for l in 0..lists {
            let list = &indices[offsets[l] as usize..offsets[l + 1] as usize];
            check_list(list, dims.num_k_blocks, || dims.list_id(l))?;
        }
        let full = full.into_iter().map(u8::from).collect();
        Ok(BlockMask {
            dims,
            offsets,
            indices,
            full,
        })
    }

    /// A mask from a function giving each list as `(key block, kind)` pairs (validated like
    /// [`BlockMask::from_csr`]). Memory grows with the lists produced, not with the dims.
    pub fn from_lists(
        dims: BlockMaskDims,
        mut list: impl FnMut(ListId) -> Vec<(usize, BlockKind)>,
    ) -> Result<Self, BlockMaskError> {
        Self::try_from_lists(dims, |id| Ok(list(id)))
    }

    /// [`BlockMask::from_lists`] with lists that may fail: the first error is returned.
    pub(crate) fn try_from_lists(
        dims: BlockMaskDims,
        mut list: impl FnMut(ListId) -> Result<Vec<(usize, BlockKind)>, BlockMaskError>,
    ) -> Result<Self, BlockMaskError> {
        dims.check()?;
        let lists = dims.num_lists()?;
        let mut offsets = vec![0i32];
        let mut indices = Vec::new();
        let mut full = Vec::new();
        let too_large = || BlockMaskError::TooLarge {
            what: "the number of listed blocks",
        };
        for l in 0..lists {
            let id = dims.list_id(l);
            let entries = list(id)?;
            // Within the i32 limit, and grown fallibly (a huge valid mask is an error, not
            // an abort).
            if entries.len() > MAX_BLOCK_ENTRIES - indices.len() {
                return Err(too_large());
            }
            (indices.try_reserve(entries.len()))
                .and_then(|()| full.try_reserve(entries.len()))
                .map_err(|_| too_large())?;
            for (kb, kind) in entries {
                let kb = i32::try_from(kb).map_err(|_| BlockMaskError::IndexOutOfRange {
                    list: id,
                    index: i64::try_from(kb).unwrap_or(i64::MAX),
                    num_k_blocks: dims.num_k_blocks,
                })?;
                indices.push(kb);
                full.push(kind == BlockKind::Full);
            }
            offsets.push(indices.len() as i32);
        }
        Self::from_csr(dims, offsets, indices, full)
    }

    /// Every key block listed for every query block, all of kind `kind` (with `Partial` this
    /// is dense attention under the options' mask).
    pub fn dense(dims: BlockMaskDims, kind: BlockKind) -> Result<Self, BlockMaskError> {
        Self::from_lists(dims, |_| {
            (0..dims.num_k_blocks).map(|kb| (kb, kind)).collect()
        })
    }

    /// The mask's dims.
    pub fn dims(&self) -> BlockMaskDims {
        self.dims
    }
    /// CSR offsets, `[batch * heads * num_q_blocks + 1]`.
    pub fn offsets(&self) -> &[i32] {
        &self.offsets
    }
    /// Key block indices of all lists, concatenated.
    pub fn indices(&self) -> &[i32] {
        &self.indices
    }
    /// One flag per index: 1 = full, 0 = partial.
    pub fn full_flags(&self) -> &[u8] {
        &self.full
    }
    /// Number of listed blocks.
    pub fn nnz(&self) -> usize {
        self.indices.len()
    }
    /// Fraction of (query block, key block) pairs listed, over all lists.
    pub fn density(&self) -> f64 {
        let pairs = self.offsets.len().saturating_sub(1) as f64 * self.dims.num_k_blocks as f64;
        if pairs == 0.0 {
            0.0
        } else {
            self.nnz() as f64 / pairs
        }
    }

    /// The list of (batch entry `b`, query head `h`, query block `qb`); a mask with
    /// `batch == 1` or `heads == 1` serves every `b` or `h`. `None` when out of range.
    pub fn list(&self, b: usize, h: usize, qb: usize) -> Option<BlockList<'_>> {
        let d = self.dims;
        let b = if d.batch == 1 { 0 } else { b };
        let h = if d.heads == 1 { 0 } else { h };
        if b >= d.batch || h >= d.heads || qb >= d.num_q_blocks {
            return None;
        }
        let l = (b * d.heads + h) * d.num_q_blocks + qb;
        let r = self.offsets[l] as usize..self.offsets[l + 1] as usize;
        Some(BlockList {
            indices: &self.indices[r.clone()],
            full: &self.full[r],
        })
    }

    /// The mask in FlexAttention's `BlockMask.from_kv_blocks` form (for benches and
    /// interop): each list split by kind, partial blocks as `kv_num_blocks` / `kv_indices`
    /// and full blocks as `full_kv_num_blocks` / `full_kv_indices`; counts are
    /// `[batch, heads, num_q_blocks]` and indices `[batch, heads, num_q_blocks, num_k_blocks]`
    /// with the unused tail of each row set to 0. Allocates `2 x lists x num_k_blocks` i32:
    /// above [`MAX_BLOCK_ENTRIES`] each (a sparse mask of many lists over many key blocks), or
    /// when that cannot be allocated, [`BlockMaskError::TooLarge`].
    pub fn to_flex_parts(&self) -> Result<FlexParts, BlockMaskError> {
        let nk = self.dims.num_k_blocks;
        let lists = self.offsets.len() - 1;
        let too_large = || BlockMaskError::TooLarge {
            what: "lists x key blocks (FlexAttention's index tensors)",
        };
        let dense_len = lists
            .checked_mul(nk)
            .filter(|&n| n <= MAX_BLOCK_ENTRIES)
            .ok_or_else(too_large)?;
        let zeros = |n: usize| {
            let mut v = Vec::new();
            v.try_reserve_exact(n).map_err(|_| too_large())?;
            v.resize(n, 0i32);
            Ok::<_, BlockMaskError>(v)
        };
        let mut parts = FlexParts {
            kv_num_blocks: zeros(lists)?,
            kv_indices: zeros(dense_len)?,
            full_kv_num_blocks: zeros(lists)?,
            full_kv_indices: zeros(dense_len)?,
        };
        for l in 0..lists {
            for e in self.offsets[l] as usize..self.offsets[l + 1] as usize {
                let (count, indices) = if self.full[e] != 0 {
                    (&mut parts.full_kv_num_blocks, &mut parts.full_kv_indices)
                } else {
                    (&mut parts.kv_num_blocks, &mut parts.kv_indices)
                };
                indices[l * nk + count[l] as usize] = self.indices[e];
                count[l] += 1;
            }
        }
        Ok(parts)
    }

    /// [`BlockMask::list`] for indices a bound problem guarantees in range (its dims were
    /// checked against the problem in [`BlockSparseAttention::new`]).
    pub(crate) fn bound_list(&self, b: usize, h: usize, qb: usize) -> BlockList<'_> {
        self.list(b, h, qb)
            .expect("block mask dims were checked against the problem")
    }
}

/// FlexAttention's four block-mask tensors (see [`BlockMask::to_flex_parts`]), row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlexParts {
    /// Partial-block counts per list, `[batch, heads, num_q_blocks]`.
    pub kv_num_blocks: Vec<i32>,
    /// Partial key block indices, `[batch, heads, num_q_blocks, num_k_blocks]`, unused tail 0.
    pub kv_indices: Vec<i32>,
    /// Full-block counts per list, `[batch, heads, num_q_blocks]`.
    pub full_kv_num_blocks: Vec<i32>,
    /// Full key block indices, `[batch, heads, num_q_blocks, num_k_blocks]`, unused tail 0.
    pub full_kv_indices: Vec<i32>,
}

/// The list entries of key blocks `kbs` (`block_n` keys each) for query rows `rows` of a
/// `sq` x `sk` sequence, in `kbs` order: `(kb, kind)` with the kind of [`classify`], the
/// blocks the element mask hides dropped.
pub(crate) fn classify_blocks(
    mask: &Mask,
    rows: std::ops::Range<usize>,
    kbs: impl IntoIterator<Item = usize>,
    block_n: usize,
    (sq, sk): (usize, usize),
) -> Vec<(usize, BlockKind)> {
    kbs.into_iter()
        .filter_map(|kb| {
            classify(mask, rows.clone(), kb * block_n..(kb + 1) * block_n, sq, sk)
                .map(|kind| (kb, kind))
        })
        .collect()
}

/// How the element mask `mask` covers query rows `rows` x keys `keys` of a `sq` x `sk`
/// sequence: `Full` when every element is visible, `Partial` when some are, `None` when none.
///
/// O(log rows), whatever the block size. Row `i` sees the sink prefix `[0, s(i))` and the
/// window `[lo(i), hi(i))`, all three bounds nondecreasing in `i` and the window one key
/// wider than the previous row's shifted by at most one, so:
/// - some element is visible iff the keys meet the union of the rows' windows (one range,
///   [`Mask::window_range_rows`]) or of their sink prefixes;
/// - a row misses a key iff the sinks leave part of the block (`s(i) < keys.end`: a prefix
///   `P` of the rows) and the window misses that part: `hi(i) < keys.end` (a prefix of the
///   rows) or `lo(i) > max(keys.start, s(i))` (a suffix: false while `lo` is clamped at 0,
///   then `lo` grows by one per row and `s` by at most one). So some row misses a key iff
///   the first row or the last row of `P` does.
fn classify(
    mask: &Mask,
    rows: std::ops::Range<usize>,
    keys: std::ops::Range<usize>,
    sq: usize,
    sk: usize,
) -> Option<BlockKind> {
    let keys = keys.start..keys.end.min(sk);
    if keys.is_empty() || rows.is_empty() {
        return None;
    }
    let meets = |r: std::ops::Range<usize>| r.start < keys.end && keys.start < r.end;
    if !meets(mask.window_range_rows(rows.clone(), sq, sk))
        && !meets(mask.sink_range_rows(rows.clone(), sq, sk))
    {
        return None;
    }
    // The keys of the block that row `i`'s sinks leave to its window.
    let rest = |i: usize| keys.start.max(mask.sink_range_rows(i..i + 1, sq, sk).end)..keys.end;
    let covered = |i: usize| {
        let (rest, w) = (rest(i), mask.window_range(i, sq, sk));
        rest.is_empty() || (w.start <= rest.start && rest.end <= w.end)
    };
    // P = rows[..p]: the rows whose sinks leave part of the block (binary search).
    let (mut lo, mut hi) = (rows.start, rows.end);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match rest(mid).is_empty() {
            true => hi = mid,
            false => lo = mid + 1,
        }
    }
    let all = covered(rows.start) && (lo == rows.start || covered(lo - 1));
    Some(if all {
        BlockKind::Full
    } else {
        BlockKind::Partial
    })
}

/// Checks one list: in range, strictly increasing (unsorted vs duplicate told apart).
fn check_list(
    list: &[i32],
    num_k_blocks: usize,
    id: impl Fn() -> ListId,
) -> Result<(), BlockMaskError> {
    for (p, &kb) in list.iter().enumerate() {
        if kb < 0 || kb as usize >= num_k_blocks {
            return Err(BlockMaskError::IndexOutOfRange {
                list: id(),
                index: kb as i64,
                num_k_blocks,
            });
        }
        if p > 0 {
            let prev = list[p - 1];
            if kb == prev {
                return Err(BlockMaskError::Duplicate {
                    list: id(),
                    index: kb as i64,
                });
            }
            if kb < prev {
                return Err(BlockMaskError::Unsorted {
                    list: id(),
                    position: p,
                });
            }
        }
    }
    Ok(())
}

/// Per-row block selection (MoBA's per-token top-k): for every query row, at most `top_k`
/// key blocks (of `block_n` keys) in increasing order, padded at the end with `-1`.
///
/// Layout: `blocks[r * top_k..(r + 1) * top_k]` for the row whose LSE index is `r`
/// (`[batch, heads_q, seqlen_q]`, or `[heads_q, total_q]` with varlen). Memory is
/// `rows x heads x top_k x 4` bytes: 128 MiB at 128k tokens, 32 heads, top-8, growing
/// linearly with the sequence, whereas a per-(row, key block) bitmask would grow with its
/// square (512 MiB at 128k with 128-key blocks, 32 GiB at 1M). A kernel walks a row's list
/// with a cursor while it walks its tile's (sorted) union list, so the membership test is
/// O(top_k) per row per tile in total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowBlocks {
    pub(crate) block_n: usize,
    pub(crate) top_k: usize,
    pub(crate) blocks: Vec<i32>,
}

impl RowBlocks {
    /// Wraps per-row lists (validated against a problem when attached with
    /// [`BlockSparseAttention::with_row_blocks`]).
    pub fn new(block_n: usize, top_k: usize, blocks: Vec<i32>) -> Result<Self, BlockMaskError> {
        for (name, value) in [("block_n", block_n), ("top_k", top_k)] {
            if value == 0 {
                return Err(BlockMaskError::BadDim {
                    name,
                    value,
                    why: "must be >= 1",
                });
            }
        }
        if !blocks.len().is_multiple_of(top_k) {
            return Err(BlockMaskError::BadRow {
                row: blocks.len() / top_k,
                why: format!(
                    "{} entries are not a multiple of top_k = {top_k}",
                    blocks.len()
                ),
            });
        }
        Ok(RowBlocks {
            block_n,
            top_k,
            blocks,
        })
    }
    /// Keys per key block.
    pub fn block_n(&self) -> usize {
        self.block_n
    }
    /// Maximum key blocks per row (the padded list length).
    pub fn top_k(&self) -> usize {
        self.top_k
    }
    /// All rows' padded lists.
    pub fn blocks(&self) -> &[i32] {
        &self.blocks
    }
    /// Row `r`'s selected key blocks (padding removed); `None` past the last row.
    pub fn row(&self, r: usize) -> Option<&[i32]> {
        (r < self.blocks.len() / self.top_k).then(|| self.row_at(r))
    }

    /// [`Self::row`] for a row the caller has checked.
    pub(crate) fn row_at(&self, r: usize) -> &[i32] {
        let row = &self.blocks[r * self.top_k..(r + 1) * self.top_k];
        let n = row.iter().position(|&x| x < 0).unwrap_or(self.top_k);
        &row[..n]
    }
}

/// Checks per-row lists against `attn`: one padded list per LSE row, each strictly
/// increasing, in range for its sequence, `-1` only as trailing padding. O(rows x top_k).
pub(crate) fn check_row_blocks(
    attn: &FlashAttention,
    rows: &RowBlocks,
) -> Result<(), BlockMaskError> {
    let want = attn
        .lse_len()
        .checked_mul(rows.top_k)
        .ok_or(BlockMaskError::TooLarge {
            what: "rows x top_k",
        })?;
    if rows.blocks.len() != want {
        return Err(BlockMaskError::Mismatch {
            what: "row selection length",
            got: rows.blocks.len(),
            want,
        });
    }
    if attn.max_seqlen_q() == 0 {
        // No row to check, however many sequences a fixed-length batch declares.
        return Ok(());
    }
    let bad = |row: usize, why: String| BlockMaskError::BadRow { row, why };
    // Sequences without query rows have no rows to check (and no per-head work).
    for (b, span) in attn.spans().enumerate().filter(|(_, s)| s.seqlen_q > 0) {
        let nk = span.seqlen_k.div_ceil(rows.block_n);
        for h in 0..attn.heads_q() {
            for i in 0..span.seqlen_q {
                let r = attn.lse_index(b, h, i);
                let padded = &rows.blocks[r * rows.top_k..(r + 1) * rows.top_k];
                let n = padded.iter().position(|&x| x < 0).unwrap_or(rows.top_k);
                if padded[n..].iter().any(|&x| x != -1) {
                    return Err(bad(r, "padding must be -1 and only at the end".into()));
                }
                for (p, &kb) in padded[..n].iter().enumerate() {
                    if kb as usize >= nk {
                        return Err(bad(r, format!("key block {kb} outside 0..{nk}")));
                    }
                    if p > 0 && kb <= padded[p - 1] {
                        return Err(bad(r, "not strictly increasing".into()));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Which GPU kernel [`BlockSparseAttention::forward_gpu`] (and its plan) runs. Nothing picks
/// [`BlockSparseKernel::Hopper`] automatically: it runs only when asked for by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlockSparseKernel {
    /// The tensor-core kernel on the shared mma.sync mainloop (`kernels/block_sparse_mma.cu`,
    /// sm_80+): block sizes multiples of [`GPU_BLOCK_MULTIPLE`]. Verified on an H200
    /// (2026-12-04; its sm_80 code has not run on an Ampere card).
    #[default]
    TensorCore,
    /// The Hopper kernel on the wgmma mainloop (`kernels/block_sparse_wgmma.cu`, sm_90a:
    /// compute capability 9.0 only; TMA loads). **Not yet run on a GPU.** It takes less than
    /// `TensorCore`: `block_m` a multiple of [`HOPPER_BLOCK_M_MULTIPLE`] (its 128-row query
    /// tile) and `block_n` a multiple of [`hopper_block_n_multiple`] of the head dim (its key
    /// tile: 128 at head_dim 64 and 128, 64 at 256), and q, k, v strides the copy engine can
    /// address (positive wherever the dimension is longer than 1); anything else is
    /// [`Error::Unsupported`] before any device call.
    Hopper,
}

/// A dense attention problem restricted to the blocks of a [`BlockMask`] (and, for MoBA, to
/// each row's own [`RowBlocks`]). Scale, softcap, GQA, varlen and the element mask come from
/// the [`FlashAttention`] problem.
#[derive(Debug, Clone)]
pub struct BlockSparseAttention {
    attn: FlashAttention,
    mask: BlockMask,
    rows: Option<RowBlocks>,
    kernel: BlockSparseKernel,
}

impl BlockSparseAttention {
    /// Binds `mask` to `attn`: `batch` and `heads` equal the problem's (or 1, broadcast),
    /// `num_q_blocks = ceil(max_seqlen_q / block_m)`, `num_k_blocks = ceil(max_seqlen_k /
    /// block_n)`. With varlen lengths each sequence uses the leading blocks of its own
    /// length: lists past its last query block must be empty and indices must lie below its
    /// own key block count.
    pub fn new(attn: FlashAttention, mask: BlockMask) -> Result<Self, BlockMaskError> {
        let d = mask.dims;
        for (what, got, want) in [
            ("batch", d.batch, attn.batch()),
            ("heads", d.heads, attn.heads_q()),
        ] {
            if got != 1 && got != want {
                return Err(BlockMaskError::Mismatch { what, got, want });
            }
        }
        for (what, got, want) in [
            (
                "num_q_blocks",
                d.num_q_blocks,
                attn.max_seqlen_q().div_ceil(d.block_m),
            ),
            (
                "num_k_blocks",
                d.num_k_blocks,
                attn.max_seqlen_k().div_ceil(d.block_n),
            ),
        ] {
            if got != want {
                return Err(BlockMaskError::Mismatch { what, got, want });
            }
        }
        // Without query blocks there is no list to check (and the loop over heads below
        // would cost `heads` steps for nothing).
        if attn.is_varlen() && d.num_q_blocks > 0 {
            let mb = if d.batch == 1 { 1 } else { attn.batch() };
            for b in 0..mb {
                // A broadcast mask must fit the shortest sequence.
                let spans: Vec<_> = if d.batch == 1 {
                    attn.spans().collect()
                } else {
                    vec![attn.span_of(b)]
                };
                for span in spans {
                    let nq = span.seqlen_q.div_ceil(d.block_m);
                    let nk = span.seqlen_k.div_ceil(d.block_n);
                    for h in 0..d.heads {
                        for qb in 0..d.num_q_blocks {
                            let list = mask.bound_list(b, h, qb);
                            let id = ListId {
                                batch: b,
                                head: h,
                                q_block: qb,
                            };
                            if qb >= nq && !list.is_empty() {
                                return Err(BlockMaskError::ListPastEnd { list: id });
                            }
                            if let Some(&last) = list.indices.last()
                                && last as usize >= nk
                            {
                                return Err(BlockMaskError::IndexOutOfRange {
                                    list: id,
                                    index: last as i64,
                                    num_k_blocks: nk,
                                });
                            }
                        }
                    }
                }
            }
        }
        Ok(BlockSparseAttention {
            attn,
            mask,
            rows: None,
            kernel: BlockSparseKernel::TensorCore,
        })
    }

    /// Chooses the GPU kernel (benches and tests compare them); [`BlockSparseKernel::TensorCore`]
    /// by default. What the chosen kernel takes is checked by the GPU calls, not here.
    pub fn with_kernel(mut self, kernel: BlockSparseKernel) -> Self {
        self.kernel = kernel;
        self
    }
    /// The GPU kernel the GPU calls run.
    pub fn kernel(&self) -> BlockSparseKernel {
        self.kernel
    }

    /// Attaches a per-row selection (MoBA): one padded list per LSE row, `block_n` equal to
    /// the mask's, each list strictly increasing, in range for its sequence, `-1` only as
    /// trailing padding.
    pub fn with_row_blocks(mut self, rows: RowBlocks) -> Result<Self, BlockMaskError> {
        if rows.block_n != self.mask.dims.block_n {
            return Err(BlockMaskError::Mismatch {
                what: "row selection block_n",
                got: rows.block_n,
                want: self.mask.dims.block_n,
            });
        }
        check_row_blocks(&self.attn, &rows)?;
        self.rows = Some(rows);
        Ok(self)
    }

    /// The underlying dense problem (shape, options, mask).
    pub fn attention(&self) -> &FlashAttention {
        &self.attn
    }
    /// The block mask.
    pub fn block_mask(&self) -> &BlockMask {
        &self.mask
    }
    /// The per-row selection, if one was attached with [`BlockSparseAttention::with_row_blocks`].
    pub fn row_blocks(&self) -> Option<&RowBlocks> {
        self.rows.as_ref()
    }

    /// CPU forward pass: the dense path's tiled online softmax (f32, blocks of `CPU_TILE_M`
    /// rows against `CPU_TILE_N`-key tiles, parallel over (batch, head) and query blocks)
    /// visiting only the listed key blocks of each query block, in list order. Buffers as
    /// for [`FlashAttention::forward_cpu`].
    pub fn forward_cpu<T: Element>(
        &self,
        q: Strided<&[T]>,
        k: Strided<&[T]>,
        v: Strided<&[T]>,
        out: Strided<&mut [T]>,
        lse: Option<&mut [f32]>,
    ) -> Result<()> {
        let attn = &self.attn;
        attn.check_host_buffers(&q, &k, &v, &out, lse.as_deref())?;
        attn.run_heads_cpu(q, k, v, out, lse, |b, h, qh, kh, vh, sq, sk| {
            self.head_cpu(b, h, qh, kh, vh, sq, sk)
        });
        Ok(())
    }

    /// One (sequence `b`, head `h`): `q: [sq, d]`, `k, v: [sk, d]` in f32. The query blocks
    /// run in parallel, each in row blocks of `CPU_TILE_M` rows (as the dense path's), every
    /// row block against the `CPU_TILE_N`-key tiles of its listed key blocks in list order.
    /// Returns `(o [sq, d], lse [sq])`.
    #[allow(clippy::too_many_arguments)]
    fn head_cpu(
        &self,
        b: usize,
        h: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        sq: usize,
        sk: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let d = self.attn.head_dim();
        let block_m = self.mask.dims.block_m;
        // Rows per query block that exist: a block_m above sq (one block) would overflow
        // `block_m * d`; at least 1 so that an empty sequence still has a chunk size.
        let block_rows = block_m.min(sq).max(1);
        let mut out = vec![0.0; sq * d];
        let mut lse = vec![f32::NEG_INFINITY; sq];
        out.par_chunks_mut(block_rows * d)
            .zip(lse.par_chunks_mut(block_rows))
            .enumerate()
            .for_each(|(qb, (o, l))| {
                let list = self.mask.bound_list(b, h, qb);
                for (c, (o, l)) in o
                    .chunks_mut(CPU_TILE_M * d)
                    .zip(l.chunks_mut(CPU_TILE_M))
                    .enumerate()
                {
                    let start = qb * block_m + c * CPU_TILE_M;
                    let rows = start..start + l.len();
                    let (q, kv) = (&q[rows.start * d..rows.end * d], (k, v));
                    self.row_block(b, h, &list, rows, q, kv, (sq, sk), (o, l));
                }
            });
        (out, lse)
    }

    /// Query rows `rows` of one query block of (sequence `b`, head `h`) (`q: [rows.len(), d]`,
    /// `k, v: [sk, d]`), whose key blocks are `list`, into `o: [rows.len(), d]` and
    /// `lse: [rows.len()]`. Per key tile, row `i` sees nothing unless its own selection (if
    /// any) holds the block, every key of a `Full` block, and the element mask's keys of a
    /// `Partial` one; a tile no row sees is skipped (it would leave every state as it is).
    #[allow(clippy::too_many_arguments)]
    fn row_block(
        &self,
        b: usize,
        h: usize,
        list: &BlockList<'_>,
        rows: Range<usize>,
        q: &[f32],
        (k, v): (&[f32], &[f32]),
        (sq, sk): (usize, usize),
        (o, l): (&mut [f32], &mut [f32]),
    ) {
        let attn = &self.attn;
        let d = attn.head_dim();
        let block_n = self.mask.dims.block_n;
        let element: Vec<(Range<usize>, usize)> = rows
            .clone()
            .map(|i| attn.mask().row_ranges(i, sq, sk))
            .collect();
        let selected: Option<Vec<&[i32]>> = self.rows.as_ref().map(|sel| {
            rows.clone()
                .map(|i| sel.row_at(attn.lse_index(b, h, i)))
                .collect()
        });
        let mut state = OnlineSoftmaxBlock::new(rows.len(), d);
        let mut scores = [0.0f32; CPU_TILE_M * CPU_TILE_N];
        // Per row of the block: the keys it sees in the current key block.
        let mut seen: Vec<(Range<usize>, usize)> = vec![(0..0, 0); rows.len()];
        for (kb, kind) in list.iter() {
            for (r, s) in seen.iter_mut().enumerate() {
                let takes = selected
                    .as_ref()
                    .is_none_or(|sel| sel[r].binary_search(&(kb as i32)).is_ok());
                *s = match (takes, kind) {
                    (false, _) => (0..0, 0),
                    (true, BlockKind::Full) => (0..sk, 0),
                    (true, BlockKind::Partial) => element[r].clone(),
                };
            }
            let block = kb * block_n..((kb + 1) * block_n).min(sk);
            for t in block.clone().step_by(CPU_TILE_N) {
                let keys = t..(t + CPU_TILE_N).min(block.end);
                let visible = seen.iter().any(|(w, sink_end)| {
                    keys.start < *sink_end || (w.start < keys.end && keys.start < w.end)
                });
                if !visible {
                    continue;
                }
                let (state, rows) = (&mut state, rows.clone());
                attn.fold_tile(state, q, (k, v), rows, keys, &seen, &mut scores);
            }
        }
        state.finish(o, l);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Window, mask::Mask};

    /// `classify` against every element of small blocks, for every window, sink count and
    /// length pair in range (the per-element rule of `Mask::visible`).
    #[test]
    fn classify_matches_every_element() {
        let bounds = [None, Some(0), Some(1), Some(2), Some(3), Some(5)];
        let mut cases = 0;
        for (sq, sk) in (1..=7).flat_map(|q| (1..=9).map(move |k| (q, k))) {
            for (left, right, sinks) in bounds
                .iter()
                .flat_map(|&l| bounds.iter().map(move |&r| (l, r)))
                .flat_map(|(l, r)| (0..4).map(move |s| (l, r, s)))
            {
                let mask = Mask {
                    window: Window { left, right },
                    sinks,
                };
                for (r0, r1) in (0..sq).flat_map(|a| (a + 1..=sq).map(move |b| (a, b))) {
                    for (k0, k1) in (0..sk).flat_map(|a| (a + 1..=sk + 1).map(move |b| (a, b))) {
                        let seen = (r0..r1)
                            .flat_map(|i| (k0..k1.min(sk)).map(move |j| (i, j)))
                            .map(|(i, j)| mask.visible(i, j, sq, sk));
                        let (mut any, mut all) = (false, true);
                        for v in seen {
                            any |= v;
                            all &= v;
                        }
                        let want = match (any, all) {
                            (false, _) => None,
                            (true, true) => Some(BlockKind::Full),
                            (true, false) => Some(BlockKind::Partial),
                        };
                        let got = classify(&mask, r0..r1, k0..k1, sq, sk);
                        assert_eq!(
                            got, want,
                            "{mask:?} sq {sq} sk {sk} rows {r0}..{r1} keys {k0}..{k1}"
                        );
                        cases += 1;
                    }
                }
            }
        }
        assert!(cases > 100_000, "{cases} cases");
    }
}
