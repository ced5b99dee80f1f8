//! The key-tile schedule of fused neighborhood attention: which key tiles each query tile
//! visits, and which of them need the per-element mask. Pure host logic (tested on the CPU);
//! a fused tensor-core kernel consumes it, or computes the same thing on the device with the
//! same rules.
//!
//! **Dilation groups are independent problems.** A query at position `x = i * d + g` only
//! sees keys of its own dilation group `g` (`semantics.md`, rule 5), so each group is a
//! dilation-1 neighborhood problem on its own sub-grid of in-group indices
//! `Lg = ceil((L - g) / d)` per dim. Every tile below lives in one group's sub-grid: the
//! memory row of in-group coordinates `j` is `sum_a (j_a * d_a + g_a) * pitch_a` (index
//! math, no gather copy).
//!
//! **Query tiles** are boxes of `rows` (64 for the sm_80 `mma.sync` kernel's 4 warps x 16
//! rows, 128 for a Hopper warpgroup pair) in-group positions, with power-of-two extents
//! ([`NeighborhoodSchedule::new`] picks them; [`choose_query_tile`] says how). A box of
//! extents `T_a` under kernel `k_a` touches `T_a + k_a - 1` key positions per dim, so the
//! fraction of computed pairs that are visible is about `prod k_a / (T_a + k_a - 1)`: a
//! compact box beats a run of 128 tokens along one dim as soon as two dims have a kernel
//! larger than 1 (2-D 13x13: 8x16 keeps 0.22 of the pairs, 1x128 only 0.07).
//!
//! **The key set of a query tile is a box.** A neighborhood is the product of per-dim
//! windows, and a query tile is a product of per-dim index ranges, so the union of its
//! rows' neighborhoods is the product of per-dim unions; per dim, window starts and ends
//! never decrease along the dim and consecutive windows overlap (a stride `s <= k` moves a
//! window by at most `s` positions), so each per-dim union is one interval,
//! `[start(first row), end(last row))`. Every key of that box is visible to at least one
//! row of the tile (pick each coordinate's row per dim), so visiting the whole box wastes no
//! key that some row needs.
//!
//! **Key tiles are flat chunks** of `key_tile` keys of that box in row-major order (the last
//! dim fastest), not boxes: with dilation and with the head stride no box of keys is
//! contiguous in memory anyway, so the loader computes each row's address from its
//! coordinates (one div/mod per dim per row, as a gather by index would), and flat chunks
//! pad only the last chunk of a query tile instead of every edge of the box.
//!
//! **Interior and boundary tiles.** The keys every row of a query tile sees form the box of
//! per-dim intersections, `[start(last row), end(first row))`; a key tile inside that box is
//! *interior* and needs no per-element mask (every valid row sees every key). Any other key
//! tile is *boundary*: the kernel masks it per element (a key outside a row's window, a key
//! past the end of the chunk list, a row past the end of the group). Interior tiles only
//! exist when a query tile is smaller than the kernel along every dim (large windows).

use super::{MAX_NEIGHBORHOOD_DIMS, NeighborhoodAttention, NeighborhoodDim};
use crate::error::{Error, Result};
use std::ops::Range;

/// Query rows per tile of the sm_80 `mma.sync` kernel (4 warps x 16 rows).
pub const MMA_QUERY_ROWS: usize = 64;
/// Keys per key tile of the sm_80 `mma.sync` kernel.
pub const MMA_KEY_TILE: usize = 64;

/// In-group window `[start, end)` of in-group index `i` in dilation group `g` of `dim`.
fn group_window(dim: &NeighborhoodDim, g: usize, i: usize) -> Range<usize> {
    dim.window_unchecked(i * dim.dilation + g).0
}

/// In-group length of dilation group `g` of `dim`.
fn group_len(dim: &NeighborhoodDim, g: usize) -> usize {
    (dim.length - g).div_ceil(dim.dilation)
}

