//! The CPU arithmetic shared by every CPU path: the score dot product, the same product for a
//! block of query rows against a tile of keys, and the value accumulation `acc += w * v`
//! (one row, or a block of rows against a tile of value rows).
//!
//! Each operation has one rounding, whichever form computes it: element `(r, j)` of
//! [`dot_block`] has the bits of [`dot`] of row `r` and key `j`, and [`pv_block`] adds
//! into each output element in key order exactly as [`axpy`] called key by key. So the
//! blocked paths (dense, FP8, paged prefill and decode, block-sparse, neighborhood) agree bit
//! for bit with the row-by-row `OnlineSoftmax` on the same scores.
//!
//! The dot product sums lane `l` of eight lanes over channels `8c + l`, then combines the
//! lanes as `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))` and adds the channels past
//! the last multiple of 8 one by one. On x86_64 with AVX2 and FMA (detected at run time, once
//! per call: std caches the CPUID query) the `avx2` module's `#[target_feature]` versions run
//! and multiply-adds are fused; elsewhere (other x86_64 CPUs, aarch64) the portable versions
//! below run, with separate multiplies and adds. The two differ in the last bits, but on one
//! machine every path takes the same one.

#[cfg(target_arch = "x86_64")]
mod avx2;

/// Whether the AVX2+FMA versions run on this CPU.
#[inline]
fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The lane combination of the dot product (module docs).
#[inline]
fn reduce_lanes(l: [f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

/// `sum_c a[c] * b[c]` over `min(a.len(), b.len())` channels: the score dot product of
/// every CPU path, in the order of the module docs.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: `use_avx2` checked that this CPU has AVX2 and FMA.
        return unsafe { avx2::dot(a, b) };
    }
    dot_portable(a, b)
}

/// [`dot`] without SIMD intrinsics (`a` and `b` of one length).
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (a8.remainder(), b8.remainder());
    for (ca, cb) in a8.zip(b8) {
        for l in 0..8 {
            lanes[l] += ca[l] * cb[l];
        }
    }
    let mut s = reduce_lanes(lanes);
    for (&x, &y) in ta.iter().zip(tb) {
        s += x * y;
    }
    s
}

/// `out[r * keys + j] = dot(q[r], k[j])` for the `rows = q.len() / d` rows of `q: [rows, d]`
/// and the `keys = k.len() / d` rows of `k: [keys, d]` (`out: [rows, keys]`), each element
/// with the bits of [`dot`]: the scores of a row block against a key tile, every key row
/// loaded once for several query rows.
pub(crate) fn dot_block(q: &[f32], k: &[f32], d: usize, out: &mut [f32]) {
    let (rows, keys) = (q.len() / d, k.len() / d);
    assert_eq!(out.len(), rows * keys, "dot_block: out is [rows, keys]");
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: `use_avx2` checked that this CPU has AVX2 and FMA.
        return unsafe { avx2::dot_block(q, k, d, out) };
    }
    for (qr, o) in q.chunks_exact(d).zip(out.chunks_exact_mut(keys)) {
        for (s, kj) in o.iter_mut().zip(k.chunks_exact(d)) {
            *s = dot(qr, kj);
        }
    }
}

/// `acc[c] += w * v[c]` over `min(acc.len(), v.len())` channels: one value row into one
/// output row of the online softmax.
#[inline]
pub(crate) fn axpy(acc: &mut [f32], w: f32, v: &[f32]) {
    let n = acc.len().min(v.len());
    let (acc, v) = (&mut acc[..n], &v[..n]);
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: `use_avx2` checked that this CPU has AVX2 and FMA.
        return unsafe { avx2::axpy(acc, w, v) };
    }
    axpy_portable(acc, w, v);
}

/// [`axpy`] without SIMD intrinsics.
fn axpy_portable(acc: &mut [f32], w: f32, v: &[f32]) {
    for (a, &x) in acc.iter_mut().zip(v) {
        *a += w * x;
    }
}

