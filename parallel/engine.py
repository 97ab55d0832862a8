"""Process-group start-up and the DeepSpeed engine around the model.

One process per device. Under torchrun (or SLURM, via launch/) the rendezvous comes from the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); a plain `dsv3 train` is a
world of one. CPU runs use gloo, GPU runs NCCL. DeepSpeed owns data-parallel gradient
reduction, ZeRO partitioning of optimizer state (stages 0-2), gradient accumulation and
clipping; the optimizer is torch's AdamW, its fused kernel where one exists (none to compile).
"""

from __future__ import annotations

import gc
import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from model import ConfigError, DeepSeekV3

from .fp8 import apply_fp8

from .expert_parallel import apply_expert_parallel, is_expert_param
from .groups import ExpertLayout, build_expert_layout

# DeepSpeed's ZeRO-1/2 gather calls torch's all_gather_into_tensor, which torch 2.13 marks
# deprecated: one FutureWarning per rank in every multi-rank log that its user cannot act on.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                        category=FutureWarning)


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


def shutdown_distributed() -> None:
    """Leave the default process group and every subgroup once the work that needed them is done.
    Without it, gloo's worker threads are still alive at interpreter teardown and a rank can abort
    ("terminate called without an active exception", exit -6) after a run that succeeded: one
    4-rank all-reduce script did so in 6 of 30 runs, none with this call."""
    if dist.is_initialized():
        dist.destroy_process_group()
        _forget_deepspeed_groups()
        # Destroying a group does not stop its gloo threads: they are joined when its last Python
        # reference goes, and reference cycles through the DeepSpeed engine hold the world's clone
        # and the expert groups until the collector runs, perhaps only at interpreter teardown,
        # where a running gloo thread can abort the exit. Collect now (2 ranks at EP=2: 13 threads
        # per rank after train() returned, 4 after this).
        gc.collect()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed keeps the groups it made (a clone of the world, the expert and expert-data groups)
    in module globals and has no call that drops them. Once the process group is destroyed they
    name groups that no longer exist, and a later run in this process (a second `train()`) would
    be handed them; forgetting them lets that run make its own."""
    from deepspeed.utils import groups

    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS")):
            if isinstance(value, dict):
                value.clear()
            else:
                setattr(groups, name, None)


def param_groups(model: DeepSeekV3, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on norm weights (1-D parameters). Expert
    shards (expert parallelism) go into groups of their own, which DeepSpeed's ZeRO partitions
    over the expert-data-parallel group instead of the world."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.dim() < 2 else decay).append(p)
    groups_ = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    if any(is_expert_param(p) for p in model.parameters()):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups_ = split_params_into_different_moe_groups_for_optimizer(groups_)
    return [g for g in groups_ if g["params"]]


def deepspeed_config(cfg, world_size: int, bf16: bool) -> dict:
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * world_size),
        # clipping off (0) still goes through the norm code below, which also detects non-finite
        # gradients; a huge threshold keeps the coefficient at 1
        "gradient_clipping": cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else 1e30,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": bf16},
        # bf16 weights, fp32 weight gradients (report §3.3): micro-batch gradients are accumulated
        # and reduced in fp32, not summed in bf16 (DeepSpeed's default); ZeRO-2 only (Config.validate)
        **({"data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}),
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(model: DeepSeekV3, cfg, info: DistInfo):
    """Switch on activation checkpointing when configured, shard the experts (EP), materialise a
    meta-device model (this rank's experts only), wrap the model in a DeepSpeed engine; returns
    (engine, layout)."""
    import deepspeed

    # fp8 keeps DeepSpeed in fp32 (fp32 module weights are the master) unless fp8.weights=bf16
    bf16 = cfg.bf16_weights
    layout = build_expert_layout(cfg.parallel.ep, cfg.model.n_routed_experts)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    apply_expert_parallel(model, layout)
    # bf16: parameters born bf16 (DeepSpeed's cast would round the same fp32 values the same way;
    # an fp32 copy first would need twice the memory)
    model.materialize(info.device, torch.bfloat16 if bf16 else None).to(info.device)
    apply_fp8(model, cfg, info.device, verbose=info.rank == 0)  # FP8 GEMMs in before the optimizer sees params
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
        fused=fused_adamw_ok(model),
    )
    biases = router_biases(model)  # before DeepSpeed's bf16 cast rounds them
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, info.world_size, bf16),
    )
    keep_router_bias_fp32(model, biases)
    install_global_grad_norm(engine, layout)
    skip_single_process_allreduce(engine, info.world_size)
    return engine, layout


def skip_single_process_allreduce(engine, world_size: int) -> None:
    """One process at ZeRO-0 fp32 has nothing to reduce, yet DeepSpeed's backward would still
    flatten every gradient into one fresh buffer, all-reduce it over a group of one and copy it
    back: two passes over all gradients and a new ~4-bytes-per-parameter allocation (page faults
    on CPU) each step, 5-8% of a CPU smoke step. Switched off there; every other setup (more
    ranks, ZeRO-1/2, bf16's optimizer, which does its own bookkeeping on that path) keeps it."""
    if world_size == 1 and engine.zero_optimization_stage() == 0 and isinstance(engine.optimizer, torch.optim.Optimizer):
        engine.enable_backward_allreduce = False


def fused_adamw_ok(model: torch.nn.Module) -> bool:
    """torch's fused AdamW (one kernel per tensor instead of a dozen elementwise passes; the
    default of HF's Trainer since torch 2.8) where it has kernels: fp32/bf16 on CPU or CUDA."""
    return all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16)
               for p in model.parameters())


