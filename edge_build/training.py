"""Stage `train`: the 26-class head (nn.Dense(1280, 26)) on cached backbone features, in MindSpore.

Momentum SGD with a per-step learning-rate list (`schedules.build_lr`), weight decay on
the weight (not the bias), cross-entropy, deterministic: the head starts at zero and
the data order comes from a NumPy generator seeded with `seed`, so the same features
and options give the same head bit for bit (on the same machine and thread count).

`search` picks learning rate, weight decay and epochs by k-fold cross-validation on the
training features only, with duplicate-aware folds (`edge_build.folds`), then retrains
on all training data. The folds of every candidate are trained together as one
vectorized MindSpore graph (`_train_many`): same recipe, one compiled step for all.

Outputs in build/train/: head.ckpt, network.ckpt (backbone + head, BatchNorm form),
training.json (options, chosen values, CV table, per-epoch loss, learning rates, the
inputs' hashes, what `trained.load_trained` needs), loss.png, lr_schedules.png.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_build import atomic, plots, taxonomy
from edge_build.errors import EdgeBuildError
from edge_build.schedules import SCHEDULES, build_lr
from edge_build.stages import run_stage

if TYPE_CHECKING:
    from edge_build.features import FeatureSet, SplitFeatures
    from edge_build.weights import ImportedWeights

STAGE = "train"
TRAINER_VERSION = 3
RECORD_NAME = "training.json"
HEAD_NAME = "head.ckpt"
NETWORK_NAME = "network.ckpt"
SCHEMA = 1

#: Candidates of `--search`. The CV landscape on the shared data is flat near the
#: defaults (about +-0.5 pt between neighbours, folds differ by 5 pt), so the grid
#: brackets the defaults by a factor of about 3 each way rather than sampling finely.
SEARCH_LR = (0.01, 0.03, 0.1)
SEARCH_WEIGHT_DECAY = (1e-3, 1e-2, 1e-1)
SEARCH_EPOCHS = (10, 20)
#: The search replaces the given recipe only when its best candidate is better by more
#: than this many standard errors of the paired per-fold difference.
MIN_IMPROVEMENT_SE = 2.0


@dataclass(frozen=True)
class TrainOptions:
    """The course's knobs. Defaults measured by duplicate-aware 5-fold CV on the shared data."""

    lr: float = 0.03
    lr_schedule: str = "cosine"
    warmup_epochs: int = 1
    epochs: int = 20
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 0.01
    seed: int = 0
    search: bool = False
    folds: int = 5

    def validate(self) -> TrainOptions:
        problems = []
        if not self.lr > 0:
            problems.append(("--lr", self.lr, "a learning rate > 0"))
        if self.lr_schedule not in SCHEDULES:
            problems.append(("--lr-schedule", self.lr_schedule, " | ".join(SCHEDULES)))
        if self.epochs < 1:
            problems.append(("--epochs", self.epochs, "at least 1"))
        if not 0 <= self.warmup_epochs <= self.epochs:
            problems.append(("--warmup-epochs", self.warmup_epochs, f"0..epochs ({self.epochs})"))
        if self.batch_size < 1:
            problems.append(("--batch-size", self.batch_size, "at least 1"))
        if not 0 <= self.momentum < 1:
            problems.append(("--momentum", self.momentum, "in [0, 1)"))
        if self.weight_decay < 0:
            problems.append(("--weight-decay", self.weight_decay, ">= 0"))
        if self.folds < 2:
            problems.append(("--folds", self.folds, "at least 2"))
        if problems:
            option, value, allowed = problems[0]
            raise EdgeBuildError(f"invalid training option {option} {value}", f"allowed: {allowed}")
        return self

    def hyperparameters(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("search", "folds")}


@dataclass
class TrainResult:
    directory: Path
    head_checkpoint: Path
    network_checkpoint: Path
    record: dict[str, Any]
    ran: bool
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- recipe pieces


def steps_per_epoch(samples: int, batch_size: int) -> int:
    return math.ceil(samples / batch_size)


def learning_rates(options: TrainOptions, samples: int) -> list[float]:
    per_epoch = steps_per_epoch(samples, options.batch_size)
    return build_lr(
        options.epochs * per_epoch, options.lr, options.lr_schedule, warmup_steps=options.warmup_epochs * per_epoch
    )


def epoch_orders(samples: int, epochs: int, seed: int) -> Iterator[np.ndarray]:
    """The sample order of each epoch: one seeded generator, one permutation per epoch."""
    generator = np.random.default_rng(seed)
    for _ in range(epochs):
        yield generator.permutation(samples)


