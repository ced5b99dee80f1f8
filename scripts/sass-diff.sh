#!/usr/bin/env bash
# SASS diff of every kernel between a base revision and the working tree, without a GPU:
# builds each kernels/*.cu of both trees for sm_80 and sm_90a (the flags of build.rs),
# dumps the device code with cuobjdump -sass, strips addresses, encodings and comments,
# splits it per kernel function and prints, per kernel and arch, `identical` or `CHANGED`
# (with the instruction counts). A kernel that exists on one side only is listed as
# `new` / `removed`. Exit status 0 always; read the table.
#
#   scripts/sass-diff.sh [BASE_REV]        (default: main)
#
# Needs the toolkit (scripts/install-cuda-toolkit.sh) and cuobjdump + nvdisasm
# (scripts/install-sass-tools.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-main}
TK=$(ls -d .cuda-venv/lib/python3*/site-packages/nvidia/cu13)
BIN=$(ls -d .cuda-venv/lib/python3*/site-packages/nvidia/*/bin | tr '\n' ':')
export PATH="$BIN$PATH"
command -v cuobjdump > /dev/null || { echo "cuobjdump missing: run scripts/install-sass-tools.sh"; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Both trees are compiled from the same path: the names nvcc gives anonymous namespaces
# depend on the source path, and they appear in every kernel's mangled name.
src="$work/src"

# One SASS dump per tree and arch: every kernel's instructions, one file per function.
dump() { # tree arch
  local tree=$1 arch=$2 out="$work/$1.$2"
  mkdir -p "$out"
  for cu in "$src"/kernels/*.cu; do
    local obj="$work/$tree.$arch.$(basename "$cu" .cu).o"
    "$TK/bin/nvcc" -c -std=c++17 -O3 --expt-relaxed-constexpr -I "$src/kernels/include" \
      -gencode=arch=compute_$arch,code=sm_$arch "$cu" -o "$obj"
    # Function headers look like `Function : <mangled name>`; instructions are
    # `/*0a10*/  OPCODE operands ;  /* encoding */`. Keep the opcode text only.
    cuobjdump -sass "$obj" | awk -v out="$out" '
      /Function : / { name = $3; file = out "/" name; next }
      name != "" && /^[[:space:]]*\/\*[0-9a-f]+\*\// {
        line = $0
        sub(/^[[:space:]]*\/\*[0-9a-f]+\*\/[[:space:]]*/, "", line)
        sub(/[[:space:]]*\/\*.*$/, "", line)
        gsub(/[[:space:]]+/, " ", line)
        if (line != "") print line > file
      }'
  done
}
for tree in base head; do
  rm -rf "$src"; mkdir -p "$src"
  if [ $tree = base ]; then git archive "$base" kernels | tar -x -C "$src"; else cp -r kernels "$src/"; fi
  dump $tree 80 &
  dump $tree 90a &
  wait
done

printf '%-8s %-9s %-8s %s\n' arch status instrs kernel
for arch in 80 90a; do
  for f in $(ls "$work/base.$arch" "$work/head.$arch" | grep -v ':$' | sort -u); do
    b="$work/base.$arch/$f"; h="$work/head.$arch/$f"
    name=$(echo "$f" | c++filt 2>/dev/null | cut -c1-90)
    if [ ! -f "$b" ]; then
      printf '%-8s %-9s %-8s %s\n' "sm_$arch" new "$(wc -l < "$h")" "$name"
    elif [ ! -f "$h" ]; then
      printf '%-8s %-9s %-8s %s\n' "sm_$arch" removed "$(wc -l < "$b")" "$name"
    elif cmp -s "$b" "$h"; then
      printf '%-8s %-9s %-8s %s\n' "sm_$arch" identical "$(wc -l < "$h")" "$name"
    else
      printf '%-8s %-9s %-8s %s\n' "sm_$arch" CHANGED "$(wc -l < "$b")->$(wc -l < "$h")" "$name"
    fi
  done
done
