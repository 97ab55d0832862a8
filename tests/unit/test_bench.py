"""`dsv3 bench`: the JSON contract on a tiny config, MFU = flops_per_token · tokens/s / peak, and the
breakdown's profiler scopes under activation checkpointing."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support import run_cli
from train.bench import PARTS, _Scopes, breakdown_from_profile

from .helpers import build

TINY = [
    "model.vocab_size=256", "model.hidden_size=32", "model.intermediate_size=64", "model.moe_intermediate_size=16",
    "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.q_lora_rank=16", "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8", "model.n_routed_experts=4",
    "model.n_group=2", "model.topk_group=1", "model.max_position_embeddings=64", "data.seq_len=16",
    "train.micro_batch_size=2", "train.global_batch_size=2", "logging.wandb=disabled",
]
KEYS = ("tokens_per_s", "step_time_s", "mfu", "peak_mem_bytes", "flops_per_token", "peak_flops", "breakdown_s",
        "breakdown_fraction")


def test_bench_json_keys_and_mfu():
    proc = run_cli("bench", "configs/smoke.yaml", "--steps", "2", "--warmup", "1", "--json", *TINY)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # exactly one JSON object on stdout
    for key in KEYS:
        assert key in result, key
    assert result["tokens_per_s"] > 0 and result["step_time_s"] > 0 and result["peak_mem_bytes"] > 0
    assert result["tokens_per_s"] == pytest.approx(result["tokens_per_step"] / result["step_time_s"])
    assert result["mfu"] == pytest.approx(result["flops_per_token"] * result["tokens_per_s"] / result["peak_flops"])
    assert set(result["breakdown_s"]) == {"attention", "router", "expert_gemm", "dispatch", "head_loss",
                                          "optimizer", "communication", "other"}
    assert result["breakdown_s"]["attention"] > 0 and result["breakdown_s"]["expert_gemm"] > 0
    assert result["breakdown_s"]["head_loss"] > 0
    assert "profiler_st" not in proc.stderr  # kineto's own start/stop lines stay out of the report


def test_breakdown_scopes_close_under_activation_checkpointing():
    """The recompute stops by raising inside the last module that saves a tensor (the routed
    experts when there are no shared experts): every scope must still close, so each recomputed
    block nests in the backward node that reran it, and no part comes out negative."""
    model = build(seed=0, n_shared_experts=0).train()
    model.activation_checkpointing = True
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    scopes = _Scopes(model)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    finally:
        scopes.remove()

    def in_backward(ev) -> bool:
        while ev.cpu_parent is not None:
            ev = ev.cpu_parent
            if ev.name.startswith("autograd::engine::evaluate_function"):
                return True
        return False

    # a scope left open ends up outside the backward node that ran the recompute
    recomputed = [ev.name for ev in prof.events() if ev.name.startswith("bench::") and in_backward(ev)]
    blocks = len(model.layers) + 2 * len(model.mtp)  # an MTP module and the decoder block inside it
    assert recomputed.count("bench::block") == blocks
    assert recomputed.count("bench::experts") == len(model.moe_layers())
    parts = breakdown_from_profile(prof.events())
    assert all(parts.get(p, 0.0) >= 0 for p in PARTS) and parts["attention"] > 0 and parts["dispatch"] > 0


@pytest.mark.parametrize("kwargs, field", [(dict(steps=0), "--steps"), (dict(warmup=-1), "--warmup")])
def test_bench_refuses_a_count_it_cannot_time_by_name(kwargs, field):
    # --steps 0 used to train the warmup and then divide by zero
    from model import ConfigError
    from train.bench import bench
    from train.config import load_config

    with pytest.raises(ConfigError, match=field):
        bench(load_config("configs/smoke.yaml"), **kwargs)
