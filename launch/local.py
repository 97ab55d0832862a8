"""`dsv3 launch local CONFIG --nproc N [overrides]`: torchrun on this machine.

It runs `python -m torch.distributed.run --standalone --nproc_per_node N -m train.cli train
CONFIG [overrides]` and returns its exit status. torchrun sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT for every process, which parallel/engine.py reads.

Stopping (`run_until_stopped`): torchrun and the ranks run in a session of their own, so Ctrl-C,
SIGTERM or a hangup reaches this process only, which passes one stop to the ranks, torchrun's
children; they save a checkpoint at the next step and exit 0 (dsv3 train's graceful stop), torchrun
sees them finish, and this waits for it. Before the ranks have started, the stop goes to torchrun,
which passes it on and ends with a traceback; it then kills ranks that have not exited after its
shutdown timeout: parallel.timeout_s here (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, unless set; torchrun's
own default is 30 s, short for a large save). A second Ctrl-C kills them all at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

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
    """Run cmd (torchrun) in a new session and return its exit status, 128 + the signal when a stop
    ended it. The first Ctrl-C, SIGTERM or hangup goes on to the ranks as one SIGINT or SIGTERM; a
    second kills the whole session. (Left to the terminal, Ctrl-C would reach torchrun and every
    rank at once; and dying here would leave them running, unwatched.)"""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    stops = []

    def on_signal(sig, frame):
        stops.append(sig)
        if len(stops) == 1:
            log(f"{signal.Signals(sig).name}: the ranks stop at the next step and save a checkpoint; "
                "waiting for them (Ctrl-C again kills them now)")
            stop = signal.SIGINT if sig == signal.SIGINT else signal.SIGTERM
            # to the ranks themselves: torchrun, signalled, ends non-zero with a traceback even
            # when every rank saved and exited 0; it only has to see them finish
            for pid in children(proc.pid) or [proc.pid]:
                try:
                    os.kill(pid, stop)
                except ProcessLookupError:
                    pass  # exited meanwhile
        else:
            log("killing torchrun and the ranks")
            os.killpg(proc.pid, signal.SIGKILL)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        status = proc.wait()
        return 128 + stops[0] if stops else status  # the shell's "stopped by signal N"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def children(pid: int) -> list[int]:
    """The processes whose parent is pid, from /proc (Linux); [] where there is none."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except (OSError, IndexError):
            continue  # gone meanwhile, or not a process
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
