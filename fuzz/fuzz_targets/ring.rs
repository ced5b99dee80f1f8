#![no_main]
//! Ring: layouts, schedule, pieces and (un)sharding with extreme values.

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use longattn::*;

fuzz_target!(|data: &[u8]| {
    let mut u = arbitrary::Unstructured::new(data);
    let _ = run(&mut u);
});

fn run(u: &mut arbitrary::Unstructured) -> arbitrary::Result<()> {
    let sharding =
        [Sharding::Contiguous, Sharding::Zigzag, Sharding::Stripe][u.int_in_range(0..=2usize)?];
    let world = u.int_in_range(0..=64usize)?;
    let Ok(layout) = RingLayout::new(common::size(u)?, world, sharding) else {
        return Ok(());
    };
    let (rank, step) = (common::size(u)?, common::size(u)?);
    let _ = (layout.shard_len(rank), layout.kv_source(rank, step));
    let _ = layout.unshard(
        &vec![Vec::<u8>::new(); world],
        common::size(u)?,
        common::size(u)?,
    );
    let _ = layout.shard::<u8>(&[], common::size(u)?, common::size(u)?);
    let shape = RingShape {
        batch: common::size(u)?,
        heads_q: common::size(u)?,
        heads_kv: common::size(u)?,
        head_dim: common::size(u)?,
    };
    if let Ok(ring) = RingAttention::new(layout, shape, &common::options(u)?) {
        let _ = (
            ring.out_len(rank),
            ring.lse_len(rank),
            ring.pieces(rank, step),
        );
        // The schedule costs O(world * seqlen): only for sequences that run in a moment.
        if ring.layout().seqlen() <= 1 << 12 {
            let sch = ring.schedule();
            assert_eq!(sch.compute.len(), world);
            let _ = ring.plans().map(|p| RingAttention::check_plans(&p));
            let _ = ring.rank_plan(rank);
        } else if rank >= world {
            // A rank outside the world is refused before the schedule is computed.
            assert!(ring.rank_plan(rank).is_err());
        }
    }
    Ok(())
}
