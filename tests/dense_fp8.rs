//! The FP8 (e4m3) dense forward (docs/semantics.md, "FP8 dense forward"): the CPU path and the
//! Hopper kernel against the f64 reference of the same quantisation (tight: they measure the
//! code, not the format), the error against plain f64 attention over the dequantised inputs
//! printed and loosely bounded (the format's error), the 128-key tile rule, NaN codes and
//! the descale checks. GPU tests print `SKIP (no GPU)` without one; with
//! `LONGATTN_REQUIRE_GPU=1` a missing GPU fails instead.

mod common;

use common::*;
use longattn::reference::{Fp8PRule, dense_fp8_attention_f64};
use longattn::*;
use rand::Rng;

/// One FP8 problem: shape, options, host codes (q, k, v with their strides: q's are out's
/// too) and descales `[batch, heads_kv]`.
struct Fp8Case {
    name: String,
    attn: FlashAttention,
    q: Vec<F8E4M3>,
    k: Vec<F8E4M3>,
    v: Vec<F8E4M3>,
    qs: Strides,
    ks: Strides,
    descales: [Vec<f32>; 3],
}

/// Codes of values uniform in `[-amp, amp)`, rounded to e4m3.
fn codes(r: &mut rand::rngs::SmallRng, n: usize, amp: f32) -> Vec<F8E4M3> {
    (0..n)
        .map(|_| F8E4M3::from_f32(r.random_range(-amp..amp)))
        .collect()
}

/// `lens`: `None` for fixed lengths `(b, sq, sk)`, else varlen `(q_len, k_len)` per sequence.
/// `head_pad` extra heads of stride in every tensor (non-contiguous strides when > 0).
#[allow(clippy::too_many_arguments)]
fn case(
    name: &str,
    (b, sq, sk): (usize, usize, usize),
    lens: Option<&[(usize, usize)]>,
    (hq, hkv, d): (usize, usize, usize),
    opts: AttentionOptions,
    head_pad: usize,
    seed: u64,
) -> Fp8Case {
    let mut r = rng(seed);
    let (cq, ck);
    let (shape, rows_q, rows_k, batch_dim) = match lens {
        None => (
            AttentionShape {
                batch: b,
                heads_q: hq,
                heads_kv: hkv,
                head_dim: d,
                seqlens: SeqLens::Fixed {
                    seqlen_q: sq,
                    seqlen_k: sk,
                },
            },
            sq,
            sk,
            b,
        ),
        Some(lens) => {
            cq = cu_seqlens(&lens.iter().map(|l| l.0).collect::<Vec<_>>());
            ck = cu_seqlens(&lens.iter().map(|l| l.1).collect::<Vec<_>>());
            (
                AttentionShape {
                    batch: lens.len(),
                    heads_q: hq,
                    heads_kv: hkv,
                    head_dim: d,
                    seqlens: SeqLens::Varlen {
                        cu_seqlens_q: &cq,
                        cu_seqlens_k: &ck,
                    },
                },
                *cq.last().unwrap() as usize,
                *ck.last().unwrap() as usize,
                1,
            )
        }
    };
    let attn = FlashAttention::new(&shape, &opts).unwrap();
    let strides = |rows: usize, heads: usize| {
        let s = Strides::contiguous(rows, heads + head_pad, d);
        if lens.is_some() {
            Strides { batch: 0, ..s }
        } else {
            s
        }
    };
    let (qs, ks) = (strides(rows_q, hq), strides(rows_k, hkv));
    let n = |rows: usize, heads: usize| batch_dim * rows * (heads + head_pad) * d;
    let batch = shape.batch;
    let mut descale = |lo: f32, hi: f32| -> Vec<f32> {
        (0..batch * hkv).map(|_| r.random_range(lo..hi)).collect()
    };
    let descales = [descale(0.1, 0.4), descale(0.1, 0.4), descale(0.5, 2.0)];
    Fp8Case {
        name: name.into(),
        q: codes(&mut r, n(rows_q, hq), 8.0),
        k: codes(&mut r, n(rows_k, hkv), 8.0),
        v: codes(&mut r, n(rows_k, hkv), 1.0),
        attn,
        qs,
        ks,
        descales,
    }
}

