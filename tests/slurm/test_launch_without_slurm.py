"""Launching without a SLURM cluster: the clear refusal, `dsv3 launch local`, and the graceful
stop on SIGTERM that SLURM's scancel relies on, checked on a plain `dsv3 train` and through
`dsv3 launch local`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from launch import local
from tests.slurm.jobs import wait_for_step
from tests.support import REPO, rows, run_cli


def test_launch_slurm_without_sbatch_exits_2_with_one_line(tmp_path):
    # PATH holds nothing: no sbatch, srun or scontrol (python is started by its absolute path)
    proc = run_cli("launch", "slurm", "configs/smoke.yaml", check=False, env={"PATH": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "SLURM not found" in proc.stderr and "sbatch" in proc.stderr and "launch local" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_launch_local_builds_torchrun_and_sets_omp_on_cpu(monkeypatch):
    seen = {}

    def run_instead(cmd, env, log):
        seen.update(cmd=cmd, env=env)
        return 0

    monkeypatch.setattr(local, "run_until_stopped", run_instead)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    overrides = ["train.device=cpu", "train.micro_batch_size=8"]
    rc = local.launch_local("configs/smoke.yaml", 2, overrides, log=lambda m: None)
    assert rc == 0
    assert seen["cmd"] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "train.cli", "train", "configs/smoke.yaml", *overrides]
    assert seen["env"]["OMP_NUM_THREADS"] == "1"
    assert seen["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "600"  # parallel.timeout_s: time to save on a stop
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a value the user set stays
    local.launch_local("configs/smoke.yaml", 2, overrides, log=lambda m: None)
    assert seen["env"]["OMP_NUM_THREADS"] == "3"


def test_launch_local_refuses_a_batch_that_does_not_split():
    # smoke.yaml: global batch 16 of micro-batches of 16 cannot spread over 3 ranks; exit 2 before torchrun
    proc = run_cli("launch", "local", "configs/smoke.yaml", "--nproc", "3", check=False)
    assert proc.returncode == 2 and "train.global_batch_size" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.distributed
def test_launch_local_trains_two_ranks(tiny_data, tmp_path):
    run = tmp_path / "run"
    # options between CONFIG and the overrides, as documented
    run_cli("launch", "local", "configs/smoke.yaml", "--nproc", "2", *tiny_data, f"train.run_dir={run}",
            "train.steps=3", "checkpoint.interval=3")
    assert [r["step"] for r in rows(run)] == [0, 1, 2, 3]
    assert (run / "checkpoints" / "step_00000003" / "dsv3_meta.json").is_file()


def _train_then_signal(run, overrides: list[str], sig, after_step: int, wait_s: float = 0.0):
    """`dsv3 train` of 2000 steps into `run`, sent `sig` once metrics.jsonl has a row at `after_step`
    (and wait_s more seconds); returns (exit status, stdout, stderr, the step it saved at)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "train.cli", "train", "configs/smoke.yaml", *overrides, f"train.run_dir={run}",
         "train.steps=2000", "checkpoint.interval=1000"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for_step(run, after_step, timeout_s=120)
        time.sleep(wait_s)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = [line for line in err.splitlines() if line.startswith("SIGTERM/SIGINT: saved a checkpoint at step")]
    assert len(saved) == 1, err[-3000:]
    return proc.returncode, out, err, int(saved[0].split("step ")[1].split(",")[0])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_saves_and_exits_0_then_resumes(tiny_data, tmp_path, sig):
    """kill -TERM (or Ctrl-C) a plain `dsv3 train`: it saves at the next step and exits 0, saying where
    it stopped and which step its latest val_loss is from, without the closing sample; a rerun
    resumes there."""
    run = tmp_path / "run"
    code, out, err, step = _train_then_signal(run, [*tiny_data, "train.sample_tokens=4"], sig, after_step=3)
    assert code == 0, err[-3000:]
    assert 3 <= step < 2000
    evals = [r for r in rows(run) if r.get("val_loss") is not None]  # train.eval_interval=3
    assert f"stopped at step {step} of 2000 (SIGTERM/SIGINT); the latest val_loss {evals[-1]['val_loss']:.4f} " \
           f"is from step {evals[-1]['step']}" in out, out
    assert "final step" not in out and "--- sample" not in out, out
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == [f"step_{step:08d}"]
    again = run_cli("train", "configs/smoke.yaml", *tiny_data, f"train.run_dir={run}", f"train.steps={step + 2}")
    assert f"resumed from {run / 'checkpoints' / f'step_{step:08d}'} at step {step}" in again.stderr
    assert [r["step"] for r in rows(run)] == list(range(step + 3))


