#!/usr/bin/env bash
# Installs cuobjdump + nvdisasm (13.2.86, the oldest published wheels) into ./.cuda-venv so
# that the SASS of the kernels can be read without a GPU: scripts/sass-report.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LONGATTN_CUDA_VENV:-.cuda-venv}
[ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps \
  nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.2.86
