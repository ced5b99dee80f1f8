#!/usr/bin/env python3
"""Joins `BENCH {json}` (and `NA {json}`) lines from several logs and prints tables.

1. Dense (rows with "tflops"): TFLOP/s of each implementation per case, the ratio of the
   Hopper wgmma kernel to the mma.sync kernel, and the ratio of the faster of the two to each
   baseline (examples/gpu_bench.rs, torch_baseline.py).
2. Paged decode (rows with "gbs"): KV GB/s of longattn, its fraction of the device-to-device
   copy bandwidth measured in the same run, the ratio to the PyTorch baselines (SDPA,
   FlexAttention) over the same tokens, Quest's speedup over full decode and the selection's
   share of the Quest time (examples/paged_bench.rs, torch_decode_baseline.py).
3. The opt-in kernels of examples/family_bench.rs and torch_family_baseline.py, then MoBA
   (rows `moba_*`): end-to-end time and TFLOP/s over the pairs the selection shows, the
   gate's share, against FlexAttention's MoBA and the dense causal kernels on the same
   sequence.
4. The in-process ring (examples/ring_bench.rs).
5. Every performance target of issues 13-17 as filed, one line per case: the measured value,
   the threshold and ok / MISS, or `?` where this run has no row for it (never ok). The
   targets are defined here only (`targets_table`).
"""
import json
import re
import sys

