//! MoBA's gather attention on the GPU ([`MobaAttention::Gather`], `kernels/moba_gather.cu`,
//! docs/design/block_sparse.md "The gather formulation"): the per-token selection transposed
//! into, per (sequence, query head, key block), the rows that chose the block, and each block
//! attended by exactly those rows, one partial `(o, lse)` per (row, selection slot), merged per
//! row by the ring's deferred merge (`la_ring_gather`). The computed pairs are the shown
//! pairs (rounded up to 64-row groups per block), where the union path computes, per 64-row
//! tile, every block any of its rows chose.
//!
//! **NOT YET RUN ON A GPU** (compiled and register-checked only, 2026-12-05). Explicit opt-in
//! ([`MobaGpuPlan::with_attention`](super::moba::MobaGpuPlan::with_attention)); the union
//! path stays the default. Host logic (sizes, the merge's slot table, the CPU model of the
//! transpose) is tested on the CPU.

use super::RowBlocks;
use super::moba_gpu::MobaGpuDims;
use crate::dense::FlashAttention;
use crate::error::{Error, Result};

/// Largest key block count the gather attention takes (`LA_MOBA_GATHER_MAX_K_BLOCKS`: the
/// transpose keeps one counter per block in shared memory, 32 KiB).
pub const GPU_GATHER_MAX_K_BLOCKS: usize = 8192;
/// Rows per chunk of the transpose (`LA_MOBA_GATHER_CHUNK_ROWS`): counts are kept per chunk
/// and key block.
pub const GPU_GATHER_CHUNK_ROWS: usize = 512;
/// Rows per work item of the gather attention (one 64-row query tile of the mainloop).
pub const GPU_GATHER_ITEM_ROWS: usize = 64;

/// How [`MobaGpuPlan`](super::moba::MobaGpuPlan) attends over a per-token selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MobaAttention {
    /// Per 64-row query tile, the union of its rows' blocks, each row masked to its own
    /// selection (`moba_attention_kernel`): the default. With uncorrelated rows the union
    /// covers most earlier blocks, so the work approaches dense causal attention.
    #[default]
    Union,
    /// The gather formulation (**not yet run on a GPU**, explicit opt-in): each key block is
    /// attended by the rows that chose it only (work items of up to 64 gathered rows), one
    /// partial per (row, slot) in the output dtype, merged per row (LSE merge). Per-token
    /// selection only (the query-block variant keeps the union path, which its shared lists
    /// make exact already). Extra scratch: [`MobaGatherDims`].
    Gather,
}

/// The sizes of the gather attention's scratch, validated on the host
/// ([`MobaGatherDims::new`]). `rows` is the LSE row count (`batch * heads_q * seqlen_q`, or
/// `heads_q * total_q` with varlen), `slots` the selection's ([`MobaGpuDims::slots`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MobaGatherDims {
    /// Chunks of [`GPU_GATHER_CHUNK_ROWS`] rows per (sequence, head):
    /// `ceil(max_seqlen_q / GPU_GATHER_CHUNK_ROWS)`.
    pub num_chunks: usize,
    /// Work items per (sequence, head) at most: `ceil(max_seqlen_q * slots / 64) +
    /// num_k_blocks` (each block's rows rounded up to whole items); the attention's grid.
    pub max_work: usize,
    /// LSE rows of the problem.
    pub rows: usize,
}

