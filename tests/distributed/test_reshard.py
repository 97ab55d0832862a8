"""Checkpoints reshard: saved at EP=2 on 2 ranks (ZeRO-2), resumed at EP=1 on one process and at
EP=4 on 4 ranks, and EP=2 with expert-data-parallel replicas on 4 ranks: the next step's loss
equals continuing at EP=2 (within 1e-5; seen ≤ 1e-6), and every run writes the same weights."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from tests.support import rows, run_cli
from train.checkpoint import load_model_weights, read_tensors

pytestmark = pytest.mark.distributed


def test_resume_across_ep_and_world_sizes(tiny_data, tmp_path):
    base = [*tiny_data, "checkpoint.interval=1", "train.eval_interval=100"]
    saved = tmp_path / "saved"
    run_cli("train", "configs/smoke.yaml", *base, "train.steps=3", "parallel.ep=2", "parallel.zero_stage=2",
            f"train.run_dir={saved}", nproc=2)
    layouts = {
        "ep2_w2_zero2": (2, ["parallel.ep=2", "parallel.zero_stage=2"]),
        "ep1_w1_zero0": (None, ["parallel.ep=1", "parallel.zero_stage=0"]),
        "ep4_w4_zero0": (4, ["parallel.ep=4", "parallel.zero_stage=0", "train.micro_batch_size=2"]),
        "ep2_w4_zero1": (4, ["parallel.ep=2", "parallel.zero_stage=1", "train.micro_batch_size=2"]),
    }
    losses, weights, read_mib = {}, {}, {}
    for name, (nproc, extra) in layouts.items():
        run = tmp_path / name
        shutil.copytree(saved, run)
        proc = run_cli("train", "configs/smoke.yaml", *base, "train.steps=4", *extra, f"train.run_dir={run}",
                       nproc=nproc)
        line = re.search(r"\(read ([0-9.]+) MiB of weights and moments(?:, at most ([0-9.]+) MiB by one rank)?\)",
                         proc.stderr)
        read_mib[name] = (float(line[1]), float(line[2] or line[1]))
        (step4,) = [r for r in rows(run) if r["step"] == 4]
        losses[name] = (step4["loss"], step4["lm_loss"], step4["grad_norm"])
        weights[name] = load_model_weights(run / "checkpoints" / "step_00000004")
    ref = losses["ep2_w2_zero2"]
    for name, got in losses.items():
        assert all(abs(a - b) <= 1e-5 for a, b in zip(got, ref)), (name, got, ref)
    for name, w in weights.items():
        for k, v in w.items():
            torch.testing.assert_close(v, weights["ep2_w2_zero2"][k], atol=1e-5, rtol=0, msg=f"{name} {k}")
    # Each layout reads the checkpoint once in all: a tensor that several ranks hold is read by
    # one of them and broadcast, and under ZeRO each rank reads only its fragments of the
    # moments (whole rows: a row that two fragments share is read twice, hence the slack).
    # Every rank reading all it holds reads 3.0 (ep2_w2_zero2), 6.6 and 4.3 MiB in all here.
    step3 = saved / "checkpoints" / "step_00000003"
    everything = sum(t.nbytes for kind in ("model", "optim") for t in read_tensors(step3, kind).values()) / 2**20
    for name, (total, most) in read_mib.items():
        assert everything - 0.05 <= total <= everything + 0.1, (name, read_mib, everything)
    nproc = {name: nproc or 1 for name, (nproc, _) in layouts.items()}
    for name, (total, most) in read_mib.items():
        assert most <= total / nproc[name] + 0.25, (name, read_mib)  # shared out, up to the largest tensor


def test_weights_only_start_under_expert_parallelism(tiny_data, tmp_path):
    """A weights-only checkpoint (what import-hf writes) starts an EP=2 run on 2 ranks (ZeRO-2)
    from exactly the weights one process starts from: each rank reads its own experts."""
    from model import DeepSeekV3
    from train import checkpoint as ckpt_io
    from train.config import load_config

    cfg = load_config("configs/smoke.yaml", tiny_data)
    torch.manual_seed(7)
    model = DeepSeekV3(cfg.model)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # far from any fresh init: step 0's val loss shows whose weights run
    init = ckpt_io.save_weights_only(model.state_dict(), tmp_path / "init", cfg.model)
    base = [*tiny_data, "train.steps=1", "checkpoint.interval=100"]
    first = {}
    for name, nproc, extra in (("one", None, ["parallel.ep=1"]),
                               ("ep2", 2, ["parallel.ep=2", "parallel.zero_stage=2"]),
                               ("fresh", None, ["parallel.ep=1", "train.resume=never"])):
        run = tmp_path / name
        resume = [] if name == "fresh" else [f"train.resume={init}"]
        run_cli("train", "configs/smoke.yaml", *base, *resume, *extra, f"train.run_dir={run}", nproc=nproc)
        first[name] = (rows(run)[0]["val_loss"], [r for r in rows(run) if r["step"] == 1][0]["loss"])
    assert abs(first["one"][0] - first["fresh"][0]) > 0.5, first
    assert all(abs(a - b) <= 1e-5 for a, b in zip(first["ep2"], first["one"])), first
