"""The SLURM tests run against a real cluster on this machine: `sudo tests/slurm/cluster.sh start`
(.ci/run does it). Without a running controller they skip, saying so; DSV3_REQUIRE_SLURM=1 (set
by .ci/run) turns that skip into a failure, so CI cannot pass by skipping them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.slurm.jobs import unavailable

CLUSTER_DIR = Path(os.environ.get("DSV3_SLURM_DIR", "/tmp/dsv3-slurm"))


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    """Extra environment for commands that talk to the test cluster (SLURM_CONF). Also set in this
    process, for launch.slurm.wait and job_info."""
    if shutil.which("sbatch") is None:
        unavailable("SLURM is not installed (no sbatch on PATH): apt-get install slurm-wlm munge, "
                    "then sudo tests/slurm/cluster.sh start")
    conf = os.environ.get("SLURM_CONF")
    if not conf and (CLUSTER_DIR / "slurm.conf").is_file():
        conf = str(CLUSTER_DIR / "slurm.conf")
    extra = {"SLURM_CONF": conf} if conf else {}
    try:
        ping = subprocess.run(["scontrol", "ping"], env={**os.environ, **extra}, capture_output=True, text=True,
                              timeout=30)
        up = ping.returncode == 0 and "UP" in ping.stdout
    except subprocess.TimeoutExpired:
        up = False
    if not up:
        unavailable("no SLURM controller answers `scontrol ping`: start the test cluster with "
                    "sudo tests/slurm/cluster.sh start")
    os.environ.update(extra)
    return extra


@pytest.fixture(scope="session")
def slurm_data(tiny_data) -> list[str]:
    """The tiny run config (shards prepared once) at 20 steps: tens of steps, seconds of training."""
    return [*tiny_data, "train.steps=20", "checkpoint.interval=10", "train.eval_interval=5"]
