//! Paged sparse decode: append + metadata, Quest selection, decode over the paged cache.
//! Oracles: paged decode == dense attention over the same tokens laid out contiguously;
//! Quest selection == brute-force top-B; sparse decode == dense attention over the selected
//! pages' tokens; appended metadata == bounds recomputed from the cache. The CPU path; the
//! GPU kernels are tested against it in `paged_gpu.rs` (fixtures in `common/paged.rs`).

use longattn::paged::DECODE_ROWS_PER_BLOCK;
use longattn::reference::dense_attention_f64;
use longattn::reference::paged::{page_bounds, quest_scores_f64, quest_select_brute};
use longattn::{
    AttentionOptions, AttentionShape, Element, Error, FlashAttention, HeadPolicy, KvPages,
    PageLists, PageMeta, PageTable, PagedCache, PagedDecode, PagedLayout, QuestConfig, SeqLens,
    SparsePolicy, StreamingConfig, Strided, Strides, Window, bf16, f16,
};

mod common;
use common::paged::*;
use common::*;

/// `cache.append_cpu` of the new tokens `kv` (offsets `cu`, strides `s`) as both K and V
/// into `kc`, `vc`, and into the page bounds `(kmin, kmax)` when given.
fn append_kv_same(
    cache: &PagedCache,
    cu: &[i32],
    kv: &[f32],
    s: Strides,
    (kc, vc): (&mut [f32], &mut [f32]),
    meta: Option<(&mut [f32], &mut [f32])>,
) -> longattn::Result<()> {
    cache.append_cpu(
        cu,
        Strided::new(kv, s),
        Strided::new(kv, s),
        KvPages { k: kc, v: vc },
        meta.map(|(kmin, kmax)| PageMeta { kmin, kmax }),
    )
}

/// Dense f64 reference over the contiguous tokens (varlen batch): out `[batch * q_len,
/// heads_q, d]` and LSE re-laid out as `[batch, heads_q, q_len]`.
fn dense_reference<T: Element>(
    sc: &Scenario<T>,
    q: &[T],
    heads_q: usize,
    q_len: usize,
    options: &AttentionOptions,
) -> (Vec<f64>, Vec<f64>) {
    let (hkv, d) = (sc.cache.heads_kv(), sc.cache.head_dim());
    let batch = sc.cache.batch();
    let cu_q: Vec<i32> = (0..=batch).map(|b| (b * q_len) as i32).collect();
    let mut cu_k = vec![0i32];
    for b in 0..batch {
        cu_k.push(cu_k[b] + sc.cache.seqlen(b).unwrap() as i32);
    }
    let k: Vec<T> = sc.k_tokens.concat();
    let v: Vec<T> = sc.v_tokens.concat();
    let attn = FlashAttention::new(
        &AttentionShape {
            batch,
            heads_q,
            heads_kv: hkv,
            head_dim: d,
            seqlens: SeqLens::Varlen {
                cu_seqlens_q: &cu_q,
                cu_seqlens_k: &cu_k,
            },
        },
        options,
    )
    .unwrap();
    let qs = Strides {
        batch: 0,
        ..Strides::contiguous(1, heads_q, d)
    };
    let ks = Strides {
        batch: 0,
        ..Strides::contiguous(1, hkv, d)
    };
    let (out, lse_v) = dense_attention_f64(
        &attn,
        Strided::new(q, qs),
        Strided::new(&k[..], ks),
        Strided::new(&v[..], ks),
    )
    .unwrap();
    // Varlen LSE is [heads_q, total_q]; paged is [batch, heads_q, q_len].
    let total_q = batch * q_len;
    let mut lse = vec![0.0; batch * heads_q * q_len];
    for b in 0..batch {
        for h in 0..heads_q {
            for i in 0..q_len {
                lse[(b * heads_q + h) * q_len + i] = lse_v[h * total_q + b * q_len + i];
            }
        }
    }
    (out, lse)
}

/// Decode queries are causal among the new tokens: the default options (no window) and any
/// window without a right bound decode causally; an explicit right bound is kept.
#[test]
fn decode_is_causal_among_new_tokens_unless_told_otherwise() {
    let sc = scenario::<f32>(&[0, 3, 40], 4, 2, 8, 9);
    let causal = AttentionOptions::causal();
    let cases = [
        (AttentionOptions::default(), causal),
        (
            AttentionOptions::default().with_window(Window::new(Some(5), None)),
            causal.with_window(Window::new(Some(5), Some(0))),
        ),
        (
            AttentionOptions::default().with_window(Window::new(None, Some(2))),
            AttentionOptions::default().with_window(Window::new(None, Some(2))),
        ),
    ];
    for (given, means) in cases {
        let dec = PagedDecode::new(&sc.cache, 4, 4, &given).unwrap();
        assert_eq!(dec.base_mask(), means.effective_mask(), "{given:?}");
        let q: Vec<f32> = random_vec(&mut rng(3), 3 * 4 * 4 * 8);
        let (out, lse) = decode_cpu(&dec, &sc, &q);
        let (want, want_lse) = dense_reference(&sc, &q, 4, 4, &means);
        assert!(rel_l2(&to_f64(&out), &want) < 1e-5, "{given:?}");
        check_lse(&lse, &want_lse, 1e-4, "causal decode");
    }
}

