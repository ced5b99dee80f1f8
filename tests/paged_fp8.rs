//! FP8 (e4m3) KV cache on the CPU path: the e4m3 conversion against a brute-force
//! nearest-value oracle, append (per-kv-head scales, saturation, stored bounds), and decode,
//! Quest selection and paged prefill against the f64 references of the dequantised cache.
//! The FP8 GPU kernels are tested against this path in `paged_gpu.rs`.

use longattn::reference::paged::{
    page_bounds, paged_prefill_f64, quest_scores_f64, quest_select_brute,
};
use longattn::{
    AttentionOptions, Element, Error, F8E4M3, KvScales, PagedDecode, PagedPrefill, Strided, f16,
};

mod common;
use common::paged::*;
use common::*;

/// The finite non-negative e4m3 values with their codes, ascending (codes 0x00..=0x7e).
fn finite_codes() -> Vec<(u8, f64)> {
    (0u8..0x7f)
        .map(|c| {
            let (e, m) = (i32::from(c >> 3), f64::from(c & 7));
            // Written from the format's definition, not from the crate's conversion.
            let v = if e == 0 {
                m / 8.0 * 2f64.powi(-6)
            } else {
                (1.0 + m / 8.0) * 2f64.powi(e - 7)
            };
            (c, v)
        })
        .collect()
}

/// Round to nearest e4m3, ties to the even code, saturating at 448 (every finite value
/// beyond is nearest to 448): a linear scan over the codes.
fn nearest_code(x: f32, codes: &[(u8, f64)]) -> u8 {
    if x.is_nan() {
        return 0x7f | if x.is_sign_negative() { 0x80 } else { 0 };
    }
    let a = f64::from(x.abs());
    let mut best = codes[0];
    for &(c, v) in &codes[1..] {
        let (d, db) = ((v - a).abs(), (best.1 - a).abs());
        if d < db || (d == db && c % 2 == 0) {
            best = (c, v);
        }
    }
    best.0 | if x.is_sign_negative() { 0x80 } else { 0 }
}

#[test]
fn e4m3_conversion_is_round_to_nearest_even_with_saturation() {
    let codes = finite_codes();
    // Every code decodes to its value (both signs), NaN to NaN, and encodes back.
    for bits in 0..=255u8 {
        let x = F8E4M3::from_bits(bits);
        let v = x.to_f32();
        if bits & 0x7f == 0x7f {
            assert!(v.is_nan() && x.is_nan(), "{bits:#x}");
            continue;
        }
        let want = codes[usize::from(bits & 0x7f)].1 * if bits & 0x80 != 0 { -1.0 } else { 1.0 };
        assert_eq!(f64::from(v), want, "decode {bits:#x}");
        assert_eq!(F8E4M3::from_f32(v).to_bits(), bits, "round trip {bits:#x}");
    }
    // Midpoints between neighbours and one f32 ulp either side, saturation, infinities.
    let mut probes = vec![0.0f32, -0.0, 448.0, 463.99, 464.0, 464.01, 1e30, f32::MAX];
    probes.extend([
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MIN_POSITIVE,
        1e-45,
        2e-3,
        9.7e-4,
    ]);
    for w in codes.windows(2) {
        let mid = ((w[0].1 + w[1].1) / 2.0) as f32; // exact: 5 significant bits
        probes.extend([mid, mid.next_up(), mid.next_down(), -mid]);
    }
    // A sweep of f32 bit patterns over the whole range (both signs).
    probes.extend((0..=u32::MAX).step_by(65_521).map(f32::from_bits));
    for x in probes {
        let got = F8E4M3::from_f32(x).to_bits();
        let want = nearest_code(x, &codes);
        assert_eq!(
            got,
            want,
            "{x:e} ({:#x}): {got:#x} vs {want:#x}",
            x.to_bits()
        );
    }
    assert_eq!(F8E4M3::from_f32(f32::INFINITY).to_f32(), F8E4M3::MAX);
    assert_eq!(F8E4M3::from_f32(-1e9).to_f32(), -F8E4M3::MAX);
}

/// Scales per kv head for inputs in (-1, 1): `1 / scale` from about 200 to 720, rising with
/// the head for K and falling for V, so the first V head and the third K head saturate
/// (|x| / scale beyond 448 for |x| > 0.65) and every head uses most of e4m3's range.
fn scales(hkv: usize, seed: u64) -> KvScales {
    let inv = |g: usize| 200.0 + 250.0 * g as f32 + (seed % 23) as f32;
    KvScales::new(
        (0..hkv).map(|g| 1.0 / inv(g)).collect(),
        (0..hkv)
            .map(|g| 1.0 / inv(2usize.saturating_sub(g)))
            .collect(),
    )
    .unwrap()
}

