//! Block-sparse attention on the CPU: the CPU path against the f64 reference and against
//! naive attention with an element mask written here from each definition (random lists,
//! every pattern, MoBA), MoBA's selection against a brute force of MoBA's gate, empty and
//! fully masked rows, and the named validation errors.

mod common;

use common::*;
use longattn::block_sparse::moba::{
    GPU_TILE_ROWS, MobaConfig, MobaGpuDims, moba_attention, moba_block_mask, moba_pooled_keys_cpu,
    moba_select_blocks_cpu, moba_select_cpu, moba_tile_unions,
};
use longattn::block_sparse::patterns::{self, PatternShape};
use longattn::block_sparse::{BlockMaskError, ListId};
use longattn::reference::{block_sparse_attention_f64, dense_attention_f64};
use longattn::*;
use rand::Rng;

/// A random contiguous problem: `[b, s, h, d]` tensors (fixed lengths) or packed (varlen).
struct Case {
    b: usize,
    lens: Vec<(usize, usize)>, // (sq, sk) per sequence
    varlen: bool,
    hq: usize,
    hkv: usize,
    d: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    cu: (Vec<i32>, Vec<i32>),
}

impl Case {
    fn fixed(seed: u64, b: usize, sq: usize, sk: usize, hq: usize, hkv: usize, d: usize) -> Self {
        Self::build(seed, vec![(sq, sk); b], false, hq, hkv, d)
    }
    fn build(
        seed: u64,
        lens: Vec<(usize, usize)>,
        varlen: bool,
        hq: usize,
        hkv: usize,
        d: usize,
    ) -> Self {
        let mut r = rng(seed);
        let b = lens.len();
        let (rq, rk) = if varlen {
            (
                lens.iter().map(|l| l.0).sum(),
                lens.iter().map(|l| l.1).sum(),
            )
        } else {
            (b * lens[0].0, b * lens[0].1)
        };
        let cu = (
            cu_seqlens(&lens.iter().map(|l| l.0).collect::<Vec<_>>()),
            cu_seqlens(&lens.iter().map(|l| l.1).collect::<Vec<_>>()),
        );
        Case {
            b,
            varlen,
            hq,
            hkv,
            d,
            q: random_vec(&mut r, rq * hq * d),
            k: random_vec(&mut r, rk * hkv * d),
            v: random_vec(&mut r, rk * hkv * d),
            lens,
            cu,
        }
    }
    fn attn(&self, opts: &AttentionOptions) -> FlashAttention {
        let seqlens = if self.varlen {
            SeqLens::Varlen {
                cu_seqlens_q: &self.cu.0,
                cu_seqlens_k: &self.cu.1,
            }
        } else {
            SeqLens::Fixed {
                seqlen_q: self.lens[0].0,
                seqlen_k: self.lens[0].1,
            }
        };
        let shape = AttentionShape {
            batch: self.b,
            heads_q: self.hq,
            heads_kv: self.hkv,
            head_dim: self.d,
            seqlens,
        };
        FlashAttention::new(&shape, opts).unwrap()
    }
    fn strides(&self) -> (Strides, Strides) {
        let (sq, sk) = if self.varlen { (0, 0) } else { self.lens[0] };
        (
            Strides::contiguous(sq, self.hq, self.d),
            Strides::contiguous(sk, self.hkv, self.d),
        )
    }
    /// Runs the CPU path into poisoned buffers; returns (out, lse).
    fn cpu(&self, bs: &BlockSparseAttention) -> (Vec<f64>, Vec<f32>) {
        let (qs, ks) = self.strides();
        let attn = bs.attention();
        let mut out = vec![f32::NAN; attn.out_len()];
        let mut lse = vec![f32::NAN; attn.lse_len()];
        bs.forward_cpu(
            Strided::new(&self.q[..], qs),
            Strided::new(&self.k[..], ks),
            Strided::new(&self.v[..], ks),
            Strided::new(&mut out[..], qs),
            Some(&mut lse),
        )
        .unwrap();
        (to_f64(&out), lse)
    }
    fn reference(&self, bs: &BlockSparseAttention) -> (Vec<f64>, Vec<f64>) {
        let (qs, ks) = self.strides();
        block_sparse_attention_f64(
            bs,
            Strided::new(&self.q[..], qs),
            Strided::new(&self.k[..], ks),
            Strided::new(&self.v[..], ks),
        )
        .unwrap()
    }
    /// Naive f64 attention with `visible(b, h, i, j)`, written independently of the crate:
    /// out `[rows, hq, d]` and LSE in the problem's layout.
    fn naive(
        &self,
        scale: f64,
        visible: impl Fn(usize, usize, usize, usize) -> bool,
    ) -> (Vec<f64>, Vec<f64>) {
        let (hq, d) = (self.hq, self.d);
        let group = hq / self.hkv;
        let rows: usize = if self.varlen {
            self.lens.iter().map(|l| l.0).sum()
        } else {
            self.b * self.lens[0].0
        };
        let mut out = vec![0.0; rows * hq * d];
        let mut lse = vec![f64::NEG_INFINITY; rows * hq];
        let (mut q0, mut k0) = (0, 0);
        for (b, &(sq, sk)) in self.lens.iter().enumerate() {
            for h in 0..hq {
                for i in 0..sq {
                    let qrow = &self.q[((q0 + i) * hq + h) * d..][..d];
                    let krow = |j: usize| &self.k[((k0 + j) * self.hkv + h / group) * d..][..d];
                    let vrow = |j: usize| &self.v[((k0 + j) * self.hkv + h / group) * d..][..d];
                    let s: Vec<(usize, f64)> = (0..sk)
                        .filter(|&j| visible(b, h, i, j))
                        .map(|j| {
                            let dot: f64 = qrow
                                .iter()
                                .zip(krow(j))
                                .map(|(&a, &b)| a as f64 * b as f64)
                                .sum();
                            (j, dot * scale)
                        })
                        .collect();
                    let li = if self.varlen {
                        h * rows + q0 + i
                    } else {
                        (b * hq + h) * sq + i
                    };
                    if s.is_empty() {
                        continue;
                    }
                    let m = s.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
                    let l: f64 = s.iter().map(|x| (x.1 - m).exp()).sum();
                    let o = &mut out[((q0 + i) * hq + h) * d..][..d];
                    for &(j, sc) in &s {
                        let p = (sc - m).exp() / l;
                        for (a, &x) in o.iter_mut().zip(vrow(j)) {
                            *a += p * x as f64;
                        }
                    }
                    lse[li] = m + l.ln();
                }
            }
            if self.varlen {
                q0 += sq;
                k0 += sk;
            } else {
                q0 += self.lens[0].0;
                k0 += self.lens[0].1;
            }
        }
        (out, lse)
    }
}

