"""`dsv3 bench CONFIG`: training throughput of a config on synthetic tokens.

Builds the model and the DeepSpeed engine exactly as `dsv3 train` does (parallel.engine), feeds
random tokens (no data needed), runs `warmup` untimed optimizer steps, then `steps` timed ones,
and reports tokens/s, step time, MFU (train.metrics.flops_per_token over train.metrics.peak_flops:
the GPU table, or on CPU a measured fp32 matmul peak), peak memory, and a breakdown of one extra
profiled step.

Breakdown method: one more optimizer step runs under torch.profiler (CPU activity, plus CUDA on
GPU). Forward hooks open `record_function` scopes around MLA (attention), the router, the routed
experts and, inside them, each grouped expert GEMM; the fused output head + cross-entropy
(model.loss, which forms its gradients in the forward) is scoped as head_loss, and the
engine's step as optimizer.
Forward time of a part is its scope's duration (expert dispatch/permutation = routed-experts scope
minus its GEMMs). Backward ops are attributed through autograd's sequence numbers: every
`autograd::engine::evaluate_function` event carries the sequence number of the forward op that
made it, and that op's innermost scope names the part. Communication is the wall time during
which any c10d/gloo/nccl collective is in flight, on any thread. "other" is the rest (embedding, norms, dense/shared MLPs, glue). With
train.activation_checkpointing the recompute runs in backward under the same scopes, so each
part includes its recompute (and a backward op that triggers one does not count it again).
Profiler overhead makes the profiled step slower than the timed ones; the parts are reported in
seconds of that step and as fractions of it. Time of a part during which a collective is in
flight (expert dispatch's all-to-all, the optimizer's all-reduce) counts as communication only.

Several ranks (torchrun): one report, printed by rank 0, with the slowest rank's step times, the
largest peak memory, the mean of the ranks' peak FLOP/s (on CPU each rank measures its own) and
rank 0's breakdown.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict

import torch

from model import ConfigError

PARTS = ("attention", "router", "expert_gemm", "dispatch", "head_loss", "optimizer", "communication", "other")
_SCOPE = "bench::"
_BLOCK = "block"  # a decoder block or MTP module: no part of its own, it marks a recompute in backward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Scopes:
    """Forward hooks that wrap modules in profiler scopes; removable."""

    def __init__(self, model):
        from model.attention import MLA
        from model.moe import RoutedExperts, Router
        from model.mtp import MTPModule
        from model.transformer import DecoderLayer

        self.handles, self.restore = [], []
        head_loss = model.head_loss

        def scoped_head_loss(*args, _fn=head_loss):
            with torch.profiler.record_function(_SCOPE + "head_loss"):
                return _fn(*args)

        model.head_loss = scoped_head_loss
        self.restore.append((model, "head_loss", head_loss))
        # isinstance: an expert-parallel shard, or TE's grouped experts, subclass RoutedExperts
        kinds = ((MLA, "attention"), (Router, "router"), (RoutedExperts, "experts"),
                 (DecoderLayer, _BLOCK), (MTPModule, _BLOCK))
        for m in model.modules():
            name = next((n for cls, n in kinds if isinstance(m, cls)), None)
            if name is None:
                continue
            self._scope(m, name)
            if name == "experts":
                # the grouped GEMMs where expert_ffn calls them; a class with an FFN of its own
                # (TE's GroupedLinear) is timed whole, its SwiGLU included
                attr = "gemm" if type(m).expert_ffn is RoutedExperts.expert_ffn else "expert_ffn"
                fn = getattr(m, attr)

                def scoped(*args, _fn=fn):
                    with torch.profiler.record_function(_SCOPE + "expert_gemm"):
                        return _fn(*args)

                setattr(m, attr, scoped)
                self.restore.append((m, attr, fn))

    def _scope(self, module, name):
        def pre(mod, args):
            mod._bench_rf = torch.profiler.record_function(_SCOPE + name)
            mod._bench_rf.__enter__()

        def post(mod, args, out):
            mod._bench_rf.__exit__(None, None, None)

        # always_call: activation checkpointing's recompute stops by raising once it has rebuilt the
        # last tensor backward needs, which may be inside this module; the scope must close anyway
        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post, always_call=True)]

    def remove(self):
        for h in self.handles:
            h.remove()
        for m, attr, fn in self.restore:
            setattr(m, attr, fn)


def _is_comm(name: str) -> bool:
    n = name.lower()
    return any(s in n for s in ("c10d", "allreduce", "all_reduce", "all_to_all", "alltoall", "gloo", "nccl",
                                "allgather", "all_gather", "reduce_scatter", "broadcast"))


def breakdown_from_profile(events) -> dict[str, float]:
    """Seconds per part of one profiled step (see the module docstring)."""
    seconds = defaultdict(float)
    seq_part: dict[int, str] = {}

    def scope_of(ev) -> str | None:
        p = ev
        while p is not None:
            if p.name.startswith(_SCOPE) and p.name != _SCOPE + _BLOCK:
                return p.name[len(_SCOPE):]
            p = p.cpu_parent
        return None

    # Communication is the wall time during which any collective is in flight: the union of the
    # collectives' intervals over all threads. gloo records a collective twice, as the c10d call on
    # the issuing thread and as its work on one of its own threads, overlapping; summing both
    # counted it twice.
    comm: list[list[float]] = []
    for ev in sorted((e for e in events if _is_comm(e.name)), key=lambda e: e.time_range.start):
        start, end = ev.time_range.start, ev.time_range.end
        if comm and start <= comm[-1][1]:
            comm[-1][1] = max(comm[-1][1], end)
        else:
            comm.append([start, end])
    seconds["communication"] = sum(end - start for start, end in comm) / 1e6

    def comm_overlap(ev) -> float:
        """Microseconds of ev during which a collective was in flight: they count as
        communication, so the part that issued or waited on it does not count them again."""
        a, b = ev.time_range.start, ev.time_range.end
        return sum(max(0.0, min(b, end) - max(a, start)) for start, end in comm)

    def scoped_children(ev) -> list:
        """The outermost profiler scopes inside ev (activation checkpointing's recompute, when ev is
        a backward node): they account for themselves."""
        found, todo = [], list(ev.cpu_children)
        while todo:
            child = todo.pop()
            if child.name.startswith(_SCOPE):
                found.append(child)
            else:
                todo.extend(child.cpu_children)
        return found

    for ev in events:
        if ev.name.startswith(_SCOPE) and ev.name != _SCOPE + _BLOCK:
            part = ev.name[len(_SCOPE):]
            dur = (ev.cpu_time_total - comm_overlap(ev)) / 1e6
            if part == "expert_gemm":
                seconds["expert_gemm"] += dur
                seconds["dispatch"] -= dur  # nested in the experts scope
            elif part == "experts":
                seconds["dispatch"] += dur
            else:
                seconds[part] += dur
        if getattr(ev, "sequence_nr", -1) >= 0 and not ev.name.startswith("autograd::engine"):
            part = scope_of(ev)
            if part is not None:
                seq_part.setdefault(ev.sequence_nr, part)

    for ev in events:
        if ev.name.startswith("autograd::engine::evaluate_function") and ev.sequence_nr in seq_part:
            part = seq_part[ev.sequence_nr]
            inner = scoped_children(ev)
            # the node less its recomputed scopes, and less the collectives outside those scopes
            own = (ev.cpu_time_total - sum(c.cpu_time_total for c in inner)
                   - (comm_overlap(ev) - sum(comm_overlap(c) for c in inner)))
            seconds["dispatch" if part == "experts" else part] += own / 1e6
    return dict(seconds)


def bench(cfg, steps: int = 10, warmup: int = 2, profile: bool = True, log=None) -> dict:
    """Run the benchmark; returns the report dict (the `--json` object)."""
    if steps < 1:
        raise ConfigError("--steps", steps, "must be a positive integer")
    if warmup < 0:
        raise ConfigError("--warmup", warmup, "must be at least 0")
    from model import DeepSeekV3
    from parallel import engine as pe

    from .metrics import flops_per_token, mfu, peak_memory, run_peak_flops

    log = log or (lambda m: None)
    info = pe.init_distributed(cfg.train.device, cfg.parallel.timeout_s)
    world = info.world_size
    cfg.batch_layout(world)
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):  # as in training: build_engine materialises this rank's part only
        model = DeepSeekV3(cfg.model)
    engine, _ = pe.build_engine(model, cfg, info)
    engine.train()

    t, seq = cfg.train, cfg.data.seq_len
    accum = t.global_batch_size // (t.micro_batch_size * world)
    gen = torch.Generator().manual_seed(cfg.train.seed + info.rank)

    def micro_batch():
        x = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, seq + 1), generator=gen)
        return x[:, :-1].to(info.device), x[:, 1:].to(info.device)

    batches = [micro_batch() for _ in range(accum)]
    loss = None

    def one_step():
        nonlocal loss
        for tokens, targets in batches:
            out = engine(tokens, targets)
            engine.backward(out.loss)
            with torch.profiler.record_function(_SCOPE + "optimizer"):
                engine.step()
        loss = out.loss.detach()

    for _ in range(warmup):
        one_step()
    _sync(info.device)
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one_step()
        _sync(info.device)
        times.append(time.perf_counter() - t0)
    peak_mem = peak_memory(info.device)
    peak, peak_src = run_peak_flops(cfg, info.device)
    loss_value = float(loss)
    if world > 1:
        # one report for the job: the steps are synchronous, so the slowest rank's time is the
        # step's; the most memory any rank took; the mean of the ranks' peaks (on CPU each measures
        # its own) and losses
        slowest = pe.all_reduce_(torch.tensor(times, dtype=torch.float64), op=torch.distributed.ReduceOp.MAX)
        times = slowest.tolist()
        peak_mem = int(pe.all_reduce_(torch.tensor([peak_mem], dtype=torch.float64),
                                      op=torch.distributed.ReduceOp.MAX).item())
        sums = pe.all_reduce_(torch.tensor([peak, loss_value], dtype=torch.float64))
        peak, loss_value = (sums / world).tolist()

    step_time = sum(times) / len(times)
    tokens_per_step = t.global_batch_size * seq  # all ranks
    tokens_per_s = tokens_per_step / step_time
    fpt = flops_per_token(cfg.model, seq)
    result = {
        "config": None,
        "device": str(info.device),
        "world_size": world,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "warmup": warmup,
        "global_batch_size": t.global_batch_size,
        "micro_batch_size": t.micro_batch_size,
        "seq_len": seq,
        "tokens_per_step": tokens_per_step,
        "step_time_s": step_time,
        "step_time_min_s": min(times),
        "tokens_per_s": tokens_per_s,
        "flops_per_token": fpt,
        "peak_flops": peak,
        "peak_source": peak_src,
        "mfu": mfu(tokens_per_s, fpt, peak, world),
        "peak_mem_bytes": peak_mem,
        "loss": loss_value,
    }
    if profile:
        scopes = _Scopes(engine.module)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if info.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        # kineto (read once, when the first profiler starts) otherwise prints its own start/stop
        # lines into the report; KINETO_LOG_LEVEL set by the user wins
        os.environ.setdefault("KINETO_LOG_LEVEL", "99")
        try:
            with torch.profiler.profile(activities=acts) as prof:
                t0 = time.perf_counter()
                one_step()
                _sync(info.device)
                profiled = time.perf_counter() - t0
        finally:
            scopes.remove()
        parts = breakdown_from_profile(prof.events())
        known = sum(parts.get(p, 0.0) for p in PARTS if p != "other")
        parts["other"] = max(profiled - known, 0.0)
        result["breakdown_s"] = {p: parts.get(p, 0.0) for p in PARTS}
        result["breakdown_fraction"] = {p: parts.get(p, 0.0) / profiled for p in PARTS}
        result["profiled_step_time_s"] = profiled
        result["breakdown_method"] = ("torch.profiler on one extra step; forward hooks scope MLA/router/experts/"
                                      "expert GEMMs, backward attributed by autograd sequence number")
        result["breakdown_rank"] = info.rank  # (only rank 0's report is printed)
    pe.shutdown_distributed()
    return result


def format_bench(r: dict) -> str:
    lines = [
        f"{r['tokens_per_s']:.1f} tokens/s, {r['step_time_s'] * 1e3:.1f} ms/step "
        f"({r['tokens_per_step']} tokens/step, {r['steps']} steps after {r['warmup']} warm-up)",
        f"MFU {r['mfu'] * 100:.2f}% of {r['peak_flops'] / 1e12:.3g} TFLOP/s ({r['peak_source']}), "
        f"{r['flops_per_token'] / 1e6:.4g} MFLOP/token",
        f"peak memory {r['peak_mem_bytes'] / 2**20:.0f} MiB",
    ]
    if "breakdown_s" in r:
        lines.append(f"breakdown of one profiled step ({r['profiled_step_time_s'] * 1e3:.1f} ms):")
        for p in PARTS:
            lines.append(f"  {p:<14} {r['breakdown_s'][p] * 1e3:8.1f} ms  {r['breakdown_fraction'][p] * 100:5.1f}%")
    return "\n".join(lines)
