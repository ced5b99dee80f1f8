//! Property tests (issue 11): every public constructor and entry point with extreme values
//! (0, 1, `usize::MAX`, `i64::MIN`, NaN, ±inf, subnormals, huge strides, short and
//! overlapping buffers). Each call must return an error or a correct result: never panic
//! (the test profile has overflow checks on), abort or fail to allocate. Fixed case counts
//! and small tensors keep the whole file to a few seconds; longer runs use the `fuzz/`
//! targets (see fuzz/README.md).

use longattn::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// A fixed number of cases per property and no persistence file (CI stays deterministic).
fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Sizes: the edges and a few small values.
fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => 0usize..6,
        1 => Just(0usize),
        1 => Just(1usize),
        1 => Just(usize::MAX),
        1 => Just(i32::MAX as usize),
        1 => Just(i32::MAX as usize + 1),
        1 => Just(1usize << 40),
        1 => Just(65_536usize),
    ]
}

/// Small sizes for tensors that are really allocated.
fn small(max: usize) -> impl Strategy<Value = usize> {
    0..=max
}

fn float() -> impl Strategy<Value = f32> {
    prop_oneof![
        3 => -4.0f32..4.0,
        1 => Just(0.0f32),
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(f32::MAX),
        1 => Just(1e-40f32),
        1 => Just(-1.0f32),
        1 => Just(MAX_SCALE),
    ]
}

fn stride() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => 0i64..40,
        1 => Just(i64::MIN),
        1 => Just(i64::MAX),
        1 => Just(-1i64),
        1 => Just(1i64 << 40),
    ]
}

fn side() -> impl Strategy<Value = Option<usize>> {
    prop_oneof![Just(None), size().prop_map(Some)]
}

fn options() -> impl Strategy<Value = AttentionOptions> {
    (
        prop::option::of(float()),
        prop::option::of(float()),
        side(),
        side(),
        size(),
    )
        .prop_map(|(scale, softcap, l, r, sinks)| AttentionOptions {
            scale,
            softcap,
            mask: Mask::new(Window::new(l, r), sinks),
        })
}

/// Finite inputs, the options a finite output needs: then `Ok` must match the oracle.
fn close(got: &[f32], want: &[f64]) -> bool {
    got.iter()
        .zip(want)
        .all(|(&g, &w)| (g as f64 - w).abs() <= 1e-3 * (1.0 + w.abs()))
}

