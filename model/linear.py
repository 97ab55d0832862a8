"""Linear layers the model can use: plain and emulated blockwise FP8.

Plain is torch's `nn.Linear`, which the model is built with (fp32, or bf16 under DeepSpeed or
autocast). `FP8Linear` is a drop-in subclass that keeps the same `weight` (and `bias`)
parameters, so state dicts, checkpoints and the HF export do not change, and runs all three
GEMMs of a linear layer through the FP8 recipe of the DeepSeek-V3 report (§3.3):

    GEMM    y = x·Wᵀ        contraction    operand tiles (one scale each)
    fprop   y  = x  · Wᵀ    K (in)         x: 1×128 (per token, 128 channels)   W: 128×128
    dgrad   dx = dy · W     N (out)        dy: 1×128 (per token, 128 channels)  W: 128×128
    wgrad   dW = dyᵀ · x    M (tokens)     dy and x re-quantised: 128×1 (128 tokens, per channel)

Each tile's scale is computed online from its own max |value| (no history): the tile is
multiplied by 448/amax and rounded to E4M3 (`torch.float8_e4m3fn`, 3 mantissa bits, max 448),
so one outlier only coarsens its own tile. Scales always run along the GEMM's contraction
dimension, which is why activations and output gradients are quantised twice: per token for
fprop/dgrad, per channel over 128 tokens for wgrad. 128×128 weight blocks serve W and Wᵀ alike.

This is an emulation: each operand is quantised to FP8 and immediately dequantised, and the
GEMM runs in fp32. On Hopper the real kernel accumulates in the tensor cores' limited-precision
accumulator and promotes partial sums to fp32 every 128 elements of K (report §3.3); fp32
accumulation throughout is what that promotion approximates, so operand rounding, the part that
changes training, is reproduced exactly and accumulation error is not modelled. It runs on CPU,
is tested against an explicit tile-by-tile loop, and is the numerical reference for the
Transformer Engine path in parallel/fp8.py.

Dimensions that are not multiples of 128 form partial tiles at the end of a row or column;
their scale comes from the elements present, exactly as if the tensor were zero-padded.

`fp8_grouped_mm` is the same recipe for the routed experts' grouped GEMM (rows sorted by expert,
one weight matrix per expert): weights in 128×128 blocks per expert, activations in 1×128 tiles
per token; for wgrad the 128-token tiles restart at each expert's first row, since each
expert's weight gradient contracts over its own tokens only.

`pow2_scales=True` rounds each scale down to a power of two (Transformer Engine's default for
its blockwise recipe, so the emulation can match it bit for bit); the default keeps the exact
448/amax scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .moe import grouped_mm

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
TILE = 128  # the report's quantisation granularity

ACT_TILE = (1, TILE)  # per token, 128 channels: activations and output grads in fprop/dgrad
WGRAD_TILE = (TILE, 1)  # 128 tokens, per channel: both operands of wgrad
WEIGHT_TILE = (TILE, TILE)  # weights


def _scale(amax: torch.Tensor, pow2_scales: bool) -> torch.Tensor:
    """Quantisation multiplier 448/amax per tile (1 for an all-zero tile), finite."""
    scale = torch.where(amax > 0, FP8_MAX / amax, torch.ones_like(amax))
    scale = scale.clamp(max=torch.finfo(torch.float32).max)  # amax below ~1e-36 would overflow
    if pow2_scales:
        _, exponent = torch.frexp(scale)  # scale = m·2^e with m in [0.5, 1)
        scale = torch.ldexp(torch.ones_like(scale), exponent - 1)  # largest power of 2 <= scale
    return scale


def quantize_tiles(x: torch.Tensor, tile: tuple[int, int], pow2_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 quantise-dequantise the last two dims of x in tiles of `tile` = (rows, cols).

    x (..., M, N) -> (dequantised fp32 (..., M, N), scale_inv (..., ceil(M/rows), ceil(N/cols))).
    Leading dims are independent (one expert each for stacked expert weights). scale_inv is the
    dequantisation factor of each tile (TE's and the release's `scale_inv`): x ≈ fp8 · scale_inv.
    """
    r, c = tile
    *lead, m, n = x.shape
    x = x.float()
    pad_m, pad_n = -m % r, -n % c
    if pad_m or pad_n:
        x = F.pad(x, (0, pad_n, 0, pad_m))  # zeros never raise a tile's amax
    mt, nt = (m + pad_m) // r, (n + pad_n) // c
    tiles = x.reshape(*lead, mt, r, nt, c)  # (..., row tiles, r, col tiles, c)
    amax = tiles.abs().amax(dim=(-3, -1), keepdim=True)  # (..., mt, 1, nt, 1)
    scale = _scale(amax, pow2_scales)
    # |tile·scale| <= 448 up to an fp32 ulp, and torch's E4M3 cast rounds to nearest even and
    # saturates at ±448, so no clamp is needed
    q = (tiles * scale).to(FP8_DTYPE)
    dq = q.float().div_(scale).reshape(*lead, mt * r, nt * c)
    if pad_m or pad_n:
        dq = dq[..., :m, :n].contiguous()
    return dq, (1.0 / scale).reshape(*lead, mt, nt)


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """What a linear layer returns here: the autocast dtype when autocast is on, else x's dtype."""
    device = x.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _no_autocast(t: torch.Tensor):
    """Autocast off inside the emulated GEMMs: they compute in fp32 on dequantised operands."""
    return torch.autocast("cuda" if t.is_cuda else "cpu", enabled=False)


