#!/usr/bin/env python3
"""PyTorch decode baselines for examples/paged_bench.rs, printed as `BENCH {json}` lines.

Decode step (q_len 1), 32 query heads / 8 kv heads, head_dim 128, bf16, over a contiguous
K/V cache holding the same tokens as the paged cache: batch 1 x 64k and 128k, batch 64 x 1k
and 8k. Implementations:
  sdpa-flash      SDPA flash backend, enable_gqa=True
  sdpa-cudnn      SDPA cuDNN backend, enable_gqa=True
  sdpa-efficient  SDPA memory-efficient backend over K/V expanded to 32 heads beforehand
                  (the expansion is not timed; the kernel reads 4x the bytes)
  sdpa            the fastest of the above for the case ("backend" names it)
  flex            FlexAttention (torch.compile, decode kernel) over the contiguous cache
  flex-paged      FlexAttention's experimental PagedAttention over a shuffled paged cache
The flex rows are tried within --flex-budget seconds and skipped (a `#` line) on any error.

Names match paged_bench (`paged_b{B}_s{S}_p{P}_full`); the contiguous rows do not depend on
the page size and are printed once per page size so that bench_summary.py joins them.
`gbs` = logical K+V bytes (batch * seqlen * 8 heads * 128 * 2 B * 2) / time, like
PagedDecode::kv_bytes_read for full decode.

Timing: CUDA events around one call after a 256 MiB device write (keeps the GPU busy while
Python enqueues, evicts L2), 3 warm-up calls, median of 15.
Run on the GPU machine: python3 torch_decode_baseline.py [--flex-budget SECONDS] [--no-flex]
"""
import argparse
import json
import random
import time

import torch
import torch.nn.functional as F

SHAPES = [(1, 65536), (1, 131072), (64, 1024), (64, 8192)]
PAGES = (16, 64)
HQ, HKV, D = 32, 8, 128
WARMUP, REPS = 3, 15


def note(msg):
    print(f"# {msg}", flush=True)


