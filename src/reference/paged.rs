//! Naive f64 references of the paged family: decode over an explicit visibility predicate
//! (every key of the sequence tested), Quest scores of every page, brute-force top-B, page
//! bounds recomputed from the cache contents, and prefill over every key of the sequence.

use crate::element::Element;
use crate::error::Result;
use crate::layout::Strided;
use crate::paged::{
    HeadPolicy, KvPages, PageLists, PageMeta, PagedCache, PagedDecode, PagedPrefill,
};
use crate::reference::attend_row_dequant;

/// The visibility rule of [`PagedDecode`] spelled out: key `j` of sequence `b` is read by
/// query row `i` of kv head `kvh` iff the head's mask makes it visible and, for Quest/Listed
/// heads, its page is in `selected`.
pub fn decode_visible<'a>(
    decode: &'a PagedDecode,
    selected: Option<&'a PageLists>,
) -> impl Fn(usize, usize, usize, usize) -> bool + 'a {
    move |b, kvh, i, j| {
        let sk = decode.cache().seqlen_of(b);
        let in_mask = decode.mask_at(kvh).visible(i, j, decode.q_len(), sk);
        let page = (j / decode.cache().page_size()) as u32;
        in_mask
            && match decode.head_policy_at(kvh) {
                HeadPolicy::Quest | HeadPolicy::Listed => {
                    selected.is_some_and(|s| s.list(b, kvh).contains(&page))
                }
                _ => true,
            }
    }
}

/// Two-pass f64 decode: `out: [batch, q_len, heads_q, head_dim]` contiguous, `lse:
/// [batch, heads_q, q_len]` natural log; rows with no visible key give 0 and `-inf`.
/// `visible(b, kvh, i, j)` decides which keys each row reads. The cache (element type `C`)
/// is dequantised in f64 with its [`KvScales`](crate::paged::KvScales) (FP8).
pub fn paged_decode_f64<T: Element, C: Element>(
    decode: &PagedDecode,
    q: Strided<&[T]>,
    kv: KvPages<&[C]>,
    visible: impl Fn(usize, usize, usize, usize) -> bool,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let cache = decode.cache();
    decode.check_io(q.extent(), None, None)?;
    cache.check_kv(kv.k.len(), kv.v.len())?;
    let scales = f64_scales::<C>(cache)?;
    let (d, hq, sq) = (cache.head_dim(), decode.heads_q(), decode.q_len());
    let mut out = vec![0.0f64; decode.out_len()];
    let mut lse = vec![f64::NEG_INFINITY; decode.lse_len()];
    let scale = decode.scale() as f64;
    for b in 0..cache.batch() {
        let sk = cache.seqlen_of(b);
        for i in 0..sq {
            for h in 0..hq {
                let kvh = decode.kv_head(h);
                let s = &q.strides;
                let qo = s.offset(b, i, h);
                let qi = &q.data[qo..qo + d];
                let oo = ((b * sq + i) * hq + h) * d;
                let (kd, vd) = (kv.k, kv.v);
                let at = |j: usize| cache.token_at(b, j, kvh);
                lse[(b * hq + h) * sq + i] = attend_row_dequant(
                    qi,
                    sk,
                    |j| visible(b, kvh, i, j).then(|| &kd[at(j)..at(j) + d]),
                    |j| &vd[at(j)..at(j) + d],
                    scales(kvh),
                    scale,
                    decode.softcap(),
                    &mut out[oo..oo + d],
                );
            }
        }
    }
    Ok((out, lse))
}

/// Quest scores in f64 of every page of every sequence and kv head, aggregated by max over
/// the group's query heads and the q rows: `[batch, heads_kv, max_pages_per_seq]`, `-inf`
/// past the sequence's pages. The bounds (element type `C`) are dequantised with the K scales.
pub fn quest_scores_f64<T: Element, C: Element>(
    decode: &PagedDecode,
    q: Strided<&[T]>,
    meta: PageMeta<&[C]>,
) -> Result<Vec<f64>> {
    let cache = decode.cache();
    decode.check_select(q.extent(), (meta.kmin.len(), meta.kmax.len()))?;
    let scales = f64_scales::<C>(cache)?;
    let (hkv, d, mp, g) = (
        cache.heads_kv(),
        cache.head_dim(),
        cache.max_pages_per_seq(),
        decode.group(),
    );
    let mut scores = vec![f64::NEG_INFINITY; cache.batch() * hkv * mp];
    for b in 0..cache.batch() {
        for kvh in 0..hkv {
            for p in 0..cache.pages_in(b) {
                let mo = cache.layout().meta_at(cache.page_at(b, p), kvh);
                let mut best = f64::NEG_INFINITY;
                for i in 0..decode.q_len() {
                    for h in kvh * g..(kvh + 1) * g {
                        let s = &q.strides;
                        let qo = s.offset(b, i, h);
                        let sc: f64 = (0..d)
                            .map(|c| {
                                let x = q.data[qo + c].to_f64();
                                let ks = scales(kvh).0;
                                (x * (meta.kmax[mo + c].to_f64() * ks))
                                    .max(x * (meta.kmin[mo + c].to_f64() * ks))
                            })
                            .sum();
                        best = best.max(sc);
                    }
                }
                scores[(b * hkv + kvh) * mp + p] = best;
            }
        }
    }
    Ok(scores)
}

