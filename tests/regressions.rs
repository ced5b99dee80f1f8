//! One named regression test per finding of the hostile-input audit (issue 11). Each failed
//! (panic, abort, wrong `Ok` or wrong error) on the code before the fix. Allocation bounds
//! (findings 2 and 5) are checked in `tests/alloc_bounds.rs`, which counts allocations;
//! finding 8 (sealed GPU buffers) is a `compile_fail` doc test on `DeviceBuffer`.

mod common;

use common::{random_vec, rel_l2, rng};
use longattn::*;

fn fixed(
    b: usize,
    sq: usize,
    sk: usize,
    hq: usize,
    hkv: usize,
    d: usize,
) -> AttentionShape<'static> {
    AttentionShape {
        batch: b,
        heads_q: hq,
        heads_kv: hkv,
        head_dim: d,
        seqlens: SeqLens::Fixed {
            seqlen_q: sq,
            seqlen_k: sk,
        },
    }
}

/// Finding 1: `rows * heads * head_dim` wrapped to 0, so empty buffers passed the length
/// check and the merge indexed out of bounds.
#[test]
fn finding1_merge_shape_products_are_checked() {
    let shape = MergeShape {
        batch: 1 << 30,
        seqlen: 1 << 30,
        heads: 1 << 4,
        head_dim: 1,
    };
    let (o, l): (Vec<f32>, Vec<f32>) = (vec![], vec![]);
    let (mut oo, mut ol): (Vec<f32>, Vec<f32>) = (vec![], vec![]);
    let r = shape.merge_cpu(
        Partial {
            o: &o[..],
            lse: &l[..],
        },
        Partial {
            o: &o[..],
            lse: &l[..],
        },
        Partial {
            o: &mut oo[..],
            lse: &mut ol[..],
        },
    );
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    assert_eq!(
        shape.o_len(),
        usize::MAX,
        "o_len saturates instead of wrapping"
    );
}

/// Finding 2: a batch near `1 << 40` aborted on allocation; now refused by its bound, and
/// the largest accepted batch costs nothing until a forward pass sees real buffers.
#[test]
fn finding2_huge_batch_and_heads_are_bounded() {
    let r = FlashAttention::new(&fixed(1 << 40, 1, 1, 1, 1, 8), &AttentionOptions::default());
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    let attn = FlashAttention::new(
        &fixed(i32::MAX as usize, 0, 4, 1, 1, 8),
        &AttentionOptions::default(),
    )
    .unwrap();
    assert_eq!(attn.out_len(), 0);
    assert_eq!(attn.span(i32::MAX as usize), None);
    // 2^30 heads over empty sequences: no work, no memory.
    let attn =
        FlashAttention::new(&fixed(1, 0, 0, 1 << 30, 1, 8), &AttentionOptions::default()).unwrap();
    let s = Strides::contiguous(0, 1 << 30, 8);
    let kv = Strides::contiguous(0, 1, 8);
    let empty: Vec<f32> = vec![];
    let mut out: Vec<f32> = vec![];
    attn.forward_cpu(
        Strided::new(&empty[..], s),
        Strided::new(&empty[..], kv),
        Strided::new(&empty[..], kv),
        Strided::new(&mut out[..], s),
        None,
    )
    .unwrap();
}

/// Finding 3: `unshard` allocated the whole tensor before checking the shards; `neighbors`
/// built an unbounded list; `schedule` was cubic in the world size.
#[test]
fn finding3_ring_and_neighborhood_helpers_are_bounded() {
    let layout = RingLayout::new(i32::MAX as usize, 2, Sharding::Contiguous).unwrap();
    let shards: Vec<Vec<u8>> = vec![vec![], vec![]];
    let r = layout.unshard(&shards, 1 << 20, 1 << 10);
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    // A 1-D grid of 2^31 - 1 tokens with a full-length kernel: 2^31 - 1 neighbors per query,
    // listed lazily.
    let l = i32::MAX as usize;
    let dims = [NeighborhoodDim::new(l, l)];
    let na = NeighborhoodAttention::new(
        &NeighborhoodShape {
            batch: 1,
            heads_q: 1,
            heads_kv: 1,
            head_dim: 1,
            dims: &dims,
        },
        &AttentionOptions::default(),
    )
    .unwrap();
    let mut keys = na.neighbors(l / 2).unwrap();
    assert_eq!(keys.len(), l);
    assert_eq!(keys.next(), Some(0));
    assert_eq!(keys.next(), Some(1));
    // The schedule at the largest world: linear tables, every rank computes its own step.
    let layout = RingLayout::new(MAX_RING_WORLD * 2, MAX_RING_WORLD, Sharding::Zigzag).unwrap();
    let ring = RingAttention::new(
        layout,
        RingShape {
            batch: 1,
            heads_q: 1,
            heads_kv: 1,
            head_dim: 8,
        },
        &AttentionOptions::causal(),
    )
    .unwrap();
    let sched = ring.schedule();
    assert!(sched.compute.iter().all(|steps| steps[0]));
    assert!(
        (sched.imbalance() - 1.0).abs() < 1e-9,
        "{}",
        sched.imbalance()
    );
}

