//! The GQA-packed dense kernels' row mapping and per-row masks (`kernels/dense_mma_gqa.cu`,
//! `DenseKernel::TensorCoreGqa`, 64-row tiles; `kernels/dense_wgmma_gqa.cu`,
//! `DenseKernel::HopperGqa`, 128-row tiles; neither yet run on a GPU), restated and checked on
//! the CPU. A block of `block_m` rows packs the `group` query heads of one kv head: row `r` is
//! position `m0 + r / group` of head `r % group`, `P = block_m / group` positions per block,
//! blocks in reverse order of `m0`. Checked for every group (including those that do not
//! divide the tile: 3, 6, 7, ...):
//! - every (position, head) of a sequence is exactly one valid row of exactly one block, rows
//!   past `P * group` or past the sequence are padding, and the Hopper kernel's Q box
//!   `{64, group, P}` lands row (k, h) at tile row `k * group + h`;
//! - the LSE index of every valid row is distinct and inside the buffer (fixed and varlen);
//! - the block's key tiles (`Mask::key_tiles` over its positions) hold every visible key of
//!   each valid row, and the kernels' per-warp mask (`WarpWindowMask::prepare_positions`:
//!   padding rows clamped to the block's last position, the warp's first and last valid
//!   positions for the interior-tile test; `apply`) keeps exactly the visible keys of each
//!   valid row (bottom-right alignment by the row's own position), keys past `sk` included.

use longattn::{Mask, Window};

/// Query rows per warp (an m16 row block).
const WARP_ROWS: i64 = 16;

/// Row `r` of the block at `m0`: `(position, head of the group)`, or `None` for padding (the
/// kernels' `row()`).
fn row(r: i64, group: i64, positions: i64, m0: i64, sq: i64) -> Option<(i64, i64)> {
    let k = r / group;
    let pos = m0 + k;
    (k < positions && pos < sq).then_some((pos, r - k * group))
}

/// The block starts `m0` of a sequence of `sq` rows in a grid sized for `seqlen_q` (the
/// maximum with varlen), in launch order (reverse), skipping blocks past the sequence.
fn block_starts(seqlen_q: i64, sq: i64, positions: i64) -> Vec<i64> {
    let grid = (seqlen_q + positions - 1) / positions;
    (0..grid)
        .map(|x| (grid - 1 - x) * positions)
        .filter(|&m0| m0 < sq)
        .collect()
}

/// The kernels' WarpWindowMask (FlashAttention convention, -1 unbounded) for one warp.
struct WarpMask {
    hi: [i64; 2],
    lo: [i64; 2],
    diag_first: i64,
    diag_last: i64,
    left: i64,
    right: i64,
    sinks: i64,
    sk: i64,
}

impl WarpMask {
    /// `prepare_positions`: rows at positions `pos`, the warp's valid positions in
    /// `[first, last]`.
    fn prepare(m: (i64, i64, i64), pos: [i64; 2], first: i64, last: i64, sq: i64, sk: i64) -> Self {
        let (left, right, sinks) = m;
        let (mut hi, mut lo) = ([0; 2], [0; 2]);
        for r in 0..2 {
            let diag = pos[r] + sk - sq;
            let mut hr = sk - 1;
            if right >= 0 {
                hr = hr.min(diag + right);
            }
            let mut lr = 0;
            if left >= 0 {
                lr = (diag - left).max(0).min(sk);
            }
            hi[r] = hr.max(-1);
            lo[r] = lr;
        }
        WarpMask {
            hi,
            lo,
            diag_first: first + sk - sq,
            diag_last: last + sk - sq,
            left,
            right,
            sinks,
            sk,
        }
    }
    fn interior(&self, n0: i64, bn: i64) -> bool {
        let n_end = n0 + bn;
        n_end <= self.sk
            && (self.right < 0 || n_end - 1 <= self.diag_first + self.right)
            && (self.left < 0 || n0 >= self.diag_last - self.left || n_end <= self.sinks)
    }
    /// Whether `apply` keeps the score of key `j` (tile at `n0`) of row half `r`.
    fn keeps(&self, r: usize, j: i64, n0: i64, bn: i64) -> bool {
        self.interior(n0, bn) || (j <= self.hi[r] && (j >= self.lo[r] || j < self.sinks))
    }
}

