"""Multi-token prediction wiring: which token goes in, which comes out, and the loss contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .helpers import build


def _reference_mtp_depth1_loss(model, seq: torch.Tensor) -> torch.Tensor:
    """Written from the report's indices over the raw sequence s_0..s_T, not from `targets`:
    depth 1 at position i combines h_i with Emb(s_{i+1}) and predicts s_{i+2}, for i = 0..T-2."""
    tokens = seq[:, :-1]
    t = tokens.shape[1]
    h, cos, sin, _, _ = model._trunk(tokens)  # final-normed main hidden states (B, T, d)
    mod = model.mtp[0]
    emb_next = model.embed_tokens(seq[:, 1:t])  # s_1 .. s_{T-1}
    x = mod.eh_proj(torch.cat([mod.enorm(emb_next), mod.hnorm(h[:, : t - 1])], dim=-1))
    x, _, _ = mod.block(x, cos[: t - 1], sin[: t - 1])
    logits = model.lm_head(mod.norm(x))
    return F.cross_entropy(logits.flatten(0, 1), seq[:, 2:].flatten())


def test_mtp_loss_uses_the_right_shift():
    model = build(seed=0).eval()
    seq = torch.randint(0, model.cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    out = model(seq[:, :-1], seq[:, 1:])
    ref = _reference_mtp_depth1_loss(model, seq)
    torch.testing.assert_close(out.mtp_loss, ref, atol=1e-6, rtol=0)
    # the same reference shifted by one is a different number: the check can fail
    shifted = torch.cat([seq[:, :1], seq[:, :-1]], dim=1)
    assert abs(_reference_mtp_depth1_loss(model, shifted).item() - out.mtp_loss.item()) > 1e-3


def test_ignored_targets_do_not_change_the_mtp_inputs():
    """Depth k embeds the input token t_{i+k}, taken from the tokens: ignoring a main-head target
    (-100, as for a masked prompt) leaves every MTP input, and so the MTP loss, unchanged."""
    model = build(seed=0).eval()
    seq = torch.randint(0, model.cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    tokens, targets = seq[:, :-1], seq[:, 1:].clone()
    full = model(tokens, targets)
    targets[:, 0] = -100  # a target of the main head only (depth 1 predicts targets[:, 1:])
    masked = model(tokens, targets)
    assert masked.mtp_loss.item() == full.mtp_loss.item()
    assert masked.lm_loss.item() != full.lm_loss.item()


def test_too_short_a_sequence_for_the_mtp_depths_is_an_error():
    model = build(seed=0).eval()
    one = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        model(one, one)
    assert model(one).shape == (1, 1, model.cfg.vocab_size)  # generation needs no MTP


def test_mtp_learns_the_token_after_next():
    """Sequences where s_{i+2} = f(s_{i+1}) for a fixed random f but s_{i+1} is random given s_i:
    only a correctly shifted MTP head can get its loss far below the main head's."""
    torch.manual_seed(0)
    model = build(seed=0, num_hidden_layers=1, first_k_dense_replace=1, initializer_range=0.02)
    v = model.cfg.vocab_size
    f = torch.randperm(v)

    def batch(n=16, t=24):
        seq = torch.empty(n, t + 1, dtype=torch.long)
        seq[:, 0::2] = torch.randint(0, v, (n, (t + 2) // 2))  # random tokens at even places
        seq[:, 1::2] = f[seq[:, 0:-1:2]]  # odd places follow their predecessor
        return seq

    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(200):
        seq = batch()
        out = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    # The main head sees s_i and predicts s_{i+1}: known only at even i (half the positions).
    # MTP sees s_{i+1} and predicts s_{i+2}: known only when i+1 is even, the other half.
    # Both should reach ≈ ln(v)/2; a shift one way leaves MTP at ≈ ln(v), the other way
    # (the target leaking into its input) drives it to ≈ 0.
    seq = batch(64)
    with torch.no_grad():
        out = model(seq[:, :-1], seq[:, 1:])
    half = torch.log(torch.tensor(float(v))) / 2
    assert out.lm_loss < half + 0.5
    assert half - 0.3 < out.mtp_loss < half + 0.5, f"mtp_loss {out.mtp_loss:.3f} vs ln(V)/2 {half:.3f}"


def test_depth_two_and_the_output_contract():
    model = build(seed=1, num_nextn_predict_layers=2)
    cfg = model.cfg
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    targets = torch.randint(0, cfg.vocab_size, (2, 9))
    targets[0, 3] = -100
    out = model(tokens, targets, mtp_weight=0.1, return_logits=True)
    assert out.logits.shape == (2, 9, cfg.vocab_size)
    assert model(tokens, targets).logits is None  # the fused loss never forms them
    n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace + 2
    assert out.expert_counts.shape == (n_moe, cfg.n_routed_experts)
    # main layers route 18 tokens each; MTP depth k routes 2·(9-k)
    per_layer = out.expert_counts.sum(1) // cfg.num_experts_per_tok
    assert per_layer.tolist() == [18] * (n_moe - 2) + [16, 14]
    torch.testing.assert_close(out.loss, out.lm_loss + 0.1 * out.mtp_loss)
    assert torch.equal(model(tokens), out.logits)


def test_no_mtp():
    model = build(num_nextn_predict_layers=0)
    tokens = torch.randint(0, 97, (1, 5))
    out = model(tokens, tokens)
    assert out.mtp_loss is None
    torch.testing.assert_close(out.loss, out.lm_loss)
    assert out.expert_counts.shape[0] == model.cfg.num_hidden_layers - model.cfg.first_k_dense_replace
