"""The DeepSeek-V3 network: embedding, decoder blocks (MLA + dense FFN or MoE), final norm,
output head, optional MTP modules, and the training losses."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, noop_context_fn

from .attention import MLA
from .config import ModelConfig
from .loss import linear_cross_entropy_heads, logits_cross_entropy
from .moe import MLP, MoE, update_correction_bias
from .mtp import MTPModule
from .norm import RMSNorm
from .rope import RotaryEmbedding


def block_of(name: str) -> tuple[int, int]:
    """Where a parameter or buffer name of DeepSeekV3 sits, in network order: (0, 0) outside the
    blocks (embedding, final norm, head), (1, i) decoder layer i, (2, k) MTP module k. For work
    done a block at a time (checkpoint conversion)."""
    kind, _, rest = name.partition(".")
    if kind == "layers":
        return 1, int(rest.split(".", 1)[0])
    if kind == "mtp":
        return 2, int(rest.split(".", 1)[0])
    return 0, 0


@torch.no_grad()
def init_weights(module: nn.Module, std: float, seed: int, prefix: str = "") -> None:
    """Report §4.2: every weight matrix N(0, std=0.006); norms 1; routing correction biases 0.

    Every weight draws from a generator of its own, seeded by (seed, the parameter's name in
    the model; `prefix` is the name of `module` there), and a stacked expert weight
    (RoutedExperts: experts along dim 0) seeds each expert's slice by its global expert id.
    So no value depends on which other parameters exist: an expert-parallel rank that builds
    only experts 8..15 (parallel/expert_parallel.py) gets exactly the values one process holds
    there, and a model built on the meta device and materialised equals one built directly.
    Values are drawn on the CPU, so they are the same on every device. Meta tensors are
    skipped (nothing to fill).
    """
    for mod_name, mod in module.named_modules(prefix=prefix):
        first_expert = getattr(mod, "first_expert", None)  # set by RoutedExperts and its EP shard
        for name, p in mod.named_parameters(prefix=mod_name, recurse=False):
            if p.is_meta:
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif first_expert is None:
                p.copy_(_seeded_normal(p.shape, std, seed, name))
            else:
                for i in range(p.shape[0]):
                    p[i].copy_(_seeded_normal(p.shape[1:], std, seed, f"{name}[{first_expert + i}]"))
        bias = getattr(mod, "e_score_correction_bias", None)
        if bias is not None and not bias.is_meta:
            bias.zero_()


def _seeded_normal(shape: torch.Size, std: float, seed: int, key: str) -> torch.Tensor:
    """N(0, std) fp32 CPU values from a generator seeded by (seed, key)."""
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.empty(shape, device="cpu").normal_(0.0, std, generator=g)


class DecoderLayer(nn.Module):
    """Pre-norm block: h + MLA(norm(h)), then + FFN(norm(h)); FFN is dense or MoE."""

    def __init__(self, cfg: ModelConfig, layer_id: int, moe: bool):
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoE)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h (B, T, d) -> (h, expert counts (E,) or None, balance loss or None)."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        x = self.post_attention_layernorm(h)
        if self.is_moe:
            y, counts, aux = self.mlp(x)
        else:
            y, counts, aux = self.mlp(x), None, None
        return h + y, counts, aux


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, vocab) main head; None unless forward(return_logits=True)
    loss: torch.Tensor  # lm_loss + λ·mtp_loss (+ balance loss when enabled): the one to differentiate
    # lm_loss and mtp_loss are for logging: on the fused head path (the default) no gradient flows from them
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor | None  # mean over the D depths of each depth's CE; None when D = 0
    expert_counts: torch.Tensor  # (n_moe_layers, n_routed_experts), MTP blocks last
    balance_loss: torch.Tensor | None = None


class DeepSeekV3(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # One draw from torch's global RNG seeds every weight (init_weights), so torch.manual_seed(s)
        # before construction fixes the model as for any torch module, on the meta device too. It
        # comes first: the submodules' own default inits draw from that RNG, but not on meta.
        self.init_seed = int(torch.randint(0, 2**62, (), device="cpu"))
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, moe=i >= cfg.first_k_dense_replace) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # (weight, [(h, targets)] per head, coefs, chunk) -> (weighted sum, per-head CE);
        # `dsv3 bench` wraps it to time the heads
        self.head_loss = linear_cross_entropy_heads
        self.rotary = RotaryEmbedding(cfg)
        self.mtp = nn.ModuleList(
            MTPModule(cfg, cfg.num_hidden_layers + k, DecoderLayer(cfg, cfg.num_hidden_layers + k, moe=True))
            for k in range(cfg.num_nextn_predict_layers)
        )
        # Full-block activation checkpointing (train.activation_checkpointing, set by parallel.engine):
        # a run setting, not the network's shape, so not a ModelConfig field.
        self.activation_checkpointing = False
        # torch checkpoint's context_fn: (forward context, recompute context); parallel/fp8.py sets
        # one under Transformer Engine, so that the recompute in backward runs TE's FP8 recipe too
        self.checkpoint_contexts = noop_context_fn
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initial values into every parameter with storage (meta ones are skipped)."""
        init_weights(self, self.cfg.initializer_range, self.init_seed)

    def materialize(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> DeepSeekV3:
        """Storage on `device` and initial values for a model built on the meta device
        (`with torch.device("meta"): DeepSeekV3(cfg)`), after any reshaping such as expert
        parallelism's, so a rank only ever allocates what it holds (values are drawn on the CPU
        one weight at a time and copied over). `dtype` (bf16 training) stores the parameters in
        it from the start, rounded from the fp32 draws, instead of in fp32 for DeepSpeed to cast;
        buffers (the routing biases) stay fp32. A model with storage is returned as it is."""
        if any(t.is_meta for t in itertools.chain(self.parameters(), self.buffers())):
            if dtype is not None:
                for p in self.parameters():
                    p.data = p.data.to(dtype)  # meta: a change of shape record, nothing allocated
            # to_empty makes new Parameter objects: carry over attributes set on the old ones
            # (expert parallelism marks its parameters for DeepSpeed)
            marks = {name: dict(vars(p)) for name, p in self.named_parameters() if vars(p)}
            self.to_empty(device=device)
            for name, p in self.named_parameters():
                vars(p).update(marks.get(name, {}))
            self.reset_parameters()
        return self

    # ------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts (works on the meta device).

        total: every parameter of the main model (embedding and head included, MTP excluded,
        as the report's 671B); mtp: the MTP modules; active: the weights one token multiplies
        with in the main model: routed experts counted top-k of n, the output head included, the
        input embedding (a lookup) not. That is N of the FLOP convention (6·N per token), and
        matches the published 37B (V3) and 2.4B (V2-Lite) to within 2%.
        """
        cfg = self.cfg
        total = mtp = routed = 0
        for name, p in self.named_parameters():
            if name.startswith("mtp."):
                mtp += p.numel()
                continue
            total += p.numel()
            if ".mlp.experts." in name:
                routed += p.numel()
        embedding = self.embed_tokens.weight.numel()
        active = total - embedding - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
        return {"total": total, "active": active, "mtp": mtp}

    def moe_layers(self) -> list[MoE]:
        """Every MoE module in expert_counts order: main layers, then MTP blocks."""
        blocks = [layer for layer in self.layers if layer.is_moe] + [m.block for m in self.mtp]
        return [b.mlp for b in blocks]

    @torch.no_grad()
    def update_routing_bias(self, expert_counts: torch.Tensor, gamma: float) -> None:
        """Apply the aux-loss-free update to every router; counts (n_moe_layers, E) summed over the step."""
        for moe, counts in zip(self.moe_layers(), expert_counts):
            update_correction_bias(moe.gate.e_score_correction_bias, counts, gamma)

    def _block(self, block: nn.Module, *args):
        """One decoder block or MTP module. With activation checkpointing (training, grad on) autograd
        keeps only its inputs and runs it again in backward to rebuild the rest; what it returns,
        expert counts included, comes from this forward alone, and the recompute sees the same
        routing bias, since the bias moves only after the optimizer step."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, context_fn=self.checkpoint_contexts)
        return block(*args)

    def _trunk(self, tokens: torch.Tensor):
        t = tokens.shape[1]
        cos, sin = self.rotary(torch.arange(t, device=tokens.device))
        h = self.embed_tokens(tokens)  # (B, T, d)
        counts, aux = [], []
        for layer in self.layers:
            h, c, a = self._block(layer, h, cos, sin)
            if c is not None:
                counts.append(c)
            if a is not None:
                aux.append(a)
        return self.norm(h), cos, sin, counts, aux

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        mtp_weight: float | None = None,
        return_logits: bool = False,
    ):
        """tokens (B, T) -> logits (B, T, vocab); with targets (B, T; next tokens, -100 ignored) -> ModelOutput.

        With targets the head and cross-entropy run fused in chunks (model/loss.py) and
        ModelOutput.logits is None; return_logits=True (or model.loss_chunk_size=0) takes the
        reference path that materialises the logits and returns them.
        """
        h, cos, sin, counts, aux = self._trunk(tokens)
        if targets is None:
            return self.lm_head(h)  # (B, T, vocab)
        if self.mtp and tokens.shape[1] <= len(self.mtp):
            raise ValueError(f"a sequence of {tokens.shape[1]} tokens leaves nothing for MTP depth {len(self.mtp)} "
                             f"to predict (num_nextn_predict_layers={len(self.mtp)}): needs more tokens than depths")
        heads = [(h, targets)]  # (the representation a head reads, its targets), main head first
        for k, module in enumerate(self.mtp, start=1):
            t = h.shape[1] - 1  # depth k covers positions 0 .. T-k-1 of the input
            # input token at position i is t_{i+k} = tokens[i+k] (the input itself, never a target,
            # which may be ignored: -100); its target t_{i+k+1} = targets[i+k]
            next_tok = tokens[:, k : k + t]
            # checkpointed whole (input norms and eh_proj with the block): one d-wide input kept per depth
            h, c, a = self._block(module, h[:, :t], self.embed_tokens(next_tok), cos[:t], sin[:t])
            counts.append(c)
            if a is not None:
                aux.append(a)
            heads.append((h, targets[:, k:]))

        depth = len(self.mtp)
        weight = self.cfg.mtp_loss_weight if mtp_weight is None else mtp_weight
        logits = None
        if self.cfg.loss_chunk_size > 0 and not return_logits:
            # every head in one fused call (one weight cast under autocast, one shared dW):
            # L = lm_loss + (λ/D) Σ_k mtp_loss_k
            coefs = [1.0] + [weight / depth for _ in range(depth)]
            loss, per_head = self.head_loss(self.lm_head.weight, heads, coefs, self.cfg.loss_chunk_size)
            lm_loss, mtp_loss = per_head[0], per_head[1:].mean() if depth else None
        else:
            all_logits = [self.lm_head(h_k) for h_k, _ in heads]
            logits = all_logits[0]  # the main head's, returned
            per_head = [logits_cross_entropy(lg, targets_k) for lg, (_, targets_k) in zip(all_logits, heads)]
            lm_loss, mtp_loss = per_head[0], torch.stack(per_head[1:]).mean() if depth else None
            loss = lm_loss if mtp_loss is None else lm_loss + weight * mtp_loss
        balance = torch.stack(aux).sum() if aux else None
        if balance is not None:
            loss = loss + balance
        expert_counts = (
            torch.stack(counts) if counts else torch.zeros(0, self.cfg.n_routed_experts, dtype=torch.long)
        )
        return ModelOutput(logits, loss, lm_loss, mtp_loss, expert_counts, balance)
