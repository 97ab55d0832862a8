"""`dsv3 bench` on the single-GPU config and its 256-expert variant, in BF16 and in FP8.

    python benchmarks/gpu_bench.py                  # on a GPU: bf16, plus fp8 when TE imports
    python benchmarks/gpu_bench.py --fp8 none       # bf16 only
    python benchmarks/gpu_bench.py --steps 20 -- train.micro_batch_size=4   # overrides after --

Variants, both on configs/single_gpu.yaml:
    single_gpu        the config as shipped: 64 routed experts, top-6, 512 wide (1.03B total)
    single_gpu-256e   DeepSeek-V3's routing: 256 routed experts, top-8, each a quarter of the
                      hidden size wide (V3: 2048 of 7168); 1.93B total, 141M active per token

Each (variant, precision) pair is its own `python -m train.cli bench --json` process, so each
gets a fresh CUDA allocator and its own peak memory. Precisions: `bf16` (the config as shipped)
and `fp8` (`model.precision=fp8` through `fp8.backend`, Transformer Engine by default, the
report's blockwise recipe). `--fp8 auto` (the default) runs fp8 through TE only when
`transformer_engine.pytorch` imports; `--fp8-backend emulated` runs it anywhere. Overrides given after `--` go last to every run, so they win over the variant's.

Writes --out/gpu_bench.json after every run (each `dsv3 bench --json` object under its variant and
precision, the command lines, and the stderr of any run that failed) and prints one row per run:
tokens/s, MFU, peak memory and the three largest parts of the profiled step. All BF16 runs go
first; a failed run is reported and the rest still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/single_gpu.yaml"
VARIANTS = {
    "single_gpu": [],
    "single_gpu-256e": ["model.n_routed_experts=256", "model.num_experts_per_tok=8",
                        "model.moe_intermediate_size=256"],
}


def te_importable() -> bool:
    probe = [sys.executable, "-c", "import transformer_engine.pytorch"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def precisions(fp8: str, fp8_backend: str) -> dict[str, list[str]]:
    """Precision name -> its overrides, for the --fp8 choice."""
    runs = {"bf16": []}
    if fp8 == "on" or (fp8 == "auto" and (fp8_backend != "te" or te_importable())):
        runs["fp8"] = ["model.precision=fp8", f"fp8.backend={fp8_backend}", "fp8.recipe=blockwise"]
    return runs


def bench_once(overrides: list[str], steps: int, warmup: int) -> tuple[dict | None, list[str], str]:
    """(the bench's JSON object or None when it failed, its command line, the end of its stderr)."""
    cmd = [sys.executable, "-m", "train.cli", "bench", CONFIG, "--json", "--steps", str(steps),
           "--warmup", str(warmup), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "WANDB_SILENT": "true"})
    result = json.loads(proc.stdout) if proc.returncode == 0 else None
    return result, cmd[1:], proc.stderr[-4000:]


def top_parts(r: dict, n: int = 3) -> str:
    fractions = r.get("breakdown_fraction", {})
    ranked = sorted(fractions.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{k} {v * 100:.0f}%" for k, v in ranked)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--fp8", choices=("auto", "on", "none"), default="auto",
                   help="auto: fp8 runs too when the backend is usable (TE importable)")
    p.add_argument("--fp8-backend", choices=("te", "emulated"), default="te")
    p.add_argument("--out", default="runs/gpu_bench")
    p.add_argument("overrides", nargs="*", help="config overrides for every run (after --)")
    args = p.parse_args()

    runs = precisions(args.fp8, args.fp8_backend)
    report = {"config": CONFIG, "variants": {}, "commands": {}, "failed": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'variant':<16} {'precision':<9} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9}  largest parts")
    # every BF16 run before any FP8 one, and a failed run does not stop the rest: on a GPU lent for
    # minutes the BF16 figures come first and an FP8 failure still leaves them
    for precision, prec_overrides in runs.items():
        for variant in args.variants:
            name = f"{variant}/{precision}"
            result, cmd, stderr = bench_once([*VARIANTS[variant], *prec_overrides, *args.overrides],
                                             args.steps, args.warmup)
            report["commands"][name] = " ".join(cmd)
            if result is None:
                report["failed"][name] = stderr
                last = (stderr.strip().splitlines() or ["(no output)"])[-1]
                print(f"{variant:<16} {precision:<9} FAILED: {last}", flush=True)
            else:
                report["variants"].setdefault(variant, {})[precision] = result
                print(f"{variant:<16} {precision:<9} {result['tokens_per_s']:10.0f} {result['mfu'] * 100:6.2f}% "
                      f"{result['peak_mem_bytes'] / 2**30:9.2f}  {top_parts(result)}", flush=True)
            (out / "gpu_bench.json").write_text(json.dumps(report, indent=2))  # after each run: kept if cut off
    print(f"wrote {out / 'gpu_bench.json'}", file=sys.stderr)
    for name, stderr in report["failed"].items():
        print(f"gpu_bench: {name} failed:\n{stderr}", file=sys.stderr)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
