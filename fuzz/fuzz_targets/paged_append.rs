#![no_main]
//! Paged append: caches with extreme geometry and tables, arbitrary `cu_seqlens_new`,
//! strides and buffer lengths, into f32, f16 and FP8 (with per-head `KvScales`) caches with
//! Quest bounds. After an accepted append every new value is stored as
//! `C::from_f32(x / scale)` in its slot and lies within its page's bounds.

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use longattn::*;

fuzz_target!(|data: &[u8]| {
    let mut u = arbitrary::Unstructured::new(data);
    let _ = run(&mut u);
});

fn run(u: &mut arbitrary::Unstructured) -> arbitrary::Result<()> {
    let Some(cache) = common::paged_cache(u)? else {
        return Ok(());
    };
    let cu: Vec<i32> = u.arbitrary()?;
    let layout = cache.layout();
    let (hkv, d) = (layout.heads_kv, layout.head_dim);
    let total = cu.last().map_or(0, |&x| x.max(0) as usize);
    let contiguous = Strides::contiguous(total, hkv, d);
    let strides = if u.arbitrary()? {
        Strides {
            batch: common::stride(u)?,
            seq: common::stride(u)?,
            head: common::stride(u)?,
        }
    } else {
        contiguous
    };
    // Lengths: the contiguous extent, give or take a few.
    let len = total
        .saturating_mul(hkv)
        .saturating_mul(d)
        .saturating_add(u.int_in_range(0..=3)?)
        .saturating_sub(u.int_in_range(0..=1)?);
    let (Some(kn), Some(vn)) = (common::buffer(u, len)?, common::buffer(u, len)?) else {
        return Ok(());
    };
    let meta_len = layout.meta_len().saturating_sub(u.int_in_range(0..=1)?);
    let with_meta = u.arbitrary()?;
    match u.int_in_range(0..=2u8)? {
        0 => append::<f32>(u, &cache, &cu, &kn, &vn, strides, with_meta, meta_len),
        1 => append::<f16>(u, &cache, &cu, &kn, &vn, strides, with_meta, meta_len),
        _ => append::<F8E4M3>(u, &cache, &cu, &kn, &vn, strides, with_meta, meta_len),
    }
}

#[allow(clippy::too_many_arguments)]
fn append<C: Element>(
    u: &mut arbitrary::Unstructured,
    cache: &PagedCache,
    cu: &[i32],
    kn: &[f32],
    vn: &[f32],
    strides: Strides,
    with_meta: bool,
    meta_len: usize,
) -> arbitrary::Result<()> {
    let layout = cache.layout();
    let (Some(kc), Some(kmin)) = (
        common::buffer(u, layout.cache_len())?,
        common::buffer(u, meta_len)?,
    ) else {
        return Ok(());
    };
    let conv = |xs: &[f32]| xs.iter().map(|&x| C::from_f32(x)).collect::<Vec<C>>();
    let (mut k, mut v) = (conv(&kc), conv(&kc));
    let (mut lo, mut hi) = (conv(&kmin), conv(&kmin));
    let r = cache.append_cpu(
        cu,
        Strided::new(kn, strides),
        Strided::new(vn, strides),
        KvPages {
            k: &mut k[..],
            v: &mut v[..],
        },
        with_meta.then_some(PageMeta {
            kmin: &mut lo[..],
            kmax: &mut hi[..],
        }),
    );
    if r.is_err() {
        return Ok(());
    }
    let (ps, hkv, d) = (layout.page_size, layout.heads_kv, layout.head_dim);
    // Looked up, not tabled: a pageless cache may declare 2^31 kv heads.
    let scales = match (cache.kv_scales(), C::DTYPE) {
        (Some(s), DType::F8E4M3) => Some(s),
        _ => None,
    };
    let sk = |h: usize| scales.map_or(1.0, |s| s.k()[h]);
    let sv = |h: usize| scales.map_or(1.0, |s| s.v()[h]);
    let same = |a: C, b: C| a.to_f32().to_bits() == b.to_f32().to_bits() || a.to_f32().is_nan();
    for b in 0..cache.batch() {
        let t0 = cu[b] as usize;
        let n = (cu[b + 1] - cu[b]) as usize;
        let end = cache.seqlen(b).unwrap();
        for (t, pos) in (t0..t0 + n).zip(end - n..end) {
            let page = cache.page_id(b, pos / ps).unwrap();
            for h in 0..hkv {
                let dst = layout.slot_offset(page, pos % ps, h).unwrap();
                let src = t * strides.seq as usize + h * strides.head as usize;
                for c in 0..d {
                    let want_k = C::from_f32(kn[src + c] / sk(h));
                    assert!(same(k[dst + c], want_k), "k stored");
                    assert!(
                        same(v[dst + c], C::from_f32(vn[src + c] / sv(h))),
                        "v stored"
                    );
                    if with_meta {
                        let m = layout.meta_offset(page, h).unwrap() + c;
                        let x = k[dst + c].to_f32();
                        assert!(
                            x.is_nan() || (lo[m].to_f32() <= x && x <= hi[m].to_f32()),
                            "bounds {} <= {x} <= {}",
                            lo[m].to_f32(),
                            hi[m].to_f32()
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
