#![no_main]
//! Block-sparse: masks from CSR arrays, lists, the pattern builders and MoBA's selections,
//! bound to a dense problem and run on the CPU. A dense `Partial` mask must reproduce the
//! dense path; every result is finite for finite inputs, and a row with LSE -inf (no visible
//! key) has a zero output.

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use longattn::block_sparse::{moba, patterns};
use longattn::*;

fuzz_target!(|data: &[u8]| {
    let mut u = arbitrary::Unstructured::new(data);
    let _ = run(&mut u);
});

/// Entries (lists or listed blocks) a builder may produce here: the API bounds them by
/// `MAX_BLOCK_ENTRIES`, which is more than a fuzz iteration should spend.
const WORK: usize = 1 << 14;

fn run(u: &mut arbitrary::Unstructured) -> arbitrary::Result<()> {
    let (b, hq, hkv, d) = (
        common::size(u)?,
        common::size(u)?,
        common::size(u)?,
        common::size(u)?,
    );
    let (sq, sk) = (common::size(u)?, common::size(u)?);
    let cu: [Vec<i32>; 2] = [u.arbitrary()?, u.arbitrary()?];
    let varlen = u.arbitrary()?;
    let shape = AttentionShape {
        batch: b,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        seqlens: if varlen {
            SeqLens::Varlen {
                cu_seqlens_q: &cu[0],
                cu_seqlens_k: &cu[1],
            }
        } else {
            SeqLens::Fixed {
                seqlen_q: sq,
                seqlen_k: sk,
            }
        },
    };
    let options = common::options(u)?;
    let attn = FlashAttention::new(&shape, &options).ok();
    let (block_m, block_n) = (common::size(u)?, common::size(u)?);
    let (mb, mh) = (common::size(u)?, common::size(u)?);
    let pshape = patterns::PatternShape {
        heads: mh,
        seqlen_q: attn.as_ref().map_or(sq, |a| a.max_seqlen_q()),
        seqlen_k: attn.as_ref().map_or(sk, |a| a.max_seqlen_k()),
        block: block_m,
        mask: attn.as_ref().map_or(options.mask, |a| a.mask()),
    };
    let small = |bm: usize, bn: usize| {
        BlockMaskDims::for_lengths(mb, mh, pshape.seqlen_q, pshape.seqlen_k, bm, bn)
            .ok()
            .and_then(|d| {
                let lists = d.num_lists().ok()?;
                (lists.saturating_mul(d.num_k_blocks.max(1)) <= WORK).then_some(d)
            })
    };
    let kind = [BlockKind::Partial, BlockKind::Full][u.int_in_range(0..=1usize)?];
    let mut dense_partial = false;
    let mask = match u.int_in_range(0..=9u8)? {
        0 => {
            let dims = BlockMaskDims {
                batch: mb,
                heads: mh,
                num_q_blocks: common::size(u)?,
                num_k_blocks: common::size(u)?,
                block_m,
                block_n,
            };
            let (o, i, f): (Vec<i32>, Vec<i32>, Vec<bool>) =
                (u.arbitrary()?, u.arbitrary()?, u.arbitrary()?);
            BlockMask::from_csr(dims, o, i, f)
        }
        1 => {
            let Some(dims) = small(block_m, block_n) else {
                return Ok(());
            };
            dense_partial = kind == BlockKind::Partial;
            BlockMask::dense(dims, kind)
        }
        2 => {
            let Some(dims) = small(block_m, block_n) else {
                return Ok(());
            };
            let lists: Vec<Vec<(usize, bool)>> = u.arbitrary()?;
            BlockMask::from_lists(dims, |id| {
                let l = lists.get(id.q_block).cloned().unwrap_or_default();
                l.into_iter()
                    .map(|(kb, f)| (kb, [BlockKind::Partial, BlockKind::Full][f as usize]))
                    .collect()
            })
        }
        p => {
            if small(block_m, block_m).is_none() {
                return Ok(());
            }
            let (x, y) = (common::size(u)?, common::size(u)?);
            let r = match p {
                3 => patterns::longformer(&pshape, x, y),
                4 => patterns::bigbird(&pshape, x, y, common::size(u)?, u.arbitrary()?),
                5 => patterns::sparse_transformer_strided(&pshape, x),
                6 => patterns::sparse_transformer_fixed(&pshape, x, y),
                7 => {
                    let passages = (0..u.int_in_range(0..=6)?)
                        .map(|_| common::size(u))
                        .collect::<arbitrary::Result<Vec<_>>>()?;
                    patterns::block_attention(&pshape, &passages)
                }
                8 => {
                    let w = (0..mh.min(64))
                        .map(|_| common::size(u))
                        .collect::<arbitrary::Result<Vec<_>>>()?;
                    patterns::per_head_windows(&pshape, &w)
                }
                _ => {
                    let s: Vec<bool> = (0..mh.min(64))
                        .map(|_| u.arbitrary())
                        .collect::<arbitrary::Result<_>>()?;
                    patterns::streaming_heads(&pshape, &s, x, y)
                }
            };
            if let Ok(m) = &r {
                // A pattern lists each query block's key blocks strictly increasing.
                let dm = m.dims();
                assert_eq!(m.offsets().len(), dm.num_lists().unwrap() + 1);
                let _ = (m.density(), m.to_flex_parts());
            }
            r
        }
    };
    let _ = patterns::bigbird_random_blocks(
        u.arbitrary()?,
        common::size(u)?,
        common::size(u)?,
        u.int_in_range(0..=WORK)?,
        common::size(u)?,
    );
    let Some(attn) = attn else {
        return Ok(());
    };
    // Buffers: only what the shape validated, capped.
    let (qs, ks) = if varlen {
        (
            Strides::contiguous(attn.total_q(), hq, d),
            Strides::contiguous(attn.total_q(), hkv, d),
        )
    } else {
        (
            Strides::contiguous(sq, hq, d),
            Strides::contiguous(sk, hkv, d),
        )
    };
    let k_len = if varlen {
        cu[1].last().map_or(0, |&x| x.max(0) as usize)
    } else {
        b.saturating_mul(sk)
    }
    .saturating_mul(hkv)
    .saturating_mul(d);
    let ks = if varlen {
        Strides::contiguous(k_len / (hkv * d).max(1), hkv, d)
    } else {
        ks
    };
    let (Some(q), Some(k), Some(v)) = (
        common::buffer(u, attn.out_len())?,
        common::buffer(u, k_len)?,
        common::buffer(u, k_len)?,
    ) else {
        return Ok(());
    };
    let qv = || Strided::new(&q[..], qs);
    let kv = || Strided::new(&k[..], ks);
    let mask = match mask {
        Ok(m) => m,
        Err(_) => {
            // MoBA builds its own masks from q and k.
            let config = MobaConfig {
                block_n: common::size(u)?,
                top_k: common::size(u)?,
            };
            let nk = attn.max_seqlen_k().div_ceil(config.block_n.max(1));
            if nk > WORK || attn.lse_len().saturating_mul(nk) > WORK {
                return Ok(());
            }
            let _ = moba::moba_pooled_keys_cpu(&attn, &config, qv(), kv());
            let _ = moba::moba_select_blocks_cpu(&attn, &config, block_m, qv(), kv());
            if let Ok(rows) = moba::moba_select_cpu(&attn, &config, qv(), kv()) {
                let _ = moba::moba_tile_unions(&attn, &rows, block_m);
            }
            match moba::moba_attention(&attn, &config, block_m, qv(), kv()) {
                Ok(bs) => return forward(u, &bs, &q, &k, &v, qs, ks, false),
                Err(_) => return Ok(()),
            }
        }
    };
    let Ok(bs) = BlockSparseAttention::new(attn, mask) else {
        return Ok(());
    };
    // A per-row selection of arbitrary blocks.
    let bs = if u.arbitrary()? {
        let rows = RowBlocks::new(block_n, common::size(u)?, u.arbitrary()?);
        match rows.map(|r| bs.clone().with_row_blocks(r)) {
            Ok(Ok(b)) => b,
            _ => bs,
        }
    } else {
        bs
    };
    forward(u, &bs, &q, &k, &v, qs, ks, dense_partial)
}

