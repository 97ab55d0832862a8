"""`dsv3 bench` under torchrun with expert parallelism: one report for the job, the expert GEMMs
found in the expert-parallel shard, and each collective counted once, as communication."""

from __future__ import annotations

import json

import pytest

from tests.support import TINY, run_cli

pytestmark = pytest.mark.distributed


def test_bench_on_two_ranks_with_ep2_gives_one_report_whose_parts_fit_the_step():
    proc = run_cli("bench", "configs/smoke.yaml", *TINY, "parallel.ep=2", "--steps", "2", "--warmup", "1", "--json",
                   nproc=2)
    # every rank printed a report of its own before, with its own peak and MFU
    (line,) = proc.stdout.splitlines()
    r = json.loads(line)
    assert r["world_size"] == 2 and r["breakdown_rank"] == 0
    parts = r["breakdown_s"]
    # the shard subclasses RoutedExperts; its GEMMs used to go unscoped (0.0) and land in "other"
    assert parts["expert_gemm"] > 0 and parts["dispatch"] > 0 and parts["communication"] > 0
    # the all-to-all used to count both in dispatch and in communication: parts summed past the step
    assert sum(v for k, v in parts.items() if k != "other") <= r["profiled_step_time_s"]
    assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / (2 * r["peak_flops"]))
