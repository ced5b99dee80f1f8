//! The Hopper window kernel's tile ranges (`kernels/dense_wgmma_window.cu`, not yet run on a
//! GPU), checked on the CPU: its blocks load `Mask::key_tiles` of their 128 query rows in
//! 64-key tiles, and each 64-row consumer computes only tiles `[lo, hi)` of that schedule, the
//! hull of the tiles its rows' reach touches (`consumer_rows` / `consumer_needs` there,
//! mirrored by `consumer_range` here). For random shapes and masks (windows with and without
//! a right side, sinks, seqlen_q != seqlen_k both ways, fully masked rows) every visible
//! (row, key) pair of a consumer must fall in a tile of its range; and on the benchmark's
//! causal windows the computed pairs per visible pair are the ones the kernel's design
//! counts on (W + 64 keys per row in steady state, against W + 128 for the Hopper kernel).
//! The persistent dense walk (`DenseKernel::HopperPersistent`) is the same code with 128-key
//! tiles: its ranges are checked the same way.

mod common;

use common::rng;
use longattn::*;
use rand::Rng;

const BLOCK_M: usize = 128;
const CONSUMER_ROWS: usize = 64;
/// The window kernel's key tile.
const BLOCK_N: usize = 64;
/// The persistent dense walk's key tile (the Hopper kernel's).
const PERSISTENT_BLOCK_N: usize = 128;

/// The block's key tiles of `bn` keys (tile indices, in visiting order) for query rows
/// `[m0, m0 + 128)`.
fn block_tiles(mask: &Mask, m0: usize, sq: usize, sk: usize, bn: usize) -> Vec<usize> {
    mask.key_tiles(m0..(m0 + BLOCK_M).min(sq), sq, sk, bn)
        .iter()
        .collect()
}

/// Positions `[lo, hi)` in `tiles` (of `bn` keys) that consumer `wg` of the block at `m0`
/// computes: the kernel's rule (reach of the consumer's first and last valid rows, sink keys
/// below `sinks`), empty when it needs none.
fn consumer_range(
    mask: &Mask,
    (tiles, bn): (&[usize], usize),
    m0: usize,
    wg: usize,
    sq: usize,
    sk: usize,
) -> (usize, usize) {
    let first = m0 + CONSUMER_ROWS * wg;
    let last = (first + CONSUMER_ROWS - 1).min(sq.saturating_sub(1));
    if first >= sq || sk == 0 {
        return (tiles.len(), tiles.len());
    }
    let shift = sk as i64 - sq as i64;
    let mut reach_hi = sk as i64 - 1;
    if let Some(r) = mask.window.right {
        reach_hi = reach_hi.min(last as i64 + shift + r as i64);
    }
    let reach_lo = match mask.window.left {
        Some(l) => (first as i64 + shift - l as i64).max(0),
        None => 0,
    };
    let needs = |t: usize| {
        let n0 = (t * bn) as i64;
        n0 <= reach_hi && (n0 + bn as i64 > reach_lo || n0 < mask.sinks as i64)
    };
    let needed: Vec<usize> = (0..tiles.len()).filter(|&k| needs(tiles[k])).collect();
    match (needed.first(), needed.last()) {
        (Some(&lo), Some(&hi)) => (lo, hi + 1),
        _ => (tiles.len(), tiles.len()),
    }
}

/// One side of a window: unbounded a quarter of the time, else 0-299 keys.
fn random_side(r: &mut impl Rng) -> Option<usize> {
    match r.random_range(0..4) {
        0 => None,
        _ => Some(r.random_range(0..300usize)),
    }
}

fn random_mask(r: &mut impl Rng) -> Mask {
    let left = random_side(r);
    let right = match r.random_range(0..3) {
        0 => Some(0),
        _ => random_side(r),
    };
    let sinks = if r.random_bool(0.3) {
        r.random_range(1..100)
    } else {
        0
    };
    Mask::new(Window::new(left, right), sinks)
}