/// Finding 4: size helpers overflowed (panic in debug, wrap in release) and index accessors
/// panicked on out-of-range indices.
#[test]
fn finding4_size_helpers_and_accessors_never_panic() {
    let s = Strides::contiguous(usize::MAX, 2, 2);
    assert_eq!(s.batch, i64::MAX);
    assert!(matches!(
        Strides::try_contiguous(usize::MAX, 2, 2),
        Err(Error::Shape(_))
    ));
    let cache = PagedCache::new(
        PagedLayout {
            num_pages: 4,
            page_size: 2,
            heads_kv: 1,
            head_dim: 8,
        },
        PageTable {
            block_table: &[0, 1],
            max_pages_per_seq: 2,
            seqlens_k: &[3],
        },
    )
    .unwrap();
    assert_eq!(cache.seqlen(1), None);
    assert_eq!(cache.pages_of(7), None);
    assert_eq!(cache.page_id(0, 2), None);
    assert_eq!(cache.token_offset(0, 3, 0), None);
    assert_eq!(cache.token_offset(0, 2, 0), Some(16)); // logical page 1 = page 1, slot 0
    assert_eq!(cache.layout().slot_offset(4, 0, 0), None);
    let decode = PagedDecode::new(&cache, 2, 1, &AttentionOptions::default()).unwrap();
    assert!(decode.splits_for(usize::MAX) >= 1);
    let lists = PageLists::new(1, 1, vec![vec![0]]).unwrap();
    assert_eq!(lists.get(1, 0), None);
    let attn = FlashAttention::new(&fixed(2, 3, 3, 1, 1, 8), &AttentionOptions::default()).unwrap();
    assert_eq!(attn.span(2), None);
}

/// Finding 5: a cache with no pages skipped its size check.
#[test]
fn finding5_empty_cache_is_size_checked() {
    let r = PagedCache::new(
        PagedLayout {
            num_pages: 0,
            page_size: 1 << 30,
            heads_kv: 1 << 20,
            head_dim: 1 << 20,
        },
        PageTable {
            block_table: &[0],
            max_pages_per_seq: 1,
            seqlens_k: &[0],
        },
    );
    assert!(r.is_err(), "{r:?}");
}

/// Finding 6: `scale = f32::MAX` returned Ok with NaN; a NaN input gave other rows on the
/// CPU (NaN scores skipped) than on the GPU (NaN propagated).
#[test]
fn finding6_scale_bound_and_nan_propagation() {
    let o = AttentionOptions::default().with_scale(f32::MAX);
    let r = FlashAttention::new(&fixed(1, 4, 4, 1, 1, 8), &o);
    assert!(matches!(r, Err(Error::InvalidOption(_))), "{r:?}");

    // q = k = v, 64 tokens, bf16, one NaN in row 3: every row that sees key 3 is NaN
    // (all rows without a mask, rows >= 3 with causal), the others stay finite.
    let (n, d) = (64usize, 16usize);
    let s = Strides::contiguous(n, 1, d);
    let mut x: Vec<bf16> = random_vec(&mut rng(6), n * d);
    x[3 * d + 5] = bf16::NAN;
    for (opts, first_nan) in [
        (AttentionOptions::default(), 0usize),
        (AttentionOptions::causal(), 3),
    ] {
        let attn = FlashAttention::new(&fixed(1, n, n, 1, 1, d), &opts).unwrap();
        let mut out = vec![bf16::ZERO; n * d];
        let mut lse = vec![0f32; n];
        attn.forward_cpu(
            Strided::new(&x[..], s),
            Strided::new(&x[..], s),
            Strided::new(&x[..], s),
            Strided::new(&mut out[..], s),
            Some(&mut lse),
        )
        .unwrap();
        for i in 0..n {
            let row_nan = out[i * d..(i + 1) * d].iter().all(|v| v.is_nan());
            let row_finite = out[i * d..(i + 1) * d].iter().all(|v| v.is_finite());
            if i >= first_nan {
                assert!(row_nan && lse[i].is_nan(), "row {i} should be NaN");
            } else {
                assert!(row_finite && lse[i].is_finite(), "row {i} should be finite");
            }
        }
    }
    // A NaN only in q row 3: only row 3 is NaN.
    let mut q: Vec<f32> = random_vec(&mut rng(7), n * d);
    let kv: Vec<f32> = random_vec(&mut rng(8), n * d);
    q[3 * d] = f32::NAN;
    let attn = FlashAttention::new(&fixed(1, n, n, 1, 1, d), &AttentionOptions::default()).unwrap();
    let mut out = vec![0f32; n * d];
    attn.forward_cpu(
        Strided::new(&q[..], s),
        Strided::new(&kv[..], s),
        Strided::new(&kv[..], s),
        Strided::new(&mut out[..], s),
        None,
    )
    .unwrap();
    let nan_rows: Vec<usize> = (0..n)
        .filter(|&i| out[i * d..(i + 1) * d].iter().any(|v| v.is_nan()))
        .collect();
    assert_eq!(nan_rows, vec![3]);
}

