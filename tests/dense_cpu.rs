//! CPU path and f64 reference: agreement, mask properties and input validation.

mod common;

use common::*;
use longattn::reference::dense_attention_f64;
use longattn::*;

/// One randomly filled dense problem with contiguous tensors.
struct Case<T> {
    shape: (usize, usize, usize, usize, usize, usize), // b, sq, sk, hq, hkv, d
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
}

impl<T: Element> Case<T> {
    fn new(seed: u64, b: usize, sq: usize, sk: usize, hq: usize, hkv: usize, d: usize) -> Self {
        let mut r = rng(seed);
        Case {
            shape: (b, sq, sk, hq, hkv, d),
            q: random_vec(&mut r, b * sq * hq * d),
            k: random_vec(&mut r, b * sk * hkv * d),
            v: random_vec(&mut r, b * sk * hkv * d),
        }
    }
    fn attn(&self, opts: &AttentionOptions) -> FlashAttention {
        let (b, sq, sk, hq, hkv, d) = self.shape;
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
        FlashAttention::new(&shape, opts).unwrap()
    }
    fn strides(&self) -> (Strides, Strides) {
        let (_, sq, sk, hq, hkv, d) = self.shape;
        (
            Strides::contiguous(sq, hq, d),
            Strides::contiguous(sk, hkv, d),
        )
    }
    fn reference(&self, opts: &AttentionOptions) -> (Vec<f64>, Vec<f64>) {
        let (qs, ks) = self.strides();
        dense_attention_f64(
            &self.attn(opts),
            Strided::new(&self.q[..], qs),
            Strided::new(&self.k[..], ks),
            Strided::new(&self.v[..], ks),
        )
        .unwrap()
    }
    fn cpu(&self, opts: &AttentionOptions) -> (Vec<T>, Vec<f32>) {
        let attn = self.attn(opts);
        let (qs, ks) = self.strides();
        let mut out = vec![T::from_f32(f32::NAN); attn.out_len()];
        let mut lse = vec![f32::NAN; attn.lse_len()];
        attn.forward_cpu(
            Strided::new(&self.q[..], qs),
            Strided::new(&self.k[..], ks),
            Strided::new(&self.v[..], ks),
            Strided::new(&mut out[..], qs),
            Some(&mut lse),
        )
        .unwrap();
        (out, lse)
    }
}

fn option_sweep() -> Vec<AttentionOptions> {
    let w = |l, r| AttentionOptions::default().with_window(Window::new(l, r));
    vec![
        AttentionOptions::default(),
        AttentionOptions::causal(),
        w(Some(0), Some(0)),
        w(Some(1), Some(0)),
        w(Some(7), Some(3)),
        w(None, Some(5)),
        w(Some(4), None),
        AttentionOptions::causal().with_sinks(3),
        w(Some(5), Some(0)).with_sinks(4),
        AttentionOptions::default()
            .with_softcap(0.8)
            .with_scale(2.5),
        AttentionOptions::causal().with_softcap(30.0),
    ]
}

#[test]
fn cpu_path_matches_f64_reference() {
    let shapes = [
        (1, 1, 1, 1, 1, 8),
        (2, 2, 2, 2, 1, 16),
        (1, 17, 17, 4, 2, 32),
        (2, 5, 37, 2, 2, 24),
        (1, 40, 9, 3, 1, 64),
        (1, 70, 130, 2, 2, 40),
    ];
    for (n, &(b, sq, sk, hq, hkv, d)) in shapes.iter().enumerate() {
        for (o, opts) in option_sweep().iter().enumerate() {
            let case = Case::<f32>::new((n * 100 + o) as u64, b, sq, sk, hq, hkv, d);
            let (want, want_lse) = case.reference(opts);
            let (got, lse) = case.cpu(opts);
            let err = rel_l2(&to_f64(&got), &want);
            assert!(err < 1e-5, "f32 {:?} {opts:?}: rel err {err}", case.shape);
            check_lse(&lse, &want_lse, 1e-4, "f32 lse");
        }
    }
}

