"""End-to-end training through the real CLI, DeepSpeed engine and webdataset shards."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support import REPO, TINY, rows, run_cli

KEYS = ["step", "loss", "lm_loss", "mtp_loss", "lr", "batch_size", "grad_norm", "tokens_per_s", "mfu", "peak_mem_bytes",
        "skipped_steps", "bad_shards", "expert_load_maxvio", "val_loss"]


def losses(run_dir: Path) -> dict[int, tuple]:
    return {r["step"]: (r["loss"], r["lm_loss"], r["mtp_loss"], r["grad_norm"]) for r in rows(run_dir)}


def val_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in rows(run_dir) if r["val_loss"] is not None}


@pytest.fixture(scope="module")
def straight_run(tiny_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight")
    run_cli("train", "configs/smoke.yaml", *tiny_data, f"train.run_dir={run}", "train.steps=8")
    return run


def _straight_and_resumed(tmp_path: Path, overrides: list[str], stop: int, end: int) -> tuple[Path, Path]:
    """Two runs of smoke.yaml + overrides: one straight to step `end`, one stopped at `stop` and
    resumed to `end`. Returns their run directories."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_cli("train", "configs/smoke.yaml", *overrides, f"train.run_dir={straight}", f"train.steps={end}")
    for steps in (stop, end):
        run_cli("train", "configs/smoke.yaml", *overrides, f"train.run_dir={stopped}", f"train.steps={steps}")
    return straight, stopped


def test_resume_is_bit_exact(tiny_data, straight_run, tmp_path):
    run = tmp_path / "stopped"
    run_cli("train", "configs/smoke.yaml", *tiny_data, f"train.run_dir={run}", "train.steps=4")
    assert max(r["step"] for r in rows(run)) == 4
    run_cli("train", "configs/smoke.yaml", *tiny_data, f"train.run_dir={run}", "train.steps=8")
    a, b = losses(straight_run), losses(run)
    assert sorted(a) == sorted(b) == list(range(0, 9))
    assert a == b, "resumed run must equal the straight run bit for bit on CPU"
    # the stopped run also evaluated at its last step (4); every shared eval step agrees exactly
    va, vb = val_losses(straight_run), val_losses(run)
    assert set(vb) == set(va) | {4}
    assert all(va[s] == vb[s] for s in va)


def test_batch_ramp_steps_at_step_boundaries_and_resumes_exactly(tiny_data, tmp_path):
    """A batch-size ramp (4, 4, 8, then 12 sequences: 1, 1, 2, 3 micro-batches) changes the
    gradient-accumulation count mid-run. The optimizer must step after each step's last
    micro-batch; counting micro-batches over the whole run (DeepSpeed's default) puts step 4's
    boundary after its second micro-batch there, but not in a run resumed at step 3, so the
    resumed run must equal the straight one and report the ramp's batch sizes."""
    ramp = [*tiny_data, "train.global_batch_size=12", "schedule.batch_ramp_start=4", "schedule.batch_ramp_steps=3",
            "schedule.batch_ramp_increment=4", "checkpoint.interval=3"]
    straight, stopped = _straight_and_resumed(tmp_path, ramp, stop=3, end=6)
    assert losses(straight) == losses(stopped)
    assert set(losses(straight)) == set(range(7))
    assert [r["batch_size"] for r in rows(stopped) if r["step"] > 0] == [4, 4, 8, 12, 12, 12]


def test_bf16_zero2_trains_and_resumes_exactly_on_cpu(tiny_data, tmp_path):
    """The GPU configs' precision (bf16 weights, fp32 masters and gradients, ZeRO-2) through the real
    engine on CPU: it trains, and a run stopped at step 2 and resumed equals the straight one."""
    bf16 = [*tiny_data, "model.precision=bf16", "parallel.zero_stage=2", "train.eval_interval=2"]
    straight, stopped = _straight_and_resumed(tmp_path, bf16, stop=2, end=4)
    assert losses(straight) == losses(stopped)
    vals = val_losses(straight)
    assert vals[4] < vals[0]


def test_activation_checkpointing_trains_the_same_run(tiny_data, straight_run, tmp_path):
    """Blocks recomputed in backward through the real engine: every step's losses and grad norm,
    the expert load (from the counts the bias update reads) and the val losses equal the
    straight run's exactly on CPU."""
    run = tmp_path / "checkpointed"
    run_cli("train", "configs/smoke.yaml", *tiny_data, f"train.run_dir={run}", "train.steps=8",
            "train.activation_checkpointing=true")
    assert losses(run) == losses(straight_run)
    assert val_losses(run) == val_losses(straight_run)
    load = [{k: v for k, v in r.items() if k.startswith("expert_load_maxvio")} for r in rows(run)]
    assert load == [{k: v for k, v in r.items() if k.startswith("expert_load_maxvio")} for r in rows(straight_run)]


