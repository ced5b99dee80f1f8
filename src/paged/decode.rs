//! Decode attention over the paged cache: the validated problem, Quest selection and the CPU
//! path (split-KV with the same page partition and merge as the kernels).

use super::cache::{KvPages, PageMeta, PagedCache};
use super::select::{
    Candidates, HeadPolicy, PageLists, QuestConfig, QuestSelection, SparsePolicy, StreamingConfig,
    select_top,
};
use crate::dense::AttentionOptions;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::layout::checked_elems;
use crate::layout::{Strided, Strides, check_extent, check_no_overlap};
use crate::mask::{Mask, Window};
use crate::softmax::{OnlineSoftmaxBlock, dot_block, merge_into_row, softcapped};
use rayon::prelude::*;

/// Query rows (`q_len * heads_q / heads_kv`) one GPU decode block serves
/// (`LA_PAGED_DECODE_ROWS` in paged.h): a page is read once per block.
pub const DECODE_ROWS_PER_BLOCK: usize = 8;
/// Largest `q_len` (speculative decoding drafts).
pub const MAX_Q_LEN: usize = 16;
/// Split-KV never gives a split fewer keys than this (the merge would cost more than the
/// parallelism gains).
pub const MIN_KEYS_PER_SPLIT: usize = 256;
/// Upper bound on splits.
pub const MAX_SPLITS: usize = 64;

/// Width of the Quest v5 scoring chunk: pages per block are a multiple of this
/// (`LA_QUEST_V5_CHUNK_ALIGN` in paged.h).
pub const QUEST_V5_CHUNK_ALIGN: usize = 64;
/// Most pages one Quest v5 block scores (`LA_QUEST_V5_MAX_CHUNK` in paged.h).
pub const QUEST_V5_MAX_CHUNK: usize = 1024;

/// How a split-KV GPU decode combines its splits' partial `(o, lse)` (the result is the
/// same up to f32 summation order; the CPU path merges in split order either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum SplitMerge {
    /// A second kernel merges the partials (two launches per decode step).
    #[default]
    Kernel,
    /// The decode kernel merges them itself (one launch per step): each split block writes
    /// its partial and takes a ticket on its (sequence, kv head, row group)'s counter in the
    /// plan's scratch; the block that draws the last ticket merges the group's rows and
    /// resets the counter. Every head kind and cache type the decode serves. **Opt-in, not
    /// yet run on a GPU.**
    InKernel,
    /// [`SplitMerge::InKernel`] with splits sized by pages rather than counted per block
    /// ([`PagedDecode::balanced_splits`]): every split covers at most `pages_per_split` of
    /// its block's work pages, chosen so that the step's pages spread over about two blocks
    /// per SM. In a continuous batch of mixed lengths a long sequence is split while short
    /// ones run whole and write their output directly (no partial, no merge), where equal
    /// shares would give every block the long one's split count, or none at all once the
    /// batch alone fills the GPU, leaving the long sequence's blocks as the tail. Blocks
    /// past their own split count exit at once. **Opt-in, not yet run on a GPU.**
    Balanced,
}

/// Which kernels run the Quest selection on the GPU (the selection is the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum QuestKernel {
    /// A score kernel writes every page's score, then a radix-select kernel (one block per
    /// (sequence, kv head)) selects the pages: two launches.
    #[default]
    ScoreThenSelect,
    /// Selection v5, one launch: blocks score chunks of
    /// [`PagedDecode::quest_v5_pages_per_block`] pages with several pages' bounds in flight
    /// per warp; the last block of each (sequence, kv head) (a ticket counter in the plan's
    /// scratch) selects its pages. **Opt-in, not yet run on a GPU.**
    V5,
}

/// A validated decode problem over a paged cache.
///
/// `q, out: [batch, q_len, heads_q, head_dim]` (element strides), causal among the new
/// tokens (bottom-right aligned: the last query row sees all `seqlens_k[b]` keys) unless the
/// options set an explicit right bound,
/// `lse: [batch, heads_q, q_len]` f32, natural log. A row that sees nothing gives output 0 and
/// LSE `-inf`. Query head `h` reads kv head `h / (heads_q / heads_kv)`.
///
/// Key `j` is read by query row `i` of kv head `g` iff the head's mask
/// ([`PagedDecode::base_mask`], or the streaming mask for [`HeadPolicy::Streaming`]) makes
/// it visible and, for
/// [`HeadPolicy::Quest`] / [`HeadPolicy::Listed`] heads, its page `j / page_size` is selected.
#[derive(Debug, Clone)]
pub struct PagedDecode {
    pub(crate) cache: PagedCache,
    pub(crate) heads_q: usize,
    pub(crate) q_len: usize,
    pub(crate) scale: f32,
    pub(crate) softcap: Option<f32>,
    pub(crate) mask: Mask,
    /// `None`: every kv head [`HeadPolicy::Full`], with no per-head table (a cache may
    /// declare up to `i32::MAX` kv heads; nothing is allocated per head before a call's
    /// buffers bound them).
    pub(crate) policy: Option<SparsePolicy>,
    pub(crate) lists: Option<PageLists>,
    pub(crate) num_splits: Option<usize>,
    pub(crate) merge: SplitMerge,
    pub(crate) quest_kernel: QuestKernel,
}

