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

/// Median milliseconds of `run` on `stream`, timed with CUDA events: one warm-up (module
/// load), one timed run that sizes the repetitions to about `budget_ms` (between 3 and
/// `max_reps`), then the median of those. Not every includer times GPU work.
#[allow(dead_code)]
pub fn time_ms(
    stream: &std::sync::Arc<longattn::cudarc::driver::CudaStream>,
    budget_ms: f64,
    max_reps: usize,
    mut run: impl FnMut() -> longattn::Result<()>,
) -> longattn::Result<f64> {
    use longattn::cudarc::driver::sys::CUevent_flags;
    let ev = || stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
    run()?;
    let mut timed = || -> longattn::Result<f64> {
        let a = ev()?;
        run()?;
        let b = ev()?;
        b.synchronize()?;
        Ok(a.elapsed_ms(&b)? as f64)
    };
    let once = timed()?;
    let reps = ((budget_ms / once.max(1e-3)) as usize).clamp(3, max_reps.max(3));
    let mut times = (0..reps)
        .map(|_| timed())
        .collect::<longattn::Result<Vec<f64>>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Visible (query, key) pairs of one head of one sequence under `mask` (window and sinks):
/// the pairs a TFLOP/s figure counts.
#[allow(dead_code)]
pub fn visible_pairs(mask: &longattn::Mask, sq: usize, sk: usize) -> u64 {
    (0..sq)
        .map(|i| {
            let w = mask.window_range(i, sq, sk);
            let s = mask.sink_range_rows(i..i + 1, sq, sk);
            let both = w.end.min(s.end).saturating_sub(w.start.max(s.start));
            (w.len() + s.len() - both) as u64
        })
        .sum()
}