def test_metrics_rows_have_every_documented_key(straight_run):
    table = rows(straight_run)
    assert table[0]["step"] == 0 and table[0]["val_loss"] is not None and table[0]["loss"] is None
    for r in table:
        for key in KEYS + ["expert_load_maxvio/layer_1", "expert_load_maxvio/layer_2"]:  # layer 2 = MTP block
            assert key in r, (key, r["step"])
    train_rows = table[1:]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    for r in train_rows:
        for key in ("loss", "lm_loss", "mtp_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
                    "expert_load_maxvio", "expert_load_maxvio/layer_1"):
            assert isinstance(r[key], float) and r[key] == r[key], (key, r)
        assert 0 < r["mfu"] < 1
        assert r["peak_mem_bytes"] > 0
        assert r["batch_size"] == 8  # TINY's global batch (no ramp)
        assert abs(r["loss"] - (r["lm_loss"] + 0.3 * r["mtp_loss"])) < 1e-4
    assert [r["step"] for r in table if r["val_loss"] is not None] == [0, 3, 6, 8]
    assert (straight_run / "config.yaml").is_file()
    assert sorted(p.name for p in (straight_run / "checkpoints").glob("step_*")) == ["step_00000006", "step_00000008"]
    assert (straight_run / "checkpoints" / "latest").read_text().strip() == "step_00000008"


def test_second_run_says_it_is_complete(tiny_data, straight_run):
    before = (straight_run / "metrics.jsonl").read_text()
    proc = run_cli("train", "configs/smoke.yaml", *tiny_data, f"train.run_dir={straight_run}", "train.steps=8")
    assert "already complete at step 8" in proc.stderr
    assert (straight_run / "metrics.jsonl").read_text() == before


def test_start_over_sets_the_earlier_runs_checkpoints_aside(tiny_data, straight_run, tmp_path):
    """train.resume=never in a directory holding an earlier run's checkpoints (steps 6 and 8):
    they move to checkpoints-superseded-*, intact, so retention keeps this run's step-3 save
    (by step number it is the oldest) and a later auto-resume continues this run, not the old one."""
    import shutil

    run = tmp_path / "again"
    shutil.copytree(straight_run, run)
    proc = run_cli("train", "configs/smoke.yaml", *tiny_data, f"train.run_dir={run}", "train.steps=3",
                   "train.resume=never")
    assert "moved 2 checkpoint(s) past step 0" in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000003"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    (aside,) = run.glob("checkpoints-superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step_00000006", "step_00000008"]
    assert (aside / "metrics.jsonl").read_text() == (straight_run / "metrics.jsonl").read_text()  # the old run's
    assert all((aside / n / "dsv3_meta.json").is_file() for n in ("step_00000006", "step_00000008"))