rows = {}
order = []
# `NA {json}` lines of examples/neighborhood_bench.rs: speedups over our dense kernel on the
# same grid and the FLOP-bound ratio (dense pairs / visible pairs), per problem.
na_rows = {}
for path in sys.argv[1:]:
    try:
        lines = open(path, errors="replace").read().splitlines()
    except OSError:
        continue
    for line in lines:
        if line.startswith("NA "):
            try:
                r = json.loads(line[3:])
                na_rows[r["name"]] = r
            except (ValueError, KeyError, TypeError):
                print(f"# bad NA line in {path}: {line[:120]}")
            continue
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
    the same gpu_bench run."""
    names = [n for n in order if n.startswith("fp8_")]
    if not names:
        return
    print(f"\n{'fp8 case':<28}{'fp8 TFLOP/s':>12}{'bf16 TFLOP/s':>13}{'fp8/bf16':>10}")
    for name in names:
        r = rows[name].get("longattn-wgmma-fp8", {})
        print(f"{name:<28}{fmt(r.get('tflops'), 12, 1)}{fmt(r.get('bf16_tflops'), 13, 1)}"
              f"{fmt(r.get('ratio_bf16'), 10, 2)}")


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
          + f"{'speedup':>9}{'bound':>7}{'of it':>7}{'select':>8}")
    for name in names:
        by = rows[name]
        ours = by.get("longattn", {})
        ms = ours.get("ms")
        cells = f"{name:<32}{fmt(ms, 9, 4)}{fmt(ours.get('gbs'), 7, 0)}{fmt(ours.get('frac_of_copy'), 6, 2)}"
        for b in bases:
            other = by.get(b, {})
            ratio = other["ms"] / ms if ms and other.get("ms") else None
            cells += fmt(other.get("gbs"), 16, 0) + fmt(ratio, 13, 2)
        cells += fmt(ours.get("speedup_vs_full"), 9, 2) + fmt(ours.get("byte_bound_speedup"), 7, 1)
        pct = lambda f, w: fmt(100 * f if f is not None else None, w - 1, 0) + ("%" if f is not None else " ")
        cells += pct(ours.get("of_bound"), 7) + pct(ours.get("select_frac"), 8)
        print(cells)
    used = sorted({f"{n.split('_p')[0]}: {rows[n]['sdpa']['backend']}" for n in names
                   if "backend" in rows[n].get("sdpa", {})})
    if used:
        print("sdpa = fastest backend per shape: " + "; ".join(used))
    print("(GB/s = K+V bytes read / time; frac = of the read+write copy bandwidth; "
          "x base = base ms / longattn ms, > 1 means longattn is faster; speedup = full ms / "
          "mode ms; bound = Quest's byte-bound speedup, full K/V bytes / (page-bound bytes + "
          "selected K/V bytes), of it = speedup / bound; select = selection share of the Quest "
          "time)")


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


def moba_case(name):
    """The derived numbers of one `moba_b*` case: our end-to-end ms, the faster FlexAttention
    MoBA's ms and its ratio to ours (and to the gather attention's), the gate's share, and
    the fastest dense causal ms of the same sequence (ours, SDPA)."""
    by = rows[name]
    ours, gate = by.get("longattn-moba", {}), by.get("longattn-moba-gate", {})
    ms, g_ms = ours.get("ms"), by.get("longattn-moba-gather", {}).get("ms")
    dense = rows.get(f"moba_dense_s{name.rsplit('_s', 1)[-1]}", {})
    ours_dense = min((dense[i]["ms"] for i in ("longattn-mma", "longattn-wgmma") if i in dense),
                     default=None)
    sdpa = min((dense[i]["ms"] for i in ("sdpa-flash", "sdpa-cudnn") if i in dense), default=None)
    best_flex = min((by[i]["ms"] for i in ("flex", "flex-cbm") if "ms" in by.get(i, {})),
                    default=None)
    return dict(ms=ms, gate_frac=gate.get("gate_frac"),
                x_flex=best_flex / ms if ms and best_flex else None,
                g_x_flex=best_flex / g_ms if g_ms and best_flex else None,
                x_dense=ours_dense / ms if ms and ours_dense else None,
                x_sdpa=sdpa / ms if ms and sdpa else None)


def pct(f, width):
    return fmt(100 * f if f is not None else None, width - 1, 0) + ("%" if f is not None else " ")


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
          f"{'x dense':>8}{'x sdpa':>8}")
    for name in names:
        by = rows[name]
        c = moba_case(name)
        ours, gate = by.get("longattn-moba", {}), by.get("longattn-moba-gate", {})
        tc, gth = by.get("longattn-moba-tc-gate", {}), by.get("longattn-moba-gather", {})
        flex, fgate, cbm = by.get("flex", {}), by.get("flex-gate", {}), by.get("flex-cbm", {})
        print(f"{name:<26}{fmt(c['ms'], 9, 3)}{fmt(ours.get('tflops'), 7, 1)}"
              f"{pct(ours.get('visit_frac'), 7)}{fmt(gate.get('ms'), 9, 3)}{pct(c['gate_frac'], 6)}"
              f"{fmt(tc.get('ms'), 9, 3)}{pct(tc.get('gate_frac'), 6)}"
              f"{fmt(gth.get('ms'), 9, 3)}{fmt(gth.get('tflops'), 7, 1)}{pct(gth.get('visit_frac'), 7)}"
              f"{fmt(flex.get('ms'), 10, 3)}{fmt(flex.get('tflops'), 7, 1)}"
              f"{pct(flex.get('visit_frac'), 7)}{pct(fgate.get('gate_frac'), 6)}"
              f"{fmt(cbm.get('ms'), 10, 3)}{fmt(c['x_flex'], 8, 2)}{fmt(c['g_x_flex'], 8, 2)}"
              f"{fmt(c['x_dense'], 8, 2)}{fmt(c['x_sdpa'], 8, 2)}")
    print("(ms end to end, gating included; TF/s over the pairs the selection shows; visit = "
          "shown / computed pairs (64-row tiles, flex 128 x 128 blocks); gate = gate ms / "
          "end-to-end ms; tc = the opt-in tensor-core gate alone, its share with it in place of "
          "the CUDA-core gate; gth = the opt-in gather attention end to end "
          "(longattn-moba-gather: ms, TF/s, shown / computed pairs, 64-row work items), g xflex "
          "= faster flex ms / gather ms; x flex = faster flex ms / ours; x dense, x sdpa = "
          "fastest dense causal ms (ours, SDPA) / ours)")


def ring_fracs(name):
    """One dense call's ms over the ring's, for the running and the deferred merge."""
    r = rows[name].get("longattn-ring-inprocess", {})
    dense = r.get("dense_ms")
    return tuple(dense / r[k] if dense and r.get(k) else None for k in ("ring_ms", "deferred_ms"))


def ring_table():
    """The in-process ring (examples/ring_bench.rs): per case one dense call's ms, the ring's
    ms and its throughput as a fraction of the dense call's (running merge on a reused working
    set, deferred merge, one-shot call), pieces and transfers, the copy time, the compute
    streams' wait before their steps and the measured overlap."""
    names = [n for n in order if n.startswith("ring_")]
    if not names:
        return
    print()
    print(f"{'case':<40}{'dense ms':>9}{'ring ms':>9}{'frac':>6}{'deferred':>9}{'frac':>6}"
          f"{'oneshot':>9}{'pieces':>7}{'moved':>7}{'copy ms':>9}{'wait ms':>9}{'overlap':>8}")
    for name in names:
        r = rows[name].get("longattn-ring-inprocess", {})
        running, deferred = ring_fracs(name)
        print(f"{name:<40}{fmt(r.get('dense_ms'), 9, 3)}{fmt(r.get('ring_ms'), 9, 3)}"
              f"{fmt(running, 6, 2)}{fmt(r.get('deferred_ms'), 9, 3)}"
              f"{fmt(deferred, 6, 2)}{fmt(r.get('oneshot_ms'), 9, 3)}"
              f"{fmt(r.get('pieces'), 7, 0)}{fmt(r.get('transfers'), 7, 0)}"
              f"{fmt(r.get('step_copy_ms'), 9, 3)}{fmt(r.get('wait_ms'), 9, 3)}"
              f"{fmt(r.get('overlap'), 8, 2)}")
    print("(frac = one dense call's ms / the ring's ms over the same sequence, every rank on one "
          "GPU; ring = running merge on a reused InProcessRing, deferred = RingMerge::Deferred, "
          "oneshot = forward_gpu_in_process; copy / wait / overlap from one timed deferred run)")


