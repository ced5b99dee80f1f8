//! Randomised robustness of the public CPU API (dense, FP8 dense, block-sparse with per-row
//! lists, paged decode and prefill, ring, neighborhood): thousands of shapes, options, block
//! lists, tables, policies, descales and buffer lengths, most of them invalid, drawn from a
//! fixed seed. Each call must return
//! `Ok` or a named `Error`: never panic (overflow checks are on in the test profile), and an
//! `Ok` result never holds NaN. The explicit bad-input cases live in `dense_cpu.rs`,
//! `paged.rs`, `ring.rs` and `neighborhood.rs`; this sweeps the combinations between them.

mod common;

use common::*;
use longattn::*;
use rand::Rng;
use rand::rngs::SmallRng;
use std::panic::{AssertUnwindSafe, catch_unwind};

fn pick(r: &mut SmallRng, xs: &[usize]) -> usize {
    xs[r.random_range(0..xs.len())]
}

/// `n`, or one element short with probability `p` (a buffer that is too small).
fn maybe_short(r: &mut SmallRng, n: usize, p: f64) -> usize {
    if r.random_bool(p) {
        n.saturating_sub(1)
    } else {
        n
    }
}

/// What one random case ended in.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Rejected,
    ForwardError,
    Ok,
}

/// A forward call's outcome; an `Ok` one must have written no NaN.
fn outcome_of(done: Result<()>, out: &[bf16], lse: &[f32], case: u64) -> Outcome {
    match done {
        Ok(()) => {
            assert!(
                out.iter().all(|x| !x.to_f32().is_nan()) && !lse.iter().any(|x| x.is_nan()),
                "case {case}: NaN in an Ok result"
            );
            Outcome::Ok
        }
        Err(_) => Outcome::ForwardError,
    }
}

fn tally(outcomes: &mut [usize; 3], o: Outcome) {
    outcomes[o as usize] += 1;
}

/// Prints a sweep's outcome counts; a sweep must have exercised the computation itself, not
/// only the validation (more than 100 `Ok` cases).
fn report(family: &str, outcomes: [usize; 3]) {
    println!("{family} outcomes (rejected, forward error, ok): {outcomes:?}");
    assert!(
        outcomes[Outcome::Ok as usize] > 100,
        "{family}: too few valid cases: {outcomes:?}"
    );
}

/// A random dense problem, most often invalid: shape, varlen offsets (sometimes decreasing or
/// of the wrong length), window, sinks and odd scale/softcap values. Shared by the dense,
/// FP8 and block-sparse sweeps.
#[derive(Debug)]
struct DenseCase {
    b: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    sq: usize,
    sk: usize,
    varlen: bool,
    cq: Vec<i32>,
    ck: Vec<i32>,
    opts: AttentionOptions,
}

impl DenseCase {
    /// Head dims from `dims`.
    fn random(r: &mut SmallRng, dims: &[usize]) -> DenseCase {
        let b = pick(r, &[0, 1, 2, 3]);
        let hq = pick(r, &[0, 1, 2, 3, 4, 8]);
        let hkv = pick(r, &[0, 1, 2, 3, 4]);
        let d = pick(r, dims);
        let sq = pick(r, &[0, 1, 2, 5, 17]);
        let sk = pick(r, &[0, 1, 3, 17]);
        let varlen = r.random_bool(0.3);
        let cq: Vec<i32> = (0..=b)
            .map(|i| (i * sq) as i32 - if r.random_bool(0.1) { 3 } else { 0 })
            .collect();
        let extra = usize::from(r.random_bool(0.1));
        let ck: Vec<i32> = (0..=b + extra).map(|i| (i * sk) as i32).collect();
        let side = |r: &mut SmallRng| r.random_bool(0.5).then(|| pick(r, &[0, 1, 5, usize::MAX]));
        let (left, right) = (side(r), side(r));
        let mut opts = AttentionOptions::default()
            .with_window(Window::new(left, right))
            .with_sinks(pick(r, &[0, 1, 4, usize::MAX]));
        let odd = [0.0f32, -1.0, f32::NAN, f32::INFINITY, 0.1, 30.0];
        if r.random_bool(0.2) {
            opts = opts.with_softcap(odd[r.random_range(0..odd.len())]);
        }
        if r.random_bool(0.2) {
            opts = opts.with_scale(odd[r.random_range(0..odd.len())]);
        }
        DenseCase {
            b,
            hq,
            hkv,
            d,
            sq,
            sk,
            varlen,
            cq,
            ck,
            opts,
        }
    }

