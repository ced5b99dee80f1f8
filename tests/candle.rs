//! `longattn::candle` on candle CPU tensors against the f64 reference (relative L2 error).
#![cfg(feature = "candle")]

mod common;

use candle_core::{DType, Device, IndexOp, Storage, Tensor};
use longattn::candle as fa;
use longattn::*;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // Deterministic pseudo-random values in [-1, 1) (no RNG state shared between tests).
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - b).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Reference for contiguous `(b, s, h, d)` (or packed `(total, h, d)`) tensors.
fn reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqlens: SeqLens,
    opts: AttentionOptions,
) -> Vec<f64> {
    let (hq, d) = (q.dim(q.rank() - 2).unwrap(), q.dim(q.rank() - 1).unwrap());
    let hkv = k.dim(k.rank() - 2).unwrap();
    let batch = match seqlens {
        SeqLens::Fixed { .. } => q.dim(0).unwrap(),
        SeqLens::Varlen { cu_seqlens_q, .. } => cu_seqlens_q.len() - 1,
    };
    let shape = AttentionShape {
        batch,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        seqlens,
    };
    let attn = FlashAttention::new(&shape, &opts).unwrap();
    let (sq, sk) = (attn.max_seqlen_q(), attn.max_seqlen_k());
    let (mut qs, mut ks) = (
        Strides::contiguous(sq, hq, d),
        Strides::contiguous(sk, hkv, d),
    );
    if attn.is_varlen() {
        qs.batch = 0;
        ks.batch = 0;
    }
    let (qv, kv, vv) = (flat(q), flat(k), flat(v));
    let (out, _) = reference::dense_attention_f64(
        &attn,
        Strided::new(&qv[..], qs),
        Strided::new(&kv[..], ks),
        Strided::new(&vv[..], ks),
    )
    .unwrap();
    out
}

const SCALE: f32 = 0.3;

fn opts(left: Option<usize>, right: Option<usize>, softcap: Option<f32>) -> AttentionOptions {
    let o = AttentionOptions::default()
        .with_scale(SCALE)
        .with_window(Window::new(left, right));
    match softcap {
        Some(c) => o.with_softcap(c),
        None => o,
    }
}

#[test]
fn fixed_lengths_causal_windows_gqa() {
    // seqlen_q != seqlen_k both ways, GQA 4:2 and MHA.
    for (case, &(b, sq, sk, hq, hkv, d)) in [
        (2, 5, 9, 4, 2, 16),
        (1, 9, 5, 2, 2, 8),
        (3, 33, 40, 6, 1, 32),
    ]
    .iter()
    .enumerate()
    {
        let q = randn(&[b, sq, hq, d], 1 + case as u64);
        let k = randn(&[b, sk, hkv, d], 11 + case as u64);
        let v = randn(&[b, sk, hkv, d], 21 + case as u64);
        let fixed = SeqLens::Fixed {
            seqlen_q: sq,
            seqlen_k: sk,
        };
        for causal in [false, true] {
            let got = fa::flash_attn(&q, &k, &v, SCALE, causal).unwrap();
            assert_eq!(got.dims(), q.dims());
            let right = causal.then_some(0);
            let want = reference(&q, &k, &v, fixed, opts(None, right, None));
            let err = rel_l2(&flat(&got), &want);
            assert!(err < 1e-5, "case {case} causal {causal}: rel L2 {err}");
        }
        // Windows incl. W = 1 and W = 2 tokens, a two-sided one and one wider than sk.
        for (left, right) in [
            (Some(0), Some(0)),
            (Some(1), Some(0)),
            (Some(3), Some(2)),
            (None, Some(1)),
            (Some(2), None),
            (Some(1000), Some(0)),
        ] {
            let got = fa::flash_attn_windowed(&q, &k, &v, SCALE, left, right).unwrap();
            let want = reference(&q, &k, &v, fixed, opts(left, right, None));
            let err = rel_l2(&flat(&got), &want);
            assert!(err < 1e-5, "case {case} window {left:?},{right:?}: {err}");
        }
        // Softcap with a causal window; 0.0 disables it.
        let got =
            fa::flash_attn_alibi_windowed_softcap(&q, &k, &v, None, SCALE, Some(4), Some(0), 0.5)
                .unwrap();
        let want = reference(&q, &k, &v, fixed, opts(Some(4), Some(0), Some(0.5)));
        let err = rel_l2(&flat(&got), &want);
        assert!(err < 1e-5, "case {case} softcap: {err}");
        let got = fa::flash_attn_alibi_windowed_softcap(&q, &k, &v, None, SCALE, None, None, 0.0)
            .unwrap();
        let want = reference(&q, &k, &v, fixed, opts(None, None, None));
        assert!(rel_l2(&flat(&got), &want) < 1e-5);
    }
}

#[test]
fn strided_inputs_and_half_types() {
    let (b, sq, sk, hq, hkv, d) = (2, 7, 12, 4, 2, 16);
    // q as the transpose of a (b, h, s, d) tensor; k, v slices of a fused kv buffer.
    let q_bhsd = randn(&[b, hq, sq, d], 5);
    let q = q_bhsd.transpose(1, 2).unwrap();
    assert!(!q.is_contiguous());
    let kv = randn(&[b, sk, 2 * hkv, d], 6);
    let k = kv.narrow(2, 0, hkv).unwrap();
    let v = kv.narrow(2, hkv, hkv).unwrap();
    let got = fa::flash_attn(&q, &k, &v, SCALE, true).unwrap();
    let (qc, kc, vc) = (
        q.contiguous().unwrap(),
        k.contiguous().unwrap(),
        v.contiguous().unwrap(),
    );
    let fixed = SeqLens::Fixed {
        seqlen_q: sq,
        seqlen_k: sk,
    };
    let want = reference(&qc, &kc, &vc, fixed, opts(None, Some(0), None));
    assert!(rel_l2(&flat(&got), &want) < 1e-5);
    // A view with a start offset (batch entry 1 only).
    let q1 = q.i(1..2).unwrap();
    let (k1, v1) = (k.i(1..2).unwrap(), v.i(1..2).unwrap());
    let got = fa::flash_attn(&q1, &k1, &v1, SCALE, true).unwrap();
    let n1 = sq * hq * d;
    assert!(rel_l2(&flat(&got), &want[n1..]) < 1e-5);
    for dt in [DType::F16, DType::BF16] {
        let (qh, kh, vh) = (
            qc.to_dtype(dt).unwrap(),
            kc.to_dtype(dt).unwrap(),
            vc.to_dtype(dt).unwrap(),
        );
        let got = fa::flash_attn(&qh, &kh, &vh, SCALE, true).unwrap();
        assert_eq!(got.dtype(), dt);
        // Reference on the rounded inputs.
        let want = reference(&qh, &kh, &vh, fixed, opts(None, Some(0), None));
        let err = rel_l2(&flat(&got), &want);
        assert!(err < 1e-2, "{dt:?}: {err}");
    }
}

#[test]
fn varlen_matches_reference() {
    let (hq, hkv, d) = (4, 2, 8);
    let cu_q: Vec<u32> = vec![0, 3, 8, 8, 17];
    let cu_k: Vec<u32> = vec![0, 5, 5, 9, 29];
    let (tq, tk) = (
        *cu_q.last().unwrap() as usize,
        *cu_k.last().unwrap() as usize,
    );
    let q = randn(&[tq, hq, d], 31);
    let k = randn(&[tk, hkv, d], 32);
    let v = randn(&[tk, hkv, d], 33);
    let sq_t = Tensor::new(&cu_q[..], &Device::Cpu).unwrap();
    let sk_t = Tensor::new(&cu_k[..], &Device::Cpu).unwrap();
    let cq: Vec<i32> = cu_q.iter().map(|&x| x as i32).collect();
    let ck: Vec<i32> = cu_k.iter().map(|&x| x as i32).collect();
    let varlen = SeqLens::Varlen {
        cu_seqlens_q: &cq,
        cu_seqlens_k: &ck,
    };
    for causal in [false, true] {
        let got = fa::flash_attn_varlen(&q, &k, &v, &sq_t, &sk_t, 9, 20, SCALE, causal).unwrap();
        assert_eq!(got.dims(), q.dims());
        let want = reference(&q, &k, &v, varlen, opts(None, causal.then_some(0), None));
        let err = rel_l2(&flat(&got), &want);
        assert!(err < 1e-5, "varlen causal {causal}: {err}");
    }
    for (left, right) in [(Some(0), Some(0)), (Some(2), Some(0)), (Some(3), Some(1))] {
        let got =
            fa::flash_attn_varlen_windowed(&q, &k, &v, &sq_t, &sk_t, 9, 20, SCALE, left, right)
                .unwrap();
        let want = reference(&q, &k, &v, varlen, opts(left, right, None));
        assert!(rel_l2(&flat(&got), &want) < 1e-5, "{left:?} {right:?}");
    }
    let got = fa::flash_attn_varlen_alibi_windowed_softcap(
        &q,
        &k,
        &v,
        None,
        &sq_t,
        &sk_t,
        9,
        20,
        SCALE,
        Some(5),
        Some(0),
        0.7,
    )
    .unwrap();
    let want = reference(&q, &k, &v, varlen, opts(Some(5), Some(0), Some(0.7)));
    assert!(rel_l2(&flat(&got), &want) < 1e-5);
    // The sequence with no keys gives zeros, never NaN.
    let rows = flat(&got.i(0..3).unwrap());
    assert!(rows.iter().all(|x| x.is_finite()));
    // i32 offsets are accepted too.
    let sq_i = Tensor::new(&cq[..], &Device::Cpu).unwrap();
    let sk_i = Tensor::new(&ck[..], &Device::Cpu).unwrap();
    let got = fa::flash_attn_varlen(&q, &k, &v, &sq_i, &sk_i, 9, 20, SCALE, true).unwrap();
    let want = reference(&q, &k, &v, varlen, opts(None, Some(0), None));
    assert!(rel_l2(&flat(&got), &want) < 1e-5);
}

/// A paged cache holding random sequences of `lens` tokens in shuffled pages of 4 tokens
/// (`heads_kv` 2, `head_dim` 16): the caches, `block_table`, `seqlens_k`, and each
/// sequence's dense `(1, len, heads_kv, head_dim)` K and V.
struct PagedFixture {
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    seqlens_k: Tensor,
    dense_k: Vec<Tensor>,
    dense_v: Vec<Tensor>,
}

