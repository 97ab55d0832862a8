"""FP8 training end to end through the real CLI (`model.precision=fp8`, emulated backend on CPU)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support import REPO, rows, run_cli

STEPS = 40
# Relative gap allowed between fp32 and emulated FP8 (same seed and data) on the tiny config after
# STEPS steps: the smoke bar, 0.5%, on the mean gap over SEEDS. One seed is a single draw of a
# chaotic 40-step trajectory: over six seeds the final-val gap ranged 0.0006%..0.50% (median 0.1%),
# and any change to fp32 rounding anywhere redraws it; the mean of three is the steadier statistic
# (measured: val -0.08%, train -0.12%; per seed val +0.11/-0.42/+0.06%). For scale, fp32 runs that
# differ only in train.seed differ by ~1% in val loss, so a broken FP8 path (wrong tiles, lost
# grads) would not hide under it.
TINY_TOLERANCE = 0.005
SEEDS = (None, 1, 2)  # None: the config's own seed, the run the other tests here also use


def train(tiny_data, run_dir: Path, *extra: str, steps: int = STEPS) -> subprocess.CompletedProcess:
    return run_cli("train", "configs/smoke.yaml", *tiny_data, f"train.run_dir={run_dir}", f"train.steps={steps}",
                   "train.eval_interval=20", "checkpoint.interval=20", *extra)


@pytest.fixture(scope="module")
def tiny_runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    runs = {}
    for precision in ("fp32", "fp8"):
        runs[precision] = tmp_path_factory.mktemp(precision)
        proc = train(tiny_data, runs[precision], f"model.precision={precision}", "fp8.backend=emulated")
        runs[precision + "_stderr"] = proc.stderr
    return runs


def last_tenth_mean(run: Path) -> float:
    losses = [r["loss"] for r in rows(run) if r["step"] >= 1]
    k = max(1, len(losses) // 10)
    return sum(losses[-k:]) / k


def final_val(run: Path) -> float:
    return [r["val_loss"] for r in rows(run) if r["val_loss"] is not None][-1]


def test_fp8_emulated_trains_and_loss_falls(tiny_runs):
    assert "fp8 (emulated, blockwise)" in tiny_runs["fp8_stderr"]  # the plan is printed
    table = rows(tiny_runs["fp8"])
    vals = [r["val_loss"] for r in table if r["val_loss"] is not None]
    assert len(vals) == 3 and vals[-1] < vals[0] - 0.5
    losses = [r["loss"] for r in table if r["step"] >= 1]
    assert len(losses) == STEPS and all(x == x for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5


def test_fp8_tracks_fp32_on_the_tiny_config(tiny_data, tiny_runs, tmp_path):
    val_gaps, train_gaps = [], []
    for seed in SEEDS:
        if seed is None:
            fp32, fp8 = tiny_runs["fp32"], tiny_runs["fp8"]
        else:
            fp32, fp8 = tmp_path / f"fp32-{seed}", tmp_path / f"fp8-{seed}"
            for run, precision in ((fp32, "fp32"), (fp8, "fp8")):
                train(tiny_data, run, f"model.precision={precision}", "fp8.backend=emulated", f"train.seed={seed}")
        assert final_val(fp8) != final_val(fp32)  # FP8 really ran
        val_gaps.append((final_val(fp8) - final_val(fp32)) / final_val(fp32))
        train_gaps.append((last_tenth_mean(fp8) - last_tenth_mean(fp32)) / last_tenth_mean(fp32))
    val_gap, train_gap = sum(val_gaps) / len(SEEDS), sum(train_gaps) / len(SEEDS)
    assert abs(val_gap) < TINY_TOLERANCE, val_gaps
    assert abs(train_gap) < TINY_TOLERANCE, train_gaps


def test_fp8_checkpoint_resumes_exactly_and_exports_like_fp32(tiny_data, tiny_runs, tmp_path):
    # resume the FP8 run from its step-20 checkpoint to STEPS: the swapped model loads its own
    # checkpoint (model, optimizer, data position, RNG) and retraces the run bit for bit on CPU
    run = tmp_path / "resumed"
    shutil.copytree(tiny_runs["fp8"], run)
    shutil.rmtree(run / "checkpoints" / "step_00000040")
    proc = train(tiny_data, run, "model.precision=fp8", "fp8.backend=emulated")
    assert "resumed from" in proc.stderr and "step_00000020" in proc.stderr
    straight = {r["step"]: r["loss"] for r in rows(tiny_runs["fp8"])}
    resumed = {r["step"]: r["loss"] for r in rows(run)}
    assert sorted(resumed) == sorted(straight)
    assert all(resumed[s] == straight[s] for s in range(21, STEPS + 1))

    # the HF export reads the same state-dict keys as an fp32 run's
    from model import hf

    for precision in ("fp32", "fp8"):
        run_cli("export-hf", str(tiny_runs[precision]), str(tmp_path / f"hf_{precision}"))
    a = hf.from_pretrained(tmp_path / "hf_fp8").state_dict()
    b = hf.from_pretrained(tmp_path / "hf_fp32").state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # different training, same layout


def test_te_backend_on_cpu_exits_2_naming_the_gpu_extra(tiny_data, tmp_path):
    proc = run_cli("train", "configs/smoke.yaml", *tiny_data, f"train.run_dir={tmp_path}", "model.precision=fp8",
                   "fp8.backend=te", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "fp8.backend" in proc.stderr and "pip install 'dsv3[gpu]'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_smoke_fp8_within_half_percent_of_fp32(request, tmp_path):
    """The full comparison: configs/smoke.yaml, 300 steps per precision and seed (~3 min fp32, ~5 min
    emulated FP8 on 2 cores, three seeds). As in the tiny test, one 300-step run is one draw of a
    chaotic trajectory (measured: -0.35% then -0.67% final-val gap for the same seed before and
    after an fp32-rounding-only change of the model), so the 0.5% bar applies to the mean over SEEDS
    (measured: val +0.14/+0.24/+0.51%, mean +0.30%; train +0.20/-0.16/-0.09%, mean -0.02%).
    Runs only when asked for: pytest -m slow tests/e2e/test_fp8.py"""
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("the 300-step smoke comparison runs with -m slow")
    if not (REPO / "data/shakespeare/manifest.json").is_file():
        run_cli("prepare-data", "configs/smoke.yaml")
    # every core, as `make smoke` runs (conftest pins tests to one thread); the gap was measured so
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())}
    gaps = []
    for seed in SEEDS:
        out = tmp_path / f"bench-{seed}"
        seed_override = [] if seed is None else [f"train.seed={seed}"]
        proc = subprocess.run([sys.executable, "benchmarks/fp8_vs_bf16.py", "--device", "cpu", "--out", str(out),
                               *seed_override], cwd=REPO, capture_output=True, text=True, timeout=3600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        gaps.append(json.loads((out / "fp8_vs_bf16.json").read_text())["gap"])
        assert (out / "fp8_vs_bf16.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in ("final_val_loss", "last10_mean_loss"):
        mean = sum(g[key] for g in gaps) / len(gaps)
        assert abs(mean) < 0.005, (key, [g[key] for g in gaps])


def test_fp8_on_bf16_weights_trains_and_resumes_exactly(tiny_data, tiny_runs, tmp_path):
    """fp8.weights=bf16 (DeepSpeed's bf16 engine at ZeRO-2, the emulated FP8 GEMMs quantising from
    bf16 module weights) through the CLI: a run stopped at step 2 and resumed equals the straight
    one bit for bit, and its first loss is the fp32-weights FP8 run's up to bf16 rounding."""
    over = ["model.precision=fp8", "fp8.backend=emulated", "fp8.weights=bf16", "parallel.zero_stage=2",
            "checkpoint.interval=2"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(tiny_data, straight, *over, steps=4)
    for steps in (2, 4):
        train(tiny_data, stopped, *over, steps=steps)
    a = {r["step"]: r["loss"] for r in rows(straight) if r["loss"] is not None}
    b = {r["step"]: r["loss"] for r in rows(stopped) if r["loss"] is not None}
    assert sorted(a) == [1, 2, 3, 4] and a == b
    fp32_weights = next(r["loss"] for r in rows(tiny_runs["fp8"]) if r["step"] == 1)
    assert a[1] != fp32_weights and abs(a[1] - fp32_weights) < 0.01 * fp32_weights, (a[1], fp32_weights)
