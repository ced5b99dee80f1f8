#!/usr/bin/env bash
# On a GPU machine (no Rust needed), from the folder made by scripts/device-build.sh:
#   dist/device-run.sh OUT_DIR [--quick]
# Runs the GPU tests with LONGATTN_REQUIRE_GPU=1, compute-sanitizer memcheck on the GPU
# tests, the tour, the kernel benchmarks and the PyTorch baselines; writes full logs to
# OUT_DIR, plots (OUT_DIR/plots/*.svg) and prints a short table last.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: device-run.sh OUT_DIR [--quick]}
QUICK=${2:-}
mkdir -p "$OUT"
export LONGATTN_REQUIRE_GPU=1
declare -a SUMMARY
step() { # name, timeout, command...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  SUMMARY+=("$(printf '%-28s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" \
    "$(grep -E 'test result|ERROR SUMMARY|all results' "$OUT/$name.log" | tail -1)")")
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/nvidia-smi.log" 2>&1

# A dense kernel that hangs (rc 124 from timeout) must not eat the rest of the device time:
# the dense steps after the tests are then skipped and the paged ones still run.
DENSE_OK=1
for t in "$HERE"/tests/*; do
  name=$(basename "$t")
  step "test-$name" 120 "$t" --test-threads=4 --nocapture
  rc=$?
  [ "$name" = dense_gpu ] && [ "$rc" = 124 ] && DENSE_OK=0
done
[ "$DENSE_OK" = 1 ] || SUMMARY+=("dense_gpu timed out: dense memcheck, tour and dense benches skipped")

if command -v compute-sanitizer > /dev/null; then
  for t in dense_gpu paged; do
    [ -x "$HERE/tests/$t" ] || continue
    [ "$t" = dense_gpu ] && [ "$DENSE_OK" = 0 ] && continue
    step "memcheck-$t" 150 compute-sanitizer --tool memcheck --error-exitcode 9 \
      "$HERE/tests/$t" gpu --test-threads=1 --skip long --skip bad_inputs
  done
else
  SUMMARY+=("compute-sanitizer not found")
fi

BENCH_ARGS=()
[ "$QUICK" = "--quick" ] && BENCH_ARGS=(--quick)
if [ "$DENSE_OK" = 1 ]; then
  step tour 90 "$HERE/examples/tour"
  step gpu_bench 150 "$HERE/examples/gpu_bench" "${BENCH_ARGS[@]}"
fi
# The split sweeps re-tune splits_for (printed as "# split sweep" lines in the log): full
# decode at every shape, Quest and streaming heads at batch 1. The "# fixed-cost fit" lines
# split batch-1 decode time into a fixed cost and a streaming rate.
[ -x "$HERE/examples/paged_bench" ] && step paged_bench 170 env PAGED_BENCH_TIMEOUT_S=160 \
  PAGED_BENCH_SPLITS=16,24,33,48,66 PAGED_BENCH_SPARSE_SPLITS=4,8,16,32,64 \
  "$HERE/examples/paged_bench"
[ "$DENSE_OK" = 1 ] && step torch_baseline 200 python3 "$HERE/torch_baseline.py" --budget 100 "${BENCH_ARGS[@]}"
[ -f "$HERE/torch_decode_baseline.py" ] && step torch_decode_baseline 120 python3 "$HERE/torch_decode_baseline.py" --flex-budget 40
python3 "$HERE/bench_summary.py" "$OUT/gpu_bench.log" "$OUT/torch_baseline.log" "$OUT/paged_bench.log" \
  "$OUT/torch_decode_baseline.log" > "$OUT/summary.log" 2>&1
# SVG bar charts (stdlib only) of TFLOP/s and GB/s vs the PyTorch baselines, and the numbers
# as CSV: OUT/plots/dense_tflops.svg, OUT/plots/decode_gbps.svg, OUT/bench.csv.
python3 "$HERE/plot_bench.py" "$OUT/summary.log" "$OUT/plots" --csv "$OUT/bench.csv" \
  > "$OUT/plots.log" 2>&1 || echo "plot_bench.py failed: see $OUT/plots.log"

echo "=== logs in $OUT ==="
cat "$OUT/nvidia-smi.log"
printf '%s\n' "${SUMMARY[@]}"
grep -h "rel err\|worst" "$OUT"/test-*.log | head -20
cat "$OUT/tour.log" | tail -12
cat "$OUT/summary.log"
