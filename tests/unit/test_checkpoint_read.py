"""Reading a checkpoint for one expert-parallel rank (train/checkpoint.py read_tensors): dense
tensors whole, stacked expert tensors only the rank's experts, whichever shard files hold them;
TensorReader reads each tensor when asked for it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from train.checkpoint import TensorReader, read_tensors

KEY = "layers.1.mlp.experts.down_proj"


def _checkpoint(path, saved_ep: int, n_experts: int = 8):
    """A checkpoint's model files as saved at EP=saved_ep; returns the whole expert tensor."""
    path.mkdir()
    full = torch.randn(n_experts, 3, 2, generator=torch.Generator().manual_seed(saved_ep))
    save_file({"embed_tokens.weight": torch.ones(5, 2)}, str(path / "model-dense.safetensors"))
    per = n_experts // saved_ep
    for r in range(saved_ep):
        save_file({KEY: full[r * per:(r + 1) * per].contiguous()}, str(path / f"model-experts-ep{r}-of-{saved_ep}.safetensors"))
    return full


@pytest.mark.parametrize("saved_ep", [1, 2, 4])
@pytest.mark.parametrize("experts", [None, (0, 8), (0, 4), (4, 8), (2, 4), (6, 8), (1, 7)])
def test_reads_the_rows_asked_for_across_shard_files(tmp_path, saved_ep, experts):
    full = _checkpoint(tmp_path / "ckpt", saved_ep)
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
    with pytest.raises(FileNotFoundError, match="no optim-dense.safetensors"):
        TensorReader(tmp_path / "ckpt", "optim")
