"""Session fixtures: a small real-text corpus, prepared into shards once for every test that trains."""

import os
from pathlib import Path

import pytest

from tests.support import TINY, plays_dir, run_cli

# Tests run on 2 cores; several processes each taking every core thrash.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Six short documents cut from real plays (40 KB each): real text, fast to tokenise."""
    out = tmp_path_factory.mktemp("corpus")
    plays = sorted(plays_dir().rglob("*.md"))[:6]
    for i, play in enumerate(plays):
        (out / f"doc{i}.txt").write_text(play.read_text(errors="replace")[:40_000])
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, corpus_dir) -> list[str]:
    """Overrides for a tiny run on prepared shards (prepared once)."""
    data = tmp_path_factory.mktemp("data")
    overrides = TINY + [f"data.dir={data}", "data.sources=[{kind: txt, path: '%s'}]" % corpus_dir]
    run_cli("prepare-data", "configs/smoke.yaml", *overrides)
    return overrides