class _FP8LinearFunction(torch.autograd.Function):
    """y = x·Wᵀ with every GEMM on E4M3-rounded operands. x (M, K), weight (N, K) -> (M, N)."""

    @staticmethod
    def forward(ctx, x, weight, pow2_scales, out_dtype):
        ctx.save_for_backward(x, weight)
        ctx.pow2_scales = pow2_scales
        with _no_autocast(x):
            xq, _ = quantize_tiles(x, ACT_TILE, pow2_scales)  # (M, K), tiles along K
            wq, _ = quantize_tiles(weight, WEIGHT_TILE, pow2_scales)  # (N, K)
            y = xq @ wq.t()  # fprop, contraction over K
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        p2 = ctx.pow2_scales
        dx = dw = None
        with _no_autocast(x):
            if ctx.needs_input_grad[0]:
                dyq, _ = quantize_tiles(dy, ACT_TILE, p2)  # (M, N), tiles along N
                wq, _ = quantize_tiles(weight, WEIGHT_TILE, p2)  # the same blocks as fprop
                dx = (dyq @ wq).to(x.dtype)  # dgrad, contraction over N
            if ctx.needs_input_grad[1]:
                dyq_t, _ = quantize_tiles(dy, WGRAD_TILE, p2)  # (M, N), tiles along tokens
                xq_t, _ = quantize_tiles(x, WGRAD_TILE, p2)  # (M, K), tiles along tokens
                dw = (dyq_t.t() @ xq_t).to(weight.dtype)  # wgrad, contraction over M
        return dx, dw, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, pow2_scales: bool = False) -> torch.Tensor:
    """x (..., in) · weight (out, in)ᵀ -> (..., out), fprop/dgrad/wgrad in emulated blockwise FP8."""
    shape = x.shape
    y = _FP8LinearFunction.apply(x.reshape(-1, shape[-1]), weight, pow2_scales, _output_dtype(x))
    return y.view(*shape[:-1], weight.shape[0])


class FP8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in emulated blockwise FP8; same parameters and state dict."""

    pow2_scales: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.pow2_scales)
        return y if self.bias is None else y + self.bias.to(y.dtype)  # bias added in high precision

    @classmethod
    def from_linear(cls, linear: nn.Linear, pow2_scales: bool = False) -> "FP8Linear":
        """An FP8Linear that shares `linear`'s parameter objects (no copy)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        if linear.bias is not None:
            new.bias = linear.bias
        new.pow2_scales = pow2_scales
        return new


# ----------------------------------------------------------------------------------------------
# Routed experts