/// One key tile of a query tile: keys `start..start + len` of the query tile's key box in
/// row-major order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyTile {
    /// Offset of the tile's first key in the query tile's key box (row-major).
    pub start: usize,
    /// Keys in the tile (at most the schedule's `key_tile`).
    pub len: usize,
    /// Every valid row of the query tile sees every key of this tile: no element mask.
    pub interior: bool,
}

/// One query tile: a box of in-group positions of one dilation group, and the box of keys
/// its rows' neighborhoods cover. Dims past the problem's rank have extent 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryTile {
    /// Dilation group per dim.
    pub group: [usize; MAX_NEIGHBORHOOD_DIMS],
    /// In-group index of the tile's first row per dim.
    pub origin: [usize; MAX_NEIGHBORHOOD_DIMS],
    /// Rows of the tile inside the group per dim (at most the tile extent; the rest of the
    /// tile's rows are padding, neither computed into nor stored).
    pub valid: [usize; MAX_NEIGHBORHOOD_DIMS],
    /// Union of the valid rows' windows per dim, in-group key indices.
    pub keys: [Range<usize>; MAX_NEIGHBORHOOD_DIMS],
    /// Intersection of the valid rows' windows per dim (empty when some row pair's windows
    /// do not overlap): the keys every row sees.
    pub common: [Range<usize>; MAX_NEIGHBORHOOD_DIMS],
    /// This tile's entries of [`NeighborhoodSchedule::key_tiles`].
    pub key_tiles: Range<usize>,
}

impl QueryTile {
    /// Keys in the tile's key box.
    pub fn key_count(&self) -> usize {
        self.keys.iter().map(|r| r.len()).product()
    }
    /// Valid rows of the tile.
    pub fn valid_rows(&self) -> usize {
        self.valid.iter().product()
    }
}

/// The query tiles of a neighborhood problem and, per tile, its key tiles.
#[derive(Debug, Clone)]
pub struct NeighborhoodSchedule {
    /// The problem's dims, padded in front to [`MAX_NEIGHBORHOOD_DIMS`] with `(1, 1)` dims.
    dims: [NeighborhoodDim; MAX_NEIGHBORHOOD_DIMS],
    /// Query tile extents per (padded) dim; their product is `rows`.
    pub tile: [usize; MAX_NEIGHBORHOOD_DIMS],
    /// Query rows per tile (the product of `tile`).
    pub rows: usize,
    /// Keys per key tile.
    pub key_tile: usize,
    /// Non-empty query tiles, group-major then row-major over tile coordinates.
    pub tiles: Vec<QueryTile>,
    /// Key tiles of all query tiles, concatenated (see [`QueryTile::key_tiles`]).
    pub key_tiles: Vec<KeyTile>,
}

/// The problem's dims padded in front to rank 3 with dims of length 1 (no effect on windows
/// or flat token indices), so that every rank runs the same code.
pub(crate) fn padded_dims(
    attn: &NeighborhoodAttention,
) -> [NeighborhoodDim; MAX_NEIGHBORHOOD_DIMS] {
    let mut dims = [NeighborhoodDim::new(1, 1); MAX_NEIGHBORHOOD_DIMS];
    let off = MAX_NEIGHBORHOOD_DIMS - attn.dims.len();
    dims[off..].copy_from_slice(&attn.dims);
    dims
}

/// Query-tile extents of `rows` rows (a power of two) for `attn`: the power-of-two box with
/// the fewest computed (row, key) pairs over the whole grid under a flat key-tile size of
/// `key_tile`, i.e. the best trade between the halo `T_a + k_a - 1` per dim and padding rows
/// past the end of short dims. Ties keep the earlier candidate, which has more rows along
/// the later (contiguous) dims. Dims past the rank get extent 1.
pub fn choose_query_tile(
    attn: &NeighborhoodAttention,
    rows: usize,
    key_tile: usize,
) -> Result<[usize; MAX_NEIGHBORHOOD_DIMS]> {
    check_tile_sizes(rows, key_tile)?;
    let dims = padded_dims(attn);
    let off = MAX_NEIGHBORHOOD_DIMS - attn.dims.len();
    let log = rows.trailing_zeros() as usize;
    let mut best: Option<(u128, [usize; MAX_NEIGHBORHOOD_DIMS])> = None;
    // Exponents (e0, e1, e2) over the real dims with e0 + e1 + e2 = log; the outermost dim's
    // exponent grows slowest, so the first candidates favour the innermost dims.
    for e0 in 0..=log {
        for e1 in 0..=log - e0 {
            let e = [e0, e1, log - e0 - e1];
            if e[..off].iter().any(|&x| x != 0) {
                continue;
            }
            let tile = e.map(|x| 1usize << x);
            let cost = schedule_cost(&dims, tile, rows, key_tile);
            if best.as_ref().is_none_or(|(c, _)| cost < *c) {
                best = Some((cost, tile));
            }
        }
    }
    Ok(best.expect("one candidate at least").1)
}

