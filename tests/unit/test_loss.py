"""The fused head + cross-entropy (model/loss.py) against the obvious F.cross_entropy version."""

from __future__ import annotations

import pytest
import torch

from model.loss import IGNORE_INDEX, linear_cross_entropy, reference_cross_entropy
from tests.unit.helpers import build


def _loss_and_grads(fn, h, w, targets):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w, targets)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("chunk", [1, 8, 37, 64, 500])  # 37: chunks that do not divide the rows
def test_fused_equals_reference_in_fp32(chunk, recompute):
    g = torch.Generator().manual_seed(0)
    n, d, v = 150, 24, 301
    h, w = torch.randn(n, d, generator=g), 0.3 * torch.randn(v, d, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::7] = IGNORE_INDEX
    ref = _loss_and_grads(reference_cross_entropy, h, w, targets)
    got = _loss_and_grads(lambda a, b, t: linear_cross_entropy(a, b, t, chunk, recompute), h, w, targets)
    torch.testing.assert_close(got[0], ref[0], atol=2e-6, rtol=1e-6)
    # gradients are ~1/n in size; compare relative to that scale
    torch.testing.assert_close(got[1], ref[1], atol=1e-8, rtol=1e-5)
    torch.testing.assert_close(got[2], ref[2], atol=1e-8, rtol=1e-5)
    assert got[1][::7].abs().max() == 0, "ignored rows get no gradient"


@pytest.mark.parametrize("recompute", [False, True])
def test_upstream_gradient_scales_both_gradients(recompute):
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(20, 8, generator=g), torch.randn(11, 8, generator=g)
    t = torch.randint(0, 11, (20,), generator=g)
    ref = _loss_and_grads(lambda a, b, tt: 2.5 * reference_cross_entropy(a, b, tt), h, w, t)
    got = _loss_and_grads(lambda a, b, tt: 2.5 * linear_cross_entropy(a, b, tt, 6, recompute), h, w, t)
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, atol=1e-7, rtol=1e-5)


def test_a_second_backward_is_a_clear_error():
    h, w = torch.randn(6, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.randint(0, 9, (6,)), 4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="loss_recompute=true, or model.loss_chunk_size=0"):
        loss.backward()
    # recomputing in backward keeps what it needs: a second backward adds the same gradients
    w.grad = None
    loss = linear_cross_entropy(h, w, torch.randint(0, 9, (6,)), 4, recompute=True)
    loss.backward(retain_graph=True)
    once = w.grad.clone()
    loss.backward()
    torch.testing.assert_close(w.grad, 2 * once)


@pytest.mark.parametrize("recompute", [False, True])
def test_no_grad_and_all_ignored(recompute):
    h, w = torch.randn(9, 4), torch.randn(13, 4)
    t = torch.randint(0, 13, (9,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, 4, recompute), reference_cross_entropy(h, w, t))
    ignored = torch.full((9,), IGNORE_INDEX)
    assert linear_cross_entropy(h, w, ignored, 4, recompute).isnan() and reference_cross_entropy(h, w, ignored).isnan()


def test_recompute_holds_no_weight_gradient_between_forward_and_backward():
    h, w = torch.randn(40, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    t = torch.randint(0, 50, (40,))
    formed = linear_cross_entropy(h, w, t, 16).grad_fn
    assert formed.dw.shape == w.shape  # the fp32 dW, held until backward
    recomputed = linear_cross_entropy(h, w, t, 16, recompute=True).grad_fn
    assert not hasattr(recomputed, "dw")
    # what it keeps: h, the weight itself (no copy), targets, the rows' scale and log-sum-exp
    assert [tuple(x.shape) for x in recomputed.saved_tensors] == [(40, 8), (50, 8), (40,), (40,), (40,)]
    assert recomputed.saved_tensors[1].data_ptr() == w.data_ptr()


@pytest.mark.parametrize("recompute", [False, True])
def test_bf16_autocast_matches_the_autocast_reference(recompute):
    """Under autocast the GEMMs run in bf16 as nn.Linear's would; softmax and loss stay fp32."""
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(64, 32, generator=g), 0.2 * torch.randn(97, 32, generator=g)
    t = torch.randint(0, 97, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _loss_and_grads(reference_cross_entropy, h, w, t)
        got = _loss_and_grads(lambda a, b, tt: linear_cross_entropy(a, b, tt, 16, recompute), h, w, t)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)  # same bf16 logits, fp32 softmax
    scale = ref[1].abs().max()
    torch.testing.assert_close(got[1], ref[1], atol=1e-2 * scale, rtol=0)
    torch.testing.assert_close(got[2], ref[2], atol=1e-2 * ref[2].abs().max(), rtol=0)


@pytest.mark.parametrize("recompute", [False, True])
def test_model_fused_loss_equals_the_logits_path(recompute):
    """The whole model, MTP included: loss, its parts and every gradient agree with return_logits=True."""
    model = build(seed=3, num_nextn_predict_layers=2, loss_chunk_size=5, loss_recompute=recompute)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 11))
    targets = torch.randint(0, model.cfg.vocab_size, (2, 11))
    targets[1, 4] = IGNORE_INDEX

    def run(**kw):
        model.zero_grad(set_to_none=True)
        out = model(tokens, targets, **kw)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused, fused_grads = run()
    ref, ref_grads = run(return_logits=True)
    assert fused.logits is None and ref.logits is not None
    for key in ("loss", "lm_loss", "mtp_loss"):
        torch.testing.assert_close(getattr(fused, key), getattr(ref, key), atol=1e-6, rtol=1e-6)
    assert fused_grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():  # fp32 rounding, relative to each gradient's scale
        scale = g.abs().max().item()
        err = (fused_grads[name] - g).abs().max().item()
        assert err <= 2e-6 * scale, (name, err, scale)


@pytest.mark.parametrize("recompute", [False, True])
def test_model_fused_loss_under_bf16_autocast(recompute):
    """The GPU layout on CPU: bf16 autocast around the forward; fused and logits paths agree to bf16."""
    model = build(seed=4, num_nextn_predict_layers=1, loss_chunk_size=7, loss_recompute=recompute)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 12))
    results = []
    for return_logits in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens[:, :-1], tokens[:, 1:], return_logits=return_logits)
        out.loss.backward()
        results.append((out.loss.detach(), model.lm_head.weight.grad.clone(), model.embed_tokens.weight.grad.clone()))
    (fused_loss, *fused_grads), (ref_loss, *ref_grads) = results
    assert fused_loss.dtype == torch.float32
    torch.testing.assert_close(fused_loss, ref_loss, atol=1e-3, rtol=1e-3)
    for got, ref in zip(fused_grads, ref_grads):
        assert got.dtype == torch.float32
        assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
