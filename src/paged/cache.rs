//! The paged KV cache: geometry, validated tables, and appending new tokens with their
//! Quest page metadata.

use crate::element::{DType, Element, F8E4M3};
use crate::error::{Error, Result};
use crate::layout::checked_elems;
use crate::layout::{Strided, Strides, check_cu_seqlens, check_extent};
use std::collections::HashMap;

/// Geometry of the cache buffers: `k_cache, v_cache: [num_pages, page_size, heads_kv,
/// head_dim]` (NHD, contiguous) and the Quest metadata `kmin, kmax: [num_pages, heads_kv,
/// head_dim]` in the cache's element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PagedLayout {
    /// Physical pages in the cache.
    pub num_pages: usize,
    /// Token slots per page.
    pub page_size: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// Elements per head vector.
    pub head_dim: usize,
}

impl PagedLayout {
    /// Elements of one of `k_cache`, `v_cache` (saturates at `usize::MAX` for a layout too
    /// large to index, which [`PagedCache::new`] refuses).
    pub fn cache_len(&self) -> usize {
        checked_elems(
            &[self.num_pages, self.page_size, self.heads_kv, self.head_dim],
            "",
        )
        .unwrap_or(usize::MAX)
    }
    /// Values of one of `kmin`, `kmax` (saturating like [`PagedLayout::cache_len`]).
    pub fn meta_len(&self) -> usize {
        checked_elems(&[self.num_pages, self.heads_kv, self.head_dim], "").unwrap_or(usize::MAX)
    }
    /// Element offset of (physical page, slot, kv head, channel 0) in the cache; `None` when
    /// an index is out of range.
    pub fn slot_offset(&self, page: usize, slot: usize, kv_head: usize) -> Option<usize> {
        // Checked: the layout itself may be one that `PagedCache::new` would refuse.
        (page < self.num_pages && slot < self.page_size && kv_head < self.heads_kv)
            .then(|| {
                page.checked_mul(self.page_size)?
                    .checked_add(slot)?
                    .checked_mul(self.heads_kv)?
                    .checked_add(kv_head)?
                    .checked_mul(self.head_dim)
            })
            .flatten()
    }
    /// Offset of (physical page, kv head, channel 0) in `kmin`/`kmax`; `None` when an index
    /// is out of range.
    pub fn meta_offset(&self, page: usize, kv_head: usize) -> Option<usize> {
        (page < self.num_pages && kv_head < self.heads_kv)
            .then(|| {
                page.checked_mul(self.heads_kv)?
                    .checked_add(kv_head)?
                    .checked_mul(self.head_dim)
            })
            .flatten()
    }
    /// [`PagedLayout::slot_offset`] of indices known to be in range (validated layout).
    pub(crate) fn slot_at(&self, page: usize, slot: usize, kv_head: usize) -> usize {
        ((page * self.page_size + slot) * self.heads_kv + kv_head) * self.head_dim
    }
    /// [`PagedLayout::meta_offset`] of indices known to be in range (validated layout).
    pub(crate) fn meta_at(&self, page: usize, kv_head: usize) -> usize {
        (page * self.heads_kv + kv_head) * self.head_dim
    }
}

/// The tables of a batch: `block_table: [batch, max_pages_per_seq]` physical page ids (row
/// `b` maps logical page `t / page_size` of sequence `b`), `seqlens_k: [batch]` tokens per
/// sequence. Entries of a row past the sequence's last page are ignored (may be -1).
#[derive(Debug, Clone, Copy)]
pub struct PageTable<'a> {
    /// Physical page ids, `[batch, max_pages_per_seq]` row-major.
    pub block_table: &'a [i32],
    /// Columns of `block_table`: page slots per sequence.
    pub max_pages_per_seq: usize,
    /// Tokens in the cache per sequence, `[batch]`.
    pub seqlens_k: &'a [i32],
}

/// K and V buffers of one cache (host slices, device buffers, shared or mutable).
#[derive(Debug)]
pub struct KvPages<D> {
    /// Key cache, `[num_pages, page_size, heads_kv, head_dim]`.
    pub k: D,
    /// Value cache, `[num_pages, page_size, heads_kv, head_dim]`.
    pub v: D,
}