#[test]
fn cpu_path_half_precision() {
    for opts in option_sweep() {
        let case = Case::<bf16>::new(7, 2, 33, 45, 4, 2, 64);
        let (want, want_lse) = case.reference(&opts);
        let (got, lse) = case.cpu(&opts);
        let err = rel_l2(&to_f64(&got), &want);
        assert!(err < 1e-2, "bf16 {opts:?}: rel err {err}");
        check_lse(&lse, &want_lse, 1e-3, "bf16 lse");
        let case = Case::<f16>::new(8, 1, 19, 64, 2, 2, 32);
        let (want, _) = case.reference(&opts);
        let (got, _) = case.cpu(&opts);
        assert!(rel_l2(&to_f64(&got), &want) < 2e-3, "f16 {opts:?}");
    }
}

/// Independent oracle for the mask definitions: softmax over an explicit key list.
fn attend_subset(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: usize,
    keys: &[usize],
    scale: f64,
) -> Vec<f64> {
    if keys.is_empty() {
        return vec![0.0; d];
    }
    let s: Vec<f64> = keys
        .iter()
        .map(|&j| {
            (0..d)
                .map(|c| q[c] as f64 * k[j * d + c] as f64)
                .sum::<f64>()
                * scale
        })
        .collect();
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
    let mut o = vec![0.0; d];
    for (&j, x) in keys.iter().zip(&s) {
        for c in 0..d {
            o[c] += (x - m).exp() / l * v[j * d + c] as f64;
        }
    }
    o
}

/// Keys visible to row `i` written out from semantics.md, independently of `Mask`.
fn visible_keys(i: usize, sq: usize, sk: usize, left: i64, right: i64, sinks: usize) -> Vec<usize> {
    let diag = i as i64 + sk as i64 - sq as i64;
    (0..sk)
        .filter(|&j| {
            let j = j as i64;
            let right_ok = right < 0 || j <= diag + right;
            let left_ok = left < 0 || j >= diag - left;
            right_ok && (left_ok || j < sinks as i64)
        })
        .collect()
}

#[test]
fn masks_match_the_written_definition() {
    let (sq, sk, d) = (23, 31, 16);
    let case = Case::<f32>::new(3, 1, sq, sk, 1, 1, d);
    for (left, right, sinks) in [
        (-1, -1, 0),
        (-1, 0, 0),
        (0, 0, 0),
        (1, 0, 0),
        (3, 2, 0),
        (-1, 0, 2),
        (2, 0, 3),
        (4, 1, 5),
        (0, -1, 1),
    ] {
        let opts = AttentionOptions::default()
            .with_window(Window::from_flash(left, right).unwrap())
            .with_sinks(sinks);
        let (got, _) = case.cpu(&opts);
        let scale = 1.0 / (d as f64).sqrt();
        for i in 0..sq {
            let keys = visible_keys(i, sq, sk, left, right, sinks);
            let want = attend_subset(
                &case.q[i * d..(i + 1) * d],
                &case.k,
                &case.v,
                d,
                &keys,
                scale,
            );
            let err = rel_l2(&to_f64(&got[i * d..(i + 1) * d]), &want);
            assert!(err < 1e-5, "({left},{right}) sinks {sinks} row {i}: {err}");
        }
    }
}

#[test]
fn window_of_one_and_two_tokens() {
    let (sq, sk, d) = (9, 14, 8);
    let case = Case::<f32>::new(11, 1, sq, sk, 1, 1, d);
    // W = 1: each row sees only its aligned key, so the output is that value row exactly.
    let (got, lse) =
        case.cpu(&AttentionOptions::default().with_window(Window::causal_tokens(1).unwrap()));
    for i in 0..sq {
        let j = i + sk - sq;
        for c in 0..d {
            assert!((got[i * d + c] - case.v[j * d + c]).abs() < 1e-6);
        }
        assert!(lse[i].is_finite());
    }
    // W = 2: keys {j - 1, j}.
    let (got, _) =
        case.cpu(&AttentionOptions::default().with_window(Window::causal_tokens(2).unwrap()));
    for i in 0..sq {
        let j = i + sk - sq;
        let want = attend_subset(
            &case.q[i * d..],
            &case.k,
            &case.v,
            d,
            &[j - 1, j],
            1.0 / (d as f64).sqrt(),
        );
        assert!(rel_l2(&to_f64(&got[i * d..(i + 1) * d]), &want) < 1e-6);
    }
}

