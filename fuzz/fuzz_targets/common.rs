//! Decoding helpers shared by the targets: extreme values are as likely as small ones.
#![allow(dead_code)]

use arbitrary::{Result, Unstructured};

pub fn size(u: &mut Unstructured) -> Result<usize> {
    Ok(match u.int_in_range(0u8..=9)? {
        0 => 0,
        1 => 1,
        2 => usize::MAX,
        3 => i32::MAX as usize,
        4 => 1 << 40,
        5 => 65_536,
        _ => u.int_in_range(0..=6)?,
    })
}

pub fn float(u: &mut Unstructured) -> Result<f32> {
    Ok(match u.int_in_range(0u8..=9)? {
        0 => f32::NAN,
        1 => f32::INFINITY,
        2 => f32::NEG_INFINITY,
        3 => f32::MAX,
        4 => 1e-40,
        5 => 0.0,
        _ => u.arbitrary::<f32>()?,
    })
}

pub fn stride(u: &mut Unstructured) -> Result<i64> {
    Ok(match u.int_in_range(0u8..=7)? {
        0 => i64::MIN,
        1 => i64::MAX,
        2 => -1,
        _ => u.int_in_range(0..=40)?,
    })
}

pub fn options(u: &mut Unstructured) -> Result<longattn::AttentionOptions> {
    let side = |u: &mut Unstructured| -> Result<Option<usize>> {
        Ok(if u.arbitrary()? { Some(size(u)?) } else { None })
    };
    Ok(longattn::AttentionOptions {
        scale: if u.arbitrary()? {
            Some(float(u)?)
        } else {
            None
        },
        softcap: if u.arbitrary()? {
            Some(float(u)?)
        } else {
            None
        },
        mask: longattn::Mask::new(longattn::Window::new(side(u)?, side(u)?), size(u)?),
        causal: u.arbitrary()?,
    })
}

/// Values for a buffer the API validated, capped so that a run stays in memory.
pub fn buffer(u: &mut Unstructured, len: usize) -> Result<Option<Vec<f32>>> {
    if len > 1 << 16 {
        return Ok(None);
    }
    (0..len)
        .map(|_| float(u))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// A paged cache with extreme geometry and arbitrary tables; with `scales`, per-kv-head FP8
/// scales of arbitrary values (including 0, NaN, infinities) are attached when valid.
pub fn paged_cache(u: &mut Unstructured) -> Result<Option<longattn::PagedCache>> {
    let layout = longattn::PagedLayout {
        num_pages: size(u)?,
        page_size: size(u)?,
        heads_kv: size(u)?,
        head_dim: size(u)?,
    };
    let bt: Vec<i32> = u.arbitrary()?;
    let sl: Vec<i32> = u.arbitrary()?;
    let Ok(cache) = longattn::PagedCache::new(
        layout,
        longattn::PageTable {
            block_table: &bt,
            max_pages_per_seq: size(u)?,
            seqlens_k: &sl,
        },
    ) else {
        return Ok(None);
    };
    Ok(Some(if u.arbitrary()? {
        let n = u.int_in_range(0..=8usize)?;
        let k = (0..n).map(|_| float(u)).collect::<Result<Vec<_>>>()?;
        let v = (0..n).map(|_| float(u)).collect::<Result<Vec<_>>>()?;
        match longattn::KvScales::new(k, v).and_then(|s| cache.clone().with_kv_scales(s)) {
            Ok(c) => c,
            Err(_) => cache,
        }
    } else {
        cache
    }))
}

/// Whether every value is finite and small enough that attention stays finite.
pub fn tame(xs: &[f32]) -> bool {
    xs.iter().all(|x| x.is_finite() && x.abs() < 1e4)
}
