"""longattn: hand-written CUDA attention kernels with f64-checked CPU references.

CPU functions take numpy arrays (float32 or float16) and return new arrays:
``dense``, ``dense_varlen``, ``paged_decode`` and ``paged_prefill`` (also over an FP8 e4m3
cache: ``uint8`` code arrays with per-kv-head ``k_scales``/``v_scales``; ``fp8_quantize``
makes the codes), ``neighborhood``, ``block_sparse`` (a CSR block mask: int32 ``offsets``
and ``indices``, optional bool ``full``, ``block_m``/``block_n``).

CUDA functions take objects exposing ``__cuda_array_interface__`` (torch CUDA tensors,
CuPy arrays; float16) or DLPack's ``__dlpack__`` (float16 and bfloat16: torch bfloat16
tensors come this way) and write into a caller-allocated ``out`` on the tensors' current
stream (torch's current stream for torch tensors; or an explicit ``stream`` handle):
``dense_cuda``, ``dense_varlen_cuda``, ``paged_decode_cuda``, ``paged_prefill_cuda``,
``neighborhood_cuda``, ``block_sparse_cuda`` (not yet run on a GPU).

Layouts follow FlashAttention: ``q (batch, seqlen_q, heads_q, head_dim)``, ``k, v (batch,
seqlen_k, heads_kv, head_dim)``; windows are ``(left, right)`` with ``-1`` unbounded and
``causal`` sets ``right = min(right, 0)``; a row with no visible key gives 0.
"""

from ._longattn import (
    dense,
    dense_varlen,
    paged_decode,
    paged_prefill,
    fp8_quantize,
    block_sparse,
    dense_cuda as _dense_cuda,
    dense_varlen_cuda as _dense_varlen_cuda,
    paged_decode_cuda as _paged_decode_cuda,
    paged_prefill_cuda as _paged_prefill_cuda,
    neighborhood_cuda as _neighborhood_cuda,
    block_sparse_cuda as _block_sparse_cuda,
)
from ._longattn import neighborhood as _neighborhood

__all__ = [
    "dense",
    "dense_varlen",
    "paged_decode",
    "paged_prefill",
    "fp8_quantize",
    "neighborhood",
    "block_sparse",
    "dense_cuda",
    "dense_varlen_cuda",
    "paged_decode_cuda",
    "paged_prefill_cuda",
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
                      window_left=-1, softcap=None, sinks=0, stream=None, device=None):
    """Paged decode on CUDA tensors into ``out``; the tables are read on the host."""
    _paged_decode_cuda(q, k_cache, v_cache, out, _ints(block_table), _ints(seqlens_k),
                       scale=scale, window_left=window_left, softcap=softcap, sinks=sinks,
                       stream=_stream_of(q, stream), device=_device_of(q, device))
    return out


def paged_prefill_cuda(q, k_cache, v_cache, out, block_table, seqlens_k, *, cu_seqlens_q=None,
                       scale=None, causal=False, window=None, softcap=None, sinks=0, stream=None,
                       device=None):
    """Paged prefill (chunked prefill, prefix caching) on CUDA tensors into ``out``; the
    tables and ``cu_seqlens_q`` are read on the host."""
    cu = None if cu_seqlens_q is None else _ints(cu_seqlens_q)
    _paged_prefill_cuda(q, k_cache, v_cache, out, _ints(block_table), _ints(seqlens_k),
                        cu_seqlens_q=cu, scale=scale, causal=causal, window=window,
                        softcap=softcap, sinks=sinks, stream=_stream_of(q, stream),
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