def best_of(name, field="tflops", impls=None, prefix="longattn", low=False):
    """The best `field` of a row's implementations (named ones, or those whose name starts
    with `prefix`) and the implementation that has it; (None, None) without one."""
    by = rows.get(name, {})
    found = [(r[field], i) for i, r in by.items()
             if field in r and (i in impls if impls else i.startswith(prefix))]
    if not found:
        return None, None
    return (min if low else max)(found)


SDPA = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa")


def ratio(a, b):
    return a / b if a is not None and b else None


def dense_targets():
    """Issue 16 (dense prefill, round 2)."""
    out = []
    for d in (64, 128, 256):
        for s in (1024, 16384):
            for m in ("full", "causal"):
                n = f"dense_d{d}_s{s}_{m}"
                ours, impl = best_of(n)
                base, _ = best_of(n, impls=SDPA)
                out.append(("16", "dense >= 1.05x best SDPA", n, ratio(ours, base), 1.05, impl))
    ours, impl = best_of("dense_d128_s16384_full")
    out.append(("16", "d128 16k full >= 650 TFLOP/s", "dense_d128_s16384_full", ours, 650, impl))
    dense = max((best_of(f"dense_d128_s16384_{m}")[0] or 0.0 for m in ("full", "causal")),
                default=0.0) or None
    for w, need in ((1024, 0.85), (256, 0.60)):
        for s in (16384, 65536):
            n = f"window{w}_d128_s{s}"
            ours, impl = best_of(n)
            out.append(("16", f"W {w} >= {need:.0%} of dense d128 16k", n, ratio(ours, dense),
                        need, impl))
    for n in [n for n in order if n.startswith("window")]:
        ours, impl = best_of(n)
        flex, _ = best_of(n, impls=("flex",))
        out.append(("16", "windows >= 1.5x FlexAttention", n, ratio(ours, flex), 1.5, impl))
    n = "varlen64_d128_causal"
    ours, impl = best_of(n)
    base, _ = best_of(n, impls=SDPA + ("flex",))
    out.append(("16", "varlen 64 seqs >= 1.0x SDPA/Flex", n, ratio(ours, base), 1.0, impl))
    for m in ("full", "causal"):
        n = f"fp8_d128_s16384_{m}"
        r = best_of(n, field="ratio_bf16")[0]
        out.append(("16", "FP8 >= 1.5x our bf16 at d128 16k", n, r, 1.5, "longattn-wgmma-fp8"))
    return out


def paged_targets():
    """Issue 17 (paged KV, round 2): bf16 decode against SDPA and the copy bandwidth (the
    plain and the in-kernel-merge decode both count as ours), FP8 KV, Quest against its byte
    bound (the two-kernel and the v5 path), paged prefill against our dense kernel."""
    out = []
    shapes = ((1, 65536), (1, 131072), (64, 1024), (64, 8192))
    for page in (16, 64):
        for b, s in shapes:
            full = f"paged_b{b}_s{s}_p{page}_full"
            ours = [r for r in (rows.get(full, {}).get("longattn", {}),
                                rows.get(f"{full}_inmerge", {}).get("longattn", {})) if "ms" in r]
            ms = min((r["ms"] for r in ours), default=None)
            base = best_of(full, field="ms", impls=("sdpa",), low=True)[0]
            out.append(("17", "decode >= 1.0x SDPA (contiguous)", full, ratio(base, ms), 1.0, ""))
            frac = max((r["frac_of_copy"] for r in ours if "frac_of_copy" in r), default=None)
            out.append(("17", "decode >= 0.90 of copy bandwidth", full, frac, 0.90, ""))
    for page in (16, 64):
        n = f"paged_b64_s8192_p{page}_full_fp8"
        r = rows.get(n, {}).get("longattn", {}).get("speedup_vs_bf16")
        out.append(("17", "FP8 KV decode >= 1.8x bf16", n, r, 1.8, ""))
    for page in (16, 64):
        for s in (65536, 131072):
            n = f"paged_b1_s{s}_p{page}_quest"
            got = [(rows.get(m, {}).get("longattn", {}).get("of_bound"), label)
                   for m, label in ((n, "two kernels"), (f"{n}_v5", "v5 + in-kernel merge"))]
            got = [g for g in got if g[0] is not None]
            of, impl = max(got) if got else (None, "")
            out.append(("17", "Quest 2048 >= 70% of its byte bound", n, of, 0.70, impl))
    for n in [n for n in order if n.startswith("pprefill_") and "_ps" in n]:
        base, page = n.rsplit("_ps", 1)
        shape = re.match(r"pprefill_q(\d+)_ctx(\d+)_", n)
        if not shape:
            continue
        q, ctx = int(shape[1]), int(shape[2])
        if page not in ("16", "64") or not (512 <= q <= 4096 and 8192 <= ctx <= 65536):
            continue
        ours, impl = best_of(n, prefix="longattn-pprefill")
        dense, _ = best_of(base, impls=("longattn-mma", "longattn-wgmma"))
        out.append(("17", "paged prefill >= 0.90 of our dense", n, ratio(ours, dense), 0.90, impl))
    return out


