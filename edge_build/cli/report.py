"""`edge-build report`: the one-page HTML (and Markdown) build report of a target's bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edge_build.cli.common import path_options, settings_from
from edge_build.errors import EdgeBuildError


def _accuracy_budget(target_name: str, targets_dir: Path) -> float | None:
    """The target's max top-1 drop (pt); None (and a note) when its profile cannot be read."""
    from edge_build.targets import load_target

    try:
        return load_target(target_name, targets_dir).budget.max_accuracy_drop_pt
    except EdgeBuildError as exc:
        click.echo(f"report: artifact accuracy not judged: {exc}", err=True)
        return None


@click.command(name="report")
@click.option("--target", "target_name", default="lite", show_default=True, metavar="NAME", help="Target profile name.")
@click.option("--open", "open_browser", is_flag=True, help="Open report.html in the default browser afterwards.")
@click.option(
    "--history",
    "history_option",
    default=None,
    metavar="DIR",
    help="Benchmark history directory [env EDGE_BUILD_HISTORY].",
)
@click.option(
    "--regression-pct",
    type=click.FloatRange(min=0),
    default=None,
    metavar="PCT",
    help="Mark a history run as a regression when a p50 is PCT % slower than the run before, beyond both runs' "
    "spread [default: 10].",
)
@path_options("dist", "data", "build")
def report(
    target_name: str, open_browser: bool, history_option: str | None, regression_pct: float | None, **paths: Any
) -> None:
    """Write dist/<target>/report.html and report.md from the bundle's results.

    Reads doctor.json, training.json, eval.json, parity.json, bench.json and manifest.json
    from the bundle (or, when newer, from the build directory's stages) and this machine's
    benchmark history. Sections whose results are missing say so; the page is one
    self-contained file (plots embedded, no network, no scripts).
    """
    from edge_build.cli.bench import _history_dir
    from edge_build.report import REPORT_HTML, load_sources, write_sources

    settings = settings_from(paths)
    bundle_dir = settings.dist_dir / target_name
    build_dir = settings.build_dir
    data_dir = settings.data.path if settings.data.path.is_dir() else None
    history_dir = _history_dir(history_option, settings.config_file)
    sources = load_sources(
        bundle_dir,
        target=target_name,
        build_dir=build_dir,
        data_dir=data_dir,
        history_dir=history_dir,
        max_accuracy_drop_pt=_accuracy_budget(target_name, settings["targets"].path),
    )
    if not sources.payloads:
        raise EdgeBuildError(
            f"nothing to report for target {target_name}: no result files in {bundle_dir} or {build_dir}",
            f"run `edge-build all --target {target_name}` (or the single stages) first",
        )
    if regression_pct is not None:
        sources.regression_pct = regression_pct
    written = write_sources(sources)
    for path in written:
        click.echo(str(path))
    missing = sorted(set(sources.missing))
    if missing:
        click.echo(f"report: not available: {', '.join(missing)}", err=True)
    if open_browser:
        click.launch(str(Path(bundle_dir) / REPORT_HTML))
