"""Multi-head Latent Attention (MLA), DeepSeek-V3 report §2.1.1.

    q   = W_uq · RMSNorm(W_dq · h)             (or W_q · h when q_lora_rank is None)
    c   = RMSNorm(W_dkv · h)                   the kv latent, width kv_lora_rank: all a cache keeps
    k_r = rope(W_kr · h)                       one rotary key shared by every head
    k   = [W_uk · c ; k_r],  v = W_uv · c

W_dkv and W_kr are one matrix (`kv_a_proj_with_mqa`), W_uk and W_uv one (`kv_b_proj`),
as in the released weights. Training materialises per-head k and v and runs causal SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rope, rotate_rope_tail


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, n = cfg.hidden_size, cfg.num_attention_heads
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(h, n * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, n * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, n * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(n * cfg.v_head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        n, nope, rope_d, vd = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim

        if cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, n, nope + rope_d)  # (B, T, H, qk_head_dim)

        kv_a = self.kv_a_proj_with_mqa(x)  # (B, T, kv_lora_rank + rope_d)
        c_kv, k_rope = kv_a.split([cfg.kv_lora_rank, rope_d], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(b, t, n, nope + vd)  # (B, T, H, nope + v)
        k_nope, v = kv.split([nope, vd], dim=-1)

        if cfg.rope_interleave:
            q = rotate_rope_tail(q, cos, sin, nope)  # (B, T, H, qk_head_dim), rope dims rotated
        else:
            q_nope, q_rope = q.split([nope, rope_d], dim=-1)
            q = torch.cat([q_nope, apply_rope(q_rope, cos, sin, False)], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin, cfg.rope_interleave)  # (B, T, 1, rope_d)

        k = torch.cat([k_nope, k_rope.expand(b, t, n, rope_d)], dim=-1)  # rope key shared by heads
        pad = q.shape[-1] - vd
        if pad > 0 and torch.backends.cuda.flash_sdp_enabled():  # (the flag covers CPU's kernel too)
            # Flash kernels (torch's CPU one, and on CUDA) want one head width for q, k and v;
            # zero columns of v give zero output columns, sliced off below. Without flash (say
            # under sdpa_kernel(MATH)) the padding would only add work.
            v = F.pad(v, (0, pad))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, scale=cfg.softmax_scale,
        )  # (B, H, T, qk_head_dim or v)
        return self.o_proj(out[..., :vd].transpose(1, 2).reshape(b, t, n * vd))