/// Finding 7: a subnormal softcap made `scale / softcap` overflow (NaN on the GPU).
#[test]
fn finding7_overflowing_softcap_is_refused() {
    for cap in [
        1e-40f32,
        f32::MIN_POSITIVE / 4.0,
        -1.0,
        f32::NAN,
        f32::INFINITY,
    ] {
        let o = AttentionOptions::default().with_softcap(cap);
        let r = FlashAttention::new(&fixed(1, 4, 4, 1, 1, 8), &o);
        assert!(matches!(r, Err(Error::InvalidOption(_))), "{cap:e}: {r:?}");
    }
    // 0 is off, as in every peer library.
    let o = AttentionOptions::default().with_softcap(0.0);
    let attn = FlashAttention::new(&fixed(1, 4, 4, 1, 1, 8), &o).unwrap();
    assert_eq!(attn.softcap(), None);
}

/// Finding 9: disjoint strided views of one buffer were refused as overlapping.
#[test]
fn finding9_disjoint_interleaved_output_is_accepted() {
    // Two heads whose rows interleave in one buffer: head 0 at rows 0, 16, 32 and head 1 at
    // 24, 40, 56 (d = 8): disjoint, but the strides are not nested.
    let (n, h, d) = (3usize, 2usize, 8usize);
    let attn = FlashAttention::new(&fixed(1, n, n, h, h, d), &AttentionOptions::default()).unwrap();
    let s = Strides::contiguous(n, h, d);
    let mut r = rng(9);
    let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        random_vec(&mut r, n * h * d),
        random_vec(&mut r, n * h * d),
        random_vec(&mut r, n * h * d),
    );
    let out_s = Strides {
        batch: 0,
        seq: 16,
        head: 24,
    };
    let mut out = vec![f32::NAN; 64];
    attn.forward_cpu(
        Strided::new(&q[..], s),
        Strided::new(&k[..], s),
        Strided::new(&v[..], s),
        Strided::new(&mut out[..], out_s),
        None,
    )
    .unwrap();
    let (want, _) = reference::dense_attention_f64(
        &attn,
        Strided::new(&q[..], s),
        Strided::new(&k[..], s),
        Strided::new(&v[..], s),
    )
    .unwrap();
    let mut got = Vec::new();
    for i in 0..n {
        for hh in 0..h {
            let o = i * 16 + hh * 24;
            got.extend(out[o..o + d].iter().map(|&x| x as f64));
        }
    }
    assert!(rel_l2(&got, &want) < 1e-5);
}

/// Finding 10: valid requests beyond what is implemented came back as shape errors.
#[test]
fn finding10_unsupported_requests_say_so() {
    let cache = PagedCache::new(
        PagedLayout {
            num_pages: 2,
            page_size: 16,
            heads_kv: 1,
            head_dim: 8,
        },
        PageTable {
            block_table: &[0, 1],
            max_pages_per_seq: 2,
            seqlens_k: &[20],
        },
    )
    .unwrap();
    let r = PagedDecode::new(
        &cache,
        1,
        paged::MAX_Q_LEN + 1,
        &AttentionOptions::default(),
    );
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    let r = RingLayout::new(1 << 20, MAX_RING_WORLD + 1, Sharding::Zigzag);
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    let dims = [NeighborhoodDim::new(4, 3); 4];
    let r = NeighborhoodAttention::new(
        &NeighborhoodShape {
            batch: 1,
            heads_q: 1,
            heads_kv: 1,
            head_dim: 8,
            dims: &dims,
        },
        &AttentionOptions::default(),
    );
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
}

