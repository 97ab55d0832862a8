"""Convert to and from HF transformers' DeepseekV3 checkpoint layout (config.json + safetensors).

The layout is the official DeepSeek-V3 release's, which is also what transformers 5.x writes:
one tensor per expert (`mlp.experts.{e}.gate_proj.weight`, ...), MTP module k stored as decoder
layer `num_hidden_layers + k - 1` with its extra parts (`enorm`, `hnorm`, `eh_proj`,
`shared_head.norm`, and copies of the embedding and output head). transformers' CausalLM class
skips those MTP layers when loading. Weights stored as float8_e4m3fn with a 128×128-block
`weight_scale_inv` (as the release ships them) are dequantised on import.

Our modules keep the experts of a layer stacked (`gate_up_proj` (E, 2I, d), `down_proj` (E, d, I));
everything else has the same name as in HF, under `model.` (see DeepSeekV3).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig, RopeScaling
from .transformer import DeepSeekV3, init_weights

log = logging.getLogger(__name__)

FP8_BLOCK = 128

# ModelConfig fields whose HF config.json key is the same name.
_SAME_NAME = [
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
    "first_k_dense_replace", "routed_scaling_factor", "norm_topk_prob", "num_nextn_predict_layers",
    "max_position_embeddings", "rms_norm_eps", "rope_interleave", "initializer_range", "tie_word_embeddings",
    "scoring_func",
]


# ---------------------------------------------------------------- config
def config_to_hf(cfg: ModelConfig) -> dict:
    if cfg.scoring_func != "sigmoid":
        raise ValueError(
            f"model.scoring_func={cfg.scoring_func!r}: HF's DeepseekV3 routes with sigmoid only; "
            "a softmax-router model cannot be exported in its layout"
        )
    d = {k: getattr(cfg, k) for k in _SAME_NAME}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope.update(
            rope_type="yarn", factor=rs.factor, original_max_position_embeddings=rs.original_max_position_embeddings,
            beta_fast=rs.beta_fast, beta_slow=rs.beta_slow, mscale=rs.mscale, mscale_all_dim=rs.mscale_all_dim,
        )
    d.update(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_act="silu",
        num_key_value_heads=cfg.num_attention_heads, attention_bias=False, rope_parameters=rope,
        topk_method="noaux_tc", torch_dtype="float32",
    )
    return d


def config_from_hf(d: dict) -> ModelConfig:
    if d.get("model_type") not in (None, "deepseek_v3"):
        raise ValueError(f"config.json model_type={d.get('model_type')!r}: expected 'deepseek_v3'")
    if d.get("attention_bias"):
        raise ValueError("config.json attention_bias=true: DeepSeek-V3 has no attention biases")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={d['hidden_act']!r}: only silu is supported")
    kw = {k: d[k] for k in _SAME_NAME if k in d}
    # Old-style configs (the official release) use rope_theta + rope_scaling{type: yarn, ...}.
    rope = d.get("rope_parameters") or dict(d.get("rope_scaling") or {}, rope_theta=d.get("rope_theta", 10000.0))
    kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "yarn":
        kw["rope_scaling"] = RopeScaling(
            factor=float(rope["factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
            mscale=float(rope.get("mscale") or 0), mscale_all_dim=float(rope.get("mscale_all_dim") or 0),
        )
    elif rope_type != "default":
        raise ValueError(f"config.json rope type {rope_type!r}: only default and yarn are supported")
    kw.setdefault("num_nextn_predict_layers", d.get("num_mtp_layers", 0))
    kw.pop("tie_word_embeddings", None)  # validated by ModelConfig when True
    if d.get("tie_word_embeddings"):
        raise ValueError("config.json tie_word_embeddings=true: DeepSeek-V3 does not tie embeddings")
    return ModelConfig(**kw)


# ---------------------------------------------------------------- state dict
def _block_to_hf(prefix: str, block_sd: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    """One decoder block's tensors (names relative to the block) into HF keys under prefix."""
    for name, t in block_sd.items():
        if name == "mlp.experts.gate_up_proj":
            gate, up = t.chunk(2, dim=1)  # (E, I, d) each
            for e in range(t.shape[0]):
                out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gate[e]
                out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = up[e]
        elif name == "mlp.experts.down_proj":
            for e in range(t.shape[0]):
                out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = t[e]
        else:
            out[prefix + name] = t