def cap_cpu_threads(ms: Any) -> None:
    """Run MindSpore's CPU kernels on `msenv.threads()` threads unless the process already chose a count.

    MindSpore defaults to 25 kernel threads; on a 2-core machine that oversubscription makes
    the CV search ~1.7x slower (measured: 26 s -> 15 s wall). The count can be set once per process.
    """
    from edge_build.msenv import threads

    with contextlib.suppress(RuntimeError):  # "can not be set repeatedly": someone chose already
        ms.device_context.cpu.op_tuning.threads_num(threads())


@contextlib.contextmanager
def graph_mode() -> Iterator[Any]:
    """MindSpore in GRAPH_MODE for the duration (a compiled train step: ~4x less overhead than PyNative)."""
    from edge_build.msenv import mindspore_module

    ms = mindspore_module()
    cap_cpu_threads(ms)
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        yield ms
    finally:
        ms.set_context(mode=previous)


def _seed_everything(ms: Any, seed: int) -> None:
    # All randomness here comes from explicit NumPy generators and zero initialisation;
    # MindSpore's global seed is set too so that no op can draw from an unseeded state.
    ms.set_seed(seed)


def fit_head(features: np.ndarray, labels: np.ndarray, options: TrainOptions) -> dict[str, Any]:
    """Train nn.Dense(1280, K) with nn.Momentum on (features, labels); the head and its history."""
    from edge_build import network

    features = np.ascontiguousarray(features, dtype=np.float32)
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    samples = len(features)
    rates = learning_rates(options, samples)
    with graph_mode() as ms:
        _seed_everything(ms, options.seed)
        nn = ms.nn
        head = network.build_head(taxonomy.NUM_CLASSES)
        head.weight.set_data(ms.Tensor(np.zeros(head.weight.shape, np.float32)))
        head.bias.set_data(ms.Tensor(np.zeros(head.bias.shape, np.float32)))
        optimizer = nn.Momentum(
            [
                {"params": [head.weight], "weight_decay": options.weight_decay},
                {"params": [head.bias], "weight_decay": 0.0},
            ],
            learning_rate=ms.Tensor(np.asarray(rates, dtype=np.float32)),
            momentum=options.momentum,
        )
        loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
        step = nn.TrainOneStepCell(nn.WithLossCell(head, loss_fn), optimizer)
        step.set_train()
        epoch_loss = []
        for order in epoch_orders(samples, options.epochs, options.seed):
            total = 0.0
            for start in range(0, samples, options.batch_size):
                batch = order[start : start + options.batch_size]
                loss = step(ms.Tensor(features[batch]), ms.Tensor(labels[batch]))
                total += float(loss.asnumpy()) * len(batch)
            epoch_loss.append(total / samples)
        weight = head.weight.asnumpy().copy()
        bias = head.bias.asnumpy().copy()
    if not np.all(np.isfinite(weight)):
        raise EdgeBuildError(
            f"training diverged (loss {epoch_loss[-1]:.3g}) with lr {options.lr}", "lower --lr or add --warmup-epochs"
        )
    return {"weight": weight, "bias": bias, "epoch_loss": epoch_loss, "learning_rates": rates}


# --------------------------------------------------------------------------- cross-validation


