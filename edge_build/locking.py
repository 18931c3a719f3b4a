"""One build at a time per build directory.

The lock is an OS file lock (flock): the kernel drops it when its holder dies, even
by `kill -9`, so a stale lock cannot block the next build.

While it holds the lock, a build keeps its scratch files (ours and the libraries'
`tempfile` users: ONNX export, quantization, ORT conversion) in `<build>/.scratch`.
Whatever a killed build left there is removed when the next build takes the lock,
so a `kill -9` never strands temp directories in /tmp.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from edge_build import atomic
from edge_build.errors import EdgeBuildError


@contextlib.contextmanager
def build_lock(build_dir: Path, wait_s: float = 0.0) -> Iterator[None]:
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    lock_path = build_dir / ".lock"
    owner_path = build_dir / ".lock.owner"
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=wait_s)
    except Timeout:
        owner = owner_path.read_text().strip() if owner_path.exists() else "unknown"
        raise EdgeBuildError(
            f"another edge-build is already working in {build_dir} (pid {owner})",
            "wait for it to finish, or pass --wait SECONDS to queue behind it",
        ) from None
    try:
        atomic.write_text(owner_path, str(os.getpid()))
        with _scratch_in(build_dir / SCRATCH):
            yield
    finally:
        lock.release()


#: Scratch directory inside the build directory, private to the lock holder.
SCRATCH = ".scratch"


@contextlib.contextmanager
def _scratch_in(scratch: Path) -> Iterator[None]:
    """Point `tempfile` at a fresh `scratch` for the duration; a killed predecessor's leftovers go first."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    previous = tempfile.tempdir
    tempfile.tempdir = str(scratch)
    try:
        yield
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(scratch, ignore_errors=True)
