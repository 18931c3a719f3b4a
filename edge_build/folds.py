"""Duplicate-aware cross-validation folds.

The shared training split holds exact copies (same file bytes), re-encodings of the
same pixels (different bytes, identical decoded image) and near-duplicates (the
same photo cropped or recompressed; the doctor's perceptual-hash bounds). A copy on
both sides of a fold boundary turns cross-validation into a memory test, so every
image is first put in a duplicate group and whole groups are assigned to folds,
balanced per class.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from edge_build.doctor import NEAR_DHASH_MAX, NEAR_PHASH_MAX


def perceptual_hashes(rgb: np.ndarray) -> tuple[int, int]:
    """64-bit pHash and dHash (imagehash) of an HxWx3 uint8 RGB image, like the doctor's.

    The hashes only look at 32x32 and 9x8 pixels; the gray image is first reduced by
    the largest power of two that keeps it >= 64 px (the doctor's JPEG draft decode
    does the same), which makes hashing 3x cheaper.
    """
    import imagehash

    gray = Image.fromarray(rgb, "RGB").convert("L")
    factor = 1
    while factor < 8 and min(gray.size) // (factor * 2) >= 64:
        factor *= 2
    if factor > 1:
        gray = gray.reduce(factor)
    return int(str(imagehash.phash(gray)), 16), int(str(imagehash.dhash(gray)), 16)


def mirrored_hashes(rgb: np.ndarray) -> tuple[int, int]:
    """pHash and dHash of the image mirrored left-right.

    The shared training split holds mirrored copies of photos (94 pairs), which the
    perceptual hashes of the images themselves do not relate: an image whose mirrored
    hashes are near another image's hashes is a near-duplicate of it (`mirrored_pairs`).
    """
    return perceptual_hashes(np.ascontiguousarray(rgb[:, ::-1]))


def _popcount64(values: np.ndarray) -> np.ndarray:
    as_bytes = np.ascontiguousarray(values, dtype=np.uint64).view(np.uint8).reshape(*values.shape, 8)
    return np.unpackbits(as_bytes, axis=-1).sum(axis=-1, dtype=np.int64)


def near_duplicate_pairs(
    phash: Sequence[int] | np.ndarray,
    dhash: Sequence[int] | np.ndarray,
    max_phash: int = NEAR_PHASH_MAX,
    max_dhash: int = NEAR_DHASH_MAX,
) -> list[tuple[int, int]]:
    """Index pairs (i < j) within both Hamming bounds: the doctor's definition of a near-duplicate."""
    phash = np.asarray([int(h) for h in phash], dtype=np.uint64)
    dhash = np.asarray([int(h) for h in dhash], dtype=np.uint64)
    pairs: list[tuple[int, int]] = []
    block = 256  # bounds memory to block x N distances
    for start in range(0, len(phash), block):
        close = _popcount64(phash[start : start + block, None] ^ phash[None, :]) <= max_phash
        close &= _popcount64(dhash[start : start + block, None] ^ dhash[None, :]) <= max_dhash
        for i, j in zip(*np.nonzero(close), strict=True):
            if start + i < j:
                pairs.append((int(start + i), int(j)))
    return pairs


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)


def mirrored_pairs(
    phash: Sequence[int] | np.ndarray,
    dhash: Sequence[int] | np.ndarray,
    mirrored_phash: Sequence[int] | np.ndarray,
    mirrored_dhash: Sequence[int] | np.ndarray,
) -> list[tuple[int, int]]:
    """Index pairs (i < j) where one image mirrored is a near-duplicate of the other (the doctor's bounds)."""
    phash, dhash = (np.asarray([int(h) for h in hashes], dtype=np.uint64) for hashes in (phash, dhash))
    mirrored = [np.asarray([int(h) for h in hashes], dtype=np.uint64) for hashes in (mirrored_phash, mirrored_dhash)]
    pairs: set[tuple[int, int]] = set()
    block = 256  # bounds memory to block x N distances
    for start in range(0, len(phash), block):
        close = _popcount64(mirrored[0][start : start + block, None] ^ phash[None, :]) <= NEAR_PHASH_MAX
        close &= _popcount64(mirrored[1][start : start + block, None] ^ dhash[None, :]) <= NEAR_DHASH_MAX
        for i, j in zip(*np.nonzero(close), strict=True):
            a, b = int(start + i), int(j)
            if a != b:
                pairs.add((min(a, b), max(a, b)))
    return sorted(pairs)


