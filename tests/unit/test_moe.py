"""Router, experts and the aux-loss-free bias update on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch

from model import update_correction_bias
from model.moe import MoE, RoutedExperts, Router, sequence_balance_loss, sort_by_key

from .helpers import make_config


def _router_with_scores(cfg, scores: torch.Tensor) -> tuple[Router, torch.Tensor]:
    """A router whose sigmoid affinities on the returned inputs are exactly `scores` (N, E)."""
    n, e = scores.shape
    router = Router(cfg)
    # x = one-hot rows of size hidden (N ≤ hidden); weight[:, :N] = logit(scores)^T
    x = torch.eye(cfg.hidden_size)[:n]
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, :n] = torch.logit(scores.double()).float().t()
    return router, x


def test_group_limited_topk_on_hand_made_scores():
    cfg = make_config(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, routed_scaling_factor=2.5)
    # groups: {0,1} {2,3} {4,5} {6,7}. Group score = sum of its top-2 = sum of the pair.
    s = torch.tensor([[0.90, 0.10, 0.50, 0.50, 0.80, 0.05, 0.30, 0.30]])
    # group sums: 1.00, 1.00, 0.85, 0.60 -> keep groups 0 and 1; best experts there: 0 (0.9), then 2 or 3 (0.5)
    router, x = _router_with_scores(cfg, s)
    r = router(x)
    chosen = set(r.topk_idx[0].tolist())
    assert 0 in chosen and 4 not in chosen, "expert 4 (0.80) sits in a dropped group and must not be chosen"
    assert chosen & {2, 3}
    # weights: normalised unbiased scores times the scaling factor
    torch.testing.assert_close(r.topk_weight.sum(), torch.tensor(2.5))
    w0 = r.topk_weight[0][r.topk_idx[0] == 0]
    torch.testing.assert_close(w0, torch.tensor([0.9 / 1.4 * 2.5]))


def test_masked_groups_lose_even_when_biased_scores_are_negative():
    """HF < 5 masked with 0.0; with s + b < 0 that lets a dropped group's expert win. We use -inf."""
    cfg = make_config(n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2)
    s = torch.tensor([[0.20, 0.20, 0.10, 0.10]])
    router, x = _router_with_scores(cfg, s)
    router.e_score_correction_bias.copy_(torch.tensor([-0.5, -0.6, -0.9, -0.9]))
    # group 0 (experts 0, 1) scores -0.7, group 1 scores -1.6: keep group 0; both picks from it
    assert sorted(router(x).topk_idx[0].tolist()) == [0, 1]


def test_bias_changes_selection_but_not_weights():
    cfg = make_config(n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=1, norm_topk_prob=False,
                      routed_scaling_factor=1.0)
    s = torch.tensor([[0.7, 0.6, 0.2, 0.1]])
    router, x = _router_with_scores(cfg, s)
    r = router(x)
    assert r.topk_idx.item() == 0
    torch.testing.assert_close(r.topk_weight, torch.tensor([[0.7]]))
    router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.2, 0.0, 0.0]))
    r = router(x)
    assert r.topk_idx.item() == 1, "the bias must steer selection"
    torch.testing.assert_close(r.topk_weight, torch.tensor([[0.6]]), msg="weight must be the unbiased affinity")


def test_router_runs_in_fp32_for_bf16_inputs():
    cfg = make_config()
    router = Router(cfg).to(torch.bfloat16)
    assert router.e_score_correction_bias.dtype == torch.bfloat16  # .to() casts buffers ...
    router.e_score_correction_bias.data = router.e_score_correction_bias.float()  # ... trainers keep it fp32
    r = router(torch.randn(5, cfg.hidden_size, dtype=torch.bfloat16))
    assert r.scores.dtype == torch.float32 and r.topk_weight.dtype == torch.float32


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-6, 0), (torch.bfloat16, 2e-2, 2e-2)])
def test_grouped_experts_equal_the_loop_reference(dtype, atol, rtol):
    torch.manual_seed(0)
    e, h, i, n, k = 8, 32, 16, 50, 3
    loop = RoutedExperts(e, h, i, impl="loop")
    torch.nn.init.normal_(loop.gate_up_proj, std=0.2)
    torch.nn.init.normal_(loop.down_proj, std=0.2)
    loop = loop.to(dtype)
    fast = RoutedExperts(e, h, i, impl="grouped").to(dtype)
    fast.load_state_dict(loop.state_dict())
    x = torch.randn(n, h, dtype=dtype)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    idx[:, 0] = 3  # a crowded expert; some experts get no token at all
    idx[idx == 5] = 6
    w = torch.rand(n, k)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    wa, wb = w.clone().requires_grad_(), w.clone().requires_grad_()  # gate values get gradients too
    ya, yb = loop(xa, idx, wa), fast(xb, idx, wb)
    torch.testing.assert_close(yb, ya, atol=atol, rtol=rtol)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(wb.grad, wa.grad, atol=atol * 5, rtol=rtol)
    for name in ("gate_up_proj", "down_proj"):
        ga, gb = getattr(loop, name).grad, getattr(fast, name).grad
        torch.testing.assert_close(gb, ga, atol=atol * 5, rtol=rtol)
    assert loop.gate_up_proj.grad[5].abs().sum() == 0, "an expert with no tokens gets no gradient"


