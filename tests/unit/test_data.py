"""The data pipeline: prepare-data outputs, loading, errors, and the data-order contract."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from tokenizers import Tokenizer

from model import ConfigError
from train import data
from train.config import Config, SourceConfig, load_config
from train.data import (
    EOD_TOKEN,
    BatchStream,
    TokenSamples,
    eval_batches,
    mix_streams,
    pack_samples,
    prepare_data,
    stream_indices,
)

ROOT = Path(__file__).resolve().parents[2]
SEQ = 16
WORDS = ("thou art the sun and moon of my heart thee how shall we see her love night day "
         "sweet sorrow parting fair foul hover through fog filthy air king crown").split()


def _text(rng: random.Random, marker: str, words: int) -> str:
    # the marker opens the document so a held-out document is recognisable in decoded text
    lines = [marker]
    for _ in range(words // 8):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(8)))
    return "\n".join(lines) + "\n"


def _txt_corpus(folder: Path, n: int = 6, words: int = 160) -> list[str]:
    """n documents; returns their texts in sorted-path order (the last one sits in a subfolder)."""
    rng = random.Random(0)
    texts = []
    for i in range(n):
        path = folder / (f"zz/d{i}.txt" if i == n - 1 else f"d{i}.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        texts.append(_text(rng, f"MARKERDOC{i}", words))
        path.write_text(texts[-1])
    (folder / "notes.md").write_text("not a txt file: ignored")
    return texts


def _cfg(data_dir: Path, sources: list[SourceConfig], *overrides: str) -> Config:
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [
        f"data.dir={data_dir}", "model.vocab_size=300", f"data.seq_len={SEQ}", "data.samples_per_shard=7",
        "data.val_documents=2", "data.tokenizer=null", "data.train_shards=null", "data.val_shards=null",
        *overrides,
    ])
    cfg.data.sources = sources
    cfg.validate()
    return cfg


def _stream_of(samples: TokenSamples) -> np.ndarray:
    """The token stream the samples were cut from (consecutive samples share one token)."""
    xs = [samples[i].numpy() for i in range(len(samples))]
    return np.concatenate([x[:-1] for x in xs] + [xs[-1][-1:]])


def _expected_stream(tok: Tokenizer, texts: list[str], eod: int) -> np.ndarray:
    return np.concatenate([np.array(tok.encode(t).ids + [eod]) for t in texts])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Config, list[str]]:
    """A txt corpus prepared once for the loading and order tests."""
    root = tmp_path_factory.mktemp("corpus")
    texts = _txt_corpus(root / "docs")
    cfg = _cfg(root / "data", [SourceConfig(kind="txt", path=str(root / "docs"))])
    prepare_data(cfg, log=lambda s: None)
    return cfg, texts


@pytest.fixture(scope="module")
def train_samples(prepared):
    with TokenSamples(prepared[0], "train") as samples:
        yield samples


# --------------------------------------------------------------------------- prepare-data


def test_prepare_txt_manifest_stream_and_held_out(prepared):
    cfg, texts = prepared
    data_dir = Path(cfg.data.dir)
    m = json.loads((data_dir / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    assert m["seq_len"] == SEQ and m["vocab_size"] == tok.get_vocab_size() <= 300
    assert m["eod_id"] == tok.token_to_id(EOD_TOKEN) and m["dtype"] == "uint16"
    assert m["tokenizer_sha256"] == hashlib.sha256((data_dir / "tokenizer.json").read_bytes()).hexdigest()
    for split, prefix in (("train", "train-"), ("val", "val-")):
        shards = m[split]["shards"]
        assert [s["url"] for s in shards] == [f"{prefix}{k:06d}.tar" for k in range(len(shards))]
        assert all(0 < s["nsamples"] <= 7 for s in shards) and all((data_dir / s["url"]).is_file() for s in shards)
        assert sum(s["nsamples"] for s in shards) == m[split]["samples"] > 0
        assert m[split]["tokens"] == m[split]["samples"] * SEQ
    assert len(m["train"]["shards"]) > 1  # several shards, so indexing crosses shard boundaries
    (src,) = m["sources"]
    assert src["kind"] == "txt" and src["documents"] == 4 and src["val_documents"] == 2
    assert src["held_out"] == m["held_out"] == ["d4.txt", "zz/d5.txt"]  # last two in sorted-path order
    assert src["tokens"] == src["mixed_tokens"]  # one source: mixing changes nothing

    # the samples are exactly the train documents' tokens, each followed by the EOD id
    eod = m["eod_id"]
    for split, docs in (("train", texts[:4]), ("val", texts[4:])):
        with TokenSamples(cfg, split) as samples:
            assert len(samples) == m[split]["samples"]
            got = _stream_of(samples)
        want = _expected_stream(tok, docs, eod)
        assert len(got) == len(samples) * SEQ + 1 and len(want) - len(got) < SEQ + 1  # only the ragged tail dropped
        assert np.array_equal(got, want[: len(got)])
        ends = np.flatnonzero(got == eod)
        assert len(ends) >= len(docs) - 1  # an EOD between every pair of consecutive documents
        text = tok.decode(got.tolist(), skip_special_tokens=False)
        for i, t in enumerate(texts):
            assert (f"MARKERDOC{i}" in text) == (t in docs)  # held-out documents never reach train


def test_shards_readable_by_plain_webdataset(prepared, train_samples):
    cfg, _ = prepared
    m = json.loads((Path(cfg.data.dir) / "manifest.json").read_text())
    urls = [str(Path(cfg.data.dir) / s["url"]) for s in m["train"]["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    try:
        rows = list(ds)
    finally:
        ds.close()
    assert len(rows) == len(train_samples)
    for i, row in enumerate(rows):
        assert row["__key__"] == f"{i:09d}"
        assert row["tokens.npy"].dtype == np.uint16
        assert np.array_equal(row["tokens.npy"].astype(np.int64), train_samples[i].numpy())


def test_idempotent_then_rebuild_on_change(tmp_path):
    _txt_corpus(tmp_path / "docs", n=4)
    cfg = _cfg(tmp_path / "data", [SourceConfig(kind="txt", path=str(tmp_path / "docs"))])
    first = prepare_data(cfg, log=lambda s: None)
    files = sorted((tmp_path / "data").iterdir())
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    logs: list[str] = []
    assert prepare_data(cfg, log=logs.append) == first
    assert "up to date" in " ".join(logs)
    assert sorted((tmp_path / "data").iterdir()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes  # nothing rewritten

    cfg.data.seq_len = 2 * SEQ
    second = prepare_data(cfg, log=lambda s: None)
    assert second["seq_len"] == 2 * SEQ and second["train"]["samples"] < first["train"]["samples"]
    on_disk = sorted(p.name for p in (tmp_path / "data").glob("*.tar"))
    listed = sorted(s["url"] for split in ("train", "val") for s in second[split]["shards"])
    assert on_disk == listed  # stale shards of the first preparation are gone


def test_interrupted_prepare_leaves_no_manifest(tmp_path, monkeypatch):
    _txt_corpus(tmp_path / "docs", n=4)
    cfg = _cfg(tmp_path / "data", [SourceConfig(kind="txt", path=str(tmp_path / "docs"))])
    prepare_data(cfg, log=lambda s: None)
    write_shards = data._write_shards

    def dies_before_val(out_dir, split, *args):
        if split == "val":
            raise KeyboardInterrupt
        return write_shards(out_dir, split, *args)

    cfg.data.seq_len = 2 * SEQ  # a rebuild, interrupted after the train shards
    monkeypatch.setattr(data, "_write_shards", dies_before_val)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, log=lambda s: None)
    assert not (tmp_path / "data" / "manifest.json").exists()  # the old one went first, the new one never came
    with pytest.raises(FileNotFoundError, match="dsv3 prepare-data"):
        TokenSamples(cfg, "train")
    monkeypatch.undo()
    assert prepare_data(cfg, log=lambda s: None)["seq_len"] == 2 * SEQ


def test_prepare_never_removes_or_overwrites_shards_it_did_not_write(tmp_path):
    """Every train-*.tar / val-*.tar in data.dir used to be deleted as an earlier preparation's;
    now only the shards its manifest lists (or an interrupted preparation's) are."""
    _txt_corpus(tmp_path / "docs", n=4)
    out = tmp_path / "data"
    out.mkdir()
    (out / "train-mine-000.tar").write_bytes(b"a user's shard")  # not a name prepare-data writes: left alone
    cfg = _cfg(out, [SourceConfig(kind="txt", path=str(tmp_path / "docs"))])
    prepare_data(cfg, log=lambda s: None)
    cfg.data.seq_len = 2 * SEQ  # a rebuild removes only what the first preparation wrote
    prepare_data(cfg, log=lambda s: None)
    assert (out / "train-mine-000.tar").read_bytes() == b"a user's shard"

    # shards named as ours would be, and no manifest listing them (a user's, or a preparation's
    # whose manifest was damaged): moved aside, not overwritten
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    for name in ("train-000000.tar", "val-000000.tar"):
        (theirs / name).write_bytes(b"a user's shard")
    logs: list[str] = []
    prepare_data(_cfg(theirs, cfg.data.sources), log=logs.append)
    (aside,) = theirs.glob("not-from-prepare-data-*")
    assert sorted(p.name for p in aside.iterdir()) == ["train-000000.tar", "val-000000.tar"]
    assert all(p.read_bytes() == b"a user's shard" for p in aside.iterdir())
    assert "moved train-000000.tar, val-000000.tar, which no manifest.json here lists" in " ".join(logs)
    assert (theirs / "train-000000.tar").read_bytes() != b"a user's shard"  # the new preparation's


def test_a_shard_whose_size_changed_is_rebuilt(tmp_path):
    """prepare-data said "up to date" over a truncated shard, though training's error told the
    user to re-run it."""
    _txt_corpus(tmp_path / "docs", n=4)
    cfg = _cfg(tmp_path / "data", [SourceConfig(kind="txt", path=str(tmp_path / "docs"))])
    prepare_data(cfg, log=lambda s: None)
    shard = tmp_path / "data" / "val-000000.tar"
    good = shard.read_bytes()
    shard.write_bytes(good[:1000])
    logs: list[str] = []
    prepare_data(cfg, log=logs.append)
    assert "up to date" not in " ".join(logs) and shard.read_bytes() == good


@pytest.mark.parametrize("text, problem", [
    ('{"format": 1,', "manifest.json is not valid JSON"), ("[1, 2]", "manifest.json is a JSON list, not an object"),
    ('{"format": 1}', "manifest.json lacks seq_len, vocab_size, eod_id, train, val")])
def test_a_damaged_manifest_is_named_not_a_traceback(prepared, tmp_path, text, problem):
    cfg, _ = _copy_prepared(prepared, tmp_path / "data")
    (tmp_path / "data" / "manifest.json").write_text(text)
    with pytest.raises(ConfigError, match=f"data.dir=.*: {problem}.*delete it and run `dsv3 prepare-data"):
        TokenSamples(cfg, "train")


def test_no_validation_split(tmp_path):
    _txt_corpus(tmp_path / "docs", n=3)
    cfg = _cfg(tmp_path / "data", [SourceConfig(kind="txt", path=str(tmp_path / "docs"))], "data.val_documents=0")
    m = prepare_data(cfg, log=lambda s: None)
    assert m["val"] == {"shards": [], "samples": 0, "tokens": 0} and m["held_out"] == []
    with pytest.raises(ConfigError, match="data.val_documents"):
        TokenSamples(cfg, "val")


def test_jsonl_two_sources_mixed_by_weight(tmp_path):
    rng = random.Random(1)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": _text(rng, f"A{i}", 40), "id": i}) + "\n" for i in range(10)) + "\n")
    b.write_text("".join(json.dumps({"body": _text(rng, f"B{i}", 200)}) + "\n" for i in range(5)))
    cfg = _cfg(tmp_path / "data", [
        SourceConfig(kind="jsonl", path=str(a), weight=1.0),
        SourceConfig(kind="jsonl", path=str(b), text_field="body", weight=3.0),
    ])
    m = prepare_data(cfg, log=lambda s: None)
    sa, sb = m["sources"]
    assert (sa["documents"], sb["documents"]) == (8, 3)
    assert m["held_out"] == ["a.jsonl:9", "a.jsonl:10", "b.jsonl:4", "b.jsonl:5"]
    mixed = sa["mixed_tokens"] + sb["mixed_tokens"]
    assert mixed == sa["tokens"] + sb["tokens"]  # the rule keeps the unweighted total
    assert sa["mixed_tokens"] / mixed == pytest.approx(0.25, abs=1e-3)
    assert sb["mixed_tokens"] / mixed == pytest.approx(0.75, abs=1e-3)
    assert m["train"]["samples"] == (mixed - 1) // SEQ
    # the shards hold the in-memory rule's stream: each source's documents encoded, mixed, concatenated
    tok = Tokenizer.from_file(str(tmp_path / "data" / "tokenizer.json"))
    eod = m["eod_id"]
    per_source = [[json.loads(line)[field] for line in f.read_text().splitlines() if line.strip()][:n]
                  for f, field, n in ((a, "text", 8), (b, "body", 3))]
    want = np.concatenate(mix_streams([_expected_stream(tok, texts, eod) for texts in per_source], [1.0, 3.0], eod))
    with TokenSamples(cfg, "train") as samples:
        got = _stream_of(samples)
    assert np.array_equal(got, want[: len(got)]) and len(want) - len(got) < SEQ + 1


def test_a_source_reads_only_the_documents_asked_for(tmp_path):
    """prepare-data reads a source's train and val documents in separate passes; the val pass
    skips the train documents without reading (txt) or parsing (jsonl) them."""
    _txt_corpus(tmp_path / "docs", n=5)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" + ("\n" if i == 1 else "") for i in range(5)))
    txt_src = data.open_source(SourceConfig(kind="txt", path=str(tmp_path / "docs")), 0)
    jsonl_src = data.open_source(SourceConfig(kind="jsonl", path=str(jsonl)), 0)
    for src in (txt_src, jsonl_src):
        everything = [(d.name, d.text) for d in src.documents()]
        assert src.count == len(everything) == 5
        for start, stop in ((0, 3), (3, None), (2, 4), (5, None)):
            assert [(d.name, d.text) for d in src.documents(start, stop)] == everything[start:stop]
    # the first document made unreadable: skipping it still works, reading it does not
    (tmp_path / "docs" / "d0.txt").unlink()
    assert [d.name for d in txt_src.documents(1)] == ["d1.txt", "d2.txt", "d3.txt", "zz/d4.txt"]
    with pytest.raises(FileNotFoundError):
        list(txt_src.documents(0))
    jsonl.write_text("{not json\n" + "".join(jsonl.read_text().splitlines(keepends=True)[1:]))
    assert [d.text for d in jsonl_src.documents(1)] == ["doc 1", "doc 2", "doc 3", "doc 4"]
    with pytest.raises(ConfigError, match="line 1 is not valid JSON"):
        list(jsonl_src.documents(0))


def test_token_stream_reads_ranges_of_the_mixed_concatenation(tmp_path):
    """prepare-data reads the mixed train stream a shard at a time from the per-source streams
    (TokenStream over TokenFiles); any range of it equals the same range of mix_streams' streams
    concatenated."""
    rng = np.random.default_rng(0)
    eod = 0
    for trial in range(200):
        streams = [rng.integers(1, 9, size=int(rng.integers(1, 30))).astype(np.uint16)
                   for _ in range(int(rng.integers(1, 4)))]
        weights = rng.uniform(0.05, 3.0, size=len(streams)).tolist()
        want = np.concatenate(mix_streams([x.copy() for x in streams], weights, eod))
        files = []
        for k, x in enumerate(streams):
            x.tofile(tmp_path / f"{trial}-{k}.bin")
            files.append(data.TokenFile(tmp_path / f"{trial}-{k}.bin", np.uint16))
        lengths = data._mixed_lengths([len(x) for x in streams], weights)
        stream = data.TokenStream(files if trial % 2 else streams, lengths, eod)
        assert len(stream) == len(want)
        for _ in range(5):
            lo = int(rng.integers(0, len(want) + 1))
            hi = int(rng.integers(lo, len(want) + 1))
            assert np.array_equal(stream.read(lo, hi), want[lo:hi]), (lo, hi)
        assert np.array_equal(stream.read(0, len(want)), want)
        assert np.array_equal(data.TokenStream(streams).read(0, sum(map(len, streams))), np.concatenate(streams))


def test_mix_and_pack_rules():
    eod = 9
    a, b = np.array([1, 2, eod, 3, eod]), np.array([4, 5, 6, eod, 7, 8, 7, 8, eod, 5, eod])
    ma, mb = mix_streams([a, b], [1.0, 1.0], eod)
    assert len(ma) == len(mb) == 8
    assert ma.tolist() == [1, 2, eod, 3, eod, 1, 2, eod]  # repeated whole, then a prefix
    assert mb.tolist() == [4, 5, 6, eod, 7, 8, 7, eod]  # truncated; ends on a document boundary
    (same,) = mix_streams([b], [0.3], eod)
    assert same is b
    x = pack_samples(np.arange(11), 4)  # (2, 5): the tail token 9..10 is dropped
    assert x.tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]
    assert pack_samples(np.arange(4), 4).shape == (0, 5)


