#!/usr/bin/env bash
# Compiles each kernels/*.cu for sm_80 and sm_90a and prints, per kernel: registers, spills,
# stack frame, and SASS instruction counts (HMMA/HGMMA tensor-core ops, LDGSTS cp.async,
# LDSM ldmatrix, 128-bit global loads, LDL/STL local memory).
set -euo pipefail
cd "$(dirname "$0")/.."
TK=$(ls -d .cuda-venv/lib/python3*/site-packages/nvidia/cu13)
BIN=$(ls -d .cuda-venv/lib/python3*/site-packages/nvidia/*/bin | tr '\n' ':')
export PATH="$BIN$PATH"
OUT=${1:-target/sass}
mkdir -p "$OUT"
for cu in kernels/*.cu; do
  name=$(basename "$cu" .cu)
  for arch in 80 90a; do
    obj="$OUT/$name.sm_$arch.o"
    "$TK/bin/nvcc" -std=c++17 -O3 -I kernels/include --expt-relaxed-constexpr \
      -gencode=arch=compute_$arch,code=sm_$arch -Xptxas=-v -c "$cu" -o "$obj" 2> "$OUT/$name.sm_$arch.ptxas"
    if command -v cuobjdump >/dev/null; then
      cuobjdump -sass "$obj" > "$OUT/$name.sm_$arch.sass"
      s="$OUT/$name.sm_$arch.sass"
      printf '%-10s sm_%-4s HMMA %5d  HGMMA %5d  LDGSTS %5d  LDSM %5d  LDG.128 %5d  LDL/STL %3d\n' \
        "$name" "$arch" "$(grep -c HMMA "$s" || true)" "$(grep -c HGMMA "$s" || true)" \
        "$(grep -c LDGSTS "$s" || true)" "$(grep -c LDSM "$s" || true)" \
        "$(grep -cE 'LDG\.E\.(128|ENL2\.256)' "$s" || true)" "$(grep -cE '\b(LDL|STL)\b' "$s" || true)"
    fi
    grep -E "registers|spill" "$OUT/$name.sm_$arch.ptxas" | sed "s/^/  $name sm_$arch: /" | sort -u | head -40
  done
done
