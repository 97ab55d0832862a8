"""Expert-parallel layout bookkeeping and node-limited routing (no processes needed)."""

from __future__ import annotations

import pytest
import torch

from model import ConfigError
from model.moe import Router
from parallel.groups import ExpertLayout, validate
from train.config import load_config


def layout(rank: int, world: int, ep: int, experts: int = 8) -> ExpertLayout:
    return ExpertLayout(world, rank, ep, experts, f"ep_size_{ep}", None, None)


def test_deepspeed_convention_groups_and_ranges():
    # W = 4, ep = 2: EP groups [0 1] [2 3], EDP groups [0 2] [1 3]
    assert [layout(r, 4, 2).ep_group_ranks() for r in range(4)] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [layout(r, 4, 2).edp_group_ranks() for r in range(4)] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [layout(r, 4, 2).expert_range for r in range(4)] == [(0, 4), (4, 8), (0, 4), (4, 8)]
    assert [layout(r, 4, 4).expert_range for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert layout(3, 8, 2).edp_size == 4


@pytest.mark.parametrize("ep,world,experts,needle", [(3, 6, 8, "n_routed_experts"), (4, 6, 8, "world size"),
                                                     (0, 1, 8, ">= 1")])
def test_invalid_layouts_are_named(ep, world, experts, needle):
    with pytest.raises(ConfigError, match="parallel.ep") as err:
        validate(ep, world, experts)
    assert needle in str(err.value)


def _ranks_per_token(overrides: list[str]) -> list[int]:
    cfg = load_config("configs/ep_debug.yaml", overrides)
    m = cfg.model
    torch.manual_seed(0)
    router = Router(m)
    torch.nn.init.normal_(router.weight, std=1.0)
    idx = router(torch.randn(512, m.hidden_size)).topk_idx  # (tokens, top-k)
    per_rank = m.n_routed_experts // cfg.parallel.ep
    return [len(set((row // per_rank).tolist())) for row in idx]


def test_node_limited_routing_bounds_ranks_per_token():
    # 8 experts in 4 groups, top-4, one group per rank at EP=4
    common = ["parallel.ep=4", "model.num_experts_per_tok=4"]
    limited = _ranks_per_token(common + ["parallel.node_limited_routing=true", "model.topk_group=2"])
    assert max(limited) == 2  # at most topk_group ranks per token
    free = _ranks_per_token(common + ["model.topk_group=4"])
    assert max(free) > 2  # without the limit tokens do spread over more ranks: the bound is real
    with pytest.raises(ConfigError, match="parallel.node_limited_routing"):
        load_config("configs/ep_debug.yaml", ["parallel.ep=8", "parallel.node_limited_routing=true"])