#[test]
fn window_covering_everything_equals_full_and_causal_equals_minus_one_zero() {
    let case = Case::<f32>::new(5, 2, 21, 29, 2, 2, 16);
    let full = case.cpu(&AttentionOptions::default());
    let wide = case
        .cpu(&AttentionOptions::default().with_window(Window::new(Some(29 + 21), Some(29 + 21))));
    assert_eq!(full.0, wide.0);
    let causal = case.cpu(&AttentionOptions::causal());
    let explicit =
        case.cpu(&AttentionOptions::default().with_window(Window::from_flash(-1, 0).unwrap()));
    let wide_left =
        case.cpu(&AttentionOptions::default().with_window(Window::new(Some(1000), Some(0))));
    assert_eq!(causal.0, explicit.0);
    assert_eq!(causal.0, wide_left.0);
    assert_ne!(causal.0, full.0);
}

#[test]
fn fully_masked_rows_are_zero_with_neg_inf_lse() {
    // sq > sk with causal: the first sq - sk rows see no key.
    let (sq, sk, d) = (12, 5, 8);
    let case = Case::<f32>::new(2, 1, sq, sk, 2, 1, d);
    for opts in [
        AttentionOptions::causal(),
        AttentionOptions::causal().with_softcap(5.0),
    ] {
        let (got, lse) = case.cpu(&opts);
        for h in 0..2 {
            for i in 0..sq {
                let row = &got[(i * 2 + h) * d..(i * 2 + h + 1) * d];
                if i < sq - sk {
                    assert!(row.iter().all(|&x| x == 0.0), "row {i} not zero");
                    assert_eq!(lse[h * sq + i], f32::NEG_INFINITY);
                } else {
                    assert!(lse[h * sq + i].is_finite());
                }
            }
        }
    }
    // seqlen_k == 0: every row empty.
    let case = Case::<f32>::new(2, 1, 3, 0, 1, 1, 8);
    let (got, lse) = case.cpu(&AttentionOptions::default());
    assert!(got.iter().all(|&x| x == 0.0) && lse.iter().all(|&x| x == f32::NEG_INFINITY));
}

#[test]
fn gqa_equals_repeated_kv_heads() {
    let (b, sq, sk, hq, hkv, d) = (2, 13, 19, 6, 2, 16);
    let case = Case::<f32>::new(9, b, sq, sk, hq, hkv, d);
    let group = hq / hkv;
    let repeat = |x: &[f32]| -> Vec<f32> {
        let mut out = Vec::with_capacity(x.len() * group);
        for row in x.chunks(hkv * d) {
            for h in 0..hq {
                let g = h / group;
                out.extend_from_slice(&row[g * d..(g + 1) * d]);
            }
        }
        out
    };
    let mha = Case {
        shape: (b, sq, sk, hq, hq, d),
        q: case.q.clone(),
        k: repeat(&case.k),
        v: repeat(&case.v),
    };
    for opts in option_sweep() {
        let a = case.cpu(&opts);
        let m = mha.cpu(&opts);
        assert_eq!(a.0, m.0);
    }
}

