"""Helpers for the SLURM tests: submit through the real CLI, read job logs, wait for progress."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import run_cli

# A 2-rank CPU job on the one-node partition: gloo, one CPU per task, a short time limit.
CPU_JOB = ["launch.gpus_per_node=0", "launch.tasks_per_node=2", "launch.cpus_per_task=1", "launch.time_min=10"]
TWO_NODE_PARTITION = "twonode"  # cluster.sh: nodes dsv3n1 and dsv3n2, each in its own network namespace


def unavailable(reason: str) -> None:
    """Skip, or fail where DSV3_REQUIRE_SLURM=1 (CI must not pass by skipping)."""
    if os.environ.get("DSV3_REQUIRE_SLURM") == "1":
        pytest.fail(f"DSV3_REQUIRE_SLURM=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def launch(env: dict, *args: str, timeout: int = 600) -> dict:
    """`dsv3 launch slurm configs/smoke.yaml ARGS --json`; returns the one JSON object it prints."""
    proc = run_cli("launch", "slurm", "configs/smoke.yaml", *args, "--json", env=env, timeout=timeout)
    return json.loads(proc.stdout)


def partitions(env: dict) -> set[str]:
    out = subprocess.run(["sinfo", "-h", "-o", "%R"], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return set(out.split())


def rank_log(job: dict, rank: int, kind: str = "err") -> str:
    path = Path(job["log_dir"]) / f"{job['job_id']}_{rank}_log.{kind}"
    return path.read_text(errors="replace") if path.is_file() else ""


def rendezvous_lines(job: dict, ranks: int) -> list[dict]:
    """The 'rank R/W (local L) on HOST: MASTER_ADDR=.. MASTER_PORT=..' line each task logs, parsed."""
    pattern = re.compile(r"rank (\d+)/(\d+) \(local (\d+)\) on (\S+): MASTER_ADDR=(\S+) MASTER_PORT=(\d+)")
    found = []
    for rank in range(ranks):
        m = pattern.search(rank_log(job, rank))
        assert m, f"rank {rank} logged no rendezvous line:\n{rank_log(job, rank)[-2000:]}"
        found.append(dict(zip(("rank", "world", "local", "host", "master", "port"), m.groups())))
    return found


def wait_for_step(run_dir: Path, step: int, timeout_s: float = 180) -> None:
    """Until metrics.jsonl has a row at `step` or later (the job is mid-run)."""
    deadline = time.monotonic() + timeout_s
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] >= step:
                        return
                except (json.JSONDecodeError, KeyError):
                    continue  # a line being written
        time.sleep(0.2)
    raise AssertionError(f"{path}: no row at step >= {step} within {timeout_s} s")