    fn shape(&self) -> AttentionShape<'_> {
        AttentionShape {
            batch: self.b,
            heads_q: self.hq,
            heads_kv: self.hkv,
            head_dim: self.d,
            seqlens: if self.varlen {
                SeqLens::Varlen {
                    cu_seqlens_q: &self.cq,
                    cu_seqlens_k: &self.ck,
                }
            } else {
                SeqLens::Fixed {
                    seqlen_q: self.sq,
                    seqlen_k: self.sk,
                }
            },
        }
    }

    /// The validated problem, or `None` where `FlashAttention::new` refuses it.
    fn attention(&self) -> Option<FlashAttention> {
        FlashAttention::new(&self.shape(), &self.opts).ok()
    }

    /// Element counts of q and of k (= v) in the layout of [`DenseCase::strides`].
    fn lens(&self, attn: &FlashAttention) -> (usize, usize) {
        let (rows_q, rows_k) = if self.varlen {
            (attn.total_q(), *self.ck.last().unwrap() as usize)
        } else {
            (self.b * self.sq, self.b * self.sk)
        };
        (rows_q * self.hq * self.d, rows_k * self.hkv * self.d)
    }

    /// Strides of q (and out) and of k (= v): contiguous, or packed rows for varlen.
    fn strides(&self) -> (Strides, Strides) {
        let d = self.d;
        if self.varlen {
            let packed = |h: usize| Strides {
                batch: 0,
                seq: (h * d) as i64,
                head: d as i64,
            };
            (packed(self.hq), packed(self.hkv))
        } else {
            (
                Strides::contiguous(self.sq, self.hq, d),
                Strides::contiguous(self.sk, self.hkv, d),
            )
        }
    }
}

#[test]
fn dense_api_never_panics_on_random_input() {
    let mut r = rng(7);
    let mut outcomes = [0usize; 3];
    for case in 0..4000u64 {
        let c = DenseCase::random(&mut r, &[0, 1, 7, 8, 16, 64, 300]);
        let mut rr = rng(case);
        let run = catch_unwind(AssertUnwindSafe(|| {
            let Some(attn) = c.attention() else {
                return Outcome::Rejected;
            };
            let (qs, ks) = c.strides();
            let (q_len, kv_len) = c.lens(&attn);
            let q_len = maybe_short(&mut rr, q_len, 0.2);
            let kv_len = maybe_short(&mut rr, kv_len, 0.2);
            let q: Vec<bf16> = random_vec(&mut rr, q_len);
            let k: Vec<bf16> = random_vec(&mut rr, kv_len);
            let v: Vec<bf16> = random_vec(&mut rr, kv_len);
            let mut out = vec![bf16::ZERO; maybe_short(&mut rr, attn.out_len(), 0.2)];
            let mut lse = vec![0f32; maybe_short(&mut rr, attn.lse_len(), 0.2)];
            let q_strides = if rr.random_bool(0.1) {
                Strides {
                    batch: -1,
                    seq: 0,
                    head: 1,
                }
            } else {
                qs
            };
            let done = attn.forward_cpu(
                Strided::new(&q[..], q_strides),
                Strided::new(&k[..], ks),
                Strided::new(&v[..], ks),
                Strided::new(&mut out[..], qs),
                Some(&mut lse[..]),
            );
            outcome_of(done, &out, &lse, case)
        }));
        match run {
            Ok(o) => tally(&mut outcomes, o),
            Err(_) => panic!("case {case} panicked: {c:?}"),
        }
    }
    report("dense", outcomes);
}

