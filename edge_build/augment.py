"""Image-level augmentation for fine-tuning: random resized crops, horizontal flips, colour jitter.

Every training image gets a fixed number of views. View 0 is the image itself (exactly
what evaluation sees); views 1.. are augmented. The random draws of a view come from a
generator seeded by (seed, view index, the image's sha256), so a view is the same in
every run, on every machine, in any order, and adding or removing an image changes no
other image's views: the views are content-addressed like the cached features.

The geometric and colour operations work on the decoded RGB image; the result goes
through the one `Preprocessing` (resize to the network's size, scale, layout) like any
other image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from edge_build.errors import EdgeBuildError
from edge_build.preprocessing import Preprocessing

#: Bump when the same parameters would draw or render different views.
AUGMENT_VERSION = 1


@dataclass(frozen=True)
class Augmentation:
    """How an augmented view is drawn (how many views an image gets is the fine-tuning recipe's `views`)."""

    scale: tuple[float, float] = (0.35, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height
    flip: float = 0.5  # probability of a horizontal flip
    brightness: float = 0.3  # factors drawn from [1 - x, 1 + x]
    contrast: float = 0.3
    saturation: float = 0.3

    def validate(self) -> Augmentation:
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise EdgeBuildError(f"invalid augmentation: crop scale {self.scale}", "0 < low <= high <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise EdgeBuildError(f"invalid augmentation: crop ratio {self.ratio}", "0 < low <= high")
        if not 0 <= self.flip <= 1:
            raise EdgeBuildError(f"invalid augmentation: flip probability {self.flip}", "in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise EdgeBuildError(f"invalid augmentation: {name} {getattr(self, name)}", "in [0, 1)")
        return self

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "scale": list(self.scale), "ratio": list(self.ratio), "version": AUGMENT_VERSION}


@dataclass(frozen=True)
class ViewParams:
    """The draws of one view: crop box (left, top, width, height), flip, colour factors."""

    box: tuple[int, int, int, int]
    flip: bool
    brightness: float
    contrast: float
    saturation: float


def view_rng(sha256: str, view: int, seed: int) -> np.random.Generator:
    """The generator of one view of one image: independent of every other image and view."""
    words = [int(sha256[i : i + 8], 16) for i in range(0, 64, 8)]
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, view, *words]))


def draw_params(width: int, height: int, rng: np.random.Generator, aug: Augmentation) -> ViewParams:
    """Random resized crop (torchvision's rule: 10 tries, then the central crop), flip, jitter."""
    area = width * height
    box = None
    log_low, log_high = math.log(aug.ratio[0]), math.log(aug.ratio[1])
    for _ in range(10):
        target = area * rng.uniform(aug.scale[0], aug.scale[1])
        ratio = math.exp(rng.uniform(log_low, log_high))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            box = (left, top, w, h)
            break
    if box is None:
        side = min(width, height)
        box = ((width - side) // 2, (height - side) // 2, side, side)
    flip = bool(rng.uniform() < aug.flip)
    factors = [float(rng.uniform(1 - x, 1 + x)) for x in (aug.brightness, aug.contrast, aug.saturation)]
    return ViewParams(box, flip, *factors)


def render(rgb: np.ndarray, params: ViewParams) -> np.ndarray:
    """Apply drawn parameters to an HxWx3 uint8 RGB image: crop, flip, brightness, contrast, saturation."""
    left, top, w, h = params.box
    image = Image.fromarray(np.ascontiguousarray(rgb[top : top + h, left : left + w]), "RGB")
    if params.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Brightness(image).enhance(params.brightness)
    image = ImageEnhance.Contrast(image).enhance(params.contrast)
    image = ImageEnhance.Color(image).enhance(params.saturation)
    return np.asarray(image, dtype=np.uint8)


def augment_view(rgb: np.ndarray, sha256: str, view: int, seed: int, aug: Augmentation) -> np.ndarray:
    """View `view` of an image as HxWx3 uint8 RGB (view 0 is the image unchanged)."""
    if view == 0:
        return rgb
    params = draw_params(rgb.shape[1], rgb.shape[0], view_rng(sha256, view, seed), aug)
    return render(rgb, params)


def preprocessed_views(
    rgb: np.ndarray, sha256: str, views: int, seed: int, aug: Augmentation, pre: Preprocessing
) -> np.ndarray:
    """(views, 3, size, size) float32: views 0..views-1 of one image, each through `pre` (resize, scale, layout)."""
    if views < 1:
        raise EdgeBuildError(f"invalid number of views {views}", "at least 1 (the original image)")
    return np.stack([pre.apply(augment_view(rgb, sha256, v, seed, aug)) for v in range(views)])
