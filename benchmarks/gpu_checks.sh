#!/usr/bin/env bash
# The GPU checks in one command, cheapest first, so that a short session still gets the first ones:
#   1. `dsv3 bench` on configs/single_gpu.yaml and its 256-expert variant (benchmarks/gpu_bench.py):
#      tokens/s, MFU, peak memory and the step breakdown, in BF16, and in FP8 when Transformer
#      Engine imports                                          -> runs/gpu_bench/gpu_bench.json
#   2. BF16 against TE FP8 (the report's blockwise recipe) trained on single_gpu.yaml, same data and
#      seed (benchmarks/fp8_vs_bf16.py)                        -> runs/gpu_fp8/fp8_vs_bf16.{json,png}
#   3. the GPU tests (pytest tests/gpu)
#
#   pip install -e '.[gpu]'            # Transformer Engine (needs CUDA; blockwise FP8 needs Hopper or newer)
#   benchmarks/gpu_checks.sh           # STEPS=300 by default; extra args go to fp8_vs_bf16.py
#   STEPS=500 benchmarks/gpu_checks.sh --recipe mxfp8    # e.g. MXFP8 on Blackwell
#
# Without Transformer Engine it stops after the BF16 benchmarks, exit status 2. A failed benchmark
# run lets the rest go on and makes the exit status 1 at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
STEPS=${STEPS:-300}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_checks.sh: no CUDA GPU visible" >&2; exit 2; }

bench_status=0  # a failed bench run (reported in its output) does not stop the checks after it
"$PY" benchmarks/gpu_bench.py --out runs/gpu_bench || bench_status=$?

"$PY" -c "import transformer_engine.pytorch" \
  || { echo "gpu_checks.sh: Transformer Engine is not importable; pip install -e '.[gpu]'" >&2; exit 2; }

"$PY" -m train.cli prepare-data configs/single_gpu.yaml
# checkpoint only at the last step (a 1B model with optimizer state is ~13 GB per checkpoint)
"$PY" benchmarks/fp8_vs_bf16.py --config configs/single_gpu.yaml --steps "$STEPS" --device cuda \
  --baseline bf16 --fp8-backend te --recipe blockwise --out runs/gpu_fp8 "$@" checkpoint.interval=1000000
"$PY" -m pytest -q tests/gpu
exit "$bench_status"
