"""`edge-build doctor`: check a data set and report its defects."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from edge_build.cli.common import path_options, settings_from


@click.command(name="doctor")
@path_options("data")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the report as JSON (with a schema version) instead of text."
)
@click.option("--strict", is_flag=True, help="Count warnings as errors (exit 1 on any warning; notes never count).")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True, help="Processes decoding images.")
@click.pass_context
def doctor(ctx: click.Context, as_json: bool, strict: bool, workers: int, **paths: Any) -> None:
    """Check a data set laid out as <root>/<split>/<class code>/<image>.

    Reports splits and classes found vs expected, files per split and class (and how
    many are distinct), label.txt against the built-in taxonomy, images that cannot be
    used (empty, not an image, truncated, corrupt, too large, unreadable), non-RGB
    modes and EXIF rotation (what the pipeline does with them), sizes, exact
    duplicates (within a class, across classes, across splits = leakage) and
    near-duplicates (perceptual hash).

    Exit code: 0 clean or warnings only; 1 errors (with --strict, warnings too);
    2 the data set could not be read at all.
    """
    from edge_build.doctor import run_doctor
    from edge_build.doctor_render import render_text

    settings = settings_from(paths)
    root = settings.data.require_dir("data set")
    report = run_doctor(root, strict=strict, workers=workers, progress=sys.stderr.isatty())
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        click.echo(render_text(report))
    ctx.exit(report.exit_code)
