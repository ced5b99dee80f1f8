//! The one mask vocabulary: a FlashAttention-style window `(left, right)` plus attention
//! sinks. Causal attention is the window `(None, Some(0))`.
//!
//! For query row `i`, key `j`, lengths `sq`, `sk` and `diag = sk - sq` (bottom-right alignment):
//! `visible(i, j) <=> i + diag - left <= j <= i + diag + right`, `0 <= j < sk`, or `j < sinks`
//! and `j <= i + diag + right` (sinks obey the right bound, which is causality when right = 0).

use crate::error::{Error, Result};
use std::ops::Range;

/// Sliding window `(left, right)` in keys around the aligned diagonal; `None` is unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Window {
    /// Keys visible before the aligned diagonal; `None` is unbounded.
    pub left: Option<usize>,
    /// Keys visible after the aligned diagonal; `None` is unbounded, `Some(0)` is causal.
    pub right: Option<usize>,
}

impl Window {
    /// No restriction: every key is visible.
    pub const FULL: Window = Window {
        left: None,
        right: None,
    };
    /// Causal, bottom-right aligned: `(-1, 0)`.
    pub const CAUSAL: Window = Window {
        left: None,
        right: Some(0),
    };

    /// A window from its two bounds (`None` is unbounded).
    pub fn new(left: Option<usize>, right: Option<usize>) -> Self {
        Window { left, right }
    }

    /// A causal window of `tokens` keys including the current one: `(tokens - 1, 0)`.
    /// `tokens == 0` sees nothing but sinks, which is rarely meant, so it is an error.
    pub fn causal_tokens(tokens: usize) -> Result<Self> {
        if tokens == 0 {
            return Err(Error::InvalidOption(
                "causal_tokens(0): a window must include at least the current token".into(),
            ));
        }
        Ok(Window {
            left: Some(tokens - 1),
            right: Some(0),
        })
    }

    /// From FlashAttention's `window_size=(left, right)` integers, where `-1` means
    /// unbounded; any other negative value is an error.
    pub fn from_flash(left: i64, right: i64) -> Result<Self> {
        let side = |v: i64, name: &str| -> Result<Option<usize>> {
            match v {
                -1 => Ok(None),
                v if v >= 0 && v <= i32::MAX as i64 => Ok(Some(v as usize)),
                v => Err(Error::InvalidOption(format!(
                    "window {name} = {v}: must be -1 (unbounded) or in 0..={}",
                    i32::MAX
                ))),
            }
        };
        Ok(Window {
            left: side(left, "left")?,
            right: side(right, "right")?,
        })
    }

    /// FlashAttention integers, `-1` for unbounded (the C ABI form).
    pub fn to_flash(self) -> (i64, i64) {
        let f = |v: Option<usize>| v.map_or(-1, |x| x as i64);
        (f(self.left), f(self.right))
    }
}

/// A window plus `sinks` always-visible leading keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Mask {
    /// The sliding window.
    pub window: Window,
    /// Leading keys visible to every query row (still subject to the right bound).
    pub sinks: usize,
}

/// Which key tiles a block of query rows must visit: the sink tiles, then the window tiles
/// (which start after the sink tiles so that no tile is visited twice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTiles {
    /// Key tile indices holding sink keys.
    pub sink_tiles: Range<usize>,
    /// Key tile indices of the window, starting after the sink tiles.
    pub window_tiles: Range<usize>,
}

impl KeyTiles {
    /// Tile indices in visiting order: sink tiles, then window tiles.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.sink_tiles.clone().chain(self.window_tiles.clone())
    }
    /// Number of tiles visited.
    pub fn count(&self) -> usize {
        self.sink_tiles.len() + self.window_tiles.len()
    }
}

impl Mask {
    /// A mask from a window and a sink count.
    pub fn new(window: Window, sinks: usize) -> Self {
        Mask { window, sinks }
    }

