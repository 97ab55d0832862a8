"""RMSNorm's hand-written backward against autograd of the composite form."""

from __future__ import annotations

import torch

from model.norm import RMSNorm, _RMSNormFn


def test_rmsnorm_function_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = (1 + 0.3 * torch.randn(16, dtype=torch.float64, generator=g)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFn.apply(a, b, 1e-6), (x, w))


def test_rmsnorm_fp32_equals_the_composite_reference():
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(64, generator=g))
    x = 3 * torch.randn(4, 9, 64, generator=g)
    dy = torch.randn(4, 9, 64, generator=g)
    grads = {}
    for name, fn in (("fast", norm), ("reference", norm.reference)):
        xi = x.clone().requires_grad_()
        norm.weight.grad = None
        out = fn(xi)
        out.backward(dy)
        grads[name] = (out.detach(), xi.grad, norm.weight.grad.clone())
    for a, b in zip(grads["fast"], grads["reference"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
