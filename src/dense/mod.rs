//! Dense (flash) attention: the validated problem, the CPU path (tiled online softmax, the
//! same algorithm and tile schedule as the CUDA kernels) and the GPU entry point.

pub(crate) mod fp8;
pub(crate) mod fp8_gpu;
pub(crate) mod gpu;

pub use fp8::{FP8_KEY_TILE, FP8_MAX_DESCALE, Fp8Descales};
pub use fp8_gpu::{FP8_GPU_HEAD_DIM_MULTIPLE, FP8_GPU_MAX_HEAD_DIM};
pub use gpu::{DenseGpuPlan, GPU_MAX_HEAD_DIM};

use crate::element::Element;
use crate::error::{Error, Result};
use crate::layout::{
    SeqLens, SeqSpan, Strided, Strides, check_attention_args, check_cu_seqlens, check_heads,
    checked_elems,
};
use crate::mask::{Mask, Window};
use crate::softmax::{OnlineSoftmaxBlock, tile_scores};
use rayon::prelude::*;
use std::ops::Range;

/// Query rows per CPU tile; equal to the CUDA-core kernel's rows per block, so the CPU path
/// exercises the same key-tile schedule.
pub const CPU_TILE_M: usize = 16;
/// Keys per CPU tile (the CUDA-core kernel's key tile).
pub const CPU_TILE_N: usize = 32;

