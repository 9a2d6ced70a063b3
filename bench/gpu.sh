#!/usr/bin/env bash
# The one GPU check (bench/gpu.py): bench/unet.py, the T5 embed forward, a bf16 training run of
# a NeMo-500M-sized base64 U-Net through the real trainer, and a cascade sampling run; one JSON
# line last. Without a GPU it says so and exits 0.   bench/gpu.sh [bench/gpu.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" bench/gpu.py "$@"
