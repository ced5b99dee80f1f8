//! Writes the fixture that `examples/c/check.cpp` checks the C library against: a random
//! causal-window dense problem and a paged decode step (pages in scrambled order), each with
//! its f64 reference output (the paged one computed densely over the gathered tokens), and
//! the two partial results of a key split with the reference over all the keys (for the
//! merge). Format in `examples/c/check.cpp`.
//!
//! `cargo run --example c_fixture -- FILE`

use longattn::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::io::Write;

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: c_fixture FILE")?;
    // batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, window_left, causal
    let (b, sq, sk, hq, hkv, d, left) = (2usize, 13usize, 29usize, 4usize, 2usize, 24usize, 7usize);
    let mut rng = SmallRng::seed_from_u64(7);
    let mut random =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let (q, k, v) = (
        random(b * sq * hq * d),
        random(b * sk * hkv * d),
        random(b * sk * hkv * d),
    );
    let shape = fixed_shape([b, hq, hkv, d], sq, sk);
    let opts = AttentionOptions::default().with_window(Window::new(Some(left), Some(0)));
    let attn = FlashAttention::new(&shape, &opts)?;
    let (qs, ks) = (
        Strides::contiguous(sq, hq, d),
        Strides::contiguous(sk, hkv, d),
    );
    let (want, _) = reference::dense_attention_f64(
        &attn,
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
    )?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
    for x in [b, sq, sk, hq, hkv, d, left + 1, 1] {
        f.write_all(&(x as u64).to_le_bytes())?;
    }
    for x in q.iter().chain(&k).chain(&v) {
        f.write_all(&x.to_le_bytes())?;
    }
    for x in &want {
        f.write_all(&x.to_le_bytes())?;
    }
    write_paged(&mut f, &mut random)?;
    write_merge(&mut f, &mut random)?;
    f.flush()?;
    println!("wrote {path}: {b} x {sq} queries x {sk} keys, {hq}/{hkv} heads, d {d}");
    Ok(())
}

/// A paged decode step: 3 sequences over 10 pages of 3 tokens, 2 new tokens each.
fn write_paged(
    f: &mut impl Write,
    random: &mut impl FnMut(usize) -> Vec<f32>,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let (num_pages, page_size, hkv, d, max_pages, hq, q_len) = (10, 3, 2, 16, 3, 4, 2);
    let seqlens = [7i32, 2, 9];
    let order = [7i32, 2, 9, 0, 4, 1, 8, 3, 5];
    let mut table = vec![-1i32; seqlens.len() * max_pages];
    let mut next = 0;
    for (b, &n) in seqlens.iter().enumerate() {
        for p in 0..(n as usize).div_ceil(page_size) {
            table[b * max_pages + p] = order[next];
            next += 1;
        }
    }
    let cache = num_pages * page_size * hkv * d;
    let rows = q_len * hq * d;
    let (q, kc, vc) = (random(seqlens.len() * rows), random(cache), random(cache));
    let mut want = Vec::new();
    for (b, &n) in seqlens.iter().enumerate() {
        let n = n as usize;
        let gather = |c: &[f32]| -> Vec<f32> {
            (0..n)
                .flat_map(|t| {
                    let page = table[b * max_pages + t / page_size] as usize;
                    let off = (page * page_size + t % page_size) * hkv * d;
                    c[off..off + hkv * d].to_vec()
                })
                .collect()
        };
        let (k, v) = (gather(&kc), gather(&vc));
        let shape = fixed_shape([1, hq, hkv, d], q_len, n);
        // Decode: the new tokens are causal among themselves (bottom-right).
        let attn = FlashAttention::new(&shape, &AttentionOptions::causal())?;
        let (qs, ks) = (
            Strides::contiguous(q_len, hq, d),
            Strides::contiguous(n, hkv, d),
        );
        let (o, _) = reference::dense_attention_f64(
            &attn,
            Strided::new(&q[b * rows..(b + 1) * rows], qs),
            Strided::new(&k[..], ks),
            Strided::new(&v[..], ks),
        )?;
        want.extend(o);
    }
    for x in [
        num_pages,
        page_size,
        hkv,
        d,
        seqlens.len(),
        max_pages,
        hq,
        q_len,
    ] {
        f.write_all(&(x as u64).to_le_bytes())?;
    }
    for x in table.iter().chain(&seqlens) {
        f.write_all(&x.to_le_bytes())?;
    }
    for x in q.iter().chain(&kc).chain(&vc) {
        f.write_all(&x.to_le_bytes())?;
    }
    for x in &want {
        f.write_all(&x.to_le_bytes())?;
    }
    Ok(())
}

/// Two partial results of one attention problem, its keys split in two, each with its LSE
/// (f64 reference, written as f32), and the reference output and LSE over all the keys.
fn write_merge(
    f: &mut impl Write,
    random: &mut impl FnMut(usize) -> Vec<f32>,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let (b, sq, sk, hq, hkv, d, split) = (2usize, 5usize, 12usize, 4usize, 2usize, 16usize, 5usize);
    let (q, k, v) = (
        random(b * sq * hq * d),
        random(b * sk * hkv * d),
        random(b * sk * hkv * d),
    );
    // Attention of q over the keys lo..hi of each sequence (no mask).
    let attend = |lo: usize, hi: usize| -> std::result::Result<(Vec<f64>, Vec<f64>), Error> {
        let part = |x: &[f32]| -> Vec<f32> {
            x.chunks(sk * hkv * d)
                .flat_map(|seq| seq[lo * hkv * d..hi * hkv * d].to_vec())
                .collect()
        };
        let shape = fixed_shape([b, hq, hkv, d], sq, hi - lo);
        let attn = FlashAttention::new(&shape, &AttentionOptions::default())?;
        let (qs, ks) = (
            Strides::contiguous(sq, hq, d),
            Strides::contiguous(hi - lo, hkv, d),
        );
        let (pk, pv) = (part(&k), part(&v));
        reference::dense_attention_f64(
            &attn,
            Strided::new(&q[..], qs),
            Strided::new(&pk[..], ks),
            Strided::new(&pv[..], ks),
        )
    };
    for x in [b, sq, hq, d] {
        f.write_all(&(x as u64).to_le_bytes())?;
    }
    for (o, lse) in [attend(0, split)?, attend(split, sk)?] {
        for x in o.iter().chain(&lse) {
            f.write_all(&(*x as f32).to_le_bytes())?;
        }
    }
    let (o, lse) = attend(0, sk)?;
    for x in o.iter().chain(&lse) {
        f.write_all(&x.to_le_bytes())?;
    }
    Ok(())
}

/// `[batch, heads_q, heads_kv, head_dim]` with fixed lengths `sq` queries, `sk` keys.
fn fixed_shape(
    [batch, heads_q, heads_kv, head_dim]: [usize; 4],
    sq: usize,
    sk: usize,
) -> AttentionShape<'static> {
    AttentionShape {
        batch,
        heads_q,
        heads_kv,
        head_dim,
        seqlens: SeqLens::Fixed {
            seqlen_q: sq,
            seqlen_k: sk,
        },
    }
}