/// Most query rows or keys per tile a schedule takes (far above any kernel's tile).
pub(super) const MAX_TILE: usize = 1 << 12;

fn check_tile_sizes(rows: usize, key_tile: usize) -> Result<()> {
    if !rows.is_power_of_two() || rows > MAX_TILE {
        return Err(Error::InvalidOption(format!(
            "neighborhood schedule: {rows} query rows per tile, a power of two up to \
             {MAX_TILE} expected"
        )));
    }
    check_key_tile(key_tile)
}

fn check_key_tile(key_tile: usize) -> Result<()> {
    if key_tile == 0 || key_tile > MAX_TILE {
        return Err(Error::InvalidOption(format!(
            "neighborhood schedule: {key_tile} keys per key tile, 1 to {MAX_TILE} expected"
        )));
    }
    Ok(())
}

/// Per-dim tiling of one dilation group: for tile index `t` along the dim, the valid rows,
/// the union and the intersection of their windows.
fn dim_tile(
    dim: &NeighborhoodDim,
    g: usize,
    extent: usize,
    t: usize,
) -> (usize, usize, Range<usize>, Range<usize>) {
    let lg = group_len(dim, g);
    let first = t * extent;
    let last = (first + extent).min(lg) - 1;
    let (wf, wl) = (group_window(dim, g, first), group_window(dim, g, last));
    let common = wl.start..wf.end.max(wl.start);
    (first, last + 1 - first, wf.start..wl.end, common)
}

/// Computed (row, key) pairs of the whole schedule for one (batch, head) without building
/// it: `rows * key_tile` per key tile.
fn schedule_cost(
    dims: &[NeighborhoodDim; MAX_NEIGHBORHOOD_DIMS],
    tile: [usize; MAX_NEIGHBORHOOD_DIMS],
    rows: usize,
    key_tile: usize,
) -> u128 {
    // Per dim, the union extents of every (group, tile index) pair: the key box of a tile is
    // their product, so the total is a sum over the product of these lists.
    let per_dim: Vec<Vec<usize>> = (0..MAX_NEIGHBORHOOD_DIMS)
        .map(|a| {
            let dim = &dims[a];
            (0..dim.dilation)
                .flat_map(|g| {
                    (0..group_len(dim, g).div_ceil(tile[a]))
                        .map(move |t| dim_tile(dim, g, tile[a], t).2.len())
                })
                .collect()
        })
        .collect();
    let mut chunks: u128 = 0;
    for &u0 in &per_dim[0] {
        for &u1 in &per_dim[1] {
            for &u2 in &per_dim[2] {
                chunks += (u0 * u1 * u2).div_ceil(key_tile) as u128;
            }
        }
    }
    chunks * (rows * key_tile) as u128
}

impl NeighborhoodSchedule {
    /// The schedule of `attn` with `rows` query rows per tile (a power of two; extents from
    /// [`choose_query_tile`]) and `key_tile` keys per key tile.
    pub fn new(attn: &NeighborhoodAttention, rows: usize, key_tile: usize) -> Result<Self> {
        let tile = choose_query_tile(attn, rows, key_tile)?;
        Self::with_tile(attn, tile, key_tile)
    }

