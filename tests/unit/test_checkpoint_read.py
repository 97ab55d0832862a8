"""Reading a checkpoint for one expert-parallel rank (train/checkpoint.py read_tensors): dense
tensors whole, stacked expert tensors only the rank's experts, whichever shard files hold them;
TensorReader reads each tensor when asked for it, and with a manifest opens only the files it
reads from."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from train.checkpoint import TensorReader, _manifest_entries, _write_meta, read_tensors

KEY = "layers.1.mlp.experts.down_proj"


def _checkpoint(path, saved_ep: int, n_experts: int = 8, legacy: bool = False):
    """A checkpoint's model files as saved at EP=saved_ep; returns the whole expert tensor.
    legacy: the one-file-per-kind names earlier checkpoints have."""
    path.mkdir()
    full = torch.randn(n_experts, 3, 2, generator=torch.Generator().manual_seed(saved_ep))
    dense = "model-dense.safetensors" if legacy else "model-dense-part0-of-1.safetensors"
    save_file({"embed_tokens.weight": torch.ones(5, 2)}, str(path / dense))
    per = n_experts // saved_ep
    for r in range(saved_ep):
        name = f"model-experts-ep{r}-of-{saved_ep}" + ("" if legacy else "-part0-of-1")
        save_file({KEY: full[r * per:(r + 1) * per].contiguous()}, str(path / f"{name}.safetensors"))
    return full


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("saved_ep", [1, 2, 4])
@pytest.mark.parametrize("experts", [None, (0, 8), (0, 4), (4, 8), (2, 4), (6, 8), (1, 7)])
def test_reads_the_rows_asked_for_across_shard_files(tmp_path, saved_ep, experts, legacy):
    full = _checkpoint(tmp_path / "ckpt", saved_ep, legacy=legacy)
    got = read_tensors(tmp_path / "ckpt", "model", experts)
    first, last = experts or (0, 8)
    assert torch.equal(got[KEY], full[first:last])
    assert torch.equal(got["embed_tokens.weight"], torch.ones(5, 2))


def test_experts_the_checkpoint_lacks_are_an_error_naming_it(tmp_path):
    _checkpoint(tmp_path / "ckpt", 2)
    with pytest.raises(ValueError, match=r"ckpt: .*down_proj holds 8 experts; experts \[6, 10\)"):
        read_tensors(tmp_path / "ckpt", "model", (6, 10))


def test_reader_reads_on_demand_and_names_what_is_missing(tmp_path):
    full = _checkpoint(tmp_path / "ckpt", 4)
    with TensorReader(tmp_path / "ckpt", "model", (2, 6)) as reader:
        assert reader.keys() == {KEY, "embed_tokens.weight"} and KEY in reader
        assert torch.equal(reader[KEY], full[2:6])
        with pytest.raises(KeyError, match="ckpt: no tensor lm_head.weight"):
            reader["lm_head.weight"]
    with pytest.raises(FileNotFoundError, match=r"no optim-dense-part\*\.safetensors"):
        TensorReader(tmp_path / "ckpt", "optim")


def test_tensors_split_over_parts_read_as_one(tmp_path):
    """Dense tensors in two parts, and each of two expert shards with its tensors in two parts
    (what a save spreads over the ranks writes): every tensor is found, experts in shard order."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    g = torch.Generator().manual_seed(0)
    dense = {"embed_tokens.weight": torch.randn(5, 2, generator=g), "norm.weight": torch.randn(2, generator=g)}
    other = KEY.replace("down_proj", "gate_up_proj")
    full = {KEY: torch.randn(8, 3, 2, generator=g), other: torch.randn(8, 4, 2, generator=g)}
    save_file({"embed_tokens.weight": dense["embed_tokens.weight"]}, str(ckpt / "model-dense-part0-of-2.safetensors"))
    save_file({"norm.weight": dense["norm.weight"]}, str(ckpt / "model-dense-part1-of-2.safetensors"))
    for r in range(2):
        for j, key in enumerate((KEY, other)):  # shard r's tensors: one per part
            save_file({key: full[key][4 * r:4 * r + 4].contiguous()},
                      str(ckpt / f"model-experts-ep{r}-of-2-part{j}-of-2.safetensors"))
    got = read_tensors(ckpt, "model", (2, 6))
    assert got.keys() == {*dense, *full}
    for k, v in dense.items():
        assert torch.equal(got[k], v)
    for k, v in full.items():
        assert torch.equal(got[k], v[2:6])


