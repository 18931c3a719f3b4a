"""The one preprocessing definition, owned by the backbone weights.

Training, evaluation, parity, calibration, prediction and export metadata all call
`Preprocessing.apply` / `prepare_batch`. The parameters are recorded by the weights
importer next to the checkpoint and travel inside every exported artifact.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from edge_build.images import as_rgb_array

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class Preprocessing:
    size: int = 224
    scale: float = 1.0 / 127.5
    offset: float = -1.0
    channel_order: str = "RGB"
    layout: str = "NCHW"
    resize: str = "bilinear"

    def as_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["formula"] = f"x * {self.scale!r} + {self.offset!r} on RGB 0..255, resized to {self.size}x{self.size}"
        return payload

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> Preprocessing:
        fields = {
            k: payload[k] for k in ("size", "scale", "offset", "channel_order", "layout", "resize") if k in payload
        }
        return cls(**fields)

    def resize_rgb(self, rgb: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> size x size x 3 uint8 (the whole image, no crop)."""
        if rgb.shape[0] == self.size and rgb.shape[1] == self.size:
            return rgb
        image = Image.fromarray(rgb, "RGB").resize((self.size, self.size), _RESAMPLE[self.resize])
        return np.asarray(image, dtype=np.uint8)

    def normalize(self, rgb_uint8: np.ndarray) -> np.ndarray:
        """NHWC/HWC uint8 -> float32 scaled, in this preprocessing's layout."""
        x = rgb_uint8.astype(np.float32) * np.float32(self.scale) + np.float32(self.offset)
        if self.layout == "NCHW":
            x = np.moveaxis(x, -1, -3)
        return np.ascontiguousarray(x, dtype=np.float32)

    def apply(self, image: np.ndarray | str | os.PathLike[str]) -> np.ndarray:
        """One image (path or HxWx3 uint8 RGB array) -> CHW float32."""
        return self.normalize(self.resize_rgb(as_rgb_array(image)))

    def prepare_batch(self, images: Sequence[np.ndarray | str | os.PathLike[str]]) -> np.ndarray:
        return np.stack([self.apply(image) for image in images])


DEFAULT = Preprocessing()
