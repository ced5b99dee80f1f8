//! Sparse page selection: per-head policies (DuoAttention/RazorAttention style), explicit
//! page lists, and Quest scoring with top-B selection.
//!
//! Quest score of logical page `p` for one query row `q` and kv head `g`:
//! `S(p) = sum_c max(q_c * kmax_c, q_c * kmin_c)` (no `1/sqrt(d)`; it cannot change the
//! order). **GQA aggregation: the max** over the group's query heads and over the `q_len`
//! rows, so a page that any of them would attend to strongly is kept (the pages are shared
//! by the group, and the max never lets one head's strong page be outvoted).
//!
//! Selection per (sequence, kv head): candidates are the pages holding a key that the base
//! mask leaves visible to at least one row. Always kept: the page holding the newest token and
//! the first `sink_pages` pages (when candidates). `K = min(max(B, #kept), #candidates)` pages
//! are taken with `B = max(1, token_budget / page_size)` (a budget below one page, 0 included,
//! keeps the newest page alone: the specification's `B = 0` plus the newest page): kept
//! pages first, then higher score,
//! then lower page index (ties are deterministic). Lists are in ascending page order.

use crate::error::{Error, Result};

/// How one kv head reads the cache; one launch serves any mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum HeadPolicy {
    /// Every page the base mask leaves visible ("retrieval" head, dense).
    #[default]
    Full,
    /// Sinks plus the most recent window only ([`StreamingConfig`]); its mask replaces the
    /// base mask for this head.
    Streaming,
    /// Quest top-B pages ("retrieval" head, sparse); needs the page metadata.
    Quest,
    /// The pages of an explicit [`PageLists`] entry for (sequence, kv head).
    Listed,
}

/// Mask of streaming heads: causal window of `window` tokens (the current one included)
/// plus the first `sinks` tokens, i.e. `Mask { window: (window - 1, 0), sinks }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamingConfig {
    /// Leading tokens always visible.
    pub sinks: usize,
    /// Recent tokens visible, the current one included (`>= 1`).
    pub window: usize,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        StreamingConfig {
            sinks: 4,
            window: 1024,
        }
    }
}

/// Quest budget: `token_budget / page_size` pages (at least 1: the newest page is always
/// kept, so a budget below one page, 0 included, keeps it alone) per (sequence, kv head), plus
/// the always-kept pages if they do not fit; `sink_pages` leading pages are always kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct QuestConfig {
    /// Tokens to keep per (sequence, kv head); divided by the page size into the page budget.
    pub token_budget: usize,
    /// Leading pages always kept.
    pub sink_pages: usize,
}

impl QuestConfig {
    /// Pages selected per (sequence, kv head): `max(1, token_budget / page_size)`.
    pub fn budget_pages(&self, page_size: usize) -> usize {
        (self.token_budget / page_size.max(1)).max(1)
    }
}

/// Per-kv-head policy of a decode call.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct SparsePolicy {
    /// `[heads_kv]`.
    pub heads: Vec<HeadPolicy>,
    /// Mask of the [`HeadPolicy::Streaming`] heads.
    pub streaming: StreamingConfig,
    /// Budget of the [`HeadPolicy::Quest`] heads.
    pub quest: QuestConfig,
}

impl SparsePolicy {
    /// Every kv head follows `policy`.
    pub fn uniform(heads_kv: usize, policy: HeadPolicy) -> Self {
        SparsePolicy {
            heads: vec![policy; heads_kv],
            ..Default::default()
        }
    }
    /// Sets the mask of the streaming heads.
    pub fn with_streaming(mut self, streaming: StreamingConfig) -> Self {
        self.streaming = streaming;
        self
    }
    /// Sets the Quest budget.
    pub fn with_quest(mut self, quest: QuestConfig) -> Self {
        self.quest = quest;
        self
    }
}

/// Logical page indices per (sequence, kv head), ascending and unique: entry
/// `b * heads_kv + kvh`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PageLists {
    pub(crate) batch: usize,
    pub(crate) heads_kv: usize,
    pub(crate) lists: Vec<Vec<u32>>,
}

