//! Neighborhood attention (CPU): the per-dim windows against a literal transcription of
//! NATTEN's rules, every non-causal query seeing exactly prod(k) keys, the output against an
//! f64 oracle over those keys for 1-D/2-D/3-D grids with dilation, causal dims, strides and
//! GQA, `k = L` == full self-attention, and 1-D NA == the FlashAttention window where the two
//! agree (interior tokens; causal dims everywhere).

mod common;

use common::{check_lse, random_vec, rel_l2, rng, to_f64};
use longattn::reference::{dense_attention_f64, neighborhood_attention_f64};
use longattn::*;

/// NATTEN's per-dim rule, transcribed literally (signed arithmetic, as written).
fn natten_window(l: usize, k: usize, d: usize, s: usize, causal: bool, x: usize) -> Vec<usize> {
    let (l, k, d, s, x) = (l as i64, k as i64, d as i64, s as i64, x as i64);
    let g = x % d;
    let i = x / d;
    let lg = (l - g + d - 1) / d;
    let (start, end) = if causal {
        ((i - k + 1).max(0), i + 1)
    } else {
        let left = k / 2;
        let right = k / 2 + (k % 2) - 1;
        let c = ((i / s) * s + s / 2).min(lg - 1);
        let start = (c - left).max(0)
            + if c + right >= lg {
                lg - right - c - 1
            } else {
                0
            };
        (start, start + k)
    };
    (start..end).map(|j| (j * d + g) as usize).collect()
}

/// Flat keys of `token` from the literal per-dim rule (row-major grid).
fn natten_keys(dims: &[NeighborhoodDim], token: usize) -> Vec<usize> {
    let mut coords = vec![0; dims.len()];
    let mut t = token;
    for (a, dim) in dims.iter().enumerate().rev() {
        coords[a] = t % dim.length;
        t /= dim.length;
    }
    let mut keys = vec![0usize];
    for (a, dim) in dims.iter().enumerate() {
        let w = natten_window(
            dim.length,
            dim.kernel,
            dim.dilation,
            dim.stride,
            dim.causal,
            coords[a],
        );
        keys = keys
            .iter()
            .flat_map(|&b| w.iter().map(move |&p| b * dim.length + p))
            .collect();
    }
    keys.sort();
    keys
}

fn shape_of(
    dims: &[NeighborhoodDim],
    batch: usize,
    hq: usize,
    hkv: usize,
    d: usize,
) -> NeighborhoodShape<'_> {
    NeighborhoodShape {
        batch,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        dims,
    }
}

