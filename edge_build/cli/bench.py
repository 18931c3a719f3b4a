"""`edge-build bench`: latency, memory and top-1 of a target's artifacts, with history."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from edge_build.cli.common import parse_artifact_options, path_options, settings_from, target_artifacts
from edge_build.errors import CheckFailed, EdgeBuildError

HISTORY_ENV = "EDGE_BUILD_HISTORY"


def _history_dir(option: str | None, config_file: Path | None) -> Path:
    if option:
        return Path(option)
    if os.environ.get(HISTORY_ENV):
        return Path(os.environ[HISTORY_ENV])
    return (config_file.parent if config_file else Path.cwd()) / "benchmarks" / "history"


def _trained_reference(build_dir: Path) -> tuple[Path | None, object | None, str | None]:
    """(build dir for the MindSpore row, its preprocessing, why the row is missing)."""
    try:
        from edge_build.trained import load_trained
    except ModuleNotFoundError:
        return None, None, "edge_build.trained is not available in this version"
    try:
        trained = load_trained(build_dir)
    except EdgeBuildError as exc:
        return None, None, str(exc)
    return build_dir, trained.preprocessing, None


@click.command(name="bench")
@click.option("--target", "target_name", required=True, metavar="NAME", help="Target profile (targets/NAME.toml).")
@click.option("--json", "as_json", is_flag=True, help="Print bench.json instead of the table.")
@click.option("--compare", is_flag=True, help="Show the change against the previous record of this machine and target.")
@click.option(
    "--fail-on-regression",
    "fail_pct",
    type=click.FloatRange(min=0),
    default=None,
    metavar="PCT",
    help="Exit 1 when any p50 got more than PCT % slower than the previous record (beyond the runs' spread).",
)
@click.option(
    "--artifact", "extra", multiple=True, metavar="NAME=PATH", help="Benchmark these files instead (repeatable)."
)
@click.option(
    "--history", "history_option", default=None, metavar="DIR", help=f"History directory [env {HISTORY_ENV}]."
)
@click.option("--no-references", is_flag=True, help="Leave out the MindSpore and LiteRT reference rows.")
@click.option("--wait", "wait_s", type=float, default=0.0, metavar="SECONDS", help="Wait for another build's lock.")
@path_options("data", "weights", "build", "targets")
def bench(
    target_name: str,
    as_json: bool,
    compare: bool,
    fail_pct: float | None,
    extra: tuple[str, ...],
    history_option: str | None,
    no_references: bool,
    wait_s: float,
    **paths: str | None,
) -> None:
    """Benchmark every artifact of a target against the MindSpore and LiteRT references.

    Appends a record to benchmarks/history/<machine-id>.jsonl and writes
    <build>/bench/<target>/bench.json.
    """
    from edge_build.bench import (
        LITERT_REFERENCE,
        BenchSettings,
        check_device,
        render_comparison,
        render_table,
        run_bench,
    )
    from edge_build.history import regressions
    from edge_build.locking import build_lock
    from edge_build.preprocessing import Preprocessing
    from edge_build.targets import load_target

    settings = settings_from(paths)
    target = load_target(target_name, settings["targets"].require_dir("target profile directory"))
    check_device(BenchSettings.from_target(target))  # before anything else: no GPU, no GPU latency
    build_dir = settings.build_dir

    def say(message: str) -> None:
        click.echo(message, err=True)

    # the artifacts must not be rebuilt under the benchmark (and bench/<target>/ is the build's)
    with build_lock(build_dir, wait_s):
        artifacts = parse_artifact_options(extra) or target_artifacts(target, build_dir)

        reference, preprocessing, litert = None, None, None
        if not no_references:
            reference, preprocessing, why = _trained_reference(build_dir)
            if why:
                say(f"bench: no MindSpore reference row ({why})")
            litert = settings.weights.path.parent / LITERT_REFERENCE
            if not litert.is_file():
                say(f"bench: no LiteRT reference row ({litert} not found)")
                litert = None
        report = run_bench(
            target,
            artifacts,
            reference,
            settings.data.require_dir("data set"),
            build_dir / "bench" / target.name,
            _history_dir(history_option, settings.config_file),
            litert_reference=litert,
            preprocessing=preprocessing if isinstance(preprocessing, Preprocessing) else None,
            force=True,
            log=say,
        )
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
    else:
        click.echo(render_table(report))
    if compare or fail_pct is not None:
        click.echo(render_comparison(report, fail_pct), err=as_json)
    if report.history_path is not None:
        say(f"bench: history record appended to {report.history_path}")
    if fail_pct is not None:
        worst = regressions(report.comparison, fail_pct)
        if worst:
            names = "; ".join(
                f"{c.artifact} batch {c.batch}: p50 {c.before_ms:.3f} -> {c.now_ms:.3f} ms ({c.change_pct:+.1f} %)"
                for c in worst
            )
            raise CheckFailed(
                f"latency regression over {fail_pct:g} % (beyond the runs' spread): {names}",
                f"compared with the record of {report.previous.get('date') if report.previous else '?'} "
                f"in {report.history_path}",
            )
