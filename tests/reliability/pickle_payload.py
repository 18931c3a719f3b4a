"""Pickles that leave a marker file when unpickled: a loader that refuses them leaves no marker."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling this object creates the marker file


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker))


def evil_npy(marker: Path) -> bytes:
    """A well-formed .npy whose object array is stored as a pickle."""
    buffer = io.BytesIO()
    np.save(buffer, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def evil_npz(marker: Path, **arrays: np.ndarray) -> bytes:
    """A .npz with `arrays` plus one pickled object array under each name in `arrays`' place."""
    buffer = io.BytesIO()
    poisoned = {name: np.array([_Payload(marker)] * len(value), dtype=object) for name, value in arrays.items()}
    np.savez(buffer, **poisoned)
    return buffer.getvalue()