impl MobaGatherDims {
    /// Checks what the gather attention needs beyond [`MobaGpuDims::new`] and sizes its
    /// buffers: `num_k_blocks <= GPU_GATHER_MAX_K_BLOCKS`, `max_seqlen_q * slots` and
    /// `max_work` within `i32` (entry values and the grid), every buffer within `i64`
    /// elements. What the kernels do not take is `Error::Unsupported`, an overflow
    /// `Error::Shape`.
    pub fn new(attn: &FlashAttention, dims: &MobaGpuDims) -> Result<Self> {
        if dims.num_k_blocks > GPU_GATHER_MAX_K_BLOCKS {
            return Err(Error::Unsupported(format!(
                "MoBA gather attention: {} key blocks, at most {GPU_GATHER_MAX_K_BLOCKS}",
                dims.num_k_blocks
            )));
        }
        let sq = attn.max_seqlen_q();
        let too_long = || {
            Error::Unsupported(format!(
                "MoBA gather attention: seqlen_q {sq} x {} slots does not fit i32",
                dims.slots
            ))
        };
        let pairs = sq.checked_mul(dims.slots).ok_or_else(too_long)?;
        i32::try_from(pairs).map_err(|_| too_long())?;
        let max_work = pairs
            .div_ceil(GPU_GATHER_ITEM_ROWS)
            .checked_add(dims.num_k_blocks)
            .filter(|&w| i32::try_from(w).is_ok())
            .ok_or_else(too_long)?;
        let g = MobaGatherDims {
            num_chunks: sq.div_ceil(GPU_GATHER_CHUNK_ROWS),
            max_work,
            rows: attn.lse_len(),
        };
        g.counts_len(attn, dims)?;
        g.entries_len(dims)?;
        g.work_len(attn)?;
        g.partial_o_len(attn, dims)?;
        g.partial_lse_len(dims)?;
        Ok(g)
    }

    /// `[batch, heads_q, num_chunks, num_k_blocks]` i32.
    pub(crate) fn counts_len(&self, attn: &FlashAttention, dims: &MobaGpuDims) -> Result<usize> {
        let d = [
            attn.batch(),
            attn.heads_q(),
            self.num_chunks,
            dims.num_k_blocks,
        ];
        MobaGpuDims::product("gather counts", &d)
    }
    /// `[rows, slots]` i32.
    pub(crate) fn entries_len(&self, dims: &MobaGpuDims) -> Result<usize> {
        MobaGpuDims::product("gather entries", &[self.rows, dims.slots])
    }
    /// `[batch, heads_q, max_work, 4]` i32.
    pub(crate) fn work_len(&self, attn: &FlashAttention) -> Result<usize> {
        let d = [attn.batch(), attn.heads_q(), self.max_work, 4];
        MobaGpuDims::product("gather work items", &d)
    }
    /// `[slots, rows, head_dim]` in the output dtype.
    pub(crate) fn partial_o_len(&self, attn: &FlashAttention, dims: &MobaGpuDims) -> Result<usize> {
        let d = [dims.slots, self.rows, attn.head_dim()];
        MobaGpuDims::product("gather partial outputs", &d)
    }
    /// `[slots, rows]` f32.
    pub(crate) fn partial_lse_len(&self, dims: &MobaGpuDims) -> Result<usize> {
        MobaGpuDims::product("gather partial LSEs", &[dims.slots, self.rows])
    }
}

/// The deferred merge's table (`LaRingGatherParams`, `kernels/include/longattn/ring.h`) for
/// the gather partials: slot `j` is plane `j` of the partial buffers (o at `j * rows *
/// head_dim`, lse at `j * rows`, covering rows `0..len`), and one segment `0..len` lists every
/// slot. `len` is the merge's row extent: `seqlen_q`, or `total_q` with varlen (one packed
/// batch). Returns `(slots [slots][4] i64, segments [1][4] i32, slot_list [slots] i32)`.
pub(crate) fn merge_table(
    attn: &FlashAttention,
    dims: &MobaGpuDims,
    g: &MobaGatherDims,
) -> Result<(Vec<i64>, Vec<i32>, Vec<i32>)> {
    let shape = || Error::Shape("MoBA gather merge: offsets overflow".into());
    let len = i32::try_from(merge_len(attn)).map_err(|_| shape())?;
    let slots_i32 = i32::try_from(dims.slots).map_err(|_| shape())?;
    let plane_o = g.rows.checked_mul(attn.head_dim()).ok_or_else(shape)?;
    let mut slots = Vec::with_capacity(4 * dims.slots);
    for j in 0..dims.slots {
        let o = j.checked_mul(plane_o).ok_or_else(shape)?;
        let l = j.checked_mul(g.rows).ok_or_else(shape)?;
        slots.extend([
            i64::try_from(o).map_err(|_| shape())?,
            i64::try_from(l).map_err(|_| shape())?,
            0,
            i64::from(len),
        ]);
    }
    Ok((slots, vec![0, len, 0, slots_i32], (0..slots_i32).collect()))
}

