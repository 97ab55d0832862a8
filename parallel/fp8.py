"""FP8 mixed precision (DeepSeek-V3 report §3.3), applied to the model from outside.

`apply_fp8(model, cfg, device)` is the one switch: with `model.precision: fp8` it swaps the
model's linear layers for FP8 ones and sets the routed experts' grouped GEMM, before DeepSpeed
wraps the model; `autocast(model, first_microbatch=...)` is the context the training loop runs
each forward in. Two backends (`fp8.backend`):

  emulated  model/linear.py's pure-torch blockwise recipe (1×128 activation/gradient tiles,
            128×128 weight blocks, 128×1 re-quantisation for wgrad): runs anywhere, on CPU the
            only choice. `fp8.recipe` must be `blockwise`.
  te        NVIDIA Transformer Engine (`pip install 'dsv3[gpu]'`, CUDA only): `te.Linear` in
            place of nn.Linear (weights copied), `te.GroupedLinear` for the routed experts
            (GroupedLinearExperts; on an expert-parallel shard it runs the shard's local
            experts, behind the shard's own all-to-all dispatch), and
            `te.fp8_autocast(enabled=True, fp8_recipe=...)` around the forward, with the recipe
            `fp8.recipe` names: blockwise -> Float8BlockScaling (the report's scheme),
            current -> Float8CurrentScaling, delayed -> DelayedScaling, mxfp8 -> MXFP8BlockScaling.

What stays in high precision, following the report (§3.3: "the embedding module, the output
head, MoE gating modules, normalization operators, and attention operators"):
  - embed_tokens (a lookup, no GEMM) and lm_head (the output head: its logits feed the loss
    directly, and at vocab 129K it is one GEMM among ~60 layers of them);
  - the router (`mlp.gate`): its own fp32 matmul, autocast off; routing decisions hinge on
    small score differences and on the γ = 1e-3 bias steps;
  - every RMSNorm (fp32 inside) and the attention core (SDPA on q, k, v);
  - MLA's projections follow the report and run in FP8 (q_a_proj, q_b_proj / q_proj,
    kv_a_proj_with_mqa, kv_b_proj, o_proj), with one exception under TE: a projection stays
    BF16 when its dims do not meet the recipe's alignment. TE's blockwise recipe needs both
    dims of every quantised operand to be multiples of 128, so at the 671B shape
    kv_a_proj_with_mqa (7168 -> 512 + 64 = 576 = 4.5 × 128) stays BF16 there, while the
    emulated backend quantises it with a partial last block (the released FP8 checkpoint stores
    it the same way, with a 5 × 56 grid of block scales). MXFP8 needs multiples of 32, the
    per-tensor recipes multiples of 16 (576 passes both). `plan_fp8` lists every decision and
    its reason; `apply_fp8(..., verbose=True)` prints them.

Precision of everything else: master weights and gradients stay fp32. `fp8.weights` says where
the masters live. fp32 (the default): DeepSpeed runs in fp32 for precision=fp8, the module
weights are the masters and the optimizer sees them; on CPU that is all, emulated FP8 GEMMs and
fp32 elsewhere. bf16: DeepSpeed's bf16 engine, exactly as for precision=bf16: bf16 module weights
(what the FP8 GEMMs quantise from, and the high-precision GEMMs use), fp32 masters, moments and
gradient accumulation in ZeRO-2's partitions, half the weight memory on every rank (`dsv3 plan`).
On GPU, `autocast` adds torch bf16 autocast, so activations and the high-precision GEMMs run in
bf16 while the FP8 GEMMs quantise from them.

Activation checkpointing under TE: torch's checkpoint reruns a block in backward, after
te.fp8_autocast has exited. `apply_fp8` gives the model a checkpoint context that re-enters it
for the recompute, with the recipe and the first-micro-batch flag of the block's forward, so the
recompute quantises exactly as the forward did. Not with the delayed recipe, whose fp8_autocast
exit would fold the recompute's amaxes into the history a second time (refused by
check_fp8_config).

Weight-cast caching with gradient accumulation (TE's `is_first_microbatch`): TE can keep the FP8
copy of each weight from the first micro-batch of an optimizer step and reuse it for the others,
since weights change only at the step. The loop passes `first_microbatch=(i == 0)` to `autocast`,
which the TE modules here forward as `is_first_microbatch`: True recasts and caches, False reuses
the cache, and evaluation passes None (cast afresh, cache untouched), so a cast is never reused
across an optimizer step or into eval. The cache holds ~2 B per GEMM parameter (row- and
column-wise FP8 copies) for the whole run; `fp8.weight_cache: false` passes None always, so
each forward casts afresh and, with activation checkpointing, the copies live one block at a
time. The emulated backend recasts every call (no cache).

State dicts do not change: FP8Linear subclasses nn.Linear and shares the parameter objects; the
TE modules keep `weight`, drop TE's `_extra_state` (recipe metadata and, for delayed scaling,
the amax history, which restarts on resume), and the TE grouped experts present their
per-expert `weight0..weightE-1` as the stacked `gate_up_proj`/`down_proj` in state dicts and
accept them on load. Checkpoints, resume across precisions and the HF export are unaffected.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model import ConfigError
from model.linear import FP8Linear, fp8_grouped_mm
from model.moe import RoutedExperts

GPU_EXTRA = "pip install 'dsv3[gpu]'"

# Rows and both dims of a TE FP8 GEMM must be multiples of this (TE's documented requirements:
# blockwise: last dim and the product of the others divisible by 128; MXFP8: 32-element blocks;
# per-tensor scaling: FP8 GEMM dims divisible by 16).
TE_ALIGN = {"blockwise": 128, "mxfp8": 32, "current": 16, "delayed": 16}
TE_RECIPES = {
    "blockwise": "Float8BlockScaling",
    "current": "Float8CurrentScaling",
    "delayed": "DelayedScaling",
    "mxfp8": "MXFP8BlockScaling",
}


@dataclass
class FP8State:
    """What `autocast` needs, attached to the model by `apply_fp8` as `model.fp8_state`."""

    backend: str  # te | emulated
    recipe: str
    device: torch.device
    te_recipe: object | None = None  # the TE recipe object (te backend)
    first_microbatch: bool | None = None  # read by the TE modules during a forward
    weight_cache: bool = True  # fp8.weight_cache: False turns every first_microbatch into None


@dataclass
class FP8Plan:
    """Which GEMM modules run in FP8, and why the others do not."""

    backend: str
    recipe: str
    fp8: list[str] = field(default_factory=list)  # module names (nn.Linear or routed experts)
    high_precision: dict[str, str] = field(default_factory=dict)  # module name -> reason

    def summary(self) -> str:
        """One line; modules that differ only in their layer index are counted together."""
        groups: dict[tuple[str, str], int] = {}
        for name, reason in self.high_precision.items():
            key = (re.sub(r"\.\d+\.", ".*.", name), reason)
            groups[key] = groups.get(key, 0) + 1
        kept = "; ".join(f"{n}{f' (×{c})' if c > 1 else ''}: {r}" for (n, r), c in groups.items()) or "none"
        return (f"fp8 ({self.backend}, {self.recipe}): {len(self.fp8)} GEMM modules in FP8; "
                f"high precision (besides embedding, router, norms, attention core): {kept}")


# ----------------------------------------------------------------------------------------------
# Which modules


def plan_fp8(model: nn.Module, backend: str, recipe: str) -> FP8Plan:
    """Decide module by module (works on the meta device: reads shapes only)."""
    plan = FP8Plan(backend, recipe)
    align = TE_ALIGN[recipe] if backend == "te" else 1
    for name, module in model.named_modules():
        if isinstance(module, RoutedExperts):
            dims = tuple(module.gate_up_proj.shape[1:]) + tuple(module.down_proj.shape[1:])
        elif isinstance(module, nn.Linear):
            if name == "lm_head":
                plan.high_precision[name] = "output head (report §3.3)"
                continue
            dims = (module.in_features, module.out_features)
        else:
            continue
        if any(d % align for d in dims):
            plan.high_precision[name] = (f"dims {'×'.join(map(str, dims))} not multiples of {align} "
                                         f"(TE {recipe} recipe)")
        else:
            plan.fp8.append(name)
    return plan


# ----------------------------------------------------------------------------------------------
# Transformer Engine


def import_te():
    """(transformer_engine.pytorch, transformer_engine.common.recipe), or raise ImportError-like."""
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe as te_recipe

    return te, te_recipe


def _require_te(device: torch.device, recipe: str):
    """TE modules and the recipe object, or a ConfigError naming the gpu extra."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(
            "fp8.backend", "te",
            f"Transformer Engine needs a CUDA GPU (this run's device is {device.type}); on a GPU machine "
            f"install the gpu extra: {GPU_EXTRA}. Without one use fp8.backend=emulated",
        )
    try:
        te, te_recipe = import_te()
    except (ImportError, RuntimeError, OSError) as err:  # TE raises RuntimeError/OSError without CUDA/cuDNN
        why = (str(err).splitlines() or [""])[0]
        raise ConfigError(
            "fp8.backend", "te",
            f"Transformer Engine is not importable ({type(err).__name__}: {why}); "
            f"install the gpu extra: {GPU_EXTRA}, or use fp8.backend=emulated",
        ) from None
    cls = getattr(te_recipe, TE_RECIPES[recipe], None)
    if cls is None:
        raise ConfigError("fp8.recipe", recipe, f"this Transformer Engine has no {TE_RECIPES[recipe]}; "
                                                f"upgrade it ({GPU_EXTRA})")
    ok, reason = _te_supports(te, recipe)
    if not ok:
        raise ConfigError("fp8.recipe", recipe, f"not supported on this GPU: {reason}")
    return te, cls()  # recipe defaults: E4M3 throughout for blockwise/mxfp8, HYBRID for per-tensor