def _make_many_cell(ms: Any, folds: int, batch: int, configs: int, dims: int, classes: int) -> Any:
    """One compiled step that trains folds x configs heads at once: the recipe of `fit_head`, vectorized.

    Parameters are (F, dims, C*K): every config's head side by side per fold, so the
    forward pass is one batched matmul. The gradient of the mean cross-entropy is written
    out (softmax - one-hot) instead of going through autodiff, and the update is
    MindSpore's fused ApplyMomentum. Configs differ in learning rate and weight decay
    only; the schedule's shape is shared, so config c's rate is lr_c * shape(t). Scaling
    the momentum buffer by lr_c (v' = lr_c * v) turns that into one scalar rate per step:
    v' = m*v' + lr_c*(g + wd_c*w); w -= shape(t)*v', the same iterates as
    v = m*v + g + wd_c*w; w -= lr_c*shape(t)*v (nn.Momentum's rule).
    """
    nn, ops = ms.nn, ms.ops
    width = configs * classes

    class ManyHeads(nn.Cell):
        def __init__(self) -> None:
            super().__init__()
            self.w = ms.Parameter(ms.Tensor(np.zeros((folds, dims, width), np.float32)), name="w")
            self.b = ms.Parameter(ms.Tensor(np.zeros((folds, 1, width), np.float32)), name="b")
            self.vw = ms.Parameter(ms.Tensor(np.zeros((folds, dims, width), np.float32)), name="vw")
            self.vb = ms.Parameter(ms.Tensor(np.zeros((folds, 1, width), np.float32)), name="vb")
            self.matmul = ops.BatchMatMul()
            self.matmul_t = ops.BatchMatMul(transpose_a=True)
            self.momentum_update = ops.ApplyMomentum()

        def construct(self, table, onehot_table, index, sample_weight, lr_scale, decay, rate, momentum):
            x = ops.gather(table, index, 0)  # (F, B, D)
            onehot = ops.gather(onehot_table, index, 0).reshape(folds, batch, 1, classes)
            logits = (self.matmul(x, self.w) + self.b).reshape(folds, batch, configs, classes)
            # d(mean cross-entropy)/d(logits), times lr_c; padding rows have sample_weight 0.
            scale = sample_weight.reshape(folds, batch, 1, 1) * lr_scale
            grad_logits = ((ops.softmax(logits, -1) - onehot) * scale).reshape(folds, batch, width)
            grad_w = self.matmul_t(x, grad_logits) + decay * self.w
            grad_b = ops.sum(grad_logits, 1, True)
            self.momentum_update(self.w, self.vw, rate, grad_w, momentum)
            self.momentum_update(self.b, self.vb, rate, grad_b, momentum)
            return rate

    return ManyHeads()


