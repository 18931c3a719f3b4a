"""PNG plots (matplotlib, Agg backend, no pyplot state): loss curve, learning-rate schedules, confusion matrix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_build.atomic import atomic_path


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        # No "Software" text chunk: the file depends on the data only, not on the matplotlib version.
        figure.savefig(tmp, format="png", metadata={"Software": None})
    return Path(path)


def plot_loss(epoch_loss: Sequence[float], path: Path, title: str = "training loss") -> Path:
    figure = _figure(6, 4)
    axes = figure.add_subplot()
    epochs = np.arange(1, len(epoch_loss) + 1)
    axes.plot(epochs, epoch_loss, marker="o", markersize=3)
    axes.set_xlabel("epoch")
    axes.set_ylabel("mean cross-entropy")
    axes.set_yscale("log")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def plot_lr_schedules(
    schedules: Mapping[str, Sequence[float]], steps_per_epoch: int, used: str, path: Path, title: str
) -> Path:
    """The course's comparison of constant / square / cosine decay; the one used is drawn bold."""
    figure = _figure(6, 4)
    axes = figure.add_subplot()
    for name, rates in schedules.items():
        epochs = np.arange(len(rates)) / steps_per_epoch
        bold = name == used
        axes.plot(epochs, rates, label=f"{name}{' (used)' if bold else ''}", linewidth=2.5 if bold else 1.2)
    axes.set_xlabel("epoch")
    axes.set_ylabel("learning rate")
    axes.set_title(title)
    axes.legend()
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def plot_confusion(matrix: np.ndarray, labels: Sequence[str], path: Path, title: str) -> Path:
    """Rows: true class, columns: predicted class; counts written in the non-empty cells."""
    matrix = np.asarray(matrix)
    size = len(labels)
    figure = _figure(9, 8)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    axes.set_xticks(range(size), labels, rotation=90, fontsize=7)
    axes.set_yticks(range(size), labels, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    peak = max(int(matrix.max()), 1)
    for row, col in zip(*np.nonzero(matrix), strict=True):
        value = int(matrix[row, col])
        axes.text(
            col, row, str(value), ha="center", va="center", fontsize=6, color="white" if value > peak / 2 else "black"
        )
    figure.tight_layout()
    return _save(figure, path)