/// Checks one block of `block_m` rows (warps of 16 rows) of a sequence of `sq` rows and `sk`
/// keys under `mask` with key tiles of `bn` keys; `seen[pos * group + h]` counts the rows of
/// (pos, h).
#[allow(clippy::too_many_arguments)]
fn check_block(
    (block_m, bn): (i64, i64),
    group: i64,
    m0: i64,
    (sq, sk): (i64, i64),
    mask: &Mask,
    check_mask: bool,
    seen: &mut [u32],
    what: &str,
) {
    let positions = block_m / group;
    assert!(positions >= 1, "{what}: group past the tile");
    // The Hopper Q box {64, group, positions}: its rows are the first positions * group tile
    // rows, (k, h) at k * group + h, which must be the row the mapping gives (k, h).
    assert!(positions * group <= block_m);
    for k in 0..positions {
        for h in 0..group {
            let r = k * group + h;
            assert_eq!(
                row(r, group, positions, 0, i64::MAX),
                Some((k, h)),
                "{what}: box row"
            );
        }
    }
    for r in 0..block_m {
        if let Some((pos, h)) = row(r, group, positions, m0, sq) {
            assert!(
                (0..sq).contains(&pos) && (0..group).contains(&h),
                "{what}: row {r}"
            );
            seen[(pos * group + h) as usize] += 1;
        } else {
            assert!(
                r >= positions * group || m0 + r / group >= sq,
                "{what}: row {r} dropped"
            );
        }
    }
    if !check_mask {
        return;
    }
    let flash = |x: Option<usize>| x.map_or(-1, |v| v as i64);
    let m = (
        flash(mask.window.left),
        flash(mask.window.right),
        mask.sinks as i64,
    );
    let row_end = (m0 + positions).min(sq);
    let tiles: Vec<i64> = mask
        .key_tiles(
            m0 as usize..row_end as usize,
            sq as usize,
            sk as usize,
            bn as usize,
        )
        .iter()
        .map(|t| t as i64)
        .collect();
    // Every visible key of a valid row lies in a visited tile.
    for r in 0..block_m {
        if let Some((pos, _)) = row(r, group, positions, m0, sq) {
            for j in 0..sk {
                if mask.visible(pos as usize, j as usize, sq as usize, sk as usize) {
                    assert!(
                        tiles.contains(&(j / bn)),
                        "{what}: row {r} key {j} not visited"
                    );
                }
            }
        }
    }
    let last = row_end - 1;
    for warp in 0..block_m / WARP_ROWS {
        let row0 = WARP_ROWS * warp;
        let first = (m0 + row0 / group).min(last);
        let warp_last = (m0 + (row0 + 15) / group).min(last);
        for g in 0..8 {
            let pos = [0, 1].map(|r| (m0 + (row0 + g + 8 * r) / group).min(last));
            let wm = WarpMask::prepare(m, pos, first, warp_last, sq, sk);
            for (half, &p) in pos.iter().enumerate() {
                let r = row0 + g + 8 * half as i64;
                let Some((rp, _)) = row(r, group, positions, m0, sq) else {
                    continue;
                };
                assert_eq!(rp, p, "{what}: row {r} position");
                for &t in &tiles {
                    let n0 = t * bn;
                    for j in n0..n0 + bn {
                        let want = j < sk
                            && mask.visible(p as usize, j as usize, sq as usize, sk as usize);
                        assert_eq!(
                            wm.keeps(half, j, n0, bn),
                            want,
                            "{what}: m0 {m0} row {r} (position {p}) key {j}"
                        );
                    }
                }
            }
        }
    }
}

fn masks() -> Vec<Mask> {
    vec![
        Mask::new(Window::FULL, 0),
        Mask::new(Window::CAUSAL, 0),
        Mask::new(Window::new(Some(5), Some(0)), 3),
        Mask::new(Window::new(Some(40), Some(2)), 0),
        Mask::new(Window::new(None, Some(3)), 70),
        Mask::new(Window::new(Some(0), None), 0),
    ]
}

