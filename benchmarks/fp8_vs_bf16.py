"""FP8 against the high-precision baseline: the same config, data and seed trained twice through
the real `dsv3 train` path, and the relative loss gap between the two runs.

    python benchmarks/fp8_vs_bf16.py                      # smoke config, CPU: fp32 vs emulated FP8
    python benchmarks/fp8_vs_bf16.py --config configs/single_gpu.yaml --steps 300   # GPU: bf16 vs TE FP8

Baseline and FP8 backend follow the device: on CPU fp32 vs `fp8.backend=emulated`, on GPU bf16 vs
`fp8.backend=te` (both overridable). Each run is its own `python -m train.cli train` process
(fresh peak-memory accounting), logging every step. Writes into --out:

    fp8_vs_bf16.json   per-step losses of both runs, the per-step relative gap (fp8 − base)/base,
                       val losses, the two headline gaps (final val loss; mean train loss over the
                       last 10% of steps), tokens/s (median over steps after the first 10%) and
                       peak memory (CUDA allocator peak on GPU, process peak RSS on CPU) per run
    fp8_vs_bf16.png    top: both train-loss curves (blue baseline, orange FP8); bottom: the
                       per-step relative gap in % (grey lines at 0 and ±tolerance)
    <precision>/       the two run directories (metrics.jsonl, logs, checkpoints)

The report's FP8-vs-BF16 gap is under 0.25% (§3.3); --check exits 1 when either headline gap
exceeds --tolerance (default 0.5%). matplotlib is not a dependency: the PNG is drawn and encoded
here (zlib), with numbers but no words on the axes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Runs


def run_training(config: str, precision: str, args, out: Path, extra: list[str]) -> dict:
    """Train one precision in a subprocess; returns its summary (losses, val losses, speed, memory)."""
    run_dir = out / precision
    overrides = [
        f"train.steps={args.steps}", f"train.run_dir={run_dir}", "train.resume=never", f"train.device={args.device}",
        "logging.interval=1", "logging.wandb=disabled", "logging.progress=false", "train.sample_tokens=0",
        f"model.precision={precision}",
    ]
    if precision == "fp8":
        overrides += [f"fp8.backend={args.fp8_backend}", f"fp8.recipe={args.recipe}"]
    if args.baseline == "bf16":  # bf16 trains at ZeRO-2 (fp32 gradient accumulation); FP8 runs the same layout
        overrides.append("parallel.zero_stage=2")
    cmd = [sys.executable, "-m", "train.cli", "train", config, *overrides, *extra]
    print(f"[{precision}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{precision}.log"
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "WANDB_SILENT": "true"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"[{precision}] training exited {proc.returncode}; see {log}:\n" + "\n".join(tail))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["step"] >= 1 and r["loss"] is not None]
    losses = [r["loss"] for r in train_rows]
    speeds = [r["tokens_per_s"] for r in train_rows[len(train_rows) // 10:] if r["tokens_per_s"]]
    vals = {r["step"]: r["val_loss"] for r in rows if r["val_loss"] is not None}
    last = max(1, math.ceil(len(losses) / 10))
    return {
        "precision": precision,
        "steps": [r["step"] for r in train_rows],
        "loss": losses,
        "lm_loss": [r["lm_loss"] for r in train_rows],
        "val_loss": vals,
        "final_val_loss": vals[max(vals)],
        "last10_mean_loss": sum(losses[-last:]) / last,
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "peak_mem_bytes": max((r["peak_mem_bytes"] or 0) for r in train_rows),
        "wall_s": wall,
        "log": str(log),
    }


def rel_gap(fp8: float, base: float) -> float:
    return (fp8 - base) / base


def compare(base: dict, fp8: dict, tolerance: float) -> dict:
    if base["steps"] != fp8["steps"]:
        raise SystemExit("the two runs logged different steps; cannot compare")
    per_step = [rel_gap(f, b) for f, b in zip(fp8["loss"], base["loss"])]
    gaps = {
        "final_val_loss": rel_gap(fp8["final_val_loss"], base["final_val_loss"]),
        "last10_mean_loss": rel_gap(fp8["last10_mean_loss"], base["last10_mean_loss"]),
    }
    return {
        "per_step": per_step,
        **gaps,
        "mean_abs_per_step": sum(abs(g) for g in per_step) / len(per_step),
        "val_per_eval": {s: rel_gap(fp8["val_loss"][s], base["val_loss"][s]) for s in base["val_loss"]},
        "tolerance": tolerance,
        "within_tolerance": all(abs(g) <= tolerance for g in gaps.values()),
        "speedup": (fp8["tokens_per_s"] / base["tokens_per_s"]) if fp8["tokens_per_s"] and base["tokens_per_s"] else None,
    }


# ----------------------------------------------------------------------------------------------
# A PNG without matplotlib: an RGB canvas, lines, a 3×5 digit font, zlib encoding.

FONT = {  # 3 columns × 5 rows, one string per row
    "0": ["###", "#.#", "#.#", "#.#", "###"], "1": [".#.", "##.", ".#.", ".#.", "###"],
    "2": ["###", "..#", "###", "#..", "###"], "3": ["###", "..#", ".##", "..#", "###"],
    "4": ["#.#", "#.#", "###", "..#", "..#"], "5": ["###", "#..", "###", "..#", "###"],
    "6": ["###", "#..", "###", "#.#", "###"], "7": ["###", "..#", ".#.", ".#.", ".#."],
    "8": ["###", "#.#", "###", "#.#", "###"], "9": ["###", "#.#", "###", "..#", "###"],
    ".": ["...", "...", "...", "...", ".#."], "-": ["...", "...", "###", "...", "..."],
    "+": ["...", ".#.", "###", ".#.", "..."], "%": ["#.#", "..#", ".#.", "#..", "#.#"],
    " ": ["...", "...", "...", "...", "..."],
}


class Canvas:
    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, rgb) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            self.px[i:i + 3] = bytes(rgb)

    def line(self, x0, y0, x1, y1, rgb, dashed: bool = False) -> None:
        x0, y0, x1, y1 = map(round, (x0, y0, x1, y1))
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err, n = dx + dy, 0
        while True:  # Bresenham
            if not dashed or (n // 4) % 2 == 0:
                self.dot(x0, y0, rgb)
            if x0 == x1 and y0 == y1:
                return
            e2, n = 2 * err, n + 1
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, s: str, rgb=(0, 0, 0), scale: int = 2) -> None:
        for k, ch in enumerate(s):
            for row, bits in enumerate(FONT.get(ch, FONT[" "])):
                for col, bit in enumerate(bits):
                    if bit == "#":
                        for a in range(scale):
                            for b in range(scale):
                                self.dot(x + k * 4 * scale + col * scale + a, y + row * scale + b, rgb)

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        stride = self.w * 3
        raw = b"".join(b"\x00" + bytes(self.px[y * stride:(y + 1) * stride]) for y in range(self.h))
        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


BLUE, ORANGE, GREY, BLACK = (31, 119, 180), (255, 127, 14), (170, 170, 170), (0, 0, 0)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def plot(base: dict, fp8: dict, gap: dict, path: Path) -> None:
    """Two panels: train loss of both runs, and the relative gap in percent."""
    w, h, left, right = 900, 600, 90, 20
    c = Canvas(w, h)
    steps = base["steps"]
    x_of = lambda s: left + (s - steps[0]) / max(1, steps[-1] - steps[0]) * (w - left - right)  # noqa: E731

    def panel(top: int, bottom: int, series, lo: float, hi: float, guides=()):
        y_of = lambda v: bottom - (v - lo) / (hi - lo) * (bottom - top)  # noqa: E731
        c.line(left, top, left, bottom, BLACK)
        c.line(left, bottom, w - right, bottom, BLACK)
        labelled: list[float] = []
        for value, label in guides:
            y = y_of(value)
            c.line(left, y, w - right, y, GREY, dashed=value != 0)
            if all(abs(y - other) >= 14 for other in labelled):  # no overlapping labels
                c.text(4, round(y) - 5, label)
                labelled.append(y)
        for values, rgb in series:
            pts = [(x_of(s), y_of(v)) for s, v in zip(steps, values)]
            for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
                c.line(xa, ya, xb, yb, rgb)
        return y_of

    lo = min(min(base["loss"]), min(fp8["loss"]))
    hi = max(max(base["loss"]), max(fp8["loss"]))
    panel(20, 330, [(base["loss"], BLUE), (fp8["loss"], ORANGE)], lo, hi,
          guides=[(lo, _fmt(lo)), (hi, _fmt(hi))])
    pct = [100 * g for g in gap["per_step"]]
    tol = 100 * gap["tolerance"]
    bound = max(tol * 1.5, *(abs(p) for p in pct))
    panel(370, 560, [(pct, ORANGE)], -bound, bound,
          guides=[(0, "0"), (bound, f"+{bound:.2g}%"), (-bound, f"-{bound:.2g}%"),
                  (tol, f"+{tol:g}%"), (-tol, f"-{tol:g}%")])
    c.text(left, 572, str(steps[0]))
    c.text(w - right - 4 * 2 * len(str(steps[-1])), 572, str(steps[-1]))
    for i, rgb in enumerate((BLUE, ORANGE)):  # legend swatches: baseline, fp8
        for a in range(12):
            c.line(w - 80 + 30 * i, 28 + a, w - 62 + 30 * i, 28 + a, rgb)
    path.write_bytes(c.png())


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/smoke.yaml")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300: the smoke config)")
    p.add_argument("--out", default="runs/fp8_vs_bf16", help="output directory")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--baseline", choices=("fp32", "bf16"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--fp8-backend", choices=("te", "emulated"), default=None, help="default: te on GPU, emulated on CPU")
    p.add_argument("--recipe", choices=("blockwise", "current", "delayed", "mxfp8"), default="blockwise")
    p.add_argument("--tolerance", type=float, default=0.005, help="relative gap allowed by --check (0.005 = 0.5%%)")
    p.add_argument("--check", action="store_true", help="exit 1 if a headline gap exceeds --tolerance")
    p.add_argument("overrides", nargs="*", help="dotted.key=value for both runs (e.g. data.dir=...)")
    args = p.parse_args(argv)

    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    args.baseline = args.baseline or ("bf16" if gpu else "fp32")
    args.fp8_backend = args.fp8_backend or ("te" if gpu else "emulated")
    out = Path(args.out)

    base = run_training(args.config, args.baseline, args, out, args.overrides)
    fp8 = run_training(args.config, "fp8", args, out, args.overrides)
    fp8.update(backend=args.fp8_backend, recipe=args.recipe)
    gap = compare(base, fp8, args.tolerance)
    result = {"config": args.config, "steps": args.steps, "device": args.device, "overrides": args.overrides,
              "baseline": base, "fp8": fp8, "gap": gap}
    (out / "fp8_vs_bf16.json").write_text(json.dumps(result, indent=1))
    plot(base, fp8, gap, out / "fp8_vs_bf16.png")

    def mb(n):
        return f"{n / 2**20:.0f} MiB"

    print(json.dumps({
        "final_val_loss": {args.baseline: base["final_val_loss"], "fp8": fp8["final_val_loss"],
                           "rel_gap": gap["final_val_loss"]},
        "last10_mean_loss": {args.baseline: base["last10_mean_loss"], "fp8": fp8["last10_mean_loss"],
                             "rel_gap": gap["last10_mean_loss"]},
        "tokens_per_s": {args.baseline: base["tokens_per_s"], "fp8": fp8["tokens_per_s"]},
        "peak_mem": {args.baseline: mb(base["peak_mem_bytes"]), "fp8": mb(fp8["peak_mem_bytes"])},
        "within_tolerance": gap["within_tolerance"], "out": str(out),
    }, indent=1))
    return 1 if args.check and not gap["within_tolerance"] else 0


if __name__ == "__main__":
    sys.exit(main())