def test_moe_counts_and_backward_through_a_plain_sum():
    """A .sum() loss gives a stride-0 output grad; the grouped path must accept it."""
    cfg = make_config()
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(moe.experts.down_proj, std=0.1)
    torch.nn.init.normal_(moe.gate.weight, std=0.1)
    x = torch.randn(2, 7, cfg.hidden_size, requires_grad=True)
    out, counts, aux = moe(x)
    out.sum().backward()
    assert counts.sum().item() == 2 * 7 * cfg.num_experts_per_tok
    assert aux is None
    assert moe.experts.gate_up_proj.grad is not None


def test_bias_update_sign_rule():
    bias = torch.zeros(4)
    counts = torch.tensor([10, 2, 4, 4])  # mean 5
    update_correction_bias(bias, counts, gamma=0.001)
    torch.testing.assert_close(bias, torch.tensor([-0.001, 0.001, 0.001, 0.001]))
    update_correction_bias(bias, torch.tensor([5, 5, 5, 5]), gamma=0.001)  # balanced: sign 0, no change
    torch.testing.assert_close(bias, torch.tensor([-0.001, 0.001, 0.001, 0.001]))


def test_sequence_balance_loss_against_a_loop():
    """Report eq. 17-20, the indicator over the top-k of the raw affinities s of each token."""
    cfg = make_config(seq_aux_loss_alpha=1e-2, n_routed_experts=8, num_experts_per_tok=2)
    torch.manual_seed(1)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.3)
    # a trained-looking bias: the dispatched experts (top-k of s + b, group-limited) then differ
    router.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, cfg.n_routed_experts))
    b, t = 3, 11
    with torch.no_grad():
        r = router(torch.randn(b * t, cfg.hidden_size))
    raw_top = [set(sorted(range(cfg.n_routed_experts), key=lambda j: -float(r.scores[row, j]))[:2])
               for row in range(b * t)]
    assert any(set(r.topk_idx[row].tolist()) != raw_top[row] for row in range(b * t))
    got = sequence_balance_loss(r, b, t, cfg)
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    total = 0.0
    for s in range(b):
        rows = range(s * t, (s + 1) * t)
        for i in range(e):
            f = e / (k * t) * sum(int(i in raw_top[row]) for row in rows)
            p = sum(float(r.scores[row, i] / r.scores[row].sum()) for row in rows) / t
            total += f * p
    assert math.isclose(got.item(), cfg.seq_aux_loss_alpha * total / b, rel_tol=1e-5)


def test_balance_loss_joins_the_training_loss_only_when_enabled():
    from .helpers import build

    tokens = torch.randint(0, 97, (2, 12))
    off = build(seq_aux_loss_alpha=0.0)(tokens, tokens)
    on = build(seq_aux_loss_alpha=0.1)(tokens, tokens)
    assert off.balance_loss is None
    assert on.balance_loss is not None and on.balance_loss.item() > 0
    torch.testing.assert_close(on.loss, on.lm_loss + 0.3 * on.mtp_loss + on.balance_loss)


@pytest.mark.parametrize("n", [0, 1, 7, 4096])
def test_sort_by_key_is_a_stable_sort_and_its_inverse(n):
    key = torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(n))
    order, inverse = sort_by_key(key)
    assert torch.equal(order, key.argsort(stable=True))
    assert torch.equal(inverse, order.argsort())
    assert torch.equal(order[inverse], torch.arange(n))
