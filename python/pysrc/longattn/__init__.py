"""longattn: hand-written CUDA attention kernels with f64-checked CPU references.

CPU functions take numpy arrays (float32 or float16) and return new arrays:
``dense``, ``dense_varlen``, ``paged_decode`` and ``paged_prefill`` (also over an FP8 e4m3
cache: ``uint8`` code arrays with per-kv-head ``k_scales``/``v_scales``; ``fp8_quantize``
makes the codes), ``neighborhood``, ``block_sparse`` (a CSR block mask: int32 ``offsets``
and ``indices``, optional bool ``full``, ``block_m``/``block_n``), ``merge`` (two partial
``(o, lse)`` results over disjoint keys into one). ``paged_append`` writes new tokens into
the caller's writable cache arrays in place (and the Quest page bounds ``kmin``/``kmax``;
``seqlens_k`` already counts the new tokens). ``paged_decode``'s ``policy`` ("full",
"streaming" or "quest", per kv head) selects what each kv head reads.

CUDA functions take objects exposing ``__cuda_array_interface__`` (torch CUDA tensors,
CuPy arrays; float16, float32 for LSEs, uint8 for FP8 cache codes) or DLPack's ``__dlpack__``
(float16, bfloat16, float32, uint8: torch bfloat16 tensors come this way) and write into
caller-allocated tensors on the tensors' current stream (torch's current stream for torch
tensors; or an explicit ``stream`` handle): ``dense_cuda``, ``dense_varlen_cuda``,
``paged_decode_cuda``, ``paged_prefill_cuda``, ``paged_append_cuda`` (in place),
``merge_cuda``, ``neighborhood_cuda``, ``block_sparse_cuda`` (not yet run on a GPU). The paged
ones also take an FP8 e4m3 cache as the CPU ones do: ``uint8`` code tensors (a
``torch.float8_e4m3fn`` tensor is viewed as ``uint8``) with ``k_scales``/``v_scales``, Quest
bounds in e4m3 codes too; q, out and new tokens stay float16/bfloat16 (FP8 on CUDA: not yet
run on a GPU).

Block-sparse patterns (square blocks of ``block`` tokens, parameters in blocks, query block
``qb`` at key block position ``qb + (seqlen_k - seqlen_q) // block``): ``longformer_mask``,
``bigbird_mask`` (random blocks from ``bigbird_random_blocks``),
``sparse_transformer_strided_mask``, ``sparse_transformer_fixed_mask``,
``block_attention_mask``, ``per_head_windows_mask`` (MSWA), ``streaming_heads_mask``
(DuoAttention) each return a dict of ``block_sparse``'s keyword arguments: ``offsets``,
``indices`` (int32), ``full`` (bool: the element mask shows every element of the block),
``block_m``, ``block_n``, ``mask_batch`` (1), ``mask_heads`` (1 when the pattern is the
same for every head), and the ``causal``, ``window``, ``sinks`` they were built for (the
mask is "the pattern AND that element mask"): ``block_sparse(q, k, v, **mask, scale=...)``.

Layouts follow FlashAttention: ``q (batch, seqlen_q, heads_q, head_dim)``, ``k, v (batch,
seqlen_k, heads_kv, head_dim)``; windows are ``(left, right)`` with ``-1`` unbounded and
``causal`` sets ``right = min(right, 0)``; a row with no visible key gives 0.
"""

from ._longattn import (
    dense,
    dense_varlen,
    paged_decode,
    paged_prefill,
    paged_append,
    merge,
    fp8_quantize,
    block_sparse,
    longformer_mask,
    bigbird_mask,
    bigbird_random_blocks,
    sparse_transformer_strided_mask,
    sparse_transformer_fixed_mask,
    block_attention_mask,
    per_head_windows_mask,
    streaming_heads_mask,
    dense_cuda as _dense_cuda,
    dense_varlen_cuda as _dense_varlen_cuda,
    paged_decode_cuda as _paged_decode_cuda,
    paged_prefill_cuda as _paged_prefill_cuda,
    paged_append_cuda as _paged_append_cuda,
    merge_cuda as _merge_cuda,
    neighborhood_cuda as _neighborhood_cuda,
    block_sparse_cuda as _block_sparse_cuda,
)
from ._longattn import neighborhood as _neighborhood

