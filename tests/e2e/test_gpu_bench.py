"""`benchmarks/gpu_bench.py` run on CPU at a tiny size, so the script a GPU session starts with is
known to work before it gets one: the variant's and the precision's overrides must reach the model
that `dsv3 bench` times, and the report must hold each run's figures."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from tests.support import REPO, TINY as TINY_MODEL
from train.config import load_config
from train.metrics import flops_per_token


def _script():
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "benchmarks" / "gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gb = _script()
# the tests' tiny model, less the fields the 256-expert variant sets (overrides go last and would
# undo it), on CPU
_VARIANT_KEYS = {o.split("=")[0] for o in gb.VARIANTS["single_gpu-256e"]}
TINY = ["train.device=cpu", *(o for o in TINY_MODEL if o.split("=")[0] not in _VARIANT_KEYS)]
SEQ = int(next(o for o in TINY if o.startswith("data.seq_len=")).split("=")[1])


def test_fp8_auto_runs_only_where_its_backend_can():
    assert set(gb.precisions("none", "te")) == {"bf16"}
    assert set(gb.precisions("on", "te")) == {"bf16", "fp8"}
    assert set(gb.precisions("auto", "emulated")) == {"bf16", "fp8"}
    assert ("fp8" in gb.precisions("auto", "te")) == gb.te_importable()


def test_256_expert_variant_in_bf16_and_fp8_on_cpu(tmp_path):
    variant = "single_gpu-256e"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_bench.py", "--steps", "1", "--warmup", "1", "--variants", variant,
         "--fp8", "on", "--fp8-backend", "emulated", "--out", str(tmp_path), "--", *TINY],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    runs = report["variants"][variant]
    assert set(runs) == {"bf16", "fp8"}
    base_model = load_config(gb.CONFIG, TINY).model
    for precision, prec_overrides in gb.precisions("on", "emulated").items():
        r = runs[precision]
        model = load_config(gb.CONFIG, [*gb.VARIANTS[variant], *prec_overrides, *TINY]).model
        assert (model.n_routed_experts, model.num_experts_per_tok, model.precision) == (
            256, 8, "bf16" if precision == "bf16" else "fp8")
        # the bench timed that model: its FLOP count is the variant's, not the shipped config's
        assert r["flops_per_token"] == flops_per_token(model, SEQ) != flops_per_token(base_model, SEQ)
        assert r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0 and 0 < r["mfu"] < 1
        assert abs(sum(r["breakdown_fraction"].values()) - 1) < 0.05
    table = [line.split()[:2] for line in proc.stdout.splitlines() if line.startswith(variant)]
    assert table == [[variant, "bf16"], [variant, "fp8"]]
    assert "model.precision=fp8" in report["commands"][f"{variant}/fp8"]
    assert "model.precision=fp8" not in report["commands"][f"{variant}/bf16"]


def test_a_failed_run_is_reported_and_the_others_still_run(tmp_path):
    """fp8 through TE cannot start on CPU: the BF16 run before it keeps its figures, the failure is
    recorded with its reason, and the exit status says something failed."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_bench.py", "--steps", "1", "--warmup", "0", "--variants", "single_gpu",
         "--fp8", "on", "--fp8-backend", "te", "--out", str(tmp_path), "--", *TINY],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert set(report["variants"]["single_gpu"]) == {"bf16"}
    assert report["variants"]["single_gpu"]["bf16"]["tokens_per_s"] > 0
    assert set(report["failed"]) == {"single_gpu/fp8"}
    assert "fp8.backend" in report["failed"]["single_gpu/fp8"]
    assert "single_gpu       fp8       FAILED: " in proc.stdout