#[test]
fn varlen_equals_per_sequence_calls() {
    let (hq, hkv, d) = (4, 2, 16);
    let lens_q = [3usize, 1, 0, 17, 8];
    let lens_k = [5usize, 1, 4, 17, 2];
    let (cq, ck) = (cu_seqlens(&lens_q), cu_seqlens(&lens_k));
    let (tq, tk) = (cq[5] as usize, ck[5] as usize);
    let mut r = rng(21);
    let q: Vec<f32> = random_vec(&mut r, tq * hq * d);
    let k: Vec<f32> = random_vec(&mut r, tk * hkv * d);
    let v: Vec<f32> = random_vec(&mut r, tk * hkv * d);
    for opts in option_sweep() {
        let attn = FlashAttention::new(
            &AttentionShape {
                batch: 5,
                heads_q: hq,
                heads_kv: hkv,
                head_dim: d,
                seqlens: SeqLens::Varlen {
                    cu_seqlens_q: &cq,
                    cu_seqlens_k: &ck,
                },
            },
            &opts,
        )
        .unwrap();
        let qs = Strides {
            batch: 0,
            ..Strides::contiguous(0, hq, d)
        };
        let ks = Strides {
            batch: 0,
            ..Strides::contiguous(0, hkv, d)
        };
        let mut out = vec![f32::NAN; tq * hq * d];
        let mut lse = vec![f32::NAN; hq * tq];
        attn.forward_cpu(
            Strided::new(&q[..], qs),
            Strided::new(&k[..], ks),
            Strided::new(&v[..], ks),
            Strided::new(&mut out[..], qs),
            Some(&mut lse),
        )
        .unwrap();
        let (want_all, want_lse_all) = dense_attention_f64(
            &attn,
            Strided::new(&q[..], qs),
            Strided::new(&k[..], ks),
            Strided::new(&v[..], ks),
        )
        .unwrap();
        assert!(rel_l2(&to_f64(&out), &want_all) < 1e-5);
        check_lse(&lse, &want_lse_all, 1e-4, "varlen lse");
        for s in 0..5 {
            let (q0, k0) = (cq[s] as usize, ck[s] as usize);
            let single = Case {
                shape: (1, lens_q[s], lens_k[s], hq, hkv, d),
                q: q[q0 * hq * d..cq[s + 1] as usize * hq * d].to_vec(),
                k: k[k0 * hkv * d..ck[s + 1] as usize * hkv * d].to_vec(),
                v: v[k0 * hkv * d..ck[s + 1] as usize * hkv * d].to_vec(),
            };
            let (o, l) = single.cpu(&opts);
            assert_eq!(
                &out[q0 * hq * d..cq[s + 1] as usize * hq * d],
                &o[..],
                "seq {s} {opts:?}"
            );
            for h in 0..hq {
                for i in 0..lens_q[s] {
                    assert_eq!(
                        lse[h * tq + q0 + i].to_bits(),
                        l[h * lens_q[s] + i].to_bits()
                    );
                }
            }
        }
    }
}

#[test]
fn split_then_merge_equals_unsplit() {
    let (b, sq, sk, h, d) = (2, 7, 40, 3, 16);
    let case = Case::<f32>::new(33, b, sq, sk, h, h, d);
    let full = AttentionOptions::default();
    let (want, want_lse) = case.reference(&full);
    let mut r = rng(34);
    for _ in 0..5 {
        // Random cut points: [0, c1), [c1, c2), [c2, sk); a part may be empty.
        let mut cuts = [
            0,
            rand::Rng::random_range(&mut r, 0..=sk),
            rand::Rng::random_range(&mut r, 0..=sk),
            sk,
        ];
        cuts.sort();
        let shape = MergeShape {
            batch: b,
            seqlen: sq,
            heads: h,
            head_dim: d,
        };
        let mut acc_o = vec![0.0f32; shape.o_len()];
        let mut acc_lse = vec![f32::NEG_INFINITY; shape.lse_len()];
        for w in cuts.windows(2) {
            let (lo, hi) = (w[0], w[1]);
            let slice = |x: &[f32]| -> Vec<f32> {
                x.chunks(sk * h * d)
                    .flat_map(|bat| bat[lo * h * d..hi * h * d].to_vec())
                    .collect()
            };
            let part = Case {
                shape: (b, sq, hi - lo, h, h, d),
                q: case.q.clone(),
                k: slice(&case.k),
                v: slice(&case.v),
            };
            let (o, l) = part.cpu(&full);
            shape
                .merge_into_cpu(
                    Partial {
                        o: &mut acc_o[..],
                        lse: &mut acc_lse[..],
                    },
                    Partial {
                        o: &o[..],
                        lse: &l[..],
                    },
                )
                .unwrap();
        }
        assert!(rel_l2(&to_f64(&acc_o), &want) < 1e-5, "cuts {cuts:?}");
        check_lse(&acc_lse, &want_lse, 1e-4, "merged lse");
    }
    // Merging with an empty partial is the identity; two empties stay empty.
    let shape = MergeShape {
        batch: 1,
        seqlen: 1,
        heads: 1,
        head_dim: 2,
    };
    let mut out_o = [f32::NAN; 2];
    let mut out_l = [f32::NAN];
    shape
        .merge_cpu(
            Partial {
                o: &[0.0, 0.0][..],
                lse: &[f32::NEG_INFINITY][..],
            },
            Partial {
                o: &[0.0, 0.0][..],
                lse: &[f32::NEG_INFINITY][..],
            },
            Partial {
                o: &mut out_o[..],
                lse: &mut out_l[..],
            },
        )
        .unwrap();
    assert_eq!((out_o, out_l), ([0.0, 0.0], [f32::NEG_INFINITY]));
}