/// Quest metadata: per-page, per-kv-head, per-channel bounds of the keys written so far,
/// `kmin, kmax: [num_pages, heads_kv, head_dim]` in the cache's element type `T`. The min and
/// max of `T` values are `T` values, so storing them as `T` loses nothing, and the Quest
/// scoring reads half the bytes of f32 bounds for f16/bf16 caches (it converts to f32).
#[derive(Debug)]
pub struct PageMeta<D> {
    /// Per-channel minimum of each page's keys, `[num_pages, heads_kv, head_dim]`.
    pub kmin: D,
    /// Per-channel maximum of each page's keys, `[num_pages, heads_kv, head_dim]`.
    pub kmax: D,
}

/// Dequantisation scales of an FP8 ([`F8E4M3`](crate::element::F8E4M3)) cache: one f32 per
/// kv head for K and one for V. A stored key `x` of kv head `g` means `x * k[g]` (V alike);
/// an append stores `F8E4M3::from_f32(value / k[g])` (f32 division, round to nearest even,
/// saturating at +-448).
///
/// Why per kv head and fixed: an append never rewrites earlier tokens, so a scale chosen per
/// page would be fixed by the page's first token (later, larger tokens would saturate) or
/// force a requantisation of the page; engines calibrate K/V scales per layer (vLLM's
/// `k_scale`/`v_scale`) or per head instead, which is this type (equal values for per-layer
/// scales). The Quest bounds of an FP8 cache are the bounds of the stored e4m3 values.
#[derive(Debug, Clone)]
pub struct KvScales {
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvScales {
    /// Per-kv-head scales, `k, v: [heads_kv]`, each > 0 and at most `f32::MAX / 448` (so
    /// that every e4m3 code dequantises to a finite f32).
    pub fn new(k: Vec<f32>, v: Vec<f32>) -> Result<Self> {
        if k.is_empty() || k.len() != v.len() {
            return Err(Error::Shape(format!(
                "kv scales: k has {} and v {} values; one per kv head (>= 1) each",
                k.len(),
                v.len()
            )));
        }
        for (name, xs) in [("k", &k), ("v", &v)] {
            if let Some((g, x)) = xs
                .iter()
                .enumerate()
                .find(|(_, x)| !(**x > 0.0 && (**x * F8E4M3::MAX).is_finite()))
            {
                return Err(Error::InvalidOption(format!(
                    "kv scales: {name}[{g}] = {x} must be > 0 and at most f32::MAX / 448 (every \
                     e4m3 code then dequantises to a finite f32)"
                )));
            }
        }
        Ok(KvScales { k, v })
    }
    /// The same scales for every one of `heads_kv` heads (a per-layer scale); `heads_kv` at
    /// most 65535 (the kernels' grid limit), checked before anything is allocated.
    pub fn uniform(heads_kv: usize, k: f32, v: f32) -> Result<Self> {
        if heads_kv > u16::MAX as usize {
            return Err(Error::Shape(format!(
                "heads_kv = {heads_kv}: at most {} kv heads",
                u16::MAX
            )));
        }
        Self::new(vec![k; heads_kv], vec![v; heads_kv])
    }
    /// K scales, `[heads_kv]`.
    pub fn k(&self) -> &[f32] {
        &self.k
    }
    /// V scales, `[heads_kv]`.
    pub fn v(&self) -> &[f32] {
        &self.v
    }
}

/// Equal when every scale has the same bits (the scales are finite: no NaN).
impl PartialEq for KvScales {
    fn eq(&self, other: &Self) -> bool {
        let bits = |xs: &[f32]| xs.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        bits(&self.k) == bits(&other.k) && bits(&self.v) == bits(&other.v)
    }
}
impl Eq for KvScales {}

/// The `(k, v)` dequantisation scales of a cache's kv heads as its CPU paths read them
/// (see [`PagedCache::scales_for`]): the [`KvScales`] of an FP8 cache, else 1.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadScales<'a>(Option<&'a KvScales>);

impl HeadScales<'_> {
    /// The `(k, v)` scales of kv head `kvh` (`kvh < heads_kv`).
    pub(crate) fn of(&self, kvh: usize) -> (f32, f32) {
        self.0.map_or((1.0, 1.0), |s| (s.k[kvh], s.v[kvh]))
    }
}

