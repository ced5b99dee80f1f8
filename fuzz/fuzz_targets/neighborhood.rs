#![no_main]
//! Neighborhood: grid dims, kernel/dilation/stride/causal and neighbour lists.

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use longattn::*;

fuzz_target!(|data: &[u8]| {
    let mut u = arbitrary::Unstructured::new(data);
    let _ = run(&mut u);
});

fn run(u: &mut arbitrary::Unstructured) -> arbitrary::Result<()> {
    let n = u.int_in_range(0..=4usize)?;
    let dims = (0..n)
        .map(|_| {
            Ok(NeighborhoodDim {
                length: common::size(u)?,
                kernel: common::size(u)?,
                dilation: common::size(u)?,
                causal: u.arbitrary()?,
                stride: common::size(u)?,
            })
        })
        .collect::<arbitrary::Result<Vec<_>>>()?;
    let shape = NeighborhoodShape {
        batch: common::size(u)?,
        heads_q: common::size(u)?,
        heads_kv: common::size(u)?,
        head_dim: common::size(u)?,
        dims: &dims,
    };
    if let Ok(na) = NeighborhoodAttention::new(&shape, &common::options(u)?) {
        let token = common::size(u)?;
        let _ = (na.out_len(), na.lse_len());
        if let Ok(n) = na.neighbors(token) {
            let len = n.len(); // lazy: counting costs nothing
            assert!(n.take(1 << 12).all(|k| k < na.tokens()) || len == 0);
        }
    }
    Ok(())
}