#[test]
fn strided_fused_qkv_views() {
    // One buffer [b, s, 3, h, d] holding q, k and v, read through strides without a copy.
    let (b, s, h, d) = (2, 11, 2, 16);
    let mut r = rng(77);
    let qkv: Vec<f32> = random_vec(&mut r, b * s * 3 * h * d);
    let strides = Strides {
        batch: (s * 3 * h * d) as i64,
        seq: (3 * h * d) as i64,
        head: d as i64,
    };
    let split = |which: usize| -> Vec<f32> {
        qkv.chunks(3 * h * d)
            .flat_map(|row| row[which * h * d..(which + 1) * h * d].to_vec())
            .collect()
    };
    let case = Case {
        shape: (b, s, s, h, h, d),
        q: split(0),
        k: split(1),
        v: split(2),
    };
    let opts = AttentionOptions::causal();
    let (want, _) = case.cpu(&opts);
    let attn = case.attn(&opts);
    let mut out = vec![f32::NAN; attn.out_len()];
    attn.forward_cpu(
        Strided::new(&qkv[..], strides),
        Strided::new(&qkv[h * d..], strides),
        Strided::new(&qkv[2 * h * d..], strides),
        Strided::new(&mut out[..], Strides::contiguous(s, h, d)),
        None,
    )
    .unwrap();
    assert_eq!(out, want);
}