/// Random e4m3 codes without NaN (0x7f, 0xff): NaN inputs give NaN outputs by definition,
/// and this sweep asserts that an `Ok` result holds none.
fn random_codes(r: &mut SmallRng, n: usize) -> Vec<F8E4M3> {
    (0..n)
        .map(|_| {
            let code: u8 = r.random();
            F8E4M3::from_bits(if code & 0x7f == 0x7f { 0 } else { code })
        })
        .collect()
}

#[test]
fn fp8_dense_api_never_panics_on_random_input() {
    let mut r = rng(13);
    let mut outcomes = [0usize; 3];
    let odd = [
        0.0f32,
        -1.0,
        f32::NAN,
        f32::INFINITY,
        1e-3,
        1.0,
        0.5,
        FP8_MAX_DESCALE * 2.0,
    ];
    for case in 0..3000u64 {
        let c = DenseCase::random(&mut r, &[0, 1, 8, 16, 32]);
        let mut rr = rng(case);
        let run = catch_unwind(AssertUnwindSafe(|| {
            let Some(attn) = c.attention() else {
                return Outcome::Rejected;
            };
            let (qs, ks) = c.strides();
            let (q_len, kv_len) = c.lens(&attn);
            let q_len = maybe_short(&mut rr, q_len, 0.1);
            let q = random_codes(&mut rr, q_len);
            let kv_len = maybe_short(&mut rr, kv_len, 0.1);
            let (k, v) = (random_codes(&mut rr, kv_len), random_codes(&mut rr, kv_len));
            // Descales: mostly valid, sometimes zero, negative, NaN, inf, too large or short.
            let descale = |rr: &mut SmallRng| -> Vec<f32> {
                let n = maybe_short(rr, c.b * c.hkv, 0.05);
                (0..n)
                    .map(|_| {
                        if rr.random_bool(0.03) {
                            odd[rr.random_range(0..odd.len())]
                        } else {
                            rr.random_range(0.1f32..2.0)
                        }
                    })
                    .collect()
            };
            let (dq, dk, dv) = (descale(&mut rr), descale(&mut rr), descale(&mut rr));
            let descales = Fp8Descales {
                q: &dq[..],
                k: &dk[..],
                v: &dv[..],
            };
            let mut out = vec![bf16::ZERO; maybe_short(&mut rr, attn.out_len(), 0.1)];
            let mut lse = vec![0f32; maybe_short(&mut rr, attn.lse_len(), 0.1)];
            let done = attn.forward_cpu_fp8(
                Strided::new(&q[..], qs),
                Strided::new(&k[..], ks),
                Strided::new(&v[..], ks),
                descales,
                Strided::new(&mut out[..], qs),
                Some(&mut lse[..]),
            );
            outcome_of(done, &out, &lse, case)
        }));
        match run {
            Ok(o) => tally(&mut outcomes, o),
            Err(_) => panic!("case {case} panicked: {c:?}"),
        }
    }
    report("fp8 dense", outcomes);
}

/// A random CSR block mask over `num_lists` lists: offsets sometimes decreasing, short or past
/// the indices; indices sometimes out of range, unsorted or repeated; `full` sometimes of
/// the wrong length.
fn random_block_lists(
    r: &mut SmallRng,
    num_lists: usize,
    num_k_blocks: usize,
) -> (Vec<i32>, Vec<i32>, Vec<bool>) {
    let mut offsets = vec![0i32];
    let mut indices = Vec::new();
    for _ in 0..num_lists {
        let mut list: Vec<i32> = (0..num_k_blocks as i32)
            .filter(|_| r.random_bool(0.4))
            .collect();
        match r.random_range(0..40) {
            0 => list.reverse(),
            1 => list.extend(list.first().copied()),
            2 => list.push(num_k_blocks as i32),
            3 => list.push(-1),
            _ => {}
        }
        indices.extend(list);
        offsets.push(indices.len() as i32);
    }
    match r.random_range(0..40) {
        0 => offsets.pop().map(drop).unwrap_or(()),
        1 => offsets.push(indices.len() as i32 + 1),
        2 => offsets[0] = 1,
        _ => {}
    }
    let full_len = if r.random_bool(0.03) {
        indices.len() + 1
    } else {
        indices.len()
    };
    let full = (0..full_len).map(|_| r.random_bool(0.5)).collect();
    (offsets, indices, full)
}

