"""edge-build: a build system from an image data set to verified edge artifacts."""

from __future__ import annotations

import os
from typing import Any

# MindSpore's generated protobuf modules load only under the pure-Python protobuf runtime,
# which must be chosen before the first protobuf import anywhere (`import onnx` is one):
# without this, `import onnx` followed by `import mindspore` dies with "Descriptors cannot
# be created directly". MindSpore sets the same default itself, too late when onnx came first.
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

__version__ = "0.1.0"


def predict(image: Any, **kwargs: Any) -> Any:
    """Classify one image (path or HxWx3 uint8 RGB array); see `edge_build.predict`."""
    from edge_build.predictor import predict as _predict

    return _predict(image, **kwargs)
