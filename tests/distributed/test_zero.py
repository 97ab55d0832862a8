"""Two gloo ranks under torchrun: ZeRO-2 and ZeRO-0 give the same run, and so does one process
with the same global batch (DESIGN.md data order). Routing biases stay identical across ranks
(the loop checks that at every checkpoint and fails the run otherwise)."""

from __future__ import annotations

import pytest
import torch

from tests.support import rows, run_cli
from train.checkpoint import load_model_weights

pytestmark = pytest.mark.distributed


def _biases(run_dir):
    state = load_model_weights(run_dir / "checkpoints" / "step_00000005")
    return {k: v for k, v in state.items() if k.endswith("e_score_correction_bias")}


def test_zero2_equals_zero0_equals_one_process(tiny_data, tmp_path):
    common = [*tiny_data, "train.steps=5", "checkpoint.interval=5", "train.eval_interval=5"]
    runs = {
        "zero0_2proc": (2, ["parallel.zero_stage=0"]),
        "zero2_2proc": (2, ["parallel.zero_stage=2"]),
        "zero0_1proc": (None, ["parallel.zero_stage=0"]),
    }
    for name, (nproc, extra) in runs.items():
        run_cli("train", "configs/smoke.yaml", *common, *extra, f"train.run_dir={tmp_path / name}", nproc=nproc)
    ref = rows(tmp_path / "zero0_2proc")
    for name in ("zero2_2proc", "zero0_1proc"):
        other = rows(tmp_path / name)
        assert [r["step"] for r in other] == [r["step"] for r in ref]
        for a, b in zip(ref, other):
            for key in ("loss", "lm_loss", "mtp_loss", "val_loss", "grad_norm"):
                if a[key] is None:
                    assert b[key] is None
                else:
                    assert abs(a[key] - b[key]) < 1e-5, (name, a["step"], key, a[key], b[key])
    b0, b2, b1 = (_biases(tmp_path / n) for n in runs)
    assert b0.keys() == b2.keys() == b1.keys() and len(b0) == 2  # one main MoE layer + the MTP block
    for k in b0:
        assert b0[k].abs().sum() > 0, "the bias must have moved"
        torch.testing.assert_close(b2[k], b0[k], atol=0, rtol=0)
        torch.testing.assert_close(b1[k], b0[k], atol=0, rtol=0)
