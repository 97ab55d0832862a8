"""Fault handling on the real training path: crashes at random moments (SIGKILL, also during a
checkpoint save), NaN gradients, a damaged checkpoint, a full disk while saving, a lost rank."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.support import REPO, rows, run_cli

STEPS = 10


def _train_cmd(tiny_data, run, *extra) -> list[str]:
    return [sys.executable, "-m", "train.cli", "train", "configs/smoke.yaml", *tiny_data, f"train.run_dir={run}",
            f"train.steps={STEPS}", "checkpoint.interval=1", "checkpoint.keep=2", "train.eval_interval=5", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight")
    subprocess.run(_train_cmd(tiny_data, run), cwd=REPO, env=_env(), check=True, capture_output=True)
    return run


def rows_safe(run) -> list[dict]:
    """metrics.jsonl rows, tolerating a line being written right now."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


def _final(run) -> dict:
    return {r["step"]: (r["loss"], r["val_loss"]) for r in rows(run) if r["step"] == STEPS}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_random_moments_then_resume_gives_the_same_run(tiny_data, straight, tmp_path, seed):
    """Kill -9 at a random time (checkpoints are saved every step, so kills land inside saves
    too), resume with train.resume=auto until done: the final loss equals the uninterrupted run's,
    and every resume starts from a checkpoint that passes verification."""
    from train.checkpoint import resolve_resume, verify

    rng = random.Random(seed)
    run = tmp_path / "killed"
    kills, expected = 0, None
    for attempt in range(6):
        proc = subprocess.Popen(_train_cmd(tiny_data, run), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if attempt < 2:
            # wait until a random step has been logged, then a random fraction of a step (a step
            # and its checkpoint save take ~0.2 s here), so kills land in steps and in saves
            target = rng.randint(2, STEPS - 2)
            while proc.poll() is None and not (
                    (run / "metrics.jsonl").exists() and rows_safe(run) and rows_safe(run)[-1]["step"] >= target):
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        _, err = proc.communicate(timeout=300)
        if expected is not None and (proc.returncode == 0 or "resumed from" in err):
            # this run got far enough to resume: from exactly what was verified on disk after the kill
            assert f"resumed from {expected} at step" in err, err[-2000:]
        if proc.returncode == 0 and _final(run):
            break
        # what the next run must pick: the newest complete checkpoint, and it must verify
        expected = resolve_resume("auto", run)
        assert expected is not None and verify(expected) is None
        leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".partial")]
        assert all(not (run / "checkpoints" / n / "dsv3_meta.json").exists() for n in leftovers)
    assert kills >= 1
    assert _final(run) == _final(straight)
    steps = [r["step"] for r in rows(run)]
    assert steps == sorted(set(steps)), "after a resume no step is logged twice"


