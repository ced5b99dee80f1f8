//! Per-kv-head decode policies (full, streaming, Quest top-B) of the paged decode entry
//! points: `longattn_paged_decode_policy_{cpu,cuda}` and their FP8-cache twins.

use super::{
    CFp8Cache, CPagedDesc, CTensor, CTensorMut, CallError, DTypeCode, PagedOp, RawMeta, Status,
    fp8_problem, guarded, paged_cpu_entry, paged_cuda_entry, paged_problem, table,
};
use crate::error::Error;
use crate::paged::{HeadPolicy, PagedDecode, QuestConfig, SparsePolicy, StreamingConfig};

/// `longattn_head_policy` code of a full head (every visible page).
pub const LONGATTN_HEAD_FULL: i32 = 0;
/// `longattn_head_policy` code of a streaming head (sinks plus the recent window).
pub const LONGATTN_HEAD_STREAMING: i32 = 1;
/// `longattn_head_policy` code of a Quest head (top-B pages by the page metadata).
pub const LONGATTN_HEAD_QUEST: i32 = 2;

/// `longattn_decode_policy`: how each kv head of a paged decode reads the cache
/// ([`SparsePolicy`]), and the Quest metadata its Quest heads score pages with.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CDecodePolicy {
    /// `[heads_kv]` `LONGATTN_HEAD_*` codes (host).
    pub heads: *const i32,
    /// Streaming heads: leading tokens always visible.
    pub streaming_sinks: usize,
    /// Streaming heads: recent tokens visible, the current one included (>= 1).
    pub streaming_window: usize,
    /// Quest heads: tokens kept per (sequence, kv head), `max(1, budget / page_size)` pages.
    pub quest_token_budget: usize,
    /// Quest heads: leading pages always kept.
    pub quest_sink_pages: usize,
    /// `[num_pages, heads_kv, head_dim]` per-page key minima in the cache's element type
    /// (as the append writes them), or NULL with `kmax` NULL (no Quest head).
    pub kmin: *const std::ffi::c_void,
    /// Per-page key maxima, as `kmin`.
    pub kmax: *const std::ffi::c_void,
    /// Elements in each of `kmin`, `kmax`.
    pub meta_len: usize,
}

/// `decode` with the C policy: the head codes read (`heads_kv` of them, after the
/// descriptor is validated) and checked, the metadata pointers paired.
///
/// # Safety
/// `policy` is NULL or valid: `heads` points to `heads_kv` readable codes.
unsafe fn with_policy(
    decode: PagedDecode,
    policy: *const CDecodePolicy,
) -> Result<PagedOp, CallError> {
    // SAFETY: NULL or valid by the contract.
    let p = unsafe { policy.as_ref() }.ok_or(CallError::Null("policy"))?;
    let heads_kv = decode.cache().heads_kv();
    // SAFETY: `heads_kv` codes by the contract (`heads_kv` validated with the cache).
    let codes = unsafe { table(p.heads, heads_kv, "policy.heads") }?;
    let heads = codes
        .iter()
        .enumerate()
        .map(|(g, &code)| match code {
            LONGATTN_HEAD_FULL => Ok(HeadPolicy::Full),
            LONGATTN_HEAD_STREAMING => Ok(HeadPolicy::Streaming),
            LONGATTN_HEAD_QUEST => Ok(HeadPolicy::Quest),
            _ => Err(Error::InvalidOption(format!(
                "policy.heads[{g}] = {code}: expected LONGATTN_HEAD_FULL (0), \
                 LONGATTN_HEAD_STREAMING (1) or LONGATTN_HEAD_QUEST (2)"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta = RawMeta::new((p.kmin, p.kmax), p.meta_len)?;
    let policy = SparsePolicy {
        heads,
        streaming: StreamingConfig {
            sinks: p.streaming_sinks,
            window: p.streaming_window,
        },
        quest: QuestConfig {
            token_budget: p.quest_token_budget,
            sink_pages: p.quest_sink_pages,
        },
    };
    Ok(PagedOp::Decode(decode.with_policy(policy)?, meta))
}

/// `longattn_paged_decode_policy_cpu()`: [`super::longattn_paged_decode_cpu`] with a policy
/// per kv head (Quest heads read the policy's metadata, host arrays of `dtype`).
///
/// # Safety
/// As [`super::longattn_paged_decode_cpu`]; `policy` valid, its `heads` `heads_kv` codes,
/// its `kmin`/`kmax` NULL or `meta_len` readable elements of `dtype`.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn longattn_paged_decode_policy_cpu(
    desc: *const CPagedDesc,
    policy: *const CDecodePolicy,
    dtype: DTypeCode,
    q: CTensor,
    k_cache: *const std::ffi::c_void,
    v_cache: *const std::ffi::c_void,
    cache_len: usize,
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor and policy by the contract.
        let op = unsafe { with_policy(paged_problem(desc)?, policy) }?;
        let kv = (k_cache, v_cache, cache_len);
        // SAFETY: buffers as documented for `dtype`.
        unsafe { paged_cpu_entry(&op, dtype, q, (kv, false), out, (lse, lse_len)) }
    })
}

/// `longattn_paged_decode_policy_cuda()`: [`longattn_paged_decode_policy_cpu`] on device
/// buffers (the metadata too; the head codes stay a host array), as
/// [`super::longattn_paged_decode_cuda`]. **Not yet run on a GPU** through the C API.
///
/// # Safety
/// As [`super::longattn_paged_decode_cuda`]; `policy` as for
/// [`longattn_paged_decode_policy_cpu`] with `kmin`/`kmax` device allocations.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn longattn_paged_decode_policy_cuda(
    desc: *const CPagedDesc,
    policy: *const CDecodePolicy,
    dtype: DTypeCode,
    q: CTensor,
    k_cache: *const std::ffi::c_void,
    v_cache: *const std::ffi::c_void,
    cache_len: usize,
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
    device: i32,
    stream: *mut std::ffi::c_void,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor and policy by the contract.
        let op = unsafe { with_policy(paged_problem(desc)?, policy) }?;
        let kv = (k_cache, v_cache, cache_len);
        let gpu = (device, stream);
        // SAFETY: device buffers and stream as documented for `dtype`.
        unsafe { paged_cuda_entry(&op, dtype, q, (kv, false), out, (lse, lse_len), gpu) }
    })
}