impl PageLists {
    /// `lists[b * heads_kv + kvh]` (any order, duplicates removed).
    pub fn new(batch: usize, heads_kv: usize, lists: Vec<Vec<usize>>) -> Result<Self> {
        if batch.checked_mul(heads_kv) != Some(lists.len()) {
            return Err(Error::Shape(format!(
                "page lists: {} lists given but batch * heads_kv = {batch} * {heads_kv}",
                lists.len(),
            )));
        }
        let lists = lists
            .into_iter()
            .map(|mut l| {
                l.sort_unstable();
                l.dedup();
                l.into_iter()
                    .map(|p| {
                        u32::try_from(p)
                            .ok()
                            .filter(|&p| p <= i32::MAX as u32)
                            .ok_or_else(|| {
                                Error::Index(format!("page index {p} does not fit in i32"))
                            })
                    })
                    .collect::<Result<Vec<u32>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PageLists {
            batch,
            heads_kv,
            lists,
        })
    }

    /// Pages of (sequence `b`, kv head `kvh`), ascending; `None` when an index is out of
    /// range.
    pub fn get(&self, b: usize, kvh: usize) -> Option<&[u32]> {
        (b < self.batch && kvh < self.heads_kv).then(|| self.list(b, kvh))
    }
    /// [`PageLists::get`] of indices known to be in range.
    pub(crate) fn list(&self, b: usize, kvh: usize) -> &[u32] {
        &self.lists[b * self.heads_kv + kvh]
    }
    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Key/value heads.
    pub fn heads_kv(&self) -> usize {
        self.heads_kv
    }
    /// Longest list.
    pub fn max_len(&self) -> usize {
        self.lists.iter().map(Vec::len).max().unwrap_or(0)
    }
}

/// Result of Quest selection: `scores: [batch, heads_kv, max_pages_per_seq]` (the aggregated
/// score, `-inf` for pages that are not candidates and for non-Quest heads) and the selected
/// pages per (sequence, kv head) (empty for non-Quest heads).
#[derive(Debug, Clone, PartialEq)]
pub struct QuestSelection {
    /// Aggregated Quest score per page, `[batch, heads_kv, max_pages_per_seq]`; `-inf` where
    /// not a candidate.
    pub scores: Vec<f32>,
    /// Selected logical pages per (sequence, kv head), ascending.
    pub pages: PageLists,
}

/// Candidate logical pages of a (sequence, kv head) under the base mask.
#[derive(Debug, Clone)]
pub(crate) struct Candidates {
    /// Leading logical pages holding visible sink keys (`0..sink_pages`).
    pub sink_pages: usize,
    /// Logical pages of the visible window (after the sink pages).
    pub window: std::ops::Range<usize>,
    /// The logical page holding the newest token (`None` for an empty sequence).
    pub newest: Option<usize>,
}

impl Candidates {
    /// Candidate logical pages, ascending: the sink pages, then the window pages.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.sink_pages).chain(self.window.clone())
    }
}