fn check(got: &(Vec<f64>, Vec<f32>), want: &(Vec<f64>, Vec<f64>), what: &str) {
    let err = rel_l2(&got.0, &want.0);
    assert!(err < 2e-5, "{what}: rel l2 {err}");
    check_lse(&got.1, &want.1, 1e-4, what);
}

/// Random lists: each list keeps each key block with a per-list probability, random kinds.
fn random_mask(seed: u64, dims: BlockMaskDims) -> BlockMask {
    let mut r = rng(seed);
    BlockMask::from_lists(dims, |_| {
        let p = [0.0, 0.2, 0.5, 1.0][r.random_range(0..4)];
        let mut list = Vec::new();
        for kb in 0..dims.num_k_blocks {
            if r.random_bool(p) {
                let full = r.random_bool(0.5);
                list.push((
                    kb,
                    if full {
                        BlockKind::Full
                    } else {
                        BlockKind::Partial
                    },
                ));
            }
        }
        list
    })
    .unwrap()
}

fn option_sets() -> Vec<AttentionOptions> {
    vec![
        AttentionOptions::default(),
        AttentionOptions::causal(),
        AttentionOptions::default()
            .with_window(Window::new(Some(9), Some(0)))
            .with_sinks(3),
        AttentionOptions::default()
            .with_window(Window::new(Some(20), Some(5)))
            .with_softcap(5.0),
    ]
}

#[test]
fn random_lists_match_the_reference() {
    // (b, sq, sk, hq, hkv, d, block_m, block_n)
    let shapes = [
        (1, 1, 1, 1, 1, 8, 16, 16),
        (2, 2, 2, 2, 1, 8, 1, 1),
        (1, 37, 53, 4, 2, 16, 16, 8),
        (2, 64, 64, 3, 1, 8, 16, 16),
        (1, 53, 19, 2, 2, 8, 8, 16),
        (1, 130, 200, 4, 1, 16, 64, 32),
        (1, 45, 45, 2, 1, 8, 64, 128),
    ];
    for (n, &(b, sq, sk, hq, hkv, d, bm, bn)) in shapes.iter().enumerate() {
        let case = Case::fixed(n as u64, b, sq, sk, hq, hkv, d);
        for (o, opts) in option_sets().iter().enumerate() {
            let seed = (n * 10 + o) as u64;
            let dims = BlockMaskDims::for_lengths(b, hq, sq, sk, bm, bn).unwrap();
            let bs = BlockSparseAttention::new(case.attn(opts), random_mask(seed, dims)).unwrap();
            let want = case.reference(&bs);
            check(&case.cpu(&bs), &want, &format!("shape {n} opts {o}"));
            // The reference follows the definition: check it against the naive one too.
            let mask = bs.block_mask().clone();
            let em = opts.effective_mask();
            let naive = case.naive(bs.attention().scale() as f64, |b, h, i, j| {
                mask.list(b, h, i / bm).unwrap().iter().any(|(kb, kind)| {
                    kb == j / bn && (kind == BlockKind::Full || em.visible(i, j, sq, sk))
                })
            });
            if opts.softcap.is_none() {
                assert!(rel_l2(&want.0, &naive.0) < 1e-12, "reference vs naive {n}");
            }
        }
    }
}

