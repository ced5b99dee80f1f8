#![no_main]
//! Dense: constructor with extreme shapes and options, then a forward pass with arbitrary
//! strides and buffer lengths.

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use longattn::*;

fuzz_target!(|data: &[u8]| {
    let mut u = arbitrary::Unstructured::new(data);
    let _ = run(&mut u);
});

fn run(u: &mut arbitrary::Unstructured) -> arbitrary::Result<()> {
    let (b, hq, hkv, d) = (
        common::size(u)?,
        common::size(u)?,
        common::size(u)?,
        common::size(u)?,
    );
    let (sq, sk) = (common::size(u)?, common::size(u)?);
    let shape = AttentionShape {
        batch: b,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        seqlens: SeqLens::Fixed {
            seqlen_q: sq,
            seqlen_k: sk,
        },
    };
    let Ok(attn) = FlashAttention::new(&shape, &common::options(u)?) else {
        return Ok(());
    };
    let (qs, ks) = (
        Strides::contiguous(sq, hq, d),
        Strides::contiguous(sk, hkv, d),
    );
    let os = Strides {
        batch: common::stride(u)?,
        seq: common::stride(u)?,
        head: common::stride(u)?,
    };
    let short: usize = u.int_in_range(0..=2)?;
    let (Some(q), Some(k), Some(v)) = (
        common::buffer(u, attn.out_len())?,
        common::buffer(
            u,
            b.saturating_mul(sk).saturating_mul(hkv).saturating_mul(d),
        )?,
        common::buffer(
            u,
            b.saturating_mul(sk).saturating_mul(hkv).saturating_mul(d),
        )?,
    ) else {
        return Ok(());
    };
    // Work (rows x keys x head_dim) a run spends in a moment: a 65536 x 65536 problem fits
    // the buffer cap but takes minutes. Problems without rows cost nothing, however many
    // sequences and heads they declare, and stay in.
    let work = attn
        .lse_len()
        .saturating_mul(attn.max_seqlen_k())
        .saturating_mul(attn.head_dim());
    if work > 1 << 20 {
        return Ok(());
    }
    let mut out = vec![0.0f32; attn.out_len().saturating_sub(short).max(256)];
    let mut lse = vec![0.0f32; attn.lse_len().saturating_sub(short)];
    let out_strides = if u.arbitrary()? { os } else { qs };
    let r = attn.forward_cpu(
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
        Strided::new(&mut out[..], out_strides),
        Some(&mut lse[..]),
    );
    // Compared where the softmax is not an argmax in all but name (f32 rounding may then
    // pick another winner than the f64 oracle).
    if r.is_ok()
        && out_strides == qs
        && attn.scale() <= 8.0
        && q.iter()
            .chain(&k)
            .chain(&v)
            .all(|x| x.is_finite() && x.abs() < 1e4)
    {
        let (want, _) = reference::dense_attention_f64(
            &attn,
            Strided::new(&q[..], qs),
            Strided::new(&k[..], ks),
            Strided::new(&v[..], ks),
        )
        .expect("the oracle accepts what forward_cpu accepted");
        for (g, w) in out.iter().zip(&want) {
            if w.is_finite() {
                assert!(
                    (*g as f64 - w).abs() <= 1e-2 * (1.0 + w.abs()),
                    "{g} vs {w}"
                );
            }
        }
    }
    Ok(())
}