def test_nan_gradients_skip_one_step_and_training_continues(tiny_data, straight, tmp_path):
    """Stopped at step 6 and resumed: the skipped-step count carries over in the checkpoint."""
    run = tmp_path / "nan"
    env = {**_env(), "DSV3_FAULT_NAN_STEP": "4"}
    proc = subprocess.run(_train_cmd(tiny_data, run, "train.steps=6"), cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 4: non-finite loss or gradient norm, optimizer step skipped" in proc.stderr
    assert max(r["step"] for r in rows(run)) == 6
    proc = subprocess.run(_train_cmd(tiny_data, run), cwd=REPO, env=env, capture_output=True, text=True)
    assert "resumed from" in proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {r["step"]: r for r in rows(run)}
    assert table[3]["skipped_steps"] == 0 and table[4]["skipped_steps"] == 1 and table[STEPS]["skipped_steps"] == 1
    assert table[4]["grad_norm"] is None  # the injected NaN reached the gradients; NaN is written as null
    assert all(table[s]["loss"] is not None for s in range(5, STEPS + 1))
    # the skipped step changed nothing: step 5 trains on the weights step 3 left
    assert table[STEPS]["loss"] != _final(straight)[STEPS][0]


def test_consecutive_nan_steps_halt_with_a_report(tiny_data, tmp_path):
    from tests.unit.test_metrics import offline_run_files, read_finished_run

    run = tmp_path / "halt"
    proc = subprocess.run(_train_cmd(tiny_data, run, "train.max_bad_steps=1", "logging.wandb=offline"), cwd=REPO,
                          env={**_env(), "DSV3_FAULT_NAN_STEP": "3"}, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "halting at step 3" in proc.stderr and "step_00000002" in proc.stderr
    assert "Traceback" not in proc.stderr
    # W&B shows the run failed: it used to be left unfinished, and recorded with exit code 0
    (wandb_file,) = offline_run_files(run)
    (exit_record,) = [r for r in read_finished_run(wandb_file) if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit.exit_code == 1


def test_damaged_newest_checkpoint_is_skipped_on_resume(tiny_data, straight, tmp_path):
    import shutil

    run = tmp_path / "damaged"
    shutil.copytree(straight, run)
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    newest = ckpts[-1]
    with open(newest / "model-dense-part0-of-1.safetensors", "r+b") as f:  # flip bytes in the middle
        f.seek(200)
        f.write(b"\xff" * 16)
    proc = run_cli("train", "configs/smoke.yaml", *tiny_data, f"train.run_dir={run}", f"train.steps={STEPS + 1}",
                   "checkpoint.interval=1", "train.eval_interval=5")
    assert f"checkpoint {newest} fails verification" in proc.stderr
    assert f"resumed from {ckpts[-2]}" in proc.stderr
    # the damaged one is set aside (kept for inspection), not left to outrank this run's saves
    (aside,) = run.glob("checkpoints-superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", newest.name]


def test_file_size_limit_during_save_leaves_the_previous_checkpoint(tiny_data, tmp_path):
    """RLIMIT_FSIZE below a checkpoint file's size: the save fails, the run stops with a clear
    message, the previous checkpoint still verifies, and a later resume uses it."""
    from train.checkpoint import complete_checkpoints, verify

    run = tmp_path / "full"
    run_cli("train", "configs/smoke.yaml", *tiny_data, f"train.run_dir={run}", "train.steps=3",
            "checkpoint.interval=3", "train.eval_interval=3")
    biggest = max(f.stat().st_size for f in (run / "checkpoints" / "step_00000003").iterdir())

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (biggest // 2, biggest // 2))

    proc = subprocess.run(_train_cmd(tiny_data, run, "train.steps=6", "checkpoint.interval=3"), cwd=REPO,
                          env=_env(), capture_output=True, text=True, preexec_fn=limit)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "saving the step-6 checkpoint failed" in proc.stderr
    assert "step_00000003 is intact" in proc.stderr
    assert [c.name for c in complete_checkpoints(run / "checkpoints")] == ["step_00000003"]
    assert verify(run / "checkpoints" / "step_00000003") is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killing_one_rank_makes_the_other_exit_naming_it(tiny_data, tmp_path):
    """Two ranks started by hand (as SLURM would, no torchrun to clean up); kill rank 1: rank 0
    exits non-zero within the collective timeout, saying which rank it lost."""
    run = tmp_path / "lost"
    port = _free_port()
    timeout_s = 60
    procs = []
    for rank in (0, 1):
        env = {**_env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            _train_cmd(tiny_data, run, "train.steps=200", "checkpoint.interval=100", "train.eval_interval=100",
                       f"parallel.timeout_s={timeout_s}"),
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and len(rows(run)) >= 3):
        time.sleep(0.5)
    assert len(rows(run)) >= 3, "training did not start"
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    _, err = procs[0].communicate(timeout=timeout_s + 60)
    took = time.time() - t0
    procs[1].wait()
    assert procs[0].returncode not in (0, None)
    assert took < timeout_s, took
    assert "lost rank(s) 1" in err, err[-2000:]