#[test]
fn broadcast_and_varlen_masks() {
    // Broadcast (batch 1, heads 1) over a batch of 2 with GQA.
    let case = Case::fixed(7, 2, 40, 56, 4, 2, 8);
    let dims = BlockMaskDims::for_lengths(1, 1, 40, 56, 16, 16).unwrap();
    let opts = AttentionOptions::causal();
    let bs = BlockSparseAttention::new(case.attn(&opts), random_mask(3, dims)).unwrap();
    check(&case.cpu(&bs), &case.reference(&bs), "broadcast");

    // Varlen: each sequence uses the leading blocks of its own length.
    let lens = vec![(33, 40), (7, 70), (0, 5), (20, 20)];
    let case = Case::build(8, lens.clone(), true, 2, 1, 8);
    let attn = case.attn(&opts);
    let (bm, bn) = (16, 16);
    let dims = BlockMaskDims::for_lengths(4, 2, 33, 70, bm, bn).unwrap();
    let mut r = rng(5);
    let mask = BlockMask::from_lists(dims, |id| {
        let (sq, sk) = lens[id.batch];
        if id.q_block >= sq.div_ceil(bm) {
            return vec![];
        }
        (0..sk.div_ceil(bn))
            .filter(|_| r.random_bool(0.6))
            .map(|kb| (kb, BlockKind::Partial))
            .collect()
    })
    .unwrap();
    let bs = BlockSparseAttention::new(attn.clone(), mask).unwrap();
    check(&case.cpu(&bs), &case.reference(&bs), "varlen");
    // A list past a sequence's end, or a key block past its keys, is an error.
    let past = BlockMask::from_lists(dims, |id| {
        if id.batch == 1 && id.q_block == 1 {
            vec![(0, BlockKind::Partial)]
        } else {
            vec![]
        }
    })
    .unwrap();
    assert!(matches!(
        BlockSparseAttention::new(attn.clone(), past),
        Err(BlockMaskError::ListPastEnd { .. })
    ));
    let beyond = BlockMask::from_lists(dims, |id| {
        if id.batch == 0 && id.q_block == 0 {
            vec![(3, BlockKind::Partial)]
        } else {
            vec![]
        }
    })
    .unwrap();
    assert!(matches!(
        BlockSparseAttention::new(attn, beyond),
        Err(BlockMaskError::IndexOutOfRange {
            num_k_blocks: 3,
            ..
        })
    ));
}

#[test]
fn all_partial_blocks_are_dense_attention() {
    let case = Case::fixed(11, 2, 70, 90, 4, 2, 16);
    for opts in option_sets() {
        let attn = case.attn(&opts);
        let dims = BlockMaskDims::for_lengths(2, 4, 70, 90, 32, 16).unwrap();
        let bs = BlockSparseAttention::new(
            attn.clone(),
            BlockMask::dense(dims, BlockKind::Partial).unwrap(),
        )
        .unwrap();
        let (qs, ks) = case.strides();
        let want = dense_attention_f64(
            &attn,
            Strided::new(&case.q[..], qs),
            Strided::new(&case.k[..], ks),
            Strided::new(&case.v[..], ks),
        )
        .unwrap();
        check(&case.cpu(&bs), &want, "dense");
    }
}

#[test]
fn empty_lists_and_fully_masked_rows_give_zero_and_neg_inf() {
    let case = Case::fixed(12, 1, 40, 24, 2, 1, 8);
    // No block at all.
    let dims = BlockMaskDims::for_lengths(1, 2, 40, 24, 16, 16).unwrap();
    let empty = BlockMask::from_lists(dims, |_| vec![]).unwrap();
    let bs = BlockSparseAttention::new(case.attn(&AttentionOptions::causal()), empty).unwrap();
    let (out, lse) = case.cpu(&bs);
    assert!(out.iter().all(|&x| x == 0.0));
    assert!(lse.iter().all(|&x| x == f32::NEG_INFINITY));
    // Causal with sq > sk: the first 16 rows see no key even with every block listed.
    let all = BlockMask::dense(dims, BlockKind::Partial).unwrap();
    let bs = BlockSparseAttention::new(case.attn(&AttentionOptions::causal()), all).unwrap();
    let (out, lse) = case.cpu(&bs);
    for h in 0..2 {
        for i in 0..40 {
            let masked = i < 16;
            assert_eq!(lse[h * 40 + i] == f32::NEG_INFINITY, masked, "row {i}");
            assert!(!lse[h * 40 + i].is_nan());
        }
    }
    assert!(out[..16 * 2 * 8].iter().all(|&x| x == 0.0));
    check(&(out, lse), &case.reference(&bs), "masked rows");
}

#[test]
fn full_blocks_skip_the_element_mask() {
    // Causal options, but the upper-right block listed as Full: its keys are visible.
    let case = Case::fixed(13, 1, 32, 32, 1, 1, 8);
    let dims = BlockMaskDims::for_lengths(1, 1, 32, 32, 16, 16).unwrap();
    let mask = BlockMask::from_lists(dims, |id| match id.q_block {
        0 => vec![(0, BlockKind::Partial), (1, BlockKind::Full)],
        _ => vec![(1, BlockKind::Partial)],
    })
    .unwrap();
    let bs = BlockSparseAttention::new(case.attn(&AttentionOptions::causal()), mask).unwrap();
    let em = Mask::new(Window::CAUSAL, 0);
    let want = case.naive(bs.attention().scale() as f64, |_, _, i, j| {
        if i < 16 {
            // Key block 0 causal, key block 1 full.
            j >= 16 || em.visible(i, j, 32, 32)
        } else {
            j >= 16 && j <= i
        }
    });
    check(&case.cpu(&bs), &want, "full skips mask");
}

