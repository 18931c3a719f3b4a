"""The one atomic-write helper: every file edge-build writes goes through here.

A file is written to a temporary sibling, flushed to disk, then renamed over the
target, so a reader (or a rerun after `kill -9`) sees either the old complete file
or the new complete file, never a torn one.

Test hook (used by tests/reliability to kill a build at exact points, inert otherwise):
EDGE_BUILD_TEST_KILL_AFTER_WRITES=N makes the process SIGKILL itself right after the N-th
temporary file is complete and before it is renamed over its target (and, for
`replace_directory`, between its two renames). EDGE_BUILD_TEST_KILL_MATCH=GLOB counts only
targets whose absolute path matches GLOB (fnmatch).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fnmatch
import io
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge_build.errors import EdgeBuildError

KILL_AFTER_WRITES_ENV = "EDGE_BUILD_TEST_KILL_AFTER_WRITES"
KILL_MATCH_ENV = "EDGE_BUILD_TEST_KILL_MATCH"
_kill_counter = 0


def _test_kill_point(target: Path) -> None:
    """The reliability suite's deterministic `kill -9` (see the module docstring); a no-op when unset."""
    global _kill_counter
    limit = os.environ.get(KILL_AFTER_WRITES_ENV)
    if not limit:
        return
    if not fnmatch.fnmatch(str(Path(target).absolute()), os.environ.get(KILL_MATCH_ENV) or "*"):
        return
    _kill_counter += 1
    if _kill_counter == int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success rename it over `target`.

    For libraries that insist on writing to a path themselves (onnx.save,
    mindspore.save_checkpoint, mindspore.export). `suffix` defaults to the target's
    suffix, because some writers append their own extension when it is missing.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.",
        suffix=(target.suffix if suffix is None else suffix) + ".tmp",
        dir=target.parent,
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not tmp.exists():
            raise EdgeBuildError(f"writer produced no file for {target}")
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        _test_kill_point(target)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        raise EdgeBuildError(
            f"could not write {target}: {exc.strerror or exc}",
            "free disk space or fix permissions; the previous file is untouched",
        ) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike[str], text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike[str], obj: Any) -> Path:
    text = json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False, default=json_default)
    return write_text(target, text + "\n")


def json_default(obj: Any) -> Any:
    """How edge-build writes NumPy values and paths in JSON."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def write_npy(target: str | os.PathLike[str], array: np.ndarray) -> Path:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return write_bytes(target, buffer.getvalue())


def write_npz(target: str | os.PathLike[str], **arrays: np.ndarray) -> Path:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_bytes(target, buffer.getvalue())


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    return result == 0


def replace_directory(staging: Path, target: Path) -> None:
    """Swap a fully built `staging` directory in place of `target` (old one removed after).

    Where the kernel can exchange the two atomically, `target` is never missing, even
    after a `kill -9` mid-swap; elsewhere the old one is moved aside first.
    """
    staging, target = Path(staging), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir() and _exchange(staging, target):
        _test_kill_point(target)
        _fsync_dir(target.parent)
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old directory
        return
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        _test_kill_point(target)
    os.replace(staging, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
