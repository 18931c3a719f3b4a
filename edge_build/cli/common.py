"""Options shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edge_build.config import Settings, load_settings


def path_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add --data/--weights/--build/--out/--targets/--calibration options (as asked)."""
    help_text = {
        "data": ("--data", "Data set root <root>/<split>/<class>/<image> [env EDGE_BUILD_DATA]."),
        "weights": ("--weights", "Backbone weights (.tflite) [env EDGE_BUILD_WEIGHTS]."),
        "build": ("--build", "Build directory for caches and artifacts [env EDGE_BUILD_DIR]."),
        "dist": ("--out", "Directory for finished bundles [env EDGE_BUILD_DIST]."),
        "targets": ("--targets", "Directory of target profiles [env EDGE_BUILD_TARGETS]."),
        "calibration": ("--calibration", "Directory of calibration lists [env EDGE_BUILD_CALIBRATION]."),
    }

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        for name in reversed(names):
            option, text = help_text[name]
            function = click.option(option, f"{name}_path", default=None, metavar="PATH", help=text)(function)
        return function

    return decorate


def settings_from(kwargs: dict[str, Any]) -> Settings:
    """Build Settings from the `<name>_path` options that `path_options` added."""
    overrides = {key[: -len("_path")]: value for key, value in kwargs.items() if key.endswith("_path")}
    return load_settings(overrides)


def parse_artifact_options(values: tuple[str, ...]) -> dict[str, Path]:
    """`--artifact KIND=PATH` options -> {kind: path}."""
    from edge_build.errors import EdgeBuildError

    artifacts = {}
    for value in values:
        kind, sep, path = value.partition("=")
        if not sep or not kind or not path:
            raise EdgeBuildError(f"--artifact {value!r} is not KIND=PATH", "e.g. --artifact onnx_int8=build/x.onnx")
        artifacts[kind] = Path(path)
    return artifacts


def target_artifacts(profile: Any, build_dir: Path, with_variants: bool = False) -> dict[str, Path]:
    """The target's artifacts as its build stages published them (`<build>/*/artifacts.json`).

    `with_variants` adds the optional export variants (`onnx_fp32_softmax`, ...) when they were built.
    """
    from edge_build.errors import EdgeBuildError
    from edge_build.export import find_artifacts

    found = find_artifacts(build_dir, target=profile.name)
    missing = [name for name in profile.artifacts if name not in found]
    if missing:
        raise EdgeBuildError(
            f"target '{profile.name}': artifacts not built in {build_dir}: {', '.join(missing)}",
            f"run `edge-build all --target {profile.name}` first, or pass --artifact KIND=PATH",
        )
    chosen = {name: found[name] for name in profile.artifacts}
    if with_variants:
        chosen.update({kind: path for kind, path in found.items() if kind.startswith("onnx_fp32_")})
    return chosen