#[test]
fn fp8_append_quantizes_per_kv_head_and_keeps_stored_bounds() {
    let codes = finite_codes();
    for ps in [1, 16, 64] {
        let hkv = 3;
        let sc = scenario_with::<f16, F8E4M3>(&[0, 1, 300, 77], ps, hkv, 16, ps as u64, {
            Some(scales(hkv, ps as u64))
        });
        let (cache, s) = (&sc.cache, sc.cache.kv_scales().unwrap());
        let mut saturated = 0;
        for b in 0..cache.batch() {
            for j in 0..cache.seqlen(b).unwrap() {
                for h in 0..hkv {
                    let o = cache.token_offset(b, j, h).unwrap();
                    let c = (j * hkv + h) * 16;
                    for ch in 0..16 {
                        for (stored, tokens, scale) in [
                            (&sc.k_cache, &sc.k_tokens, s.k()[h]),
                            (&sc.v_cache, &sc.v_tokens, s.v()[h]),
                        ] {
                            let x = tokens[b][c + ch].to_f32() / scale;
                            saturated += usize::from(x.abs() > 464.0);
                            assert_eq!(
                                stored[o + ch].to_bits(),
                                nearest_code(x, &codes),
                                "ps {ps} b {b} token {j} head {h} channel {ch}"
                            );
                        }
                    }
                }
            }
        }
        assert!(
            saturated > 0,
            "ps {ps}: the scales were meant to saturate some values"
        );
        // Bounds: those of the stored e4m3 values.
        for (page, kvh, lo, hi) in page_bounds(cache, &sc.k_cache) {
            let mo = cache.layout().meta_offset(page, kvh).unwrap();
            assert_eq!(&sc.kmin[mo..mo + 16], &lo[..], "ps {ps} page {page} kmin");
            assert_eq!(&sc.kmax[mo..mo + 16], &hi[..], "ps {ps} page {page} kmax");
        }
    }
}

#[test]
fn fp8_decode_equals_the_reference_of_the_dequantized_cache() {
    let seqlens = [0usize, 1, 5, 130, 300];
    let mut cases = 0;
    for ps in [1, 16, 64] {
        for (hkv, ratio, d) in [(2, 1, 16), (1, 4, 8), (2, 3, 24)] {
            let seed = 40 + ps as u64 + d as u64;
            let sc = scenario_with::<f16, F8E4M3>(&seqlens, ps, hkv, d, seed, {
                Some(scales(hkv, seed))
            });
            let hq = hkv * ratio;
            for q_len in [1, 3] {
                let mut r = rng(seed * 3 + q_len as u64);
                let q: Vec<f16> = random_vec(&mut r, seqlens.len() * q_len * hq * d);
                for (name, opts) in masks() {
                    let what = format!("ps {ps} hkv {hkv} hq {hq} d {d} q_len {q_len} {name}");
                    let dec = PagedDecode::new(&sc.cache, hq, q_len, &opts).unwrap();
                    let (want, want_lse) = decode_reference(&dec, &sc, &q, None);
                    // f16 output rounding (2^-11) dominates.
                    cases += check_cpu_splits(&dec, &sc, &q, (&want, &want_lse), 2e-3, &what);
                }
            }
        }
    }
    assert_eq!(cases, 3 * 3 * 2 * masks().len() * 2);
}

