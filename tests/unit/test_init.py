"""Initialisation (model/transformer.py init_weights): per-weight seeded draws, so a model built on
the meta device and materialised, or an expert-parallel shard holding only some experts, gets
exactly the values of a model built whole."""

from __future__ import annotations

import itertools

import pytest
import torch

from model import DeepSeekV3
from model.moe import RoutedExperts

from .helpers import make_config


def built(seed: int, meta: bool = False, **overrides) -> DeepSeekV3:
    torch.manual_seed(seed)
    if not meta:
        return DeepSeekV3(make_config(**overrides))
    with torch.device("meta"):
        return DeepSeekV3(make_config(**overrides))


def assert_same(a: DeepSeekV3, b: DeepSeekV3) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_meta_build_materialises_to_the_model_built_whole():
    model = built(3, meta=True)
    assert all(p.is_meta for p in model.parameters())
    assert_same(model.materialize(), built(3))


def test_the_global_seed_fixes_the_model():
    assert_same(built(5), built(5))
    a, b = built(5).state_dict(), built(6).state_dict()
    assert not torch.equal(a["layers.1.mlp.experts.gate_up_proj"], b["layers.1.mlp.experts.gate_up_proj"])


def test_report_init_and_no_two_weights_alike():
    """N(0, initializer_range) weights, unit norms, zero routing biases; every expert and every
    weight draws its own values (a shared seed would make experts start identical)."""
    model = built(0, n_routed_experts=16)
    std = model.cfg.initializer_range
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif p.numel() > 1000:
            assert abs(p.std().item() - std) < 0.05 * std, name
    for moe in model.moe_layers():
        assert torch.equal(moe.gate.e_score_correction_bias, torch.zeros_like(moe.gate.e_score_correction_bias))
        w = moe.experts.gate_up_proj
        for i, j in itertools.combinations(range(w.shape[0]), 2):
            assert not torch.equal(w[i], w[j]), (i, j)
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not name.endswith("norm.weight"):
            by_shape.setdefault(tuple(p.shape), []).append(p)
    for group in by_shape.values():
        for a, b in itertools.combinations(group, 2):
            assert not torch.equal(a, b)


@pytest.mark.parametrize("first,last", [(0, 4), (4, 8), (2, 6)])
def test_an_expert_shard_initialises_the_rows_the_whole_model_holds(first, last):
    """What expert parallelism does (parallel/expert_parallel.py): swap a layer's experts for a
    module holding experts [first, last) on the meta device, then materialise."""
    whole = built(1)
    model = built(1, meta=True)
    cfg = model.cfg
    for moe in model.moe_layers():
        with torch.device("meta"):
            shard = RoutedExperts(last - first, cfg.hidden_size, cfg.moe_intermediate_size)
        shard.first_expert = first
        moe.experts = shard
    model.materialize()
    got, full = model.state_dict(), whole.state_dict()
    for k, v in got.items():
        expected = full[k][first:last] if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else full[k]
        assert torch.equal(v, expected), k


def test_materialize_keeps_parameter_marks_and_leaves_real_models_alone():
    model = built(2, meta=True)
    model.layers[1].mlp.experts.down_proj.allreduce = False  # as expert parallelism marks its params
    model.materialize()
    assert model.layers[1].mlp.experts.down_proj.allreduce is False
    before = model.embed_tokens.weight
    with torch.no_grad():
        before.add_(1.0)
    assert model.materialize().embed_tokens.weight is before  # nothing re-initialised


def test_materialize_in_bf16_rounds_the_fp32_values_and_keeps_buffers_fp32():
    """bf16 training materialises parameters in bf16 directly (parallel/engine.py): the values are
    the fp32 ones rounded, as DeepSpeed's cast of an fp32 model would give; routing biases stay fp32."""
    model = built(4, meta=True).materialize(dtype=torch.bfloat16)
    whole = built(4).state_dict()
    for k, v in model.state_dict().items():
        expected = whole[k] if k.endswith("e_score_correction_bias") else whole[k].to(torch.bfloat16)
        assert v.dtype == expected.dtype and torch.equal(v, expected), k