    /// Whether key `j` is visible to query row `i` for lengths `sq`, `sk`.
    pub fn visible(&self, i: usize, j: usize, sq: usize, sk: usize) -> bool {
        if j >= sk {
            return false;
        }
        let diag = i as i128 + sk as i128 - sq as i128;
        let j = j as i128;
        let right_ok = self.window.right.is_none_or(|r| j <= diag + r as i128);
        if !right_ok {
            return false;
        }
        let left_ok = self.window.left.is_none_or(|l| j >= diag - l as i128);
        left_ok || j < self.sinks as i128
    }

    /// Keys `[lo, hi)` visible through the window alone for row `i` (may be empty).
    pub fn window_range(&self, i: usize, sq: usize, sk: usize) -> Range<usize> {
        self.window_range_rows(i..i + 1, sq, sk)
    }

    /// The keys row `i` sees as two ranges, `(window_range(i), sink_end)`: key `j` is
    /// visible exactly when `j < sink_end` or `window.contains(&j)` (what the CPU paths test
    /// per key, without `visible`'s arithmetic).
    pub(crate) fn row_ranges(&self, i: usize, sq: usize, sk: usize) -> (Range<usize>, usize) {
        (
            self.window_range(i, sq, sk),
            self.sink_range_rows(i..i + 1, sq, sk).end,
        )
    }

    /// Union of the window ranges of rows `rows` (rows are contiguous, so the union is one
    /// range): from the first row's left edge to the last row's right edge.
    pub fn window_range_rows(&self, rows: Range<usize>, sq: usize, sk: usize) -> Range<usize> {
        if rows.is_empty() || sk == 0 {
            return 0..0;
        }
        let diag = sk as i128 - sq as i128;
        let lo = match self.window.left {
            Some(l) => (rows.start as i128 + diag - l as i128).max(0),
            None => 0,
        };
        let hi = match self.window.right {
            Some(r) => (rows.end as i128 - 1 + diag + r as i128 + 1).min(sk as i128),
            None => sk as i128,
        };
        if hi <= lo {
            0..0
        } else {
            lo as usize..hi as usize
        }
    }

    /// Sink keys `[0, end)` visible to at least one row of `rows`.
    pub fn sink_range_rows(&self, rows: Range<usize>, sq: usize, sk: usize) -> Range<usize> {
        if rows.is_empty() {
            return 0..0;
        }
        let mut end = self.sinks.min(sk) as i128;
        if let Some(r) = self.window.right {
            let diag = sk as i128 - sq as i128;
            end = end.min(rows.end as i128 - 1 + diag + r as i128 + 1);
        }
        0..end.max(0) as usize
    }

