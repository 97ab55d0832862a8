"""Activation checkpointing (train.activation_checkpointing): the same numbers, less kept for backward.

Each decoder block and MTP module runs again in backward from its kept input: the same ops on the
same inputs, so on CPU fp32 the loss, every gradient and the expert counts must equal the plain
forward's exactly (tolerance 0), with the emulated FP8 GEMMs too.
"""

from __future__ import annotations

import pytest
import torch

import model.transformer as transformer
from launch.local import launch_local
from launch.slurm import check_launch
from model import ConfigError
from parallel import fp8 as pf8
from parallel.engine import keep_router_bias_fp32, router_biases
from train.config import Config, DataConfig, FP8Config, TrainConfig, load_config
from train.plan import activation_bytes

from .helpers import build, make_config

B, T = 4, 32
# helpers.BASE (low-rank q, a dense first layer, shared experts) with two MTP depths and the balance loss
SHAPE = dict(num_nextn_predict_layers=2, seq_aux_loss_alpha=1e-3)


def _model(checkpointing: bool, **overrides):
    model = build(seed=0, **{**SHAPE, **overrides}).train()
    if model.cfg.precision == "fp8":
        pf8.apply_fp8(model, Config(model=model.cfg), "cpu")
    elif model.cfg.precision == "bf16":  # what DeepSpeed's bf16 engine trains: bf16 weights, fp32 routing bias
        biases = router_biases(model)
        model.to(torch.bfloat16)
        keep_router_bias_fp32(model, biases)
    model.activation_checkpointing = checkpointing
    return model


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    seq = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(0))
    return seq[:, :-1], seq[:, 1:]


def _step(checkpointing: bool, **overrides):
    """One forward and backward: (ModelOutput, {parameter name: grad})."""
    model = _model(checkpointing, **overrides)
    out = model(*_batch(model.cfg.vocab_size))
    out.loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("precision", ["fp32", "fp8", "bf16"], ids=["fp32", "fp8_emulated", "bf16"])
def test_checkpointing_changes_no_number(precision):
    plain, plain_grads = _step(False, precision=precision)
    ckpt, ckpt_grads = _step(True, precision=precision)
    for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "expert_counts"):
        assert torch.equal(getattr(plain, key), getattr(ckpt, key)), key
    # the counts (the routing-bias update's input) come from the forward alone: k per token, per layer
    per_layer = ckpt.expert_counts.sum(1).tolist()
    assert per_layer == [B * T * 2] * 2 + [B * (T - 1) * 2, B * (T - 2) * 2]  # 2 MoE layers, 2 MTP depths
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, grad in plain_grads.items():
        assert grad is not None and torch.equal(grad, ckpt_grads[name]), name


def test_checkpoint_only_when_training_with_grad(monkeypatch):
    calls = []

    def counting(fn, *args, **kwargs):
        calls.append(kwargs)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(transformer, "checkpoint", counting)
    model = _model(True)
    batch = _batch(model.cfg.vocab_size)
    model(*batch)
    # every block of the trunk, every MTP module; no extra contexts outside TE (parallel/fp8.py)
    assert calls == [{"use_reentrant": False, "context_fn": torch.utils.checkpoint.noop_context_fn}] * (3 + 2)
    calls.clear()
    with torch.no_grad():
        model(*batch)
    model.eval()
    model(*batch)
    model.train()
    model.activation_checkpointing = False
    model(*batch)
    assert calls == []


def _saved_bytes(model) -> tuple[int, dict[int, int]]:
    """Bytes of the tensors autograd keeps for backward during one forward (each storage once):
    in all, and per decoder block / MTP module (by its index, MTP modules last)."""
    seen, per_block, current = set(), {}, [None]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            per_block[current[0]] = per_block.get(current[0], 0) + storage.nbytes()
        return t

    hooks = []
    for i, block in enumerate([*model.layers, *model.mtp]):
        hooks.append(block.register_forward_pre_hook(lambda m, args, i=i: current.__setitem__(0, i)))
        hooks.append(block.register_forward_hook(lambda m, args, out: current.__setitem__(0, None)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*_batch(model.cfg.vocab_size))
    for h in hooks:
        h.remove()
    return sum(per_block.values()), {k: v for k, v in per_block.items() if k is not None}


def test_checkpointing_keeps_little_more_than_block_inputs():
    plain, per_block = _saved_bytes(_model(False))
    ckpt, _ = _saved_bytes(_model(True))
    assert ckpt < 0.1 * plain  # measured 0.05: block inputs, the embedding and the final norm's input
    # dsv3 plan's account: block inputs kept plus one block rebuilt at a time, against everything
    # kept. Measured 0.28 here, planned 0.33 (the plan counts logits the fused head never stores).
    measured = (ckpt + max(per_block.values())) / plain
    plans = [activation_bytes(Config(model=make_config(**SHAPE), data=DataConfig(seq_len=T),
                                     train=TrainConfig(micro_batch_size=B, activation_checkpointing=on)))
             for on in (False, True)]
    assert measured == pytest.approx(plans[1] / plans[0], rel=0.25)


def test_te_refuses_checkpointing_only_with_the_delayed_recipe():
    """The recompute re-enters TE's fp8_autocast (tests/distributed checks it runs inside); under
    delayed scaling that would fold its amaxes into the history twice, so that pair is refused."""
    cfg = Config(model=make_config(precision="fp8"), fp8=FP8Config(backend="te", recipe="delayed"),
                 train=TrainConfig(activation_checkpointing=True))
    with pytest.raises(ConfigError) as err:
        pf8.check_fp8_config(cfg)
    assert err.value.key == "train.activation_checkpointing" and "fp8.recipe=delayed" in str(err.value)
    # what train and bench hit first (parallel.engine.build_engine -> apply_fp8), before TE's GPU check
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        pf8.apply_fp8(build(seed=0, precision="fp8"), cfg, "cpu")
    for recipe in ("blockwise", "current", "mxfp8"):
        cfg.fp8.recipe = recipe
        pf8.check_fp8_config(cfg)
    cfg.fp8.recipe, cfg.train.activation_checkpointing = "delayed", False
    pf8.check_fp8_config(cfg)
    # configs/671b.yaml (fp8 on TE, blockwise, checkpointing on) passes, and both launchers refuse
    # the delayed recipe with it before a job is queued or ranks are started
    big = load_config("configs/671b.yaml")
    assert big.train.activation_checkpointing and big.fp8.backend == "te" and big.fp8.recipe == "blockwise"
    pf8.check_fp8_config(big)
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        check_launch(load_config("configs/671b.yaml", ["fp8.recipe=delayed"]))
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        # 64 processes: the config's EP=64 must tile them, or that is refused first
        launch_local("configs/671b.yaml", 64, ["fp8.recipe=delayed"], log=lambda *_: pytest.fail("must not launch"))
