"""prepare-data's memory: a batch of documents and a shard at a time, the token ids on disk.
Encoding the whole corpus at once (tokenizers' Encodings take ~150 bytes per token) made a 16 MB
JSONL grow the process by 806 MiB; keeping the ids in memory, encoded in batches, by 61 MiB; now
by ~13 MiB (a 1 GB one, with a given tokenizer, by ~40 MiB)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

from tests.support import REPO

MB = 2**20
WORDS = ("thou art the sun and moon of my heart thee how shall we see her love night day sweet sorrow "
         "parting fair foul hover through fog filthy air king crown").split()

PEAK = """
import resource, sys
from train.config import load_config
from train.data import prepare_data
cfg = load_config("configs/smoke.yaml", sys.argv[1:])
prepare_data(cfg, log=lambda s: None)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
"""


def _corpus(path, size: int) -> int:
    rng = random.Random(0)
    written = 0
    with path.open("w") as f:
        while written < size:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(200, 2000)))
            f.write(json.dumps({"text": text}) + "\n")
            written += len(text)
    return written


def _peak_rss(tmp_path, name: str, size: int, *overrides: str) -> tuple[int, int]:
    corpus = tmp_path / f"{name}.jsonl"
    chars = _corpus(corpus, size)
    out = subprocess.run(
        [sys.executable, "-c", PEAK, f"data.dir={tmp_path / name}", "model.vocab_size=320", "data.seq_len=64",
         "data.val_documents=1", "data.samples_per_shard=4096",
         "data.sources=[{kind: jsonl, path: '%s'}]" % corpus, *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.split()[-1]), chars


def test_prepare_data_memory_grows_with_the_text_not_the_encodings(tmp_path):
    base, _ = _peak_rss(tmp_path, "small", 50_000)  # the interpreter, torch and tokenizers
    peak, chars = _peak_rss(tmp_path, "large", 16 * MB)
    grown = peak - base
    print(f"{chars / MB:.1f} MB of text: peak RSS {peak / MB:.0f} MiB, {grown / MB:.0f} MiB over a 50 KB corpus")
    assert grown < 2 * chars, f"{grown / MB:.0f} MiB for {chars / MB:.1f} MB of text"
    # with a given tokenizer (no BPE counts) the peak hardly moves: a batch of documents and a shard
    tok = f"data.tokenizer={tmp_path / 'small' / 'tokenizer.json'}"
    peak, chars = _peak_rss(tmp_path, "given", 16 * MB, tok)
    print(f"with a given tokenizer: peak RSS {peak / MB:.0f} MiB, {(peak - base) / MB:.0f} MiB over")
    assert peak - base < 2 * chars, f"{(peak - base) / MB:.0f} MiB for {chars / MB:.1f} MB of text"