#[test]
fn patterns_equal_their_element_masks() {
    let (sq, sk, bl, hq) = (96, 128, 16, 4); // shift = 2 blocks
    let case = Case::fixed(21, 2, sq, sk, hq, 2, 8);
    let shift = (sk - sq) / bl;
    let nk = sk / bl;
    type Pred = Box<dyn Fn(usize, usize, usize) -> bool>; // (head, qb', kb)
    for opts in [AttentionOptions::default(), AttentionOptions::causal()] {
        let shape = PatternShape {
            heads: hq,
            seqlen_q: sq,
            seqlen_k: sk,
            block: bl,
            mask: opts.effective_mask(),
        };
        let passages = [2, 3, 1, 2];
        let ends = [2, 5, 6, 8];
        let passage = move |kb: usize| ends.iter().position(|&e| kb < e).unwrap();
        let windows = [1, 2, 3, 8];
        let streaming = [true, false, true, false];
        let cases: Vec<(&str, BlockMask, Pred)> = vec![
            (
                "longformer",
                patterns::longformer(&shape, 1, 1).unwrap(),
                Box::new(|_, q, k| q.abs_diff(k) <= 1 || k < 1 || q < 1),
            ),
            (
                "bigbird",
                patterns::bigbird(&shape, 1, 1, 2, 42).unwrap(),
                Box::new(move |h, q, k| {
                    q.abs_diff(k) <= 1
                        || k < 1
                        || q < 1
                        || patterns::bigbird_random_blocks(42, h, q, nk, 2)
                            .unwrap()
                            .contains(&k)
                }),
            ),
            (
                "strided",
                patterns::sparse_transformer_strided(&shape, 3).unwrap(),
                Box::new(|_, q, k| k <= q && (q - k < 3 || (q - k) % 3 == 0)),
            ),
            (
                "fixed",
                patterns::sparse_transformer_fixed(&shape, 4, 1).unwrap(),
                Box::new(|_, q, k| k <= q && (k / 4 == q / 4 || k % 4 == 3)),
            ),
            (
                "block-attention",
                patterns::block_attention(&shape, &passages).unwrap(),
                Box::new(move |_, q, k| passage(q) == 3 || passage(q) == passage(k)),
            ),
            (
                "mswa",
                patterns::per_head_windows(&shape, &windows).unwrap(),
                Box::new(move |h, q, k| k <= q && q - k < windows[h]),
            ),
            (
                "duo",
                patterns::streaming_heads(&shape, &streaming, 1, 2).unwrap(),
                Box::new(move |h, q, k| k <= q && (!streaming[h] || k < 1 || q - k < 2)),
            ),
        ];
        for (name, mask, pred) in cases {
            let bs = BlockSparseAttention::new(case.attn(&opts), mask).unwrap();
            let em = opts.effective_mask();
            let want = case.naive(bs.attention().scale() as f64, |_, h, i, j| {
                pred(h, i / bl + shift, j / bl) && em.visible(i, j, sq, sk)
            });
            check(&case.cpu(&bs), &want, name);
            let reference = case.reference(&bs);
            assert!(rel_l2(&reference.0, &want.0) < 1e-12, "{name}: reference");
            // Full is exact: the same mask with every block Partial gives the same result.
            let m = bs.block_mask();
            let partial = BlockMask::from_csr(
                m.dims(),
                m.offsets().to_vec(),
                m.indices().to_vec(),
                vec![false; m.nnz()],
            )
            .unwrap();
            let bs2 = BlockSparseAttention::new(case.attn(&opts), partial).unwrap();
            assert!(
                rel_l2(&case.reference(&bs2).0, &want.0) < 1e-12,
                "{name}: full exact"
            );
        }
    }
}

/// MoBA's gate as `moba_attn_varlen_naive` computes it, for one row at position `p` over
/// `n` key blocks: own block `+inf`, own-and-later `-inf` (set first), past blocks `q . mean`;
/// then the top `min(top_k, n)` by (value desc, index asc), dropping `-inf` picks (MoBA masks
/// them causally afterwards).
fn moba_brute(gate_past: &[f64], p: usize, bn: usize, n: usize, top_k: usize) -> Vec<usize> {
    let own = p / bn;
    let mut gate: Vec<(f64, usize)> = (0..n)
        .map(|kb| {
            let g = if kb == own {
                f64::INFINITY
            } else if (kb + 1) * bn > p {
                f64::NEG_INFINITY
            } else {
                gate_past[kb]
            };
            (g, kb)
        })
        .collect();
    gate.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
    let mut sel: Vec<usize> = gate
        .into_iter()
        .take(top_k.min(n))
        .filter(|g| g.0 > f64::NEG_INFINITY)
        .map(|g| g.1)
        .collect();
    sel.sort_unstable();
    sel
}