#[test]
fn bad_inputs_get_errors() {
    fn shape(
        b: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        seqlens: SeqLens<'_>,
    ) -> AttentionShape<'_> {
        AttentionShape {
            batch: b,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            seqlens,
        }
    }
    let fixed = SeqLens::Fixed {
        seqlen_q: 4,
        seqlen_k: 6,
    };
    let o = AttentionOptions::default();
    // Shapes, GQA ratio, head dim.
    assert!(matches!(
        FlashAttention::new(&shape(0, 2, 2, 8, fixed), &o),
        Err(Error::Shape(_))
    ));
    assert!(
        matches!(FlashAttention::new(&shape(1, 6, 4, 8, fixed), &o), Err(Error::Shape(m)) if m.contains("GQA"))
    );
    assert!(matches!(
        FlashAttention::new(&shape(1, 2, 2, 0, fixed), &o),
        Err(Error::Shape(_))
    ));
    // Options. A softcap of 0 is off, as in every peer library (issue 12).
    let off = FlashAttention::new(&shape(1, 2, 2, 8, fixed), &o.with_softcap(0.0)).unwrap();
    assert_eq!(off.softcap(), None);
    for bad in [
        o.with_scale(f32::NAN),
        o.with_scale(f32::INFINITY),
        o.with_softcap(-1.0),
        o.with_softcap(1e-40), // subnormal: scale / softcap overflows f32
        o.with_scale(0.0),
        o.with_scale(-1.0),
        o.with_scale(f32::MAX),
        o.with_softcap(f32::NAN),
        o.with_window(Window::new(Some(usize::MAX), None)),
        o.with_sinks(usize::MAX),
    ] {
        assert!(
            matches!(
                FlashAttention::new(&shape(1, 2, 2, 8, fixed), &bad),
                Err(Error::InvalidOption(_))
            ),
            "{bad:?}"
        );
    }
    assert!(Window::from_flash(-3, 0).is_err());
    // cu_seqlens: wrong length, non-monotone, not starting at 0.
    for (cq, ck) in [
        (vec![0, 2], vec![0, 3, 5]),
        (vec![0, 3, 2], vec![0, 3, 5]),
        (vec![1, 3, 4], vec![0, 3, 5]),
        (vec![0, 3, 4], vec![0, 5, 3]),
    ] {
        let s = shape(
            2,
            2,
            2,
            8,
            SeqLens::Varlen {
                cu_seqlens_q: &cq,
                cu_seqlens_k: &ck,
            },
        );
        assert!(
            matches!(FlashAttention::new(&s, &o), Err(Error::Index(_))),
            "{cq:?} {ck:?}"
        );
    }
    // Buffers: too short, past the end through cu_seqlens, bad strides, overlapping output.
    let attn = FlashAttention::new(&shape(1, 2, 2, 8, fixed), &o).unwrap();
    let qs = Strides::contiguous(4, 2, 8);
    let ks = Strides::contiguous(6, 2, 8);
    let q = vec![0.5f32; 64];
    let k = vec![0.5f32; 96];
    let mut out = vec![0.0f32; 64];
    let run = |q: &[f32],
               qs: Strides,
               k: &[f32],
               out: &mut [f32],
               os: Strides,
               lse: Option<&mut [f32]>| {
        attn.forward_cpu(
            Strided::new(q, qs),
            Strided::new(k, ks),
            Strided::new(k, ks),
            Strided::new(out, os),
            lse,
        )
    };
    assert!(run(&q, qs, &k, &mut out, qs, None).is_ok());
    assert!(
        matches!(run(&q[..63], qs, &k, &mut out, qs, None), Err(Error::Shape(m)) if m.contains('q'))
    );
    assert!(matches!(
        run(&q, qs, &k[..90], &mut out, qs, None),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        run(&q, qs, &k, &mut out[..10], qs, None),
        Err(Error::Shape(_))
    ));
    let neg = Strides { seq: -16, ..qs };
    assert!(matches!(
        run(&q, neg, &k, &mut out, qs, None),
        Err(Error::Stride(_))
    ));
    let overlap = Strides {
        batch: 64,
        seq: 8,
        head: 8,
    };
    assert!(matches!(
        run(&q, qs, &k, &mut out, overlap, None),
        Err(Error::Stride(_))
    ));
    let mut short_lse = vec![0.0f32; 7];
    assert!(
        matches!(run(&q, qs, &k, &mut out, qs, Some(&mut short_lse)), Err(Error::Shape(m)) if m.contains("lse"))
    );
    // Varlen whose last offset runs past the packed buffer.
    let (cq, ck) = ([0, 2, 9], [0, 3, 6]);
    let v = FlashAttention::new(
        &shape(
            2,
            2,
            2,
            8,
            SeqLens::Varlen {
                cu_seqlens_q: &cq,
                cu_seqlens_k: &ck,
            },
        ),
        &o,
    )
    .unwrap();
    let ps = Strides { batch: 0, ..qs };
    let r = v.forward_cpu(
        Strided::new(&q[..], ps),
        Strided::new(&k[..], ps),
        Strided::new(&k[..], ps),
        Strided::new(&mut out[..], ps),
        None,
    );
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    // Merge shapes.
    let ms = MergeShape {
        batch: 1,
        seqlen: 2,
        heads: 1,
        head_dim: 4,
    };
    let mut oo = [0.0f32; 8];
    let mut ol = [0.0f32; 2];
    let r = ms.merge_cpu(
        Partial {
            o: &[0.0f32; 7][..],
            lse: &[0.0; 2][..],
        },
        Partial {
            o: &[0.0f32; 8][..],
            lse: &[0.0; 2][..],
        },
        Partial {
            o: &mut oo[..],
            lse: &mut ol[..],
        },
    );
    assert!(matches!(r, Err(Error::Shape(_))));
}

/// `causal` composes with a window as in FlashAttention-2 (issue 12): it sets the right
/// bound to min(right, 0) and keeps the left bound and the sinks; the default is full
/// attention.
#[test]
fn causal_flag_composes_with_windows() {
    let o = AttentionOptions::default();
    assert_eq!(o.effective_mask(), Mask::default());
    for (window, want) in [
        (Window::new(Some(3), None), Window::new(Some(3), Some(0))),
        (Window::new(Some(3), Some(5)), Window::new(Some(3), Some(0))),
        (Window::new(None, None), Window::CAUSAL),
        (Window::new(Some(0), Some(0)), Window::new(Some(0), Some(0))),
    ] {
        let got = o.with_window(window).with_sinks(2).with_causal(true);
        assert_eq!(got.effective_mask(), Mask::new(want, 2), "{window:?}");
        assert_eq!(
            o.with_causal(true)
                .with_window(window)
                .effective_mask()
                .window,
            want,
            "order of the setters does not matter"
        );
    }
    assert_eq!(
        AttentionOptions::causal().effective_mask().window,
        Window::CAUSAL
    );
}
