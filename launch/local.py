"""`dsv3 launch local CONFIG --nproc N [overrides]`: torchrun on this machine.

It runs `python -m torch.distributed.run --standalone --nproc_per_node N -m train.cli train
CONFIG [overrides]` and returns its exit status. torchrun sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT for every process, which parallel/engine.py reads.

Stopping (`run_until_stopped`): torchrun and the ranks run in a session of their own, so Ctrl-C,
SIGTERM or a hangup reaches this process only, which passes one stop to torchrun; torchrun passes
it to the ranks, which save a checkpoint at the next step and exit (dsv3 train's graceful stop),
and this waits for them. torchrun kills ranks that have not exited after its shutdown timeout:
parallel.timeout_s here (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, unless set; torchrun's own default is
30 s, short for a large save). A second Ctrl-C kills them at once.
"""

from __future__ import annotations

import os
import signal
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
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(cfg.parallel.timeout_s))
    cmd = torchrun_command(config, nproc, overrides)
    log(" ".join(cmd))
    return run_until_stopped(cmd, env, log)


def run_until_stopped(cmd: list[str], env: dict, log=print) -> int:
    """Run cmd (torchrun) in a new session and return its exit status (128 + the signal when a
    stop ended it), passing the first Ctrl-C, SIGTERM or hangup on to it as one SIGINT or
    SIGTERM, and killing its whole session on a second. (Left to the terminal, Ctrl-C would
    reach torchrun and every rank at once; and dying here would leave them running, unwatched.)"""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    stops = []

    def on_signal(sig, frame):
        stops.append(sig)
        if len(stops) == 1:
            log(f"{signal.Signals(sig).name}: the ranks stop at the next step and save a checkpoint; "
                "waiting for them (Ctrl-C again kills them now)")
            proc.send_signal(signal.SIGINT if sig == signal.SIGINT else signal.SIGTERM)
        else:
            log("killing torchrun and the ranks")
            os.killpg(proc.pid, signal.SIGKILL)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        status = proc.wait()
        # torchrun ends non-zero, with a traceback, once it has passed a signal on, even when every
        # rank saved and exited 0; the shell's convention for "stopped by signal N" says what happened
        return 128 + stops[0] if stops and status != 0 else status
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