impl Fp8Case {
    fn descales(&self) -> Fp8Descales<&[f32]> {
        Fp8Descales {
            q: &self.descales[0],
            k: &self.descales[1],
            v: &self.descales[2],
        }
    }
    /// The f64 reference under `rule`, output in q's layout (strided like q and out).
    fn reference(&self, rule: Fp8PRule) -> (Vec<f64>, Vec<f64>) {
        let (o, lse) = dense_fp8_attention_f64(
            &self.attn,
            Strided::new(&self.q, self.qs),
            Strided::new(&self.k, self.ks),
            Strided::new(&self.v, self.ks),
            self.descales(),
            rule,
        )
        .unwrap();
        (self.restride(&o), lse)
    }
    /// A contiguous `[rows, heads_q, d]` reference output placed in q's (strided) layout,
    /// padding heads 0 (the poisoned outputs' padding is compared only where written).
    fn restride(&self, o: &[f64]) -> Vec<f64> {
        let (hq, d) = (self.attn.heads_q(), self.attn.head_dim());
        let mut out = vec![0.0; self.q.len()];
        for (row, chunk) in o.chunks_exact(hq * d).enumerate() {
            let (b, i) = if self.attn.is_varlen() {
                (0, row)
            } else {
                (
                    row / self.attn.max_seqlen_q(),
                    row % self.attn.max_seqlen_q(),
                )
            };
            for h in 0..hq {
                let at = (b as i64 * self.qs.batch
                    + i as i64 * self.qs.seq
                    + h as i64 * self.qs.head) as usize;
                out[at..at + d].copy_from_slice(&chunk[h * d..(h + 1) * d]);
            }
        }
        out
    }
    /// The CPU path into outputs poisoned with NaN (padding heads then hold NaN: zeroed).
    fn cpu<O: Element>(&self) -> Result<(Vec<f64>, Vec<f32>)> {
        let mut out = vec![O::from_f32(f32::NAN); self.q.len()];
        let mut lse = vec![f32::NAN; self.attn.lse_len()];
        self.attn.forward_cpu_fp8(
            Strided::new(&self.q, self.qs),
            Strided::new(&self.k, self.ks),
            Strided::new(&self.v, self.ks),
            self.descales(),
            Strided::new(&mut out, self.qs),
            Some(&mut lse),
        )?;
        Ok((self.written(&to_f64(&out)), lse))
    }
    /// `out` with the elements no head writes (padding heads) set to 0, as in `restride`.
    fn written(&self, out: &[f64]) -> Vec<f64> {
        let mut mask = vec![false; out.len()];
        let ones = vec![1.0; self.attn.out_len()];
        for (m, x) in mask.iter_mut().zip(self.restride(&ones)) {
            *m = x == 1.0;
        }
        out.iter()
            .zip(mask)
            .map(|(&x, m)| if m { x } else { 0.0 })
            .collect()
    }
}

/// Shapes of the sweep: 1, 2, odd, not multiples of 128, seqlen_q != seqlen_k, GQA, varlen,
/// strided heads, every mask (causal, windows, sinks, softcap) and fully masked rows.
fn sweep(d: usize) -> Vec<Fp8Case> {
    let full = AttentionOptions::default();
    let causal = AttentionOptions::causal();
    let window = AttentionOptions::causal().with_window(Window::new(Some(100), Some(0)));
    let sinks = window.with_sinks(5);
    let two_sided = AttentionOptions::default().with_window(Window::new(Some(70), Some(130)));
    let softcap = AttentionOptions::causal().with_softcap(20.0);
    vec![
        case("1x1", (1, 1, 1), None, (1, 1, d), full, 0, 1),
        case("2x2", (2, 2, 2), None, (2, 1, d), causal, 0, 2),
        case("odd", (1, 37, 301), None, (3, 3, d), full, 0, 3),
        case(
            "causal_sq_lt_sk",
            (2, 129, 385),
            None,
            (4, 2, d),
            causal,
            0,
            4,
        ),
        // seqlen_q > seqlen_k with a causal mask: the first 200 rows see nothing.
        case("masked_rows", (1, 457, 257), None, (2, 1, d), causal, 0, 5),
        case("window", (1, 333, 333), None, (4, 1, d), window, 1, 6),
        case("sinks", (1, 300, 555), None, (2, 2, d), sinks, 0, 7),
        case("two_sided", (2, 200, 260), None, (2, 2, d), two_sided, 0, 8),
        case("softcap", (1, 140, 270), None, (6, 2, d), softcap, 2, 9),
        case(
            "varlen",
            (0, 0, 0),
            Some(&[(1, 1), (130, 300), (0, 5), (257, 129), (64, 0)]),
            (4, 2, d),
            causal,
            0,
            10,
        ),
        case(
            "varlen_full",
            (0, 0, 0),
            Some(&[(3, 700), (200, 200)]),
            (2, 2, d),
            full,
            1,
            11,
        ),
    ]
}