#[test]
fn moba_selection_matches_brute_force() {
    // (sq, sk, hq, hkv, bn, top_k, quantise): quantised inputs force ties.
    let cases = [
        (60, 60, 2, 1, 8, 3, false),
        (23, 70, 4, 2, 16, 2, false),
        (40, 40, 1, 1, 4, 5, true),
        (9, 9, 1, 1, 16, 1, false),
        (50, 50, 2, 2, 7, 100, false),
    ];
    for (n, &(sq, sk, hq, hkv, bn, top_k, quant)) in cases.iter().enumerate() {
        let d = 8;
        let mut case = Case::fixed(30 + n as u64, 1, sq, sk, hq, hkv, d);
        if quant {
            case.q.iter_mut().for_each(|x| *x = x.signum());
            case.k.iter_mut().for_each(|x| *x = 1.0);
        }
        let attn = case.attn(&AttentionOptions::causal());
        let (qs, ks) = case.strides();
        let cfg = MobaConfig { block_n: bn, top_k };
        let rows = moba_select_cpu(
            &attn,
            &cfg,
            Strided::new(&case.q[..], qs),
            Strided::new(&case.k[..], ks),
        )
        .unwrap();
        let nblk = sk.div_ceil(bn);
        for h in 0..hq {
            let kvh = h / (hq / hkv);
            let mean = |kb: usize, c: usize| {
                let js = kb * bn..((kb + 1) * bn).min(sk);
                let len = js.len() as f64;
                js.map(|j| case.k[(j * hkv + kvh) * d + c] as f64)
                    .sum::<f64>()
                    / len
            };
            for i in 0..sq {
                let p = i + sk - sq;
                let qi = &case.q[(i * hq + h) * d..][..d];
                let gate: Vec<f64> = (0..nblk)
                    .map(|kb| (0..d).map(|c| qi[c] as f64 * mean(kb, c)).sum())
                    .collect();
                let want = moba_brute(&gate, p, bn, nblk, top_k);
                let got: Vec<usize> = rows
                    .row((h * sq) + i)
                    .unwrap()
                    .iter()
                    .map(|&x| x as usize)
                    .collect();
                assert_eq!(got, want, "case {n} head {h} row {i}");
            }
        }
        assert_eq!(
            rows.top_k(),
            top_k.min(nblk),
            "slots are capped by the block count"
        );
        if quant {
            // All pooled keys equal: ties go to the lower block index.
            let got = rows.row(sq - 1).unwrap();
            assert_eq!(got, &[0, 1, 2, 3, 9][..]);
        }
    }
}

#[test]
fn moba_attention_is_masked_per_row() {
    let (sq, sk, hq, hkv, d, bn, top_k) = (70, 100, 4, 2, 8, 8, 3);
    let case = Case::fixed(40, 2, sq, sk, hq, hkv, d);
    let attn = case.attn(&AttentionOptions::causal());
    let (qs, ks) = case.strides();
    let cfg = MobaConfig { block_n: bn, top_k };
    let q = || Strided::new(&case.q[..], qs);
    let k = || Strided::new(&case.k[..], ks);
    let rows = moba_select_cpu(&attn, &cfg, q(), k()).unwrap();
    for bm in [16, 64] {
        let bs = moba_attention(&attn, &cfg, bm, q(), k()).unwrap();
        let want = case.naive(attn.scale() as f64, |b, h, i, j| {
            j <= i + sk - sq
                && rows
                    .row((b * hq + h) * sq + i)
                    .unwrap()
                    .contains(&((j / bn) as i32))
        });
        check(&case.cpu(&bs), &want, "moba");
        assert!(rel_l2(&case.reference(&bs).0, &want.0) < 1e-12);
        // Without the per-row masks the tile unions see more.
        let union = moba_block_mask(&attn, &rows, bm).unwrap();
        assert!(union.nnz() > 0);
    }
}

/// The per-tile unions (the GPU attention's visiting lists) are the lists of the union block
/// mask under causal options (where no selected block is hidden entirely), for fixed and
/// varlen batches, seqlen_q != seqlen_k both ways, rows before key 0, and tiles of 64 rows
/// and of other sizes; tiles past a varlen sequence's end are empty.
#[test]
fn moba_tile_unions_are_the_union_masks_lists() {
    let cases = [
        Case::fixed(60, 2, 150, 200, 4, 2, 8),
        Case::fixed(61, 1, 130, 70, 2, 2, 8), // sq > sk: the first rows see nothing
        Case::build(62, vec![(70, 90), (5, 300), (140, 140)], true, 4, 1, 8),
    ];
    for (n, case) in cases.iter().enumerate() {
        let attn = case.attn(&AttentionOptions::causal());
        let (qs, ks) = case.strides();
        for (bn, top_k) in [(16, 3), (8, 1), (32, 40)] {
            let cfg = MobaConfig { block_n: bn, top_k };
            let rows = moba_select_cpu(
                &attn,
                &cfg,
                Strided::new(&case.q[..], qs),
                Strided::new(&case.k[..], ks),
            )
            .unwrap();
            for tile in [GPU_TILE_ROWS, 16, 7] {
                let unions = moba_tile_unions(&attn, &rows, tile).unwrap();
                let mask = moba_block_mask(&attn, &rows, tile).unwrap();
                let nt = attn.max_seqlen_q().div_ceil(tile);
                assert_eq!(unions.len(), case.b * case.hq * nt, "case {n}");
                for b in 0..case.b {
                    let sq = attn.span(b).unwrap().seqlen_q;
                    for h in 0..case.hq {
                        for x in 0..nt {
                            let got = &unions[(b * case.hq + h) * nt + x];
                            let want: Vec<i32> = mask.list(b, h, x).unwrap().indices.to_vec();
                            assert_eq!(got, &want, "case {n} bn {bn} tile {tile} ({b}, {h}, {x})");
                            if x * tile >= sq {
                                assert!(got.is_empty());
                            }
                            assert!(
                                got.len() <= (tile * rows.top_k()).min(sq.max(1) * rows.top_k())
                            );
                        }
                    }
                }
            }
        }
    }
    let attn = cases[0].attn(&AttentionOptions::causal());
    let rows = longattn::block_sparse::RowBlocks::new(16, 1, vec![-1; attn.lse_len()]).unwrap();
    assert!(matches!(
        moba_tile_unions(&attn, &rows, 0),
        Err(BlockMaskError::BadDim { .. })
    ));
    let short = longattn::block_sparse::RowBlocks::new(16, 1, vec![-1; 3]).unwrap();
    assert!(matches!(
        moba_tile_unions(&attn, &short, 64),
        Err(BlockMaskError::Mismatch { .. })
    ));
}