impl PagedDecode {
    /// `options` gives scale, softcap and the base mask. Decode queries are causal among the
    /// new tokens (semantics.md): an unbounded right side (`AttentionOptions::default()`,
    /// any `(left, -1)` window) becomes `0`, so the default options decode causally and a
    /// sliding window `(W - 1, 0)` or `(W - 1, -1)` keeps its left bound. An explicit right
    /// bound `r > 0` is kept (new token `i` then also sees up to `r` of the new tokens after
    /// it: an extension of the semantics, which define decode as causal).
    pub fn new(
        cache: &PagedCache,
        heads_q: usize,
        q_len: usize,
        options: &AttentionOptions,
    ) -> Result<Self> {
        let heads_kv = cache.heads_kv();
        if heads_q == 0 || !heads_q.is_multiple_of(heads_kv) {
            return Err(Error::Shape(format!(
                "heads_q = {heads_q} must be a positive multiple of the cache's heads_kv = \
                 {heads_kv}"
            )));
        }
        if heads_q > i32::MAX as usize {
            return Err(Error::Shape(format!("heads_q = {heads_q} must fit in i32")));
        }
        if q_len == 0 {
            return Err(Error::Shape(
                "q_len = 0: a decode step needs a new token".into(),
            ));
        }
        if q_len > MAX_Q_LEN {
            return Err(Error::Unsupported(format!(
                "q_len = {q_len}: decode takes 1..={MAX_Q_LEN} new tokens per sequence"
            )));
        }
        let scale = options.resolve_scale(cache.head_dim())?;
        checked_elems(
            &[cache.batch(), q_len, heads_q, cache.head_dim()],
            "decode q/out elements",
        )?;
        Ok(PagedDecode {
            cache: cache.clone(),
            heads_q,
            q_len,
            scale,
            softcap: options.effective_softcap(),
            mask: Mask {
                window: Window::new(
                    options.effective_mask().window.left,
                    Some(options.effective_mask().window.right.unwrap_or(0)),
                ),
                ..options.effective_mask()
            },
            policy: None,
            lists: None,
            num_splits: None,
            merge: SplitMerge::Kernel,
            quest_kernel: QuestKernel::ScoreThenSelect,
        })
    }

    /// Per-kv-head policy (`policy.heads.len() == heads_kv`).
    pub fn with_policy(mut self, policy: SparsePolicy) -> Result<Self> {
        if policy.heads.len() != self.cache.heads_kv() {
            return Err(Error::Shape(format!(
                "policy has {} heads but the cache has heads_kv = {}",
                policy.heads.len(),
                self.cache.heads_kv()
            )));
        }
        let s = policy.streaming;
        if policy.heads.contains(&HeadPolicy::Streaming)
            && (s.window == 0 || s.window > i32::MAX as usize || s.sinks > i32::MAX as usize)
        {
            return Err(Error::InvalidOption(format!(
                "streaming window = {} must be in 1..={} and sinks = {} fit in i32",
                s.window,
                i32::MAX,
                s.sinks
            )));
        }
        let q = policy.quest;
        if policy.heads.contains(&HeadPolicy::Quest)
            && (q.token_budget > i32::MAX as usize || q.sink_pages > i32::MAX as usize)
        {
            return Err(Error::InvalidOption(format!(
                "quest token_budget = {} must be at most {} and sink_pages = {} fit in i32",
                q.token_budget,
                i32::MAX,
                q.sink_pages
            )));
        }
        self.policy = Some(policy);
        Ok(self)
    }

    /// Explicit pages for the [`HeadPolicy::Listed`] heads; every page must be one of the
    /// sequence's pages (`< ceil(seqlens_k[b] / page_size)`).
    pub fn with_page_lists(mut self, lists: PageLists) -> Result<Self> {
        if lists.batch != self.cache.batch() || lists.heads_kv != self.cache.heads_kv() {
            return Err(Error::Shape(format!(
                "page lists are [{}, {}] but the cache is [batch, heads_kv] = [{}, {}]",
                lists.batch,
                lists.heads_kv,
                self.cache.batch(),
                self.cache.heads_kv()
            )));
        }
        for b in 0..lists.batch {
            let pages = self.cache.pages_in(b);
            for kvh in 0..lists.heads_kv {
                if let Some(&p) = lists.list(b, kvh).iter().find(|&&p| p as usize >= pages) {
                    return Err(Error::Index(format!(
                        "page list of sequence {b}, kv head {kvh} names page {p} but the \
                         sequence has {pages} pages"
                    )));
                }
            }
        }
        self.lists = Some(lists);
        Ok(self)
    }

    /// Forces the number of KV splits (1 = no split); `None` (default) lets the GPU path
    /// pick with [`PagedDecode::splits_for`]; the CPU path then uses 1.
    pub fn with_splits(mut self, splits: Option<usize>) -> Result<Self> {
        if let Some(s) = splits
            && !(1..=65535).contains(&s)
        {
            return Err(Error::InvalidOption(format!(
                "num_splits = {s} must be in 1..=65535"
            )));
        }
        self.num_splits = splits;
        Ok(self)
    }

    /// How the GPU decode merges its splits (default [`SplitMerge::Kernel`]; the CPU path
    /// ignores it).
    pub fn with_merge(mut self, merge: SplitMerge) -> Self {
        self.merge = merge;
        self
    }

    /// Which kernels run the GPU Quest selection (default
    /// [`QuestKernel::ScoreThenSelect`]; the CPU path ignores it).
    pub fn with_quest_kernel(mut self, kernel: QuestKernel) -> Self {
        self.quest_kernel = kernel;
        self
    }

    /// The split merge of the GPU decode.
    pub fn merge(&self) -> SplitMerge {
        self.merge
    }

    /// The kernels of the GPU Quest selection.
    pub fn quest_kernel(&self) -> QuestKernel {
        self.quest_kernel
    }

    /// Ticket counters of [`SplitMerge::InKernel`]: one per decode block row, i.e. per
    /// (sequence, kv head, group of [`DECODE_ROWS_PER_BLOCK`] query rows):
    /// `batch * heads_kv * ceil(q_len * group / DECODE_ROWS_PER_BLOCK)`.
    pub fn merge_counters_len(&self) -> usize {
        let row_groups = (self.q_len * self.group()).div_ceil(DECODE_ROWS_PER_BLOCK);
        self.cache.batch() * self.cache.heads_kv() * row_groups
    }

    /// Pages one [`QuestKernel::V5`] block scores: enough blocks per (sequence, kv head) row
    /// that the launch covers about 2 blocks per SM (`sm_count`), a multiple of
    /// [`QUEST_V5_CHUNK_ALIGN`] (every warp keeps several pages in flight) and at most
    /// [`QUEST_V5_MAX_CHUNK`] (the chunk's page ids and scores sit in shared memory). The
    /// launch has `ceil(max_pages_per_seq / pages_per_block)` blocks per row; more blocks
    /// per row mean more tickets and a shorter scoring chain, fewer mean more pages per warp.
    pub fn quest_v5_pages_per_block(&self, sm_count: usize) -> usize {
        let rows = (self.cache.batch() * self.cache.heads_kv()).max(1);
        let per_row = sm_count.max(1).saturating_mul(2).div_ceil(rows).max(1);
        self.cache
            .max_pages_per_seq()
            .div_ceil(per_row)
            .next_multiple_of(QUEST_V5_CHUNK_ALIGN)
            .clamp(QUEST_V5_CHUNK_ALIGN, QUEST_V5_MAX_CHUNK)
    }