def duplicate_groups(
    *content_keys: Sequence[str],
    phash: Sequence[int] | np.ndarray | None = None,
    dhash: Sequence[int] | np.ndarray | None = None,
    mirrored_phash: Sequence[int] | np.ndarray | None = None,
    mirrored_dhash: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Group id per image (0..G-1, in order of first appearance).

    Images sharing any value in any of `content_keys` (e.g. file sha256, decoded-pixel
    sha256) are one group; with perceptual hashes (`phash` and `dhash`), near-duplicates
    join too (`near_duplicate_pairs`), and with the mirrored images' hashes as well,
    mirrored copies (`mirrored_pairs`). Grouping is transitive.
    """
    if not content_keys:
        raise ValueError("duplicate_groups needs at least one sequence of content keys")
    size = len(content_keys[0])
    hashes = [h for h in (phash, dhash, mirrored_phash, mirrored_dhash) if h is not None]
    if any(len(keys) != size for keys in (*content_keys, *hashes)):
        raise ValueError("every key sequence must have one entry per image")
    groups = _UnionFind(size)
    for keys in content_keys:
        first: dict[str, int] = {}
        for index, key in enumerate(keys):
            groups.union(first.setdefault(key, index), index)
    if phash is not None and dhash is not None:
        for a, b in near_duplicate_pairs(phash, dhash):
            groups.union(a, b)
        if mirrored_phash is not None and mirrored_dhash is not None:
            for a, b in mirrored_pairs(phash, dhash, mirrored_phash, mirrored_dhash):
                groups.union(a, b)
    roots = [groups.find(i) for i in range(size)]
    renumber: dict[int, int] = {}
    return np.array([renumber.setdefault(root, len(renumber)) for root in roots], dtype=np.int64)


def grouped_folds(
    labels: Sequence[int] | np.ndarray, groups: Sequence[int] | np.ndarray, k: int, seed: int
) -> np.ndarray:
    """Fold index (0..k-1) per image: whole groups per fold, each class spread evenly.

    Groups are placed largest first (ties in a seeded random order) into the fold
    that holds the fewest images of the group's majority class so far, then the
    fewest images overall. Deterministic for a given seed.
    """
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    if labels.shape != groups.shape:
        raise ValueError("labels and groups must have the same length")
    if k < 2:
        raise ValueError(f"need at least 2 folds, got {k}")
    group_ids = np.unique(groups)
    if len(group_ids) < k:
        raise ValueError(f"only {len(group_ids)} distinct image groups, cannot make {k} folds")
    num_classes = int(labels.max()) + 1
    per_class = np.zeros((k, num_classes), dtype=np.int64)
    totals = np.zeros(k, dtype=np.int64)
    members = {int(g): np.flatnonzero(groups == g) for g in group_ids}
    order = np.random.default_rng(seed).permutation(group_ids)
    order = sorted(order.tolist(), key=lambda g: -len(members[g]))  # stable: ties keep the seeded order
    fold_of = np.empty(len(labels), dtype=np.int64)
    for group in order:
        index = members[group]
        majority = int(np.bincount(labels[index], minlength=num_classes).argmax())
        fold = min(range(k), key=lambda f: (per_class[f, majority], totals[f], f))
        fold_of[index] = fold
        np.add.at(per_class[fold], labels[index], 1)
        totals[fold] += len(index)
    return fold_of


def near_duplicate_of(
    phash: Sequence[int] | np.ndarray,
    dhash: Sequence[int] | np.ndarray,
    other_phash: Sequence[int] | np.ndarray,
    other_dhash: Sequence[int] | np.ndarray,
) -> np.ndarray:
    """For each image of the first set, whether some image of the other set is its near-duplicate."""
    phash = np.asarray([int(h) for h in phash], dtype=np.uint64)
    dhash = np.asarray([int(h) for h in dhash], dtype=np.uint64)
    other_phash = np.asarray([int(h) for h in other_phash], dtype=np.uint64)
    other_dhash = np.asarray([int(h) for h in other_dhash], dtype=np.uint64)
    if len(other_phash) == 0:
        return np.zeros(len(phash), dtype=bool)
    close = _popcount64(phash[:, None] ^ other_phash[None, :]) <= NEAR_PHASH_MAX
    close &= _popcount64(dhash[:, None] ^ other_dhash[None, :]) <= NEAR_DHASH_MAX
    return close.any(axis=1)
