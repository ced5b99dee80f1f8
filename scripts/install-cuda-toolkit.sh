#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 toolkit (nvcc, ptxas, cudart, headers) from PyPI into
# ./.cuda-venv without root. build.rs finds nvcc there automatically.
# 13.0 matches the driver of the GPU test machines (580); pin nvvm too, or pip pulls a newer
# nvvm than nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LONGATTN_CUDA_VENV:-.cuda-venv}
if [ ! -x "$VENV/bin/pip" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 \
  nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
NVCC=$(ls "$VENV"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc)
"$NVCC" --version | tail -2
echo "nvcc: $NVCC"
