"""Figures of the report. Each function draws on its own Agg canvas (no display, no pyplot state, so
nothing leaks between figures or into a notebook's backend) and returns the Figure, so tests and
notebooks can inspect it before :func:`save` writes it.

Every figure of one report takes its colours and markers from one :class:`Palette`, so a method
looks the same in all of them. Legends sit outside the axes; score axes always span at least 0-100
(the tables' scale), so constant data (an all-zero task) gets a readable axis.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from kvbench.stats import pareto_frontier

FULL_CACHE_LABEL = "full cache"
FRONTIER_LABEL = "Pareto frontier"
#: Paul Tol's "muted" qualitative scheme: distinguishable under the common colour-vision deficiencies
COLORS = ("#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677", "#882255", "#AA4499")
#: the second channel once colours repeat (more methods than colours)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
#: lines of a colour's first, second, ... method
LINESTYLES = ("-", "--", ":", "-.")
#: the full cache, the reference of every figure, is black
REFERENCE_STYLE_COLOR = "black"
#: colour-blind-safe sequential map (perceptually uniform, readable in grey)
HEATMAP_CMAP = "cividis"
#: sideways offset between neighbouring methods' points on a log2 ratio axis (fraction of a doubling),
#: so identical lines stay visible; the total spread is capped at DODGE_SPREAD
DODGE_STEP = 0.04
DODGE_SPREAD = 0.3


@dataclass(frozen=True)
class Style:
    color: str
    marker: str
    linestyle: str = "-"

    def line(self) -> dict:
        """Keyword arguments of ``plot``/``errorbar``: markers half filled, so points stacked on one
        another (identical results) still show each shape."""
        return {"color": self.color, "marker": self.marker, "linestyle": self.linestyle,
                "markerfacecolor": matplotlib.colors.to_rgba(self.color, 0.45), "markeredgecolor": self.color}


class Palette:
    """A colour and a marker for each of ``names`` (method rows of a report), the same in every figure
    drawn with this palette.

    A name's preferred colour and marker come from a hash of the name (not from its position in a
    list), so adding or removing another method rarely changes it. Names are placed in sorted order;
    a name whose preferred colour is taken gets the next free colour, and once all
    :data:`COLORS` are in use, the first free marker of its preferred colour: every name gets its own
    (colour, marker) pair up to ``len(COLORS) * len(MARKERS)`` (90) names, and the first nine get
    distinct colours; lines of a colour's second (third...) name are dashed (dotted...). The full cache
    (``reference``) is always black with a star.
    """

    def __init__(self, names: Iterable[str], reference: str | None = None):
        self.reference = reference
        self._styles: dict[str, Style] = {}
        used: set[tuple[int, int]] = set()
        for name in sorted(set(names) - {reference}):
            digest = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big")
            color, marker = digest % len(COLORS), (digest // len(COLORS)) % len(MARKERS)
            free_colors = set(range(len(COLORS))) - {c for c, _ in used}
            if free_colors:
                color = min(free_colors, key=lambda c: (c - color) % len(COLORS))  # the next free one
            else:
                free = [(c, m) for c in range(len(COLORS)) for m in range(len(MARKERS)) if (c, m) not in used]
                # the preferred colour's next free marker, else any free pair; past 90 names pairs repeat
                same = [pair for pair in free if pair[0] == color]
                color, marker = (same or free or [(color, marker)])[0]
            repeat = sum(c == color for c, _ in used)
            used.add((color, marker))
            self._styles[name] = Style(COLORS[color], MARKERS[marker], LINESTYLES[repeat % len(LINESTYLES)])

    def __getitem__(self, name: str) -> Style:
        if name == self.reference:
            return Style(REFERENCE_STYLE_COLOR, "*")
        if name not in self._styles:
            raise KeyError(f"{name!r} is not in this palette (it has {sorted(self._styles)})")
        return self._styles[name]


def _figure(width: float = 7.6, height: float = 4.2) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _legend(fig: Figure, ax) -> None:
    """The legend right of the axes, never over the data."""
    if ax.get_legend_handles_labels()[0]:
        fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize="small")


def _score_axis(ax, values: Iterable[float], floor: float = 100) -> None:
    """A y axis from 0 to at least ``floor`` (5% headroom): 0-100 scores and retentions keep their
    scale whatever the data, so an all-zero or constant task is not blown up to a sliver."""
    present = [v for v in values if not math.isnan(v)]
    ax.set_ylim(min([0, *present]), 1.05 * max([floor, *present]))


def _log2_xaxis(ax, values, unit: str = "") -> None:
    """Log-2 x axis ticked at the data's own values (the swept ratios), written plainly ("4x", not "2^2")."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(sorted(set(values)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}{unit}"))


