"""The DeepSeek-V3 network as plain torch modules (no distributed code, no DeepSpeed, no TE)."""

from .config import ConfigError, ModelConfig, RopeScaling
from .moe import is_stacked_expert_weight, update_correction_bias
from .transformer import DeepSeekV3, ModelOutput, block_of

__all__ = ["DeepSeekV3", "ModelConfig", "RopeScaling", "ConfigError", "ModelOutput", "update_correction_bias", "block_of",
           "is_stacked_expert_weight"]
