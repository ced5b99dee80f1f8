//! Quest selection agreement with narrower page bounds (issue 17 item 4), on the CPU: does a
//! selection that reads e4m3 page bounds (half the bytes of bf16 bounds) pick the pages the
//! bf16 bounds pick, and does it keep the attention mass?
//!
//! `cargo run --release --example quest_agreement` (no GPU; under two minutes on 2 cores).
//!
//! Keys are synthetic but shaped like an LLM's: a few large "massive" channels shared by every
//! token, topic segments (runs of 32-512 tokens drawn around one of 64 topic vectors) and
//! token noise; each query head mixes three topics of the sequence. For each case (page size,
//! token budget, seed) one sequence of 32k tokens, 2 kv heads x 4 query heads each, d128:
//! - `exact`: the bf16 cache and its bf16 bounds (the selection the kernels make today);
//! - `fp8 cache`: the same keys appended to an e4m3 cache (per-kv-head scale amax / 448), its
//!   bounds those of the stored codes (what `PagedCache` with `F8E4M3` does today);
//! - `e4m3 bounds`: the bf16 cache's bounds rounded outward to e4m3 (kmin down, kmax up, with
//!   the same scale), so each still bounds every key of its page: narrower metadata for a bf16
//!   cache.
//!
//! Printed per case: page overlap with `exact` (|S ∩ S_exact| / |S_exact|, mean over the 2 kv
//! heads), and the attention mass each selection keeps (the share of the f64 softmax over all
//! keys, bf16 keys, that falls on the selected pages, mean over the 8 query heads). The
//! selection itself is `PagedDecode::select_cpu`, the CPU twin of the kernels' selection.

use longattn::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const HKV: usize = 2;
const HQ: usize = 8;
const D: usize = 128;
const SEQ: usize = 32768;

