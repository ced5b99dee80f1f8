#!/usr/bin/env bash
# On a build machine (Rust + the pinned toolkit): builds the release test, example and bench
# binaries for the GPU machines into dist/ (git-ignored), with the scripts that run them.
# Then, on a GPU machine with no Rust toolchain: dist/device-run.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
export LONGATTN_REQUIRE_CUDA=1
export LONGATTN_CUDA_ARCHS=${LONGATTN_CUDA_ARCHS:-80,90a}
DIST=${DIST:-dist}
rm -rf "$DIST"
mkdir -p "$DIST/tests" "$DIST/benches" "$DIST/examples"

copy_executables() { # $1 = dest dir; stdin = cargo JSON messages
  python3 -c '
import json, shutil, sys, os
dest = sys.argv[1]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    if m.get("reason") == "compiler-artifact" and exe:
        kind = m["target"]["kind"][0]
        name = m["target"]["name"] if kind != "lib" else "lib"
        shutil.copy2(exe, os.path.join(dest, name))
        print(f"  {dest}/{name}")
' "$1"
}

echo "test binaries:"
cargo test --release --no-run --message-format=json | copy_executables "$DIST/tests"
echo "bench binaries:"
cargo bench --no-run --message-format=json | copy_executables "$DIST/benches"
rm -f "$DIST/benches/lib"
echo "examples:"
cargo build --release --examples --message-format=json | copy_executables "$DIST/examples"
cp scripts/device-run.sh scripts/torch_baseline.py scripts/bench_summary.py "$DIST/"
du -sh "$DIST"