/// Empty rows (no visible key) are exactly 0 with LSE -inf; the others match within `tol`.
fn check_against(
    c: &Fp8Case,
    (got, lse): (&[f64], &[f32]),
    want: &(Vec<f64>, Vec<f64>),
    tol: f64,
    what: &str,
) -> f64 {
    let err = rel_l2(got, &want.0);
    assert!(err <= tol, "{what} {}: rel L2 {err:e} > {tol:e}", c.name);
    check_lse(lse, &want.1, 2e-3, &format!("{what} {}", c.name));
    err
}

/// The CPU path equals the reference of the same quantisation (bf16 and f16 output; the
/// output rounding and the rare p8 that f32 and f64 round to neighbouring codes are the only
/// differences); the error of the format against unquantised attention is reported.
#[test]
fn cpu_matches_reference_sweep() {
    for d in [64, 96, 128] {
        for c in sweep(d) {
            let want = c.reference(Fp8PRule::TileRunningMax);
            let plain = c.reference(Fp8PRule::Unquantised);
            let (bf, bf_lse) = c.cpu::<bf16>().unwrap();
            let e_bf = check_against(&c, (&bf, &bf_lse), &want, 3e-3, "cpu bf16");
            let (hf, hf_lse) = c.cpu::<f16>().unwrap();
            // f16 output: 2-2.7e-4 except where a score lands within f32 rounding of an e4m3
            // boundary and flips one P code (a 1/16 step): 5.7e-4 measured at d96 softcap.
            let e_hf = check_against(&c, (&hf, &hf_lse), &want, 1e-3, "cpu f16");
            // The format's error: P in e4m3 (3 mantissa bits); loosely bounded.
            let e_plain = rel_l2(&want.0, &plain.0);
            assert!(e_plain < 0.08, "{} d{d}: format error {e_plain:e}", c.name);
            check_lse(&hf_lse, &plain.1, 1e-3, &c.name); // LSE uses the unquantised p
            println!(
                "{:>16} d{d}: cpu vs ref bf16 {e_bf:.2e} f16 {e_hf:.2e}; ref vs unquantised \
                 {e_plain:.2e}",
                c.name
            );
        }
    }
}

/// Rows with no visible key give exactly 0 and -inf on the CPU path.
#[test]
fn fully_masked_rows_are_zero() {
    let c = &sweep(64)[4];
    let (out, lse) = c.cpu::<bf16>().unwrap();
    let (hq, d) = (2, 64);
    for i in 0..200 {
        for h in 0..hq {
            let at = (i as i64 * c.qs.seq + h as i64 * c.qs.head) as usize;
            assert!(
                out[at..at + d].iter().all(|&x| x == 0.0),
                "row {i} head {h}"
            );
            assert_eq!(lse[h * 457 + i], f32::NEG_INFINITY);
        }
    }
}

