//! The fused kernels' key-tile schedule (`neighborhood::schedule`) against the reference's
//! neighbor lists: for random problems (ranks 1-3, odd and even kernels, dilation with
//! lengths it does not divide, causal dims, strides) every query token lies in exactly one
//! query tile, the key tiles of its tile hold every key it sees, every key of a tile's key
//! box is seen by some row of the tile, and interior key tiles are fully visible to every
//! row. Prints the computed-vs-visible pair ratio per problem.

mod common;

use common::neighborhood::{bench_problems, problem, random_dim};
use common::rng;
use longattn::neighborhood::schedule::{
    MMA_KEY_TILE, MMA_QUERY_ROWS, NeighborhoodSchedule, dense_pairs, visible_pairs,
};
use longattn::*;
use std::collections::HashSet;

/// Checks `sched` against `attn.neighbors` exhaustively; returns (computed, visible) pairs.
fn check(attn: &NeighborhoodAttention, sched: &NeighborhoodSchedule, what: &str) -> (u64, u64) {
    let n = attn.tokens();
    let mut owner = vec![usize::MAX; n];
    let mut visible = 0u64;
    for (ti, tile) in sched.tiles.iter().enumerate() {
        let kts = sched.key_tiles_of(tile);
        assert!(!kts.is_empty(), "{what}: tile {ti} has no key tile");
        // Key tiles cover the key box exactly, in order.
        let mut next = 0;
        for kt in kts {
            assert_eq!(kt.start, next, "{what}: tile {ti} key tiles not contiguous");
            assert!(kt.len >= 1 && kt.len <= sched.key_tile);
            next += kt.len;
        }
        assert_eq!(next, tile.key_count(), "{what}: tile {ti} key tiles");
        let box_keys: Vec<usize> = (0..tile.key_count())
            .map(|j| sched.key_token(tile, j))
            .collect();
        let box_set: HashSet<usize> = box_keys.iter().copied().collect();
        assert_eq!(
            box_set.len(),
            box_keys.len(),
            "{what}: duplicate keys in a box"
        );
        let mut seen_by_some: HashSet<usize> = HashSet::new();
        let mut rows = Vec::new();
        for r in 0..sched.rows {
            let Some(t) = sched.row_token(tile, r) else {
                continue;
            };
            assert!(t < n);
            assert_eq!(owner[t], usize::MAX, "{what}: token {t} in two tiles");
            owner[t] = ti;
            let keys: HashSet<usize> = attn.neighbors(t).unwrap().collect();
            visible += keys.len() as u64;
            for &k in &keys {
                assert!(
                    box_set.contains(&k),
                    "{what}: tile {ti} row {r} (token {t}) sees key {k} outside its key tiles"
                );
            }
            seen_by_some.extend(keys.iter().copied());
            rows.push(keys);
        }
        assert_eq!(
            rows.len(),
            tile.valid_rows(),
            "{what}: tile {ti} valid rows"
        );
        assert_eq!(
            seen_by_some.len(),
            box_set.len(),
            "{what}: tile {ti} visits keys no row sees"
        );
        for kt in kts.iter().filter(|kt| kt.interior) {
            for &key in &box_keys[kt.start..kt.start + kt.len] {
                for (r, keys) in rows.iter().enumerate() {
                    assert!(
                        keys.contains(&key),
                        "{what}: tile {ti} interior key tile at {} masks key {key} for row {r}",
                        kt.start
                    );
                }
            }
        }
    }
    assert!(
        owner.iter().all(|&o| o != usize::MAX),
        "{what}: some token is in no tile"
    );
    assert_eq!(
        visible as u128,
        visible_pairs(attn),
        "{what}: visible_pairs"
    );
    (sched.computed_pairs(), visible)
}

