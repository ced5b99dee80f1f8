//! Ring attention (CPU, simulated ranks): layouts partition the sequence, the schedule skips
//! exactly the masked steps and unneeded transfers, zigzag balances causal work, and the
//! ring result equals single-device attention (the f64 reference over the whole sequence)
//! for every sharding, world size, mask and GQA ratio.

mod common;

use common::ring::{RingInputs, ring_inputs, ring_shape};
use common::{check_lse, random_vec, rel_l2, rng, to_f64};
use longattn::reference::dense_attention_f64;
use longattn::*;

fn layouts(seqlen: usize, world: usize) -> Vec<RingLayout> {
    [Sharding::Contiguous, Sharding::Zigzag, Sharding::Stripe]
        .into_iter()
        .map(|s| RingLayout::new(seqlen, world, s).unwrap())
        .collect()
}

fn masks() -> Vec<(&'static str, AttentionOptions)> {
    let w = |l, r| Window::new(l, r);
    vec![
        ("full", AttentionOptions::default()),
        ("causal", AttentionOptions::causal()),
        (
            "W1",
            AttentionOptions::default().with_window(Window::causal_tokens(1).unwrap()),
        ),
        (
            "W2",
            AttentionOptions::default().with_window(Window::causal_tokens(2).unwrap()),
        ),
        (
            "W5+2sinks",
            AttentionOptions::default()
                .with_window(Window::causal_tokens(5).unwrap())
                .with_sinks(2),
        ),
        (
            "(3,2)",
            AttentionOptions::default().with_window(w(Some(3), Some(2))),
        ),
        (
            "(-1,4)+sinks",
            AttentionOptions::default()
                .with_window(w(None, Some(4)))
                .with_sinks(3),
        ),
        (
            "(6,-1)",
            AttentionOptions::default().with_window(w(Some(6), None)),
        ),
        (
            "causal softcap",
            AttentionOptions::causal().with_softcap(5.0),
        ),
    ]
}

fn check_ring<T: Element>(
    layout: RingLayout,
    shape: RingShape,
    opts: &AttentionOptions,
    seed: u64,
    tol: f64,
    what: &str,
) {
    let RingShape {
        batch,
        heads_q,
        heads_kv,
        head_dim: d,
    } = shape;
    let RingInputs {
        q,
        k,
        v,
        dense,
        qs,
        ks,
    } = ring_inputs::<T>(layout, shape, opts, seed);
    let s = layout.seqlen();
    let (want, want_lse) = dense_attention_f64(
        &dense,
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
    )
    .unwrap();

    let ring = RingAttention::new(layout, shape, opts).unwrap();
    let world = layout.world();
    let pos: Vec<Vec<usize>> = (0..world).map(|r| layout.positions(r)).collect();
    let qsh = layout.shard(&q, batch, heads_q * d).unwrap();
    let ksh = layout.shard(&k, batch, heads_kv * d).unwrap();
    let vsh = layout.shard(&v, batch, heads_kv * d).unwrap();
    // Poisoned outputs: every element must be written.
    let mut osh: Vec<Vec<T>> = (0..world)
        .map(|r| vec![T::from_f32(f32::NAN); ring.out_len(r)])
        .collect();
    let mut lsh: Vec<Vec<f32>> = (0..world)
        .map(|r| vec![f32::NAN; ring.lse_len(r)])
        .collect();
    let st = |r: usize, heads: usize| Strides::contiguous(pos[r].len(), heads, d);
    let qv: Vec<_> = (0..world)
        .map(|r| Strided::new(&qsh[r][..], st(r, heads_q)))
        .collect();
    let kv: Vec<_> = (0..world)
        .map(|r| Strided::new(&ksh[r][..], st(r, heads_kv)))
        .collect();
    let vv: Vec<_> = (0..world)
        .map(|r| Strided::new(&vsh[r][..], st(r, heads_kv)))
        .collect();
    let mut ov: Vec<_> = osh
        .iter_mut()
        .enumerate()
        .map(|(r, o)| Strided::new(&mut o[..], st(r, heads_q)))
        .collect();
    let mut lv: Vec<&mut [f32]> = lsh.iter_mut().map(|l| &mut l[..]).collect();
    ring.forward_cpu(&qv, &kv, &vv, &mut ov, Some(&mut lv))
        .unwrap();

    // Reassemble in global order and compare with the single-device reference.
    let got = to_f64(&layout.unshard(&osh, batch, heads_q * d).unwrap());
    let mut got_lse = vec![f32::NAN; want_lse.len()];
    for r in 0..world {
        let lr = pos[r].len();
        for b in 0..batch {
            for (i, &p) in pos[r].iter().enumerate() {
                for h in 0..heads_q {
                    got_lse[(b * heads_q + h) * s + p] = lsh[r][(b * heads_q + h) * lr + i];
                }
            }
        }
    }
    let err = rel_l2(&got, &want);
    assert!(err < tol, "{what}: rel L2 {err}");
    check_lse(&got_lse, &want_lse, 1e-3, what);
}

