"""edge-build: a build system from an image data set to verified edge artifacts."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def predict(image: Any, **kwargs: Any) -> Any:
    """Classify one image (path or HxWx3 uint8 RGB array); see `edge_build.predict`."""
    from edge_build.predictor import predict as _predict

    return _predict(image, **kwargs)