    /// The schedule with explicit query-tile extents per padded dim (`[1, 1, 128]` for a 1-D
    /// tile of 128; their product is the rows per tile).
    pub fn with_tile(
        attn: &NeighborhoodAttention,
        tile: [usize; MAX_NEIGHBORHOOD_DIMS],
        key_tile: usize,
    ) -> Result<Self> {
        let rows = tile
            .iter()
            .try_fold(1usize, |acc, &t| acc.checked_mul(t))
            .unwrap_or(0);
        if tile.contains(&0) {
            return Err(Error::InvalidOption(format!(
                "neighborhood schedule: tile extents {tile:?} must be >= 1"
            )));
        }
        if rows > MAX_TILE {
            return Err(Error::InvalidOption(format!(
                "neighborhood schedule: tile {tile:?} has more than {MAX_TILE} rows"
            )));
        }
        check_key_tile(key_tile)?;
        let dims = padded_dims(attn);
        let off = MAX_NEIGHBORHOOD_DIMS - attn.dims.len();
        if tile[..off].iter().any(|&t| t != 1) {
            return Err(Error::InvalidOption(format!(
                "neighborhood schedule: tile {tile:?} has extents > 1 past the rank {}",
                attn.dims.len()
            )));
        }
        let mut tiles = Vec::new();
        let mut key_tiles = Vec::new();
        let [d0, d1, d2] = dims.each_ref().map(|d| d.dilation);
        for g0 in 0..d0 {
            for g1 in 0..d1 {
                for g2 in 0..d2 {
                    let group = [g0, g1, g2];
                    let counts: [usize; MAX_NEIGHBORHOOD_DIMS] =
                        std::array::from_fn(|a| group_len(&dims[a], group[a]).div_ceil(tile[a]));
                    for t0 in 0..counts[0] {
                        for t1 in 0..counts[1] {
                            for t2 in 0..counts[2] {
                                let t = [t0, t1, t2];
                                let per: [_; MAX_NEIGHBORHOOD_DIMS] = std::array::from_fn(|a| {
                                    dim_tile(&dims[a], group[a], tile[a], t[a])
                                });
                                let first = key_tiles.len();
                                let mut qt = QueryTile {
                                    group,
                                    origin: per.each_ref().map(|p| p.0),
                                    valid: per.each_ref().map(|p| p.1),
                                    keys: per.each_ref().map(|p| p.2.clone()),
                                    common: per.each_ref().map(|p| p.3.clone()),
                                    key_tiles: first..first,
                                };
                                push_key_tiles(&qt, key_tile, &mut key_tiles);
                                qt.key_tiles = first..key_tiles.len();
                                tiles.push(qt);
                            }
                        }
                    }
                }
            }
        }
        Ok(NeighborhoodSchedule {
            dims,
            tile,
            rows,
            key_tile,
            tiles,
            key_tiles,
        })
    }

    /// The key tiles of query tile `tile`.
    pub fn key_tiles_of(&self, tile: &QueryTile) -> &[KeyTile] {
        &self.key_tiles[tile.key_tiles.clone()]
    }

    /// Flat token of in-group coordinates `j` of dilation group `group` (row-major grid).
    fn token(
        &self,
        group: &[usize; MAX_NEIGHBORHOOD_DIMS],
        j: [usize; MAX_NEIGHBORHOOD_DIMS],
    ) -> usize {
        (0..MAX_NEIGHBORHOOD_DIMS).fold(0, |flat, a| {
            flat * self.dims[a].length + j[a] * self.dims[a].dilation + group[a]
        })
    }

    /// Flat token of query row `r` of `tile` (row-major over the tile extents), or `None`
    /// for a padding row past the end of the group.
    pub fn row_token(&self, tile: &QueryTile, r: usize) -> Option<usize> {
        let c = unravel(r, self.tile);
        if (0..MAX_NEIGHBORHOOD_DIMS).any(|a| c[a] >= tile.valid[a]) {
            return None;
        }
        Some(self.token(&tile.group, std::array::from_fn(|a| tile.origin[a] + c[a])))
    }