    /// Key tiles of `block_n` keys that rows `rows` must visit; every other tile is fully
    /// masked for all of these rows. The CUDA kernels derive their loops the same way.
    pub fn key_tiles(&self, rows: Range<usize>, sq: usize, sk: usize, block_n: usize) -> KeyTiles {
        let window = self.window_range_rows(rows.clone(), sq, sk);
        let sinks = self.sink_range_rows(rows, sq, sk);
        let sink_tiles = 0..sinks.end.div_ceil(block_n);
        let window_tiles = if window.is_empty() {
            0..0
        } else {
            let first = (window.start / block_n).max(sink_tiles.end);
            let last = window.end.div_ceil(block_n);
            first..last.max(first)
        };
        KeyTiles {
            sink_tiles,
            window_tiles,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute_tiles(mask: &Mask, rows: Range<usize>, sq: usize, sk: usize, bn: usize) -> Vec<usize> {
        (0..sk.div_ceil(bn))
            .filter(|&t| {
                rows.clone()
                    .any(|i| (t * bn..((t + 1) * bn).min(sk)).any(|j| mask.visible(i, j, sq, sk)))
            })
            .collect()
    }

    #[test]
    fn key_tiles_cover_exactly_the_visible_tiles() {
        let windows = [
            Window::FULL,
            Window::CAUSAL,
            Window::new(Some(0), Some(0)),
            Window::new(Some(1), Some(0)),
            Window::new(Some(5), Some(3)),
            Window::new(None, Some(7)),
            Window::new(Some(9), None),
        ];
        for &w in &windows {
            for sinks in [0, 1, 4, 40] {
                let mask = Mask::new(w, sinks);
                for (sq, sk) in [(1, 1), (3, 17), (17, 3), (33, 33), (50, 130), (130, 50)] {
                    for bm in [1, 16] {
                        for start in (0..sq).step_by(bm) {
                            let rows = start..(start + bm).min(sq);
                            let tiles = mask.key_tiles(rows.clone(), sq, sk, 8);
                            let got: Vec<usize> = tiles.iter().collect();
                            let want = brute_tiles(&mask, rows.clone(), sq, sk, 8);
                            // Every visible tile is visited exactly once; a visited tile may
                            // still be empty for all rows only inside the sink/window hull.
                            for t in &want {
                                assert!(got.contains(t), "{mask:?} {sq}x{sk} rows {rows:?}");
                            }
                            let mut dedup = got.clone();
                            dedup.dedup();
                            assert_eq!(dedup.len(), got.len(), "tile visited twice");
                        }
                    }
                }
            }
        }
    }

    /// A row sees exactly the keys of its `row_ranges` (the CPU paths test keys against
    /// these two ranges instead of calling `visible`).
    #[test]
    fn visible_is_the_window_and_sink_ranges() {
        for w in [
            Window::FULL,
            Window::CAUSAL,
            Window::new(Some(0), Some(0)),
            Window::new(Some(5), Some(3)),
            Window::new(None, Some(7)),
            Window::new(Some(9), None),
            Window::new(Some(2), Some(0)),
        ] {
            for sinks in [0, 1, 4, 40] {
                let mask = Mask::new(w, sinks);
                for (sq, sk) in [(1, 1), (3, 17), (17, 3), (33, 33), (50, 130), (130, 50)] {
                    for i in 0..sq {
                        let (window, sink_end) = mask.row_ranges(i, sq, sk);
                        for j in 0..sk + 2 {
                            assert_eq!(
                                mask.visible(i, j, sq, sk),
                                j < sink_end || window.contains(&j),
                                "{mask:?} {sq}x{sk} i {i} j {j}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn from_flash_rejects_bad_values() {
        assert!(Window::from_flash(-2, 0).is_err());
        assert!(Window::from_flash(0, -5).is_err());
        assert!(Window::from_flash(i64::MAX, 0).is_err());
        assert_eq!(Window::from_flash(-1, 0).unwrap(), Window::CAUSAL);
        assert_eq!(
            Window::causal_tokens(1).unwrap(),
            Window::new(Some(0), Some(0))
        );
        assert!(Window::causal_tokens(0).is_err());
    }

    #[test]
    fn causal_is_bottom_right_aligned() {
        let m = Mask::new(Window::CAUSAL, 0);
        // sq=2, sk=5: row 0 sees keys 0..=3, the last row sees all.
        assert!(m.visible(0, 3, 2, 5) && !m.visible(0, 4, 2, 5));
        assert!(m.visible(1, 4, 2, 5));
        // sq > sk: the first rows see nothing.
        assert!(!m.visible(0, 0, 5, 2) && !m.visible(2, 0, 5, 2) && m.visible(3, 0, 5, 2));
    }

    #[test]
    fn sinks_obey_causality() {
        let m = Mask::new(Window::causal_tokens(2).unwrap(), 2);
        // Row 0 (sq = sk): only key 0; sink key 1 lies in its future.
        assert!(m.visible(0, 0, 8, 8) && !m.visible(0, 1, 8, 8));
        // Row 6: window {5, 6} plus sinks {0, 1}.
        let seen: Vec<usize> = (0..8).filter(|&j| m.visible(6, j, 8, 8)).collect();
        assert_eq!(seen, vec![0, 1, 5, 6]);
    }
}