fn paged_fixture(lens: &[usize]) -> PagedFixture {
    let (b, hkv, d, page_size, max_pages, num_pages) = (lens.len(), 2, 16, 4, 4, 12);
    // Scatter each sequence's keys into shuffled pages.
    let perm: Vec<usize> = (0..num_pages).map(|p| (p * 5 + 3) % num_pages).collect();
    let mut table = vec![-1i32; b * max_pages];
    let mut next = 0;
    let dense_k: Vec<Tensor> = (0..b)
        .map(|s| randn(&[lens[s], hkv, d], 40 + s as u64))
        .collect();
    let dense_v: Vec<Tensor> = (0..b)
        .map(|s| randn(&[lens[s], hkv, d], 50 + s as u64))
        .collect();
    let mut kc = vec![0.0f32; num_pages * page_size * hkv * d];
    let mut vc = kc.clone();
    for s in 0..b {
        let (kf, vf) = (flat(&dense_k[s]), flat(&dense_v[s]));
        for t in 0..lens[s] {
            let lp = t / page_size;
            if t % page_size == 0 {
                table[s * max_pages + lp] = perm[next] as i32;
                next += 1;
            }
            let page = table[s * max_pages + lp] as usize;
            let off = (page * page_size + t % page_size) * hkv * d;
            kc[off..off + hkv * d].copy_from_slice(&kf[t * hkv * d..(t + 1) * hkv * d]);
            vc[off..off + hkv * d].copy_from_slice(&vf[t * hkv * d..(t + 1) * hkv * d]);
        }
    }
    let shape = [num_pages, page_size, hkv, d];
    let lens_i: Vec<i32> = lens.iter().map(|&x| x as i32).collect();
    PagedFixture {
        k_cache: Tensor::from_vec(kc, &shape, &Device::Cpu).unwrap(),
        v_cache: Tensor::from_vec(vc, &shape, &Device::Cpu).unwrap(),
        block_table: Tensor::from_vec(table, (b, max_pages), &Device::Cpu).unwrap(),
        seqlens_k: Tensor::new(&lens_i[..], &Device::Cpu).unwrap(),
        dense_k: dense_k
            .into_iter()
            .map(|t| t.unsqueeze(0).unwrap())
            .collect(),
        dense_v: dense_v
            .into_iter()
            .map(|t| t.unsqueeze(0).unwrap())
            .collect(),
    }
}

impl PagedFixture {
    /// The f64 reference of sequence `s`'s queries `q: (1, q_len, heads_q, head_dim)`.
    fn reference(&self, s: usize, q: &Tensor, opts: AttentionOptions) -> Vec<f64> {
        let fixed = SeqLens::Fixed {
            seqlen_q: q.dim(1).unwrap(),
            seqlen_k: self.dense_k[s].dim(1).unwrap(),
        };
        reference(q, &self.dense_k[s], &self.dense_v[s], fixed, opts)
    }
}

#[test]
fn paged_decode_matches_dense_reference() {
    let (q_len, hq, d) = (2, 4, 16);
    let lens = [9usize, 1, 14];
    let f = paged_fixture(&lens);
    // Sequence 1 has one key but two new queries: its first query sees nothing.
    let q = randn(&[lens.len(), q_len, hq, d], 60);
    for (left, softcap) in [(None, None), (Some(2), None), (Some(0), Some(0.8))] {
        let (kc, vc, bt, sl) = (&f.k_cache, &f.v_cache, &f.block_table, &f.seqlens_k);
        let got = fa::paged_attn_decode(&q, kc, vc, bt, sl, SCALE, left, softcap).unwrap();
        assert_eq!(got.dims(), q.dims());
        let got = flat(&got);
        for s in 0..lens.len() {
            let want = f.reference(s, &q.i(s..s + 1).unwrap(), opts(left, Some(0), softcap));
            let n = q_len * hq * d;
            let err = rel_l2(&got[s * n..(s + 1) * n], &want);
            assert!(err < 1e-5, "seq {s} left {left:?}: {err}");
        }
    }
}

/// Paged prefill equals dense attention over each sequence's gathered tokens, the new
/// queries being the last positions (bottom-right), fixed and packed, any window.
#[test]
fn paged_prefill_matches_dense_reference() {
    let (hq, d) = (4, 16);
    let lens = [9usize, 3, 14];
    let f = paged_fixture(&lens);
    let (kc, vc, bt, sl) = (&f.k_cache, &f.v_cache, &f.block_table, &f.seqlens_k);
    // Fixed: 5 new queries each (sequence 1 holds fewer tokens: dense's rule for sq > sk).
    let q = randn(&[lens.len(), 5, hq, d], 61);
    // Packed: 5, 0 and 4 new queries.
    let cu_q: Vec<u32> = vec![0, 5, 5, 9];
    let qp = randn(&[9, hq, d], 62);
    let cu_t = Tensor::new(&cu_q[..], &Device::Cpu).unwrap();
    for (left, right, softcap) in [
        (None, Some(0), None),
        (None, None, None),
        (Some(2), Some(0), Some(0.7)),
        (Some(3), Some(2), None),
    ] {
        let w = (left, right);
        let got =
            fa::paged_attn_prefill(&q, kc, vc, bt, sl, None, None, SCALE, w, softcap).unwrap();
        assert_eq!(got.dims(), q.dims());
        let got = flat(&got);
        let n = 5 * hq * d;
        for s in 0..lens.len() {
            let want = f.reference(s, &q.i(s..s + 1).unwrap(), opts(left, right, softcap));
            let err = rel_l2(&got[s * n..(s + 1) * n], &want);
            assert!(err < 1e-5, "fixed seq {s} {w:?}: {err}");
        }
        let got = fa::paged_attn_prefill(&qp, kc, vc, bt, sl, Some(&cu_t), None, SCALE, w, softcap)
            .unwrap();
        assert_eq!(got.dims(), qp.dims());
        let got = flat(&got);
        for s in [0usize, 2] {
            let rows = cu_q[s] as usize..cu_q[s + 1] as usize;
            let qs = qp.i(rows.clone()).unwrap().unsqueeze(0).unwrap();
            let want = f.reference(s, &qs, opts(left, right, softcap));
            let err = rel_l2(&got[rows.start * hq * d..rows.end * hq * d], &want);
            assert!(err < 1e-5, "packed seq {s} {w:?}: {err}");
        }
    }
    // An F8E4M3 cache with scales equals the prefill over the dequantised cache.
    let (ks, vs) = ([0.5f32, 2.0], [0.25f32, 4.0]);
    let k8 = kc.to_dtype(DType::F8E4M3).unwrap();
    let v8 = vc.to_dtype(DType::F8E4M3).unwrap();
    let per_head = Tensor::new(&ks[..], &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 2, 1))
        .unwrap();
    let kd = k8
        .to_dtype(DType::F32)
        .unwrap()
        .broadcast_mul(&per_head)
        .unwrap();
    let per_head = Tensor::new(&vs[..], &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 2, 1))
        .unwrap();
    let vd = v8
        .to_dtype(DType::F32)
        .unwrap()
        .broadcast_mul(&per_head)
        .unwrap();
    let causal = (None, Some(0));
    let scales = Some((&ks[..], &vs[..]));
    let got =
        fa::paged_attn_prefill(&q, &k8, &v8, bt, sl, None, scales, SCALE, causal, None).unwrap();
    let want =
        fa::paged_attn_prefill(&q, &kd, &vd, bt, sl, None, None, SCALE, causal, None).unwrap();
    let want: Vec<f64> = flat(&want).into_iter().map(f64::from).collect();
    assert!(rel_l2(&flat(&got), &want) < 1e-5);
    // Refused: packed rows that do not match the offsets, a batch that does not match the
    // tables, scales on an f32 cache.
    let short = qp.i(0..8).unwrap();
    let bad = fa::paged_attn_prefill(
        &short,
        kc,
        vc,
        bt,
        sl,
        Some(&cu_t),
        None,
        SCALE,
        causal,
        None,
    );
    assert!(bad.unwrap_err().to_string().contains("rows"));
    let q2 = q.i(0..2).unwrap();
    assert!(fa::paged_attn_prefill(&q2, kc, vc, bt, sl, None, None, SCALE, causal, None).is_err());
    assert!(fa::paged_attn_prefill(&q, kc, vc, bt, sl, None, scales, SCALE, causal, None).is_err());
}

/// An F8E4M3 cache (candle's dtype, converted by candle) with per-kv-head scales equals the
/// f32 decode over the dequantised cache (`stored * scale` computed with candle's tensors).
#[test]
fn paged_decode_over_an_fp8_cache_with_scales() {
    let (b, q_len, hq, hkv, d, page_size, num_pages) = (2, 2, 4, 2, 16, 4, 6);
    let shape = [num_pages, page_size, hkv, d];
    let k8 = randn(&shape, 70).to_dtype(DType::F8E4M3).unwrap();
    let v8 = randn(&shape, 71).to_dtype(DType::F8E4M3).unwrap();
    let bt = Tensor::new(&[[4i32, 1, 3], [0, 5, 2]], &Device::Cpu).unwrap();
    let sl = Tensor::new(&[10i32, 7], &Device::Cpu).unwrap();
    let q = randn(&[b, q_len, hq, d], 72);
    let (ks, vs) = ([0.5f32, 2.0], [0.25f32, 4.0]);
    let per_head = |x: &[f32]| {
        Tensor::new(x, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, hkv, 1))
    };
    let dequant = |t: &Tensor, s: &[f32]| {
        t.to_dtype(DType::F32)
            .unwrap()
            .broadcast_mul(&per_head(s).unwrap())
            .unwrap()
    };
    let (kd, vd) = (dequant(&k8, &ks), dequant(&v8, &vs));
    for (left, softcap) in [(None, None), (Some(3), Some(0.9))] {
        let got =
            fa::paged_attn_decode_fp8(&q, &k8, &v8, &bt, &sl, (&ks, &vs), SCALE, left, softcap)
                .unwrap();
        let want = fa::paged_attn_decode(&q, &kd, &vd, &bt, &sl, SCALE, left, softcap).unwrap();
        let want: Vec<f64> = flat(&want).into_iter().map(f64::from).collect();
        let err = rel_l2(&flat(&got), &want);
        assert!(err < 1e-5, "left {left:?}: {err}");
    }
    // Without scales an FP8 cache reads its stored values (scale 1).
    let got = fa::paged_attn_decode(&q, &k8, &v8, &bt, &sl, SCALE, None, None).unwrap();
    let ones = fa::paged_attn_decode_fp8(
        &q,
        &k8,
        &v8,
        &bt,
        &sl,
        (&[1.0; 2], &[1.0; 2]),
        SCALE,
        None,
        None,
    )
    .unwrap();
    assert_eq!(flat(&got), flat(&ones));
    // Refused: scales on an f32 cache, one scale per kv head, non-positive scales.
    let bad = |k: &Tensor, s: (&[f32], &[f32])| {
        fa::paged_attn_decode_fp8(&q, k, k, &bt, &sl, s, SCALE, None, None).is_err()
    };
    assert!(bad(&kd, (&ks, &vs)));
    assert!(bad(&k8, (&[1.0], &[1.0])));
    assert!(bad(&k8, (&[1.0, 0.0], &[1.0, 1.0])));
}

