//! AVX2+FMA versions of the parent module's operations: the same contracts and summation
//! orders, with fused multiply-adds. Callers check the features first (`use_avx2`).

use std::arch::x86_64::*;

/// The first eight values of `s` as one vector.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn load8(s: &[f32]) -> __m256 {
    let s = &s[..8];
    // SAFETY: `s` holds 8 f32 (the slice above checks it); `loadu` takes any alignment.
    unsafe { _mm256_loadu_ps(s.as_ptr()) }
}

/// Writes `x` to the first eight values of `s`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn store8(s: &mut [f32], x: __m256) {
    let s = &mut s[..8];
    // SAFETY: `s` holds 8 f32 (the slice above checks it); `storeu` takes any alignment.
    unsafe { _mm256_storeu_ps(s.as_mut_ptr(), x) }
}

/// `reduce_lanes` of the eight lanes of `x`: `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn reduce(x: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps::<1>(t, t)))
}

/// The dot product's tail: `s += a[c] * b[c]` (fused) channel by channel.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn tail(mut s: f32, a: &[f32], b: impl Iterator<Item = f32>) -> f32 {
    for (&x, y) in a.iter().zip(b) {
        s = x.mul_add(y, s);
    }
    s
}

/// `super::dot` (`a` and `b` of one length).
#[target_feature(enable = "avx2,fma")]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    for (ca, cb) in a8.clone().zip(b8.clone()) {
        acc = _mm256_fmadd_ps(load8(ca), load8(cb), acc);
    }
    tail(reduce(acc), a8.remainder(), b8.remainder().iter().copied())
}

/// `super::dot_block`: micro-tiles of 2 rows x 4 keys (8 accumulators, each key chunk
/// loaded once for both rows), narrower ones at the edges.
#[target_feature(enable = "avx2,fma")]
pub(super) fn dot_block(q: &[f32], k: &[f32], d: usize, out: &mut [f32]) {
    let (rows, keys) = (q.len() / d, k.len() / d);
    let tile = Scores { q, k, d, keys };
    for r in (0..rows).step_by(2) {
        let two = r + 2 <= rows;
        let mut j = 0;
        while j + 4 <= keys {
            if two {
                tile.micro::<2, 4>(r, j, out);
            } else {
                tile.micro::<1, 4>(r, j, out);
            }
            j += 4;
        }
        for j in j..keys {
            if two {
                tile.micro::<2, 1>(r, j, out);
            } else {
                tile.micro::<1, 1>(r, j, out);
            }
        }
    }
}

/// The operands of one `dot_block` call: `q: [rows, d]`, `k: [keys, d]`.
struct Scores<'a> {
    q: &'a [f32],
    k: &'a [f32],
    d: usize,
    keys: usize,
}

impl Scores<'_> {
    /// Scores of rows `r0..r0 + R` against keys `j0..j0 + N` into `out: [rows, keys]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn micro<const R: usize, const N: usize>(&self, r0: usize, j0: usize, out: &mut [f32]) {
        let d = self.d;
        let q = &self.q[r0 * d..(r0 + R) * d];
        let k = &self.k[j0 * d..(j0 + N) * d];
        let body = d - d % 8;
        let mut acc = [[_mm256_setzero_ps(); N]; R];
        for c in (0..body).step_by(8) {
            let mut kc = [_mm256_setzero_ps(); N];
            for (j, x) in kc.iter_mut().enumerate() {
                *x = load8(&k[j * d + c..]);
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let qc = load8(&q[r * d + c..]);
                for (a, &x) in row.iter_mut().zip(&kc) {
                    *a = _mm256_fmadd_ps(qc, x, *a);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            let qr = &q[r * d + body..(r + 1) * d];
            for (j, &a) in row.iter().enumerate() {
                let kj = &k[j * d + body..(j + 1) * d];
                out[(r0 + r) * self.keys + j0 + j] = tail(reduce(a), qr, kj.iter().copied());
            }
        }
    }
}

/// `super::axpy` (`acc` and `v` of one length).
#[target_feature(enable = "avx2,fma")]
pub(super) fn axpy(acc: &mut [f32], w: f32, v: &[f32]) {
    let wv = _mm256_set1_ps(w);
    let mut a8 = acc.chunks_exact_mut(8);
    let mut v8 = v.chunks_exact(8);
    for (ca, cv) in (&mut a8).zip(&mut v8) {
        store8(ca, _mm256_fmadd_ps(wv, load8(cv), load8(ca)));
    }
    for (a, &x) in a8.into_remainder().iter_mut().zip(v8.remainder()) {
        *a = w.mul_add(x, *a);
    }
}

