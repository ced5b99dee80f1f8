#!/usr/bin/env python3
"""PyTorch baselines on the shapes of examples/family_bench.rs, printed as `BENCH {json}` lines.

- padded_*: SDPA (flash, cuDNN, efficient) at head dims 64..256, 4 x 4096 tokens, full/causal;
- bsparse_*: FlexAttention with a random 128 x 128 block mask of the same density per head
  (the same density, not the same lists), 16k tokens, 16 heads, d 128; TFLOP/s over the
  visible pairs;
- pprefill_*: SDPA with a bottom-right causal mask and GQA (32/8) on the chunk shapes.
TFLOP/s counts 4*d FLOPs per visible (query, key) pair and head, like family_bench.
Run on the GPU machine: python3 torch_family_baseline.py [--budget SECONDS]
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from torch_baseline import bench, emit, visible_pairs

BACKENDS = (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
            ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
            ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION))


def note(name, impl, e):
    print(f"# {name} {impl}: {type(e).__name__}: {str(e)[:140]}", flush=True)


def padded(dev):
    s, b = 4096, 4
    for d in (64, 96, 128, 192, 256):
        h = -(-2048 // d)
        q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
        for causal in (False, True):
            name = f"padded_d{d}_s{s}_{'causal' if causal else 'full'}"
            for impl, backend in BACKENDS:
                try:
                    with sdpa_kernel(backend):
                        ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                    emit(name, impl, b, s, h, d, ms, visible_pairs(s, causal=causal))
                except Exception as e:
                    note(name, impl, e)
        del q, k, v


def chunked_prefill(dev):
    from torch.nn.attention.bias import causal_lower_right
    hq, hkv, d = 32, 8, 128
    for b, sq, sk in ((1, 2048, 16384), (2, 8192, 8192)):
        name = f"pprefill_q{sq}_ctx{sk}_b{b}"
        pairs = sum(min(sk, sk - sq + i + 1) for i in range(sq))
        q = torch.randn(b, hq, sq, d, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, sk, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
        for impl, backend in BACKENDS:
            try:
                with sdpa_kernel(backend):
                    if sq == sk:
                        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                    else:
                        bias = causal_lower_right(sq, sk)
                        kk = k.repeat_interleave(hq // hkv, dim=1)
                        vv = v.repeat_interleave(hq // hkv, dim=1)
                        fn = lambda: F.scaled_dot_product_attention(q, kk, vv, attn_mask=bias)
                    ms = bench(fn)
                emit(name, impl, b, sq, hq, d, ms, pairs)
            except Exception as e:
                note(name, impl, e)
        del q, k, v


def block_sparse(dev, deadline):
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as e:
        print(f"# flex unavailable: {e}", flush=True)
        return
    s, h, d, blk = 16384, 16, 128, 128
    nb = s // blk
    q, k, v = (torch.randn(1, h, s, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    gen = torch.Generator(device="cpu").manual_seed(7)
    for density in (0.05, 0.1, 0.25, 0.5, 1.0):
        name = f"bsparse_b128_density{round(density * 100)}_s{s}"
        if time.time() > deadline:
            print(f"# {name} flex: skipped (time budget)", flush=True)
            continue
        try:
            keep = (torch.rand(1, h, nb, nb, generator=gen) <= density).to(dev)
            counts = keep.sum(-1).to(torch.int32)
            # Listed blocks first, in key order: the full-block form (no mask_mod work).
            order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)
            bm = BlockMask.from_kv_blocks(torch.zeros_like(counts), order, counts, order,
                                          BLOCK_SIZE=blk)
            ms = bench(lambda: flex(q, k, v, block_mask=bm))
            emit(name, "flex", 1, s, h, d, ms, int(keep.sum().item()) * blk * blk / h)
        except Exception as e:
            note(name, "flex", e)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=120.0, help="seconds before FlexAttention cases are skipped")
    args = ap.parse_args()
    t0 = time.time()
    dev = torch.device("cuda")
    print(f"# torch {torch.__version__} on {torch.cuda.get_device_name()}", flush=True)
    padded(dev)
    chunked_prefill(dev)
    block_sparse(dev, t0 + args.budget)


if __name__ == "__main__":
    main()