#[test]
fn schedule_covers_exactly_the_neighborhoods() {
    let mut r = rng(0x5c4ed);
    for case in 0..120 {
        let rank = 1 + case % 3;
        let max_len = [40, 14, 7][rank - 1];
        let dims: Vec<NeighborhoodDim> =
            (0..rank).map(|_| random_dim(&mut r, max_len, 3)).collect();
        let attn = problem(&dims);
        for (rows, key_tile) in [(MMA_QUERY_ROWS, MMA_KEY_TILE), (128, 64), (16, 8), (4, 5)] {
            let sched = NeighborhoodSchedule::new(&attn, rows, key_tile).unwrap();
            check(&attn, &sched, &format!("case {case} {dims:?} rows {rows}"));
        }
    }
}

#[test]
fn schedule_on_fixed_shapes_and_explicit_tiles() {
    let cases: Vec<(Vec<NeighborhoodDim>, [usize; 3])> = vec![
        // kernel == length (full attention), odd and even kernels.
        (vec![NeighborhoodDim::new(37, 37)], [1, 1, 16]),
        (
            vec![NeighborhoodDim::new(20, 6), NeighborhoodDim::new(23, 7)],
            [1, 4, 8],
        ),
        // Large kernel against a small tile: interior key tiles exist.
        (
            vec![NeighborhoodDim::new(40, 31), NeighborhoodDim::new(40, 31)],
            [1, 4, 4],
        ),
        // Dilation not dividing the length, causal and strided dims.
        (
            vec![
                NeighborhoodDim::new(11, 3).with_dilation(2),
                NeighborhoodDim::new(9, 4).with_causal(true),
                NeighborhoodDim::new(13, 5).with_stride(2).with_dilation(2),
            ],
            [2, 2, 4],
        ),
        // A tile that is not a power of two.
        (vec![NeighborhoodDim::new(30, 9).with_stride(3)], [1, 1, 12]),
    ];
    let mut interior = 0;
    for (dims, tile) in cases {
        let attn = problem(&dims);
        let sched = NeighborhoodSchedule::with_tile(&attn, tile, 16).unwrap();
        check(&attn, &sched, &format!("{dims:?} tile {tile:?}"));
        interior += sched.interior_tiles();
    }
    assert!(interior > 0, "the 31x31 case has interior key tiles");
}

#[test]
fn schedule_rejects_bad_tiles() {
    let attn = problem(&[NeighborhoodDim::new(16, 3), NeighborhoodDim::new(16, 3)]);
    assert!(NeighborhoodSchedule::new(&attn, 48, 64).is_err());
    assert!(NeighborhoodSchedule::new(&attn, 64, 0).is_err());
    assert!(NeighborhoodSchedule::with_tile(&attn, [2, 4, 8], 64).is_err());
    assert!(NeighborhoodSchedule::with_tile(&attn, [1, 0, 8], 64).is_err());
    assert!(NeighborhoodSchedule::with_tile(&attn, [1, 4096, 2], 64).is_err());
}

/// The bench problems (issue 13): computed pairs of the 64-row mma schedule against the
/// visible pairs, and the FLOP-bound ratio over dense attention.
#[test]
fn schedule_efficiency_on_the_bench_problems() {
    let problems = bench_problems();
    for (name, dims) in problems {
        let attn = problem(&dims);
        for rows in [64, 128] {
            let sched = NeighborhoodSchedule::new(&attn, rows, 64).unwrap();
            let (computed, visible) = (sched.computed_pairs(), visible_pairs(&attn));
            assert!(computed as u128 >= visible);
            assert!(computed as u128 <= dense_pairs(&attn).next_multiple_of(64 * 64) * 2);
            eprintln!(
                "{name}: rows {rows} tile {:?}: {} key tiles ({} interior), computed/visible \
                 {:.2}, dense/visible {:.1}",
                sched.tile,
                sched.key_tiles.len(),
                sched.interior_tiles(),
                computed as f64 / visible as f64,
                dense_pairs(&attn) as f64 / visible as f64,
            );
        }
    }
}
