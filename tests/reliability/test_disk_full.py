"""Disk full while writing: a one-line error naming the file, every previous output intact, and the
next build (with space again) completes with the same result.

The build and dist directories live on a small tmpfs filled up to a few MB (where the test
may mount one: root); elsewhere the build runs under RLIMIT_FSIZE, so that writing any file
bigger than the limit fails the same way (EFBIG instead of ENOSPC).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Reference, all_args, check_bundle, edge_build, metrics, one_line_error

from edge_build.hashing import sha256_file

pytestmark = pytest.mark.reliability

TMPFS_MB = 400
HEADROOM = 3 * 1024 * 1024  # doctor.json fits; a model (2.5-9 MB) does not


class SmallDisk:
    def __init__(self, mount_point: Path) -> None:
        self.root = mount_point
        self.filler = mount_point / "filler"
        self.file_size_limit: int | None = None
        mount_point.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(mount_point)], capture_output=True
        )
        self.tmpfs = done.returncode == 0

    @property
    def mechanism(self) -> str:
        return f"tmpfs of {TMPFS_MB} MB" if self.tmpfs else "RLIMIT_FSIZE"

    @property
    def expected_error(self) -> str:
        return os.strerror(28 if self.tmpfs else 27)  # ENOSPC / EFBIG

    def fill(self, headroom: int) -> None:
        if not self.tmpfs:
            self.file_size_limit = headroom
            return
        stat = os.statvfs(self.root)
        free = stat.f_bavail * stat.f_frsize
        with open(self.filler, "wb") as handle:
            handle.truncate(0)
            chunk = b"\0" * (1 << 20)
            remaining = free - headroom
            while remaining > 0:
                remaining -= handle.write(chunk[: min(len(chunk), remaining)])

    def release(self) -> None:
        self.filler.unlink(missing_ok=True)
        self.file_size_limit = None

    def run(self, build: Path, dist: Path) -> object:
        limit = self.file_size_limit

        def limit_file_size() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        return edge_build(*all_args(build, dist), preexec_fn=limit_file_size)

    def unmount(self) -> None:
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.root)], check=False)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path / "fs")
    try:
        yield disk
    finally:
        disk.unmount()


_WRITER = """
import sys
from pathlib import Path
import numpy as np
from edge_build import atomic
from edge_build.errors import EdgeBuildError

def through_atomic_path(target):
    with atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"x" * (2 << 20))

writers = {
    "write_bytes": lambda target: atomic.write_bytes(target, b"x" * (2 << 20)),
    "write_json": lambda target: atomic.write_json(target, {"a": "y" * (2 << 20)}),
    "write_npz": lambda target: atomic.write_npz(target, a=np.ones(1 << 19, np.float32)),
    "atomic_path": through_atomic_path,
}
for name, write in writers.items():
    try:
        write(Path(sys.argv[1]) / name)
        print(name, "WROTE")
    except EdgeBuildError as error:
        print(name, "refused:", error.message)
"""


def test_a_write_that_fails_leaves_the_previous_file_whole(tmp_path):
    """Every atomic writer, over an existing file, meets a 1 MB file-size limit: the old file survives."""
    names = ("write_bytes", "write_json", "write_npz", "atomic_path")
    for name in names:
        (tmp_path / name).write_bytes(b"previous complete content")

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    done = subprocess.run(
        [sys.executable, "-c", _WRITER, str(tmp_path)], capture_output=True, text=True, timeout=120,
        preexec_fn=limit_file_size,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name in names:
        assert f"{name} refused: could not write {tmp_path / name}: File too large" in done.stdout, done.stdout
        assert (tmp_path / name).read_bytes() == b"previous complete content", f"{name} damaged the previous file"
    assert not list(tmp_path.glob(".*.tmp")), "the failed writes left temp files"


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in before if after.get(name) != before[name]}


@pytest.mark.slow
def test_disk_full_keeps_previous_outputs_and_explains(reference: Reference, small_disk: SmallDisk):
    build, dist = small_disk.root / "build", small_disk.root / "dist"
    shutil.copytree(reference.build, build)
    shutil.copytree(reference.dist, dist)
    print(f"disk full simulated with a {small_disk.mechanism}")
    # 1. Every stage is up to date: the bundle copy into the staging dir meets the full disk.
    before = _snapshot(small_disk.root)
    small_disk.fill(HEADROOM)
    run = small_disk.run(build, dist)
    assert run.returncode == 2, str(run)
    error = one_line_error(run)
    assert small_disk.expected_error in error and "could not write" in error and str(dist) in error, error
    rewritten_every_build = {"build/doctor/doctor.json", "build/.lock.owner"}
    changed = _changed(before, _snapshot(small_disk.root)) - rewritten_every_build
    assert changed <= {"dist/lite/report.html", "dist/lite/report.md"}, changed  # the report says what failed
    assert check_bundle(dist / "lite").returncode == 0

    # 2. A stage that must rerun (train) meets the full disk: its old outputs stay whole or absent, never torn.
    small_disk.release()
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(dist / ".lite.staging")
    (build / "train" / "record.json").unlink()
    before = _snapshot(small_disk.root)
    small_disk.fill(HEADROOM)
    run = small_disk.run(build, dist)
    assert run.returncode == 2, str(run)
    error = one_line_error(run)
    assert small_disk.expected_error in error and str(build / "train" / "network.ckpt") in error, error
    after = _snapshot(small_disk.root)
    for name in _changed(before, after) - rewritten_every_build - {"dist/lite/report.html", "dist/lite/report.md"}:
        assert name not in after, f"{name} was changed in place by a write that failed"
    assert not (build / "train" / "record.json").exists()  # the failed stage is not recorded as done
    assert check_bundle(dist / "lite").returncode == 0

    # 3. With space again, the next build completes with the reference result.
    small_disk.release()
    run = small_disk.run(build, dist)
    assert run.returncode == 0, str(run)
    assert check_bundle(dist / "lite").returncode == 0
    assert metrics(dist, build) == reference.metrics