/// The pooled keys are the blocks' means (the last block short), 0 past a varlen
/// sequence's end, in `[batch, heads_kv, num_k_blocks, d]`.
#[test]
fn moba_pooled_keys_are_block_means() {
    let case = Case::build(63, vec![(10, 50), (10, 20)], true, 2, 2, 8);
    let attn = case.attn(&AttentionOptions::causal());
    let (qs, ks) = case.strides();
    let bn = 16;
    let cfg = MobaConfig {
        block_n: bn,
        top_k: 2,
    };
    let pooled = moba_pooled_keys_cpu(
        &attn,
        &cfg,
        Strided::new(&case.q[..], qs),
        Strided::new(&case.k[..], ks),
    )
    .unwrap();
    let (hkv, d, nk) = (2, 8, 50usize.div_ceil(bn));
    assert_eq!(pooled.len(), 2 * hkv * nk * d);
    let k0 = [0, 50];
    for (b, &sk) in [50usize, 20].iter().enumerate() {
        for kvh in 0..hkv {
            for kb in 0..nk {
                for c in 0..d {
                    let js = kb * bn..((kb + 1) * bn).min(sk);
                    let want = if js.is_empty() {
                        0.0
                    } else {
                        let n = js.len() as f64;
                        js.map(|j| case.k[((k0[b] + j) * hkv + kvh) * d + c] as f64)
                            .sum::<f64>()
                            / n
                    };
                    let got = pooled[((b * hkv + kvh) * nk + kb) * d + c];
                    assert!((got - want).abs() < 1e-12, "({b}, {kvh}, {kb}, {c})");
                }
            }
        }
    }
    // Bad config and short buffers are errors.
    let bad = MobaConfig {
        block_n: 0,
        top_k: 2,
    };
    let r = moba_pooled_keys_cpu(
        &attn,
        &bad,
        Strided::new(&case.q[..], qs),
        Strided::new(&case.k[..], ks),
    );
    assert!(matches!(r, Err(Error::InvalidOption(_))), "{r:?}");
    let r = moba_pooled_keys_cpu(
        &attn,
        &cfg,
        Strided::new(&case.q[..], qs),
        Strided::new(&case.k[..10], ks),
    );
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
}

/// The GPU path's host validation runs without a GPU: what it takes and what it refuses.
#[test]
fn moba_gpu_dims_validate_on_the_host() {
    let case = Case::fixed(64, 1, 300, 1000, 4, 2, 64);
    let attn = case.attn(&AttentionOptions::causal());
    let d = MobaGpuDims::new(
        &attn,
        &MobaConfig {
            block_n: 128,
            top_k: 4,
        },
    )
    .unwrap();
    assert_eq!(
        (d.num_k_blocks, d.slots, d.num_tiles, d.union_width),
        (8, 4, 5, 8)
    );
    let r = MobaGpuDims::new(
        &attn,
        &MobaConfig {
            block_n: 96,
            top_k: 4,
        },
    );
    assert!(
        matches!(&r, Err(Error::Unsupported(m)) if m.contains("multiple of 64")),
        "{r:?}"
    );
    // top_k 33 is capped at the 16 key blocks of this problem, but not at 40.
    let many = MobaConfig {
        block_n: 64,
        top_k: 33,
    };
    assert_eq!(MobaGpuDims::new(&attn, &many).unwrap().slots, 16);
    let long = Case::fixed(66, 1, 64, 64 * 40, 1, 1, 64).attn(&AttentionOptions::causal());
    let r = MobaGpuDims::new(&long, &many);
    assert!(
        matches!(&r, Err(Error::Unsupported(m)) if m.contains("top_k")),
        "{r:?}"
    );
    let odd = Case::fixed(65, 1, 64, 64, 1, 1, 40).attn(&AttentionOptions::causal());
    let r = MobaGpuDims::new(
        &odd,
        &MobaConfig {
            block_n: 64,
            top_k: 1,
        },
    );
    assert!(
        matches!(&r, Err(Error::Unsupported(m)) if m.contains("head_dim")),
        "{r:?}"
    );
}

