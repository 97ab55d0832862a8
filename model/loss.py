"""Output head and cross-entropy in one pass over token chunks, never holding (N, vocab) logits.

The reference is `F.cross_entropy(h @ W.T, targets)`. It writes the full logits, then their
log-softmax, then a zero-filled gradient of the same size, then the log-softmax gradient: four
(N, vocab) tensors that dominate a small model's step (on a 2-core CPU the smoke model's
2048 x 8192 logits cost ~25% of the step, most of it in memory traffic and page faults, not
arithmetic). Here the rows go through in chunks (model.loss_chunk_size, 256 by default) in
buffers reused for every chunk (one in fp32 on CPU, where the log-softmax overwrites the logits;
two otherwise), and the gradients for h and W are formed during the forward pass, while each
chunk's softmax is at hand:

    logits_c = h_c W^T                      (c, V), in the compute dtype
    logp_c   = log_softmax(float(logits_c)) fp32
    loss    += -Σ logp_c[i, t_i]            over rows whose target is not ignored
    G_c      = softmax_c - onehot(t)        n·(the mean loss's gradient) on those rows
    s_c      = 1/n on those rows, 0 on ignored ones
    dh_c     = s_c ∘ (G_c W),   dW += G_c^T (s_c ∘ h_c)

In fp32 the row scale multiplies the (c, d) operand and result, not the (c, V) G_c: a pass fewer
over the largest tensor. With low-precision GEMMs s_c ∘ G_c is formed in fp32 before the cast,
as the reference rounds it.

Backward then only scales dh and dW by the incoming gradient. Under no_grad (evaluation) the
gradient work is skipped. The arithmetic is the reference's; results agree to fp32 rounding
(tests/unit/test_loss.py checks loss and both gradients against the reference).

The price is memory: each head's fp32 dW (V, d) lives from its forward to its backward, 3.7 GB
per head at the 671B shape (129,280 × 7,168), twice with the MTP head. `recompute=True`
(model.loss_recompute) keeps only each row's log-sum-exp instead and forms the same gradients
in backward, computing each chunk's logits again (G_c = exp(logits_c - lse_c) - onehot): four
GEMMs per chunk instead of three, and no (V, d) tensor held between forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _chunk_buffers(h: torch.Tensor, rows: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, fp32 log-probabilities) buffers for a chunk of `rows`, reused with out= for every
    chunk: a fresh (c, V) tensor per op would page-fault on CPU (glibc hands large blocks back to
    the OS on free) and fragment the CUDA cache. In fp32 on CPU they are one buffer (the second
    overwrites the first in place, so the chunk's working set stays in cache)."""
    logits_buf = h.new_empty(rows, vocab)  # compute dtype
    if h.dtype == torch.float32 and h.device.type == "cpu":
        return logits_buf, logits_buf
    return logits_buf, torch.empty(rows, vocab, dtype=torch.float32, device=h.device)


def _add_chunk_grads(grad: torch.Tensor, logits: torch.Tensor, h_c: torch.Tensor, weight: torch.Tensor,
                     s_c: torch.Tensor, dh_c: torch.Tensor, dw: torch.Tensor, first: bool) -> None:
    """One chunk's share of the gradients: grad = softmax - onehot (fp32, (c, V), overwritten),
    s_c the rows' scale (c, 1); writes dh_c = s_c ∘ (grad W) and adds (s_c ∘ grad)ᵀ h_c to dw
    (written when `first`)."""
    if grad.dtype == h_c.dtype:  # fp32: G, dh and dW all fp32
        # the rows' scale (0 on ignored rows) multiplies the (c, d) operand and result rather
        # than the (c, V) G: a pass fewer over the largest tensor
        torch.mm(grad, weight, out=dh_c).mul_(s_c)
        # (out= forms: FlopCounterMode does not count addmm_)
        if first:
            torch.mm(grad.t(), h_c * s_c, out=dw)
        else:
            torch.addmm(dw, grad.t(), h_c * s_c, out=dw)
    else:  # low-precision GEMMs as in the reference: s_c ∘ G in fp32, then cast; per-chunk
        # partial dWs summed in fp32
        grad = logits.copy_(grad.mul_(s_c))
        torch.mm(grad, weight, out=dh_c)
        part = grad.t() @ h_c
        if first:
            dw.copy_(part)
        else:
            dw += part