    /// Flat token of key `n` (row-major) of `tile`'s key box.
    pub fn key_token(&self, tile: &QueryTile, n: usize) -> usize {
        let ext = tile.keys.each_ref().map(|r| r.len());
        let c = unravel(n, ext);
        self.token(
            &tile.group,
            std::array::from_fn(|a| tile.keys[a].start + c[a]),
        )
    }

    /// (row, key) pairs the fused kernel computes per (batch, head): `rows * key_tile` per
    /// key tile.
    pub fn computed_pairs(&self) -> u64 {
        (self.key_tiles.len() * self.rows * self.key_tile) as u64
    }

    /// Key tiles that need no element mask.
    pub fn interior_tiles(&self) -> usize {
        self.key_tiles.iter().filter(|t| t.interior).count()
    }
}

/// Row-major coordinates of `n` in a box of extents `ext` (the last dim fastest).
pub(super) fn unravel(
    mut n: usize,
    ext: [usize; MAX_NEIGHBORHOOD_DIMS],
) -> [usize; MAX_NEIGHBORHOOD_DIMS] {
    let mut c = [0; MAX_NEIGHBORHOOD_DIMS];
    for a in (0..MAX_NEIGHBORHOOD_DIMS).rev() {
        c[a] = n % ext[a];
        n /= ext[a];
    }
    c
}

/// Cuts `qt`'s key box into flat chunks of `key_tile` keys and marks the interior ones: a
/// chunk is interior when its bounding box lies inside the box every row sees. The bounding
/// box of a row-major range is exact in the dims before the first one where its ends
/// differ, the ends' range in that dim, and the full extent after it (an over-estimate at
/// worst, which only turns an interior chunk into a masked one).
pub(super) fn push_key_tiles(qt: &QueryTile, key_tile: usize, out: &mut Vec<KeyTile>) {
    let ext = qt.keys.each_ref().map(|r| r.len());
    let total = qt.key_count();
    let common_nonempty = qt.common.iter().all(|r| !r.is_empty());
    let mut start = 0;
    while start < total {
        let len = key_tile.min(total - start);
        let interior = common_nonempty && {
            let (f, l) = (unravel(start, ext), unravel(start + len - 1, ext));
            let split = (0..MAX_NEIGHBORHOOD_DIMS).find(|&a| f[a] != l[a]);
            (0..MAX_NEIGHBORHOOD_DIMS).all(|a| {
                let (lo, hi) = match split {
                    Some(s) if a > s => (0, ext[a] - 1),
                    _ => (f[a], l[a]),
                };
                let (lo, hi) = (qt.keys[a].start + lo, qt.keys[a].start + hi);
                qt.common[a].start <= lo && hi < qt.common[a].end
            })
        };
        // A short last chunk is masked all the same in a kernel with fixed-size key tiles
        // (its zero-filled tail must not count), so only full chunks are interior.
        out.push(KeyTile {
            start,
            len,
            interior: interior && len == key_tile,
        });
        start += len;
    }
}

/// Query rows per block of the Hopper kernel (`kernels/neighborhood_wgmma.cu`: two consumer
/// warpgroups of 64 rows).
pub const HOPPER_QUERY_ROWS: usize = 128;
/// Keys per key box of the Hopper kernel (the n of its `S = Q K^T` wgmma).
pub const HOPPER_KEY_TILE: usize = 128;
/// Largest dilation the Hopper kernel takes: its tensor maps sample one dilation group with
/// `elementStrides = dilation`, which the copy engine bounds by 8.
pub const HOPPER_MAX_DILATION: usize = 8;
/// Most positions one tensor-map box dim spans (`extent * dilation`), the copy engine's bound.
const TMA_BOX_SPAN: usize = 256;

