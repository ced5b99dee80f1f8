//! The FP8 (e4m3) dense forward (docs/semantics.md, "FP8 dense forward"): q, k, v hold e4m3
//! codes with FlashAttention-3's descale factors (`[batch, heads_kv]` f32 each), P is
//! quantised to e4m3 for the PV product per 128-key tile against the running row max, `l`
//! sums the unquantised P, and the output is bf16 or f16. This file holds the validation
//! shared by the CPU and GPU paths and the CPU path itself; the GPU entry is in
//! `fp8_gpu.rs`, the f64 reference in `reference/dense_fp8.rs`.

use crate::dense::FlashAttention;
use crate::element::{DType, Element, F8E4M3};
use crate::error::{Error, Result};
use crate::layout::Strided;

/// Keys per tile of the FP8 definition: P is quantised against the running row max after
/// each tile of this many keys (aligned at key 0 of the sequence). The Hopper kernel's key
/// tile, so the CPU path, the reference and the kernel quantise identically.
pub const FP8_KEY_TILE: usize = 128;

/// Largest accepted descale factor: a code times the factor stays finite in f32 (the
/// largest e4m3 code is 448).
pub const FP8_MAX_DESCALE: f32 = f32::MAX / F8E4M3::MAX;

/// Descale factors of an FP8 call, FlashAttention-3's convention: each `[batch, heads_kv]`
/// (row-major, `batch * heads_kv` values; a per-tensor scale repeats one value). A code `x`
/// of query head `h` in sequence `b` means `x * q[b * heads_kv + h / group]`; keys and values
/// of kv head `g` mean `x * k[b * heads_kv + g]` and `x * v[b * heads_kv + g]`.
///
/// `D` is `&[f32]` on the CPU ([`FlashAttention::forward_cpu_fp8`]) and a device buffer on
/// the GPU (`FlashAttention::forward_gpu_fp8`).
#[derive(Debug, Clone, Copy)]
pub struct Fp8Descales<D> {
    /// Query descale, `[batch, heads_kv]`.
    pub q: D,
    /// Key descale, `[batch, heads_kv]`.
    pub k: D,
    /// Value descale, `[batch, heads_kv]`.
    pub v: D,
}

impl FlashAttention {
    /// Checks the lengths of the three descale buffers (`batch * heads_kv` each) and that the
    /// output type is bf16 or f16. Shared by the CPU and GPU paths; touches no buffer.
    pub(crate) fn check_fp8_args(&self, out: DType, lens: [usize; 3]) -> Result<()> {
        if !matches!(out, DType::BF16 | DType::F16) {
            return Err(Error::Unsupported(format!(
                "the FP8 forward writes bf16 or f16 output, not {out}"
            )));
        }
        let need = self.batch.checked_mul(self.heads_kv).ok_or_else(|| {
            Error::Shape("batch * heads_kv descale factors overflow usize".into())
        })?;
        for (name, len) in ["q_descale", "k_descale", "v_descale"].iter().zip(lens) {
            if len != need {
                return Err(Error::Shape(format!(
                    "{name} holds {len} values but [batch, heads_kv] = [{}, {}] needs {need}",
                    self.batch, self.heads_kv
                )));
            }
        }
        Ok(())
    }

    /// CPU FP8 forward: `q: [batch, seqlen_q, heads_q, head_dim]`, `k, v: [batch, seqlen_k,
    /// heads_kv, head_dim]` e4m3 codes (or packed varlen rows) with the strides of the 16-bit
    /// path, `descales` as [`Fp8Descales`] (host slices), `out` like q in bf16 or f16, `lse`
    /// (optional) f32 natural log in the layout of [`FlashAttention::lse_len`].
    ///
    /// The arithmetic of the GPU kernel in f32: scores `scale * q_descale * k_descale *
    /// (q . k)` over the codes, softcap and mask as for 16-bit inputs, then per 128-key tile
    /// (visited in increasing order, tiles with no visible key skipped, which is exact) the
    /// online softmax with `p8 = e4m3(exp(s - m_t))` in the PV sum and the unquantised `p` in
    /// `l`; `o = acc * v_descale / l`. Every descale must be finite, > 0 and at most
    /// [`FP8_MAX_DESCALE`] (`InvalidOption`), checked with every length before anything is
    /// written.
    pub fn forward_cpu_fp8<O: Element>(
        &self,
        q: Strided<&[F8E4M3]>,
        k: Strided<&[F8E4M3]>,
        v: Strided<&[F8E4M3]>,
        descales: Fp8Descales<&[f32]>,
        out: Strided<&mut [O]>,
        lse: Option<&mut [f32]>,
    ) -> Result<()> {
        self.check_host_buffers(&q, &k, &v, &out, lse.as_deref())?;
        check_descales_host(self, O::DTYPE, &descales)?;
        let group = self.heads_q / self.heads_kv;
        self.run_heads_cpu(q, k, v, out, lse, |b, h, qh, kh, vh, sq, sk| {
            let at = b * self.heads_kv + h / group;
            let qk_scale = self.scale * descales.q[at] * descales.k[at];
            self.fp8_head(qh, kh, vh, sq, sk, qk_scale, descales.v[at])
        });
        Ok(())
    }

    /// One (sequence, head) of the CPU FP8 path: `q: [sq, d]`, `k, v: [sk, d]` (codes as
    /// f32, exact). The dense path's row blocks (`CPU_TILE_M` rows in parallel, each against
    /// its visible `FP8_KEY_TILE`-key tiles, scores by `dot_block` over the rows' visible
    /// ranges) with the scores scaled by `qk_scale` and P rounded to e4m3 for the P.V sum
    /// (`OnlineSoftmaxBlock::update_weighted`: every row has the bits of the row-by-row
    /// `OnlineSoftmax::update_weighted`); the output then times `v_descale`. Returns
    /// `(o [sq, d], lse [sq])`.
    #[allow(clippy::too_many_arguments)]
    fn fp8_head(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        sq: usize,
        sk: usize,
        qk_scale: f32,
        v_descale: f32,
    ) -> (Vec<f32>, Vec<f32>) {
        let quantise = F8E4M3::round_f32;
        let arith = (qk_scale, quantise);
        let (mut out, lse) = self.blocked_head((q, k, v), sq, sk, FP8_KEY_TILE, &arith);
        out.iter_mut().for_each(|x| *x *= v_descale);
        (out, lse)
    }
}

/// The host-side checks of an FP8 call with host descales: lengths, output type, and every
/// value finite, > 0 and at most [`FP8_MAX_DESCALE`] (shared by the CPU path and the f64
/// reference).
pub(crate) fn check_descales_host(
    attn: &FlashAttention,
    out: DType,
    descales: &Fp8Descales<&[f32]>,
) -> Result<()> {
    attn.check_fp8_args(out, [descales.q.len(), descales.k.len(), descales.v.len()])?;
    for (name, values) in [
        ("q_descale", descales.q),
        ("k_descale", descales.k),
        ("v_descale", descales.v),
    ] {
        if let Some((i, x)) = values
            .iter()
            .enumerate()
            .find(|(_, x)| !(x.is_finite() && **x > 0.0 && **x <= FP8_MAX_DESCALE))
        {
            return Err(Error::InvalidOption(format!(
                "{name}[{i}] = {x:e}: descale factors must be finite, > 0 and at most \
                 {FP8_MAX_DESCALE:e} (f32::MAX / 448)"
            )));
        }
    }
    Ok(())
}
