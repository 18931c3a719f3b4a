"""`edge-build export` and `edge-build verify`: artifacts out, and the parity gate on them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from edge_build.cli.common import parse_artifact_options, path_options, settings_from, target_artifacts
from edge_build.errors import CheckFailed, EdgeBuildError


def _say(message: str) -> None:
    click.echo(message, err=True)


@click.command(name="export")
@click.option("--softmax", is_flag=True, help="Also write a variant with a `probabilities` output.")
@click.option(
    "--embed-preprocessing",
    is_flag=True,
    help="Also write a variant taking raw uint8 RGB NHWC images (scaling and layout inside the graph).",
)
@click.option("--force", is_flag=True, help="Export again even when nothing changed.")
@path_options("build")
def export(softmax: bool, embed_preprocessing: bool, force: bool, **paths: Any) -> None:
    """Export the trained network to MindIR and ONNX (opset 17, dynamic batch) in <build>/export/.

    Labels, preprocessing, weights/data hashes and the edge-build version travel inside
    (ONNX metadata_props; a .json sidecar next to the MindIR). Every ONNX file passes
    onnx.checker's full check and a smoke comparison with the network before it is
    written; run `edge-build verify` for the real parity gate.
    """
    from edge_build.export import stage
    from edge_build.hashing import sha256_file
    from edge_build.locking import build_lock

    settings = settings_from(paths)
    with build_lock(settings.build_dir):
        artifacts = stage(settings.build_dir, softmax, embed_preprocessing, force=force, log=_say)
    width = max(len(kind) for kind in artifacts)
    for kind, path in artifacts.items():
        size = path.stat().st_size / 1e6
        click.echo(f"{kind.ljust(width)}  {path}  {size:.1f} MB  sha256 {sha256_file(path)[:16]}")


def _github_summary(text: str) -> Path:
    from edge_build import atomic

    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        raise EdgeBuildError(
            "--github-summary: GITHUB_STEP_SUMMARY is not set (not running in GitHub Actions)",
            "use --markdown FILE instead",
        )
    path = Path(target)
    previous = path.read_text(encoding="utf-8") if path.is_file() else ""
    return atomic.write_text(path, previous + text)


@click.command(name="verify")
@click.option(
    "--target", "target_name", default=None, metavar="NAME", help="Target profile: its artifacts and tolerances."
)
@click.option("--images", type=click.IntRange(min=1), default=None, metavar="N", help="Use N validation images [all].")
@click.option("--json", "as_json", is_flag=True, help="Print parity.json to stdout instead of the table.")
@click.option(
    "--junit-xml", type=click.Path(dir_okay=False, path_type=Path), help="Write JUnit XML (one case per check)."
)
@click.option(
    "--markdown", "markdown_file", type=click.Path(dir_okay=False, path_type=Path), help="Write a Markdown table."
)
@click.option("--github-summary", is_flag=True, help="Append the Markdown table to $GITHUB_STEP_SUMMARY.")
@click.option("--artifact", "artifact_args", multiple=True, metavar="KIND=PATH", help="Verify this file (repeatable).")
@click.option("--force", is_flag=True, help="Verify again even when nothing changed.")
@path_options("data", "build", "targets")
def verify(
    target_name: str | None,
    images: int | None,
    as_json: bool,
    junit_xml: Path | None,
    markdown_file: Path | None,
    github_summary: bool,
    artifact_args: tuple[str, ...],
    force: bool,
    **paths: Any,
) -> None:
    """Check every exported artifact against the MindSpore network on the validation images.

    Each artifact runs in its own runtime and is fed the way its metadata says. Per output:
    max abs/rel, mean and p99 abs error, cosine, top-1 agreement, worst image. A failure is
    diagnosed (preprocessing mistakes replayed, then the ONNX graph localized layer by layer).
    Writes <build>/verify/parity.json. Exit 0 all pass, 1 any fails, 2 could not run.
    """
    from edge_build import atomic
    from edge_build import verify as parity
    from edge_build.locking import build_lock

    settings = settings_from(paths)
    build_dir = settings.build_dir
    data = settings.data.require_dir("data set")
    profile = None
    if target_name:
        from edge_build.targets import load_target

        profile = load_target(target_name, settings["targets"].require_dir("target profile directory"))
    artifacts = parse_artifact_options(artifact_args) or (
        target_artifacts(profile, build_dir, with_variants=True) if profile else None
    )
    with build_lock(build_dir):
        payload = parity.stage(
            build_dir,
            data,
            artifacts,
            profile.parity if profile else None,
            images,
            force=force,
            log=_say,
            directory=build_dir / f"{parity.STAGE}-{profile.name}" if profile else None,
        )
    if as_json:
        click.echo(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        click.echo(parity.render_table(payload))
        report_dir = build_dir / (f"{parity.STAGE}-{profile.name}" if profile else parity.STAGE)
        click.echo(f"report: {report_dir / parity.REPORT_NAME}", err=True)
    if junit_xml:
        atomic.write_text(junit_xml, parity.junit_xml(payload))
    if markdown_file:
        atomic.write_text(markdown_file, parity.markdown(payload))
    if github_summary:
        _github_summary(parity.markdown(payload))
    code = parity.exit_code(payload)
    failed = [a["kind"] for a in payload["artifacts"] if a["status"] != "pass"]
    if code == 1:
        raise CheckFailed(f"parity failed for {', '.join(failed)}", "see the diagnosis lines above")
    if code == 2:
        raise EdgeBuildError(
            f"could not verify {', '.join(failed) or 'anything'}",
            "see the errors above; rebuild with `edge-build export`",
        )
