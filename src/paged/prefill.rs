//! Prefill attention over the paged cache (chunked prefill, prefix caching): `q_len` new
//! query tokens per sequence attend to the sequence's K/V in the pages, which already hold
//! the new tokens (appended before, as engines do). FlashInfer's batch prefill with paged KV,
//! FlashAttention's `flash_attn_with_kvcache` with a block table.

use super::cache::{KvPages, PagedCache};
use crate::dense::{AttentionOptions, AttentionShape, FlashAttention};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::layout::{SeqLens, Strided, Strides, check_extent, check_no_overlap, checked_elems};
use crate::mask::Mask;
use rayon::prelude::*;

/// A validated prefill problem over a paged cache: `q_len` new tokens for every sequence
/// ([`PagedPrefill::new`]) or a count per sequence ([`PagedPrefill::new_varlen`]).
///
/// `q, out: [batch, q_len, heads_q, head_dim]` (element strides), `lse: [batch, heads_q,
/// q_len]` f32, natural log; varlen: `q, out: [total_q, heads_q, head_dim]` packed rows
/// (sequence `b`'s rows `cu_seqlens_q[b]..cu_seqlens_q[b + 1]`; the batch stride is unused)
/// and `lse: [heads_q, total_q]`, as dense varlen. Semantics: exactly dense attention ([`FlashAttention`]) with
/// `seqlen_q = q_len`, `seqlen_k = seqlens_k[b]` over sequence `b`'s tokens gathered from the
/// pages (token `t` in page `block_table[b][t / page_size]`, slot `t % page_size`): the same
/// options, the same mask composition (`causal` is bottom-right aligned, so query row `i` sees
/// keys up to `seqlens_k[b] - q_len + i`: the new tokens are the last `q_len` positions),
/// windows, sinks, softcap, GQA (query head `h` reads kv head `h / (heads_q / heads_kv)`).
/// Unlike [`PagedDecode`](crate::PagedDecode), the default options are not causal (as in
/// every other family): pass `AttentionOptions::causal()` for a causal prefill. A row that
/// sees nothing gives output 0 and LSE `-inf`. A sequence with fewer tokens than `q_len`
/// (its new tokens not appended) follows dense's rule for `seqlen_q > seqlen_k`.
#[derive(Debug, Clone)]
pub struct PagedPrefill {
    pub(crate) cache: PagedCache,
    pub(crate) heads_q: usize,
    /// Rows per sequence; with `cu_q`, the longest sequence's.
    pub(crate) q_len: usize,
    /// Varlen: `[batch + 1]` row offsets of the packed queries.
    pub(crate) cu_q: Option<Vec<i32>>,
    pub(crate) out_len: usize,
    pub(crate) lse_len: usize,
    /// The per-head dense problem (scale, softcap, mask, head dim) the CPU path runs on the
    /// gathered K/V of each sequence.
    pub(crate) dense: FlashAttention,
    /// The GPU kernel `forward_gpu` / `plan_gpu` run (the CPU path ignores it).
    pub(crate) kernel: PagedPrefillKernel,
}

/// Which GPU kernel runs a [`PagedPrefill`] ([`PagedPrefill::with_kernel`]); the CPU path is
/// the same for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PagedPrefillKernel {
    /// The tensor-core kernel (`mma.sync`, sm_80+, `kernels/paged_prefill.cu`): any page
    /// size, f16/bf16 or FP8 (e4m3) caches. The default.
    #[default]
    TensorCore,
    /// The Hopper kernel (`wgmma` + TMA bulk copies of whole pages, compute capability 9.0
    /// only, `kernels/paged_prefill_wgmma.cu`): f16/bf16 caches of q's dtype, head_dim 64,
    /// 128 or 256, page sizes that are powers of two from 16. Compiled, **not yet run on a
    /// GPU**; an explicit opt-in, never chosen automatically.
    Hopper,
}

impl PagedPrefill {
    /// Validates the problem once: `heads_q` a positive multiple of the cache's `heads_kv`,
    /// `q_len >= 1`, both fitting in i32, the options (scale, softcap, window, sinks) and
    /// every size the buffers imply (checked arithmetic). Nothing is allocated before the
    /// checks pass.
    pub fn new(
        cache: &PagedCache,
        heads_q: usize,
        q_len: usize,
        options: &AttentionOptions,
    ) -> Result<Self> {
        if q_len == 0 {
            return Err(Error::Shape(
                "q_len = 0: a prefill needs at least one query token".into(),
            ));
        }
        Self::build(cache, heads_q, q_len, None, options)
    }