#[test]
fn bad_inputs_are_candle_errors() {
    let q = randn(&[1, 4, 4, 8], 1);
    let k = randn(&[1, 6, 2, 8], 2);
    let v = randn(&[1, 6, 2, 8], 3);
    let k3 = randn(&[1, 6, 3, 8], 4);
    let ok = |r: candle_core::Result<Tensor>| r.is_ok();
    assert!(ok(fa::flash_attn(&q, &k, &v, 1.0, true)));
    // heads_q not a multiple of heads_kv
    assert!(fa::flash_attn(&q, &k3, &k3, 1.0, true).is_err());
    // k and v shapes differ
    assert!(fa::flash_attn(&q, &k, &k3, 1.0, true).is_err());
    // batch / head_dim mismatch
    assert!(
        fa::flash_attn(
            &q,
            &randn(&[2, 6, 2, 8], 5),
            &randn(&[2, 6, 2, 8], 6),
            1.0,
            false
        )
        .is_err()
    );
    assert!(
        fa::flash_attn(
            &q,
            &randn(&[1, 6, 2, 4], 5),
            &randn(&[1, 6, 2, 4], 6),
            1.0,
            false
        )
        .is_err()
    );
    // rank
    let q3 = randn(&[4, 4, 8], 7);
    assert!(fa::flash_attn(&q3, &k, &v, 1.0, false).is_err());
    // dtype mismatch and unsupported dtype
    let vh = v.to_dtype(DType::F16).unwrap();
    assert!(fa::flash_attn(&q, &k, &vh, 1.0, false).is_err());
    let (qd, kd, vd) = (
        q.to_dtype(DType::F64).unwrap(),
        k.to_dtype(DType::F64).unwrap(),
        v.to_dtype(DType::F64).unwrap(),
    );
    assert!(fa::flash_attn(&qd, &kd, &vd, 1.0, false).is_err());
    // non-contiguous last dim
    let qt = randn(&[1, 4, 8, 4], 8).transpose(2, 3).unwrap();
    assert!(fa::flash_attn(&qt, &k, &v, 1.0, false).is_err());
    // non-finite scale, negative softcap, ALiBi
    assert!(fa::flash_attn(&q, &k, &v, f32::NAN, false).is_err());
    assert!(
        fa::flash_attn_alibi_windowed_softcap(&q, &k, &v, None, 1.0, None, None, -1.0).is_err()
    );
    let slopes = randn(&[4], 9);
    assert!(
        fa::flash_attn_alibi_windowed_softcap(&q, &k, &v, Some(&slopes), 1.0, None, None, 0.0)
            .is_err()
    );
    // varlen: offsets too long for the rows, decreasing, wrong dtype, batch mismatch
    let (qp, kp, vp) = (
        randn(&[5, 4, 8], 10),
        randn(&[6, 2, 8], 11),
        randn(&[6, 2, 8], 12),
    );
    let t = |x: &[u32]| Tensor::new(x, &Device::Cpu).unwrap();
    assert!(
        fa::flash_attn_varlen(&qp, &kp, &vp, &t(&[0, 5]), &t(&[0, 6]), 5, 6, 1.0, true).is_ok()
    );
    assert!(
        fa::flash_attn_varlen(&qp, &kp, &vp, &t(&[0, 9]), &t(&[0, 6]), 9, 6, 1.0, true).is_err()
    );
    assert!(
        fa::flash_attn_varlen(
            &qp,
            &kp,
            &vp,
            &t(&[0, 3, 2]),
            &t(&[0, 3, 6]),
            5,
            6,
            1.0,
            true
        )
        .is_err()
    );
    assert!(
        fa::flash_attn_varlen(&qp, &kp, &vp, &t(&[0, 5]), &t(&[0, 3, 6]), 5, 6, 1.0, true).is_err()
    );
    assert!(
        fa::flash_attn_varlen(&qp, &kp, &vp, &t(&[1, 5]), &t(&[0, 6]), 5, 6, 1.0, true).is_err()
    );
    let f = Tensor::new(&[0.0f32, 5.0], &Device::Cpu).unwrap();
    assert!(fa::flash_attn_varlen(&qp, &kp, &vp, &f, &t(&[0, 6]), 5, 6, 1.0, true).is_err());
    // paged: page id out of range, seqlen beyond the table, batch mismatch, q_len too long
    let kc = randn(&[3, 4, 2, 8], 13);
    let qd1 = randn(&[1, 1, 4, 8], 14);
    let bt = |x: &[i32]| Tensor::from_vec(x.to_vec(), (1, x.len()), &Device::Cpu).unwrap();
    let sl = |x: &[i32]| Tensor::new(x, &Device::Cpu).unwrap();
    assert!(
        fa::paged_attn_decode(&qd1, &kc, &kc, &bt(&[2, 0]), &sl(&[6]), 1.0, None, None).is_ok()
    );
    assert!(
        fa::paged_attn_decode(&qd1, &kc, &kc, &bt(&[3, 0]), &sl(&[6]), 1.0, None, None).is_err()
    );
    assert!(
        fa::paged_attn_decode(&qd1, &kc, &kc, &bt(&[2, 0]), &sl(&[9]), 1.0, None, None).is_err()
    );
    assert!(
        fa::paged_attn_decode(&qd1, &kc, &kc, &bt(&[2, 0]), &sl(&[6, 6]), 1.0, None, None).is_err()
    );
    let qlong = randn(&[1, 17, 4, 8], 15);
    assert!(
        fa::paged_attn_decode(&qlong, &kc, &kc, &bt(&[2, 0]), &sl(&[6]), 1.0, None, None).is_err()
    );
    let kct = randn(&[4, 3, 2, 8], 16).transpose(0, 1).unwrap();
    assert!(
        fa::paged_attn_decode(&qd1, &kct, &kct, &bt(&[2, 0]), &sl(&[6]), 1.0, None, None).is_err()
    );
}

/// The crate's safe API (`NeighborhoodAttention::forward_cpu`) and the f64 reference of
/// contiguous f32 `(batch, *grid, heads, head_dim)` tensors.
fn neighborhood_safe_and_reference(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    dims: &[NeighborhoodDim],
    softcap: Option<f32>,
) -> (Vec<f32>, Vec<f64>) {
    let r = q.rank();
    let (hq, hkv, d) = (
        q.dim(r - 2).unwrap(),
        k.dim(r - 2).unwrap(),
        q.dim(r - 1).unwrap(),
    );
    let shape = NeighborhoodShape {
        batch: q.dim(0).unwrap(),
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        dims,
    };
    let mut o = AttentionOptions::default().with_scale(SCALE);
    if let Some(c) = softcap {
        o = o.with_softcap(c);
    }
    let na = NeighborhoodAttention::new(&shape, &o).unwrap();
    let n = na.tokens();
    let strides = (
        Strides::contiguous(n, hq, d),
        Strides::contiguous(n, hkv, d),
    );
    safe_and_reference(
        (q, k, v),
        strides,
        |q, k, v, out| na.forward_cpu(q, k, v, out, None),
        |q, k, v| reference::neighborhood_attention_f64(&na, q, k, v),
    )
}

/// The output of a safe API's `forward` and of an f64 `reference` on contiguous f32 tensors
/// `q`, `k`, `v` with element strides `(qs, ks)` (out like q, v like k).
fn safe_and_reference(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (qs, ks): (Strides, Strides),
    forward: impl FnOnce(
        Strided<&[f32]>,
        Strided<&[f32]>,
        Strided<&[f32]>,
        Strided<&mut [f32]>,
    ) -> longattn::Result<()>,
    reference: impl FnOnce(
        Strided<&[f32]>,
        Strided<&[f32]>,
        Strided<&[f32]>,
    ) -> longattn::Result<(Vec<f64>, Vec<f64>)>,
) -> (Vec<f32>, Vec<f64>) {
    let (qv, kv, vv) = (flat(q), flat(k), flat(v));
    let mut out = vec![0.0f32; qv.len()];
    let views = || {
        (
            Strided::new(&qv[..], qs),
            Strided::new(&kv[..], ks),
            Strided::new(&vv[..], ks),
        )
    };
    let (qa, ka, va) = views();
    forward(qa, ka, va, Strided::new(&mut out[..], qs)).unwrap();
    let (qa, ka, va) = views();
    let (want, _) = reference(qa, ka, va).unwrap();
    (out, want)
}

/// Odd 1-D, 2-D and 3-D grids (kernel, dilation, stride and causal mixed per dim, GQA,
/// softcap): the op equals the crate's safe API bit for bit and the f64 reference; strided
/// views (q a permuted `(b, h, *grid, d)` tensor, k and v halves of a fused buffer) give the
/// contiguous result; f16 and bf16 match the reference of the rounded inputs.
#[test]
fn neighborhood_attn_matches_safe_api_and_reference() {
    let nd = NeighborhoodDim::new;
    let cases: Vec<(usize, Vec<NeighborhoodDim>, usize, usize, usize)> = vec![
        (2, vec![nd(13, 5).with_dilation(2)], 4, 2, 8),
        (1, vec![nd(13, 4).with_causal(true)], 2, 2, 16),
        (2, vec![nd(11, 5).with_stride(2)], 3, 1, 8),
        (
            1,
            vec![nd(5, 3).with_stride(2), nd(7, 3).with_causal(true)],
            3,
            1,
            16,
        ),
        (1, vec![nd(6, 3).with_dilation(2), nd(9, 9)], 2, 2, 8),
        (
            2,
            vec![
                nd(3, 3),
                nd(4, 2).with_causal(true),
                nd(5, 3).with_dilation(1),
            ],
            2,
            1,
            8,
        ),
    ];
    for (case, (b, dims, hq, hkv, d)) in cases.iter().enumerate() {
        let grid: Vec<usize> = dims.iter().map(|x| x.length).collect();
        let shape = |h: usize| [&[*b][..], &grid, &[h, *d]].concat();
        let seed = 200 + 10 * case as u64;
        let q = randn(&shape(*hq), seed);
        let k = randn(&shape(*hkv), seed + 1);
        let v = randn(&shape(*hkv), seed + 2);
        for softcap in [None, Some(0.6)] {
            let got = fa::neighborhood_attn(&q, &k, &v, dims, SCALE, softcap).unwrap();
            assert_eq!((got.dims(), got.dtype()), (q.dims(), DType::F32));
            let (safe, want) = neighborhood_safe_and_reference((&q, &k, &v), dims, softcap);
            let got = flat(&got);
            assert_eq!(
                got, safe,
                "case {case} softcap {softcap:?}: differs from the safe API"
            );
            let err = rel_l2(&got, &want);
            assert!(err < 1e-5, "case {case} softcap {softcap:?}: rel L2 {err}");
        }
        // 0.0 disables the softcap.
        let off = fa::neighborhood_attn(&q, &k, &v, dims, SCALE, Some(0.0)).unwrap();
        let none = fa::neighborhood_attn(&q, &k, &v, dims, SCALE, None).unwrap();
        assert_eq!(flat(&off), flat(&none));
        // q as a permuted (b, h, *grid, d) tensor, k and v halves of one fused buffer.
        let r = q.rank();
        let mut perm: Vec<usize> = (0..r).collect();
        perm[1..r - 1].rotate_right(1);
        let mut inv = vec![0; r];
        for (i, &p) in perm.iter().enumerate() {
            inv[p] = i;
        }
        let q_bh = q.permute(perm).unwrap().contiguous().unwrap();
        let qs = q_bh.permute(inv).unwrap();
        assert!(!qs.is_contiguous() || *hq == 1);
        let kv = Tensor::cat(&[&k, &v], r - 2).unwrap();
        let (ks, vs) = (
            kv.narrow(r - 2, 0, *hkv).unwrap(),
            kv.narrow(r - 2, *hkv, *hkv).unwrap(),
        );
        let strided = fa::neighborhood_attn(&qs, &ks, &vs, dims, SCALE, None).unwrap();
        assert_eq!(flat(&strided), flat(&none), "case {case}: strided views");
        for dt in [DType::F16, DType::BF16] {
            let half = |t: &Tensor| t.to_dtype(dt).unwrap();
            let (qh, kh, vh) = (half(&q), half(&k), half(&v));
            let got = fa::neighborhood_attn(&qh, &kh, &vh, dims, SCALE, None).unwrap();
            assert_eq!(got.dtype(), dt);
            let (_, want) = neighborhood_safe_and_reference((&qh, &kh, &vh), dims, None);
            let err = rel_l2(&flat(&got), &want);
            assert!(err < 1e-2, "case {case} {dt:?}: {err}");
        }
    }
}

