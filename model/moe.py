"""DeepSeekMoE (report §2.1.2): shared experts plus fine-grained routed experts.

    s_i     = sigmoid(u · e_i)                        affinity, fp32 (softmax for V2-style configs)
    select  = top-k of (s_i + b_i) inside the topk_group best groups
    g_i     = s_i / Σ_selected s_j · routed_scaling_factor
    out     = Σ_shared FFN(u) + Σ_selected g_i · FFN_i(u)

b is the aux-loss-free correction bias (a buffer, no gradient): it changes which experts are
chosen, never how much they weigh. The trainer nudges it after each optimizer step with
`update_correction_bias` (report §2.1.2, "Auxiliary-Loss-Free Load Balancing").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class Routing:
    """What the router decided for N tokens."""

    topk_idx: torch.Tensor  # (N, top_k) int64 expert ids
    topk_weight: torch.Tensor  # (N, top_k) fp32 gate values g_i
    scores: torch.Tensor  # (N, n_routed_experts) fp32 affinities s (unbiased)


class Router(nn.Module):
    """Group-limited top-k router with a selection-only correction bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # fp32 always: tiny per-step updates (γ = 1e-3) would vanish in bf16.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Routing:
        """x (N, hidden) -> Routing."""
        cfg = self.cfg
        # fp32 as in the report (§3.3 keeps the gating module in high precision), even under autocast
        with torch.autocast("cuda" if x.is_cuda else "cpu", enabled=False):
            logits = F.linear(x.float(), self.weight.float())  # (N, E)
        if cfg.scoring_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias  # bias steers selection only
        if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
            n = choice.shape[0]
            grouped = choice.view(n, cfg.n_group, -1)  # (N, groups, experts per group)
            if cfg.scoring_func == "sigmoid":
                group_score = grouped.topk(2, dim=-1).values.sum(-1)  # V3: sum of the group's top-2
            else:
                group_score = grouped.amax(dim=-1)  # V2 "group_limited_greedy": the group's best
            keep = group_score.topk(cfg.topk_group, dim=-1).indices  # (N, topk_group)
            dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
            # -inf, not 0: s + b can be negative, and a masked expert must never win.
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view(n, -1)
        topk_idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices  # (N, top_k)
        weight = scores.gather(1, topk_idx)  # gate values come from the unbiased affinities
        if cfg.norm_topk_prob:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        return Routing(topk_idx, weight * cfg.routed_scaling_factor, scores)


# The stacked expert weights' names in the model's state dict (each (E, ...), dim 0 the expert):
# the tensors that checkpoints shard by expert and the HF format splits into one per expert.
STACKED_EXPERT_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def is_stacked_expert_weight(name: str) -> bool:
    return name.endswith(STACKED_EXPERT_WEIGHTS)


class RoutedExperts(nn.Module):
    """n_routed_experts SwiGLU experts stored as stacked weights.

    gate_up_proj (E, 2·I, hidden) holds each expert's gate rows then up rows; down_proj (E, hidden, I).
    Stacked storage lets the fast path run all experts in one grouped GEMM and lets expert
    parallelism shard along dim 0.

    `impl="loop"` is the slow, obvious reference (one matmul per expert over its tokens);
    `impl="grouped"` sorts token copies by expert and runs one grouped GEMM per projection.
    The two are tested equal.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, impl: str = "grouped"):
        super().__init__()
        self.num_experts, self.impl = num_experts, impl
        self.first_expert = 0  # global id of the first expert held here (an EP shard's differs; init_weights)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # (x, w, counts) -> rows; parallel/fp8.py swaps in an FP8 GEMM from outside
        self.gemm = grouped_mm

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """x (N, hidden), topk_idx/topk_weight (N, top_k) -> (N, hidden) weighted sum of expert outputs."""
        if self.impl == "loop":
            return self.forward_loop(x, topk_idx, topk_weight)
        return self.forward_grouped(x, topk_idx, topk_weight)

    def forward_loop(self, x, topk_idx, topk_weight):
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = (topk_idx == e).nonzero(as_tuple=True)  # tokens that picked expert e
            if token.numel() == 0:
                continue
            gate, up = F.linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e])  # (n_e, hidden)
            out.index_add_(0, token, y * topk_weight[token, slot, None].to(y.dtype))
        return out

    def forward_grouped(self, x, topk_idx, topk_weight):
        n, k = topk_idx.shape
        flat_expert = topk_idx.reshape(-1)  # (N·k,)
        order, inverse = sort_by_key(flat_expert)  # token copies sorted by expert
        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        xs = gather_rows(x, order, inverse, k)  # (N·k, hidden): copy i is token order[i] // k
        y = self.expert_ffn(xs, counts)  # (N·k, hidden)
        return combine_rows(y, topk_weight, order, inverse).to(x.dtype)

    def expert_ffn(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows of xs sorted by expert, counts[e] rows each -> each row through its expert's FFN.

        Also the entry point for expert parallelism, which hands in the tokens it received.
        """
        gate, up = self.gemm(xs, self.gate_up_proj, counts).chunk(2, dim=-1)  # (rows, I) each
        return self.gemm(F.silu(gate) * up, self.down_proj, counts)