#[test]
fn block_sparse_api_never_panics_on_random_input() {
    let mut r = rng(17);
    let mut outcomes = [0usize; 3];
    for case in 0..8000u64 {
        let c = DenseCase::random(&mut r, &[0, 1, 8, 16]);
        let block_m = pick(&mut r, &[0, 1, 3, 8, 16]);
        let block_n = pick(&mut r, &[0, 1, 3, 8, 16]);
        // Mask dims: broadcast (1), the problem's, or off by one.
        let near = |r: &mut SmallRng, n: usize| match r.random_range(0..10) {
            0 => n + 1,
            1..=4 => 1,
            _ => n,
        };
        let (mb, mh) = (near(&mut r, c.b), near(&mut r, c.hq));
        let max_sq = c.sq.max(
            c.cq.windows(2)
                .map(|w| (w[1] - w[0]).max(0) as usize)
                .max()
                .unwrap_or(0),
        );
        let max_sk = c.sk.max(
            c.ck.windows(2)
                .map(|w| (w[1] - w[0]).max(0) as usize)
                .max()
                .unwrap_or(0),
        );
        let num_q_blocks = max_sq.div_ceil(block_m.max(1)) + usize::from(r.random_bool(0.05));
        let num_k_blocks = max_sk.div_ceil(block_n.max(1));
        let lists = mb * mh * num_q_blocks;
        let (offsets, indices, full) = random_block_lists(&mut r, lists, num_k_blocks);
        let top_k = pick(&mut r, &[0, 1, 2]);
        let with_rows = r.random_bool(0.2);
        let mut rr = rng(case);
        let run = catch_unwind(AssertUnwindSafe(|| {
            let Some(attn) = c.attention() else {
                return Outcome::Rejected;
            };
            let dims = BlockMaskDims {
                batch: mb,
                heads: mh,
                num_q_blocks,
                num_k_blocks,
                block_m,
                block_n,
            };
            let Ok(mask) =
                BlockMask::from_csr(dims, offsets.clone(), indices.clone(), full.clone())
            else {
                return Outcome::Rejected;
            };
            let Ok(mut bs) = BlockSparseAttention::new(attn.clone(), mask) else {
                return Outcome::Rejected;
            };
            if with_rows {
                // Per-row lists: ascending blocks, -1 padding, the odd out-of-range entry.
                let rows = attn.lse_len() * top_k;
                let blocks = (0..rows)
                    .map(|i| match rr.random_range(0..30) {
                        0 => num_k_blocks as i32,
                        1..=8 => -1,
                        _ => (i % top_k.max(1)) as i32,
                    })
                    .collect();
                let Ok(rows) = RowBlocks::new(block_n, top_k, blocks) else {
                    return Outcome::Rejected;
                };
                let Ok(with) = bs.with_row_blocks(rows) else {
                    return Outcome::Rejected;
                };
                bs = with;
            }
            let (qs, ks) = c.strides();
            let (q_len, kv_len) = c.lens(&attn);
            let q_len = maybe_short(&mut rr, q_len, 0.1);
            let q: Vec<bf16> = random_vec(&mut rr, q_len);
            let kv_len = maybe_short(&mut rr, kv_len, 0.1);
            let k: Vec<bf16> = random_vec(&mut rr, kv_len);
            let v: Vec<bf16> = random_vec(&mut rr, kv_len);
            let mut out = vec![bf16::ZERO; maybe_short(&mut rr, attn.out_len(), 0.1)];
            let mut lse = vec![0f32; maybe_short(&mut rr, attn.lse_len(), 0.1)];
            let done = bs.forward_cpu(
                Strided::new(&q[..], qs),
                Strided::new(&k[..], ks),
                Strided::new(&v[..], ks),
                Strided::new(&mut out[..], qs),
                Some(&mut lse[..]),
            );
            outcome_of(done, &out, &lse, case)
        }));
        match run {
            Ok(o) => tally(&mut outcomes, o),
            Err(_) => panic!(
                "case {case} panicked: {c:?} block {block_m}x{block_n} mask ({mb}, {mh}, \
                 {num_q_blocks}, {num_k_blocks}) offsets={offsets:?} indices={indices:?} \
                 full={full:?} top_k={top_k} rows={with_rows}"
            ),
        }
    }
    report("block-sparse", outcomes);
}