/// The 128-key tile rule is what the CPU path implements: quantising against the row's final
/// max instead gives a measurably different result, and the CPU path is far closer to the
/// definition than to it.
#[test]
fn tile_rule_matters() {
    let c = case(
        "tiles",
        (1, 64, 1024),
        None,
        (2, 1, 128),
        AttentionOptions::default(),
        0,
        21,
    );
    let running = c.reference(Fp8PRule::TileRunningMax);
    let final_max = c.reference(Fp8PRule::FinalMax);
    let rules_apart = rel_l2(&running.0, &final_max.0);
    let (cpu, _) = c.cpu::<f16>().unwrap();
    let to_running = rel_l2(&cpu, &running.0);
    let to_final = rel_l2(&cpu, &final_max.0);
    println!(
        "rules apart {rules_apart:.2e}; cpu to running {to_running:.2e}, to final {to_final:.2e}"
    );
    assert!(
        rules_apart > 2e-3,
        "the tile rule changed nothing: {rules_apart:e}"
    );
    assert!(
        to_running * 4.0 < to_final,
        "{to_running:e} vs {to_final:e}"
    );
}

/// The NaN case: causal, 20 query rows over 40 keys; a NaN code in q row 3, in key 30
/// (visible to rows >= 10) and in channel 7 of value 2 (visible to every row).
fn nan_case(d: usize) -> Fp8Case {
    let nan = F8E4M3::from_bits(0x7f);
    let mut c = case(
        "nan",
        (1, 20, 40),
        None,
        (1, 1, d),
        AttentionOptions::causal(),
        0,
        31,
    );
    c.q[3 * d + 5] = nan;
    c.k[30 * d + 1] = F8E4M3::from_bits(0xff);
    c.v[2 * d + 7] = nan;
    c
}

/// The NaN policy on [`nan_case`]: rows 3 and 10.. are NaN (output and LSE), channel 7 is NaN
/// in every row, nothing else is.
fn check_nan_pattern(d: usize, out: &[f64], lse: &[f64], what: &str) {
    for i in 0..20 {
        let row_nan = i == 3 || i >= 10;
        assert_eq!(lse[i].is_nan(), row_nan, "{what}: lse row {i}");
        for (ch, x) in out[i * d..(i + 1) * d].iter().enumerate() {
            assert_eq!(
                x.is_nan(),
                row_nan || ch == 7,
                "{what}: row {i} channel {ch}"
            );
        }
    }
}

/// NaN codes follow the NaN policy: a NaN in q or in a visible key makes the row NaN (output
/// and LSE), a NaN in a visible value makes that channel NaN; the reference agrees.
#[test]
fn nan_codes() {
    let c = nan_case(64);
    let (out, lse) = c.cpu::<bf16>().unwrap();
    let lse: Vec<f64> = lse.iter().map(|&x| x as f64).collect();
    check_nan_pattern(64, &out, &lse, "cpu");
    let (want, want_lse) = c.reference(Fp8PRule::TileRunningMax);
    check_nan_pattern(64, &want, &want_lse, "reference");
}

/// Bad descales are named errors before anything is written: wrong lengths (`Shape`),
/// non-finite, non-positive or too large values (`InvalidOption`), f32 output
/// (`Unsupported`); the poisoned output stays untouched.
#[test]
fn bad_descales_are_errors() {
    let c = case(
        "bad",
        (2, 5, 7),
        None,
        (4, 2, 64),
        AttentionOptions::default(),
        0,
        41,
    );
    let run = |d: [&[f32]; 3]| {
        let mut out = vec![bf16::from_f32(f32::NAN); c.q.len()];
        let res = c.attn.forward_cpu_fp8(
            Strided::new(&c.q, c.qs),
            Strided::new(&c.k, c.ks),
            Strided::new(&c.v, c.ks),
            Fp8Descales {
                q: d[0],
                k: d[1],
                v: d[2],
            },
            Strided::new(&mut out, c.qs),
            None,
        );
        if res.is_err() {
            assert!(out.iter().all(|x| x.is_nan()), "output written on error");
        }
        res
    };
    let good = [1.0f32; 4];
    assert!(run([&good, &good, &good]).is_ok());
    for bad_len in [&[1.0f32; 3][..], &[1.0; 5], &[]] {
        for slot in 0..3 {
            let mut d: [&[f32]; 3] = [&good, &good, &good];
            d[slot] = bad_len;
            let e = run(d).unwrap_err();
            assert!(
                matches!(&e, Error::Shape(m) if m.contains("descale")),
                "{e:?}"
            );
        }
    }
    let too_big = FP8_MAX_DESCALE * 2.0;
    for x in [
        0.0,
        -1.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        too_big,
        -0.0,
    ] {
        for slot in 0..3 {
            let mut vals = [[1.0f32; 4]; 3];
            vals[slot][2] = x;
            let e = run([&vals[0], &vals[1], &vals[2]]).unwrap_err();
            assert!(
                matches!(&e, Error::InvalidOption(m) if m.contains("descale")),
                "{x}: {e:?}"
            );
        }
    }
    // The largest accepted descale passes; the output type must be 16-bit.
    let max = [FP8_MAX_DESCALE; 4];
    assert!(run([&max, &good, &good]).is_ok());
    let mut out32 = vec![0.0f32; c.q.len()];
    let e = c
        .attn
        .forward_cpu_fp8(
            Strided::new(&c.q, c.qs),
            Strided::new(&c.k, c.ks),
            Strided::new(&c.v, c.ks),
            Fp8Descales {
                q: &good,
                k: &good,
                v: &good,
            },
            Strided::new(&mut out32, c.qs),
            None,
        )
        .unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
}

