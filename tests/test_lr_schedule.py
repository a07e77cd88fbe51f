"""The learning-rate schedule: linear warm-up, then constant or a cosine that ends at the step budget."""

from __future__ import annotations

import pytest

from brainfusion.config import TrainConfig
from brainfusion.errors import BrainfusionError
from brainfusion.training.train import lr_at


def test_cosine_learning_rate_warms_up_then_decays_to_zero_at_the_step_budget():
    cosine = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=100, lr_schedule="cosine")
    assert lr_at(0, cosine) == pytest.approx(1e-4)  # warm-up: 1/10 of the peak, cosine factor 1
    assert lr_at(50, cosine) == pytest.approx(5e-4)  # half-way down the half cosine
    assert lr_at(100, cosine) == pytest.approx(0, abs=1e-12) and lr_at(150, cosine) == pytest.approx(0, abs=1e-12)
    constant = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=100)
    assert [lr_at(s, constant) for s in (0, 50, 100)] == pytest.approx([1e-4, 1e-3, 1e-3])
    with pytest.raises(BrainfusionError, match="train.max_steps"):
        TrainConfig(lr_schedule="cosine", time_budget_min=5).validate()


def test_wsd_learning_rate_is_the_constant_one_until_the_decay_then_linear_to_zero():
    wsd = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=100, lr_schedule="wsd", lr_decay_share=0.2)
    constant = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=100)
    assert [lr_at(s, wsd) for s in (0, 5, 50, 80)] == [lr_at(s, constant) for s in (0, 5, 50, 80)]
    assert [lr_at(s, wsd) for s in (90, 95, 100, 120)] == pytest.approx([5e-4, 2.5e-4, 0, 0], abs=1e-12)
    with pytest.raises(BrainfusionError, match="train.lr_decay_share"):
        TrainConfig(lr_schedule="wsd", max_steps=10, lr_decay_share=0).validate()
    with pytest.raises(BrainfusionError, match="train.max_steps"):
        TrainConfig(lr_schedule="wsd").validate()
