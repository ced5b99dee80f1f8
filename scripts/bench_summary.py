#!/usr/bin/env python3
"""Joins `BENCH {json}` lines from several logs and prints two tables.

1. Dense (rows with "tflops"): TFLOP/s of each implementation per case, the ratio of the
   Hopper wgmma kernel to the mma.sync kernel, and the ratio of the faster of the two to each
   baseline (examples/gpu_bench.rs, torch_baseline.py).
2. Paged decode (rows with "gbs"): KV GB/s of longattn, its fraction of the device-to-device
   copy bandwidth measured in the same run, the ratio to the PyTorch baselines (SDPA,
   FlexAttention) over the same tokens, Quest's speedup over full decode and the selection's
   share of the Quest time, and the performance targets (examples/paged_bench.rs,
   torch_decode_baseline.py).
3. The opt-in kernels of examples/family_bench.rs and torch_family_baseline.py, then MoBA
   (rows `moba_*`): end-to-end time and TFLOP/s over the pairs the selection shows, the
   gate's share, against FlexAttention's MoBA and the dense causal kernels on the same
   sequence, and the issue-15 targets.
"""
import json
import sys

# Performance targets for paged decode.
FULL_FRAC_TARGET = 0.85  # full decode at batch 1 x 64k and batch 64 x 8k
QUEST_SPEEDUP_TARGET = 6.0  # Quest top-2048 at 64k and 128k, vs full decode
SELECT_FRAC_TARGET = 0.15  # selection share of the Quest decode time
# MoBA targets (issue 15), at 128k tokens.
MOBA_VS_FLEX_TARGET = 1.5  # end to end, gating included, vs FlexAttention's MoBA
MOBA_GATE_FRAC_TARGET = 0.10  # gating share of MoBA's end-to-end time

rows = {}
order = []
for path in sys.argv[1:]:
    try:
        lines = open(path, errors="replace").read().splitlines()
    except OSError:
        continue
    for line in lines:
        if not line.startswith("BENCH "):
            continue
        try:
            r = json.loads(line[6:])
            name, impl = r["name"], r["impl"]
        except (ValueError, KeyError, TypeError):
            print(f"# bad BENCH line in {path}: {line[:120]}")
            continue
        if name not in rows:
            order.append(name)
        rows.setdefault(name, {})[impl] = r


def fmt(x, width, prec):
    return f"{x:>{width}.{prec}f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def dense_table():
    names = [n for n in order if any("tflops" in r for r in rows[n].values())
             and not n.startswith(("moba_", "fp8_"))]  # MoBA and FP8 have tables of their own
    if not names:
        return
    impls = ["longattn-wgmma", "longattn-mma", "longattn-mma-gqa", "longattn-wgmma-window",
             "longattn-wgmma-persistent", "longattn-wgmma-wide", "longattn-simt", "sdpa-flash",
             "sdpa-cudnn", "flex"]
    ours_impls = ("longattn-wgmma", "longattn-mma", "longattn-mma-gqa", "longattn-wgmma-window",
                  "longattn-wgmma-persistent", "longattn-wgmma-wide")
    widths = [max(15, len(i) + 1) for i in impls]
    print(f"{'case':<28}" + "".join(f"{i:>{w}}" for i, w in zip(impls, widths))
          + f"{'wgmma/mma':>11}{'best/flash':>11}{'best/cudnn':>11}{'best/flex':>10}")
    for name in names:
        by = rows[name]
        cells = "".join(fmt(by.get(i, {}).get("tflops"), w, 1) for i, w in zip(impls, widths))
        wg = by.get("longattn-wgmma", {}).get("tflops")
        mma = by.get("longattn-mma", {}).get("tflops")
        ratios = fmt(wg / mma if wg and mma else None, 11, 2)
        ours = max((by.get(i, {}).get("tflops") or 0.0 for i in ours_impls), default=0.0) or None
        for base, width in (("sdpa-flash", 11), ("sdpa-cudnn", 11), ("flex", 10)):
            other = by.get(base, {}).get("tflops")
            ratios += fmt(ours / other if ours and other else None, width, 2)
        print(f"{name:<28}{cells}{ratios}")
    print("(TFLOP/s over visible pairs, bf16; best = the fastest longattn kernel; "
          "ratios = best / baseline, same run)")
    window_fractions()