def _row_scale(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(valid rows, their count n, 1/n on them and 0 on ignored rows: the mean's gradient in one
    factor, targets with ignored rows pointed at token 0)."""
    valid = targets != IGNORE_INDEX
    n_valid = valid.sum()
    return valid, n_valid, valid.to(torch.float32) / n_valid, targets.clamp_min(0)


class _LinearCrossEntropy(torch.autograd.Function):
    """Gradients formed in the forward, while each chunk's softmax is at hand; backward scales them."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        valid, n_valid, row_scale, safe_targets = _row_scale(targets)
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        rows_max, vocab = min(chunk, h.shape[0]), weight.shape[0]
        if want_grad:
            dh = torch.empty_like(h)
            dw = torch.empty_like(weight, dtype=torch.float32)  # the first chunk writes, the rest add
            minus_one = torch.full((rows_max, 1), -1.0, dtype=torch.float32, device=h.device)
        logits_buf, logp_buf = _chunk_buffers(h, rows_max, vocab)
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            h_c, t_c = h[rows], safe_targets[rows, None]
            logits = torch.mm(h_c, weight.t(), out=logits_buf[: h_c.shape[0]])
            logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=logp_buf[: h_c.shape[0]])
            loss_sum -= (logp.gather(1, t_c).squeeze(1) * valid[rows]).sum()
            if not want_grad:
                continue
            grad = logp.exp_()  # softmax, in place of logp
            grad.scatter_add_(1, t_c, minus_one[: h_c.shape[0]])  # minus the one-hot
            _add_chunk_grads(grad, logits, h_c, weight, row_scale[rows, None], dh[rows], dw, start == 0)
        # kept on ctx, not saved: they are results, and backward scales them in place
        ctx.dh, ctx.dw = (dh, dw) if want_grad else (None, None)
        ctx.weight_dtype = weight.dtype
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        dh, dw = ctx.dh, ctx.dw
        if dh is None:
            raise RuntimeError(
                "backward through the fused head and loss ran twice: its gradients are computed in the "
                "forward and handed over once (retain_graph / double backward need model.loss_recompute=true, "
                "or model.loss_chunk_size=0, the reference path)")
        ctx.dh = ctx.dw = None
        # the loss is usually the root of backward (grad 1): skip two passes where checking is free
        if not (grad_loss.device.type == "cpu" and grad_loss.item() == 1.0):
            dh.mul_(grad_loss.to(dh.dtype))
            dw.mul_(grad_loss)
        return dh, dw.to(ctx.weight_dtype), None, None


class _LinearCrossEntropyRecompute(torch.autograd.Function):
    """Gradients formed in backward from each chunk's logits computed again: the forward keeps
    only each row's log-sum-exp, so no (vocab × hidden) gradient is held from forward to backward,
    for one more (rows × hidden × vocab) GEMM (model.loss_recompute)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        valid, n_valid, row_scale, safe_targets = _row_scale(targets)
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        logits_buf = h.new_empty(min(chunk, h.shape[0]), weight.shape[0])
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            h_c = h[rows]
            logits = torch.mm(h_c, weight.t(), out=logits_buf[: h_c.shape[0]])
            torch.logsumexp(logits.float(), dim=-1, out=lse[rows])
            picked = logits.gather(1, safe_targets[rows, None]).squeeze(1).float()
            loss_sum += ((lse[rows] - picked) * valid[rows]).sum()
        ctx.save_for_backward(h, weight, safe_targets, row_scale, lse)
        ctx.chunk = chunk
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        h, weight, safe_targets, row_scale, lse = ctx.saved_tensors
        chunk, rows_max, vocab = ctx.chunk, min(ctx.chunk, h.shape[0]), weight.shape[0]
        dh = torch.empty_like(h)
        dw = torch.empty_like(weight, dtype=torch.float32)
        minus_one = torch.full((rows_max, 1), -1.0, dtype=torch.float32, device=h.device)
        scale = row_scale * grad_loss.float()  # the upstream gradient folded into the rows' 1/n
        logits_buf, p_buf = _chunk_buffers(h, rows_max, vocab)
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            h_c, t_c = h[rows], safe_targets[rows, None]
            logits = torch.mm(h_c, weight.t(), out=logits_buf[: h_c.shape[0]])
            grad = torch.sub(logits, lse[rows, None], out=p_buf[: h_c.shape[0]]).exp_()  # softmax
            grad.scatter_add_(1, t_c, minus_one[: h_c.shape[0]])  # minus the one-hot
            _add_chunk_grads(grad, logits, h_c, weight, scale[rows, None], dh[rows], dw, start == 0)
        return dh, dw.to(weight.dtype), None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 256,
                         recompute: bool = False):
    """Mean cross-entropy of softmax(h @ weight.T) against targets (IGNORE_INDEX rows skipped).

    h (..., d), weight (V, d), targets (...) -> scalar fp32 loss. Under autocast h and weight
    are cast to the autocast dtype first, as the reference's Linear would be; the softmax is fp32.
    `recompute`: form the gradients in backward, computing each chunk's logits again, instead of
    in the forward (where the fp32 weight gradient is then held until backward).
    """
    h = h.reshape(-1, h.shape[-1])
    device = h.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        h, weight = h.to(dtype), weight.to(dtype)
    with torch.autocast(device, enabled=False):
        fn = _LinearCrossEntropyRecompute if recompute else _LinearCrossEntropy
        return fn.apply(h, weight, targets.reshape(-1), chunk)


def logits_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of materialised logits (..., V) against targets (...), in fp32."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)


def reference_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The obvious version: full logits, then F.cross_entropy in fp32. Kept for tests."""
    return logits_cross_entropy(F.linear(h, weight), targets)
