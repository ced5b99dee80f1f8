//! The Hopper neighborhood kernel's host-side pieces (`neighborhood::schedule::HopperTiles`)
//! against the reference's neighbor lists (`NeighborhoodAttention::neighbors`), for random
//! problems (ranks 1-3, odd and even kernels, dilation with lengths it does not divide,
//! causal dims, strides, grids not multiples of the boxes): every query token is a valid row
//! of exactly one block, each block's key range per dim is exactly the union of its rows'
//! windows, its key boxes cover every key its rows see exactly once, the kernel's element
//! mask is exactly the neighbor list, its per-warp interior rule (a key box inside the common
//! window of the warp's valid rows skips the mask) never skips a masked key, and the box
//! shapes respect the copy engine's bounds.
//! The kernel's own block decode (block index to group, origin, valid rows, key range) is
//! replayed step by step and must give the same blocks in the same order.
//! Prints the computed-vs-visible pair ratio of the benchmark problems.

mod common;

use common::neighborhood::{bench_problems, problem, random_dim};
use common::rng;
use longattn::neighborhood::schedule::{
    HOPPER_KEY_TILE, HOPPER_QUERY_ROWS, HopperBlock, HopperTiles, visible_pairs,
};
use longattn::*;
use rand::Rng;
use std::collections::{HashMap, HashSet};

/// The problem's dims padded in front to three (length 1, kernel 1), as the kernel sees them.
fn padded(attn: &NeighborhoodAttention) -> [NeighborhoodDim; 3] {
    let mut p = [NeighborhoodDim::new(1, 1); 3];
    let off = 3 - attn.dims().len();
    p[off..].copy_from_slice(attn.dims());
    p
}

/// Flat token of positions `x` (row-major) or `None` past the grid.
fn flat(dims: &[NeighborhoodDim; 3], x: [usize; 3]) -> Option<usize> {
    (0..3).try_fold(0usize, |acc, a| {
        (x[a] < dims[a].length).then(|| acc * dims[a].length + x[a])
    })
}

/// Row-major coordinates of `n` in a box of extents `ext` (the last dim fastest).
fn unravel(mut n: usize, ext: [usize; 3]) -> [usize; 3] {
    let mut c = [0; 3];
    for a in (0..3).rev() {
        c[a] = n % ext[a];
        n /= ext[a];
    }
    c
}

/// Position (grid coordinates) of in-group coordinates `j` of `block`'s group.
fn position(dims: &[NeighborhoodDim; 3], b: &HopperBlock, j: [usize; 3]) -> [usize; 3] {
    std::array::from_fn(|a| j[a] * dims[a].dilation + b.group[a])
}

/// Token of query row `r` of `block`, `None` for a padding row.
fn row_token(
    dims: &[NeighborhoodDim; 3],
    t: &HopperTiles,
    b: &HopperBlock,
    r: usize,
) -> Option<usize> {
    let c = unravel(r, t.query);
    if (0..3).any(|a| c[a] >= b.valid[a]) {
        return None;
    }
    flat(
        dims,
        position(dims, b, std::array::from_fn(|a| b.origin[a] + c[a])),
    )
}

/// In-group window of the row at in-group index `i` along dim `a` (the reference's window).
fn window(
    dims: &[NeighborhoodDim; 3],
    b: &HopperBlock,
    a: usize,
    i: usize,
) -> std::ops::Range<usize> {
    dims[a].window(i * dims[a].dilation + b.group[a]).unwrap().0
}

/// The active blocks as the kernel decodes them (`NaWgProblem`'s constructor and
/// `schedule()` in `kernels/neighborhood_wgmma.cu`, step by step): block index per dim
/// `group * boxes + box` (boxes of the first group, the last dim fastest), valid rows
/// `min(extent, group length - origin)` (inactive at <= 0), key range from the first row's
/// window start to the last valid row's window end, key boxes over it.
fn device_blocks(dims: &[NeighborhoodDim; 3], t: &HopperTiles) -> Vec<HopperBlock> {
    let mut out = Vec::new();
    for x in 0..t.grid_blocks().unwrap() {
        let mut rest = x;
        let mut group = [0usize; 3];
        let mut origin = [0usize; 3];
        let mut valid = [0isize; 3];
        for d in (0..3).rev() {
            let dil = dims[d].dilation;
            let n = dims[d].length.div_ceil(dil).div_ceil(t.query[d]);
            let u = rest % (n * dil);
            rest /= n * dil;
            group[d] = u / n;
            origin[d] = (u % n) * t.query[d];
            let lg = (dims[d].length - group[d]).div_ceil(dil);
            valid[d] = (t.query[d] as isize).min(lg as isize - origin[d] as isize);
        }
        if valid.iter().any(|&v| v <= 0) {
            continue;
        }
        let valid = valid.map(|v| v as usize);
        let keys: [std::ops::Range<usize>; 3] = std::array::from_fn(|d| {
            let dil = dims[d].dilation;
            let first = dims[d].window(origin[d] * dil + group[d]).unwrap().0;
            let last = dims[d]
                .window((origin[d] + valid[d] - 1) * dil + group[d])
                .unwrap()
                .0;
            first.start..last.end
        });
        let tiles = std::array::from_fn(|d| keys[d].len().div_ceil(t.key[d]));
        out.push(HopperBlock {
            group,
            origin,
            valid,
            keys,
            tiles,
        });
    }
    out
}

