"""Options shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
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
