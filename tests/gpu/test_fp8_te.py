"""FP8 through Transformer Engine on a GPU: agreement with the emulated recipe, and training steps.

Skipped without CUDA or without an importable Transformer Engine (`pip install 'dsv3[gpu]'`).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model import DeepSeekV3
from model.linear import fp8_grouped_mm, fp8_linear
from model.moe import RoutedExperts
from parallel import fp8 as pf8
from tests.support import rows, run_cli
from tests.unit.helpers import make_config
from train.config import Config, FP8Config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def te():
    try:
        te, _ = pf8.import_te()
    except (ImportError, RuntimeError, OSError) as err:
        pytest.skip(f"Transformer Engine not importable: {err}")
    ok, reason = pf8._te_supports(te, "blockwise")
    if not ok:
        pytest.skip(f"no blockwise FP8 on this GPU: {reason}")
    return te


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _state(recipe: str = "blockwise") -> pf8.FP8State:
    _, te_recipe = pf8._require_te(torch.device("cuda"), recipe)
    return pf8.FP8State("te", recipe, torch.device("cuda"), te_recipe)


def test_te_blockwise_linear_agrees_with_the_emulation(te):
    """TE's Float8BlockScaling (power-of-2 scales by default) against model/linear.py with
    pow2_scales=True on the same bf16 activations: the two differ only in GEMM accumulation and
    bf16 output rounding, so they agree far more closely (< 1%) than either agrees with the
    unquantised GEMM (~3.5%)."""
    torch.manual_seed(0)
    lin = nn.Linear(512, 384, bias=False, device="cuda")
    nn.init.normal_(lin.weight, std=0.05)
    state = _state()
    swapped = pf8.swap_linear(lin, te.Linear, state, 128, "cuda")
    holder = nn.Module()
    holder.fp8_state = state
    x = torch.randn(4, 256, 512, device="cuda").bfloat16().requires_grad_()
    dy = torch.randn(4, 256, 384, device="cuda").bfloat16()

    with pf8.autocast(holder, first_microbatch=True):
        y_te = swapped(x)
    y_te.backward(dy)
    dx_te, dw_te = x.grad.clone(), swapped.weight.grad.clone()

    x.grad = None
    w = lin.weight.detach().clone().requires_grad_()
    y_em = fp8_linear(x, w, pow2_scales=True)
    y_em.backward(dy)
    y_ref = x.detach().float() @ w.detach().t()
    for got, want in ((y_te, y_em), (dx_te, x.grad), (dw_te, w.grad)):
        assert rel(got, want) < 0.01
    assert 0.005 < rel(y_te, y_ref) < 0.06


def test_te_grouped_experts_agree_with_the_emulation(te):
    torch.manual_seed(1)
    experts = RoutedExperts(8, 256, 128).cuda()
    nn.init.normal_(experts.gate_up_proj, std=0.05)
    nn.init.normal_(experts.down_proj, std=0.05)
    state = _state()
    wrapped = pf8.GroupedLinearExperts(experts, te.GroupedLinear, state, 128, "cuda")
    holder = nn.Module()
    holder.fp8_state = state
    x = torch.randn(1000, 256, device="cuda").bfloat16()
    idx = torch.stack([torch.randperm(8, device="cuda")[:2] for _ in range(1000)])
    weight = torch.rand(1000, 2, device="cuda")
    with pf8.autocast(holder, first_microbatch=True):
        y_te = wrapped(x, idx, weight)
    experts.gemm = lambda a, b, c: fp8_grouped_mm(a, b, c, pow2_scales=True)
    y_em = experts(x.float(), idx, weight)
    assert rel(y_te, y_em) < 0.02
    assert wrapped.state_dict().keys() == experts.state_dict().keys()


def test_checkpoint_names_of_te_experts_are_the_plain_models(te):
    """TE's GroupedLinear holds one weight per expert; checkpoints stack them back (train/checkpoint.py)."""
    from train.checkpoint import checkpoint_tensors

    cfg = make_config(hidden_size=256, moe_intermediate_size=128, precision="fp8")
    torch.manual_seed(3)
    plain = DeepSeekV3(cfg).cuda()
    model = DeepSeekV3(cfg).cuda()
    model.load_state_dict(plain.state_dict())
    pf8.apply_fp8(model, Config(model=cfg, fp8=FP8Config(backend="te", recipe="blockwise")), "cuda")
    assert any(type(m).__name__.startswith("GroupedLinear") for m in model.modules())
    tensors = checkpoint_tensors(model)
    assert [n for n, _, _ in tensors] == [n for n, _ in plain.named_parameters()]
    want = dict(plain.named_parameters())
    for name, params, stacked in tensors:
        assert torch.equal(torch.stack(params) if stacked else params[0], want[name]), name


def test_one_fp8_training_step_through_te(te):
    cfg = make_config(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_attention_heads=2,
                      q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128,
                      vocab_size=512, max_position_embeddings=256, precision="fp8")
    torch.manual_seed(2)
    model = DeepSeekV3(cfg).cuda()
    keys = {k: v.shape for k, v in model.state_dict().items()}
    plan = pf8.apply_fp8(model, Config(model=cfg, fp8=FP8Config(backend="te", recipe="blockwise")), "cuda")
    assert len(plan.fp8) >= 10 and "lm_head" in plan.high_precision
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 512, (2, 129), device="cuda")  # 2×128 rows, MTP sees 2×127: padded
    losses = []
    for first in (True, False):  # two micro-batches of one step: the second reuses the weight casts
        with pf8.autocast(model, first_microbatch=first):
            out = model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        losses.append(out.loss.item())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)  # fp32 master weights and grads
    assert model.moe_layers()[0].experts.gate_up.weight0.grad is not None
    assert model.layers[0].self_attn.q_a_proj.weight.grad is not None
    opt.step()
    with torch.no_grad(), pf8.autocast(model):
        after = model(tokens[:, :-1], tokens[:, 1:]).loss.item()
    assert all(torch.isfinite(torch.tensor(losses))) and after < losses[0]


@pytest.mark.parametrize("recipe", ["current", "delayed"])
def test_cli_trains_a_few_steps_with_te(te, tiny_data, tmp_path, recipe):
    """Tiny dims are mostly multiples of 16, not of 128: the per-tensor recipes take them in FP8."""
    run_cli("train", "configs/smoke.yaml", *tiny_data, f"train.run_dir={tmp_path}", "train.device=cuda",
            "model.precision=fp8", "fp8.backend=te", f"fp8.recipe={recipe}")
    table = rows(tmp_path)
    losses = [r["loss"] for r in table if r["step"] >= 1]
    assert all(x == x for x in losses) and losses[-1] < losses[0]


def test_te_with_activation_checkpointing_equals_without(te):
    """The recompute in backward re-enters fp8_autocast (parallel/fp8.py): loss and gradients
    equal the run that keeps its activations (blockwise scales depend only on the tensors)."""
    cfg = make_config(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_attention_heads=2,
                      q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128,
                      vocab_size=512, max_position_embeddings=256, precision="fp8")
    tokens = torch.randint(0, 512, (2, 129), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(4)
        model = DeepSeekV3(cfg).cuda().train()
        pf8.apply_fp8(model, Config(model=cfg, fp8=FP8Config(backend="te", recipe="blockwise")), "cuda")
        model.activation_checkpointing = checkpointing
        with pf8.autocast(model, first_microbatch=True):
            loss = model(tokens[:, :-1], tokens[:, 1:]).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-3, atol=1e-6, msg=name)
