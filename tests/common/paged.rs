//! The paged-cache fixtures of the paged tests (`paged_cpu.rs`, `paged_gpu.rs`,
//! `paged_v5_gpu.rs`) and the shuffled block table that the semantics tests' hand-built cache
//! uses too.

use super::{random_vec, rng};
use longattn::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use longattn::reference::paged::{decode_visible, paged_decode_f64};
use longattn::{
    AttentionOptions, Element, HeadPolicy, KvPages, KvScales, PageLists, PageMeta, PageTable,
    PagedCache, PagedDecode, PagedLayout, QuestConfig, SparsePolicy, StreamingConfig, Strided,
    Strides, Window,
};
use rand::Rng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use std::sync::Arc;

/// A block table `[pages.len(), max_pages]` (-1 past each sequence's pages): the page ids are
/// a random permutation of `0..num_pages`, handed out in order, `pages[b]` to sequence `b`.
pub fn shuffled_block_table(
    pages: &[usize],
    max_pages: usize,
    num_pages: usize,
    rng: &mut SmallRng,
) -> Vec<i32> {
    let mut ids: Vec<i32> = (0..num_pages as i32).collect();
    ids.shuffle(rng);
    let mut table = vec![-1i32; pages.len() * max_pages];
    let mut next = 0;
    for (b, &n) in pages.iter().enumerate() {
        for lp in 0..n {
            table[b * max_pages + lp] = ids[next];
            next += 1;
        }
    }
    table
}

/// A filled paged cache: pages scattered by a random permutation, K/V written through
/// `append_cpu` in chunks (a prefill chunk then decode-sized steps), and the same tokens
/// contiguous per sequence (`tokens[b]: [seqlen, heads_kv, head_dim]` for K and V) in the
/// new tokens' type `T`; the cache holds `C` (an FP8 cache quantises them on append).
pub struct Scenario<T, C = T> {
    pub cache: PagedCache,
    pub k_cache: Vec<C>,
    pub v_cache: Vec<C>,
    pub kmin: Vec<C>,
    pub kmax: Vec<C>,
    pub k_tokens: Vec<Vec<T>>,
    pub v_tokens: Vec<Vec<T>>,
}

pub fn table_for(
    seqlens: &[usize],
    page_size: usize,
    extra_pages: usize,
    rng: &mut SmallRng,
) -> (usize, usize, Vec<i32>) {
    let pages: Vec<usize> = seqlens.iter().map(|s| s.div_ceil(page_size)).collect();
    let max_pages = pages.iter().copied().max().unwrap_or(0).max(1) + 1;
    let num_pages = pages.iter().sum::<usize>() + extra_pages;
    let table = shuffled_block_table(&pages, max_pages, num_pages, rng);
    (num_pages.max(1), max_pages, table)
}

/// The cache description alone (no K/V, for the selection tests, which draw their own page
/// bounds): `seqlens` tokens per sequence on a table from [`table_for`] without spare pages.
pub fn table_cache(
    seqlens: &[usize],
    page_size: usize,
    heads_kv: usize,
    head_dim: usize,
    rng: &mut SmallRng,
) -> PagedCache {
    let (num_pages, max_pages, table) = table_for(seqlens, page_size, 0, rng);
    let layout = PagedLayout {
        num_pages,
        page_size,
        heads_kv,
        head_dim,
    };
    let sl: Vec<i32> = seqlens.iter().map(|&n| n as i32).collect();
    PagedCache::new(
        layout,
        PageTable {
            block_table: &table,
            max_pages_per_seq: max_pages,
            seqlens_k: &sl,
        },
    )
    .unwrap()
}

pub fn scenario<T: Element>(
    seqlens: &[usize],
    page_size: usize,
    heads_kv: usize,
    head_dim: usize,
    seed: u64,
) -> Scenario<T> {
    scenario_with::<T, T>(seqlens, page_size, heads_kv, head_dim, seed, None)
}