/// Uploads the case, runs the GPU FP8 kernel into NaN-poisoned output and LSE buffers and
/// returns them (output as f64, unwritten padding heads zeroed), or the call's error.
fn gpu_fp8<O: Element + longattn::cudarc::driver::DeviceRepr>(
    stream: &std::sync::Arc<longattn::cudarc::driver::CudaStream>,
    c: &Fp8Case,
) -> Result<(Vec<f64>, Vec<f32>)> {
    let up = |x: &[F8E4M3]| stream.clone_htod(x).unwrap();
    let (dq, dk, dv) = (up(&c.q), up(&c.k), up(&c.v));
    let [qd, kd, vd] = c.descales.clone().map(|d| stream.clone_htod(&d).unwrap());
    let mut dout = stream
        .clone_htod(&vec![O::from_f32(f32::NAN); c.q.len()])
        .unwrap();
    let mut dlse = stream
        .clone_htod(&vec![f32::NAN; c.attn.lse_len()])
        .unwrap();
    c.attn.forward_gpu_fp8(
        stream,
        Strided::new(&dq, c.qs),
        Strided::new(&dk, c.ks),
        Strided::new(&dv, c.ks),
        Fp8Descales {
            q: &qd,
            k: &kd,
            v: &vd,
        },
        Strided::new(&mut dout, c.qs),
        Some(&mut dlse),
    )?;
    let out = stream.clone_dtoh(&dout).unwrap();
    let lse = stream.clone_dtoh(&dlse).unwrap();
    Ok((c.written(&to_f64(&out)), lse))
}

/// The Hopper FP8 kernel against the f64 reference of the same quantisation over the sweep
/// (plus longer sequences, several query tiles, GQA) at head_dim 128, bf16 and f16 output,
/// NaN-poisoned outputs and LSE; the error against unquantised attention is printed. Off
/// Hopper the call must be a named `Unsupported`.
#[test]
fn gpu_fp8_matches_reference() {
    let Some(stream) = gpu_stream_or_skip("gpu_fp8_matches_reference") else {
        return;
    };
    let mut cases = sweep(128);
    let causal = AttentionOptions::causal();
    cases.push(case(
        "long_causal",
        (2, 1000, 1500),
        None,
        (8, 2, 128),
        causal,
        0,
        51,
    ));
    let full = AttentionOptions::default();
    cases.push(case(
        "long_full",
        (1, 700, 2100),
        None,
        (2, 2, 128),
        full,
        1,
        52,
    ));
    check_gpu_fp8(&stream, &cases, "gpu_fp8_matches_reference");
}

