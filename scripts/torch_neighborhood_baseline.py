#!/usr/bin/env python3
"""FlexAttention baseline of examples/neighborhood_bench.rs (issue 13), printed as
`BENCH {json}` lines with the same names: every problem's neighborhood (NATTEN semantics,
semantics.md "Neighborhood attention": kernel size, dilation, causal and stride per dim) as a
`mask_mod` over the flattened grid plus the block mask made from it by create_block_mask, so
FlexAttention skips the fully masked blocks. TFLOP/s counts 4*d FLOPs per visible (query,
key) pair and head, like the Rust bench. bf16.
Run on the GPU machine: python3 torch_neighborhood_baseline.py [--budget SECONDS] [--quick]
"""
import argparse
import json
import time

import torch


def window(L, k, dil, causal, s, x):
    """In-group window [start, end) and group of position x (ints or tensors)."""
    g, i = x % dil, x // dil
    lg = (L - g + dil - 1) // dil
    if causal:
        start = i - k + 1
        start = torch.where(start > 0, start, 0) if torch.is_tensor(start) else max(start, 0)
        return start, i + 1, g
    left, right = k // 2, k // 2 + k % 2 - 1
    c = (i // s) * s + s // 2
    if torch.is_tensor(c):
        c = torch.minimum(c, lg - 1)
        lo = torch.where(c - left > 0, c - left, 0)
        start = torch.where(c + right >= lg, lg - k, lo)
    else:
        c = min(c, lg - 1)
        start = lg - k if c + right >= lg else max(c - left, 0)
    return start, start + k, g


def na_mask_mod(dims):
    """dims: [(L, k, dilation, causal, stride)], outermost first."""

    def mask_mod(b, h, q_idx, kv_idx):
        ok = None
        qr, kr = q_idx, kv_idx
        for (L, k, dil, causal, s) in reversed(dims):
            x, qr = qr % L, qr // L
            y, kr = kr % L, kr // L
            start, end, g = window(L, k, dil, causal, s, x)
            j = y // dil
            m = (y % dil == g) & (j >= start) & (j < end)
            ok = m if ok is None else ok & m
        return ok

    return mask_mod


def visible_pairs(dims):
    total = 1
    for (L, k, dil, causal, s) in dims:
        per = 0
        for x in range(L):
            start, end, _ = window(L, k, dil, causal, s, x)
            per += end - start
        total *= per
    return total


def problems(quick):
    out = [("na1d_32768_k2048_d128", [(32768, 2048, 1, False, 1)], 16, 128)]
    for side in ([128] if quick else [64, 128]):
        for k in (7, 13, 31):
            for d in (64, 128):
                out.append((f"na2d_{side}x{side}_k{k}_d{d}", [(side, k, 1, False, 1)] * 2,
                            2048 // d, d))
    for kt, kh in ((3, 7), (8, 16)):
        out.append((f"na3d_16x64x64_k{kt}x{kh}x{kh}_d128",
                    [(16, kt, 1, False, 1), (64, kh, 1, False, 1), (64, kh, 1, False, 1)], 16, 128))
    return out


def bench(fn):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(); fn(); end.record(); end.synchronize()
    once = start.elapsed_time(end)
    reps = max(3, min(20, int(200 / max(once, 1e-3))))
    times = []
    for _ in range(reps):
        start.record(); fn(); end.record(); end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=150.0, help="seconds before cases are skipped")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    print(f"# torch {torch.__version__} on {torch.cuda.get_device_name()}", flush=True)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as e:
        print(f"# flex unavailable: {e}")
        return
    for name, dims, h, d in problems(args.quick):
        if time.time() - t0 > args.budget:
            print(f"# {name} flex: skipped (time budget)", flush=True)
            continue
        n = 1
        for (L, *_rest) in dims:
            n *= L
        try:
            mm = na_mask_mod(dims)
            try:
                bm = create_block_mask(mm, B=None, H=None, Q_LEN=n, KV_LEN=n, device="cuda",
                                       _compile=True)
            except TypeError:  # older torch without _compile
                bm = create_block_mask(mm, B=None, H=None, Q_LEN=n, KV_LEN=n, device="cuda")
            q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)
                       for _ in range(3))
            ms = bench(lambda: flex(q, k, v, block_mask=bm))
            pairs = visible_pairs(dims)
            tflops = 4.0 * h * d * pairs / ms / 1e9
            print("BENCH " + json.dumps(dict(name=name, impl="flex", b=1, s=n, h=h, d=d,
                                             ms=round(ms, 4), tflops=round(tflops, 2))),
                  flush=True)
            del q, k, v, bm
        except Exception as e:
            print(f"# {name} flex: {type(e).__name__}: {str(e)[:160]}", flush=True)


if __name__ == "__main__":
    main()