#[test]
fn validation_errors_not_panics() {
    let layout = PagedLayout {
        num_pages: 4,
        page_size: 16,
        heads_kv: 2,
        head_dim: 8,
    };
    let table = [0, 1, 2, 3];
    let ok = |l: PagedLayout, bt: &[i32], mp: usize, sl: &[i32]| {
        PagedCache::new(
            l,
            PageTable {
                block_table: bt,
                max_pages_per_seq: mp,
                seqlens_k: sl,
            },
        )
    };
    assert!(ok(layout, &table, 4, &[64]).is_ok());
    // Page id out of range.
    assert!(matches!(
        ok(layout, &[0, 9, 2, 3], 4, &[20]),
        Err(Error::Index(_))
    ));
    // -1 past the sequence's pages is fine; inside it is not.
    assert!(ok(layout, &[0, -1, -1, -1], 4, &[16]).is_ok());
    assert!(matches!(
        ok(layout, &[0, -1, -1, -1], 4, &[17]),
        Err(Error::Index(_))
    ));
    // Sequence longer than its table row.
    assert!(matches!(ok(layout, &table, 4, &[65]), Err(Error::Index(_))));
    assert!(matches!(ok(layout, &table, 4, &[-1]), Err(Error::Index(_))));
    // Page size 0, zero heads.
    assert!(matches!(
        ok(
            PagedLayout {
                page_size: 0,
                ..layout
            },
            &table,
            4,
            &[1]
        ),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        ok(
            PagedLayout {
                heads_kv: 0,
                ..layout
            },
            &table,
            4,
            &[1]
        ),
        Err(Error::Shape(_))
    ));
    // Table length mismatch.
    assert!(matches!(
        ok(layout, &table[..3], 4, &[1]),
        Err(Error::Shape(_))
    ));
    let cache = ok(layout, &table, 4, &[40]).unwrap();
    // Head mismatch: heads_q not a multiple of heads_kv.
    assert!(matches!(
        PagedDecode::new(&cache, 3, 1, &AttentionOptions::causal()),
        Err(Error::Shape(_))
    ));
    assert!(PagedDecode::new(&cache, 4, 0, &AttentionOptions::causal()).is_err());
    assert!(PagedDecode::new(&cache, 4, 17, &AttentionOptions::causal()).is_err());
    let dec = PagedDecode::new(&cache, 4, 1, &AttentionOptions::causal()).unwrap();
    // Policy length mismatch, list out of range, zero splits.
    assert!(
        dec.clone()
            .with_policy(SparsePolicy::uniform(3, HeadPolicy::Full))
            .is_err()
    );
    let lists = PageLists::new(1, 2, vec![vec![0, 3], vec![1]]).unwrap();
    assert!(matches!(
        dec.clone().with_page_lists(lists),
        Err(Error::Index(_))
    ));
    assert!(dec.clone().with_splits(Some(0)).is_err());
    let streaming =
        SparsePolicy::uniform(2, HeadPolicy::Streaming).with_streaming(StreamingConfig {
            sinks: 0,
            window: 0,
        });
    assert!(dec.clone().with_policy(streaming).is_err());
    // Quest without metadata.
    let quest = dec
        .clone()
        .with_policy(
            SparsePolicy::uniform(2, HeadPolicy::Quest).with_quest(QuestConfig {
                token_budget: 16,
                sink_pages: 0,
            }),
        )
        .unwrap();
    let q = [0.0f32; 4 * 8];
    let kv = vec![0.0f32; layout.cache_len()];
    let mut out = [0.0f32; 4 * 8];
    let s = Strides::contiguous(1, 4, 8);
    let r = quest.forward_cpu(
        Strided::new(&q[..], s),
        KvPages {
            k: &kv[..],
            v: &kv[..],
        },
        None,
        Strided::new(&mut out[..], s),
        None,
    );
    assert!(matches!(r, Err(Error::InvalidOption(_))));
    // Wrong cache length, short q, short lse.
    let r = dec.forward_cpu(
        Strided::new(&q[..], s),
        KvPages {
            k: &kv[1..],
            v: &kv[..],
        },
        None,
        Strided::new(&mut out[..], s),
        None,
    );
    assert!(matches!(r, Err(Error::Shape(_))));
    let r = dec.forward_cpu(
        Strided::new(&q[1..], s),
        KvPages {
            k: &kv[..],
            v: &kv[..],
        },
        None,
        Strided::new(&mut out[..], s),
        None,
    );
    assert!(matches!(r, Err(Error::Shape(_))));
    let mut lse = [0.0f32; 3];
    let r = dec.forward_cpu(
        Strided::new(&q[..], s),
        KvPages {
            k: &kv[..],
            v: &kv[..],
        },
        None,
        Strided::new(&mut out[..], s),
        Some(&mut lse[..]),
    );
    assert!(matches!(r, Err(Error::Shape(_))));
    // Append: more new tokens than seqlens_k, and two writers of one page.
    let mut kc = kv.clone();
    let mut vc = kv.clone();
    let kn = vec![0.0f32; 41 * 16];
    let ns = Strides::contiguous(1, 2, 8);
    let r = append_kv_same(&cache, &[0, 41], &kn, ns, (&mut kc, &mut vc), None);
    assert!(matches!(r, Err(Error::Index(_))));
    let shared = ok(layout, &[0, 1, 0, 2], 2, &[3, 3]).unwrap();
    let r = append_kv_same(&shared, &[0, 1, 2], &kn, ns, (&mut kc, &mut vc), None);
    assert!(matches!(r, Err(Error::Index(_))));
}

