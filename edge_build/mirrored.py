"""Perceptual hashes of every training image mirrored, cached: the input of mirror-aware folds.

A horizontally flipped copy of an image is a duplicate that the image's own hashes miss;
across a fold boundary it leaks the held-out image into training (and flips are among the
fine-tuning augmentations). `folds.duplicate_groups(..., mirrored_phash=, mirrored_dhash=)`
joins such pairs into one group.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_build.dataset import ImageRef
from edge_build.stages import run_stage

if TYPE_CHECKING:
    from edge_build.features import SplitFeatures

VERSION = 1


def image_items(split: SplitFeatures, data_root: Path) -> list[tuple[ImageRef, str]]:
    """(image, sha256) of a feature split, in its row order."""
    items = []
    for key, sha in zip(split.keys, split.sha256, strict=True):
        split_name, code, _ = key.split("/", 2)
        items.append((ImageRef(split_name, code, data_root / key), sha))
    return items


def mirrored_hashes(items: list[tuple[ImageRef, str]], build_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """pHash and dHash of every image mirrored (`folds.mirrored_hashes`), cached by the images' sha256.

    Mirrored copies are duplicates that the images' own hashes miss; with flips among the
    augmentations, a mirrored copy across a fold boundary would leak the held-out image.
    """
    from edge_build import atomic
    from edge_build.folds import mirrored_hashes as hashes_of
    from edge_build.images import load_rgb

    directory = Path(build_dir) / "mirrored"
    unique = dict((sha, ref) for ref, sha in items)
    inputs = {"images": sorted(unique), "version": VERSION}

    def produce(out: Path) -> dict[str, Any]:
        shas = sorted(unique)
        pairs = [hashes_of(load_rgb(unique[sha].path)) for sha in shas]
        atomic.write_npz(
            out / "mirrored.npz",
            sha256=np.asarray(shas, dtype="<U64"),
            phash=np.asarray([p for p, _ in pairs], dtype=np.uint64),
            dhash=np.asarray([d for _, d in pairs], dtype=np.uint64),
        )
        return {"images": len(shas)}

    run_stage("mirrored-hashes", directory, inputs, produce)
    with np.load(directory / "mirrored.npz", allow_pickle=False) as npz:
        row = {sha: i for i, sha in enumerate(npz["sha256"].tolist())}
        index = [row[sha] for _, sha in items]
        return npz["phash"][index], npz["dhash"][index]
