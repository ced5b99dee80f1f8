#!/usr/bin/env python3
"""Joins `BENCH {json}` lines from several logs and prints one table: TFLOP/s of each
implementation per case and the ratio of longattn's tensor-core kernel to each baseline."""
import json
import sys

rows = {}
for path in sys.argv[1:]:
    try:
        for line in open(path):
            if line.startswith("BENCH "):
                r = json.loads(line[6:])
                rows.setdefault(r["name"], {})[r["impl"]] = r
    except FileNotFoundError:
        pass
impls = ["longattn-mma", "longattn-simt", "sdpa-flash", "sdpa-cudnn", "flex"]
print(f"{'case':<28}" + "".join(f"{i:>15}" for i in impls) + f"{'mma/flash':>11}{'mma/cudnn':>11}{'mma/flex':>10}")
for name, by in rows.items():
    cells = "".join(f"{by[i]['tflops']:>15.1f}" if i in by else f"{'-':>15}" for i in impls)
    ours = by.get("longattn-mma", {}).get("tflops")
    ratios = ""
    for base, width in (("sdpa-flash", 11), ("sdpa-cudnn", 11), ("flex", 10)):
        other = by.get(base, {}).get("tflops")
        ratios += f"{ours / other:>{width}.2f}" if ours and other else f"{'-':>{width}}"
    print(f"{name:<28}{cells}{ratios}")
print("(TFLOP/s over visible pairs, bf16; ratios = longattn-mma / baseline, same run)")