/// The Hopper kernel's box shapes for one problem (`LaNaHopperTiles`): a block owns a box of
/// `query` in-group positions per (padded) dim, 128 in all, of one dilation group, and visits
/// the union of its rows' windows per dim in boxes of `key` keys per dim, 128 in all. Each box
/// is one bulk tensor copy, so per dim `extent * dilation <= 256`. The device computes the
/// same blocks, key ranges and key boxes ([`HopperTiles::blocks`], [`HopperTiles::key_boxes`]
/// mirror it for the tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HopperTiles {
    dims: [NeighborhoodDim; MAX_NEIGHBORHOOD_DIMS],
    /// The problem's rank (1 to 3); dims before the last `rank` are padding.
    pub rank: usize,
    /// Query box extents per padded dim (powers of two, product 128).
    pub query: [usize; MAX_NEIGHBORHOOD_DIMS],
    /// Key box extents per padded dim (powers of two, product 128).
    pub key: [usize; MAX_NEIGHBORHOOD_DIMS],
}

/// One block of the Hopper kernel: a query box of one dilation group and its key range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopperBlock {
    /// Dilation group per dim.
    pub group: [usize; MAX_NEIGHBORHOOD_DIMS],
    /// In-group index of the box's first row per dim.
    pub origin: [usize; MAX_NEIGHBORHOOD_DIMS],
    /// Rows of the box inside the group per dim (the rest are padding, zero-filled).
    pub valid: [usize; MAX_NEIGHBORHOOD_DIMS],
    /// Union of the valid rows' windows per dim (in-group key indices).
    pub keys: [Range<usize>; MAX_NEIGHBORHOOD_DIMS],
    /// Key boxes per dim over `keys` (the last may run past the union: masked).
    pub tiles: [usize; MAX_NEIGHBORHOOD_DIMS],
}

/// One dim's share of a [`HopperBlock`].
struct DimBlock {
    group: usize,
    origin: usize,
    valid: usize,
    keys: Range<usize>,
    tiles: usize,
}

impl HopperTiles {
    /// The box shapes with the fewest computed (row, key) pairs for `attn` among those the
    /// copy engine can load (`extent * dilation <= 256` per dim); `Error::Unsupported` where
    /// a dilation exceeds [`HOPPER_MAX_DILATION`] or no box shape fits (1-D dilation above 2:
    /// 128 positions times the dilation pass 256), with the reason.
    pub fn new(attn: &NeighborhoodAttention) -> Result<Self> {
        let dims = padded_dims(attn);
        let rank = attn.dims.len();
        let off = MAX_NEIGHBORHOOD_DIMS - rank;
        if let Some((a, d)) = attn
            .dims
            .iter()
            .enumerate()
            .find(|(_, d)| d.dilation > HOPPER_MAX_DILATION)
        {
            return Err(Error::Unsupported(format!(
                "the Hopper neighborhood kernel takes dilation <= {HOPPER_MAX_DILATION} (the \
                 copy engine's element stride); dim {a} has {}",
                d.dilation
            )));
        }
        let log = HOPPER_QUERY_ROWS.trailing_zeros() as usize;
        // Per dim and exponent pair, the key boxes summed over the dim's (group, box) pairs:
        // the schedule is separable, so the total is their product.
        let per_dim_cost = |a: usize, eq: usize, ek: usize| -> Option<u128> {
            let dim = &dims[a];
            let (tq, tk) = (1usize << eq, 1usize << ek);
            if tq * dim.dilation > TMA_BOX_SPAN || tk * dim.dilation > TMA_BOX_SPAN {
                return None;
            }
            let mut sum = 0u128;
            for g in 0..dim.dilation {
                for t in 0..group_len(dim, g).div_ceil(tq) {
                    sum += dim_tile(dim, g, tq, t).2.len().div_ceil(tk) as u128;
                }
            }
            Some(sum)
        };
        let splits: Vec<[usize; MAX_NEIGHBORHOOD_DIMS]> = (0..=log)
            .flat_map(|e0| (0..=log - e0).map(move |e1| [e0, e1, log - e0 - e1]))
            .filter(|e| e[..off].iter().all(|&x| x == 0))
            .collect();
        let mut best: Option<(u128, [usize; 3], [usize; 3])> = None;
        for eq in &splits {
            for ek in &splits {
                let cost = (0..MAX_NEIGHBORHOOD_DIMS)
                    .map(|a| per_dim_cost(a, eq[a], ek[a]))
                    .try_fold(1u128, |acc, c| c.map(|c| acc.saturating_mul(c)));
                if let Some(cost) = cost
                    && best.as_ref().is_none_or(|(c, _, _)| cost < *c)
                {
                    best = Some((cost, *eq, *ek));
                }
            }
        }
        let Some((_, eq, ek)) = best else {
            return Err(Error::Unsupported(format!(
                "the Hopper neighborhood kernel loads boxes of 128 positions with extent * \
                 dilation <= {TMA_BOX_SPAN} per dim; no box shape fits the dilations {:?}",
                attn.dims.iter().map(|d| d.dilation).collect::<Vec<_>>()
            )));
        };
        let tiles = HopperTiles {
            dims,
            rank,
            query: eq.map(|e| 1 << e),
            key: ek.map(|e| 1 << e),
        };
        if tiles.grid_blocks().is_none_or(|b| b > i32::MAX as usize) {
            return Err(Error::Unsupported(
                "the Hopper neighborhood kernel's grid would exceed 2^31 - 1 blocks per (batch, \
                 head)"
                    .into(),
            ));
        }
        Ok(tiles)
    }