/// Found by `tests/properties.rs`: `Strides::contiguous` saturated a product with a zero dim
/// (`0 * usize::MAX`) to `i64::MAX` instead of 0, and `try_contiguous` accepted a seq stride
/// (`heads * head_dim`) that overflows when `seqlen` is 0.
#[test]
fn props_contiguous_strides_with_a_zero_dim() {
    let s = Strides::contiguous(0, usize::MAX, 0);
    assert_eq!((s.batch, s.seq, s.head), (0, 0, 0));
    assert_eq!(Strides::try_contiguous(0, usize::MAX, 0), Ok(s));
    assert!(matches!(
        Strides::try_contiguous(0, usize::MAX, 2),
        Err(Error::Shape(_))
    ));
    assert_eq!(Strides::contiguous(0, usize::MAX, 2).seq, i64::MAX);
}

/// Found by `tests/properties.rs`: a merge with an empty dim (`heads = 0`) passed the length
/// check with empty buffers and then walked `batch * seqlen` rows (2^62 for i32 dims).
#[test]
fn props_empty_merge_does_not_walk_rows() {
    let m = MergeShape {
        batch: i32::MAX as usize,
        seqlen: i32::MAX as usize,
        heads: 0,
        head_dim: 1,
    };
    let (o, l): (Vec<f32>, Vec<f32>) = (vec![], vec![]);
    let (mut oo, mut ll): (Vec<f32>, Vec<f32>) = (vec![], vec![]);
    let part = || Partial {
        o: &o[..],
        lse: &l[..],
    };
    let out = Partial {
        o: &mut oo[..],
        lse: &mut ll[..],
    };
    assert_eq!(m.merge_cpu(part(), part(), out), Ok(()));
    let acc = Partial {
        o: &mut oo[..],
        lse: &mut ll[..],
    };
    assert_eq!(m.merge_into_cpu(acc, part()), Ok(()));
}

/// Found by `tests/properties.rs`: sharding an empty tensor (`row = 0`) of a long layout
/// listed every position (16 GiB at `i32::MAX` tokens) and walked `batch x positions`;
/// `rank_plan` of a rank outside the ring computed the whole schedule before refusing it.
#[test]
fn props_ring_empty_tensors_and_bad_ranks_cost_nothing() {
    let layout = RingLayout::new(i32::MAX as usize, 4, Sharding::Stripe).unwrap();
    let shards = layout.shard::<u8>(&[], 1, 0).unwrap();
    assert!(shards.len() == 4 && shards.iter().all(|s| s.is_empty()));
    let empty = vec![Vec::<u8>::new(); 4];
    assert_eq!(
        layout.unshard(&empty, 1 << 20, 0).unwrap(),
        Vec::<u8>::new()
    );
    let ring = RingAttention::new(
        layout,
        RingShape {
            batch: 1,
            heads_q: 1,
            heads_kv: 1,
            head_dim: 1,
        },
        &AttentionOptions::causal(),
    )
    .unwrap();
    assert!(matches!(ring.rank_plan(4), Err(Error::Shape(_))));
}

/// Found by `tests/properties.rs`: size and offset helpers of the paged family overflowed
/// (panics with overflow checks): `PageLists::new` (`batch * heads_kv`), `PagedCache::new`
/// (a u128 product of four usize dims), `PagedLayout::slot_offset`/`meta_offset` of a layout
/// `new` refuses, and `PagedDecode::kv_bytes_read` with a large element size.
#[test]
fn props_paged_helpers_never_overflow() {
    assert!(matches!(
        PageLists::new(usize::MAX, 2, vec![]),
        Err(Error::Shape(_))
    ));
    let huge = PagedLayout {
        num_pages: 2,
        page_size: 2,
        heads_kv: usize::MAX,
        head_dim: usize::MAX,
    };
    let table = PageTable {
        block_table: &[0],
        max_pages_per_seq: 1,
        seqlens_k: &[1],
    };
    assert!(matches!(PagedCache::new(huge, table), Err(Error::Shape(_))));
    assert_eq!(huge.slot_offset(1, 1, 1), None);
    assert_eq!(huge.meta_offset(1, 1), None);
    let layout = PagedLayout {
        num_pages: 2,
        page_size: 2,
        heads_kv: 1,
        head_dim: 8,
    };
    let cache = PagedCache::new(layout, table).unwrap();
    let decode = PagedDecode::new(&cache, 1, 1, &AttentionOptions::default()).unwrap();
    assert_eq!(decode.kv_bytes_read(usize::MAX), usize::MAX);
    assert_eq!(decode.kv_bytes_read(2), 2 * 2 * 8 * 2);
    // Accessors past the last kv head / row say so instead of panicking.
    assert!(decode.mask_of(0).is_some());
    assert_eq!(decode.mask_of(1), None);
    assert_eq!(decode.mask_of(usize::MAX), None);
    let rows = longattn::block_sparse::RowBlocks::new(64, 2, vec![0, -1, 1, 2]).unwrap();
    assert_eq!(rows.row(0), Some(&[0][..]));
    assert_eq!(rows.row(1), Some(&[1, 2][..]));
    assert_eq!(rows.row(2), None);
    assert_eq!(rows.row(usize::MAX), None);
}