def window_fractions():
    """Sliding-window rows as a fraction of dense d128 16k (the faster of full and causal on
    the Hopper kernel), for the Hopper kernel and the window kernel: the targets are W 1k
    >= 85% and W 256 >= 60%."""
    dense = max((rows.get(f"dense_d128_s16384_{m}", {}).get("longattn-wgmma", {}).get("tflops")
                 or 0.0 for m in ("full", "causal")), default=0.0)
    wins = [n for n in order if n.startswith("window")]
    if not dense or not wins:
        return
    print(f"\n{'window case':<28}{'wgmma':>10}{'wgmma-window':>14}{'wgmma-persistent':>18}"
          f"  (% of dense d128 16k, {dense:.1f} TFLOP/s)")
    for name in wins:
        by = rows[name]
        cells = ""
        for impl, width in (("longattn-wgmma", 10), ("longattn-wgmma-window", 14),
                            ("longattn-wgmma-persistent", 18)):
            t = by.get(impl, {}).get("tflops")
            cells += fmt(100.0 * t / dense if t else None, width, 1)
        print(f"{name:<28}{cells}")


def fp8_table():
    """FP8 (e4m3) forward rows against our bf16 Hopper kernel on the same problem, measured in
    the same gpu_bench run (issue 16 target: >= 1.5x at d128 16k; d64 and d256 unmarked)."""
    names = [n for n in order if n.startswith("fp8_")]
    if not names:
        return
    print(f"\n{'fp8 case':<28}{'fp8 TFLOP/s':>12}{'bf16 TFLOP/s':>13}{'fp8/bf16':>10}  target")
    for name in names:
        r = rows[name].get("longattn-wgmma-fp8", {})
        ratio = r.get("ratio_bf16")
        mark = ""
        if "d128_s16384" in name and ratio is not None:
            mark = "ok >=1.5x" if ratio >= 1.5 else "MISS >=1.5x"
        print(f"{name:<28}{fmt(r.get('tflops'), 12, 1)}{fmt(r.get('bf16_tflops'), 13, 1)}"
              f"{fmt(ratio, 10, 2)}  {mark}")


def target(r):
    """The target check for a longattn paged row, or ''."""
    name, b, s = r.get("name", ""), r.get("b"), r.get("s")
    if name.endswith("_full") and (b, s) in ((1, 65536), (64, 8192)):
        frac = r.get("frac_of_copy")
        if frac is None:
            return "?"
        return ("ok" if frac >= FULL_FRAC_TARGET else "MISS") + f" frac>={FULL_FRAC_TARGET}"
    if name.endswith("_quest") and b == 1 and s in (65536, 131072):
        sp, sel = r.get("speedup_vs_full"), r.get("select_frac")
        if sp is None or sel is None:
            return "?"
        ok = sp >= QUEST_SPEEDUP_TARGET and sel <= SELECT_FRAC_TARGET
        return ("ok" if ok else "MISS") + f" x>={QUEST_SPEEDUP_TARGET:g},sel<={SELECT_FRAC_TARGET}"
    return ""


def paged_table():
    names = [n for n in order if any("gbs" in r for r in rows[n].values())]
    copies = [r for n in order for r in rows[n].values() if "copy_gbs" in r and "gbs" not in r]
    if not names and not copies:
        return
    print()
    for c in copies:
        print(f"device copy ({c['name']}): {c['copy_gbs']:.0f} GB/s read+write "
              f"(the ceiling for KV reads), {c.get('copy_oneway_gbs', float('nan')):.0f} GB/s one-way")
    bases = ["sdpa", "flex", "flex-paged"]
    print(f"{'case':<32}{'ms':>9}{'GB/s':>7}{'frac':>6}"
          + "".join(f"{b + ' GB/s':>16}{'x ' + b:>13}" for b in bases)
          + f"{'speedup':>9}{'select':>8}  target")
    misses = 0
    for name in names:
        by = rows[name]
        ours = by.get("longattn", {})
        ms = ours.get("ms")
        cells = f"{name:<32}{fmt(ms, 9, 4)}{fmt(ours.get('gbs'), 7, 0)}{fmt(ours.get('frac_of_copy'), 6, 2)}"
        for b in bases:
            other = by.get(b, {})
            ratio = other["ms"] / ms if ms and other.get("ms") else None
            cells += fmt(other.get("gbs"), 16, 0) + fmt(ratio, 13, 2)
        cells += fmt(ours.get("speedup_vs_full"), 9, 2)
        sel = ours.get("select_frac")
        cells += fmt(100 * sel if sel is not None else None, 7, 0) + ("%" if sel is not None else " ")
        t = target(ours) if ours else ""
        misses += t.startswith("MISS")
        print(f"{cells}  {t}")
    expected = [f"paged_b{b}_s{s}_p{p}_{m}" for p in (16, 64)
                for (b, s, m) in ((1, 65536, "full"), (64, 8192, "full"),
                                  (1, 65536, "quest"), (1, 131072, "quest"))]
    missing = [n for n in expected if "longattn" not in rows.get(n, {})]
    if names and missing:
        print("no longattn result for target case(s): " + ", ".join(missing))
    used = sorted({f"{n.split('_p')[0]}: {rows[n]['sdpa']['backend']}" for n in names
                   if "backend" in rows[n].get("sdpa", {})})
    if used:
        print("sdpa = fastest backend per shape: " + "; ".join(used))
    print("(GB/s = K+V bytes read / time; frac = of the read+write copy bandwidth; "
          "x base = base ms / longattn ms, > 1 means longattn is faster; speedup = full ms / "
          f"mode ms; select = selection share of the Quest time; {misses} target(s) missed)")