def _train_many(
    features: np.ndarray,
    labels: np.ndarray,
    train_sets: list[np.ndarray],
    configs: list[TrainOptions],
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Heads for every (fold, config): weights (F, C, K, D) and biases (F, C, K).

    The configs may differ in learning rate and weight decay only. Each fold sees its
    data in the order `fit_head` on that fold's training set would use. Folds whose
    epochs have different step counts are trained in separate groups.
    """
    first = configs[0]
    shared = ("epochs", "batch_size", "momentum", "seed", "lr_schedule", "warmup_epochs")
    if any(getattr(c, name) != getattr(first, name) for c in configs for name in shared):
        raise ValueError(f"_train_many: configs must share {', '.join(shared)}")
    dims, classes = features.shape[1], taxonomy.NUM_CLASSES
    weights = np.zeros((len(train_sets), len(configs), classes, dims), np.float32)
    biases = np.zeros((len(train_sets), len(configs), classes), np.float32)
    by_steps: dict[int, list[int]] = {}
    for f, subset in enumerate(train_sets):
        by_steps.setdefault(steps_per_epoch(len(subset), first.batch_size), []).append(f)
    lr_scale = np.asarray([c.lr for c in configs], np.float32).reshape(1, 1, len(configs), 1)
    decay = np.repeat(np.asarray([c.lr * c.weight_decay for c in configs], np.float32), classes)
    with graph_mode() as ms:
        _seed_everything(ms, first.seed)
        table = ms.Tensor(np.ascontiguousarray(features, np.float32))
        onehot = ms.Tensor(np.eye(classes, dtype=np.float32)[labels])
        momentum = ms.Tensor(np.float32(first.momentum))
        for per_epoch, members in by_steps.items():
            # Weight decay as a full (F, D, C*K) tensor: MindSpore's CPU broadcasting multiply is ~3x slower.
            full_decay = np.ascontiguousarray(np.broadcast_to(decay, (len(members), dims, decay.size)))
            constants = (ms.Tensor(lr_scale), ms.Tensor(full_decay))
            w, b = _run_group(
                ms,
                table,
                onehot,
                [train_sets[f] for f in members],
                first,
                per_epoch,
                len(configs),
                constants,
                momentum,
                progress if len(by_steps) == 1 else None,
            )
            weights[members], biases[members] = w, b
    if progress and len(by_steps) > 1:
        progress(first.epochs)
    return weights, biases


def _run_group(
    ms: Any,
    table: Any,
    onehot: Any,
    subsets: list[np.ndarray],
    options: TrainOptions,
    per_epoch: int,
    configs: int,
    constants: tuple[Any, Any],
    momentum: Any,
    progress: Callable[[int], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    folds, batch = len(subsets), options.batch_size
    dims, classes = table.shape[1], taxonomy.NUM_CLASSES
    shape = np.asarray(learning_rates(replace(options, lr=1.0), per_epoch * batch), np.float32)
    orders = [list(epoch_orders(len(subset), options.epochs, options.seed)) for subset in subsets]
    cell = _make_many_cell(ms, folds, batch, configs, dims, classes)
    for epoch in range(options.epochs):
        for s in range(per_epoch):
            index = np.zeros((folds, batch), np.int32)
            weight = np.zeros((folds, batch), np.float32)
            for f, subset in enumerate(subsets):
                chosen = subset[orders[f][epoch][s * batch : (s + 1) * batch]]
                index[f, : len(chosen)] = chosen
                weight[f, : len(chosen)] = 1.0 / len(chosen)  # the mean over the batch's real samples
            rate = ms.Tensor(shape[epoch * per_epoch + s])
            cell(table, onehot, ms.Tensor(index), ms.Tensor(weight), *constants, rate, momentum)
        if progress:
            progress(1)
    w = cell.w.asnumpy().reshape(folds, dims, configs, classes).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(w), cell.b.asnumpy().reshape(folds, configs, classes)


def _scores(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_prob = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    nll = float(-log_prob[np.arange(len(labels)), labels].mean())
    return float((logits.argmax(axis=1) == labels).mean()), nll


def search_grid(options: TrainOptions) -> list[TrainOptions]:
    """The grid's candidates, plus the given recipe itself (the baseline the search must beat)."""
    candidates = [
        replace(options, lr=lr, weight_decay=wd, epochs=epochs, warmup_epochs=min(options.warmup_epochs, epochs))
        for epochs, lr, wd in itertools.product(SEARCH_EPOCHS, SEARCH_LR, SEARCH_WEIGHT_DECAY)
    ]
    if all(_knobs(c) != _knobs(options) for c in candidates):
        candidates.append(options)
    return candidates


def _knobs(options: TrainOptions | dict[str, Any]) -> tuple[float, float, int]:
    if isinstance(options, dict):
        return (options["lr"], options["weight_decay"], options["epochs"])
    return (options.lr, options.weight_decay, options.epochs)


def choose(
    rows: list[dict[str, Any]], base: TrainOptions, fold_sizes: list[int]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(best row, chosen row, comparison of the given recipe with the best).

    The CV landscape of a linear head is flat near its optimum: neighbours differ by a
    few tenths of a point, less than the fold-to-fold noise, so the arg-max flips with the
    fold assignment. The choice is made robust by treating the given recipe as the
    baseline: it is replaced by the best candidate (highest mean CV accuracy, then lowest
    log-loss) only when the best beats it by more than MIN_IMPROVEMENT_SE standard errors
    of their paired per-fold difference (about 95 % one-sided), and by more than one
    image per fold.
    """
    best = min(rows, key=lambda r: (-r["cv_accuracy"], r["cv_nll"]))
    base_row = next(r for r in rows if _knobs(r) == _knobs(base))
    difference = np.asarray(best["fold_accuracy"]) - np.asarray(base_row["fold_accuracy"])
    standard_error = float(difference.std(ddof=1) / math.sqrt(len(difference)))
    one_image = 1.0 / float(np.mean(fold_sizes))
    margin = float(difference.mean())
    keep_base = margin <= max(MIN_IMPROVEMENT_SE * standard_error, one_image)
    comparison = {
        "best_minus_given": round(margin, 5),
        "standard_error": round(standard_error, 5),
        "one_image_per_fold": round(one_image, 5),
        "threshold_se": MIN_IMPROVEMENT_SE,
        "kept_given_recipe": bool(keep_base),
    }
    return best, (base_row if keep_base else best), comparison


Mirrored = tuple[np.ndarray, np.ndarray]  # pHash, dHash of each training image flipped (edge_build.mirrored)


def cv_folds(
    train: SplitFeatures, options: TrainOptions, mirrored: Mirrored | None = None
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(duplicate group per image, training indices per fold, held-out indices per fold).

    Exact copies and near-duplicates (mirrored ones too, given their hashes) share a group and
    a group never straddles folds; the assignment depends only on the images and the seed, so
    features of the same images at another size or from another backbone get the same folds.
    """
    from edge_build.folds import duplicate_groups, grouped_folds

    flipped = {} if mirrored is None else {"mirrored_phash": mirrored[0], "mirrored_dhash": mirrored[1]}
    groups = duplicate_groups(train.sha256, train.pixel_sha256, phash=train.phash, dhash=train.dhash, **flipped)
    fold_of = grouped_folds(train.labels, groups, options.folds, options.seed)
    train_sets = [np.flatnonzero(fold_of != f) for f in range(options.folds)]
    held_out = [np.flatnonzero(fold_of == f) for f in range(options.folds)]
    return groups, train_sets, held_out


def out_of_fold_correct(
    train: SplitFeatures, options: TrainOptions, mirrored: Mirrored | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(whether each training image is classified right by the head of the fold that held it out, its group)."""
    groups, train_sets, held_out = cv_folds(train, options, mirrored)
    weights, biases = _train_many(train.features, train.labels, train_sets, [options])
    correct = np.zeros(len(train), dtype=bool)
    for f, held in enumerate(held_out):
        logits = train.features[held] @ weights[f, 0].T + biases[f, 0]
        correct[held] = logits.argmax(axis=1) == train.labels[held]
    return correct, groups


def cross_validate(
    features: FeatureSet,
    options: TrainOptions,
    log: Callable[[str], None],
    progress: bool = True,
    mirrored: Mirrored | None = None,
) -> tuple[dict[str, Any], TrainOptions]:
    """k-fold CV over the search grid on the training split: (the record with the CV table, the chosen options)."""
    from tqdm import tqdm

    started = time.perf_counter()
    train = features["train"]
    groups, train_sets, held_out = cv_folds(train, options, mirrored)
    candidates = search_grid(options)
    by_epochs: dict[tuple[int, int], list[TrainOptions]] = {}
    for candidate in candidates:
        by_epochs.setdefault((candidate.epochs, candidate.warmup_epochs), []).append(candidate)
    rows = []
    bar = tqdm(
        total=sum(epochs for epochs, _ in by_epochs),
        desc="cv search",
        unit="epoch",
        file=sys.stderr,
        disable=not (progress and sys.stderr.isatty()),
        leave=False,
    )
    try:
        for group in by_epochs.values():
            weights, biases = _train_many(train.features, train.labels, train_sets, group, progress=bar.update)
            for c, candidate in enumerate(group):
                per_fold = [
                    _scores(train.features[held] @ weights[f, c].T + biases[f, c], train.labels[held])
                    for f, held in enumerate(held_out)
                ]
                accuracy = np.array([a for a, _ in per_fold])
                rows.append(
                    {
                        "lr": candidate.lr,
                        "weight_decay": candidate.weight_decay,
                        "epochs": candidate.epochs,
                        "cv_accuracy": float(accuracy.mean()),
                        "cv_accuracy_std": float(accuracy.std(ddof=1)),
                        "cv_nll": float(np.mean([n for _, n in per_fold])),
                        "fold_accuracy": [float(a) for a in accuracy],
                    }
                )
    finally:
        bar.close()
    best, chosen_row, comparison = choose(rows, options, [len(h) for h in held_out])
    chosen = replace(
        options,
        lr=chosen_row["lr"],
        weight_decay=chosen_row["weight_decay"],
        epochs=chosen_row["epochs"],
        warmup_epochs=min(options.warmup_epochs, chosen_row["epochs"]),
    )
    seconds = time.perf_counter() - started
    log(f"cv search: {len(rows)} candidates x {options.folds} folds in {seconds:.1f} s")
    record = {
        "folds": options.folds,
        "fold_sizes": [len(h) for h in held_out],
        "duplicate_groups": int(groups.max()) + 1,
        "mirror_aware": mirrored is not None,
        "images": len(train),
        "grid": {"lr": list(SEARCH_LR), "weight_decay": list(SEARCH_WEIGHT_DECAY), "epochs": list(SEARCH_EPOCHS)},
        "selection": (
            "the given recipe, unless the best candidate (highest mean CV accuracy, then lowest log-loss) "
            f"beats it by more than {MIN_IMPROVEMENT_SE:g} standard errors of their paired per-fold difference "
            "and by more than one image per fold"
        ),
        "given": {"lr": options.lr, "weight_decay": options.weight_decay, "epochs": options.epochs},
        "comparison": comparison,
        "table": sorted(rows, key=lambda r: (-r["cv_accuracy"], r["cv_nll"])),
        "best_row": best,
        "chosen": {"lr": chosen.lr, "weight_decay": chosen.weight_decay, "epochs": chosen.epochs},
        "chosen_row": chosen_row,
        "seconds": round(seconds, 2),
    }
    return record, chosen


# --------------------------------------------------------------------------- the stage


def _schedule_comparison(options: TrainOptions, samples: int) -> dict[str, list[float]]:
    return {name: learning_rates(replace(options, lr_schedule=name), samples) for name in SCHEDULES}


def train_head(
    features: FeatureSet,
    weights: ImportedWeights,
    build_dir: Path,
    options: TrainOptions,
    progress: bool = True,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    data_root: Path | None = None,
) -> TrainResult:
    """Train the head on the training split (optionally choosing lr/weight decay/epochs by CV).

    With `data_root` the CV folds also keep mirrored copies together (their hashes need the images).
    """
    from edge_build import network
    from edge_build.msenv import mindspore_module

    log = log or (lambda message: None)
    options.validate()
    directory = Path(build_dir) / "train"
    train = features["train"]
    inputs = {
        "train_features_sha256": features.content_hash("train"),
        "feature_key": features.key,
        "weights_sha256": weights.sha256,
        "options": asdict(options),
        "trainer": TRAINER_VERSION,
        "mirror_aware_folds": options.search and data_root is not None,
    }

    def produce(out: Path) -> dict[str, Any]:
        started = time.perf_counter()
        search = None
        chosen = options
        if options.search:
            mirrored = None
            if data_root is not None:
                from edge_build.mirrored import image_items, mirrored_hashes

                mirrored = mirrored_hashes(image_items(train, Path(data_root)), Path(build_dir))
            search, chosen = cross_validate(features, options, log, progress, mirrored)
        fit = fit_head(train.features, train.labels, chosen)
        head = network.build_head(taxonomy.NUM_CLASSES)
        ms = mindspore_module()
        head.weight.set_data(ms.Tensor(fit["weight"]))
        head.bias.set_data(ms.Tensor(fit["bias"]))
        network.save_checkpoint(head, out / HEAD_NAME)
        classifier = network.build_classifier(weights.load_backbone(fold_bn=False), head)
        network.save_checkpoint(classifier, out / NETWORK_NAME)
        accuracy, nll = _scores(train.features @ fit["weight"].T + fit["bias"], train.labels)
        per_epoch = steps_per_epoch(len(train), chosen.batch_size)
        plots.plot_loss(fit["epoch_loss"], out / "loss.png", title=f"head training loss ({len(train)} images)")
        plots.plot_lr_schedules(
            _schedule_comparison(chosen, len(train)),
            per_epoch,
            chosen.lr_schedule,
            out / "lr_schedules.png",
            title=f"learning rate: lr {chosen.lr:g}, {chosen.warmup_epochs} warm-up epoch(s), {chosen.epochs} epochs",
        )
        seconds = time.perf_counter() - started
        record = {
            "schema": SCHEMA,
            "num_classes": taxonomy.NUM_CLASSES,
            "labels": taxonomy.labels_payload(),
            "architecture": "MobileNetV2 1.0 224 backbone (frozen) + nn.Dense(1280, 26)",
            "weights": {"sha256": weights.sha256, "metadata": weights.metadata},
            "preprocessing": weights.preprocessing.as_dict(),
            "padding": weights.padding,
            "inputs": {
                "train_features_sha256": inputs["train_features_sha256"],
                "feature_key": features.key,
                "feature_runtime": features.runtime,
                "train_images": len(train),
                "weights_sha256": weights.sha256,
            },
            "options": asdict(options),
            "hyperparameters": chosen.hyperparameters(),
            "search": search,
            "history": {
                "epoch_loss": [round(v, 6) for v in fit["epoch_loss"]],
                "train_accuracy": accuracy,
                "train_nll": nll,
                "note": "accuracy on the training images themselves; `edge-build eval` measures the validation split",
            },
            "learning_rate": {"steps_per_epoch": per_epoch, "per_step": fit["learning_rates"]},
            "files": {"head": HEAD_NAME, "network": NETWORK_NAME, "plots": ["loss.png", "lr_schedules.png"]},
            "seconds": round(seconds, 2),
        }
        atomic.write_json(out / RECORD_NAME, record)
        return {
            "hyperparameters": chosen.hyperparameters(),
            "search": None if search is None else {k: search[k] for k in ("chosen", "chosen_row", "seconds")},
            "final_loss": fit["epoch_loss"][-1],
            "train_accuracy": accuracy,
            "seconds": round(seconds, 2),
        }

    result = run_stage(STAGE, directory, inputs, produce, force=force)
    record = json.loads((directory / RECORD_NAME).read_text(encoding="utf-8"))
    return TrainResult(directory, directory / HEAD_NAME, directory / NETWORK_NAME, record, result.ran, result.info)
