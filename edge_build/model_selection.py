"""Honest accuracy estimates: a confidence interval for CV and validation accuracy, and model choice.

A cross-validated accuracy counts every training image once, predicted by a model that
never saw it nor any of its duplicates (`edge_build.folds`). Its images are not
independent (copies, near-copies, the same object photographed twice), so the interval
comes from a bootstrap over duplicate groups: whole groups are resampled, which widens
the interval as much as the groups correlate. The validation split (130 images) gets a
Wilson score interval, or the same group bootstrap when groups are given.

`paired_difference` measures a gain over a baseline on the same images (tighter than
comparing two intervals). `disagreement` says when validation and CV disagree by more
than their intervals (the intervals do not overlap); `choose` takes the cheapest candidate
that the most accurate one does not beat significantly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """An accuracy with its confidence interval [low, high] at `level`."""

    accuracy: float
    low: float
    high: float
    correct: int
    n: int
    level: float
    method: str

    def overlaps(self, other: Estimate) -> bool:
        return self.low <= other.high and other.low <= self.high

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        return f"{100 * self.accuracy:.1f} % [{100 * self.low:.1f}, {100 * self.high:.1f}]"


def wilson_interval(correct: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion correct/n."""
    if n <= 0:
        raise ValueError("an interval needs at least one image")
    if not 0 <= correct <= n:
        raise ValueError(f"correct ({correct}) must be in 0..n ({n})")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def group_bootstrap_interval(
    correct: Sequence[bool] | np.ndarray,
    groups: Sequence[int] | np.ndarray,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of the accuracy when whole duplicate groups are resampled with replacement."""
    correct = np.asarray(correct, dtype=bool)
    groups = np.asarray(groups, dtype=np.int64)
    if correct.shape != groups.shape or correct.size == 0:
        raise ValueError("correct and groups must be non-empty and of one length")
    _, index = np.unique(groups, return_inverse=True)
    hits = np.bincount(index, weights=correct.astype(np.float64))
    sizes = np.bincount(index).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(sizes), size=(resamples, len(sizes)))
    accuracy = hits[draws].sum(axis=1) / sizes[draws].sum(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(accuracy, [tail, 1 - tail])
    return float(low), float(high)


def estimate(
    correct: Sequence[bool] | np.ndarray,
    groups: Sequence[int] | np.ndarray | None = None,
    level: float = LEVEL,
    seed: int = 0,
) -> Estimate:
    """Accuracy of `correct` with a group-bootstrap interval (with groups) or a Wilson interval (without)."""
    correct = np.asarray(correct, dtype=bool)
    hits, n = int(correct.sum()), int(correct.size)
    if groups is None:
        low, high = wilson_interval(hits, n, level)
        method = "Wilson score interval"
    else:
        low, high = group_bootstrap_interval(correct, groups, level, seed=seed)
        method = f"bootstrap over {len(np.unique(groups))} duplicate groups ({RESAMPLES} resamples, percentile)"
    return Estimate(hits / n, low, high, hits, n, level, method)


def per_photo_estimate(
    correct: Sequence[bool] | np.ndarray,
    groups: Sequence[int] | np.ndarray,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Estimate:
    """Accuracy with every duplicate group counted once (the mean of the groups' accuracies).

    The per-image estimate counts a photo copied 20 times 20 times; this one asks how many
    distinct photos the model gets right. `correct` and `n` are in groups (a group half right
    counts half). Interval: percentile bootstrap over groups.
    """
    correct = np.asarray(correct, dtype=bool)
    groups = np.asarray(groups, dtype=np.int64)
    if correct.shape != groups.shape or correct.size == 0:
        raise ValueError("correct and groups must be non-empty and of one length")
    _, index = np.unique(groups, return_inverse=True)
    per_group = np.bincount(index, weights=correct.astype(np.float64)) / np.bincount(index)
    draws = np.random.default_rng(seed).integers(0, len(per_group), size=(resamples, len(per_group)))
    tail = (1 - level) / 2
    low, high = np.quantile(per_group[draws].mean(axis=1), [tail, 1 - tail])
    method = f"each of {len(per_group)} duplicate groups counted once; bootstrap over groups ({resamples} resamples)"
    hits = float(per_group.sum())
    return Estimate(hits / len(per_group), float(low), float(high), round(hits, 2), len(per_group), level, method)


def errors_by_class(
    correct: Sequence[bool] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[int] | np.ndarray,
    names: Sequence[str],
    top: int = 5,
) -> list[dict[str, Any]]:
    """The classes holding the most held-out errors: images wrong, distinct photos wrong, distinct photos."""
    correct = np.asarray(correct, dtype=bool)
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    rows = []
    for label in np.unique(labels[~correct]):
        mine = labels == label
        wrong_groups = np.unique(groups[mine & ~correct])
        rows.append(
            {
                "class": names[int(label)],
                "images": int(mine.sum()),
                "errors": int((mine & ~correct).sum()),
                "photos": len(np.unique(groups[mine])),
                "photos_wrong": len(wrong_groups),
            }
        )
    rows.sort(key=lambda row: (-row["errors"], row["class"]))
    total = int((~correct).sum())
    for row in rows:
        row["share_of_errors"] = round(row["errors"] / total, 4)
    return rows[:top]


def concentration_warning(rows: Sequence[dict[str, Any]], threshold: float = 0.2) -> str | None:
    """A warning when one class holds more than `threshold` of the CV errors through few distinct photos."""
    if not rows or rows[0]["share_of_errors"] <= threshold:
        return None
    row = rows[0]
    return (
        f"{row['class']} holds {100 * row['share_of_errors']:.0f} % of the CV errors: {row['errors']} of its "
        f"{row['images']} images wrong, {row['photos_wrong']} of its {row['photos']} distinct photos; "
        "the per-image estimate weighs each copy of a photo, the per-photo estimate counts it once "
        "(add distinct photos of that class: `edge-build doctor` lists its copies)"
    )


def paired_difference(
    correct: Sequence[bool] | np.ndarray,
    baseline: Sequence[bool] | np.ndarray,
    groups: Sequence[int] | np.ndarray,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy gain of `correct` over `baseline` on the same images, with a group-bootstrap interval.

    Pairing removes the images both get right or both get wrong from the noise, so the
    interval of a difference is much tighter than the two accuracies' own intervals.
    """
    correct = np.asarray(correct, dtype=bool)
    baseline = np.asarray(baseline, dtype=bool)
    groups = np.asarray(groups, dtype=np.int64)
    if not correct.shape == baseline.shape == groups.shape or correct.size == 0:
        raise ValueError("correct, baseline and groups must be non-empty and of one length")
    _, index = np.unique(groups, return_inverse=True)
    delta = np.bincount(index, weights=correct.astype(np.float64) - baseline.astype(np.float64))
    sizes = np.bincount(index).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(sizes), size=(resamples, len(sizes)))
    gains = delta[draws].sum(axis=1) / sizes[draws].sum(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(gains, [tail, 1 - tail])
    return {
        "gain": float(correct.mean() - baseline.mean()),
        "low": float(low),
        "high": float(high),
        "level": level,
        "fixed": int((correct & ~baseline).sum()),
        "broken": int((~correct & baseline).sum()),
    }


def disagreement(validation: Estimate, cv: Estimate) -> str | None:
    """A warning when the validation and CV intervals do not overlap, else None."""
    if validation.overlaps(cv):
        return None
    side = "above" if validation.accuracy > cv.accuracy else "below"
    cause = (
        "validation images that duplicate training images, or a validation split too easy for its size"
        if side == "above"
        else "a validation split unlike the training split, or a model that overfits the training folds"
    )
    return (
        f"validation top-1 {validation.text()} is {side} the cross-validated estimate {cv.text()} "
        f"beyond both {100 * cv.level:.0f} % intervals; suspect {cause}"
    )


def choose(
    rows: Sequence[dict[str, Any]],
    cost: Callable[[dict[str, Any]], float],
    groups: Sequence[int] | np.ndarray,
    seed: int = 0,
) -> dict[str, Any]:
    """The cheapest row the best row does not beat significantly (paired, on the same images).

    Each row holds `correct`, its held-out correctness per image (the same images, the
    same folds for every row). The best row has the highest CV accuracy; a cheaper row is
    as good unless the best's paired gain over it has a confidence interval above zero.
    Ties in cost go to the higher accuracy.
    """
    if not rows:
        raise ValueError("nothing to choose from")
    best = max(rows, key=lambda row: np.mean(row["correct"]))
    eligible = [
        row
        for row in rows
        if row is best or paired_difference(best["correct"], row["correct"], groups, seed=seed)["low"] <= 0
    ]
    return min(eligible, key=lambda row: (cost(row), -float(np.mean(row["correct"]))))