/// `super::pv_block`: micro-tiles of 4 rows x 16 channels (8 accumulators held over the
/// whole key tile, each value chunk loaded once for the 4 rows), narrower ones at the edges,
/// and the channels past the last multiple of 8 one by one, in key order like `axpy`.
#[target_feature(enable = "avx2,fma")]
pub(super) fn pv_block(acc: &mut [f32], p: &[f32], v: &[f32], d: usize) {
    let (rows, keys) = (acc.len() / d, v.len() / d);
    let body = d - d % 8;
    let tile = Values { p, v, d, keys };
    for r in (0..rows).step_by(4) {
        let four = r + 4 <= rows;
        let mut c = 0;
        while c + 16 <= body {
            if four {
                tile.micro::<4, 2>(acc, r, c);
            } else {
                for r in r..rows {
                    tile.micro::<1, 2>(acc, r, c);
                }
            }
            c += 16;
        }
        if c < body {
            if four {
                tile.micro::<4, 1>(acc, r, c);
            } else {
                for r in r..rows {
                    tile.micro::<1, 1>(acc, r, c);
                }
            }
        }
        for r in r..(r + 4).min(rows) {
            for c in body..d {
                let mut a = acc[r * d + c];
                for j in 0..keys {
                    a = p[r * keys + j].mul_add(v[j * d + c], a);
                }
                acc[r * d + c] = a;
            }
        }
    }
}

/// The operands of one `pv_block` call: `p: [rows, keys]`, `v: [keys, d]`.
struct Values<'a> {
    p: &'a [f32],
    v: &'a [f32],
    d: usize,
    keys: usize,
}

impl Values<'_> {
    /// Channels `c0..c0 + 8 * C` of rows `r0..r0 + R` of `acc: [rows, d]`, over every key.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn micro<const R: usize, const C: usize>(&self, acc: &mut [f32], r0: usize, c0: usize) {
        let (d, keys) = (self.d, self.keys);
        let mut a = [[_mm256_setzero_ps(); C]; R];
        for (r, row) in a.iter_mut().enumerate() {
            for (c, x) in row.iter_mut().enumerate() {
                *x = load8(&acc[(r0 + r) * d + c0 + 8 * c..]);
            }
        }
        for j in 0..keys {
            let mut vc = [_mm256_setzero_ps(); C];
            for (c, x) in vc.iter_mut().enumerate() {
                *x = load8(&self.v[j * d + c0 + 8 * c..]);
            }
            for (r, row) in a.iter_mut().enumerate() {
                let w = _mm256_set1_ps(self.p[(r0 + r) * keys + j]);
                for (x, &y) in row.iter_mut().zip(&vc) {
                    *x = _mm256_fmadd_ps(w, y, *x);
                }
            }
        }
        for (r, row) in a.iter().enumerate() {
            for (c, &x) in row.iter().enumerate() {
                store8(&mut acc[(r0 + r) * d + c0 + 8 * c..], x);
            }
        }
    }
}

/// `super::tile_weights` (`s` and `p` of one length): `exp` by `2^n * e^r` with
/// `n = round(x / ln 2)`, `r = x - n ln 2` in two parts (Cody-Waite), and Cephes' `expf`
/// polynomial for `e^r`; `x` below `ln 2^-126` (`-inf` included) gives 0. `max_ps` returns
/// its second operand on NaN and the final mask keeps unordered lanes, so NaN stays NaN.
#[target_feature(enable = "avx2,fma")]
pub(super) fn tile_weights(s: &[f32], m: f32, p: &mut [f32]) -> f32 {
    let mv = _mm256_set1_ps(m);
    let mut sum = _mm256_setzero_ps();
    for (sc, pc) in s.chunks(8).zip(p.chunks_mut(8)) {
        let mut x = [f32::NEG_INFINITY; 8];
        x[..sc.len()].copy_from_slice(sc);
        let e = exp(_mm256_sub_ps(load8(&x), mv));
        sum = _mm256_add_ps(sum, e);
        let mut y = [0.0f32; 8];
        store8(&mut y, e);
        pc.copy_from_slice(&y[..pc.len()]);
    }
    reduce(sum)
}

/// `e^x` lane by lane for `x <= 0` (see `tile_weights`).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp(x: __m256) -> __m256 {
    let lo = _mm256_set1_ps(-87.336_54);
    // Lanes not below `lo` (NaN included): the others are 0.
    let keep = _mm256_cmp_ps::<_CMP_NLT_UQ>(x, lo);
    let x = _mm256_max_ps(lo, x);
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(
        y,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let two_n = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(two_n)), keep)
}

/// `super::scan`: eight lanes of max / NaN / `-inf` flags, then the tail element by element.
#[target_feature(enable = "avx2,fma")]
pub(super) fn scan(s: &[f32]) -> super::TileScan {
    let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
    let (mut max, mut nan, mut skipped) = (ninf, _mm256_setzero_ps(), _mm256_setzero_ps());
    let chunks = s.chunks_exact(8);
    let rest = super::scan_portable(chunks.remainder());
    for c in chunks {
        let x = load8(c);
        // `max_ps` returns its second operand when one is NaN: `max` keeps its non-NaN lanes.
        max = _mm256_max_ps(x, max);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
        skipped = _mm256_or_ps(skipped, _mm256_cmp_ps::<_CMP_EQ_OQ>(x, ninf));
    }
    let mut lanes = [0.0f32; 8];
    store8(&mut lanes, max);
    super::TileScan {
        max: lanes.iter().fold(rest.max, |a, &b| a.max(b)),
        nan: rest.nan || _mm256_movemask_ps(nan) != 0,
        skipped: rest.skipped || _mm256_movemask_ps(skipped) != 0,
    }
}