__all__ = [
    "dense",
    "dense_varlen",
    "paged_decode",
    "paged_prefill",
    "paged_append",
    "merge",
    "fp8_quantize",
    "neighborhood",
    "block_sparse",
    "longformer_mask",
    "bigbird_mask",
    "bigbird_random_blocks",
    "sparse_transformer_strided_mask",
    "sparse_transformer_fixed_mask",
    "block_attention_mask",
    "per_head_windows_mask",
    "streaming_heads_mask",
    "dense_cuda",
    "dense_varlen_cuda",
    "paged_decode_cuda",
    "paged_prefill_cuda",
    "paged_append_cuda",
    "merge_cuda",
    "neighborhood_cuda",
    "block_sparse_cuda",
]


def _per_dim(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def neighborhood(q, k, v, kernel_size, *, dilation=1, causal=False, stride=1, scale=None,
                 softcap=None):
    """Neighborhood attention (NATTEN semantics) on numpy ``(batch, *grid, heads, head_dim)``
    arrays; ``kernel_size``, ``dilation``, ``causal``, ``stride``: an int/bool or one per dim."""
    return _neighborhood(q, k, v, _per_dim(kernel_size), dilation=_per_dim(dilation),
                         causal=_per_dim(causal), stride=_per_dim(stride), scale=scale,
                         softcap=softcap)


def _device_of(t, device):
    if device is not None:
        return device
    dev = getattr(t, "device", None)
    for attr in ("index", "id"):  # torch, CuPy (numpy's device is the string "cpu")
        index = getattr(dev, attr, None)
        if isinstance(index, int):
            return index
    return 0


def _stream_of(t, stream):
    """``stream`` if given, else torch's current stream for a torch tensor (so that work
    queued on it before and after the call stays ordered), else None (the interface's
    stream, or the legacy default one)."""
    if stream is not None:
        return stream
    if type(t).__module__.startswith("torch") and getattr(t, "is_cuda", False):
        import torch

        return torch.cuda.current_stream(t.device).cuda_stream
    return None


def _ints(x):
    return x.tolist() if hasattr(x, "tolist") else list(x)


def _codes(t):
    """A ``torch.float8_e4m3fn`` tensor as the ``uint8`` tensor of its codes (the same
    memory; the array interface and DLPack take e4m3 codes as uint8); anything else as is."""
    if str(getattr(t, "dtype", "")) == "torch.float8_e4m3fn":
        import torch

        return t.view(torch.uint8)
    return t


def dense_cuda(q, k, v, out, *, scale=None, causal=False, window=None, softcap=None, sinks=0,
               stream=None, device=None):
    """Dense attention on CUDA tensors into ``out`` (shaped like ``q``)."""
    _dense_cuda(q, k, v, out, scale=scale, causal=causal, window=window, softcap=softcap,
                sinks=sinks, stream=_stream_of(q, stream), device=_device_of(q, device))
    return out


def dense_varlen_cuda(q, k, v, out, cu_seqlens_q, cu_seqlens_k, *, scale=None, causal=False,
                      window=None, softcap=None, sinks=0, stream=None, device=None):
    """Varlen dense attention on packed CUDA tensors into ``out``; offsets may live anywhere
    (they are read on the host)."""
    _dense_varlen_cuda(q, k, v, out, _ints(cu_seqlens_q), _ints(cu_seqlens_k), scale=scale,
                       causal=causal, window=window, softcap=softcap, sinks=sinks,
                       stream=_stream_of(q, stream), device=_device_of(q, device))
    return out


def paged_decode_cuda(q, k_cache, v_cache, out, block_table, seqlens_k, *, scale=None,
                      window_left=-1, softcap=None, sinks=0, k_scales=None, v_scales=None,
                      policy=None, quest_budget=None, quest_sink_pages=0, streaming_sinks=4,
                      streaming_window=1024, kmin=None, kmax=None, stream=None, device=None):
    """Paged decode on CUDA tensors into ``out``; the tables are read on the host. The cache
    holds q's dtype, or FP8 e4m3 codes (``uint8`` or ``torch.float8_e4m3fn``) with
    ``k_scales``/``v_scales`` as ``paged_decode`` takes them (not yet run on a GPU). Head
    policies as ``paged_decode`` (``kmin``/``kmax``: contiguous CUDA tensors of the cache's
    dtype, as ``paged_append_cuda`` maintains them)."""
    _paged_decode_cuda(q, _codes(k_cache), _codes(v_cache), out, _ints(block_table),
                       _ints(seqlens_k), scale=scale, window_left=window_left, softcap=softcap,
                       sinks=sinks, k_scales=k_scales, v_scales=v_scales, policy=policy,
                       quest_budget=quest_budget,
                       quest_sink_pages=quest_sink_pages, streaming_sinks=streaming_sinks,
                       streaming_window=streaming_window, kmin=_codes(kmin),
                       kmax=_codes(kmax), stream=_stream_of(q, stream),
                       device=_device_of(q, device))
    return out


def paged_append_cuda(k_new, v_new, k_cache, v_cache, block_table, seqlens_k, cu_seqlens_new,
                      *, kmin=None, kmax=None, k_scales=None, v_scales=None, stream=None,
                      device=None):
    """Appends float16/bfloat16 ``k_new, v_new (total_new, heads_kv, head_dim)`` to CUDA
    caches in place (and the Quest bounds ``kmin, kmax (num_pages, heads_kv, head_dim)`` when
    given), semantics as ``paged_append``: ``seqlens_k`` already counts the new tokens, an
    append writing slot 0 of a page restarts its bounds. Caches of the new tokens' dtype, or
    FP8 e4m3 codes (``uint8`` or ``torch.float8_e4m3fn``; codes of ``x / k_scales[head]``,
    the bounds codes too, as ``paged_append`` writes them; not yet run on a GPU); the tables
    are read on the host."""
    _paged_append_cuda(k_new, v_new, _codes(k_cache), _codes(v_cache), _ints(block_table),
                       _ints(seqlens_k), _ints(cu_seqlens_new), kmin=_codes(kmin),
                       kmax=_codes(kmax), k_scales=k_scales, v_scales=v_scales,
                       stream=_stream_of(k_cache, stream), device=_device_of(k_cache, device))


def merge_cuda(o_a, lse_a, o_b, lse_b, o_out, lse_out, *, stream=None, device=None):
    """Merges two partial results (see ``merge``) on contiguous CUDA tensors into ``o_out``,
    ``lse_out`` (which may be ``o_a``, ``lse_a``): ``o (batch, seqlen, heads, head_dim)``
    float16, bfloat16 or float32, ``lse (batch, heads, seqlen)`` float32. Returns
    ``(o_out, lse_out)``."""
    _merge_cuda(o_a, lse_a, o_b, lse_b, o_out, lse_out, stream=_stream_of(o_a, stream),
                device=_device_of(o_a, device))
    return o_out, lse_out


def paged_prefill_cuda(q, k_cache, v_cache, out, block_table, seqlens_k, *, cu_seqlens_q=None,
                       scale=None, causal=False, window=None, softcap=None, sinks=0,
                       k_scales=None, v_scales=None, stream=None, device=None):
    """Paged prefill (chunked prefill, prefix caching) on CUDA tensors into ``out``; the
    tables and ``cu_seqlens_q`` are read on the host. The cache holds q's dtype, or FP8 e4m3
    codes with ``k_scales``/``v_scales`` as ``paged_decode_cuda`` (not yet run on a GPU)."""
    cu = None if cu_seqlens_q is None else _ints(cu_seqlens_q)
    _paged_prefill_cuda(q, _codes(k_cache), _codes(v_cache), out, _ints(block_table),
                        _ints(seqlens_k), cu_seqlens_q=cu, scale=scale, causal=causal,
                        window=window, softcap=softcap, sinks=sinks, k_scales=k_scales,
                        v_scales=v_scales, stream=_stream_of(q, stream),
                        device=_device_of(q, device))
    return out


def neighborhood_cuda(q, k, v, out, kernel_size, *, dilation=1, causal=False, stride=1,
                      scale=None, softcap=None, stream=None, device=None):
    """Neighborhood attention on CUDA ``(batch, *grid, heads, head_dim)`` tensors into ``out``
    (shaped like ``q``); per-dim settings as ``neighborhood``."""
    _neighborhood_cuda(q, k, v, out, _per_dim(kernel_size), dilation=_per_dim(dilation),
                       causal=_per_dim(causal), stride=_per_dim(stride), scale=scale,
                       softcap=softcap, stream=_stream_of(q, stream),
                       device=_device_of(q, device))
    return out


def block_sparse_cuda(q, k, v, out, offsets, indices, *, full=None, block_m=128, block_n=128,
                      mask_batch=1, mask_heads=1, scale=None, causal=False, window=None,
                      softcap=None, sinks=0, stream=None, device=None):
    """Block-sparse attention on CUDA tensors into ``out`` (mask as ``block_sparse``; block
    sizes multiples of 64); the mask arrays may live anywhere (they are read on the host)."""
    full = None if full is None else [bool(x) for x in _ints(full)]
    _block_sparse_cuda(q, k, v, out, _ints(offsets), _ints(indices), full=full,
                       block_m=block_m, block_n=block_n, mask_batch=mask_batch,
                       mask_heads=mask_heads, scale=scale, causal=causal, window=window,
                       softcap=softcap, sinks=sinks, stream=_stream_of(q, stream),
                       device=_device_of(q, device))
    return out
