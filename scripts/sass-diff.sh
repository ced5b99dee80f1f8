#!/usr/bin/env bash
# Usage: scripts/sass-diff.sh [BASE_REV]   (default: main)
#
# Shows whether the device code (SASS) of every kernel is unchanged between BASE_REV and the
# working tree. Kernels verified on a GPU stay verified only while their SASS is identical.
#
# Each kernels/*.cu of both trees is compiled for sm_80 and sm_90a with build.rs's flags (one
# arch per compile, as scripts/sass-report.sh; -lineinfo left off, it changes no instruction),
# disassembled with `cuobjdump -sass` (scripts/install-sass-tools.sh installs it), normalised
# (instruction addresses, encodings and branch/call targets stripped; the per-file
# anonymous-namespace tag in mangled names replaced) and split per kernel function. Kernels
# are matched by normalised name across all files of an arch, so moving a kernel to another
# file is not a change; a kernel whose name changed (e.g. a new template parameter) but whose
# code is identical to a removed one is reported as "identical (renamed)".
#
# Compiled SASS is cached in target/sass-diff/cache keyed by the file's content, every header
# under kernels/include, the arch, the flags and the nvcc version, so the base and an
# unchanged working-tree file are built once. Prints one line per kernel and arch:
#   identical | identical (renamed from X) | changed (instructions A -> B, +D) | new | removed
# and exits 1 when any kernel changed, was removed, or is new; 0 when all are identical.
# SASS_DIFF_SHOW=1 also prints a unified diff of each changed kernel.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BASE=${1:-main}
BASE_SHA=$(git rev-parse --verify "$BASE^{commit}")
TK=$(ls -d "$ROOT"/.cuda-venv/lib/python3*/site-packages/nvidia/cu13)
NVCC="$TK/bin/nvcc"
CUOBJDUMP=$(command -v cuobjdump || ls "$ROOT"/.cuda-venv/lib/python3*/site-packages/nvidia/*/bin/cuobjdump | head -1)
[ -x "$CUOBJDUMP" ] || { echo "cuobjdump not found: run scripts/install-sass-tools.sh" >&2; exit 2; }
ARCHS=${SASS_DIFF_ARCHS:-"80 90a"}
JOBS=${SASS_DIFF_JOBS:-2}
# build.rs's flags (compile_kernels), less -lineinfo and -Xptxas=-v.
FLAGS="-c -std=c++17 -O3 -Xcompiler=-fPIC --threads=0 --expt-relaxed-constexpr -Xptxas=-warn-spills,-warn-lmem-usage,-Werror"
WORK=$ROOT/target/sass-diff
CACHE=$WORK/cache
mkdir -p "$CACHE"
NVCC_VERSION=$("$NVCC" --version | tail -1)

# Materialise the base tree's kernels/ once per commit.
BASE_DIR=$WORK/base-$BASE_SHA
if [ ! -d "$BASE_DIR/kernels" ]; then
  rm -rf "$BASE_DIR.tmp" && mkdir -p "$BASE_DIR.tmp"
  git archive "$BASE_SHA" kernels | tar -x -C "$BASE_DIR.tmp"
  mv "$BASE_DIR.tmp" "$BASE_DIR"
fi

# Prints "<cache key> <tree> <cu> <arch>" for every file of a tree.
plan() {
  local tree=$1 hdr
  hdr=$(cd "$tree/kernels" && find include -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-64)
  for cu in $(cd "$tree/kernels" && find . -name '*.cu' | LC_ALL=C sort); do
    for arch in $ARCHS; do
      key=$( { sha256sum < "$tree/kernels/$cu"; echo "$hdr $arch $FLAGS $NVCC_VERSION"; } | sha256sum | cut -c1-32)
      echo "$key $tree $cu $arch"
    done
  done
}
build_one() {
  local key=$1 tree=$2 cu=$3 arch=$4 tmp
  [ -s "$CACHE/$key.sass" ] && return 0
  tmp=$(mktemp -d)
  # shellcheck disable=SC2086
  if ! "$NVCC" $FLAGS -I"$tree/kernels/include" -gencode=arch=compute_$arch,code=sm_$arch \
       "$tree/kernels/$cu" -o "$tmp/k.o" 2> "$tmp/err"; then
    echo "nvcc failed: $tree/kernels/$cu sm_$arch" >&2; cat "$tmp/err" >&2; rm -rf "$tmp"; return 1
  fi
  "$CUOBJDUMP" -sass "$tmp/k.o" > "$tmp/k.sass"
  mv "$tmp/k.sass" "$CACHE/$key.sass"
  rm -rf "$tmp"
}
export -f build_one
export NVCC CUOBJDUMP FLAGS CACHE

{ plan "$BASE_DIR" | sed 's/^/base /'; plan "$ROOT" | sed 's/^/work /'; } > "$WORK/plan.txt"
cut -d' ' -f2- "$WORK/plan.txt" | sort -u -k1,1 |
  xargs -P "$JOBS" -L 1 bash -c 'build_one "$@"' _ || { echo "build failed" >&2; exit 2; }

python3 - "$WORK/plan.txt" "$CACHE" "${SASS_DIFF_SHOW:-0}" <<'EOF'
import difflib, re, subprocess, sys
from collections import defaultdict

plan, cache, show = sys.argv[1], sys.argv[2], sys.argv[3] == "1"

def strip_anon(name):
    # Mangled `<len>_GLOBAL__N__<hash>_<n>_<file>_cu_<symbol>`: one tag per file; replace it.
    out, i = [], 0
    for m in re.finditer(r"(\d+)_GLOBAL__N__", name):
        if m.start() < i:
            continue
        n = int(m.group(1))
        out.append(name[i:m.start()] + "9ANONYMOUS")
        i = m.start() + len(m.group(1)) + n
    return "".join(out) + name[i:]

def demangle(names):
    try:
        r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        return dict(zip(names, r.stdout.splitlines()))
    except OSError:
        return {n: n for n in names}

ADDR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s*")
ENC = re.compile(r"\s*/\* 0x[0-9a-f]{16} \*/\s*$")
TARGET = re.compile(r"\b(BRA|BRX|BSSY|BSYNC|CALL\S*|JMP\S*|JMX|SSY|PBK|PCNT|BREAK|WARPSYNC|RET\S*)(\b.*?)0x[0-9a-f]+")

def kernels(path):
    """{normalised kernel name: [normalised instruction lines]} of one cuobjdump -sass file."""
    res, cur = {}, None
    for line in open(path):
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = strip_anon(m.group(1))
            res[cur] = []
            continue
        if cur is None or not ADDR.match(line):
            continue
        ins = ENC.sub("", ADDR.sub("", line)).strip()
        ins = TARGET.sub(lambda t: t.group(1) + t.group(2) + "TARGET", ins)
        ins = re.sub(r"\s+", " ", ins.rstrip(" ;"))
        if ins:
            res[cur].append(ins)
    return res

sides = {"base": defaultdict(dict), "work": defaultdict(dict)}   # side -> arch -> name -> (file, code)
for row in open(plan):
    side, key, _tree, cu, arch = row.split()
    for name, code in kernels(f"{cache}/{key}.sass").items():
        sides[side][arch][name] = (cu.lstrip("./"), code)

names = sorted({n for s in sides.values() for a in s.values() for n in a})
pretty = demangle(names)
def short(n):
    p = pretty.get(n, n).replace("(anonymous namespace)::", "")
    return re.sub(r"^longattn::", "", p)

changed = 0
for arch in sorted({a for s in sides.values() for a in s}):
    base, work = sides["base"][arch], sides["work"][arch]
    removed = {n: base[n] for n in base if n not in work}
    rows = []
    for n in sorted(work):
        f, code = work[n]
        if n in base:
            bcode = base[n][1]
            if code == bcode:
                rows.append((f, n, "identical"))
            else:
                changed += 1
                rows.append((f, n, f"CHANGED (instructions {len(bcode)} -> {len(code)}, {len(code)-len(bcode):+d})"))
                if show:
                    sys.stdout.writelines(difflib.unified_diff([l + "\n" for l in bcode], [l + "\n" for l in code], f"base {short(n)}", f"work {short(n)}", n=2))
        else:
            twin = next((r for r, (_, rc) in removed.items() if rc == code), None)
            if twin is not None:
                del removed[twin]
                rows.append((f, n, f"identical (renamed from {short(twin)})"))
            else:
                changed += 1
                rows.append((f, n, f"NEW ({len(code)} instructions)"))
    for n, (f, code) in removed.items():
        changed += 1
        rows.append((f"({f})", n, f"REMOVED ({len(code)} instructions)"))
    print(f"== sm_{arch}: base {len(base)} kernels, work {len(work)} kernels")
    for f, n, status in rows:
        print(f"  {f:<18} {status:<40} {short(n)}")
print(f"sass-diff: {changed} kernel(s) changed, new or removed" if changed else "sass-diff: all kernels identical")
sys.exit(1 if changed else 0)
EOF