def family_table():
    """The opt-in kernels of examples/family_bench.rs and torch_family_baseline.py: every
    implementation of each case, and ours over the best PyTorch one."""
    prefixes = ("padded_", "bsparse_", "pprefill_")
    names = [n for n in order if n.startswith(prefixes)]
    if not names:
        return
    print()
    for name in names:
        by = rows[name]
        cells = "  ".join(f"{i}={by[i]['tflops']:.1f}" for i in by if "tflops" in by[i])
        ours = max((r["tflops"] for i, r in by.items() if i.startswith("longattn")), default=None)
        theirs = max((r["tflops"] for i, r in by.items()
                      if not i.startswith("longattn") and "tflops" in r), default=None)
        ratio = f"  best ours/torch={ours / theirs:.2f}" if ours and theirs else ""
        print(f"{name:<40}{cells}{ratio}")
    print("(TFLOP/s over visible pairs, bf16, same run; bsparse torch = FlexAttention on a "
          "random mask of the same density)")


def moba_table():
    """MoBA end to end (family_bench group `moba`, torch_family_baseline.py `moba`): per case
    our time, TFLOP/s over the shown pairs and the share of the kernel's computed pairs that
    are shown, the gate's ms and share; FlexAttention's MoBA likewise (flex: BlockMask built
    from the selection; flex-cbm: through create_block_mask), the ratio flex ms / ours (the
    faster flex), and the speedup over the fastest dense causal kernel of the same run
    (moba_dense_s*, ours and SDPA)."""
    names = [n for n in order if n.startswith("moba_b")]
    if not names:
        return
    print()
    print(f"{'case':<26}{'ms':>9}{'TF/s':>7}{'visit':>7}{'gate ms':>9}{'gate':>6}"
          f"{'tc gate':>9}{'tc':>6}{'gth ms':>9}{'TF/s':>7}{'visit':>7}"
          f"{'flex ms':>10}{'TF/s':>7}{'visit':>7}{'gate':>6}{'cbm ms':>10}{'x flex':>8}{'g xflex':>8}"
          f"{'x dense':>8}{'x sdpa':>8}  target")
    misses = 0
    for name in names:
        by = rows[name]
        ours, gate = by.get("longattn-moba", {}), by.get("longattn-moba-gate", {})
        tc = by.get("longattn-moba-tc-gate", {})
        gth = by.get("longattn-moba-gather", {})
        flex, fgate, cbm = by.get("flex", {}), by.get("flex-gate", {}), by.get("flex-cbm", {})
        ms = ours.get("ms")
        dense = rows.get(f"moba_dense_s{name.rsplit('_s', 1)[-1]}", {})
        ours_dense = min((dense[i]["ms"] for i in ("longattn-mma", "longattn-wgmma")
                          if i in dense), default=None)
        sdpa = min((dense[i]["ms"] for i in ("sdpa-flash", "sdpa-cudnn") if i in dense),
                   default=None)
        best_flex = min((r["ms"] for r in (flex, cbm) if "ms" in r), default=None)
        x_flex = best_flex / ms if ms and best_flex else None
        g_ms = gth.get("ms")
        g_x_flex = best_flex / g_ms if g_ms and best_flex else None
        frac = gate.get("gate_frac")
        pct = lambda f, w: fmt(100 * f if f is not None else None, w - 1, 0) + ("%" if f is not None else " ")
        cells = (f"{name:<26}{fmt(ms, 9, 3)}{fmt(ours.get('tflops'), 7, 1)}"
                 f"{pct(ours.get('visit_frac'), 7)}{fmt(gate.get('ms'), 9, 3)}{pct(frac, 6)}"
                 f"{fmt(tc.get('ms'), 9, 3)}{pct(tc.get('gate_frac'), 6)}"
                 f"{fmt(g_ms, 9, 3)}{fmt(gth.get('tflops'), 7, 1)}{pct(gth.get('visit_frac'), 7)}"
                 f"{fmt(flex.get('ms'), 10, 3)}{fmt(flex.get('tflops'), 7, 1)}"
                 f"{pct(flex.get('visit_frac'), 7)}{pct(fgate.get('gate_frac'), 6)}"
                 f"{fmt(cbm.get('ms'), 10, 3)}{fmt(x_flex, 8, 2)}{fmt(g_x_flex, 8, 2)}"
                 f"{fmt(ours_dense / ms if ms and ours_dense else None, 8, 2)}"
                 f"{fmt(sdpa / ms if ms and sdpa else None, 8, 2)}")
        t = ""
        if name.endswith("_s131072") and ms:
            if x_flex is None or frac is None:
                t = "?"
            else:
                ok = x_flex >= MOBA_VS_FLEX_TARGET and frac <= MOBA_GATE_FRAC_TARGET
                t = ("ok" if ok else "MISS") + f" x>={MOBA_VS_FLEX_TARGET:g},gate<={MOBA_GATE_FRAC_TARGET}"
                misses += not ok
        print(f"{cells}  {t}")
    print("(ms end to end, gating included; TF/s over the pairs the selection shows; visit = "
          "shown / computed pairs (64-row tiles, flex 128 x 128 blocks); gate = gate ms / "
          "end-to-end ms; tc = the opt-in tensor-core gate alone, its share with it in place of "
          "the CUDA-core gate (the target uses the default gate); gth = the opt-in gather attention "
          "end to end (longattn-moba-gather: ms, TF/s, shown / computed pairs, 64-row work "
          "items), g xflex = faster flex ms / gather ms; x flex = faster flex ms / ours; x dense, x sdpa = fastest dense "
          f"causal ms (ours, SDPA) / ours; {misses} target(s) missed)")


