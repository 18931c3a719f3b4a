"""`edge-build features | train | eval | predict`: the experiment of the course, as build stages."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from edge_build.cli.common import path_options, settings_from
from edge_build.cli.finetune import finetune_options, pop_finetune, run_finetune
from edge_build.config import Settings
from edge_build.schedules import SCHEDULES
from edge_build.training import TrainOptions

_DEFAULT = TrainOptions()


def _log(message: str) -> None:
    click.echo(message, err=True)


def _weights(settings: Settings) -> Any:
    from edge_build.weights import import_weights

    return import_weights(settings.weights.require_file("weights file"), settings.build_dir)


def _features(settings: Settings, runtime: str = "auto", progress: bool = True) -> Any:
    from edge_build.features import extract_features

    data = settings.data.require_dir("data set")
    return extract_features(data, _weights(settings), settings.build_dir, progress=progress, runtime=runtime, log=_log)


def _knobs(row: dict[str, Any]) -> tuple[float, float, int]:
    return (row["lr"], row["weight_decay"], row["epochs"])


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


@click.command(name="features")
@click.option(
    "--runtime",
    type=click.Choice(["auto", "onnxruntime", "mindspore"]),
    default="auto",
    show_default=True,
    help="Backbone runtime for bulk extraction; auto = ONNX Runtime after a parity check against MindSpore.",
)
@path_options("data", "weights", "build")
def features(runtime: str, **paths: Any) -> None:
    """Extract and cache the 1280-d backbone features of every image (train and val).

    Cached by content: only images whose bytes are new are computed; new weights
    recompute everything.
    """
    from edge_build.locking import build_lock

    settings = settings_from(paths)
    with build_lock(settings.build_dir):
        feature_set = _features(settings, runtime)
    info = feature_set.info
    counts = ", ".join(f"{split} {len(feature_set[split])}" for split in feature_set.splits)
    if not info.get("ran"):
        click.echo(f"features: up to date ({counts}; runtime {feature_set.runtime})")
    else:
        speed = f" ({info['images_per_second']:.0f} img/s)" if info.get("images_per_second") else ""
        click.echo(
            f"features: {counts}; {info['unique_images']} distinct images: computed {info['computed']}, "
            f"reused {info['reused']} from the cache, in {info['seconds']:.1f} s{speed}"
        )
        click.echo(f"  runtime  {feature_set.runtime}")
    parity = info.get("parity")
    if parity and feature_set.runtime == "onnxruntime":
        click.echo(
            f"  parity   ONNX backbone vs MindSpore on {len(parity['images'])} real images: "
            f"min cosine {parity['min_cosine']:.7f} (>= {parity['threshold']}), max |diff| {parity['max_abs']:.2g}"
        )
    click.echo(f"  written  {feature_set.directory}")


@click.command(name="train")
@click.option("--lr", type=float, default=None, help=f"Peak learning rate [{_DEFAULT.lr:g}].")
@click.option(
    "--lr-schedule",
    type=click.Choice(list(SCHEDULES)),
    default=None,
    help=f"Decay after the warm-up [{_DEFAULT.lr_schedule}].",
)
@click.option("--warmup-epochs", type=int, default=None, help=f"Linear warm-up epochs [{_DEFAULT.warmup_epochs}].")
@click.option("--epochs", type=int, default=None, help=f"Epochs [{_DEFAULT.epochs}].")
@click.option("--batch-size", type=int, default=None, help=f"Batch size [{_DEFAULT.batch_size}].")
@click.option("--momentum", type=float, default=None, help=f"SGD momentum [{_DEFAULT.momentum:g}].")
@click.option(
    "--weight-decay", type=float, default=None, help=f"Weight decay on the head's weight [{_DEFAULT.weight_decay:g}]."
)
@click.option("--seed", type=int, default=None, help=f"Seed of the data order [{_DEFAULT.seed}].")
@click.option("--search", is_flag=True, help="Choose lr, weight decay and epochs by k-fold CV on the training split.")
@click.option("--folds", type=int, default=None, help=f"Folds of --search [{_DEFAULT.folds}].")
@click.option("--force", is_flag=True, help="Train even when an up-to-date head exists.")
@finetune_options
@path_options("data", "weights", "build")
def train(search: bool, force: bool, **kwargs: Any) -> None:
    """Train the 26-class head (nn.Dense(1280, 26), momentum SGD) on the cached training features.

    Writes <build>/train/: head.ckpt, network.ckpt (backbone + head), training.json, plots.
    With --search, the recipe given (defaults or options) is the baseline: duplicate-aware
    CV on the training split replaces its lr / weight decay / epochs only by a candidate
    that is better beyond the fold-to-fold noise.
    """
    from edge_build.locking import build_lock
    from edge_build.training import TrainOptions, train_head

    finetune = pop_finetune(kwargs)
    knobs = {k: v for k, v in kwargs.items() if not k.endswith("_path") and v is not None}
    options = TrainOptions(search=search and finetune is None, **knobs).validate()
    settings = settings_from(kwargs)
    with build_lock(settings.build_dir):
        feature_set = _features(settings)
        if finetune is not None:
            run_finetune(settings, feature_set, _weights(settings), options, finetune, search, force, _log)
            return
        data_root = settings.data.path if settings.data.path.is_dir() else None
        if options.search and data_root is None:
            _log(f"train: data set not found at {settings.data.path}: CV folds cannot join mirrored copies")
        result = train_head(
            feature_set, _weights(settings), settings.build_dir, options, force=force, log=_log, data_root=data_root
        )
    record = result.record
    chosen = record["hyperparameters"]
    state = "trained" if result.ran else "up to date"
    click.echo(f"train: {state} in {record['seconds']:.1f} s on {record['inputs']['train_images']} training images")
    click.echo(
        f"  recipe   lr {chosen['lr']:g} ({chosen['lr_schedule']}, {chosen['warmup_epochs']} warm-up), "
        f"{chosen['epochs']} epochs, batch {chosen['batch_size']}, momentum {chosen['momentum']:g}, "
        f"weight decay {chosen['weight_decay']:g}, seed {chosen['seed']}"
    )
    search_record = record.get("search")
    if search_record:
        click.echo(
            f"  search   {search_record['folds']}-fold CV on the training split, duplicate-aware "
            f"({search_record['images']} images in {search_record['duplicate_groups']} groups: copies and "
            f"near-duplicates share a fold), {len(search_record['table'])} candidates, {search_record['seconds']:.1f} s"
        )
        click.echo("           lr      wd      epochs  CV top-1 ± SD      CV log-loss")
        for row in search_record["table"]:
            marks = []
            if _knobs(row) == _knobs(search_record["given"]):
                marks.append("given")
            if row == search_record["best_row"]:
                marks.append("best")
            if row == search_record["chosen_row"]:
                marks.append("chosen")
            click.echo(
                f"           {row['lr']:<7g} {row['weight_decay']:<7g} {row['epochs']:<7d} "
                f"{_pct(row['cv_accuracy']):>7} ± {100 * row['cv_accuracy_std']:.1f}    {row['cv_nll']:.4f}"
                f"{'  <- ' + ', '.join(marks) if marks else ''}"
            )
        comparison = search_record["comparison"]
        verdict = (
            "not significant: kept the given recipe"
            if comparison["kept_given_recipe"]
            else "significant: took the best"
        )
        click.echo(
            f"  choice   best - given = {100 * comparison['best_minus_given']:+.2f} pt, paired standard error "
            f"{100 * comparison['standard_error']:.2f} pt ({verdict}; needs > {comparison['threshold_se']:g} SE)"
        )
    history = record["history"]
    click.echo(f"  loss     {history['epoch_loss'][0]:.4f} -> {history['epoch_loss'][-1]:.4f} (per-epoch mean)")
    click.echo(f"  written  {result.directory} (head.ckpt, network.ckpt, training.json, loss.png, lr_schedules.png)")
    click.echo("  next     edge-build eval")


@click.command(name="eval")
@click.option("--json", "as_json", is_flag=True, help="Print eval.json instead of the summary.")
@path_options("data", "weights", "build")
def evaluate(as_json: bool, **paths: Any) -> None:
    """Evaluate the trained network on the validation split (never on training images).

    Top-1, top-5, per-class and 4-bin accuracy, the confusion matrix, and the same
    figures without the validation images that also occur in the training split.
    """
    from edge_build.evaluation import evaluate as run_eval
    from edge_build.locking import build_lock
    from edge_build.trained import load_trained

    settings = settings_from(paths)
    with build_lock(settings.build_dir):
        trained = load_trained(settings.build_dir)
        feature_set = _features(settings)
        result = run_eval(feature_set, settings.data.path, settings.build_dir, trained=trained, log=_log)
    if as_json:
        click.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    click.echo(f"eval: validation split, {result['n']} images, network run in {result['runtime']}")
    click.echo(
        f"  top-1 {_pct(result['top1'])} ({result['correct']}/{result['n']})   top-5 {_pct(result['top5'])}   "
        f"bin (4-way) {_pct(result['bin_accuracy'])}"
    )
    for warning in result["warnings"]:
        click.secho(f"  warning: {warning}", fg="yellow", err=True)
    for name, label in (
        ("without_exact_duplicates", "without exact copies"),
        ("without_any_duplicates", "without any duplicate"),
    ):
        subset = result["subsets"][name]
        if subset["n"] != result["n"]:
            click.echo(
                f"  {label:<22} top-1 {_pct(subset['top1'])} ({subset['correct']}/{subset['n']})   "
                f"bin {_pct(subset['bin_accuracy'])}"
            )
    wrong = [c for c in result["per_class"] if c["n"] and c["correct"] < c["n"]]
    if wrong:
        worst = ", ".join(f"{c['code']} {c['english']} {c['correct']}/{c['n']}" for c in wrong[:6])
        click.echo(f"  misses   {worst}{' ...' if len(wrong) > 6 else ''}")
    click.echo(f"  written  {settings.build_dir / 'eval'} (eval.json, confusion.png)")


@click.command(name="predict")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image (a JSON list).")
@path_options("build")
def predict(images: tuple[Path, ...], as_json: bool, **paths: Any) -> None:
    """Classify IMAGE...: class (English and Chinese), bin, probability."""
    from edge_build.predictor import predict_many

    settings = settings_from(paths)
    results = predict_many(list(images), build_dir=settings.build_dir)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=2, ensure_ascii=False))
        return
    for result in results:
        click.echo(
            f"{result.source}: {result.english} ({result.chinese}) -> {result.bin} bin ({result.bin_chinese}), "
            f"p = {result.probability:.3f}"
        )
    sys.stdout.flush()
