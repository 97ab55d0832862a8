"""The single-process DeepSpeed engine (what `dsv3 train` and `dsv3 bench` build on one CPU) trains
exactly like the obvious loop: torch's AdamW after clip_grad_norm_, on the same model and batches.

It runs in a subprocess, since the engine needs a process group of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support import REPO

from .test_bench import TINY

WORKER = r"""
import copy, json, sys
import torch
from model import DeepSeekV3
from parallel import engine as pe
from train.config import load_config

cfg = load_config("configs/smoke.yaml", sys.argv[1:])
info = pe.init_distributed("cpu", 60)
cfg.batch_layout(info.world_size)
torch.manual_seed(0)
model = DeepSeekV3(cfg.model)
ref = copy.deepcopy(model)
start = [p.detach().clone() for p in model.parameters()]
engine, _ = pe.build_engine(model, cfg, info)
engine.train()
o = cfg.optim
ref_opt = torch.optim.AdamW(pe.param_groups(ref, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
gen = torch.Generator().manual_seed(1)
report = {"backward_allreduce": engine.enable_backward_allreduce, "norms": [], "max_param_diff": 0.0}
for step in range(3):
    x = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1), generator=gen)
    tokens, targets = x[:, :-1], x[:, 1:]
    with torch.no_grad():  # each step from the same weights: the moments stay each optimizer's own
        for a, b in zip(ref.parameters(), model.parameters()):
            a.copy_(b)
    out = engine(tokens, targets)
    engine.backward(out.loss)
    engine.step()
    ref_opt.zero_grad(set_to_none=True)
    ref(tokens, targets).loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), o.grad_clip).item()
    ref_opt.step()
    report["norms"].append([engine.get_global_grad_norm(), ref_norm])
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
    report["max_param_diff"] = max(report["max_param_diff"], diff)
report["max_update"] = max((a - s).abs().max().item() for a, s in zip(model.parameters(), start))
print(json.dumps(report))
"""


def _run_worker(source: str, *args: str):
    """Run a worker script in a fresh process (the engine needs a process group of its own);
    returns the JSON of its last stdout line."""
    proc = subprocess.run([sys.executable, "-c", source, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_single_process_engine_matches_plain_adamw():
    # a large LR so three steps move every weight well beyond rounding; clipping active (max norm 0.05)
    args = [*TINY, "optim.lr=1e-2", "optim.grad_clip=0.05"]
    report = _run_worker(WORKER, *args)
    # one process at ZeRO-0: DeepSpeed's flatten / all-reduce / copy-back of every gradient is skipped
    assert report["backward_allreduce"] is False
    for ours, ref in report["norms"]:
        assert ref > 0.05  # the clip really scaled the gradients
        assert abs(ours - ref) <= 1e-5 * ref, (ours, ref)
    # every step's update from the same weights equal up to fp32 rounding (the two clip norms
    # differ in the last bit or two). Steps are compared one at a time: over several, a rounding
    # difference in a gradient element that nearly cancels becomes an O(lr) difference once
    # AdamW normalises it, which says nothing about the engine.
    assert report["max_update"] > 1e-2 and report["max_param_diff"] <= 1e-5 * report["max_update"], report


OVERFLOW_WORKER = r"""
import json
import torch
import deepspeed
from parallel import engine as pe
from parallel.groups import build_expert_layout
from train.config import load_config

# the DeepSpeed config bf16 runs get: ZeRO-2, gradients accumulated in fp32, clipping at 1
cfg = load_config("configs/smoke.yaml", ["model.precision=bf16", "parallel.zero_stage=2",
                                         "train.micro_batch_size=1", "train.global_batch_size=1"])