/// [`scenario`] with a cache of element type `C` and, for an FP8 cache, its scales.
pub fn scenario_with<T: Element, C: Element>(
    seqlens: &[usize],
    page_size: usize,
    heads_kv: usize,
    head_dim: usize,
    seed: u64,
    scales: Option<KvScales>,
) -> Scenario<T, C> {
    let mut r = rng(seed);
    let (num_pages, max_pages, table) = table_for(seqlens, page_size, 3, &mut r);
    let layout = PagedLayout {
        num_pages,
        page_size,
        heads_kv,
        head_dim,
    };
    // The cache description with `seqlens_k` tokens per sequence (and the scales).
    let cache_at = |seqlens_k: &[i32]| {
        let table = PageTable {
            block_table: &table,
            max_pages_per_seq: max_pages,
            seqlens_k,
        };
        let cache = PagedCache::new(layout, table).unwrap();
        match &scales {
            Some(s) => cache.with_kv_scales(s.clone()).unwrap(),
            None => cache,
        }
    };
    let row = heads_kv * head_dim;
    let k_tokens: Vec<Vec<T>> = seqlens
        .iter()
        .map(|&s| random_vec(&mut r, s * row))
        .collect();
    let v_tokens: Vec<Vec<T>> = seqlens
        .iter()
        .map(|&s| random_vec(&mut r, s * row))
        .collect();
    // Garbage in every slot and in the bounds first: nothing unwritten may leak into results,
    // and bounds must be restarted (not widened) when a page starts.
    let mut k_cache: Vec<C> = random_vec(&mut r, layout.cache_len());
    let mut v_cache: Vec<C> = random_vec(&mut r, layout.cache_len());
    let mut kmin = vec![C::from_f32(0.5); layout.meta_len()];
    let mut kmax = vec![C::from_f32(-0.5); layout.meta_len()];
    // Append schedule: first chunk up to 37 tokens, then steps of 1..=3.
    let mut done = vec![0usize; seqlens.len()];
    loop {
        let chunk: Vec<usize> = seqlens
            .iter()
            .zip(&done)
            .map(|(&s, &d)| {
                let want = if d == 0 { 37 } else { r.random_range(1..=3) };
                want.min(s - d)
            })
            .collect();
        if chunk.iter().all(|&c| c == 0) {
            break;
        }
        let now: Vec<i32> = done
            .iter()
            .zip(&chunk)
            .map(|(d, c)| (d + c) as i32)
            .collect();
        let cache = cache_at(&now);
        let mut cu = vec![0i32];
        let mut kn = Vec::new();
        let mut vn = Vec::new();
        for b in 0..seqlens.len() {
            kn.extend_from_slice(&k_tokens[b][done[b] * row..(done[b] + chunk[b]) * row]);
            vn.extend_from_slice(&v_tokens[b][done[b] * row..(done[b] + chunk[b]) * row]);
            cu.push(cu[b] + chunk[b] as i32);
        }
        let s = Strides::contiguous(1, heads_kv, head_dim);
        cache
            .append_cpu(
                &cu,
                Strided::new(&kn[..], s),
                Strided::new(&vn[..], s),
                KvPages {
                    k: &mut k_cache[..],
                    v: &mut v_cache[..],
                },
                Some(PageMeta {
                    kmin: &mut kmin[..],
                    kmax: &mut kmax[..],
                }),
            )
            .unwrap();
        for b in 0..seqlens.len() {
            done[b] += chunk[b];
        }
    }
    let sl: Vec<i32> = seqlens.iter().map(|&s| s as i32).collect();
    let cache = cache_at(&sl);
    Scenario {
        cache,
        k_cache,
        v_cache,
        kmin,
        kmax,
        k_tokens,
        v_tokens,
    }
}

impl<T, C: Element> Scenario<T, C> {
    pub fn kv(&self) -> KvPages<&[C]> {
        KvPages {
            k: &self.k_cache,
            v: &self.v_cache,
        }
    }
    pub fn meta(&self) -> PageMeta<&[C]> {
        PageMeta {
            kmin: &self.kmin,
            kmax: &self.kmax,
        }
    }
}

/// A scenario's cache and page bounds on the device (uploaded in the order k, v, kmin, kmax).
pub struct DeviceCache<C> {
    pub k: CudaSlice<C>,
    pub v: CudaSlice<C>,
    pub kmin: CudaSlice<C>,
    pub kmax: CudaSlice<C>,
}

impl<C: DeviceRepr> DeviceCache<C> {
    pub fn upload<T>(s: &Arc<CudaStream>, sc: &Scenario<T, C>) -> Self {
        DeviceCache {
            k: s.clone_htod(&sc.k_cache).unwrap(),
            v: s.clone_htod(&sc.v_cache).unwrap(),
            kmin: s.clone_htod(&sc.kmin).unwrap(),
            kmax: s.clone_htod(&sc.kmax).unwrap(),
        }
    }
    pub fn kv(&self) -> KvPages<&CudaSlice<C>> {
        KvPages {
            k: &self.k,
            v: &self.v,
        }
    }
    pub fn meta(&self) -> PageMeta<&CudaSlice<C>> {
        PageMeta {
            kmin: &self.kmin,
            kmax: &self.kmax,
        }
    }
}

pub fn q_strides(q_len: usize, heads_q: usize, d: usize) -> Strides {
    Strides::contiguous(q_len, heads_q, d)
}

/// The f64 reference of `decode` over the scenario's cache (`q: [batch, q_len, heads_q, d]`
/// contiguous), reading the keys `selected` leaves visible (`None`: the mask's).
pub fn decode_reference<T: Element, C: Element>(
    decode: &PagedDecode,
    sc: &Scenario<T, C>,
    q: &[T],
    selected: Option<&PageLists>,
) -> (Vec<f64>, Vec<f64>) {
    let st = q_strides(decode.q_len(), decode.heads_q(), sc.cache.head_dim());
    paged_decode_f64(
        decode,
        Strided::new(q, st),
        sc.kv(),
        decode_visible(decode, selected),
    )
    .unwrap()
}