/// Which GPU kernel runs a dense problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DenseKernel {
    /// The fastest kernel that supports the problem.
    #[default]
    Auto,
    /// CUDA-core kernel: any head_dim multiple of 8 up to 256.
    Simt,
    /// Tensor-core kernel (`mma.sync`, sm_80+) at the head dims it needs no padding for: 64,
    /// 128 or 256 (the `TensorCorePadded` kernel, refusing other head dims).
    TensorCore,
    /// Hopper tensor-core kernel (`wgmma`, sm_90a: compute capability 9.0 only): head_dim 64,
    /// 128 or 256. `Auto` prefers it where it runs.
    Hopper,
    /// Tensor-core kernel on the shared mainloop (`mma.sync`, sm_80+): any head_dim up to 256,
    /// padded inside the kernel to 64, 128 or 256. `Auto` picks it wherever `Hopper` does not
    /// run (d96 on an H200: 236 TFLOP/s, 18x `Simt`). Verified on an H200 (2026-12-04) for
    /// head dims that are multiples of 8; its sm_80 code has not run on an Ampere card.
    /// Head dims that are not a multiple of 8 (59, 111, ...) run only here, explicitly: their
    /// rows are not 16-byte aligned, so a variant moves them element by element
    /// (`dense_mma_padded_kernel<T, Tr, true>`, **not yet run on a GPU**; `Auto` refuses those head dims).
    TensorCorePadded,
    /// Tensor-core kernel (`mma.sync`, sm_80+) packing the `heads_q / heads_kv` query heads
    /// that share a kv head into one 64-row tile (`kernels/dense_mma_gqa.cu`): for short query
    /// sequences over a long K/V (chunked prefill, speculative decoding), where the other
    /// kernels' per-head tiles would be mostly empty rows, each tile holds `64 / group`
    /// positions of every head of the group and the group's K/V is read once. At most 64
    /// query heads per kv head; head_dim a multiple of 8 up to 256. Explicit opt-in: **not
    /// yet run on a GPU**, never picked by `Auto`.
    TensorCoreGqa,
    /// Hopper tensor-core kernel for short sliding windows (`kernels/dense_wgmma_window.cu`,
    /// `wgmma`, sm_90a: compute capability 9.0 only), head_dim a multiple of 8 up to 192
    /// (padded inside the kernel to 64, 128 or 192 channels: the copy engine zero-fills the
    /// channels past head_dim; 192 runs 64-key tiles in both walks). Where `Hopper`
    /// computes all `W + 128` keys a 128-row query tile spans for every row, with 128-key
    /// tiles, this kernel uses 64-key tiles and lets each 64-row half of the tile visit only
    /// the tiles its rows see (`W + 64` keys per row), and its blocks are persistent (one per
    /// SM, walking query tiles with the next tile's Q and first keys in flight), so per-tile
    /// fixed costs no longer dominate windows of a few hundred keys. Every mask runs (same
    /// semantics as the other kernels). Explicit opt-in: **not yet run on a GPU**, never
    /// picked by `Auto`.
    HopperWindow,
    /// `HopperWindow`'s persistent walk with `Hopper`'s 128-key tiles, for any dense problem
    /// (`kernels/dense_wgmma_window.cu`, sm_90a, the head dims `HopperWindow` takes): one block per SM walks
    /// the query tiles (each head's last tile first), the producer loading the next tile's Q
    /// (double-buffered) and first keys while the consumers finish the current one, so the
    /// launch, pipeline fill and O write-back of each tile overlap work instead of idling the
    /// SM; this is what 1k-token problems lose most to (issue 16). Every mask runs. d128 keeps
    /// two K/V stages (the second Q buffer takes the third). Explicit opt-in: **not yet run on
    /// a GPU**, never picked by `Auto`.
    HopperPersistent,
    /// `TensorCoreGqa`'s packing on the Hopper mainloop (`kernels/dense_wgmma_gqa.cu`,
    /// `wgmma` + TMA, sm_90a: compute capability 9.0 only): the `heads_q / heads_kv` query
    /// heads that share a kv head (at most 128) fill one 128-row tile, `floor(128 / group)`
    /// positions of every head of the group, and the kv head's K/V is streamed once for all
    /// of them; for short query sequences over a long K/V (chunked prefill, speculative
    /// decoding) at Hopper speed. head_dim 64, 128 or 256; every mask option. Explicit
    /// opt-in: **not yet run on a GPU**, never picked by `Auto`.
    HopperGqa,
    /// `Hopper` with 176-key tiles instead of 128 (`kernels/dense_wgmma.cu`, `WgDenseWide`,
    /// sm_90a), FlashAttention-3's head-dim-128 tile for problems without a mask: each tile
    /// pays the same fixed costs (turn barriers, ring waits, row-max shuffles, the O rescale)
    /// for 1.375x the keys. f16/bf16, head_dim 128, full attention only: no causal mask,
    /// window or sinks, since only the keys past `seqlen_k` in the ragged last tile are masked
    /// (softcap, scale, GQA, varlen and LSE run). Anything else is `Error::Unsupported`,
    /// naming why. Two K/V stages of 88 KB (209 KB shared). Explicit opt-in: **not yet run on
    /// a GPU**, never picked by `Auto`.
    HopperWide,
}

/// Options shared by every attention family, on the CPU and the GPU. The default is full
/// (non-causal) attention, unscaled by anything but `1/sqrt(head_dim)`, in every family.
///
/// The mask in force is `mask` composed with `causal` exactly as FlashAttention-2 does:
/// `causal` sets the window's right bound to `min(right, 0)` (0 when unbounded) and keeps
/// the left bound and the sinks, so `causal` + `(W - 1, -1)` is the causal sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AttentionOptions {
    /// Multiplier of `q.k`; `None` is `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    /// Window and sinks.
    pub mask: Mask,
    /// Causal (bottom-right aligned), composed with `mask` as described above.
    pub causal: bool,
    /// Gemma-2 softcap: `s = cap * tanh(scale * q.k / cap)`; `None` or `Some(0.0)` disables
    /// it.
    pub softcap: Option<f32>,
}

/// Largest accepted `scale`. Scores are `scale * q.k` in f32: beyond this the softmax is an
/// argmax in all but name, and values like `f32::MAX` overflow the scores of ordinary
/// inputs (inputs whose scaled scores still overflow f32 give NaN rows, per the NaN policy
/// in docs/semantics.md).
pub const MAX_SCALE: f32 = 65536.0;

