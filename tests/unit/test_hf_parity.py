"""Our model against HF transformers' DeepseekV3 (an implementation nobody here wrote).

Tolerance: logits agree to 1e-5 absolute in fp32 (seen: < 1e-6 with logits of magnitude ~1.5).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from model import DeepSeekV3, hf

from .helpers import PARITY_CONFIGS, build, make_config

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

ATOL = 1e-5


def _hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_ours_to_hf_logits_match(name, tmp_path):
    model = build(seed=1, **PARITY_CONFIGS[name]).eval()
    hf.save_pretrained(model, tmp_path)
    ref = _hf_model(tmp_path)
    assert type(ref).__name__ == "DeepseekV3ForCausalLM"
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(tokens), ref(tokens).logits
    assert ours.abs().max() > 0.5, "logits too small for the comparison to mean anything"
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_hf_random_init_to_ours(name, tmp_path):
    """HF initialises (its own init, its own file writer); we load it and match its logits."""
    torch.manual_seed(3)
    cfg = make_config(**PARITY_CONFIGS[name])
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in hf.config_to_hf(cfg).items()
                                              if k not in ("architectures", "model_type", "torch_dtype")})
    hf_cfg.initializer_range = 0.05
    ref = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name_, p in ref.named_parameters():
            if name_.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
        for mod in ref.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.copy_(0.05 * torch.randn_like(mod.e_score_correction_bias))
    ref.save_pretrained(tmp_path)
    ours = hf.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), ref(tokens).logits, atol=ATOL, rtol=0)


def test_round_trip_is_bit_exact_including_mtp(tmp_path):
    model = build(seed=5, num_nextn_predict_layers=2, **PARITY_CONFIGS["full_rank_q_yarn"])
    hf.save_pretrained(model, tmp_path)
    back = hf.from_pretrained(tmp_path)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert back.cfg == model.cfg


def test_mtp_layout_matches_the_release(tmp_path):
    model = build(seed=6)
    hf.save_pretrained(model, tmp_path, max_shard_bytes=200_000)  # force several shards
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    L = model.cfg.num_hidden_layers
    for part in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight",
                 "shared_head.norm.weight", "shared_head.head.weight", "mlp.experts.0.gate_proj.weight",
                 "mlp.gate.e_score_correction_bias", "self_attn.kv_a_proj_with_mqa.weight"):
        assert f"model.layers.{L}.{part}" in index, part
    assert f"model.layers.{L + 1}.enorm.weight" not in index
    assert len(set(index.values())) > 1
    back = hf.from_pretrained(tmp_path)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def _quantize_e4m3_blockwise(w: torch.Tensor, block: int = 128):
    """Test-side quantiser written tile by tile, as the release was made: q = w / s, s = amax / 448."""
    out_f, in_f = w.shape
    nb_o, nb_i = -(-out_f // block), -(-in_f // block)
    q = torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(nb_o, nb_i)
    for i in range(nb_o):
        for j in range(nb_i):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = tile.abs().max().clamp_min(1e-12) / 448.0
            scale_inv[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale_inv


def test_fp8_release_weights_are_dequantised(tmp_path):
    """A checkpoint stored like the official release (E4M3 + 128×128 weight_scale_inv) imports."""
    from safetensors.torch import load_file, save_file

    model = build(seed=7, hidden_size=160, intermediate_size=300)  # dims that do not divide 128
    hf.save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    quantised = []
    for k in list(tensors):
        t = tensors[k]
        # the release quantises the linear layers; not embeddings, norms, router or head
        if k.endswith("proj.weight") and "mlp.gate." not in k and t.dim() == 2:
            # widen the spread across tiles so a transposed or misplaced scale shows
            t = t * torch.linspace(0.1, 10.0, t.shape[1])
            tensors[k] = t
            tensors[k], tensors[k + "_scale_inv"] = _quantize_e4m3_blockwise(t)
            quantised.append((k, t))
    save_file(tensors, tmp_path / "model.safetensors")
    assert len(quantised) > 10
    back = hf.from_pretrained(tmp_path)
    hf_back = hf.state_dict_to_hf(back)
    for k, original in quantised:
        got = hf_back[k]
        # E4M3 has 3 mantissa bits: relative error per element ≤ 2^-4 for normal values;
        # values far below their tile's max fall to subnormals, whose step is 2^-9 of 448·s.
        tile_max = original.abs().amax()
        bound = original.abs() * 2**-4 + tile_max / 448 * 2**-9
        assert bool(((got - original).abs() <= bound).all()), k
        # and the import is not just "close": it equals q · scale_inv exactly
        assert (got - original).abs().max() < 0.07 * tile_max, k


def test_softmax_router_matches_hf_deepseek_v2():
    """V2-style (softmax, unnormalised, group-limited greedy) MoE against HF's DeepseekV2Moe."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Config, DeepseekV2Moe

    for n_group, topk_group, method in ((1, 1, "greedy"), (4, 2, "group_limited_greedy")):
        cfg = make_config(scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
                          n_group=n_group, topk_group=topk_group, n_shared_experts=2)
        torch.manual_seed(8)
        ours = DeepSeekV3(cfg).layers[1].mlp
        v2cfg = DeepseekV2Config(
            hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size,
            n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
            num_experts_per_tok=cfg.num_experts_per_tok, n_group=n_group, topk_group=topk_group,
            topk_method=method, routed_scaling_factor=1.0, norm_topk_prob=False,
        )
        ref = DeepseekV2Moe(v2cfg)
        with torch.no_grad():
            ref.gate.weight.copy_(ours.gate.weight)
            ref.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
            ref.experts.down_proj.copy_(ours.experts.down_proj)
            for n in ("gate_proj", "up_proj", "down_proj"):
                getattr(ref.shared_experts, n).weight.copy_(getattr(ours.shared_experts, n).weight)
        x = torch.randn(3, 10, cfg.hidden_size)
        with torch.no_grad():
            out, _, _ = ours(x)
            torch.testing.assert_close(out, ref(x), atol=1e-6, rtol=0)