#[test]
fn paged_api_never_panics_on_random_input() {
    let mut r = rng(11);
    let mut outcomes = [0usize; 3];
    let mut prefill_outcomes = [0usize; 3];
    for case in 0..3000u64 {
        let ps = pick(&mut r, &[0, 1, 1, 3, 3, 16, 16, 16]);
        let hkv = pick(&mut r, &[0, 1, 1, 1, 2, 2]);
        let d = pick(&mut r, &[0, 8, 8, 16, 16, 40]);
        let num_pages = pick(&mut r, &[0, 4, 9, 9, 40, 40]);
        let batch = pick(&mut r, &[0, 1, 1, 2, 2, 2]);
        let max_pages = pick(&mut r, &[0, 3, 5, 5, 8, 8]);
        // Tables with the odd -1, out-of-range id or extra entry; lengths up to the row.
        let extra = usize::from(r.random_bool(0.03));
        let table: Vec<i32> = (0..batch * max_pages + extra)
            .map(|_| match r.random_range(0..50) {
                0 => -1,
                1 => num_pages as i32,
                _ => r.random_range(0..num_pages.max(1) as i32),
            })
            .collect();
        let seqlens: Vec<i32> = (0..batch)
            .map(|_| r.random_range(-1..(max_pages * ps.max(1)) as i32 + 2))
            .collect();
        let layout = PagedLayout {
            num_pages,
            page_size: ps,
            heads_kv: hkv,
            head_dim: d,
        };
        let hq = pick(&mut r, &[0, 1, 2, 2, 3, 4, 4]);
        let q_len = pick(&mut r, &[0, 1, 1, 2, 4, 17]);
        let policy = match r.random_range(0..4) {
            0 => HeadPolicy::Full,
            1 => HeadPolicy::Streaming,
            2 => HeadPolicy::Quest,
            _ => HeadPolicy::Listed,
        };
        let streaming = StreamingConfig {
            sinks: pick(&mut r, &[0, 1, 100]),
            window: pick(&mut r, &[0, 1, 8]),
        };
        let quest = QuestConfig {
            token_budget: pick(&mut r, &[0, 1, 16, 100]),
            sink_pages: pick(&mut r, &[0, 1, 3]),
        };
        let sinks = pick(&mut r, &[0, 1, 100]);
        let mut rr = rng(case);
        let run = catch_unwind(AssertUnwindSafe(|| {
            let tables = PageTable {
                block_table: &table,
                max_pages_per_seq: max_pages,
                seqlens_k: &seqlens,
            };
            let Ok(cache) = PagedCache::new(layout, tables) else {
                return Outcome::Rejected;
            };
            let opts = AttentionOptions::causal().with_sinks(sinks);
            if let Some(o) = prefill_never_panics(&cache, hq, q_len, &opts, &mut rr, case) {
                tally(&mut prefill_outcomes, o);
            }
            let decode = PagedDecode::new(&cache, hq, q_len, &opts).and_then(|dec| {
                dec.with_policy(
                    SparsePolicy::uniform(hkv, policy)
                        .with_streaming(streaming)
                        .with_quest(quest),
                )
            });
            let decode = if policy == HeadPolicy::Listed {
                // Lists of 0-3 pages, sometimes past a sequence's last page.
                let lists = (0..batch * hkv)
                    .map(|i| (0..i % 4).map(|x| 2 * x).collect())
                    .collect();
                decode.and_then(|dec| dec.with_page_lists(PageLists::new(batch, hkv, lists)?))
            } else {
                decode
            };
            let Ok(decode) = decode else {
                return Outcome::Rejected;
            };
            let q_elems = maybe_short(&mut rr, batch * q_len * hq * d, 0.1);
            let q: Vec<bf16> = random_vec(&mut rr, q_elems);
            let k: Vec<bf16> = random_vec(&mut rr, layout.cache_len());
            let v: Vec<bf16> = random_vec(&mut rr, layout.cache_len());
            let kmin: Vec<bf16> = random_vec(&mut rr, layout.meta_len());
            let kmax: Vec<bf16> = kmin
                .iter()
                .map(|x| bf16::from_f32(x.to_f32() + 1.0))
                .collect();
            let meta = || PageMeta {
                kmin: &kmin[..],
                kmax: &kmax[..],
            };
            let qs = Strides::contiguous(q_len, hq, d);
            let mut out = vec![bf16::ZERO; decode.out_len()];
            let mut lse = vec![0f32; decode.lse_len()];
            let _ = decode.select_cpu(Strided::new(&q[..], qs), meta());
            let done = decode.forward_cpu(
                Strided::new(&q[..], qs),
                KvPages {
                    k: &k[..],
                    v: &v[..],
                },
                rr.random_bool(0.8).then(meta),
                Strided::new(&mut out[..], qs),
                Some(&mut lse[..]),
            );
            outcome_of(done, &out, &lse, case)
        }));
        match run {
            Ok(o) => tally(&mut outcomes, o),
            Err(_) => panic!(
                "case {case} panicked: {layout:?} batch={batch} max_pages={max_pages} \
                 table={table:?} seqlens={seqlens:?} hq={hq} q_len={q_len} {policy:?} \
                 {streaming:?} {quest:?} sinks={sinks}"
            ),
        }
    }
    report("paged", outcomes);
    report("paged prefill", prefill_outcomes);
}