/// Brute-force Quest selection of one (sequence, kv head): candidate pages are those with a
/// key visible to some row under `decode`'s base mask (every key tested); a candidate is
/// selected iff fewer than `K` candidates beat it (kept first, then higher score, then lower
/// index), `K = min(max(B, #kept), #candidates)`. Returns pages ascending.
pub fn quest_select_brute(decode: &PagedDecode, b: usize, scores: &[f64]) -> Vec<u32> {
    let cache = decode.cache();
    let (ps, sk, sq) = (cache.page_size(), cache.seqlen_of(b), decode.q_len());
    let base = decode.base_mask();
    let cand: Vec<usize> = (0..cache.pages_in(b))
        .filter(|&p| {
            (p * ps..((p + 1) * ps).min(sk)).any(|j| (0..sq).any(|i| base.visible(i, j, sq, sk)))
        })
        .collect();
    let quest = decode.quest_config();
    let newest = (sk > 0).then(|| (sk - 1) / ps);
    let kept = |p: usize| p < quest.sink_pages || Some(p) == newest;
    let n_kept = cand.iter().filter(|&&p| kept(p)).count();
    let k = quest.budget_pages(ps).max(n_kept).min(cand.len());
    let beats = |a: usize, x: usize| {
        (kept(a), scores[a]) > (kept(x), scores[x])
            || (kept(a) == kept(x) && scores[a] == scores[x] && a < x)
    };
    cand.iter()
        .filter(|&&x| cand.iter().filter(|&&a| a != x && beats(a, x)).count() < k)
        .map(|&p| p as u32)
        .collect()
}

/// Per-page key bounds recomputed from the cache: for every page some sequence uses, over its
/// filled slots `0..min(page_size, seqlen - lp * page_size)`. Returns
/// `(page id, kv head, kmin [head_dim], kmax [head_dim])` per used (page, kv head), in `T`
/// like the metadata (the bounds of `T` values are `T` values: the conversion is exact).
pub fn page_bounds<T: Element>(
    cache: &PagedCache,
    k_cache: &[T],
) -> Vec<(usize, usize, Vec<T>, Vec<T>)> {
    let (ps, d, layout) = (cache.page_size(), cache.head_dim(), cache.layout());
    let mut out = Vec::new();
    for b in 0..cache.batch() {
        let sk = cache.seqlen_of(b);
        for lp in 0..cache.pages_in(b) {
            let id = cache.page_at(b, lp);
            let filled = ps.min(sk - lp * ps);
            for kvh in 0..cache.heads_kv() {
                let mut lo = vec![f32::INFINITY; d];
                let mut hi = vec![f32::NEG_INFINITY; d];
                for slot in 0..filled {
                    let o = layout.slot_at(id, slot, kvh);
                    for c in 0..d {
                        let x = k_cache[o + c].to_f32();
                        lo[c] = lo[c].min(x);
                        hi[c] = hi[c].max(x);
                    }
                }
                let to_t = |v: Vec<f32>| v.into_iter().map(T::from_f32).collect();
                out.push((id, kvh, to_t(lo), to_t(hi)));
            }
        }
    }
    out
}

/// The cache's `(k, v)` dequantisation scales per kv head in f64 (1 for a cache without
/// [`KvScales`](crate::paged::KvScales)).
fn f64_scales<C: Element>(cache: &PagedCache) -> Result<impl Fn(usize) -> (f64, f64) + '_> {
    let scales = cache.scales_for(C::DTYPE)?;
    Ok(move |kvh| {
        let (k, v) = scales.of(kvh);
        (f64::from(k), f64::from(v))
    })
}

/// Two-pass f64 paged prefill: every key `0..seqlens_k[b]` of the sequence read through the
/// block table and tested with the dense mask rule (`Mask::visible(i, j, q_len, sk)`).
/// `out: [batch, q_len, heads_q, head_dim]` contiguous, `lse: [batch, heads_q, q_len]`
/// natural log; rows with no visible key give 0 and `-inf`.
pub fn paged_prefill_f64<T: Element, C: Element>(
    prefill: &PagedPrefill,
    q: Strided<&[T]>,
    kv: KvPages<&[C]>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let cache = prefill.cache();
    let scales = f64_scales::<C>(cache)?;
    let [_, rows, hq, d] = prefill.q_dims();
    // Contiguous [batch, q_len, hq, d], or packed [total_q, hq, d] (varlen).
    let out_strides = crate::layout::Strides::contiguous(rows, hq, d);
    prefill.check_forward(
        q.extent(),
        (prefill.out_len(), &out_strides),
        None,
        (kv.k.len(), kv.v.len()),
    )?;
    let mut out = vec![0.0f64; prefill.out_len()];
    let mut lse = vec![f64::NEG_INFINITY; prefill.lse_len()];
    let scale = prefill.scale() as f64;
    let mask = prefill.mask();
    for b in 0..cache.batch() {
        let sk = cache.seqlen_of(b);
        let (qb, r0, sq) = prefill.rows_of(b);
        for i in 0..sq {
            for h in 0..hq {
                let kvh = prefill.kv_head(h);
                let qo = q.strides.offset(qb, r0 + i, h);
                let qi = &q.data[qo..qo + d];
                let oo = out_strides.offset(qb, r0 + i, h);
                let (kd, vd) = (kv.k, kv.v);
                let at = |j: usize| cache.token_at(b, j, kvh);
                lse[prefill.lse_index(b, h, i)] = attend_row_dequant(
                    qi,
                    sk,
                    |j| mask.visible(i, j, sq, sk).then(|| &kd[at(j)..at(j) + d]),
                    |j| &vd[at(j)..at(j) + d],
                    scales(kvh),
                    scale,
                    prefill.softcap(),
                    &mut out[oo..oo + d],
                );
            }
        }
    }
    Ok((out, lse))
}
