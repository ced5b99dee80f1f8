#!/usr/bin/env bash
# On a build machine (Rust + the pinned toolkit): builds the release test, example and bench
# binaries and the Python wheel for the GPU machines into dist/ (git-ignored), with the
# scripts that run them.
# Then, on a GPU machine with no Rust toolchain: dist/device-run.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
export LONGATTN_REQUIRE_CUDA=1
# The GPU machines are Hopper (H100/H200): sm_90a only keeps the binaries small (all that
# travels must stay under 64 MiB). Set LONGATTN_CUDA_ARCHS=80,90a for an Ampere card.
export LONGATTN_CUDA_ARCHS=${LONGATTN_CUDA_ARCHS:-90a}
export CARGO_PROFILE_RELEASE_STRIP=symbols CARGO_PROFILE_BENCH_STRIP=symbols
# No source-line tables in the device code: 2.5x smaller binaries (set 1 for ncu source views).
export LONGATTN_LINEINFO=${LONGATTN_LINEINFO:-0}
DIST=${DIST:-dist}
rm -rf "$DIST"
mkdir -p "$DIST/tests" "$DIST/benches" "$DIST/examples"

copy_executables() { # $1 = dest dir, $2 = target kinds; stdin = cargo JSON messages
  python3 -c '
import json, shutil, sys, os
dest = sys.argv[1]
allowed = sys.argv[2].split(",")
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    kind = m.get("target", {}).get("kind", [""])[0]
    # The unit tests of the library report its crate type first ("rlib").
    kind = "lib" if kind in ("rlib", "staticlib", "cdylib") else kind
    # `cargo test --no-run` also builds examples as test targets: keep real tests only.
    if m.get("reason") == "compiler-artifact" and exe and kind in allowed:
        name = m["target"]["name"] if kind != "lib" else "lib"
        shutil.copy2(exe, os.path.join(dest, name))
        print(f"  {dest}/{name}")
' "$1" "$2"
}

echo "test binaries:"
cargo test --release --no-run --message-format=json | copy_executables "$DIST/tests" lib,test
echo "bench binaries:"
cargo bench --no-run --message-format=json | copy_executables "$DIST/benches" bench
echo "examples:"
cargo build --release --examples --message-format=json | copy_executables "$DIST/examples" example
echo "python wheel (CUDA functions; python/tests/test_cuda.py runs them on the GPU machine):"
MATURIN=${MATURIN:-$(command -v maturin || echo target/pyvenv/bin/maturin)}
if [ ! -x "$MATURIN" ]; then
  python3 -m venv target/pyvenv && target/pyvenv/bin/pip install -q maturin
  MATURIN=target/pyvenv/bin/maturin
fi
# abi3 (CPython >= 3.9), a plain linux tag: installed there with pip --target, no index.
CARGO_TARGET_DIR=target/pywheel "$MATURIN" build --release -m python/Cargo.toml \
  --compatibility linux --out "$DIST/wheels"
cp python/tests/test_cuda.py "$DIST/"
echo "candle ops on candle CUDA tensors (tests/candle.rs with candle-cuda; LONGATTN_DEVICE_CANDLE=0"
echo "skips it: the first build compiles candle's own kernels, ~20 minutes on 2 cores):"
if [ "${LONGATTN_DEVICE_CANDLE:-1}" = 1 ]; then
  scripts/candle-cuda-test-build.sh "$DIST" || echo "  candle_cuda: build failed, left out"
fi
cp scripts/device-run.sh scripts/torch_baseline.py scripts/torch_decode_baseline.py \
  scripts/torch_family_baseline.py scripts/torch_neighborhood_baseline.py \
  scripts/bench_summary.py scripts/plot_bench.py "$DIST/"
du -sh "$DIST"
# The device tool carries at most 64 MiB and every binary embeds the same fatbinary: one xz
# archive (dictionary larger than a binary) of what device-run.sh runs is ~5 MB. Carry
# `devpack` and start the command with `tar xJf devpack/dist.tar.xz -C /tmp/w`.
mkdir -p devpack
tar cf - --exclude="$DIST/benches" "$DIST" | xz -9 -T2 > devpack/dist.tar.xz
du -sh devpack/dist.tar.xz
