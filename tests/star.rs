//! Star Attention on the CPU: phase 1 (each rank's block over the anchor and itself, causal)
//! and phase 2 (the query over every rank's cache plus itself, per-rank partials merged)
//! against the f64 reference of their definitions, for several worlds, GQA and dtypes.

mod common;

use common::ring::ring_shape;
use common::{check_lse, random_vec, rel_l2, rng, to_f64};
use longattn::reference::dense_attention_f64;
use longattn::*;

fn concat<T: Copy>(parts: &[(&[T], usize)], batch: usize, row: usize) -> Vec<T> {
    let mut x = Vec::new();
    for b in 0..batch {
        for &(p, len) in parts {
            x.extend_from_slice(&p[b * len * row..(b + 1) * len * row]);
        }
    }
    x
}

fn check_star<T: Element>(context: usize, world: usize, nq: usize, shape: RingShape, tol: f64) {
    let RingShape {
        batch,
        heads_q,
        heads_kv,
        head_dim: d,
    } = shape;
    let star = StarAttention::new(context, world, nq, shape, &AttentionOptions::causal()).unwrap();
    let mut g = rng((context * 7 + world * 3 + nq) as u64);
    let (rq, rk) = (heads_q * d, heads_kv * d);
    let layout = RingLayout::new(context, world, Sharding::Contiguous).unwrap();
    let qc: Vec<T> = random_vec(&mut g, batch * context * rq);
    let kc: Vec<T> = random_vec(&mut g, batch * context * rk);
    let vc: Vec<T> = random_vec(&mut g, batch * context * rk);
    let qb = layout.shard(&qc, batch, rq).unwrap();
    let kb = layout.shard(&kc, batch, rk).unwrap();
    let vb = layout.shard(&vc, batch, rk).unwrap();
    let la = star.block(0).len();
    // Phase 1 against the reference over [anchor ; block].
    for r in 0..world {
        let lr = star.block(r).len();
        assert_eq!(layout.shard_len(r), lr);
        let attn = star.context_attention(r).unwrap();
        let mut out = vec![T::default(); batch * lr * rq];
        let mut lse = vec![f32::NAN; batch * heads_q * lr];
        star.context_cpu(
            r,
            Strided::new(&qb[r][..], Strides::contiguous(lr, heads_q, d)),
            &kb[0],
            &vb[0],
            &kb[r],
            &vb[r],
            Strided::new(&mut out[..], Strides::contiguous(lr, heads_q, d)),
            Some(&mut lse[..]),
        )
        .unwrap();
        let (kk, vv, sk) = if r == 0 {
            (kb[0].clone(), vb[0].clone(), lr)
        } else {
            (
                concat(&[(&kb[0][..], la), (&kb[r][..], lr)], batch, rk),
                concat(&[(&vb[0][..], la), (&vb[r][..], lr)], batch, rk),
                la + lr,
            )
        };
        let (want, want_lse) = dense_attention_f64(
            &attn,
            Strided::new(&qb[r][..], Strides::contiguous(lr, heads_q, d)),
            Strided::new(&kk[..], Strides::contiguous(sk, heads_kv, d)),
            Strided::new(&vv[..], Strides::contiguous(sk, heads_kv, d)),
        )
        .unwrap();
        let err = rel_l2(&to_f64(&out), &want);
        assert!(err < tol, "phase 1 rank {r}/{world}: rel l2 {err}");
        check_lse(&lse, &want_lse, 1e-3, &format!("phase 1 rank {r}"));
    }
    // Phase 2 against the reference of the query over the whole sequence.
    let q: Vec<T> = random_vec(&mut g, batch * nq * rq);
    let kq: Vec<T> = random_vec(&mut g, batch * nq * rk);
    let vq: Vec<T> = random_vec(&mut g, batch * nq * rk);
    let mut out = vec![T::from_f32(f32::NAN); batch * nq * rq];
    let mut lse = vec![f32::NAN; batch * heads_q * nq];
    let kr: Vec<&[T]> = kb.iter().map(|x| &x[..]).collect();
    let vr: Vec<&[T]> = vb.iter().map(|x| &x[..]).collect();
    star.query_cpu(
        Strided::new(&q[..], Strides::contiguous(nq, heads_q, d)),
        &kr,
        &vr,
        &kq,
        &vq,
        Strided::new(&mut out[..], Strides::contiguous(nq, heads_q, d)),
        Some(&mut lse[..]),
    )
    .unwrap();
    let kall = concat(&[(&kc[..], context), (&kq[..], nq)], batch, rk);
    let vall = concat(&[(&vc[..], context), (&vq[..], nq)], batch, rk);
    let s_all = Strides::contiguous(context + nq, heads_kv, d);
    let (want, want_lse) = dense_attention_f64(
        &star.query_definition().unwrap(),
        Strided::new(&q[..], Strides::contiguous(nq, heads_q, d)),
        Strided::new(&kall[..], s_all),
        Strided::new(&vall[..], s_all),
    )
    .unwrap();
    let err = rel_l2(&to_f64(&out), &want);
    assert!(err < tol, "phase 2 world {world}: rel l2 {err}");
    check_lse(&lse, &want_lse, 1e-3, "phase 2");
}

#[test]
fn star_attention_matches_its_definition() {
    let shape = ring_shape(2, 4, 2, 16);
    for world in [1, 2, 3, 4, 8] {
        check_star::<f32>(61, world, 5, shape, 1e-5);
    }
    check_star::<f16>(96, 4, 8, shape, 2e-3);
    check_star::<bf16>(50, 3, 1, shape, 1e-2);
}

#[test]
fn star_attention_rejects_bad_setups() {
    let shape = ring_shape(1, 2, 1, 8);
    let o = AttentionOptions::causal();
    assert!(StarAttention::new(3, 4, 1, shape, &o).is_err());
    assert!(StarAttention::new(10, 0, 1, shape, &o).is_err());
    let w = AttentionOptions::default().with_window(Window::causal_tokens(4).unwrap());
    assert!(StarAttention::new(16, 2, 1, shape, &w).is_err());
    assert!(StarAttention::new(16, 2, 0, shape, &o).is_ok());
}