/// Found by `tests/properties.rs`: `StarAttention::new` added `context_len + query_len`
/// unchecked and `block(rank)` multiplied `rank * context_len` unchecked.
#[test]
fn props_star_sizes_never_overflow() {
    let shape = RingShape {
        batch: 1,
        heads_q: 1,
        heads_kv: 1,
        head_dim: 4,
    };
    let opts = AttentionOptions::causal();
    assert!(matches!(
        StarAttention::new(4, 2, usize::MAX, shape, &opts),
        Err(Error::Shape(_))
    ));
    let star = StarAttention::new(5, 2, 1, shape, &opts).unwrap();
    assert_eq!((star.block(0), star.block(1)), (0..2, 2..5));
    assert!(star.block(usize::MAX).is_empty());
    assert!(star.query_partial(usize::MAX).is_ok()); // an empty block: nothing to attend
}

/// Found by `tests/properties.rs`: the block patterns overflowed on caller values:
/// `sparse_transformer_fixed` (`kb % stride + summary`), `block_attention` with no passage
/// over no key block (`len - 1`), and a pattern mask whose window side is past `i64::MAX`
/// (`Mask` range arithmetic in i64).
#[test]
fn props_block_patterns_never_overflow() {
    use longattn::block_sparse::patterns::{self, PatternShape};
    let shape = |sq, sk, mask| PatternShape {
        heads: 1,
        seqlen_q: sq,
        seqlen_k: sk,
        block: 2,
        mask,
    };
    let causal = AttentionOptions::causal().effective_mask();
    let m = patterns::sparse_transformer_fixed(&shape(8, 8, causal), 2, usize::MAX).unwrap();
    assert_eq!(m.nnz(), 10); // every block up to the diagonal
    assert!(patterns::block_attention(&shape(0, 0, causal), &[]).is_ok());
    let wide = Mask::new(Window::new(Some(usize::MAX), Some(usize::MAX)), usize::MAX);
    let full = patterns::longformer(&shape(4, 4, wide), 8, 0).unwrap();
    assert_eq!(full.nnz(), 4);
    assert!(wide.visible(3, 0, 4, 4));
    assert_eq!(wide.window_range(3, 4, 4), 0..4);
}

/// Fuzz finding (`tests/capi_fuzz.rs`, `c_api_fuzz_block_sparse`, case 4327 of seed 0xB5): a
/// valid mask whose `block_m` exceeds `seqlen_q` (one query block) with `block_m *
/// head_dim` beyond `usize` overflowed in the CPU path's row chunking (a panic; through the
/// C API, `LONGATTN_ERR_INTERNAL`). It now runs and equals dense attention (one partial
/// block over every key).
#[test]
fn fuzz_block_sparse_block_m_beyond_seqlen_runs() {
    let (sq, sk, d) = (3, 4, 4);
    let attn =
        FlashAttention::new(&fixed(1, sq, sk, 1, 1, d), &AttentionOptions::default()).unwrap();
    let dims = BlockMaskDims {
        batch: 1,
        heads: 1,
        num_q_blocks: 1,
        num_k_blocks: 1,
        block_m: usize::MAX / 2 + 1,
        block_n: sk,
    };
    let mask = BlockMask::from_csr(dims, vec![0, 1], vec![0], vec![false]).unwrap();
    let bs = BlockSparseAttention::new(attn.clone(), mask).unwrap();
    let mut r = rng(11);
    let q: Vec<f32> = random_vec(&mut r, sq * d);
    let (k, v): (Vec<f32>, Vec<f32>) = (random_vec(&mut r, sk * d), random_vec(&mut r, sk * d));
    let (qs, ks) = (Strides::contiguous(sq, 1, d), Strides::contiguous(sk, 1, d));
    let mut got = (vec![0f32; sq * d], vec![0f32; sq]);
    let mut want = got.clone();
    for (problem, (out, lse)) in [(true, &mut got), (false, &mut want)] {
        let (q, k, v) = (
            Strided::new(&q[..], qs),
            Strided::new(&k[..], ks),
            Strided::new(&v[..], ks),
        );
        let out = Strided::new(&mut out[..], qs);
        match problem {
            true => bs.forward_cpu(q, k, v, out, Some(lse)),
            false => attn.forward_cpu(q, k, v, out, Some(lse)),
        }
        .unwrap();
    }
    assert_eq!(got, want);
}