#[allow(clippy::too_many_arguments)]
fn forward(
    u: &mut arbitrary::Unstructured,
    bs: &BlockSparseAttention,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    qs: Strides,
    ks: Strides,
    dense_partial: bool,
) -> arbitrary::Result<()> {
    let attn = bs.attention();
    // Work (rows x keys x head_dim, and a per-(sequence, head) overhead) a run spends in a
    // moment.
    let work = attn
        .lse_len()
        .saturating_mul(attn.max_seqlen_k())
        .saturating_mul(attn.head_dim());
    if work > 1 << 20 || attn.batch().saturating_mul(attn.heads_q()) > 1 << 9 {
        return Ok(());
    }
    let short: usize = u.int_in_range(0..=1)?;
    let mut out = vec![0.0f32; attn.out_len().saturating_sub(short)];
    let mut lse = vec![0.0f32; attn.lse_len()];
    let r = bs.forward_cpu(
        Strided::new(q, qs),
        Strided::new(k, ks),
        Strided::new(v, ks),
        Strided::new(&mut out[..], qs),
        Some(&mut lse[..]),
    );
    if r.is_err() {
        return Ok(());
    }
    let d = attn.head_dim();
    let finite_in = q
        .iter()
        .chain(k)
        .chain(v)
        .all(|x| x.is_finite() && x.abs() < 1e4)
        && attn.scale() <= 8.0;
    if finite_in {
        assert!(out.iter().all(|x| x.is_finite()), "non-finite output");
        assert!(lse.iter().all(|x| !x.is_nan() && *x != f32::INFINITY));
    }
    // LSE rows are [batch, heads_q, seqlen_q] (heads_q x total_q packed for varlen), out
    // contiguous; the output row of a row with LSE -inf is zero.
    let (hq, sq) = (attn.heads_q(), attn.max_seqlen_q());
    // (A batch of empty sequences may be huge: nothing to check there.)
    let spans = if lse.is_empty() { 0 } else { attn.batch() };
    for (bi, span) in attn.spans().take(spans).enumerate() {
        for h in 0..hq {
            for i in 0..span.seqlen_q {
                let (l, row) = if attn.is_varlen() {
                    (h * attn.total_q() + span.q_start + i, span.q_start + i)
                } else {
                    ((bi * hq + h) * sq + i, bi * sq + i)
                };
                if lse[l] == f32::NEG_INFINITY {
                    let o = (row * hq + h) * d;
                    assert!(out[o..o + d].iter().all(|x| *x == 0.0), "row without keys");
                }
            }
        }
    }
    if dense_partial && finite_in {
        let mut want = vec![0.0f32; out.len()];
        let mut wl = vec![0.0f32; lse.len()];
        attn.forward_cpu(
            Strided::new(q, qs),
            Strided::new(k, ks),
            Strided::new(v, ks),
            Strided::new(&mut want[..], qs),
            Some(&mut wl[..]),
        )
        .expect("the dense path accepts what the block-sparse path accepted");
        for (g, w) in out.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
        }
        for (g, w) in lse.iter().zip(&wl) {
            assert!(
                g == w || (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{g} vs {w}"
            );
        }
    }
    Ok(())
}