def sort_by_key(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """key (n,) ints -> (order, inverse): order sorts key stably (equal keys keep their order),
    inverse = order's inverse permutation, by a scatter (a second argsort costs 5-20x more)."""
    order = key.argsort(stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return order, inverse


class _GatherRows(torch.autograd.Function):
    """rows = x[order // k]. Backward sums each token's k copies with one embedding_bag (a
    gather-and-sum by the inverse permutation) instead of autograd's zero fill + accumulating
    scatter (index_put), which on CPU cost more than the expert GEMMs of a small model."""

    @staticmethod
    def forward(ctx, x, order, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        if ctx.k == 1:
            return grad.index_select(0, inverse), None, None, None
        return F.embedding_bag(inverse.view(-1, ctx.k), grad.contiguous(), mode="sum"), None, None, None


def gather_rows(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int = 1) -> torch.Tensor:
    """x (N, d) -> (N·k, d) with row i = x[order[i] // k]; inverse: order's inverse permutation.

    With k = 1 a plain row permutation (its backward is the inverse permutation)."""
    return _GatherRows.apply(x, order, inverse, k)


class _CombineRows(torch.autograd.Function):
    """out[t] = Σ_j w[t, j] · y[inverse[t·k + j]]: un-sort the expert outputs and take each
    token's weighted sum in one embedding_bag, never forming the (N, k, d) token-major copy.
    Backward works in expert order: row i of y belongs to token order[i] // k."""

    @staticmethod
    def forward(ctx, y, weight, order, inverse):
        n, k = weight.shape
        w = weight.to(y.dtype)
        ctx.save_for_backward(y, w, order, inverse)
        ctx.weight_dtype = weight.dtype
        return F.embedding_bag(inverse.view(n, k), y, per_sample_weights=w, mode="sum")  # (N, d)

    @staticmethod
    def backward(ctx, grad):
        y, w, order, inverse = ctx.saved_tensors
        n, k = w.shape
        grad_rows = grad.index_select(0, order // k)  # (N·k, d): each copy's token gradient
        dots = torch.bmm(grad_rows.unsqueeze(1), y.unsqueeze(2)).view(-1)  # row-wise <grad, y>, no temporary
        grad_w = dots.index_select(0, inverse).view(n, k).to(ctx.weight_dtype)
        grad_y = grad_rows.mul_(w.reshape(-1).index_select(0, order).unsqueeze(-1))
        return grad_y, grad_w, None, None


def combine_rows(y: torch.Tensor, weight: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """y (N·k, d) in expert order, weight (N, k) gate values -> (N, d) Σ_j weight[t, j] · copy (t, j)."""
    with torch.autocast(y.device.type, enabled=False):  # y's dtype, as the elementwise version had
        return _CombineRows.apply(y, weight, order, inverse)


def _grouped_mm_supported(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row block e of x (counts[e] rows) times w[e]ᵀ. x (rows, in), w (E, out, in) -> (rows, out).

    One `torch._grouped_mm` call where torch has a kernel for the device and dtype, else a loop
    over the experts' contiguous blocks (same result, more launches).
    """
    if _grouped_mm_supported(x):
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
    blocks = x.split(counts.tolist())
    return torch.cat([b @ w[e].t() for e, b in enumerate(blocks)])


class MoE(nn.Module):
    """Router + routed experts + shared experts for one layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.moe_impl)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x (B, T, hidden) -> (output (B, T, hidden), expert token counts (E,), balance loss or None)."""
        b, t, h = x.shape
        flat = x.reshape(b * t, h)
        routing = self.gate(flat)
        out = self.experts(flat, routing.topk_idx, routing.topk_weight)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        counts = torch.bincount(routing.topk_idx.reshape(-1), minlength=self.cfg.n_routed_experts)
        aux = None
        if self.cfg.seq_aux_loss_alpha > 0 and self.training:
            aux = sequence_balance_loss(routing, b, t, self.cfg)
        return out.view(b, t, h), counts, aux


def sequence_balance_loss(routing: Routing, batch: int, seq: int, cfg: ModelConfig) -> torch.Tensor:
    """Complementary sequence-wise balance loss (report eq. 17-20), averaged over sequences.

    L = α Σ_i f_i P_i with f_i = E/(k·T) · #tokens of the sequence whose top-k affinities s
    include expert i and P_i = mean over the sequence of s_i / Σ_j s_j. As eq. 18 writes it (and
    Megatron-Core computes it), the top-k is over the raw s: no correction bias, no group limit,
    so it can differ from the experts the tokens were dispatched to.
    """
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    probs = routing.scores / routing.scores.sum(-1, keepdim=True)  # (N, E)
    p = probs.view(batch, seq, e).mean(1)  # (B, E)
    top = routing.scores.topk(k, dim=-1).indices  # (N, k)
    hits = torch.zeros(batch, e, device=probs.device)
    seq_of = torch.arange(batch, device=probs.device).repeat_interleave(seq * k)
    hits.index_put_((seq_of, top.reshape(-1)), torch.ones_like(seq_of, dtype=hits.dtype), accumulate=True)
    f = hits * e / (k * seq)  # (B, E)
    return cfg.seq_aux_loss_alpha * (f * p).sum(-1).mean()


@torch.no_grad()
def update_correction_bias(bias: torch.Tensor, counts: torch.Tensor, gamma: float) -> torch.Tensor:
    """Aux-loss-free balancing: b_i += γ · sign(mean(c) − c_i), in place; returns bias.

    counts are the tokens routed to each expert during one optimizer step, summed over
    micro-batches and over every rank (the caller all-reduces them first). Overloaded experts
    (c_i above the mean) get a lower bias, underloaded ones a higher bias.
    """
    c = counts.to(torch.float32)
    bias.add_(gamma * torch.sign(c.mean() - c).to(bias.device))
    return bias
