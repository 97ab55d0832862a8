"""Every bad input through the real CLI: exit status 2, one line on stderr naming the key (or the
file), no traceback. The table in the README lists the same rows.

Rows that start training run `python -m train.cli` in a subprocess (they join a process group and
build the engine); the rest, refused before any of that, call the same `train.cli.main` in this
process, where a traceback would fail the test just the same and no interpreter start (~3 s) is
paid per row."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import run_cli

SMOKE = "configs/smoke.yaml"
# fp8 backend te must be refused for want of a GPU even on a machine that has one
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """A tiny run with a checkpoint at step 1, to resume with another model."""
    run = tmp_path_factory.mktemp("tiny_run")
    run_cli("train", SMOKE, *tiny_data, f"train.run_dir={run}", "train.steps=1", "checkpoint.interval=1")
    return run


@pytest.fixture
def bad_files(tmp_path) -> Path:
    (tmp_path / "bad.yaml").write_text("model: {hidden_size: 64\n  oops: [\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "list.yaml").write_text("- model\n- data\n")
    import torch

    from model.hf import save_safetensors

    for name, config in (("hf_badjson", '{"model_type": "deepseek_v3",'), ("hf_llama", '{"model_type": "llama"}'),
                         ("hf_other", '{"model_type": "deepseek_v3"}'), ("hf_stale", "{}")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config)
        save_safetensors({"other.weight": torch.zeros(2)}, tmp_path / name / "model.safetensors")
    return tmp_path


# (id, arguments after the command; {tmp} is a per-test folder, {data} the tiny overrides,
#  {run} a tiny run with a checkpoint), what must appear on the one stderr line
ROWS = [
    ("unknown key", ["train", SMOKE, "train.stepz=5"], ["train.stepz", "unknown key", "did you mean 'steps'"]),
    ("wrong type", ["train", SMOKE, "train.steps=abc"], ["train.steps", "'abc'", "Integer"]),
    ("zero steps", ["train", SMOKE, "train.steps=0"], ["train.steps=0", "must be a positive integer"]),
    ("negative steps", ["train", SMOKE, "train.steps=-5"], ["train.steps=-5", "must be a positive integer"]),
    ("seq_len > max positions", ["train", SMOKE, "data.seq_len=100000"],
     ["data.seq_len=100000", "model.max_position_embeddings=256"]),
    ("ep not dividing experts", ["train", SMOKE, "parallel.ep=3"], ["parallel.ep=3", "model.n_routed_experts=16"]),
    ("top-k > experts", ["train", SMOKE, "model.num_experts_per_tok=100"],
     ["model.num_experts_per_tok=100", "n_routed_experts=16"]),
    ("n_group not dividing experts", ["train", SMOKE, "model.n_group=3"], ["model.n_group=3", "must divide"]),
    ("zero heads", ["train", SMOKE, "model.num_attention_heads=0"], ["model.num_attention_heads=0", "positive"]),
    ("odd rope head dim", ["train", SMOKE, "model.qk_rope_head_dim=7"], ["model.qk_rope_head_dim=7", "even"]),
    ("zero_stage 3", ["train", SMOKE, "parallel.zero_stage=3"], ["parallel.zero_stage=3", "0, 1 or 2"]),
    ("bf16 below ZeRO-2", ["train", SMOKE, "model.precision=bf16", "parallel.zero_stage=1"],
     ["parallel.zero_stage=1", "2 with model.precision=bf16", "gradients in fp32"]),
    ("fp8 on bf16 weights below ZeRO-2", ["train", SMOKE, "model.precision=fp8", "fp8.weights=bf16"],
     ["parallel.zero_stage=0", "2 with fp8.weights=bf16", "gradients in fp32"]),
    ("fp8 weights in another dtype", ["train", SMOKE, "fp8.weights=fp16"], ["fp8.weights='fp16'", "fp32, bf16"]),
    ("a typo in a data source", ["train", SMOKE, "data.sources=[{kind: txt, pth: corpus}]"],
     ["data.sources[0].pth", "unknown key", "did you mean 'path'"]),
    ("unknown wandb mode", ["train", SMOKE, "logging.wandb=maybe"],
     ["logging.wandb='maybe'", "online, offline, disabled"]),
    ("negative min_lr", ["train", SMOKE, "optim.min_lr=-1"], ["optim.min_lr=-1.0", ">= 0"]),
    ("NaN lr", ["train", SMOKE, "optim.lr=nan"], ["optim.lr=nan", "must be a finite number"]),
    ("infinite norm eps", ["train", SMOKE, "model.rms_norm_eps=inf"], ["model.rms_norm_eps=inf", "finite"]),
    ("negative final lr", ["train", SMOKE, "schedule.final_lr=-0.5"], ["schedule.final_lr=-0.5", ">= 0"]),
    ("a YAML list", ["train", "{tmp}/list.yaml"], ["list.yaml", "a YAML mapping of sections", "not a list"]),
    ("zero checkpoint.keep", ["train", SMOKE, "checkpoint.keep=0"], ["checkpoint.keep=0", "positive"]),
    ("override without =", ["train", SMOKE, "train.steps"], ["train.steps", "dotted.key=value"]),
    ("missing config file", ["train", "configs/nope.yaml"], ["config='configs/nope.yaml'", "file not found"]),
    ("invalid YAML", ["train", "{tmp}/bad.yaml"], ["bad.yaml", "not valid YAML", "line 2, column 7"]),
    ("resume path missing", ["train", SMOKE, "{data}", "train.run_dir={tmp}/run", "train.resume=/nonexistent"],
     ["train.resume='/nonexistent'", "no complete checkpoint"]),
    ("checkpoint of another model",
     ["train", SMOKE, "{data}", "train.run_dir={tmp}/run", "train.resume={run}", "model.hidden_size=96"],
     ["model.hidden_size=96", "was trained with model.hidden_size=64"]),
    ("missing data dir (train before prepare-data)",
     ["train", SMOKE, "{data}", "data.dir={tmp}/nodata", "train.run_dir={tmp}/run"],
     ["data.dir=", "nodata", "dsv3 prepare-data"]),
    ("jsonl source with a bad line",
     ["prepare-data", SMOKE, "{data}", "data.dir={tmp}/data", "data.sources=[{kind: jsonl, path: '{tmp}/bad.jsonl'}]",
      "data.val_documents=0"],
     ["data.sources[0].path=", "bad.jsonl", "line 2 is not valid JSON"]),
    ("listed shards that do not exist",
     ["train", SMOKE, "{data}", "train.run_dir={tmp}/run", "data.train_shards={tmp}/gone-{0..2}.tar"],
     ["data.train_shards: shard ", "gone-0.tar does not exist (and 2 more)"]),
    ("import-hf: config.json not JSON", ["import-hf", "{tmp}/hf_badjson", "{tmp}/new"],
     ["hf_badjson/config.json: not valid JSON"]),
    ("import-hf: another architecture", ["import-hf", "{tmp}/hf_llama", "{tmp}/new"],
     ["hf_llama/config.json: model_type='llama'", "expected 'deepseek_v3'"]),
    ("import-hf: weights of another model", ["import-hf", "{tmp}/hf_other", "{tmp}/new"],
     ["hf_other: checkpoint lacks embed_tokens.weight"]),
    ("import-hf into a run directory", ["import-hf", "{tmp}/hf_other", "{run}"],
     ["exists and is not an empty directory", "nothing was written"]),
    ("export-hf over an HF checkpoint", ["export-hf", "{run}", "{tmp}/hf_stale"],
     ["hf_stale already holds an HF checkpoint (config.json, model.safetensors)", "nothing was written"]),
    ("fp8 backend te without a GPU",
     ["train", SMOKE, "{data}", "train.run_dir={tmp}/run", "model.precision=fp8", "fp8.backend=te"],
     ["fp8.backend='te'", "needs a CUDA GPU", "fp8.backend=emulated"]),
]


@pytest.mark.parametrize("args,expect", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_exits_2_with_one_line(request, bad_files, capsys, args, expect):
    needs_run = "{run}" in " ".join(args)
    data = request.getfixturevalue("tiny_data") if any("{data}" in a for a in args) else []
    run = request.getfixturevalue("tiny_run") if needs_run else None
    argv = []
    for a in args:
        if a == "{data}":
            argv += data
        else:
            argv.append(a.replace("{tmp}", str(bad_files)).replace("{run}", str(run)))
    if argv[0] == "train" and data:  # gets as far as the trainer
        proc = run_cli(*argv, check=False, env=NO_GPU, timeout=300)
        code, stderr = proc.returncode, proc.stderr
    else:
        from train.cli import main

        code, stderr = main(argv), capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"dsv3 {argv[0]}: error: "), lines[0]
    for fragment in expect:
        assert fragment in lines[0], (fragment, lines[0])
