"""The one place MindSpore is imported, with its environment set first.

Settings that MindSpore (and its bundled oneDNN) read at import time must be in the
environment before the first `import mindspore`; every module gets MindSpore from
`mindspore_module()` instead of importing it at the top.
"""

from __future__ import annotations

import os
from types import ModuleType

_MODULE: ModuleType | None = None


def threads() -> int:
    value = os.environ.get("EDGE_BUILD_THREADS")
    if value and value.isdigit() and int(value) > 0:
        return int(value)
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def jit_inference() -> bool:
    """Compile inference forward passes with `mindspore.jit` (EDGE_BUILD_MS_JIT=0: PyNative)."""
    return os.environ.get("EDGE_BUILD_MS_JIT", "1") != "0"


def mindspore_module() -> ModuleType:
    """Import MindSpore once, quietly, on the CPU, in PyNative mode."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    os.environ.setdefault("GLOG_v", "3")
    os.environ.setdefault("GLOG_logtostderr", "1")
    import mindspore

    mindspore.set_context(mode=mindspore.PYNATIVE_MODE)
    mindspore.set_device("CPU")
    _MODULE = mindspore
    return mindspore
