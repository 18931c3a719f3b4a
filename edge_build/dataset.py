"""Data set layout `<root>/<split>/<class code>/<image>`: listing for the build stages.

`doctor` inspects a data set in depth; the stages only need a clean listing and a
clear error when the layout is not what they can use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_build.errors import EdgeBuildError
from edge_build.taxonomy import BY_CODE, CODES

SPLITS = ("train", "val")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class ImageRef:
    split: str
    code: str
    path: Path

    @property
    def label(self) -> int:
        return BY_CODE[self.code].index

    @property
    def key(self) -> str:
        """`split/class/file`, the stable name of the image inside the data set."""
        return f"{self.split}/{self.code}/{self.path.name}"


def list_split(root: Path, split: str) -> list[ImageRef]:
    """Every image file of one split, sorted by class code then file name."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise EdgeBuildError(
            f"data set {root} has no '{split}' split (expected {split_dir})",
            f"lay the data out as <root>/{split}/<class code>/<image>",
        )
    refs: list[ImageRef] = []
    for class_dir in sorted(split_dir.iterdir()):
        if not class_dir.is_dir():
            continue
        if class_dir.name not in BY_CODE:
            raise EdgeBuildError(
                f"{class_dir}: class folder '{class_dir.name}' is not in the taxonomy",
                f"rename it to one of {CODES[0]} ... {CODES[-1]} or remove it; `edge-build doctor` lists them all",
            )
        for path in sorted(class_dir.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                refs.append(ImageRef(split, class_dir.name, path))
    if not refs:
        raise EdgeBuildError(f"split {split_dir} holds no images", "run `edge-build doctor` on the data set")
    return refs
