"""`edge-build weights import`: TFLite MobileNetV2 -> MindSpore checkpoint + metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edge_build.cli.common import path_options, settings_from


@click.group(name="weights")
def weights() -> None:
    """Import pretrained backbone weights (TFLite -> MindSpore)."""


@weights.command(name="import")
@click.argument("source", metavar="PATH.tflite", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out", "out", type=click.Path(dir_okay=False, path_type=Path), help="Also copy the backbone checkpoint here."
)
@path_options("build")
def import_command(source: Path | None, out: Path | None, **paths: Any) -> None:
    """Import PATH.tflite (default: the configured weights) into <build>/weights/<sha256[:16]>/.

    Cached by the file's sha256: importing the same file again does no work. With
    --out FILE.ckpt the backbone checkpoint is also written to FILE.ckpt and its
    metadata to FILE.json.
    """
    from edge_build import atomic, stages
    from edge_build.locking import build_lock
    from edge_build.weights import import_weights

    settings = settings_from(paths)
    source = source if source is not None else settings.weights.require_file("weights file")
    runs_before = len(stages.EXECUTIONS)
    with build_lock(settings.build_dir):
        imported = import_weights(source, settings.build_dir)
    ran = len(stages.EXECUTIONS) > runs_before
    meta = imported.metadata
    click.echo(f"{'imported' if ran else 'up to date'}: {source.name} -> {imported.directory}")
    click.echo(f"  format        {meta['format']} ({meta['weight_quantization']} weights)")
    click.echo(f"  sha256        {imported.sha256}")
    click.echo(f"  padding       {imported.padding}")
    click.echo(f"  preprocessing {meta['preprocessing']['formula']}, {meta['preprocessing']['channel_order']}")
    click.echo(f"  ImageNet head {imported.imagenet_classes} classes (label offset {imported.label_offset})")
    click.echo(f"  checkpoint    {imported.checkpoint}")
    if out is not None:
        atomic.write_bytes(out, imported.checkpoint.read_bytes())
        atomic.write_json(out.with_suffix(".json"), meta)
        click.echo(f"  copied to     {out} (+ {out.with_suffix('.json').name})")