    /// The validated cache description.
    pub fn cache(&self) -> &PagedCache {
        &self.cache
    }
    /// Query heads.
    pub fn heads_q(&self) -> usize {
        self.heads_q
    }
    /// New query tokens per sequence (1 for plain decode).
    pub fn q_len(&self) -> usize {
        self.q_len
    }
    /// The resolved multiplier of `q.k`.
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// The softcap in force (`None` when off).
    pub fn softcap(&self) -> Option<f32> {
        self.softcap
    }
    /// The sparse page-selection policy set by [`Self::with_policy`] (streaming heads,
    /// Quest); `None`: every kv head reads all its visible pages.
    pub fn policy(&self) -> Option<&SparsePolicy> {
        self.policy.as_ref()
    }
    /// The policy of kv head `kvh`; `None` when `kvh` is not a kv head of the cache.
    pub fn head_policy(&self, kvh: usize) -> Option<HeadPolicy> {
        (kvh < self.cache.heads_kv()).then(|| self.head_policy_at(kvh))
    }
    /// [`Self::head_policy`] for a kv head the caller has checked.
    pub(crate) fn head_policy_at(&self, kvh: usize) -> HeadPolicy {
        self.policy
            .as_ref()
            .map_or(HeadPolicy::Full, |p| p.heads[kvh])
    }
    /// Whether some kv head follows `kind`.
    pub fn has_heads(&self, kind: HeadPolicy) -> bool {
        match &self.policy {
            Some(p) => p.heads.contains(&kind),
            None => kind == HeadPolicy::Full,
        }
    }
    /// The Quest budget in force (the default when no policy is set).
    pub fn quest_config(&self) -> QuestConfig {
        self.policy
            .as_ref()
            .map_or_else(Default::default, |p| p.quest)
    }
    /// The streaming heads' mask in force (the default when no policy is set).
    pub fn streaming_config(&self) -> StreamingConfig {
        self.policy
            .as_ref()
            .map_or_else(Default::default, |p| p.streaming)
    }
    /// Kv heads per policy, `[Full, Streaming, Quest]` (heads of one kind share their
    /// pages), and the Listed heads. O(1) without a given policy, else O(`heads_kv`): the
    /// caller's list.
    fn heads_by_kind(&self) -> ([usize; 3], Vec<usize>) {
        let Some(p) = &self.policy else {
            return ([self.cache.heads_kv(), 0, 0], Vec::new());
        };
        let (mut counts, mut listed) = ([0; 3], Vec::new());
        for (kvh, &h) in p.heads.iter().enumerate() {
            match h {
                HeadPolicy::Full => counts[0] += 1,
                HeadPolicy::Streaming => counts[1] += 1,
                HeadPolicy::Quest => counts[2] += 1,
                HeadPolicy::Listed => listed.push(kvh),
            }
        }
        (counts, listed)
    }
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.heads_q / self.cache.heads_kv()
    }
    /// The kv head that query head `h` reads.
    pub fn kv_head(&self, h: usize) -> usize {
        h / self.group()
    }
    /// Elements of a contiguous q or out: `batch * q_len * heads_q * head_dim`.
    pub fn out_len(&self) -> usize {
        self.cache.batch() * self.q_len * self.heads_q * self.cache.head_dim()
    }
    /// LSE values: `batch * heads_q * q_len`.
    pub fn lse_len(&self) -> usize {
        self.cache.batch() * self.heads_q * self.q_len
    }
    pub(crate) fn lse_index(&self, b: usize, h: usize, i: usize) -> usize {
        (b * self.heads_q + h) * self.q_len + i
    }
    /// Whether some head needs the Quest metadata.
    pub fn needs_meta(&self) -> bool {
        self.has_heads(HeadPolicy::Quest)
    }

    /// The decode mask of Full, Quest and Listed heads (and of the Quest candidates): the
    /// options' mask with an unbounded right side replaced by 0 (causal among the new
    /// tokens).
    pub fn base_mask(&self) -> Mask {
        self.mask
    }

    /// The mask kv head `kvh` applies (streaming heads use their own); `None` when `kvh` is
    /// not a kv head of the cache.
    pub fn mask_of(&self, kvh: usize) -> Option<Mask> {
        (kvh < self.cache.heads_kv()).then(|| self.mask_at(kvh))
    }

    /// [`Self::mask_of`] for a kv head the caller has checked.
    pub(crate) fn mask_at(&self, kvh: usize) -> Mask {
        match self.head_policy_at(kvh) {
            HeadPolicy::Streaming => self.streaming_mask(),
            _ => self.mask,
        }
    }

    /// The mask of the [`HeadPolicy::Streaming`] heads. Their window is validated (>= 1)
    /// only when such a head exists; without one the mask is unused, and an unchecked window
    /// of 0 must not underflow.
    fn streaming_mask(&self) -> Mask {
        let s = self.streaming_config();
        Mask {
            window: Window::new(Some(s.window.saturating_sub(1)), Some(0)),
            sinks: s.sinks,
        }
    }

    /// Candidate pages of sequence `b` for Quest: those with a key the base mask leaves
    /// visible to some row.
    pub(crate) fn candidates(&self, b: usize) -> Candidates {
        let sk = self.cache.seqlen_of(b);
        let tiles = self
            .mask
            .key_tiles(0..self.q_len, self.q_len, sk, self.cache.page_size());
        Candidates {
            sink_pages: tiles.sink_tiles.end,
            window: tiles.window_tiles,
            newest: (sk > 0).then(|| (sk - 1) / self.cache.page_size()),
        }
    }

    /// Split count for the GPU: about 2 blocks per SM (`sm_count`; one wave at the decode
    /// kernel's 2 resident blocks per SM), never splits of fewer than [`MIN_KEYS_PER_SPLIT`]
    /// keys, at most [`MAX_SPLITS`]. A forced count ([`PagedDecode::with_splits`]) wins. The 2
    /// comes from split sweeps on an H200 with the one-block-per-row merge (batch 1 x
    /// 64k/128k, 8 kv heads: 33 splits beat 24 by 3-4% and 16, 48 or 66 splits by 8-17%), see
    /// docs/benchmarks.md.
    ///
    /// Sparsity-aware: the keys that bound the split count are those of the largest block's
    /// *work list* ([`PagedDecode::max_block_work_pages`] pages), not the sequence length, so
    /// a Quest head at 64k tokens with a 2,048-token budget splits like a 2k-token sequence,
    /// and a split never gets less than one page.
    pub fn splits_for(&self, sm_count: usize) -> usize {
        if let Some(s) = self.num_splits {
            return s;
        }
        let rows = self.q_len * self.group();
        let blocks =
            self.cache.batch() * self.cache.heads_kv() * rows.div_ceil(DECODE_ROWS_PER_BLOCK);
        let target = sm_count.max(1).saturating_mul(2);
        if blocks >= target {
            return 1;
        }
        let pages = self.max_block_work_pages();
        let by_keys = pages * self.cache.page_size() / MIN_KEYS_PER_SPLIT;
        target
            .div_ceil(blocks)
            .min(by_keys)
            .min(pages)
            .clamp(1, MAX_SPLITS)
    }

    /// Split count and pages per split of [`SplitMerge::Balanced`] for a GPU with
    /// `sm_count` SMs, `(splits, pages_per_split)`: `pages_per_split` is the step's work
    /// pages over all blocks ([`PagedDecode::visit_block_work`]) spread over about 2 blocks
    /// per SM (as [`PagedDecode::splits_for`]), never fewer pages than
    /// [`MIN_KEYS_PER_SPLIT`] keys, never more than [`MAX_SPLITS`] splits of the largest
    /// block; `splits` is what the largest block needs. A forced count
    /// ([`PagedDecode::with_splits`]) divides the largest block's work into that many. A
    /// block with `n` work pages runs `ceil(n / pages_per_split)` splits (at least one).
    pub fn balanced_splits(&self, sm_count: usize) -> (usize, usize) {
        let (mut total, mut most) = (0usize, 0usize);
        self.visit_work_groups(|n, blocks| {
            total = total.saturating_add(n.saturating_mul(blocks));
            most = most.max(n);
        });
        if most == 0 {
            return (1, 1);
        }
        let per = match self.num_splits {
            Some(s) => most.div_ceil(s),
            None => {
                let target = sm_count.max(1).saturating_mul(2);
                let min_pages = MIN_KEYS_PER_SPLIT.div_ceil(self.cache.page_size());
                total
                    .div_ceil(target)
                    .max(min_pages)
                    .max(most.div_ceil(MAX_SPLITS))
            }
        }
        .min(most);
        (most.div_ceil(per), per)
    }

    /// Most pages one GPU decode block visits ([`PagedDecode::visit_block_work`]).
    pub fn max_block_work_pages(&self) -> usize {
        let mut most = 0;
        self.visit_work_groups(|n, _| most = most.max(n));
        most
    }

    /// Calls `visit` with the work pages of every GPU decode block (sequence, kv head, block
    /// of [`DECODE_ROWS_PER_BLOCK`] query rows): Full heads the pages of the base mask's
    /// window/sinks for the block's rows, streaming heads their sinks + window pages, Listed
    /// heads their list, Quest heads the pages the selection keeps
    /// (`min(max(budget, #always-kept), #candidates)`, the exact selected count).
    pub fn visit_block_work(&self, mut visit: impl FnMut(usize)) {
        self.visit_work_groups(|n, blocks| (0..blocks).for_each(|_| visit(n)));
    }

    /// [`Self::visit_block_work`] with the blocks that share their pages merged, `visit(pages,
    /// blocks)`: the kv heads of one kind (Full, Streaming, Quest) read the same pages for the
    /// same rows, so the cost follows the sequences, row blocks and the caller's policy and
    /// lists, never the declared `heads_kv` alone.
    fn visit_work_groups(&self, mut visit: impl FnMut(usize, usize)) {
        let group = self.group();
        let rows = self.q_len * group;
        let row_blocks = rows.div_ceil(DECODE_ROWS_PER_BLOCK);
        let ps = self.cache.page_size();
        let ([full, streaming, quest], listed) = self.heads_by_kind();
        for b in 0..self.cache.batch() {
            let sk = self.cache.seqlen_of(b);
            for (mask, heads) in [(self.mask, full), (self.streaming_mask(), streaming)] {
                if heads == 0 {
                    continue;
                }
                for rb in 0..row_blocks {
                    let r0 = rb * DECODE_ROWS_PER_BLOCK;
                    let r1 = (r0 + DECODE_ROWS_PER_BLOCK).min(rows);
                    let qi = r0 / group..(r1 - 1) / group + 1;
                    visit(mask.key_tiles(qi, self.q_len, sk, ps).count(), heads);
                }
            }
            if quest > 0 {
                visit(self.quest_selected_count(b), quest * row_blocks);
            }
            match &self.lists {
                Some(l) => listed
                    .iter()
                    .for_each(|&kvh| visit(l.list(b, kvh).len(), row_blocks)),
                None if !listed.is_empty() => visit(0, listed.len() * row_blocks),
                None => {}
            }
        }
    }

    /// Pages the Quest selection keeps for sequence `b` (the count [`select_top`] takes:
    /// `min(max(budget, #kept), #candidates)`), in closed form.
    fn quest_selected_count(&self, b: usize) -> usize {
        let cand = self.candidates(b);
        let quest = self.quest_config();
        let sink_pages = quest.sink_pages;
        let n_cand = cand.sink_pages + cand.window.len();
        // Kept candidates: those below `sink_pages` (in the sink range or the window, which
        // are disjoint), plus the newest page when it is a candidate not counted yet.
        let below = cand.sink_pages.min(sink_pages)
            + cand
                .window
                .end
                .min(sink_pages)
                .saturating_sub(cand.window.start);
        let newest = cand
            .newest
            .is_some_and(|p| p >= sink_pages && (p < cand.sink_pages || cand.window.contains(&p)));
        let budget = quest.budget_pages(self.cache.page_size());
        budget.max(below + usize::from(newest)).min(n_cand)
    }

    /// Bytes of K and V the kernels read (each selected page once per (sequence, kv head,
    /// row block)), for throughput reports; saturates at `usize::MAX`.
    pub fn kv_bytes_read(&self, elem_bytes: usize) -> usize {
        let rows = self.q_len * self.group();
        let blocks = rows.div_ceil(DECODE_ROWS_PER_BLOCK);
        let ps = self.cache.page_size();
        // Heads of one kind read the same pages: O(batch), plus the caller's policy and lists.
        let ([full, streaming, quest], listed) = self.heads_by_kind();
        let mut tokens = 0usize;
        for b in 0..self.cache.batch() {
            let sk = self.cache.seqlen_of(b);
            let pages = |mask: Mask, heads: usize| {
                (heads > 0).then(|| mask.key_tiles(0..self.q_len, self.q_len, sk, ps).count())
            };
            let listed_pages = self
                .lists
                .as_ref()
                .map_or(0, |l| listed.iter().map(|&kvh| l.list(b, kvh).len()).sum());
            for (n, heads) in [
                (pages(self.mask, full), full),
                (pages(self.streaming_mask(), streaming), streaming),
                ((quest > 0).then(|| self.quest_selected_count(b)), quest),
                (Some(listed_pages), 1),
            ] {
                let n = n.unwrap_or(0).saturating_mul(heads).saturating_mul(ps);
                tokens = tokens.saturating_add(n);
            }
        }
        // Saturating: `elem_bytes` is the caller's (a report, never a size to allocate).
        [blocks, 2, self.cache.head_dim(), elem_bytes]
            .iter()
            .fold(tokens, |acc, &x| acc.saturating_mul(x))
    }

    /// Logical pages (ascending) that rows `rows` of (sequence `b`, kv head `kvh`) read, in
    /// the kernels' order: sink pages, then window pages; or the selected list.
    pub(crate) fn work_pages(
        &self,
        b: usize,
        kvh: usize,
        rows: std::ops::Range<usize>,
        selected: Option<&PageLists>,
    ) -> Vec<u32> {
        match self.head_policy_at(kvh) {
            HeadPolicy::Quest | HeadPolicy::Listed => {
                selected.map_or_else(Vec::new, |l| l.list(b, kvh).to_vec())
            }
            HeadPolicy::Full | HeadPolicy::Streaming => {
                let sk = self.cache.seqlen_of(b);
                let t = self
                    .mask_at(kvh)
                    .key_tiles(rows, self.q_len, sk, self.cache.page_size());
                t.iter().map(|p| p as u32).collect()
            }
        }
    }

    pub(crate) fn check_io(
        &self,
        q: (usize, &Strides),
        out: Option<(usize, &Strides)>,
        lse: Option<usize>,
    ) -> Result<()> {
        let dims = [
            self.cache.batch(),
            self.q_len,
            self.heads_q,
            self.cache.head_dim(),
        ];
        check_extent("q", q.1, dims, q.0)?;
        if let Some((len, s)) = out {
            check_extent("out", s, dims, len)?;
            check_no_overlap("out", s, dims, len)?;
        }
        if let Some(len) = lse
            && len < self.lse_len()
        {
            return Err(Error::Shape(format!(
                "lse holds {len} values but batch * heads_q * q_len = {} are needed",
                self.lse_len()
            )));
        }
        Ok(())
    }

    /// Validates the inputs of a Quest selection: `q` and the metadata lengths.
    pub(crate) fn check_select(&self, q: (usize, &Strides), meta: (usize, usize)) -> Result<()> {
        self.check_io(q, None, None)?;
        self.cache.check_meta(meta.0, meta.1)
    }

    /// Validates the inputs of a decode (CPU or GPU): `q`, `out`, `lse`, the K/V cache and
    /// metadata lengths, and what the policy needs (metadata for Quest heads, lists for
    /// Listed heads).
    pub(crate) fn check_forward(
        &self,
        q: (usize, &Strides),
        out: (usize, &Strides),
        lse: Option<usize>,
        kv: (usize, usize),
        meta: Option<(usize, usize)>,
    ) -> Result<()> {
        self.check_io(q, Some(out), lse)?;
        self.cache.check_kv(kv.0, kv.1)?;
        if let Some((kmin, kmax)) = meta {
            self.cache.check_meta(kmin, kmax)?;
        }
        if self.needs_meta() && meta.is_none() {
            return Err(Error::InvalidOption(
                "Quest heads need the page metadata (kmin, kmax)".into(),
            ));
        }
        self.check_lists_given()
    }

    /// Listed heads need their page lists.
    pub(crate) fn check_lists_given(&self) -> Result<()> {
        if self.has_heads(HeadPolicy::Listed) && self.lists.is_none() {
            return Err(Error::InvalidOption(
                "Listed heads need page lists (PagedDecode::with_page_lists)".into(),
            ));
        }
        Ok(())
    }

    fn q_row<T: Element>(&self, q: &Strided<&[T]>, b: usize, i: usize, h: usize) -> Vec<f32> {
        q.head_rows_f32(b, i..i + 1, h, self.cache.head_dim())
    }

    /// Quest selection on the CPU: scores and the selected pages of every Quest head.
    /// `q: [batch, q_len, heads_q, head_dim]`; metadata as written by the append, in the
    /// cache's element type `C` (an FP8 cache's bounds are scaled by its K scales).
    pub fn select_cpu<T: Element, C: Element>(
        &self,
        q: Strided<&[T]>,
        meta: PageMeta<&[C]>,
    ) -> Result<QuestSelection> {
        self.check_select(q.extent(), (meta.kmin.len(), meta.kmax.len()))?;
        let scales = self.cache.scales_for(C::DTYPE)?;
        let (hkv, d, mp) = (
            self.cache.heads_kv(),
            self.cache.head_dim(),
            self.cache.max_pages_per_seq(),
        );
        let layout = self.cache.layout();
        let quest = self.quest_config();
        let budget = quest.budget_pages(self.cache.page_size());
        let per: Vec<(Vec<f32>, Vec<u32>)> = (0..self.cache.batch() * hkv)
            .into_par_iter()
            .map(|bg| {
                let (b, kvh) = (bg / hkv, bg % hkv);
                let mut scores = vec![f32::NEG_INFINITY; mp];
                if self.head_policy_at(kvh) != HeadPolicy::Quest {
                    return (scores, Vec::new());
                }
                let rows: Vec<Vec<f32>> = (0..self.q_len)
                    .flat_map(|i| (0..self.group()).map(move |gh| (i, gh)))
                    .map(|(i, gh)| self.q_row(&q, b, i, kvh * self.group() + gh))
                    .collect();
                let cand = self.candidates(b);
                for p in cand.iter() {
                    let mo = layout.meta_at(self.cache.page_at(b, p), kvh);
                    let (lo, hi) = (&meta.kmin[mo..mo + d], &meta.kmax[mo..mo + d]);
                    // The bounds of the dequantised keys are the stored bounds times the
                    // (positive) K scale, which factors out of the sum.
                    scores[p] = rows
                        .iter()
                        .map(|qr| {
                            (0..d)
                                .map(|c| (qr[c] * hi[c].to_f32()).max(qr[c] * lo[c].to_f32()))
                                .sum::<f32>()
                        })
                        .fold(f32::NEG_INFINITY, f32::max)
                        * scales.of(kvh).0;
                }
                let sel = select_top(&cand, &scores, quest.sink_pages, budget);
                (scores, sel)
            })
            .collect();
        let mut scores = Vec::with_capacity(self.cache.batch() * hkv * mp);
        let mut lists = Vec::with_capacity(per.len());
        for (s, l) in per {
            scores.extend(s);
            lists.push(l);
        }
        Ok(QuestSelection {
            scores,
            pages: PageLists {
                batch: self.cache.batch(),
                heads_kv: hkv,
                lists,
            },
        })
    }

    /// Selected pages of the Quest and Listed heads (Quest from `select_cpu`).
    fn selected_pages<T: Element, C: Element>(
        &self,
        q: &Strided<&[T]>,
        meta: Option<&PageMeta<&[C]>>,
    ) -> Result<Option<PageLists>> {
        if !self.needs_meta() && self.lists.is_none() {
            return Ok(None);
        }
        let hkv = self.cache.heads_kv();
        let mut lists = match meta {
            Some(m) if self.needs_meta() => {
                let q = Strided::new(q.data, q.strides);
                self.select_cpu(
                    q,
                    PageMeta {
                        kmin: m.kmin,
                        kmax: m.kmax,
                    },
                )?
                .pages
            }
            _ => PageLists {
                batch: self.cache.batch(),
                heads_kv: hkv,
                lists: vec![Vec::new(); self.cache.batch() * hkv],
            },
        };
        if let Some(given) = &self.lists {
            for b in 0..self.cache.batch() {
                for kvh in 0..hkv {
                    if self.head_policy_at(kvh) == HeadPolicy::Listed {
                        lists.lists[b * hkv + kvh] = given.list(b, kvh).to_vec();
                    }
                }
            }
        }
        Ok(Some(lists))
    }

    /// CPU decode (also the fallback without a GPU): f32 accumulation, the page list split
    /// into `num_splits` contiguous parts (forced count, else 1) as on the GPU, each part an
    /// online softmax over its pages, merged with [`merge_weights`](crate::softmax::merge_weights).
    ///
    /// The cache's element type `C` may differ from `T` (q/out): keys and values are read as
    /// `C` times the kv head's [`KvScales`](super::KvScales) for an FP8 cache (the K scale
    /// folded into the score scale, the V scale applied to the output row), as stored for any
    /// other type.
    pub fn forward_cpu<T: Element, C: Element>(
        &self,
        q: Strided<&[T]>,
        kv: KvPages<&[C]>,
        meta: Option<PageMeta<&[C]>>,
        out: Strided<&mut [T]>,
        lse: Option<&mut [f32]>,
    ) -> Result<()> {
        self.check_forward(
            q.extent(),
            out.extent(),
            lse.as_ref().map(|l| l.len()),
            (kv.k.len(), kv.v.len()),
            meta.as_ref().map(|m| (m.kmin.len(), m.kmax.len())),
        )?;
        let scales = self.cache.scales_for(C::DTYPE)?;
        let selected = self.selected_pages(&q, meta.as_ref())?;
        let splits = self.num_splits.unwrap_or(1);
        let (d, ps) = (self.cache.head_dim(), self.cache.page_size());
        // One task per (sequence, query row, kv head): the `group` query heads that share a
        // kv head share its pages and mask, so each page's keys and values are converted
        // once and scored against all of them as one row block (the dense path's
        // `dot_block` and `OnlineSoftmaxBlock`, whose rows have the bits of the row-by-row
        // `dot` and `OnlineSoftmax`).
        let group = self.group();
        let tasks: Vec<(usize, usize, usize)> = (0..self.cache.batch())
            .flat_map(|b| {
                (0..self.q_len)
                    .flat_map(move |i| (0..self.cache.heads_kv()).map(move |kvh| (b, i, kvh)))
            })
            .collect();
        let results: Vec<(Vec<f32>, Vec<f32>)> = tasks
            .par_iter()
            .map(|&(b, i, kvh)| {
                let (k_scale, v_scale) = scales.of(kvh);
                let score_scale = self.scale * k_scale;
                let mask = self.mask_at(kvh);
                let sk = self.cache.seqlen_of(b);
                let heads = kvh * group..(kvh + 1) * group;
                let qg: Vec<f32> = heads.flat_map(|h| self.q_row(&q, b, i, h)).collect();
                let pages = self.work_pages(b, kvh, i..i + 1, selected.as_ref());
                let n = pages.len();
                let mut acc = (vec![0.0f32; group * d], vec![f32::NEG_INFINITY; group]);
                // A page holds at most `min(page_size, seqlen)` of this sequence's keys: the
                // working rows are sized by what the step reads, not by the page size.
                let per_page = ps.min(sk);
                let mut scores = vec![0.0f32; group * per_page];
                let (mut krows, mut vrows) =
                    (vec![0.0f32; per_page * d], vec![0.0f32; per_page * d]);
                let (mut o, mut l) = (vec![0.0f32; group * d], vec![0.0f32; group]);
                for s in 0..splits {
                    let part = &pages[s * n / splits..(s + 1) * n / splits];
                    let mut state = OnlineSoftmaxBlock::new(group, d);
                    for &p in part {
                        let p = p as usize;
                        let keys = p * ps..((p + 1) * ps).min(sk);
                        let nk = keys.len();
                        for (t, j) in keys.clone().enumerate() {
                            let off = self.cache.token_at(b, j, kvh);
                            for (rows, cache) in [(&mut krows, kv.k), (&mut vrows, kv.v)] {
                                for (dst, x) in rows[t * d..(t + 1) * d]
                                    .iter_mut()
                                    .zip(&cache[off..off + d])
                                {
                                    *dst = x.to_f32();
                                }
                            }
                        }
                        let scores = &mut scores[..group * nk];
                        dot_block(&qg, &krows[..nk * d], d, scores);
                        for row in scores.chunks_exact_mut(nk) {
                            for (x, j) in row.iter_mut().zip(keys.clone()) {
                                *x = if mask.visible(i, j, self.q_len, sk) {
                                    softcapped(*x * score_scale, self.softcap)
                                } else {
                                    f32::NEG_INFINITY
                                };
                            }
                        }
                        state.update(scores, &vrows[..nk * d]);
                    }
                    state.finish(&mut o, &mut l);
                    for (r, &l) in l.iter().enumerate() {
                        let (a, a_lse) = (&mut acc.0[r * d..(r + 1) * d], &mut acc.1[r]);
                        merge_into_row(a, a_lse, o[r * d..(r + 1) * d].iter().copied(), l);
                    }
                }
                acc.0.iter_mut().for_each(|x| *x *= v_scale);
                acc
            })
            .collect();
        let mut out = out;
        let mut lse = lse;
        for (&(b, i, kvh), (o, l)) in tasks.iter().zip(results) {
            for (r, h) in (kvh * group..(kvh + 1) * group).enumerate() {
                out.store_head_rows(b, i..i + 1, h, d, &o[r * d..(r + 1) * d]);
                if let Some(lse) = lse.as_deref_mut() {
                    lse[self.lse_index(b, h, i)] = l[r];
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paged::{PageTable, PagedLayout};

    /// A cache of `batch` sequences of `seqlen` tokens, pages in order.
    fn decode(
        batch: usize,
        heads_kv: usize,
        seqlen: usize,
        ps: usize,
        hq: usize,
        q_len: usize,
    ) -> PagedDecode {
        decode_lens(&vec![seqlen; batch], heads_kv, ps, hq, q_len)
    }

    /// A cache of sequences of `seqlens` tokens, pages in order.
    fn decode_lens(
        seqlens: &[usize],
        heads_kv: usize,
        ps: usize,
        hq: usize,
        q_len: usize,
    ) -> PagedDecode {
        let batch = seqlens.len();
        let mp = seqlens.iter().max().unwrap().div_ceil(ps).max(1);
        let table: Vec<i32> = (0..(batch * mp) as i32).collect();
        let sl: Vec<i32> = seqlens.iter().map(|&s| s as i32).collect();
        let cache = PagedCache::new(
            PagedLayout {
                num_pages: batch * mp,
                page_size: ps,
                heads_kv,
                head_dim: 64,
            },
            PageTable {
                block_table: &table,
                max_pages_per_seq: mp,
                seqlens_k: &sl,
            },
        )
        .unwrap();
        PagedDecode::new(&cache, hq, q_len, &AttentionOptions::default()).unwrap()
    }

    /// Both opt-ins default off and round-trip through the builders; the CPU path ignores
    /// them (same output).
    #[test]
    fn merge_and_quest_kernel_options() {
        let d = decode(2, 2, 100, 16, 4, 1);
        assert_eq!(d.merge(), SplitMerge::Kernel);
        assert_eq!(d.quest_kernel(), QuestKernel::ScoreThenSelect);
        let e = d
            .clone()
            .with_merge(SplitMerge::InKernel)
            .with_quest_kernel(QuestKernel::V5);
        assert_eq!(e.merge(), SplitMerge::InKernel);
        assert_eq!(e.quest_kernel(), QuestKernel::V5);
        assert_eq!(SplitMerge::default(), SplitMerge::Kernel);
        assert_eq!(QuestKernel::default(), QuestKernel::ScoreThenSelect);
    }

    /// One merge counter per decode block row: (sequence, kv head, group of 8 query rows),
    /// the grid's y * z.
    #[test]
    fn merge_counters_cover_the_decode_grid() {
        for (batch, hkv, hq, q_len) in [(1, 8, 32, 1), (3, 2, 4, 5), (2, 1, 16, 3), (5, 4, 4, 16)] {
            let d = decode(batch, hkv, 300, 16, hq, q_len);
            let rows = q_len * hq / hkv;
            let row_groups = rows.div_ceil(DECODE_ROWS_PER_BLOCK);
            assert_eq!(d.merge_counters_len(), batch * hkv * row_groups);
            // Every block (b, y) maps to a distinct counter b * gridDim.y + y below the length.
            let gy = hkv * row_groups;
            let last = (batch - 1) * gy + (gy - 1);
            assert_eq!(last + 1, d.merge_counters_len());
        }
    }

    /// Quest v5 chunks: multiples of the alignment within the kernel's bounds, the blocks of
    /// a row cover its max_pages_per_seq, and small grids spread to about 2 blocks per SM.
    /// Balanced splits: uniform batches split as `splits_for` does at the measured shapes
    /// (batch 1 x 64k: 33 splits on 132 SMs; batch 64 x 1k and 64 x 8k: none); a mixed batch
    /// splits its long sequence while the short ones' blocks fit one split; `splits` splits
    /// of `pages_per_split` cover every block's work, and no block needs fewer than
    /// `splits - 1` of them unless it is shorter than the largest; a forced count divides
    /// the largest block's work into at most that many.
    #[test]
    fn balanced_splits_follow_the_work() {
        let sms = 132;
        let uniform = decode(1, 8, 65536, 16, 32, 1);
        assert_eq!(uniform.balanced_splits(sms).0, uniform.splits_for(sms));
        assert_eq!(uniform.balanced_splits(sms), (33, 125));
        for batch_of in [1024, 8192] {
            let d = decode(64, 8, batch_of, 16, 32, 1);
            assert_eq!(d.balanced_splits(sms).0, 1);
            assert_eq!(d.splits_for(sms), 1);
        }
        // 63 sequences of 1k tokens and one of 64k, page 16: equal shares give no split
        // (512 blocks fill 264 slots), leaving the 64k sequence's 8 blocks of 4096 pages as
        // the tail; balanced splits cut them into ~250-page pieces.
        let mut lens = vec![1024; 63];
        lens.push(65536);
        let mixed = decode_lens(&lens, 8, 16, 32, 1);
        assert_eq!(mixed.splits_for(sms), 1);
        let (splits, per) = mixed.balanced_splits(sms);
        let total = 63 * 8 * 64 + 8 * 4096;
        assert_eq!(per, usize::div_ceil(total, 2 * sms));
        assert_eq!(splits, 4096usize.div_ceil(per));
        let mut pieces = 0;
        mixed.visit_block_work(|n| {
            let s = n.div_ceil(per).max(1);
            assert!(
                s <= splits && s * per >= n,
                "{n} pages: {s} splits of {per}"
            );
            pieces += s;
        });
        // Each short block one piece, each long block `splits`, none larger than one
        // slot's share of the step's pages.
        assert_eq!(pieces, 63 * 8 + 8 * splits);
        for sms in [1, 78, 132, 1000] {
            for d in [&uniform, &mixed, &decode_lens(&[0, 1, 17, 300], 2, 1, 8, 4)] {
                let (splits, per) = d.balanced_splits(sms);
                let most = d.max_block_work_pages();
                assert!(per >= 1 && splits >= 1 && splits <= MAX_SPLITS.max(1));
                assert!(splits * per >= most && (splits - 1) * per < most.max(1));
                if most > 0 && splits > 1 {
                    assert!(per * d.cache().page_size() >= MIN_KEYS_PER_SPLIT);
                }
            }
        }
        for forced in [1, 2, 5, 33, 5000] {
            let d = mixed.clone().with_splits(Some(forced)).unwrap();
            let (splits, per) = d.balanced_splits(sms);
            assert!(splits <= forced && splits * per >= 4096, "forced {forced}");
        }
        assert_eq!(decode(2, 2, 0, 16, 4, 1).balanced_splits(sms), (1, 1));
    }

    /// `decode_block`'s balanced-split arithmetic (paged_decode.cu, i32 as there) for block
    /// `split` of a row group with `n` work pages: its pages `[w0, w1)` and the group's
    /// split count `s` (the ticket target), or `None` for a block that exits at once.
    fn kernel_split(n: i32, split: i32, num_splits: i32, per: i32) -> Option<(i32, i32, i32)> {
        let s = ((n + per - 1) / per).max(1).min(num_splits);
        if split >= s {
            return None;
        }
        let w0 = split * per;
        Some((w0, if split + 1 == s { n } else { w0 + per }, s))
    }

    /// The kernel side of balanced splits, modelled on the host's numbers: the launched
    /// splits of every block cover its work pages exactly once, in order, none more than
    /// `pages_per_split`; the group's ticket target is the number of blocks that write a
    /// partial (so the last one merges and the counter returns to 0); a block that needs one
    /// split writes directly and takes no ticket. A C caller's count below what the pages
    /// need still covers every page (the last split takes the rest).
    #[test]
    fn balanced_kernel_splits_cover_every_block() {
        let mut lens = vec![1024; 7];
        lens.push(65536);
        for d in [
            decode_lens(&lens, 8, 16, 32, 1),
            decode_lens(&[0, 1, 77, 300, 1030, 9000], 2, 16, 8, 1),
            decode_lens(&[3, 700, 20000, 40], 1, 64, 8, 3),
            decode_lens(&[0, 2, 3000], 2, 1, 4, 4),
            decode(1, 8, 65536, 16, 32, 1),
        ] {
            for forced in [None, Some(1), Some(3), Some(17), Some(5000)] {
                let d = d.clone().with_splits(forced).unwrap();
                for sms in [1, 78, 132] {
                    let (splits, per) = d.balanced_splits(sms);
                    let check = |n: usize, num_splits: usize, bounded: bool| {
                        let (mut next, mut writers, mut target) = (0, 0, 0);
                        for split in 0..num_splits as i32 {
                            let Some((w0, w1, s)) =
                                kernel_split(n as i32, split, num_splits as i32, per as i32)
                            else {
                                continue;
                            };
                            assert_eq!(w0, next, "n {n} split {split}: pages in order");
                            assert!(w1 >= w0 && (w1 > w0 || n == 0), "n {n} split {split}");
                            assert!(!bounded || (w1 - w0) as usize <= per, "n {n}");
                            next = w1;
                            writers += 1;
                            target = s;
                        }
                        assert_eq!(next as usize, n, "every page of a {n}-page block");
                        assert_eq!(writers, target, "n {n}: one ticket per partial");
                    };
                    d.visit_block_work(|n| check(n, splits, true));
                    if splits > 1 {
                        check(d.max_block_work_pages(), splits - 1, false);
                    }
                }
            }
        }
    }

    #[test]
    fn quest_v5_chunks_cover_the_rows() {
        for &(batch, hkv, seqlen, ps) in &[
            (1, 8, 65536, 16),
            (1, 8, 131072, 16),
            (1, 8, 65536, 64),
            (64, 8, 8192, 16),
            (1, 1, 1, 1),
            (3, 2, 200_000, 1),
            (2, 3, 777, 16),
        ] {
            let d = decode(batch, hkv, seqlen, ps, hkv, 1);
            let mp = d.cache().max_pages_per_seq();
            for sms in [1, 78, 132, 1000] {
                let chunk = d.quest_v5_pages_per_block(sms);
                assert!(chunk.is_multiple_of(QUEST_V5_CHUNK_ALIGN), "{chunk}");
                assert!((QUEST_V5_CHUNK_ALIGN..=QUEST_V5_MAX_CHUNK).contains(&chunk));
                let blocks = mp.div_ceil(chunk);
                assert!(blocks * chunk >= mp && (blocks - 1) * chunk < mp);
                // Unless the chunk is clamped to its maximum, a row has at most
                // ceil(2 * sms / rows) blocks: the grid stays near 2 blocks per SM.
                if chunk < QUEST_V5_MAX_CHUNK {
                    let total = blocks * batch * hkv;
                    assert!(
                        total <= 2 * sms + batch * hkv,
                        "batch {batch} hkv {hkv} mp {mp} sms {sms}: {total} blocks of {chunk}"
                    );
                }
            }
        }
        // The measured shapes (132 SMs): 64k page 16 -> 128 pages per block, 32 blocks per
        // (sequence, kv head); batch 64 x 8k -> one block of 512 pages per row.
        assert_eq!(
            decode(1, 8, 65536, 16, 8, 1).quest_v5_pages_per_block(132),
            128
        );
        assert_eq!(
            decode(1, 8, 65536, 64, 8, 1).quest_v5_pages_per_block(132),
            64
        );
        assert_eq!(
            decode(64, 8, 8192, 16, 8, 1).quest_v5_pages_per_block(132),
            512
        );
    }
}
