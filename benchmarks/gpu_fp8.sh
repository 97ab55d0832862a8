#!/usr/bin/env bash
# One command on a GPU machine: BF16 against Transformer Engine FP8 (the report's blockwise recipe)
# on configs/single_gpu.yaml, same data and seed, then the GPU tests.
#
#   pip install -e '.[gpu]'          # Transformer Engine (needs CUDA; blockwise FP8 needs Hopper or newer)
#   benchmarks/gpu_fp8.sh            # STEPS=300 by default; extra args go to fp8_vs_bf16.py
#   STEPS=500 benchmarks/gpu_fp8.sh --recipe mxfp8     # e.g. MXFP8 on Blackwell
#
# Writes runs/gpu_fp8/fp8_vs_bf16.{json,png}: per-step losses and relative gaps, final val losses,
# tokens/s and peak memory per precision; prints the headline numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
STEPS=${STEPS:-300}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_fp8.sh: no CUDA GPU visible" >&2; exit 2; }
"$PY" -c "import transformer_engine.pytorch" \
  || { echo "gpu_fp8.sh: Transformer Engine is not importable; pip install -e '.[gpu]'" >&2; exit 2; }

"$PY" -m train.cli prepare-data configs/single_gpu.yaml
# checkpoint only at the last step (a 1B model with optimizer state is ~13 GB per checkpoint)
"$PY" benchmarks/fp8_vs_bf16.py --config configs/single_gpu.yaml --steps "$STEPS" --device cuda \
  --baseline bf16 --fp8-backend te --recipe blockwise --out runs/gpu_fp8 "$@" checkpoint.interval=1000000
"$PY" -m pytest -q tests/gpu
