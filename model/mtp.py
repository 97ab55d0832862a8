"""Multi-token prediction (report §2.2): D sequential modules after the main model.

Module k (1-based) sees, at position i, the representation h^{k-1}_i from the depth before it
(the main model for k = 1) and the embedding of token t_{i+k}; it predicts t_{i+k+1}:

    h'_i = W_k · [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)]     (2d -> d, embedding first)
    h^k  = TransformerBlock_k(h'_{0 .. T-k-1})
    p    = OutHead(RMSNorm_k(h^k))

Emb and OutHead are the main model's (shared). Each depth works on one position fewer: the
last k positions have no target t_{i+k+1}. h^{k-1} handed to the next depth is the normed
representation the head reads, as serving stacks (vLLM, SGLang) feed the main model's
final-normed hidden state to the first MTP module.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, block: nn.Module):
        super().__init__()
        self.layer_id = layer_id
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = block
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # "shared_head.norm" in the release

    def forward(self, prev_hidden: torch.Tensor, next_token_emb: torch.Tensor, cos, sin):
        """prev_hidden, next_token_emb (B, T', d) -> (normed hidden (B, T', d), counts, aux)."""
        h = self.eh_proj(torch.cat([self.enorm(next_token_emb), self.hnorm(prev_hidden)], dim=-1))
        h, counts, aux = self.block(h, cos, sin)
        return self.norm(h), counts, aux
