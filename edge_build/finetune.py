"""Stage `train --finetune`: fine-tune the top of the backbone with the head (the course's "方式二").

Recipe: the head is trained on the frozen backbone's pooled features (`training.fit_head`,
the `train` recipe); then the last K stages of the backbone and the head are trained
together at a lower learning rate with their own schedule (`tail.fit_tail`), on a fixed
number of views per training image (`augment`: the image itself plus random resized
crops, flips and colour jitter, reproducible from the seed). The frozen stages' output
for every view is cached by content (`feature_maps`), so an epoch runs only the K
trainable stages. BatchNorm stays frozen (folded; see `tail`).

Honest estimates: the recipe is cross-validated on the training split with duplicate-aware
folds (copies, re-encodings, near-duplicates and mirrored copies share a fold, `folds`);
each fold's head and fine-tune see only that fold's training images. The CV accuracy gets
a bootstrap interval over duplicate groups, the validation accuracy a Wilson interval, and
a warning is logged when they disagree beyond both (`model_selection`). The head-only network's
figures are computed on the same folds, side by side. `search=True` cross-validates a
grid of (K, lr, epochs x views), head only included, and takes the cheapest candidate the
most accurate one does not beat significantly. The validation split never chooses anything.

Defaults, chosen by 5-fold duplicate-aware CV (mirrored copies grouped too) on the shared
training split (2192 images, 1913 groups), never on validation. CV top-1 [95 % group-
bootstrap interval], paired gain over head only on the same folds:

    recipe (stages, lr, epochs x views)     CV top-1            gain vs head only
    head only (0 stages)                    92.4 [89.2, 95.0]   -
    1, 0.01, 2 x 4                          92.4 [89.2, 95.1]   +0.05 [-0.55, +0.65]
    2, 0.003, 2 x 4                         92.6 [89.4, 95.2]   +0.18 [-0.61, +0.98]
    2, 0.01, 2 x 4                          92.7 [89.5, 95.3]   +0.32 [-0.42, +1.11]
    2, 0.01, 4 x 1 (no augmentation)        92.4 [89.2, 95.0]   +0.00 [-0.77, +0.77]
    2, 0.01, 1 x 2                          90.6 [87.5, 93.2]   -1.78 [-2.72, -0.87]
    2, 0.01, 1 x 4   <- default             93.3 [90.4, 95.4]   +0.91 [-0.70, +3.15]
    3, 0.01, 1 x 4                          93.3 [90.5, 95.4]   +0.91 [-0.78, +3.22]

Counting each duplicate group once (`model_selection.per_photo_estimate`), head only scores
94.4 [93.4, 95.4] and the default 94.7 [93.6, 95.7]: most of the default's per-image gain is
one eggshell photo (class 03_02 has 5 distinct photos in 99 files, each copied ~20 times).
Two stages tie three at two thirds of the cost. No recipe beats head only beyond its
interval, and the default's estimate carries the winner's curse of an 8-way choice.
Before mirrored copies were grouped, fine-tuned recipes scored about 2 pt higher (head only
0.5 pt): a flipped view of a training image is a near-copy of its mirrored twin in the
held-out fold.

Outputs: the run in build/finetune/run (cached by its inputs), published to build/train
with the same file names as the head-only `train` stage (network.ckpt in the imported
BatchNorm form, head.ckpt, training.json, loss.png, lr_schedules.png); training.json has
a "finetune" section (stages, recipe, augmentation, CV and validation estimates, timings).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_build import network, taxonomy
from edge_build.augment import Augmentation
from edge_build.errors import CheckFailed, EdgeBuildError
from edge_build.mirrored import image_items as _items
from edge_build.mirrored import mirrored_hashes
from edge_build.schedules import SCHEDULES
from edge_build.stages import run_stage
from edge_build.training import HEAD_NAME, NETWORK_NAME, RECORD_NAME, SCHEMA, STAGE, TrainResult

if TYPE_CHECKING:
    from edge_build.features import FeatureSet
    from edge_build.model_selection import Estimate
    from edge_build.training import TrainOptions
    from edge_build.weights import ImportedWeights

#: Bump when the same inputs would train a different network.
FINETUNE_VERSION = 1
#: `--blocks all`: every stage of the backbone (19)
ALL_BLOCKS = network.NUM_STAGES
#: Refuse a run whose cached maps would not fit comfortably in memory.
MAX_CACHE_BYTES = 4 * 2**30
#: The saved network (BN folded, float32 frames) vs the tail on float16 cached maps.
NETWORK_CHECK_MAX_ABS = 0.05
#: Seconds per training step at batch 32 by trainable stages (BN folded, MindSpore 2.7 CPU,
#: 2 threads, load average ~7): the relative costs of the one-SE rule.
STEP_COST = {1: 0.096, 2: 0.366, 3: 0.635, 4: 0.849}
#: Candidates of `--finetune --search` (0 = head only: fine-tuning has to earn its cost)
SEARCH_BLOCKS = (0, 1, 2, 3)
SEARCH_LR = (0.003, 0.01, 0.03)
SEARCH_SCHEDULES = ((1, 4), (2, 4))  # (epochs, views)
DEFAULT_CHOICE_NOTE = "recipe as given (the defaults were chosen by CV on the training split: edge_build/finetune.py)"
PUBLISHED = (RECORD_NAME, HEAD_NAME, NETWORK_NAME, "loss.png", "lr_schedules.png")


@dataclass(frozen=True)
class FinetuneOptions:
    """The fine-tuning recipe (the head's own recipe is `training.TrainOptions`)."""

    blocks: int = 2  # trainable stages at the top of the backbone (0 = head only, 19 = all)
    lr: float = 0.01
    lr_schedule: str = "cosine"
    warmup: float = 0.1  # fraction of the steps spent warming up linearly
    epochs: int = 1  # passes over every cached view
    views: int = 4  # views per training image, the original included
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 1e-4  # on conv and head weights, not on biases
    seed: int = 0

    def validate(self) -> FinetuneOptions:
        problems = []
        if not 0 <= self.blocks <= ALL_BLOCKS:
            problems.append(("--blocks", self.blocks, f"0..{ALL_BLOCKS} or 'all'"))
        if not self.lr > 0:
            problems.append(("--finetune-lr", self.lr, "a learning rate > 0"))
        if self.lr_schedule not in SCHEDULES:
            problems.append(("lr_schedule", self.lr_schedule, " | ".join(SCHEDULES)))
        if not 0 <= self.warmup < 1:
            problems.append(("warmup", self.warmup, "a fraction in [0, 1)"))
        if self.epochs < 1:
            problems.append(("--finetune-epochs", self.epochs, "at least 1"))
        if self.views < 1:
            problems.append(("--views", self.views, "at least 1 (the original image)"))
        if self.batch_size < 1:
            problems.append(("batch_size", self.batch_size, "at least 1"))
        if not 0 <= self.momentum < 1:
            problems.append(("momentum", self.momentum, "in [0, 1)"))
        if self.weight_decay < 0:
            problems.append(("weight_decay", self.weight_decay, ">= 0"))
        if problems:
            option, value, allowed = problems[0]
            raise EdgeBuildError(f"invalid fine-tuning option {option} {value}", f"allowed: {allowed}")
        return self

    @property
    def start(self) -> int:
        """Index of the first trainable stage (the cached map is its input)."""
        return ALL_BLOCKS - self.blocks

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.blocks == 0:
            return "head only"
        return f"{self.blocks} stage(s), lr {self.lr:g}, {self.epochs} epoch(s) x {self.views} view(s)"


def search_grid(options: FinetuneOptions) -> list[FinetuneOptions]:
    """Candidates of `search`: blocks x learning rate x (epochs, views), the other knobs as given."""
    grid = [
        replace(options, blocks=blocks, lr=lr, epochs=epochs, views=views)
        for blocks, lr, (epochs, views) in itertools.product(SEARCH_BLOCKS, SEARCH_LR, SEARCH_SCHEDULES)
    ]
    head_only = [g for g in grid if g.blocks == 0][:1]  # lr, epochs and views mean nothing without stages
    return head_only + [g for g in grid if g.blocks > 0]


def _step_seconds(options: FinetuneOptions) -> float:
    """Measured seconds of one training step at batch 32 (extrapolated linearly past the measured stages)."""
    largest = max(STEP_COST)
    return STEP_COST.get(options.blocks, STEP_COST[largest] * options.blocks / largest) if options.blocks else 0.0


def relative_cost(options: FinetuneOptions) -> float:
    """Training cost per image: passes over its views x the measured cost of a step of that many stages."""
    return options.epochs * options.views * _step_seconds(options)


def finetune_stage(
    *,
    data_root: Path,
    weights: ImportedWeights,
    features: FeatureSet,
    build_dir: Path,
    blocks: int | None = None,
    options: FinetuneOptions | None = None,
    head_options: TrainOptions | None = None,
    augmentation: Augmentation | None = None,
    folds: int = 5,
    cv: bool = True,
    search: bool = False,
    runtime: str = "auto",
    progress: bool = True,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """The head, then the last K stages with it, with a CV estimate; the network lands in build/train.

    `blocks` overrides `options.blocks` (K; 0 = head only). `cv=False` skips the CV
    estimate (the validation figures remain); `runtime` runs the frozen stages
    ("auto": ONNX Runtime after a parity check, else MindSpore).
    """
    from edge_build import atomic
    from edge_build.training import TrainOptions

    head_options = (head_options or TrainOptions()).validate()
    options = options or FinetuneOptions()
    options = (options if blocks is None else replace(options, blocks=blocks)).validate()
    augmentation = (augmentation or Augmentation()).validate()
    if folds < 2:
        raise EdgeBuildError(f"invalid --folds {folds}", "at least 2")
    run = _Run(features, weights, Path(data_root), Path(build_dir), head_options, options, augmentation, folds)
    run.cv, run.search, run.runtime, run.progress, run.log = cv, search, runtime, progress, log or run.log
    run_dir = Path(build_dir) / "finetune" / "run"
    inputs = {
        "train_features_sha256": features.content_hash("train"),
        "val_features_sha256": features.content_hash("val"),
        "feature_key": features.key,
        "weights_sha256": weights.sha256,
        "head_options": asdict(head_options),
        "options": options.as_dict(),
        "augmentation": augmentation.as_dict(),
        "folds": folds,
        "cv": cv,
        "search": search,
        "runtime": runtime,
        "data_root": str(Path(data_root).resolve()),
        "version": FINETUNE_VERSION,
    }

    def produce(out: Path) -> dict[str, Any]:
        record = run.execute(out)
        atomic.write_json(out / RECORD_NAME, record)
        return {"finetune": {k: record["finetune"][k] for k in ("blocks", "cv", "validation", "head_only")}}

    result = run_stage("finetune", run_dir, inputs, produce, force=force, log=log)
    return _publish(run_dir, Path(build_dir), result.ran, run.log)


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc="fine-tune",
        unit="step",
        file=sys.stderr,
        disable=not (enabled and sys.stderr.isatty()),
        leave=False,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed} elapsed, ETA {remaining}]",
    )


