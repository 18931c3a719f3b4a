"""Plots for the build report, rendered with matplotlib's Agg backend to embeddable PNG data URIs.

Plots carry codes and English names only: no CJK font is guaranteed on the machine that
renders them, so Chinese names live in the report's HTML text, where the reader's browser
picks a font. Every function returns a `data:image/png;base64,...` string.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

#: One palette for the whole report (colour-blind safe: Okabe-Ito).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
BIN_COLOURS = ("#0072B2", "#7f7f7f", "#D55E00", "#009E73")  # recyclable, residual, hazardous, kitchen
FAIL_COLOUR = "#C0392B"


def _figure(width: float = 7.0, height: float = 3.2) -> tuple[Any, Any]:
    # The object API (no pyplot) keeps no global state and needs no backend switch.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    axes = figure.add_subplot()
    axes.grid(True, color="#e5e5e5", linewidth=0.8)
    axes.set_axisbelow(True)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    return figure, axes


def _data_uri(figure: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None}, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.nan for v in values]


def line_chart(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
    markers: dict[str, Sequence[float]] | None = None,
    marker_label: str = "",
) -> str:
    """Several named (x, y) lines on one axis; `markers` maps a name to the x values to circle."""
    figure, axes = _figure()
    for index, (name, (xs, ys)) in enumerate(series.items()):
        colour = PALETTE[index % len(PALETTE)]
        xs, ys = _finite(xs), _finite(ys)
        axes.plot(xs, ys, label=name, color=colour, linewidth=1.8, marker="o" if len(xs) <= 30 else None, markersize=3)
    if markers:
        labelled = False
        for name, flagged in markers.items():
            xs, ys = series[name]
            points = [(x, y) for x, y in zip(_finite(xs), _finite(ys), strict=False) if x in set(flagged)]
            if points:
                axes.scatter(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    s=90,
                    facecolors="none",
                    edgecolors=FAIL_COLOUR,
                    linewidths=2,
                    zorder=5,
                    label=None if labelled else marker_label,
                )
                labelled = True
    if log_y:
        axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if len(series) > 1 or markers:
        axes.legend(frameon=False, fontsize=8)
    return _data_uri(figure)


def history_chart(
    series: dict[str, list[tuple[int, float, bool]]], run_labels: Sequence[str], budget_ms: float | None
) -> str:
    """Latency per run (x = run number) for each artifact/batch, regressions circled in red."""
    figure, axes = _figure(8.0, 3.6)
    marked = False
    for index, (name, points) in enumerate(series.items()):
        colour = PALETTE[index % len(PALETTE)]
        xs = [p[0] for p in points]
        ys = _finite([p[1] for p in points])
        axes.plot(xs, ys, label=name, color=colour, linewidth=1.6, marker="o", markersize=3)
        bad = [(x, y) for (x, _, flag), y in zip(points, ys, strict=True) if flag]
        if bad:
            axes.scatter(
                [b[0] for b in bad],
                [b[1] for b in bad],
                s=110,
                facecolors="none",
                edgecolors=FAIL_COLOUR,
                linewidths=2,
                zorder=5,
                label=None if marked else "regression",
            )
            marked = True
    if budget_ms:
        axes.axhline(budget_ms, color=FAIL_COLOUR, linestyle="--", linewidth=1, label=f"budget {budget_ms:g} ms")
    axes.set_yscale("log")
    axes.set_ylabel("p50 latency (ms, log scale)")
    if run_labels:
        step = max(1, math.ceil(len(run_labels) / 8))
        ticks = list(range(0, len(run_labels), step))
        axes.set_xticks(ticks, [run_labels[t] for t in ticks], fontsize=7)
    figure.legend(loc="outside right upper", frameon=False, fontsize=7)
    return _data_uri(figure)


def horizontal_bars(
    labels: Sequence[str],
    values: Sequence[float],
    colours: Sequence[str],
    xlabel: str,
    limit: float | None = None,
    reference: float | None = None,
    reference_label: str = "",
) -> str:
    """One bar per label, top to bottom in the given order; `reference` draws a dashed line."""
    height = max(2.4, 0.24 * len(labels) + 0.8)
    figure, axes = _figure(7.0, height)
    positions = list(range(len(labels)))
    axes.barh(positions, _finite(values), color=list(colours), height=0.72)
    axes.set_yticks(positions, list(labels), fontsize=8)
    axes.invert_yaxis()
    axes.grid(False, axis="y")
    if limit is not None:
        axes.set_xlim(0, limit)
    if reference is not None:
        axes.axvline(reference, color=FAIL_COLOUR, linestyle="--", linewidth=1, label=reference_label)
        axes.legend(frameon=False, fontsize=8, loc="lower right")
    axes.set_xlabel(xlabel)
    return _data_uri(figure)


def grouped_bars(
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    ylabel: str,
    reference: float | None = None,
    reference_label: str = "",
) -> str:
    """Bars per group (e.g. artifact) with one bar per series (e.g. batch size)."""
    figure, axes = _figure(7.0, 3.2)
    count = max(1, len(series))
    width = 0.8 / count
    for index, (name, values) in enumerate(series.items()):
        offsets = [g - 0.4 + width * (index + 0.5) for g in range(len(groups))]
        axes.bar(offsets, _finite(values), width=width * 0.92, label=name, color=PALETTE[index % len(PALETTE)])
    if reference is not None:
        axes.axhline(reference, color=FAIL_COLOUR, linestyle="--", linewidth=1, label=reference_label)
    axes.set_xticks(list(range(len(groups))), list(groups), rotation=20, ha="right", fontsize=8)
    axes.grid(False, axis="x")
    axes.set_ylabel(ylabel)
    axes.legend(frameon=False, fontsize=8)
    return _data_uri(figure)