#[test]
fn moba_query_block_selection_matches_brute_force() {
    let (sq, sk, hq, d, bm, bn, top_k) = (48, 80, 2, 8, 16, 8, 4);
    let case = Case::fixed(41, 1, sq, sk, hq, 1, d);
    let attn = case.attn(&AttentionOptions::causal());
    let (qs, ks) = case.strides();
    let cfg = MobaConfig { block_n: bn, top_k };
    let mask = moba_select_blocks_cpu(
        &attn,
        &cfg,
        bm,
        Strided::new(&case.q[..], qs),
        Strided::new(&case.k[..], ks),
    )
    .unwrap();
    for h in 0..hq {
        for qb in 0..sq / bm {
            let (p0, p1) = (qb * bm + sk - sq, (qb + 1) * bm - 1 + sk - sq);
            let pq: Vec<f64> = (0..d)
                .map(|c| {
                    (0..bm)
                        .map(|r| case.q[((qb * bm + r) * hq + h) * d + c] as f64)
                        .sum::<f64>()
                        / bm as f64
                })
                .collect();
            let mut past: Vec<(f64, usize)> = (0..p0 / bn)
                .map(|kb| {
                    let s = (0..d)
                        .map(|c| {
                            pq[c]
                                * (0..bn)
                                    .map(|j| case.k[(kb * bn + j) * d + c] as f64)
                                    .sum::<f64>()
                                / bn as f64
                        })
                        .sum();
                    (s, kb)
                })
                .collect();
            past.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
            let diag: Vec<usize> = (p0 / bn..=p1 / bn).collect();
            let mut want: Vec<usize> = past
                .iter()
                .take(top_k.saturating_sub(diag.len()))
                .map(|x| x.1)
                .chain(diag)
                .collect();
            want.sort_unstable();
            let got: Vec<usize> = mask.list(0, h, qb).unwrap().iter().map(|x| x.0).collect();
            assert_eq!(got, want, "head {h} block {qb}");
        }
    }
    let bs = BlockSparseAttention::new(attn, mask).unwrap();
    check(&case.cpu(&bs), &case.reference(&bs), "moba blocks");
}

#[test]
fn bad_lists_are_named_errors() {
    let dims = BlockMaskDims::for_lengths(1, 1, 32, 48, 16, 16).unwrap(); // 2 lists, 3 blocks
    let f = |n: usize| vec![false; n];
    let csr = |o: Vec<i32>, i: Vec<i32>| {
        let n = i.len();
        BlockMask::from_csr(dims, o, i, f(n))
    };
    let id = |qb| ListId {
        batch: 0,
        head: 0,
        q_block: qb,
    };
    assert_eq!(
        csr(vec![0, 1], vec![0]),
        Err(BlockMaskError::OffsetsLength { got: 2, want: 3 })
    );
    assert!(matches!(
        csr(vec![1, 1, 1], vec![0]),
        Err(BlockMaskError::BadOffset { at: 0, .. })
    ));
    assert!(matches!(
        csr(vec![0, 2, 1], vec![0, 1]),
        Err(BlockMaskError::BadOffset { at: 2, .. })
    ));
    assert!(matches!(
        csr(vec![0, 1, 1], vec![0, 1]),
        Err(BlockMaskError::BadOffset { at: 2, .. })
    ));
    assert_eq!(
        csr(vec![0, 1, 2], vec![0, 3]),
        Err(BlockMaskError::IndexOutOfRange {
            list: id(1),
            index: 3,
            num_k_blocks: 3
        })
    );
    assert_eq!(
        csr(vec![0, 1, 2], vec![-1, 0]),
        Err(BlockMaskError::IndexOutOfRange {
            list: id(0),
            index: -1,
            num_k_blocks: 3
        })
    );
    assert_eq!(
        csr(vec![0, 0, 2], vec![2, 1]),
        Err(BlockMaskError::Unsorted {
            list: id(1),
            position: 1
        })
    );
    assert_eq!(
        csr(vec![0, 2, 2], vec![1, 1]),
        Err(BlockMaskError::Duplicate {
            list: id(0),
            index: 1
        })
    );
    assert_eq!(
        BlockMask::from_csr(dims, vec![0, 1, 1], vec![0], f(2)),
        Err(BlockMaskError::FlagsLength { got: 2, want: 1 })
    );
    assert!(matches!(
        BlockMaskDims::for_lengths(1, 1, 32, 48, 0, 16),
        Err(BlockMaskError::BadDim {
            name: "block_m",
            ..
        })
    ));
    let huge = BlockMaskDims {
        batch: usize::MAX,
        heads: 2,
        num_q_blocks: 1,
        num_k_blocks: 1,
        block_m: 1,
        block_n: 1,
    };
    assert!(matches!(
        BlockMask::from_csr(huge, vec![0], vec![], vec![]),
        Err(BlockMaskError::TooLarge { .. })
    ));
    // Binding: dims must match the problem.
    let case = Case::fixed(50, 2, 32, 48, 2, 1, 8);
    let attn = case.attn(&AttentionOptions::default());
    let ok = |d: BlockMaskDims| BlockMask::from_lists(d, |_| vec![]).unwrap();
    let wrong_heads = BlockMaskDims::for_lengths(2, 3, 32, 48, 16, 16).unwrap();
    assert_eq!(
        BlockSparseAttention::new(attn.clone(), ok(wrong_heads)).unwrap_err(),
        BlockMaskError::Mismatch {
            what: "heads",
            got: 3,
            want: 2
        }
    );
    let wrong_k = BlockMaskDims::for_lengths(2, 2, 32, 64, 16, 16).unwrap();
    assert!(matches!(
        BlockSparseAttention::new(attn.clone(), ok(wrong_k)),
        Err(BlockMaskError::Mismatch {
            what: "num_k_blocks",
            ..
        })
    ));
    // Row selections.
    let good = BlockMaskDims::for_lengths(2, 2, 32, 48, 16, 16).unwrap();
    let bs = BlockSparseAttention::new(attn.clone(), ok(good)).unwrap();
    let rows = |v: Vec<i32>| RowBlocks::new(16, 2, v).unwrap();
    let n = attn.lse_len() * 2;
    let mut unsorted = vec![-1; n];
    unsorted[0] = 2;
    unsorted[1] = 1;
    assert!(matches!(
        bs.clone().with_row_blocks(rows(unsorted)),
        Err(BlockMaskError::BadRow { row: 0, .. })
    ));
    let mut gap = vec![-1; n];
    gap[3] = 1;
    assert!(matches!(
        bs.clone().with_row_blocks(rows(gap)),
        Err(BlockMaskError::BadRow { row: 1, .. })
    ));
    assert!(matches!(
        bs.clone().with_row_blocks(rows(vec![-1; n - 2])),
        Err(BlockMaskError::Mismatch { .. })
    ));
    assert!(bs.clone().with_row_blocks(rows(vec![-1; n])).is_ok());
    assert!(matches!(
        RowBlocks::new(16, 0, vec![]),
        Err(BlockMaskError::BadDim { name: "top_k", .. })
    ));
    // Per-tile unions from malformed rows are refused too.
    let mut big = vec![-1; n];
    big[0] = 7;
    assert!(matches!(
        moba_block_mask(&attn, &rows(big), 16),
        Err(BlockMaskError::BadRow { row: 0, .. })
    ));
    // Out-of-range list lookups are None, broadcast dims serve every index.
    let m = ok(good);
    assert!(m.list(0, 0, 2).is_none() && m.list(2, 0, 0).is_none() && m.list(0, 2, 0).is_none());
    let bcast = ok(BlockMaskDims::for_lengths(1, 1, 32, 48, 16, 16).unwrap());
    assert!(bcast.list(5, 9, 1).is_some());
    // GPU block sizes are multiples of 64.
    assert!(
        BlockMaskDims::for_lengths(1, 1, 256, 256, 128, 64)
            .unwrap()
            .check_gpu_block_sizes()
            .is_ok()
    );
    assert!(matches!(
        good.check_gpu_block_sizes(),
        Err(BlockMaskError::BadDim {
            name: "block_m",
            ..
        })
    ));
    // Errors convert into the crate's Error for `?`.
    let e: Error = BlockMaskError::Duplicate {
        list: id(0),
        index: 1,
    }
    .into();
    assert!(matches!(e, Error::Index(_)));
}

