"""Pure-torch stand-ins with Transformer Engine's calling conventions, for checking on a CPU how
parallel/fp8.py wires TE in (row padding, the first-micro-batch flag, state-dict keys, expert
parallelism, checkpoints). Their GEMMs are plain fp32 matmuls: TE's FP8 numerics are checked
against the emulation in tests/gpu, where TE runs.

`install()` makes parallel.fp8 take these as TE on any device (for a worker process that builds
the real engine with fp8.backend=te).
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn


AUTOCAST = {"depth": 0, "outside": 0}  # fp8_autocast nesting; forwards run outside it


@contextlib.contextmanager
def fp8_autocast(**kwargs):
    AUTOCAST["depth"] += 1
    try:
        yield
    finally:
        AUTOCAST["depth"] -= 1


def _note_autocast() -> None:
    AUTOCAST["outside"] += AUTOCAST["depth"] == 0


class FakeTELinear(nn.Linear):
    """te.Linear's interface: forward(x, is_first_microbatch=None); FP8 metadata in _extra_state."""

    seen: list = []

    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
        super().__init__(in_features, out_features, bias=bias, dtype=params_dtype, device=device)

    def forward(self, x, is_first_microbatch=None):
        assert x.dim() == 2 and x.shape[0] % 16 == 0, x.shape
        FakeTELinear.seen.append(is_first_microbatch)
        _note_autocast()
        return super().forward(x)

    def get_extra_state(self):
        return torch.tensor([1.0])

    def set_extra_state(self, state):
        pass


class FakeGroupedLinear(nn.Module):
    """te.GroupedLinear's interface: weight0..weight{n-1}, forward(x, m_splits, is_first_microbatch)."""

    def __init__(self, num_gemms, in_features, out_features, bias=True, params_dtype=None, device=None):
        super().__init__()
        self.num_gemms = num_gemms
        for i in range(num_gemms):  # empty: the adapters copy weights in (and no global RNG draw)
            self.register_parameter(f"weight{i}", nn.Parameter(torch.empty(out_features, in_features, dtype=params_dtype)))

    def forward(self, x, m_splits, is_first_microbatch=None):
        assert len(m_splits) == self.num_gemms and all(m % 16 == 0 for m in m_splits), m_splits
        _note_autocast()
        blocks = x.split(m_splits)
        y = torch.cat([b @ getattr(self, f"weight{i}").t() for i, b in enumerate(blocks)])
        return y.to(torch.get_autocast_dtype("cpu")) if torch.is_autocast_enabled("cpu") else y  # as TE does

    def get_extra_state(self):
        return torch.tensor([1.0])

    def set_extra_state(self, state):
        pass


def install() -> None:
    """parallel.fp8 uses these as TE (te.Linear, te.GroupedLinear, an fp8_autocast that only counts
    its nesting, so forwards run outside it show in AUTOCAST["outside"]) and a stand-in recipe,
    on any device."""
    from parallel import fp8 as pf8

    te = types.SimpleNamespace(Linear=FakeTELinear, GroupedLinear=FakeGroupedLinear, fp8_autocast=fp8_autocast)
    pf8._require_te = lambda device, recipe: (te, object())
    pf8.import_te = lambda: (te, None)
