"""Process-group start-up and the DeepSpeed engine around the model.

One process per device. Under torchrun (or SLURM, via launch/) the rendezvous comes from the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a plain `dsv3 train` is a
world of one. CPU runs use gloo, GPU runs NCCL. DeepSpeed owns data-parallel gradient
reduction, ZeRO partitioning of optimizer state (stages 0-2), gradient accumulation and
clipping; the optimizer is torch's AdamW (no fused op to compile).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from model import ConfigError, DeepSeekV3


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device", choice, "CUDA is not available on this machine; use cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_choice: str, timeout_s: int) -> DistInfo:
    """Join (or create) the default process group; idempotent."""
    if "RANK" not in os.environ:  # a single process started without a launcher
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    if not dist.is_initialized():
        import deepspeed

        # DeepSpeed would compile a shared-memory communication op on first CPU init (~1 min).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        backend = "nccl" if device.type == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, device)


def param_groups(model: DeepSeekV3, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on norm weights (1-D parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.dim() < 2 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def deepspeed_config(cfg, world_size: int, bf16: bool) -> dict:
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(model: DeepSeekV3, cfg, info: DistInfo):
    """Wrap the model in a DeepSpeed engine; returns the engine."""
    import deepspeed

    precision = cfg.model.precision
    if precision == "fp8":
        raise ConfigError("model.precision", precision, "FP8 training is not available yet; use fp32 or bf16")
    bf16 = precision == "bf16"
    if bf16 and info.device.type == "cpu":
        raise ConfigError("model.precision", precision, "bf16 training needs a GPU here; use fp32 on CPU")
    model.to(info.device)
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
    )
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, info.world_size, bf16),
    )
    keep_router_bias_fp32(model)
    return engine


def keep_router_bias_fp32(model: DeepSeekV3) -> None:
    """A bf16 cast of the module also casts buffers; the routing bias must stay fp32, since its
    per-step change γ = 1e-3 is below bf16's resolution near typical bias values."""
    for moe in model.moe_layers():
        b = moe.gate.e_score_correction_bias
        if b.dtype != torch.float32:
            moe.gate.e_score_correction_bias = b.float()


def all_reduce_(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def check_same_on_all_ranks(t: torch.Tensor, what: str) -> None:
    """Raise if `t` differs between ranks (e.g. routing biases drifting apart)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    ref = t.detach().clone()
    dist.broadcast(ref, src=0)
    bad = torch.tensor([0 if torch.equal(ref, t.detach()) else 1])
    dist.all_reduce(bad)
    if bad.item():
        raise RuntimeError(f"{what} differs between ranks ({bad.item()} rank(s) disagree with rank 0)")


def grad_norm_before_step(engine) -> float | None:
    """Global L2 norm of the reduced, unclipped gradients, read just before engine.step() at the
    accumulation boundary. Under ZeRO-0 DeepSpeed clips without recording the norm, so it is
    computed here; ZeRO-1/2 hold partitioned gradients and report it via get_global_grad_norm()."""
    if engine.zero_optimization_stage() > 0:
        return None
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
