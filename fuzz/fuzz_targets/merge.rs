#![no_main]
//! Merge: extreme shapes (products that overflow) against small buffers.

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use longattn::*;

fuzz_target!(|data: &[u8]| {
    let mut u = arbitrary::Unstructured::new(data);
    let _ = run(&mut u);
});

fn run(u: &mut arbitrary::Unstructured) -> arbitrary::Result<()> {
    let m = MergeShape {
        batch: common::size(u)?,
        seqlen: common::size(u)?,
        heads: common::size(u)?,
        head_dim: common::size(u)?,
    };
    let _ = (m.o_len(), m.lse_len());
    let (ol, ll) = (u.int_in_range(0..=64usize)?, u.int_in_range(0..=16usize)?);
    let (Some(ao), Some(bo), Some(al), Some(bl)) = (
        common::buffer(u, ol)?,
        common::buffer(u, ol)?,
        common::buffer(u, ll)?,
        common::buffer(u, ll)?,
    ) else {
        return Ok(());
    };
    let (mut o, mut l) = (vec![0.0f32; ol], vec![0.0f32; ll]);
    let _ = m.merge_cpu(
        Partial {
            o: &ao[..],
            lse: &al[..],
        },
        Partial {
            o: &bo[..],
            lse: &bl[..],
        },
        Partial {
            o: &mut o[..],
            lse: &mut l[..],
        },
    );
    Ok(())
}