/// `longattn_paged_decode_fp8_policy_cpu()`: [`longattn_paged_decode_policy_cpu`] over an FP8
/// e4m3 cache ([`CFp8Cache`]); the metadata holds e4m3 bytes (as the FP8 append writes them).
///
/// # Safety
/// As [`super::longattn_paged_decode_fp8_cpu`]; `policy` as for
/// [`longattn_paged_decode_policy_cpu`] with `meta_len` bytes in `kmin`/`kmax`.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn longattn_paged_decode_fp8_policy_cpu(
    desc: *const CPagedDesc,
    policy: *const CDecodePolicy,
    dtype: DTypeCode,
    q: CTensor,
    cache: CFp8Cache,
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor, scales and policy by the contract.
        let op = unsafe { with_policy(fp8_problem(desc, &cache)?, policy) }?;
        let kv = (cache.k_cache, cache.v_cache, cache.cache_len);
        // SAFETY: buffers as documented.
        unsafe { paged_cpu_entry(&op, dtype, q, (kv, true), out, (lse, lse_len)) }
    })
}

/// `longattn_paged_decode_fp8_policy_cuda()`: [`longattn_paged_decode_fp8_policy_cpu`] on
/// device buffers, as [`super::longattn_paged_decode_fp8_cuda`]. **Not yet run on a GPU**.
///
/// # Safety
/// As [`super::longattn_paged_decode_fp8_cuda`]; `policy` as for
/// [`longattn_paged_decode_fp8_policy_cpu`] with `kmin`/`kmax` device allocations.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn longattn_paged_decode_fp8_policy_cuda(
    desc: *const CPagedDesc,
    policy: *const CDecodePolicy,
    dtype: DTypeCode,
    q: CTensor,
    cache: CFp8Cache,
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
    device: i32,
    stream: *mut std::ffi::c_void,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor, scales and policy by the contract.
        let op = unsafe { with_policy(fp8_problem(desc, &cache)?, policy) }?;
        let kv = (cache.k_cache, cache.v_cache, cache.cache_len);
        let gpu = (device, stream);
        // SAFETY: device buffers and stream as documented.
        unsafe { paged_cuda_entry(&op, dtype, q, (kv, true), out, (lse, lse_len), gpu) }
    })
}
