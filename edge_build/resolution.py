"""Stage `resolution-<target>`: the smallest input size whose accuracy stays within the profile's budget.

MobileNetV2 is fully convolutional and its cost grows with the number of pixels, so a
smaller input is a faster model. For each of the profile's `resolution.candidates` the
pretrained backbone's features of every training image are extracted at that size (the
content-addressed feature cache keeps them), and the default head recipe is scored by
duplicate-aware k-fold cross-validation (`training.out_of_fold_correct`: exact, near and
mirrored duplicates share a fold; the same folds at every size, so the comparison is
paired). The build ships the smallest candidate whose cross-validated top-1 is at most
`max_accuracy_drop_pt` below the reference size's (`resolution.size`); the validation
split plays no part in the choice.

The record (resolution.json) keeps, per size: the CV accuracy with its group-bootstrap
interval, and the paired difference to the reference with its interval.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_build import atomic
from edge_build.stages import run_stage

if TYPE_CHECKING:
    from edge_build.targets import TargetProfile
    from edge_build.weights import ImportedWeights

RECORD = "resolution.json"
VERSION = 2  # 2: folds keep mirrored copies together


@dataclass(frozen=True)
class ResolutionChoice:
    size: int
    record: dict[str, Any] | None  # None when the profile has a single candidate
    path: Path | None = None

    def summary(self) -> str:
        if self.record is None:
            return f"input {self.size}x{self.size} (the profile's only size)"
        rows = {row["size"]: row for row in self.record["sizes"]}
        chosen, reference = rows[self.size], rows[self.record["reference"]]
        text = f"input {self.size}x{self.size}: CV top-1 {100 * chosen['cv_accuracy']:.1f} %"
        if self.size != reference["size"]:
            text += f" vs {100 * reference['cv_accuracy']:.1f} % at {reference['size']}"
        rejected = [row for row in self.record["sizes"] if row["size"] < self.size]
        if rejected:
            smaller = ", ".join(f"{r['size']}: {100 * r['paired_gain']['gain']:+.1f} pt" for r in rejected)
            text += f" (smaller sizes cost more than {self.record['max_accuracy_drop_pt']} pt: {smaller})"
        return text


def pick(rows: list[dict[str, Any]], reference: int, max_drop_pt: float) -> int:
    """The smallest size whose CV accuracy is at most `max_drop_pt` points below the reference size's."""
    accuracy = {row["size"]: row["cv_accuracy"] for row in rows}
    if reference not in accuracy:
        raise ValueError(f"the reference size {reference} was not measured")
    floor = accuracy[reference] - max_drop_pt / 100.0 - 1e-12
    return min(size for size, value in accuracy.items() if value >= floor)


def choose_resolution(
    data_root: Path,
    weights: ImportedWeights,
    build_dir: Path,
    profile: TargetProfile,
    log: Callable[[str], None] = lambda message: None,
) -> ResolutionChoice:
    """The input size the target ships: measured by CV when the profile lists several (cached)."""
    from edge_build.features import extract_features
    from edge_build.training import TrainOptions

    settings = profile.resolution
    candidates = sorted(set(settings.candidates), reverse=True)
    if len(candidates) == 1:
        return ResolutionChoice(candidates[0], None)
    max_drop = settings.max_drop_pt(profile.budget)
    options = TrainOptions().validate()
    build_dir = Path(build_dir)
    # Each size keeps its own assembled set (features/set-<size>), the reference size included: sharing
    # features/set with the build would make it flip between the reference and the chosen size on every run.
    feature_sets = {}
    for size in candidates:
        feature_sets[size] = extract_features(
            data_root,
            weights.at_size(size),
            build_dir,
            progress=False,  # both splits, like the main extraction: they share the backbone's parity sample
            log=log,
            set_dir=build_dir / "features" / f"set-{size}",
        )
    inputs = {
        "version": VERSION,
        "reference": settings.size,
        "max_accuracy_drop_pt": max_drop,
        "recipe": options.hyperparameters(),
        "features": {str(size): features.content_hash("train") for size, features in feature_sets.items()},
    }

    def produce(out: Path) -> dict[str, Any]:
        from edge_build.mirrored import image_items, mirrored_hashes

        mirrored = mirrored_hashes(image_items(feature_sets[settings.size]["train"], Path(data_root)), build_dir)
        record = measure(feature_sets, settings.size, max_drop, options, log, mirrored)
        atomic.write_json(out / RECORD, record)
        return {"size": record["chosen"]}

    directory = build_dir / f"resolution-{profile.name}"
    result = run_stage("resolution", directory, inputs, produce)
    record = json.loads((directory / RECORD).read_text(encoding="utf-8"))
    return ResolutionChoice(int(result.info["size"]), record, directory / RECORD)


def measure(
    feature_sets: dict[int, Any],
    reference: int,
    max_drop_pt: float,
    options: Any,
    log: Callable[[str], None] = lambda message: None,
    mirrored: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """CV accuracy per size (paired against `reference`) and the chosen size."""
    from edge_build.model_selection import estimate, paired_difference
    from edge_build.training import out_of_fold_correct

    outcomes = {
        size: out_of_fold_correct(features["train"], options, mirrored) for size, features in feature_sets.items()
    }
    baseline, groups = outcomes[reference]
    rows = []
    for size, (correct, size_groups) in sorted(outcomes.items(), reverse=True):
        if len(correct) != len(baseline) or (size_groups != groups).any():
            raise ValueError(f"the features at {size} are not of the same images as at {reference}")
        cv = estimate(correct, groups)
        rows.append(
            {
                "size": size,
                "pixels_vs_reference": round(size * size / (reference * reference), 4),
                "cv_accuracy": cv.accuracy,
                "cv_interval": [cv.low, cv.high],
                "paired_gain": paired_difference(correct, baseline, groups),
            }
        )
        log(f"resolution: {size}x{size} CV top-1 {cv.text()}")
    chosen = pick(rows, reference, max_drop_pt)
    return {
        "reference": reference,
        "max_accuracy_drop_pt": max_drop_pt,
        "chosen": chosen,
        "images": len(baseline),
        "duplicate_groups": int(groups.max()) + 1,
        "mirror_aware": mirrored is not None,
        "folds": options.folds,
        "recipe": options.hyperparameters(),
        "rule": (
            "the smallest size whose cross-validated top-1 (default head recipe retrained on the "
            "pretrained backbone's features at that size, duplicate-aware folds shared by all sizes) "
            "is at most max_accuracy_drop_pt below the reference size's"
        ),
        "sizes": rows,
    }