# Ring targets (issue 14): >= 90% of one dense call's throughput over the same sequence for
# 8 ranks, causal zigzag at 64k and the 4k window at 128k (16k per rank).
RING_FRAC_TARGET = 0.90
RING_TARGETS = ("ring_causal_zigzag_s65536_w8", "ring_window4096_contiguous_s131072_w8")


def ring_table():
    """The in-process ring (examples/ring_bench.rs): per case one dense call's ms, the ring's
    ms and its throughput as a fraction of the dense call's (running merge on a reused working
    set, deferred merge, one-shot call), pieces and transfers, the copy time, the compute
    streams' wait before their steps and the measured overlap, and the issue's targets."""
    names = [n for n in order if n.startswith("ring_")]
    if not names:
        return
    print()
    print(f"{'case':<40}{'dense ms':>9}{'ring ms':>9}{'frac':>6}{'deferred':>9}{'frac':>6}"
          f"{'oneshot':>9}{'pieces':>7}{'moved':>7}{'copy ms':>9}{'wait ms':>9}{'overlap':>8}"
          "  target")
    misses = 0
    for name in names:
        r = rows[name].get("longattn-ring-inprocess", {})
        dense = r.get("dense_ms")
        frac = lambda k: dense / r[k] if dense and r.get(k) else None
        best = max((f for f in (frac("ring_ms"), frac("deferred_ms")) if f is not None),
                   default=None)
        t = ""
        if name in RING_TARGETS:
            if best is None:
                t = "?"
            else:
                ok = best >= RING_FRAC_TARGET
                t = ("ok" if ok else "MISS") + f" frac>={RING_FRAC_TARGET}"
                misses += not ok
        print(f"{name:<40}{fmt(dense, 9, 3)}{fmt(r.get('ring_ms'), 9, 3)}"
              f"{fmt(frac('ring_ms'), 6, 2)}{fmt(r.get('deferred_ms'), 9, 3)}"
              f"{fmt(frac('deferred_ms'), 6, 2)}{fmt(r.get('oneshot_ms'), 9, 3)}"
              f"{fmt(r.get('pieces'), 7, 0)}{fmt(r.get('transfers'), 7, 0)}"
              f"{fmt(r.get('step_copy_ms'), 9, 3)}{fmt(r.get('wait_ms'), 9, 3)}"
              f"{fmt(r.get('overlap'), 8, 2)}  {t}")
    print("(frac = one dense call's ms / the ring's ms over the same sequence, every rank on one "
          "GPU; ring = running merge on a reused InProcessRing, deferred = RingMerge::Deferred, "
          "oneshot = forward_gpu_in_process; copy / wait / overlap from one timed deferred run; "
          f"targets use the faster merge; {misses} target(s) missed)")


dense_table()
fp8_table()
paged_table()
family_table()
moba_table()
ring_table()
