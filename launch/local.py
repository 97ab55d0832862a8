"""`dsv3 launch local CONFIG --nproc N [overrides]`: torchrun on this machine.

It runs `python -m torch.distributed.run --standalone --nproc_per_node N -m train.cli train
CONFIG [overrides]` and returns its exit status. torchrun sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT for every process, which parallel/engine.py reads.
"""

from __future__ import annotations

import os
import subprocess
import sys

from model import ConfigError


def torchrun_command(config: str, nproc: int, overrides: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "train.cli", "train", str(config), *overrides,
    ]


def on_cpu(device: str) -> bool:
    """Whether the ranks will train on CPU (train.device, with auto resolved here)."""
    if device == "cpu":
        return True
    if device == "cuda":
        return False
    import torch

    return not torch.cuda.is_available()


def launch_local(config: str, nproc: int, overrides: list[str], log=print) -> int:
    """Run the training under torchrun and return its exit status (checks the config first)."""
    from parallel.fp8 import check_fp8_config
    from train.config import load_config

    if nproc <= 0:
        raise ConfigError("--nproc", nproc, "must be a positive integer")
    cfg = load_config(config, overrides)  # a bad key fails here, once, not in N ranks
    cfg.batch_layout(nproc)
    check_fp8_config(cfg)
    env = dict(os.environ)
    if on_cpu(cfg.train.device) and "OMP_NUM_THREADS" not in env:
        # N processes each using every core would thrash; torchrun would set 1 too, with a warning
        env["OMP_NUM_THREADS"] = "1"
    cmd = torchrun_command(config, nproc, overrides)
    log(" ".join(cmd))
    return subprocess.call(cmd, env=env)