pe.init_distributed("cpu", 60)
torch.manual_seed(0)
m = torch.nn.Linear(4, 2)
opt = torch.optim.AdamW(m.parameters(), lr=0.1)
engine, *_ = deepspeed.initialize(model=m, optimizer=opt, config=pe.deepspeed_config(cfg, 1, bf16=True))
pe.install_global_grad_norm(engine, build_expert_layout(1, 8))
blow = [False]
m.weight.register_hook(lambda g: g * float("inf") if blow[0] else g)  # finite loss, inf gradient
rows = []
for bad in (False, True, False):
    blow[0] = bad
    before = m.weight.detach().float().clone()
    engine.dsv3_nonfinite = False
    loss = engine(torch.ones(1, 4, dtype=torch.bfloat16)).float().sum()
    engine.backward(loss)
    engine.step()
    rows.append({"loss_finite": bool(torch.isfinite(loss)), "skipped": pe.step_skipped(engine),
                 "moved": (m.weight.detach().float() - before).abs().max().item()})
print(json.dumps(rows))
"""


def test_bf16_optimizers_report_their_skipped_steps():
    """DeepSpeed's bf16 optimizer checks for overflow before any norm and skips the step without
    computing ours; step_skipped must still say so (the loop counts it and skips the bias update)."""
    good, bad, after = _run_worker(OVERFLOW_WORKER)
    assert bad["loss_finite"] and bad["skipped"] and bad["moved"] == 0.0, bad
    for row in (good, after):
        assert not row["skipped"] and row["moved"] > 0, row


ACCUM_WORKER = r"""
import json, sys
import torch
import deepspeed
from parallel import engine as pe
from train.config import load_config

cfg = load_config("configs/smoke.yaml", ["model.precision=bf16", "parallel.zero_stage=2", "optim.grad_clip=0",
                                         "train.micro_batch_size=1", "train.global_batch_size=2"])
pe.init_distributed("cpu", 60)


class Scaled(torch.nn.Module):  # d loss / d w = c, whatever w is
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(8))

    def forward(self, c):
        return (self.w.float() * c).sum()


model = Scaled()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=pe.deepspeed_config(cfg, 1, bf16=True))
seen = []
inner_step = engine.optimizer.optimizer.step
def record(*args, **kwargs):
    seen.extend(p.grad.detach().clone() for g in engine.optimizer.optimizer.param_groups for p in g["params"])
    return inner_step(*args, **kwargs)
engine.optimizer.optimizer.step = record
for c in (1.0, 1e-3):  # two micro-batches of one step
    engine.backward(engine(c))
    engine.step()
print(json.dumps({"dtype": str(seen[0].dtype), "grad": seen[0].tolist()}))
"""


def test_bf16_gradients_accumulate_in_fp32():
    """The DeepSpeed config we build for bf16: micro-batch gradients 1.0 and 1e-3 (each halved for
    the two-step average) must reach the optimizer as 0.5005. Summed in bf16 (8 bits of mantissa,
    DeepSpeed's default) 0.5 + 0.0005 rounds back to 0.5."""
    report = _run_worker(ACCUM_WORKER)
    assert report["dtype"] == "torch.float32"
    assert all(abs(g - 0.5005) < 2e-6 for g in report["grad"]), report


BIAS_WORKER = r"""
import json, sys
import torch
from model import DeepSeekV3
from parallel import engine as pe
from train.config import load_config

cfg = load_config("configs/smoke.yaml", [*sys.argv[1:], "model.precision=bf16", "parallel.zero_stage=2"])
info = pe.init_distributed("cpu", 60)
torch.manual_seed(0)
model = DeepSeekV3(cfg.model)
for i, moe in enumerate(model.moe_layers()):  # e.g. imported biases: more bits than bf16 holds
    moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.0123457, 0.0123457, cfg.model.n_routed_experts) * (i + 1))
want = pe.router_biases(model)
engine, _ = pe.build_engine(model, cfg, info)
got = [moe.gate.e_score_correction_bias for moe in engine.module.moe_layers()]
print(json.dumps({"weight_dtype": str(next(engine.module.parameters()).dtype),
                  "dtypes": [str(b.dtype) for b in got],
                  "exact": [bool(torch.equal(b, w)) for b, w in zip(got, want)],
                  "bf16_would_round": [not torch.equal(w.bfloat16().float(), w) for w in want]}))
"""


def test_routing_biases_keep_every_bit_through_the_bf16_engine():
    """Through build_engine with the installed DeepSpeed, the routing biases come out fp32 and exact.
    DeepSpeed 0.19 casts parameters only; 0.16-0.18 (which pyproject allows) cast the whole module,
    buffers included, which the next test reproduces."""
    report = _run_worker(BIAS_WORKER, *TINY)
    assert report["weight_dtype"] == "torch.bfloat16"  # the engine did cast the module
    assert all(report["bf16_would_round"])  # so a cast-back would have lost bits
    assert report["dtypes"] and all(d == "torch.float32" for d in report["dtypes"])
    assert all(report["exact"]), report


def test_routing_biases_survive_a_whole_module_bf16_cast():
    """What build_engine does around deepspeed.initialize, against a cast of the whole module
    (DeepSpeed before 0.19): the biases taken first are put back in fp32, bit for bit, where
    casting the rounded values back up would keep bf16's 8 bits."""
    import torch

    from parallel.engine import keep_router_bias_fp32, router_biases

    from .helpers import build

    model = build(seed=0)
    for i, moe in enumerate(model.moe_layers()):
        moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.0123457, 0.0123457, moe.cfg.n_routed_experts) * (i + 1))
    want = router_biases(model)
    model.to(torch.bfloat16)
    assert all(not torch.equal(m.gate.e_score_correction_bias.float(), w) for m, w in zip(model.moe_layers(), want))
    keep_router_bias_fp32(model, want)
    for moe, w in zip(model.moe_layers(), want):
        assert moe.gate.e_score_correction_bias.dtype == torch.float32
        assert torch.equal(moe.gate.e_score_correction_bias, w)


