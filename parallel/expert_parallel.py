"""Expert parallelism: each rank holds n_routed_experts / ep experts of every MoE layer and
tokens travel to them by all-to-all.

Per MoE layer, on every rank of an EP group (see groups.py):

    1. sort this rank's token copies (N·k of them) by global expert id; experts are laid out
       contiguously by rank, so this also groups them by destination rank
    2. all-to-all the per-expert counts: each rank learns how many rows it will receive from
       every source for each of its local experts
    3. all-to-all the rows (autograd-aware: the backward is the reverse all-to-all)
    4. reorder the received rows from (source, expert) to (expert, source) order and run the
       local experts with the same grouped GEMM as one process
    5. undo 4, all-to-all the results back, weight by the gates and sum into the tokens

No token is dropped and no capacity factor exists (DeepSeek-V3 drops none). The model stays
pure: `apply_expert_parallel` swaps each MoE layer's `experts` module from outside.

The swapped module subclasses DeepSpeed's MoE layer class so the DeepSpeed engine recognises
it: its parameters are marked `allreduce=False` with the EP group's name, so ZeRO reduces
their gradients over the expert-data-parallel group only and partitions their optimizer state
there, while dense parameters reduce over the whole world.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from model import DeepSeekV3
from model.moe import RoutedExperts, combine_rows, gather_rows, sort_by_key

from .groups import ExpertLayout


class AllToAll(torch.autograd.Function):
    """all_to_all_single on rows with uneven splits; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty(sum(ctx.in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return back, None, None, None


def _deepspeed_moe_base():
    from deepspeed.moe.layer import MoE

    return MoE


class ExpertParallelExperts(RoutedExperts, _deepspeed_moe_base()):
    """This rank's shard of a layer's routed experts, with all-to-all token dispatch.

    Parameters keep RoutedExperts' names (`gate_up_proj`, `down_proj`) with only the local
    experts along dim 0, so state-dict keys match the single-process model.
    """

    def __init__(self, full: RoutedExperts, layout: ExpertLayout):
        # Neither RoutedExperts.__init__ (its super() chain would reach DeepSpeed's MoE.__init__,
        # which builds a gate and experts of its own) nor MoE.__init__ runs: plain Module init,
        # then the local slices and every plain attribute of the module being replaced (its
        # GEMM implementation choice, FP8 settings, ...).
        nn.Module.__init__(self)
        for key, value in vars(full).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        first, last = layout.expert_range
        # On a meta-device model (training builds one) these slices are shapes only: the rank
        # allocates and initialises just its experts when the model is materialised.
        self.gate_up_proj = nn.Parameter(full.gate_up_proj.detach()[first:last].clone())
        self.down_proj = nn.Parameter(full.down_proj.detach()[first:last].clone())
        self.first_expert = first
        local = layout.local_experts
        self.layout = layout
        self.num_local_experts = local
        self.num_experts = layout.n_routed_experts  # global count, as DeepSpeed's MoE reports it
        self.ep_size = layout.ep
        self.expert_group_name = layout.group_name
        for p in self.parameters():
            p.allreduce = False  # DeepSpeed: not a dense parameter ...
            p.group_name = layout.group_name  # ... reduce over this EP size's EDP group

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the DeepSpeed engine; the groups already exist (parallel.groups)."""

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """x (N, hidden), topk_idx/topk_weight (N, top_k) global expert ids -> (N, hidden)."""
        lay, group = self.layout, self.layout.ep_group
        n, k = topk_idx.shape
        flat_expert = topk_idx.reshape(-1)  # (N·k,)
        order, inverse = sort_by_key(flat_expert)
        send_counts = torch.bincount(flat_expert, minlength=self.num_experts).view(lay.ep, self.num_local_experts)
        recv_counts = torch.empty_like(send_counts)  # (ep, local): rows = source rank
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()

        rows = gather_rows(x, order, inverse, k)  # (N·k, hidden), grouped by destination rank
        received = AllToAll.apply(rows, recv_splits, send_splits, group)  # (R, hidden), (source, expert) order
        local_id = torch.arange(self.num_local_experts, device=x.device).repeat(lay.ep)
        local_id = local_id.repeat_interleave(recv_counts.flatten())  # (R,) local expert of each row
        by_expert, to_source = sort_by_key(local_id)  # (source, expert) -> (expert, source) and back
        y = self.expert_ffn(gather_rows(received, by_expert, to_source), recv_counts.sum(0))
        y = gather_rows(y, to_source, by_expert)  # back to (source, expert) order
        returned = AllToAll.apply(y, send_splits, recv_splits, group)  # (N·k, hidden), this rank's sorted order
        return combine_rows(returned, topk_weight, order, inverse).to(x.dtype)


def apply_expert_parallel(model: DeepSeekV3, layout: ExpertLayout) -> DeepSeekV3:
    """Swap every MoE layer's experts for this rank's shard (in place). With ep = 1 every rank
    holds all experts and they are ordinary replicated parameters: nothing to do."""
    if layout.ep == 1:
        return model
    for moe in model.moe_layers():
        moe.experts = ExpertParallelExperts(moe.experts, layout)
    return model


def is_expert_param(p: nn.Parameter) -> bool:
    return getattr(p, "allreduce", True) is False
