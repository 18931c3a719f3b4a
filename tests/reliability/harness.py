"""Helpers of the reliability suite: real `edge-build` subprocesses on the shared data.

Builds run as `python no_network.py ARGS` (internet sockets refused), inside `unshare -n`
(a network namespace without interfaces) where that works. The `reference` fixture
(conftest.py) is one uninterrupted cold `edge-build all --target lite --no-bench`: every
other test compares its result with that one, or starts from a copy of its directories.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_build.config import load_settings

REPO = Path(__file__).resolve().parents[2]
SETTINGS = load_settings()
DATA, WEIGHTS, TARGETS = SETTINGS.data.path, SETTINGS.weights.path, SETTINGS["targets"].path
CALIBRATION = SETTINGS["calibration"].path
NO_NETWORK = Path(__file__).with_name("no_network.py")
BUILD_TIMEOUT_S = 900
_CLI = "from edge_build.cli import main; main(prog_name='edge-build')"


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


UNSHARE = _unshare_works()


@dataclass
class Run:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    def __str__(self) -> str:
        return f"$ edge-build {' '.join(self.args)}\nexit {self.returncode}\n{self.output[-4000:]}"


def command(args: list[str], offline: bool = True) -> list[str]:
    """argv for `edge-build ARGS` in a fresh interpreter (network cut off when `offline`)."""
    python = [sys.executable, str(NO_NETWORK)] if offline else [sys.executable, "-c", _CLI]
    return (["unshare", "-n"] if offline and UNSHARE else []) + python + args


def environment(**extra: str | int | None) -> dict[str, str]:
    """This process's environment without EDGE_BUILD_* settings (paths are passed as options), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_BUILD_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update({key: str(value) for key, value in extra.items() if value is not None})
    return env


def edge_build(
    *args: str | Path,
    timeout: float = BUILD_TIMEOUT_S,
    offline: bool = True,
    preexec_fn: Callable[[], None] | None = None,
    **env: str | int,
) -> Run:
    """`edge-build ARGS` in a fresh process (EDGE_BUILD_* from this environment left out, `env` added)."""
    argv = [str(a) for a in args]
    started = time.perf_counter()
    done = subprocess.run(
        command(argv, offline),
        cwd=REPO,
        env=environment(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )
    return Run(argv, done.returncode, done.stdout, done.stderr, time.perf_counter() - started)


def all_args(build: Path, dist: Path, *extra: str | Path, data: Path = DATA, calibration: Path = CALIBRATION) -> list:
    """Arguments of `edge-build all --target lite --no-bench` with every path explicit."""
    return [
        "all", "--target", "lite", "--no-bench", "--data", data, "--weights", WEIGHTS, "--build", build,
        "--out", dist, "--targets", TARGETS, "--calibration", calibration, *extra,
    ]  # fmt: skip


def build_all(
    build: Path, dist: Path, *extra: str | Path, data: Path = DATA, calibration: Path = CALIBRATION, **env: str | int
) -> Run:
    """`edge-build all --target lite --no-bench` into `build` and `dist` (`env`: extra environment variables)."""
    return edge_build(*all_args(build, dist, *extra, data=data, calibration=calibration), **env)


def one_line_error(run: Run) -> str:
    """The CLI's error: exactly one `error: ...` line on stderr and no traceback."""
    assert "Traceback" not in run.output, str(run)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, str(run)
    return errors[0]


# --------------------------------------------------------------------------- faults


def flip(data: bytes, at: int | None = None) -> bytes:
    """`data` with one bit of one byte (the middle one by default) inverted."""
    if not data:
        return b"\x01"
    at = len(data) // 2 if at is None else at
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda data: data[: len(data) // 2],
    "one byte flipped": flip,
    "emptied": lambda data: b"",
}


# --------------------------------------------------------------------------- results


def metrics(dist: Path, build: Path) -> dict:
    """Every figure of a build that must not depend on how it got there (no timings, paths or dates)."""
    bundle = dist / "lite"
    manifest = json.loads((bundle / "manifest.json").read_text())
    evaluation = json.loads((bundle / "eval.json").read_text())
    parity = json.loads((bundle / "parity.json").read_text())
    quantize = json.loads((build / "quantize-lite" / "quantize.json").read_text())
    stats = ("max_abs", "mean_abs", "cosine_min", "cosine_mean", "top1_agreement", "worst_image", "passed")
    return {
        "manifest": manifest["metrics"],
        "eval": {key: evaluation[key] for key in ("n", "correct", "top1", "top5", "bin_accuracy", "per_class")},
        "confusion": evaluation["confusion"],
        "parity": parity["verdict"],
        "artifacts": {
            row["kind"]: [row["status"], *({k: out[k] for k in stats} for out in row["outputs"])]
            for row in parity["artifacts"]
        },
        "quantize": {
            key: quantize[key] for key in ("fp32_top1", "int8_top1", "drop_pt", "agreement", "val_images", "passed")
        },
    }


def check_bundle(bundle: Path) -> Run:
    """`edge-build check-bundle BUNDLE` as a user runs it."""
    return edge_build("check-bundle", bundle, offline=False, timeout=120)


@dataclass(frozen=True)
class Reference:
    """The uninterrupted cold build every fault is compared with."""

    root: Path
    build: Path
    dist: Path
    run: Run | None
    metrics: dict

    def copy(self, destination: Path) -> tuple[Path, Path]:
        """A private copy of the reference build and dist directories (build, dist)."""
        build, dist = destination / "build", destination / "dist"
        shutil.copytree(self.build, build, symlinks=True)
        shutil.copytree(self.dist, dist, symlinks=True)
        return build, dist