/// Fuzz findings (`tests/capi_fuzz.rs`, `c_api_fuzz_moba`: cases 3263 and 17225 of seed
/// 0x30BA; case 10102 with `LONGATTN_FUZZ_SEED=1 LONGATTN_FUZZ_SCALE=3`): problems without
/// a query row took 6 to 13 s in MoBA. An empty varlen sequence declaring `heads_q =
/// i32::MAX`: the selection looped over every query head of every sequence (and over every
/// query head per kv head: `heads_q * heads_kv` steps), the row checks and
/// `BlockSparseAttention::new`'s varlen list check over every head. A fixed-length batch of
/// `i32::MAX` sequences of 0 queries: the selection and the row checks walked every sequence.
/// The dense path skips both in O(1); now MoBA does too, selection and attention alike.
#[test]
fn fuzz_moba_empty_problem_with_many_heads_costs_nothing() {
    use longattn::block_sparse::moba::moba_attention;
    let (cu_q, cu_k) = ([0i32, 0], [0i32, 3]);
    let varlen = AttentionShape {
        batch: 1,
        heads_q: i32::MAX as usize,
        heads_kv: 1,
        head_dim: 3,
        seqlens: SeqLens::Varlen {
            cu_seqlens_q: &cu_q,
            cu_seqlens_k: &cu_k,
        },
    };
    let fixed = AttentionShape {
        heads_q: i32::MAX as usize - 1,
        heads_kv: (i32::MAX as usize - 1) / 2,
        ..fixed(i32::MAX as usize, 0, 0, 1, 1, 2)
    };
    for (shape, config) in [(varlen, (63, 1)), (fixed, (65536, 2))] {
        let opts = AttentionOptions::causal()
            .with_window(Window::from_flash(5, 2).unwrap())
            .with_sinks(2);
        let attn = FlashAttention::new(&shape, &opts).unwrap();
        let config = MobaConfig {
            block_n: config.0,
            top_k: config.1,
        };
        let d = shape.head_dim as i64;
        let (q, k) = (Vec::<f32>::new(), vec![0.5f32; 3 * 3]);
        let qs = Strides {
            batch: 0,
            seq: d,
            head: d,
        };
        let ks = Strides::contiguous(3, 1, 3);
        let start = std::time::Instant::now();
        let bs = moba_attention(
            &attn,
            &config,
            64,
            Strided::new(&q[..], qs),
            Strided::new(&k[..], ks),
        )
        .unwrap();
        let mut out = Vec::<f32>::new();
        let mut lse = Vec::<f32>::new();
        bs.forward_cpu(
            Strided::new(&q[..], qs),
            Strided::new(&k[..], ks),
            Strided::new(&k[..], ks),
            Strided::new(&mut out[..], qs),
            Some(&mut lse[..]),
        )
        .unwrap();
        let took = start.elapsed();
        assert!(took.as_secs_f64() < 2.0, "took {took:?}");
    }
}

#[test]
fn fuzz_moba_pooled_keys_of_keyless_batch_cost_nothing() {
    use longattn::block_sparse::moba::moba_pooled_keys_cpu;
    // Found by fuzz/block_sparse: a fixed-length batch without keys may declare any number of
    // sequences; there is no pooled key to compute, but the loop visited every (sequence, kv
    // head) pair (2^61 here: forever).
    let max = i32::MAX as usize;
    let attn = FlashAttention::new(
        &fixed(max, 0, 0, max - 1, (max - 1) / 2, 2),
        &AttentionOptions::causal(),
    )
    .unwrap();
    let config = MobaConfig {
        block_n: 4,
        top_k: 2,
    };
    let (q, k) = (Vec::<f32>::new(), Vec::<f32>::new());
    let s = Strides::contiguous(0, 1, 2);
    let start = std::time::Instant::now();
    let pooled = moba_pooled_keys_cpu(
        &attn,
        &config,
        Strided::new(&q[..], s),
        Strided::new(&k[..], s),
    )
    .unwrap();
    assert!(pooled.is_empty());
    let took = start.elapsed();
    assert!(took.as_secs_f64() < 2.0, "took {took:?}");
}