/// `acc[r] += sum_j p[r * keys + j] * v[j]` for the rows of `acc: [rows, d]` and the
/// `keys = v.len() / d` rows of `v: [keys, d]` (`p: [rows, keys]`), adding key by key in
/// order so that every element has the bits of [`axpy`] called for `j = 0, 1, ...`: the P.V
/// product of a row block and a value tile, every value row loaded once for several rows.
pub(crate) fn pv_block(acc: &mut [f32], p: &[f32], v: &[f32], d: usize) {
    let (rows, keys) = (acc.len() / d, v.len() / d);
    assert_eq!(p.len(), rows * keys, "pv_block: p is [rows, keys]");
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: `use_avx2` checked that this CPU has AVX2 and FMA.
        return unsafe { avx2::pv_block(acc, p, v, d) };
    }
    for (a, pr) in acc.chunks_exact_mut(d).zip(p.chunks_exact(keys)) {
        for (&w, vj) in pr.iter().zip(v.chunks_exact(d)) {
            axpy(a, w, vj);
        }
    }
}

/// What the online softmax needs to know of one row's tile scores before weighting them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TileScan {
    /// The largest score that is not NaN (`-inf` for an empty tile).
    pub(crate) max: f32,
    /// Whether a score is NaN.
    pub(crate) nan: bool,
    /// Whether a score is `-inf` (a key the row does not take).
    pub(crate) skipped: bool,
}

/// The [`TileScan`] of the scores `s` of one row's tile (exact, so both versions agree).
pub(crate) fn scan(s: &[f32]) -> TileScan {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: `use_avx2` checked that this CPU has AVX2 and FMA.
        return unsafe { avx2::scan(s) };
    }
    scan_portable(s)
}

/// [`scan`] element by element (also the AVX2 version's tail).
fn scan_portable(s: &[f32]) -> TileScan {
    let mut t = TileScan {
        max: f32::NEG_INFINITY,
        nan: false,
        skipped: false,
    };
    for &x in s {
        t.max = t.max.max(x);
        t.nan |= x.is_nan();
        t.skipped |= x == f32::NEG_INFINITY;
    }
    t
}

/// `p[j] = exp(s[j] - m)` for the scores `s` of one row's tile (`p` as long as `s`; 0 where
/// `s[j]` is `-inf`, a key the row does not take), returning `sum_j p[j]`: eight lanes over
/// keys `8c + l` (the last chunk padded with `-inf`), combined as in the dot product. `m` is
/// the row's running max (`s[j] - m <= 0`, or NaN when both are `+inf`). The AVX2 version
/// evaluates `exp` as a degree-6 polynomial after range reduction (within 2 ulp of the
/// correctly rounded value, `exp(0) = 1` exactly; 0 below `-87.3` instead of a subnormal),
/// the portable version with `f32::exp`.
pub(crate) fn tile_weights(s: &[f32], m: f32, p: &mut [f32]) -> f32 {
    assert_eq!(s.len(), p.len(), "tile_weights: p is as long as s");
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: `use_avx2` checked that this CPU has AVX2 and FMA.
        return unsafe { avx2::tile_weights(s, m, p) };
    }
    tile_weights_portable(s, m, p)
}