    /// Query boxes per dim of the longest (first) dilation group: the device's blocks per dim
    /// and group.
    fn boxes(&self, a: usize) -> usize {
        group_len(&self.dims[a], 0).div_ceil(self.query[a])
    }

    /// Blocks of the launch per (batch, head), those past a shorter group's end included
    /// (they exit at once); `None` on overflow.
    pub fn grid_blocks(&self) -> Option<usize> {
        (0..MAX_NEIGHBORHOOD_DIMS).try_fold(1usize, |acc, a| {
            acc.checked_mul(self.boxes(a).checked_mul(self.dims[a].dilation)?)
        })
    }

    /// The active blocks in the device's order (block index per dim: group-major, then box;
    /// the last dim fastest), as the kernel computes them.
    pub fn blocks(&self) -> Vec<HopperBlock> {
        // Per dim, its (group, box) pairs: (group, origin, valid, key range, key boxes).
        let per_dim: Vec<Vec<DimBlock>> = (0..MAX_NEIGHBORHOOD_DIMS)
            .map(|a| {
                let dim = &self.dims[a];
                let mut v = Vec::new();
                for g in 0..dim.dilation {
                    for t in 0..self.boxes(a) {
                        if t * self.query[a] >= group_len(dim, g) {
                            continue; // inactive: past this group's end
                        }
                        let (origin, valid, keys, _) = dim_tile(dim, g, self.query[a], t);
                        let tiles = keys.len().div_ceil(self.key[a]);
                        v.push(DimBlock {
                            group: g,
                            origin,
                            valid,
                            keys,
                            tiles,
                        });
                    }
                }
                v
            })
            .collect();
        let mut out = Vec::new();
        for b0 in &per_dim[0] {
            for b1 in &per_dim[1] {
                for b2 in &per_dim[2] {
                    let p = [b0, b1, b2];
                    out.push(HopperBlock {
                        group: p.map(|x| x.group),
                        origin: p.map(|x| x.origin),
                        valid: p.map(|x| x.valid),
                        keys: p.map(|x| x.keys.clone()),
                        tiles: p.map(|x| x.tiles),
                    });
                }
            }
        }
        out
    }

    /// First in-group key per dim of every key box of `block` (row-major over the per-dim
    /// box counts, the kernel's order).
    pub fn key_boxes(&self, block: &HopperBlock) -> Vec<[usize; MAX_NEIGHBORHOOD_DIMS]> {
        let mut out = Vec::new();
        for t0 in 0..block.tiles[0] {
            for t1 in 0..block.tiles[1] {
                for t2 in 0..block.tiles[2] {
                    let t = [t0, t1, t2];
                    out.push(std::array::from_fn(|a| {
                        block.keys[a].start + t[a] * self.key[a]
                    }));
                }
            }
        }
        out
    }

    /// (row, key) pairs the kernel computes per (batch, head): 128 x 128 per key box.
    pub fn computed_pairs(&self) -> u128 {
        self.blocks()
            .iter()
            .map(|b| b.tiles.iter().product::<usize>() as u128)
            .sum::<u128>()
            * (HOPPER_QUERY_ROWS * HOPPER_KEY_TILE) as u128
    }

