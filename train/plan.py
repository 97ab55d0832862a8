"""`dsv3 plan CONFIG`: what a config costs before anything runs.

Parameters come from the model built on the meta device (shapes, no storage). FLOPs per token
follow the project's convention (train.metrics, DESIGN.md), training = forward + backward:

    flops_per_token = 6·N + 3·L·H·(qk_head_dim + v_head_dim)·S

N: activated parameters without the input embedding (routed experts top-k of n; output head,
MTP blocks and one more head matmul per MTP depth included); L: attention layers with MTP;
S: data.seq_len, causal half taken. The same without the MTP module is reported beside it.

Memory per GPU, the layout of this system (data parallel over every GPU, expert parallel
inside it, DeepSpeed ZeRO 0-2; no tensor or pipeline parallelism), world = launch.nodes ×
GPUs per node:

* weights: dense parameters whole on every GPU, routed experts divided by parallel.ep.
  Bytes per parameter: fp32 4; bf16 2; fp8 4 with `fp8.weights: fp32` (DeepSpeed in fp32, the
  module weights are the master) or 2 with `fp8.weights: bf16` (DeepSpeed's bf16 engine, the
  master in the optimizer). On top, for fp8 (as TE runs it), working copies of the GEMM weights
  (all but the embedding, norms and the fp32 router), 2 B each: TE's FP8 copies, row- and
  column-wise. With `fp8.weight_cache` they live for the whole run, and without activation
  checkpointing each micro-batch's forward keeps them for its backward: 2 B per GEMM weight.
  With the cache off and activation checkpointing they live one block at a time: 2 B per GEMM
  weight of the largest block, plus, with fp32 weights, the bf16 autocast copy of the output
  head (which stays BF16), kept from forward to backward. FP8 primary weights (TE's FP8
  parameters, 1-2 B with no high-precision module weight at all) are not built here.
* grads: fp32, 4 B per parameter at every precision (the report keeps weight gradients in FP32;
  DeepSpeed's bf16 path accumulates them in fp32 too), partitioned only at ZeRO-2.
* optimizer states: fp32 master weights (none extra for fp32 training, nor for fp8 with fp32
  weights: the module weights are the master) + two fp32 AdamW moments, partitioned at ZeRO ≥ 1.
  ZeRO partitions over the data-parallel group of each parameter: dense over all `world` GPUs,
  experts over the world/ep GPUs holding the same expert shard (the expert-data group).
* activations: one micro-batch (train.micro_batch_size × data.seq_len tokens) in flight, counted
  per block from the tensors backward needs (flash-style attention, no S×S scores stored), plus
  the output heads (1 + MTP depth). The fused head and loss (model/loss.py, the default) runs
  every head in one call and forms their gradients in its forward, keeping them to backward: one
  fp32 (vocab × hidden) dW shared by the heads and a (tokens × hidden) dh per head, and while it
  runs a chunk's buffers and a partial dW; the reference (model.loss_chunk_size=0) keeps each
  head's logits and fp32 softmax. With
  train.activation_checkpointing only each block's input is kept and one block is recomputed at
  a time. Activations are held in the compute dtype (bf16 for bf16 and fp8: the report's FP8
  caching of some activations would lower this; fp32 on CPU).

`fits` compares the total with launch.gpu_mem_gb less 10% for the CUDA context, allocator
fragmentation and communication buffers. Transient buffers (ZeRO buckets, all-to-all buffers,
the unsharded gradient of the layer being reduced) are not counted.

GPU-hours per trillion tokens = 1e12 · flops_per_token / (mfu · peak · 3600).
"""

from __future__ import annotations

import copy

import torch

from model import ConfigError, DeepSeekV3, ModelConfig, is_stacked_expert_weight
from model.transformer import block_of

from .checkpoint import largest_write_elements
from .config import Config
from .metrics import flops_breakdown, human

RESERVE_FRACTION = 0.10  # of GPU memory kept for context, fragmentation and communication buffers
FLOP_CONVENTION = ("6*N + 3*L*H*(qk_head_dim + v_head_dim)*S per token, forward+backward; N = activated "
                   "params without the input embedding, output head and MTP included (+1 head per MTP depth)")


