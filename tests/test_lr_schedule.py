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