/// A block mask over `seqlen_q x seqlen_k` for (`batch`, `heads`) lists: a fixed
/// pseudo-random mix of unlisted, `Full` and `Partial` key blocks (some lists empty).
fn mixed_mask(
    (batch, heads): (usize, usize),
    (sq, sk): (usize, usize),
    (block_m, block_n): (usize, usize),
    seed: usize,
) -> BlockMask {
    let dims = BlockMaskDims::for_lengths(batch, heads, sq, sk, block_m, block_n).unwrap();
    BlockMask::from_lists(dims, |id| {
        (0..dims.num_k_blocks)
            .filter_map(|kb| {
                match (id.batch * 31 + id.head * 17 + id.q_block * 7 + kb * 3 + seed) % 5 {
                    0 | 1 => None,
                    2 => Some((kb, BlockKind::Full)),
                    _ => Some((kb, BlockKind::Partial)),
                }
            })
            .collect()
    })
    .unwrap()
}

/// The crate's safe API (`BlockSparseAttention::forward_cpu`) and the f64 reference of
/// contiguous f32 `(b, s, h, d)` tensors.
fn block_sparse_safe_and_reference(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    mask: &BlockMask,
    opts: &AttentionOptions,
) -> (Vec<f32>, Vec<f64>) {
    let (b, sq, hq, d) = q.dims4().unwrap();
    let (_, sk, hkv, _) = k.dims4().unwrap();
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
    let attn = FlashAttention::new(&shape, opts).unwrap();
    let bs = BlockSparseAttention::new(attn, mask.clone()).unwrap();
    let strides = (
        Strides::contiguous(sq, hq, d),
        Strides::contiguous(sk, hkv, d),
    );
    safe_and_reference(
        (q, k, v),
        strides,
        |q, k, v, out| bs.forward_cpu(q, k, v, out, None),
        |q, k, v| reference::block_sparse_attention_f64(&bs, q, k, v),
    )
}

/// Odd lengths and block sizes (short last blocks), per-(batch, head) and broadcast masks of
/// mixed `Full`/`Partial` blocks, GQA, causal, windows with sinks, softcap: the op equals the
/// crate's safe API bit for bit and the f64 reference; a strided q gives the contiguous
/// result; f16 and bf16 match the reference of the rounded inputs; an all-`Partial` dense mask
/// is dense attention.
#[test]
fn block_sparse_attn_matches_safe_api_and_reference() {
    let (b, sq, sk, hq, hkv, d) = (2, 37, 45, 4, 2, 16);
    let q = randn(&[b, sq, hq, d], 300);
    let k = randn(&[b, sk, hkv, d], 301);
    let v = randn(&[b, sk, hkv, d], 302);
    let options = [
        AttentionOptions::default().with_scale(SCALE),
        AttentionOptions::causal().with_scale(SCALE),
        opts(Some(6), Some(2), Some(0.7)).with_sinks(3),
        AttentionOptions::causal(),
    ];
    for (mb, mh) in [(b, hq), (1, 1), (1, hq)] {
        for (blocks, seed) in [((8, 16), 1), ((5, 7), 2), ((64, 64), 3)] {
            let mask = mixed_mask((mb, mh), (sq, sk), blocks, seed);
            for (n, o) in options.iter().enumerate() {
                let got = fa::block_sparse_attn(&q, &k, &v, &mask, o).unwrap();
                assert_eq!((got.dims(), got.dtype()), (q.dims(), DType::F32));
                let (safe, want) = block_sparse_safe_and_reference((&q, &k, &v), &mask, o);
                let got = flat(&got);
                let at = format!("mask ({mb}, {mh}) blocks {blocks:?} options {n}");
                assert_eq!(got, safe, "{at}: differs from the safe API");
                let err = rel_l2(&got, &want);
                assert!(err < 1e-5, "{at}: rel L2 {err}");
            }
        }
    }
    let mask = mixed_mask((b, hq), (sq, sk), (8, 16), 4);
    let o = AttentionOptions::causal().with_scale(SCALE);
    let contiguous = flat(&fa::block_sparse_attn(&q, &k, &v, &mask, &o).unwrap());
    // q as the transpose of a (b, h, s, d) tensor.
    let qt = q.transpose(1, 2).unwrap().contiguous().unwrap();
    let qt = qt.transpose(1, 2).unwrap();
    assert!(!qt.is_contiguous());
    let strided = fa::block_sparse_attn(&qt, &k, &v, &mask, &o).unwrap();
    assert_eq!(flat(&strided), contiguous);
    for dt in [DType::F16, DType::BF16] {
        let half = |t: &Tensor| t.to_dtype(dt).unwrap();
        let (qh, kh, vh) = (half(&q), half(&k), half(&v));
        let got = fa::block_sparse_attn(&qh, &kh, &vh, &mask, &o).unwrap();
        assert_eq!(got.dtype(), dt);
        let (_, want) = block_sparse_safe_and_reference((&qh, &kh, &vh), &mask, &o);
        let err = rel_l2(&flat(&got), &want);
        assert!(err < 1e-2, "{dt:?}: {err}");
    }
    // Every key block listed as Partial: dense attention under the options' mask.
    let dims = BlockMaskDims::for_lengths(1, 1, sq, sk, 16, 16).unwrap();
    let dense = BlockMask::dense(dims, BlockKind::Partial).unwrap();
    let got = fa::block_sparse_attn(&q, &k, &v, &dense, &o).unwrap();
    let fixed = SeqLens::Fixed {
        seqlen_q: sq,
        seqlen_k: sk,
    };
    let want = reference(&q, &k, &v, fixed, opts(None, Some(0), None));
    assert!(rel_l2(&flat(&got), &want) < 1e-5);
}

/// Bad ranks, shapes, strides, dims, masks, options and dtypes of the neighborhood and
/// block-sparse ops are candle errors, never panics.
#[test]
fn neighborhood_and_block_sparse_bad_inputs_are_candle_errors() {
    let nd = NeighborhoodDim::new;
    let dims = [nd(5, 3), nd(6, 3)];
    let q = randn(&[1, 5, 6, 4, 8], 400);
    let k = randn(&[1, 5, 6, 2, 8], 401);
    let na = |q: &Tensor, k: &Tensor, v: &Tensor, dims: &[NeighborhoodDim]| {
        fa::neighborhood_attn(q, k, v, dims, SCALE, None)
    };
    assert!(na(&q, &k, &k, &dims).is_ok());
    // Ranks: no grid dim, four grid dims.
    let q3 = randn(&[1, 4, 8], 402);
    assert!(na(&q3, &q3, &q3, &[]).is_err());
    let q7 = randn(&[1, 2, 2, 2, 2, 1, 8], 403);
    let d4 = [nd(2, 1); 4];
    assert!(na(&q7, &q7, &q7, &d4).is_err());
    // Dims: too few, a length that is not q's, kernel * dilation past the length, a stride
    // on a causal dim, a stride past the kernel.
    assert!(na(&q, &k, &k, &dims[..1]).is_err());
    assert!(na(&q, &k, &k, &[nd(5, 3), nd(7, 3)]).is_err());
    assert!(na(&q, &k, &k, &[nd(5, 3).with_dilation(2), nd(6, 3)]).is_err());
    let causal_stride = nd(6, 3).with_causal(true).with_stride(2);
    assert!(na(&q, &k, &k, &[nd(5, 3), causal_stride]).is_err());
    assert!(na(&q, &k, &k, &[nd(5, 3), nd(6, 3).with_stride(4)]).is_err());
    // Shapes: k and v differ, heads_q not a multiple of heads_kv, grid or head_dim mismatch.
    let k3 = randn(&[1, 5, 6, 3, 8], 404);
    assert!(na(&q, &k, &k3, &dims).is_err());
    assert!(na(&q, &k3, &k3, &dims).is_err());
    let kg = randn(&[1, 6, 5, 2, 8], 405);
    assert!(na(&q, &kg, &kg, &dims).is_err());
    let kd = randn(&[1, 5, 6, 2, 4], 406);
    assert!(na(&q, &kd, &kd, &dims).is_err());
    // Strides: a grid that does not flatten (X and Y swapped), a strided last dim.
    let qx = randn(&[1, 6, 5, 4, 8], 407).transpose(1, 2).unwrap();
    let err = na(&qx, &k, &k, &dims).unwrap_err();
    assert!(err.to_string().contains("flatten"), "{err}");
    let ql = randn(&[1, 5, 6, 8, 4], 408).transpose(3, 4).unwrap();
    assert!(na(&ql, &k, &k, &dims).is_err());
    // Dtypes: f64, mixed; a non-finite scale, a negative softcap.
    let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    assert!(na(&f64s(&q), &f64s(&k), &f64s(&k), &dims).is_err());
    assert!(na(&q, &k, &k.to_dtype(DType::F16).unwrap(), &dims).is_err());
    assert!(fa::neighborhood_attn(&q, &k, &k, &dims, f32::NAN, None).is_err());
    assert!(fa::neighborhood_attn(&q, &k, &k, &dims, SCALE, Some(-1.0)).is_err());

    let (b, sq, sk, hq, hkv, d) = (2, 9, 12, 4, 2, 8);
    let q = randn(&[b, sq, hq, d], 410);
    let k = randn(&[b, sk, hkv, d], 411);
    let o = AttentionOptions::causal();
    let mask = mixed_mask((b, hq), (sq, sk), (4, 4), 1);
    let bs = |q: &Tensor, k: &Tensor, v: &Tensor, mask: &BlockMask, o: &AttentionOptions| {
        fa::block_sparse_attn(q, k, v, mask, o)
    };
    assert!(bs(&q, &k, &k, &mask, &o).is_ok());
    // Ranks and shapes.
    let qp = randn(&[sq, hq, d], 412);
    assert!(bs(&qp, &k, &k, &mask, &o).is_err());
    let k3 = randn(&[b, sk, 3, d], 413);
    assert!(bs(&q, &k3, &k3, &mask, &o).is_err());
    assert!(bs(&q, &k, &randn(&[b, sk + 1, hkv, d], 414), &mask, &o).is_err());
    // Masks that do not fit: other query or key lengths, heads, batch.
    for bad in [
        mixed_mask((b, hq), (sq + 4, sk), (4, 4), 1),
        mixed_mask((b, hq), (sq, sk + 8), (4, 4), 1),
        mixed_mask((b, 2), (sq, sk), (4, 4), 1),
        mixed_mask((3, hq), (sq, sk), (4, 4), 1),
    ] {
        assert!(bs(&q, &k, &k, &bad, &o).is_err(), "{:?}", bad.dims());
    }
    // Options and dtypes.
    let nan = AttentionOptions::default().with_scale(f32::NAN);
    assert!(bs(&q, &k, &k, &mask, &nan).is_err());
    let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    assert!(bs(&f64s(&q), &f64s(&k), &f64s(&k), &mask, &o).is_err());
    assert!(bs(&q, &k, &k.to_dtype(DType::BF16).unwrap(), &mask, &o).is_err());
}

