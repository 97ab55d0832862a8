"""Training on CUDA without Transformer Engine: bf16 through DeepSpeed, and a resume that equals
the straight run. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from tests.support import rows, run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_resume_on_cuda_with_fused_adamw_equals_the_straight_run(tiny_data, tmp_path):
    """fused AdamW on CUDA keeps its step count on the device; a resumed run must restore it there
    (a host tensor fails inside the fused kernel) and then continue exactly."""
    args = [*tiny_data, "train.device=cuda", "model.precision=bf16", "parallel.zero_stage=2"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_cli("train", "configs/smoke.yaml", *args, f"train.run_dir={straight}", "train.steps=4")
    run_cli("train", "configs/smoke.yaml", *args, f"train.run_dir={stopped}", "train.steps=2")
    proc = run_cli("train", "configs/smoke.yaml", *args, f"train.run_dir={stopped}", "train.steps=4")
    assert "resumed from" in proc.stderr
    a = {r["step"]: r["loss"] for r in rows(straight)}
    b = {r["step"]: r["loss"] for r in rows(stopped)}
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) <= 1e-3 * abs(a[s]) for s in a if a[s] is not None)
