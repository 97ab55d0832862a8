"""Per-step schedules: learning rate, bias-update rate γ, MTP weight λ and the batch-size ramp.

Each is a pure function of the optimizer step (counted from 1) and the config, never of
`train.steps`: a run stopped at step 10 and resumed to 20 follows exactly the run that went
straight to 20.
"""

from __future__ import annotations

import math

from .config import Config


def learning_rate(cfg: Config, step: int) -> float:
    """LR for optimizer step `step` (1-based)."""
    s, peak, floor = cfg.schedule, cfg.optim.lr, cfg.optim.min_lr
    if s.warmup_steps and step <= s.warmup_steps:
        return peak * step / s.warmup_steps  # linear warmup from 0 (report §4.2)
    after = step - s.warmup_steps
    if s.lr == "constant":
        return peak
    if s.lr == "cosine":
        return _cosine(peak, floor, after, s.decay_steps)
    if s.lr == "wsd":  # warmup, stable at peak, then a linear decay to min_lr
        if after <= s.stable_steps:
            return peak
        frac = min(1.0, (after - s.stable_steps) / max(1, s.decay_steps))
        return peak + (floor - peak) * frac
    # "deepseek" (report §4.2): constant to const_until, cosine to min_lr until cosine_until,
    # then min_lr, and final_lr from final_from on (the report's 2.2e-5 then 7.3e-6 phases).
    if s.final_from is not None and s.final_lr is not None and step >= s.final_from:
        return s.final_lr
    if step <= s.const_until:
        return peak
    return _cosine(peak, floor, step - s.const_until, max(1, s.cosine_until - s.const_until))


def _cosine(peak: float, floor: float, t: int, length: int) -> float:
    frac = min(1.0, t / max(1, length))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * frac))


def bias_update_rate(cfg: Config, step: int) -> float:
    """γ of the aux-loss-free update; 0 from schedule.bias_update_stop on."""
    stop = cfg.schedule.bias_update_stop
    return 0.0 if stop is not None and step >= stop else cfg.schedule.bias_update_rate


def mtp_weight(cfg: Config, step: int) -> float:
    """λ: schedule.mtp_weight, then mtp_weight_late from mtp_weight_switch on (report: 0.3 → 0.1)."""
    s = cfg.schedule
    return s.mtp_weight_late if s.mtp_weight_switch is not None and step >= s.mtp_weight_switch else s.mtp_weight


def global_batch_size(cfg: Config, step: int) -> int:
    """Sequences in the global batch of `step`: a linear ramp from batch_ramp_start to
    train.global_batch_size over batch_ramp_steps (report: 3072 → 15360), rounded down to a
    multiple of schedule.batch_ramp_increment. A function of the config and the step only: the
    same at any world size (Config.batch_layout checks the increment splits over the ranks)."""
    s, target = cfg.schedule, cfg.train.global_batch_size
    if s.batch_ramp_start is None or s.batch_ramp_steps <= 0 or step > s.batch_ramp_steps:
        return target
    size = s.batch_ramp_start + (target - s.batch_ramp_start) * (step - 1) / s.batch_ramp_steps
    inc = s.batch_ramp_increment  # divides batch_ramp_start (Config.validate): never below the start
    return int(size) // inc * inc