def test_softmax_model_export_is_refused(tmp_path):
    model = build(scoring_func="softmax")
    with pytest.raises(ValueError, match="scoring_func"):
        hf.save_pretrained(model, tmp_path)


class _CountingSource:
    """Our names -> tensors, counting reads (what a checkpoint reader hands write_hf)."""

    def __init__(self, state_dict, out_dir):
        self.sd, self.out_dir, self.reads, self.shards_on_disk = state_dict, out_dir, [], []

    def keys(self):
        return list(self.sd)

    def __getitem__(self, key):
        self.reads.append(key)
        self.shards_on_disk.append(len(list(self.out_dir.glob("*.partial"))))
        return self.sd[key]


def test_export_goes_tensor_by_tensor_into_bounded_shards(tmp_path):
    """write_hf (dsv3 export-hf) reads each of our tensors once, layer by layer (the embedding
    and head once more per MTP module, for its copies), and writes shards of at most
    max_shard_bytes as they fill; the result loads back exactly, also in bf16."""
    from safetensors import safe_open

    model = build(seed=8)
    source = _CountingSource(model.state_dict(), tmp_path / "fp32")
    limit = 150_000
    hf.write_hf(source, model.cfg, tmp_path / "fp32", max_shard_bytes=limit)
    extra = ["embed_tokens.weight", "lm_head.weight"] * model.cfg.num_nextn_predict_layers
    assert sorted(source.reads) == sorted(list(model.state_dict()) + extra)
    layers = [int(k.split(".")[1]) for k in source.reads if k.startswith("layers.")]
    assert layers == sorted(layers)  # layer by layer
    shards = sorted((tmp_path / "fp32").glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and not list((tmp_path / "fp32").glob("*.partial"))
    # each shard went to disk once full, before the tensors after it were read
    assert source.shards_on_disk[-1] >= len(shards) - 2 and source.shards_on_disk == sorted(source.shards_on_disk)
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
            assert sum(4 * torch.Size(s).numel() for s in sizes) <= limit, shard.name
    back = hf.from_pretrained(tmp_path / "fp32")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    hf.write_hf(model.state_dict(), model.cfg, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = hf.from_pretrained(tmp_path / "bf16")
    for k, v in model.state_dict().items():
        # the routing correction biases stay fp32 (transformers keeps them so): exact
        want = v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16).to(v.dtype)
        assert torch.equal(back.state_dict()[k], want), k


def test_bf16_export_keeps_the_routing_bias_in_fp32_as_transformers_does(tmp_path):
    model = build(seed=8)
    with torch.no_grad():
        for moe in model.moe_layers():  # values bf16 cannot hold (its spacing at 0.7 is 2**-8)
            moe.gate.e_score_correction_bias.copy_(0.7 + 1e-3 * torch.arange(moe.gate.e_score_correction_bias.numel()))
    hf.write_hf(model.state_dict(), model.cfg, tmp_path, dtype=torch.bfloat16)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    theirs = {k: v for k, v in ref.state_dict().items() if k.endswith("e_score_correction_bias")}
    ours = {k: v for k, v in model.state_dict().items() if k.startswith("layers.") and k.endswith("correction_bias")}
    assert len(theirs) == len(ours) > 0
    for k, v in ours.items():
        assert theirs["model." + k].dtype == torch.float32 and torch.equal(theirs["model." + k], v), k
    assert ref.model.embed_tokens.weight.dtype == torch.bfloat16


def test_export_refuses_a_directory_holding_a_checkpoint_and_reads_like_transformers(tmp_path):
    """Old shards beside a new model.safetensors: transformers reads the single file, we read an
    index first, so the two loaded different weights. write_hf now refuses such a directory, and
    the reader takes the single file first, as transformers does."""
    old, new = build(seed=1), build(seed=2)
    hf.write_hf(old.state_dict(), old.cfg, tmp_path / "d", max_shard_bytes=150_000)  # shards + index
    before = sorted(f.name for f in (tmp_path / "d").iterdir())
    with pytest.raises(FileExistsError, match="already holds an HF checkpoint"):
        hf.write_hf(new.state_dict(), new.cfg, tmp_path / "d")
    assert sorted(f.name for f in (tmp_path / "d").iterdir()) == before  # nothing written
    (tmp_path / "d" / "notes.txt").write_text("a directory with other files is fine")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("")
    hf.write_hf(new.state_dict(), new.cfg, tmp_path / "e")
    # a stale index beside a single file (another tool's doing): both loaders take the single file
    for f in (tmp_path / "d").glob("model-*"):
        (tmp_path / "e" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "e" / "model.safetensors.index.json").write_bytes((tmp_path / "d" / "model.safetensors.index.json").read_bytes())
    back = hf.from_pretrained(tmp_path / "e").state_dict()
    assert all(torch.equal(back[k], v) for k, v in new.state_dict().items())
    theirs = _hf_model(tmp_path / "e").model.embed_tokens.weight
    assert torch.equal(theirs, new.embed_tokens.weight)


def test_the_end_of_document_token_is_bos_and_eos_of_the_export(tmp_path):
    model = build(seed=3)
    hf.write_hf(model.state_dict(), model.cfg, tmp_path / "with", eod_token_id=5)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "with").eos_token_id == 5
    assert transformers.AutoConfig.from_pretrained(tmp_path / "with").bos_token_id == 5
    assert _hf_model(tmp_path / "with").generation_config.eos_token_id == 5
    hf.write_hf(model.state_dict(), model.cfg, tmp_path / "without")
    assert "eos_token_id" not in json.loads((tmp_path / "without" / "config.json").read_text())