/// A standard normal sample (Box-Muller).
fn normal(r: &mut SmallRng) -> f32 {
    let u1: f32 = r.random_range(f32::EPSILON..1.0);
    let u2: f32 = r.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// Keys `[SEQ, HKV, D]` and queries `[HQ, D]` of one case (see the module docs).
fn synthetic(seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut r = SmallRng::seed_from_u64(seed);
    let mut k = vec![0.0f32; SEQ * HKV * D];
    let mut q = vec![0.0f32; HQ * D];
    for g in 0..HKV {
        let mut bias: Vec<f32> = (0..D).map(|_| 0.3 * normal(&mut r)).collect();
        for _ in 0..4 {
            let c = r.random_range(0..D);
            bias[c] = if r.random_bool(0.5) { 8.0 } else { -8.0 };
        }
        let topics: Vec<Vec<f32>> = (0..64)
            .map(|_| (0..D).map(|_| normal(&mut r)).collect())
            .collect();
        let mut used = Vec::new();
        let mut t = 0;
        while t < SEQ {
            let len = r.random_range(32..=512).min(SEQ - t);
            let topic = r.random_range(0..topics.len());
            used.push(topic);
            for tok in t..t + len {
                for c in 0..D {
                    k[(tok * HKV + g) * D + c] = bias[c] + topics[topic][c] + 0.7 * normal(&mut r);
                }
            }
            t += len;
        }
        for h in g * (HQ / HKV)..(g + 1) * (HQ / HKV) {
            for _ in 0..3 {
                let topic = used[r.random_range(0..used.len())];
                for c in 0..D {
                    q[h * D + c] += topics[topic][c];
                }
            }
            for c in 0..D {
                q[h * D + c] += 0.5 * normal(&mut r) + 0.02 * bias[c];
            }
        }
    }
    (k, q)
}

/// The e4m3 code `c` with `c * scale` (the dequantised value, in f32 as the kernels compute it)
/// at most `x` (`down`) or at least `x` (up), nearest such; saturating at +-448.
fn e4m3_outward(x: f32, scale: f32, down: bool) -> F8E4M3 {
    // One code step toward -inf / +inf on the e4m3 line (sign-magnitude; 0x7e = 448).
    let step = |c: F8E4M3, toward_neg: bool| {
        let (neg, mag) = (c.to_bits() & 0x80 != 0, c.to_bits() & 0x7f);
        F8E4M3::from_bits(match (toward_neg, neg, mag) {
            (true, false, 0) => 0x81,
            (true, false, m) => m - 1,
            (true, true, m) => 0x80 | (m + 1).min(0x7e),
            (false, _, 0) => 0x01,
            (false, true, m) => 0x80 | (m - 1),
            (false, false, m) => (m + 1).min(0x7e),
        })
    };
    let mut c = F8E4M3::from_f32(x / scale);
    while down && c.to_f32() * scale > x && c.to_bits() != 0xfe {
        c = step(c, true);
    }
    while !down && c.to_f32() * scale < x && c.to_bits() != 0x7e {
        c = step(c, false);
    }
    c
}

/// The share of query head `h`'s softmax (scale `1/sqrt(D)`, f64, over all keys `k` as bf16)
/// that falls on the keys of `pages` (page size `ps`).
fn mass(k: &[f32], q: &[f32], h: usize, pages: &[u32], ps: usize) -> f64 {
    let g = h / (HQ / HKV);
    let scale = 1.0 / (D as f64).sqrt();
    let scores: Vec<f64> = (0..SEQ)
        .map(|t| {
            let row = &k[(t * HKV + g) * D..(t * HKV + g + 1) * D];
            let dot: f64 = row
                .iter()
                .zip(&q[h * D..(h + 1) * D])
                .map(|(&a, &b)| bf16::from_f32(a).to_f64() * bf16::from_f32(b).to_f64())
                .sum();
            dot * scale
        })
        .collect();
    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
    let total: f64 = w.iter().sum();
    let kept: f64 = pages
        .iter()
        .flat_map(|&p| p as usize * ps..((p as usize + 1) * ps).min(SEQ))
        .map(|t| w[t])
        .sum();
    kept / total
}

/// Mean page overlap of `sel` with `exact` over the kv heads.
fn overlap(sel: &QuestSelection, exact: &QuestSelection) -> f64 {
    (0..HKV)
        .map(|g| {
            let (a, b) = (sel.pages.get(0, g).unwrap(), exact.pages.get(0, g).unwrap());
            let hits = a.iter().filter(|p| b.binary_search(p).is_ok()).count();
            hits as f64 / b.len().max(1) as f64
        })
        .sum::<f64>()
        / HKV as f64
}

/// Mean kept attention mass of `sel` over the query heads.
fn mean_mass(sel: &QuestSelection, k: &[f32], q: &[f32], ps: usize) -> f64 {
    (0..HQ)
        .map(|h| mass(k, q, h, sel.pages.get(0, h / (HQ / HKV)).unwrap(), ps))
        .sum::<f64>()
        / HQ as f64
}

struct Row {
    overlap_fp8: f64,
    overlap_e4m3: f64,
    mass: [f64; 3],
}

fn case(ps: usize, budget: usize, seed: u64) -> Result<Row> {
    let (k, q) = synthetic(seed);
    let pages = SEQ.div_ceil(ps);
    let layout = PagedLayout {
        num_pages: pages,
        page_size: ps,
        heads_kv: HKV,
        head_dim: D,
    };
    let table: Vec<i32> = (0..pages as i32).collect();
    let seqlens = [SEQ as i32];
    let cache = PagedCache::new(
        layout,
        PageTable {
            block_table: &table,
            max_pages_per_seq: pages,
            seqlens_k: &seqlens,
        },
    )?;
    let kb: Vec<bf16> = k.iter().map(|&x| bf16::from_f32(x)).collect();
    // The scale of the stored (bf16) keys' largest magnitude: 448 codes reach it exactly.
    let amax = kb.iter().fold(0.0f32, |a, &x| a.max(x.to_f32().abs()));
    let scales = KvScales::uniform(HKV, amax / F8E4M3::MAX, 1.0)?;
    let cache8 = cache.clone().with_kv_scales(scales)?;
    let qb: Vec<bf16> = q.iter().map(|&x| bf16::from_f32(x)).collect();
    let st = Strides::contiguous(SEQ, HKV, D);
    let cu = [0, SEQ as i32];
    let meta_len = layout.meta_len();

    // bf16 cache and bounds.
    let (mut kc, mut vc) = (
        vec![bf16::ZERO; layout.cache_len()],
        vec![bf16::ZERO; layout.cache_len()],
    );
    let (mut kmin, mut kmax) = (vec![bf16::ZERO; meta_len], vec![bf16::ZERO; meta_len]);
    cache.append_cpu(
        &cu,
        Strided::new(&kb[..], st),
        Strided::new(&kb[..], st),
        KvPages {
            k: &mut kc[..],
            v: &mut vc[..],
        },
        Some(PageMeta {
            kmin: &mut kmin[..],
            kmax: &mut kmax[..],
        }),
    )?;
    // e4m3 cache and its bounds.
    let zero8 = F8E4M3::from_bits(0);
    let (mut kc8, mut vc8) = (
        vec![zero8; layout.cache_len()],
        vec![zero8; layout.cache_len()],
    );
    let (mut kmin8, mut kmax8) = (vec![zero8; meta_len], vec![zero8; meta_len]);
    cache8.append_cpu(
        &cu,
        Strided::new(&kb[..], st),
        Strided::new(&kb[..], st),
        KvPages {
            k: &mut kc8[..],
            v: &mut vc8[..],
        },
        Some(PageMeta {
            kmin: &mut kmin8[..],
            kmax: &mut kmax8[..],
        }),
    )?;
    // The bf16 bounds rounded outward to e4m3 with the same scale.
    let s = amax / F8E4M3::MAX;
    let out_min: Vec<F8E4M3> = kmin
        .iter()
        .map(|x| e4m3_outward(x.to_f32(), s, true))
        .collect();
    let out_max: Vec<F8E4M3> = kmax
        .iter()
        .map(|x| e4m3_outward(x.to_f32(), s, false))
        .collect();
    for (lo, x) in out_min.iter().zip(&kmin) {
        assert!(lo.to_f32() * s <= x.to_f32(), "outward rounding of kmin");
    }
    for (hi, x) in out_max.iter().zip(&kmax) {
        assert!(hi.to_f32() * s >= x.to_f32(), "outward rounding of kmax");
    }

    let policy = SparsePolicy::uniform(HKV, HeadPolicy::Quest).with_quest(QuestConfig {
        token_budget: budget,
        sink_pages: 1,
    });
    let opts = AttentionOptions::causal();
    let qs = Strides::contiguous(1, HQ, D);
    let exact = PagedDecode::new(&cache, HQ, 1, &opts)?
        .with_policy(policy.clone())?
        .select_cpu(
            Strided::new(&qb[..], qs),
            PageMeta {
                kmin: &kmin[..],
                kmax: &kmax[..],
            },
        )?;
    let dec8 = PagedDecode::new(&cache8, HQ, 1, &opts)?.with_policy(policy)?;
    let fp8 = dec8.select_cpu(
        Strided::new(&qb[..], qs),
        PageMeta {
            kmin: &kmin8[..],
            kmax: &kmax8[..],
        },
    )?;
    let e4m3 = dec8.select_cpu(
        Strided::new(&qb[..], qs),
        PageMeta {
            kmin: &out_min[..],
            kmax: &out_max[..],
        },
    )?;
    Ok(Row {
        overlap_fp8: overlap(&fp8, &exact),
        overlap_e4m3: overlap(&e4m3, &exact),
        mass: [
            mean_mass(&exact, &k, &q, ps),
            mean_mass(&fp8, &k, &q, ps),
            mean_mass(&e4m3, &k, &q, ps),
        ],
    })
}

fn main() -> Result<()> {
    println!(
        "# quest_agreement: 1 x {SEQ} tokens, {HKV} kv heads x {} query heads, d{D}, 5 seeds per case",
        HQ / HKV
    );
    println!(
        "{:<22}{:>12}{:>12}{:>14}{:>12}{:>12}{:>12}",
        "case", "overlap fp8", "(min)", "overlap e4m3", "(min)", "mass exact", "fp8 / e4m3"
    );
    for ps in [16usize, 64] {
        for budget in [1024usize, 2048, 4096] {
            let rows: Vec<Row> = (0..5)
                .map(|seed| case(ps, budget, 100 + seed))
                .collect::<Result<_>>()?;
            let n = rows.len() as f64;
            let mean = |f: &dyn Fn(&Row) -> f64| rows.iter().map(f).sum::<f64>() / n;
            let min = |f: &dyn Fn(&Row) -> f64| rows.iter().map(f).fold(f64::INFINITY, f64::min);
            println!(
                "{:<22}{:>12.3}{:>12.3}{:>14.3}{:>12.3}{:>12.3}{:>7.3} / {:.3}",
                format!("page {ps} budget {budget}"),
                mean(&|r| r.overlap_fp8),
                min(&|r| r.overlap_fp8),
                mean(&|r| r.overlap_e4m3),
                min(&|r| r.overlap_e4m3),
                mean(&|r| r.mass[0]),
                mean(&|r| r.mass[1]),
                mean(&|r| r.mass[2]),
            );
            println!(
                "QUEST_AGREEMENT {{\"page\":{ps},\"budget\":{budget},\"overlap_fp8\":{:.4},\"overlap_e4m3_bounds\":{:.4},\"mass_exact\":{:.4},\"mass_fp8\":{:.4},\"mass_e4m3_bounds\":{:.4}}}",
                mean(&|r| r.overlap_fp8),
                mean(&|r| r.overlap_e4m3),
                mean(&|r| r.mass[0]),
                mean(&|r| r.mass[1]),
                mean(&|r| r.mass[2]),
            );
        }
    }
    Ok(())
}