/// Rows per batch of the merge: `seqlen_q`, or `total_q` for a packed (varlen) batch.
pub(crate) fn merge_len(attn: &FlashAttention) -> usize {
    if attn.is_varlen() {
        attn.total_q()
    } else {
        attn.max_seqlen_q()
    }
}

/// The transpose of a selection, per (sequence, query head), in `[batch, heads_q]` order: what
/// `la_moba_gather_index` writes (read back by
/// [`MobaGpuPlan::gather_index`](super::moba::MobaGpuPlan::gather_index)) and what
/// [`moba_gather_index_cpu`] computes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MobaGatherIndex {
    /// Per (sequence, head): the entries `i * slots + j` (row `i` of the sequence, `j` the
    /// slot of its selection holding the block), block by block in increasing block order,
    /// each block's rows increasing.
    pub entries: Vec<Vec<i32>>,
    /// Per (sequence, head): the work items `[block, first entry, rows, 0]`, each block's
    /// entries cut into runs of at most 64 rows, block by block.
    pub work: Vec<Vec<[i32; 4]>>,
}

/// LSE row of (sequence `b`, head `h`, row 0).
fn lse_base(attn: &FlashAttention, b: usize, h: usize) -> Result<usize> {
    Ok(if attn.is_varlen() {
        h * attn.total_q()
            + attn
                .span(b)
                .ok_or_else(|| Error::Shape(format!("MoBA gather: no sequence {b}")))?
                .q_start
    } else {
        (b * attn.heads_q() + h) * attn.max_seqlen_q()
    })
}

/// The CPU model of the transpose of `rows` (a per-token selection of `attn`,
/// [`RowBlocks`] layout): for each (sequence, head) and key block, the rows whose selection
/// holds it, increasing, and the work items over them. Errors when `rows` does not fit the
/// problem or its slots exceed `i32` entry values.
pub fn moba_gather_index_cpu(attn: &FlashAttention, rows: &RowBlocks) -> Result<MobaGatherIndex> {
    super::check_row_blocks(attn, rows)?;
    let slots = rows.top_k();
    let overflow = || Error::Shape("MoBA gather: entry values overflow i32".into());
    let mut index = MobaGatherIndex {
        entries: Vec::new(),
        work: Vec::new(),
    };
    for (b, span) in attn.spans().enumerate() {
        for h in 0..attn.heads_q() {
            let base = lse_base(attn, b, h)?;
            let mut pairs: Vec<(i32, i32)> = Vec::new(); // (block, entry)
            for i in 0..span.seqlen_q {
                let list = rows.row(base + i).ok_or_else(overflow)?;
                for (j, &kb) in list.iter().enumerate() {
                    if kb >= 0 {
                        let e = i.checked_mul(slots).and_then(|x| x.checked_add(j));
                        let e = e.and_then(|e| i32::try_from(e).ok()).ok_or_else(overflow)?;
                        pairs.push((kb, e));
                    }
                }
            }
            // Stable: rows stay increasing within a block.
            pairs.sort_by_key(|&(kb, _)| kb);
            let mut work = Vec::new();
            let mut at = 0;
            while at < pairs.len() {
                let kb = pairs[at].0;
                let end = at + pairs[at..].iter().take_while(|p| p.0 == kb).count();
                for first in (at..end).step_by(GPU_GATHER_ITEM_ROWS) {
                    let n = (end - first).min(GPU_GATHER_ITEM_ROWS);
                    let first = i32::try_from(first).map_err(|_| overflow())?;
                    work.push([kb, first, n as i32, 0]);
                }
                at = end;
            }
            index.entries.push(pairs.into_iter().map(|p| p.1).collect());
            index.work.push(work);
        }
    }
    Ok(index)
}

