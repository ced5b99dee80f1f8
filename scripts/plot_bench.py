#!/usr/bin/env python3
"""Bar charts (SVG, Python stdlib only) of longattn vs the PyTorch baselines.

Reads the tables that scripts/bench_summary.py prints (OUT/summary.log of a device run) or a
CSV written by this script, and writes:
  dense_tflops.svg   TFLOP/s over visible pairs: longattn (best kernel) vs SDPA flash, SDPA
                     cuDNN, FlexAttention, per dense/window case
  decode_gbps.svg    paged decode GB/s (K+V bytes read / time), full decode: longattn vs
                     SDPA (fastest backend, contiguous K/V), FlexAttention, Flex paged; the
                     device copy bandwidth as a line
Usage:
  plot_bench.py SUMMARY_LOG OUT_DIR [--csv OUT.csv]   parse a summary, plot, optionally export
  plot_bench.py --from-csv IN.csv OUT_DIR             plot a CSV (columns: table,case,series,value)
"""
import csv
import html
import os
import re
import sys

DENSE_SERIES = [("longattn", "#1f77b4"), ("sdpa-flash", "#ff7f0e"),
                ("sdpa-cudnn", "#2ca02c"), ("flex", "#9467bd")]
DECODE_SERIES = [("longattn", "#1f77b4"), ("sdpa", "#2ca02c"), ("flex", "#9467bd"),
                 ("flex-paged", "#8c564b")]


def num(s):
    try:
        return float(s)
    except ValueError:
        return None


def parse_summary(text):
    """Returns rows (table, case, series, value) from bench_summary.py's tables."""
    rows, header, copy_bw = [], None, None
    for line in text.splitlines():
        m = re.search(r"copy\(\S*\):\s*([\d.]+)\s*GB/s read\+write", line)
        if m:
            copy_bw = float(m.group(1))
        if line.startswith("case "):
            header = re.split(r"\s{2,}|\s(?=x |flex-paged)", line.strip())
            header = [h.strip() for h in header]
            # "x sdpa", "flex GB/s" etc. are multi-word: whitespace runs of 2+ separate them.
            continue
        if header is None or not line.strip() or line.startswith(("(", "sdpa =", "#")):
            if line.startswith("("):
                header = None
            continue
        cells = line.split()
        case = cells[0]
        if header[1:2] == ["longattn-wgmma"] or "longattn-mma" in header:
            vals = dict(zip(header[1:], cells[1:]))
            best = max(filter(None, (num(vals.get(k, "-")) for k in
                                     ("longattn-wgmma", "longattn-mma"))), default=None)
            if best is not None:
                rows.append(("dense", case, "longattn", best))
            for s in ("sdpa-flash", "sdpa-cudnn", "flex"):
                v = num(vals.get(s, "-"))
                if v is not None:
                    rows.append(("dense", case, s, v))
        elif "GB/s" in header and case.endswith("_full"):
            vals = dict(zip(header[1:], cells[1:]))
            for key, s in (("GB/s", "longattn"), ("sdpa GB/s", "sdpa"),
                           ("flex GB/s", "flex"), ("flex-paged GB/s", "flex-paged")):
                v = num(vals.get(key, "-"))
                if v is not None:
                    rows.append(("decode", case, s, v))
    if copy_bw is not None:
        rows.append(("decode", "device_copy", "copy", copy_bw))
    return rows


def bar_chart(path, title, unit, rows, series, ref_line=None):
    cases = []
    for _, case, _, _ in rows:
        if case not in cases and case != "device_copy":
            cases.append(case)
    values = {(c, s): v for _, c, s, v in rows}
    vmax = max([v for (c, s), v in values.items() if c != "device_copy"] + [ref_line or 0])
    vmax = vmax * 1.1 if vmax > 0 else 1.0
    left, top, plot_h, group_w, bar_w = 70, 50, 320, 16 * len(series) + 14, 16
    width = left + group_w * len(cases) + 160
    height = top + plot_h + 190
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="24" font-size="15">{html.escape(title)}</text>']
    y = lambda v: top + plot_h - v / vmax * plot_h
    for i in range(6):
        v = vmax / 1.1 * i / 5
        out.append(f'<line x1="{left}" x2="{left + group_w * len(cases)}" y1="{y(v):.1f}" '
                   f'y2="{y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
    out.append(f'<text x="16" y="{top + plot_h / 2}" transform="rotate(-90 16 {top + plot_h / 2})" '
               f'text-anchor="middle">{html.escape(unit)}</text>')
    for gi, case in enumerate(cases):
        x0 = left + gi * group_w + 7
        for si, (s, color) in enumerate(series):
            v = values.get((case, s))
            if v is None:
                continue
            x = x0 + si * bar_w
            out.append(f'<rect x="{x}" y="{y(v):.1f}" width="{bar_w - 2}" '
                       f'height="{top + plot_h - y(v):.1f}" fill="{color}">'
                       f'<title>{html.escape(case)} {s}: {v:g} {html.escape(unit)}</title></rect>')
        cx = x0 + len(series) * bar_w / 2
        out.append(f'<text x="{cx}" y="{top + plot_h + 10}" text-anchor="end" '
                   f'transform="rotate(-50 {cx} {top + plot_h + 10})">{html.escape(case)}</text>')
    if ref_line:
        out.append(f'<line x1="{left}" x2="{left + group_w * len(cases)}" y1="{y(ref_line):.1f}" '
                   f'y2="{y(ref_line):.1f}" stroke="red" stroke-dasharray="5,3"/>')
        out.append(f'<text x="{left + group_w * len(cases) + 4}" y="{y(ref_line) + 4:.1f}" '
                   f'fill="red">copy {ref_line:.0f}</text>')
    lx = left + group_w * len(cases) + 20
    for si, (s, color) in enumerate(series):
        out.append(f'<rect x="{lx}" y="{top + 24 + si * 18}" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{lx + 16}" y="{top + 34 + si * 18}">{s}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {path}")


def plot(rows, out_dir, label):
    os.makedirs(out_dir, exist_ok=True)
    dense = [r for r in rows if r[0] == "dense"]
    decode = [r for r in rows if r[0] == "decode"]
    if dense:
        bar_chart(os.path.join(out_dir, "dense_tflops.svg"),
                  f"Dense / window attention, bf16 ({label})", "TFLOP/s", dense, DENSE_SERIES)
    if decode:
        copy = next((v for _, c, _, v in decode if c == "device_copy"), None)
        bar_chart(os.path.join(out_dir, "decode_gbps.svg"),
                  f"Paged decode, full, bf16 ({label})", "GB/s (K+V read)", decode,
                  DECODE_SERIES, ref_line=copy)
    if not dense and not decode:
        print("plot_bench.py: no tables found", file=sys.stderr)


def main(argv):
    if len(argv) >= 3 and argv[0] == "--from-csv":
        with open(argv[1]) as f:
            rows = [(r["table"], r["case"], r["series"], float(r["value"]))
                    for r in csv.DictReader(f)]
        label = os.path.splitext(os.path.basename(argv[1]))[0]
        plot(rows, argv[2], label)
        return 0
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        with open(argv[0]) as f:
            rows = parse_summary(f.read())
    except OSError as e:
        print(f"plot_bench.py: {e}", file=sys.stderr)
        return 1
    if "--csv" in argv:
        with open(argv[argv.index("--csv") + 1], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["table", "case", "series", "value"])
            w.writerows(rows)
    plot(rows, argv[1], "this run")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