#[test]
fn fuzz_pattern_block_of_huge_size_classifies_without_walking_its_rows() {
    use longattn::block_sparse::patterns::{PatternShape, longformer};
    // Found by fuzz/block_sparse (a timeout): the pattern builders classified each listed block
    // row by row, so one block of 2^40 tokens took 2^40 steps; now O(log rows) per block.
    let n = 1usize << 40;
    for (options, kind) in [
        (AttentionOptions::causal(), BlockKind::Partial),
        (AttentionOptions::default(), BlockKind::Full),
    ] {
        let shape = PatternShape {
            heads: 1,
            seqlen_q: n,
            seqlen_k: n,
            block: n,
            mask: options.effective_mask(),
        };
        let start = std::time::Instant::now();
        let mask = longformer(&shape, 1, 1).unwrap();
        let list = mask.list(0, 0, 0).unwrap();
        assert_eq!(list.iter().collect::<Vec<_>>(), vec![(0, kind)]);
        let took = start.elapsed();
        assert!(took.as_secs_f64() < 2.0, "took {took:?}");
    }
}

#[test]
fn pattern_cost_follows_listed_blocks_not_key_blocks() {
    use longattn::block_sparse::patterns::{
        PatternShape, bigbird, longformer, per_head_windows, sparse_transformer_fixed,
        sparse_transformer_strided, streaming_heads,
    };
    // The pattern builders tested every key block for every query block (O(q blocks x k
    // blocks)): four query blocks at the end of 2^28 key blocks took 2^30 tests. Now each list
    // costs its ranges and listed blocks.
    let (block, nk) = (64usize, 1usize << 28);
    let shape = |heads| PatternShape {
        heads,
        seqlen_q: 4 * block,
        seqlen_k: nk * block,
        block,
        mask: AttentionOptions::causal().effective_mask(),
    };
    let start = std::time::Instant::now();
    let last = nk - 1;
    let blocks = |m: &BlockMask, h, q| {
        let list = m.list(0, h, q).unwrap();
        list.iter().map(|(kb, _)| kb).collect::<Vec<_>>()
    };
    let m = longformer(&shape(1), 2, 1).unwrap();
    assert_eq!(blocks(&m, 0, 3), vec![0, last - 2, last - 1, last]);
    let m = bigbird(&shape(2), 1, 1, 3, 7).unwrap();
    let drawn = blocks(&m, 1, 3);
    assert!(drawn.len() <= 6 && drawn.starts_with(&[0]) && drawn.ends_with(&[last - 1, last]));
    let m = sparse_transformer_strided(&shape(1), 1 << 16).unwrap();
    assert_eq!(blocks(&m, 0, 3).len(), (1 << 16) + (nk >> 16) - 1);
    let m = sparse_transformer_fixed(&shape(1), 1 << 16, 1).unwrap();
    assert_eq!(blocks(&m, 0, 3).len(), (1 << 16) + (nk >> 16) - 1);
    let m = per_head_windows(&shape(2), &[3, 1]).unwrap();
    assert_eq!(blocks(&m, 0, 3), vec![last - 2, last - 1, last]);
    assert_eq!(blocks(&m, 1, 0), vec![last - 3]);
    let m = streaming_heads(&shape(1), &[true], 2, 2).unwrap();
    assert_eq!(blocks(&m, 0, 3), vec![0, 1, last - 1, last]);
    let took = start.elapsed();
    assert!(took.as_secs_f64() < 5.0, "took {took:?}");
}

#[test]
fn flex_parts_of_many_lists_over_many_key_blocks_are_refused_not_allocated() {
    // `to_flex_parts` allocated `lists x num_k_blocks` i32 twice unchecked: 2^16 empty lists
    // over 2^24 key blocks asked for 2 x 256 GiB (an abort), 2^31 x 2^31 overflowed.
    let dims = BlockMaskDims::for_lengths(1, 1, 1 << 16, 1 << 24, 1, 1).unwrap();
    let mask = BlockMask::from_lists(dims, |_| Vec::new()).unwrap();
    assert!(matches!(
        mask.to_flex_parts(),
        Err(BlockMaskError::TooLarge { .. })
    ));
    let small = BlockMaskDims::for_lengths(1, 2, 3, 5, 1, 1).unwrap();
    let parts = BlockMask::dense(small, BlockKind::Full)
        .unwrap()
        .to_flex_parts()
        .unwrap();
    assert_eq!(parts.full_kv_num_blocks, vec![5; 6]);
    assert_eq!(parts.kv_indices, vec![0; 30]);
}

