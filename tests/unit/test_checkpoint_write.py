"""Who writes what in a checkpoint save (train/checkpoint.py _writing_plan): every tensor has
exactly one writer that holds it whole, the writers share the bytes, and at 671B no rank is left
holding more than one tensor's worth beyond its share."""

from __future__ import annotations

import os
import stat
from collections import Counter

import pytest
import torch

from model import DeepSeekV3, is_stacked_expert_weight
from parallel.groups import ExpertLayout
from train.checkpoint import _assign, _writing_plan, checkpoint_tensors
from train.config import load_config


def _meta_model(config: str) -> DeepSeekV3:
    with torch.device("meta"):
        return DeepSeekV3(load_config(config, []).model)


def test_assign_balances_largest_first_and_is_deterministic():
    sizes = {"a": 7, "b": 5, "c": 4, "d": 3, "e": 3, "f": 1}
    owner = _assign(sizes, 3)
    assert owner == _assign(dict(reversed(sizes.items())), 3)  # independent of the order given
    loads = Counter()
    for name, i in owner.items():
        loads[i] += sizes[name]
    assert sorted(loads.values()) == [7, 8, 8]  # a+f | b+e | c+d
    assert _assign(sizes, 1) == dict.fromkeys(sizes, 0)


@pytest.mark.parametrize("world,ep", [(1, 1), (2, 1), (2, 2), (4, 2), (8, 2), (4, 4), (64, 1)])
def test_every_tensor_has_one_writer_holding_it(world, ep):
    model = _meta_model("configs/smoke.yaml")
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    n_dense_params = sum(not is_stacked_expert_weight(n) for n in sizes)
    for rank in range(world):
        layout = ExpertLayout(world, rank, ep, 16, "g", None, None)
        dense, n_dense, experts, n_expert = _writing_plan(checkpoint_tensors(model), layout)
        assert set(dense) | set(experts) == set(sizes) and not set(dense) & set(experts)
        assert n_dense == min(world, n_dense_params)
        assert set(dense.values()) == set(range(n_dense))  # every dense part has a tensor
        # each expert tensor of this rank's shard goes to a rank holding the same shard
        assert {r % ep for r in experts.values()} == {layout.ep_rank}
        assert set(experts.values()) == {j * ep + layout.ep_rank for j in range(n_expert)}
        assert n_expert == min(world // ep, len(experts))
        # every rank computes the same dense plan
        assert dense == _writing_plan(checkpoint_tensors(model), ExpertLayout(world, 0, ep, 16, "g", None, None))[0]


def test_at_671b_no_rank_writes_more_than_its_share_plus_one_tensor():
    model = _meta_model("configs/671b.yaml")
    world, ep = 1536, 64
    layout = ExpertLayout(world, 5, ep, 256, "g", None, None)
    dense, n_dense, experts, n_expert = _writing_plan(checkpoint_tensors(model), layout)
    sizes = {n: p.numel() for n, p in model.named_parameters()}  # experts here: all 256, so / ep
    dense_load, expert_load = Counter(), Counter()
    for name, r in dense.items():
        dense_load[r] += sizes[name]
    for name, r in experts.items():
        expert_load[r] += sizes[name] // ep
    gb = 12 / 1e9  # fp32 value and two AdamW moments
    assert (n_dense, n_expert) == (810, 24)
    largest = max(sizes[n] for n in dense)
    assert max(dense_load.values()) == largest  # the head (or embedding) alone, 11.1 GB
    assert largest * gb < 11.2
    assert sum(dense_load.values()) * gb > 209  # what rank 0 held alone before
    assert max(expert_load.values()) * gb < 5.7 and sum(expert_load.values()) * gb > 124


def test_plan_reports_the_largest_write_save_makes():
    """dsv3 plan's per-rank figure (largest_write_elements, from tensor sizes alone) equals the
    most any rank writes under save's own plan, rank by rank, at 671B on 1536 ranks with EP=64."""
    from train.checkpoint import largest_write_elements
    from train.plan import plan

    model = _meta_model("configs/671b.yaml")
    world, ep = 1536, 64
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    per_rank = Counter()
    for ep_rank in range(ep):  # the expert plan depends on the shard only; the dense plan on nothing
        layout = ExpertLayout(world, ep_rank, ep, 256, "g", None, None)
        dense, _, experts, _ = _writing_plan(checkpoint_tensors(model), layout)
        for name, r in experts.items():
            per_rank[r] += sizes[name] // ep
    for name, r in dense.items():
        per_rank[r] += sizes[name]
    dense_sizes = {n: s for n, s in sizes.items() if not is_stacked_expert_weight(n)}
    expert_sizes = {n: s // ep for n, s in sizes.items() if is_stacked_expert_weight(n)}
    assert largest_write_elements(dense_sizes, expert_sizes, world, ep) == max(per_rank.values())
    report = plan(load_config("configs/671b.yaml", []))
    assert report["checkpoint_largest_write_bytes"] == 12 * max(per_rank.values())  # 16.76 GB
    assert report["checkpoint_bytes"] == 12 * sum(sizes.values()) + 4 * 58 * 256 + 4 * 256  # + routing biases


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_safetensors_files_get_the_mode_the_umask_gives_any_new_file(tmp_path, umask):
    # safetensors 0.8 alone leaves 0o600 (a temporary file renamed into place): checkpoints and
    # exports unreadable to a teammate's job running as another user
    from model.hf import save_safetensors

    old = os.umask(umask)
    try:
        save_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o666 & ~umask