def _dodge(count: int) -> list[float]:
    """Multiplicative x offsets, centred on 1, for ``count`` methods on a log2 axis."""
    step = min(DODGE_STEP, DODGE_SPREAD / max(count - 1, 1))
    return [2 ** ((i - (count - 1) / 2) * step) for i in range(count)]


def _yerr(line: pd.DataFrame, value: str) -> list[list[float]] | None:
    """Error bar lengths below and above ``value`` from ``ci_low``/``ci_high`` (0 where missing)."""
    if "ci_low" not in line or line.ci_low.isna().all():
        return None
    return [(line[value] - line.ci_low).fillna(0).clip(lower=0).tolist(),
            (line.ci_high - line[value]).fillna(0).clip(lower=0).tolist()]


def retention_vs_ratio(points: pd.DataFrame, title: str, palette: Palette | None = None) -> Figure:
    """One line per method (column ``row``) through its (``nominal_ratio``, ``retention``) points,
    with 95% error bars where ``ci_low``/``ci_high`` are given, plus the full cache as a dashed 100%
    reference line. Methods are dodged sideways (:data:`DODGE_STEP`) so identical lines stay visible;
    the x ticks stay at the true ratios."""
    palette = palette or Palette(points.row)
    fig = _figure()
    ax = fig.add_subplot()
    ax.axhline(100, color=REFERENCE_STYLE_COLOR, linestyle="--", linewidth=1, label=FULL_CACHE_LABEL)
    groups = list(points.groupby("row", sort=False))
    for (label, line), offset in zip(groups, _dodge(len(groups))):
        ax.errorbar(line.nominal_ratio * offset, line.retention, yerr=_yerr(line, "retention"), capsize=2,
                    elinewidth=0.8, label=label, **palette[label].line())
    if not points.empty:
        _log2_xaxis(ax, points.nominal_ratio, unit="x")
    _score_axis(ax, list(points.get("ci_high", points.retention)) + list(points.retention), floor=110)
    ax.set_xlabel("nominal compression ratio (uncompressed / held KV bytes)")
    ax.set_ylabel("retention (% of full-cache score)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    return fig


def _byte_unit(largest: float) -> tuple[str, int]:
    """The largest binary unit in which ``largest`` bytes is at least 1 (B up to GiB)."""
    units = [("B", 1), ("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30)]
    return next(((name, size) for name, size in reversed(units) if largest >= size), units[0])


def score_vs_bytes(points: pd.DataFrame, title: str, metric: str, palette: Palette | None = None) -> Figure:
    """Pareto plot: score (with 95% error bars from ``ci_low``/``ci_high``) against the measured KV
    bytes held after prefill (``bytes_held``, shown in B, KiB, MiB or GiB), one series per method
    (``row``), and the frontier of :func:`kvbench.stats.pareto_frontier` over all points drawn as a
    staircase: for any amount of memory, the best score a point at or below it reaches."""
    palette = palette or Palette(points.row)
    unit, size = _byte_unit(points.bytes_held.max() if not points.empty else 1)
    points = points.assign(held=points.bytes_held / size)
    fig = _figure()
    ax = fig.add_subplot()
    if not points.empty:
        frontier = points.iloc[pareto_frontier(list(points.score), list(points.held))]
        ax.step(list(frontier.held) + [points.held.max()], list(frontier.score) + [frontier.score.iloc[-1]],
                where="post", color="grey", linewidth=4, alpha=0.35, label=FRONTIER_LABEL, zorder=1)
    for label, line in points.groupby("row", sort=False):
        line = line.sort_values("held")
        ax.errorbar(line.held, line.score, yerr=_yerr(line, "score"), capsize=2, elinewidth=0.8, linewidth=1,
                    markersize=11 if label == palette.reference else 6, label=label, zorder=2, **palette[label].line())
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(LogLocator(base=2))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    _score_axis(ax, list(points.get("ci_high", points.score)) + list(points.score))
    ax.set_xlabel(f"KV cache held after prefill, measured ({unit}, mean per sample)")
    ax.set_ylabel(f"score ({metric})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    return fig


def retention_auc_bars(table: pd.DataFrame, title: str, palette: Palette | None = None) -> Figure:
    """Horizontal bars of each method's area under the retention curve (``auc``, % of the full
    cache, with 95% error bars from ``ci_low``/``ci_high``), labelled by ``row`` and the ratios swept
    (``ratios``: the AUC compares only methods swept over the same ratios)."""
    palette = palette or Palette(table.row)
    fig = _figure(height=1.4 + 0.32 * max(len(table), 1))
    ax = fig.add_subplot()
    labels = [f"{row} ({ratios})" for row, ratios in zip(table.row, table.ratios)]
    ax.barh(range(len(table)), table.auc, xerr=[(table.auc - table.ci_low).clip(lower=0).fillna(0),
                                                 (table.ci_high - table.auc).clip(lower=0).fillna(0)],
            color=[palette[row].color for row in table.row], capsize=3, error_kw={"elinewidth": 1})
    ax.set_yticks(range(len(table)), labels)
    ax.invert_yaxis()  # the table's order, top down
    ax.set_xlim(0, 1.05 * max([100.0, *table.ci_high.dropna(), *table.auc]))
    ax.axvline(100, color=REFERENCE_STYLE_COLOR, linestyle="--", linewidth=1)
    ax.set_xlabel("area under the retention curve (mean % of the full-cache score over log2 ratio)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x")
    return fig


def heatmap(grid: list[list[float]], columns: list[float], rows: list[float], xlabel: str, ylabel: str,
            metric: str, title: str) -> Figure:
    """A 0-100 score grid (``grid[row][column]``, NaN where missing), each cell written in it, in
    the colour-blind-safe :data:`HEATMAP_CMAP`."""
    # at least room for the axis labels, which small grids would crop
    fig = _figure(width=max(4.0, 1.2 + 0.9 * len(columns)), height=max(3.4, 1.4 + 0.5 * len(rows)))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps[HEATMAP_CMAP]
    image = ax.imshow(grid, vmin=0, vmax=100, cmap=cmap, aspect="auto")
    for row, row_values in enumerate(grid):
        for col, value in enumerate(row_values):
            if not math.isnan(value):
                ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize="small",
                        color=_text_color(cmap(value / 100)))
    ax.set_xticks(range(len(columns)), [f"{v:g}" for v in columns])
    ax.set_yticks(range(len(rows)), [f"{v:g}" for v in rows])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="small")
    fig.colorbar(image, ax=ax, label=metric)
    return fig


def _text_color(rgba: Sequence[float]) -> str:
    """Black on light cells, white on dark ones (relative luminance of the cell's colour)."""
    red, green, blue = rgba[:3]
    return "black" if 0.2126 * red + 0.7152 * green + 0.0722 * blue > 0.45 else "white"


def save(fig: Figure, stem: Path, formats: list[str]) -> list[Path]:
    """Write ``stem.<format>`` for each format (png, svg); return the paths written."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.parent / f"{stem.name}.{fmt}" for fmt in formats]  # not with_suffix: "ratio-1.5" has a dot
    # no date and ids salted by the file name: the same figure gives the same bytes (a committed board
    # regenerated from the same runs does not change)
    with matplotlib.rc_context({"svg.hashsalt": stem.name}):
        for path in paths:
            fig.savefig(path, dpi=110, metadata={"Date": None} if path.suffix == ".svg" else None)
    return paths