/// f64 attention of every query over `keys(token)`: `(out [b, n, hq, d], lse [b, hq, n])`.
fn oracle<T: Element>(
    na: &NeighborhoodAttention,
    (batch, hq, hkv, d): (usize, usize, usize, usize),
    q: &[T],
    k: &[T],
    v: &[T],
    keys: impl Fn(usize) -> Vec<usize>,
) -> (Vec<f64>, Vec<f64>) {
    let n = na.tokens();
    let mut out = vec![0.0; batch * n * hq * d];
    let mut lse = vec![0.0; batch * hq * n];
    for b in 0..batch {
        for t in 0..n {
            let ks = keys(t);
            for h in 0..hq {
                let kh = h / (hq / hkv);
                let qo = ((b * n + t) * hq + h) * d;
                let s: Vec<f64> = ks
                    .iter()
                    .map(|&j| {
                        let ko = ((b * n + j) * hkv + kh) * d;
                        (0..d)
                            .map(|c| q[qo + c].to_f64() * k[ko + c].to_f64())
                            .sum::<f64>()
                            * na.scale() as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = w.iter().sum();
                for c in 0..d {
                    out[qo + c] = ks
                        .iter()
                        .zip(&w)
                        .map(|(&j, wj)| wj * v[((b * n + j) * hkv + kh) * d + c].to_f64())
                        .sum::<f64>()
                        / z;
                }
                lse[(b * hq + h) * n + t] = m + z.ln();
            }
        }
    }
    (out, lse)
}

/// Runs the CPU path with poisoned outputs: `(out, lse)`.
fn run<T: Element>(
    na: &NeighborhoodAttention,
    dims4: (usize, usize, usize, usize),
    q: &[T],
    k: &[T],
    v: &[T],
) -> (Vec<T>, Vec<f32>) {
    let (_, hq, hkv, d) = dims4;
    let n = na.tokens();
    let mut out = vec![T::from_f32(f32::NAN); na.out_len()];
    let mut lse = vec![f32::NAN; na.lse_len()];
    let (qs, ks) = (
        Strides::contiguous(n, hq, d),
        Strides::contiguous(n, hkv, d),
    );
    na.forward_cpu(
        Strided::new(q, qs),
        Strided::new(k, ks),
        Strided::new(v, ks),
        Strided::new(&mut out[..], qs),
        Some(&mut lse[..]),
    )
    .unwrap();
    assert!(out.iter().all(|x| !x.to_f32().is_nan()), "unwritten output");
    (out, lse)
}

fn grids() -> Vec<Vec<NeighborhoodDim>> {
    let nd = NeighborhoodDim::new;
    vec![
        vec![nd(1, 1)],
        vec![nd(2, 2)],
        vec![nd(17, 5)],
        vec![nd(17, 4).with_dilation(3)],
        vec![nd(16, 3).with_dilation(5)],
        vec![nd(13, 6).with_causal(true)],
        vec![nd(20, 7).with_causal(true).with_dilation(2)],
        vec![nd(21, 5).with_stride(2)],
        vec![nd(19, 7).with_stride(3).with_dilation(2)],
        vec![nd(9, 3), nd(11, 4).with_dilation(2)],
        vec![nd(8, 8), nd(7, 3).with_causal(true)],
        vec![nd(10, 5).with_stride(5), nd(6, 2)],
        vec![
            nd(5, 3),
            nd(6, 3).with_dilation(2),
            nd(4, 2).with_causal(true),
        ],
        vec![nd(4, 4), nd(5, 1), nd(7, 7).with_stride(2)],
    ]
}

#[test]
fn windows_follow_natten_rules_and_see_k_keys() {
    for dims in grids() {
        let na =
            NeighborhoodAttention::new(&shape_of(&dims, 1, 1, 1, 8), &AttentionOptions::default())
                .unwrap();
        for t in 0..na.tokens() {
            let got: Vec<usize> = na.neighbors(t).unwrap().collect();
            let mut sorted = got.clone();
            sorted.sort();
            assert_eq!(sorted, got, "{dims:?} token {t}: not ascending");
            assert_eq!(got, natten_keys(&dims, t), "{dims:?} token {t}");
            assert!(got.contains(&t), "{dims:?} token {t} does not see itself");
            if dims.iter().all(|d| !d.causal) {
                let k: usize = dims.iter().map(|d| d.kernel).product();
                assert_eq!(
                    got.len(),
                    k,
                    "{dims:?} token {t}: every query sees prod(k) keys"
                );
            }
        }
    }
    // The border shift by hand: L = 7, k = 3: position 0 sees {0, 1, 2}, 6 sees {4, 5, 6}.
    let dim = NeighborhoodDim::new(7, 3);
    assert_eq!(dim.window(0).unwrap(), (0..3, 0));
    assert_eq!(dim.window(6).unwrap(), (4..7, 0));
    assert_eq!(dim.window(3).unwrap(), (2..5, 0));
    // Even k has one fewer on the right: k = 4 at 3 sees 1..=4.
    assert_eq!(NeighborhoodDim::new(9, 4).window(3).unwrap(), (1..5, 0));
    // Dilation 2, L = 9: position 5 is group 1, index 2 of a group of length 4.
    assert_eq!(
        NeighborhoodDim::new(9, 3)
            .with_dilation(2)
            .window(5)
            .unwrap(),
        (1..4, 1)
    );
}

#[test]
fn output_matches_f64_oracle() {
    let mut seed = 0;
    for dims in grids() {
        for (batch, hq, hkv, d) in [(1, 2, 2, 16), (2, 4, 1, 8)] {
            seed += 1;
            let na = NeighborhoodAttention::new(
                &shape_of(&dims, batch, hq, hkv, d),
                &AttentionOptions::default(),
            )
            .unwrap();
            let n = na.tokens();
            let mut r = rng(seed);
            let q: Vec<f32> = random_vec(&mut r, batch * n * hq * d);
            let k: Vec<f32> = random_vec(&mut r, batch * n * hkv * d);
            let v: Vec<f32> = random_vec(&mut r, batch * n * hkv * d);
            let (want, want_lse) = oracle(&na, (batch, hq, hkv, d), &q, &k, &v, |t| {
                natten_keys(&dims, t)
            });
            let st = |h: usize| Strides::contiguous(na.tokens(), h, d);
            let (reference, reference_lse) = neighborhood_attention_f64(
                &na,
                Strided::new(&q[..], st(hq)),
                Strided::new(&k[..], st(hkv)),
                Strided::new(&v[..], st(hkv)),
            )
            .unwrap();
            assert!(
                rel_l2(&reference, &want) < 1e-12,
                "{dims:?}: crate reference"
            );
            for (a, b) in reference_lse.iter().zip(&want_lse) {
                assert!(
                    (a - b).abs() < 1e-9,
                    "{dims:?}: crate reference lse {a} vs {b}"
                );
            }
            let (out, lse) = run(&na, (batch, hq, hkv, d), &q, &k, &v);
            let err = rel_l2(&to_f64(&out), &want);
            assert!(err < 1e-5, "{dims:?} b{batch} h{hq}/{hkv}: rel L2 {err}");
            check_lse(&lse, &want_lse, 1e-4, &format!("{dims:?}"));
        }
    }
    // Half precision, softcap and a custom scale.
    let dims = [
        NeighborhoodDim::new(12, 5),
        NeighborhoodDim::new(10, 3).with_dilation(3),
    ];
    let opts = AttentionOptions::default()
        .with_scale(0.3)
        .with_softcap(2.0);
    let na = NeighborhoodAttention::new(&shape_of(&dims, 1, 2, 1, 32), &opts).unwrap();
    let n = na.tokens();
    let mut r = rng(99);
    let q: Vec<bf16> = random_vec(&mut r, n * 2 * 32);
    let k: Vec<bf16> = random_vec(&mut r, n * 32);
    let v: Vec<bf16> = random_vec(&mut r, n * 32);
    let (out, _) = run(&na, (1, 2, 1, 32), &q, &k, &v);
    // The crate's f64 reference (checked against the literal oracle above) with the softcap
    // 2 tanh(0.3 q.k / 2).
    let st = |h: usize| Strides::contiguous(n, h, 32);
    let (want, _) = neighborhood_attention_f64(
        &na,
        Strided::new(&q[..], st(2)),
        Strided::new(&k[..], st(1)),
        Strided::new(&v[..], st(1)),
    )
    .unwrap();
    let err = rel_l2(&to_f64(&out), &want);
    assert!(err < 1e-2, "bf16 softcap: rel L2 {err}");
}

fn dense_f64(
    s: usize,
    h: usize,
    d: usize,
    opts: &AttentionOptions,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> (Vec<f64>, Vec<f64>) {
    let attn = FlashAttention::new(
        &AttentionShape {
            batch: 1,
            heads_q: h,
            heads_kv: h,
            head_dim: d,
            seqlens: SeqLens::Fixed {
                seqlen_q: s,
                seqlen_k: s,
            },
        },
        opts,
    )
    .unwrap();
    let st = Strides::contiguous(s, h, d);
    dense_attention_f64(
        &attn,
        Strided::new(q, st),
        Strided::new(k, st),
        Strided::new(v, st),
    )
    .unwrap()
}

#[test]
fn full_kernel_is_self_attention_and_1d_matches_flash_windows() {
    let (h, d) = (2, 16);
    // k = L in every dim, no dilation, non-causal: full self-attention over the grid.
    let dims = [NeighborhoodDim::new(6, 6), NeighborhoodDim::new(5, 5)];
    let na = NeighborhoodAttention::new(&shape_of(&dims, 1, h, h, d), &AttentionOptions::default())
        .unwrap();
    let n = na.tokens();
    let mut r = rng(5);
    let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        random_vec(&mut r, n * h * d),
        random_vec(&mut r, n * h * d),
        random_vec(&mut r, n * h * d),
    );
    let (out, lse) = run(&na, (1, h, h, d), &q, &k, &v);
    let (want, want_lse) = dense_f64(n, h, d, &AttentionOptions::default(), &q, &k, &v);
    assert!(rel_l2(&to_f64(&out), &want) < 1e-5);
    check_lse(&lse, &want_lse, 1e-4, "k = L");

    // 1-D causal NA with kernel k == the FlashAttention window (k - 1, 0) everywhere.
    let s = 40;
    let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        random_vec(&mut r, s * h * d),
        random_vec(&mut r, s * h * d),
        random_vec(&mut r, s * h * d),
    );
    for kernel in [1, 2, 7, 40] {
        let dims = [NeighborhoodDim::new(s, kernel).with_causal(true)];
        let na =
            NeighborhoodAttention::new(&shape_of(&dims, 1, h, h, d), &AttentionOptions::default())
                .unwrap();
        let (out, _) = run(&na, (1, h, h, d), &q, &k, &v);
        let fa = AttentionOptions::default().with_window(Window::causal_tokens(kernel).unwrap());
        let (want, _) = dense_f64(s, h, d, &fa, &q, &k, &v);
        assert!(rel_l2(&to_f64(&out), &want) < 1e-5, "causal k {kernel}");
    }
    // 1-D non-causal NA with odd k == the FA window (k / 2, k / 2) away from the borders
    // (where NA shifts its window and FA shrinks it).
    for kernel in [3, 5, 9] {
        let dims = [NeighborhoodDim::new(s, kernel)];
        let na =
            NeighborhoodAttention::new(&shape_of(&dims, 1, h, h, d), &AttentionOptions::default())
                .unwrap();
        let (out, _) = run(&na, (1, h, h, d), &q, &k, &v);
        let half = kernel / 2;
        let fa = AttentionOptions::default().with_window(Window::new(Some(half), Some(half)));
        let (want, _) = dense_f64(s, h, d, &fa, &q, &k, &v);
        let row = h * d;
        let interior = half * row..(s - half) * row;
        let err = rel_l2(&to_f64(&out[interior.clone()]), &want[interior]);
        assert!(err < 1e-5, "interior k {kernel}: {err}");
        // At the border they differ: token 0 sees k keys under NA, half + 1 under FA.
        let border = rel_l2(&to_f64(&out[..row]), &want[..row]);
        assert!(border > 1e-3, "border k {kernel} should differ");
    }
}

#[test]
fn bad_neighborhood_inputs_are_errors() {
    let nd = NeighborhoodDim::new;
    let opts = AttentionOptions::default();
    let bad_dims: Vec<Vec<NeighborhoodDim>> = vec![
        vec![],
        vec![nd(4, 2); 4],
        vec![nd(0, 1)],
        vec![nd(5, 0)],
        vec![nd(5, 6)],
        vec![nd(10, 4).with_dilation(3)],
        vec![nd(10, 2).with_dilation(0)],
        vec![nd(10, 3).with_stride(0)],
        vec![nd(10, 3).with_stride(4)],
        vec![nd(10, 3).with_stride(2).with_causal(true)],
        vec![nd(8, 2), nd(4, 9)],
    ];
    for dims in &bad_dims {
        let r = NeighborhoodAttention::new(&shape_of(dims, 1, 2, 2, 8), &opts);
        // Four dims are valid but beyond the supported rank: Unsupported (issue 11).
        assert!(
            matches!(
                r,
                Err(Error::InvalidOption(_)) | Err(Error::Shape(_)) | Err(Error::Unsupported(_))
            ),
            "{dims:?}: {r:?}"
        );
    }
    let dims = [nd(6, 3)];
    assert!(matches!(
        NeighborhoodAttention::new(&shape_of(&dims, 1, 3, 2, 8), &opts),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        NeighborhoodAttention::new(&shape_of(&dims, 0, 2, 2, 8), &opts),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        NeighborhoodAttention::new(&shape_of(&dims, 1, 2, 2, 8), &AttentionOptions::causal()),
        Err(Error::InvalidOption(_))
    ));
    assert!(matches!(
        NeighborhoodAttention::new(&shape_of(&dims, 1, 2, 2, 8), &opts.with_sinks(1)),
        Err(Error::InvalidOption(_))
    ));
    assert!(matches!(
        NeighborhoodAttention::new(&shape_of(&dims, 1, 2, 2, 8), &opts.with_scale(f32::NAN)),
        Err(Error::InvalidOption(_))
    ));
    let huge = [nd(1 << 30, 1), nd(1 << 30, 1), nd(1 << 30, 1)];
    assert!(matches!(
        NeighborhoodAttention::new(&shape_of(&huge, 1, 1, 1, 8), &opts),
        Err(Error::Shape(_))
    ));

    // The public per-dim window and neighbor list check their inputs too.
    assert!(matches!(
        nd(5, 3).with_dilation(0).window(0),
        Err(Error::InvalidOption(_))
    ));
    assert!(matches!(nd(5, 0).window(0), Err(Error::InvalidOption(_))));
    assert!(matches!(nd(3, 5).window(2), Err(Error::InvalidOption(_))));
    assert!(matches!(nd(5, 3).window(5), Err(Error::Index(_))));
    let na = NeighborhoodAttention::new(&shape_of(&dims, 1, 2, 2, 8), &opts).unwrap();
    assert!(matches!(na.neighbors(na.tokens()), Err(Error::Index(_))));
    let x = vec![0.5f32; na.out_len()];
    let st = Strides::contiguous(6, 2, 8);
    let mut out = vec![0.0f32; na.out_len()];
    let short = vec![0.5f32; na.out_len() - 1];
    let r = na.forward_cpu(
        Strided::new(&x[..], st),
        Strided::new(&short[..], st),
        Strided::new(&x[..], st),
        Strided::new(&mut out[..], st),
        None,
    );
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    let mut lse = vec![0.0f32; na.lse_len() - 1];
    let r = na.forward_cpu(
        Strided::new(&x[..], st),
        Strided::new(&x[..], st),
        Strided::new(&x[..], st),
        Strided::new(&mut out[..], st),
        Some(&mut lse[..]),
    );
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    let alias = Strides { seq: 4, ..st };
    let r = na.forward_cpu(
        Strided::new(&x[..], st),
        Strided::new(&x[..], st),
        Strided::new(&x[..], st),
        Strided::new(&mut out[..], alias),
        None,
    );
    assert!(matches!(r, Err(Error::Stride(_))), "{r:?}");
    let neg = Strides { head: -8, ..st };
    let r = na.forward_cpu(
        Strided::new(&x[..], neg),
        Strided::new(&x[..], st),
        Strided::new(&x[..], st),
        Strided::new(&mut out[..], st),
        None,
    );
    assert!(matches!(r, Err(Error::Stride(_))), "{r:?}");
}
