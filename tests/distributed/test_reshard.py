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
        read_mib[name] = float(re.search(r"\(rank 0 read ([0-9.]+) MiB of weights and moments\)", proc.stderr)[1])
        (step4,) = [r for r in rows(run) if r["step"] == 4]
        losses[name] = (step4["loss"], step4["lm_loss"], step4["grad_norm"])
        weights[name] = load_model_weights(run / "checkpoints" / "step_00000004")
    ref = losses["ep2_w2_zero2"]
    for name, got in losses.items():
        assert all(abs(a - b) <= 1e-5 for a, b in zip(got, ref)), (name, got, ref)
    for name, w in weights.items():
        for k, v in w.items():
            torch.testing.assert_close(v, weights["ep2_w2_zero2"][k], atol=1e-5, rtol=0, msg=f"{name} {k}")
    # one process reads every tensor of the checkpoint; under ZeRO a rank reads only its own
    # fragments of the optimizer moments (and its own experts)
    step3 = saved / "checkpoints" / "step_00000003"
    everything = sum(t.nbytes for kind in ("model", "optim") for t in read_tensors(step3, kind).values())
    assert read_mib["ep1_w1_zero0"] == pytest.approx(everything / 2**20, abs=0.05)
    assert read_mib["ep2_w2_zero2"] < 0.75 * read_mib["ep1_w1_zero0"], read_mib
    assert read_mib["ep2_w4_zero1"] < read_mib["ep2_w2_zero2"], read_mib


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