#[test]
fn appended_metadata_equals_recomputed_bounds() {
    for ps in [1, 16, 64, 256] {
        let sc = scenario::<f32>(&[0, 1, 300, 77, 16], ps, 2, 16, 11 + ps as u64);
        let (layout, cache) = (sc.cache.layout(), &sc.cache);
        // Cache contents equal the contiguous tokens.
        for b in 0..cache.batch() {
            for j in 0..cache.seqlen(b).unwrap() {
                for h in 0..cache.heads_kv() {
                    let o = cache.token_offset(b, j, h).unwrap();
                    let c = (j * cache.heads_kv() + h) * cache.head_dim();
                    assert_eq!(&sc.k_cache[o..o + 16], &sc.k_tokens[b][c..c + 16]);
                    assert_eq!(&sc.v_cache[o..o + 16], &sc.v_tokens[b][c..c + 16]);
                }
            }
        }
        let bounds = page_bounds(cache, &sc.k_cache);
        assert!(!bounds.is_empty());
        for (page, kvh, lo, hi) in bounds {
            let mo = layout.meta_offset(page, kvh).unwrap();
            assert_eq!(&sc.kmin[mo..mo + 16], &lo[..], "ps {ps} page {page} kmin");
            assert_eq!(&sc.kmax[mo..mo + 16], &hi[..], "ps {ps} page {page} kmax");
        }
    }
}

#[test]
fn reused_page_forgets_its_previous_owner() {
    // Sequence A fills 5 slots of page 0; the page is freed and reused by sequence B, whose
    // first 2 tokens land in slots 0..2: the bounds must be B's alone.
    let layout = PagedLayout {
        num_pages: 1,
        page_size: 8,
        heads_kv: 1,
        head_dim: 8,
    };
    let mut kc = vec![0.0f32; layout.cache_len()];
    let mut vc = kc.clone();
    let mut kmin = [0.0f32; 8];
    let mut kmax = [0.0f32; 8];
    let s = Strides::contiguous(1, 1, 8);
    let big: Vec<f32> = (0..40).map(|x| 100.0 + x as f32).collect();
    let small: Vec<f32> = (0..16).map(|x| -(x as f32) / 16.0).collect();
    for (tokens, data) in [(5usize, &big), (2, &small)] {
        let cache = PagedCache::new(
            layout,
            PageTable {
                block_table: &[0],
                max_pages_per_seq: 1,
                seqlens_k: &[tokens as i32],
            },
        )
        .unwrap();
        append_kv_same(
            &cache,
            &[0, tokens as i32],
            data,
            s,
            (&mut kc, &mut vc),
            Some((&mut kmin, &mut kmax)),
        )
        .unwrap();
    }
    for c in 0..8 {
        assert_eq!(kmin[c], small[c].min(small[8 + c]));
        assert_eq!(kmax[c], small[c].max(small[8 + c]));
    }
}

