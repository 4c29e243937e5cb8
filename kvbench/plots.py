"""Figures of the report. Each function draws on its own Agg canvas (no display, no pyplot state, so
nothing leaks between figures or into a notebook's backend) and returns the Figure, so tests and
notebooks can inspect it before :func:`save` writes it."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

FULL_CACHE_LABEL = "full cache"


def _figure(width: float = 6.4, height: float = 4.2) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _log2_xaxis(ax, values, unit: str = "") -> None:
    """Log-2 x axis ticked at the data's own values, written plainly ("4x", not "2^2")."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(sorted(set(values)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}{unit}"))


def retention_vs_ratio(points: pd.DataFrame, title: str) -> Figure:
    """One line per method (column ``row``) through its (``nominal_ratio``, ``retention``) points,
    plus the full cache as a dashed 100% reference line."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.axhline(100, color="grey", linestyle="--", linewidth=1, label=FULL_CACHE_LABEL)
    for label, line in points.groupby("row", sort=False):
        ax.plot(line.nominal_ratio, line.retention, marker="o", label=label)
    if not points.empty:
        _log2_xaxis(ax, points.nominal_ratio, unit="x")
    ax.set_ylim(0, max(110, 1.05 * points.retention.max()) if not points.empty else 110)
    ax.set_xlabel("nominal compression ratio (uncompressed / held KV bytes)")
    ax.set_ylabel("retention (% of full-cache score)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def score_vs_bytes(points: pd.DataFrame, title: str, metric: str) -> Figure:
    """Score against the KV bytes held after prefill (``bytes_mib``), one line per method (``row``)."""
    fig = _figure()
    ax = fig.add_subplot()
    for label, line in points.groupby("row", sort=False):
        line = line.sort_values("bytes_mib")
        single = len(line) == 1  # a method with one setting, such as the full cache, as a star
        ax.plot(line.bytes_mib, line.score, marker="*" if single else "o", markersize=12 if single else 6, label=label)
    if not points.empty:
        _log2_xaxis(ax, points.bytes_mib.round(1))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("KV cache held after prefill (MiB, mean per sample)")
    ax.set_ylabel(f"score ({metric})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def heatmap(grid: list[list[float]], columns: list[float], rows: list[float], xlabel: str, ylabel: str,
            metric: str, title: str) -> Figure:
    """A 0-100 score grid (``grid[row][column]``, NaN where missing), each cell written in it."""
    fig = _figure(width=1.2 + 0.9 * len(columns), height=1.4 + 0.5 * len(rows))
    ax = fig.add_subplot()
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    for row, row_values in enumerate(grid):
        for col, value in enumerate(row_values):
            if not math.isnan(value):
                # white on the dark ends of the colour map, black on its light middle
                color = "white" if value < 20 or value > 85 else "black"
                ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize="small", color=color)
    ax.set_xticks(range(len(columns)), [f"{v:g}" for v in columns])
    ax.set_yticks(range(len(rows)), [f"{v:g}" for v in rows])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="small")
    fig.colorbar(image, ax=ax, label=metric)
    return fig


def save(fig: Figure, stem: Path, formats: list[str]) -> list[Path]:
    """Write ``stem.<format>`` for each format (png, svg); return the paths written."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.parent / f"{stem.name}.{fmt}" for fmt in formats]  # not with_suffix: "ratio-1.5" has a dot
    for path in paths:
        fig.savefig(path, dpi=110)
    return paths
