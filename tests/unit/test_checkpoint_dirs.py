"""Setting aside the checkpoints past a run's starting step (train/checkpoint.py): moved, never
deleted, the latest pointer following, twice in one second included, incomplete ones too."""

from __future__ import annotations

from pathlib import Path

from train.checkpoint import META, complete_checkpoints, resolve_resume, set_aside_later


def _fake_checkpoint(run: Path, step: int) -> Path:
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / META).write_text("{}")
    return ckpt


def test_later_checkpoints_move_aside_and_latest_follows(tmp_path):
    run = tmp_path / "run"
    for step in (3, 6, 9):
        _fake_checkpoint(run, step)
    moved = set_aside_later(run, 3)
    assert moved is not None and moved[1] == ["step_00000006", "step_00000009"]
    assert [c.name for c in complete_checkpoints(run / "checkpoints")] == ["step_00000003"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert sorted(p.name for p in moved[0].iterdir()) == ["step_00000006", "step_00000009"]
    assert set_aside_later(run, 3) is None  # nothing past step 3 left


def test_two_start_overs_in_one_second_keep_both(tmp_path):
    run = tmp_path / "run"
    _fake_checkpoint(run, 5)
    first = set_aside_later(run, 0)
    _fake_checkpoint(run, 5)
    second = set_aside_later(run, 0)
    assert first and second and first[0] != second[0]
    assert (first[0] / "step_00000005").is_dir() and (second[0] / "step_00000005").is_dir()
    assert not (run / "checkpoints" / "latest").exists()  # no checkpoint left to point at


def test_checkpoints_without_their_meta_file_are_named_and_moved_aside_not_replaced(tmp_path):
    """A step directory without dsv3_meta.json (a save cut short, or damage) was skipped silently,
    and the run's next save at that step deleted it; the metrics of the run it belonged to were
    emptied by the fresh start."""
    run = tmp_path / "run"
    for step in (2, 4):
        ckpt = _fake_checkpoint(run, step)
        (ckpt / META).unlink()
        (ckpt / "weights").write_text(f"step {step}")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    said = []
    assert resolve_resume("auto", run, log=said.append) is None
    assert said == [f"checkpoint {run / 'checkpoints' / n} has no {META} (a save that did not finish, or damage): "
                    "not resumed from" for n in ("step_00000002", "step_00000004")]
    dest, names = set_aside_later(run, 0)
    assert names == ["step_00000002", "step_00000004"] and not list((run / "checkpoints").glob("step_*"))
    assert (dest / "step_00000004" / "weights").read_text() == "step 4"
    assert (dest / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (run / "metrics.jsonl").is_file()  # a copy: the run itself truncates its own