/// Paged prefill over the paged sweep's cache: `q_len` new tokens per sequence, or packed
/// chunks of random lengths (offsets sometimes decreasing or short). An `Ok` result holds
/// no NaN. `None` where the prefill problem is refused.
fn prefill_never_panics(
    cache: &PagedCache,
    hq: usize,
    q_len: usize,
    opts: &AttentionOptions,
    rr: &mut SmallRng,
    case: u64,
) -> Option<Outcome> {
    let batch = cache.batch();
    let mut cu = vec![0i32];
    for _ in 0..batch + usize::from(rr.random_bool(0.05)) {
        let len = rr.random_range(-1..=q_len as i32 + 1);
        cu.push(cu.last().unwrap() + len);
    }
    let d = cache.head_dim();
    // Fixed: q_len rows per sequence; varlen: packed rows (batch stride 0).
    let (prefill, rows, batch_stride) = if rr.random_bool(0.5) {
        let prefill = PagedPrefill::new(cache, hq, q_len, opts);
        (prefill, batch * q_len, q_len * hq * d)
    } else {
        let rows = (*cu.last().unwrap()).max(0) as usize;
        (PagedPrefill::new_varlen(cache, hq, &cu, opts), rows, 0)
    };
    let prefill = prefill.ok()?;
    let len = cache.layout().cache_len();
    let q_elems = maybe_short(rr, rows * hq * d, 0.1);
    let q: Vec<bf16> = random_vec(rr, q_elems);
    let (k, v): (Vec<bf16>, Vec<bf16>) = (random_vec(rr, len), random_vec(rr, len));
    let qs = Strides {
        batch: batch_stride as i64,
        seq: (hq * d) as i64,
        head: d as i64,
    };
    let out_elems = maybe_short(rr, prefill.out_len(), 0.1);
    let mut out = vec![bf16::ZERO; out_elems];
    let mut lse = vec![0f32; prefill.lse_len()];
    let done = prefill.forward_cpu(
        Strided::new(&q[..], qs),
        KvPages {
            k: &k[..],
            v: &v[..],
        },
        Strided::new(&mut out[..], qs),
        Some(&mut lse[..]),
    );
    Some(outcome_of(done, &out, &lse, case))
}

