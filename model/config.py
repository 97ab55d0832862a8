"""ModelConfig: the network's shape, named as DeepSeek's and HF transformers' configs name it.

Field names follow the released DeepSeek-V3 `config.json` (and HF's DeepseekV3Config) so a
reader can put the two side by side. Defaults are the 671B model's; small configs override.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration value. The message names the field, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: {allowed}" if value is not None else f"{key}: {allowed}")


@dataclass
class RopeScaling:
    """YaRN context extension (DeepSeek-V3 report §4.3; HF `rope_parameters` with rope_type=yarn)."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass
class ModelConfig:
    # --- sizes ---
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN width (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # width of each routed and shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # --- MLA (report §2.1.1) ---
    q_lora_rank: int | None = 1536  # None: full-rank query projection (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # --- DeepSeekMoE (report §2.1.2) ---
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    first_k_dense_replace: int = 3
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2-style)
    seq_aux_loss_alpha: float = 0.0  # complementary sequence-wise balance loss α; 0 = off (report: 1e-4)
    moe_impl: str = "grouped"  # "grouped" (sorted tokens, one grouped GEMM) or "loop" (reference)
    # tokens per chunk of the fused head + cross-entropy (model/loss.py); 0 = the reference
    # path that materialises all logits. Does not change the result beyond fp32 rounding.
    loss_chunk_size: int = 256
    # --- MTP (report §2.2) ---
    num_nextn_predict_layers: int = 1  # MTP depth D
    mtp_loss_weight: float = 0.3  # λ; the trainer's schedule may override per step
    # --- positions and norms ---
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_interleave: bool = True
    rms_norm_eps: float = 1e-6
    # --- init and numerics ---
    initializer_range: float = 0.006  # report §4.2: all learnable parameters N(0, 0.006)
    tie_word_embeddings: bool = False  # DeepSeek does not tie input and output embeddings
    precision: str = "fp32"  # "fp32" | "bf16" | "fp8"; applied by the trainer, not by the modules

    # ------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def moe_layer_ids(self) -> list[int]:
        """Model layer index of every MoE layer, MTP blocks last (numbered from num_hidden_layers)."""
        main = list(range(self.first_k_dense_replace, self.num_hidden_layers))
        mtp = [self.num_hidden_layers + k for k in range(self.num_nextn_predict_layers)]
        return main + mtp

    @property
    def softmax_scale(self) -> float:
        """Attention logit scale: 1/sqrt(qk_head_dim), times YaRN's mscale² when extended (HF convention)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale = scale * m * m
        return scale

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        self.validate()

    def validate(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
            "n_group", "topk_group", "max_position_embeddings",
        ]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"model.{name}", v, "must be a positive integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ConfigError("model.q_lora_rank", self.q_lora_rank, "a positive integer, or null for full-rank q")
        if self.qk_rope_head_dim % 2:
            raise ConfigError("model.qk_rope_head_dim", self.qk_rope_head_dim, "must be even (rotary pairs)")
        if self.n_shared_experts < 0:
            raise ConfigError("model.n_shared_experts", self.n_shared_experts, "must be >= 0")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(
                "model.num_experts_per_tok", self.num_experts_per_tok,
                f"top-k cannot exceed n_routed_experts={self.n_routed_experts}",
            )
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                "model.n_group", self.n_group, f"must divide n_routed_experts={self.n_routed_experts}"
            )
        if self.topk_group > self.n_group:
            raise ConfigError("model.topk_group", self.topk_group, f"cannot exceed n_group={self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        if self.topk_group * per_group < self.num_experts_per_tok:
            raise ConfigError(
                "model.topk_group", self.topk_group,
                f"the {self.topk_group} kept groups hold {self.topk_group * per_group} experts, "
                f"fewer than num_experts_per_tok={self.num_experts_per_tok}",
            )
        if self.scoring_func == "sigmoid" and self.n_group > 1 and per_group < 2:
            raise ConfigError("model.n_group", self.n_group, "sigmoid group scores sum each group's top-2 experts: groups need >= 2 experts")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(
                "model.first_k_dense_replace", self.first_k_dense_replace,
                f"must be between 0 and num_hidden_layers={self.num_hidden_layers}",
            )
        if self.num_nextn_predict_layers < 0:
            raise ConfigError("model.num_nextn_predict_layers", self.num_nextn_predict_layers, "must be >= 0")
        choices = {
            "scoring_func": ("sigmoid", "softmax"),
            "moe_impl": ("grouped", "loop"),
            "precision": ("fp32", "bf16", "fp8"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}", getattr(self, name), f"one of {', '.join(allowed)}")
        if self.tie_word_embeddings:
            raise ConfigError("model.tie_word_embeddings", True, "DeepSeek-V3 does not tie embeddings; must be false")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0 or self.initializer_range <= 0:
            raise ConfigError("model.rms_norm_eps/rope_theta/initializer_range", None, "must be positive")
        if self.routed_scaling_factor <= 0:
            raise ConfigError("model.routed_scaling_factor", self.routed_scaling_factor, "must be positive")
        if self.loss_chunk_size < 0:
            raise ConfigError("model.loss_chunk_size", self.loss_chunk_size, "must be >= 0 (0: reference loss)")
        if self.seq_aux_loss_alpha < 0 or self.mtp_loss_weight < 0:
            raise ConfigError("model.seq_aux_loss_alpha/mtp_loss_weight", None, "must be >= 0")
        rs = self.rope_scaling
        if rs is not None:
            if rs.factor < 1:
                raise ConfigError("model.rope_scaling.factor", rs.factor, "must be >= 1")
            if rs.original_max_position_embeddings <= 0:
                raise ConfigError(
                    "model.rope_scaling.original_max_position_embeddings",
                    rs.original_max_position_embeddings, "must be a positive integer",
                )

    # ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model.{unknown[0]}", d[unknown[0]], "unknown key")
        return cls(**d)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1·mscale·ln(scale) + 1 (1 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


__all__ = ["ModelConfig", "RopeScaling", "ConfigError", "yarn_mscale"]