/// The same ops on candle CUDA tensors (feature `candle-cuda`), against the f64 reference of
/// the half-precision inputs. Without a GPU each test prints a `SKIP (no GPU)` line; with
/// `LONGATTN_REQUIRE_GPU=1` a missing GPU fails instead.
#[cfg(feature = "candle-cuda")]
mod gpu {
    use super::*;

    fn cuda_or_skip(test: &str) -> Option<Device> {
        match Device::new_cuda(0) {
            Ok(d) => Some(d),
            Err(e) => {
                assert!(
                    !longattn::device::gpu_required(),
                    "{test}: LONGATTN_REQUIRE_GPU=1 but no GPU: {e}"
                );
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "SKIP (no GPU) {test}: {e}");
                None
            }
        }
    }

    /// A CPU tensor on the GPU, and a GPU result back on the CPU (copies only: the candle
    /// kernels are not needed for either).
    fn to(t: &Tensor, dev: &Device) -> Tensor {
        t.to_device(dev).unwrap()
    }

    fn tol(dt: DType) -> f64 {
        if dt == DType::BF16 { 2e-2 } else { 4e-3 }
    }

    #[test]
    fn gpu_candle_dense_matches_reference() {
        let Some(gpu) = cuda_or_skip("gpu_candle_dense_matches_reference") else {
            return;
        };
        for (case, &(b, sq, sk, hq, hkv, d)) in [
            (2, 77, 130, 8, 2, 64),
            (1, 130, 77, 4, 4, 128),
            (1, 1, 300, 8, 1, 128),
        ]
        .iter()
        .enumerate()
        {
            for dt in [DType::F16, DType::BF16] {
                let half = |t: Tensor| t.to_dtype(dt).unwrap();
                let q = half(randn(&[b, sq, hq, d], 100 + case as u64));
                let k = half(randn(&[b, sk, hkv, d], 110 + case as u64));
                let v = half(randn(&[b, sk, hkv, d], 120 + case as u64));
                let (qg, kg, vg) = (to(&q, &gpu), to(&k, &gpu), to(&v, &gpu));
                let fixed = SeqLens::Fixed {
                    seqlen_q: sq,
                    seqlen_k: sk,
                };
                for (left, right, cap) in [
                    (None, None, 0.0),
                    (None, Some(0), 0.0),
                    (Some(31), Some(0), 0.0),
                    (Some(5), Some(9), 0.6),
                ] {
                    let got = fa::flash_attn_alibi_windowed_softcap(
                        &qg, &kg, &vg, None, SCALE, left, right, cap,
                    )
                    .unwrap();
                    assert_eq!((got.dims(), got.dtype()), (q.dims(), dt));
                    let softcap = (cap != 0.0).then_some(cap);
                    let want = reference(&q, &k, &v, fixed, opts(left, right, softcap));
                    let err = rel_l2(&flat(&to(&got, &Device::Cpu)), &want);
                    assert!(
                        err < tol(dt),
                        "case {case} {dt:?} {left:?},{right:?} cap {cap}: {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn gpu_candle_strided_and_varlen_match_reference() {
        let Some(gpu) = cuda_or_skip("gpu_candle_strided_and_varlen_match_reference") else {
            return;
        };
        let (b, sq, sk, hq, hkv, d) = (2, 50, 70, 4, 2, 64);
        let dt = DType::BF16;
        // q as the transpose of a (b, h, s, d) tensor, k and v halves of one fused buffer.
        let q = randn(&[b, hq, sq, d], 130).to_dtype(dt).unwrap();
        let kv = randn(&[b, sk, 2 * hkv, d], 131).to_dtype(dt).unwrap();
        let kvg = to(&kv, &gpu);
        let qg = to(&q, &gpu).transpose(1, 2).unwrap();
        let (kg, vg) = (
            kvg.narrow(2, 0, hkv).unwrap(),
            kvg.narrow(2, hkv, hkv).unwrap(),
        );
        let got = fa::flash_attn(&qg, &kg, &vg, SCALE, true).unwrap();
        let qc = q.transpose(1, 2).unwrap().contiguous().unwrap();
        let kc = kv.narrow(2, 0, hkv).unwrap().contiguous().unwrap();
        let vc = kv.narrow(2, hkv, hkv).unwrap().contiguous().unwrap();
        let fixed = SeqLens::Fixed {
            seqlen_q: sq,
            seqlen_k: sk,
        };
        let want = reference(&qc, &kc, &vc, fixed, opts(None, Some(0), None));
        let err = rel_l2(&flat(&to(&got, &Device::Cpu)), &want);
        assert!(err < tol(dt), "strided: {err}");
        // Varlen with an empty key sequence (its rows are 0) and u32 offsets on the GPU.
        let cu_q: Vec<u32> = vec![0, 3, 40, 41, 170];
        let cu_k: Vec<u32> = vec![0, 65, 65, 130, 300];
        let (tq, tk) = (cu_q[4] as usize, cu_k[4] as usize);
        let q = randn(&[tq, hq, d], 132).to_dtype(dt).unwrap();
        let k = randn(&[tk, hkv, d], 133).to_dtype(dt).unwrap();
        let v = randn(&[tk, hkv, d], 134).to_dtype(dt).unwrap();
        let (sq_t, sk_t) = (
            Tensor::new(&cu_q[..], &gpu).unwrap(),
            Tensor::new(&cu_k[..], &gpu).unwrap(),
        );
        let cq: Vec<i32> = cu_q.iter().map(|&x| x as i32).collect();
        let ck: Vec<i32> = cu_k.iter().map(|&x| x as i32).collect();
        let varlen = SeqLens::Varlen {
            cu_seqlens_q: &cq,
            cu_seqlens_k: &ck,
        };
        let (qg, kg, vg) = (to(&q, &gpu), to(&k, &gpu), to(&v, &gpu));
        for (left, right) in [(None, Some(0)), (Some(20), Some(3)), (None, None)] {
            let got = fa::flash_attn_varlen_windowed(
                &qg, &kg, &vg, &sq_t, &sk_t, 129, 170, SCALE, left, right,
            )
            .unwrap();
            let got = flat(&to(&got, &Device::Cpu));
            assert!(got[40 * hq * d..41 * hq * d].iter().all(|&x| x == 0.0));
            let want = reference(&q, &k, &v, varlen, opts(left, right, None));
            let err = rel_l2(&got, &want);
            assert!(err < tol(dt), "varlen {left:?},{right:?}: {err}");
        }
    }

    /// Paged decode and prefill (fixed and packed queries) on the GPU equal the CPU ops on
    /// the same tensors (the CPU ops are checked against the reference above), for a cache of
    /// q's dtype and an f8e4m3 cache.
    #[test]
    fn gpu_candle_paged_ops_match_cpu_ops() {
        let Some(gpu) = cuda_or_skip("gpu_candle_paged_ops_match_cpu_ops") else {
            return;
        };
        let (b, q_len, hq, hkv, d, page_size, num_pages) = (3, 2, 8, 2, 128, 16, 40);
        let shape = [num_pages, page_size, hkv, d];
        let bt: Vec<i32> = (0..b * 12)
            .map(|i| ((i * 7 + 3) % num_pages) as i32)
            .collect();
        let bt = Tensor::from_vec(bt, (b, 12), &Device::Cpu).unwrap();
        let sl = Tensor::new(&[170i32, 1, 33], &Device::Cpu).unwrap();
        let (btg, slg) = (to(&bt, &gpu), to(&sl, &gpu));
        for dt in [DType::F16, DType::BF16] {
            let q = randn(&[b, q_len, hq, d], 140).to_dtype(dt).unwrap();
            let qg = to(&q, &gpu);
            for cache in [dt, DType::F8E4M3] {
                let k = randn(&shape, 141).to_dtype(cache).unwrap();
                let v = randn(&shape, 142).to_dtype(cache).unwrap();
                let (kg, vg) = (to(&k, &gpu), to(&v, &gpu));
                for (left, softcap) in [(None, None), (Some(40), Some(0.9))] {
                    let run = |q: &Tensor, k: &Tensor, v: &Tensor, bt: &Tensor, sl: &Tensor| {
                        if cache == DType::F8E4M3 {
                            let s = ([0.5f32, 2.0], [0.25f32, 4.0]);
                            let s = (&s.0[..], &s.1[..]);
                            fa::paged_attn_decode_fp8(q, k, v, bt, sl, s, SCALE, left, softcap)
                        } else {
                            fa::paged_attn_decode(q, k, v, bt, sl, SCALE, left, softcap)
                        }
                        .unwrap()
                    };
                    let got = run(&qg, &kg, &vg, &btg, &slg);
                    assert_eq!((got.dims(), got.dtype()), (q.dims(), dt));
                    let want = run(&q, &k, &v, &bt, &sl);
                    let want: Vec<f64> = flat(&want).into_iter().map(f64::from).collect();
                    let err = rel_l2(&flat(&to(&got, &Device::Cpu)), &want);
                    assert!(err < tol(dt), "{dt:?} cache {cache:?} {left:?}: {err}");
                    // Prefill: 37 new queries per sequence (sequence 1 holds one token), and
                    // packed chunks of 37, 1 and 32.
                    let scales = (cache == DType::F8E4M3)
                        .then_some((&[0.5f32, 2.0][..], &[0.25f32, 4.0][..]));
                    let w = (left, Some(0));
                    let qf = randn(&[b, 37, hq, d], 143).to_dtype(dt).unwrap();
                    let qp = randn(&[70, hq, d], 144).to_dtype(dt).unwrap();
                    let cu = Tensor::new(&[0u32, 37, 38, 70], &Device::Cpu).unwrap();
                    for (q, cu) in [(&qf, None), (&qp, Some(&cu))] {
                        let (qg, cug) = (to(q, &gpu), cu.map(|c| to(c, &gpu)));
                        let got = fa::paged_attn_prefill(
                            &qg,
                            &kg,
                            &vg,
                            &btg,
                            &slg,
                            cug.as_ref(),
                            scales,
                            SCALE,
                            w,
                            softcap,
                        )
                        .unwrap();
                        let want = fa::paged_attn_prefill(
                            q, &k, &v, &bt, &sl, cu, scales, SCALE, w, softcap,
                        )
                        .unwrap();
                        let want: Vec<f64> = flat(&want).into_iter().map(f64::from).collect();
                        let err = rel_l2(&flat(&to(&got, &Device::Cpu)), &want);
                        assert!(err < tol(dt), "prefill {dt:?} {cache:?} {left:?}: {err}");
                    }
                }
            }
        }
    }

    /// Neighborhood attention on the GPU equals the CPU op on the same tensors (the CPU op is
    /// checked against the reference above): 1-D, 2-D and 3-D grids with stride, dilation,
    /// causal dims, GQA and softcap; head_dim 128 and 64 (the fused kernel) and 32 (the
    /// portable one).
    #[test]
    fn gpu_candle_neighborhood_matches_cpu_op() {
        let Some(gpu) = cuda_or_skip("gpu_candle_neighborhood_matches_cpu_op") else {
            return;
        };
        let nd = NeighborhoodDim::new;
        let cases: Vec<(usize, Vec<NeighborhoodDim>, usize, usize, usize)> = vec![
            (2, vec![nd(100, 13).with_stride(2)], 2, 1, 128),
            (
                1,
                vec![nd(9, 5), nd(11, 3).with_dilation(2).with_causal(true)],
                4,
                2,
                64,
            ),
            (
                1,
                vec![nd(4, 3), nd(5, 3), nd(6, 3).with_causal(true)],
                2,
                2,
                32,
            ),
        ];
        for (case, (b, dims, hq, hkv, d)) in cases.iter().enumerate() {
            let grid: Vec<usize> = dims.iter().map(|x| x.length).collect();
            let shape = |h: usize| [&[*b][..], &grid, &[h, *d]].concat();
            for dt in [DType::F16, DType::BF16] {
                let half = |t: Tensor| t.to_dtype(dt).unwrap();
                let seed = 500 + 10 * case as u64;
                let q = half(randn(&shape(*hq), seed));
                let k = half(randn(&shape(*hkv), seed + 1));
                let v = half(randn(&shape(*hkv), seed + 2));
                let (qg, kg, vg) = (to(&q, &gpu), to(&k, &gpu), to(&v, &gpu));
                for softcap in [None, Some(0.6)] {
                    let got = fa::neighborhood_attn(&qg, &kg, &vg, dims, SCALE, softcap).unwrap();
                    assert_eq!((got.dims(), got.dtype()), (q.dims(), dt));
                    let want = fa::neighborhood_attn(&q, &k, &v, dims, SCALE, softcap).unwrap();
                    let want: Vec<f64> = flat(&want).into_iter().map(f64::from).collect();
                    let err = rel_l2(&flat(&to(&got, &Device::Cpu)), &want);
                    assert!(
                        err < tol(dt),
                        "case {case} {dt:?} softcap {softcap:?}: {err}"
                    );
                }
            }
        }
    }

    /// Block-sparse attention on the GPU equals the CPU op on the same tensors: a per-(batch,
    /// head) mask of 64 x 64 blocks with causal options and a broadcast mask of 64 x 128
    /// blocks with a window and softcap, short last blocks, GQA, head_dim 64 and 128.
    #[test]
    fn gpu_candle_block_sparse_matches_cpu_op() {
        let Some(gpu) = cuda_or_skip("gpu_candle_block_sparse_matches_cpu_op") else {
            return;
        };
        let (b, sq, sk, hq, hkv) = (2, 200, 300, 4, 2);
        let masks = [
            (
                mixed_mask((b, hq), (sq, sk), (64, 64), 1),
                AttentionOptions::causal().with_scale(SCALE),
            ),
            (
                mixed_mask((1, 1), (sq, sk), (64, 128), 2),
                opts(Some(70), Some(10), Some(0.6)),
            ),
        ];
        for d in [64, 128] {
            for dt in [DType::F16, DType::BF16] {
                let half = |t: Tensor| t.to_dtype(dt).unwrap();
                let q = half(randn(&[b, sq, hq, d], 600 + d as u64));
                let k = half(randn(&[b, sk, hkv, d], 601 + d as u64));
                let v = half(randn(&[b, sk, hkv, d], 602 + d as u64));
                let (qg, kg, vg) = (to(&q, &gpu), to(&k, &gpu), to(&v, &gpu));
                for (n, (mask, o)) in masks.iter().enumerate() {
                    let got = fa::block_sparse_attn(&qg, &kg, &vg, mask, o).unwrap();
                    assert_eq!((got.dims(), got.dtype()), (q.dims(), dt));
                    let want = fa::block_sparse_attn(&q, &k, &v, mask, o).unwrap();
                    let want: Vec<f64> = flat(&want).into_iter().map(f64::from).collect();
                    let err = rel_l2(&flat(&to(&got, &Device::Cpu)), &want);
                    assert!(err < tol(dt), "mask {n} d {d} {dt:?}: {err}");
                }
            }
        }
    }

    #[test]
    fn gpu_candle_refuses_what_the_kernels_do_not_take() {
        let Some(gpu) = cuda_or_skip("gpu_candle_refuses_what_the_kernels_do_not_take") else {
            return;
        };
        // f32 CUDA tensors: a named error (the kernels are half-precision), never a panic.
        let q = to(&randn(&[1, 4, 2, 64], 150), &gpu);
        let err = fa::flash_attn(&q, &q, &q, SCALE, true).unwrap_err();
        assert!(err.to_string().contains("f16 or bf16"), "{err}");
        // Mixed devices are candle's error.
        let cpu = randn(&[1, 4, 2, 64], 151);
        assert!(fa::flash_attn(&q, &cpu, &cpu, SCALE, true).is_err());
        // The neighborhood and block-sparse ops name f32 too; a block size the GPU kernel does
        // not take (a multiple of 64) is an error before any launch.
        let dims = [NeighborhoodDim::new(4, 3)];
        let err = fa::neighborhood_attn(&q, &q, &q, &dims, SCALE, None).unwrap_err();
        assert!(err.to_string().contains("f16 or bf16"), "{err}");
        let mask = mixed_mask((1, 1), (4, 4), (64, 64), 2);
        let o = AttentionOptions::causal();
        let err = fa::block_sparse_attn(&q, &q, &q, &mask, &o).unwrap_err();
        assert!(err.to_string().contains("f16 or bf16"), "{err}");
        let qh = to(&cpu.to_dtype(DType::F16).unwrap(), &gpu);
        let small = mixed_mask((1, 1), (4, 4), (16, 16), 2);
        assert!(fa::block_sparse_attn(&qh, &qh, &qh, &small, &o).is_err());
    }
}

/// A cache element type of the append tests: candle tensors of it from this crate's values and
/// back, bit for bit (an `F8E4M3` tensor through its finite f32 values, exact in e4m3).
trait CacheElem: Element {
    const CANDLE: DType;
    fn tensor(x: &[Self], shape: &[usize]) -> Tensor {
        let f: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        Tensor::from_vec(f, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(Self::CANDLE)
            .unwrap()
    }
    fn read(t: &Tensor) -> Vec<Self> {
        flat(t).into_iter().map(Self::from_f32).collect()
    }
}
impl CacheElem for f32 {
    const CANDLE: DType = DType::F32;
}
impl CacheElem for half::f16 {
    const CANDLE: DType = DType::F16;
}
impl CacheElem for half::bf16 {
    const CANDLE: DType = DType::BF16;
}
impl CacheElem for F8E4M3 {
    const CANDLE: DType = DType::F8E4M3;
    fn read(t: &Tensor) -> Vec<Self> {
        let (s, l) = t.storage_and_layout();
        let Storage::Cpu(candle_core::CpuStorage::F8E4M3(v)) = &*s else {
            panic!("not an f8e4m3 CPU tensor")
        };
        let n = t.elem_count();
        v[l.start_offset()..l.start_offset() + n]
            .iter()
            .map(|x| F8E4M3::from_bits(x.to_bits()))
            .collect()
    }
}

/// Bit patterns (through f32, injective on the non-NaN values of every cache type).
fn bits<C: Element>(x: &[C]) -> Vec<u32> {
    x.iter().map(|v| v.to_f32().to_bits()).collect()
}

/// The append scenario: 3 sequences ending at 13, 1 and 9 tokens on pages of 4, their pages a
/// random permutation (with spares), appended in steps that cross page boundaries (0..6,
/// 6..9, 9..13), fill a page exactly (0..4) then start the next one (4..5: bounds restart).
const APPEND_STEPS: [[usize; 3]; 3] = [[6, 1, 4], [3, 0, 1], [4, 0, 4]];
const APPEND_GEOMETRY: (usize, usize, usize) = (4, 2, 16); // page_size, heads_kv, head_dim

struct AppendRun<T> {
    /// All tokens of each sequence, `[len, heads_kv, head_dim]`.
    k_tokens: Vec<Vec<T>>,
    v_tokens: Vec<Vec<T>>,
    k_cache: Tensor,
    v_cache: Tensor,
    kmin: Tensor,
    kmax: Tensor,
    block_table: Tensor,
    seqlens_k: Tensor,
    /// The cache description after the last append (the scales included).
    cache: PagedCache,
}

/// Runs [`APPEND_STEPS`] through `paged_attn_append` (new tokens `T`, cache `C`, with bounds)
/// and through `PagedCache::append_cpu` on the same data, comparing caches and bounds bit for
/// bit after every step.
fn append_both_ways<T, C>(seed: u64, scales: Option<KvScales>) -> AppendRun<T>
where
    T: Element + candle_core::WithDType,
    C: CacheElem,
{
    let (ps, hkv, d) = APPEND_GEOMETRY;
    let lens: Vec<usize> = (0..3)
        .map(|b| APPEND_STEPS.iter().map(|s| s[b]).sum())
        .collect();
    let mut r = common::rng(seed);
    let pages: Vec<usize> = lens.iter().map(|l| l.div_ceil(ps)).collect();
    let (max_pages, num_pages) = (5, pages.iter().sum::<usize>() + 2);
    let table = common::paged::shuffled_block_table(&pages, max_pages, num_pages, &mut r);
    let layout = PagedLayout {
        num_pages,
        page_size: ps,
        heads_kv: hkv,
        head_dim: d,
    };
    let row = hkv * d;
    let k_tokens: Vec<Vec<T>> = lens
        .iter()
        .map(|&l| common::random_vec(&mut r, l * row))
        .collect();
    let v_tokens: Vec<Vec<T>> = lens
        .iter()
        .map(|&l| common::random_vec(&mut r, l * row))
        .collect();
    // Garbage everywhere first (bounds that a restart must forget).
    let mut kc: Vec<C> = common::random_vec(&mut r, layout.cache_len());
    let mut vc: Vec<C> = common::random_vec(&mut r, layout.cache_len());
    let mut kmin = vec![C::from_f32(-0.25); layout.meta_len()];
    let mut kmax = vec![C::from_f32(0.25); layout.meta_len()];
    let cache_shape = [num_pages, ps, hkv, d];
    let meta_shape = [num_pages, hkv, d];
    let (tk, tv) = (C::tensor(&kc, &cache_shape), C::tensor(&vc, &cache_shape));
    let (tmin, tmax) = (C::tensor(&kmin, &meta_shape), C::tensor(&kmax, &meta_shape));
    let bt = Tensor::from_vec(table.clone(), (3, max_pages), &Device::Cpu).unwrap();
    let scale_refs = scales.as_ref().map(|s| (s.k(), s.v()));
    let mut done = [0usize; 3];
    let mut last = None;
    for step in APPEND_STEPS {
        let now: Vec<i32> = (0..3).map(|b| (done[b] + step[b]) as i32).collect();
        let cu = common::cu_seqlens(&step);
        let (mut kn, mut vn) = (Vec::new(), Vec::new());
        for b in 0..3 {
            let rows = done[b] * row..(done[b] + step[b]) * row;
            kn.extend_from_slice(&k_tokens[b][rows.clone()]);
            vn.extend_from_slice(&v_tokens[b][rows]);
        }
        let total = cu[3] as usize;
        // The op, with the tables in three integer dtypes.
        let sl = Tensor::new(&now[..], &Device::Cpu).unwrap();
        let cu_t = Tensor::new(&cu[..], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap();
        let bt_u = bt.to_dtype(DType::I64).unwrap();
        let kn_t = Tensor::from_vec(kn.clone(), (total, hkv, d), &Device::Cpu).unwrap();
        let vn_t = Tensor::from_vec(vn.clone(), (total, hkv, d), &Device::Cpu).unwrap();
        fa::paged_attn_append(
            &kn_t,
            &vn_t,
            &tk,
            &tv,
            &bt_u,
            &sl,
            &cu_t,
            Some((&tmin, &tmax)),
            scale_refs,
        )
        .unwrap();
        // The crate's append on the same data.
        let mut cache = PagedCache::new(
            layout,
            PageTable {
                block_table: &table,
                max_pages_per_seq: max_pages,
                seqlens_k: &now,
            },
        )
        .unwrap();
        if let Some(s) = &scales {
            cache = cache.with_kv_scales(s.clone()).unwrap();
        }
        let st = Strides::contiguous(1, hkv, d);
        cache
            .append_cpu(
                &cu,
                Strided::new(&kn[..], st),
                Strided::new(&vn[..], st),
                KvPages {
                    k: &mut kc[..],
                    v: &mut vc[..],
                },
                Some(PageMeta {
                    kmin: &mut kmin[..],
                    kmax: &mut kmax[..],
                }),
            )
            .unwrap();
        for (name, got, want) in [
            ("k_cache", &tk, &kc),
            ("v_cache", &tv, &vc),
            ("kmin", &tmin, &kmin),
            ("kmax", &tmax, &kmax),
        ] {
            assert_eq!(bits(&C::read(got)), bits(want), "{name} after {step:?}");
        }
        for b in 0..3 {
            done[b] += step[b];
        }
        last = Some(cache);
    }
    AppendRun {
        k_tokens,
        v_tokens,
        k_cache: tk,
        v_cache: tv,
        kmin: tmin,
        kmax: tmax,
        block_table: bt,
        seqlens_k: Tensor::new(&done.map(|n| n as i32)[..], &Device::Cpu).unwrap(),
        cache: last.unwrap(),
    }
}

/// `paged_attn_append` writes exactly what `PagedCache::append_cpu` writes (caches and Quest
/// bounds, bit for bit): f32, f16, bf16 caches of the tokens' dtype and `F8E4M3` caches with
/// per-kv-head scales, shuffled pages, appends crossing and starting pages.
#[test]
fn paged_append_equals_append_cpu() {
    use half::{bf16, f16};
    append_both_ways::<f32, f32>(1, None);
    append_both_ways::<f16, f16>(2, None);
    append_both_ways::<bf16, bf16>(3, None);
    let scales = || Some(KvScales::new(vec![0.01, 0.02], vec![0.015, 0.005]).unwrap());
    append_both_ways::<f32, F8E4M3>(4, scales());
    append_both_ways::<f16, F8E4M3>(5, scales());
    append_both_ways::<bf16, F8E4M3>(6, scales());
    // Without scales an FP8 cache stores the values themselves.
    append_both_ways::<f32, F8E4M3>(7, None);
}

/// Decode over the cache the op filled equals the f64 dense reference over each sequence's
/// tokens (f32 cache), and equals the f32 decode over the dequantised cache for FP8.
#[test]
fn paged_decode_after_append_matches_reference() {
    let (_, hkv, d) = APPEND_GEOMETRY;
    let hq = 4;
    let run = append_both_ways::<f32, f32>(11, None);
    let q = randn(&[3, 1, hq, d], 12);
    let (kc, vc, bt, sl) = (&run.k_cache, &run.v_cache, &run.block_table, &run.seqlens_k);
    let got = flat(&fa::paged_attn_decode(&q, kc, vc, bt, sl, SCALE, None, None).unwrap());
    let n = hq * d;
    for s in 0..3 {
        let len = run.k_tokens[s].len() / (hkv * d);
        let dense = |x: &[f32]| Tensor::from_vec(x.to_vec(), (1, len, hkv, d), &Device::Cpu);
        let (k, v) = (
            dense(&run.k_tokens[s]).unwrap(),
            dense(&run.v_tokens[s]).unwrap(),
        );
        let fixed = SeqLens::Fixed {
            seqlen_q: 1,
            seqlen_k: len,
        };
        let qs = q.i(s..s + 1).unwrap();
        let want = reference(&qs, &k, &v, fixed, opts(None, Some(0), None));
        let err = rel_l2(&got[s * n..(s + 1) * n], &want);
        assert!(err < 1e-5, "seq {s}: {err}");
    }
    let (ks, vs) = ([0.01f32, 0.02], [0.015f32, 0.005]);
    let scales = KvScales::new(ks.to_vec(), vs.to_vec()).unwrap();
    let run8 = append_both_ways::<f32, F8E4M3>(11, Some(scales));
    let (k8, v8) = (&run8.k_cache, &run8.v_cache);
    let got = fa::paged_attn_decode_fp8(&q, k8, v8, bt, sl, (&ks, &vs), SCALE, None, None);
    let per_head = |x: &[f32]| {
        Tensor::new(x, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, hkv, 1))
            .unwrap()
    };
    let deq = |t: &Tensor, s: &[f32]| {
        let f = t.to_dtype(DType::F32).unwrap();
        f.broadcast_mul(&per_head(s)).unwrap()
    };
    let (kd, vd) = (deq(k8, &ks), deq(v8, &vs));
    let want = fa::paged_attn_decode(&q, &kd, &vd, bt, sl, SCALE, None, None).unwrap();
    let want: Vec<f64> = flat(&want).into_iter().map(f64::from).collect();
    assert!(rel_l2(&flat(&got.unwrap()), &want) < 1e-5);
}

/// Invalid appends are candle errors that write nothing; `k_new` and `v_new` may be views of
/// one tensor (read only), the written tensors may not share a storage with anything.
#[test]
fn paged_append_bad_inputs_are_candle_errors() {
    let (num_pages, ps, hkv, d) = (4, 4, 2, 8);
    let dev = &Device::Cpu;
    let kc = randn(&[num_pages, ps, hkv, d], 20);
    let vc = randn(&[num_pages, ps, hkv, d], 21);
    let (kmin, kmax) = (
        randn(&[num_pages, hkv, d], 22),
        randn(&[num_pages, hkv, d], 23),
    );
    let bt = Tensor::new(&[[2i32, 0], [3, 1]], dev).unwrap();
    let sl = Tensor::new(&[5i32, 2], dev).unwrap();
    let cu = Tensor::new(&[0u32, 2, 3], dev).unwrap();
    // k_new and v_new as halves of one (total, 2 * heads_kv, head_dim) tensor.
    let kvn = randn(&[3, 2 * hkv, d], 24);
    let (kn, vn) = (
        kvn.narrow(1, 0, hkv).unwrap(),
        kvn.narrow(1, hkv, hkv).unwrap(),
    );
    let before: Vec<Vec<f32>> = [&kc, &vc, &kmin, &kmax].iter().map(|t| flat(t)).collect();
    let unchanged = || {
        let now: Vec<Vec<f32>> = [&kc, &vc, &kmin, &kmax].iter().map(|t| flat(t)).collect();
        assert_eq!(now, before, "a refused append wrote");
    };
    let bounds = Some((&kmin, &kmax));
    let append = |kn: &Tensor, vn: &Tensor, kc: &Tensor, vc: &Tensor, b, cu: &Tensor, s| {
        fa::paged_attn_append(kn, vn, kc, vc, &bt, &sl, cu, b, s)
    };
    let err = |r: candle_core::Result<()>, what: &str| {
        let e = r.expect_err(what).to_string();
        assert!(e.contains("longattn"), "{what}: {e}");
        e
    };
    // Shapes: rows that are not the last offset, heads, head_dim, k/v mismatch, bounds.
    let k4 = randn(&[4, hkv, d], 25);
    err(append(&k4, &k4, &kc, &vc, bounds, &cu, None), "rows");
    let kh = randn(&[3, 1, d], 26);
    err(append(&kh, &kh, &kc, &vc, bounds, &cu, None), "heads");
    let kd = randn(&[3, hkv, 4], 27);
    err(append(&kd, &kd, &kc, &vc, bounds, &cu, None), "head_dim");
    err(append(&kn, &kh, &kc, &vc, bounds, &cu, None), "v_new");
    let small = randn(&[num_pages - 1, hkv, d], 28);
    err(
        append(&kn, &vn, &kc, &vc, Some((&small, &kmax)), &cu, None),
        "kmin",
    );
    let vc3 = randn(&[num_pages, ps, hkv, 4], 29);
    err(
        append(&kn, &vn, &kc, &vc3, bounds, &cu, None),
        "v_cache shape",
    );
    // Dtypes: f64 tokens, tokens and cache apart, bounds of another dtype, scales on f32.
    let k64 = kn.to_dtype(DType::F64).unwrap();
    err(append(&k64, &k64, &kc, &vc, bounds, &cu, None), "f64");
    let kn16 = kn.to_dtype(DType::F16).unwrap();
    err(
        append(&kn16, &kn16, &kc, &vc, bounds, &cu, None),
        "f16 into f32",
    );
    let min16 = kmin.to_dtype(DType::F16).unwrap();
    err(
        append(&kn, &vn, &kc, &vc, Some((&min16, &kmax)), &cu, None),
        "f16 bounds",
    );
    let s = Some((&[1.0f32, 1.0][..], &[1.0f32, 1.0][..]));
    err(append(&kn, &vn, &kc, &vc, bounds, &cu, s), "scales on f32");
    // Layouts: a non-contiguous cache or bounds, a strided last dim.
    let kct = randn(&[ps, num_pages, hkv, d], 30).transpose(0, 1).unwrap();
    err(
        append(&kn, &vn, &kct, &vc, bounds, &cu, None),
        "non-contiguous cache",
    );
    let mint = randn(&[hkv, num_pages, d], 31).transpose(0, 1).unwrap();
    err(
        append(&kn, &vn, &kc, &vc, Some((&mint, &kmax)), &cu, None),
        "bounds",
    );
    let knt = randn(&[3, d, hkv], 32).transpose(1, 2).unwrap();
    err(append(&knt, &knt, &kc, &vc, bounds, &cu, None), "last dim");
    // Tables: offsets that do not fit seqlens_k, decreasing, a page written by two sequences.
    let cu_big = Tensor::new(&[0u32, 2, 6], dev).unwrap();
    let kn6 = randn(&[6, hkv, d], 33);
    err(
        append(&kn6, &kn6, &kc, &vc, bounds, &cu_big, None),
        "seqlens_k",
    );
    let cu_dec = Tensor::new(&[0u32, 3, 2], dev).unwrap();
    let kn2 = randn(&[2, hkv, d], 34);
    err(
        append(&kn2, &kn2, &kc, &vc, bounds, &cu_dec, None),
        "decreasing",
    );
    let shared = Tensor::new(&[[2i32, 0], [2, 1]], dev).unwrap();
    let r = fa::paged_attn_append(&kn, &vn, &kc, &vc, &shared, &sl, &cu, bounds, None);
    err(r, "one page, two sequences");
    // Storages: k_cache and v_cache views of one tensor, a cache that k_new views, one
    // tensor as both bounds.
    let kv = randn(&[2, num_pages, ps, hkv, d], 35);
    let (kv0, kv1) = (kv.i(0).unwrap(), kv.i(1).unwrap());
    let e = err(append(&kn, &vn, &kv0, &kv1, None, &cu, None), "k/v views");
    assert!(e.contains("share one storage"), "{e}");
    let kview = kc
        .reshape((num_pages * ps, hkv, d))
        .unwrap()
        .narrow(0, 0, 3)
        .unwrap();
    err(
        append(&kview, &vn, &kc, &vc, None, &cu, None),
        "k_new views k_cache",
    );
    err(
        append(&kn, &vn, &kc, &vc, Some((&kmin, &kmin)), &cu, None),
        "kmin = kmax",
    );
    err(
        append(&kn, &vn, &kc, &kc, None, &cu, None),
        "k_cache = v_cache",
    );
    unchanged();
    // The same call with valid arguments works (k_new, v_new views of one tensor), and its
    // result is append_cpu's.
    append(&kn, &vn, &kc, &vc, bounds, &cu, None).unwrap();
    let cache = PagedCache::new(
        PagedLayout {
            num_pages,
            page_size: ps,
            heads_kv: hkv,
            head_dim: d,
        },
        PageTable {
            block_table: &[2, 0, 3, 1],
            max_pages_per_seq: 2,
            seqlens_k: &[5, 2],
        },
    )
    .unwrap();
    let [mut k, mut v, mut lo, mut hi] = before.clone().try_into().unwrap();
    let kvn_f = flat(&kvn);
    let st = Strides {
        batch: 0,
        seq: (2 * hkv * d) as i64,
        head: d as i64,
    };
    cache
        .append_cpu(
            &[0, 2, 3],
            Strided::new(&kvn_f[..], st),
            Strided::new(&kvn_f[hkv * d..], st),
            KvPages {
                k: &mut k[..],
                v: &mut v[..],
            },
            Some(PageMeta {
                kmin: &mut lo[..],
                kmax: &mut hi[..],
            }),
        )
        .unwrap();
    for (got, want) in [(&kc, &k), (&vc, &v), (&kmin, &lo), (&kmax, &hi)] {
        assert_eq!(bits(&flat(got)), bits(want));
    }
    // Without bounds (two written tensors): the same caches.
    let fresh = |x: &[f32]| Tensor::from_vec(x.to_vec(), kc.shape(), dev).unwrap();
    let (kc2, vc2) = (fresh(&before[0]), fresh(&before[1]));
    append(&kn, &vn, &kc2, &vc2, None, &cu, None).unwrap();
    assert_eq!(bits(&flat(&kc2)), bits(&k));
    assert_eq!(bits(&flat(&vc2)), bits(&v));
}

/// Heads Quest (2 pages of the sequence's up to 4) and Streaming (1 sink, window 3).
fn quest_streaming_policy() -> SparsePolicy {
    let mut policy = common::paged::quest_policy(2, 8, 0);
    policy.heads[1] = HeadPolicy::Streaming;
    policy.with_streaming(StreamingConfig {
        sinks: 1,
        window: 3,
    })
}

/// The crate's decode with `policy` over an append run's cache (read back from the tensors),
/// `q: (3, 1, hq, d)` f32.
fn decode_with_policy_rust<C: CacheElem>(
    run: &AppendRun<f32>,
    q: &Tensor,
    policy: &SparsePolicy,
) -> Vec<f32> {
    let (_, hkv, d) = APPEND_GEOMETRY;
    let hq = q.dim(2).unwrap();
    let decode = PagedDecode::new(&run.cache, hq, 1, &opts(None, Some(0), None))
        .unwrap()
        .with_policy(policy.clone())
        .unwrap();
    let (k, v) = (C::read(&run.k_cache), C::read(&run.v_cache));
    let (kmin, kmax) = (C::read(&run.kmin), C::read(&run.kmax));
    let st = Strides::contiguous(1, hq, d);
    let qv = flat(q);
    let mut out = vec![f32::NAN; decode.out_len()];
    decode
        .forward_cpu(
            Strided::new(&qv[..], st),
            KvPages {
                k: &k[..],
                v: &v[..],
            },
            Some(PageMeta {
                kmin: &kmin[..],
                kmax: &kmax[..],
            }),
            Strided::new(&mut out[..], st),
            None,
        )
        .unwrap();
    assert_eq!(hkv, policy.heads.len());
    out
}

/// `paged_attn_decode_with_policy` over the cache and Quest bounds that `paged_attn_append`
/// filled equals the crate's `PagedDecode::with_policy` (bit for bit), f32 and FP8 caches;
/// all-Full equals `paged_attn_decode`.
#[test]
fn paged_decode_with_policy_matches_rust_api() {
    let (_, hkv, d) = APPEND_GEOMETRY;
    let q = randn(&[3, 1, 4, d], 13);
    let policy = quest_streaming_policy();
    let run = append_both_ways::<f32, f32>(14, None);
    let (kc, vc, bt, sl) = (&run.k_cache, &run.v_cache, &run.block_table, &run.seqlens_k);
    let bounds = Some((&run.kmin, &run.kmax));
    let got = fa::paged_attn_decode_with_policy(
        &q, kc, vc, bt, sl, &policy, bounds, None, SCALE, None, None,
    )
    .unwrap();
    assert_eq!(
        flat(&got),
        decode_with_policy_rust::<f32>(&run, &q, &policy)
    );
    // The policy changes the result (Quest keeps 2 of sequence 0's 4 pages).
    let full = fa::paged_attn_decode(&q, kc, vc, bt, sl, SCALE, None, None).unwrap();
    assert_ne!(flat(&got), flat(&full));
    let all_full = SparsePolicy::uniform(hkv, HeadPolicy::Full);
    let got = fa::paged_attn_decode_with_policy(
        &q, kc, vc, bt, sl, &all_full, None, None, SCALE, None, None,
    )
    .unwrap();
    assert_eq!(flat(&got), flat(&full));
    // FP8: the bounds of the stored e4m3 values, the scales per kv head.
    let (ks, vs) = ([0.01f32, 0.02], [0.015f32, 0.005]);
    let scales = KvScales::new(ks.to_vec(), vs.to_vec()).unwrap();
    let run8 = append_both_ways::<f32, F8E4M3>(15, Some(scales));
    let got = fa::paged_attn_decode_with_policy(
        &q,
        &run8.k_cache,
        &run8.v_cache,
        &run8.block_table,
        &run8.seqlens_k,
        &policy,
        Some((&run8.kmin, &run8.kmax)),
        Some((&ks, &vs)),
        SCALE,
        None,
        None,
    )
    .unwrap();
    assert_eq!(
        flat(&got),
        decode_with_policy_rust::<F8E4M3>(&run8, &q, &policy)
    );
}

#[test]
fn paged_decode_with_policy_bad_inputs_are_candle_errors() {
    let (_, hkv, d) = APPEND_GEOMETRY;
    let q = randn(&[3, 1, 4, d], 16);
    let run = append_both_ways::<f32, f32>(17, None);
    let (kc, vc, bt, sl) = (&run.k_cache, &run.v_cache, &run.block_table, &run.seqlens_k);
    let policy = quest_streaming_policy();
    let decode = |policy: &SparsePolicy, bounds: Option<(&Tensor, &Tensor)>| {
        fa::paged_attn_decode_with_policy(
            &q, kc, vc, bt, sl, policy, bounds, None, SCALE, None, None,
        )
    };
    let refused = |r: candle_core::Result<Tensor>, what: &str| {
        let e = r.expect_err(what).to_string();
        assert!(e.contains("longattn"), "{what}: {e}");
    };
    let (kmin, kmax) = (&run.kmin, &run.kmax);
    refused(decode(&policy, None), "Quest without bounds");
    refused(
        decode(&SparsePolicy::uniform(hkv, HeadPolicy::Listed), None),
        "Listed",
    );
    refused(
        decode(&SparsePolicy::uniform(3, HeadPolicy::Full), None),
        "heads",
    );
    refused(decode(&policy, Some((kmin, kmin))), "kmin = kmax");
    let n = kmin.elem_count();
    let in_cache = kc.flatten_all().unwrap().narrow(0, 0, n).unwrap();
    let in_cache = in_cache.reshape(kmin.dims()).unwrap();
    refused(
        decode(&policy, Some((&in_cache, kmax))),
        "kmin views k_cache",
    );
    refused(
        decode(&policy, Some((&kmin.to_dtype(DType::F16).unwrap(), kmax))),
        "f16 bounds",
    );
    let short = kmin.narrow(0, 0, 2).unwrap();
    refused(decode(&policy, Some((&short, kmax))), "bounds shape");
    let t = kmin
        .transpose(0, 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(0, 1)
        .unwrap();
    refused(decode(&policy, Some((&t, kmax))), "non-contiguous bounds");
}