def sparse_targets():
    """Issues 13 (neighborhood), 15 (block-sparse, MoBA) and 14 (ring)."""
    out = []
    for n, r in na_rows.items():
        bound = r.get("flop_bound_ratio")
        if n.startswith("na1d") or not bound or bound < 8:
            continue
        best = max(r.get("speedup_over_dense") or 0.0, r.get("hopper_speedup_over_dense") or 0.0)
        out.append(("13", "NA speedup >= 70% of the FLOP bound", n,
                    ratio(best or None, bound), 0.70, ""))
    for n in [n for n in order if n.startswith("na")]:
        ours, impl = best_of(n, prefix="longattn-na")
        flex, _ = best_of(n, impls=("flex",))
        out.append(("13", "NA >= 1.5x FlexAttention", n, ratio(ours, flex), 1.5, impl))
    dense, _ = best_of("bsparse_dense_s16384", impls=("longattn-mma", "longattn-wgmma"))
    for n in [n for n in order if n.startswith("bsparse_b128_density")]:
        density = int(n.split("density")[1].split("_")[0])
        ours, impl = best_of(n, prefix="longattn-bsparse")
        if density >= 10:
            out.append(("15", "block-sparse >= 85% of dense", n, ratio(ours, dense), 0.85, impl))
        flex, _ = best_of(n, impls=("flex",))
        out.append(("15", "block-sparse >= 1.5x FlexAttention", n, ratio(ours, flex), 1.5, impl))
    for n in [n for n in order if n.startswith("moba_b") and n.endswith("_s131072")]:
        c = moba_case(n)
        out.append(("15", "MoBA >= 1.5x FlexAttention's MoBA", n, c["x_flex"], 1.5, ""))
        out.append(("15", "MoBA gate <= 10% of end to end", n, c["gate_frac"], -0.10, ""))
    for n in ("ring_causal_zigzag_s65536_w8", "ring_window4096_contiguous_s131072_w8"):
        fracs = [f for f in ring_fracs(n) if f is not None] if n in rows else []
        out.append(("14", "ring >= 90% of one dense call", n, max(fracs, default=None), 0.90, ""))
    return out


def targets_table():
    """Every target of issues 13-17 (as filed) that a bench row measures: `ok` when the
    measured value reaches the threshold (a negative threshold `-t` is an upper bound `t`),
    `MISS` when not, `?` when this run has no row."""
    lines = dense_targets() + paged_targets() + sparse_targets()
    print(f"\n{'issue':<6}{'target':<38}{'case':<40}{'measured':>9}{'need':>7}  verdict")
    counts = {"ok": 0, "MISS": 0, "?": 0}
    for issue, what, case, got, need, impl in lines:
        ok = got is not None and (got <= -need if need < 0 else got >= need)
        verdict = "?" if got is None else ("ok" if ok else "MISS")
        counts[verdict] += 1
        bound = f"<={-need:g}" if need < 0 else f"{need:g}"
        print(f"{issue:<6}{what:<38}{case:<40}{fmt(got, 9, 2)}{bound:>7}  {verdict}"
              + (f" ({impl})" if impl and got is not None else ""))
    print(f"(targets: {counts['ok']} ok, {counts['MISS']} missed, {counts['?']} without a row "
          "in this run; measured = ratio or TFLOP/s as the target states, best of our kernels "
          "named in parentheses)")


dense_table()
fp8_table()
paged_table()
family_table()
moba_table()
ring_table()
targets_table()
