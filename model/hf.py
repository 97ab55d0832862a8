"""Convert to and from HF transformers' DeepseekV3 checkpoint layout (config.json + safetensors).

The layout is the official DeepSeek-V3 release's, which is also what transformers 5.x writes:
one tensor per expert (`mlp.experts.{e}.gate_proj.weight`, ...), MTP module k stored as decoder
layer `num_hidden_layers + k - 1` with its extra parts (`enorm`, `hnorm`, `eh_proj`,
`shared_head.norm`, and copies of the embedding and output head). transformers' CausalLM class
skips those MTP layers when loading. Weights stored as float8_e4m3fn with a 128×128-block
`weight_scale_inv` (as the release ships them) are dequantised on import.

Our modules keep the experts of a layer stacked (`gate_up_proj` (E, 2I, d), `down_proj` (E, d, I));
everything else has the same name as in HF, under `model.` (see DeepSeekV3).

Both directions stream: `write_hf` takes our tensors one at a time from a lazy source (a
checkpoint's TensorReader for `dsv3 export-hf`) and writes each shard as it fills; `read_hf` opens
a directory as a lazy source under our names (`dsv3 import-hf` writes it a layer at a time).
`save_pretrained` / `from_pretrained` are the in-memory forms for a model object.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig, RopeScaling
from .moe import is_stacked_expert_weight
from .transformer import DeepSeekV3, block_of, init_weights

log = logging.getLogger(__name__)

FP8_BLOCK = 128


class HFCheckpointError(ValueError):
    """An HF checkpoint folder that is not this model's: the message names the folder or file."""


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only be read
    by setting it, which another thread creating a file at that moment would see)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, leaving the file with the permissions any new file gets (0o666 less
    the umask, as config.json has). safetensors 0.8 writes through a temporary file created 0o600
    and renames it into place, which would make checkpoints and exports readable by their owner
    only: a teammate's evaluation job or an inference server running as another user could not
    open them."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


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
def config_to_hf(cfg: ModelConfig, eod_token_id: int | None = None) -> dict:
    """config.json's fields. `eod_token_id`: the tokenizer's end-of-document token, written as both
    bos and eos (documents were trained as `ids <eod> ids <eod> ...`, so one starts after it);
    without one, transformers falls back to the release's ids (bos 0, eos 1), another tokenizer's."""
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
    if eod_token_id is not None:
        d.update(bos_token_id=eod_token_id, eos_token_id=eod_token_id)
    return d


def config_from_hf(d: dict) -> ModelConfig:
    if d.get("model_type") not in (None, "deepseek_v3"):
        raise ValueError(f"model_type={d.get('model_type')!r}: expected 'deepseek_v3'")
    if d.get("attention_bias"):
        raise ValueError("attention_bias=true: DeepSeek-V3 has no attention biases")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={d['hidden_act']!r}: only silu is supported")
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
        raise ValueError(f"rope type {rope_type!r}: only default and yarn are supported")
    kw.setdefault("num_nextn_predict_layers", d.get("num_mtp_layers", 0))
    kw.pop("tie_word_embeddings", None)  # validated by ModelConfig when True
    if d.get("tie_word_embeddings"):
        raise ValueError("tie_word_embeddings=true: DeepSeek-V3 does not tie embeddings")
    return ModelConfig(**kw)


# ---------------------------------------------------------------- names
# Both directions go tensor by tensor over a lazy source (a checkpoint reader, or a state dict), so
# a conversion holds one of our tensors (at 671B a layer's stacked experts, ~30 GB in fp32) and
# one output shard at a time, never the model: 671B in fp32 is 2.7 TB.
_MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
            "norm.weight": "shared_head.norm.weight"}  # MTP module k's own parts: ours -> HF (in its layer)


def _per_expert_names(name: str, n: int) -> list[list[str]]:
    """The HF names a stacked expert tensor is stored under (`name` from _hf_name), one list per
    part in the order the parts are concatenated along dim 1, one name per expert in each:
    [gate_proj, up_proj] for gate_up_proj, [down_proj] for down_proj."""
    prefix = name[: name.rindex(".") + 1]  # "....mlp.experts."
    parts = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
    return [[f"{prefix}{e}.{part}.weight" for e in range(n)] for part in parts]