/// A validated paged KV cache description: the geometry plus a copy of the tables, and the
/// dequantisation scales of an FP8 cache ([`PagedCache::with_kv_scales`]).
/// Every page id a sequence uses (tokens `0..seqlens_k[b]`) is in `0..num_pages`, so the
/// CPU and GPU paths index the buffers without further checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagedCache {
    pub(crate) layout: PagedLayout,
    pub(crate) batch: usize,
    pub(crate) max_pages_per_seq: usize,
    pub(crate) block_table: Vec<i32>,
    pub(crate) seqlens_k: Vec<i32>,
    pub(crate) kv_scales: Option<KvScales>,
}

impl PagedCache {
    /// Validates `layout` and copies `table`, checking that every page id in use is in range.
    pub fn new(layout: PagedLayout, table: PageTable) -> Result<Self> {
        let PagedLayout {
            num_pages,
            page_size,
            heads_kv,
            head_dim,
        } = layout;
        if page_size == 0 || heads_kv == 0 || head_dim == 0 {
            return Err(Error::Shape(format!(
                "page_size ({page_size}), heads_kv ({heads_kv}) and head_dim ({head_dim}) must \
                 all be >= 1"
            )));
        }
        let limit = i32::MAX as usize;
        if num_pages > limit || table.max_pages_per_seq == 0 {
            return Err(Error::Shape(format!(
                "num_pages = {num_pages} must fit in i32 and max_pages_per_seq = {} be >= 1",
                table.max_pages_per_seq
            )));
        }
        // The kernels index tokens of one sequence with i32.
        if table
            .max_pages_per_seq
            .checked_mul(page_size)
            .is_none_or(|n| n > limit)
        {
            return Err(Error::Shape(format!(
                "max_pages_per_seq ({}) * page_size ({page_size}) must fit in i32",
                table.max_pages_per_seq
            )));
        }
        // Checked with at least one page: an empty cache still fixes the size of a page,
        // which the offsets of every later append are computed from.
        // (Checked products: four usize factors can overflow even a u128.)
        if checked_elems(&[num_pages.max(1), page_size, heads_kv, head_dim], "").is_err() {
            return Err(Error::Shape(format!(
                "cache {layout:?} is too large to index"
            )));
        }
        let batch = table.seqlens_k.len();
        if batch == 0 {
            return Err(Error::Shape(
                "seqlens_k is empty: batch must be >= 1".into(),
            ));
        }
        if table.block_table.len() != batch * table.max_pages_per_seq {
            return Err(Error::Shape(format!(
                "block_table holds {} entries but [batch, max_pages_per_seq] = [{batch}, {}] \
                 needs {}",
                table.block_table.len(),
                table.max_pages_per_seq,
                batch * table.max_pages_per_seq
            )));
        }
        for (b, &sk) in table.seqlens_k.iter().enumerate() {
            if sk < 0 {
                return Err(Error::Index(format!("seqlens_k[{b}] = {sk} is negative")));
            }
            let pages = (sk as usize).div_ceil(page_size);
            if pages > table.max_pages_per_seq {
                return Err(Error::Index(format!(
                    "sequence {b} holds {sk} tokens = {pages} pages of {page_size} but its \
                     block_table row has only {} entries",
                    table.max_pages_per_seq
                )));
            }
            let row = &table.block_table[b * table.max_pages_per_seq..][..pages];
            if let Some((lp, &id)) = row
                .iter()
                .enumerate()
                .find(|&(_, &id)| id < 0 || id as usize >= num_pages)
            {
                return Err(Error::Index(format!(
                    "block_table[{b}][{lp}] = {id} is not a page id in 0..{num_pages}"
                )));
            }
        }
        Ok(PagedCache {
            layout,
            batch,
            max_pages_per_seq: table.max_pages_per_seq,
            block_table: table.block_table.to_vec(),
            seqlens_k: table.seqlens_k.to_vec(),
            kv_scales: None,
        })
    }

