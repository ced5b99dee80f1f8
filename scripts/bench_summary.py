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
"""
import json
import sys

# Performance targets for paged decode.
FULL_FRAC_TARGET = 0.85  # full decode at batch 1 x 64k and batch 64 x 8k
QUEST_SPEEDUP_TARGET = 6.0  # Quest top-2048 at 64k and 128k, vs full decode
SELECT_FRAC_TARGET = 0.15  # selection share of the Quest decode time

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
    names = [n for n in order if any("tflops" in r for r in rows[n].values())]
    if not names:
        return
    impls = ["longattn-wgmma", "longattn-mma", "longattn-mma-gqa", "longattn-wgmma-window",
             "longattn-simt", "sdpa-flash", "sdpa-cudnn", "flex"]
    ours_impls = ("longattn-wgmma", "longattn-mma", "longattn-mma-gqa", "longattn-wgmma-window")
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
    print(f"\n{'window case':<28}{'wgmma':>10}{'wgmma-window':>14}  (% of dense d128 16k, "
          f"{dense:.1f} TFLOP/s)")
    for name in wins:
        by = rows[name]
        cells = ""
        for impl, width in (("longattn-wgmma", 10), ("longattn-wgmma-window", 14)):
            t = by.get(impl, {}).get("tflops")
            cells += fmt(100.0 * t / dense if t else None, width, 1)
        print(f"{name:<28}{cells}")


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


dense_table()
paged_table()
family_table()