def _hf_name(key: str, cfg: ModelConfig) -> str:
    """Our parameter or buffer name -> the HF name it is stored under (for stacked experts: the
    per-expert prefix `....mlp.experts.` followed by the stacked name)."""
    if key == "lm_head.weight":
        return key
    if key in ("embed_tokens.weight", "norm.weight") or key.startswith("layers."):
        return "model." + key
    if key.startswith("mtp."):
        depth, rest = key[len("mtp."):].split(".", 1)
        layer = f"model.layers.{cfg.num_hidden_layers + int(depth)}."
        if rest in _MTP_OWN:
            return layer + _MTP_OWN[rest]
        if rest.startswith("block."):
            return layer + rest[len("block."):]
    raise KeyError(f"no HF name for {key}")


def hf_tensors(source, cfg: ModelConfig):
    """(HF name, tensor) for every tensor of our model in `source` (a mapping from our names:
    a TensorReader or a state dict), one of our tensors read at a time. Stacked experts come out
    one tensor per expert; each MTP module also carries copies of the embedding and head, as the
    release stores them."""
    # a block at a time, so output shards fill block by block
    for key in sorted(source.keys(), key=lambda k: (*block_of(k), k)):
        name = _hf_name(key, cfg)
        t = source[key]
        if not is_stacked_expert_weight(name):
            yield name, t
            continue
        names = _per_expert_names(name, t.shape[0])
        parts = t.chunk(len(names), dim=1)  # gate_up_proj: gate and up, (E, I, d) each
        for e in range(t.shape[0]):
            for part_names, part in zip(names, parts):
                yield part_names[e], part[e]
    for k in range(cfg.num_nextn_predict_layers):
        layer = f"model.layers.{cfg.num_hidden_layers + k}."
        yield layer + "embed_tokens.weight", source["embed_tokens.weight"]
        yield layer + "shared_head.head.weight", source["lm_head.weight"]


def state_dict_to_hf(model: DeepSeekV3) -> dict[str, torch.Tensor]:
    """The model's tensors under HF names, in memory."""
    return {k: v.detach() for k, v in hf_tensors(model.state_dict(), model.cfg)}