    /// A prefill with `cu_seqlens_q[b + 1] - cu_seqlens_q[b]` new tokens for sequence `b`
    /// (chunks of different lengths in one batch; 0 skips a sequence): `cu_seqlens_q` has
    /// `batch + 1` nondecreasing entries from 0, and `total_q = cu_seqlens_q[batch] >= 1`.
    /// Query rows are packed (see the type's docs). Validated as [`PagedPrefill::new`].
    pub fn new_varlen(
        cache: &PagedCache,
        heads_q: usize,
        cu_seqlens_q: &[i32],
        options: &AttentionOptions,
    ) -> Result<Self> {
        let batch = cache.batch();
        if cu_seqlens_q.len() != batch + 1 {
            return Err(Error::Shape(format!(
                "cu_seqlens_q has {} entries; the cache's batch {batch} needs {}",
                cu_seqlens_q.len(),
                batch + 1
            )));
        }
        if cu_seqlens_q[0] != 0 {
            return Err(Error::Shape(format!(
                "cu_seqlens_q[0] = {} must be 0",
                cu_seqlens_q[0]
            )));
        }
        let mut max_len = 0usize;
        for (b, w) in cu_seqlens_q.windows(2).enumerate() {
            if w[1] < w[0] {
                return Err(Error::Shape(format!(
                    "cu_seqlens_q must not decrease: entry {} = {} < entry {b} = {}",
                    b + 1,
                    w[1],
                    w[0]
                )));
            }
            max_len = max_len.max((w[1] - w[0]) as usize);
        }
        if cu_seqlens_q[batch] == 0 {
            return Err(Error::Shape(
                "cu_seqlens_q: total_q = 0, a prefill needs at least one query token".into(),
            ));
        }
        Self::build(
            cache,
            heads_q,
            max_len,
            Some(cu_seqlens_q.to_vec()),
            options,
        )
    }

    /// The checks shared by both constructors; `q_len` >= 1 (the longest sequence's rows
    /// with `cu_q`), `cu_q` already checked (nondecreasing from 0, entries i32).
    fn build(
        cache: &PagedCache,
        heads_q: usize,
        q_len: usize,
        cu_q: Option<Vec<i32>>,
        options: &AttentionOptions,
    ) -> Result<Self> {
        let heads_kv = cache.heads_kv();
        if heads_q == 0 || !heads_q.is_multiple_of(heads_kv) {
            return Err(Error::Shape(format!(
                "heads_q = {heads_q} must be a positive multiple of the cache's heads_kv = \
                 {heads_kv}"
            )));
        }
        let limit = i32::MAX as usize;
        if heads_q > limit {
            return Err(Error::Shape(format!("heads_q = {heads_q} must fit in i32")));
        }
        if q_len > limit {
            return Err(Error::Shape(format!("q_len = {q_len} must fit in i32")));
        }
        let d = cache.head_dim();
        // Rows of q/out: batch * q_len, or total_q packed.
        let rows = match &cu_q {
            Some(cu) => cu[cu.len() - 1] as usize,
            None => checked_elems(&[cache.batch(), q_len], "paged prefill query rows")?,
        };
        let out_len = checked_elems(&[rows, heads_q, d], "paged prefill q/out elements")?;
        let lse_len = checked_elems(&[heads_q, rows], "paged prefill LSE")?;
        // The longest sequence bounds every per-sequence dense problem (the cache checked
        // that it fits in i32).
        let max_sk = cache
            .seqlens_k()
            .iter()
            .map(|&s| s as usize)
            .max()
            .unwrap_or(0);
        // Options (scale, softcap, window, sinks) are validated by the dense constructor,
        // which allocates nothing for fixed lengths.
        let dense = FlashAttention::new(
            &AttentionShape {
                batch: 1,
                heads_q,
                heads_kv,
                head_dim: d,
                seqlens: SeqLens::Fixed {
                    seqlen_q: q_len,
                    seqlen_k: max_sk,
                },
            },
            options,
        )?;
        Ok(PagedPrefill {
            cache: cache.clone(),
            heads_q,
            q_len,
            cu_q,
            out_len,
            lse_len,
            dense,
            kernel: PagedPrefillKernel::default(),
        })
    }