class Timer:
    def __init__(self, dev):
        self.scratch = torch.empty(256 << 20, dtype=torch.uint8, device=dev)

    def time(self, fn):
        for _ in range(WARMUP):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(REPS):
            self.scratch.zero_()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        return times[len(times) // 2]


def emit(b, s, impl, ms, extra=None):
    kv_bytes = b * s * HKV * D * 2 * 2
    for p in PAGES:
        row = dict(name=f"paged_b{b}_s{s}_p{p}_full", impl=impl, b=b, s=s, hq=HQ, hkv=HKV, d=D,
                   page=p, ms=round(ms, 5), gbs=round(kv_bytes / ms / 1e6, 1), kv_bytes=kv_bytes)
        row.update(extra or {})
        print("BENCH " + json.dumps(row), flush=True)


def sdpa_cases(dev, timer):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for b, s in SHAPES:
        try:
            q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.bfloat16)
            k = torch.randn(b, HKV, s, D, device=dev, dtype=torch.bfloat16)
            v = torch.randn(b, HKV, s, D, device=dev, dtype=torch.bfloat16)
        except Exception as e:
            note(f"paged_b{b}_s{s} sdpa: allocation failed: {type(e).__name__}: {str(e)[:160]}")
            continue
        best = None
        runs = [("sdpa-flash", SDPBackend.FLASH_ATTENTION, False),
                ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION, False),
                ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION, True)]
        for impl, backend, expand in runs:
            try:
                if expand:
                    kk, vv = (t.repeat_interleave(HQ // HKV, dim=1) for t in (k, v))
                    kw = {}
                else:
                    kk, vv, kw = k, v, {"enable_gqa": True}
                with sdpa_kernel(backend):
                    ms = timer.time(lambda: F.scaled_dot_product_attention(q, kk, vv, **kw))
                gqa = "expanded" if expand else "native"
                emit(b, s, impl, ms, {"gqa": gqa})
                if best is None or ms < best[1]:
                    best = (impl, ms, gqa)
            except Exception as e:  # backend not available for this shape
                note(f"paged_b{b}_s{s} {impl}: {type(e).__name__}: {str(e)[:160]}")
            finally:
                kk = vv = None
                torch.cuda.empty_cache()
        if best is not None:
            emit(b, s, "sdpa", best[1], {"backend": best[0], "gqa": best[2]})
        del q, k, v
        torch.cuda.empty_cache()


def flex_cases(dev, timer, budget):
    t0 = time.time()
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as e:
        note(f"flex unavailable: {type(e).__name__}: {str(e)[:160]}")
        return
    # The headline shapes first: the budget may run out.
    order = [(1, 65536), (64, 8192), (1, 131072), (64, 1024)]
    for b, s in order:
        if time.time() - t0 > budget:
            note(f"paged_b{b}_s{s} flex: skipped (time budget {budget:.0f} s)")
            continue
        try:
            q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.bfloat16)
            k = torch.randn(b, HKV, s, D, device=dev, dtype=torch.bfloat16)
            v = torch.randn(b, HKV, s, D, device=dev, dtype=torch.bfloat16)
            ms = timer.time(lambda: flex(q, k, v, enable_gqa=True))
            emit(b, s, "flex", ms)
            del q, k, v
        except Exception as e:
            note(f"paged_b{b}_s{s} flex: {type(e).__name__}: {str(e)[:160]}")
        torch.cuda.empty_cache()
    try:
        from torch.nn.attention.experimental._paged_attention import PagedAttention
    except Exception as e:
        note(f"flex-paged unavailable: {type(e).__name__}: {str(e)[:160]}")
        return
    for b, s in order:
        for p in PAGES:
            name = f"paged_b{b}_s{s}_p{p}_full"
            if time.time() - t0 > budget:
                note(f"{name} flex-paged: skipped (time budget {budget:.0f} s)")
                continue
            try:
                n_pages = b * s // p
                pa = PagedAttention(n_pages, p, b, device=str(dev))
                random.Random(p * s + b).shuffle(pa.empty_pages)  # scatter each sequence's pages
                for i in range(b):
                    pa.reserve(torch.tensor(i, device=dev), torch.tensor(s, device=dev))
                kc = torch.randn(1, HKV, n_pages * p, D, device=dev, dtype=torch.bfloat16)
                vc = torch.randn(1, HKV, n_pages * p, D, device=dev, dtype=torch.bfloat16)
                q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.bfloat16)
                logical = create_block_mask(lambda bi, hi, qi, ki: ki >= 0, B=b, H=None, Q_LEN=1,
                                            KV_LEN=s, BLOCK_SIZE=(128, p), device=str(dev))
                bm = pa.convert_logical_block_mask(logical)
                score_mod = pa.get_score_mod(None)
                ms = timer.time(lambda: flex(q, kc, vc, block_mask=bm, score_mod=score_mod,
                                             enable_gqa=True))
                kv_bytes = b * s * HKV * D * 2 * 2
                print("BENCH " + json.dumps(dict(
                    name=name, impl="flex-paged", b=b, s=s, hq=HQ, hkv=HKV, d=D, page=p,
                    ms=round(ms, 5), gbs=round(kv_bytes / ms / 1e6, 1), kv_bytes=kv_bytes)),
                    flush=True)
                del kc, vc, q, bm, logical, pa
            except Exception as e:
                note(f"{name} flex-paged: {type(e).__name__}: {str(e)[:160]}")
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--flex-budget", type=float, default=90.0,
                    help="seconds for the FlexAttention cases (compiles included)")
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        note("torch_decode_baseline: no CUDA device visible to torch")
        raise SystemExit(1)
    dev = torch.device("cuda")
    print(f"# torch {torch.__version__} on {torch.cuda.get_device_name()}", flush=True)
    timer = Timer(dev)
    sdpa_cases(dev, timer)
    if not args.no_flex:
        flex_cases(dev, timer, args.flex_budget)


if __name__ == "__main__":
    main()
