"""Accuracy estimates: Wilson and group-bootstrap intervals, the val/CV disagreement warning, the one-SE rule."""

from __future__ import annotations

import numpy as np
import pytest

from edge_build.model_selection import (
    Estimate,
    choose,
    concentration_warning,
    disagreement,
    errors_by_class,
    estimate,
    group_bootstrap_interval,
    paired_difference,
    per_photo_estimate,
    wilson_interval,
)


def test_wilson_interval_matches_the_textbook_values():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    low, high = wilson_interval(126, 130)  # the validation split's size
    assert low == pytest.approx(0.9237, abs=1e-3) and high == pytest.approx(0.9880, abs=1e-3)


def test_wilson_interval_at_the_edges():
    assert wilson_interval(0, 20)[0] == pytest.approx(0.0, abs=1e-12)
    low, high = wilson_interval(20, 20)
    assert high == pytest.approx(1.0) and low == pytest.approx(0.8389, abs=1e-3)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_group_bootstrap_widens_with_duplicates():
    rng = np.random.default_rng(1)
    correct = rng.uniform(size=500) < 0.9
    singletons = group_bootstrap_interval(correct, np.arange(500))
    wilson = wilson_interval(int(correct.sum()), 500)
    assert singletons[1] - singletons[0] == pytest.approx(wilson[1] - wilson[0], rel=0.15)
    # the same 500 outcomes, each copied 4 times, in groups of 4: no more information than 500 images
    copied = np.repeat(correct, 4)
    grouped = group_bootstrap_interval(copied, np.repeat(np.arange(500), 4))
    naive = group_bootstrap_interval(copied, np.arange(2000))
    assert (grouped[1] - grouped[0]) == pytest.approx(singletons[1] - singletons[0], rel=0.15)
    assert (grouped[1] - grouped[0]) > 1.7 * (naive[1] - naive[0])


def test_group_bootstrap_is_seeded():
    correct = np.arange(300) % 7 != 0
    groups = np.arange(300) // 3
    assert group_bootstrap_interval(correct, groups, seed=3) == group_bootstrap_interval(correct, groups, seed=3)


def test_estimate_reports_counts_interval_and_method():
    correct = np.array([True] * 95 + [False] * 5)
    plain = estimate(correct)
    assert (plain.correct, plain.n, plain.accuracy) == (95, 100, 0.95)
    assert plain.low < 0.95 < plain.high and plain.method.startswith("Wilson")
    grouped = estimate(correct, groups=np.arange(100) // 2)
    assert grouped.low < 0.95 < grouped.high and "50 duplicate groups" in grouped.method
    assert "95.0 %" in plain.text()


def test_paired_difference_is_tighter_than_the_two_intervals():
    rng = np.random.default_rng(4)
    baseline = rng.uniform(size=1000) < 0.92
    better = baseline.copy()
    better[np.flatnonzero(~baseline)[:20]] = True  # fixes 20 images, breaks none: +2.0 pt
    gain = paired_difference(better, baseline, np.arange(1000))
    assert gain["gain"] == pytest.approx(0.02) and (gain["fixed"], gain["broken"]) == (20, 0)
    assert 0.0 < gain["low"] < 0.02 < gain["high"]
    a, b = estimate(better), estimate(baseline)
    assert a.overlaps(b)  # the separate intervals cannot tell them apart, the paired one can
    same = paired_difference(baseline, baseline, np.arange(1000))
    assert same["gain"] == same["low"] == same["high"] == 0.0
    with pytest.raises(ValueError):
        paired_difference(better, baseline[:10], np.arange(1000))


def _est(accuracy: float, low: float, high: float) -> Estimate:
    return Estimate(accuracy, low, high, 0, 1, 0.95, "test")


def test_disagreement_only_when_intervals_do_not_overlap():
    cv = _est(0.95, 0.94, 0.96)
    assert disagreement(_est(0.97, 0.93, 0.99), cv) is None
    warning = disagreement(_est(0.99, 0.965, 1.0), cv)
    assert warning is not None and "above" in warning and "95.0 %" in warning
    assert "below" in disagreement(_est(0.85, 0.80, 0.92), cv)


def test_choose_takes_the_cheapest_that_the_best_does_not_beat_significantly():
    rng = np.random.default_rng(6)
    base = rng.uniform(size=2000) < 0.92
    wrong = np.flatnonzero(~base)
    slightly = base.copy()
    slightly[wrong[:10]] = True
    slightly[np.flatnonzero(base)[:7]] = False  # 10 fixed, 7 broken: +0.15 pt, not significant
    clearly = base.copy()
    clearly[wrong[:60]] = True  # +3 pt: significant
    groups = np.arange(2000)
    rows = [
        {"name": "head", "cost": 0, "correct": base},
        {"name": "small", "cost": 1, "correct": slightly},
        {"name": "big", "cost": 3, "correct": clearly},
    ]
    assert choose(rows, lambda r: r["cost"], groups)["name"] == "big"
    assert choose(rows[:2], lambda r: r["cost"], groups)["name"] == "head"
    with pytest.raises(ValueError):
        choose([], lambda r: 0, groups)


def _copied_photo_data():
    """20 distinct photos right; one photo copied 20 times, wrong; class 1 holds the copies."""
    correct = np.array([True] * 20 + [False] * 20)
    groups = np.array(list(range(20)) + [20] * 20)
    labels = np.array([0] * 20 + [1] * 20)
    return correct, groups, labels


def test_per_photo_estimate_counts_a_copied_photo_once():
    correct, groups, _ = _copied_photo_data()
    assert estimate(correct, groups).accuracy == 0.5  # per image: the copies weigh 20
    photo = per_photo_estimate(correct, groups)
    assert photo.accuracy == pytest.approx(20 / 21) and photo.n == 21 and photo.correct == 20
    assert photo.low < photo.accuracy <= photo.high <= 1.0
    half = per_photo_estimate(np.array([True, False, True]), np.array([0, 0, 1]))
    assert half.accuracy == pytest.approx(0.75), "a group half right counts half"
    with pytest.raises(ValueError):
        per_photo_estimate(np.array([True]), np.array([0, 1]))


def test_errors_by_class_names_the_class_and_its_distinct_photos():
    correct, groups, labels = _copied_photo_data()
    correct[0] = False  # one error in class 0 too
    rows = errors_by_class(correct, labels, groups, ["00_00 (a)", "00_01 (b)"])
    assert [r["class"] for r in rows] == ["00_01 (b)", "00_00 (a)"]
    assert rows[0] == {
        "class": "00_01 (b)",
        "images": 20,
        "errors": 20,
        "photos": 1,
        "photos_wrong": 1,
        "share_of_errors": pytest.approx(20 / 21, abs=1e-4),
    }
    warning = concentration_warning(rows)
    assert warning and "00_01 (b) holds 95 % of the CV errors" in warning and "1 distinct photos" in warning
    spread = [dict(rows[0], share_of_errors=0.1)]
    assert concentration_warning(spread) is None
