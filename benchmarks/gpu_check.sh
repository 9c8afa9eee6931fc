#!/usr/bin/env bash
# One-GPU check (< 5 min on an H100): bf16 vs fp32 parity, VGG16 img/s at 224, PyTorch AMP for scale.
# Run from the repo root; needs only jax, flax and optax (torch optional). --cpu-smoke: tiny CPU run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python -m benchmarks.gpu_check "$@"
