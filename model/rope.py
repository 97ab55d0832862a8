"""Rotary position embedding for MLA's decoupled key/query, with YaRN extension.

DeepSeek applies RoPE only to the `qk_rope_head_dim` slice of each head (report §2.1.1).
Released weights pair dimensions as (0,1), (2,3), ... ("interleaved"); `rope_interleave=False`
pairs dimension i with i + d/2 instead (the GPT-NeoX layout).
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig, yarn_mscale


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The rotary dimension whose wavelength fits `num_rotations` times into `max_pos` positions."""
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) in float64 and the factor cos/sin are multiplied by.

    Without scaling: theta^(-2i/d). With YaRN (Peng et al. 2023), high-frequency dimensions
    (more than beta_fast rotations over the original context) keep their frequency, low-frequency
    ones (fewer than beta_slow) are divided by `factor`, and a linear ramp blends in between.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim  # (dim/2,)
    inv_freq = 1.0 / (base**exponents)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq, 1.0
    low = math.floor(_yarn_correction_dim(rs.beta_fast, dim, base, rs.original_max_position_embeddings))
    high = math.ceil(_yarn_correction_dim(rs.beta_slow, dim, base, rs.original_max_position_embeddings))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: extrapolate (keep frequency), 0: interpolate (divide by factor)
    inv_freq = inv_freq / rs.factor * (1 - keep) + inv_freq * keep
    # cos/sin scale. With mscale == mscale_all_dim (as in V3) it is 1 and the whole YaRN
    # temperature goes into the softmax scale instead (ModelConfig.softmax_scale); with either
    # unset (0) it is the plain YaRN temperature, as HF computes it.
    if rs.mscale and rs.mscale_all_dim:
        attention_factor = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(rs.factor)
    return inv_freq, attention_factor


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for positions. Holds no state: the frequencies are recomputed per call
    (dim/2 numbers), so the module survives meta-device construction and dtype casts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (seq,) -> cos, sin each (seq, rope_dim/2) in fp32."""
        inv_freq, attention_factor = rope_frequencies(self.cfg)
        # float64 angles: at 128K positions fp32 would lose ~1e-2 rad of phase
        angles = positions.double()[:, None] * inv_freq.to(positions.device)[None, :]  # (seq, dim/2)
        return (angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x (batch, seq, heads, dim) by per-position angles; cos/sin (seq, dim/2). fp32 math."""
    dtype = x.dtype
    x = x.float()
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, seq, 1, dim/2)
    if interleave:
        # pairs (0,1), (2,3), ... as complex numbers times e^{iθ}: one kernel each way instead
        # of the slices, products and stack (same products and sums, bit-identical on CPU)
        out = _rotate_pairs(x, torch.complex(cos, sin))
    else:
        x1, x2 = x.chunk(2, dim=-1)  # pairs (i, i + dim/2)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(dtype)


def rotate_rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor:
    """x (batch, seq, heads, dim) whose dims [start:] are an interleaved rope slice: rotate that
    slice and leave [:start] as is, as one complex multiply over whole heads (by 1 on the pairs
    before `start`, which is exact) instead of split, rotate and concatenate, whose backward
    zero-fills and copies head-sized tensors. Same result as apply_rope on x[..., start:].
    """
    if start % 2:
        raise ValueError(f"the rope slice must start on a pair boundary, got {start}")
    keep = torch.ones(cos.shape[0], start // 2, dtype=torch.complex64, device=x.device)
    rotation = torch.cat([keep, torch.complex(cos, sin)], dim=-1)[None, :, None, :]  # (1, seq, 1, dim/2)
    return _rotate_pairs(x.float(), rotation).to(x.dtype)


def _rotate_pairs(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """fp32 x (..., dim): adjacent pairs as complex numbers, times complex `rotation` (broadcast
    over (..., dim/2)), back to (..., dim)."""
    pairs = x.unflatten(-1, (-1, 2))
    if pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
        pairs = pairs.contiguous()  # view_as_complex needs pair-aligned strides
    return torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2)