#[test]
fn paged_decode_equals_dense_attention() {
    let seqlens = [0usize, 1, 5, 130, 300];
    for ps in [1, 16, 64, 256] {
        for (hkv, ratio) in [(2, 1), (1, 4), (2, 4)] {
            let d = 16;
            let sc = scenario::<f32>(&seqlens, ps, hkv, d, 100 + ps as u64 + ratio);
            let hq = hkv * ratio as usize;
            for q_len in [1, 3] {
                let mut r = rng(7 * ps as u64 + q_len as u64);
                let q: Vec<f32> = random_vec(&mut r, seqlens.len() * q_len * hq * d);
                for (name, opts) in masks() {
                    let what = format!("ps {ps} hkv {hkv} ratio {ratio} q_len {q_len} {name}");
                    let dec = PagedDecode::new(&sc.cache, hq, q_len, &opts).unwrap();
                    // Dense attention with the decode's mask (causal among the new tokens).
                    let dense_opts = AttentionOptions {
                        mask: dec.base_mask(),
                        ..opts
                    };
                    let (want, want_lse) = dense_reference(&sc, &q, hq, q_len, &dense_opts);
                    // The naive paged reference agrees with the dense reference to f64 rounding.
                    let (ref_out, ref_lse) = decode_reference(&dec, &sc, &q, None);
                    assert!(rel_l2(&ref_out, &want) < 1e-12, "{what}: f64 paged ref");
                    for (a, b) in ref_lse.iter().zip(&want_lse) {
                        assert!(a == b || (a - b).abs() < 1e-9, "{what}: f64 lse {a} vs {b}");
                    }
                    check_cpu_splits(&dec, &sc, &q, (&want, &want_lse), 1e-5, &what);
                }
            }
        }
    }
}

#[test]
fn half_precision_cpu_path() {
    fn case<T: Element>(seed: u64) {
        let seqlens = [3usize, 200, 64];
        let (hkv, hq, d, q_len) = (2, 8, 32, 2);
        let sc = scenario::<T>(&seqlens, 16, hkv, d, seed);
        let mut r = rng(seed);
        let q: Vec<T> = random_vec(&mut r, seqlens.len() * q_len * hq * d);
        let opts = AttentionOptions::causal().with_softcap(3.0);
        let (want, want_lse) = dense_reference(&sc, &q, hq, q_len, &opts);
        let dec = PagedDecode::new(&sc.cache, hq, q_len, &opts).unwrap();
        let (out, lse) = decode_cpu(&dec, &sc, &q);
        let err = rel_l2(&to_f64(&out), &want);
        assert!(err < 2e-2, "{:?}: rel L2 {err}", T::DTYPE);
        check_lse(&lse, &want_lse, 1e-3, "half");
    }
    case::<bf16>(1);
    case::<f16>(2);
}

