#![no_main]
//! Star Attention: contexts, worlds, query lengths and options with extreme values, both
//! CPU phases. Phase 2 computed the distributed way (per-rank partials, LSE merge) must
//! equal its definition (one dense problem over every key), and results are finite for
//! finite inputs.

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use longattn::*;

fuzz_target!(|data: &[u8]| {
    let mut u = arbitrary::Unstructured::new(data);
    let _ = run(&mut u);
});

fn run(u: &mut arbitrary::Unstructured) -> arbitrary::Result<()> {
    let shape = RingShape {
        batch: common::size(u)?,
        heads_q: common::size(u)?,
        heads_kv: common::size(u)?,
        head_dim: common::size(u)?,
    };
    let (context, query) = (common::size(u)?, common::size(u)?);
    let world = if u.arbitrary()? {
        common::size(u)?
    } else {
        u.int_in_range(0..=8)?
    };
    let Ok(star) = StarAttention::new(context, world, query, shape, &common::options(u)?) else {
        return Ok(());
    };
    let rank = if u.arbitrary()? {
        common::size(u)?
    } else {
        u.int_in_range(0..=8)?
    };
    let _ = (star.block(rank), star.query_partial(rank));
    let (Ok(def), Ok(ctx)) = (star.query_definition(), star.context_attention(rank)) else {
        return Ok(());
    };
    // Work a run spends in a moment (rows x keys x head_dim, per-(sequence, head) overhead).
    let work = |a: &FlashAttention| {
        a.lse_len()
            .saturating_mul(a.max_seqlen_k())
            .saturating_mul(a.head_dim())
            > 1 << 20
            || a.batch().saturating_mul(a.heads_q()) > 1 << 9
    };
    if work(&def) || work(&ctx) || world > 64 {
        return Ok(());
    }
    let RingShape {
        batch: b,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
    } = shape;
    let row = hkv.saturating_mul(d);
    let all = context + query;
    // K/V of the whole sequence, [batch, context + query, heads_kv, head_dim].
    let (Some(k), Some(v)) = (
        common::buffer(u, b.saturating_mul(all).saturating_mul(row))?,
        common::buffer(u, b.saturating_mul(all).saturating_mul(row))?,
    ) else {
        return Ok(());
    };
    // Rows `r` of every sequence, contiguous `[batch, len, heads_kv, head_dim]`.
    let rows = |x: &[f32], r: std::ops::Range<usize>| -> Vec<f32> {
        (0..b)
            .flat_map(|bi| x[(bi * all + r.start) * row..(bi * all + r.end) * row].to_vec())
            .collect()
    };
    if rank < world {
        let blk = star.block(rank);
        let Some(q) = common::buffer(u, ctx.out_len())? else {
            return Ok(());
        };
        let qs = Strides::contiguous(blk.len(), hq, d);
        let mut out = vec![0.0f32; ctx.out_len()];
        let mut lse = vec![0.0f32; ctx.lse_len()];
        let (a, kb) = (rows(&k, star.block(0)), rows(&k, blk.clone()));
        let (av, vb) = (rows(&v, star.block(0)), rows(&v, blk));
        let r = star.context_cpu(
            rank,
            Strided::new(&q[..], qs),
            &a,
            &av,
            &kb,
            &vb,
            Strided::new(&mut out[..], qs),
            Some(&mut lse[..]),
        );
        if r.is_ok() && common::tame(&q) && common::tame(&k) && common::tame(&v) {
            assert!(out.iter().all(|x| x.is_finite()), "phase 1 non-finite");
        }
    }
    let Some(q) = common::buffer(u, def.out_len())? else {
        return Ok(());
    };
    let qs = Strides::contiguous(query, hq, d);
    let kb: Vec<Vec<f32>> = (0..world).map(|r| rows(&k, star.block(r))).collect();
    let vb: Vec<Vec<f32>> = (0..world).map(|r| rows(&v, star.block(r))).collect();
    let (kq, vq) = (rows(&k, context..all), rows(&v, context..all));
    let kr: Vec<&[f32]> = kb.iter().map(|x| &x[..]).collect();
    let vr: Vec<&[f32]> = vb.iter().map(|x| &x[..]).collect();
    let mut out = vec![0.0f32; def.out_len()];
    let mut lse = vec![0.0f32; def.lse_len()];
    let r = star.query_cpu(
        Strided::new(&q[..], qs),
        &kr,
        &vr,
        &kq,
        &vq,
        Strided::new(&mut out[..], qs),
        Some(&mut lse[..]),
    );
    if r.is_ok() && common::tame(&q) && common::tame(&k) && common::tame(&v) && def.scale() <= 8.0 {
        assert!(out.iter().all(|x| x.is_finite()), "phase 2 non-finite");
        let ks = Strides::contiguous(all, hkv, d);
        let mut want = vec![0.0f32; def.out_len()];
        let mut wl = vec![0.0f32; def.lse_len()];
        def.forward_cpu(
            Strided::new(&q[..], qs),
            Strided::new(&k[..], ks),
            Strided::new(&v[..], ks),
            Strided::new(&mut want[..], qs),
            Some(&mut wl[..]),
        )
        .expect("the definition accepts what query_cpu accepted");
        for (g, w) in out.iter().zip(&want).chain(lse.iter().zip(&wl)) {
            assert!(
                g == w || (g - w).abs() <= 1e-3 * (1.0 + w.abs()),
                "{g} vs {w}"
            );
        }
    }
    Ok(())
}