#[test]
fn ring_api_never_panics_on_random_input() {
    let mut r = rng(11);
    let mut outcomes = [0usize; 3];
    let shardings = [Sharding::Contiguous, Sharding::Zigzag, Sharding::Stripe];
    for case in 0..3000u64 {
        let seqlen = pick(&mut r, &[0, 1, 2, 7, 7, 33, 33]);
        let world = pick(&mut r, &[0, 1, 2, 3, 3, 5, 5]);
        let sharding = shardings[r.random_range(0..3)];
        let shape = RingShape {
            batch: pick(&mut r, &[0, 1, 1, 2, 2]),
            heads_q: pick(&mut r, &[0, 2, 4, 4, 4]),
            heads_kv: pick(&mut r, &[0, 1, 2, 2, 3]),
            head_dim: pick(&mut r, &[0, 1, 8, 8, 24, 24, usize::MAX]),
        };
        let side = |r: &mut SmallRng| {
            r.random_bool(0.5)
                .then(|| pick(r, &[0, 1, 5, 5, 9, usize::MAX]))
        };
        let (left, right) = (side(&mut r), side(&mut r));
        let mut opts = AttentionOptions::default()
            .with_window(Window::new(left, right))
            .with_sinks(pick(&mut r, &[0, 0, 1, 4, usize::MAX]));
        let odd = [0.0f32, -1.0, f32::NAN, f32::INFINITY, 0.1, 30.0];
        if r.random_bool(0.1) {
            opts = opts.with_softcap(odd[r.random_range(0..odd.len())]);
        }
        // Shard counts off by one now and then.
        let shards = (world as i64 + [0, 0, 0, -1, 1][r.random_range(0..5)]).max(0) as usize;
        let mut rr = rng(case);
        let run = catch_unwind(AssertUnwindSafe(|| {
            let Ok(layout) = RingLayout::new(seqlen, world, sharding) else {
                return Outcome::Rejected;
            };
            let Ok(ring) = RingAttention::new(layout, shape, &opts) else {
                return Outcome::Rejected;
            };
            let d = shape.head_dim;
            let st = |rank: usize, h: usize| Strides::contiguous(layout.shard_len(rank), h, d);
            let q: Vec<Vec<bf16>> = (0..shards)
                .map(|k| random_vec(&mut rr, ring.out_len(k)))
                .collect();
            let kv: Vec<Vec<bf16>> = (0..shards)
                .map(|k| {
                    let n = maybe_short(&mut rr, ring.kv_len(k), 0.05);
                    random_vec(&mut rr, n)
                })
                .collect();
            let mut out: Vec<Vec<bf16>> = (0..shards)
                .map(|k| vec![bf16::ZERO; maybe_short(&mut rr, ring.out_len(k), 0.05)])
                .collect();
            let mut lse: Vec<Vec<f32>> = (0..shards)
                .map(|k| vec![0f32; maybe_short(&mut rr, ring.lse_len(k), 0.05)])
                .collect();
            let qv: Vec<_> = (0..shards)
                .map(|k| Strided::new(&q[k][..], st(k, shape.heads_q)))
                .collect();
            let kvv: Vec<_> = (0..shards)
                .map(|k| Strided::new(&kv[k][..], st(k, shape.heads_kv)))
                .collect();
            let mut ov: Vec<_> = out
                .iter_mut()
                .enumerate()
                .map(|(k, o)| Strided::new(&mut o[..], st(k, shape.heads_q)))
                .collect();
            let mut lv: Vec<&mut [f32]> = lse.iter_mut().map(|l| &mut l[..]).collect();
            let done = ring.forward_cpu(&qv, &kvv, &kvv, &mut ov, Some(&mut lv));
            drop(ov);
            let flat_out: Vec<bf16> = out.concat();
            let flat_lse: Vec<f32> = lse.concat();
            outcome_of(done, &flat_out, &flat_lse, case)
        }));
        match run {
            Ok(o) => tally(&mut outcomes, o),
            Err(_) => panic!(
                "case {case} panicked: seqlen={seqlen} world={world} {sharding:?} {shape:?} \
                 shards={shards} {opts:?}"
            ),
        }
    }
    report("ring", outcomes);
}

