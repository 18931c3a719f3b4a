"""Settings: defaults from `edge-build.toml`, overridden by environment, then options.

Every resolved path remembers which setting chose it, so an error about a missing
path can say where that path came from and how to change it.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from edge_build.errors import EdgeBuildError

CONFIG_NAME = "edge-build.toml"
CONFIG_ENV = "EDGE_BUILD_CONFIG"

#: setting -> (environment variable, command-line option)
PATH_SETTINGS: dict[str, tuple[str, str]] = {
    "data": ("EDGE_BUILD_DATA", "--data"),
    "weights": ("EDGE_BUILD_WEIGHTS", "--weights"),
    "build": ("EDGE_BUILD_DIR", "--build"),
    "dist": ("EDGE_BUILD_DIST", "--out"),
    "targets": ("EDGE_BUILD_TARGETS", "--targets"),
    "calibration": ("EDGE_BUILD_CALIBRATION", "--calibration"),
}

MAX_PATH_CHARS = 4096  # PATH_MAX

#: Settings edge-build writes to. Taken from a config file (project data, perhaps someone else's), they must
#: stay inside the project, i.e. the config file's directory; inputs (data, weights, targets) may be anywhere,
#: and an option or environment variable (the user's own choice) may point anywhere.
OUTPUT_SETTINGS = ("build", "dist", "calibration")

_BUILTIN_DEFAULTS = {
    "data": "../shared/data/garbage_26x100",
    "weights": "../shared/weights/mobilenet_v2_1.0_224_quant.tflite",
    "build": "build",
    "dist": "dist",
    "targets": "targets",
    "calibration": "calibration",
}


@dataclass(frozen=True)
class SettingPath:
    """A path plus the human description of the setting that chose it."""

    name: str
    path: Path
    source: str

    def how_to_change(self) -> str:
        env, option = PATH_SETTINGS[self.name]
        return f"set by {self.source}; pass {option} or set {env} to change it"

    def require_dir(self, what: str) -> Path:
        if not self.path.exists():
            raise EdgeBuildError(f"{what} not found: {self.path}", self.how_to_change())
        if not self.path.is_dir():
            raise EdgeBuildError(f"{what} is not a directory: {self.path}", self.how_to_change())
        return self.path

    def require_file(self, what: str) -> Path:
        if not self.path.exists():
            raise EdgeBuildError(f"{what} not found: {self.path}", self.how_to_change())
        if not self.path.is_file():
            raise EdgeBuildError(f"{what} is not a file: {self.path}", self.how_to_change())
        return self.path


def find_config_file(start: Path | None = None) -> Path | None:
    """`$EDGE_BUILD_CONFIG`, else the nearest `edge-build.toml` from `start` upwards."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise EdgeBuildError(f"config file not found: {path}", f"set by {CONFIG_ENV}")
        return path
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / CONFIG_NAME
        if candidate.is_file():
            return candidate
    return None


def _read_config(path: Path) -> dict[str, str]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeBuildError(f"cannot read config {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise EdgeBuildError(f"{path} is not valid TOML: {exc}", "fix the syntax") from exc
    except RecursionError:  # tomllib recurses per nesting level: `x = [[[[...` a few hundred deep
        raise EdgeBuildError(f"{path}: nested too deeply to be a settings file", "fix the file") from None
    unknown_tables = set(data) - {"paths"}
    if unknown_tables:
        raise EdgeBuildError(f"{path}: unknown table [{sorted(unknown_tables)[0]}]", "allowed: [paths]")
    paths = data.get("paths", {})
    if not isinstance(paths, dict):
        raise EdgeBuildError(f"{path}: 'paths' must be a table")
    for key, value in paths.items():
        if key not in PATH_SETTINGS:
            raise EdgeBuildError(f"{path}: unknown key paths.{key}", f"allowed: {', '.join(PATH_SETTINGS)}")
        if not isinstance(value, str) or not value or "\x00" in value or len(value) > MAX_PATH_CHARS:
            raise EdgeBuildError(f"{path}: paths.{key} must be a non-empty path of at most {MAX_PATH_CHARS} chars")
    return paths


def _require_inside(config_file: Path | None, name: str, value: str, base: Path) -> None:
    resolved = (base / value).resolve()
    if not resolved.is_relative_to(base.resolve()):
        env, option = PATH_SETTINGS[name]
        raise EdgeBuildError(
            f"{config_file}: paths.{name} = {value!r} points outside the project ({resolved})",
            f"edge-build writes there; keep it inside {base}, or pass {option} / set {env} to choose it yourself",
        )


@dataclass(frozen=True)
class Settings:
    config_file: Path | None
    paths: dict[str, SettingPath]

    def __getitem__(self, name: str) -> SettingPath:
        return self.paths[name]

    @property
    def data(self) -> SettingPath:
        return self.paths["data"]

    @property
    def weights(self) -> SettingPath:
        return self.paths["weights"]

    @property
    def build_dir(self) -> Path:
        return self.paths["build"].path

    @property
    def dist_dir(self) -> Path:
        return self.paths["dist"].path


def load_settings(overrides: dict[str, str | os.PathLike[str] | None] | None = None) -> Settings:
    """Resolve every path setting: option > environment variable > config file > built-in."""
    overrides = overrides or {}
    config_file = find_config_file()
    file_values = _read_config(config_file) if config_file else {}
    base = config_file.parent if config_file else Path.cwd()
    resolved: dict[str, SettingPath] = {}
    for name, (env, option) in PATH_SETTINGS.items():
        value = overrides.get(name)
        if value is not None:
            path, source = Path(value), f"the {option} option"
        elif os.environ.get(env):
            path, source = Path(os.environ[env]), f"the {env} environment variable"
        elif name in file_values:
            path, source = base / file_values[name], f"paths.{name} in {config_file}"
            if name in OUTPUT_SETTINGS:
                _require_inside(config_file, name, file_values[name], base)
        else:
            path, source = base / _BUILTIN_DEFAULTS[name], "the built-in default"
        resolved[name] = SettingPath(name, Path(os.path.abspath(path)), source)
    return Settings(config_file, resolved)
