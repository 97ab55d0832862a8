"""Emulated blockwise FP8 (model/linear.py) and the FP8 switch (parallel/fp8.py), on CPU.

The references here are written independently of the code under test: E4M3 rounding from its
definition (3 mantissa bits, subnormal step 2^-9, max 448) and quantisation with explicit Python
loops over tiles.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import model.linear as linear
from model import ConfigError, DeepSeekV3, ModelConfig, hf
from model.linear import ACT_TILE, WEIGHT_TILE, WGRAD_TILE, FP8Linear, fp8_grouped_mm, fp8_linear, quantize_tiles
from model.moe import Router, RoutedExperts, grouped_mm
from model.norm import RMSNorm
from parallel import fp8 as pf8
from tests.fake_te import FakeGroupedLinear, FakeTELinear
from tests.unit.helpers import build
from train.config import Config, FP8Config

MIN_NORMAL = 2.0**-6  # smallest normal E4M3 magnitude
SUBNORMAL_STEP = 2.0**-9


# ----------------------------------------------------------------------------------------------
# Independent references


def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to the nearest E4M3 value (ties to even), saturating at ±448."""
    a = v.abs().double()
    exponent = torch.floor(torch.log2(a.clamp_min(MIN_NORMAL)))  # normals: 2^e <= a < 2^(e+1)
    step = torch.where(a < MIN_NORMAL, torch.full_like(a, SUBNORMAL_STEP), 2.0 ** (exponent - 3))
    r = torch.round(a / step) * step  # torch.round: half to even
    return (torch.sign(v.double()) * r.clamp(max=448.0)).float()


