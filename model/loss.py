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

The main head and every MTP depth apply the same weight, so they run in one call
(linear_cross_entropy_heads) for the loss the model trains on, L = Σ_k c_k·CE_k (c = 1 for the
main head, λ/D for each depth), with c_k folded into s_c: one fp32 dW (V, d) for all of them.
It lives from the forward to backward, 3.7 GB at the 671B shape (129,280 × 7,168); separate
calls would hold one per head. Computing the logits again in backward instead (keeping each
row's log-sum-exp) would form dW there, at the same peak (all activations are still held when
backward starts), for a fourth GEMM per chunk; it is not done.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# The fp32 CPU chunk buffer, kept from one call to the next (one per thread): see _chunk_buffers.
_cpu_buffer = threading.local()


def _reused_cpu_buffer(rows: int, vocab: int) -> torch.Tensor:
    """A (rows, vocab) fp32 CPU tensor over this thread's kept buffer, which grows to the
    largest size asked for and stays allocated. Its contents are scratch: nothing that outlives
    a call of _LinearCrossEntropy.forward may point into it."""
    n = rows * vocab
    buf = getattr(_cpu_buffer, "tensor", None)
    if buf is None or buf.numel() < n:
        buf = _cpu_buffer.tensor = None  # the old one goes before the new one is allocated
        buf = _cpu_buffer.tensor = torch.empty(n, dtype=torch.float32)
    return buf[:n].view(rows, vocab)


def _chunk_buffers(h: torch.Tensor, rows: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, fp32 log-probabilities) buffers for a chunk of `rows`, reused with out= for every
    chunk: a fresh (c, V) tensor per op would page-fault on CPU and fragment the CUDA cache.

    In fp32 on CPU they are one buffer (the log-softmax overwrites the logits in place), and
    that buffer is kept for the next call too. glibc serves a block of 32 MiB or more (1024
    rows of an 8K vocabulary) from a fresh mmap and hands it back on free, so a buffer
    allocated per step pays a page fault per 4 KiB, every step; kept, it lets a CPU config
    take the whole micro-batch as one chunk, whose GEMMs run faster than those of several
    (configs/smoke.yaml: the head and loss take ~15% less time at 2048 rows than at 256).
    The CUDA caching allocator already reuses blocks, so other devices allocate per call.
    """
    if h.dtype == torch.float32 and h.device.type == "cpu":
        buf = _reused_cpu_buffer(rows, vocab)
        return buf, buf
    logits_buf = h.new_empty(rows, vocab)  # compute dtype
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
    """Gradients formed in the forward, while each chunk's softmax is at hand, into one dW shared
    by every head (the weight is the same); backward scales them."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, chunk: int, coefs: tuple[float, ...], *heads: torch.Tensor):
        hs, targets = heads[0::2], heads[1::2]  # apply takes them as h_0, t_0, h_1, t_1, ...
        want_grad = ctx.needs_input_grad[0] or any(ctx.needs_input_grad[3::2])
        rows_max, vocab = min(chunk, max(h.shape[0] for h in hs)), weight.shape[0]
        losses = torch.empty(len(hs), dtype=torch.float32, device=weight.device)
        dhs, dw = [], None
        if want_grad:
            dw = torch.empty_like(weight, dtype=torch.float32)  # the first chunk writes, the rest add
            minus_one = torch.full((rows_max, 1), -1.0, dtype=torch.float32, device=weight.device)
        logits_buf, logp_buf = _chunk_buffers(hs[0], rows_max, vocab)
        first = True
        for k, (h, coef) in enumerate(zip(hs, coefs)):
            valid, n_valid, row_scale, safe_targets = _row_scale(targets[k])
            scale = row_scale * coef  # this head's weight in the sum, in its rows' 1/n
            loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
            dh = torch.empty_like(h) if want_grad else None
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
                _add_chunk_grads(grad, logits, h_c, weight, scale[rows, None], dh[rows], dw, first)
                first = False
            losses[k] = loss_sum / n_valid
            dhs.append(dh)
        # kept on ctx, not saved: they are results, and backward scales them in place
        ctx.dhs, ctx.dw = (dhs, dw) if want_grad else (None, None)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(losses)
        # the one value the gradients are formed for: Σ_k coefs[k]·CE_k
        return (losses * losses.new_tensor(coefs)).sum(), losses

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, _grad_losses: torch.Tensor):
        dhs, dw = ctx.dhs, ctx.dw
        if dhs is None:
            raise RuntimeError(
                "backward through the fused head and loss ran twice: its gradients are computed in the "
                "forward and handed over once (retain_graph / double backward need model.loss_chunk_size=0, "
                "the reference path)")
        ctx.dhs = ctx.dw = None
        # the loss is usually the root of backward (grad 1): skip the passes where checking is free
        if not (grad_total.device.type == "cpu" and grad_total.item() == 1.0):
            for dh in dhs:
                dh.mul_(grad_total.to(dh.dtype))
            dw.mul_(grad_total)
        return (dw.to(ctx.weight_dtype), None, None, *(g for dh in dhs for g in (dh, None)))


def linear_cross_entropy_heads(weight: torch.Tensor, heads: list[tuple[torch.Tensor, torch.Tensor]],
                               coefs: list[float], chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Several applications of one output head, e.g. the main model's and each MTP depth's.

    heads: (h (..., d), targets (...)) pairs; weight (V, d); coefs: one float per head.
    -> (Σ_k coefs[k]·CE_k, the CE_k as a (K,) fp32 tensor). Only the sum carries gradients: the
    heads share one fp32 dW, formed for that sum, instead of one per head. Each CE_k is the mean
    over its rows whose target is not IGNORE_INDEX. Under autocast h and weight are cast to the
    autocast dtype first, as the reference's Linear would be; the softmax is fp32.
    """
    device = weight.device.type
    flat = []
    for h, targets in heads:
        flat += [h.reshape(-1, h.shape[-1]), targets.reshape(-1)]
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        weight, flat[0::2] = weight.to(dtype), [h.to(dtype) for h in flat[0::2]]
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(weight, chunk, tuple(float(c) for c in coefs), *flat)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 256) -> torch.Tensor:
    """Mean cross-entropy of softmax(h @ weight.T) against targets (IGNORE_INDEX rows skipped).

    h (..., d), weight (V, d), targets (...) -> scalar fp32 loss; one head of
    linear_cross_entropy_heads.
    """
    return linear_cross_entropy_heads(weight, [(h, targets)], [1.0], chunk)[0]


def logits_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of materialised logits (..., V) against targets (...), in fp32."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)


def reference_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The obvious version: full logits, then F.cross_entropy in fp32. Kept for tests."""
    return logits_cross_entropy(F.linear(h, weight), targets)