def _sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def state_dict_to_hf(model: DeepSeekV3) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {
        "model.embed_tokens.weight": sd["embed_tokens.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        _block_to_hf(f"model.layers.{i}.", _sub(sd, f"layers.{i}."), out)
    for k in range(cfg.num_nextn_predict_layers):
        p, mine = f"model.layers.{cfg.num_hidden_layers + k}.", f"mtp.{k}."
        for part in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
            out[p + part] = sd[mine + part]
        out[p + "shared_head.norm.weight"] = sd[mine + "norm.weight"]
        # The release stores its own copies of the shared embedding and head with each MTP layer.
        out[p + "embed_tokens.weight"] = sd["embed_tokens.weight"]
        out[p + "shared_head.head.weight"] = sd["lm_head.weight"]
        _block_to_hf(p, _sub(sd, mine + "block."), out)
    return out


_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _block_from_hf(hf: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """HF tensors of one block (names relative to it) into our names, stacking experts."""
    out, experts = {}, {}
    for name, t in hf.items():
        m = _EXPERT.match(name)
        if m:
            experts[(int(m.group(1)), m.group(2))] = t
        else:
            out[name] = t
    if experts:
        try:
            gate = torch.stack([experts[(e, "gate_proj")] for e in range(n_experts)])
            up = torch.stack([experts[(e, "up_proj")] for e in range(n_experts)])
            down = torch.stack([experts[(e, "down_proj")] for e in range(n_experts)])
        except KeyError as err:
            raise KeyError(f"checkpoint lacks expert weight {err.args[0]} (expected {n_experts} experts)") from None
        out["mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out["mlp.experts.down_proj"] = down
    return out


_MTP_EXTRA = {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
              "embed_tokens.weight", "shared_head.head.weight"}


def state_dict_from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    L = cfg.num_hidden_layers
    out = {
        "embed_tokens.weight": hf["model.embed_tokens.weight"],
        "norm.weight": hf["model.norm.weight"],
        "lm_head.weight": hf["lm_head.weight"],
    }
    for i in range(L):
        for k, v in _block_from_hf(_sub(hf, f"model.layers.{i}."), cfg.n_routed_experts).items():
            out[f"layers.{i}.{k}"] = v
    for k in range(cfg.num_nextn_predict_layers):
        layer = _sub(hf, f"model.layers.{L + k}.")
        if not layer:
            continue  # no MTP weights stored (transformers' own save_pretrained drops them)
        for part in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
            out[f"mtp.{k}.{part}"] = layer[part]
        out[f"mtp.{k}.norm.weight"] = layer["shared_head.norm.weight"]
        block = {n: t for n, t in layer.items() if n not in _MTP_EXTRA}
        for n, t in _block_from_hf(block, cfg.n_routed_experts).items():
            out[f"mtp.{k}.block.{n}"] = t
    return out


# ---------------------------------------------------------------- FP8 (release format)
def dequantize_fp8_blockwise(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """float8 weight (out, in) with one scale per block×block tile (ceil(out/b), ceil(in/b)) -> fp32.

    The release's `weight_scale_inv` multiplies: w = q · scale_inv, tile by tile.
    """
    out_f, in_f = weight.shape
    if scale_inv.shape != (math.ceil(out_f / block), math.ceil(in_f / block)):
        raise ValueError(f"weight_scale_inv shape {tuple(scale_inv.shape)} does not tile weight {tuple(weight.shape)}")
    s = scale_inv.float().repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]
    return weight.float() * s


# ---------------------------------------------------------------- files
def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    tensors = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    for k in [k for k in tensors if k.endswith(".weight_scale_inv")]:
        wkey = k[: -len("_scale_inv")]
        tensors[wkey] = dequantize_fp8_blockwise(tensors[wkey], tensors.pop(k))
    return tensors


def from_pretrained(path: str | Path, **overrides) -> DeepSeekV3:
    """Build our model from an HF-format directory (config.json + safetensors). Overrides go to ModelConfig."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file}: not found (expected an HF DeepseekV3 checkpoint directory)")
    cfg = config_from_hf(json.loads(cfg_file.read_text()))
    if overrides:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), **overrides})
    hf = _read_safetensors(path)
    if "model.layers.0.mlp.experts.gate_up_proj" in hf or any(".experts.gate_up_proj" in k for k in hf):
        raise ValueError(f"{path}: fused expert tensors are not supported; save with transformers' save_pretrained")
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    ours = state_dict_from_hf(hf, cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ours))
    fresh_mtp = bool(missing) and all(k.startswith("mtp.") for k in missing)
    if fresh_mtp:
        log.warning("%s: no MTP weights for num_nextn_predict_layers=%d; MTP modules start from a fresh init",
                    path, cfg.num_nextn_predict_layers)
    elif missing:
        raise KeyError(f"{path}: checkpoint lacks {missing[0]} (and {len(missing) - 1} more) for this config")
    for k, v in expected.items():
        if k in ours and ours[k].shape != v.shape:
            raise ValueError(f"{path}: {k} has shape {tuple(ours[k].shape)}, config expects {tuple(v.shape)}")
    model.to_empty(device="cpu")
    if fresh_mtp:
        init_weights(model.mtp, cfg.initializer_range, model.init_seed, prefix="mtp")
        model.load_state_dict({k: ours[k].to(v.dtype) for k, v in expected.items() if k in ours}, strict=False)
    else:
        model.load_state_dict({k: ours[k].to(v.dtype) for k, v in expected.items()}, strict=True)
    return model


def save_pretrained(model: DeepSeekV3, path: str | Path, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write config.json and safetensors shards that transformers' AutoModelForCausalLM loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = config_to_hf(model.cfg)
    tensors = {k: v.contiguous().cpu() for k, v in state_dict_to_hf(model).items()}
    # safetensors refuses tensors sharing storage (the MTP copies of embedding and head)
    tensors = {k: v.clone() for k, v in tensors.items()}
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    shards, current, size = [], {}, 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = tensors[k]
        size += nbytes
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / name), metadata=meta)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    (path / "config.json").write_text(json.dumps(config, indent=2))