/// Top-`K` selection with the documented order, from scores of candidate pages.
/// `kept(p)` marks always-kept pages. Returns pages ascending.
pub(crate) fn select_top(
    cand: &Candidates,
    scores: &[f32],
    sink_pages: usize,
    budget: usize,
) -> Vec<u32> {
    let kept = |p: usize| p < sink_pages || Some(p) == cand.newest;
    let mut all: Vec<usize> = cand.iter().collect();
    let n_kept = all.iter().filter(|&&p| kept(p)).count();
    let k = budget.max(n_kept).min(all.len());
    all.sort_by(|&a, &b| {
        kept(b)
            .cmp(&kept(a))
            .then(scores[b].total_cmp(&scores[a]))
            .then(a.cmp(&b))
    });
    let mut out: Vec<u32> = all[..k].iter().map(|&p| p as u32).collect();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    /// `ordered_bits` of paged_quest.cu: a float onto u32, order-preserving (the float total
    /// order: -NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN).
    fn ordered_bits(f: f32) -> u32 {
        let u = f.to_bits();
        if u & 0x8000_0000 != 0 {
            !u
        } else {
            u | 0x8000_0000
        }
    }

    /// The GPU selection's threshold search (quest_kernel and quest_v5_kernel's v5_select,
    /// sequentially): a 4-pass radix select of 8-bit digits, most significant first, over
    /// the ranked (candidate, not kept) pages' keys finds the take-th largest key `kth` and
    /// how many pages at `kth` are taken; taken pages are the kept ones, those above `kth`
    /// and the lowest-indexed `ties_taken` at `kth`. Returns the pages ascending.
    fn radix_model(
        cand: &Candidates,
        scores: &[f32],
        sink_pages: usize,
        budget: usize,
    ) -> Vec<u32> {
        let kept = |p: usize| p < sink_pages || Some(p) == cand.newest;
        let all: Vec<usize> = cand.iter().collect();
        let n_kept = all.iter().filter(|&&p| kept(p)).count();
        let k_sel = budget.max(n_kept).min(all.len());
        let ranked: Vec<usize> = all.iter().copied().filter(|&p| !kept(p)).collect();
        let take = k_sel - n_kept;
        let partial = take > 0 && take < ranked.len();
        let (mut prefix, mut mask, mut remaining) = (0u32, 0u32, take);
        if partial {
            for pass in 0..4 {
                let shift = 24 - 8 * pass;
                let mut hist = [0usize; 256];
                for &p in &ranked {
                    let key = ordered_bits(scores[p]);
                    if key & mask == prefix {
                        hist[((key >> shift) & 0xff) as usize] += 1;
                    }
                }
                // First digit from 255 down whose running count reaches `remaining`.
                let (mut cum, mut digit) = (0usize, 255usize);
                while digit > 0 && cum + hist[digit] < remaining {
                    cum += hist[digit];
                    digit -= 1;
                }
                remaining -= cum;
                prefix |= (digit as u32) << shift;
                mask |= 0xff << shift;
            }
        }
        let (kth, ties_taken) = (prefix, remaining);
        let mut ties = 0;
        let mut out = Vec::new();
        for &p in &all {
            let take_it = if kept(p) {
                true
            } else if !partial {
                take > 0
            } else {
                let key = ordered_bits(scores[p]);
                let tie = key == kth && ties < ties_taken;
                ties += usize::from(key == kth);
                key > kth || tie
            };
            if take_it {
                out.push(p as u32);
            }
        }
        out
    }

    /// The kernels' radix threshold search selects exactly what the documented order does
    /// (`select_top`): random scores from small sets (many exact ties), with -0.0 / +0.0,
    /// infinities and NaNs of both signs, candidates with and without sink pages and
    /// windows, budgets from 1 to beyond the candidates.
    #[test]
    fn radix_select_model_is_the_documented_order() {
        let mut r = SmallRng::seed_from_u64(17);
        let specials = [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            1.0,
            -1.0,
            1.0e-40,
        ];
        for case in 0..3000 {
            let n_pages = r.random_range(1..300usize);
            let sink = r.random_range(0..4usize).min(n_pages);
            let first = r.random_range(sink..=n_pages);
            let cand = Candidates {
                sink_pages: sink,
                window: first..n_pages,
                newest: Some(n_pages - 1),
            };
            let distinct = r.random_range(1..40usize);
            let scores: Vec<f32> = (0..n_pages)
                .map(|_| match r.random_range(0..4) {
                    0 => specials[r.random_range(0..specials.len())],
                    _ => r.random_range(0..distinct) as f32 * 0.37 - 3.0,
                })
                .collect();
            let sink_pages = r.random_range(0..5usize);
            let budget = r.random_range(1..n_pages + 5);
            assert_eq!(
                radix_model(&cand, &scores, sink_pages, budget),
                select_top(&cand, &scores, sink_pages, budget),
                "case {case}: n_pages {n_pages} budget {budget} sink pages {sink_pages}"
            );
        }
    }
}
