"""ModelConfig validation and the published model sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from model import ConfigError, DeepSeekV3, ModelConfig

from .helpers import make_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _from_yaml(name: str) -> ModelConfig:
    return ModelConfig.from_dict(yaml.safe_load((CONFIGS / name).read_text())["model"])


@pytest.mark.parametrize(
    "overrides,key",
    [
        (dict(num_experts_per_tok=9), "model.num_experts_per_tok"),  # top-k larger than experts
        (dict(n_group=3), "model.n_group"),  # groups not dividing experts
        (dict(topk_group=5, n_group=4), "model.topk_group"),
        (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "model.topk_group"),  # kept groups too small
        (dict(kv_lora_rank=None), "model.kv_lora_rank"),  # kv_lora_rank missing
        (dict(q_lora_rank=0), "model.q_lora_rank"),
        (dict(qk_rope_head_dim=7), "model.qk_rope_head_dim"),
        (dict(scoring_func="relu"), "model.scoring_func"),
        (dict(first_k_dense_replace=9), "model.first_k_dense_replace"),
        (dict(tie_word_embeddings=True), "model.tie_word_embeddings"),
        (dict(precision="fp16"), "model.precision"),
    ],
)
def test_invalid_configs_name_the_field(overrides, key):
    with pytest.raises(ConfigError) as err:
        make_config(**overrides)
    assert err.value.key == key
    assert key in str(err.value)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="model.n_experts"):
        ModelConfig.from_dict({"n_experts": 8})


def test_671b_parameter_counts():
    cfg = _from_yaml("671b.yaml")
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    counts = model.parameter_counts()
    total, active = counts["total"], counts["active"]
    print(f"\n671b.yaml: total {total / 1e9:.2f}B (without MTP), activated {active / 1e9:.2f}B per token, "
          f"MTP module {counts['mtp'] / 1e9:.2f}B")
    assert abs(total / 671e9 - 1) < 0.01
    assert abs(active / 37e9 - 1) < 0.03


def test_16b_and_smoke_sizes():
    with torch.device("meta"):
        lite = DeepSeekV3(_from_yaml("16b.yaml")).parameter_counts()
        smoke = DeepSeekV3(_from_yaml("smoke.yaml")).parameter_counts()
    print(f"\n16b.yaml: total {lite['total'] / 1e9:.2f}B, active {lite['active'] / 1e9:.2f}B; "
          f"smoke.yaml: total {smoke['total'] / 1e6:.2f}M (+{smoke['mtp'] / 1e6:.2f}M MTP)")
    assert abs(lite["total"] / 15.7e9 - 1) < 0.02  # DeepSeek-V2-Lite: 15.7B total, 2.4B active
    assert abs(lite["active"] / 2.4e9 - 1) < 0.05
    assert 5e6 < smoke["total"] + smoke["mtp"] < 15e6
