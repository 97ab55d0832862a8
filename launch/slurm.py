"""`dsv3 launch slurm CONFIG [overrides]`: submit training to SLURM through submitit.

What gets submitted: one sbatch job of `launch.nodes` nodes with one task per GPU
(`launch.gpus_per_node`; a CPU job sets gpus_per_node 0 and `launch.tasks_per_node`). Each task
runs `TrainJob()` in the project's Python (submitit pickles the callable, so the project must be
importable on the compute nodes: an install shared with them). The callable turns SLURM's
variables into the torch.distributed rendezvous and calls `train.loop.train(cfg)`; no torchrun
runs inside the job:

    MASTER_ADDR = first host of SLURM_JOB_NODELIST (`scontrol show hostnames`)
    MASTER_PORT = 10000 + SLURM_JOB_ID mod 20000 (below Linux's ephemeral range; a requeued job
                  keeps its id and so its port)
    RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID, WORLD_SIZE = SLURM_NTASKS

Stopping (train/loop.py records the signal; all ranks agree at the next optimizer step, save a
checkpoint through the usual path and return):
- SIGUSR2: SLURM sends it `launch.signal_delay_s` before the time limit (submitit's sbatch
  `--signal`), and a preemption or `scancel --signal=USR2` sends it too. After the save, rank 0
  hands over to the handler submitit installed in the task: it calls `TrainJob.checkpoint()`
  (a DelayedSubmission of the same job with `train.resume=auto`), writes it where the requeued
  job will read it, and runs `scontrol requeue`. The requeued job (same id) resumes from that
  checkpoint and keeps the W&B run (the id persists in RUN_DIR/wandb_id.txt).
- SIGTERM (`scancel`, or a kill outside SLURM): save and exit 0, no requeue. SLURM sends SIGKILL
  KillWait seconds (a cluster setting, often 30) after SIGTERM: the save must fit in it.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import submitit

from model import ConfigError
from parallel.fp8 import check_fp8_config
from train.config import Config

PORT_BASE, PORT_SPAN = 10000, 20000


class LaunchError(RuntimeError):
    """Launching is impossible here (no SLURM, sbatch refused); the message says why, in one line."""


def require_slurm() -> None:
    missing = [tool for tool in ("sbatch", "srun", "scontrol") if shutil.which(tool) is None]
    if missing:
        raise LaunchError(
            f"SLURM not found ({', '.join(missing)} not on PATH); on one machine use "
            "`dsv3 launch local CONFIG --nproc N` instead"
        )


def tasks_per_node(cfg: Config) -> int:
    """Ranks per node: one per GPU; on CPU (gpus_per_node 0) launch.tasks_per_node."""
    lc = cfg.launch
    if lc.gpus_per_node > 0:
        if lc.tasks_per_node not in (None, lc.gpus_per_node):
            raise ConfigError("launch.tasks_per_node", lc.tasks_per_node,
                              f"one task per GPU: leave it null or set it to launch.gpus_per_node={lc.gpus_per_node}")
        return lc.gpus_per_node
    if lc.tasks_per_node is None or lc.tasks_per_node <= 0:
        raise ConfigError("launch.tasks_per_node", lc.tasks_per_node,
                          "a positive integer when launch.gpus_per_node is 0 (a CPU job)")
    return lc.tasks_per_node


def world_size(cfg: Config) -> int:
    return cfg.launch.nodes * tasks_per_node(cfg)


def check_launch(cfg: Config) -> None:
    """The launch section's own checks, that the global batch splits over the job's ranks, and the
    FP8 settings."""
    lc = cfg.launch
    for key in ("nodes", "cpus_per_task", "time_min"):
        if getattr(lc, key) <= 0:
            raise ConfigError(f"launch.{key}", getattr(lc, key), "must be a positive integer")
    if lc.gpus_per_node < 0:
        raise ConfigError("launch.gpus_per_node", lc.gpus_per_node, "must be >= 0")
    if lc.signal_delay_s < 0 or lc.max_timeouts < 0:
        raise ConfigError("launch.signal_delay_s/max_timeouts", None, "must be >= 0")
    for flag in lc.extra_sbatch:
        if not flag.startswith("--"):
            raise ConfigError("launch.extra_sbatch", flag, "long sbatch flags, e.g. --reservation=NAME")
    cfg.batch_layout(world_size(cfg))
    check_fp8_config(cfg)  # what the job would refuse at startup, refused before it waits in a queue


# ---------------------------------------------------------------------------------- in the job


def first_host(nodelist: str) -> str:
    """The first hostname of a SLURM node list (e.g. gpu[003-010,017] -> gpu003), via scontrol."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    if not out:
        raise RuntimeError(f"scontrol show hostnames {nodelist!r} printed nothing")
    return out[0]


