#!/usr/bin/env bash
# On a GPU machine (no Rust needed), from the folder made by scripts/device-build.sh:
#   dist/device-run.sh OUT_DIR [--quick]
# Runs inside one time budget (DEVICE_RUN_BUDGET_S seconds, default 540; each step is cut to
# what is left), in two phases (verify at most DEVICE_RUN_VERIFY_S, default half the budget,
# so that the benches always get their share):
# 1. verify, DEVICE_RUN_JOBS (default 5) at a time: the GPU tests with LONGATTN_REQUIRE_GPU=1
#    (the kernels that never ran on a GPU first), the Python package's CUDA functions, the
#    candle ops on CUDA tensors, then compute-sanitizer memcheck on every GPU test binary and
#    racecheck on the opt-in kernels. Correctness checks share the GPU: their f64 CPU
#    references and the sanitizers' instrumentation are what takes the time, and the card's
#    16 cores run several at once.
# 2. bench, one at a time (timings need the GPU to themselves), in the order of
#    DEVICE_RUN_BENCHES (default below: the tour, then the families whose opt-in kernels
#    await their first numbers, then the verified dense and paged kernels, then the ncu
#    profiles), each with its PyTorch baseline right after it.
# DEVICE_RUN_PHASES (default "verify bench") picks the phases and their order.
# Writes full logs to OUT_DIR, plots (OUT_DIR/plots/*.svg) and prints a short table last:
# every step's exit code and seconds, then scripts/bench_summary.py's tables and the issue
# targets.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: device-run.sh OUT_DIR [--quick]}
QUICK=${2:-}
BUDGET=${DEVICE_RUN_BUDGET_S:-540}
JOBS=${DEVICE_RUN_JOBS:-5}
VERIFY_S=${DEVICE_RUN_VERIFY_S:-$((BUDGET / 2))}
PHASES=${DEVICE_RUN_PHASES:-verify bench}
BENCHES=${DEVICE_RUN_BENCHES:-tour paged family neighborhood ring dense ncu}
mkdir -p "$OUT/status"
export LONGATTN_REQUIRE_GPU=1
START=$(date +%s)
END=$((START + BUDGET))
PHASE_END=$END # the end of the current phase (never later than END)
NEXT=0 # the order of the status lines: one file per step, OUT/status/NNN

# run_step INDEX NAME LIMIT COMMAND...: runs COMMAND with the smaller of LIMIT and what is
# left of the phase, its output in OUT/NAME.log, its exit code in OUT/status/NAME.rc and
# one summary line in OUT/status/INDEX.
run_step() {
  local idx=$1 name=$2 limit=$3
  shift 3
  local left=$((PHASE_END - $(date +%s)))
  if [ "$left" -lt 10 ]; then
    printf '%-44s skipped (time budget)\n' "$name" > "$OUT/status/$idx"
    echo 125 > "$OUT/status/$name.rc"
    return 125
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0 rc
  t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$rc" > "$OUT/status/$name.rc"
  printf '%-44s rc=%-3s %4ss  %s\n' "$name" "$rc" "$(($(date +%s) - t0))" \
    "$(grep -E 'test result|ERROR SUMMARY|RACECHECK SUMMARY|all results' \
      "$OUT/$name.log" | tail -1)" > "$OUT/status/$idx"
  return $rc
}

# step NAME LIMIT COMMAND...: one step now, in the foreground.
step() {
  local idx
  idx=$(printf '%03d' "$NEXT")
  NEXT=$((NEXT + 1))
  run_step "$idx" "$@"
}

# queue NAME LIMIT COMMAND...: a step for the next `drain`; drain runs the queue JOBS at a
# time, in queue order, and waits for all of it.
QUEUE=()
queue() {
  QUEUE+=("$(printf '%03d' "$NEXT") $(printf '%q ' "$@")")
  NEXT=$((NEXT + 1))
}
drain() {
  local job
  for job in "${QUEUE[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    eval "run_step $job" &
  done
  wait
  QUEUE=()
}

