//! Paged sparse decode: a paged KV cache (`[num_pages, page_size, heads_kv, head_dim]`, NHD,
//! any page size >= 1) with block tables, appending new tokens together with per-page Quest
//! metadata (`kmin/kmax`), and decode attention over it: GQA with each page read once per
//! group, split-KV (flash-decoding) with an LSE merge, sliding window and sinks that skip
//! pages, softcap, natural-log LSE, and sparse page selection (Quest top-B, streaming heads,
//! explicit page lists) mixed per kv head in one launch.
//!
//! Semantics follow `semantics.md` ("Paged KV cache and decode"): token `t` of sequence `b`
//! lives in page `block_table[b][t / page_size]`, slot `t % page_size`.
//!
//! Typical step: build a [`PagedCache`] from the tables (with `seqlens_k` counting the new
//! tokens), [`PagedCache::append_cpu`] / `append_gpu` the new K/V, then run a [`PagedDecode`]
//! over the same cache.
//!
//! Chunked prefill / prefix caching: append the chunk's K/V the same way, then run a
//! [`PagedPrefill`] (any `q_len`; exactly dense attention over the gathered tokens).

mod cache;
mod decode;
mod gpu;
mod prefill;
mod prefill_gpu;
mod select;

pub use cache::{KvPages, KvScales, PageMeta, PageTable, PagedCache, PagedLayout};
pub use decode::{
    DECODE_ROWS_PER_BLOCK, MAX_Q_LEN, MAX_SPLITS, MIN_KEYS_PER_SPLIT, PagedDecode,
    QUEST_V5_CHUNK_ALIGN, QUEST_V5_MAX_CHUNK, QuestKernel, SplitMerge,
};
pub use gpu::{GpuSelection, GpuSelectionRef, PagedDecodePlan};
pub use prefill::{PagedPrefill, PagedPrefillKernel};
pub use prefill_gpu::PagedPrefillPlan;
pub use select::{
    HeadPolicy, PageLists, QuestConfig, QuestSelection, SparsePolicy, StreamingConfig,
};
