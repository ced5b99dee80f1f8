//! Input data shared by the examples and the benches (included with `#[path]`): fixed-seed
//! uniform values so that runs are repeatable without a random-number crate.

use longattn::Element;

/// A 64-bit linear congruential step (Knuth's MMIX constants); returns the new state.
pub fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state
}

/// `n` values uniform in [-1, 1) from `seed` (never all zeros, which would hide unwritten
/// outputs and run faster than real data).
pub fn uniform<T: Element>(n: usize, seed: u64) -> Vec<T> {
    let mut s = seed;
    (0..n)
        .map(|_| T::from_f32(((lcg(&mut s) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0))
        .collect()
}
