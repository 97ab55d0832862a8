"""`dsv3 launch slurm` against a real SLURM cluster on this machine (tests/slurm/cluster.sh):
a 2-rank CPU job, its preemption and requeue, and a job across two nodes (network namespaces)."""

from __future__ import annotations

import json
import subprocess

import pytest

from launch.slurm import job_info, wait
from tests.slurm.jobs import CPU_JOB, TWO_NODE_PARTITION, launch, partitions, rank_log, rendezvous_lines, \
    unavailable, wait_for_step
from tests.support import rows

pytestmark = pytest.mark.slurm

STEPS = 20
LOSS_KEYS = ("loss", "lm_loss", "mtp_loss", "val_loss", "grad_norm")


def assert_same_losses(a: list[dict], b: list[dict], tol: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in LOSS_KEYS:
            if x[key] is None:
                assert y[key] is None, (x["step"], key)
            else:
                assert abs(x[key] - y[key]) <= tol, (x["step"], key, x[key], y[key])


@pytest.fixture(scope="module")
def one_node_job(slurm_env, slurm_data, tmp_path_factory) -> dict:
    """A 2-task CPU job on one node, submitted with --wait: the reference run for the other tests."""
    run = tmp_path_factory.mktemp("slurm_one_node") / "run"
    job = launch(slurm_env, *slurm_data, *CPU_JOB, f"train.run_dir={run}", "--wait")
    job["run"] = run
    return job


def test_two_rank_cpu_job_trains_and_checkpoints(one_node_job):
    job, run = one_node_job, one_node_job["run"]
    assert job["state"] == "COMPLETED", rank_log(job, 0)[-3000:]
    assert job["restarts"] == "0" and job["tasks_per_node"] == 2
    # rendezvous from SLURM's variables: two ranks of one world, rank 0's host is MASTER_ADDR
    ranks = rendezvous_lines(job, 2)
    assert [r["rank"] for r in ranks] == ["0", "1"] and {r["world"] for r in ranks} == {"2"}
    assert ranks[0]["host"] == ranks[1]["host"] == ranks[0]["master"]
    assert int(ranks[0]["port"]) == 10000 + int(job["job_id"]) % 20000
    # rank 0 wrote every step once, with an eval row at step 0; the last step has a complete checkpoint
    table = rows(run)
    assert [r["step"] for r in table] == list(range(STEPS + 1))
    assert all(r["loss"] is not None for r in table[1:])
    final = run / "checkpoints" / f"step_{STEPS:08d}"
    assert (final / "dsv3_meta.json").is_file()
    assert json.loads((final / "dsv3_meta.json").read_text())["step"] == STEPS
    assert "Job completed successfully" in rank_log(job, 0, "out")  # submitit logs to stdout


def test_preempted_job_requeues_and_resumes(slurm_env, slurm_data, one_node_job, tmp_path):
    """scancel --signal=USR2 mid-run: every rank saves at the same step, submitit requeues the job,
    which resumes from that checkpoint (same W&B run) and ends like the run that was never stopped."""
    run = tmp_path / "run"
    job = launch(slurm_env, *slurm_data, *CPU_JOB, f"train.run_dir={run}", "logging.wandb=offline")
    wait_for_step(run, 4)
    wandb_id = (run / "wandb_id.txt").read_text().strip()
    subprocess.run(["scancel", "--signal=USR2", job["job_id"]], check=True, timeout=30)
    final = wait(job["job_id"], timeout_s=420)
    log = rank_log(job, 0)
    assert final["JobState"] == "COMPLETED", log[-3000:]
    assert final["Restarts"] == "1", "the job must have been requeued once"

    # the save at the signal and the resume from exactly that step
    saved = [line for line in log.splitlines() if line.startswith("SIGUSR2: saved a checkpoint at step")]
    assert len(saved) == 1, log[-3000:]
    stop_step = int(saved[0].split("step ")[1].split(",")[0])
    assert 4 <= stop_step < STEPS, f"the signal must land mid-run (stopped at {stop_step})"
    assert f"resumed from {run / 'checkpoints' / f'step_{stop_step:08d}'} at step {stop_step}" in log
    assert "requeueing through submitit" in log

    # each step ran once (a restart from scratch would log step 0 and the early steps again), and the
    # losses are those of the uninterrupted run: the resume is exact
    table = rows(run)
    assert [r["step"] for r in table] == list(range(STEPS + 1))
    assert_same_losses(rows(one_node_job["run"]), table, tol=0.0)
    assert (run / "checkpoints" / f"step_{STEPS:08d}" / "dsv3_meta.json").is_file()

    # the same W&B run before and after the requeue: one id, every offline run directory under it
    assert (run / "wandb_id.txt").read_text().strip() == wandb_id
    offline = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(wandb_id) for name in offline), offline


def test_two_nodes_rendezvous_and_match_one_node(slurm_env, slurm_data, one_node_job, tmp_path):
    """nodes=2 on two slurmds in separate network namespaces (cluster.sh): MASTER_ADDR from the
    node list, gloo over each namespace's eth0, the same losses as one node with 2 ranks."""
    if TWO_NODE_PARTITION not in partitions(slurm_env):
        unavailable(f"no '{TWO_NODE_PARTITION}' partition: cluster.sh could not create network namespaces here")
    run = tmp_path / "run"
    job = launch(slurm_env, *slurm_data, f"train.run_dir={run}", "launch.nodes=2", "launch.tasks_per_node=1",
                 "launch.gpus_per_node=0", "launch.cpus_per_task=1", "launch.time_min=10",
                 f"launch.partition={TWO_NODE_PARTITION}", "launch.env.GLOO_SOCKET_IFNAME=eth0", "--wait")
    assert job["state"] == "COMPLETED", rank_log(job, 0)[-3000:] + rank_log(job, 1)[-3000:]
    ranks = rendezvous_lines(job, 2)
    assert [r["host"] for r in ranks] == ["dsv3n1", "dsv3n2"], "one rank on each node"
    assert ranks[0]["master"] == ranks[1]["master"] == "dsv3n1"
    assert {r["local"] for r in ranks} == {"0"} and {r["world"] for r in ranks} == {"2"}
    assert_same_losses(rows(one_node_job["run"]), rows(run), tol=1e-5)
    info = job_info(job["job_id"])
    assert info.get("NodeList") == "dsv3n[1-2]" and info.get("NumNodes") == "2"