#[test]
fn fuzz_references_of_rowless_problem_cost_nothing() {
    use longattn::reference::{
        Fp8PRule, block_sparse_attention_f64, dense_attention_f64, dense_fp8_attention_f64,
    };
    // Found by fuzz/dense (a timeout): the f64 references visited every (sequence, query
    // head) pair, rows or not, so `i32::MAX` sequences of 0 queries with 65536 heads took
    // 2^47 steps (forward_cpu skips such pairs). A packed batch of one empty sequence with
    // `i32::MAX` query heads (one kv head, so the FP8 descales are one value each) likewise.
    let max = i32::MAX as usize;
    let (cu_q, cu_k) = ([0i32, 0], [0i32, 3]);
    let varlen = AttentionShape {
        batch: 1,
        heads_q: max,
        heads_kv: 1,
        head_dim: 2,
        seqlens: SeqLens::Varlen {
            cu_seqlens_q: &cu_q,
            cu_seqlens_k: &cu_k,
        },
    };
    let opts = AttentionOptions::default();
    for shape in [varlen, fixed(max, 0, 0, 65536, 65536, 2)] {
        let attn = FlashAttention::new(&shape, &opts).unwrap();
        let kv = [0.5f32; 3 * 2];
        let s = Strides::contiguous(0, 1, 2);
        let ks = Strides {
            batch: 0,
            ..Strides::contiguous(3, 1, 2)
        };
        let (q, k) = (|| Strided::new(&[][..], s), || Strided::new(&kv[..], ks));
        let start = std::time::Instant::now();
        let (out, lse) = dense_attention_f64(&attn, q(), k(), k()).unwrap();
        assert!(out.is_empty() && lse.is_empty());
        let dims = BlockMaskDims {
            batch: 1,
            heads: 1,
            num_q_blocks: 0,
            num_k_blocks: attn.max_seqlen_k().div_ceil(4),
            block_m: 4,
            block_n: 4,
        };
        let mask = BlockMask::dense(dims, BlockKind::Full).unwrap();
        let bs = BlockSparseAttention::new(attn.clone(), mask).unwrap();
        let (out, lse) = block_sparse_attention_f64(&bs, q(), k(), k()).unwrap();
        assert!(out.is_empty() && lse.is_empty());
        if shape.batch == 1 {
            let kv8 = [F8E4M3::from_f32(0.5); 3 * 2];
            let one = [1.0f32];
            let descales = Fp8Descales {
                q: &one[..],
                k: &one[..],
                v: &one[..],
            };
            let (q8, k8) = (|| Strided::new(&[][..], s), || Strided::new(&kv8[..], ks));
            let (out, lse) = dense_fp8_attention_f64(
                &attn,
                q8(),
                k8(),
                k8(),
                descales,
                Fp8PRule::TileRunningMax,
            )
            .unwrap();
            assert!(out.is_empty() && lse.is_empty());
        }
        let took = start.elapsed();
        assert!(took.as_secs_f64() < 2.0, "took {took:?}");
    }
}

#[test]
fn fuzz_paged_decode_of_many_kv_heads_costs_nothing() {
    // Found by fuzz/paged (a timeout): `PagedDecode::new` allocated a per-kv-head policy for
    // the declared `heads_kv` (2^31 - 1 here: 2 GiB) before any buffer bounded it, and the
    // reports (`kv_bytes_read`, `splits_for`, `balanced_splits`) walked every (sequence, kv
    // head) pair, collecting each one's pages. Heads that follow one policy share their pages.
    let heads = i32::MAX as usize;
    let cache = PagedCache::new(
        PagedLayout {
            num_pages: 1,
            page_size: 3,
            heads_kv: heads,
            head_dim: 1,
        },
        PageTable {
            block_table: &[0],
            max_pages_per_seq: 1,
            seqlens_k: &[3],
        },
    )
    .unwrap();
    let start = std::time::Instant::now();
    let decode = PagedDecode::new(&cache, heads, 1, &AttentionOptions::default()).unwrap();
    // One page of 3 tokens per kv head, one block of rows, K and V, head_dim 1, 2 bytes.
    assert_eq!(decode.kv_bytes_read(2), heads * 3 * 2 * 2);
    assert_eq!(decode.max_block_work_pages(), 1);
    assert_eq!(decode.splits_for(usize::MAX), 1);
    assert_eq!(decode.balanced_splits(usize::MAX), (1, 1));
    assert!(!decode.needs_meta());
    assert_eq!(decode.mask_of(heads - 1), Some(decode.base_mask()));
    assert_eq!(decode.mask_of(heads), None);
    let took = start.elapsed();
    assert!(took.as_secs_f64() < 2.0, "took {took:?}");
}
