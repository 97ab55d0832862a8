"""`dsv3 sample`'s decoding rules, on a small random model."""

from __future__ import annotations

import pytest
import torch

from model import ConfigError, DeepSeekV3
from tests.unit.helpers import make_config
from train.sample import generate


@pytest.fixture(scope="module")
def model() -> DeepSeekV3:
    torch.manual_seed(0)
    return DeepSeekV3(make_config()).eval()


def test_top_p_zero_keeps_the_likeliest_token_so_it_is_greedy(model):
    # the nucleus used to come out empty at top_p = 0 and sampling failed on a zero distribution
    greedy = generate(model, [1, 2, 3], 12, temperature=0.0)
    for seed in range(3):
        assert generate(model, [1, 2, 3], 12, temperature=1.0, top_p=0.0, seed=seed) == greedy


def test_top_p_one_samples_from_the_whole_distribution(model):
    # a sample differs from greedy somewhere, and a seed repeats itself
    runs = [generate(model, [1, 2, 3], 12, temperature=2.0, top_p=1.0, seed=s) for s in range(4)]
    assert any(r != generate(model, [1, 2, 3], 12) for r in runs)
    assert runs[0] == generate(model, [1, 2, 3], 12, temperature=2.0, top_p=1.0, seed=0)


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.5), "--temperature"), (dict(temperature=float("nan")), "--temperature"),
    (dict(temperature=float("inf")), "--temperature"), (dict(top_p=1.5), "--top-p"), (dict(top_p=-0.1), "--top-p"),
    (dict(top_p=float("nan")), "--top-p"), (dict(max_new_tokens=-3), "--tokens")])
def test_out_of_range_settings_are_refused_by_name(model, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        generate(model, [1, 2], **{"max_new_tokens": 3, **kwargs})


def test_a_tiny_temperature_is_greedy_not_a_failure(model):
    # logits / 1e-45 overflowed to inf and softmax gave NaN, which multinomial refused
    assert generate(model, [1, 2, 3], 12, temperature=1e-45, top_p=1.0) == generate(model, [1, 2, 3], 12)


def test_a_prompt_without_tokens_is_refused(model):
    with pytest.raises(ConfigError, match="prompt"):
        generate(model, [], 3)