#[test]
fn every_visible_pair_is_in_its_consumers_range() {
    let mut r = rng(16);
    for case in 0..300 {
        let sq = r.random_range(1..700usize);
        let sk = r.random_range(0..700usize);
        let mask = random_mask(&mut r);
        let bn = [BLOCK_N, PERSISTENT_BLOCK_N][case % 2];
        for m0 in (0..sq).step_by(BLOCK_M) {
            let tiles = block_tiles(&mask, m0, sq, sk, bn);
            for wg in 0..2 {
                let (lo, hi) = consumer_range(&mask, (&tiles, bn), m0, wg, sq, sk);
                assert!(lo <= hi && hi <= tiles.len());
                let rows = m0 + CONSUMER_ROWS * wg..(m0 + CONSUMER_ROWS * (wg + 1)).min(sq);
                for i in rows {
                    for j in (0..sk).filter(|&j| mask.visible(i, j, sq, sk)) {
                        let pos = tiles.iter().position(|&t| t == j / bn);
                        assert!(
                            pos.is_some_and(|k| (lo..hi).contains(&k)),
                            "case {case}: {mask:?} sq {sq} sk {sk} m0 {m0} consumer {wg}: row \
                             {i} key {j} (tile {} of {bn}) outside {:?} of {tiles:?}",
                            j / bn,
                            lo..hi
                        );
                    }
                }
            }
        }
    }
}

/// Computed (row, key) products per visible pair for one head of length `s` under the causal
/// window of `w` tokens: the window kernel (each consumer's 64 rows x its range's 64-key
/// tiles) and the Hopper kernel (128 rows x its block's 128-key tiles).
fn waste(s: usize, w: usize) -> (f64, f64) {
    let mask = Mask::new(Window::causal_tokens(w).unwrap(), 0);
    let visible: usize = (0..s).map(|i| (i + 1).min(w)).sum();
    let mut window_kernel = 0usize;
    let mut hopper = 0usize;
    for m0 in (0..s).step_by(BLOCK_M) {
        let tiles = block_tiles(&mask, m0, s, s, BLOCK_N);
        for wg in 0..2 {
            let (lo, hi) = consumer_range(&mask, (&tiles, BLOCK_N), m0, wg, s, s);
            window_kernel += (hi - lo) * BLOCK_N * CONSUMER_ROWS;
        }
        hopper += mask.key_tiles(m0..m0 + BLOCK_M, s, s, 128).count() * 128 * BLOCK_M;
    }
    (
        window_kernel as f64 / visible as f64,
        hopper as f64 / visible as f64,
    )
}

#[test]
fn benchmark_windows_compute_w_plus_64_keys_per_row() {
    for s in [16384usize, 65536] {
        for (w, steady_tiles) in [(256usize, 5usize), (1024, 17), (4096, 65)] {
            let (ours, hopper) = waste(s, w);
            println!(
                "window {w} s {s}: computed / visible pairs {ours:.3} (window kernel), {hopper:.3} \
                 (Hopper kernel)"
            );
            // Steady state: (W + 64) / W against (W + 128) / W, within the sequence's start.
            let steady = (w + 64) as f64 / w as f64;
            assert!(
                ours <= steady + 0.01 && ours < hopper,
                "w {w} s {s}: {ours} vs {hopper}"
            );
            // A consumer of an interior block computes W / 64 + 1 tiles of the block's W / 64 + 2.
            let mask = Mask::new(Window::causal_tokens(w).unwrap(), 0);
            let m0 = s / 2;
            let tiles = block_tiles(&mask, m0, s, s, BLOCK_N);
            assert_eq!(tiles.len(), steady_tiles + 1);
            for wg in 0..2 {
                let (lo, hi) = consumer_range(&mask, (&tiles, BLOCK_N), m0, wg, s, s);
                assert_eq!((lo, hi), (wg, wg + steady_tiles), "w {w} consumer {wg}");
            }
        }
    }
}