#[test]
fn flex_parts_split_lists_by_kind() {
    let dims = BlockMaskDims::for_lengths(1, 2, 32, 48, 16, 16).unwrap();
    let mask = BlockMask::from_lists(dims, |id| match (id.head, id.q_block) {
        (0, 0) => vec![(0, BlockKind::Full), (2, BlockKind::Partial)],
        (1, 1) => vec![
            (0, BlockKind::Partial),
            (1, BlockKind::Full),
            (2, BlockKind::Full),
        ],
        _ => vec![],
    })
    .unwrap();
    let p = mask.to_flex_parts().unwrap();
    assert_eq!(p.kv_num_blocks, vec![1, 0, 0, 1]);
    assert_eq!(p.full_kv_num_blocks, vec![1, 0, 0, 2]);
    assert_eq!(&p.kv_indices[..3], &[2, 0, 0]);
    assert_eq!(&p.kv_indices[9..], &[0, 0, 0]);
    assert_eq!(&p.full_kv_indices[9..], &[1, 2, 0]);
    assert!((mask.density() - 5.0 / 12.0).abs() < 1e-12);
}

#[test]
fn bf16_inputs_follow_the_reference() {
    // The CPU path accumulates in f32 from bf16 elements; the reference reads the same values.
    let (sq, sk, hq, d) = (33, 47, 2, 16);
    let mut r = rng(60);
    let q: Vec<bf16> = random_vec(&mut r, sq * hq * d);
    let k: Vec<bf16> = random_vec(&mut r, sk * d);
    let v: Vec<bf16> = random_vec(&mut r, sk * d);
    let shape = AttentionShape {
        batch: 1,
        heads_q: hq,
        heads_kv: 1,
        head_dim: d,
        seqlens: SeqLens::Fixed {
            seqlen_q: sq,
            seqlen_k: sk,
        },
    };
    let attn = FlashAttention::new(&shape, &AttentionOptions::causal()).unwrap();
    let dims = BlockMaskDims::for_lengths(1, hq, sq, sk, 16, 16).unwrap();
    let bs = BlockSparseAttention::new(attn, random_mask(61, dims)).unwrap();
    let (qs, ks) = (
        Strides::contiguous(sq, hq, d),
        Strides::contiguous(sk, 1, d),
    );
    let mut out = vec![bf16::from_f32(f32::NAN); sq * hq * d];
    let mut lse = vec![f32::NAN; hq * sq];
    bs.forward_cpu(
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
        Strided::new(&mut out[..], qs),
        Some(&mut lse),
    )
    .unwrap();
    let want = block_sparse_attention_f64(
        &bs,
        Strided::new(&q[..], qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
    )
    .unwrap();
    assert!(rel_l2(&to_f64(&out), &want.0) < 1e-2);
    check_lse(&lse, &want.1, 1e-3, "bf16");
}
