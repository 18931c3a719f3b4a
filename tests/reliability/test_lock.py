"""Two `edge-build all` on one build directory: the second refuses (or, with --wait, queues), never interleaves;
a lock whose holder was `kill -9`ed does not block the next build."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from harness import REPO, Reference, all_args, build_all, command, environment, metrics, one_line_error

from edge_build import bundle

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


def _start(build: Path, dist: Path, *extra: str) -> subprocess.Popen:
    args = [str(a) for a in all_args(build, dist, *extra)]
    return subprocess.Popen(
        command(args), cwd=REPO, env=environment(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _wait_for_lock(build: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until `process` holds the build lock (it writes its pid next to the lock once it has it)."""
    owner = build / ".lock.owner"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if owner.is_file() and owner.read_text().strip() == str(process.pid):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("the build never took the lock")


def test_second_build_refuses_then_queues_behind_the_first(reference: Reference, tmp_path):
    build, dist = reference.copy(tmp_path)
    (build / "train" / "record.json").unlink()  # the first build has real work to do: train
    first = _start(build, dist)
    try:
        _wait_for_lock(build, first)
        os.kill(first.pid, signal.SIGSTOP)  # the first build holds the lock for as long as the test wants
        refused = build_all(build, dist)
        assert refused.returncode == 2, str(refused)
        error = one_line_error(refused)
        assert "another edge-build is already working in" in error and f"pid {first.pid}" in error, error
        assert "--wait" in error
        queued = _start(build, dist, "--wait", "300")
        time.sleep(5)
        assert queued.poll() is None, "a --wait build must queue behind the lock holder"
        os.kill(first.pid, signal.SIGCONT)
        first_out, first_err = first.communicate(timeout=300)
        assert first.returncode == 0, first_err
        assert "stages run: train" in first_out
        queued_out, queued_err = queued.communicate(timeout=300)
        assert queued.returncode == 0, queued_err
        assert "stages run: nothing" in queued_out  # it ran after the first, on its complete results
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
    assert bundle.check_bundle(dist / "lite").ok
    assert metrics(dist, build) == reference.metrics


def test_lock_of_a_killed_build_does_not_block_the_next(reference: Reference, tmp_path):
    build, dist = reference.copy(tmp_path)
    victim = _start(build, dist)
    _wait_for_lock(build, victim)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert (build / ".lock.owner").read_text().strip() == str(victim.pid)  # the lock file names a dead process
    run = build_all(build, dist)  # no --wait: the kernel dropped the dead holder's flock
    assert run.returncode == 0, str(run)
    assert bundle.check_bundle(dist / "lite").ok


def test_builds_in_two_build_dirs_publishing_to_one_out_dir_do_not_trample_each_other(reference: Reference, tmp_path):
    build, dist = reference.copy(tmp_path)
    second_build = tmp_path / "build2"
    shutil.copytree(build, second_build, symlinks=True)
    for _ in range(3):  # both are up to date, so they reach the bundle assembly within moments of each other
        runs = [_start(b, dist) for b in (build, second_build)]
        outputs = [run.communicate(timeout=300) for run in runs]
        for run, (out, err) in zip(runs, outputs, strict=True):
            assert run.returncode == 0, f"{out}\n{err}"
            assert "stages run: nothing" in out
        assert bundle.check_bundle(dist / "lite").ok
    assert not list(dist.glob(".lite*")), "a staging directory was left behind"
    assert metrics(dist, build) == reference.metrics