impl AttentionOptions {
    /// Causal attention: `default().with_causal(true)`.
    pub fn causal() -> Self {
        Self::default().with_causal(true)
    }
    /// Sets the causal flag (it composes with any window, see [`AttentionOptions`]).
    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    /// The mask in force: `mask` with the right bound clipped to 0 when `causal`.
    pub fn effective_mask(&self) -> Mask {
        let mut mask = self.mask;
        if self.causal {
            mask.window.right = Some(0);
        }
        mask
    }
    /// Sets the window (left, right bounds) of the mask, keeping the sinks.
    pub fn with_window(mut self, window: Window) -> Self {
        self.mask.window = window;
        self
    }
    /// Sets the number of attention sinks: leading keys every query row always sees.
    pub fn with_sinks(mut self, sinks: usize) -> Self {
        self.mask.sinks = sinks;
        self
    }
    /// Sets the Gemma-2 softcap (`0.0` disables it).
    pub fn with_softcap(mut self, cap: f32) -> Self {
        self.softcap = Some(cap);
        self
    }
    /// Sets the multiplier of `q.k` (instead of `1/sqrt(head_dim)`).
    pub fn with_scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }

    /// The softcap in force: `Some(0.0)` is off, like `None`.
    pub(crate) fn effective_softcap(&self) -> Option<f32> {
        self.softcap.filter(|&cap| cap != 0.0)
    }

    /// Checks the option values themselves and resolves the scale for `head_dim`.
    ///
    /// `scale` must be finite, > 0 and at most [`MAX_SCALE`]; a softcap of `0` is off (as in
    /// every peer library), any other softcap must be finite, normal (not subnormal: GPUs
    /// may flush it to 0) and > 0 with `scale / softcap` finite (`0 * inf` in the kernels'
    /// tanh argument is NaN).
    pub(crate) fn resolve_scale(&self, head_dim: usize) -> Result<f32> {
        let scale = self.scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
        if !(scale.is_finite() && scale > 0.0 && scale <= MAX_SCALE) {
            return Err(Error::InvalidOption(format!(
                "scale = {scale}: must be finite, > 0 and at most {MAX_SCALE}"
            )));
        }
        if let Some(cap) = self.effective_softcap()
            && !(cap.is_finite() && cap >= f32::MIN_POSITIVE && (scale / cap).is_finite())
        {
            return Err(Error::InvalidOption(format!(
                "softcap = {cap:e}: must be finite and > 0 with scale / softcap finite \
                 (0 or None disables it)"
            )));
        }
        for (name, v) in [
            ("window left", self.mask.window.left),
            ("window right", self.mask.window.right),
            ("sinks", Some(self.mask.sinks)),
        ] {
            if let Some(v) = v
                && v > i32::MAX as usize
            {
                return Err(Error::InvalidOption(format!(
                    "{name} = {v} exceeds {}",
                    i32::MAX
                )));
            }
        }
        Ok(scale)
    }
}

/// Problem dimensions: `q: [batch, seqlen_q, heads_q, head_dim]`,
/// `k, v: [batch, seqlen_k, heads_kv, head_dim]` (or packed with varlen lengths).
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape<'a> {
    /// Sequences in the batch (for varlen, the number of packed sequences).
    pub batch: usize,
    /// Query heads; a multiple of `heads_kv`.
    pub heads_q: usize,
    /// Key/value heads (fewer than `heads_q` for GQA/MQA).
    pub heads_kv: usize,
    /// Elements per head vector.
    pub head_dim: usize,
    /// Fixed or varlen (packed) sequence lengths.
    pub seqlens: SeqLens<'a>,
}