    /// Sets the dequantisation scales of an FP8 cache (one per kv head). Without them an FP8
    /// cache is read and written with scale 1; caches of other element types refuse scales
    /// (at append or decode time, where the element type is known).
    pub fn with_kv_scales(mut self, scales: KvScales) -> Result<Self> {
        if scales.k.len() != self.layout.heads_kv {
            return Err(Error::Shape(format!(
                "kv scales hold {} heads but the cache has heads_kv = {}",
                scales.k.len(),
                self.layout.heads_kv
            )));
        }
        self.kv_scales = Some(scales);
        Ok(self)
    }
    /// The FP8 dequantisation scales, if set.
    pub fn kv_scales(&self) -> Option<&KvScales> {
        self.kv_scales.as_ref()
    }
    /// The `[2, heads_kv]` K then V scales the kernels read for an FP8 cache (ones without
    /// [`KvScales`]).
    #[cfg_attr(not(longattn_cuda), allow(dead_code))]
    pub(crate) fn kv_scales_flat(&self) -> Vec<f32> {
        match &self.kv_scales {
            Some(s) => [s.k(), s.v()].concat(),
            None => vec![1.0; 2 * self.layout.heads_kv],
        }
    }
    /// The (k, v) scales of the kv heads for a cache of element type `cache`: those set for
    /// an FP8 cache (1 when none are), 1 for any other type, which refuses scales. A lookup,
    /// not a table: a cache may declare up to `i32::MAX` kv heads without a page (nothing
    /// bounds them by memory), and an empty append or prefill must not allocate per head.
    pub(crate) fn scales_for(&self, cache: DType) -> Result<HeadScales<'_>> {
        match (&self.kv_scales, cache) {
            (Some(s), DType::F8E4M3) => Ok(HeadScales(Some(s))),
            (None, _) => Ok(HeadScales(None)),
            (Some(_), other) => Err(Error::InvalidOption(format!(
                "kv scales describe an FP8 (f8e4m3) cache, but this cache holds {other}"
            ))),
        }
    }

    /// The cache geometry.
    pub fn layout(&self) -> PagedLayout {
        self.layout
    }
    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Token slots per page.
    pub fn page_size(&self) -> usize {
        self.layout.page_size
    }
    /// Key/value heads.
    pub fn heads_kv(&self) -> usize {
        self.layout.heads_kv
    }
    /// Elements per head vector.
    pub fn head_dim(&self) -> usize {
        self.layout.head_dim
    }
    /// Columns of the block table: page slots per sequence.
    pub fn max_pages_per_seq(&self) -> usize {
        self.max_pages_per_seq
    }
    /// Physical page ids, `[batch, max_pages_per_seq]` row-major.
    pub fn block_table(&self) -> &[i32] {
        &self.block_table
    }
    /// Tokens in the cache per sequence, `[batch]`.
    pub fn seqlens_k(&self) -> &[i32] {
        &self.seqlens_k
    }
    /// Tokens of sequence `b`; `None` when `b >= batch`.
    pub fn seqlen(&self, b: usize) -> Option<usize> {
        (b < self.batch).then(|| self.seqlen_of(b))
    }
    /// Logical pages sequence `b` uses, `ceil(seqlen / page_size)`; `None` when `b >= batch`.
    pub fn pages_of(&self, b: usize) -> Option<usize> {
        (b < self.batch).then(|| self.pages_in(b))
    }
    /// Physical page of logical page `lp` of sequence `b`; `None` unless `b < batch` and
    /// `lp < pages_of(b)`.
    pub fn page_id(&self, b: usize, lp: usize) -> Option<usize> {
        (b < self.batch && lp < self.pages_in(b)).then(|| self.page_at(b, lp))
    }
    /// Element offset of key/value token `j` of sequence `b`, kv head `kvh`, channel 0;
    /// `None` unless `b < batch`, `j < seqlen(b)` and `kvh < heads_kv`.
    pub fn token_offset(&self, b: usize, j: usize, kvh: usize) -> Option<usize> {
        (b < self.batch && j < self.seqlen_of(b) && kvh < self.layout.heads_kv)
            .then(|| self.token_at(b, j, kvh))
    }

    /// [`PagedCache::seqlen`] of a sequence known to exist.
    pub(crate) fn seqlen_of(&self, b: usize) -> usize {
        self.seqlens_k[b] as usize
    }
    /// [`PagedCache::pages_of`] of a sequence known to exist.
    pub(crate) fn pages_in(&self, b: usize) -> usize {
        self.seqlen_of(b).div_ceil(self.layout.page_size)
    }
    /// [`PagedCache::page_id`] of indices known to be in range (ids validated by `new`).
    pub(crate) fn page_at(&self, b: usize, lp: usize) -> usize {
        self.block_table[b * self.max_pages_per_seq + lp] as usize
    }
    /// [`PagedCache::token_offset`] of indices known to be in range.
    pub(crate) fn token_at(&self, b: usize, j: usize, kvh: usize) -> usize {
        let ps = self.layout.page_size;
        self.layout.slot_at(self.page_at(b, j / ps), j % ps, kvh)
    }

    pub(crate) fn check_kv(&self, k_len: usize, v_len: usize) -> Result<()> {
        for (name, len) in [("k_cache", k_len), ("v_cache", v_len)] {
            if len != self.layout.cache_len() {
                return Err(Error::Shape(format!(
                    "{name} holds {len} elements but [num_pages, page_size, heads_kv, head_dim] \
                     = {:?} needs {}",
                    [
                        self.layout.num_pages,
                        self.layout.page_size,
                        self.layout.heads_kv,
                        self.layout.head_dim
                    ],
                    self.layout.cache_len()
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn check_meta(&self, kmin_len: usize, kmax_len: usize) -> Result<()> {
        for (name, len) in [("kmin", kmin_len), ("kmax", kmax_len)] {
            if len != self.layout.meta_len() {
                return Err(Error::Shape(format!(
                    "{name} holds {len} values but [num_pages, heads_kv, head_dim] needs {}",
                    self.layout.meta_len()
                )));
            }
        }
        Ok(())
    }

    /// Validates an append (CPU or GPU) of `cu_seqlens_new` (length batch + 1) new tokens per
    /// sequence (counted in `seqlens_k` already), the `[total_new, heads_kv, head_dim]`
    /// inputs and the cache and metadata lengths. Returns the most pages one sequence's new
    /// tokens touch.
    pub(crate) fn check_append(
        &self,
        cu_seqlens_new: &[i32],
        k_new: (usize, &Strides),
        v_new: (usize, &Strides),
        kv: (usize, usize),
        meta: Option<(usize, usize)>,
    ) -> Result<usize> {
        check_cu_seqlens(cu_seqlens_new, self.batch, "cu_seqlens_new")?;
        let total = cu_seqlens_new[self.batch] as usize;
        let dims = [1, total, self.layout.heads_kv, self.layout.head_dim];
        check_extent("k_new", k_new.1, dims, k_new.0)?;
        check_extent("v_new", v_new.1, dims, v_new.0)?;
        let ps = self.layout.page_size;
        let mut owner: HashMap<usize, (usize, usize)> = HashMap::new();
        let mut max_touched = 0;
        for b in 0..self.batch {
            let n = (cu_seqlens_new[b + 1] - cu_seqlens_new[b]) as usize;
            let end = self.seqlen_of(b);
            if n > end {
                return Err(Error::Index(format!(
                    "sequence {b} appends {n} tokens but seqlens_k[{b}] = {end}; seqlens_k must \
                     count the new tokens"
                )));
            }
            if n == 0 {
                continue;
            }
            let pages = (end - n) / ps..end.div_ceil(ps);
            max_touched = max_touched.max(pages.len());
            // Two writers of one page would race on its slots and its kmin/kmax.
            for lp in pages {
                let id = self.page_at(b, lp);
                if let Some(&(b0, lp0)) = owner.get(&id) {
                    return Err(Error::Index(format!(
                        "page {id} is written by sequence {b0} (logical page {lp0}) and by \
                         sequence {b} (logical page {lp}) in one append"
                    )));
                }
                owner.insert(id, (b, lp));
            }
        }
        self.check_kv(kv.0, kv.1)?;
        if let Some((kmin, kmax)) = meta {
            self.check_meta(kmin, kmax)?;
        }
        Ok(max_touched)
    }

    /// Writes new tokens into their slots and updates the pages' Quest bounds (CPU path).
    ///
    /// `k_new, v_new: [total_new, heads_kv, head_dim]` (element strides; `batch` unused),
    /// sequence `b`'s rows `cu_seqlens_new[b]..cu_seqlens_new[b + 1]` go to positions
    /// `seqlens_k[b] - n_b ..seqlens_k[b]` (this cache's `seqlens_k` already counts them).
    ///
    /// Metadata definition: `kmin/kmax` of a page are the per-channel bounds over the slots
    /// written so far (slots `0..=last written`; a partially filled page has bounds over its
    /// filled prefix only). An append that writes slot 0 restarts the page: its bounds are
    /// those of the new tokens alone, so a page reused by another sequence forgets its previous
    /// owner. Otherwise the existing bounds are widened. Both equal min/max recomputed over
    /// slots `0..=last` as long as pages are filled in order, which the tables guarantee.
    ///
    /// The cache's element type `C` may differ from the new tokens' `T`: a value is stored as
    /// `C::from_f32(x / scale)` (the [`KvScales`] of its kv head for an FP8 cache, else 1, so
    /// `T == C` copies exactly), and the bounds are those of the stored values.
    pub fn append_cpu<T: Element, C: Element>(
        &self,
        cu_seqlens_new: &[i32],
        k_new: Strided<&[T]>,
        v_new: Strided<&[T]>,
        cache: KvPages<&mut [C]>,
        meta: Option<PageMeta<&mut [C]>>,
    ) -> Result<()> {
        self.check_append(
            cu_seqlens_new,
            k_new.extent(),
            v_new.extent(),
            (cache.k.len(), cache.v.len()),
            meta.as_ref().map(|m| (m.kmin.len(), m.kmax.len())),
        )?;
        let scales = self.scales_for(C::DTYPE)?;
        let KvPages {
            k: k_cache,
            v: v_cache,
        } = cache;
        let mut meta = meta;
        let (ps, d) = (self.layout.page_size, self.layout.head_dim);
        let row = |s: &Strides, t: usize, h: usize| t * s.seq as usize + h * s.head as usize;
        for b in 0..self.batch {
            let t0 = cu_seqlens_new[b] as usize;
            let n = cu_seqlens_new[b + 1] as usize - t0;
            let end = self.seqlen_of(b);
            let start = end - n;
            for pos in start..end {
                let (lp, slot) = (pos / ps, pos % ps);
                let id = self.page_at(b, lp);
                let t = t0 + pos - start;
                for h in 0..self.layout.heads_kv {
                    let (k_scale, v_scale) = scales.of(h);
                    let dst = self.layout.slot_at(id, slot, h);
                    let ks = row(&k_new.strides, t, h);
                    let vs = row(&v_new.strides, t, h);
                    let store = |x: &T, s: f32| C::from_f32(x.to_f32() / s);
                    for (c, x) in k_cache[dst..dst + d]
                        .iter_mut()
                        .zip(&k_new.data[ks..ks + d])
                    {
                        *c = store(x, k_scale);
                    }
                    for (c, x) in v_cache[dst..dst + d]
                        .iter_mut()
                        .zip(&v_new.data[vs..vs + d])
                    {
                        *c = store(x, v_scale);
                    }
                    if let Some(m) = meta.as_mut() {
                        let mo = self.layout.meta_at(id, h);
                        let fresh = slot == 0;
                        for c in 0..d {
                            let x = k_cache[dst + c];
                            let (lo, hi) = (&mut m.kmin[mo + c], &mut m.kmax[mo + c]);
                            if fresh {
                                // From (+inf, -inf) as the kernels and the reference fold:
                                // x itself, or (+inf, -inf) (saturated for FP8) for NaN.
                                let xf = x.to_f32();
                                *lo = C::from_f32(f32::INFINITY.min(xf));
                                *hi = C::from_f32(f32::NEG_INFINITY.max(xf));
                            } else {
                                // Exact: the min/max of two C values is one of them.
                                *lo = C::from_f32(lo.to_f32().min(x.to_f32()));
                                *hi = C::from_f32(hi.to_f32().max(x.to_f32()));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
