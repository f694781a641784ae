"""The FLOP model bench/distill.py reports next to its measured ratio."""

from types import SimpleNamespace

import pytest

from bench.distill import flop_model_ratio


def test_flop_model_ratio_by_hand():
    # d = 1, patch 1, no text: side 1 -> N = 1: 24 + 4 = 28; side 2 -> N = 4: 96 + 64 = 160
    config = SimpleNamespace(num_attention_heads=1, attention_head_dim=1, patch_size=1)
    assert flop_model_ratio(config, [1, 2], 0) == pytest.approx((28 + 160) / (2 * 160))
    # text tokens join every call: side 1 with T = 1 -> 2 tokens: 48 + 16 = 64; side 2 -> 5: 120 + 100
    assert flop_model_ratio(config, [1, 2], 1) == pytest.approx((64 + 220) / (2 * 220))


def test_full_resolution_is_one_and_medium_scales_bound_the_ratio():
    medium = SimpleNamespace(num_attention_heads=24, attention_head_dim=64, patch_size=2)
    assert flop_model_ratio(medium, [128] * 4, 77) == pytest.approx(1.0)
    four_step = flop_model_ratio(medium, [64, 80, 96, 128], 333)
    six_step = flop_model_ratio(medium, [32, 48, 64, 80, 96, 128], 333)
    assert 0.5 < four_step < 0.55 and 0.35 < six_step < 0.43
