#![no_main]
//! Paged: cache geometry, tables and decode with extreme values.

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use longattn::*;

fuzz_target!(|data: &[u8]| {
    let mut u = arbitrary::Unstructured::new(data);
    let _ = run(&mut u);
});

fn run(u: &mut arbitrary::Unstructured) -> arbitrary::Result<()> {
    let layout = PagedLayout {
        num_pages: common::size(u)?,
        page_size: common::size(u)?,
        heads_kv: common::size(u)?,
        head_dim: common::size(u)?,
    };
    let bt: Vec<i32> = u.arbitrary()?;
    let sl: Vec<i32> = u.arbitrary()?;
    let Ok(cache) = PagedCache::new(
        layout,
        PageTable {
            block_table: &bt,
            max_pages_per_seq: common::size(u)?,
            seqlens_k: &sl,
        },
    ) else {
        return Ok(());
    };
    let Ok(dec) = PagedDecode::new(
        &cache,
        common::size(u)?,
        common::size(u)?,
        &common::options(u)?,
    ) else {
        return Ok(());
    };
    let _ = (
        dec.splits_for(common::size(u)?),
        dec.kv_bytes_read(common::size(u)?),
    );
    let (Some(k), Some(q)) = (
        common::buffer(u, layout.cache_len())?,
        common::buffer(u, dec.out_len())?,
    ) else {
        return Ok(());
    };
    let qs = Strides::contiguous(dec.q_len(), dec.heads_q(), layout.head_dim);
    let mut out = vec![0.0f32; dec.out_len()];
    let _ = dec.forward_cpu(
        Strided::new(&q[..], qs),
        KvPages {
            k: &k[..],
            v: &k[..],
        },
        None,
        Strided::new(&mut out[..], qs),
        None,
    );
    Ok(())
}