def _pad_groups(x: torch.Tensor, counts: list[int], multiple: int) -> tuple[torch.Tensor, list[int]]:
    """Zero-pad each group's block of rows to a multiple of `multiple`. x (rows, C) -> (padded rows, C)."""
    padded = [-(-c // multiple) * multiple for c in counts]
    if padded == counts:
        return x, counts
    out = x.new_zeros(sum(padded), x.shape[1])
    group = torch.repeat_interleave(torch.arange(len(counts), device=x.device),
                                    torch.tensor(counts, device=x.device))  # (rows,) group of each row
    start = torch.tensor([0] + counts[:-1], device=x.device).cumsum(0)
    padded_start = torch.tensor([0] + padded[:-1], device=x.device).cumsum(0)
    dest = torch.arange(x.shape[0], device=x.device) - start[group] + padded_start[group]
    out[dest] = x
    return out, padded


def _per_group_wgrad(dy: torch.Tensor, x: torch.Tensor, counts: list[int], num_groups: int) -> torch.Tensor:
    """dW[e] = dy_eᵀ · x_e over each group's rows. dy (rows, N), x (rows, K) -> (E, N, K)."""
    dw = dy.new_zeros(num_groups, dy.shape[1], x.shape[1])
    start = 0
    for e, c in enumerate(counts):
        if c:
            dw[e] = dy[start:start + c].t() @ x[start:start + c]
        start += c
    return dw


class _FP8GroupedMMFunction(torch.autograd.Function):
    """Row block e of x (counts[e] rows) times w[e]ᵀ in emulated blockwise FP8. x (rows, K), w (E, N, K)."""

    @staticmethod
    def forward(ctx, x, w, counts, pow2_scales, out_dtype):
        ctx.save_for_backward(x, w, counts)
        ctx.pow2_scales = pow2_scales
        with _no_autocast(x):
            xq, _ = quantize_tiles(x, ACT_TILE, pow2_scales)  # per token: grouping does not matter
            wq, _ = quantize_tiles(w, WEIGHT_TILE, pow2_scales)  # 128×128 blocks inside each expert
            y = grouped_mm(xq, wq, counts)  # (rows, N)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w, counts = ctx.saved_tensors
        p2 = ctx.pow2_scales
        dx = dw = None
        with _no_autocast(x):
            if ctx.needs_input_grad[0]:
                dyq, _ = quantize_tiles(dy, ACT_TILE, p2)
                wq, _ = quantize_tiles(w, WEIGHT_TILE, p2)
                dx = grouped_mm(dyq, wq.transpose(1, 2), counts).to(x.dtype)  # (rows, K)
            if ctx.needs_input_grad[1]:
                # 128-token tiles may not straddle two experts: pad each expert's rows to a multiple
                # of 128 (zero rows change no amax and add nothing to the product), then tile.
                counts_list = counts.tolist()
                dy_p, padded = _pad_groups(dy.float(), counts_list, TILE)
                x_p, _ = _pad_groups(x.float(), counts_list, TILE)
                dyq_t, _ = quantize_tiles(dy_p, WGRAD_TILE, p2)
                xq_t, _ = quantize_tiles(x_p, WGRAD_TILE, p2)
                dw = _per_group_wgrad(dyq_t, xq_t, padded, w.shape[0]).to(w.dtype)  # (E, N, K)
        return dx, dw, None, None, None


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, pow2_scales: bool = False) -> torch.Tensor:
    """`moe.grouped_mm` in emulated blockwise FP8: x (rows, in) sorted by expert, w (E, out, in) -> (rows, out).

    Drop-in for `RoutedExperts.gemm`, which parallel/fp8.py sets from outside. Returns x's dtype,
    also under autocast: the experts' outputs are summed in place into an x-typed buffer.
    """
    return _FP8GroupedMMFunction.apply(x, w, counts, pow2_scales, x.dtype)


__all__ = [
    "FP8Linear", "fp8_linear", "fp8_grouped_mm", "quantize_tiles",
    "FP8_DTYPE", "FP8_MAX", "TILE", "ACT_TILE", "WGRAD_TILE", "WEIGHT_TILE",
]