#[test]
fn prop_dense_constructor_and_sizes() {
    runner(2000)
        .run(
            &(size(), size(), size(), size(), size(), size(), options()),
            |(b, hq, hkv, d, sq, sk, o)| {
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
                if let Ok(a) = FlashAttention::new(&shape, &o) {
                    let _ = (
                        a.out_len(),
                        a.lse_len(),
                        a.kv_head(usize::MAX),
                        a.spans().len(),
                    );
                    prop_assert!(a.scale().is_finite() && a.scale() > 0.0);
                    if let Some(c) = a.softcap() {
                        prop_assert!((a.scale() / c).is_finite());
                    }
                }
                let _ = Strides::contiguous(sq, hq, d);
                let _ = Strides::try_contiguous(sq, hq, d);
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn prop_dense_varlen_constructor() {
    let cu = prop::collection::vec(
        prop_oneof![Just(i32::MIN), Just(i32::MAX), Just(-1), 0i32..9],
        0..5,
    );
    runner(1000)
        .run(&(size(), cu.clone(), cu), |(b, cq, ck)| {
            let shape = AttentionShape {
                batch: b,
                heads_q: 2,
                heads_kv: 1,
                head_dim: 4,
                seqlens: SeqLens::Varlen {
                    cu_seqlens_q: &cq,
                    cu_seqlens_k: &ck,
                },
            };
            if let Ok(a) = FlashAttention::new(&shape, &AttentionOptions::causal()) {
                let _ = (a.out_len(), a.lse_len(), a.total_q());
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn prop_dense_forward_is_an_error_or_correct() {
    let strides =
        (stride(), stride(), stride()).prop_map(|(batch, seq, head)| Strides { batch, seq, head });
    let case = (
        (
            1usize..3,
            1usize..3,
            1usize..3,
            prop_oneof![Just(1usize), Just(2), Just(8)],
        ),
        (small(5), small(5)),
        options(),
        prop::option::of(strides),
        (0usize..3, any::<bool>()),
    );
    runner(600)
        .run(
            &case,
            |((b, g, hkv, d), (sq, sk), o, out_strides, (short, with_lse))| {
                let hq = g * hkv;
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
                let Ok(attn) = FlashAttention::new(&shape, &o) else {
                    return Ok(());
                };
                let (qs, ks) = (
                    Strides::contiguous(sq, hq, d),
                    Strides::contiguous(sk, hkv, d),
                );
                let q: Vec<f32> = (0..b * sq * hq * d)
                    .map(|i| (i as f32 * 0.31).sin())
                    .collect();
                let k: Vec<f32> = (0..b * sk * hkv * d)
                    .map(|i| (i as f32 * 0.17).cos())
                    .collect();
                let v: Vec<f32> = (0..b * sk * hkv * d)
                    .map(|i| (i as f32 * 0.23).sin())
                    .collect();
                let os = out_strides.unwrap_or(qs);
                let out_len = attn
                    .out_len()
                    .saturating_sub(short)
                    .max(if out_strides.is_some() { 256 } else { 0 });
                let mut out = vec![0.0f32; out_len];
                let mut lse = vec![0.0f32; attn.lse_len().saturating_sub(short)];
                let r = attn.forward_cpu(
                    Strided::new(&q[..], qs),
                    Strided::new(&k[..], ks),
                    Strided::new(&v[..], ks),
                    Strided::new(&mut out[..], os),
                    with_lse.then_some(&mut lse[..]),
                );
                if r.is_ok() && out_strides.is_none() {
                    let (want, want_lse) = reference::dense_attention_f64(
                        &attn,
                        Strided::new(&q[..], qs),
                        Strided::new(&k[..], ks),
                        Strided::new(&v[..], ks),
                    )
                    .unwrap();
                    prop_assert!(close(&out, &want), "{attn:?}");
                    if with_lse {
                        for (&g, &w) in lse.iter().zip(&want_lse) {
                            prop_assert!(
                                (g.is_infinite() && w.is_infinite())
                                    || (g as f64 - w).abs() < 1e-3 * (1.0 + w.abs()),
                                "lse {g} vs {w}"
                            );
                        }
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn prop_merge_is_an_error_or_correct() {
    let shape =
        (size(), size(), size(), size()).prop_map(|(batch, seqlen, heads, head_dim)| MergeShape {
            batch,
            seqlen,
            heads,
            head_dim,
        });
    let lse = prop_oneof![
        2 => -3.0f32..3.0,
        1 => Just(f32::NEG_INFINITY),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NAN)
    ];
    runner(1500)
        .run(
            &(shape, small(6), small(3), lse.clone(), lse),
            |(m, ol, ll, la, lb)| {
                let _ = (m.o_len(), m.lse_len(), m.try_o_len(), m.try_lse_len());
                let a_o = vec![1.0f32; ol];
                let b_o = vec![2.0f32; ol];
                let (a_l, b_l) = (vec![la; ll], vec![lb; ll]);
                let mut o = vec![0.0f32; ol];
                let mut l = vec![0.0f32; ll];
                let r = m.merge_cpu(
                    Partial {
                        o: &a_o[..],
                        lse: &a_l[..],
                    },
                    Partial {
                        o: &b_o[..],
                        lse: &b_l[..],
                    },
                    Partial {
                        o: &mut o[..],
                        lse: &mut l[..],
                    },
                );
                if r.is_ok() && ll > 0 {
                    let (wa, wb, want) = softmax::merge_weights(la, lb);
                    prop_assert!(
                        l.iter().all(
                            |&x| x.to_bits() == want.to_bits() || (x.is_nan() && want.is_nan())
                        )
                    );
                    let w = wa + 2.0 * wb;
                    prop_assert!(o.iter().all(|&x| x == w || (x.is_nan() && w.is_nan())));
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn prop_paged_constructors_and_forward() {
    let table = prop::collection::vec(prop_oneof![Just(-1i32), Just(i32::MAX), 0i32..4], 0..7);
    let seqlens = prop::collection::vec(prop_oneof![Just(-1i32), Just(i32::MAX), 0i32..9], 0..3);
    let case = (
        (size(), size(), size(), size()),
        (size(), table, seqlens),
        (size(), size(), options()),
    );
    runner(1500)
        .run(&case, |((np, ps, hkv, d), (mp, bt, sl), (hq, ql, o))| {
            let layout = PagedLayout {
                num_pages: np,
                page_size: ps,
                heads_kv: hkv,
                head_dim: d,
            };
            let _ = (
                layout.cache_len(),
                layout.meta_len(),
                layout.slot_offset(np, ps, hkv),
                layout.meta_offset(np, hkv),
            );
            let Ok(cache) = PagedCache::new(
                layout,
                PageTable {
                    block_table: &bt,
                    max_pages_per_seq: mp,
                    seqlens_k: &sl,
                },
            ) else {
                return Ok(());
            };
            let _ = (
                cache.seqlen(usize::MAX),
                cache.page_id(usize::MAX, 0),
                cache.token_offset(0, usize::MAX, 0),
            );
            let Ok(dec) = PagedDecode::new(&cache, hq, ql, &o) else {
                return Ok(());
            };
            let _ = (
                dec.out_len(),
                dec.lse_len(),
                dec.splits_for(usize::MAX),
                dec.kv_bytes_read(usize::MAX),
            );
            let _ = (dec.mask_of(usize::MAX), dec.max_block_work_pages());
            // Run it only when the buffers are small.
            let (cl, ol) = (cache.layout().cache_len(), dec.out_len());
            if cl <= 4096 && ol <= 4096 {
                let k: Vec<f32> = (0..cl).map(|i| (i as f32 * 0.3).sin()).collect();
                let q: Vec<f32> = (0..ol).map(|i| (i as f32 * 0.7).cos()).collect();
                let qs = Strides::contiguous(ql, hq, d);
                let mut out = vec![0.0f32; ol];
                let mut lse = vec![0.0f32; dec.lse_len()];
                if dec
                    .forward_cpu(
                        Strided::new(&q[..], qs),
                        KvPages {
                            k: &k[..],
                            v: &k[..],
                        },
                        None,
                        Strided::new(&mut out[..], qs),
                        Some(&mut lse[..]),
                    )
                    .is_ok()
                {
                    let (want, _) = reference::paged::paged_decode_f64(
                        &dec,
                        Strided::new(&q[..], qs),
                        KvPages {
                            k: &k[..],
                            v: &k[..],
                        },
                        reference::paged::decode_visible(&dec, None),
                    )
                    .unwrap();
                    prop_assert!(close(&out, &want));
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn prop_ring_constructors_schedule_and_sharding() {
    let sharding = prop_oneof![
        Just(Sharding::Contiguous),
        Just(Sharding::Zigzag),
        Just(Sharding::Stripe)
    ];
    let world = prop_oneof![3 => 1usize..9, 1 => Just(0usize), 1 => Just(MAX_RING_WORLD + 1), 1 => Just(usize::MAX)];
    runner(800)
        .run(
            &(
                size(),
                world,
                sharding,
                (size(), size(), size(), size()),
                options(),
                (size(), size()),
            ),
            |(seqlen, w, sh, (b, hq, hkv, d), o, (rank, step))| {
                let Ok(layout) = RingLayout::new(seqlen, w, sh) else {
                    return Ok(());
                };
                let _ = (
                    layout.shard_len(rank),
                    layout.kv_source(rank, step),
                    layout.blocks(rank),
                );
                if layout.seqlen() <= 64 {
                    let x: Vec<u8> = (0..layout.seqlen() * 2).map(|i| i as u8).collect();
                    let shards = layout.shard(&x, 1, 2).unwrap();
                    prop_assert_eq!(layout.unshard(&shards, 1, 2).unwrap(), x);
                }
                let _ = layout.unshard(&vec![Vec::<u8>::new(); w], b, d);
                let shape = RingShape {
                    batch: b,
                    heads_q: hq,
                    heads_kv: hkv,
                    head_dim: d,
                };
                if let Ok(ring) = RingAttention::new(layout, shape, &o) {
                    let _ = (
                        ring.out_len(rank),
                        ring.kv_len(rank),
                        ring.lse_len(rank),
                        ring.pieces(rank, step),
                    );
                    let sch = ring.schedule();
                    prop_assert_eq!(sch.compute.len(), w);
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn prop_neighborhood_constructor_and_neighbors() {
    let dim = (size(), size(), size(), any::<bool>(), size()).prop_map(|(l, k, dil, c, s)| {
        NeighborhoodDim {
            length: l,
            kernel: k,
            dilation: dil,
            causal: c,
            stride: s,
        }
    });
    runner(1500)
        .run(
            &(
                prop::collection::vec(dim, 0..5),
                (size(), size(), size(), size()),
                options(),
                size(),
            ),
            |(dims, (b, hq, hkv, d), o, token)| {
                for dm in &dims {
                    let _ = dm.window(token);
                }
                let shape = NeighborhoodShape {
                    batch: b,
                    heads_q: hq,
                    heads_kv: hkv,
                    head_dim: d,
                    dims: &dims,
                };
                if let Ok(na) = NeighborhoodAttention::new(&shape, &o) {
                    let _ = (na.out_len(), na.lse_len(), na.neighbor_count(token));
                    let _ = na.neighbors(token);
                    let _ = na.neighbors(0);
                }
                Ok(())
            },
        )
        .unwrap();
}
