#![no_main]
//! Paged prefill: caches with extreme geometry and tables (f32, f16 and FP8 with per-head
//! scales), fixed and varlen query chunks, CPU forward. For finite inputs the output is
//! finite, and a row with LSE -inf (no visible key) has a zero output.

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
    let heads_q = common::size(u)?;
    let cu: Vec<i32> = u.arbitrary()?;
    let options = common::options(u)?;
    let pre = if u.arbitrary()? {
        PagedPrefill::new(&cache, heads_q, common::size(u)?, &options)
    } else {
        PagedPrefill::new_varlen(&cache, heads_q, &cu, &options)
    };
    let Ok(pre) = pre else {
        return Ok(());
    };
    let _ = (pre.total_q(), pre.lse_len(), pre.group(), pre.mask());
    let layout = cache.layout();
    // Work (rows x keys x head_dim, and a per-(sequence, head) overhead) a run spends in a
    // moment.
    let max_sk = (0..cache.batch()).filter_map(|b| cache.seqlen(b)).max();
    let work = pre
        .lse_len()
        .saturating_mul(max_sk.unwrap_or(0))
        .saturating_mul(layout.head_dim);
    if work > 1 << 20 || cache.batch().saturating_mul(pre.heads_q()) > 1 << 9 {
        return Ok(());
    }
    let (Some(q), Some(k), Some(v)) = (
        common::buffer(u, pre.out_len())?,
        common::buffer(u, layout.cache_len())?,
        common::buffer(u, layout.cache_len())?,
    ) else {
        return Ok(());
    };
    let (rows, hq, d) = (pre.total_q(), pre.heads_q(), layout.head_dim);
    let qs = match pre.cu_seqlens_q() {
        Some(_) => Strides::contiguous(rows, hq, d),
        None => Strides::contiguous(pre.q_len(), hq, d),
    };
    let short: usize = u.int_in_range(0..=1)?;
    let mut out = vec![0.0f32; pre.out_len()];
    let mut lse = vec![0.0f32; pre.lse_len().saturating_sub(short)];
    let r = match u.int_in_range(0..=2u8)? {
        0 => pre.forward_cpu(
            Strided::new(&q[..], qs),
            KvPages {
                k: &k[..],
                v: &v[..],
            },
            Strided::new(&mut out[..], qs),
            Some(&mut lse[..]),
        ),
        1 => {
            let (k, v) = (convert::<f16>(&k), convert::<f16>(&v));
            pre.forward_cpu(
                Strided::new(&q[..], qs),
                KvPages {
                    k: &k[..],
                    v: &v[..],
                },
                Strided::new(&mut out[..], qs),
                Some(&mut lse[..]),
            )
        }
        _ => {
            let (k, v) = (convert::<F8E4M3>(&k), convert::<F8E4M3>(&v));
            pre.forward_cpu(
                Strided::new(&q[..], qs),
                KvPages {
                    k: &k[..],
                    v: &v[..],
                },
                Strided::new(&mut out[..], qs),
                Some(&mut lse[..]),
            )
        }
    };
    if r.is_err() {
        return Ok(());
    }
    let scales_tame = cache
        .kv_scales()
        .is_none_or(|s| s.k().iter().chain(s.v()).all(|x| *x < 1e2));
    if common::tame(&q) && common::tame(&k) && common::tame(&v) && scales_tame && pre.scale() <= 8.0
    {
        assert!(out.iter().all(|x| x.is_finite()), "non-finite output");
        assert!(lse.iter().all(|x| !x.is_nan() && *x != f32::INFINITY));
    }
    // Rows: sequence b's query rows, packed (varlen) or [batch, q_len]; LSE [heads_q, rows]
    // (varlen) or [batch, heads_q, q_len].
    for b in 0..cache.batch().min(1 << 12) {
        let (r0, n) = match pre.cu_seqlens_q() {
            Some(cu) => (cu[b] as usize, (cu[b + 1] - cu[b]) as usize),
            None => (b * pre.q_len(), pre.q_len()),
        };
        for h in 0..hq {
            for i in 0..n {
                let l = match pre.cu_seqlens_q() {
                    Some(_) => h * rows + r0 + i,
                    None => (b * hq + h) * pre.q_len() + i,
                };
                if lse[l] == f32::NEG_INFINITY {
                    let o = ((r0 + i) * hq + h) * d;
                    assert!(out[o..o + d].iter().all(|x| *x == 0.0), "row without keys");
                }
            }
        }
    }
    Ok(())
}

fn convert<C: Element>(xs: &[f32]) -> Vec<C> {
    xs.iter().map(|&x| C::from_f32(x)).collect()
}
