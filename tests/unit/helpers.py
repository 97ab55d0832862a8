"""Small model configs and utilities shared by the unit tests."""

from __future__ import annotations

import torch

from model import DeepSeekV3, ModelConfig, RopeScaling

BASE = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
    num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
    n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
    n_shared_experts=1, routed_scaling_factor=2.5, q_lora_rank=48, num_nextn_predict_layers=1,
    initializer_range=0.05, max_position_embeddings=64,
)

# Each parity config exercises a different part of the published architecture.
PARITY_CONFIGS = {
    "qlora_groups_dense_first": dict(n_group=4, topk_group=2, first_k_dense_replace=1),
    "full_rank_q_yarn": dict(
        q_lora_rank=None, n_group=2, topk_group=1, first_k_dense_replace=0, n_shared_experts=2,
        max_position_embeddings=128,
        rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=16, beta_fast=32, beta_slow=1,
                                 mscale=1.0, mscale_all_dim=1.0),
    ),
    "two_dense_top4_yarn_mscale_differs": dict(
        num_hidden_layers=4, first_k_dense_replace=2, n_routed_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=2, routed_scaling_factor=1.0, max_position_embeddings=64,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16, mscale=0.707, mscale_all_dim=1.0),
    ),
    "no_group_non_interleaved_rope_unnormalised": dict(rope_interleave=False, norm_topk_prob=False),
}


def make_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**BASE, **overrides})


def randomize_extras(model: DeepSeekV3, seed: int = 0) -> DeepSeekV3:
    """Make norm weights and routing biases non-trivial, so parity tests see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        for moe in model.moe_layers():
            b = moe.gate.e_score_correction_bias
            b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def build(seed: int = 0, **overrides) -> DeepSeekV3:
    torch.manual_seed(seed)
    return randomize_extras(DeepSeekV3(make_config(**overrides)), seed)
