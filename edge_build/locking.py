"""One build at a time per build directory.

The lock is an OS file lock (flock): the kernel drops it when its holder dies, even
by `kill -9`, so a stale lock cannot block the next build.
"""

from __future__ import annotations

import contextlib
import os
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
        yield
    finally:
        lock.release()
