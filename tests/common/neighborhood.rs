//! Neighborhood problems shared by the host-schedule tests (`neighborhood_schedule.rs`,
//! `neighborhood_hopper_tiles.rs`).

use longattn::*;
use rand::Rng;
use rand::rngs::SmallRng;

/// One batch, one head, head_dim 64 (the schedules depend on the grid only).
pub fn problem(dims: &[NeighborhoodDim]) -> NeighborhoodAttention {
    NeighborhoodAttention::new(
        &NeighborhoodShape {
            batch: 1,
            heads_q: 1,
            heads_kv: 1,
            head_dim: 64,
            dims,
        },
        &AttentionOptions::default(),
    )
    .unwrap()
}

/// A random dim of at most `max_len` positions: dilation up to `max_dilation` (30%), causal
/// (25%), stride (30% of the non-causal ones).
pub fn random_dim(r: &mut SmallRng, max_len: usize, max_dilation: usize) -> NeighborhoodDim {
    loop {
        let length = r.random_range(1..=max_len);
        let dilation = if r.random_bool(0.3) {
            r.random_range(1..=max_dilation)
        } else {
            1
        };
        if dilation > length {
            continue;
        }
        let kernel = r.random_range(1..=length / dilation);
        let causal = r.random_bool(0.25);
        let stride = if !causal && r.random_bool(0.3) {
            r.random_range(1..=kernel)
        } else {
            1
        };
        return NeighborhoodDim::new(length, kernel)
            .with_dilation(dilation)
            .with_causal(causal)
            .with_stride(stride);
    }
}

/// The bench problems of issue 13 (examples/neighborhood_bench.rs), named.
pub fn bench_problems() -> Vec<(&'static str, Vec<NeighborhoodDim>)> {
    vec![
        ("1-D 32k w2048", vec![NeighborhoodDim::new(32768, 2048)]),
        ("2-D 64x64 k7", vec![NeighborhoodDim::new(64, 7); 2]),
        ("2-D 128x128 k13", vec![NeighborhoodDim::new(128, 13); 2]),
        ("2-D 128x128 k31", vec![NeighborhoodDim::new(128, 31); 2]),
        (
            "3-D 16x64x64 k3x7x7",
            vec![
                NeighborhoodDim::new(16, 3),
                NeighborhoodDim::new(64, 7),
                NeighborhoodDim::new(64, 7),
            ],
        ),
        (
            "3-D 16x64x64 k8x16x16",
            vec![
                NeighborhoodDim::new(16, 8),
                NeighborhoodDim::new(64, 16),
                NeighborhoodDim::new(64, 16),
            ],
        ),
    ]
}
