"""`edge-build train --finetune`: the fine-tuning part of the `train` command (options, call, summary)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from edge_build.config import Settings
from edge_build.errors import EdgeBuildError
from edge_build.finetune import ALL_BLOCKS, FinetuneOptions

_DEFAULT = FinetuneOptions()


def parse_blocks(value: str | None) -> int | None:
    """`--blocks`: a number of stages (0 = head only) or 'all'."""
    if value is None:
        return None
    if value.strip().lower() == "all":
        return ALL_BLOCKS
    try:
        return int(value)
    except ValueError:
        raise EdgeBuildError(f"invalid --blocks {value!r}", f"a number of stages 0..{ALL_BLOCKS}, or 'all'") from None


def _interval(payload: dict[str, Any] | None) -> str:
    if not payload:
        return "not estimated"
    return f"{100 * payload['accuracy']:5.1f} % [{100 * payload['low']:.1f}, {100 * payload['high']:.1f}]"


def run_finetune(
    settings: Settings,
    feature_set: Any,
    weights: Any,
    head_options: Any,
    knobs: dict[str, Any],
    search: bool,
    force: bool,
    log: Callable[[str], None],
) -> None:
    """Fine-tune with the given knobs (None = default), print the head-only vs fine-tuned comparison."""
    from dataclasses import replace

    from edge_build.finetune import finetune_stage

    given = {k: v for k, v in knobs.items() if v is not None and k != "cv"}
    options = replace(FinetuneOptions(seed=head_options.seed), **given).validate()
    result = finetune_stage(
        data_root=settings.data.require_dir("data set"),
        weights=weights,
        features=feature_set,
        build_dir=settings.build_dir,
        options=options,
        head_options=head_options,
        folds=head_options.folds,
        cv=knobs.get("cv", True),
        search=search,
        force=force,
        log=log,
    )
    tuned = result.record["finetune"]
    recipe = tuned["recipe"]
    state = "trained" if result.info.get("trained") else "up to date"
    click.echo(f"train --finetune: {state}; {tuned['seconds']['total']:.0f} s for the run that made it")
    click.echo(
        f"  recipe   last {tuned['blocks']} stage(s) + head, lr {recipe['lr']:g} ({recipe['lr_schedule']}), "
        f"{recipe['epochs']} epoch(s) x {recipe['views']} view(s) per image, batch {recipe['batch_size']}, "
        f"seed {recipe['seed']}"
    )
    if tuned["folds"]:
        click.echo(
            f"  CV       {tuned['folds']}-fold on the training split, duplicate-aware "
            f"({tuned['duplicate_groups']} groups: copies, near-duplicates and mirrored copies share a fold); "
            "95 % intervals"
        )
    head_only = tuned["head_only"]
    click.echo("                      CV estimate               validation               val w/o train duplicates")
    for name, side in (("head only", head_only), ("fine-tuned", tuned)):
        click.echo(
            f"  {name:<12} {_interval(side['cv']):>26}   {_interval(side['validation']):>22}   "
            f"{_interval(side['validation_without_duplicates']):>22}"
        )
    if tuned.get("cv_per_photo"):
        click.echo(
            f"  photos   CV with every duplicate group counted once: head only "
            f"{_interval(head_only.get('cv_per_photo'))}, fine-tuned {_interval(tuned['cv_per_photo'])}"
        )
    if tuned.get("cv_concentration"):
        click.secho(f"  note     {tuned['cv_concentration']}", fg="yellow", err=True)
    gain = tuned.get("cv_gain_over_head_only")
    if gain and tuned["blocks"]:
        click.echo(
            f"  gain     {100 * gain['gain']:+.1f} pt over head only on the same folds "
            f"[{100 * gain['low']:+.1f}, {100 * gain['high']:+.1f}] (paired; {gain['fixed']} images fixed, "
            f"{gain['broken']} broken)"
        )
    for table_row in tuned.get("search_table") or []:
        mark = (
            " <- chosen"
            if {k: table_row[k] for k in ("blocks", "lr", "epochs", "views")}
            == {k: recipe[k] for k in ("blocks", "lr", "epochs", "views")}
            else ""
        )
        click.echo(
            f"  search   blocks {table_row['blocks']} lr {table_row['lr']:<6g} {table_row['epochs']} x "
            f"{table_row['views']} views: CV {_interval(table_row['cv'])}{mark}"
        )
    if tuned["warning"]:
        click.secho(f"  warning: {tuned['warning']}", fg="yellow", err=True)
    check = tuned["network_check"]
    click.echo(
        f"  check    saved network vs fine-tuned stages on {check['images']} validation images: "
        f"top-1 agreement {check['top1_agreement']:.0%}, max |logit diff| {check['max_abs_logit_difference']:.2g}"
    )
    seconds = tuned["seconds"]
    click.echo(
        "  time     "
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total")
        + f" (load average {tuned['load_average'][0]:.1f}, {tuned['threads']} threads)"
    )
    click.echo(f"  written  {result.directory} (network.ckpt, head.ckpt, training.json, loss.png, lr_schedules.png)")
    click.echo("  next     edge-build eval")


def finetune_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """The `train` command's fine-tuning options (values arrive in kwargs; `pop_finetune` takes them out)."""
    options = [
        click.option(
            "--finetune",
            is_flag=True,
            help="After the head, fine-tune the last stages of the backbone with it, on augmented views; "
            "with --search, stages, lr, epochs and views are chosen by duplicate-aware CV on the training split.",
        ),
        click.option(
            "--blocks",
            default=None,
            metavar="K|all",
            help=f"--finetune: trainable backbone stages [{_DEFAULT.blocks}]; 0 = head only, all = the whole backbone.",
        ),
        click.option(
            "--views",
            type=int,
            default=None,
            help=f"--finetune: views per training image, original included [{_DEFAULT.views}].",
        ),
        click.option(
            "--finetune-lr", type=float, default=None, help=f"--finetune: peak learning rate [{_DEFAULT.lr:g}]."
        ),
        click.option(
            "--finetune-epochs", type=int, default=None, help=f"--finetune: passes over every view [{_DEFAULT.epochs}]."
        ),
        click.option(
            "--cv/--no-cv", default=True, help="--finetune: estimate the accuracy by k-fold CV on the training split."
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def pop_finetune(kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """Remove the fine-tuning options from `kwargs`; their values (FinetuneOptions names) with --finetune, else None."""
    wanted = kwargs.pop("finetune", False)
    values = {
        "blocks": parse_blocks(kwargs.pop("blocks", None)),
        "views": kwargs.pop("views", None),
        "lr": kwargs.pop("finetune_lr", None),
        "epochs": kwargs.pop("finetune_epochs", None),
        "cv": kwargs.pop("cv", True),
    }
    if not wanted:
        given = [name for name in ("blocks", "views", "lr", "epochs") if values[name] is not None]
        if given or not values["cv"]:
            raise EdgeBuildError("fine-tuning options given without --finetune", "add --finetune")
        return None
    return values
