"""Checkpoint hashing is shared between ranks (train/checkpoint.py): each writer hashes the files
it wrote into the one manifest, and on resume each rank hashes its share of the files, all ranks
agreeing on the verdict. A file only rank 1 hashes, damaged, still sends every rank back to the
previous checkpoint."""

from __future__ import annotations

import json

import pytest

from tests.support import run_cli

pytestmark = pytest.mark.distributed


def test_a_file_hashed_by_rank_1_sends_both_ranks_back(tiny_data, tmp_path):
    run = tmp_path / "run"
    common = [*tiny_data, "parallel.ep=2", "checkpoint.interval=1", "train.eval_interval=100", f"train.run_dir={run}"]
    run_cli("train", "configs/smoke.yaml", *common, "train.steps=3", nproc=2)
    newest, previous = run / "checkpoints" / "step_00000003", run / "checkpoints" / "step_00000002"
    manifest = json.loads((newest / "dsv3_meta.json").read_text())["files"]
    assert sorted(manifest) == sorted(f.name for f in newest.iterdir() if f.name != "dsv3_meta.json")
    # dense model and optimizer in 2 parts (one per rank), state, 2 expert shards of each kind
    assert len(manifest) == 9
    hashed_by_rank1 = sorted(manifest)[1::2]
    assert "optim-dense-part1-of-2.safetensors" in hashed_by_rank1
    with open(newest / "optim-dense-part1-of-2.safetensors", "r+b") as f:  # same size, other bytes
        f.seek(f.seek(0, 2) // 2)
        f.write(b"\xff" * 16)
    proc = run_cli("train", "configs/smoke.yaml", *common, "train.steps=4", nproc=2)
    assert f"checkpoint {newest} fails verification (optim-dense-part1-of-2.safetensors does not match its sha256)" in proc.stderr
    assert f"resumed from {previous} at step 2" in proc.stderr