def _steps(images: int, options: FinetuneOptions) -> int:
    from edge_build.tail import steps_per_epoch

    return steps_per_epoch(images * options.views, options.batch_size) * options.epochs if options.blocks else 0


@dataclass
class _Run:
    """One fine-tuning run: CV of the candidate(s), the final model, its check, its record."""

    features: FeatureSet
    weights: ImportedWeights
    data_root: Path
    build_dir: Path
    head_options: TrainOptions
    options: FinetuneOptions
    augmentation: Augmentation
    folds: int
    cv: bool = True
    search: bool = False
    runtime: str = "auto"
    progress: bool = True
    log: Callable[[str], None] = field(default=lambda message: None)
    seconds: dict[str, float] = field(default_factory=dict)
    # set by execute(): duplicate groups, fold index sets, the pretrained backbone (BN folded)
    groups: np.ndarray = field(init=False)
    fitting: list[np.ndarray] = field(init=False)
    held_out: list[np.ndarray] = field(init=False)
    folded: Any = field(init=False)

    def execute(self, out: Path) -> dict[str, Any]:
        from edge_build.folds import duplicate_groups, grouped_folds

        started, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
        train = self.features["train"]
        with self._timed("duplicate_groups"):
            mirrored = mirrored_hashes(_items(train, self.data_root), self.build_dir)
        self.groups = duplicate_groups(
            train.sha256,
            train.pixel_sha256,
            phash=train.phash,
            dhash=train.dhash,
            mirrored_phash=mirrored[0],
            mirrored_dhash=mirrored[1],
        )
        fold_of = grouped_folds(train.labels, self.groups, self.folds, self.options.seed)
        self.fitting = [np.flatnonzero(fold_of != f) for f in range(self.folds)]
        self.held_out = [np.flatnonzero(fold_of == f) for f in range(self.folds)]
        candidates = search_grid(self.options) if self.search else [self.options]
        run_cv = self.cv or self.search

        with self._timed("heads"):
            heads = self._heads(run_cv)
        with self._timed("feature_maps"):
            maps, maps_info = self._maps(candidates)
        self.folded = self.weights.load_backbone(fold_bn=True)
        cv_steps = sum(_steps(len(i), c) for c in candidates for i in self.fitting) if run_cv else 0
        final_steps = 0 if self.search else _steps(len(train), self.options)
        if cv_steps + final_steps:
            seconds = (
                sum(_steps(len(i), c) * _step_seconds(c) for c in candidates for i in self.fitting) if run_cv else 0
            )
            seconds += final_steps * _step_seconds(self.options)
            self.log(
                f"finetune: {cv_steps + final_steps} training steps ({cv_steps} for {self.folds}-fold CV, "
                f"{final_steps or 'then the chosen recipe'} final), roughly {seconds / 60:.0f} min on 2 busy cores"
            )
        bar = _progress_bar(cv_steps + final_steps, self.progress)
        try:
            with self._timed("cv"):
                rows = [self._cross_validate(c, maps, heads, bar) for c in candidates] if run_cv else []
            chosen = self._choose(rows) if self.search else self.options
            if self.search:
                bar.total += _steps(len(train), chosen)
                bar.refresh()
            with self._timed("final"):
                final = self._final(chosen, maps, heads["all"], bar)
        finally:
            bar.close()
        with self._timed("network_check"):
            check, val_logits = self._save_and_check(out, chosen, final["values"])
        chosen_cv = next(r["correct"] for r in rows if r["options"] == chosen) if run_cv else None
        fine_tuned = self._estimates(chosen_cv, val_logits)
        head = heads["all"]
        head_val = self.features["val"].features @ head["weight"].T + head["bias"]
        head_only = self._estimates(heads["cv_correct"] if run_cv else None, head_val)
        if fine_tuned["warning"]:
            self.log(f"warning: {fine_tuned['warning']}")
        gain = None
        if chosen_cv is not None:
            from edge_build.model_selection import paired_difference

            gain = paired_difference(chosen_cv, heads["cv_correct"], self.groups, seed=self.options.seed)
        self._plots(out, chosen, final)
        timing = {
            "seconds": {
                **{k: round(v, 2) for k, v in self.seconds.items()},
                "total": round(time.perf_counter() - started, 2),
            },
            "cpu_seconds": round(time.process_time() - cpu, 1),
            "load_average": [round(load, 2), round(os.getloadavg()[0], 2)],
            "threads": _threads(),
        }
        section = {
            "blocks": chosen.blocks,
            "trainable": [*(f"stages.{i}" for i in range(chosen.start, ALL_BLOCKS)), "head"],
            "recipe": chosen.as_dict(),
            "head_recipe": self.head_options.hyperparameters(),
            "augmentation": self.augmentation.as_dict(),
            "batch_norm": "folded into the trainable convs (frozen statistics); saved in the imported BN form",
            "folds": self.folds if run_cv else None,
            "duplicate_groups": int(self.groups.max()) + 1,
            "fold_sizes": [len(h) for h in self.held_out],
            "selection": self._selection_note(rows),
            "search_table": [self._row_payload(r) for r in rows] if self.search else None,
            **fine_tuned,
            "cv_gain_over_head_only": gain,
            "head_only": head_only,
            "network_check": check,
            "feature_maps": maps_info,
            **timing,
        }
        return self._record(chosen, final, heads["all"], section)

    # ----------------------------------------------------------------- steps

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def _heads(self, run_cv: bool) -> dict[str, Any]:
        """The head on the frozen backbone's pooled features: per fold (for CV) and on everything."""
        from edge_build.training import fit_head

        train = self.features["train"]
        per_fold = (
            [fit_head(train.features[i], train.labels[i], self.head_options) for i in self.fitting] if run_cv else []
        )
        correct = np.zeros(len(train), dtype=bool)
        for fit, held in zip(per_fold, self.held_out, strict=False):
            correct[held] = (train.features[held] @ fit["weight"].T + fit["bias"]).argmax(1) == train.labels[held]
        return {
            "folds": per_fold,
            "all": fit_head(train.features, train.labels, self.head_options),
            "cv_correct": correct,
        }

    def _maps(self, candidates: list[FinetuneOptions]) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
        """The frozen part's maps, per first trainable stage, with the most views any candidate uses."""
        from edge_build.feature_maps import frozen_maps, map_shape

        train = self.features["train"]
        items = _items(train, self.data_root)
        maps: dict[int, np.ndarray] = {}
        info: dict[str, Any] = {}
        for start in sorted({c.start for c in candidates if c.blocks > 0}):
            views = max(c.views for c in candidates if c.start == start)
            size = len(train) * views * int(np.prod(map_shape(start))) * 2
            if size > MAX_CACHE_BYTES:
                raise EdgeBuildError(
                    f"fine-tuning {ALL_BLOCKS - start} stages with {views} views needs {size / 2**30:.1f} GiB of "
                    f"cached feature maps (limit {MAX_CACHE_BYTES / 2**30:.0f} GiB)",
                    "use fewer --blocks or --views",
                )
            self.log(f"finetune: feature maps entering stage {start}, {views} view(s) per image")
            result = frozen_maps(
                items,
                self.weights,
                self.build_dir,
                start,
                views,
                self.options.seed,
                self.augmentation,
                self.runtime,
                self.progress,
                self.log,
            )
            maps[start] = result.maps
            info[str(start)] = {**result.info, "key": result.key, "shape": list(result.maps.shape)}
        return maps, info

    def _cross_validate(
        self, candidate: FinetuneOptions, maps: dict[int, np.ndarray], heads: dict[str, Any], bar: Any
    ) -> dict[str, Any]:
        """Held-out correctness of every training image, each fold fine-tuned from its own head."""
        from edge_build import model_selection
        from edge_build.tail import fit_tail, initial_values, tail_logits

        started = time.perf_counter()
        train = self.features["train"]
        correct = heads["cv_correct"].copy()
        if candidate.blocks > 0:
            for fitting, held, head in zip(self.fitting, self.held_out, heads["folds"], strict=True):
                initial = initial_values(self.folded, candidate.start, head["weight"], head["bias"])
                subset = maps[candidate.start][fitting, : candidate.views]
                fit = fit_tail(subset, train.labels[fitting], initial, self.weights.padding, candidate, bar.update)
                logits = tail_logits(
                    maps[candidate.start][held, 0], fit["values"], self.weights.padding, candidate.start
                )
                correct[held] = logits.argmax(1) == train.labels[held]
        row = {
            "options": candidate,
            "correct": correct,
            "estimate": model_selection.estimate(correct, self.groups, seed=self.options.seed),
            "fold_accuracy": [round(float(correct[h].mean()), 4) for h in self.held_out],
            "seconds": round(time.perf_counter() - started, 1),
        }
        if self.search:
            self.log(f"finetune: {candidate.describe()}: CV {row['estimate'].text()}")
        return row

    def _choose(self, rows: list[dict[str, Any]]) -> FinetuneOptions:
        from edge_build.model_selection import choose

        return choose(rows, lambda row: relative_cost(row["options"]), self.groups, seed=self.options.seed)["options"]

    def _final(self, chosen: FinetuneOptions, maps: dict[int, np.ndarray], head: dict[str, Any], bar: Any) -> dict:
        """The final fine-tune on the whole training split (or the head alone for 0 blocks)."""
        from edge_build.tail import fit_tail, initial_values

        train = self.features["train"]
        if chosen.blocks == 0:
            rates = head["learning_rates"]
            values = {"head.weight": head["weight"], "head.bias": head["bias"]}
            return {
                "values": values,
                "epoch_loss": head["epoch_loss"],
                "learning_rates": rates,
                "steps_per_epoch": len(rates) // self.head_options.epochs,
            }
        initial = initial_values(self.folded, chosen.start, head["weight"], head["bias"])
        return fit_tail(
            maps[chosen.start][:, : chosen.views], train.labels, initial, self.weights.padding, chosen, bar.update
        )

    def _save_and_check(self, out: Path, chosen: FinetuneOptions, values: dict) -> tuple[dict, np.ndarray]:
        """Write network.ckpt (BN form) and head.ckpt; run the saved network on the validation images.

        Its logits must match the fine-tuned tail on the cached maps (top-1 identical,
        logits within NETWORK_CHECK_MAX_ABS): the checkpoint is the network that was trained.
        """
        from edge_build.feature_maps import frozen_maps
        from edge_build.runners import MindSporeRunner, run_batched
        from edge_build.tail import EVAL_BATCH, bn_form_classifier, tail_logits

        val = self.features["val"]
        classifier = bn_form_classifier(self.weights, values)
        network.save_checkpoint(classifier, out / NETWORK_NAME)
        network.save_checkpoint(classifier.head, out / HEAD_NAME)
        items = _items(val, self.data_root)
        if chosen.blocks > 0:
            val_maps = frozen_maps(
                items,
                self.weights,
                self.build_dir,
                chosen.start,
                1,
                self.options.seed,
                self.augmentation,
                self.runtime,
                False,
                self.log,
            )
            expected = tail_logits(val_maps.maps[:, 0], values, self.weights.padding, chosen.start)
        else:
            expected = val.features @ values["head.weight"].T + values["head.bias"]
        batch = self.weights.preprocessing.prepare_batch([ref.path for ref, _ in items])
        logits = run_batched(MindSporeRunner(network.fold_batchnorm(classifier)), batch, EVAL_BATCH)
        check = {
            "images": len(items),
            "top1_agreement": float((logits.argmax(1) == expected.argmax(1)).mean()),
            "max_abs_logit_difference": float(np.abs(logits - expected).max()),
        }
        if check["top1_agreement"] < 1.0 or check["max_abs_logit_difference"] > NETWORK_CHECK_MAX_ABS:
            raise CheckFailed(
                f"the saved network disagrees with the fine-tuned stages on the validation images "
                f"(top-1 agreement {check['top1_agreement']:.1%}, "
                f"max |logit diff| {check['max_abs_logit_difference']:.3g})",
                "report this as a bug; run again with --force after fixing it",
            )
        return check, logits

    def _estimates(self, cv_correct: np.ndarray | None, val_logits: np.ndarray) -> dict[str, Any]:
        """CV estimate (duplicate-group bootstrap), validation (Wilson), validation without training duplicates."""
        from edge_build import model_selection
        from edge_build.evaluation import leakage

        val = self.features["val"]
        duplicated = leakage(self.features)["_any"]
        val_correct = val_logits.argmax(1) == np.asarray(val.labels)
        cv: Estimate | None = None
        per_photo, by_class = None, None
        if cv_correct is not None:
            cv = model_selection.estimate(cv_correct, self.groups, seed=self.options.seed)
            per_photo = model_selection.per_photo_estimate(cv_correct, self.groups, seed=self.options.seed)
            names = [f"{c.code} ({c.english})" for c in taxonomy.CLASSES]
            by_class = model_selection.errors_by_class(cv_correct, self.features["train"].labels, self.groups, names)
        validation = model_selection.estimate(val_correct)
        clean = model_selection.estimate(val_correct[~duplicated]) if (~duplicated).any() else None
        return {
            "cv": cv.as_dict() if cv else None,
            "cv_per_photo": per_photo.as_dict() if per_photo else None,
            "cv_errors_by_class": by_class,
            "cv_concentration": model_selection.concentration_warning(by_class) if by_class else None,
            "validation": validation.as_dict(),
            "validation_without_duplicates": clean.as_dict() if clean else None,
            "warning": model_selection.disagreement(validation, cv) if cv else None,
        }

    # ----------------------------------------------------------------- the record

    def _selection_note(self, rows: list[dict[str, Any]]) -> str:
        if not self.search:
            return DEFAULT_CHOICE_NOTE
        return (
            f"{len(rows)} candidates by {self.folds}-fold duplicate-aware CV on the training split: the cheapest "
            "that the most accurate does not beat significantly (paired group bootstrap); its estimate is "
            "optimistic by the selection"
        )

    @staticmethod
    def _row_payload(row: dict[str, Any]) -> dict[str, Any]:
        options = row["options"]
        return {
            **{k: getattr(options, k) for k in ("blocks", "lr", "epochs", "views")},
            "cv": row["estimate"].as_dict(),
            "fold_accuracy": row["fold_accuracy"],
            "seconds": row["seconds"],
            "relative_cost": round(relative_cost(options), 3),
        }

    def _plots(self, out: Path, chosen: FinetuneOptions, final: dict[str, Any]) -> None:
        from edge_build import plots
        from edge_build.schedules import build_lr

        rates = final["learning_rates"]
        train_images = len(self.features["train"])
        plots.plot_loss(
            final["epoch_loss"], out / "loss.png", title=f"{chosen.describe()}: loss ({train_images} images)"
        )
        if chosen.blocks:
            schedules = {
                name: build_lr(len(rates), chosen.lr, name, int(chosen.warmup * len(rates))) for name in SCHEDULES
            }
            used = chosen.lr_schedule
        else:
            from edge_build.training import learning_rates

            schedules = {
                name: learning_rates(replace(self.head_options, lr_schedule=name), train_images) for name in SCHEDULES
            }
            used = self.head_options.lr_schedule
        title = f"learning rate: {chosen.describe()}"
        plots.plot_lr_schedules(schedules, final["steps_per_epoch"], used, out / "lr_schedules.png", title=title)

    def _record(self, chosen: FinetuneOptions, final: dict, head: dict, section: dict) -> dict[str, Any]:
        """training.json: what `trained.load_trained` reads (as the head-only stage writes it) + "finetune"."""
        train = self.features["train"]
        architecture = (
            f"MobileNetV2 1.0 224 backbone, last {chosen.blocks} stage(s) fine-tuned + nn.Dense(1280, 26)"
            if chosen.blocks
            else "MobileNetV2 1.0 224 backbone (frozen) + nn.Dense(1280, 26)"
        )
        return {
            "schema": SCHEMA,
            "num_classes": taxonomy.NUM_CLASSES,
            "labels": taxonomy.labels_payload(),
            "architecture": architecture,
            "weights": {"sha256": self.weights.sha256, "metadata": self.weights.metadata},
            "preprocessing": self.weights.preprocessing.as_dict(),
            "padding": self.weights.padding,
            "inputs": {
                "train_features_sha256": self.features.content_hash("train"),
                "feature_key": self.features.key,
                "feature_runtime": self.features.runtime,
                "train_images": len(train),
                "weights_sha256": self.weights.sha256,
            },
            "options": asdict(self.head_options),
            "hyperparameters": self.head_options.hyperparameters(),
            "search": None,
            "history": {
                "epoch_loss": [round(v, 6) for v in final["epoch_loss"]],
                "head_epoch_loss": [round(v, 6) for v in head["epoch_loss"]],
                "note": "fine-tuning loss per pass over the cached views; `edge-build eval` measures validation",
            },
            "learning_rate": {"steps_per_epoch": final["steps_per_epoch"], "per_step": final["learning_rates"]},
            "files": {"head": HEAD_NAME, "network": NETWORK_NAME, "plots": ["loss.png", "lr_schedules.png"]},
            "finetune": section,
            "seconds": section["seconds"]["total"],
        }


