//! Helpers shared by the integration tests: seeded random inputs, error metrics, and the
//! GPU gate that skips loudly (or fails under LONGATTN_REQUIRE_GPU=1).
#![allow(dead_code)]

pub mod neighborhood;
pub mod paged;
pub mod ring;

use longattn::{DType, Element};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

pub fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// Uniform values in [-1, 1) (never all zeros).
pub fn random_vec<T: Element>(rng: &mut SmallRng, n: usize) -> Vec<T> {
    (0..n)
        .map(|_| T::from_f32(rng.random_range(-1.0f32..1.0)))
        .collect()
}

/// `||got - want|| / ||want||`; NaN anywhere (or a NaN/inf mismatch) gives +inf.
/// Relative L2 tolerance of a GPU result in element type `T` (q/out) against the f64
/// reference: f16/bf16 rounding of the inputs, P and the output dominate.
pub fn tolerance<T: Element>() -> f64 {
    match T::DTYPE {
        DType::BF16 => 2e-2,
        DType::F16 => 4e-3,
        DType::F32 => 1e-5,
        DType::F8E4M3 => unreachable!("f8e4m3 is a KV-cache type, never q"),
    }
}

pub fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if g.is_nan() || w.is_nan() {
            return f64::INFINITY;
        }
        num += (g - w) * (g - w);
        den += w * w;
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

/// Checks LSE values: same `-inf` pattern, max abs error elsewhere under `tol`.
pub fn check_lse(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lse length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(!g.is_nan(), "{what}: lse[{i}] is NaN");
        if w == f64::NEG_INFINITY {
            assert_eq!(g, f32::NEG_INFINITY, "{what}: lse[{i}] should be -inf");
        } else {
            assert!(
                (g as f64 - w).abs() <= tol,
                "{what}: lse[{i}] = {g}, want {w}"
            );
        }
    }
}

/// LSE tolerance of a GPU run against the f64 reference `want_lse`: 2e-3 relative to the
/// largest finite |LSE| (plus 1), since the f32 LSE rounds relative to its magnitude.
pub fn lse_tol(want_lse: &[f64]) -> f64 {
    2e-3 * (1.0
        + want_lse
            .iter()
            .filter(|x| x.is_finite())
            .fold(0.0f64, |a, &b| a.max(b.abs())))
}

/// Packed-batch offsets `[0, l0, l0 + l1, ...]` (length `lens.len() + 1`) of a varlen batch.
pub fn cu_seqlens(lens: &[usize]) -> Vec<i32> {
    std::iter::once(0)
        .chain(lens.iter().scan(0, |acc, &l| {
            *acc += l as i32;
            Some(*acc)
        }))
        .collect()
}

pub fn to_f64<T: Element>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

/// Opens GPU 0 for a GPU test. Without one it prints a skip line and returns None, unless
/// LONGATTN_REQUIRE_GPU=1, where it fails the test.
pub fn gpu_or_skip(test: &str) -> Option<std::sync::Arc<cudarc::driver::CudaContext>> {
    match longattn::device::open_gpu(0) {
        Ok(ctx) => Some(ctx),
        Err(e) => {
            if longattn::device::gpu_required() {
                panic!("{test}: LONGATTN_REQUIRE_GPU=1 but no GPU: {e}");
            }
            // Written to the stderr handle, not through eprintln!, so that the test
            // harness's output capture does not hide the skip.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIP (no GPU) {test}: {e}");
            None
        }
    }
}

/// [`gpu_or_skip`], then GPU 0's default stream (the stream of a test that needs no other).
pub fn gpu_stream_or_skip(test: &str) -> Option<std::sync::Arc<cudarc::driver::CudaStream>> {
    gpu_or_skip(test).map(|ctx| ctx.default_stream())
}

/// Whether GPU 0 is a Hopper (compute capability 9.0), where the sm_90a kernels (wgmma, FP8)
/// run; false without a GPU. Asked once per test binary.
pub fn is_hopper() -> bool {
    static HOPPER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HOPPER.get_or_init(|| {
        longattn::device::open_gpu(0)
            .ok()
            .and_then(|ctx| ctx.compute_capability().ok())
            == Some((9, 0))
    })
}

/// A fresh stream on `ctx` for CUDA-graph capture (capture needs a non-default stream), with
/// the context's event tracking off (it would record cross-stream waits into the graph).
/// Tests that call this use that one stream only.
pub fn capture_stream(
    ctx: &std::sync::Arc<cudarc::driver::CudaContext>,
) -> std::sync::Arc<cudarc::driver::CudaStream> {
    // SAFETY: the calling test uses the returned stream only, so no cross-stream ordering is
    // lost by not tracking events.
    unsafe { ctx.disable_event_tracking() };
    ctx.new_stream().unwrap()
}

/// Captures what `record` queues on `stream` (after finishing the work already queued) into
/// an instantiated CUDA graph; panics if nothing was captured.
pub fn capture_graph(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    record: impl FnOnce(),
) -> cudarc::driver::CudaGraph {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    stream.synchronize().unwrap();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    record();
    stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("the work was captured")
}