/// Reads the device's transpose back into a [`MobaGatherIndex`]: `entries` `[rows, slots]`,
/// `work` `[batch, heads_q, max_work, 4]`, `work_count` `[batch, heads_q]`; each (sequence,
/// head)'s entry count is the sum of its work items' rows.
pub(crate) fn index_from_device(
    attn: &FlashAttention,
    dims: &MobaGpuDims,
    g: &MobaGatherDims,
    entries: &[i32],
    work: &[i32],
    work_count: &[i32],
) -> Result<MobaGatherIndex> {
    let bad = |what: &str| Error::Shape(format!("MoBA gather index read back: {what}"));
    let mut index = MobaGatherIndex {
        entries: Vec::new(),
        work: Vec::new(),
    };
    for b in 0..attn.batch() {
        for h in 0..attn.heads_q() {
            let bh = b * attn.heads_q() + h;
            let count = usize::try_from(work_count[bh]).map_err(|_| bad("work count"))?;
            if count > g.max_work {
                return Err(bad("work count above max_work"));
            }
            let items: Vec<[i32; 4]> = (0..count)
                .map(|w| {
                    let o = 4 * (bh * g.max_work + w);
                    [work[o], work[o + 1], work[o + 2], work[o + 3]]
                })
                .collect();
            let n: usize = items.iter().map(|it| it[2].max(0) as usize).sum();
            let base = lse_base(attn, b, h)? * dims.slots;
            let list = entries.get(base..base + n).ok_or_else(|| bad("entries"))?;
            index.entries.push(list.to_vec());
            index.work.push(items);
        }
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_sparse::moba::MobaConfig;
    use crate::dense::{AttentionOptions, AttentionShape};
    use crate::layout::SeqLens;

    fn attn(b: usize, sq: usize, sk: usize) -> FlashAttention {
        FlashAttention::new(
            &AttentionShape {
                batch: b,
                heads_q: 4,
                heads_kv: 2,
                head_dim: 128,
                seqlens: SeqLens::Fixed {
                    seqlen_q: sq,
                    seqlen_k: sk,
                },
            },
            &AttentionOptions::causal(),
        )
        .unwrap()
    }
    fn cfg(block_n: usize, top_k: usize) -> MobaConfig {
        MobaConfig { block_n, top_k }
    }

    #[test]
    fn gather_dims_size_the_scratch() {
        let a = attn(2, 1000, 1300);
        let d = MobaGpuDims::new(&a, &cfg(128, 3)).unwrap();
        let g = MobaGatherDims::new(&a, &d).unwrap();
        // 1000 rows: 2 chunks of 512; 3000 pairs: 47 items of 64, plus 11 key blocks.
        assert_eq!(
            g,
            MobaGatherDims {
                num_chunks: 2,
                max_work: 47 + 11,
                rows: 2 * 4 * 1000,
            }
        );
        assert_eq!(g.counts_len(&a, &d).unwrap(), 2 * 4 * 2 * 11);
        assert_eq!(g.entries_len(&d).unwrap(), 8000 * 3);
        assert_eq!(g.work_len(&a).unwrap(), 2 * 4 * 58 * 4);
        assert_eq!(g.partial_o_len(&a, &d).unwrap(), 3 * 8000 * 128);
        assert_eq!(g.partial_lse_len(&d).unwrap(), 3 * 8000);
        // No key: nothing selected, one slot, still sized.
        let a = attn(1, 10, 0);
        let d = MobaGpuDims::new(&a, &cfg(64, 3)).unwrap();
        let g = MobaGatherDims::new(&a, &d).unwrap();
        assert_eq!((g.num_chunks, g.max_work, g.rows), (1, 1, 40));
    }

    #[test]
    fn gather_dims_refuse_what_the_kernels_do_not_take() {
        // 8193 key blocks of 64: over the shared-memory counters.
        let a = attn(1, 64, 64 * 8193);
        let d = MobaGpuDims::new(&a, &cfg(64, 2)).unwrap();
        let r = MobaGatherDims::new(&a, &d);
        assert!(
            matches!(&r, Err(Error::Unsupported(m)) if m.contains("key blocks")),
            "{r:?}"
        );
        let a = attn(1, 64, 64 * 8192);
        MobaGatherDims::new(&a, &MobaGpuDims::new(&a, &cfg(64, 2)).unwrap()).unwrap();
        // seqlen_q * slots past i32: entry values would overflow.
        let long = 1usize << 29;
        let a = attn(1, long, 4096 * 4);
        let d = MobaGpuDims::new(&a, &cfg(4096, 4)).unwrap();
        let r = MobaGatherDims::new(&a, &d);
        assert!(
            matches!(&r, Err(Error::Unsupported(m)) if m.contains("i32")),
            "{r:?}"
        );
        let a = attn(1, long, 4096 * 3);
        let d = MobaGpuDims::new(&a, &cfg(4096, 3)).unwrap();
        MobaGatherDims::new(&a, &d).unwrap();
    }

    #[test]
    fn merge_table_lists_every_slot_plane() {
        let a = attn(2, 100, 300);
        let d = MobaGpuDims::new(&a, &cfg(64, 3)).unwrap();
        let g = MobaGatherDims::new(&a, &d).unwrap();
        let (slots, segments, list) = merge_table(&a, &d, &g).unwrap();
        let plane = (2 * 4 * 100 * 128) as i64;
        assert_eq!(
            slots,
            vec![0, 0, 0, 100, plane, 800, 0, 100, 2 * plane, 1600, 0, 100]
        );
        assert_eq!(segments, vec![0, 100, 0, 3]);
        assert_eq!(list, vec![0, 1, 2]);
        // The last slot's last row ends inside the partial buffers.
        let last_o = slots[8] as usize + ((100 + 99) * 4 + 3) * 128 + 128;
        assert_eq!(last_o, g.partial_o_len(&a, &d).unwrap());
        let last_lse = slots[9] as usize + (4 + 3) * 100 + 99 + 1;
        assert_eq!(last_lse, g.partial_lse_len(&d).unwrap());
    }

    #[test]
    fn merge_table_of_varlen_is_one_packed_batch() {
        let a = FlashAttention::new(
            &AttentionShape {
                batch: 3,
                heads_q: 2,
                heads_kv: 1,
                head_dim: 64,
                seqlens: SeqLens::Varlen {
                    cu_seqlens_q: &[0, 70, 75, 204],
                    cu_seqlens_k: &[0, 500, 564, 693],
                },
            },
            &AttentionOptions::causal(),
        )
        .unwrap();
        let d = MobaGpuDims::new(&a, &cfg(64, 2)).unwrap();
        let g = MobaGatherDims::new(&a, &d).unwrap();
        assert_eq!(g.rows, 2 * 204);
        assert_eq!(merge_len(&a), 204);
        let (slots, segments, _) = merge_table(&a, &d, &g).unwrap();
        assert_eq!(slots[4..], [408 * 64, 408, 0, 204]);
        assert_eq!(segments, vec![0, 204, 0, 2]);
    }

    /// The CPU model against its definition: every chosen (row, slot) exactly once, under
    /// its block, rows increasing; work items of <= 64 rows tiling each block's run.
    #[test]
    fn cpu_index_is_the_transpose() {
        let a = attn(2, 150, 300);
        let slots = 3;
        // A selection: own block plus blocks (i * 7 + h) % own and 0, increasing, -1 padded.
        let mut blocks = Vec::new();
        for b in 0..2 {
            for h in 0..4 {
                for i in 0..150usize {
                    let own = (i + 150) / 64;
                    let mut l = vec![own as i32];
                    let x = (i * 7 + h + b) % own;
                    l.push(x as i32);
                    if x != 0 && i % 3 == 0 {
                        l.push(0);
                    }
                    l.sort();
                    l.resize(slots, -1);
                    blocks.extend(l);
                }
            }
        }
        let rows = RowBlocks::new(64, slots, blocks).unwrap();
        let idx = moba_gather_index_cpu(&a, &rows).unwrap();
        assert_eq!(idx.entries.len(), 8);
        for bh in 0..8 {
            let ent = &idx.entries[bh];
            let mut seen = std::collections::HashSet::new();
            let mut covered = 0usize;
            let mut prev: Option<(i32, i32)> = None;
            for it in &idx.work[bh] {
                assert!(it[2] >= 1 && it[2] <= 64 && it[3] == 0, "{it:?}");
                assert_eq!(it[1] as usize, covered);
                for &e in &ent[covered..covered + it[2] as usize] {
                    let (i, j) = (e as usize / slots, e as usize % slots);
                    assert_eq!(rows.row(bh * 150 + i).unwrap()[j], it[0]);
                    assert!(seen.insert(e));
                    if let Some((pkb, pi)) = prev {
                        assert!(pkb < it[0] || (pkb == it[0] && pi < i as i32));
                    }
                    prev = Some((it[0], i as i32));
                }
                covered += it[2] as usize;
            }
            assert_eq!(covered, ent.len());
            let chosen = (0..150)
                .flat_map(|i| rows.row(bh * 150 + i).unwrap().iter())
                .filter(|&&kb| kb >= 0)
                .count();
            assert_eq!(seen.len(), chosen);
        }
        // A mismatched selection is refused.
        let short = RowBlocks::new(64, slots, vec![-1; 3 * 10]).unwrap();
        assert!(moba_gather_index_cpu(&a, &short).is_err());
    }

    #[test]
    fn device_index_reads_back_its_items() {
        let a = attn(1, 150, 300);
        let d = MobaGpuDims::new(&a, &cfg(64, 3)).unwrap();
        let g = MobaGatherDims::new(&a, &d).unwrap();
        let mut work = vec![0i32; g.work_len(&a).unwrap()];
        let mut entries = vec![-7i32; g.entries_len(&d).unwrap()];
        let mut counts = vec![0i32; 4];
        // Head 1: two items of block 2 (64 + 6 rows).
        let bh = 1;
        work[4 * bh * g.max_work..4 * bh * g.max_work + 8]
            .copy_from_slice(&[2, 0, 64, 0, 2, 64, 6, 0]);
        counts[bh] = 2;
        for (x, e) in entries[150 * 3..150 * 3 + 70].iter_mut().enumerate() {
            *e = x as i32;
        }
        let idx = index_from_device(&a, &d, &g, &entries, &work, &counts).unwrap();
        assert_eq!(idx.work[1], vec![[2, 0, 64, 0], [2, 64, 6, 0]]);
        assert_eq!(idx.entries[1], (0..70).collect::<Vec<i32>>());
        assert!(idx.entries[0].is_empty() && idx.work[0].is_empty());
        counts[0] = g.max_work as i32 + 1;
        assert!(index_from_device(&a, &d, &g, &entries, &work, &counts).is_err());
    }

    /// The C launchers refuse bad params before any CUDA call (so this runs without a GPU).
    #[cfg(longattn_cuda)]
    #[test]
    fn c_entries_refuse_bad_params() {
        use crate::gpu::ffi;
        const INVALID_VALUE: i32 = 1; // cudaErrorInvalidValue
        let fake = std::ptr::NonNull::<u64>::dangling().as_ptr();
        let moba = crate::block_sparse::moba_gpu::fake_moba_params(0);
        // 100 rows x 3 slots: 5 items of 64, plus 5 blocks; rows = 2 heads x 100.
        let ok = ffi::LaMobaGatherParams {
            moba,
            counts: fake as *mut i32,
            entries: fake as *mut i32,
            work: fake as *mut i32,
            work_count: fake as *mut i32,
            partial_o: fake as *mut _,
            partial_lse: fake as *mut f32,
            rows: 200,
            num_chunks: 1,
            max_work: 10,
        };
        let cases = [
            ffi::LaMobaGatherParams {
                entries: std::ptr::null_mut(),
                ..ok
            },
            ffi::LaMobaGatherParams {
                partial_o: std::ptr::null_mut(),
                ..ok
            },
            ffi::LaMobaGatherParams {
                partial_lse: std::ptr::null_mut(),
                ..ok
            },
            ffi::LaMobaGatherParams { rows: 199, ..ok },
            ffi::LaMobaGatherParams {
                num_chunks: 2,
                ..ok
            },
            ffi::LaMobaGatherParams { max_work: 9, ..ok },
            ffi::LaMobaGatherParams {
                moba: ffi::LaMobaParams { top_k: 6, ..moba },
                ..ok
            },
            ffi::LaMobaGatherParams {
                moba: ffi::LaMobaParams {
                    num_k_blocks: 4,
                    ..moba
                },
                ..ok
            },
            ffi::LaMobaGatherParams {
                moba: ffi::LaMobaParams {
                    row_blocks: std::ptr::null_mut(),
                    ..moba
                },
                ..ok
            },
            // 8193 key blocks of 64: over the transpose's shared-memory counters.
            ffi::LaMobaGatherParams {
                moba: ffi::LaMobaParams {
                    dense: ffi::LaDenseParams {
                        seqlen_k: 64 * 8193,
                        total_k: 64 * 8193,
                        ..moba.dense
                    },
                    num_k_blocks: 8193,
                    ..moba
                },
                max_work: 5 + 8193,
                ..ok
            },
        ];
        for (i, p) in cases.iter().enumerate() {
            // SAFETY: the params are refused before any pointer is read or CUDA is called.
            let (x, a) = unsafe {
                (
                    ffi::la_moba_gather_index(p, std::ptr::null_mut()),
                    ffi::la_moba_gather_attention(p, std::ptr::null_mut()),
                )
            };
            assert_eq!((x, a), (INVALID_VALUE, INVALID_VALUE), "case {i}");
        }
        // SAFETY: a NULL params pointer is refused.
        let code = unsafe { ffi::la_moba_gather_index(std::ptr::null(), std::ptr::null_mut()) };
        assert_eq!(code, INVALID_VALUE);
        // No work (batch 0): success without a launch.
        let empty = ffi::LaMobaGatherParams {
            moba: ffi::LaMobaParams {
                dense: ffi::LaDenseParams {
                    batch: 0,
                    ..moba.dense
                },
                ..moba
            },
            rows: 0,
            ..ok
        };
        // SAFETY: nothing to run: returns before any pointer is read or CUDA is called.
        let codes = unsafe {
            (
                ffi::la_moba_gather_index(&empty, std::ptr::null_mut()),
                ffi::la_moba_gather_attention(&empty, std::ptr::null_mut()),
            )
        };
        assert_eq!(codes, (0, 0));
    }

    /// The Rust constants are the C header's.
    #[cfg(longattn_cuda)]
    #[test]
    fn constants_match_the_header() {
        use crate::gpu::ffi;
        assert_eq!(
            GPU_GATHER_MAX_K_BLOCKS,
            ffi::LA_MOBA_GATHER_MAX_K_BLOCKS as usize
        );
        assert_eq!(
            GPU_GATHER_CHUNK_ROWS,
            ffi::LA_MOBA_GATHER_CHUNK_ROWS as usize
        );
    }
}