/// A validated dense attention problem. Build it once per call (cheap), then run it on
/// the CPU ([`FlashAttention::forward_cpu`]) or a GPU ([`FlashAttention::forward_gpu`]).
///
/// LSE (optional output) is f32, natural log, `[batch, heads_q, seqlen_q]` for fixed
/// lengths and `[heads_q, total_q]` for varlen; an empty row gives output 0 and LSE `-inf`.
#[derive(Debug, Clone)]
pub struct FlashAttention {
    pub(crate) batch: usize,
    pub(crate) heads_q: usize,
    pub(crate) heads_kv: usize,
    pub(crate) head_dim: usize,
    /// Varlen: one span per sequence (bounded by the caller's `cu_seqlens`).
    pub(crate) spans: Vec<SeqSpan>,
    /// Fixed lengths: the span every sequence shares.
    pub(crate) fixed: Option<SeqSpan>,
    pub(crate) out_len: usize,
    pub(crate) lse_len: usize,
    pub(crate) varlen: Option<(Vec<i32>, Vec<i32>)>,
    pub(crate) max_seqlen_q: usize,
    pub(crate) max_seqlen_k: usize,
    pub(crate) total_q: usize,
    pub(crate) total_k: usize,
    pub(crate) scale: f32,
    pub(crate) softcap: Option<f32>,
    pub(crate) mask: Mask,
    pub(crate) kernel: DenseKernel,
}

impl FlashAttention {
    /// Validates `shape` and `options` (dims, scale, softcap, window, varlen offsets) and
    /// builds the problem.
    pub fn new(shape: &AttentionShape, options: &AttentionOptions) -> Result<Self> {
        let AttentionShape {
            batch,
            heads_q,
            heads_kv,
            head_dim,
            seqlens,
        } = *shape;
        check_heads("", batch, heads_q, heads_kv, head_dim)?;
        let scale = options.resolve_scale(head_dim)?;
        let limit = i32::MAX as usize;
        if batch > limit || heads_q > limit || head_dim > limit {
            return Err(Error::Shape(format!(
                "batch ({batch}), heads_q ({heads_q}) and head_dim ({head_dim}) must fit in i32"
            )));
        }
        // Fixed lengths keep one span for every sequence: nothing here is proportional to
        // `batch` (which only the caller's buffers bound, and only at forward time).
        let (spans, varlen, fixed) = match seqlens {
            SeqLens::Fixed { seqlen_q, seqlen_k } => {
                if seqlen_q > limit || seqlen_k > limit {
                    return Err(Error::Shape(format!(
                        "seqlen_q = {seqlen_q}, seqlen_k = {seqlen_k}: must fit in i32"
                    )));
                }
                let span = SeqSpan {
                    q_start: 0,
                    seqlen_q,
                    k_start: 0,
                    seqlen_k,
                };
                (Vec::new(), None, Some(span))
            }
            SeqLens::Varlen {
                cu_seqlens_q,
                cu_seqlens_k,
            } => {
                // Checked against the lengths of the caller's arrays before anything is
                // allocated: `batch` is bounded by them.
                check_cu_seqlens(cu_seqlens_q, batch, "cu_seqlens_q")?;
                check_cu_seqlens(cu_seqlens_k, batch, "cu_seqlens_k")?;
                let spans = (0..batch)
                    .map(|b| SeqSpan {
                        q_start: cu_seqlens_q[b] as usize,
                        seqlen_q: (cu_seqlens_q[b + 1] - cu_seqlens_q[b]) as usize,
                        k_start: cu_seqlens_k[b] as usize,
                        seqlen_k: (cu_seqlens_k[b + 1] - cu_seqlens_k[b]) as usize,
                    })
                    .collect();
                (
                    spans,
                    Some((cu_seqlens_q.to_vec(), cu_seqlens_k.to_vec())),
                    None,
                )
            }
        };
        let (max_seqlen_q, max_seqlen_k) = match fixed {
            Some(span) => (span.seqlen_q, span.seqlen_k),
            None => (
                spans.iter().map(|s| s.seqlen_q).max().unwrap_or(0),
                spans.iter().map(|s| s.seqlen_k).max().unwrap_or(0),
            ),
        };
        let (total_q, total_k) = match &varlen {
            Some((cq, ck)) => (cq[batch] as usize, ck[batch] as usize),
            None => (max_seqlen_q, max_seqlen_k),
        };
        // Every element count the problem implies, checked once (i64 indexing in the
        // kernels); the accessors then return these values without arithmetic.
        let (q_rows, k_rows) = match &varlen {
            Some(_) => (total_q, total_k),
            None => (
                checked_elems(&[batch, max_seqlen_q], "batch * seqlen_q")?,
                checked_elems(&[batch, max_seqlen_k], "batch * seqlen_k")?,
            ),
        };
        let out_len = checked_elems(&[q_rows, heads_q, head_dim], "q/out elements")?;
        checked_elems(&[k_rows, heads_kv, head_dim], "k/v elements")?;
        let lse_len = checked_elems(&[q_rows, heads_q], "LSE values")?;
        Ok(FlashAttention {
            batch,
            heads_q,
            heads_kv,
            head_dim,
            spans,
            fixed,
            varlen,
            out_len,
            lse_len,
            max_seqlen_q,
            max_seqlen_k,
            total_q,
            total_k,
            scale,
            softcap: options.effective_softcap(),
            mask: options.effective_mask(),
            kernel: DenseKernel::Auto,
        })
    }