class HFReader:
    """An HF DeepseekV3 directory's tensors under our names (`keys()`: every parameter and buffer
    of the config's model), each built when asked for: experts stacked from their per-expert
    tensors, FP8 weights (the release's `weight_scale_inv`) dequantised, MTP modules freshly
    initialised when the directory has none. Opened by `read_hf`, which checks names and shapes
    first; a context manager: the files stay open inside it."""

    def __init__(self, path: Path, cfg: ModelConfig):
        self.path, self.cfg = path, cfg
        index = path / "model.safetensors.index.json"
        if (path / "model.safetensors").exists():  # transformers' order: the single file before an index
            files = ["model.safetensors"]
        elif index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors files")
        self._stack = contextlib.ExitStack()
        self._where: dict[str, object] = {}  # HF name -> open file
        try:
            for name in files:
                fh = self._stack.enter_context(safe_open(str(path / name), framework="pt"))
                self._where.update(dict.fromkeys(fh.keys(), fh))
        except BaseException:
            self._stack.close()
            raise
        if any(k.endswith(".experts.gate_up_proj") for k in self._where):
            self._stack.close()
            raise HFCheckpointError(f"{path}: fused expert tensors are not supported; save with transformers' "
                                    "save_pretrained")
        with torch.device("meta"):
            self.model = DeepSeekV3(cfg)  # shapes, dtypes and the seed of fresh MTP weights
        self._fresh: dict[str, torch.Tensor] | None = None
        self.fresh_mtp = False

    def __enter__(self) -> HFReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def keys(self) -> list[str]:
        return list(self.model.state_dict())

    def _hf(self, name: str) -> torch.Tensor:
        t = self._where[name].get_tensor(name)
        scale = name + "_scale_inv"  # `X.weight` -> `X.weight_scale_inv`
        return dequantize_fp8_blockwise(t, self._where[scale].get_tensor(scale)) if scale in self._where else t

    def _names(self, key: str) -> tuple[str, list[list[str]] | None]:
        """Our tensor `key`'s HF name, and for a stacked expert tensor the per-expert names it is
        built from (see _per_expert_names; None otherwise)."""
        name = _hf_name(key, self.cfg)
        return name, _per_expert_names(name, self.cfg.n_routed_experts) if is_stacked_expert_weight(name) else None

    def _stored(self, key: str) -> bool:
        name, parts = self._names(key)
        return (parts[0][0] if parts else name) in self._where

    def _shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def _stored_shape(self, key: str) -> tuple[int, ...]:
        name, parts = self._names(key)
        if parts is None:
            return self._shape_of(name)
        shapes = [self._shape_of(part[0]) for part in parts]  # expert 0 of each part
        return (len(parts[0]), sum(s[0] for s in shapes), *shapes[0][1:])

    def check(self) -> None:
        """Every tensor the config needs is stored with its shape (only the MTP modules may be
        missing, all of them: they then start fresh). Reads headers only."""
        expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        missing = sorted(k for k in expected if not self._stored(k))
        self.fresh_mtp = bool(missing) and all(k.startswith("mtp.") for k in missing)
        if self.fresh_mtp:
            log.warning("%s: no MTP weights for num_nextn_predict_layers=%d; MTP modules start from a fresh init",
                        self.path, self.cfg.num_nextn_predict_layers)
        elif missing:
            raise HFCheckpointError(f"{self.path}: checkpoint lacks {missing[0]} (and {len(missing) - 1} more) for "
                                    "this config")
        for k, shape in expected.items():
            if self._stored(k) and self._stored_shape(k) != shape:
                raise HFCheckpointError(f"{self.path}: {k} has shape {self._stored_shape(k)}, config expects {shape}")

    def __getitem__(self, key: str) -> torch.Tensor:
        if self.fresh_mtp and key.startswith("mtp."):
            if self._fresh is None:
                self._fresh = fresh_mtp_weights(self.model)
            return self._fresh[key]
        name, parts = self._names(key)
        if parts is None:
            return self._hf(name)
        try:
            stacks = [torch.stack([self._hf(n) for n in part]) for part in parts]  # (E, rows, cols) each
        except KeyError as err:
            raise KeyError(f"checkpoint lacks expert weight {err.args[0]} "
                           f"(expected {self.cfg.n_routed_experts} experts)") from None
        return stacks[0] if len(stacks) == 1 else torch.cat(stacks, dim=1)


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
# The ModelConfig fields an HF config.json determines (the rest, e.g. precision or the MTP loss
# weight, are training choices it does not describe).
HF_FIELDS = (*_SAME_NAME, "rope_theta", "rope_scaling")


