"""The one atomic-write helper: every file edge-build writes goes through here.

A file is written to a temporary sibling, flushed to disk, then renamed over the
target, so a reader (or a rerun after `kill -9`) sees either the old complete file
or the new complete file, never a torn one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge_build.errors import EdgeBuildError


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
    text = json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False, default=_json_default)
    return write_text(target, text + "\n")


def _json_default(obj: Any) -> Any:
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


def replace_directory(staging: Path, target: Path) -> None:
    """Swap a fully built `staging` directory in place of `target` (old one removed after)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(staging, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
