//! Writes the fixture that `examples/c/dense_check.cpp` checks the C library against: a
//! random causal-window problem and its f64 reference output (format in that file).
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
    f.flush()?;
    println!("wrote {path}: {b} x {sq} queries x {sk} keys, {hq}/{hkv} heads, d {d}");
    Ok(())
}