#[test]
fn layouts_partition_the_sequence() {
    for s in [1, 2, 7, 16, 33, 100] {
        for world in [1, 2, 3, 4, 8] {
            for layout in layouts(s, world) {
                let mut seen = vec![0u32; s];
                for r in 0..world {
                    let p = layout.positions(r);
                    assert!(
                        p.windows(2).all(|w| w[0] < w[1]),
                        "{layout:?} rank {r} not ascending"
                    );
                    assert_eq!(p.len(), layout.shard_len(r));
                    for &t in &p {
                        seen[t] += 1;
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "{layout:?}: not a partition");
            }
        }
    }
    // The definitions themselves.
    let z = RingLayout::new(16, 4, Sharding::Zigzag).unwrap();
    assert_eq!(z.positions(0), vec![0, 1, 14, 15]);
    assert_eq!(z.positions(3), vec![6, 7, 8, 9]);
    let st = RingLayout::new(10, 3, Sharding::Stripe).unwrap();
    assert_eq!(st.positions(1), vec![1, 4, 7]);
    let c = RingLayout::new(10, 3, Sharding::Contiguous).unwrap();
    assert_eq!(c.positions(2), vec![6, 7, 8, 9]);
    // At step t rank r holds the shard of rank r - t.
    assert_eq!(c.kv_source(0, 1), 2);
    assert_eq!(c.kv_source(2, 2), 0);
}

#[test]
fn ring_equals_single_device_attention() {
    let shapes = [ring_shape(1, 2, 2, 16), ring_shape(2, 4, 1, 8)];
    let mut seed = 0;
    for s in [1, 2, 7, 33, 64] {
        for world in [1, 2, 3, 4] {
            for layout in layouts(s, world) {
                for shape in shapes {
                    for (name, opts) in masks() {
                        seed += 1;
                        let what = format!("{layout:?} {shape:?} {name}");
                        check_ring::<f32>(layout, shape, &opts, seed, 2e-5, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn ring_half_precision_matches() {
    let shape = ring_shape(1, 4, 2, 32);
    for layout in layouts(130, 4) {
        for (name, opts) in masks() {
            let what = format!("{layout:?} {name}");
            check_ring::<bf16>(layout, shape, &opts, 11, 1e-2, &format!("bf16 {what}"));
            check_ring::<f16>(layout, shape, &opts, 12, 2e-3, &format!("f16 {what}"));
        }
    }
}

#[test]
fn schedule_skips_masked_steps_and_transfers() {
    let shape = ring_shape(1, 1, 1, 8);
    // Causal, contiguous: rank r sees shards 0..=r, i.e. steps 0..=r; shard s is needed by
    // ranks s..world, so it is sent on only while it has not reached the last rank.
    let world = 4;
    let layout = RingLayout::new(64, world, Sharding::Contiguous).unwrap();
    let ring = RingAttention::new(layout, shape, &AttentionOptions::causal()).unwrap();
    let sch = ring.schedule();
    for r in 0..world {
        for t in 0..world {
            assert_eq!(sch.compute[r][t], t <= r, "rank {r} step {t}");
        }
    }
    for t in 0..world - 1 {
        for s in 0..world {
            assert_eq!(sch.send[t][s], s + t < world - 1, "step {t} shard {s}");
        }
    }
    // Full attention: every step computes and every transfer is needed.
    let full = RingAttention::new(layout, shape, &AttentionOptions::default())
        .unwrap()
        .schedule();
    assert!(full.compute.iter().flatten().all(|&c| c));
    assert!(full.send.iter().flatten().all(|&c| c));
    // A 16-token causal window on 16-token shards: each rank sees its own and the previous
    // shard only (rank 0 only its own); no shard travels further than one hop.
    let win = AttentionOptions::default().with_window(Window::causal_tokens(16).unwrap());
    let w = RingAttention::new(layout, shape, &win).unwrap().schedule();
    for r in 0..world {
        for t in 0..world {
            assert_eq!(
                w.compute[r][t],
                t == 0 || (t == 1 && r >= 1),
                "window rank {r} step {t}"
            );
        }
    }
    for s in 0..world {
        assert_eq!(w.send[0][s], s + 1 < world, "window shard {s}");
        assert!(
            (1..world - 1).all(|t| !w.send[t][s]),
            "window shard {s} sent twice"
        );
    }
    // Sinks make shard 0 visible to every rank again.
    let sinks = RingAttention::new(layout, shape, &win.with_sinks(4))
        .unwrap()
        .schedule();
    for r in 0..world {
        assert!(sinks.compute[r][r], "rank {r} must read the sink shard");
    }
    // Pairs per rank add up to the single-device visible pairs.
    let s = layout.seqlen();
    let mask = ring.mask();
    let total: u64 = (0..s)
        .map(|i| (0..s).filter(|&j| mask.visible(i, j, s, s)).count() as u64)
        .sum();
    assert_eq!(sch.pairs.iter().sum::<u64>(), total);
}

#[test]
fn zigzag_balances_causal_work() {
    let shape = ring_shape(1, 1, 1, 8);
    let world = 8;
    let imbalance = |sharding| {
        let layout = RingLayout::new(4096, world, sharding).unwrap();
        RingAttention::new(layout, shape, &AttentionOptions::causal())
            .unwrap()
            .schedule()
            .imbalance()
    };
    let (contiguous, zigzag, stripe) = (
        imbalance(Sharding::Contiguous),
        imbalance(Sharding::Zigzag),
        imbalance(Sharding::Stripe),
    );
    // Contiguous: the last rank does (2N - 1) / N of the mean work.
    assert!(
        (contiguous - 15.0 / 8.0).abs() < 0.01,
        "contiguous {contiguous}"
    );
    assert!(zigzag < 1.001, "zigzag {zigzag}");
    assert!(stripe < 1.01, "stripe {stripe}");
}

#[test]
fn bad_ring_inputs_are_errors() {
    let shape = ring_shape(1, 4, 2, 8);
    let opts = AttentionOptions::causal();
    assert!(matches!(
        RingLayout::new(0, 2, Sharding::Zigzag),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        RingLayout::new(8, 0, Sharding::Stripe),
        Err(Error::Shape(_))
    ));
    let layout = RingLayout::new(8, 2, Sharding::Zigzag).unwrap();
    let bad_gqa = RingShape {
        heads_kv: 3,
        ..shape
    };
    assert!(matches!(
        RingAttention::new(layout, bad_gqa, &opts),
        Err(Error::Shape(_))
    ));
    let zero = RingShape {
        head_dim: 0,
        ..shape
    };
    assert!(matches!(
        RingAttention::new(layout, zero, &opts),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        RingAttention::new(layout, shape, &opts.with_softcap(-1.0)),
        Err(Error::InvalidOption(_))
    ));
    let ring = RingAttention::new(layout, shape, &opts).unwrap();
    let q = vec![0.5f32; ring.out_len(0)];
    let kv = vec![0.5f32; ring.kv_len(0)];
    let qs = Strides::contiguous(4, 4, 8);
    let ks = Strides::contiguous(4, 2, 8);
    let mut o0 = vec![0.0f32; ring.out_len(0)];
    let mut o1 = vec![0.0f32; ring.out_len(1)];
    // One shard for two ranks.
    {
        let mut out = vec![Strided::new(&mut o0[..], qs)];
        let r = ring.forward_cpu(
            &[Strided::new(&q[..], qs)],
            &[Strided::new(&kv[..], ks)],
            &[Strided::new(&kv[..], ks)],
            &mut out,
            None,
        );
        assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    }
    // A k shard one element short.
    let short = vec![0.5f32; ring.kv_len(1) - 1];
    let mut out = vec![Strided::new(&mut o0[..], qs), Strided::new(&mut o1[..], qs)];
    let qv = [Strided::new(&q[..], qs), Strided::new(&q[..], qs)];
    let vv = [Strided::new(&kv[..], ks), Strided::new(&kv[..], ks)];
    let kshort = [Strided::new(&kv[..], ks), Strided::new(&short[..], ks)];
    let r = ring.forward_cpu(&qv, &kshort, &vv, &mut out, None);
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    // An lse too short, and an output aliasing itself.
    let mut l0 = vec![0.0f32; ring.lse_len(0)];
    let mut l1 = vec![0.0f32; ring.lse_len(1) - 1];
    let mut lse: Vec<&mut [f32]> = vec![&mut l0[..], &mut l1[..]];
    let r = ring.forward_cpu(&qv, &vv, &vv, &mut out, Some(&mut lse));
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    let alias = Strides { seq: 4, ..qs };
    let mut out = vec![
        Strided::new(&mut o0[..], alias),
        Strided::new(&mut o1[..], qs),
    ];
    let r = ring.forward_cpu(&qv, &vv, &vv, &mut out, None);
    assert!(matches!(r, Err(Error::Stride(_))), "{r:?}");
    // Negative strides.
    let neg = Strides { batch: -1, ..ks };
    let mut out = vec![Strided::new(&mut o0[..], qs), Strided::new(&mut o1[..], qs)];
    let kneg = [Strided::new(&kv[..], neg), Strided::new(&kv[..], ks)];
    let r = ring.forward_cpu(&qv, &kneg, &vv, &mut out, None);
    assert!(matches!(r, Err(Error::Stride(_))), "{r:?}");
}

/// `block_pieces` reproduces the global mask exactly: for query and key blocks at global
/// positions (any offsets, stride 1 or a stripe stride), key `j` is visible to row `i` iff
/// exactly one piece covers `(i, j)` and shows it under its local window; pieces never carry
/// sinks and their key ranges are disjoint.
#[test]
fn block_pieces_reproduce_the_global_mask() {
    let w = |l, r| Window::new(l, r);
    let windows = [
        Window::FULL,
        Window::CAUSAL,
        w(Some(0), Some(0)),
        w(Some(1), Some(0)),
        w(Some(7), Some(0)),
        w(Some(3), Some(2)),
        w(None, Some(5)),
        w(Some(4), None),
        w(Some(20), Some(1)),
    ];
    let s = 64;
    for &window in &windows {
        for sinks in [0usize, 1, 3, 9] {
            let mask = Mask::new(window, sinks);
            for stride in [1usize, 3] {
                for (qp, ql, kp, kl) in [
                    (0, 5, 0, 5),
                    (10, 6, 0, 7),
                    (0, 4, 12, 9),
                    (20, 1, 2, 16),
                    (30, 11, 26, 3),
                    (1, 9, 0, 12),
                ] {
                    let q = GlobalBlock {
                        row0: 2,
                        len: ql,
                        pos0: qp,
                        stride,
                    };
                    let k = GlobalBlock {
                        row0: 5,
                        len: kl,
                        pos0: kp,
                        stride,
                    };
                    if qp + stride * (ql - 1) >= s || kp + stride * (kl - 1) >= s {
                        continue;
                    }
                    let pieces = block_pieces(q, k, mask).unwrap();
                    for p in &pieces {
                        assert_eq!(p.mask.sinks, 0);
                    }
                    for (a, b) in pieces.iter().zip(pieces.iter().skip(1)) {
                        assert!(
                            a.k_rows.end <= b.k_rows.start,
                            "{mask:?}: key ranges overlap"
                        );
                    }
                    for i in 0..ql {
                        for j in 0..kl {
                            let want = mask.visible(qp + stride * i, kp + stride * j, s, s);
                            let (row, key) = (q.row0 + i, k.row0 + j);
                            let seen = pieces
                                .iter()
                                .filter(|p| p.q_rows.contains(&row) && p.k_rows.contains(&key))
                                .filter(|p| {
                                    let (sq, sk) = (p.q_rows.len(), p.k_rows.len());
                                    p.mask.visible(
                                        row - p.q_rows.start,
                                        key - p.k_rows.start,
                                        sq,
                                        sk,
                                    )
                                })
                                .count();
                            assert_eq!(
                                seen,
                                usize::from(want),
                                "{mask:?} stride {stride} q {q:?} k {k:?}: ({i}, {j})"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A ring step's pieces (block pieces with every pair whose union is one band problem
/// merged) reproduce the global mask exactly: key row `j` of the held shard is visible to
/// query row `i` of the rank iff exactly one piece covers `(i, j)` and shows it under its
/// local window; pieces carry no sinks. A causal zigzag ring runs one piece per computing
/// step (its two chunks coalesce), a causal contiguous one one piece per step.
#[test]
fn ring_pieces_reproduce_the_global_mask() {
    let shape = ring_shape(1, 1, 1, 8);
    let w = |l, r| Window::new(l, r);
    let mut all = masks();
    all.extend([
        (
            "W9",
            AttentionOptions::default().with_window(Window::causal_tokens(9).unwrap()),
        ),
        (
            "(0,7)",
            AttentionOptions::default().with_window(w(Some(0), Some(7))),
        ),
        (
            "(12,3)+1sink",
            AttentionOptions::default()
                .with_window(w(Some(12), Some(3)))
                .with_sinks(1),
        ),
    ]);
    for (seqlen, world) in [(37, 3), (64, 4), (61, 5), (40, 8), (7, 2)] {
        for layout in layouts(seqlen, world) {
            for (name, opts) in &all {
                let ring = RingAttention::new(layout, shape, opts).unwrap();
                let s = layout.seqlen();
                let mask = ring.mask();
                for r in 0..world {
                    let qpos = layout.positions(r);
                    for t in 0..world {
                        let kpos = layout.positions(layout.kv_source(r, t));
                        let pieces = ring.pieces(r, t);
                        if layout.sharding() != Sharding::Stripe
                            && (*name == "causal" || *name == "full")
                        {
                            assert!(pieces.len() <= 1, "{layout:?} {name} {r} {t}: {pieces:?}");
                        }
                        for p in &pieces {
                            assert_eq!(p.mask.sinks, 0);
                        }
                        for (i, &pi) in qpos.iter().enumerate() {
                            for (j, &pj) in kpos.iter().enumerate() {
                                let want = mask.visible(pi, pj, s, s);
                                let seen = pieces
                                    .iter()
                                    .filter(|p| p.q_rows.contains(&i) && p.k_rows.contains(&j))
                                    .filter(|p| {
                                        p.mask.visible(
                                            i - p.q_rows.start,
                                            j - p.k_rows.start,
                                            p.q_rows.len(),
                                            p.k_rows.len(),
                                        )
                                    })
                                    .count();
                                assert_eq!(
                                    seen,
                                    usize::from(want),
                                    "{layout:?} {name} rank {r} step {t}: ({i}, {j}) {pieces:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A step computes iff it has pieces.
#[test]
fn pieces_match_the_schedule() {
    let shape = ring_shape(1, 1, 1, 8);
    for layout in layouts(37, 3).into_iter().chain(layouts(64, 4)) {
        for (name, opts) in masks() {
            let ring = RingAttention::new(layout, shape, &opts).unwrap();
            let sch = ring.schedule();
            for r in 0..layout.world() {
                for t in 0..layout.world() {
                    assert_eq!(
                        !ring.pieces(r, t).is_empty(),
                        sch.compute[r][t],
                        "{layout:?} {name} rank {r} step {t}"
                    );
                }
            }
        }
    }
}

/// Windows as wide as the API allows (i32::MAX sides) map onto pieces whose local windows
/// every dense problem accepts, and the ring still equals single-device attention.
#[test]
fn huge_windows_map_onto_valid_pieces() {
    let max = i32::MAX as usize;
    let w = |l, r| Window::new(l, r);
    for (window, sinks) in [
        (w(Some(max), None), 0),
        (w(None, Some(max)), 0),
        (w(Some(0), Some(max)), 1),
        (w(Some(max), Some(max)), 3),
    ] {
        let opts = AttentionOptions::default()
            .with_window(window)
            .with_sinks(sinks);
        for layout in layouts(9, 2).into_iter().chain(layouts(4, 2)) {
            let shape = ring_shape(1, 2, 1, 8);
            let ring = RingAttention::new(layout, shape, &opts).unwrap();
            for r in 0..layout.world() {
                for t in 0..layout.world() {
                    for p in ring.pieces(r, t) {
                        let l = |x: Option<usize>| x.is_none_or(|v| v <= max);
                        assert!(l(p.mask.window.left) && l(p.mask.window.right), "{p:?}");
                    }
                }
            }
            check_ring::<f32>(
                layout,
                shape,
                &opts,
                5,
                2e-5,
                &format!("{layout:?} {window:?}"),
            );
        }
    }
}

/// Bad blocks and out-of-range ranks get errors or nothing, never a panic or a wrong list.
#[test]
fn block_pieces_and_pieces_check_their_inputs() {
    let b = |len, pos0, stride| GlobalBlock {
        row0: 0,
        len,
        pos0,
        stride,
    };
    let mask = Mask::new(Window::CAUSAL, 0);
    assert!(matches!(
        block_pieces(b(2, 4, 1), b(2, 0, 2), mask),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        block_pieces(b(2, 4, 0), b(2, 0, 0), mask),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        block_pieces(b(2, usize::MAX, 1), b(2, 0, 1), mask),
        Err(Error::Shape(_))
    ));
    let huge = Mask::new(Window::new(Some(usize::MAX), None), 0);
    assert!(matches!(
        block_pieces(b(1, 5, 1), b(1, 0, 1), huge),
        Err(Error::InvalidOption(_))
    ));
    let wide = Mask::new(Window::new(None, Some(i64::MAX as usize)), 0);
    assert!(matches!(
        block_pieces(b(1, 1, 1), b(1, 0, 1), wide),
        Err(Error::InvalidOption(_))
    ));
    assert_eq!(block_pieces(b(0, 4, 1), b(2, 0, 1), mask).unwrap(), vec![]);
    let layout = RingLayout::new(16, 4, Sharding::Zigzag).unwrap();
    assert!(matches!(
        RingLayout::new(16, MAX_RING_WORLD + 1, Sharding::Stripe),
        Err(Error::Unsupported(_))
    ));
    let shape = ring_shape(1, 1, 1, 8);
    let ring = RingAttention::new(layout, shape, &AttentionOptions::causal()).unwrap();
    assert!(ring.pieces(usize::MAX, 0).is_empty());
    assert!(ring.pieces(0, usize::MAX).is_empty());
    assert_eq!(
        layout.kv_source(usize::MAX, usize::MAX),
        (usize::MAX % 4 + 4 - usize::MAX % 4) % 4
    );
}

/// Shards given as strided views of fused per-rank buffers (per token `[q heads | k heads |
/// v heads | padding]`, padded outputs) give the same result as contiguous shards, and the
/// padding stays untouched.
#[test]
fn strided_shards_match_contiguous_shards() {
    let (b, hq, hkv, d, pad) = (2, 4, 2, 8, 8);
    let shape = ring_shape(b, hq, hkv, d);
    let opts = AttentionOptions::default()
        .with_window(Window::causal_tokens(9).unwrap())
        .with_sinks(2);
    for layout in layouts(45, 3) {
        let ring = RingAttention::new(layout, shape, &opts).unwrap();
        let world = layout.world();
        let lens: Vec<usize> = (0..world).map(|r| layout.shard_len(r)).collect();
        let row = (hq + 2 * hkv) * d + pad;
        let fused: Vec<Vec<f32>> = lens
            .iter()
            .enumerate()
            .map(|(r, &l)| random_vec(&mut rng(40 + r as u64), b * l * row))
            .collect();
        let fst = |l: usize| Strides {
            batch: (l * row) as i64,
            seq: row as i64,
            head: d as i64,
        };
        let ost = |l: usize| Strides {
            batch: (l * (hq * d + pad)) as i64,
            seq: (hq * d + pad) as i64,
            head: d as i64,
        };
        // Strided run.
        let mut outs: Vec<Vec<f32>> = lens
            .iter()
            .map(|&l| vec![f32::NAN; b * l * (hq * d + pad)])
            .collect();
        {
            let q: Vec<_> = (0..world)
                .map(|r| Strided::new(&fused[r][..], fst(lens[r])))
                .collect();
            let k: Vec<_> = (0..world)
                .map(|r| Strided::new(&fused[r][hq * d..], fst(lens[r])))
                .collect();
            let v: Vec<_> = (0..world)
                .map(|r| Strided::new(&fused[r][(hq + hkv) * d..], fst(lens[r])))
                .collect();
            let mut o: Vec<_> = outs
                .iter_mut()
                .enumerate()
                .map(|(r, x)| Strided::new(&mut x[..], ost(lens[r])))
                .collect();
            ring.forward_cpu(&q, &k, &v, &mut o, None).unwrap();
        }
        // Contiguous copies of the same shards.
        let pick = |r: usize, first: usize, heads: usize| -> Vec<f32> {
            (0..b * lens[r])
                .flat_map(|t| fused[r][t * row + first..t * row + first + heads * d].to_vec())
                .collect()
        };
        let qc: Vec<_> = (0..world).map(|r| pick(r, 0, hq)).collect();
        let kc: Vec<_> = (0..world).map(|r| pick(r, hq * d, hkv)).collect();
        let vc: Vec<_> = (0..world).map(|r| pick(r, (hq + hkv) * d, hkv)).collect();
        let mut oc: Vec<Vec<f32>> = (0..world)
            .map(|r| vec![f32::NAN; ring.out_len(r)])
            .collect();
        {
            let st = |r: usize, h: usize| Strides::contiguous(lens[r], h, d);
            let q: Vec<_> = (0..world)
                .map(|r| Strided::new(&qc[r][..], st(r, hq)))
                .collect();
            let k: Vec<_> = (0..world)
                .map(|r| Strided::new(&kc[r][..], st(r, hkv)))
                .collect();
            let v: Vec<_> = (0..world)
                .map(|r| Strided::new(&vc[r][..], st(r, hkv)))
                .collect();
            let mut o: Vec<_> = oc
                .iter_mut()
                .enumerate()
                .map(|(r, x)| Strided::new(&mut x[..], st(r, hq)))
                .collect();
            ring.forward_cpu(&q, &k, &v, &mut o, None).unwrap();
        }
        for r in 0..world {
            for t in 0..b * lens[r] {
                let strided = &outs[r][t * (hq * d + pad)..(t + 1) * (hq * d + pad)];
                assert_eq!(
                    &strided[..hq * d],
                    &oc[r][t * hq * d..(t + 1) * hq * d],
                    "{layout:?} rank {r} row {t}"
                );
                assert!(
                    strided[hq * d..].iter().all(|x| x.is_nan()),
                    "{layout:?}: padding written"
                );
            }
        }
    }
}

/// `shard` deals a whole tensor's token rows to the ranks by the layout's positions and
/// `unshard` puts them back; wrong lengths are errors.
#[test]
fn shard_and_unshard_round_trip() {
    let (b, row) = (2, 3);
    for layout in layouts(11, 3) {
        let x: Vec<u32> = (0..(b * 11 * row) as u32).collect();
        let shards = layout.shard(&x, b, row).unwrap();
        for (r, sh) in shards.iter().enumerate() {
            let pos = layout.positions(r);
            assert_eq!(sh.len(), b * pos.len() * row);
            for bb in 0..b {
                for (i, &p) in pos.iter().enumerate() {
                    let want = ((bb * 11 + p) * row) as u32;
                    assert_eq!(sh[(bb * pos.len() + i) * row], want, "{layout:?} rank {r}");
                }
            }
        }
        assert_eq!(layout.unshard(&shards, b, row).unwrap(), x);
        assert!(matches!(
            layout.shard(&x[1..], b, row),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            layout.unshard(&shards[1..], b, row),
            Err(Error::Shape(_))
        ));
        let mut bad = shards.clone();
        bad[0].pop();
        assert!(matches!(layout.unshard(&bad, b, row), Err(Error::Shape(_))));
        assert!(matches!(
            layout.shard(&x, usize::MAX, row),
            Err(Error::Shape(_))
        ));
    }
}