    /// `log2` of the extents, as `LaNaHopperTiles` takes them.
    pub fn log2(&self) -> ([i32; MAX_NEIGHBORHOOD_DIMS], [i32; MAX_NEIGHBORHOOD_DIMS]) {
        (
            self.query.map(|t| t.trailing_zeros() as i32),
            self.key.map(|t| t.trailing_zeros() as i32),
        )
    }
}

/// Visible (query, key) pairs of one (batch, head): the sum over queries of their
/// neighborhood sizes. The grid is a product of dims and a neighborhood a product of
/// per-dim windows, so this is the product over dims of the per-dim window-length sums.
pub fn visible_pairs(attn: &NeighborhoodAttention) -> u128 {
    attn.dims
        .iter()
        .map(|dim| {
            (0..dim.length)
                .map(|x| dim.window_unchecked(x).0.len() as u128)
                .sum::<u128>()
        })
        .product()
}

/// Pairs of dense (non-causal) attention over the same grid, per (batch, head).
pub fn dense_pairs(attn: &NeighborhoodAttention) -> u128 {
    let n = attn.tokens as u128;
    n * n
}

/// FLOP-bound speedup of neighborhood over dense attention on the same grid: the ratio of
/// their pair counts (both cost `4 * head_dim` FLOPs per pair).
pub fn flop_bound_ratio(attn: &NeighborhoodAttention) -> f64 {
    dense_pairs(attn) as f64 / visible_pairs(attn) as f64
}

/// Forward FLOPs over visible pairs (`4 * head_dim` per pair: Q K^T and P V), all batches
/// and heads.
pub fn visible_flops(attn: &NeighborhoodAttention) -> f64 {
    4.0 * attn.head_dim as f64 * visible_pairs(attn) as f64 * (attn.batch * attn.heads_q) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::AttentionOptions;
    use crate::neighborhood::NeighborhoodShape;

    fn attn(dims: &[NeighborhoodDim]) -> NeighborhoodAttention {
        NeighborhoodAttention::new(
            &NeighborhoodShape {
                batch: 1,
                heads_q: 1,
                heads_kv: 1,
                head_dim: 8,
                dims,
            },
            &AttentionOptions::default(),
        )
        .unwrap()
    }

    #[test]
    fn default_tiles_are_compact_boxes() {
        let one = attn(&[NeighborhoodDim::new(32768, 2048)]);
        assert_eq!(choose_query_tile(&one, 128, 64).unwrap(), [1, 1, 128]);
        let two = attn(&[NeighborhoodDim::new(128, 13), NeighborhoodDim::new(128, 13)]);
        let t = choose_query_tile(&two, 128, 64).unwrap();
        assert!(t[1] >= 4 && t[2] >= 4, "{t:?}");
        let three = attn(&[
            NeighborhoodDim::new(16, 3),
            NeighborhoodDim::new(64, 7),
            NeighborhoodDim::new(64, 7),
        ]);
        let t = choose_query_tile(&three, 128, 64).unwrap();
        assert!(t.iter().all(|&x| x >= 2), "{t:?}");
    }

    #[test]
    fn pair_counts() {
        // 1-D, L = 10, k = 3: every query sees 3 keys.
        let a = attn(&[NeighborhoodDim::new(10, 3)]);
        assert_eq!(visible_pairs(&a), 30);
        assert_eq!(dense_pairs(&a), 100);
        // Causal k = 3: 1 + 2 + 3 * 8.
        let c = attn(&[NeighborhoodDim::new(10, 3).with_causal(true)]);
        assert_eq!(visible_pairs(&c), 27);
        // 2-D product.
        let b = attn(&[NeighborhoodDim::new(10, 3), NeighborhoodDim::new(6, 2)]);
        assert_eq!(visible_pairs(&b), 30 * 12);
        assert!((flop_bound_ratio(&b) - 3600.0 / 360.0).abs() < 1e-12);
    }
}