#[test]
fn quest_selection_equals_brute_force_top_b() {
    let seqlens = [1usize, 40, 300, 517];
    for ps in [1, 16, 64, 256] {
        for (hkv, ratio) in [(2, 1), (2, 4)] {
            let d = 16;
            let sc = scenario::<f32>(&seqlens, ps, hkv, d, 300 + ps as u64 + ratio as u64);
            let hq = hkv * ratio;
            for q_len in [1, 4] {
                for (budget, sink_pages) in [(ps, 0), (4 * ps, 1), (64, 2), (100_000, 0)] {
                    for opts in [
                        AttentionOptions::causal(),
                        AttentionOptions::causal()
                            .with_window(Window::causal_tokens(100).unwrap())
                            .with_sinks(2),
                    ] {
                        let what = format!(
                            "ps {ps} hkv {hkv} ratio {ratio} q_len {q_len} budget {budget} sinks {sink_pages} {:?}",
                            opts.mask
                        );
                        let mut r = rng(ps as u64 * 31 + q_len as u64 + budget as u64);
                        let q: Vec<f32> = random_vec(&mut r, seqlens.len() * q_len * hq * d);
                        let dec = PagedDecode::new(&sc.cache, hq, q_len, &opts)
                            .unwrap()
                            .with_policy(quest_policy(hkv, budget, sink_pages))
                            .unwrap();
                        let qs = Strided::new(&q[..], q_strides(q_len, hq, d));
                        let sel = dec
                            .select_cpu(Strided::new(&q[..], q_strides(q_len, hq, d)), sc.meta())
                            .unwrap();
                        let ref_scores = quest_scores_f64(&dec, qs, sc.meta()).unwrap();
                        let mp = sc.cache.max_pages_per_seq();
                        for b in 0..seqlens.len() {
                            for kvh in 0..hkv {
                                let row = (b * hkv + kvh) * mp;
                                let scores = &ref_scores[row..row + mp];
                                let want = quest_select_brute(&dec, b, scores);
                                assert_eq!(
                                    sel.pages.get(b, kvh).unwrap(),
                                    &want[..],
                                    "{what}: b {b} kvh {kvh}"
                                );
                                for &p in &want {
                                    let (g, w) =
                                        (sel.scores[row + p as usize] as f64, scores[p as usize]);
                                    assert!(
                                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                                        "{what}: score {g} vs {w}"
                                    );
                                }
                                // The newest page is always selected.
                                let sk = sc.cache.seqlen(b).unwrap();
                                let newest = ((sk - 1) / ps) as u32;
                                if opts.effective_mask().window == Window::CAUSAL {
                                    assert!(want.contains(&newest), "{what}: newest page missing");
                                    let k = (budget / ps).max(1);
                                    let cand = sc.cache.pages_of(b).unwrap();
                                    assert!(want.len() >= k.min(cand), "{what}: budget not used");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn quest_aggregates_the_group_by_max() {
    // Two query heads share one kv head; each strongly prefers a different page. With the
    // max aggregation both pages score high; a budget of 3 pages (newest + 2) keeps both.
    let (ps, d) = (4usize, 8usize);
    let layout = PagedLayout {
        num_pages: 6,
        page_size: ps,
        heads_kv: 1,
        head_dim: d,
    };
    let table: Vec<i32> = (0..6).collect();
    let sl = [24i32];
    let cache = PagedCache::new(
        layout,
        PageTable {
            block_table: &table,
            max_pages_per_seq: 6,
            seqlens_k: &sl,
        },
    )
    .unwrap();
    let mut k = vec![0.0f32; 24 * d];
    for t in 0..4 {
        k[(4 + t) * d] = 10.0; // page 1: channel 0
        k[(12 + t) * d + 1] = 10.0; // page 3: channel 1
    }
    let mut kc = vec![0.0f32; layout.cache_len()];
    let mut vc = kc.clone();
    let mut kmin = vec![0.0f32; layout.meta_len()];
    let mut kmax = kmin.clone();
    let s = Strides::contiguous(1, 1, d);
    append_kv_same(
        &cache,
        &[0, 24],
        &k,
        s,
        (&mut kc, &mut vc),
        Some((&mut kmin, &mut kmax)),
    )
    .unwrap();
    let mut q = vec![0.0f32; 2 * d];
    q[0] = 1.0; // head 0 wants page 1
    q[d + 1] = 1.0; // head 1 wants page 3
    let dec = PagedDecode::new(&cache, 2, 1, &AttentionOptions::causal())
        .unwrap()
        .with_policy(quest_policy(1, 3 * ps, 0))
        .unwrap();
    let sel = dec
        .select_cpu(
            Strided::new(&q[..], Strides::contiguous(1, 2, d)),
            PageMeta {
                kmin: &kmin[..],
                kmax: &kmax[..],
            },
        )
        .unwrap();
    assert_eq!(sel.pages.get(0, 0).unwrap(), &[1, 3, 5]);
    // Ties (all other pages score 0) break towards the lower page index.
    let dec = dec.with_policy(quest_policy(1, 4 * ps, 0)).unwrap();
    let sel = dec
        .select_cpu(
            Strided::new(&q[..], Strides::contiguous(1, 2, d)),
            PageMeta {
                kmin: &kmin[..],
                kmax: &kmax[..],
            },
        )
        .unwrap();
    assert_eq!(sel.pages.get(0, 0).unwrap(), &[0, 1, 3, 5]);
}

/// Sparse decode equals dense attention over the selected pages' tokens, gathered
/// contiguously per (sequence, kv head) (q_len = 1: every gathered key is visible).
#[test]
fn sparse_decode_equals_dense_over_selected_tokens() {
    let seqlens = [50usize, 300, 129];
    for ps in [1, 16, 64] {
        let (hkv, ratio, d) = (2, 4, 16);
        let hq = hkv * ratio;
        let sc = scenario::<f32>(&seqlens, ps, hkv, d, 900 + ps as u64);
        let mut r = rng(ps as u64);
        let q: Vec<f32> = random_vec(&mut r, seqlens.len() * hq * d);
        let dec = PagedDecode::new(&sc.cache, hq, 1, &AttentionOptions::causal())
            .unwrap()
            .with_policy(quest_policy(hkv, 64, 1))
            .unwrap();
        let sel = dec
            .select_cpu(Strided::new(&q[..], q_strides(1, hq, d)), sc.meta())
            .unwrap();
        let (out, lse) = decode_cpu(&dec, &sc, &q);
        for b in 0..seqlens.len() {
            for kvh in 0..hkv {
                let pages = sel.pages.get(b, kvh).unwrap();
                let sk = sc.cache.seqlen(b).unwrap();
                let tokens: Vec<usize> = pages
                    .iter()
                    .flat_map(|&p| p as usize * ps..((p as usize + 1) * ps).min(sk))
                    .collect();
                let gather = |src: &Vec<f32>| -> Vec<f32> {
                    tokens
                        .iter()
                        .flat_map(|&j| src[(j * hkv + kvh) * d..][..d].to_vec())
                        .collect()
                };
                let (k, v) = (gather(&sc.k_tokens[b]), gather(&sc.v_tokens[b]));
                let qg: Vec<f32> =
                    q[(b * hq + kvh * ratio) * d..(b * hq + (kvh + 1) * ratio) * d].to_vec();
                let attn = FlashAttention::new(
                    &AttentionShape {
                        batch: 1,
                        heads_q: ratio,
                        heads_kv: 1,
                        head_dim: d,
                        seqlens: SeqLens::Fixed {
                            seqlen_q: 1,
                            seqlen_k: tokens.len(),
                        },
                    },
                    &AttentionOptions::default(),
                )
                .unwrap();
                let (want, want_lse) = dense_attention_f64(
                    &attn,
                    Strided::new(&qg[..], Strides::contiguous(1, ratio, d)),
                    Strided::new(&k[..], Strides::contiguous(tokens.len(), 1, d)),
                    Strided::new(&v[..], Strides::contiguous(tokens.len(), 1, d)),
                )
                .unwrap();
                let got: Vec<f64> = out
                    [(b * hq + kvh * ratio) * d..(b * hq + (kvh + 1) * ratio) * d]
                    .iter()
                    .map(|&x| x as f64)
                    .collect();
                let err = rel_l2(&got, &want);
                assert!(err < 1e-5, "ps {ps} b {b} kvh {kvh}: rel L2 {err}");
                let got_lse = &lse[b * hq + kvh * ratio..b * hq + (kvh + 1) * ratio];
                check_lse(got_lse, &want_lse, 1e-4, "sparse");
            }
        }
    }
}

#[test]
fn mixed_head_policies_in_one_call() {
    let seqlens = [0usize, 7, 250, 97];
    for ps in [1, 16, 64, 256] {
        for q_len in [1, 5] {
            let (hkv, ratio, d) = (4, 2, 16);
            let hq = hkv * ratio;
            let sc = scenario::<f32>(&seqlens, ps, hkv, d, 1234 + ps as u64);
            let mut r = rng(ps as u64 + 99);
            let q: Vec<f32> = random_vec(&mut r, seqlens.len() * q_len * hq * d);
            let dec = mixed_decode(
                &sc.cache,
                hq,
                q_len,
                &AttentionOptions::causal().with_softcap(4.0),
            );
            // The reference's page sets: the CPU Quest selection for head 2 (checked against
            // brute force elsewhere) and the explicit lists of head 3.
            let quest = dec
                .select_cpu(Strided::new(&q[..], q_strides(q_len, hq, d)), sc.meta())
                .unwrap();
            let mut lists: Vec<Vec<usize>> = Vec::new();
            for b in 0..seqlens.len() {
                for h in 0..hkv {
                    lists.push(if h == 3 {
                        (0..sc.cache.pages_of(b).unwrap())
                            .filter(|p| p % 3 != 1)
                            .collect()
                    } else {
                        quest
                            .pages
                            .get(b, h)
                            .unwrap()
                            .iter()
                            .map(|&p| p as usize)
                            .collect()
                    });
                }
            }
            let sel = PageLists::new(seqlens.len(), hkv, lists).unwrap();
            let (want, want_lse) = decode_reference(&dec, &sc, &q, Some(&sel));
            for splits in [1, 4] {
                let dec = dec.clone().with_splits(Some(splits)).unwrap();
                let (out, lse) = decode_cpu(&dec, &sc, &q);
                let err = rel_l2(&to_f64(&out), &want);
                assert!(
                    err < 1e-5,
                    "ps {ps} q_len {q_len} splits {splits}: rel L2 {err}"
                );
                check_lse(&lse, &want_lse, 1e-4, "mixed");
            }
            // Streaming head == dense with the streaming mask (sinks 3, window 20).
            let sopts = AttentionOptions::causal()
                .with_window(Window::causal_tokens(20).unwrap())
                .with_sinks(3)
                .with_softcap(4.0);
            let (dense, _) = dense_reference(&sc, &q, hq, q_len, &sopts);
            for row in 0..seqlens.len() * q_len {
                for h in 2..4 {
                    let o = (row * hq + h) * d;
                    assert!(
                        rel_l2(&want[o..o + d], &dense[o..o + d]) < 1e-12
                            || dense[o..o + d].iter().all(|&x| x == 0.0)
                    );
                }
            }
        }
    }
}

#[test]
fn empty_visible_rows_give_zero_and_neg_inf() {
    // seqlen 0; q_len > seqlen under causal (the first rows see nothing); an empty list.
    let seqlens = [0usize, 2, 40];
    let (hkv, hq, d, q_len) = (4, 4, 16, 4);
    let sc = scenario::<f32>(&seqlens, 16, hkv, d, 5);
    let mut r = rng(5);
    let q: Vec<f32> = random_vec(&mut r, seqlens.len() * q_len * hq * d);
    let lists: Vec<Vec<usize>> = (0..seqlens.len() * hkv).map(|_| vec![]).collect();
    let policy = SparsePolicy {
        heads: vec![
            HeadPolicy::Full,
            HeadPolicy::Listed,
            HeadPolicy::Streaming,
            HeadPolicy::Full,
        ],
        streaming: StreamingConfig {
            sinks: 0,
            window: 1,
        },
        quest: QuestConfig::default(),
    };
    let dec = PagedDecode::new(&sc.cache, hq, q_len, &AttentionOptions::causal())
        .unwrap()
        .with_policy(policy)
        .unwrap()
        .with_page_lists(PageLists::new(seqlens.len(), hkv, lists).unwrap())
        .unwrap();
    for splits in [1, 3] {
        let (out, lse) = decode_cpu(&dec.clone().with_splits(Some(splits)).unwrap(), &sc, &q);
        assert!(out.iter().all(|x| !x.is_nan()));
        assert!(lse.iter().all(|x| !x.is_nan()));
        for b in 0..seqlens.len() {
            for i in 0..q_len {
                for h in 0..hq {
                    let visible = i + seqlens[b] >= q_len && h != 1;
                    let l = lse[(b * hq + h) * q_len + i];
                    let o = &out[((b * q_len + i) * hq + h) * d..][..d];
                    if visible {
                        assert!(l.is_finite(), "b {b} i {i} h {h}");
                    } else {
                        assert_eq!(l, f32::NEG_INFINITY, "b {b} i {i} h {h}");
                        assert!(o.iter().all(|&x| x == 0.0));
                    }
                }
            }
        }
    }
}

/// A cache description without buffers: `batch` sequences of `seqlen` tokens.
fn big_cache(batch: usize, seqlen: usize, page_size: usize, hkv: usize) -> PagedCache {
    let pages = seqlen.div_ceil(page_size);
    let table: Vec<i32> = (0..(batch * pages) as i32).collect();
    let seqlens = vec![seqlen as i32; batch];
    PagedCache::new(
        PagedLayout {
            num_pages: batch * pages,
            page_size,
            heads_kv: hkv,
            head_dim: 128,
        },
        PageTable {
            block_table: &table,
            max_pages_per_seq: pages,
            seqlens_k: &seqlens,
        },
    )
    .unwrap()
}

#[test]
fn split_heuristic_counts_visited_pages() {
    // The bench's shape: batch 1, 64k tokens, page 16, 32 q / 8 kv heads, q_len 1, 132 SMs:
    // 8 blocks, target 264 -> at most 33 splits, each of at least 256 keys of the block's
    // work list.
    let (hq, hkv, sms) = (32, 8, 132);
    let cache = big_cache(1, 65536, 16, hkv);
    let opts = AttentionOptions::causal();
    let base = PagedDecode::new(&cache, hq, 1, &opts).unwrap();
    let with = |p: SparsePolicy| base.clone().with_policy(p).unwrap();
    // Full: 4096 pages -> 33 (the SM target binds).
    assert_eq!(base.max_block_work_pages(), 4096);
    assert_eq!(base.splits_for(sms), 33);
    // Quest, 2048-token budget: 128 pages = 2048 keys -> 8 splits of 16 pages (not 25 of ~5).
    let quest = with(quest_policy(hkv, 2048, 1));
    assert_eq!(quest.max_block_work_pages(), 128);
    assert_eq!(quest.splits_for(sms), 8);
    // Streaming, 4 sinks + 2048-token window: 1 sink page + 128 window pages -> 8.
    let streaming = with(
        SparsePolicy::uniform(hkv, HeadPolicy::Streaming).with_streaming(StreamingConfig {
            sinks: 4,
            window: 2048,
        }),
    );
    assert_eq!(streaming.max_block_work_pages(), 129);
    assert_eq!(streaming.splits_for(sms), 8);
    // Full heads under a 1024-token causal window: 64 pages -> 4.
    let windowed = PagedDecode::new(
        &cache,
        hq,
        1,
        &AttentionOptions::causal().with_window(Window::causal_tokens(1024).unwrap()),
    )
    .unwrap();
    assert_eq!(windowed.max_block_work_pages(), 64);
    assert_eq!(windowed.splits_for(sms), 4);
    // Listed heads: the longest list (35 pages = 560 keys) -> 2.
    let lists: Vec<Vec<usize>> = (0..hkv).map(|h| (0..5 * h).collect()).collect();
    let listed = with(SparsePolicy::uniform(hkv, HeadPolicy::Listed))
        .with_page_lists(PageLists::new(1, hkv, lists).unwrap())
        .unwrap();
    assert_eq!(listed.max_block_work_pages(), 35);
    assert_eq!(listed.splits_for(sms), 2);
    // A mix is sized by its largest block (the Full head here).
    let mut mixed = quest_policy(hkv, 2048, 1);
    mixed.heads[3] = HeadPolicy::Full;
    assert_eq!(with(mixed).splits_for(sms), 33);
    // Tiny budgets do not split; a split never gets less than a page (page 1024, 1 page).
    assert_eq!(with(quest_policy(hkv, 256, 0)).splits_for(sms), 1);
    let big_pages = big_cache(1, 65536, 1024, hkv);
    let one_page = PagedDecode::new(&big_pages, hq, 1, &opts)
        .unwrap()
        .with_policy(quest_policy(hkv, 1024, 0))
        .unwrap();
    assert_eq!(one_page.max_block_work_pages(), 1);
    assert_eq!(one_page.splits_for(sms), 1);
    // Enough blocks already: no split; a forced count wins.
    let wide = PagedDecode::new(&big_cache(64, 8192, 16, hkv), hq, 1, &opts).unwrap();
    assert_eq!(wide.splits_for(sms), 1);
    assert_eq!(
        quest.clone().with_splits(Some(5)).unwrap().splits_for(sms),
        5
    );
    // Query rows past one block: q_len 4 x group 4 = 16 rows = 2 row blocks of 8.
    let two_blocks = PagedDecode::new(
        &cache,
        hq,
        4,
        &AttentionOptions::causal().with_window(Window::causal_tokens(1024).unwrap()),
    )
    .unwrap();
    // Rows 0..8 are queries 0..2, rows 8..16 queries 2..4: each block's union of windows
    // spans 65 pages (the windows end 1-3 tokens before the last key).
    assert_eq!(two_blocks.max_block_work_pages(), 65);
    assert_eq!(two_blocks.splits_for(sms), 4);
}

#[test]
fn split_heuristic_work_pages_match_the_selection() {
    // The closed-form Quest count equals the CPU selection's longest list; Listed and
    // streaming counts equal the pages the reference visits.
    let seqlens = [0usize, 1, 40, 300, 517];
    for ps in [1, 16, 64, 256] {
        let (hkv, ratio, d) = (2, 4, 16);
        let hq = hkv * ratio;
        let sc = scenario::<f32>(&seqlens, ps, hkv, d, 31 + ps as u64);
        for q_len in [1, 3] {
            let mut r = rng(ps as u64 + q_len as u64);
            let q: Vec<f32> = random_vec(&mut r, seqlens.len() * q_len * hq * d);
            let st = q_strides(q_len, hq, d);
            for (budget, sinkp) in [(1, 0), (ps, 1), (8 * ps, 2), (100, 0), (4096, 3)] {
                for opts in [
                    AttentionOptions::causal(),
                    AttentionOptions::causal()
                        .with_window(Window::causal_tokens(50).unwrap())
                        .with_sinks(5),
                ] {
                    let dec = PagedDecode::new(&sc.cache, hq, q_len, &opts)
                        .unwrap()
                        .with_policy(quest_policy(hkv, budget, sinkp))
                        .unwrap();
                    let sel = dec.select_cpu(Strided::new(&q[..], st), sc.meta()).unwrap();
                    let want = (0..seqlens.len())
                        .flat_map(|b| (0..hkv).map(move |h| (b, h)))
                        .map(|(b, h)| sel.pages.get(b, h).unwrap().len())
                        .max()
                        .unwrap();
                    assert_eq!(
                        dec.max_block_work_pages(),
                        want,
                        "ps {ps} q_len {q_len} budget {budget} sink pages {sinkp}"
                    );
                }
            }
            // Streaming heads: the pages holding a key some row of the block sees.
            let dec = PagedDecode::new(&sc.cache, hq, q_len, &AttentionOptions::causal())
                .unwrap()
                .with_policy(
                    SparsePolicy::uniform(hkv, HeadPolicy::Streaming).with_streaming(
                        StreamingConfig {
                            sinks: 3,
                            window: 70,
                        },
                    ),
                )
                .unwrap();
            let mask = dec.mask_of(0).unwrap();
            let group = hq / hkv;
            let rows = q_len * group;
            let mut want = 0;
            for &sk in &seqlens {
                for r0 in (0..rows).step_by(DECODE_ROWS_PER_BLOCK) {
                    let r1 = (r0 + DECODE_ROWS_PER_BLOCK).min(rows);
                    let qi = r0 / group..(r1 - 1) / group + 1;
                    let n = (0..sk.div_ceil(ps))
                        .filter(|&p| {
                            (p * ps..((p + 1) * ps).min(sk))
                                .any(|j| qi.clone().any(|i| mask.visible(i, j, q_len, sk)))
                        })
                        .count();
                    want = want.max(n);
                }
            }
            assert_eq!(dec.max_block_work_pages(), want, "streaming ps {ps}");
        }
    }
}