def test_documents_encoded_in_batches_give_the_one_by_one_stream(prepared):
    """prepare-data encodes ~_ENCODE_CHARS of text at a time (tokenizers' Encodings are ~150 bytes
    per token); across batch boundaries the stream is each document's ids and an EOD, in order,
    and a document longer than a batch is encoded whole."""
    cfg, _ = prepared
    tok = Tokenizer.from_file(str(Path(cfg.data.dir) / "tokenizer.json"))
    rng = random.Random(3)
    docs, chars = [], 0
    while chars < 2.5 * data._ENCODE_CHARS:
        docs.append(data.Document(f"d{len(docs)}", _text(rng, f"D{len(docs)}", rng.randrange(0, 400))))
        chars += len(docs[-1].text)
    docs.insert(len(docs) // 2, data.Document("long", _text(rng, "LONG", data._ENCODE_CHARS // 3)))
    eod = tok.token_to_id(EOD_TOKEN)
    chunks = list(data._encode_documents(tok, docs, eod, np.dtype(np.uint16)))
    assert len(chunks) >= 3 and all(c.dtype == np.uint16 for c in chunks)
    assert np.concatenate(chunks).tolist() == _expected_stream(tok, [d.text for d in docs], eod).tolist()
    assert list(data._encode_documents(tok, [], eod, np.dtype(np.int32))) == []


def test_existing_tokenizer(prepared, tmp_path):
    cfg, _ = prepared
    given = tmp_path / "given.json"
    shutil.copyfile(Path(cfg.data.dir) / "tokenizer.json", given)
    cfg2 = _cfg(tmp_path / "data", [SourceConfig(kind="txt", path=cfg.data.sources[0].path)], f"data.tokenizer={given}")
    m = prepare_data(cfg2, log=lambda s: None)
    assert (tmp_path / "data" / "tokenizer.json").read_bytes() == given.read_bytes()
    assert m["tokenizer_sha256"] == json.loads((Path(cfg.data.dir) / "manifest.json").read_text())["tokenizer_sha256"]
    with TokenSamples(cfg, "train") as x, TokenSamples(cfg2, "train") as y:
        assert len(x) == len(y) and all(torch.equal(x[i], y[i]) for i in range(len(x)))
    logs: list[str] = []
    prepare_data(cfg2, log=logs.append)
    assert "up to date" in " ".join(logs)

    cfg3 = _cfg(tmp_path / "data3", cfg2.data.sources, f"data.tokenizer={given}",
                f"model.vocab_size={m['vocab_size'] - 1}")
    with pytest.raises(ConfigError, match="model.vocab_size"):
        prepare_data(cfg3, log=lambda s: None)

    for content in (b"not json", b"\xff\xfe"):  # a bare Exception from tokenizers used to escape
        (tmp_path / "bad.json").write_bytes(content)
        bad = _cfg(tmp_path / "data4", cfg2.data.sources, f"data.tokenizer={tmp_path / 'bad.json'}")
        with pytest.raises(ConfigError, match=r"data.tokenizer=.*bad.json.*: not a tokenizers JSON file"):
            prepare_data(bad, log=lambda s: None)
    assert not (tmp_path / "data4").exists()


def test_shard_override_pattern(prepared, train_samples, tmp_path):
    cfg, _ = prepared
    m = json.loads((Path(cfg.data.dir) / "manifest.json").read_text())
    last = len(m["train"]["shards"]) - 1
    # copies without a manifest beside them: samples are counted by scanning the tars
    for s in m["train"]["shards"]:
        shutil.copyfile(Path(cfg.data.dir) / s["url"], tmp_path / s["url"])
    pattern = str(tmp_path / f"train-{{000000..{last:06d}}}.tar")
    cfg2 = _cfg(Path(cfg.data.dir), cfg.data.sources, f"data.train_shards={pattern}")
    with TokenSamples(cfg2, "train") as samples:
        assert samples.manifest is None and len(samples) == len(train_samples)
        assert all(torch.equal(samples[i], train_samples[i]) for i in range(len(samples)))
    cfg3 = _cfg(Path(cfg.data.dir), cfg.data.sources, f"data.train_shards={pattern}", f"data.seq_len={SEQ * 2}")
    with pytest.raises(ConfigError, match="data.seq_len"):
        TokenSamples(cfg3, "train")


def test_shakespeare_source(tmp_path):
    cfg = _cfg(tmp_path / "data", [SourceConfig(kind="shakespeare")], "data.seq_len=256", "data.samples_per_shard=4096")
    m = prepare_data(cfg, log=lambda s: None)
    (src,) = m["sources"]
    assert src["documents"] == 36 and src["val_documents"] == 2
    assert m["held_out"] == ["tragedies/romeo-and-juliet", "tragedies/timon-of-athens"]
    assert m["val"]["samples"] > 0 and m["train"]["samples"] > 10 * m["val"]["samples"]
    with TokenSamples(cfg, "val") as val:
        tok = Tokenizer.from_file(str(tmp_path / "data" / "tokenizer.json"))
        assert "Romeo" in tok.decode(val[0].tolist())


# --------------------------------------------------------------------------- errors


def test_missing_folder_and_too_few_documents(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        prepare_data(_cfg(tmp_path / "data", [SourceConfig(kind="txt", path=str(missing))]), log=lambda s: None)
    _txt_corpus(tmp_path / "docs", n=2)
    with pytest.raises(ConfigError, match="data.val_documents"):
        prepare_data(_cfg(tmp_path / "data", [SourceConfig(kind="txt", path=str(tmp_path / "docs"))]),
                     log=lambda s: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no documents"):
        prepare_data(_cfg(tmp_path / "data", [SourceConfig(kind="txt", path=str(tmp_path / "empty"))]),
                     log=lambda s: None)


@pytest.mark.parametrize("bad,match", [
    ('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n', r"bad\.jsonl.*line 3 is not valid JSON"),
    ('{"text": "fine"}\n{"body": "no text field"}\n', r"line 2 has no string field 'text'"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, bad, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(bad)
    cfg = _cfg(tmp_path / "data", [SourceConfig(kind="jsonl", path=str(path))], "data.val_documents=0")
    with pytest.raises(ConfigError, match=match):
        prepare_data(cfg, log=lambda s: None)


def test_loading_errors(prepared, tmp_path):
    cfg, _ = prepared
    manifest = str(Path(cfg.data.dir) / "manifest.json")
    wrong_len = _cfg(Path(cfg.data.dir), cfg.data.sources, f"data.seq_len={SEQ * 2}")
    with pytest.raises(ConfigError, match="data.seq_len") as err:
        TokenSamples(wrong_len, "train")
    assert manifest in str(err.value)
    small_vocab = _cfg(Path(cfg.data.dir), cfg.data.sources, "model.vocab_size=64")
    with pytest.raises(ConfigError, match="model.vocab_size"):
        TokenSamples(small_vocab, "val")
    with pytest.raises(FileNotFoundError, match="dsv3 prepare-data"):
        TokenSamples(_cfg(tmp_path / "absent", cfg.data.sources), "train")


# --------------------------------------------------------------------------- data order


def test_stream_indices_epochs_and_seeds():
    n = 13
    full = stream_indices(n, 7, 0, 4 * n)
    epochs = [full[e * n:(e + 1) * n] for e in range(4)]
    assert all(sorted(e) == list(range(n)) for e in epochs)  # a permutation within each epoch
    assert len({tuple(e) for e in epochs}) == 4  # a fresh order every epoch
    for start, count in ((0, 5), (10, 7), (12, 30), (26, 0)):  # windows across epoch boundaries
        assert stream_indices(n, 7, start, count) == full[start:start + count]
    assert stream_indices(n, 8, 0, n) != epochs[0]  # the seed changes the order


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 16, 17, 1000, 4097])
def test_epoch_order_is_a_permutation_of_every_size(n):
    # sizes at and beside the powers of four the Feistel network works over (cycle walking)
    order = data.epoch_order(n, 3, 0, np.arange(n))
    assert sorted(order.tolist()) == list(range(n))
    assert data.epoch_order(n, 3, 0, np.arange(n)[::-1]).tolist() == order[::-1].tolist()  # any positions


def test_epoch_order_looks_random_at_scale():
    """Positions of an epoch of 10M samples, never materialised: a window of 4096 consecutive
    positions (what a few global batches draw) lands evenly over the dataset and its values are
    distinct; the order is not correlated with the position; another epoch or seed is another
    order. Bounds: binomial counts over 16 bins of 256 expected, > 8 sigma from the edges."""
    n = 10_000_000
    window = data.epoch_order(n, 1234, 0, np.arange(5_000_000, 5_004_096))
    assert len(set(window.tolist())) == 4096 and window.min() >= 0 and window.max() < n
    counts = np.bincount(window * 16 // n, minlength=16)
    assert counts.min() > 130 and counts.max() < 390, counts
    positions = np.random.default_rng(0).integers(0, n, 20_000)
    r = np.corrcoef(positions, data.epoch_order(n, 1234, 0, positions))[0, 1]
    assert abs(r) < 0.05, r  # about 0.007 expected from 20K uncorrelated pairs
    for seed, epoch in ((1234, 1), (1235, 0)):
        other = data.epoch_order(n, seed, epoch, np.arange(5_000_000, 5_004_096))
        assert (other == window).mean() < 0.01


def test_a_checkpoint_drawn_in_another_order_is_said(train_samples):
    state = BatchStream(train_samples, 11, 0, 1, 2, consumed=10).state_dict()
    state.pop("order")  # as checkpoints from before it was kept (a randperm per epoch)
    moved = BatchStream(train_samples, 11, 0, 1, 2)
    warning = moved.load_state_dict(state)
    assert moved.consumed == 10 and warning and "another order (randperm" in warning


# batch sizes as with a batch-size ramp: every one divides over 4 ranks x micro-batch 2
BATCHES = [8, 16, 8, 24, 16, 8, 32, 8]


def _global_batch(streams: list[BatchStream], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's micro-batches of one step: (size, seq_len) tokens and targets."""
    parts = [mb for s in streams for mb in s.next(size)]
    assert all(t.shape == y.shape == (s.micro_batch_size, SEQ) for s in streams for t, y in parts[:1])
    return torch.cat([t for t, _ in parts]), torch.cat([y for _, y in parts])


def test_global_batch_independent_of_world_and_micro_batch(train_samples):
    n = len(train_samples)
    sizes = BATCHES * (2 * n // sum(BATCHES) + 1)  # enough steps to cross two epoch boundaries
    assert n % 8  # so the boundaries fall inside a batch
    consumed = 0
    reference = []
    for size in sizes:
        x = torch.stack([train_samples[i] for i in stream_indices(n, 5, consumed, size)])
        reference.append((x[:, :-1], x[:, 1:]))
        consumed += size
    for world in (1, 2, 4):
        for mb in (1, 2):
            streams = [BatchStream(train_samples, 5, r, world, mb) for r in range(world)]
            for (tokens, targets), size in zip(reference, sizes):
                got_tokens, got_targets = _global_batch(streams, size)
                assert torch.equal(got_tokens, tokens) and torch.equal(got_targets, targets), (world, mb)
            assert all(s.consumed == sum(sizes) for s in streams)


def test_batch_stream_resume_and_seed(train_samples):
    a = BatchStream(train_samples, 11, rank=1, world_size=2, micro_batch_size=2)
    for size in BATCHES[:3]:
        a.next(size)
    state = a.state_dict()
    assert state == {"consumed": sum(BATCHES[:3]), "seed": 11, "samples": len(train_samples),
                     "fingerprint": train_samples.fingerprint, "order": data.ORDER}
    rest = [a.next(size) for size in BATCHES[3:]]
    b = BatchStream(train_samples, 999, rank=1, world_size=2, micro_batch_size=2)
    assert b.load_state_dict(state) is None  # the same data: nothing to say
    for want, size in zip(rest, BATCHES[3:]):
        got = b.next(size)
        assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(got, want))
    other = BatchStream(train_samples, 12, rank=1, world_size=2, micro_batch_size=2, consumed=state["consumed"])
    assert not torch.equal(other.next(BATCHES[3])[0][0], rest[0][0][0])
    with pytest.raises(ValueError, match="ranks"):
        a.next(7)
    with pytest.raises(ValueError, match="micro_batch_size"):
        a.next(6)  # 3 per rank, micro-batch 2


def test_resuming_on_other_data_is_said(prepared, train_samples):
    state = BatchStream(train_samples, 11, 0, 1, 2, consumed=10).state_dict()
    with TokenSamples(prepared[0], "val") as other:  # other shards, another sample count
        moved = BatchStream(other, 11, 0, 1, 2)
        warning = moved.load_state_dict(state)
    assert moved.consumed == 10
    assert warning and f"{len(train_samples)} samples" in warning and train_samples.fingerprint in warning
    assert "another order" not in warning
    state.pop("order")  # and drawn in another order too: both are said
    with TokenSamples(prepared[0], "val") as other:
        warning = BatchStream(other, 11, 0, 1, 2).load_state_dict(state)
    assert "another order (randperm" in warning and train_samples.fingerprint in warning


def test_eval_batches_split_by_sample(prepared):
    cfg, _ = prepared
    with TokenSamples(cfg, "val") as val:
        n = len(val)
        n_batches, size = 7, 8
        assert n_batches * size > n  # wraps around the val split
        want = torch.stack([val[i % n] for i in range(n_batches * size)])  # (56, seq_len + 1)
        for world in (1, 2, 4):
            for micro in (1, 2):  # forwards of micro_batch_size sequences, as in training
                per_rank = [eval_batches(val, n_batches, size, r, world, micro) for r in range(world)]
                per_batch = size // world // micro
                assert all(len(b) == n_batches * per_batch for b in per_rank)
                assert all(x.shape[0] == micro for b in per_rank for x, _ in b)
                order = [per_rank[r][b * per_batch + m] for b in range(n_batches) for r in range(world)
                         for m in range(per_batch)]
                tokens = torch.cat([x for x, _ in order])
                targets = torch.cat([y for _, y in order])
                assert torch.equal(tokens, want[:, :-1]) and torch.equal(targets, want[:, 1:])


# --------------------------------------------------------------------------- bad shards


def _copy_prepared(prepared, dest: Path) -> tuple[Config, dict]:
    """A private copy of the prepared data (tests corrupt it), its config and manifest."""
    cfg, _ = prepared
    shutil.copytree(cfg.data.dir, dest)
    return _cfg(dest, cfg.data.sources), json.loads((dest / "manifest.json").read_text())


def _shard_starts(m: dict, split: str = "train") -> list[int]:
    starts = [0]
    for s in m[split]["shards"]:
        starts.append(starts[-1] + s["nsamples"])
    return starts  # starts[k] = first global index of shard k; starts[-1] = len


def _member_data_offset(path: Path, index: int) -> tuple[int, int]:
    """(offset, size) in the tar of the tokens.npy payload of global sample `index`."""
    import tarfile

    with tarfile.open(path) as tar:
        member = tar.getmember(f"{index:09d}.{data.SAMPLE_FIELD}")
        return member.offset_data, member.size


def test_manifest_records_shard_bytes(prepared):
    cfg, _ = prepared
    m = json.loads((Path(cfg.data.dir) / "manifest.json").read_text())
    for split in ("train", "val"):
        for s in m[split]["shards"]:
            assert s["bytes"] == (Path(cfg.data.dir) / s["url"]).stat().st_size


@pytest.mark.parametrize("corrupt", ["truncate", "garbage_header", "missing"])
def test_dead_shard_served_by_next_good_sample(prepared, train_samples, tmp_path, capsys, corrupt):
    cfg, m = _copy_prepared(prepared, tmp_path / "data")
    starts = _shard_starts(m)
    k = 1
    path = tmp_path / "data" / m["train"]["shards"][k]["url"]
    raw = path.read_bytes()
    if corrupt == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif corrupt == "garbage_header":  # over the first header, same size: the shard is not in the layout
        path.write_bytes(random.Random(0).randbytes(1024) + raw[1024:])  # written, and will not index
    else:
        path.unlink()
    with TokenSamples(cfg, "train") as samples:
        assert samples.bad_shards == 0  # opening reads the manifest only
        assert len(samples) == len(train_samples)  # indices (and so the stream) are unchanged
        assert torch.equal(samples[starts[k]], train_samples[starts[k + 1]])  # found on the first read
        assert samples.bad_shards == 1
        err = capsys.readouterr().err
        assert err.count(str(path)) == 1 and "train shard" in err
        for i in range(len(samples)):
            want = starts[k + 1] if starts[k] <= i < starts[k + 1] else i
            assert torch.equal(samples[i], train_samples[want]), i
        assert samples.bad_shards == 1 and str(path) not in capsys.readouterr().err  # warned once


def test_garbage_over_a_header_inside_a_shard_makes_those_samples_bad(prepared, train_samples, tmp_path, capsys):
    """A shard of prepare-data's layout is read a member at a time, at j · stride, each header
    checked: garbage over members 2 and 3 of shard 1 replaces those two samples by the next good
    one, and the rest of the shard is served as it is."""
    cfg, m = _copy_prepared(prepared, tmp_path / "data")
    starts = _shard_starts(m)
    path = tmp_path / "data" / m["train"]["shards"][1]["url"]
    first, _ = _member_data_offset(path, starts[1])
    second, _ = _member_data_offset(path, starts[1] + 1)
    stride = second - first
    raw = bytearray(path.read_bytes())
    raw[2 * stride: 4 * stride] = random.Random(1).randbytes(2 * stride)
    path.write_bytes(bytes(raw))
    bad = {starts[1] + 2, starts[1] + 3}
    with TokenSamples(cfg, "train") as samples:
        for i in range(len(samples)):
            want = starts[1] + 4 if i in bad else i
            assert torch.equal(samples[i], train_samples[want]), i
        assert samples.bad_shards == 1 and capsys.readouterr().err.count(str(path)) == 1
        assert isinstance(samples._open[1], data._StridedShard)  # read without an index


def test_bad_last_shard_wraps_to_first_sample(prepared, train_samples, tmp_path):
    cfg, m = _copy_prepared(prepared, tmp_path / "data")
    starts = _shard_starts(m)
    last = tmp_path / "data" / m["train"]["shards"][-1]["url"]
    last.write_bytes(last.read_bytes()[:100])
    with TokenSamples(cfg, "train") as samples:
        assert torch.equal(samples[starts[-2]], train_samples[0])
        assert torch.equal(samples[-1], train_samples[0])


def test_bad_sample_replaced_by_next_and_same_decisions_in_any_order(prepared, train_samples, tmp_path, capsys):
    cfg, m = _copy_prepared(prepared, tmp_path / "data")
    starts = _shard_starts(m)
    k, bad = 1, starts[1] + 2
    path = tmp_path / "data" / m["train"]["shards"][k]["url"]
    offset, size = _member_data_offset(path, bad)
    raw = bytearray(path.read_bytes())
    raw[offset + size - 8: offset + size] = b"\xff" * 8  # token ids 65535: outside the vocabulary
    path.write_bytes(bytes(raw))
    expected = [train_samples[i + 1 if i == bad else i] for i in range(len(train_samples))]
    with TokenSamples(cfg, "train") as fwd, TokenSamples(cfg, "train") as rev:
        assert fwd.bad_shards == 0  # the size and the index are fine: found only on reading
        assert capsys.readouterr().err == ""
        got_fwd = [fwd[i] for i in range(len(fwd))]
        got_rev = [rev[i] for i in reversed(range(len(rev)))][::-1]
        assert fwd.bad_shards == rev.bad_shards == 1
        err = capsys.readouterr().err
        assert err.count(str(path)) == 2 and "outside [0," in err  # once per TokenSamples
    for i, (a, b, e) in enumerate(zip(got_fwd, got_rev, expected)):
        assert torch.equal(a, e) and torch.equal(b, e), i  # only the bad sample is replaced


def test_undecodable_sample_and_batches_keep_their_size(prepared, train_samples, tmp_path):
    cfg, m = _copy_prepared(prepared, tmp_path / "data")
    bad = 3
    path = tmp_path / "data" / m["train"]["shards"][0]["url"]
    offset, size = _member_data_offset(path, bad)
    raw = bytearray(path.read_bytes())
    raw[offset: offset + 8] = b"notnumpy"  # breaks the .npy magic
    path.write_bytes(bytes(raw))
    with TokenSamples(cfg, "train") as samples:
        assert torch.equal(samples[bad], train_samples[bad + 1]) and samples.bad_shards == 1
        good = BatchStream(train_samples, 5, 0, 1, 2)
        stream = BatchStream(samples, 5, 0, 1, 2)
        for _ in range(len(samples) // 4 + 1):  # a whole epoch: the bad sample is drawn once
            a, b = good.next(4), stream.next(4)
            assert [t.shape for t, _ in a] == [t.shape for t, _ in b]


def test_every_shard_bad_is_an_error(prepared, tmp_path):
    cfg, m = _copy_prepared(prepared, tmp_path / "data")
    for s in m["val"]["shards"]:
        (tmp_path / "data" / s["url"]).write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="every val shard is unreadable"):
        TokenSamples(cfg, "val")[0]  # on the first read, which finds them all bad
    listed = "::".join(str(tmp_path / "data" / s["url"]) for s in m["val"]["shards"])
    with pytest.raises(ConfigError, match="every val shard is unreadable"):
        TokenSamples(_cfg(tmp_path / "data", cfg.data.sources, f"data.val_shards={listed}"), "val")  # counted at open


def test_opening_a_split_reads_no_shard(prepared, train_samples, tmp_path):
    """Every rank opens every split; indexing each shard there (a header per sample) would make
    the start of a large run take minutes per 10K shards. With the manifest's counts, a shard is
    opened when a sample is first read from it."""
    cfg, m = _copy_prepared(prepared, tmp_path / "data")
    paths = [tmp_path / "data" / s["url"] for s in m["train"]["shards"]]
    away = [p.rename(p.with_name(p.name + ".away")) for p in paths]
    with TokenSamples(cfg, "train") as samples:  # no shard there to open
        assert len(samples) == len(train_samples) and samples.bad_shards == 0
        for a, p in zip(away, paths):
            a.rename(p)
        starts = _shard_starts(m)
        assert torch.equal(samples[starts[1] + 3], train_samples[starts[1] + 3])
        assert list(samples._open) == [1] and samples.bad_shards == 0  # the one shard read from


def test_shards_without_a_manifest_are_counted_a_share_per_rank(prepared, tmp_path):
    """Rank r of 3 indexes shards r, r + 3, ...; their sum over the ranks (the all-reduce) is every
    shard's count, and an unindexable shard is named by the one rank that tried it."""
    cfg, m = _copy_prepared(prepared, tmp_path / "data")
    paths = [tmp_path / "data" / s["url"] for s in m["train"]["shards"]]
    assert len(paths) >= 3
    paths[1].write_bytes(b"garbage")
    want = [None if k == 1 else s["nsamples"] for k, s in enumerate(m["train"]["shards"])]
    assert data.count_shard_samples(paths) == want
    total, named = torch.zeros(len(paths), dtype=torch.int64), []
    for rank in range(3):
        def add(counts: torch.Tensor) -> torch.Tensor:  # this rank's part of the sum
            total.add_(counts)
            return counts
        part = data.count_shard_samples(paths, rank, 3, all_reduce=add, warn=lambda k, why: named.append((rank, k)))
        assert [k for k, c in enumerate(part) if c is not None] == [k for k in range(rank, len(paths), 3) if k != 1]
    assert [int(c) - 1 if c else None for c in total] == want
    assert named == [(1, 1)]


def test_a_missing_shard_is_named_on_every_rank_by_the_one_that_looked(prepared, tmp_path, monkeypatch):
    """A listed shard that does not exist: rank r of 3 looks at shards r, r + 3, ... only (one stat
    per shard over all ranks, not one per rank), and after the all-reduce every rank raises the same
    error naming it; TokenSamples adds the config key."""
    cfg, m = _copy_prepared(prepared, tmp_path / "data")
    paths = [tmp_path / "data" / s["url"] for s in m["train"]["shards"]]
    assert len(paths) >= 3
    paths[1].unlink()
    looked = []
    is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda p: looked.append(p) or is_file(p))
    shares = []
    for rank in range(3):  # each rank's own contribution to the sum, before the reduce
        looked.clear()
        def keep(counts: torch.Tensor) -> torch.Tensor:
            shares.append(counts.clone())
            return counts
        if rank == 1:
            with pytest.raises(FileNotFoundError, match=f"shard {paths[1]} does not exist"):
                data.count_shard_samples(paths, rank, 3, all_reduce=keep)
        else:
            data.count_shard_samples(paths, rank, 3, all_reduce=keep)
        assert looked == paths[rank::3]
    total = sum(shares)
    for rank in range(3):  # with the real sum every rank raises alike
        with pytest.raises(FileNotFoundError, match=f"shard {paths[1]} does not exist"):
            data.count_shard_samples(paths, rank, 3, all_reduce=lambda counts: counts.copy_(total))
    monkeypatch.undo()
    listed = "::".join(str(p) for p in paths)
    with pytest.raises(FileNotFoundError, match=f"data.train_shards: shard {paths[1]} does not exist"):
        TokenSamples(_cfg(tmp_path / "data", cfg.data.sources, f"data.train_shards={listed}"), "train")


def test_check_tokenizer_matches(prepared, tmp_path):
    cfg, _ = prepared
    m = json.loads((Path(cfg.data.dir) / "manifest.json").read_text())
    run = tmp_path / "run"
    run.mkdir()
    data.check_tokenizer_matches(run, m, cfg.data.dir)  # a fresh run directory: nothing to compare
    shutil.copyfile(Path(cfg.data.dir) / "tokenizer.json", run / "tokenizer.json")
    data.check_tokenizer_matches(run, m, cfg.data.dir)  # the same tokenizer
    data.check_tokenizer_matches(run, None, cfg.data.dir)  # shards without a manifest: not checked
    (run / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="data.dir") as err:
        data.check_tokenizer_matches(run, m, cfg.data.dir)
    assert str(run) in str(err.value)