    /// The same problem on GPU kernel `kernel` (default [`PagedPrefillKernel::TensorCore`]).
    /// What a kernel cannot take is refused by `forward_gpu` / `plan_gpu` with
    /// [`Error::Unsupported`] before any device work.
    pub fn with_kernel(mut self, kernel: PagedPrefillKernel) -> Self {
        self.kernel = kernel;
        self
    }
    /// The GPU kernel `forward_gpu` / `plan_gpu` run.
    pub fn kernel(&self) -> PagedPrefillKernel {
        self.kernel
    }

    /// The validated cache description.
    pub fn cache(&self) -> &PagedCache {
        &self.cache
    }
    /// Query heads.
    pub fn heads_q(&self) -> usize {
        self.heads_q
    }
    /// New query tokens per sequence (the last `q_len` positions of each sequence); varlen:
    /// the longest sequence's count.
    pub fn q_len(&self) -> usize {
        self.q_len
    }
    /// The varlen row offsets (`[batch + 1]`), or `None` for a fixed `q_len`.
    pub fn cu_seqlens_q(&self) -> Option<&[i32]> {
        self.cu_q.as_deref()
    }
    /// Query rows of q/out: `batch * q_len`, or `total_q` (varlen).
    pub fn total_q(&self) -> usize {
        match &self.cu_q {
            Some(cu) => cu[cu.len() - 1] as usize,
            None => self.cache.batch() * self.q_len,
        }
    }
    /// Sequence `b`'s query rows: `(batch index, first row, count)` in the strided q/out
    /// (varlen: batch index 0, rows packed).
    pub(crate) fn rows_of(&self, b: usize) -> (usize, usize, usize) {
        match &self.cu_q {
            Some(cu) => (0, cu[b] as usize, (cu[b + 1] - cu[b]) as usize),
            None => (b, 0, self.q_len),
        }
    }
    /// The resolved multiplier of `q.k`.
    pub fn scale(&self) -> f32 {
        self.dense.scale()
    }
    /// The softcap in force (`None` when off).
    pub fn softcap(&self) -> Option<f32> {
        self.dense.softcap()
    }
    /// The mask in force (the options' mask composed with `causal`, as for dense).
    pub fn mask(&self) -> Mask {
        self.dense.mask()
    }
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.heads_q / self.cache.heads_kv()
    }
    /// Query head `h` reads kv head `h / group()`.
    pub fn kv_head(&self, h: usize) -> usize {
        h / self.group()
    }
    /// Elements of a contiguous q or out: `batch * q_len * heads_q * head_dim` (varlen:
    /// `total_q * heads_q * head_dim`).
    pub fn out_len(&self) -> usize {
        self.out_len
    }
    /// LSE values: `batch * heads_q * q_len` (varlen: `heads_q * total_q`).
    pub fn lse_len(&self) -> usize {
        self.lse_len
    }
    /// Index of the LSE value of (sequence `b`, query head `h`, row `i`).
    pub(crate) fn lse_index(&self, b: usize, h: usize, i: usize) -> usize {
        match &self.cu_q {
            Some(cu) => h * self.total_q() + cu[b] as usize + i,
            None => (b * self.heads_q + h) * self.q_len + i,
        }
    }

    /// Dims `[outer, rows, heads_q, head_dim]` of q and out for the extent checks.
    pub(crate) fn q_dims(&self) -> [usize; 4] {
        let (hq, d) = (self.heads_q, self.cache.head_dim());
        match &self.cu_q {
            Some(_) => [1, self.total_q(), hq, d],
            None => [self.cache.batch(), self.q_len, hq, d],
        }
    }

    /// Validates the tensor arguments of a forward (CPU or GPU): `q` and `out` cover
    /// `[batch, q_len, heads_q, head_dim]`, `out` does not overlap itself, `lse` holds
    /// `batch * heads_q * q_len` values, and the K/V buffers match the cache layout.
    pub(crate) fn check_forward(
        &self,
        q: (usize, &Strides),
        out: (usize, &Strides),
        lse: Option<usize>,
        kv: (usize, usize),
    ) -> Result<()> {
        let dims = self.q_dims();
        check_extent("q", q.1, dims, q.0)?;
        check_extent("out", out.1, dims, out.0)?;
        check_no_overlap("out", out.1, dims, out.0)?;
        if let Some(len) = lse
            && len < self.lse_len
        {
            return Err(Error::Shape(format!(
                "lse holds {len} values but [batch, heads_q, q_len] ([heads_q, total_q] \
                 varlen) needs {}",
                self.lse_len
            )));
        }
        self.cache.check_kv(kv.0, kv.1)
    }

    /// Keys `0..seqlen_k[b]` of kv head `kvh` of sequence `b` gathered from the pages as f32
    /// and times the head's `(k, v)` scales, `(k, v)` each `[seqlen, head_dim]`.
    fn gather_f32<C: Element>(
        &self,
        kv: &KvPages<&[C]>,
        b: usize,
        kvh: usize,
        (k_scale, v_scale): (f32, f32),
    ) -> [Vec<f32>; 2] {
        let (sk, d) = (self.cache.seqlen_of(b), self.cache.head_dim());
        let mut k = Vec::with_capacity(sk * d);
        let mut v = Vec::with_capacity(sk * d);
        for j in 0..sk {
            let off = self.cache.token_at(b, j, kvh);
            k.extend(kv.k[off..off + d].iter().map(|x| x.to_f32() * k_scale));
            v.extend(kv.v[off..off + d].iter().map(|x| x.to_f32() * v_scale));
        }
        [k, v]
    }

    /// CPU prefill (also the fallback without a GPU): per (sequence, kv head) the K/V rows
    /// are gathered from the pages, then each query head of the group runs the dense CPU
    /// path's tiled online softmax (f32 accumulation) over them, so the result equals
    /// [`FlashAttention::forward_cpu`] on the gathered tokens bit for bit (cache type `C ==
    /// T`). An FP8 cache's K/V are dequantised with its [`KvScales`](super::KvScales) as they
    /// are gathered.
    pub fn forward_cpu<T: Element, C: Element>(
        &self,
        q: Strided<&[T]>,
        kv: KvPages<&[C]>,
        out: Strided<&mut [T]>,
        lse: Option<&mut [f32]>,
    ) -> Result<()> {
        self.check_forward(
            q.extent(),
            out.extent(),
            lse.as_ref().map(|l| l.len()),
            (kv.k.len(), kv.v.len()),
        )?;
        let (hkv, d, group) = (self.cache.heads_kv(), self.cache.head_dim(), self.group());
        let scales = self.cache.scales_for(C::DTYPE)?;
        let tasks: Vec<(usize, usize)> = (0..self.cache.batch())
            .flat_map(|b| (0..hkv).map(move |kvh| (b, kvh)))
            .collect();
        let results: Vec<Vec<(Vec<f32>, Vec<f32>)>> = tasks
            .par_iter()
            .map(|&(b, kvh)| {
                let sk = self.cache.seqlen_of(b);
                let (qb, r0, sq) = self.rows_of(b);
                let [kh, vh] = self.gather_f32(&kv, b, kvh, scales.of(kvh));
                (kvh * group..(kvh + 1) * group)
                    .map(|h| {
                        let qh = q.head_rows_f32(qb, r0..r0 + sq, h, d);
                        self.dense.tiled_head(&qh, &kh, &vh, sq, sk)
                    })
                    .collect()
            })
            .collect();
        let mut out = out;
        let mut lse = lse;
        for (&(b, kvh), heads) in tasks.iter().zip(results) {
            for (gh, (o, l)) in heads.into_iter().enumerate() {
                let h = kvh * group + gh;
                let (qb, r0, sq) = self.rows_of(b);
                out.store_head_rows(qb, r0..r0 + sq, h, d, &o);
                if let Some(lse) = lse.as_deref_mut() {
                    for (i, &x) in l.iter().enumerate() {
                        lse[self.lse_index(b, h, i)] = x;
                    }
                }
            }
        }
        Ok(())
    }
}