/// (tile rows, key tiles of the kernel's head-dim configurations, largest group) per kernel.
const KERNELS: [(&str, i64, &[i64], i64); 2] = [
    ("TensorCoreGqa", 64, &[64, 32], 64),
    ("HopperGqa", 128, &[128, 64], 128),
];

#[test]
fn gqa_packed_rows_cover_every_position_and_head_once() {
    for (name, block_m, _, max_group) in KERNELS {
        for group in 1..=max_group {
            let positions = block_m / group;
            for sq in [1i64, 2, 3, 5, 9, 17, 33, 64, 70, 130, 257] {
                // Fixed lengths (grid for sq) and a shorter varlen sequence in a grid sized for
                // a longer maximum.
                for seqlen_q in [sq, sq + 37] {
                    let what = format!("{name} group {group} sq {sq} grid for {seqlen_q}");
                    let mut seen = vec![0u32; (sq * group) as usize];
                    for m0 in block_starts(seqlen_q, sq, positions) {
                        check_block(
                            (block_m, 64),
                            group,
                            m0,
                            (sq, 1),
                            &masks()[0],
                            false,
                            &mut seen,
                            &what,
                        );
                    }
                    assert!(seen.iter().all(|&n| n == 1), "{what}: rows seen {seen:?}");
                }
            }
        }
    }
}

#[test]
fn gqa_packed_rows_mask_every_row_by_its_own_position() {
    let groups = [
        1i64, 2, 3, 4, 5, 6, 7, 8, 12, 16, 21, 31, 32, 33, 63, 64, 65, 100, 127, 128,
    ];
    for (name, block_m, bns, max_group) in KERNELS {
        for &group in groups.iter().filter(|&&g| g <= max_group) {
            let positions = block_m / group;
            for (sq, sk) in [
                (1i64, 1i64),
                (1, 300),
                (4, 129),
                (17, 129),
                (33, 64),
                (70, 200),
                (9, 3),
                (130, 130),
            ] {
                for mask in masks() {
                    for &bn in bns {
                        let what = format!("{name} group {group} sq {sq} sk {sk} {mask:?} bn {bn}");
                        let mut seen = vec![0u32; (sq * group) as usize];
                        for m0 in block_starts(sq, sq, positions) {
                            check_block(
                                (block_m, bn),
                                group,
                                m0,
                                (sq, sk),
                                &mask,
                                true,
                                &mut seen,
                                &what,
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The LSE index of each valid row (`store_lse` of both kernels): `(b * heads_q + head) *
/// seqlen_q + pos` for fixed lengths, `head * total_q + q_row0 + pos` for varlen: distinct
/// for every (sequence, head, position) and inside the buffer of `heads_q * total_q` floats.
#[test]
fn gqa_packed_rows_write_distinct_lse_entries() {
    let (heads_kv, group) = (3i64, 7i64);
    let heads_q = heads_kv * group;
    for (name, block_m, _, _) in KERNELS {
        let positions = block_m / group;
        for varlen in [false, true] {
            let lens = [5i64, 0, 23, 1];
            let seqlen_q = if varlen { 23 } else { 9 };
            let total_q: i64 = if varlen {
                lens.iter().sum()
            } else {
                lens.len() as i64 * seqlen_q
            };
            let mut seen = vec![false; (heads_q * total_q) as usize];
            let mut q_row0 = 0;
            for (b, &len) in lens.iter().enumerate() {
                let sq = if varlen { len } else { seqlen_q };
                for kvh in 0..heads_kv {
                    for m0 in block_starts(seqlen_q, sq, positions) {
                        for r in 0..block_m {
                            let Some((pos, h)) = row(r, group, positions, m0, sq) else {
                                continue;
                            };
                            let head = kvh * group + h;
                            let idx = if varlen {
                                head * total_q + q_row0 + pos
                            } else {
                                (b as i64 * heads_q + head) * seqlen_q + pos
                            };
                            assert!(
                                !seen[idx as usize],
                                "{name} varlen {varlen}: LSE {idx} twice"
                            );
                            seen[idx as usize] = true;
                        }
                    }
                }
                q_row0 += sq;
            }
            assert!(
                seen.iter().all(|&x| x),
                "{name} varlen {varlen}: LSE entries unwritten"
            );
        }
    }
}
