"""`edge-build targets`, `calibrate`, `quantize` (deployment commands).

The `all` pipeline and `check-bundle` live here too (added by the pipeline's owner).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from edge_build.cli.common import path_options, settings_from
from edge_build.errors import EdgeBuildError


def _say(message: str) -> None:
    click.echo(message, err=True)


@click.command(name="targets")
@path_options("targets")
def targets(**paths: Any) -> None:
    """List the target profiles (targets/*.toml), one line each."""
    from edge_build.targets import list_targets

    settings = settings_from(paths)
    profiles = list_targets(settings["targets"].require_dir("target profile directory"))
    if not profiles:
        raise EdgeBuildError(f"no target profiles in {settings['targets'].path}", "add a <name>.toml there")
    for profile in profiles:
        click.echo(profile.summary())


@click.command(name="calibrate")
@click.option("--per-class", type=click.IntRange(min=1), default=None, metavar="N", help="Images per class [10].")
@click.option("--seed", type=int, default=None, help="Random seed of the selection [0].")
@path_options("data", "calibration")
def calibrate(per_class: int | None, seed: int | None, **paths: Any) -> None:
    """(Re)generate calibration/<data set>.json from the training split, reproducibly.

    Stratified over the classes; images that do not decode and duplicates (of each
    other or of a validation image) are passed over. Commit the list it writes.
    """
    from edge_build.calibration import (
        DEFAULT_PER_CLASS,
        DEFAULT_SEED,
        calibration_file,
        generate_calibration,
        write_calibration,
    )

    settings = settings_from(paths)
    data = settings.data.require_dir("data set")
    listing = generate_calibration(data, per_class or DEFAULT_PER_CLASS, DEFAULT_SEED if seed is None else seed)
    path = write_calibration(calibration_file(settings["calibration"].path, data), listing)
    click.echo(f"calibration: {listing['count']} training images of {data.name} -> {path}")
    for code, count in listing["short_classes"].items():
        click.echo(f"  class {code}: only {count} usable image(s) (undecodable, duplicates or copies of validation)")


def _split_nodes(values: tuple[str, ...]) -> list[str]:
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _fp32_model(model: Path | None, build_dir: Path) -> Path:
    if model is not None:
        return model
    from edge_build.export import find_artifacts

    found = find_artifacts(build_dir).get("onnx_fp32")
    if found is None:
        raise EdgeBuildError(
            f"no fp32 ONNX model in {build_dir}", "run `edge-build export` first, or pass --model PATH.onnx"
        )
    return found


@click.command(name="quantize")
@click.option("--target", "target_name", default="lite", show_default=True, metavar="NAME", help="Target profile.")
@click.option(
    "--method",
    type=click.Choice(["minmax", "entropy", "percentile"]),
    default=None,
    help="Activation calibration method [the profile's].",
)
@click.option(
    "--exclude-nodes",
    "exclude",
    multiple=True,
    metavar="NODE[,NODE]",
    help="Keep these nodes in float (names from the sensitivity report); repeatable.",
)
@click.option(
    "--model", type=click.Path(dir_okay=False, path_type=Path), default=None, help="fp32 ONNX [the exported one]."
)
@click.option("--force", is_flag=True, help="Quantize again even when nothing changed.")
@path_options("data", "build", "targets", "calibration")
def quantize(
    target_name: str, method: str | None, exclude: tuple[str, ...], model: Path | None, force: bool, **paths: Any
) -> None:
    """Quantize the fp32 ONNX model to int8 (QDQ, per-channel) and gate on validation top-1.

    Fails (exit 1) when int8 top-1 drops more than the profile allows, naming the most
    sensitive nodes: retry with --exclude-nodes. Output: <build>/quantize-<target>/.
    """
    from edge_build.locking import build_lock
    from edge_build.pipeline import quantize_for_target
    from edge_build.targets import load_target

    settings = settings_from(paths)
    profile = load_target(target_name, settings["targets"].require_dir("target profile directory"))
    if method:
        # an explicit method is the only one tried
        chosen = dataclasses.replace(profile.quantization, method=method, fallback_methods=())
        profile = dataclasses.replace(profile, quantization=chosen)
    if not profile.needs_int8:
        raise EdgeBuildError(f"target '{profile.name}' builds no int8 artifact", "use --target lite or cpu")
    data = settings.data.require_dir("data set")
    fp32 = _fp32_model(model, settings.build_dir)
    with build_lock(settings.build_dir):
        result = quantize_for_target(
            settings, profile, data, fp32, _say, exclude_nodes=_split_nodes(exclude), force=force
        )
    click.echo(f"{'quantized' if result.ran else 'up to date'}: {result.int8_onnx}")
    if result.int8_ort:
        click.echo(f"  ORT format    {result.int8_ort}")
    click.echo(f"  {result.summary()}")