/// [`tile_weights`] with `f32::exp`.
fn tile_weights_portable(s: &[f32], m: f32, p: &mut [f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    for (sc, pc) in s.chunks(8).zip(p.chunks_mut(8)) {
        for (l, (&x, y)) in sc.iter().zip(pc).enumerate() {
            *y = (x - m).exp();
            lanes[l] += *y;
        }
    }
    reduce_lanes(lanes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        // A small LCG: values in [-1, 1) with varied low bits.
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                (x >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Every element of the blocked products has the bits of the row-by-row operation, for
    /// head dims with and without a tail and block sizes around the micro-tiles.
    #[test]
    fn blocked_products_equal_row_by_row_bits() {
        for d in [1, 7, 8, 16, 24, 59, 64, 111, 128] {
            for (rows, keys) in [(1, 1), (3, 5), (16, 32), (5, 31), (7, 13)] {
                let q = data(rows * d, 1);
                let k = data(keys * d, 2);
                let mut s = vec![0.0; rows * keys];
                dot_block(&q, &k, d, &mut s);
                for r in 0..rows {
                    for j in 0..keys {
                        let want = dot(&q[r * d..(r + 1) * d], &k[j * d..(j + 1) * d]);
                        assert_eq!(
                            s[r * keys + j].to_bits(),
                            want.to_bits(),
                            "d {d} r {r} j {j}"
                        );
                    }
                }
                let p = data(rows * keys, 3);
                let mut acc = data(rows * d, 4);
                let mut want = acc.clone();
                pv_block(&mut acc, &p, &k, d);
                for r in 0..rows {
                    for j in 0..keys {
                        axpy(
                            &mut want[r * d..(r + 1) * d],
                            p[r * keys + j],
                            &k[j * d..(j + 1) * d],
                        );
                    }
                }
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&acc), bits(&want), "d {d} rows {rows} keys {keys}");
            }
        }
    }

    /// The portable versions (what aarch64 runs) agree with the dispatched ones: exactly
    /// for the scan, to rounding (fused vs separate multiply-adds, polynomial vs libm exp)
    /// for the rest.
    #[test]
    fn portable_versions_agree() {
        let close = |x: f32, y: f32, tol: f32| (x - y).abs() <= tol * (1.0 + x.abs());
        for n in [1, 7, 8, 13, 64, 111] {
            let (a, b) = (data(n, 6), data(n, 7));
            assert!(close(dot(&a, &b), dot_portable(&a, &b), 1e-5), "dot n {n}");
            let (mut x, mut y) = (a.clone(), a.clone());
            axpy(&mut x, 0.37, &b);
            axpy_portable(&mut y, 0.37, &b);
            assert!(
                x.iter().zip(&y).all(|(&x, &y)| close(x, y, 1e-6)),
                "axpy n {n}"
            );
            let mut s: Vec<f32> = a.iter().map(|v| v * 30.0 - 30.0).collect();
            s[n / 2] = f32::NEG_INFINITY;
            assert_eq!(scan(&s), scan_portable(&s), "scan n {n}");
            // A finite running max (the tile of n = 1 is all -inf).
            let m = scan(&s).max.max(-1.0);
            let (mut p, mut q) = (vec![0.0; n], vec![0.0; n]);
            let (sp, sq) = (
                tile_weights(&s, m, &mut p),
                tile_weights_portable(&s, m, &mut q),
            );
            assert!(close(sp, sq, 1e-6), "tile_weights sum n {n}");
            assert!(
                p.iter().zip(&q).all(|(&x, &y)| close(x, y, 3e-7)),
                "weights n {n}"
            );
            assert_eq!((p[n / 2], q[n / 2]), (0.0, 0.0));
        }
    }

    /// The tile weights: close to `exp` in f64 (2 ulp), exact at the max and at `-inf`,
    /// NaN where `s - m` is NaN, and the sum of the weights taken.
    #[test]
    fn tile_weights_are_exp_and_their_sum() {
        for n in [1, 5, 8, 13, 32, 64] {
            let mut s: Vec<f32> = data(n, 5).iter().map(|x| x * 40.0 - 20.0).collect();
            s[0] = f32::NEG_INFINITY;
            let m = s.iter().copied().fold(0.0, f32::max);
            if n > 1 {
                s[n - 1] = m;
            }
            let mut p = vec![0.0; n];
            let sum = tile_weights(&s, m, &mut p);
            assert_eq!(p[0], 0.0);
            if n > 1 {
                assert_eq!(p[n - 1], 1.0);
            }
            for (&x, &y) in s.iter().zip(&p) {
                let want = ((x - m) as f64).exp();
                assert!(
                    (y as f64 - want).abs() <= 2.5e-7 * want,
                    "exp({}) = {y}",
                    x - m
                );
            }
            let want: f64 = p.iter().map(|&x| x as f64).sum();
            assert!((sum as f64 - want).abs() <= 1e-6 * want, "n {n}");
        }
        let mut p = [0.0; 3];
        tile_weights(&[-100.0, f32::INFINITY, 0.0], f32::INFINITY, &mut p);
        assert!(p.iter().all(|x| x.is_nan() || *x == 0.0) && p[1].is_nan());
    }
}
