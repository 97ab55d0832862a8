"""Schedules are functions of the step and the config only."""

from __future__ import annotations

import math

import pytest

from train import schedule
from train.config import load_config


def cfg_with(*overrides):
    return load_config("configs/smoke.yaml", list(overrides))


def test_schedules_do_not_depend_on_train_steps():
    ramp = ["schedule.batch_ramp_start=4", "schedule.batch_ramp_steps=50", "schedule.batch_ramp_increment=2",
            "train.micro_batch_size=2", "schedule.mtp_weight_switch=30", "schedule.bias_update_stop=40"]
    a = cfg_with("train.steps=10", *ramp)
    b = cfg_with("train.steps=1000", *ramp)
    for step in range(1, 400, 7):
        assert schedule.learning_rate(a, step) == schedule.learning_rate(b, step)
        assert schedule.global_batch_size(a, step) == schedule.global_batch_size(b, step)
        assert schedule.mtp_weight(a, step) == schedule.mtp_weight(b, step)
        assert schedule.bias_update_rate(a, step) == schedule.bias_update_rate(b, step)


def test_cosine_warmup_and_floor():
    cfg = cfg_with("optim.lr=1.0", "optim.min_lr=0.1", "schedule.warmup_steps=10", "schedule.decay_steps=100")
    assert schedule.learning_rate(cfg, 1) == pytest.approx(0.1)
    assert schedule.learning_rate(cfg, 10) == pytest.approx(1.0)
    assert schedule.learning_rate(cfg, 60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule.learning_rate(cfg, 110) == pytest.approx(0.1)
    assert schedule.learning_rate(cfg, 500) == pytest.approx(0.1)


def test_wsd_and_deepseek_phases():
    wsd = cfg_with("schedule.lr=wsd", "optim.lr=1.0", "optim.min_lr=0.0", "schedule.warmup_steps=0",
                   "schedule.stable_steps=50", "schedule.decay_steps=10")
    assert schedule.learning_rate(wsd, 50) == 1.0
    assert schedule.learning_rate(wsd, 55) == pytest.approx(0.5)
    assert schedule.learning_rate(wsd, 70) == 0.0
    ds = cfg_with("schedule.lr=deepseek", "optim.lr=2.2e-4", "optim.min_lr=2.2e-5", "schedule.warmup_steps=20",
                  "schedule.const_until=100", "schedule.cosine_until=200", "schedule.final_from=300",
                  "schedule.final_lr=7.3e-6")
    assert schedule.learning_rate(ds, 10) == pytest.approx(1.1e-4)
    assert schedule.learning_rate(ds, 100) == pytest.approx(2.2e-4)
    assert schedule.learning_rate(ds, 150) == pytest.approx((2.2e-4 + 2.2e-5) / 2)
    assert schedule.learning_rate(ds, 250) == pytest.approx(2.2e-5)
    assert schedule.learning_rate(ds, 300) == pytest.approx(7.3e-6)


def test_batch_ramp_gamma_and_lambda():
    cfg = cfg_with("train.global_batch_size=64", "train.micro_batch_size=4", "schedule.batch_ramp_start=16",
                   "schedule.batch_ramp_steps=10", "schedule.batch_ramp_increment=8", "schedule.bias_update_stop=5",
                   "schedule.mtp_weight_switch=3")
    sizes = [schedule.global_batch_size(cfg, s) for s in range(1, 13)]
    # 16 + 48·(s−1)/10 rounded down to a multiple of 8, then the target from step 11 on
    assert sizes == [16, 16, 24, 24, 32, 40, 40, 48, 48, 56, 64, 64]
    # an increment of the start's size: the ramp moves in whole starts
    coarse = cfg_with("train.global_batch_size=64", "train.micro_batch_size=4", "schedule.batch_ramp_start=16",
                      "schedule.batch_ramp_steps=10", "schedule.batch_ramp_increment=16")
    assert [schedule.global_batch_size(coarse, s) for s in range(1, 13)] == [16] * 4 + [32] * 3 + [48] * 3 + [64] * 2
    assert schedule.bias_update_rate(cfg, 4) == 1e-3 and schedule.bias_update_rate(cfg, 5) == 0.0
    assert schedule.mtp_weight(cfg, 2) == 0.3 and schedule.mtp_weight(cfg, 3) == 0.1
