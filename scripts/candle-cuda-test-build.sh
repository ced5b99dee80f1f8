#!/usr/bin/env bash
# Usage: scripts/candle-cuda-test-build.sh DEST_DIR
# Builds tests/candle.rs with the feature `candle-cuda` (the candle ops on candle CUDA tensors)
# as DEST_DIR/candle_cuda, for a GPU machine whose PyTorch (cu13) ships the CUDA libraries.
#
# candle-core (cuda) links cudarc with `dynamic-linking`: libcuda, cuBLAS, cuBLASLt, cuRAND and
# NVRTC at build time, and candle-kernels (the real one: every candle kernel through nvcc,
# 15+ minutes on 2 cores) links libcudart. This machine has none of those libraries but
# cudart, so the link goes against stand-ins with the real sonames (every function of
# cudarc's bindings as an empty symbol); on the GPU machine the dynamic loader finds the real
# libraries (the driver's libcuda.so.1, PyTorch's cu13 wheels: device-run.sh puts their
# directories on LD_LIBRARY_PATH). Nothing here runs the binary.
set -euo pipefail
dest=${1:?usage: $0 DEST_DIR}
cd "$(dirname "$0")/.."
root=$PWD
cudarc_version=$(grep -A1 '^name = "cudarc"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc_version" | head -1)
site=$(ls -d "$root"/.cuda-venv/lib/python3*/site-packages/nvidia/cu13)
stubs=$root/target/cuda-link-stubs
rm -rf "$stubs"
mkdir -p "$stubs"
# library, soname, cudarc bindings
for spec in cuda:libcuda.so.1:driver cublas:libcublas.so.13:cublas \
  cublasLt:libcublasLt.so.13:cublaslt curand:libcurand.so.10:curand nvrtc:libnvrtc.so.13:nvrtc; do
  IFS=: read -r lib soname sys <<< "$spec"
  grep -oP '^pub unsafe fn \K\w+' "$cudarc/src/$sys/sys/mod.rs" | sort -u |
    sed 's/.*/void &(void) {}/' > "$stubs/$lib.c"
  cc -shared -fPIC -Wl,-soname,"$soname" -o "$stubs/lib$lib.so" "$stubs/$lib.c"
done
ln -sf "$site/lib/libcudart.so.13" "$stubs/libcudart.so"
NVCC_BIN=$site/bin
PATH="$NVCC_BIN:$PATH" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} \
  RUSTFLAGS="-L native=$stubs" CARGO_TARGET_DIR=target/candle-cuda-test \
  cargo test --release --no-run --no-default-features --features candle-cuda --test candle \
  --message-format=json |
  python3 -c '
import json, shutil, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "candle":
        shutil.copy2(m["executable"], sys.argv[1])
        print("  " + sys.argv[1])
' "$dest/candle_cuda"
[ -x "$dest/candle_cuda" ]