/// Exhaustive check of `attn`'s Hopper tiling; returns (computed, visible) pairs.
fn check(attn: &NeighborhoodAttention, what: &str) -> (u128, u128) {
    let t = HopperTiles::new(attn).unwrap_or_else(|e| panic!("{what}: {e}"));
    let dims = padded(attn);
    assert_eq!(
        t.query.iter().product::<usize>(),
        HOPPER_QUERY_ROWS,
        "{what}"
    );
    assert_eq!(t.key.iter().product::<usize>(), HOPPER_KEY_TILE, "{what}");
    for (a, dim) in dims.iter().enumerate() {
        assert!(t.query[a] * dim.dilation <= 256, "{what}: {t:?}");
        assert!(t.key[a] * dim.dilation <= 256, "{what}: {t:?}");
        if a < 3 - attn.dims().len() {
            assert_eq!((t.query[a], t.key[a]), (1, 1), "{what}: padded dim");
        }
    }
    let blocks = t.blocks();
    assert!(blocks.len() <= t.grid_blocks().unwrap(), "{what}");
    assert_eq!(
        device_blocks(&dims, &t),
        blocks,
        "{what}: the kernel's block decode"
    );
    let mut owner: HashMap<usize, usize> = HashMap::new();
    for (bi, b) in blocks.iter().enumerate() {
        // Key range per dim: the union of the valid rows' windows, exactly.
        for a in 0..3 {
            assert!(b.valid[a] >= 1 && b.valid[a] <= t.query[a], "{what}");
            let mut lo = usize::MAX;
            let mut hi = 0;
            for i in b.origin[a]..b.origin[a] + b.valid[a] {
                let w = window(&dims, b, a, i);
                lo = lo.min(w.start);
                hi = hi.max(w.end);
            }
            assert_eq!(b.keys[a], lo..hi, "{what}: block {bi} dim {a}");
        }
        // Key boxes: each in-grid key at most once.
        let mut covered: HashSet<usize> = HashSet::new();
        let boxes = t.key_boxes(b);
        assert_eq!(boxes.len(), b.tiles.iter().product::<usize>(), "{what}");
        let mut box_keys: Vec<Vec<Option<usize>>> = Vec::new();
        for kb in &boxes {
            let keys: Vec<Option<usize>> = (0..HOPPER_KEY_TILE)
                .map(|n| {
                    let c = unravel(n, t.key);
                    flat(
                        &dims,
                        position(&dims, b, std::array::from_fn(|a| kb[a] + c[a])),
                    )
                })
                .collect();
            for k in keys.iter().flatten() {
                assert!(covered.insert(*k), "{what}: key {k} in two key boxes");
            }
            box_keys.push(keys);
        }
        // Rows: every token in exactly one block; every neighbor covered.
        let mut rows: Vec<Option<(usize, HashSet<usize>)>> = Vec::new();
        for r in 0..HOPPER_QUERY_ROWS {
            let row = row_token(&dims, &t, b, r).map(|tok| {
                assert!(
                    owner.insert(tok, bi).is_none(),
                    "{what}: token {tok} in two blocks"
                );
                let nb: HashSet<usize> = attn.neighbors(tok).unwrap().collect();
                for k in &nb {
                    assert!(
                        covered.contains(k),
                        "{what}: neighbor {k} of {tok} not loaded"
                    );
                }
                (tok, nb)
            });
            // The kernel's element mask (mask_tile): key column n of a box is visible iff
            // inside the row's window along every dim; it must be exactly the neighbor list,
            // and never pass a key past the grid (zero-filled).
            if let Some((tok, nb)) = &row {
                let c = unravel(r, t.query);
                let win: [std::ops::Range<usize>; 3] =
                    std::array::from_fn(|a| window(&dims, b, a, b.origin[a] + c[a]));
                for (kb, keys) in boxes.iter().zip(&box_keys) {
                    for (n, key) in keys.iter().enumerate() {
                        let kc = unravel(n, t.key);
                        let vis = (0..3).all(|a| win[a].contains(&(kb[a] + kc[a])));
                        let want = key.is_some_and(|k| nb.contains(&k));
                        assert_eq!(vis, want, "{what}: row {tok} key box {kb:?} column {n}");
                    }
                }
            }
            rows.push(row);
        }
        // The kernel's per-warp interior rule: a key box inside the common window (per dim)
        // of the warp's valid rows skips the mask, so all of its keys must be visible.
        for warp in 0..HOPPER_QUERY_ROWS / 16 {
            let valid_rows: Vec<usize> = (16 * warp..16 * warp + 16)
                .filter(|&r| rows[r].is_some())
                .collect();
            if valid_rows.is_empty() {
                continue;
            }
            let common: [(usize, usize); 3] = std::array::from_fn(|a| {
                valid_rows.iter().fold((0, usize::MAX), |(lo, hi), &r| {
                    let c = unravel(r, t.query);
                    let w = window(&dims, b, a, b.origin[a] + c[a]);
                    (lo.max(w.start), hi.min(w.end))
                })
            });
            for (kb, keys) in boxes.iter().zip(&box_keys) {
                let interior =
                    (0..3).all(|a| kb[a] >= common[a].0 && kb[a] + t.key[a] <= common[a].1);
                if !interior {
                    continue;
                }
                for &r in &valid_rows {
                    let (tok, nb) = rows[r].as_ref().unwrap();
                    for k in keys {
                        let k = k.unwrap_or_else(|| panic!("{what}: interior box past the grid"));
                        assert!(nb.contains(&k), "{what}: interior key {k} masked for {tok}");
                    }
                }
            }
        }
    }
    assert_eq!(owner.len(), attn.tokens(), "{what}: every token owned");
    (t.computed_pairs(), visible_pairs(attn))
}

