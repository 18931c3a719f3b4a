"""Shared test setup.

`edge_build` is imported first so that its process-wide settings (the protobuf runtime
MindSpore needs) are in place before any test module imports onnx.
"""

from __future__ import annotations

import edge_build  # noqa: F401