def _parameter_groups(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by how they are stored: routed experts vs dense, and which dense
    weights feed a low-precision GEMM (for fp8: all but the embedding lookup, the norms and the
    router, whose matmul runs in fp32), the output head, and per block (decoder layer or MTP
    module) its [dense GEMM, routed-expert] parameters."""
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    counts = model.parameter_counts()
    groups = {"expert": 0, "dense": 0, "dense_gemm": 0, "head": 0}
    sizes = {"dense": {}, "expert": {}}  # per tensor, for the checkpoint's writing plan
    blocks: dict[tuple[int, int], list[int]] = {}
    for name, p in model.named_parameters():
        n = p.numel()
        where = block_of(name)  # (0, 0): outside the blocks, tallied nowhere
        block = blocks.setdefault(where, [0, 0]) if where[0] else [0, 0]
        if is_stacked_expert_weight(name):
            groups["expert"] += n
            sizes["expert"][name] = n
            block[1] += n
            continue
        groups["dense"] += n
        sizes["dense"][name] = n
        if name == "lm_head.weight":
            groups["head"] += n
        if not (p.dim() < 2 or name.startswith("embed_tokens.") or ".mlp.gate." in name):
            groups["dense_gemm"] += n
            block[0] += n
    saved_buffers = sum(b.numel() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias"))
    return {**groups, "total": counts["total"], "mtp": counts["mtp"], "active": counts["active"],
            "sizes": sizes, "saved_buffers": saved_buffers, "blocks": list(blocks.values())}


def _activation_bytes_per_token(cfg: ModelConfig, act_bytes: int) -> dict[str, float]:
    """Bytes per token that backward needs, per kind of block, and for the output heads."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    qk, nope, rope, v = cfg.qk_head_dim, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    # MLA: norm in/out; q (low-rank: latent and its norm); kv latent + rope key, its norm, per-head
    # k_nope|v; q and k after RoPE; attention output (o_proj's input)
    attn = 2 * d + h * qk
    if cfg.q_lora_rank is not None:
        attn += 2 * cfg.q_lora_rank
    attn += (cfg.kv_lora_rank + rope) + cfg.kv_lora_rank + h * (nope + v) + 2 * h * qk + h * v
    # SwiGLU MLP: norm in/out, gate and up outputs, their product (down_proj's input)
    dense_mlp = 2 * d + 3 * cfg.intermediate_size
    m, k = cfg.moe_intermediate_size, cfg.num_experts_per_tok
    # MoE: norm in/out; each token dispatched to k experts (input copy, gate/up/product, output);
    # shared experts; router scores in fp32 count separately below
    moe_mlp = 2 * d + k * (2 * d + 3 * m) + cfg.n_shared_experts * 3 * m + d
    router = 2 * cfg.n_routed_experts * 4  # logits and sigmoid/softmax scores, fp32
    dense_block = (attn + dense_mlp) * act_bytes
    moe_block = (attn + moe_mlp) * act_bytes + router
    mtp_extra = 4 * d * act_bytes  # two input norms and the 2d concat that eh_proj reads
    # reference loss: each head's logits in the compute dtype plus the fp32 softmax it keeps;
    # fused: each head's dh (the shared dW is per micro-batch, not per token: activation_bytes)
    head = cfg.vocab_size * (act_bytes + 4) if cfg.loss_chunk_size == 0 else d * act_bytes
    return {"dense_block": dense_block, "moe_block": moe_block, "mtp_block": moe_block + mtp_extra,
            "head": head, "block_input": d * act_bytes}


def activation_bytes(cfg: Config) -> float:
    """Activation memory of one micro-batch on one GPU (see the module docstring)."""
    mc = cfg.model
    act_bytes = 4 if mc.precision == "fp32" else 2
    per = _activation_bytes_per_token(mc, act_bytes)
    n_dense = mc.first_k_dense_replace
    n_moe = mc.num_hidden_layers - n_dense
    depth = mc.num_nextn_predict_layers
    heads = (1 + depth) * per["head"]
    embedding = per["block_input"]
    if cfg.train.activation_checkpointing:
        # every block's input kept, one block's activations rebuilt at a time in backward
        largest = max([per["dense_block"]] * bool(n_dense) + [per["moe_block"]] * bool(n_moe)
                      + [per["mtp_block"]] * bool(depth))
        per_token = (mc.num_hidden_layers + depth) * per["block_input"] + largest + heads + embedding
    else:
        per_token = (n_dense * per["dense_block"] + n_moe * per["moe_block"] + depth * per["mtp_block"]
                     + heads + embedding)
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    fused_head = 0  # per micro-batch, not per token: the shared dW and one chunk's buffers
    if mc.loss_chunk_size > 0:  # the fused head (model/loss.py)
        v, d = mc.vocab_size, mc.hidden_size
        fused_head = v * d * 4  # the heads' one fp32 weight gradient, held from forward to backward
        fused_head += min(mc.loss_chunk_size, tokens) * v * (act_bytes + 4)  # a chunk's logits, fp32 softmax
        if act_bytes < 4:
            fused_head += v * d * act_bytes  # and its low-precision partial dW
    return per_token * tokens + fused_head


def _bytes_per_param(cfg: Config) -> dict[str, float]:
    """weight: every parameter (2 where the module weights are bf16, the fp32 master then in the
    optimizer); gemm_copy: fp8's working copies per GEMM weight (see the module docstring)."""
    if cfg.model.precision == "fp32":
        return {"weight": 4, "gemm_copy": 0, "grad": 4, "master": 0, "moments": 8}
    bf16 = cfg.bf16_weights
    return {"weight": 2 if bf16 else 4, "gemm_copy": 2 if cfg.model.precision == "fp8" else 0, "grad": 4,
            "master": 4 if bf16 else 0, "moments": 8}


def memory_per_gpu(cfg: Config, groups: dict[str, int], world: int) -> dict[str, float]:
    """Bytes per GPU by part (weights, grads, optimizer_states, activations) and their total."""
    p = cfg.parallel
    ep, stage = p.ep, p.zero_stage
    if world % ep:
        raise ConfigError("parallel.ep", ep, f"must divide the number of GPUs ({world})")
    expert_dp = world // ep  # GPUs holding the same expert shard: ZeRO's group for expert params
    b = _bytes_per_param(cfg)
    expert_local = groups["expert"] / ep  # expert params this GPU holds
    dense = groups["dense"]

    if cfg.fp8.weight_cache or not cfg.train.activation_checkpointing:
        copied = groups["dense_gemm"] + expert_local  # every GEMM weight's copies at once
    else:  # one block's at a time, and the head's autocast copy when the module weights are fp32
        copied = max(g + e / ep for g, e in groups["blocks"]) + (0 if cfg.bf16_weights else groups["head"])
    weights = (dense + expert_local) * b["weight"] + copied * b["gemm_copy"]
    grad_parts = (dense / world, expert_local / expert_dp) if stage >= 2 else (dense, expert_local)
    opt_parts = (dense / world, expert_local / expert_dp) if stage >= 1 else (dense, expert_local)
    grads = sum(grad_parts) * b["grad"]
    optimizer = sum(opt_parts) * (b["master"] + b["moments"])
    activations = activation_bytes(cfg)
    parts = {"weights": weights, "grads": grads, "optimizer_states": optimizer, "activations": activations}
    return {**{k: int(round(v)) for k, v in parts.items()}, "total": int(round(sum(parts.values())))}


def plan(cfg: Config, mfu: float = 0.4, peak_tflops: float = 989.0) -> dict:
    """Everything `dsv3 plan` reports, as one JSON-ready dict."""
    from launch.slurm import tasks_per_node

    if not 0 < mfu <= 1:
        raise ConfigError("--mfu", mfu, "a fraction in (0, 1]")
    if peak_tflops <= 0:
        raise ConfigError("--peak-tflops", peak_tflops, "must be positive")
    mc, seq = cfg.model, cfg.data.seq_len
    per_node = tasks_per_node(cfg)
    world = cfg.launch.nodes * per_node
    groups = _parameter_groups(mc)
    flops = flops_breakdown(mc, seq)
    no_mtp = copy.deepcopy(mc)
    no_mtp.num_nextn_predict_layers = 0
    flops_no_mtp = flops_breakdown(no_mtp, seq)["flops_per_token"]
    peak = peak_tflops * 1e12

    memory = memory_per_gpu(cfg, groups, world)
    ep = cfg.parallel.ep
    every_param = groups["dense"] + groups["expert"]
    # fp32 values (and the routing biases) plus two fp32 AdamW moments per parameter
    checkpoint_bytes = 4 * (every_param + groups["saved_buffers"]) + 8 * every_param
    largest_write = 12 * largest_write_elements(
        groups["sizes"]["dense"], {k: n // ep for k, n in groups["sizes"]["expert"].items()}, world, ep)
    gpu_mem = int(cfg.launch.gpu_mem_gb * 2**30)
    usable = int(gpu_mem * (1 - RESERVE_FRACTION))
    tokens_per_step = cfg.train.global_batch_size * seq

    def gpu_hours(fpt: float) -> float:
        return 1e12 * fpt / (mfu * peak * 3600)

    out = {
        "params_total": groups["total"],  # main model, as the report counts 671B (MTP apart)
        "params_mtp": groups["mtp"],
        "params_active": groups["active"],  # per token, input embedding excluded (N of the FLOP convention)
        # what the GPUs hold, split: these two count the MTP module too (total + mtp)
        "params_expert": groups["expert"],
        "params_dense": groups["dense"],
        "flops_per_token": flops["flops_per_token"],
        "flops_per_token_without_mtp": flops_no_mtp,
        "flop_convention": FLOP_CONVENTION,
        "memory_per_gpu_bytes": memory,
        "gpu_mem_bytes": gpu_mem,
        "usable_gpu_mem_bytes": usable,
        "fits": memory["total"] <= usable,
        "checkpoint_bytes": checkpoint_bytes,  # one save, all files
        "checkpoint_largest_write_bytes": largest_write,  # the most one rank writes (and holds on the host)
        "tokens_per_step": tokens_per_step,
        "tokens_per_step_ramp_start": (cfg.schedule.batch_ramp_start * seq
                                       if cfg.schedule.batch_ramp_start is not None else None),
        "mfu": mfu,
        "peak_flops": peak,
        "gpu_hours_per_trillion_tokens": gpu_hours(flops["flops_per_token"]),
        "gpu_hours_per_trillion_tokens_without_mtp": gpu_hours(flops_no_mtp),
        "step_time_s": tokens_per_step * flops["flops_per_token"] / (world * mfu * peak),
        "layout": {
            "nodes": cfg.launch.nodes, "gpus_per_node": per_node, "world_size": world,
            "ep": cfg.parallel.ep, "expert_data_parallel": world // cfg.parallel.ep,
            "zero_stage": cfg.parallel.zero_stage, "precision": mc.precision,
            **({"fp8_weights": cfg.fp8.weights, "fp8_weight_cache": cfg.fp8.weight_cache}
               if mc.precision == "fp8" else {}),
            "activation_checkpointing": cfg.train.activation_checkpointing,
            "micro_batch_size": cfg.train.micro_batch_size, "seq_len": seq,
            "global_batch_size": cfg.train.global_batch_size,
        },
    }
    return out


def _decimal_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1e3:.2f} KB"


def _si(n: float) -> str:
    """260.6e9 -> '260.6 G', 39.94e6 -> '39.94 M': four significant digits at any size (the smoke
    model's FLOPs printed as 0.0 G)."""
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n:.4g} "


def _fp8_weights_note(lay: dict) -> str:
    module = ("fp32 module weights (the master, 4 B/param)" if lay["fp8_weights"] == "fp32"
              else "bf16 module weights (2 B/param; the fp32 master in the optimizer)")
    copies = ("kept over each step (fp8.weight_cache)" if lay["fp8_weight_cache"]
              else "cast afresh per forward, one block's at a time" if lay["activation_checkpointing"]
              else "cast afresh per forward, kept to its backward")
    return (f"fp8 weights as this system runs them: {module}, 2 B FP8 copies of each GEMM weight {copies}; "
            "the report's FP8 primary weights are not built here")


def format_plan(r: dict) -> str:
    """The plan as a few readable lines."""
    gib = 2**30
    m, lay = r["memory_per_gpu_bytes"], r["layout"]
    parts = ", ".join(f"{k} {m[k] / gib:.1f}" for k in ("weights", "grads", "optimizer_states", "activations"))
    verdict = "fits" if r["fits"] else "does NOT fit"
    fp8_note = [_fp8_weights_note(lay)] if lay["precision"] == "fp8" else []
    return "\n".join([
        f"params: {human(r['params_total'])} total (+{human(r['params_mtp'])} MTP), "
        f"{human(r['params_active'])} active per token",
        f"FLOPs/token: {_si(r['flops_per_token'])} ({_si(r['flops_per_token_without_mtp'])} without MTP);"
        f" {r['flop_convention']}",
        f"layout: {lay['nodes']} nodes x {lay['gpus_per_node']} = {lay['world_size']} GPUs, EP {lay['ep']}, "
        f"ZeRO-{lay['zero_stage']}, {lay['precision']}, activation checkpointing "
        f"{'on' if lay['activation_checkpointing'] else 'off'}, micro-batch {lay['micro_batch_size']} x "
        f"{lay['seq_len']} tokens",
        f"memory per GPU (GiB): {parts}; total {m['total'] / gib:.1f} of {r['usable_gpu_mem_bytes'] / gib:.1f} "
        f"usable -> {verdict}",
        *fp8_note,
        f"checkpoint: {_decimal_bytes(r['checkpoint_bytes'])} per save (fp32 weights and AdamW moments); "
        f"the most one rank writes: {_decimal_bytes(r['checkpoint_largest_write_bytes'])}",
        f"tokens/step: {r['tokens_per_step']:,}; step time ~{r['step_time_s']:.3g} s at MFU {r['mfu']:.2f} of "
        f"{r['peak_flops'] / 1e12:.0f} TFLOP/s",
        f"GPU-hours per trillion tokens: {r['gpu_hours_per_trillion_tokens']:,.0f} "
        f"({r['gpu_hours_per_trillion_tokens_without_mtp']:,.0f} without MTP)",
    ])
