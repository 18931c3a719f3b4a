"""The resolution choice rule and the weights' input size."""

from __future__ import annotations

import pytest

from edge_build.resolution import ResolutionChoice, pick
from edge_build.weights import PREPROCESSING, ImportedWeights


def _rows(**accuracy):
    return [{"size": int(size[1:]), "cv_accuracy": value} for size, value in accuracy.items()]


def test_pick_takes_the_smallest_size_within_the_drop():
    rows = _rows(s224=0.930, s192=0.926, s160=0.910)
    assert pick(rows, 224, 0.5) == 192
    assert pick(rows, 224, 2.0) == 160
    assert pick(rows, 224, 0.3) == 224
    assert pick(rows, 224, 0.4) == 192  # exactly 0.4 pt below counts as within


def test_pick_accepts_a_smaller_size_that_is_more_accurate():
    assert pick(_rows(s224=0.90, s192=0.91, s160=0.85), 224, 0.0) == 192


def test_pick_needs_the_reference_measured():
    with pytest.raises(ValueError, match="reference size 224"):
        pick(_rows(s192=0.9), 224, 0.5)


def test_at_size_changes_only_the_input_size(tmp_path):
    metadata = {"preprocessing": PREPROCESSING.as_dict(), "padding": "tf_same", "source": {"sha256": "ab"}}
    weights = ImportedWeights(tmp_path, tmp_path / "backbone.ckpt", metadata)
    smaller = weights.at_size(160)
    assert smaller.preprocessing.size == 160 and weights.preprocessing.size == 224
    assert smaller.preprocessing.scale == weights.preprocessing.scale and smaller.padding == "tf_same"
    assert weights.at_size(224) is weights


def test_summary_names_the_cost_of_the_rejected_sizes():
    record = {
        "reference": 224,
        "max_accuracy_drop_pt": 0.5,
        "sizes": [
            {"size": 224, "cv_accuracy": 0.933, "paired_gain": {"gain": 0.0}},
            {"size": 192, "cv_accuracy": 0.919, "paired_gain": {"gain": -0.014}},
        ],
    }
    text = ResolutionChoice(224, record).summary()
    assert "input 224x224" in text and "93.3 %" in text and "192: -1.4 pt" in text