def rendezvous_env(environ: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed's variables from a SLURM task's environment (see the module docstring)."""
    job_id = int(environ["SLURM_JOB_ID"])
    return {
        "MASTER_ADDR": first_host(environ["SLURM_JOB_NODELIST"]),
        "MASTER_PORT": str(PORT_BASE + job_id % PORT_SPAN),
        "RANK": environ["SLURM_PROCID"],
        "LOCAL_RANK": environ["SLURM_LOCALID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
    }


class TrainJob(submitit.helpers.Checkpointable):
    """What every SLURM task runs: rendezvous from SLURM's variables, then `train.loop.train(cfg)`."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def __call__(self) -> dict:
        from train.loop import train

        rendezvous = rendezvous_env(os.environ)
        os.environ.update(rendezvous)
        os.environ.update(self.cfg.launch.env)
        node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
        print(f"rank {rendezvous['RANK']}/{rendezvous['WORLD_SIZE']} (local {rendezvous['LOCAL_RANK']}) on {node}: "
              f"MASTER_ADDR={rendezvous['MASTER_ADDR']} MASTER_PORT={rendezvous['MASTER_PORT']}", file=sys.stderr,
              flush=True)
        if "OMP_NUM_THREADS" not in os.environ and "SLURM_CPUS_PER_TASK" in os.environ:
            os.environ["OMP_NUM_THREADS"] = os.environ["SLURM_CPUS_PER_TASK"]
        # submitit's handler (checkpoint + requeue on rank 0); the loop puts its own in place while
        # it trains and restores this one when it returns
        requeue = signal.getsignal(signal.SIGUSR2)
        result = train(self.cfg)
        summary = {"step": result.step, "val_loss": result.val_loss, "val_step": result.val_step,
                   "stopped_by": result.stopped_by}
        if result.stopped_by == "SIGUSR2" and result.step < self.cfg.train.steps and callable(requeue):
            # Every rank has saved at result.step. On rank 0 submitit now calls checkpoint(), stores
            # the DelayedSubmission for the requeued job, runs `scontrol requeue` and exits; on the
            # other ranks it does nothing and they return.
            print(f"SIGUSR2: checkpoint at step {result.step} saved; requeueing through submitit",
                  file=sys.stderr, flush=True)
            requeue(signal.SIGUSR2, None)
        return summary

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """submitit calls this on preemption/timeout: the same job, resuming from RUN_DIR's newest
        checkpoint (also when the first run started from train.resume=PATH)."""
        cfg = copy.deepcopy(self.cfg)
        cfg.train.resume = "auto"
        return submitit.helpers.DelayedSubmission(TrainJob(cfg))


# --------------------------------------------------------------------------------- submitting


@dataclass
class Submission:
    job_id: str
    stdout: Path  # rank 0's logs; rank r writes JOBID_r_log.out / .err beside them
    stderr: Path
    log_dir: Path
    run_dir: Path
    nodes: int
    tasks_per_node: int
    wandb: str  # the run link, or what to do to get one

    def lines(self) -> list[str]:
        return [
            f"submitted SLURM job {self.job_id}: {self.nodes} node(s) x {self.tasks_per_node} task(s)"
            f" = {self.nodes * self.tasks_per_node} ranks, run dir {self.run_dir}",
            f"  logs (rank 0): {self.stdout}",
            f"                 {self.stderr}",
            f"  logs (rank r): {self.log_dir}/{self.job_id}_<r>_log.out|err",
            f"  W&B: {self.wandb}",
            f"  stop: scancel {self.job_id} (saves a checkpoint, exits);"
            f" scancel --signal=USR2 {self.job_id} (saves, requeues, resumes)",
        ]

    def to_dict(self) -> dict:
        return {
            "job_id": self.job_id, "stdout": str(self.stdout), "stderr": str(self.stderr),
            "log_dir": str(self.log_dir), "run_dir": str(self.run_dir), "nodes": self.nodes,
            "tasks_per_node": self.tasks_per_node, "wandb": self.wandb,
        }


def sbatch_parameters(cfg: Config) -> dict:
    """submitit SlurmExecutor parameters from the launch section."""
    lc = cfg.launch
    params: dict = {
        "job_name": lc.job_name,
        "time": lc.time_min,
        "nodes": lc.nodes,
        "ntasks_per_node": tasks_per_node(cfg),
        "cpus_per_task": lc.cpus_per_task,
        "signal_delay_s": lc.signal_delay_s,
    }
    if lc.gpus_per_node > 0:
        params["gpus_per_node"] = lc.gpus_per_node
    optional = {"partition": lc.partition, "account": lc.account, "qos": lc.qos, "constraint": lc.constraint}
    params.update({k: v for k, v in optional.items() if v})
    if lc.mem_gb is not None:
        params["mem"] = f"{lc.mem_gb}GB"
    if lc.exclusive:
        params["exclusive"] = True
    if lc.setup:
        params["setup"] = list(lc.setup)
    extra = {}
    for flag in lc.extra_sbatch:  # "--key=value" or "--switch"
        key, sep, value = flag[2:].partition("=")
        extra[key] = value if sep else True
    if extra:
        params["additional_parameters"] = extra
    return params


def wandb_line(cfg: Config, run_dir: Path) -> str:
    mode = cfg.logging.wandb
    if mode == "disabled":
        return "disabled (logging.wandb)"
    if mode == "offline":
        return f"offline; upload with: wandb sync {run_dir}/wandb/offline-run-*"
    # online: the job reuses RUN_DIR/wandb_id.txt when it resumes a checkpoint, else makes a new id
    from train import checkpoint as ckpt_io

    id_file = run_dir / "wandb_id.txt"
    continuing = cfg.train.resume != "never" and ckpt_io.complete_checkpoints(run_dir / "checkpoints")
    if continuing and id_file.is_file() and id_file.read_text().strip():
        entity = os.environ.get("WANDB_ENTITY", "<entity>")
        return f"https://wandb.ai/{entity}/{cfg.logging.project}/runs/{id_file.read_text().strip()}"
    return (f"online, project {cfg.logging.project}; a new run: its id goes to {id_file} when the job "
            "starts (`--wait` prints the link)")


def submit(cfg: Config) -> Submission:
    """Submit the training job; returns where to find it. Raises LaunchError, ConfigError."""
    require_slurm()
    check_launch(cfg)
    run_dir = Path(cfg.train.run_dir).absolute()
    log_dir = Path(cfg.launch.log_dir).absolute() if cfg.launch.log_dir else run_dir / "slurm"
    cfg = copy.deepcopy(cfg)
    # the job may start in another directory: pin every relative path to this one
    cfg.train.run_dir = str(run_dir)
    cfg.data.dir = str(Path(cfg.data.dir).absolute())
    if cfg.train.resume not in ("auto", "never"):
        cfg.train.resume = str(Path(cfg.train.resume).absolute())
    executor = submitit.SlurmExecutor(folder=log_dir, max_num_timeout=cfg.launch.max_timeouts)
    executor.update_parameters(**sbatch_parameters(cfg))
    try:
        job = executor.submit(TrainJob(cfg))
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as err:
        raise LaunchError(f"sbatch refused the job: {' '.join(str(err).split())}") from None
    return Submission(
        job_id=str(job.job_id), stdout=job.paths.stdout, stderr=job.paths.stderr, log_dir=log_dir,
        run_dir=run_dir, nodes=cfg.launch.nodes, tasks_per_node=tasks_per_node(cfg),
        wandb=wandb_line(cfg, run_dir),
    )


# ------------------------------------------------------------------------------------ watching


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once SLURM forgot the job."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def wait(job_id: str, poll_s: float = 2.0, timeout_s: float | None = None) -> dict[str, str]:
    """Block until the job reaches a final state (a requeue passes through PENDING and goes on)."""
    start = time.monotonic()
    info: dict[str, str] = {}
    while timeout_s is None or time.monotonic() - start < timeout_s:
        current = job_info(job_id)
        if not current:  # past MinJobAge: SLURM no longer shows it; the last state seen stands
            return info or {"JobState": "UNKNOWN"}
        info = current
        if info.get("JobState") in FINAL_STATES:
            return info
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout_s} s")