# rc NAME: the exit code of a finished step, empty if it did not run.
rc() { cat "$OUT/status/$1.rc" 2> /dev/null; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/nvidia-smi.log" 2>&1

verify() {
  local name t spec
  # Test binaries, the kernels never run on a GPU first.
  local first="dense_fp8 paged_v5_gpu paged_prefill_gpu block_sparse_gpu paged_prefill neighborhood_gpu ring_gpu dense_gpu paged_gpu"
  local rest
  rest=$(for f in "$HERE"/tests/*; do
    case " $first " in *" $(basename "$f") "*) ;; *) basename "$f" ;; esac
  done)
  for name in $first $rest; do
    [ -x "$HERE/tests/$name" ] && queue "test-$name" 120 "$HERE/tests/$name" --test-threads=4 --nocapture
  done
  # The Python package's CUDA functions on torch tensors (float16 through the CUDA array
  # interface, bfloat16 through DLPack, a side stream): the wheel installed into a scratch
  # dir (outside OUT_DIR, whose files travel back).
  local pylib=${TMPDIR:-/tmp}/longattn-pylib
  rm -rf "$pylib"
  if ls "$HERE"/wheels/*.whl > /dev/null 2>&1 &&
    python3 -m pip install -q --no-deps --no-index --target "$pylib" "$HERE"/wheels/*.whl \
      > "$OUT/python_install.log" 2>&1; then
    queue python_cuda 90 env PYTHONPATH="$pylib" python3 "$HERE/test_cuda.py"
  else
    echo "python_cuda: wheel missing or not installed (python_install.log)" > "$OUT/status/python.note"
  fi
  # The candle ops on candle CUDA tensors (built against stand-ins of the CUDA libraries by
  # scripts/candle-cuda-test-build.sh): the driver's libcuda and PyTorch's cu13 wheels'
  # cuBLAS, cuBLASLt, cuRAND, NVRTC and cudart at run time.
  if [ -x "$HERE/candle_cuda" ]; then
    local nv_libs
    nv_libs=$(python3 -c '
import glob, os, site
bases = site.getsitepackages() + [site.getusersitepackages()]
print(":".join(sorted({d for b in bases for d in glob.glob(os.path.join(b, "nvidia", "*", "lib"))})))')
    queue test-candle_cuda 90 env LD_LIBRARY_PATH="$nv_libs:${LD_LIBRARY_PATH:-}" \
      "$HERE/candle_cuda" gpu --test-threads=1 --nocapture
  fi
  if command -v compute-sanitizer > /dev/null; then
    local san=(compute-sanitizer --error-exitcode 9)
    # memcheck: the GPU tests of each binary (test-name filters), the opt-ins first.
    [ -x "$HERE/tests/block_sparse_gpu" ] &&
      queue memcheck-moba-gather 90 "${san[@]}" --tool memcheck \
        "$HERE/tests/block_sparse_gpu" gpu_moba_gather --test-threads=1
    [ -x "$HERE/tests/paged_v5_gpu" ] &&
      queue memcheck-paged_v5_gpu 90 "${san[@]}" --tool memcheck "$HERE/tests/paged_v5_gpu" \
        f16_fp8_and_replays both_opt_ins quest_v5_decode balanced_splits_fp8 --test-threads=1
    for spec in dense_fp8:gpu_fp8 paged_prefill_gpu:gpu_hopper block_sparse_gpu:gpu \
      paged_prefill:gpu neighborhood_gpu:gpu ring_gpu: dense_gpu:gpu paged_gpu:gpu; do
      t=${spec%%:*}
      [ -x "$HERE/tests/$t" ] || continue
      queue "memcheck-$t" 120 "${san[@]}" --tool memcheck "$HERE/tests/$t" "${spec#*:}" \
        --test-threads=1 --skip long --skip bad_inputs --skip fp8_decode_matches
    done
    # Shared-memory hazards: one test of each mainloop kernel family (wgmma's mbarrier
    # rings, decode, the ring); a timeout still reports the hazards found until then.
    for spec in block_sparse_gpu:gpu_block_sparse_plan_matches_one_shot \
      block_sparse_gpu:gpu_hopper_block_sparse_plan_matches_one_shot \
      neighborhood_gpu:gpu_neighborhood_fused_matches_reference \
      neighborhood_gpu:gpu_neighborhood_hopper_matches_reference \
      paged_prefill:gpu_prefill_matches_reference_f16 \
      paged_prefill_gpu:gpu_hopper_prefill_matches_reference_f16 \
      dense_gpu:gpu_hopper_varlen_many_query_tiles dense_gpu:gpu_hopper_window_short_windows \
      dense_gpu:gpu_hopper_wide_full_attention \
      paged_gpu:gpu_plan_reuse_matches_one_shot \
      paged_gpu:gpu_fp8_decode_one_case block_sparse_gpu:gpu_moba_ties_and_nan_follow_the_rule \
      block_sparse_gpu:gpu_moba_gather_plan_replay_and_refusals \
      ring_gpu:in_process_ring_moves_only_the_needed_shards \
      dense_fp8:gpu_fp8_matches_reference; do
      t=${spec%%:*}
      [ -x "$HERE/tests/$t" ] || continue
      queue "racecheck-$t-${spec#*:}" 60 "${san[@]}" --tool racecheck "$HERE/tests/$t" \
        "${spec#*:}" --exact --test-threads=1
    done
  else
    echo "compute-sanitizer not found" > "$OUT/status/sanitizer.note"
  fi
  drain
}

bench() {
  local bench_args=()
  [ "$QUICK" = "--quick" ] && bench_args=(--quick)
  # A dense kernel that hung in its tests (rc 124 from timeout) must not eat the device time:
  # the dense benches and the tour are then skipped, the others still run.
  local dense_ok=1
  [ "$(rc test-dense_gpu)" = 124 ] && dense_ok=0
  local b
  for b in $BENCHES; do
    case $b in
      tour) [ "$dense_ok" = 1 ] && step tour 60 "$HERE/examples/tour" ;;
      paged)
        # The split sweeps re-tune splits_for (printed as "# split sweep" lines in the log):
        # full decode at every shape, Quest and streaming heads at batch 1. The "# fixed-cost
        # fit" lines split batch-1 decode time into a fixed cost and a streaming rate.
        [ -x "$HERE/examples/paged_bench" ] && step paged_bench 100 env PAGED_BENCH_TIMEOUT_S=90 \
          PAGED_BENCH_SPLITS=16,24,33,48,66 PAGED_BENCH_SPARSE_SPLITS=4,8,16,32,64 \
          "$HERE/examples/paged_bench"
        step torch_decode_baseline 100 python3 "$HERE/torch_decode_baseline.py" --flex-budget 40 ;;
      family)
        # 150 s: the last groups (bsparse_long, block-sparse at 32k and 128k; moba, gate and
        # attention at 32k and 128k) take about 20 s each.
        step family_bench 150 "$HERE/examples/family_bench"
        step torch_family_baseline 130 python3 "$HERE/torch_family_baseline.py" --budget 90 ;;
      neighborhood)
        step neighborhood_bench 60 "$HERE/examples/neighborhood_bench" --quick
        step torch_neighborhood_baseline 60 python3 "$HERE/torch_neighborhood_baseline.py" \
          --quick --budget 40 ;;
      ring) step ring_bench 60 "$HERE/examples/ring_bench" --quick ;;
      dense)
        [ "$dense_ok" = 1 ] || continue
        step gpu_bench 140 "$HERE/examples/gpu_bench" "${bench_args[@]}"
        step torch_baseline 150 python3 "$HERE/torch_baseline.py" --budget 80 "${bench_args[@]}" ;;
      ncu)
        # Why paged prefill trails the dense kernel on the same tokens (issue 17): one launch
        # of each under ncu (issue stalls, instruction counts, memory traffic), clocks left
        # alone.
        command -v ncu > /dev/null || continue
        local k
        for k in paged_prefill_kernel paged_prefill_wgmma_kernel dense_mma_padded_kernel; do
          step "ncu-$k" 60 env FAMILY_BENCH=pprefill ncu --clock-control none -k "regex:$k" -c 1 \
            --section SpeedOfLight --section WarpStateStats --section InstructionStats \
            --section MemoryWorkloadAnalysis --section Occupancy "$HERE/examples/family_bench"
        done ;;
      *) echo "unknown bench $b (DEVICE_RUN_BENCHES)" > "$OUT/status/bench-$b.note" ;;
    esac
  done
}

for phase in $PHASES; do
  case $phase in
    verify)
      PHASE_END=$(($(date +%s) + VERIFY_S))
      [ "$PHASE_END" -gt "$END" ] && PHASE_END=$END
      verify ;;
    bench)
      PHASE_END=$END
      bench ;;
    *) echo "unknown phase $phase (DEVICE_RUN_PHASES)" > "$OUT/status/phase-$phase.note" ;;
  esac
done

python3 "$HERE/bench_summary.py" "$OUT/gpu_bench.log" "$OUT/torch_baseline.log" "$OUT/paged_bench.log" \
  "$OUT/torch_decode_baseline.log" "$OUT/family_bench.log" "$OUT/torch_family_baseline.log" \
  "$OUT/neighborhood_bench.log" "$OUT/torch_neighborhood_baseline.log" "$OUT/ring_bench.log" \
  > "$OUT/summary.log" 2>&1
# SVG bar charts (stdlib only) of TFLOP/s and GB/s vs the PyTorch baselines, and the numbers
# as CSV: OUT/plots/dense_tflops.svg, OUT/plots/decode_gbps.svg, OUT/bench.csv.
python3 "$HERE/plot_bench.py" "$OUT/summary.log" "$OUT/plots" --csv "$OUT/bench.csv" \
  > "$OUT/plots.log" 2>&1 || echo "plot_bench.py failed: see $OUT/plots.log"

{
  echo "=== logs in $OUT ($(($(date +%s) - START)) s of a $BUDGET s budget, $JOBS verify jobs at a time) ==="
  cat "$OUT/nvidia-smi.log"
  cat "$OUT"/status/[0-9]* "$OUT"/status/*.note 2> /dev/null
  grep -h "rel err\|worst" "$OUT"/test-*.log | head -20
  tail -12 "$OUT/tour.log" 2> /dev/null
  cat "$OUT/summary.log"
  grep -h "^NA \|^BENCH.*ring" "$OUT/neighborhood_bench.log" "$OUT/ring_bench.log" 2> /dev/null | head -40
} | tee "$OUT/run.log"
