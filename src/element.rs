//! Element types accepted by the kernels and the CPU reference.

use half::{bf16, f16};

/// Element data type tag, mirrored by the C `LaDtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 half precision.
    F16,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16,
    /// IEEE 754 single precision.
    F32,
    /// OCP FP8 e4m3 ([`F8E4M3`]): a KV-cache element type (with a scale per kv head).
    F8E4M3,
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::F8E4M3 => "f8e4m3",
        })
    }
}

/// A scalar the CPU reference can read and write. Arithmetic is always done in f32/f64;
/// this trait only converts.
pub trait Element: Copy + Send + Sync + Default + std::fmt::Debug + 'static {
    /// The tag of this type.
    const DTYPE: DType;
    /// Converts to f32 (exact for f16, bf16 and f32).
    fn to_f32(self) -> f32;
    /// Converts from f32, rounding to nearest.
    fn from_f32(x: f32) -> Self;
    /// Converts to f64 (through f32).
    fn to_f64(self) -> f64 {
        self.to_f32() as f64
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// An OCP FP8 e4m3 value ("e4m3fn", as `torch.float8_e4m3fn` and CUDA's `__nv_fp8_e4m3`):
/// 1 sign, 4 exponent (bias 7) and 3 mantissa bits, no infinities, one NaN per sign
/// (`0x7f`/`0xff`), largest finite value 448, smallest subnormal 2^-9.
///
/// The paged KV cache stores it with a dequantisation scale per kv head
/// ([`KvScales`](crate::paged::KvScales)); every e4m3 value is exact in f16, bf16 and f32.
/// [`Element::from_f32`] rounds to nearest, ties to even, and saturates: finite values beyond
/// +-448 and +-inf become +-448, NaN stays NaN (CUDA's `cvt.rn.satfinite.e4m3x2.f32`).
/// Equality compares bits (a stored cache compares equal to itself, NaN included; `-0 != 0`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct F8E4M3(u8);

impl F8E4M3 {
    /// Largest finite value.
    pub const MAX: f32 = 448.0;

    /// The value with this bit pattern.
    pub const fn from_bits(bits: u8) -> Self {
        F8E4M3(bits)
    }
    /// The bit pattern.
    pub const fn to_bits(self) -> u8 {
        self.0
    }
    /// Whether this is one of the two NaN patterns.
    pub const fn is_nan(self) -> bool {
        self.0 & 0x7f == 0x7f
    }

    /// `x` rounded to the nearest e4m3 value: the bits of `F8E4M3::from_f32(x).to_f32()`,
    /// without the code in between and without branches or library calls, so a loop over
    /// many values (the FP8 CPU path's P, one per query-key pair) vectorizes. In the normal
    /// range (`|x| >= 2^-6`) the f32 significand is rounded to 3 bits (nearest even, a carry
    /// moves into the exponent); below it `(|x| + 2^14) - 2^14` rounds to the subnormal
    /// spacing 2^-9 (the f32 spacing at 2^14); at least 464 saturates to 448; NaN stays NaN.
    #[inline]
    pub(crate) fn round_f32(x: f32) -> f32 {
        let a = x.abs();
        let bits = a.to_bits();
        let normal = f32::from_bits((bits + 0x7_ffff + ((bits >> 20) & 1)) & !0xf_ffff);
        let sub = (a + 16384.0) - 16384.0;
        let r = if a >= 464.0 {
            Self::MAX
        } else if a >= 1.0 / 64.0 {
            normal
        } else {
            sub
        };
        // NaN fails both comparisons: `sub` is NaN, then the sign of x as `to_f32` gives it.
        let r = if a.is_nan() { f32::NAN } else { r };
        r.copysign(x)
    }
}

// SAFETY: `F8E4M3` is `repr(transparent)` over `u8`: every bit pattern is a value (zero too).
unsafe impl cudarc::driver::DeviceRepr for F8E4M3 {}
// SAFETY: as above.
unsafe impl cudarc::driver::ValidAsZeroBits for F8E4M3 {}

impl Element for F8E4M3 {
    const DTYPE: DType = DType::F8E4M3;
    fn to_f32(self) -> f32 {
        let sign = if self.0 & 0x80 != 0 { -1.0 } else { 1.0 };
        let (exp, man) = (i32::from((self.0 >> 3) & 0xf), f32::from(self.0 & 7));
        if self.is_nan() {
            return f32::NAN.copysign(sign);
        }
        // Exact: at most 4 significant bits, exponents -9..=8.
        sign * if exp == 0 {
            man * 2f32.powi(-9)
        } else {
            (8.0 + man) * 2f32.powi(exp - 10)
        }
    }
    fn from_f32(x: f32) -> Self {
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        if x.is_nan() {
            return F8E4M3(0x7f | sign);
        }
        // Values of at least 464 (448 plus half its spacing of 32, where the tie goes to
        // 448's even mantissa) and infinities saturate.
        let a = f64::from(x.abs());
        if a >= 464.0 {
            return F8E4M3(0x7e | sign);
        }
        // Exponent of the binade (from the bits: exact), clamped to -6: below 2^-6 the
        // spacing stays 2^-9 (subnormals). In units of the binade's spacing 2^(e-3) the value
        // is exact in f64; rounded to nearest even it is 8..=16 (normal) or 0..=8 (below
        // 2^-6), and `(e + 7) * 8 + units - 8` is the code either way: 16 units carry into
        // the next exponent, and with e = -6 the code is the count of 2^-9 units.
        let e = (((x.abs().to_bits() >> 23) as i32) - 127).max(-6);
        let units = (a * 2f64.powi(3 - e)).round_ties_even() as i32;
        let code = ((e + 7) * 8 + units - 8) as u8;
        F8E4M3(code | sign)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `round_f32` has the bits of `from_f32(x).to_f32()`: every value and midpoint of e4m3
    /// and its neighbours (the ties, both signs, the saturation edge, zero, subnormals), the
    /// infinities and NaN, and a stride through all f32 bit patterns.
    #[test]
    fn round_f32_equals_the_code_round_trip() {
        let check = |x: f32| {
            let want = F8E4M3::from_f32(x).to_f32();
            let got = F8E4M3::round_f32(x);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{x:e} ({:#x}): {got:e}, want {want:e}",
                x.to_bits()
            );
        };
        let values: Vec<f32> = (0..=0x7eu8).map(|c| F8E4M3(c).to_f32()).collect();
        let mut edges = values.clone();
        edges.extend(values.windows(2).map(|w| (w[0] + w[1]) / 2.0));
        edges.extend([
            464.0,
            480.0,
            f32::MAX,
            f32::INFINITY,
            f32::MIN_POSITIVE,
            1e-45,
        ]);
        for x in edges {
            for y in [x, -x] {
                for bits in y.to_bits().saturating_sub(2)..=y.to_bits().saturating_add(2) {
                    check(f32::from_bits(bits));
                }
            }
        }
        for bits in (0..=u32::MAX).step_by(997) {
            check(f32::from_bits(bits));
        }
        assert!(!F8E4M3::round_f32(f32::NAN).is_sign_negative());
        assert!(F8E4M3::round_f32(-f32::NAN).is_sign_negative());
    }
}