/// Runs the CPU decode with 1 and 3 splits against `(want, want_lse)` (relative L2 of the
/// output below `tol`, LSE within 1e-4); returns the number of runs.
pub fn check_cpu_splits<T: Element, C: Element>(
    decode: &PagedDecode,
    sc: &Scenario<T, C>,
    q: &[T],
    (want, want_lse): (&[f64], &[f64]),
    tol: f64,
    what: &str,
) -> usize {
    for splits in [1, 3] {
        let dec = decode.clone().with_splits(Some(splits)).unwrap();
        let (out, lse) = decode_cpu(&dec, sc, q);
        let err = super::rel_l2(&super::to_f64(&out), want);
        assert!(err < tol, "{what} splits {splits}: rel L2 {err}");
        super::check_lse(&lse, want_lse, 1e-4, what);
    }
    2
}

/// The CPU decode into outputs poisoned with NaN (every element must be written).
pub fn decode_cpu<T: Element, C: Element>(
    decode: &PagedDecode,
    sc: &Scenario<T, C>,
    q: &[T],
) -> (Vec<T>, Vec<f32>) {
    let st = q_strides(decode.q_len(), decode.heads_q(), sc.cache.head_dim());
    let mut out = vec![T::from_f32(f32::NAN); decode.out_len()];
    let mut lse = vec![f32::NAN; decode.lse_len()];
    decode
        .forward_cpu(
            Strided::new(q, st),
            sc.kv(),
            Some(sc.meta()),
            Strided::new(&mut out[..], st),
            Some(&mut lse[..]),
        )
        .unwrap();
    (out, lse)
}

pub fn masks() -> Vec<(&'static str, AttentionOptions)> {
    vec![
        ("causal", AttentionOptions::causal()),
        (
            "window1",
            AttentionOptions::causal().with_window(Window::causal_tokens(1).unwrap()),
        ),
        (
            "window2+sinks3",
            AttentionOptions::causal()
                .with_window(Window::causal_tokens(2).unwrap())
                .with_sinks(3),
        ),
        (
            "window37+sinks1+softcap",
            AttentionOptions::causal()
                .with_window(Window::causal_tokens(37).unwrap())
                .with_sinks(1)
                .with_softcap(5.0),
        ),
        (
            "default (causal)+scale",
            AttentionOptions::default().with_scale(0.3),
        ),
    ]
}

pub fn quest_policy(hkv: usize, budget: usize, sink_pages: usize) -> SparsePolicy {
    SparsePolicy::uniform(hkv, HeadPolicy::Quest).with_quest(QuestConfig {
        token_budget: budget,
        sink_pages,
    })
}

pub fn mixed_decode(
    cache: &PagedCache,
    hq: usize,
    q_len: usize,
    opts: &AttentionOptions,
) -> PagedDecode {
    // kv heads: Full, Streaming, Quest, Listed.
    let policy = SparsePolicy {
        heads: vec![
            HeadPolicy::Full,
            HeadPolicy::Streaming,
            HeadPolicy::Quest,
            HeadPolicy::Listed,
        ],
        streaming: StreamingConfig {
            sinks: 3,
            window: 20,
        },
        quest: QuestConfig {
            token_budget: 48,
            sink_pages: 1,
        },
    };
    let lists: Vec<Vec<usize>> = (0..cache.batch())
        .flat_map(|b| {
            let n = cache.pages_of(b).unwrap();
            (0..4).map(move |h| {
                if h == 3 {
                    (0..n).filter(|p| p % 3 != 1).collect()
                } else {
                    vec![]
                }
            })
        })
        .collect();
    PagedDecode::new(cache, hq, q_len, opts)
        .unwrap()
        .with_policy(policy)
        .unwrap()
        .with_page_lists(PageLists::new(cache.batch(), 4, lists).unwrap())
        .unwrap()
}

/// Masks of a prefill: causal, non-causal, windows with and without sinks (rows that see
/// nothing come from sequences shorter than `q_len`), softcap, an explicit scale; the causal
/// window of `window` tokens with `sinks` sinks is sized to the test's sequences.
pub fn prefill_masks((window, sinks): (usize, usize)) -> Vec<(String, AttentionOptions)> {
    vec![
        ("causal".into(), AttentionOptions::causal()),
        ("full".into(), AttentionOptions::default()),
        (
            "causal window 1".into(),
            AttentionOptions::causal().with_window(Window::causal_tokens(1).unwrap()),
        ),
        (
            format!("causal window {window} + sinks {sinks}"),
            AttentionOptions::causal()
                .with_window(Window::causal_tokens(window).unwrap())
                .with_sinks(sinks),
        ),
        (
            "window (3, 2) + sinks 1 + softcap".into(),
            AttentionOptions::default()
                .with_window(Window::new(Some(3), Some(2)))
                .with_sinks(1)
                .with_softcap(4.0),
        ),
        (
            "causal window 70 + softcap + scale".into(),
            AttentionOptions::causal()
                .with_window(Window::causal_tokens(70).unwrap())
                .with_softcap(8.0)
                .with_scale(0.3),
        ),
    ]
}
