"""Learning-rate schedules: the shape of each curve (the course's `build_lr`)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_build.schedules import build_lr


def test_every_schedule_has_one_rate_per_step():
    for kind in ("constant", "cosine", "square"):
        assert len(build_lr(137, 0.1, kind, warmup_steps=11)) == 137


def test_constant_is_flat_after_a_linear_warmup():
    rates = np.array(build_lr(100, 0.05, "constant", warmup_steps=10))
    np.testing.assert_allclose(rates[:10], 0.05 * np.arange(1, 11) / 10)
    assert np.all(rates[9:] == 0.05)


def test_cosine_starts_at_peak_halves_at_midpoint_and_ends_at_lr_end():
    rates = np.array(build_lr(200, 0.1, "cosine", lr_end=0.001))
    assert rates[0] == pytest.approx(0.1)
    assert rates[100] == pytest.approx((0.1 + 0.001) / 2)
    assert rates[-1] == pytest.approx(0.001, abs=1e-5)
    assert np.all(np.diff(rates) <= 0)
    # Flat at both ends, steepest in the middle: a half cosine, not a line.
    steps = -np.diff(rates)
    assert steps[100] > 10 * steps[0] and steps[100] > 10 * steps[-1]


def test_square_decays_quadratically_and_stays_below_cosine():
    square = np.array(build_lr(100, 1.0, "square"))
    cosine = np.array(build_lr(100, 1.0, "cosine"))
    assert square[50] == pytest.approx(0.25)
    assert square[0] == 1.0 and square[-1] == pytest.approx(0.0001)
    assert np.all(np.diff(square) <= 0)
    assert np.all(np.diff(square, 2) >= -1e-12)  # convex
    assert np.all(square[1:] < cosine[1:])


def test_warmup_then_decay_starts_from_the_peak():
    rates = build_lr(50, 0.3, "cosine", warmup_steps=5, lr_init=0.01)
    assert rates[0] == pytest.approx(0.01 + (0.3 - 0.01) / 5)
    assert rates[4] == pytest.approx(0.3)
    assert rates[5] == pytest.approx(0.3)
    assert rates[6] < 0.3
    assert max(rates) == pytest.approx(0.3)


def test_decay_is_linear_in_the_peak_rate():
    # The vectorized CV search relies on it: config c's rate is lr_c * shape(t).
    shape = build_lr(80, 1.0, "cosine", warmup_steps=8)
    scaled = build_lr(80, 0.03, "cosine", warmup_steps=8)
    np.testing.assert_allclose(np.array(shape) * 0.03, scaled, rtol=1e-12)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((10, 0.1, "linear"), "unknown learning-rate schedule"),
        ((0, 0.1, "cosine"), "total_steps"),
        ((10, -0.1, "cosine"), ">= 0"),
    ],
)
def test_bad_arguments_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        build_lr(*args)


def test_warmup_longer_than_training_is_refused():
    with pytest.raises(ValueError, match="warmup_steps"):
        build_lr(10, 0.1, "cosine", warmup_steps=11)


def test_all_warmup_reaches_the_peak_on_the_last_step():
    rates = build_lr(4, 0.2, "square", warmup_steps=4)
    assert rates == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert not any(math.isnan(r) for r in rates)