#[test]
fn fp8_decode_approximates_the_f16_cache_and_applies_both_scales() {
    let seqlens = [3usize, 200, 64];
    let (hkv, hq, d, q_len) = (2, 8, 32, 2);
    // Calibrated as engines do: the largest |value| (< 1 here) maps to e4m3's 448.
    let s = KvScales::uniform(hkv, 1.0 / 448.0, 1.0 / 448.0).unwrap();
    let fp8 = scenario_with::<f16, F8E4M3>(&seqlens, 16, hkv, d, 9, Some(s.clone()));
    let half = scenario::<f16>(&seqlens, 16, hkv, d, 9); // the same tokens, kept in f16
    assert_eq!(fp8.k_tokens, half.k_tokens);
    let mut r = rng(10);
    let q: Vec<f16> = random_vec(&mut r, seqlens.len() * q_len * hq * d);
    let opts = AttentionOptions::causal().with_softcap(3.0);
    let dec = PagedDecode::new(&fp8.cache, hq, q_len, &opts).unwrap();
    let (out, lse) = decode_cpu(&dec, &fp8, &q);
    let dec16 = PagedDecode::new(&half.cache, hq, q_len, &opts).unwrap();
    let (want, want_lse) = decode_reference(&dec16, &half, &q, None);
    // e4m3 keeps 3 mantissa bits (relative rounding <= 2^-4 per value); the output averages
    // many of them.
    let err = rel_l2(&to_f64(&out), &want);
    assert!(err < 6e-2, "fp8 vs f16 cache: rel L2 {err}");
    assert!(
        err > 1e-4,
        "fp8 vs f16 cache: rel L2 {err}: was anything quantised?"
    );
    check_lse(&lse, &want_lse, 5e-2, "fp8 vs f16 lse");

    // Scales enter exactly as defined: doubling every V scale doubles the output; doubling
    // every K scale is doubling the softmax scale (both exact in f32: identical bits).
    let with = |k: f32, v: f32| {
        let s = KvScales::new(
            s.k().iter().map(|x| x * k).collect(),
            s.v().iter().map(|x| x * v).collect(),
        )
        .unwrap();
        let cache = fp8.cache.clone().with_kv_scales(s).unwrap();
        Scenario {
            cache,
            k_cache: fp8.k_cache.clone(),
            v_cache: fp8.v_cache.clone(),
            kmin: fp8.kmin.clone(),
            kmax: fp8.kmax.clone(),
            k_tokens: Vec::new(),
            v_tokens: Vec::new(),
        }
    };
    let twice_v = with(1.0, 2.0);
    let dec_v = PagedDecode::new(&twice_v.cache, hq, q_len, &opts).unwrap();
    let (out_v, lse_v) = decode_cpu(&dec_v, &twice_v, &q);
    for (a, b) in out_v.iter().zip(&out) {
        // Exact doubling in f32; f16's rounding commutes with it above its subnormals.
        let (a, b) = (a.to_f32(), 2.0 * b.to_f32());
        assert!(a == b || (b.abs() < 2f32.powi(-13) && (a - b).abs() <= 2f32.powi(-24)));
    }
    assert_eq!(lse_v, lse);
    let twice_k = with(2.0, 1.0);
    let dec_k = PagedDecode::new(&twice_k.cache, hq, q_len, &opts).unwrap();
    let opts2 = opts.with_scale(2.0 / (d as f32).sqrt());
    let dec_s = PagedDecode::new(&fp8.cache, hq, q_len, &opts2).unwrap();
    let (out_k, lse_k) = decode_cpu(&dec_k, &twice_k, &q);
    let (out_s, lse_s) = decode_cpu(&dec_s, &fp8, &q);
    assert!(
        out_k
            .iter()
            .zip(&out_s)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    assert!(
        lse_k
            .iter()
            .zip(&lse_s)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    assert!(
        rel_l2(&to_f64(&out_k), &to_f64(&out)) > 1e-3,
        "k scale had no effect"
    );
}

#[test]
fn fp8_quest_selection_equals_brute_force_on_scaled_bounds() {
    let seqlens = [1usize, 40, 300, 517];
    for ps in [1, 16, 64] {
        let (hkv, hq, d) = (2, 8, 16);
        let seed = 70 + ps as u64;
        let sc = scenario_with::<f16, F8E4M3>(&seqlens, ps, hkv, d, seed, Some(scales(hkv, seed)));
        for q_len in [1, 4] {
            let mut r = rng(seed + q_len as u64);
            let q: Vec<f16> = random_vec(&mut r, seqlens.len() * q_len * hq * d);
            let dec = PagedDecode::new(&sc.cache, hq, q_len, &AttentionOptions::causal())
                .unwrap()
                .with_policy(quest_policy(hkv, 4 * ps, 1))
                .unwrap();
            let qs = || Strided::new(&q[..], q_strides(q_len, hq, d));
            let sel = dec.select_cpu(qs(), sc.meta()).unwrap();
            let ref_scores = quest_scores_f64(&dec, qs(), sc.meta()).unwrap();
            let mp = sc.cache.max_pages_per_seq();
            for b in 0..seqlens.len() {
                for kvh in 0..hkv {
                    let row = (b * hkv + kvh) * mp;
                    let scores = &ref_scores[row..row + mp];
                    let want = quest_select_brute(&dec, b, scores);
                    let what = format!("ps {ps} q_len {q_len} b {b} kvh {kvh}");
                    assert_eq!(sel.pages.get(b, kvh).unwrap(), &want[..], "{what}");
                    for &p in &want {
                        let (g, w) = (sel.scores[row + p as usize] as f64, scores[p as usize]);
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{what}: {g} vs {w}"
                        );
                    }
                }
            }
            // Quest decode over the FP8 cache equals the reference over the selected pages.
            let (want, _) = decode_reference(&dec, &sc, &q, Some(&sel.pages));
            let (out, _) = decode_cpu(&dec, &sc, &q);
            let err = rel_l2(&to_f64(&out), &want);
            assert!(
                err < 2e-3,
                "ps {ps} q_len {q_len}: quest decode rel L2 {err}"
            );
        }
    }
}

#[test]
fn fp8_paged_prefill_equals_the_reference_of_the_dequantized_cache() {
    for ps in [1, 16, 64] {
        for q_len in [1, 7, 64] {
            let (hkv, hq, d) = (2, 6, 24);
            let seqlens = [q_len, q_len + 90, q_len + 5];
            let seed = 90 + ps as u64 + q_len as u64;
            let sc =
                scenario_with::<f16, F8E4M3>(&seqlens, ps, hkv, d, seed, Some(scales(hkv, seed)));
            let mut r = rng(seed);
            let q: Vec<f16> = random_vec(&mut r, seqlens.len() * q_len * hq * d);
            let st = q_strides(q_len, hq, d);
            for (name, opts) in masks() {
                let pf = PagedPrefill::new(&sc.cache, hq, q_len, &opts).unwrap();
                let mut out = vec![f16::from_f32(f32::NAN); pf.out_len()];
                let mut lse = vec![f32::NAN; pf.lse_len()];
                pf.forward_cpu(
                    Strided::new(&q[..], st),
                    sc.kv(),
                    Strided::new(&mut out[..], st),
                    Some(&mut lse[..]),
                )
                .unwrap();
                let (want, want_lse) =
                    paged_prefill_f64(&pf, Strided::new(&q[..], st), sc.kv()).unwrap();
                let what = format!("ps {ps} q_len {q_len} {name}");
                let err = rel_l2(&to_f64(&out), &want);
                assert!(err < 2e-3, "{what}: rel L2 {err}");
                check_lse(&lse, &want_lse, 1e-4, &what);
            }
        }
    }
}

/// A cache of one page of `page_size` slots (one kv head, head_dim 8) holding `tokens` tokens of
/// one sequence.
fn one_page_cache(page_size: usize, tokens: i32) -> longattn::PagedCache {
    let layout = longattn::PagedLayout {
        num_pages: 1,
        page_size,
        heads_kv: 1,
        head_dim: 8,
    };
    let table = longattn::PageTable {
        block_table: &[0],
        max_pages_per_seq: 1,
        seqlens_k: &[tokens],
    };
    longattn::PagedCache::new(layout, table).unwrap()
}

/// A channel whose keys in a page are all NaN: bounds (+inf, -inf) as the kernels and the
/// reference fold them (+-448 in e4m3), not NaN; a NaN among numbers is skipped (fmin).
#[test]
fn nan_keys_leave_the_bounds_of_the_others() {
    fn case<C: Element + PartialEq>() {
        let cache = one_page_cache(4, 3);
        // Channel 0 all NaN; channel 1 NaN in the first token only; others numbers.
        let mut k = [f16::from_f32(0.25); 3 * 8];
        for t in 0..3 {
            k[t * 8] = f16::NAN;
            k[t * 8 + 2] = f16::from_f32(t as f32 - 1.0);
        }
        k[1] = f16::NAN;
        let (mut kc, mut vc) = (vec![C::default(); 32], vec![C::default(); 32]);
        let (mut lo, mut hi) = (vec![C::default(); 8], vec![C::default(); 8]);
        let st = longattn::Strides::contiguous(1, 1, 8);
        cache
            .append_cpu(
                &[0, 3],
                Strided::new(&k[..], st),
                Strided::new(&k[..], st),
                longattn::KvPages {
                    k: &mut kc[..],
                    v: &mut vc[..],
                },
                Some(longattn::PageMeta {
                    kmin: &mut lo[..],
                    kmax: &mut hi[..],
                }),
            )
            .unwrap();
        let (_, _, want_lo, want_hi) = page_bounds(&cache, &kc).remove(0);
        assert!(
            lo == want_lo && hi == want_hi,
            "{:?}: {lo:?} {hi:?}",
            C::DTYPE
        );
        assert!(
            !lo[0].to_f32().is_nan() && lo[0].to_f32() > 0.0,
            "{:?}",
            C::DTYPE
        );
        assert_eq!((lo[1].to_f32(), hi[1].to_f32()), (0.25, 0.25));
        assert_eq!((lo[2].to_f32(), hi[2].to_f32()), (-1.0, 1.0));
    }
    case::<f32>();
    case::<f16>();
    case::<F8E4M3>();
}

#[test]
fn kv_scales_are_validated() {
    for (k, v) in [
        (vec![], vec![]),
        (vec![1.0], vec![1.0, 1.0]),
        (vec![0.0], vec![1.0]),
        (vec![1.0], vec![-1.0]),
        (vec![f32::NAN], vec![1.0]),
        (vec![1.0], vec![f32::INFINITY]),
    ] {
        assert!(KvScales::new(k.clone(), v.clone()).is_err(), "{k:?} {v:?}");
    }
    assert!(KvScales::uniform(usize::MAX, 1.0, 1.0).is_err());
    let sc = scenario::<f16>(&[5, 9], 4, 2, 8, 1);
    // One scale per kv head.
    let three = KvScales::uniform(3, 1.0, 1.0).unwrap();
    assert!(matches!(
        sc.cache.clone().with_kv_scales(three),
        Err(Error::Shape(_))
    ));
    // Scales describe an FP8 cache: an f16 cache refuses them when it is read or written.
    let scaled = sc
        .cache
        .clone()
        .with_kv_scales(KvScales::uniform(2, 0.5, 0.5).unwrap())
        .unwrap();
    let dec = PagedDecode::new(&scaled, 2, 1, &AttentionOptions::causal()).unwrap();
    let q = vec![f16::from_f32(0.1); 2 * 2 * 8];
    let mut out = q.clone();
    let r = dec.forward_cpu(
        Strided::new(&q[..], q_strides(1, 2, 8)),
        sc.kv(),
        None,
        Strided::new(&mut out[..], q_strides(1, 2, 8)),
        None,
    );
    assert!(matches!(r, Err(Error::InvalidOption(_))), "{r:?}");
    // Without scales an FP8 cache reads its values as they are (scale 1).
    let raw = scenario_with::<f16, F8E4M3>(&[5, 9], 4, 2, 8, 1, None);
    let dec = PagedDecode::new(&raw.cache, 2, 1, &AttentionOptions::causal()).unwrap();
    let (want, _) = decode_reference(&dec, &raw, &q, None);
    let (got, _) = decode_cpu(&dec, &raw, &q);
    assert!(rel_l2(&to_f64(&got), &want) < 2e-3);
}

/// A NaN keeps its sign when appended (docs/semantics.md: `F8E4M3::from_f32` of the
/// quotient): 0x7f for +NaN, 0xff for -NaN, from f16 and bf16 rows, whatever the scale. The
/// FP8 append kernel stores the same bits (`gpu_fp8_append_matches_cpu`), which the device's
/// division and conversion alone would not: both give the canonical NaN, 0x7f.
#[test]
fn fp8_append_keeps_the_sign_of_nan() {
    fn case<T: Element>() {
        let cache = one_page_cache(2, 2)
            .with_kv_scales(KvScales::uniform(1, 0.01, 3.0).unwrap())
            .unwrap();
        let (pos, neg) = (T::from_f32(f32::NAN), T::from_f32(-f32::NAN));
        let k: Vec<T> = (0..16)
            .map(|i| if i % 3 == 0 { neg } else { pos })
            .collect();
        let v: Vec<T> = (0..16)
            .map(|i| if i % 3 == 0 { pos } else { neg })
            .collect();
        let (mut kc, mut vc) = (vec![F8E4M3::default(); 16], vec![F8E4M3::default(); 16]);
        let st = longattn::Strides::contiguous(1, 1, 8);
        cache
            .append_cpu(
                &[0, 2],
                Strided::new(&k[..], st),
                Strided::new(&v[..], st),
                longattn::KvPages {
                    k: &mut kc[..],
                    v: &mut vc[..],
                },
                None,
            )
            .unwrap();
        for i in 0..16 {
            let want = |neg_in: bool| if neg_in { 0xff } else { 0x7f };
            assert_eq!(kc[i].to_bits(), want(i % 3 == 0), "{:?} k {i}", T::DTYPE);
            assert_eq!(vc[i].to_bits(), want(i % 3 != 0), "{:?} v {i}", T::DTYPE);
        }
    }
    case::<f16>();
    case::<longattn::bf16>();
}

/// The append kernel's NaN-sign fix (`e4m3x8_nan_signs`, kernels/paged_append.cu) restated:
/// 4 code bytes and the two 32-bit words of their 16-bit sources; every NaN code (low 7 bits
/// set) takes the sign bit (bit 15) of its source, other codes are kept. Checked against the
/// per-value rule for every code in every byte position, both source signs, and NaN codes
/// next to each other (a carry across bytes would show there).
#[test]
fn fp8_nan_sign_fix_model_matches_the_per_value_rule() {
    fn fix4(codes: u32, lo: u32, hi: u32) -> u32 {
        let signs = ((lo >> 8) & 0x80)
            | ((lo >> 16) & 0x8000)
            | ((hi << 8) & 0x80_0000)
            | (hi & 0x8000_0000);
        let nan = ((codes & 0x7f7f_7f7f) + 0x0101_0101) & 0x8080_8080;
        (codes & !nan) | (signs & nan)
    }
    fn rule(codes: u32, lo: u32, hi: u32) -> u32 {
        (0..4)
            .map(|x| {
                let c = (codes >> (8 * x)) & 0xff;
                let src = if x < 2 { lo } else { hi } >> (16 * (x % 2));
                let sign = (src >> 15) & 1;
                let c = if c & 0x7f == 0x7f {
                    0x7f | (sign << 7)
                } else {
                    c
                };
                c << (8 * x)
            })
            .sum()
    }
    let fillers = [0x00u32, 0x7f, 0xff, 0x80, 0x7e, 0xfe, 0x01];
    for pos in 0..4 {
        for code in 0..=255u32 {
            for &other in &fillers {
                let codes = (0..4)
                    .map(|x| (if x == pos { code } else { other }) << (8 * x))
                    .sum::<u32>();
                for signs in 0..16u32 {
                    let half = |x: u32| {
                        if signs >> x & 1 == 1 {
                            0xfe01u32
                        } else {
                            0x7e01
                        }
                    };
                    let lo = half(0) | half(1) << 16;
                    let hi = half(2) | half(3) << 16;
                    assert_eq!(
                        fix4(codes, lo, hi),
                        rule(codes, lo, hi),
                        "{codes:#x} {signs:#b}"
                    );
                }
            }
        }
    }
}

/// The branch-free e4m3 -> f16x2 conversion of the kernels' sm_80 build
/// (`e4m3x2_to_f16x2_bits_sw`, kernels/include/longattn/fp8.cuh; sm_89+ use the cvt
/// instruction) restated: the sign to bit 15 and the 7 other bits to bits 7-13 of each half,
/// read as f16 (the e4m3 value / 2^8, subnormals included), times 2^8 (0x5c00, exact), the NaN
/// codes replaced by 0x7fff. Every pair of the 256 codes gives the f16 of the CPU decoding
/// (`F8E4M3::to_f32`): subnormals, the sign of zero, 448, and NaN for 0x7f and 0xff; and the
/// bits above the pair are ignored.
#[test]
fn e4m3_to_f16_sm80_model_matches_the_cpu_decoding() {
    fn sw(x2: u32) -> u32 {
        let lanes = (x2 & 0xff) | ((x2 & 0xff00) << 8);
        let mag = lanes & 0x007f_007f;
        let bits = (mag << 7) | ((lanes & 0x0080_0080) << 8);
        let scale = f16::from_bits(0x5c00);
        let half = |b: u32| (f16::from_bits(b as u16) * scale).to_bits() as u32;
        let v = half(bits & 0xffff) | (half(bits >> 16) << 16);
        let nan = (((mag + 0x0001_0001) & 0x0080_0080) >> 7) * 0xffff;
        (v & !nan) | (0x7fff_7fff & nan)
    }
    let want = |c: u32| {
        let x = F8E4M3::from_bits(c as u8).to_f32();
        if x.is_nan() {
            0x7fff
        } else {
            u32::from(f16::from_f32(x).to_bits())
        }
    };
    assert_eq!(f16::from_bits(0x5c00).to_f32(), 256.0);
    for lo in 0..256u32 {
        for hi in 0..256u32 {
            let got = sw(0xa5c3_0000 | (hi << 8) | lo);
            assert_eq!(got & 0xffff, want(lo), "code {lo:#x}");
            assert_eq!(got >> 16, want(hi), "code {hi:#x}");
        }
    }
}