#[test]
fn neighborhood_api_never_panics_on_random_input() {
    let mut r = rng(13);
    let mut outcomes = [0usize; 3];
    for case in 0..8000u64 {
        let ndims = pick(&mut r, &[0, 1, 1, 1, 2, 2, 3, 4]);
        let dims: Vec<NeighborhoodDim> = (0..ndims)
            .map(|_| {
                NeighborhoodDim::new(
                    pick(&mut r, &[0, 1, 3, 6, 9]),
                    pick(&mut r, &[0, 1, 2, 3, 5]),
                )
                .with_dilation(pick(&mut r, &[0, 1, 1, 1, 1, 2, 3]))
                .with_causal(r.random_bool(0.2))
                .with_stride(pick(&mut r, &[0, 1, 1, 1, 1, 1, 2, 3]))
            })
            .collect();
        let shape = NeighborhoodShape {
            batch: pick(&mut r, &[0, 1, 1, 2]),
            heads_q: pick(&mut r, &[0, 2, 4, 4]),
            heads_kv: pick(&mut r, &[0, 1, 2, 2, 2, 3]),
            head_dim: pick(&mut r, &[0, 8, 8, 24, 24, usize::MAX]),
            dims: &dims,
        };
        let mut opts = AttentionOptions::default();
        if r.random_bool(0.1) {
            opts = opts.with_sinks(1);
        }
        let odd = [0.0f32, -1.0, f32::NAN, f32::INFINITY, 0.1, 30.0];
        if r.random_bool(0.1) {
            opts = opts.with_softcap(odd[r.random_range(0..odd.len())]);
        }
        let mut rr = rng(case);
        let run = catch_unwind(AssertUnwindSafe(|| {
            let Ok(na) = NeighborhoodAttention::new(&shape, &opts) else {
                return Outcome::Rejected;
            };
            let (n, d) = (na.tokens(), shape.head_dim);
            let (qs, ks) = (
                Strides::contiguous(n, shape.heads_q, d),
                Strides::contiguous(n, shape.heads_kv, d),
            );
            let kv_len = maybe_short(&mut rr, shape.batch * n * shape.heads_kv * d, 0.1);
            let q: Vec<bf16> = random_vec(&mut rr, na.out_len());
            let k: Vec<bf16> = random_vec(&mut rr, kv_len);
            let v: Vec<bf16> = random_vec(&mut rr, kv_len);
            let mut out = vec![bf16::ZERO; maybe_short(&mut rr, na.out_len(), 0.1)];
            let mut lse = vec![0f32; maybe_short(&mut rr, na.lse_len(), 0.1)];
            let done = na.forward_cpu(
                Strided::new(&q[..], qs),
                Strided::new(&k[..], ks),
                Strided::new(&v[..], ks),
                Strided::new(&mut out[..], qs),
                Some(&mut lse[..]),
            );
            outcome_of(done, &out, &lse, case)
        }));
        match run {
            Ok(o) => tally(&mut outcomes, o),
            Err(_) => panic!("case {case} panicked: {dims:?} {shape:?} {opts:?}"),
        }
    }
    report("neighborhood", outcomes);
}