def test_import_writes_one_part_per_layer_and_reads_each_tensor_once(tmp_path, monkeypatch):
    """dsv3 import-hf converts a layer at a time into the checkpoint's part files: a dense part
    per layer (and one for the embedding, norm and head), an expert part per MoE layer, each HF
    tensor read once; the weights equal the in-memory from_pretrained's."""
    from safetensors import safe_open

    from train import checkpoint as ckpt_io

    model = build(seed=9)
    hf.save_pretrained(model, tmp_path / "hf")
    reads = []
    real = safe_open

    class Counting:
        def __init__(self, *args, **kwargs):
            self.f = real(*args, **kwargs)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, k):
            return self.inner.get_slice(k)

        def get_tensor(self, k):
            reads.append(k)
            return self.inner.get_tensor(k)

    monkeypatch.setattr(hf, "safe_open", Counting)
    with hf.read_hf(tmp_path / "hf") as reader:
        assert reads == []  # names and shapes checked from the headers alone
        ckpt = ckpt_io.save_weights_only(reader, tmp_path / "run", reader.cfg)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    copies = {k for k in stored if k.endswith(("embed_tokens.weight", "shared_head.head.weight"))
              and k.startswith(f"model.layers.{model.cfg.num_hidden_layers}.")}  # MTP's copies: not read
    assert sorted(reads) == sorted(stored - copies)
    cfg = model.cfg
    n_dense = 1 + cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace + cfg.num_nextn_predict_layers
    names = sorted(f.name for f in ckpt.iterdir() if f.suffix == ".safetensors")
    assert names == sorted([f"model-dense-part{i}-of-{n_dense}.safetensors" for i in range(n_dense)]
                           + [f"model-experts-ep0-of-1-part{j}-of-{n_moe}.safetensors" for j in range(n_moe)])
    got, want = ckpt_io.load_model_weights(ckpt), hf.from_pretrained(tmp_path / "hf").state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
