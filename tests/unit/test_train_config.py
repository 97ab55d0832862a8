"""Run-config loading: YAML + dotted overrides, typed, validated, errors naming key and file."""

from __future__ import annotations

import pytest

from model import ConfigError
from train.config import load_config, save_config

SMOKE = "configs/smoke.yaml"


def test_smoke_loads_and_overrides_apply():
    cfg = load_config(SMOKE, ["optim.lr=1e-3", "train.steps=7", "model.rope_scaling={factor: 2.0}"])
    assert cfg.optim.lr == 1e-3 and cfg.train.steps == 7
    assert cfg.model.rope_scaling.factor == 2.0
    assert cfg.data.sources[0].kind == "shakespeare"


@pytest.mark.parametrize(
    "override,key",
    [
        ("optim.lrr=1", "optim.lrr"),  # unknown key
        ("train.steps=ten", "train.steps"),  # wrong type
        ("model.n_group=3", "model.n_group"),  # model cross-field
        ("parallel.ep=3", "parallel.ep"),  # EP must divide experts
        ("parallel.zero_stage=3", "parallel.zero_stage"),
        ("data.seq_len=100000", "data.seq_len"),
        ("logging.wandb=maybe", "logging.wandb"),
        ("schedule.lr=linear", "schedule.lr"),
        ("schedule.batch_ramp_start=32", "schedule.batch_ramp_start"),  # above the global batch (16)
        ("schedule.batch_ramp_start=0", "schedule.batch_ramp_start"),
        ("schedule.batch_ramp_start=8", "schedule.batch_ramp_increment"),  # a ramp needs its increment
        ("train.max_bad_steps=0", "train.max_bad_steps"),
        ("model.precision=bf16", "parallel.zero_stage"),  # bf16 gradients accumulate in fp32 at ZeRO-2 only
        ("schedule.bias_update_rate=-1e-3", "schedule.bias_update_rate"),
        ("schedule.mtp_weight_late=-0.1", "schedule.mtp_weight_late"),
        ("data.sources=[{kind: shakespeare}, {kind: txt, pth: x}]", "data.sources[1].pth"),  # names the entry
        ("data.sources=[{kind: txt, path: x, weight: heavy}]", "data.sources[0].weight"),
        ("data.sources=[plays]", "data.sources"),  # not a mapping
        ("data.sources=[null]", "data.sources"),
        ("data=5", "data"),
        ("train.resume=no", "train.resume"),  # YAML's boolean no, not a path named 'False'
        ("model.scoring_func=yes", "model.scoring_func"),
        ("logging.wandb=on", "logging.wandb"),  # online or offline? say which
    ],
)
def test_bad_values_name_key_and_file(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, [override])
    msg = str(err.value)
    assert key in msg and SMOKE in msg, msg


def test_wandb_off_means_disabled_in_the_yaml_and_the_overrides(tmp_path):
    # YAML reads off/false/no as the boolean False; W&B's word for it is disabled
    for word in ("off", "false", "no"):
        assert load_config(SMOKE, [f"logging.wandb={word}"]).logging.wandb == "disabled"
        f = tmp_path / "off.yaml"
        f.write_text(f"logging:\n  wandb: {word}\n")
        assert load_config(f).logging.wandb == "disabled"
    assert load_config(SMOKE, ["logging.progress=off"]).logging.progress is False  # flags stay flags


def test_deepseek_schedule_phases_must_be_in_order():
    phases = ["schedule.lr=deepseek", "schedule.warmup_steps=10", "schedule.cosine_until=100"]
    load_config(SMOKE, [*phases, "schedule.const_until=50"])
    with pytest.raises(ConfigError, match="schedule.const_until"):  # the LR would drop right after warmup
        load_config(SMOKE, [*phases, "schedule.const_until=5"])


def test_a_source_entry_in_the_yaml_is_named_by_its_index(tmp_path):
    bad = tmp_path / "sources.yaml"
    bad.write_text("data:\n  sources:\n    - kind: shakespeare\n    - kind: txt\n      pth: corpus\n")
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.pth.*sources\.yaml"):
        load_config(bad)


def test_unknown_section_and_bad_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("modell:\n  hidden_size: 3\n")
    with pytest.raises(ConfigError, match="modell"):
        load_config(bad)
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_batch_layout_must_divide():
    cfg = load_config(SMOKE, ["train.micro_batch_size=4", "train.global_batch_size=12"])
    cfg.batch_layout(3)
    # checked by the launchers before any rank starts (each rank used to fail on its own)
    with pytest.raises(ConfigError, match="parallel.ep=4: must divide the world size 2"):
        load_config(SMOKE, ["parallel.ep=4"]).batch_layout(2)
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        cfg.batch_layout(2)
    # a ramp's sizes are multiples of its increment, which must split over the ranks too
    ramp = ["train.micro_batch_size=2", "train.global_batch_size=24", "schedule.batch_ramp_start=12",
            "schedule.batch_ramp_steps=10"]
    load_config(SMOKE, [*ramp, "schedule.batch_ramp_increment=6"]).batch_layout(3)
    with pytest.raises(ConfigError, match="schedule.batch_ramp_increment"):
        load_config(SMOKE, [*ramp, "schedule.batch_ramp_increment=6"]).batch_layout(2)
    with pytest.raises(ConfigError, match="schedule.batch_ramp_increment"):  # must divide the start
        load_config(SMOKE, [*ramp, "schedule.batch_ramp_increment=8"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(SMOKE, ["train.seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("name", ["smoke.yaml", "single_gpu.yaml", "ep_debug.yaml", "16b.yaml", "671b.yaml"])
def test_shipped_configs_load(name):
    load_config(f"configs/{name}")