/// The other instantiations (64 and 256 channels) and padded head dims (96 -> 128, 192 ->
/// 256: channels past head_dim zero-filled by the copy engine, never written) over the same
/// sweep, plus a longer causal case at 64 and 256, as `gpu_fp8_matches_reference`. (Not
/// under memcheck in the device script, which runs the `gpu_fp8` tests: the NaN test covers
/// the 64- and 256-channel kernels there.)
#[test]
fn gpu_padded_fp8_head_dims_match_reference() {
    let Some(stream) = gpu_stream_or_skip("gpu_padded_fp8_head_dims_match_reference") else {
        return;
    };
    let mut cases: Vec<Fp8Case> = [64, 96, 192, 256].into_iter().flat_map(sweep).collect();
    for (d, seed) in [(64, 53), (256, 54)] {
        cases.push(case(
            "long_causal",
            (1, 700, 1100),
            None,
            (4, 2, d),
            AttentionOptions::causal(),
            0,
            seed,
        ));
    }
    check_gpu_fp8(&stream, &cases, "gpu_padded_fp8_head_dims_match_reference");
}

/// Every case on the GPU against the f64 reference of the same quantisation (bf16 and f16
/// output); off Hopper the first call must be a named `Unsupported`.
fn check_gpu_fp8(
    stream: &std::sync::Arc<longattn::cudarc::driver::CudaStream>,
    cases: &[Fp8Case],
    test: &str,
) {
    if !is_hopper() {
        let e = gpu_fp8::<bf16>(stream, &cases[2]).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
        println!("SKIP {test}: not compute capability 9.0 (refused: {e})");
        return;
    }
    for c in cases {
        let want = c.reference(Fp8PRule::TileRunningMax);
        let plain = c.reference(Fp8PRule::Unquantised);
        let (bf, bf_lse) = gpu_fp8::<bf16>(stream, c).unwrap();
        let e_bf = check_against(c, (&bf, &bf_lse), &want, 1e-2, "gpu bf16");
        let (hf, hf_lse) = gpu_fp8::<f16>(stream, c).unwrap();
        let e_hf = check_against(c, (&hf, &hf_lse), &want, 5e-3, "gpu f16");
        println!(
            "{:>16} d{}: gpu vs ref bf16 {e_bf:.2e} f16 {e_hf:.2e}; gpu f16 vs unquantised \
             {:.2e}",
            c.name,
            c.attn.head_dim(),
            rel_l2(&hf, &plain.0)
        );
    }
}

/// The GPU entry's refusals, before any pointer is touched: head dims that are not
/// multiples of 16 (`Unsupported`), descale lengths (`Shape`), f32 output (`Unsupported`).
#[test]
fn gpu_fp8_refusals() {
    let Some(stream) = gpu_stream_or_skip("gpu_fp8_refusals") else {
        return;
    };
    let d72 = case(
        "d72",
        (1, 5, 7),
        None,
        (2, 1, 72),
        AttentionOptions::default(),
        0,
        61,
    );
    let e = gpu_fp8::<bf16>(&stream, &d72).unwrap_err();
    assert!(
        matches!(&e, Error::Unsupported(m) if m.contains("multiples of 16")),
        "{e:?}"
    );
    let mut short = case(
        "short",
        (2, 5, 7),
        None,
        (2, 1, 128),
        AttentionOptions::default(),
        0,
        62,
    );
    short.descales[1].pop();
    let e = gpu_fp8::<f16>(&stream, &short).unwrap_err();
    assert!(
        matches!(&e, Error::Shape(m) if m.contains("k_descale")),
        "{e:?}"
    );
    short.descales[1].push(1.0);
    let e = gpu_fp8::<f32>(&stream, &short).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
}

/// NaN codes on the GPU kernel: the same pattern as the CPU path (the NaN key is masked, not
/// just multiplied by 0, for the rows that do not see it).
#[test]
fn gpu_fp8_nan_codes() {
    let Some(ctx) = gpu_or_skip("gpu_fp8_nan_codes") else {
        return;
    };
    if !is_hopper() {
        println!("SKIP gpu_fp8_nan_codes: not compute capability 9.0");
        return;
    }
    for d in [64, 128, 256] {
        let c = nan_case(d);
        let (out, lse) = gpu_fp8::<bf16>(&ctx.default_stream(), &c).unwrap();
        let lse: Vec<f64> = lse.iter().map(|&x| x as f64).collect();
        check_nan_pattern(d, &out, &lse, &format!("gpu d{d}"));
    }
}
