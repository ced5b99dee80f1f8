#!/usr/bin/env python3
"""PyTorch baselines on the shapes of examples/family_bench.rs, printed as `BENCH {json}` lines.

- padded_*: SDPA (flash, cuDNN, efficient) at head dims 64..256, 4 x 4096 tokens, full/causal;
- bsparse_*: FlexAttention with a random 128 x 128 block mask of the same density per head
  (the same density, not the same lists), 16k tokens, 16 heads, d 128; TFLOP/s over the
  visible pairs;
- pprefill_*: SDPA with a bottom-right causal mask and GQA (32/8) on the chunk shapes;
- moba_*: MoBA (causal, GQA 32/8, d 128, 32k and 128k tokens, blocks of 512 and 4096 keys
  top-3, 128 top-8 at 32k) with the gate in torch (`moba_select`: f32 mean-pooled keys, f32
  scores, top-(k-1) of the earlier blocks plus the own block, docs/semantics.md "MoBA
  selection") and FlexAttention over that selection: `flex` builds the BlockMask straight
  from the selection (`moba_block_mask`, full blocks where all 128 rows of a query block
  select a key block below the diagonal), `flex-cbm` through `create_block_mask` (32k only);
  each timed end to end (gate + attention) and the gate alone (`flex-gate`, `gate_frac`);
  `moba_dense_s*`: SDPA causal with GQA on the same sequence. TFLOP/s over the pairs the
  selection shows (`moba_pairs`, the count family_bench makes from its own selection).
TFLOP/s counts 4*d FLOPs per visible (query, key) pair and head, like family_bench.
Run on the GPU machine: python3 torch_family_baseline.py [--budget SECONDS]
"""
import argparse
import json
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


