"""`edge-build all` and `edge-build check-bundle`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edge_build.cli.common import path_options, settings_from
from edge_build.errors import CheckFailed


def _say(message: str) -> None:
    click.echo(message, err=True)


@click.command(name="all")
@click.option("--target", "target_name", default="lite", show_default=True, metavar="NAME", help="Target profile.")
@click.option("--search", is_flag=True, help="Pick the head's learning rate, weight decay and epochs by CV.")
@click.option("--finetune", is_flag=True, help="Fine-tune the backbone's last stages after the head.")
@click.option("--blocks", type=click.IntRange(min=0), default=None, help="Stages to fine-tune [measured default].")
@click.option("--no-bench", is_flag=True, help="Skip the latency benchmark.")
@click.option("--wait", "wait_s", type=float, default=0.0, metavar="SECONDS", help="Wait for another build's lock.")
@path_options("data", "weights", "build", "dist", "targets", "calibration")
def build_all(
    target_name: str, search: bool, finetune: bool, blocks: int | None, no_bench: bool, wait_s: float, **paths: Any
) -> None:
    """Run every stage the target needs and leave dist/<target>/ with a manifest.

    doctor -> weights import -> features -> train -> eval -> export -> quantize ->
    verify -> bench -> bundle -> report. Unchanged stages are skipped; a failing
    stage leaves the previous bundle untouched and exits non-zero.
    """
    from edge_build.pipeline import BuildOptions
    from edge_build.pipeline import build_all as run

    settings = settings_from(paths)
    out = Path(paths["dist_path"]) if paths.get("dist_path") else None
    options = BuildOptions(
        target=target_name, out=out, finetune=finetune, blocks=blocks, search=search, bench=not no_bench, wait_s=wait_s
    )
    outcome = run(settings, options, log=_say)
    ran = ", ".join(outcome.stages_run) or "nothing (all stages up to date)"
    click.echo(f"built {outcome.bundle_dir} in {outcome.seconds:.1f} s; stages run: {ran}")
    for key, value in outcome.metrics.items():
        click.echo(f"  {key}: {value}")
    for report in outcome.reports:
        click.echo(f"  report: {report}")


@click.command(name="check-bundle")
@click.argument("directory", type=click.Path(path_type=Path))
def check_bundle(directory: Path) -> None:
    """Re-hash every file of a bundle against its manifest; exit 1 on any difference."""
    from edge_build.bundle import check_bundle as check

    result = check(directory)
    if not result.ok:
        for problem in result.problems:
            click.echo(f"  {problem}", err=True)
        raise CheckFailed(f"bundle {directory} does not match its manifest: {result.problems[0]}")
    click.echo(f"bundle {directory}: all {result.checked} files match the manifest")
