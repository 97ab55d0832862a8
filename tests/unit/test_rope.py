"""RoPE/YaRN frequencies and scales against HF's implementation."""

from __future__ import annotations

import pytest
import torch

from model import RopeScaling, hf
from model.rope import RotaryEmbedding, apply_rope, rope_frequencies, rotate_rope_tail

from .helpers import make_config

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        RopeScaling(factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1,
                    mscale_all_dim=1),  # the 671B long-context setting
        RopeScaling(factor=4, original_max_position_embeddings=512, mscale=0.707, mscale_all_dim=1.0),
        RopeScaling(factor=8, original_max_position_embeddings=256, mscale=0, mscale_all_dim=0),
    ],
)
def test_rope_frequencies_and_scales_match_hf(scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding, yarn_apply_mscale

    max_pos = 4096 if scaling is None else int(scaling.factor * scaling.original_max_position_embeddings)
    cfg = make_config(qk_rope_head_dim=64, rope_scaling=scaling, max_position_embeddings=max_pos)
    hcfg = transformers.DeepseekV3Config(
        **{k: v for k, v in hf.config_to_hf(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    )
    ours_freq, ours_factor = rope_frequencies(cfg)
    if scaling is None:
        ref = DeepseekV3RotaryEmbedding(hcfg)
        ref_freq, ref_factor = ref.inv_freq, ref.attention_scaling
    else:
        ref_freq, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](hcfg)
    torch.testing.assert_close(ours_freq.float(), ref_freq.float(), rtol=1e-6, atol=0)
    assert ours_factor == pytest.approx(ref_factor, rel=1e-7)
    ref_scale = yarn_apply_mscale(hcfg.rope_parameters, cfg.qk_head_dim**-0.5)
    assert cfg.softmax_scale == pytest.approx(ref_scale, rel=1e-7)

    # cos/sin through both modules. HF forms angles in fp32, off by up to ~p·2^-23 rad at
    # position p (ours are float64), so the tolerance is that bound at the largest position.
    pos = torch.arange(0, min(max_pos, 8192), 7)
    tol = 8192 * 2**-23
    cos, sin = RotaryEmbedding(cfg)(pos)
    ref_cos, ref_sin = DeepseekV3RotaryEmbedding(hcfg)(torch.zeros(1), pos[None])
    half = cfg.qk_rope_head_dim // 2
    torch.testing.assert_close(cos, ref_cos[0, :, :half], atol=tol, rtol=0)
    torch.testing.assert_close(sin, ref_sin[0, :, :half], atol=tol, rtol=0)


def test_interleaved_rope_rotates_adjacent_pairs():
    x = torch.zeros(1, 1, 1, 4)
    x[..., 0] = 1.0  # unit vector in the first pair
    angle = torch.tensor([[0.3, 0.0]])
    out = apply_rope(x, angle.cos(), angle.sin(), interleave=True)
    c, s_ = float(torch.tensor(0.3).cos()), float(torch.tensor(0.3).sin())
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([c, s_, 0.0, 0.0]))  # pair (0, 1) rotated
    out = apply_rope(x, angle.cos(), angle.sin(), interleave=False)  # pairs (0, 2), (1, 3)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([c, 0.0, s_, 0.0]))


def test_rope_is_relative():
    """q·k after rotation depends only on the position difference."""
    cfg = make_config()
    rot = RotaryEmbedding(cfg)
    q, k = torch.randn(1, 1, 1, cfg.qk_rope_head_dim), torch.randn(1, 1, 1, cfg.qk_rope_head_dim)

    def score(i, j):
        cos, sin = rot(torch.tensor([i, j]))
        qi = apply_rope(q, cos[:1], sin[:1], True)
        kj = apply_rope(k, cos[1:], sin[1:], True)
        return (qi * kj).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37), atol=1e-5, rtol=0)


def test_rotate_rope_tail_equals_split_rotate_concatenate():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, 20, generator=g)  # 12 nope dims, then an 8-dim interleaved rope slice
    angle = torch.randn(5, 4, generator=g)
    expected = torch.cat([x[..., :12], apply_rope(x[..., 12:], angle.cos(), angle.sin(), True)], dim=-1)
    got = rotate_rope_tail(x, angle.cos(), angle.sin(), 12)
    assert torch.equal(got[..., :12], x[..., :12])  # multiplying by 1 + 0i is exact
    torch.testing.assert_close(got, expected, atol=2e-7, rtol=1e-6)  # vectorised complex products: 1 ulp
