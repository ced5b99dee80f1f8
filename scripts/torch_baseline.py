#!/usr/bin/env python3
"""PyTorch baselines on the shapes of examples/gpu_bench.rs, printed as `BENCH {json}` lines.

SDPA with the flash and cuDNN backends (full and causal), FlexAttention with causal and
sliding-window block masks; the packed varlen batch (SDPA on jagged nested tensors,
FlexAttention with a document mask). TFLOP/s counts 4*d FLOPs per visible (query, key) pair and
head, like gpu_bench. Run on the GPU machine: python3 torch_baseline.py [--budget SECONDS]
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def visible_pairs(s, window=None, causal=False):
    if window is not None:  # causal window of `window` tokens
        w = window
        return sum(min(i + 1, w) for i in range(s))
    return s * (s + 1) // 2 if causal else s * s


def varlen_lengths():
    """The 64 sequence lengths (100-2000 tokens) of gpu_bench's varlen64_d128_causal row."""
    return [100 + (i * 7919 + 13) % 1901 for i in range(64)]


def bench(fn, reps=None):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(); fn(); end.record(); end.synchronize()
    once = start.elapsed_time(end)
    reps = reps or max(3, min(50, int(300 / max(once, 1e-3))))
    times = []
    for _ in range(reps):
        start.record(); fn(); end.record(); end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def emit(name, impl, b, s, h, d, ms, pairs):
    tflops = 4.0 * b * h * d * pairs / ms / 1e9
    print("BENCH " + json.dumps(dict(name=name, impl=impl, b=b, s=s, h=h, d=d,
                                     ms=round(ms, 4), tflops=round(tflops, 2))), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=240.0, help="seconds before FlexAttention cases are skipped")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    dev = torch.device("cuda")
    print(f"# torch {torch.__version__} on {torch.cuda.get_device_name()}", flush=True)
    seqs = [1024, 16384] if args.quick else [1024, 4096, 16384]
    for d in (64, 128, 256):
        for s in seqs:
            b, h = 16384 // s, 2048 // d
            q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
            for causal in (False, True):
                name = f"dense_d{d}_s{s}_{'causal' if causal else 'full'}"
                for impl, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                                      ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
                    try:
                        with sdpa_kernel(backend):
                            ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                        emit(name, impl, b, s, h, d, ms, visible_pairs(s, causal=causal))
                    except Exception as e:  # backend not available for this shape
                        print(f"# {name} {impl}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            del q, k, v
    # Short queries with GQA (gpu_bench shortq_* rows): 32 query / 8 kv heads, d128, batch 16,
    # no mask (so that SDPA's top-left causal alignment does not matter).
    for sk in (4096, 32768):
        for sq in (1, 4, 16, 64):
            name = f"shortq_q{sq}_k{sk}_d128"
            q = torch.randn(16, 32, sq, 128, device=dev, dtype=torch.bfloat16)
            k, v = (torch.randn(16, 8, sk, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
            for impl, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                                  ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                                  ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION)):
                try:
                    with sdpa_kernel(backend):
                        ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
                    emit(name, impl, 16, sk, 32, 128, ms, sq * sk)
                except Exception as e:  # backend not available for this shape
                    print(f"# {name} {impl}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            del q, k, v
    # The packed varlen batch of gpu_bench's varlen64_d128_causal row (same lengths): SDPA on
    # a jagged nested tensor (its flash backend runs varlen batches without padding).
    lens = varlen_lengths()
    total, pairs = sum(lens), sum(l * (l + 1) // 2 for l in lens)
    name = "varlen64_d128_causal"
    try:
        q, k, v = (torch.nested.nested_tensor(
            [torch.randn(l, 16, 128, device=dev, dtype=torch.bfloat16) for l in lens],
            layout=torch.jagged).transpose(1, 2) for _ in range(3))
        for impl, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                              ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
                emit(name, impl, 64, total, 16, 128, ms, pairs)
            except Exception as e:  # backend not available for jagged inputs
                print(f"# {name} {impl}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        del q, k, v
    except Exception as e:
        print(f"# {name} nested tensors: {type(e).__name__}: {str(e)[:120]}", flush=True)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as e:
        print(f"# flex unavailable: {e}")
        return
    # FlexAttention on the same packed batch: a document mask (causal within a sequence).
    try:
        doc = torch.repeat_interleave(torch.arange(len(lens), device=dev),
                                      torch.tensor(lens, device=dev))
        def doc_mask(bi, hi, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)
        bm = create_block_mask(doc_mask, B=None, H=None, Q_LEN=total, KV_LEN=total, device="cuda")
        q, k, v = (torch.randn(1, 16, total, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
        ms = bench(lambda: flex(q, k, v, block_mask=bm))
        emit(name, "flex", 64, total, 16, 128, ms, pairs)
        del q, k, v
    except Exception as e:
        print(f"# {name} flex: {type(e).__name__}: {str(e)[:160]}", flush=True)
    cases = [("dense_d128_s16384_causal", 16384, None)]
    for s in (16384, 65536):
        for w in (256, 1024, 4096):
            cases.append((f"window{w}_d128_s{s}", s, w))
    for name, s, w in cases:
        if time.time() - t0 > args.budget:
            print(f"# {name} flex: skipped (time budget)", flush=True)
            continue
        b, h, d = (16384 // s if w is None else 1), (16 if w is not None else 2048 // 128), 128
        if w is None:
            def mask_mod(bi, hi, qi, ki):
                return qi >= ki
        else:
            def mask_mod(bi, hi, qi, ki, w=w):
                return (qi >= ki) & (qi - ki < w)
        try:
            bm = create_block_mask(mask_mod, B=None, H=None, Q_LEN=s, KV_LEN=s, device="cuda")
            q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
            ms = bench(lambda: flex(q, k, v, block_mask=bm))
            emit(name, "flex", b, s, h, d, ms, visible_pairs(s, window=w, causal=True))
            del q, k, v
        except Exception as e:
            print(f"# {name} flex: {type(e).__name__}: {str(e)[:160]}", flush=True)


if __name__ == "__main__":
    main()