def summary_lines(section: dict[str, Any]) -> list[str]:
    """Fine-tuned vs head only in a few log lines (the `train --finetune` command prints a fuller table)."""

    from edge_build.model_selection import Estimate

    def text(payload: dict[str, Any] | None) -> str:
        return Estimate(**payload).text() if payload else "not estimated"

    head = section["head_only"]
    lines = [
        f"finetune: CV top-1 {text(section['cv'])} vs head only {text(head['cv'])}; "
        f"per distinct photo {text(section.get('cv_per_photo'))} vs {text(head.get('cv_per_photo'))}",
        f"finetune: validation top-1 {text(section['validation'])} vs head only {text(head['validation'])}",
    ]
    gain = section.get("cv_gain_over_head_only")
    if gain:
        lines.append(
            f"finetune: gain {100 * gain['gain']:+.1f} pt on the same folds "
            f"[{100 * gain['low']:+.1f}, {100 * gain['high']:+.1f}] (paired)"
        )
    lines += [f"finetune: note: {note}" for note in (section.get("cv_concentration"), section["warning"]) if note]
    return lines


def _threads() -> int:
    from edge_build.msenv import threads

    return threads()


def _publish(run_dir: Path, build_dir: Path, ran: bool, log: Callable[[str], None]) -> TrainResult:
    """Copy the run's files into build/train (the `train` stage's directory, what `load_trained` reads)."""
    from edge_build import atomic
    from edge_build.hashing import sha256_file

    directory = build_dir / "train"
    inputs = {"finetune_run": {name: sha256_file(run_dir / name) for name in PUBLISHED}}

    def produce(out: Path) -> dict[str, Any]:
        for stale in out.iterdir():  # another recipe's extra outputs (the head-only stage writes these names)
            if stale.is_file() and stale.name not in PUBLISHED:
                stale.unlink()
        for name in PUBLISHED:
            atomic.write_bytes(out / name, (run_dir / name).read_bytes())
        return {"published_from": str(run_dir)}

    result = run_stage(STAGE, directory, inputs, produce, log=log)
    record = json.loads((directory / RECORD_NAME).read_text(encoding="utf-8"))
    info = {**result.info, "trained": ran, "published": result.ran}
    return TrainResult(directory, directory / HEAD_NAME, directory / NETWORK_NAME, record, ran, info)