#[test]
fn hopper_tiles_cover_exactly_the_neighborhoods() {
    let mut r = rng(0x40_7e_13);
    let mut cases: Vec<Vec<NeighborhoodDim>> = vec![
        vec![NeighborhoodDim::new(300, 7)],
        vec![NeighborhoodDim::new(257, 256)],
        vec![NeighborhoodDim::new(301, 40).with_dilation(2)],
        vec![NeighborhoodDim::new(200, 9).with_causal(true)],
        vec![NeighborhoodDim::new(20, 13), NeighborhoodDim::new(23, 13)],
        vec![
            NeighborhoodDim::new(19, 4).with_dilation(3),
            NeighborhoodDim::new(30, 6).with_stride(4),
        ],
        vec![NeighborhoodDim::new(17, 17), NeighborhoodDim::new(9, 9)],
        vec![
            NeighborhoodDim::new(5, 3).with_causal(true),
            NeighborhoodDim::new(13, 4).with_dilation(2),
            NeighborhoodDim::new(11, 5),
        ],
        vec![
            NeighborhoodDim::new(1, 1),
            NeighborhoodDim::new(12, 3),
            NeighborhoodDim::new(7, 7),
        ],
    ];
    for _ in 0..40 {
        let rank = r.random_range(1..=3);
        let max_len = [0, 400, 40, 14][rank];
        let max_dil = if rank == 1 { 2 } else { 4 };
        cases.push(
            (0..rank)
                .map(|_| random_dim(&mut r, max_len, max_dil))
                .collect(),
        );
    }
    for dims in cases {
        let what = format!("{dims:?}");
        let (computed, visible) = check(&problem(&dims), &what);
        assert!(computed >= visible, "{what}");
    }
}

#[test]
fn hopper_tiles_refuse_what_the_copy_engine_cannot_load() {
    let unsupported = |dims: &[NeighborhoodDim]| {
        matches!(HopperTiles::new(&problem(dims)), Err(Error::Unsupported(_)))
    };
    // Element strides are at most 8.
    assert!(unsupported(&[
        NeighborhoodDim::new(100, 3),
        NeighborhoodDim::new(100, 3).with_dilation(9)
    ]));
    // 1-D: 128 positions times a dilation above 2 pass the 256-position box span.
    assert!(unsupported(&[
        NeighborhoodDim::new(1000, 5).with_dilation(3)
    ]));
    assert!(HopperTiles::new(&problem(&[NeighborhoodDim::new(1000, 5).with_dilation(2)])).is_ok());
    // 2-D dilation 8 in both dims: 16 x 8 boxes (16 * 8 <= 256, 8 * 8 <= 256) fit.
    let t = HopperTiles::new(&problem(&[
        NeighborhoodDim::new(200, 7).with_dilation(8),
        NeighborhoodDim::new(200, 7).with_dilation(8),
    ]))
    .unwrap();
    assert!(t.query[1] * 8 <= 256 && t.query[2] * 8 <= 256, "{t:?}");
}

#[test]
fn hopper_tile_waste_of_the_benchmark_problems() {
    let problems = bench_problems();
    for (name, dims) in problems {
        let attn = problem(&dims);
        let t = HopperTiles::new(&attn).unwrap();
        let (c, v) = (t.computed_pairs(), visible_pairs(&attn));
        assert!(c >= v);
        println!(
            "{name}: query box {:?}, key box {:?}, computed / visible pairs {:.3} (efficiency {:.2})",
            t.query,
            t.key,
            c as f64 / v as f64,
            v as f64 / c as f64
        );
    }
}
