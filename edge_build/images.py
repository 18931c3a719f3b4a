"""Safe image decoding: every image edge-build reads goes through `load_rgb`.

Guarantees: RGB channel order (never BGR), EXIF orientation applied, every PIL mode
converted explicitly (alpha composited on white, 16-bit scaled, CMYK converted), and
decompression bombs refused from the header before any pixel is decoded.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edge_build.errors import EdgeBuildError

#: Refuse images above this many pixels before decoding (a 224x224 model needs far less).
MAX_PIXELS = 40_000_000

# PIL's own guard raises only at 2x its limit; ours is checked from the header below.
Image.MAX_IMAGE_PIXELS = None


class ImageError(EdgeBuildError):
    """An image that cannot be used, with the path and what to do."""


def _open_checked(path: Path) -> Image.Image:
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)", "delete it or replace it with the real image")
        image = Image.open(path)
    except ImageError:
        raise
    except PermissionError as exc:
        raise ImageError(f"{path}: permission denied", "make the file readable (chmod a+r)") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{path}: not an image file PIL can read", "delete it or replace it with a JPEG/PNG") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # ValueError: e.g. a zTXt/iCCP chunk inflating past PIL's limit
        reason = getattr(exc, "strerror", None) or exc
        raise ImageError(
            f"{path}: image data is corrupt or truncated ({reason})", "re-export or delete the file"
        ) from exc
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise ImageError(
            f"{path}: {width}x{height} pixels is over the {MAX_PIXELS:,}-pixel limit (decompression bomb?)",
            "downscale the image before using it",
        )
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, compositing transparency on white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        gray = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file to an HxWx3 uint8 RGB array, orientation applied."""
    path = Path(path)
    image = _open_checked(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            image = ImageOps.exif_transpose(image)
        rgb = to_rgb(image)
        return np.asarray(rgb, dtype=np.uint8)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: image data is corrupt or truncated ({exc})", "re-export or delete the file") from exc
    finally:
        image.close()


def as_rgb_array(image: np.ndarray | str | os.PathLike[str]) -> np.ndarray:
    """Accept a path or an HxWx3 uint8 RGB array; return the array, validated."""
    if isinstance(image, (str, os.PathLike)):
        return load_rgb(image)
    if not isinstance(image, np.ndarray):
        raise ImageError(f"expected an image path or a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"image array must be HxWx3 RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ImageError(f"image array must be uint8 (0..255), got dtype {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ImageError(f"image array is empty: shape {image.shape}")
    return image