def read_hf_config(path: str | Path) -> ModelConfig:
    """The model an HF-format directory's config.json describes (fields outside HF_FIELDS at
    their defaults)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file}: not found (expected an HF DeepseekV3 checkpoint directory)")
    try:
        d = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HFCheckpointError(f"{cfg_file}: not valid JSON ({err})") from None
    if not isinstance(d, dict):
        raise HFCheckpointError(f"{cfg_file}: expected a JSON object, found {type(d).__name__}")
    try:
        return config_from_hf(d)
    except (ValueError, KeyError, TypeError) as err:
        raise HFCheckpointError(f"{cfg_file}: {err}") from None


def read_hf(path: str | Path, cfg: ModelConfig | None = None, **overrides) -> HFReader:
    """An HF-format directory (config.json + safetensors) opened for reading under our names, its
    names and shapes checked against `cfg` (None: its config.json's, with `overrides` applied to
    ModelConfig's fields); nothing read yet."""
    path = Path(path)
    if cfg is None:
        cfg = read_hf_config(path)
        if overrides:
            cfg = ModelConfig.from_dict({**cfg.to_dict(), **overrides})
    reader = HFReader(path, cfg)
    try:
        reader.check()
    except BaseException:
        reader.__exit__(None, None, None)
        raise
    return reader


def fresh_mtp_weights(model: DeepSeekV3) -> dict[str, torch.Tensor]:
    """Initial weights for the MTP modules of a meta-device `model` (for an HF checkpoint without
    MTP layers: transformers' own save_pretrained drops them), as the model's seed draws them."""
    mtp = model.mtp.to_empty(device="cpu")
    init_weights(mtp, model.cfg.initializer_range, model.init_seed, prefix="mtp")
    return {f"mtp.{k}": v for k, v in mtp.state_dict().items()}


def from_pretrained(path: str | Path, **overrides) -> DeepSeekV3:
    """Build our model from an HF-format directory (config.json + safetensors), in memory."""
    with read_hf(path, **overrides) as reader:
        model = reader.model
        dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        tensors = {k: reader[k].to(dtypes[k]) for k in reader.keys()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model


def save_pretrained(model: DeepSeekV3, path: str | Path, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write config.json and safetensors shards that transformers' AutoModelForCausalLM loads."""
    write_hf(model.state_dict(), model.cfg, path, max_shard_bytes)


# What write_hf writes, and what a loader would mistake for part of its output if left from before.
_HF_OUTPUTS = ("config.json", "model.safetensors.index.json", "*.safetensors", "*.safetensors.partial")
# Kept fp32 whatever the export dtype: transformers keeps the routing correction bias in fp32 (it
# moves by γ = 1e-3 a step; bf16's spacing near |b| = 1 is 4-8 such steps), so rounding it on the
# way out would change which experts the exported model routes to.
_FP32_ALWAYS = ("e_score_correction_bias",)


def write_hf(source, cfg: ModelConfig, path: str | Path, max_shard_bytes: int = 5 * 1024**3,
             dtype: torch.dtype | None = None, eod_token_id: int | None = None) -> None:
    """config.json and safetensors shards of at most max_shard_bytes (one tensor larger than that
    gets a shard of its own) from `source` (our names -> tensors, read lazily: see hf_tensors),
    each shard written as soon as it is full; tensors cast to `dtype` (None: as stored), except
    the routing correction biases. A directory that already holds an HF checkpoint is refused:
    its shards would outlive the export beside the new ones, and loaders disagree on which to
    read. `eod_token_id`: see config_to_hf."""
    path = Path(path)
    stale = sorted({f.name for pattern in _HF_OUTPUTS for f in path.glob(pattern)}) if path.is_dir() else []
    if stale:
        raise FileExistsError(f"{path} already holds an HF checkpoint ({', '.join(stale[:3])}"
                              f"{', ...' if len(stale) > 3 else ''}); export into a new directory or remove "
                              "those files first (nothing was written)")
    config = config_to_hf(cfg, eod_token_id)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}
    written, current, size, total, dtypes = [], {}, 0, 0, set()

    def flush() -> None:
        # numbered as they fill; renamed to the -of-N names once N is known
        name = f"model-{len(written) + 1:05d}.safetensors.partial"
        save_safetensors(current, path / name, metadata=meta)
        written.append((name, list(current)))

    for name, t in hf_tensors(source, cfg):
        # contiguous copies: safetensors refuses views and tensors sharing storage (the MTP copies
        # of the embedding and head)
        cast = dtype if dtype is not None and not name.endswith(_FP32_ALWAYS) else t.dtype
        t = t.detach().to(device="cpu", dtype=cast).contiguous().clone()
        dtypes.add(t.dtype)
        if current and size + t.nbytes > max_shard_bytes:
            flush()
            current, size = {}, 0
        current[name] = t
        size += t.nbytes
        total += t.nbytes
    flush()
    config["torch_dtype"] = str(dtype or max(dtypes, key=lambda d: d.itemsize)).removeprefix("torch.")
    if len(written) == 1:
        (path / written[0][0]).rename(path / "model.safetensors")
    else:
        weight_map = {}
        for i, (partial, keys) in enumerate(written, start=1):
            final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
            (path / partial).rename(path / final)
            weight_map.update(dict.fromkeys(keys, final))
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
        )
    (path / "config.json").write_text(json.dumps(config, indent=2))


def write_tokenizer(tokenizer_file: str | Path, path: str | Path, eod_token: str | None, model_max_length: int) -> None:
    """tokenizer.json and a tokenizer_config.json naming its end-of-document token as bos and eos
    (see config_to_hf), so transformers' AutoTokenizer knows where a document ends."""
    path = Path(path)
    (path / "tokenizer.json").write_bytes(Path(tokenizer_file).read_bytes())
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
               "clean_up_tokenization_spaces": False}  # decode as the byte-level BPE does, spaces untouched
    if eod_token is not None:
        tok_cfg.update(bos_token=eod_token, eos_token=eod_token)
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