def router_biases(model: DeepSeekV3) -> list[torch.Tensor]:
    """fp32 copies of the MoE layers' routing biases, in moe_layers() order."""
    return [moe.gate.e_score_correction_bias.detach().float().clone() for moe in model.moe_layers()]


def keep_router_bias_fp32(model: DeepSeekV3, biases: list[torch.Tensor]) -> None:
    """Put back `biases` (router_biases, taken before a bf16 cast) as the routing biases: fp32,
    with every bit. A cast of the whole module (DeepSpeed before 0.19; 0.19 casts parameters only)
    also casts buffers, and the bias must stay fp32: its per-step change γ = 1e-3 is below bf16's
    resolution near typical bias values, and imported values would lose bits."""
    for moe, b in zip(model.moe_layers(), biases, strict=True):
        moe.gate.e_score_correction_bias = b.to(moe.gate.e_score_correction_bias.device)


def all_reduce_(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """In-place all-reduce over `group` (default: the world); a no-op without peers.

    The loop's scalars, expert counts and norm sums are CPU tensors, and an NCCL process group
    (GPU runs) reduces CUDA tensors only: those go through a CUDA copy there. Gloo (CPU runs)
    takes them as they are."""
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return t
    if t.device.type == "cpu" and dist.get_backend(group) == "nccl":
        buf = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(buf, op=op, group=group)
        return t.copy_(buf)
    dist.all_reduce(t, op=op, group=group)
    return t


def union_size(items: set) -> int:
    """How many distinct items all ranks hold together (a collective: every rank calls it)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return len(items)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(items))
    return len({tuple(x) for part in gathered for x in part})


def check_same_on_all_ranks(t: torch.Tensor, what: str) -> None:
    """Raise if `t` differs between ranks (e.g. routing biases drifting apart)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    ref = t.detach().clone()
    dist.broadcast(ref, src=0)
    bad = all_reduce_(torch.tensor([0 if torch.equal(ref, t.detach()) else 1]))
    if bad.item():
        raise RuntimeError(f"{what} differs between ranks ({bad.item()} rank(s) disagree with rank 0)")


def global_grad_norm(dense_sq: torch.Tensor, expert_sq: torch.Tensor, layout: ExpertLayout,
                     partitioned: bool) -> torch.Tensor:
    """The L2 norm of the whole model's gradient, each dense parameter and each expert counted
    once, from this rank's sums of squares (fp32 scalars).

    Unpartitioned (ZeRO-0): every rank holds all dense grads and its EP shard's expert grads, so
    expert squares are summed over the EP group. Partitioned (ZeRO-1/2): each rank holds a slice
    of the dense grads (sliced over the world) and of its shard's expert grads (sliced over the
    EDP group), so both are summed over the world.
    """
    if partitioned:
        return all_reduce_(dense_sq + expert_sq).sqrt()
    if layout.ep > 1:
        all_reduce_(expert_sq, group=layout.ep_group)
    return (dense_sq + expert_sq).sqrt()


def step_skipped(engine) -> bool:
    """Whether the optimizer step just taken was skipped for non-finite gradients.

    Two places decide it: our global-norm check (install_global_grad_norm), and DeepSpeed's own
    overflow check, which its bf16 optimizer runs before any norm and which then skips the step
    without computing ours."""
    return bool(engine.dsv3_nonfinite or getattr(engine.optimizer, "overflow", False))


def install_global_grad_norm(engine, layout: ExpertLayout) -> None:
    """Make DeepSpeed clip (and report) with the true global gradient norm.

    DeepSpeed averages per-rank norms over the data-parallel group, which under expert
    parallelism mixes norms of different expert shards: the result is not the norm of the
    model's gradient. We replace the two places it computes the norm: ZeRO-0's fp32 clipping
    and ZeRO-1/2's `scaled_global_norm`. With ep = 1 the result equals DeepSpeed's.
    """
    import math
    import types

    # A non-finite norm (NaN/inf loss or gradients) skips the optimizer step: the flag is set
    # here, before DeepSpeed steps, and the wrapped torch optimizer's step() does nothing while
    # it is up. The loop asks step_skipped(), which reads it, to count and report skipped steps.
    engine.dsv3_nonfinite = False
    inner = engine.optimizer.optimizer if engine.zero_optimization_stage() > 0 else engine.optimizer
    inner_step = inner.step

    def guarded_step(*args, **kwargs):
        if engine.dsv3_nonfinite:
            return None
        return inner_step(*args, **kwargs)

    inner.step = guarded_step

    def squares(grads_and_flags):
        """(gradient, is_expert) pairs -> sums of squared entries (dense, expert), fp32 CPU scalars.

        One fp32 norm per tensor (no squared copy of the gradient), summed on the gradients'
        device; one transfer to the host at the end rather than a synchronising one per tensor."""
        norms = {False: [], True: []}
        for g, is_expert in grads_and_flags:
            if g is not None:
                norms[bool(is_expert)].append(torch.linalg.vector_norm(g.detach(), dtype=torch.float32))

        def total(ns):
            return torch.stack(ns).square().sum().cpu() if ns else torch.zeros((), dtype=torch.float32)

        return total(norms[False]), total(norms[True])

    if engine.zero_optimization_stage() == 0:
        def clip_fp32_gradients(self):
            params = [p for p in self.module.parameters() if p.grad is not None]
            dense, expert = squares((p.grad, is_expert_param(p)) for p in params)
            norm = global_grad_norm(dense, expert, layout, partitioned=False)
            self._global_grad_norm = norm.item()
            self.dsv3_nonfinite = not math.isfinite(self._global_grad_norm)
            coef = min(1.0, self.gradient_clipping() / (self._global_grad_norm + 1e-6))
            if coef < 1.0 and not self.dsv3_nonfinite:
                for p in params:
                    p.grad.mul_(coef)

        engine.clip_fp32_gradients = types.MethodType(clip_fp32_gradients, engine)
    else:
        opt = engine.optimizer

        def scaled_global_norm(self, norm_type=2):
            # DeepSpeed only builds is_moe_param_group when the model has MoE layers
            moe_group = self.is_moe_param_group if hasattr(self, "is_moe_param_group") else None
            groups = self.averaged_gradients
            groups = groups.items() if isinstance(groups, dict) else enumerate(groups)
            dense, expert = squares((g, moe_group is not None and moe_group[i])
                                    for i, grads in groups for g in grads)
            norm = global_grad_norm(dense, expert, layout, partitioned=True)
            engine.dsv3_nonfinite = not math.isfinite(norm.item())
            return norm.to(self.device)

        opt.scaled_global_norm = types.MethodType(scaled_global_norm, opt)
