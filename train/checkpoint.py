"""Training checkpoints: DeepSpeed's engine state plus what the loop needs to continue exactly.

Layout: RUN_DIR/checkpoints/step_00000120/ holds DeepSpeed's files (model states, optimizer
partitions) and `dsv3_meta.json`, written last by rank 0 once every rank has saved. A
directory without it is incomplete and never resumed from. The client state inside the
DeepSpeed checkpoint carries the step, the data position and the RNG states; the routing
biases travel with the model's buffers.

A weights-only checkpoint (made by `dsv3 import-hf`) has `model.safetensors` and a meta file
with `"weights_only": true`: training starts from those weights at step 0 with a fresh optimizer.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model import ConfigError, ModelConfig

META = "dsv3_meta.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under root that finished saving, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / META).is_file()]
    return sorted(found, key=lambda p: p.name)


def read_meta(ckpt: Path) -> dict:
    return json.loads((ckpt / META).read_text())


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """train.resume -> the checkpoint directory to start from, or None for a fresh start."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if (path / META).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    raise ConfigError("train.resume", resume, "no complete checkpoint there (expected a step_* directory with "
                      f"{META}, or a run directory holding checkpoints/)")


def check_model_matches(meta: dict, cfg: ModelConfig, where: Path) -> None:
    """Refuse a checkpoint of another architecture, naming the first differing field."""
    saved = meta.get("model", {})
    ours = cfg.to_dict()
    # fields that do not change the weights may differ
    free = {"moe_impl", "precision", "mtp_loss_weight", "seq_aux_loss_alpha", "initializer_range"}
    for key in sorted(set(saved) | set(ours)):
        if key in free:
            continue
        if saved.get(key) != ours.get(key):
            raise ConfigError(
                f"model.{key}", ours.get(key),
                f"checkpoint {where} was trained with model.{key}={saved.get(key)!r}",
            )


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, run_dir: Path, step: int, client_state: dict, model_cfg: ModelConfig, keep: int, rank: int) -> Path:
    root = run_dir / "checkpoints"
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    if dist.is_initialized():
        dist.barrier()
    ckpt = root / tag
    if rank == 0:
        meta = {"step": step, "model": model_cfg.to_dict(), "weights_only": False}
        tmp = ckpt / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.rename(ckpt / META)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return ckpt


def load(engine, ckpt: Path) -> dict:
    """Restore engine state (model, optimizer); returns the client state."""
    load_path, client = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
    if load_path is None:
        raise FileNotFoundError(f"{ckpt}: DeepSpeed could not load this checkpoint")
    return client


def load_model_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model's state dict from a checkpoint directory, without an engine (sample, export)."""
    if read_meta(ckpt).get("weights_only"):
        from safetensors.torch import load_file

        return load_file(str(ckpt / "model.safetensors"))
    files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt}: no mp_rank_*_model_states.pt (not a DeepSpeed checkpoint?)")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}


def save_weights_only(state_dict: dict[str, torch.Tensor], run_dir: Path, model_cfg: ModelConfig) -> Path:
    from safetensors.torch import save_file

    ckpt = run_dir / "checkpoints" / tag_for(0)
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(ckpt / "model.safetensors"))
    (ckpt / META).write_text(json.dumps({"step": 0, "model": model_cfg.to_dict(), "weights_only": True}, indent=1))
    return ckpt