def test_a_shard_missing_a_tensor_is_named(tmp_path):
    _checkpoint(tmp_path / "ckpt", 2)
    (tmp_path / "ckpt" / "model-experts-ep1-of-2-part0-of-1.safetensors").unlink()
    save_file({"other": torch.ones(4, 1)}, str(tmp_path / "ckpt" / "model-experts-ep1-of-2-part0-of-1.safetensors"))
    with pytest.raises(KeyError, match="expert shard 1 has no layers.1.mlp.experts.down_proj"):
        read_tensors(tmp_path / "ckpt", "model")


def test_one_tensor_in_two_parts_is_an_error(tmp_path):
    _checkpoint(tmp_path / "ckpt", 1)
    save_file({"embed_tokens.weight": torch.zeros(5, 2)}, str(tmp_path / "ckpt" / "model-dense-part1-of-2.safetensors"))
    with pytest.raises(ValueError, match="embed_tokens.weight is in two files"):
        read_tensors(tmp_path / "ckpt", "model")


@pytest.mark.parametrize("experts", [None, (2, 6), (1, 7)])
def test_flat_ranges_read_only_their_rows(tmp_path, experts):
    """flat_range (a ZeRO fragment of a moment on resume) equals the same range of the whole
    tensor, for ranges inside one row, across rows and across expert shard files."""
    full = _checkpoint(tmp_path / "ckpt", 4)
    g = torch.Generator().manual_seed(1)
    vector = torch.randn(10, generator=g)
    save_file({"norm.weight": vector}, str(tmp_path / "ckpt" / "model-dense-part1-of-2.safetensors"))
    first, last = experts or (0, 8)
    with TensorReader(tmp_path / "ckpt", "model", experts) as reader:
        assert reader.shape(KEY) == (last - first, 3, 2) and reader.shape("norm.weight") == (10,)
        local = full[first:last].flatten()
        for start, numel in [(0, 1), (1, 4), (5, 7), (0, local.numel()), (local.numel() - 3, 3)]:
            assert torch.equal(reader.flat_range(KEY, start, numel), local[start:start + numel]), (start, numel)
        assert torch.equal(reader.flat_range("norm.weight", 3, 5), vector[3:8])
        assert torch.equal(reader.flat_range("embed_tokens.weight", 3, 4), torch.ones(4))
        with pytest.raises(ValueError, match=r"elements \[.*\) of .*down_proj, which has shape"):
            reader.flat_range(KEY, local.numel() - 2, 3)  # past this rank's experts


def test_with_a_manifest_only_the_files_read_from_are_opened(tmp_path):
    """The manifest lists each file's tensors and shapes: the reader indexes from it and opens a
    file only to read from it (at 671B a resuming rank needs a few of ~4,700 files). Without the
    lists it opens every header, with the same results."""
    ckpt = tmp_path / "ckpt"
    full = _checkpoint(ckpt, 4)  # one dense file, four expert shards of two experts each
    with TensorReader(ckpt, "model", (2, 4)) as reader:  # no manifest: every header
        assert reader.files_opened == 5
        headers = {k: reader[k] for k in reader.keys()}
    _write_meta(ckpt, {"step": 0}, _manifest_entries(ckpt, sorted(f.name for f in ckpt.iterdir())))
    with TensorReader(ckpt, "model", (2, 4)) as reader:
        assert reader.keys() == set(headers) and reader.files_opened == 0
        assert reader.shape(KEY) == (2, 3, 2) and reader.files_opened == 0
        assert torch.equal(reader[KEY], full[2:4]) and reader.files_opened == 1  # shard 1 only
        assert torch.equal(reader.flat_range(KEY, 7, 3), full[2:4].flatten()[7:10]) and reader.files_opened == 1
        assert torch.equal(reader["embed_tokens.weight"], headers["embed_tokens.weight"])
        assert reader.files_opened == 2