def test_resuming_another_runs_checkpoint_checks_that_runs_tokenizer(tiny_data, straight_run, tmp_path):
    """The tokenizer check compared the data with the new run directory's tokenizer.json, which a
    run resumed from another directory does not have yet: it passed on any data."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(straight_run, other)
    tok = other / "tokenizer.json"
    tok.write_text(tok.read_text() + "\n")  # another tokenizer, as far as the check can tell
    proc = run_cli("train", "configs/smoke.yaml", *tiny_data, f"train.run_dir={tmp_path / 'new'}",
                   f"train.resume={other}", "train.steps=9", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"its tokenizer differs from the one run {other} was trained with" in proc.stderr


def test_bad_override_exits_2_naming_key_and_file(tiny_data):
    proc = run_cli("train", "configs/smoke.yaml", "model.hiden_size=3", check=False)
    assert proc.returncode == 2
    assert "model.hiden_size" in proc.stderr and "configs/smoke.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("train", "configs/smoke.yaml", "train.steps=ten", check=False)
    assert proc.returncode == 2 and "train.steps" in proc.stderr


def test_export_hf_matches_transformers(straight_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from train.sample import load_run

    run_cli("export-hf", str(straight_run), str(tmp_path / "hf"))
    _, ours, _ = load_run(straight_run)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), ref(tokens).logits, atol=1e-5, rtol=0)
    # the tokenizer goes along, and both it and the model know where a document ends (without
    # that, transformers took the release's eos id 1, another tokenizer's, and generate ran on)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.eos_token == "<|endoftext|>" and ref.config.eos_token_id == tok.eos_token_id
    assert ref.generation_config.eos_token_id == tok.eos_token_id


def test_checkpoint_and_export_files_are_readable_like_their_json(straight_run, tmp_path):
    # the weights must reach whoever may read config.json and dsv3_meta.json (a teammate's
    # evaluation, an inference server running as another user), not only their owner
    run_cli("export-hf", str(straight_run), str(tmp_path / "hf"))
    ckpt = sorted((straight_run / "checkpoints").glob("step_*"))[-1]
    for folder, beside in ((ckpt, "dsv3_meta.json"), (tmp_path / "hf", "config.json")):
        want = stat.S_IMODE((folder / beside).stat().st_mode)
        files = sorted(folder.glob("*.safetensors"))
        assert files and {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == dict.fromkeys(
            (f.name for f in files), want)


def test_sample_from_an_empty_prompt_starts_after_an_end_of_document(straight_run):
    # an empty prompt used to end in a traceback (a float tensor of no ids); now the model writes
    # the start of a document, as after every <|endoftext|> it was trained on
    out = run_cli("sample", str(straight_run), "", "--tokens", "8", "--temperature", "0").stdout
    assert out.strip() and "<|endoftext|>" not in out


def test_sample_and_export_say_when_they_pass_over_a_damaged_checkpoint(straight_run, tmp_path, capsys):
    """They used the older checkpoint silently, and a run directory without any checkpoint was
    reported as a bad train.resume, a key the user of sample/export never set."""
    import shutil

    from train.sample import resolve_run

    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    with open(ckpts[-1] / "model-dense-part0-of-1.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\xff" * 16)
    assert resolve_run(run)[1] == ckpts[-2]
    assert f"checkpoint {ckpts[-1]} fails verification" in capsys.readouterr().err
    for c in ckpts:
        shutil.rmtree(c)
    with pytest.raises(FileNotFoundError, match=f"^{run}: no complete checkpoint there"):
        resolve_run(run)


def test_import_hf_starts_a_run_from_those_weights(tiny_data, straight_run, tmp_path):
    run_cli("export-hf", str(straight_run), str(tmp_path / "hf"))
    run_cli("import-hf", "--config", "configs/smoke.yaml", str(tmp_path / "hf"), str(tmp_path / "imported"), *TINY)
    run = tmp_path / "continued"
    run_cli("train", "configs/smoke.yaml", *tiny_data, f"train.run_dir={run}", f"train.resume={tmp_path / 'imported'}",
            "train.steps=1")
    # step 0 evaluates the imported weights: the trained model's final val loss, not a fresh init's
    assert abs(rows(run)[0]["val_loss"] - rows(straight_run)[-1]["val_loss"]) < 1e-5


def test_import_hf_model_fields_come_from_config_json_then_the_yaml_then_overrides(straight_run, tmp_path):
    """config.json fixes the architecture; the YAML's model fields it does not describe, and any
    model.* override, used to be dropped silently for the defaults."""
    from train.config import load_config

    run_cli("export-hf", str(straight_run), str(tmp_path / "hf"))
    yaml = tmp_path / "other.yaml"
    yaml.write_text(Path("configs/smoke.yaml").read_text().replace("mtp_loss_weight: 0.3", "mtp_loss_weight: 0.2"))
    run_cli("import-hf", "--config", str(yaml), str(tmp_path / "hf"), str(tmp_path / "a"),
            "model.max_position_embeddings=128", "model.moe_impl=loop")
    m = load_config(tmp_path / "a" / "config.yaml").model
    trained = load_config(straight_run / "config.yaml").model
    assert (m.hidden_size, m.n_routed_experts) == (trained.hidden_size, trained.n_routed_experts)  # config.json's
    assert m.mtp_loss_weight == 0.2  # the YAML's: config.json does not say
    assert (m.max_position_embeddings, m.moe_impl) == (128, "loop")  # the overrides
    # an override that changes a shape is checked against the stored tensors
    proc = run_cli("import-hf", str(tmp_path / "hf"), str(tmp_path / "b"), "model.hidden_size=96", "data.seq_len=32",
                   check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "embed_tokens.weight has shape (384, 64), config expects (384, 96)" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "b").exists()


GAMMAS = (0.0, 0.005)


def test_bias_update_moves_load_toward_balance(tiny_data, tmp_path):
    """Start from a router bias that sends most tokens to experts 0 and 1; with γ > 0 the
    aux-loss-free update must bring MaxVio down, with γ = 0 it stays."""
    from model import DeepSeekV3
    from train import checkpoint as ckpt_io
    from train.config import load_config

    cfg = load_config("configs/smoke.yaml", tiny_data)
    torch.manual_seed(0)
    model = DeepSeekV3(cfg.model)
    for moe in model.moe_layers():
        # a router with some spread between experts (γ must be small against it), and a bias
        # that sends most tokens to experts 0 and 1
        torch.nn.init.normal_(moe.gate.weight, std=0.05)
        moe.gate.e_score_correction_bias[:2] = 0.05
    init = ckpt_io.save_weights_only(model.state_dict(), tmp_path / "skewed", cfg.model)

    maxvio = {}
    for gamma in GAMMAS:
        run = tmp_path / f"gamma{gamma}"
        run_cli("train", "configs/smoke.yaml", *tiny_data, f"train.run_dir={run}", f"train.resume={init}",
                "train.steps=30", f"schedule.bias_update_rate={gamma}", "checkpoint.interval=30")
        first = [r["expert_load_maxvio"] for r in rows(run) if 1 <= r["step"] <= 3]
        last = [r["expert_load_maxvio"] for r in rows(run) if r["step"] > 25]
        maxvio[gamma] = (sum(first) / len(first), sum(last) / len(last))
    print(maxvio)
    assert maxvio[0.0][1] > 0.8 * maxvio[0.0][0], "without the update the skew persists"
    assert maxvio[GAMMAS[1]][1] < 0.5 * maxvio[0.0][1], maxvio


def test_shards_made_elsewhere_train_and_sample_with_the_tokenizer_beside_them(tiny_data, tmp_path):
    """data.train_shards / val_shards on shards without a manifest (a user's own pipeline): the run
    trains, takes tokenizer.json from beside the shards for its closing sample, and without one
    skips the sample, saying why (it used to fail after training, exit 2)."""
    import shutil

    data_dir = Path(next(o for o in tiny_data if o.startswith("data.dir=")).split("=", 1)[1])
    own = tmp_path / "own"
    own.mkdir()
    for shard in [*data_dir.glob("train-*.tar"), *data_dir.glob("val-*.tar")]:
        shutil.copy(shard, own)
    shards = [f"data.dir={tmp_path / 'none'}", f"data.train_shards={own}/train-{{000000..000001}}.tar",
              f"data.val_shards={own}/val-000000.tar", "train.steps=2", "train.sample_tokens=4"]
    bare = run_cli("train", "configs/smoke.yaml", *tiny_data, *shards, f"train.run_dir={tmp_path / 'bare'}")
    assert "no sample:" in bare.stdout and "tokenizer.json" in bare.stdout, bare.stdout
    shutil.copy(data_dir / "tokenizer.json", own)
    run = tmp_path / "with_tokenizer"
    done = run_cli("train", "configs/smoke.yaml", *tiny_data, *shards, f"train.run_dir={run}")
    assert "--- sample" in done.stdout, done.stdout
    assert (run / "tokenizer.json").read_bytes() == (data_dir / "tokenizer.json").read_bytes()


LEAVES_GROUP = r"""
import sys
import torch.distributed as dist
from train.bench import bench
from train.config import load_config
from train.loop import train

cfg = lambda *more: load_config("configs/smoke.yaml", [*sys.argv[2:], *more])
first = train(cfg(f"train.run_dir={sys.argv[1]}/a", "train.steps=1"))
after_train = dist.is_initialized()
second = train(cfg(f"train.run_dir={sys.argv[1]}/b", "train.steps=1"))  # joins afresh
bench(cfg(), steps=1, warmup=0, profile=False)
print(after_train, dist.is_initialized(), first.val_loss == second.val_loss)
"""


def test_train_and_bench_leave_the_process_group(tiny_data, tmp_path):
    """train() and bench() leave the process group when they return. A process that exits with
    it still up can abort in teardown (gloo's threads meet the interpreter's exit) after a run
    that succeeded; and a second train() in the same process joins afresh and trains the same."""
    proc = subprocess.run([sys.executable, "-c", LEAVES_GROUP, str(tmp_path), *tiny_data], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-3:] == ["False", "False", "True"], proc.stdout[-2000:]