FP8_BF16_WORKER = r"""
import json, sys
import torch
from model import DeepSeekV3
from model.linear import FP8Linear, fp8_grouped_mm
from parallel import engine as pe
from train.config import load_config

cfg = load_config("configs/smoke.yaml", [*sys.argv[1:], "model.precision=fp8", "fp8.backend=emulated",
                                         "fp8.weights=bf16", "parallel.zero_stage=2"])
info = pe.init_distributed("cpu", 60)
torch.manual_seed(0)
engine, _ = pe.build_engine(DeepSeekV3(cfg.model), cfg, info)
m = engine.module
fp8 = [x for x in m.modules() if isinstance(x, FP8Linear)]
x = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1))
before = [x.weight.detach().clone() for x in fp8]
loss = engine(x[:, :-1], x[:, 1:]).loss
engine.backward(loss)
engine.step()
print(json.dumps({
    "fp8_linears": len(fp8), "fp8_dtypes": sorted({str(x.weight.dtype) for x in fp8}),
    "param_dtypes": sorted({str(p.dtype) for p in m.parameters()}),
    "experts_fp8": all(e.gemm is fp8_grouped_mm for e in (moe.experts for moe in m.moe_layers())),
    "masters": sorted({str(t.dtype) for t in engine.optimizer.single_partition_of_fp32_groups}),
    "bias_dtypes": sorted({str(moe.gate.e_score_correction_bias.dtype) for moe in m.moe_layers()}),
    "loss": loss.item(), "moved": all(not torch.equal(b, x.weight) for b, x in zip(before, fp8)),
}))
"""


def test_fp8_on_bf16_weights_runs_the_bf16_engine():
    """fp8.weights=bf16: the emulated FP8 GEMMs quantise from bf16 module weights while DeepSpeed's
    ZeRO-2 optimizer keeps the fp32 masters (and the routing biases stay fp32); one step trains."""
    report = _run_worker(FP8_BF16_WORKER, *TINY)
    assert report["fp8_linears"] > 0 and report["experts_fp8"], report
    assert report["fp8_dtypes"] == report["param_dtypes"] == ["torch.bfloat16"], report
    assert report["masters"] == ["torch.float32"] and report["bias_dtypes"] == ["torch.float32"], report
    assert report["loss"] == report["loss"] and report["moved"], report
