"""A corrupt training shard is skipped with a warning naming it and counted in metrics; training completes."""

from __future__ import annotations

import json
import random
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.support import REPO, rows, run_cli
from train.config import load_config
from train.data import SAMPLE_FIELD, stream_indices


def _private_data(tiny_data: list[str], dest: Path) -> tuple[list[str], Path]:
    """The tiny overrides pointed at a copy of the prepared data, so corrupting it harms no other test."""
    src = next(o.split("=", 1)[1] for o in tiny_data if o.startswith("data.dir="))
    shutil.copytree(src, dest)
    return [o for o in tiny_data if not o.startswith("data.dir=")] + [f"data.dir={dest}"], dest


def _drawn(overrides: list[str], data_dir: Path, position: int = 0) -> tuple[Path, int]:
    """The shard and global index of the sample training draws at `position` of its stream (0:
    the first one of rank 0; global_batch / world: the first one of rank 1)."""
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides)
    m = json.loads((data_dir / "manifest.json").read_text())
    index = stream_indices(m["train"]["samples"], cfg.train.seed, position, 1)[0]
    start = 0
    for s in m["train"]["shards"]:
        if index < start + s["nsamples"]:
            return data_dir / s["url"], index
        start += s["nsamples"]
    raise AssertionError("sample index beyond the manifest")


def _corrupt(path: Path, index: int | None, how: str) -> None:
    """Damage `path` around sample `index` (None: the middle of the file, for "garbage")."""
    raw = bytearray(path.read_bytes())
    member = None
    if index is not None:
        with tarfile.open(path) as tar:
            member = tar.getmember(f"{index:09d}.{SAMPLE_FIELD}")
    if how == "truncate":
        del raw[len(raw) // 2:]
    elif how == "garbage":  # over the sample's header and the next members; the size stays the same
        at = member.offset if member is not None else len(raw) // 2
        raw[at: at + 4096] = random.Random(0).randbytes(4096)
    else:  # "payload": one sample's token ids out of range, every header intact
        end = member.offset_data + member.size
        raw[end - 16: end] = b"\xff" * 16
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncate", "garbage", "payload"])
def test_corrupt_train_shard_is_skipped_and_counted(tiny_data, tmp_path, how):
    overrides, data_dir = _private_data(tiny_data, tmp_path / "data")
    shard, index = _drawn(overrides, data_dir)
    _corrupt(shard, index, how)
    run = tmp_path / "run"
    proc = run_cli("train", "configs/smoke.yaml", *overrides, f"train.run_dir={run}", "train.steps=6",
                   check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if str(shard) in line]
    assert len(warnings) == 1 and "warning: bad train shard" in warnings[0], proc.stderr[-3000:]
    trained = [r for r in rows(run) if r["step"] > 0]
    assert [r["step"] for r in trained] == list(range(1, 7))
    assert all(r["bad_shards"] == 1 for r in trained)
    assert all(r["loss"] is not None and r["loss"] == r["loss"] for r in trained)  # finite, not NaN


def test_a_bad_sample_read_by_another_rank_is_counted(tiny_data, tmp_path):
    """Two ranks; the corrupt sample is rank 1's first, in a shard whose headers are intact, so
    only rank 1 ever finds it. bad_shards (written by rank 0) counts it all the same."""
    overrides, data_dir = _private_data(tiny_data, tmp_path / "data")
    per_rank = load_config(REPO / "configs" / "smoke.yaml", overrides).train.global_batch_size // 2
    shard, index = _drawn(overrides, data_dir, position=per_rank)
    _corrupt(shard, index, "payload")
    run = tmp_path / "run"
    run_cli("train", "configs/smoke.yaml", *overrides, f"train.run_dir={run}", "train.steps=2", nproc=2)
    trained = [r for r in rows(run) if r["step"] > 0]
    assert [r["bad_shards"] for r in trained] == [1, 1]


def test_shards_without_a_manifest_are_counted_once_between_the_ranks(tiny_data, tmp_path):
    """data.train_shards without a manifest: each of two ranks indexes half the shards and an
    all-reduce shares the counts, so a shard that cannot be indexed is named once (by rank 1,
    which counted it), skipped by both ranks and counted in bad_shards; training completes."""
    overrides, data_dir = _private_data(tiny_data, tmp_path / "data")
    own = tmp_path / "own"
    own.mkdir()
    shards = sorted(data_dir.glob("train-*.tar"))
    assert len(shards) >= 3
    for s in [*shards, data_dir / "val-000000.tar"]:
        shutil.copy(s, own)
    _corrupt(own / shards[1].name, None, "garbage")
    run = tmp_path / "run"
    proc = run_cli("train", "configs/smoke.yaml", *overrides, f"data.dir={tmp_path / 'none'}",
                   f"data.train_shards={'::'.join(str(own / s.name) for s in shards)}",
                   f"data.val_shards={own / 'val-000000.tar'}", f"train.run_dir={run}", "train.steps=2",
                   "train.sample_tokens=0", nproc=2)
    warnings = [line for line in proc.stderr.splitlines() if shards[1].name in line]
    assert len(warnings) == 1 and "cannot be indexed" in warnings[0], proc.stderr[-3000:]
    assert [r["bad_shards"] for r in rows(run) if r["step"] > 0] == [1, 1]