def moba_select(q, k, bn, top_k, out):
    """MoBA's per-token selection into `out` [b, hq, s, nb] bool (in place, so that a
    compiled mask_mod reading it sees one tensor): q [b, hq, s, d], k [b, hkv, s, d], s a
    multiple of bn, causal (position p = i). Key block kb is scored by q . mean(k[kb]) in f32
    (no scale); a row keeps its own block p // bn and the top_k - 1 best blocks before it (all
    when fewer). NaN scores rank as -inf; exact ties follow torch.topk (unspecified; the
    crate's rule is the lower block index), which random bf16 inputs do not produce."""
    b, hq, s, d = q.shape
    hkv, nb = k.shape[1], s // bn
    pooled = k.float().view(b, hkv, nb, bn, d).mean(3).repeat_interleave(hq // hkv, dim=1)
    scores = torch.matmul(q.float(), pooled.transpose(-1, -2))  # [b, hq, s, nb]
    scores = torch.nan_to_num(scores, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    own = torch.arange(s, device=q.device) // bn
    later = torch.arange(nb, device=q.device)[None, :] >= own[:, None]  # [s, nb]
    scores.masked_fill_(later, float("-inf"))
    out.zero_()
    if top_k > 1 and nb > 1:
        idx = scores.topk(min(top_k - 1, nb), dim=-1).indices
        out.scatter_(-1, idx, idx < own[:, None])  # drop the -inf fill of short rows
    out[:, :, torch.arange(s, device=q.device), own] = True
    return out


def moba_block_mask(sel, bn, mask_mod, blk=128):
    """FlexAttention's BlockMask (blk x blk) of a selection [b, h, s, nb]: key block kj is
    listed for query block qi when kj <= qi and some row of qi selects kj's MoBA block; full
    (no mask_mod) when kj < qi and every row selects it, else partial."""
    from torch.nn.attention.flex_attention import BlockMask
    b, h, s, nb = sel.shape
    nq, r = s // blk, bn // blk
    rows = sel.view(b, h, nq, blk, nb)
    some = rows.any(3).repeat_interleave(r, dim=-1)  # [b, h, nq, nq]
    every = rows.all(3).repeat_interleave(r, dim=-1)
    i = torch.arange(nq, device=sel.device)
    full = every & (i[None, :] < i[:, None])
    partial = some & (i[None, :] <= i[:, None]) & ~full

    def lists(m):
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return m.sum(-1, dtype=torch.int32), order

    (pn, pi), (fn, fi) = lists(partial), lists(full)
    return BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=blk, mask_mod=mask_mod)


def moba_pairs(sel, bn):
    """Pairs the selection shows, all heads: a row at position p sees its own block up to p
    (p % bn + 1 keys) and every key of its other selected blocks (all before its own)."""
    s = sel.shape[2]
    per_row = sel.sum(-1, dtype=torch.int64)  # [b, h, s]
    p = torch.arange(s, device=sel.device)
    return int(((per_row - 1) * bn + p % bn + 1).sum().item())


def emit_extra(name, impl, b, s, h, d, ms, **extra):
    print("BENCH " + json.dumps(dict(name=name, impl=impl, b=b, s=s, h=h, d=d, ms=round(ms, 4),
                                     **extra)), flush=True)


def moba(dev, deadline):
    hq, hkv, d = 32, 8, 128
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as e:
        print(f"# flex unavailable: {e}", flush=True)
        flex = None
    for s in (32768, 131072):
        q = torch.randn(1, hq, s, d, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(1, hkv, s, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
        configs = ((128, 8), (512, 3), (4096, 3)) if s == 32768 else ((512, 3), (4096, 3))
        for bn, top_k in configs:
            name = f"moba_b{bn}_top{top_k}_s{s}"
            if flex is None:
                print(f"# {name} flex: skipped (FlexAttention unavailable)", flush=True)
                continue
            if time.time() > deadline:
                print(f"# {name} flex: skipped (time budget)", flush=True)
                continue
            try:
                sel = torch.zeros(1, hq, s, s // bn, device=dev, dtype=torch.bool)

                def mask_mod(b, h, q_idx, kv_idx):
                    return (kv_idx <= q_idx) & sel[b, h, q_idx, kv_idx // bn]

                def gate():
                    return moba_block_mask(moba_select(q, k, bn, top_k, sel), bn, mask_mod)

                def e2e():
                    return flex(q, k, v, block_mask=gate(), enable_gqa=True)

                ms = bench(e2e)
                bm = gate()
                shown = moba_pairs(sel, bn)
                computed = int((bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()).item()) * 128 * 128
                emit_extra(name, "flex", 1, s, hq, d, ms,
                           tflops=round(4.0 * d * shown / ms / 1e9, 2),
                           visit_frac=round(shown / max(computed, 1), 4))
                gate_ms = bench(gate)
                emit_extra(name, "flex-gate", 1, s, hq, d, gate_ms, gate_frac=round(gate_ms / ms, 4))
                del bm
                if s == 32768 and time.time() <= deadline:
                    def e2e_cbm():
                        moba_select(q, k, bn, top_k, sel)
                        bm = create_block_mask(mask_mod, 1, hq, s, s, device=dev, BLOCK_SIZE=128,
                                               _compile=True)
                        return flex(q, k, v, block_mask=bm, enable_gqa=True)

                    ms = bench(e2e_cbm)
                    emit(name, "flex-cbm", 1, s, hq, d, ms, shown / hq)
                del sel
            except Exception as e:
                note(name, "flex", e)
            torch.cuda.empty_cache()
        name = f"moba_dense_s{s}"
        for impl, backend in BACKENDS[:2]:
            try:
                with sdpa_kernel(backend):
                    ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                      enable_gqa=True))
                emit(name, impl, 1, s, hq, d, ms, visible_pairs(s, causal=True))
            except Exception as e:
                note(name, impl, e)
        del q, k, v
        torch.cuda.empty_cache()


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
    moba(dev, t0 + args.budget)


if __name__ == "__main__":
    main()