def slow_quantize(x: torch.Tensor, tile: tuple[int, int], pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile-by-tile quantise-dequantise with explicit loops; partial tiles at the ends."""
    r, c = tile
    m, n = x.shape
    out = torch.empty(m, n)
    scale_inv = torch.empty(math.ceil(m / r), math.ceil(n / c))
    for i in range(0, m, r):
        for j in range(0, n, c):
            t = x[i:i + r, j:j + c].float()
            amax = t.abs().max()  # fp32, as is the scale
            s = 448.0 / amax if amax > 0 else torch.tensor(1.0)
            if pow2:
                s = torch.tensor(2.0 ** math.floor(math.log2(s.item())))
            out[i:i + r, j:j + c] = e4m3_round(t * s) / s
            scale_inv[i // r, j // c] = 1 / s
    return out, scale_inv


def slow_linear_grads(x, w, dy):
    """y, dx, dw of the recipe: fprop x 1×128 / W 128×128, dgrad dy 1×128, wgrad dy and x 128×1."""
    xq, wq = slow_quantize(x, (1, 128))[0], slow_quantize(w, (128, 128))[0]
    y = xq @ wq.t()
    dx = slow_quantize(dy, (1, 128))[0] @ wq
    dw = slow_quantize(dy, (128, 1))[0].t() @ slow_quantize(x, (128, 1))[0]
    return y, dx, dw


def slow_grouped(x, w, counts, dy):
    """Per expert: the same recipe, wgrad's 128-token tiles starting at the expert's first row."""
    ys, dxs, dws, start = [], [], [], 0
    for e, n in enumerate(counts):
        xe, dye = x[start:start + n], dy[start:start + n]
        if n == 0:
            dws.append(torch.zeros_like(w[e]))
        else:
            y, dx, dw = slow_linear_grads(xe, w[e], dye)
            ys.append(y), dxs.append(dx), dws.append(dw)
        start += n
    return torch.cat(ys), torch.cat(dxs), torch.stack(dws)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def wide_range(shape, seed=0) -> torch.Tensor:
    """Values spread over many binades, so every tile has normal and subnormal elements."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.exp(3 * torch.randn(shape, generator=g))


# ----------------------------------------------------------------------------------------------
# The quantiser

SHAPES = [(256, 384), (200, 300), (130, 72), (1, 5)]  # full tiles, partial tiles in both dims, tiny


@pytest.mark.parametrize("tile", [ACT_TILE, WGRAD_TILE, WEIGHT_TILE], ids=["1x128", "128x1", "128x128"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("pow2", [False, True], ids=["exact", "pow2"])
def test_quantize_matches_tile_loop_with_e4m3_rounding(tile, shape, pow2):
    x = wide_range(shape)
    dq, scale_inv = quantize_tiles(x, tile, pow2)
    ref, ref_scale_inv = slow_quantize(x, tile, pow2)
    assert scale_inv.shape == (math.ceil(shape[0] / tile[0]), math.ceil(shape[1] / tile[1]))
    torch.testing.assert_close(scale_inv, ref_scale_inv, rtol=0, atol=0)
    torch.testing.assert_close(dq, ref, rtol=0, atol=0)


@pytest.mark.parametrize("tile", [ACT_TILE, WGRAD_TILE, WEIGHT_TILE], ids=["1x128", "128x1", "128x128"])
@pytest.mark.parametrize("pow2", [False, True], ids=["exact", "pow2"])
def test_quantization_error_within_e4m3_bounds(tile, pow2):
    """Per element, in each tile's scaled units: normal values round to within 2^-4 relative
    (3 mantissa bits), subnormal ones to within half the subnormal step 2^-9; the tile max is kept."""
    x = wide_range((300, 260), seed=1)
    dq, scale_inv = quantize_tiles(x, tile, pow2)
    s_inv = scale_inv.repeat_interleave(tile[0], 0)[:300].repeat_interleave(tile[1], 1)[:, :260]  # per element
    scaled = x.abs() / s_inv
    err = (dq - x).abs()
    normal = scaled >= MIN_NORMAL
    assert normal.any() and (~normal).any()
    assert (err[normal] <= 2.0**-4 * x.abs()[normal] * (1 + 1e-6)).all()
    assert (err[~normal] <= 0.5 * SUBNORMAL_STEP * s_inv[~normal] * (1 + 1e-6)).all()
    assert (scaled <= 448 * (1 + 1e-6)).all()
    if not pow2:  # each tile's largest element maps to 448 and comes back (almost) exactly
        r, c = tile
        tiles = x[:256, :256].reshape(256 // r, r, 256 // c, c).abs().amax(dim=(1, 3))
        back = dq[:256, :256].reshape(256 // r, r, 256 // c, c).abs().amax(dim=(1, 3))
        torch.testing.assert_close(back, tiles, rtol=1e-6, atol=0)


def test_outlier_only_coarsens_its_own_1x128_tile():
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(2))
    x[0, 5] = 1e6
    dq, scale_inv = quantize_tiles(x, ACT_TILE)
    assert scale_inv.shape == (4, 4)
    err = (dq - x).abs() / x.abs()
    own = torch.zeros_like(x, dtype=torch.bool)
    own[0, :128] = True
    own[0, 5] = False
    assert err[own].median() > 0.9  # values ~1 next to 1e6: below the smallest subnormal, flushed
    assert err[0, 5] < 1e-6
    others = ~own
    others[0, 5] = False
    assert scale_inv[0, 0] > 1000 and (scale_inv.flatten()[1:] < 0.02).all()
    assert err[others].median() < 0.04 and (err[others] <= 0.0625 + 1e-6)[x[others].abs() > 0.02].all()


def test_outlier_only_coarsens_its_own_128x1_tile():
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(3))
    x[5, 0] = 1e6
    dq, scale_inv = quantize_tiles(x, WGRAD_TILE)
    assert scale_inv.shape == (3, 4)
    err = (dq - x).abs() / x.abs()
    own = torch.zeros_like(x, dtype=torch.bool)
    own[:128, 0] = True
    own[5, 0] = False
    assert err[own].median() > 0.9
    rest = ~own
    rest[5, 0] = False
    assert err[rest].median() < 0.04  # column 0 beyond token 128, and the other channels


# ----------------------------------------------------------------------------------------------
# The linear layer


def _spy_tiles(monkeypatch) -> list[tuple[tuple, tuple]]:
    calls = []
    real = linear.quantize_tiles

    def spy(x, tile, pow2_scales=False):
        calls.append((tuple(x.shape), tile))
        return real(x, tile, pow2_scales)

    monkeypatch.setattr(linear, "quantize_tiles", spy)
    return calls


def test_each_gemm_quantises_along_its_contraction_dim(monkeypatch):
    calls = _spy_tiles(monkeypatch)
    x = torch.randn(300, 200, requires_grad=True)
    w = torch.randn(72, 200, requires_grad=True)
    fp8_linear(x, w).sum().backward()
    assert calls == [
        ((300, 200), (1, 128)), ((72, 200), (128, 128)),  # fprop: x per token along K, W blocks
        ((300, 72), (1, 128)), ((72, 200), (128, 128)),  # dgrad: dy per token along N, W blocks
        ((300, 72), (128, 1)), ((300, 200), (128, 1)),  # wgrad: dy and x re-quantised along tokens
    ]


@pytest.mark.parametrize("m,k,n", [(256, 256, 128), (200, 200, 72), (3, 40, 24)])
def test_fp8_linear_matches_tile_loop_reference(m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g, requires_grad=True)
    w = (0.05 * torch.randn(n, k, generator=g)).requires_grad_()
    dy = torch.randn(m, n, generator=g)
    y = fp8_linear(x, w)
    y.backward(dy)
    ref_y, ref_dx, ref_dw = slow_linear_grads(x.detach(), w.detach(), dy)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, ref_dw, rtol=1e-5, atol=1e-5)


def test_fp8_linear_close_to_fp32():
    """E4M3 keeps 3 mantissa bits: each operand element is off by up to 2^-4 (≈2.5% RMS for
    values spread over a binade), so a product of two quantised operands is ≈3.5% off in relative
    Frobenius norm. Bound: 6%; and at least 0.5%, so the test fails if nothing was quantised."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 192, bias=False)
    nn.init.normal_(lin.weight, std=0.05, generator=g)
    fp8 = FP8Linear.from_linear(lin)
    x = torch.randn(4, 64, 256, generator=g, requires_grad=True)
    dy = torch.randn(4, 64, 192, generator=g)
    y8 = fp8(x)
    y8.backward(dy)
    dx8, dw8 = x.grad.clone(), lin.weight.grad.clone()
    x.grad, lin.weight.grad = None, None
    y = lin(x)
    y.backward(dy)
    for got, want in ((y8, y), (dx8, x.grad), (dw8, lin.weight.grad)):
        assert 0.005 < rel(got, want) < 0.06


def test_fp8_linear_is_an_nn_linear_with_the_same_state():
    lin = nn.Linear(32, 16, bias=True)
    fp8 = FP8Linear.from_linear(lin)
    assert isinstance(fp8, nn.Linear) and fp8.weight is lin.weight and fp8.bias is lin.bias
    assert fp8.state_dict().keys() == lin.state_dict().keys()
    x = torch.randn(5, 32)
    assert rel(fp8(x), lin(x)) < 0.06


# ----------------------------------------------------------------------------------------------
# Routed experts' grouped GEMM

COUNTS = [130, 0, 100, 70, 1]  # an expert past one 128-token tile, an empty one, partial tiles


def test_fp8_grouped_mm_matches_per_expert_tile_loop():
    g = torch.Generator().manual_seed(4)
    rows, k, n = sum(COUNTS), 64, 48
    x = torch.randn(rows, k, generator=g, requires_grad=True)
    w = (0.05 * torch.randn(len(COUNTS), n, k, generator=g)).requires_grad_()
    dy = torch.randn(rows, n, generator=g)
    y = fp8_grouped_mm(x, w, torch.tensor(COUNTS))
    y.backward(dy)
    ref_y, ref_dx, ref_dw = slow_grouped(x.detach(), w.detach(), COUNTS, dy)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, ref_dw, rtol=1e-5, atol=1e-5)
    # tiles that ran across expert boundaries (one global 128-token grid) would give another wgrad
    dyq = slow_quantize(dy, (128, 1))[0]
    xq = slow_quantize(x.detach(), (128, 1))[0]
    straddling = torch.stack([dyq[a:a + c].t() @ xq[a:a + c] for a, c in zip([0, 130, 130, 230, 300], COUNTS)])
    assert rel(w.grad[2:4], straddling[2:4]) > 1e-3


def test_fp8_experts_close_to_fp32_loop():
    """RoutedExperts with the FP8 grouped GEMM against the fp32 per-expert loop (impl='loop'):
    output and both gradients within the FP8 tolerance of test_fp8_linear_close_to_fp32."""
    torch.manual_seed(5)
    experts = RoutedExperts(8, 64, 32)
    nn.init.normal_(experts.gate_up_proj, std=0.1)
    nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(96, 64, requires_grad=True)
    topk_idx = torch.stack([torch.randperm(8)[:2] for _ in range(96)])
    topk_weight = torch.rand(96, 2)
    dy = torch.randn(96, 64)

    def run(impl, gemm):
        experts.impl, experts.gemm = impl, gemm
        x.grad = experts.gate_up_proj.grad = experts.down_proj.grad = None
        y = experts(x, topk_idx, topk_weight)
        y.backward(dy)
        return y.detach(), x.grad.clone(), experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()

    fp8 = run("grouped", fp8_grouped_mm)
    ref = run("loop", grouped_mm)
    for got, want in zip(fp8, ref):
        assert 0.005 < rel(got, want) < 0.08  # two FP8 GEMMs in series with SwiGLU between


# ----------------------------------------------------------------------------------------------
# The switch


def fp8_config(model_cfg: ModelConfig, backend="emulated", recipe="blockwise") -> Config:
    model_cfg.precision = "fp8"
    return Config(model=model_cfg, fp8=FP8Config(backend=backend, recipe=recipe))


def test_apply_fp8_swaps_gemms_and_keeps_the_rest():
    model = build(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = {id(p) for p in model.parameters()}
    kinds = {n: type(m) for n, m in model.named_modules()}
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 16))
    ref = model(tokens[:, :-1], tokens[:, 1:]).loss

    plan = pf8.apply_fp8(model, fp8_config(model.cfg), "cpu")

    after = dict(model.named_modules())
    for name, kind in kinds.items():
        if kind is nn.Linear and name != "lm_head":
            assert type(after[name]) is FP8Linear and name in plan.fp8, name
        elif name == "lm_head":
            assert type(after[name]) is nn.Linear and name in plan.high_precision
        else:  # embedding, routers, norms, attention and the rest: untouched
            assert type(after[name]) is kind, name
    assert type(model.embed_tokens) is nn.Embedding
    assert all(type(m.gate) is Router for m in model.moe_layers())
    assert sum(type(m) is RMSNorm for m in model.modules()) == sum(k is RMSNorm for k in kinds.values())
    assert all(m.experts.gemm is fp8_grouped_mm for m in model.moe_layers())
    # same parameter objects (the optimizer sees them), same state dict
    assert {id(p) for p in model.parameters()} == params_before
    sd = model.state_dict()
    assert list(sd) == list(before)
    assert all(torch.equal(sd[k], before[k]) for k in before)
    out = model(tokens[:, :-1], tokens[:, 1:])
    assert abs(out.loss.item() - ref.item()) / ref.item() < 0.02 and out.loss.item() != ref.item()
    out.loss.backward()
    assert model.layers[1].self_attn.kv_a_proj_with_mqa.weight.grad.abs().sum() > 0
    assert all(m.experts.gate_up_proj.grad.abs().sum() > 0 for m in model.moe_layers())


def test_fp8_model_trains_under_bf16_autocast():
    """The GPU layout on CPU: bf16 autocast around the forward, FP8 GEMMs, fp32 parameters and grads."""
    model = build(seed=2)
    pf8.apply_fp8(model, fp8_config(model.cfg), "cpu")
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens[:, :-1], tokens[:, 1:], return_logits=True)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 20 and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_router_stays_fp32_under_autocast():
    model = build(seed=1)
    router = model.moe_layers()[0].gate
    x = torch.randn(10, model.cfg.hidden_size)
    ref = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x)
    assert got.scores.dtype == torch.float32
    torch.testing.assert_close(got.scores, ref.scores, rtol=0, atol=0)


def test_plan_at_671b_keeps_kv_a_proj_high_precision_only_under_te_blockwise():
    from train.config import load_config

    cfg = load_config("configs/671b.yaml").model
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    attn = ["q_a_proj", "q_b_proj", "kv_b_proj", "o_proj"]
    blockwise = pf8.plan_fp8(model, "te", "blockwise")
    assert blockwise.high_precision.keys() == {"lm_head"} | {
        f"layers.{i}.self_attn.kv_a_proj_with_mqa" for i in range(61)} | {"mtp.0.block.self_attn.kv_a_proj_with_mqa"}
    assert "multiples of 128" in blockwise.high_precision["layers.0.self_attn.kv_a_proj_with_mqa"]
    assert all(f"layers.5.self_attn.{p}" in blockwise.fp8 for p in attn)
    assert {"layers.5.mlp.experts", "layers.5.mlp.shared_experts.down_proj", "layers.0.mlp.gate_proj",
            "mtp.0.eh_proj"} <= set(blockwise.fp8)
    for backend, recipe in (("te", "mxfp8"), ("te", "current"), ("emulated", "blockwise")):
        assert pf8.plan_fp8(model, backend, recipe).high_precision.keys() == {"lm_head"}


def test_te_backend_without_gpu_is_a_config_error_naming_the_extra():
    model = build(seed=0)
    with pytest.raises(ConfigError) as err:
        pf8.apply_fp8(model, fp8_config(model.cfg, backend="te"), "cpu")
    assert err.value.key == "fp8.backend" and "pip install 'dsv3[gpu]'" in str(err.value)
    with pytest.raises(ConfigError, match="blockwise"):
        pf8.apply_fp8(model, fp8_config(model.cfg, recipe="delayed"), "cpu")
    model.cfg.moe_impl = "loop"
    with pytest.raises(ConfigError, match="model.moe_impl"):
        pf8.apply_fp8(model, fp8_config(model.cfg), "cpu")


def test_apply_fp8_is_a_no_op_below_fp8_and_autocast_does_nothing_on_cpu():
    model = build(seed=0)
    cfg = Config(model=model.cfg)
    assert pf8.apply_fp8(model, cfg, "cpu") is None and not hasattr(model, "fp8_state")
    with pf8.autocast(model, first_microbatch=True):
        assert not torch.is_autocast_enabled("cpu")
    pf8.apply_fp8(model, fp8_config(model.cfg), "cpu")
    with pf8.autocast(model, first_microbatch=True):
        assert not torch.is_autocast_enabled("cpu") and model.fp8_state.first_microbatch is True
    assert model.fp8_state.first_microbatch is None


def test_hf_export_of_an_fp8_model_is_unchanged(tmp_path):
    model = build(seed=3)
    plain = build(seed=3)
    pf8.apply_fp8(model, fp8_config(model.cfg), "cpu")
    hf.save_pretrained(model, tmp_path / "fp8")
    hf.save_pretrained(plain, tmp_path / "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = hf.from_pretrained(tmp_path / "fp8"), hf.from_pretrained(tmp_path / "plain")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sa.keys() == plain.state_dict().keys()


# ----------------------------------------------------------------------------------------------
# The TE adapters, driven by pure-torch stand-ins with TE's calling conventions (tests/fake_te.py)


def test_te_linear_adapter_pads_rows_passes_the_flag_and_keeps_the_state_dict():
    lin = nn.Linear(32, 48, bias=False)
    state = pf8.FP8State("emulated", "current", torch.device("cpu"))
    swapped = pf8.swap_linear(lin, FakeTELinear, state, 16, "cpu")
    assert list(swapped.state_dict()) == ["weight"]  # no _extra_state
    x = torch.randn(3, 7, 32, requires_grad=True)  # 21 rows: padded to 32 inside
    holder = nn.Module()
    holder.fp8_state = state
    FakeTELinear.seen.clear()
    for first in (True, False, None):
        with pf8.autocast(holder, first_microbatch=first):
            y = swapped(x)
    assert FakeTELinear.seen == [True, False, None]
    torch.testing.assert_close(y, lin(x))
    y.sum().backward()
    wgrad = swapped.weight.grad.clone()
    lin(x).sum().backward()
    torch.testing.assert_close(wgrad, lin.weight.grad)
    swapped.load_state_dict({"weight": torch.zeros(48, 32)})  # strict, without _extra_state
    assert swapped.weight.abs().sum() == 0


def test_te_adapters_keep_the_weights_dtype_and_cache_nothing_when_told():
    """fp8.weights=bf16: the TE modules are built in the dtype of the weights they replace (the
    bf16 engine's), and fp8.weight_cache=false turns every micro-batch flag into None (TE casts
    afresh and keeps no FP8 copy between forwards)."""
    lin = nn.Linear(32, 48, bias=False).bfloat16()
    experts = RoutedExperts(3, 32, 16).bfloat16()
    state = pf8.FP8State("emulated", "current", torch.device("cpu"), weight_cache=False)
    swapped = pf8.swap_linear(lin, FakeTELinear, state, 16, "cpu")
    wrapped = pf8.GroupedLinearExperts(experts, FakeGroupedLinear, state, 16, "cpu")
    assert swapped.weight.dtype == torch.bfloat16 and torch.equal(swapped.weight, lin.weight)
    assert {p.dtype for p in wrapped.parameters()} == {torch.bfloat16}
    assert torch.equal(wrapped.state_dict()["down_proj"], experts.down_proj)
    holder = nn.Module()
    holder.fp8_state = state
    FakeTELinear.seen.clear()
    for first in (True, False, None):
        with pf8.autocast(holder, first_microbatch=first):
            swapped(torch.randn(16, 32, dtype=torch.bfloat16))
    assert FakeTELinear.seen == [None, None, None]


def test_grouped_linear_experts_match_routed_experts_and_keep_stacked_state():
    torch.manual_seed(6)
    experts = RoutedExperts(5, 32, 24)
    nn.init.normal_(experts.gate_up_proj, std=0.2)
    nn.init.normal_(experts.down_proj, std=0.2)
    experts.gate_up_proj.allreduce = False  # a mark set by another wrapper travels along
    state = pf8.FP8State("emulated", "current", torch.device("cpu"))
    wrapped = pf8.GroupedLinearExperts(experts, FakeGroupedLinear, state, 16, "cpu")
    assert isinstance(wrapped, RoutedExperts)
    assert all(p.allreduce is False for p in wrapped.gate_up.parameters())

    sd, ref_sd = wrapped.state_dict(), experts.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)

    x = torch.randn(37, 32)
    topk_idx = torch.stack([torch.randperm(5)[:2] for _ in range(37)])
    topk_weight = torch.rand(37, 2)
    y, ref = wrapped(x, topk_idx, topk_weight), experts(x, topk_idx, topk_weight)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    ref.square().sum().backward()
    got = torch.stack([getattr(wrapped.gate_up, f"weight{e}").grad for e in range(5)])
    torch.testing.assert_close(got, experts.gate_up_proj.grad, rtol=1e-4, atol=1e-5)

    with torch.autocast("cpu", dtype=torch.bfloat16):  # outputs come back in the input's dtype
        assert wrapped(x, topk_idx, topk_weight).dtype == torch.float32

    new = {k: torch.randn_like(v) for k, v in ref_sd.items()}
    wrapped.load_state_dict(new)  # strict: stacked keys in, per-expert weights filled
    assert torch.equal(wrapped.down.weight3, new["down_proj"][3])
    assert torch.equal(wrapped.state_dict()["gate_up_proj"], new["gate_up_proj"])


def test_checkpoints_name_te_experts_as_a_plain_model_names_its_parameters(monkeypatch):
    """Under fp8.backend=te the experts' parameters are per-expert weights (weight0..); the
    checkpoint (train/checkpoint.py checkpoint_tensors) stacks them under the plain model's
    names, in the plain model's parameter order, with the plain model's values."""
    from tests import fake_te
    from train.checkpoint import checkpoint_tensors

    # fake_te.install() replaces these two; monkeypatch puts the real ones back after the test
    monkeypatch.setattr(pf8, "_require_te", pf8._require_te)
    monkeypatch.setattr(pf8, "import_te", pf8.import_te)
    fake_te.install()
    plain, model = build(seed=4, moe_intermediate_size=32), build(seed=4, moe_intermediate_size=32)  # TE-aligned
    pf8.apply_fp8(model, fp8_config(model.cfg, backend="te", recipe="current"), "cpu")
    assert any(".experts.gate_up.weight0" in n for n, _ in model.named_parameters())
    tensors = checkpoint_tensors(model)
    assert [n for n, _, _ in tensors] == [n for n, _ in plain.named_parameters()]
    want = dict(plain.named_parameters())
    for name, params, stacked in tensors:
        value = torch.stack(params) if stacked else params[0]
        assert stacked == name.endswith(("experts.gate_up_proj", "experts.down_proj")), name
        assert torch.equal(value, want[name]), name


def test_te_linear_adapter_forward_is_row_padding_only():
    """Padding rows are zeros and are cut off: outputs equal F.linear on the unpadded rows."""
    lin = nn.Linear(16, 16, bias=True)
    state = pf8.FP8State("emulated", "current", torch.device("cpu"))
    swapped = pf8.swap_linear(lin, FakeTELinear, state, 16, "cpu")
    x = torch.randn(17, 16)
    torch.testing.assert_close(swapped(x), F.linear(x, lin.weight, lin.bias))
    assert swapped(x).shape == (17, 16)