def test_a_stop_between_logging_steps_still_logs_the_step_it_stopped_at(tiny_data, tmp_path):
    """With rows every 1000 steps, a SIGTERM at step N leaves a row for step N (it used to leave
    none: the curves in metrics.jsonl and W&B ended at the last logging step, not where the run
    stopped and saved)."""
    run = tmp_path / "run"
    # the step-0 evaluation's row says training has started; 3 s later it is some steps in
    code, _, err, step = _train_then_signal(run, [*tiny_data, "logging.interval=1000", "train.eval_interval=1000"],
                                            signal.SIGTERM, after_step=0, wait_s=3)
    assert code == 0, err[-3000:]
    logged = rows(run)
    assert 0 < step < 1000 and [r["step"] for r in logged] == [0, step], (step, logged)
    assert logged[-1]["loss"] is not None and logged[-1]["val_loss"] is None


def _processes_naming(text: str) -> list[int]:
    """Pids of the live processes whose command line contains text."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue  # gone meanwhile
    return found


def test_ctrl_c_on_launch_local_saves_and_leaves_nothing_running(tiny_data, tmp_path):
    """Ctrl-C on `dsv3 launch local --nproc 2` (SIGINT to the launcher: torchrun and the ranks run
    in a session of their own) reaches the ranks once; they save at the next step and exit, the
    launcher waits for them and exits 130. It used to die at once and SIGKILL torchrun, leaving the
    ranks training with nobody watching; then it passed the stop through torchrun, which ended
    with its own traceback after the ranks had saved."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "train.cli", "launch", "local", "configs/smoke.yaml", "--nproc", "2", *tiny_data,
         f"train.run_dir={run}", "train.steps=2000", "checkpoint.interval=1000"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        wait_for_step(run, 3, timeout_s=120)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    left = _processes_naming(f"train.run_dir={run}")
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running after the launcher returned: {left}\n{err[-3000:]}"
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    saved = [line for line in err.splitlines() if line.startswith("SIGTERM/SIGINT: saved a checkpoint at step")]
    assert len(saved) == 1, err[-3000:]
    step = int(saved[0].split("step ")[1].split(",")[0])
    assert (run / "checkpoints" / f"step_{step:08d}" / "dsv3_meta.json").is_file()
    assert "Traceback" not in err, err[-3000:]  # a stop, not a crash


def test_launch_section_becomes_sbatch_flags(tmp_path):
    """Every launch: field reaches the sbatch script submitit writes (rendered here without SLURM)."""
    from submitit.slurm.slurm import _make_sbatch_string

    from launch.slurm import sbatch_parameters
    from train.config import load_config

    cfg = load_config("configs/671b.yaml", [
        "launch.account=proj42", "launch.qos=high", "launch.constraint=h100", "launch.mem_gb=900",
        "launch.extra_sbatch=[--reservation=big,--requeue]", "launch.setup=[module load cuda]",
    ])
    script = _make_sbatch_string(command="python -m submitit.core._submit x", folder=tmp_path,
                                 **sbatch_parameters(cfg))
    for line in ("--nodes=192", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12", "--partition=gpu",
                 "--account=proj42", "--qos=high", "--constraint=h100", "--mem=900GB", "--exclusive",
                 "--time=1440", "--signal=USR2@600", "--job-name=dsv3-671b", "--reservation=big", "--requeue"):
        assert f"#SBATCH {line}\n" in script, line
    assert "module load cuda\n" in script and "srun " in script
    # a CPU job asks for no GPUs and one task per rank it is told
    cpu = load_config("configs/smoke.yaml", ["launch.gpus_per_node=0", "launch.tasks_per_node=2"])
    assert "gpus_per_node" not in sbatch_parameters(cpu) and sbatch_parameters(cpu)["ntasks_per_node"] == 2