def _te_supports(te, recipe: str) -> tuple[bool, str]:
    """TE's own hardware check for the recipe, where this TE version has one."""
    name = {"blockwise": "check_fp8_block_scaling_support", "mxfp8": "check_mxfp8_support"}.get(
        recipe, "check_fp8_support")
    for module_name in ("fp8", "quantization"):
        check = getattr(getattr(te, module_name, None), name, None)
        if check is not None:
            ok, reason = check()
            return bool(ok), str(reason)
    return True, ""


def _te_autocast(te, te_recipe):
    fp8_autocast = getattr(te, "fp8_autocast", None)
    if fp8_autocast is not None:
        return fp8_autocast(enabled=True, fp8_recipe=te_recipe)
    return te.autocast(enabled=True, recipe=te_recipe)  # newer TE renamed it


class _NoExtraState:
    """Mixin: leave TE's `_extra_state` (FP8 metadata) out of state dicts, so keys match nn.Linear's."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state


class _RowAlignedLinear(_NoExtraState):
    """Mixin for a TE Linear: pads the flattened token rows to the recipe's multiple (MTP depth k
    sees T - k positions per sequence) and passes `is_first_microbatch` from the FP8 state."""

    # names of our own, clear of the TE module's attributes
    dsv3_fp8_state: FP8State
    dsv3_row_align: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (rows, in)
        rows = x2.shape[0]
        pad = -rows % self.dsv3_row_align
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))  # zero rows: zero outputs, zero weight-gradient terms
        y = super().forward(x2, is_first_microbatch=self.dsv3_fp8_state.first_microbatch)
        return y[:rows].reshape(*shape[:-1], y.shape[-1])


@functools.lru_cache(maxsize=None)
def row_aligned_linear_class(base: type) -> type:
    """`base` (te.Linear) with row padding, the first-micro-batch flag and no extra state."""
    return type(f"RowAligned{base.__name__}", (_RowAlignedLinear, base), {})


@functools.lru_cache(maxsize=None)
def no_extra_state_class(base: type) -> type:
    return type(f"{base.__name__}NoExtraState", (_NoExtraState, base), {})


def swap_linear(linear: nn.Linear, linear_cls: type, state: FP8State, row_align: int, device) -> nn.Module:
    """A `linear_cls` (TE Linear signature) with `linear`'s weights copied in, in their dtype."""
    new = row_aligned_linear_class(linear_cls)(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        params_dtype=linear.weight.dtype, device=device,
    )
    with torch.no_grad():
        new.weight.copy_(linear.weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    new.dsv3_fp8_state, new.dsv3_row_align = state, row_align
    return new


def _copy_param_marks(src: nn.Parameter, dst: list[nn.Parameter]) -> None:
    """Carry attributes set on a parameter by other wrappers (e.g. expert-parallel marks)."""
    for key, value in vars(src).items():
        for p in dst:
            setattr(p, key, value)


class GroupedLinearExperts(RoutedExperts):
    """Routed experts whose two grouped GEMMs run in a grouped linear module (TE's GroupedLinear:
    one weight per expert, `forward(x, m_splits, is_first_microbatch)`), FP8 under TE's autocast.

    Same interface as RoutedExperts (forward, expert_ffn for expert parallelism) and the same state
    dict: `gate_up_proj` (E, 2I, hidden) and `down_proj` (E, hidden, I), stacked from and split
    into the per-expert weights by state-dict hooks (checkpoints see the same stacking through
    `stacked_parameters`). Each expert's block of rows is zero-padded to `row_align` (TE's FP8
    GEMMs need aligned row counts), then unpadded.

    Built with `grouped_linear_experts`, which for an expert-parallel shard makes the subclass of
    both this and the shard's class: the shard's forward (all-to-all dispatch) around this
    class's expert_ffn over the shard's local experts.
    """

    def __init__(self, experts: RoutedExperts, grouped_linear_cls: type, state: FP8State, row_align: int, device):
        nn.Module.__init__(self)
        # every plain attribute of the module replaced: the expert count, and for an expert-
        # parallel shard its layout, global expert offset and DeepSpeed's MoE fields
        for key, value in vars(experts).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        self.impl = "grouped"
        n, two_i, hidden = experts.gate_up_proj.shape
        self.num_weights = n  # experts held here (an expert-parallel shard's local ones)
        cls = no_extra_state_class(grouped_linear_cls)
        dtype = experts.gate_up_proj.dtype
        self.gate_up = cls(n, hidden, two_i, bias=False, params_dtype=dtype, device=device)
        self.down = cls(n, two_i // 2, hidden, bias=False, params_dtype=dtype, device=device)
        with torch.no_grad():
            for e in range(n):
                getattr(self.gate_up, f"weight{e}").copy_(experts.gate_up_proj[e])
                getattr(self.down, f"weight{e}").copy_(experts.down_proj[e])
        _copy_param_marks(experts.gate_up_proj, list(self.gate_up.parameters()))
        _copy_param_marks(experts.down_proj, list(self.down.parameters()))
        self.fp8_state, self.row_align = state, row_align
        self.register_state_dict_post_hook(_stack_expert_weights)
        self.register_load_state_dict_pre_hook(_split_expert_weights)

    def stacked_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The per-expert weights under the stacked names RoutedExperts has, in expert order."""
        return {stacked: [getattr(getattr(self, child), f"weight{e}") for e in range(self.num_weights)]
                for stacked, child in _STACKED}

    def expert_ffn(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        counts_list = counts.tolist()  # TE takes host-side splits
        padded = [-(-c // self.row_align) * self.row_align for c in counts_list]
        dest = None
        if padded != counts_list:
            group = torch.repeat_interleave(torch.arange(len(counts_list), device=xs.device), counts)
            start = counts.cumsum(0) - counts
            padded_t = torch.tensor(padded, device=xs.device)
            dest = torch.arange(xs.shape[0], device=xs.device) - start[group] + (padded_t.cumsum(0) - padded_t)[group]
            xs = xs.new_zeros(sum(padded), xs.shape[1]).index_copy(0, dest, xs)  # (padded rows, hidden)
        first = self.fp8_state.first_microbatch
        dtype = xs.dtype  # TE returns the autocast dtype; the caller sums rows in place into xs's
        gate, up = self.gate_up(xs, padded, is_first_microbatch=first).chunk(2, dim=-1)  # (rows, I) each
        y = self.down(F.silu(gate) * up, padded, is_first_microbatch=first)  # (padded rows, hidden)
        return (y if dest is None else y[dest]).to(dtype)


_STACKED = (("gate_up_proj", "gate_up"), ("down_proj", "down"))


@functools.lru_cache(maxsize=None)
def _grouped_linear_shard_class(shard_cls: type) -> type:
    # MRO: GroupedLinearExperts (expert_ffn), then the shard class (forward, DeepSpeed's MoE base)
    return type(f"GroupedLinear{shard_cls.__name__}", (GroupedLinearExperts, shard_cls), {})


def grouped_linear_experts(experts: RoutedExperts, grouped_linear_cls: type, state: FP8State, row_align: int,
                           device) -> GroupedLinearExperts:
    """`experts` (RoutedExperts, or an expert-parallel shard of it) with its GEMMs in
    `grouped_linear_cls` (TE GroupedLinear signature), weights copied in their dtype."""
    cls = GroupedLinearExperts if type(experts) is RoutedExperts else _grouped_linear_shard_class(type(experts))
    return cls(experts, grouped_linear_cls, state, row_align, device)


def _stack_expert_weights(module, state_dict, prefix, local_metadata) -> None:
    for stacked, child in _STACKED:
        keys = [f"{prefix}{child}.weight{e}" for e in range(module.num_weights)]
        state_dict[prefix + stacked] = torch.stack([state_dict.pop(k).detach() for k in keys])


def _split_expert_weights(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    for stacked, child in _STACKED:
        if prefix + stacked in state_dict:
            w = state_dict.pop(prefix + stacked)  # (E, out, in)
            for e in range(w.shape[0]):
                state_dict[f"{prefix}{child}.weight{e}"] = w[e]


# ----------------------------------------------------------------------------------------------
# The switch


def check_fp8_config(cfg) -> None:
    """Config checks that need no hardware (run by apply_fp8 and, before anything starts, by both
    launchers); nothing to check unless model.precision is fp8."""
    if cfg.model.precision != "fp8":
        return
    if cfg.model.moe_impl != "grouped":
        raise ConfigError("model.moe_impl", cfg.model.moe_impl,
                          "precision=fp8 runs the routed experts through the grouped GEMM; use grouped")
    if cfg.fp8.backend == "emulated" and cfg.fp8.recipe != "blockwise":
        raise ConfigError("fp8.recipe", cfg.fp8.recipe,
                          "the emulated backend implements the report's blockwise recipe only; use blockwise "
                          "(or fp8.backend=te on a GPU)")
    if cfg.fp8.backend == "te" and cfg.fp8.recipe == "delayed" and cfg.train.activation_checkpointing:
        # the recompute re-enters fp8_autocast (see _checkpoint_contexts); under delayed scaling its
        # exit would fold the recompute's amaxes into the history a second time
        raise ConfigError("train.activation_checkpointing", True,
                          "not supported with fp8.backend=te and fp8.recipe=delayed (the recompute would "
                          "update the amax history twice); use fp8.recipe blockwise, current or mxfp8, or "
                          "train.activation_checkpointing=false")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_fp8(model: nn.Module, cfg, device: torch.device | str, verbose: bool = False) -> FP8Plan | None:
    """Swap FP8 GEMMs into `model` (in place) per cfg.model.precision / cfg.fp8; returns the plan.

    Call after the model is on its device and before the optimizer and DeepSpeed see its
    parameters (the TE backend replaces parameter objects). A no-op unless precision is fp8.
    """
    if cfg.model.precision != "fp8":
        return None
    check_fp8_config(cfg)
    device = torch.device(device)
    backend, recipe = cfg.fp8.backend, cfg.fp8.recipe
    te, te_recipe = _require_te(device, recipe) if backend == "te" else (None, None)
    plan = plan_fp8(model, backend, recipe)
    state = FP8State(backend, recipe, device, te_recipe, weight_cache=cfg.fp8.weight_cache)
    for name in plan.fp8:
        module = model.get_submodule(name)
        if backend == "emulated":
            if isinstance(module, RoutedExperts):
                module.gemm = fp8_grouped_mm
            else:
                _set_submodule(model, name, FP8Linear.from_linear(module))
        elif isinstance(module, RoutedExperts):
            experts = grouped_linear_experts(module, te.GroupedLinear, state, TE_ALIGN[recipe], device)
            _set_submodule(model, name, experts)
        else:
            _set_submodule(model, name, swap_linear(module, te.Linear, state, TE_ALIGN[recipe], device))
    model.fp8_state = state
    if backend == "te":
        model.checkpoint_contexts = functools.partial(_checkpoint_contexts, state)
    if verbose:
        print(plan.summary(), file=sys.stderr, flush=True)
    return plan


def autocast(model: nn.Module, first_microbatch: bool | None = None):
    """The context for one forward of `model` (the DeepSpeed engine's `.module`).

    fp8 on GPU: torch bf16 autocast, plus TE's fp8_autocast with the run's recipe for the te
    backend; `first_microbatch` (True on an optimizer step's first micro-batch, False on the
    others, None for eval) reaches TE as `is_first_microbatch`; with fp8.weight_cache=false it is
    always None (cast afresh, nothing cached). Anything else (fp32/bf16 runs, or emulated FP8 on
    CPU) gets a context that does nothing. Run backward outside it.
    """
    state = getattr(model, "fp8_state", None)
    if state is None:
        return contextlib.nullcontext()
    return _fp8_context(state, first_microbatch if state.weight_cache else None)


def _checkpoint_contexts(state: FP8State):
    """torch checkpoint's contexts for a block under TE (called during the block's forward): none
    extra for the forward, which already runs inside `autocast`; for the recompute in backward,
    after fp8_autocast has exited, fp8_autocast again with the recipe and the first-micro-batch
    flag this forward had. (torch restores its own autocast state for the recompute.)"""
    return contextlib.nullcontext(), _fp8_context(state, state.first_microbatch)


@contextlib.contextmanager
def _fp8_context(state: FP8State, first_microbatch: bool | None):
    previous = state.first_microbatch
    state.first_microbatch = first_microbatch
    try:
        with contextlib.ExitStack() as stack:
            if state.device.type == "cuda":
                stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
            if state.backend == "te":
                te, _ = import_te()
                stack.enter_context(_te_autocast(te, state.te_recipe))
            yield
    finally:
        state.first_microbatch = previous


__all__ = ["apply_fp8", "autocast", "plan_fp8", "check_fp8_config", "FP8Plan", "FP8State",
           "GroupedLinearExperts", "grouped_linear_experts", "swap_linear", "GPU_EXTRA", "TE_ALIGN"]