    /// Forces one GPU kernel (tests and benches compare them); `Auto` by default.
    pub fn with_kernel(mut self, kernel: DenseKernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Query heads.
    pub fn heads_q(&self) -> usize {
        self.heads_q
    }
    /// Key/value heads.
    pub fn heads_kv(&self) -> usize {
        self.heads_kv
    }
    /// Elements per head vector.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// The resolved multiplier of `q.k`.
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// The softcap in force (`None` when off).
    pub fn softcap(&self) -> Option<f32> {
        self.softcap
    }
    /// The element mask in force (window, sinks, causal folded in).
    pub fn mask(&self) -> Mask {
        self.mask
    }
    /// Whether the sequences are packed with `cu_seqlens` offsets.
    pub fn is_varlen(&self) -> bool {
        self.varlen.is_some()
    }
    /// Row placement of sequence `b`, or `None` when `b >= batch`.
    pub fn span(&self, b: usize) -> Option<SeqSpan> {
        match self.fixed {
            Some(span) => (b < self.batch).then_some(span),
            None => self.spans.get(b).copied(),
        }
    }
    /// Row placement of every sequence, in order.
    pub fn spans(&self) -> impl ExactSizeIterator<Item = SeqSpan> + '_ {
        (0..self.batch).map(|b| self.span_of(b))
    }
    /// The sequences with query rows, `(index, span)` in order: the only ones with work.
    /// Costs nothing when no sequence has rows, however many a fixed-length batch declares
    /// (nothing bounds that count by memory); otherwise the count is bounded by the q buffer
    /// (fixed) or the `cu_seqlens` (varlen).
    pub(crate) fn spans_with_rows(&self) -> impl Iterator<Item = (usize, SeqSpan)> + '_ {
        let batch = if self.max_seqlen_q == 0 {
            0
        } else {
            self.batch
        };
        (0..batch)
            .map(|b| (b, self.span_of(b)))
            .filter(|(_, span)| span.seqlen_q > 0)
    }
    /// Span of a sequence index already known to be in range.
    pub(crate) fn span_of(&self, b: usize) -> SeqSpan {
        self.fixed.unwrap_or_else(|| self.spans[b])
    }
    /// Longest query sequence.
    pub fn max_seqlen_q(&self) -> usize {
        self.max_seqlen_q
    }
    /// Longest key sequence.
    pub fn max_seqlen_k(&self) -> usize {
        self.max_seqlen_k
    }
    /// Packed query rows (varlen), or seqlen_q.
    pub fn total_q(&self) -> usize {
        self.total_q
    }
    /// Number of LSE values: `batch * heads_q * seqlen_q`, or `heads_q * total_q` (varlen).
    pub fn lse_len(&self) -> usize {
        self.lse_len
    }
    /// Elements of a contiguous output (or q) buffer.
    pub fn out_len(&self) -> usize {
        self.out_len
    }
    /// Query head `h` reads kv head `h / (heads_q / heads_kv)`.
    pub fn kv_head(&self, h: usize) -> usize {
        h / (self.heads_q / self.heads_kv)
    }

    /// The batch index of sequence `b` in its tensors: `b`, or 0 for a packed (varlen) batch,
    /// whose sequences are row ranges of one `[total, heads, head_dim]` tensor.
    pub(crate) fn batch_entry(&self, b: usize) -> usize {
        if self.varlen.is_some() { 0 } else { b }
    }

    /// Index of the LSE value of (sequence `b`, head `h`, row `i`).
    pub(crate) fn lse_index(&self, b: usize, h: usize, i: usize) -> usize {
        match self.varlen {
            Some(_) => h * self.total_q + self.spans[b].q_start + i,
            None => (b * self.heads_q + h) * self.max_seqlen_q + i,
        }
    }

    /// Dims `[outer, rows, heads, head_dim]` of q/out (`is_q`) or k/v for extent checks.
    fn dims(&self, is_q: bool) -> [usize; 4] {
        let heads = if is_q { self.heads_q } else { self.heads_kv };
        match (self.varlen.is_some(), is_q) {
            (true, true) => [1, self.total_q, heads, self.head_dim],
            (true, false) => [1, self.total_k, heads, self.head_dim],
            (false, true) => [self.batch, self.max_seqlen_q, heads, self.head_dim],
            (false, false) => [self.batch, self.max_seqlen_k, heads, self.head_dim],
        }
    }

    /// Validates buffer lengths and strides of every tensor argument.
    pub(crate) fn check_buffers(
        &self,
        q: (usize, &Strides),
        k: (usize, &Strides),
        v: (usize, &Strides),
        out: (usize, &Strides),
        lse: Option<usize>,
    ) -> Result<()> {
        let layout = if self.is_varlen() {
            "[heads_q, total_q]"
        } else {
            "[batch, heads_q, seqlen_q]"
        };
        check_attention_args(
            "",
            [q, k, v, out],
            self.dims(true),
            self.dims(false),
            lse.map(|len| (len, self.lse_len(), layout)),
        )
    }

    /// [`Self::check_buffers`] of the CPU entry points' host tensors (dense, FP8,
    /// block-sparse): their lengths and strides, the LSE's length.
    pub(crate) fn check_host_buffers<I, O>(
        &self,
        q: &Strided<&[I]>,
        k: &Strided<&[I]>,
        v: &Strided<&[I]>,
        out: &Strided<&mut [O]>,
        lse: Option<&[f32]>,
    ) -> Result<()> {
        self.check_buffers(
            q.extent(),
            k.extent(),
            v.extent(),
            out.extent(),
            lse.map(<[f32]>::len),
        )
    }

    /// CPU forward pass (also the fallback when no GPU is present): the tiled online
    /// softmax, f32 accumulation, parallel over (batch, head) and, inside
    /// each head, over blocks of `CPU_TILE_M` query rows.
    pub fn forward_cpu<T: Element>(
        &self,
        q: Strided<&[T]>,
        k: Strided<&[T]>,
        v: Strided<&[T]>,
        out: Strided<&mut [T]>,
        lse: Option<&mut [f32]>,
    ) -> Result<()> {
        self.check_host_buffers(&q, &k, &v, &out, lse.as_deref())?;
        self.run_heads_cpu(q, k, v, out, lse, |_, _, qh, kh, vh, sq, sk| {
            self.tiled_head(qh, kh, vh, sq, sk)
        });
        Ok(())
    }

    /// The CPU driver shared by the dense, FP8 and block-sparse paths (buffers already
    /// checked): gathers each (sequence `b`, query head `h`) as f32 (`q: [sq, d]`, `k, v: [sk, d]`),
    /// runs `head(b, h, q, k, v, sq, sk) -> (o [sq, d], lse [sq])` in parallel over
    /// (batch, head), and stores the results.
    #[allow(clippy::type_complexity)]
    pub(crate) fn run_heads_cpu<T: Element, O: Element>(
        &self,
        q: Strided<&[T]>,
        k: Strided<&[T]>,
        v: Strided<&[T]>,
        out: Strided<&mut [O]>,
        lse: Option<&mut [f32]>,
        head: impl Fn(usize, usize, &[f32], &[f32], &[f32], usize, usize) -> (Vec<f32>, Vec<f32>) + Sync,
    ) {
        let d = self.head_dim;
        // Only (sequence, head) pairs with query rows: their count is bounded by the q
        // buffer just checked (an empty sequence does no work, however many there are).
        let tasks: Vec<(usize, usize)> = self
            .spans_with_rows()
            .flat_map(|(b, _)| (0..self.heads_q).map(move |h| (b, h)))
            .collect();
        let results: Vec<(Vec<f32>, Vec<f32>)> = tasks
            .par_iter()
            .map(|&(b, h)| {
                let span = self.span_of(b);
                let bb = self.batch_entry(b);
                let kvh = self.kv_head(h);
                let q_rows = span.q_start..span.q_start + span.seqlen_q;
                let k_rows = span.k_start..span.k_start + span.seqlen_k;
                let qh = q.head_rows_f32(bb, q_rows, h, d);
                let kh = k.head_rows_f32(bb, k_rows.clone(), kvh, d);
                let vh = v.head_rows_f32(bb, k_rows, kvh, d);
                head(b, h, &qh, &kh, &vh, span.seqlen_q, span.seqlen_k)
            })
            .collect();
        let mut out = out;
        let mut lse = lse;
        for (&(b, h), (o, l)) in tasks.iter().zip(results) {
            let span = self.span_of(b);
            let rows = span.q_start..span.q_start + span.seqlen_q;
            out.store_head_rows(self.batch_entry(b), rows, h, d, &o);
            if let Some(lse) = lse.as_deref_mut() {
                for (i, &x) in l.iter().enumerate() {
                    lse[self.lse_index(b, h, i)] = x;
                }
            }
        }
    }

    /// One key tile of the blocked CPU paths (dense, block-sparse): the scores of query rows
    /// `rows` (`q: [rows.len(), d]`) against keys `keys` of `k: [sk, d]` by
    /// [`softmax::tile_scores`](crate::softmax::tile_scores) with this problem's head dim,
    /// scale and softcap, row `i` seeing the keys of `seen[i - rows.start] = (window,
    /// sink_end)` (as [`Mask::row_ranges`]), folded into `state` with the value rows `keys`
    /// of `v: [sk, d]`. `scores` is the scratch of one tile (at least `rows.len() *
    /// keys.len()` values).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fold_tile(
        &self,
        state: &mut OnlineSoftmaxBlock,
        q: &[f32],
        kv: (&[f32], &[f32]),
        rows: Range<usize>,
        keys: Range<usize>,
        seen: &[(Range<usize>, usize)],
        scores: &mut [f32],
    ) {
        let arith = (self.scale, |p: f32| p);
        self.fold_tile_weighted(state, q, kv, rows, keys, seen, scores, &arith);
    }

    /// [`Self::fold_tile`] with the scores scaled by `scale` instead of the problem's scale
    /// and the P.V weights `weight(p)` ([`OnlineSoftmaxBlock::update_weighted`]): `arith =
    /// (scale, weight)`, the FP8 path's descaled scale and e4m3 rounding of P.
    #[allow(clippy::too_many_arguments)]
    fn fold_tile_weighted(
        &self,
        state: &mut OnlineSoftmaxBlock,
        q: &[f32],
        (k, v): (&[f32], &[f32]),
        rows: Range<usize>,
        keys: Range<usize>,
        seen: &[(Range<usize>, usize)],
        scores: &mut [f32],
        (scale, weight): &(f32, impl Fn(f32) -> f32),
    ) {
        let d = self.head_dim;
        let scores = &mut scores[..rows.len() * keys.len()];
        let params = (*scale, self.softcap);
        let first = rows.start;
        let seen = |i: usize| seen[i - first].clone();
        tile_scores(q, k, d, params, rows, keys.clone(), seen, scores);
        state.update_weighted(scores, &v[keys.start * d..keys.end * d], weight);
    }

    /// One (sequence, head): `q: [sq, d]`, `k, v: [sk, d]` in f32. Visits only the key tiles
    /// the mask leaves visible, tile by tile like the kernels; the `CPU_TILE_M`-row blocks
    /// run in parallel (one long sequence uses every core), each block's rows together
    /// against each key tile. Returns `(o [sq, d], lse [sq])`. Uses only the problem's head
    /// dim, scale, softcap and mask (paged prefill runs it on K/V gathered from the pages).
    pub(crate) fn tiled_head(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        sq: usize,
        sk: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        self.blocked_head((q, k, v), sq, sk, CPU_TILE_N, &(self.scale, |p: f32| p))
    }

    /// [`Self::tiled_head`] with `tile_n`-key tiles (aligned at key 0), scores scaled by
    /// `arith.0` and P.V weights `arith.1(p)` (as [`Self::fold_tile_weighted`]): the dense
    /// path (`CPU_TILE_N`, the problem's scale, `p`) and the FP8 path (`FP8_KEY_TILE`, the
    /// descaled scale, `e4m3(p)`).
    pub(crate) fn blocked_head(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        sq: usize,
        sk: usize,
        tile_n: usize,
        arith: &(f32, impl Fn(f32) -> f32 + Sync),
    ) -> (Vec<f32>, Vec<f32>) {
        let d = self.head_dim;
        let mut out = vec![0.0; sq * d];
        let mut lse = vec![f32::NEG_INFINITY; sq];
        out.par_chunks_mut(CPU_TILE_M * d)
            .zip(lse.par_chunks_mut(CPU_TILE_M))
            .enumerate()
            .for_each(|(blk, (o, l))| {
                let rows = blk * CPU_TILE_M..blk * CPU_TILE_M + l.len();
                let tiles = self.mask.key_tiles(rows.clone(), sq, sk, tile_n);
                let q_rows = &q[rows.start * d..rows.end * d];
                let seen: Vec<(Range<usize>, usize)> = rows
                    .clone()
                    .map(|i| self.mask.row_ranges(i, sq, sk))
                    .collect();
                // One past the last key a row of the block sees: a tile ends there at the
                // latest. The keys cut off its end are skipped by every row (nothing in `l` or
                // P.V, and the weights' lanes count from the tile's start), so each row keeps
                // its bits; the diagonal tile of a causal block is mostly such keys.
                let seen_end = seen
                    .iter()
                    .map(|(w, sink_end)| {
                        if w.is_empty() {
                            *sink_end
                        } else {
                            w.end.max(*sink_end)
                        }
                    })
                    .max()
                    .unwrap_or(0);
                let mut state = OnlineSoftmaxBlock::new(rows.len(), d);
                let mut scores = vec![0.0f32; rows.len() * tile_n];
                for t in tiles.iter() {
                    let keys = t * tile_n..((t + 1) * tile_n).min(seen_end);
                    let (state, rows) = (&mut state, rows.clone());
                    let kv = (k, v);
                    self.fold_tile_weighted(
                        state,
                        q_rows,
                        kv,
                        rows,
                        keys,
                        &seen,
                        &mut scores,
                        arith,
                    );
                }
                state.finish(o, l);
            });
        (out, lse)
    }
}
