"""The fused head + cross-entropy (model/loss.py) against the obvious F.cross_entropy version."""

from __future__ import annotations

import threading

import pytest
import torch

from model import loss as loss_module
from model.loss import IGNORE_INDEX, linear_cross_entropy, linear_cross_entropy_heads, reference_cross_entropy
from tests.unit.helpers import build


def _loss_and_grads(fn, h, w, targets):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w, targets)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 8, 37, 64, 500])  # 37: chunks that do not divide the rows
def test_fused_equals_reference_in_fp32(chunk):
    g = torch.Generator().manual_seed(0)
    n, d, v = 150, 24, 301
    h, w = torch.randn(n, d, generator=g), 0.3 * torch.randn(v, d, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::7] = IGNORE_INDEX
    ref = _loss_and_grads(reference_cross_entropy, h, w, targets)
    got = _loss_and_grads(lambda a, b, t: linear_cross_entropy(a, b, t, chunk), h, w, targets)
    torch.testing.assert_close(got[0], ref[0], atol=2e-6, rtol=1e-6)
    # gradients are ~1/n in size; compare relative to that scale
    torch.testing.assert_close(got[1], ref[1], atol=1e-8, rtol=1e-5)
    torch.testing.assert_close(got[2], ref[2], atol=1e-8, rtol=1e-5)
    assert got[1][::7].abs().max() == 0, "ignored rows get no gradient"


def test_cpu_buffer_is_kept_between_calls_and_never_leaks_into_results(monkeypatch):
    """fp32 CPU calls share one chunk buffer (model/loss.py, _chunk_buffers): it is not allocated
    again per call, a larger call grows it, and two forwards before either backward (gradient
    accumulation, a second model) each return their own results."""
    g = torch.Generator().manual_seed(7)
    d, v = 12, 53
    w = 0.3 * torch.randn(v, d, generator=g)
    cases = [(torch.randn(n, d, generator=g), torch.randint(0, v, (n,), generator=g)) for n in (30, 90, 20)]
    refs = [_loss_and_grads(reference_cross_entropy, h, w, t) for h, t in cases]
    monkeypatch.setattr(loss_module, "_cpu_buffer", threading.local())  # none kept yet

    pointers, pending = [], []
    for h, t in cases:  # chunk larger than every call: the whole call is one chunk of the buffer
        h_, w_ = h.clone().requires_grad_(), w.clone().requires_grad_()
        pending.append((linear_cross_entropy(h_, w_, t, chunk=128), h_, w_))
        pointers.append(loss_module._cpu_buffer.tensor.data_ptr())
    assert pointers[1] == pointers[2], "a call no larger than the kept buffer reuses it"
    assert loss_module._cpu_buffer.tensor.numel() == 90 * v  # grown once, to the largest call
    for (loss, h_, w_), ref in zip(pending, refs):
        loss.backward()
        torch.testing.assert_close(loss.detach(), ref[0], atol=2e-6, rtol=1e-6)
        torch.testing.assert_close(h_.grad, ref[1], atol=1e-8, rtol=1e-5)
        torch.testing.assert_close(w_.grad, ref[2], atol=1e-8, rtol=1e-5)


def test_upstream_gradient_scales_both_gradients():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(20, 8, generator=g), torch.randn(11, 8, generator=g)
    t = torch.randint(0, 11, (20,), generator=g)
    ref = _loss_and_grads(lambda a, b, tt: 2.5 * reference_cross_entropy(a, b, tt), h, w, t)
    got = _loss_and_grads(lambda a, b, tt: 2.5 * linear_cross_entropy(a, b, tt, 6), h, w, t)
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("upstream", [1.0, 2.5])
def test_heads_in_one_call_equal_separate_losses_and_share_one_weight_gradient(upstream):
    """The main and MTP heads in one call: the weighted sum, each head's CE and every gradient
    equal the reference heads computed apart; the autograd node holds one dW, not one per head."""
    g = torch.Generator().manual_seed(5)
    d, v = 16, 97
    w = 0.3 * torch.randn(v, d, generator=g)
    hs = [torch.randn(40, d, generator=g), torch.randn(33, d, generator=g)]  # rows not a multiple of the chunk
    ts = [torch.randint(0, v, (n,), generator=g) for n in (40, 33)]
    ts[1][::5] = IGNORE_INDEX
    coefs = [1.0, 0.15]

    def grads(fn):
        w_, hs_ = w.clone().requires_grad_(), [h.clone().requires_grad_() for h in hs]
        total, per_head = fn(w_, hs_)
        (upstream * total).backward()
        return total.detach(), per_head.detach(), w_.grad, [h.grad for h in hs_]

    def reference(w_, hs_):
        per_head = torch.stack([reference_cross_entropy(h, w_, t) for h, t in zip(hs_, ts)])
        return sum(c * x for c, x in zip(coefs, per_head)), per_head

    got = grads(lambda w_, hs_: linear_cross_entropy_heads(w_, list(zip(hs_, ts)), coefs, chunk=8))
    ref = grads(reference)
    torch.testing.assert_close(got[0], ref[0], atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], ref[1], atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(got[2], ref[2], atol=1e-8, rtol=1e-5)
    for a, b in zip(got[3], ref[3]):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-5)

    h_req = [h.clone().requires_grad_() for h in hs]
    total, per_head = linear_cross_entropy_heads(w.clone().requires_grad_(), list(zip(h_req, ts)), coefs, chunk=8)
    assert not per_head.requires_grad  # only the sum carries gradients
    node = total.grad_fn
    assert node.dw.shape == w.shape and node.dw.dtype == torch.float32
    assert [tuple(dh.shape) for dh in node.dhs] == [(40, d), (33, d)]


def test_a_second_backward_is_a_clear_error():
    h, w = torch.randn(6, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.randint(0, 9, (6,)), 4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="need model.loss_chunk_size=0, the reference path"):
        loss.backward()


def test_no_grad_and_all_ignored():
    h, w = torch.randn(9, 4), torch.randn(13, 4)
    t = torch.randint(0, 13, (9,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, 4), reference_cross_entropy(h, w, t))
    ignored = torch.full((9,), IGNORE_INDEX)
    assert linear_cross_entropy(h, w, ignored, 4).isnan() and reference_cross_entropy(h, w, ignored).isnan()


def test_bf16_autocast_matches_the_autocast_reference():
    """Under autocast the GEMMs run in bf16 as nn.Linear's would; softmax and loss stay fp32."""
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(64, 32, generator=g), 0.2 * torch.randn(97, 32, generator=g)
    t = torch.randint(0, 97, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _loss_and_grads(reference_cross_entropy, h, w, t)
        got = _loss_and_grads(lambda a, b, tt: linear_cross_entropy(a, b, tt, 16), h, w, t)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)  # same bf16 logits, fp32 softmax
    scale = ref[1].abs().max()
    torch.testing.assert_close(got[1], ref[1], atol=1e-2 * scale, rtol=0)
    torch.testing.assert_close(got[2], ref[2], atol=1e-2 * ref[2].abs().max(), rtol=0)


def test_model_fused_loss_equals_the_logits_path():
    """The whole model, MTP included: loss, its parts and every gradient agree with return_logits=True."""
    model = build(seed=3, num_nextn_predict_layers=2, loss_chunk_size=5)
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


def test_model_fused_loss_under_bf16_autocast():
    """The GPU layout on CPU: bf16 autocast around the forward; fused and logits paths agree to bf16."""
    model = build(seed=4, num_nextn_predict_layers=1, loss_chunk_size=7)
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
