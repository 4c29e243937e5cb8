"""Leaderboards, plots and table exports, built from result files only (no model, no GPU)::

    python -m kvbench.report [results_dir] [--out DIR] [--format md csv parquet png svg]

``DIR`` defaults to ``results_dir`` (so the default is ``results/LEADERBOARD.md`` and
``results/leaderboards/``); the sweep regenerates it at its end (``report: true`` in the config)::

    DIR/LEADERBOARD.md                        index: each model's average table and plot, links
                                              (to results_dir/bench/bench_methods.md too, when
                                              scripts/bench_methods.py wrote one)
    DIR/leaderboards/<model>.md               a model's leaderboard (average, efficiency, per
                                              task group (``Task.groups``), per task)
    DIR/leaderboards/results.csv, .parquet    the run table of :func:`collect`, one row per run
    DIR/leaderboards/plots/<model>/...        PNG and SVG figures (plots/ is rebuilt every time)

How numbers are compared:

* baseline: the complete ``full`` run of the same model name, task name and task parameters
  (``identity.task.params`` in run.json). retention = 100 * score / baseline score. Without such a
  run (not run, partial, other task parameters) or with a baseline score of 0, retention is "n/a"
  with a footnote.
* partial runs (n of N samples) and failed runs (run.json but no scores.json) keep their row, with a
  footnote, and never enter an average: averages over tasks use complete runs only, and a cell
  that does not cover every task of its table names the tasks left out and is not bolded.
* intervals (``ci_low``, ``ci_high``, cells' ``±`` half-width) and the paired comparison with the
  baseline (:data:`VS_FULL`) are recomputed from each run's samples.jsonl (the main metric's per-sample
  scores), so directories whose scores.json predates intervals report them too; ``docs/statistics.md``.
* bold, in per-task tables: the best complete run of each column and every run not significantly
  below it (``kvbench.stats.indistinguishable_from_best``), where at least two compete; averages over
  tasks carry no interval and no bold.
* order: ``full`` first, then methods alphabetically, a method's default parameters before its
  variants (the setting's suffix, e.g. ``ratio-4_lag-128``); nominal ratios ascending, then token
  budgets ascending. Tasks by suite, then group order (``Task.groups``), then name.

What is task-specific comes from the task classes, rebuilt from each run's identity: the groups of
tasks averaged in tables of their own (``Task.groups``) and a run's own figures (``Task.figures``).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd

from kvbench import plots
from kvbench.results import RunDir, find_runs, sample_scores
from kvbench.stats import bootstrap_ci, detectable_drop_unpaired, indistinguishable_from_best, paired_comparison
from kvbench.tasks import Task, TaskGroup, task_from_identity

log = logging.getLogger(__name__)

#: the method every other one is compared with: it keeps the whole cache
BASELINE_METHOD = "full"
INDEX = "LEADERBOARD.md"
REPORT_DIR = "leaderboards"
#: where scripts/bench_methods.py writes by default (under the results directory); the index links it
BENCH_PAGE = Path("bench") / "bench_methods.md"
FORMATS = ("md", "csv", "parquet", "png", "svg")
MIB = 2**20

#: a compressed run against its full-cache baseline, sample by sample (kvbench.stats.PairedComparison),
#: on the ``vs_full_n`` samples both runs hold
VS_FULL = ["vs_full_diff", "vs_full_ci_low", "vs_full_ci_high", "vs_full_p", "lost", "gained", "vs_full_n"]
COLUMNS = [
    "model", "method", "variant", "method_params", "setting", "row", "column", "nominal_ratio", "budget",
    "measured_ratio", "task", "suite", "task_groups", "task_params", "metric", "score", "ci_low", "ci_high",
    "baseline_score", "retention", *VS_FULL, "n", "n_expected", "complete", "state", "status", "tokens_held",
    "bytes_held", "bytes_vs_full", "peak_bytes_held", "decode_tokens_per_s", "prefill_s_mean", "decode_s_mean",
    "metrics", "run_dir", "sample_scores",
]
FLOAT_COLUMNS = [
    "nominal_ratio", "measured_ratio", "score", "ci_low", "ci_high", "baseline_score", *VS_FULL[:4], "retention",
    "tokens_held", "bytes_held", "bytes_vs_full", "peak_bytes_held", "decode_tokens_per_s", "prefill_s_mean",
    "decode_s_mean",
]
INT_COLUMNS = ["budget", "n", "n_expected", "lost", "gained", "vs_full_n"]


# ---------------------------------------------------------------------------------------------
# The run table
# ---------------------------------------------------------------------------------------------


def collect(results_dir: str | Path) -> pd.DataFrame:
    """One row per results directory under ``results_dir`` (see :data:`COLUMNS`), with retention
    against its full-cache baseline, sorted by model, task, method and setting."""
    rows = [_run_row(run) for run in find_runs(results_dir)]
    _add_baselines(rows)
    rows.sort(key=lambda r: (r["model"], _task_key(r), _row_key(r), _column_key(r)))
    df = pd.DataFrame(rows, columns=COLUMNS)
    df[FLOAT_COLUMNS] = df[FLOAT_COLUMNS].astype(float)
    df[INT_COLUMNS] = df[INT_COLUMNS].astype("Int64")
    return df


def _run_row(run: RunDir) -> dict:
    info = run.read_run()
    scores = run.read_scores()
    identity = info.identity
    compression, task = identity.compression, identity.task
    records = run.records()
    metric = scores.metric if scores else None
    # intervals come from the records, so directories written before scores.json held them report too
    per_sample = sample_scores(records, metric) if scores and scores.score is not None else None
    interval = bootstrap_ci(list(per_sample.values())).columns() if per_sample else {}
    state = "failed" if scores is None else "complete" if scores.complete else "partial"
    setting = compression["label"]
    variant = setting.partition("_")[2]  # non-default method parameters, e.g. "lag-128"
    task_params = json.dumps(task["params"], sort_keys=True)
    task_obj = _task(task["kind"], task["name"], task_params)
    return {
        "model": identity.model["name"],
        "method": identity.method["name"],
        "variant": variant,
        "method_params": json.dumps(identity.method["params"], sort_keys=True),
        "setting": setting,
        "row": f"{identity.method['name']} {variant}".strip(),
        "column": _column_label(compression["ratio"], compression["budget"]),
        "nominal_ratio": compression["ratio"],
        "budget": compression["budget"],
        "measured_ratio": scores.measured_ratio if scores else None,
        "task": task["name"],
        "suite": task["kind"],
        "task_groups": tuple(task_obj.groups()) if task_obj else (),
        "task_params": task_params,
        "metric": metric,
        "score": scores.score if scores else None,
        "ci_low": interval.get("ci_low"),
        "ci_high": interval.get("ci_high"),
        "n": scores.n if scores else len(records),
        "n_expected": scores.n_expected if scores else info.n_expected,
        "complete": state == "complete",
        "state": state,
        "status": info.status,
        "tokens_held": scores.tokens_held if scores else None,
        "bytes_held": scores.bytes_held if scores else None,
        "peak_bytes_held": scores.peak_bytes_held if scores else None,
        "decode_tokens_per_s": scores.decode_tokens_per_s if scores else None,
        "prefill_s_mean": _mean(r.prefill_s for r in records),
        "decode_s_mean": _mean(r.decode_s for r in records),
        "metrics": scores.metrics if scores else None,
        "run_dir": str(run.path),
        "sample_scores": per_sample,
    }


@functools.cache
def _task(kind: str, name: str, params: str) -> Task | None:
    """The task of a run's identity (``params`` as JSON), or None where this kvbench cannot build it
    (a task kind it does not have): the run is then reported without groups and task figures."""
    try:
        return task_from_identity({"name": name, "kind": kind, "params": json.loads(params)})
    except (TypeError, ValueError) as err:
        log.warning("task '%s' (kind '%s') of the results cannot be rebuilt (%s): reported without its "
                    "groups and figures", name, kind, err)
        return None


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _column_label(ratio: float | None, budget: int | None) -> str:
    return f"budget {budget}" if budget is not None else f"{ratio:g}x"


def _baseline_key(row: dict) -> tuple:
    return row["model"], row["task"], row["task_params"]


def _add_baselines(rows: list[dict]) -> None:
    """Attach the score and KV bytes of the complete full-cache run with the same model, task and
    task parameters, the retention and bytes relative to it, and (for the other methods) the paired
    comparison with it on the samples both hold (:data:`VS_FULL`, 0-100 scale)."""
    baselines = {_baseline_key(r): r for r in rows if r["method"] == BASELINE_METHOD and r["state"] == "complete"}
    for row in rows:
        base = baselines.get(_baseline_key(row), {})
        row["baseline_score"] = base.get("score")
        usable = row["score"] is not None and base.get("score")  # a 0 baseline makes retention undefined
        row["retention"] = 100 * row["score"] / base["score"] if usable else None
        row["bytes_vs_full"] = (row["bytes_held"] / base["bytes_held"]
                                if row["bytes_held"] is not None and base.get("bytes_held") else None)
        paired = row["method"] != BASELINE_METHOD and row["sample_scores"] and base.get("sample_scores")
        shared = paired and row["sample_scores"].keys() & base["sample_scores"].keys()
        if shared:
            comparison = paired_comparison(base["sample_scores"], row["sample_scores"])
            row.update(comparison.columns(), vs_full_n=comparison.n)


# Sort keys: rows are methods (baseline first), columns are settings (ratios, then budgets).

def _row_key(row: Mapping) -> tuple:
    return row["method"] != BASELINE_METHOD, row["method"], row["variant"]


def _column_key(row: Mapping) -> tuple:
    budget = row["budget"]
    return (0, row["nominal_ratio"]) if budget is None or pd.isna(budget) else (1, budget)


def _task_key(row: Mapping) -> tuple:
    return row["suite"], min((g.rank for g in row["task_groups"]), default=-1), row["task"]


def _ordered(df: pd.DataFrame, label: str, key: Callable[[Mapping], tuple]) -> list[str]:
    """The distinct values of column ``label``, ordered by ``key`` of their rows."""
    keys = {r[label]: key(r) for r in df.to_dict("records")}
    return sorted(keys, key=keys.get)


# ---------------------------------------------------------------------------------------------
# Cells and tables
# ---------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One method x setting entry: a score (one run, or a mean over tasks) and its retention."""

    score: float
    retention: float
    notes: list[str] = field(default_factory=list)
    #: may be compared with the rest of its column (complete, and covering every task of its table)
    rankable: bool = False
    #: a single run's per-sample scores (sample id -> 0..1) and the half-width of its 95% interval
    #: (points); None for averages over tasks and where a record lacks the main metric
    samples: dict[str, float] | None = None
    half_width: float | None = None
    n: int | None = None


class Footnotes:
    """The numbered notes under one table; the same text keeps the same number."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def mark(self, texts: Iterable[str]) -> str:
        marks = []
        for text in texts:
            if text not in self.texts:
                self.texts.append(text)
            marks.append(f" [{self.texts.index(text) + 1}]")
        return "".join(marks)

    def markdown(self) -> str:
        return "\n".join(f"[{i}] {text}  " for i, text in enumerate(self.texts, start=1))


def _run_notes(run: pd.Series) -> list[str]:
    """Why a single run's cell is not a plain complete score with retention."""
    if run.state == "failed":
        return [f"failed: no scores.json (run.json status '{run.status}', {run.n} of {run.n_expected} samples written)"]
    notes = []
    if run.state == "partial":
        notes.append(f"partial: {run.n} of {run.n_expected} samples, left out of averages")
    if pd.notna(run.score) and pd.isna(run.retention):
        notes.append("retention n/a: full-cache score is 0" if run.baseline_score == 0 else
                     "retention n/a: no complete full-cache run with the same task parameters")
    return notes


def _run_cell(runs: pd.DataFrame) -> Cell:
    run = runs.iloc[0]  # one results directory per model x task x method x setting
    half_width = (run.ci_high - run.ci_low) / 2 if pd.notna(run.ci_low) else None
    return Cell(run.score, run.retention, _run_notes(run), rankable=run.state == "complete" and pd.notna(run.score),
                samples=run.sample_scores, half_width=half_width, n=run.n)


def _left_out_reason(runs: pd.DataFrame, task: str) -> str:
    run = runs[runs.task == task]
    if run.empty:
        return "not run"
    run = run.iloc[0]
    return f"partial, {run.n} of {run.n_expected}" if run.state == "partial" else run.state


def _average_cell(runs: pd.DataFrame, tasks: list[str]) -> Cell:
    """Mean score and mean retention over the complete runs among ``tasks``."""
    complete = runs[runs.state == "complete"]
    left_out = [f"{t} ({_left_out_reason(runs, t)})" for t in tasks if t not in set(complete.task)]
    notes = []
    if left_out:
        notes.append(f"mean over {len(tasks) - len(left_out)} of {len(tasks)} tasks; left out: {', '.join(left_out)}")
    no_baseline = list(complete.task[complete.retention.isna()])
    if no_baseline:
        notes.append(f"retention n/a: no usable full-cache baseline for {', '.join(no_baseline)}")
    retention = complete.retention.mean() if not no_baseline else math.nan
    return Cell(complete.score.mean(), retention, notes, rankable=not left_out and not complete.empty)


def _cells(runs: pd.DataFrame, cell: Callable[[pd.DataFrame], Cell]) -> dict[tuple[str, str], Cell]:
    return {key: cell(group) for key, group in runs.groupby(["row", "column"], sort=False)}


def _pct(value: float) -> str:
    return "n/a" if pd.isna(value) else f"{value:.1f}%"


def _fmt(value: float, spec: str) -> str:
    return "n/a" if pd.isna(value) else format(value, spec)


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """A GitHub markdown table: first column left-aligned, the others right-aligned."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    separator = "| " + " | ".join([":---"] + ["---:"] * (len(header) - 1)) + " |"
    return "\n".join([line(header), separator, *(line(row) for row in body)])


def _marked(column: Mapping[str, Cell]) -> set[str]:
    """The rows to bold in a column (row -> cell): the best single run and every run not significantly
    below it (:func:`kvbench.stats.indistinguishable_from_best`), among complete runs with per-sample
    scores, where at least two compete. Averages over tasks are never marked."""
    runs = {row: cell.samples for row, cell in column.items() if cell.rankable and cell.samples}
    return set(indistinguishable_from_best(runs)) if len(runs) > 1 else set()


def _sample_size_note(cells: Mapping[tuple[str, str], Cell]) -> str | None:
    """n of the table's single runs and the smallest drop from the full cache detectable at that n."""
    runs = {key: c for key, c in cells.items() if c.rankable and c.samples}
    if not runs:
        return None
    ns = sorted({c.n for c in runs.values()})
    text = f"n = {ns[0]}" + (f" to {ns[-1]}" if len(ns) > 1 else "") + " samples per run"
    full = [c.score / 100 for (row, _), c in runs.items() if row == BASELINE_METHOD]
    if full and 0 < full[0] <= 1:
        drop = detectable_drop_unpaired(ns[0], full[0])
        text += (f"; from the full cache's {100 * full[0]:.1f}, the smallest drop detectable at that n (80% "
                 "power, alpha 0.05, two-proportion test; the paired test in results.csv can do better) is "
                 + ("none (not even a fall to 0)" if math.isnan(drop) else f"{100 * drop:.1f} points"))
    return text + "."


def _score_table(runs: pd.DataFrame, cell: Callable[[pd.DataFrame], Cell]) -> str:
    """Methods as rows, settings as columns, "score ±half-width (retention%)" cells; in bold, the best
    of a column and the runs indistinguishable from it (:func:`_marked`)."""
    rows, columns = _ordered(runs, "row", _row_key), _ordered(runs, "column", _column_key)
    cells = _cells(runs, cell)
    marked = {c: _marked({r: x for (r, col), x in cells.items() if col == c}) for c in columns}
    notes = Footnotes()

    def text(row: str, column: str) -> str:
        entry = cells.get((row, column))
        if entry is None:
            return "–"
        interval = f" ±{entry.half_width:.0f}" if entry.half_width is not None else ""
        shown = "n/a" if pd.isna(entry.score) else f"{entry.score:.1f}{interval} ({_pct(entry.retention)})"
        if row in marked[column]:
            shown = f"**{shown}**"
        return shown + notes.mark(entry.notes)

    table = markdown_table(["method", *columns], [[r, *(text(r, c) for c in columns)] for r in rows])
    size = _sample_size_note(cells)
    return "\n\n".join(filter(None, [table, notes.markdown(), size]))


def _efficiency_table(runs: pd.DataFrame, tasks: list[str]) -> str:
    """Measured compression and speed per method and setting: means over complete runs."""
    header = ["method", "setting", "tasks", "measured ratio", "KV held (MiB)", "KV held vs full",
              "peak KV (MiB)", "decode tok/s", "prefill s/sample", "decode s/sample"]
    body = []
    for row in _ordered(runs, "row", _row_key):
        for column in _ordered(runs, "column", _column_key):
            group = runs[(runs.row == row) & (runs.column == column)]
            if group.empty:
                continue
            done = group[group.state == "complete"]
            body.append([
                row, column, f"{done.task.nunique()} of {len(tasks)}",
                _fmt(done.measured_ratio.mean(), ".2f") + ("x" if not done.empty else ""),
                _fmt(done.bytes_held.mean() / MIB, ".1f"),
                _pct(100 * done.bytes_vs_full.mean() if done.bytes_vs_full.notna().all() else math.nan),
                _fmt(done.peak_bytes_held.mean() / MIB, ".1f"),
                _fmt(done.decode_tokens_per_s.mean(), ".1f"),
                _fmt(done.prefill_s_mean.mean(), ".3f"),
                _fmt(done.decode_s_mean.mean(), ".3f"),
            ])
    return markdown_table(header, body)


# ---------------------------------------------------------------------------------------------
# Markdown documents
# ---------------------------------------------------------------------------------------------

CELL_LEGEND = (
    "Cells: score ±half-width of its 95% bootstrap interval over samples (retention = score / score of "
    "the complete full-cache run of the same model, task and task parameters, in %). Averages are means "
    "over complete runs only, without intervals; partial and failed runs are footnoted and left out. "
    "Bold, in per-task tables: the column's best complete run and every run not significantly below it "
    "(paired test on the shared samples, Holm-corrected over the column, p > 0.05); a lone bold cell "
    "beats every other run of its column significantly. Averages are not marked."
)


def _tasks(runs: pd.DataFrame) -> list[str]:
    return _ordered(runs, "task", _task_key)


def _run_counts(runs: pd.DataFrame) -> str:
    counts = runs.state.value_counts()
    return f"{len(runs)} runs (" + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("complete", "partial", "failed")) + ")"


def _images(paths: Iterable[str]) -> str:
    return " ".join(f"![{Path(p).stem}]({p})" for p in paths)


def _task_about(task_runs: pd.DataFrame) -> str:
    """Suite, groups (if any) and metric of a task, as one line."""
    facts = [("suite", task_runs.suite.iloc[0]),
             *((g.kind, g.name) for g in task_runs.task_groups.iloc[0]),
             ("metric", next(iter(task_runs.metric.dropna()), None))]
    return ", ".join(f"{name} `{value}`" for name, value in facts if isinstance(value, str))


def average_table(df: pd.DataFrame, model: str) -> str:
    """The model's headline table: score (retention) averaged over all its tasks."""
    runs = df[df.model == model]
    return _score_table(runs, partial(_average_cell, tasks=_tasks(runs)))


def leaderboard_markdown(df: pd.DataFrame, model: str, images: Mapping[str | None, list[str]] | None = None) -> str:
    """The leaderboard page of one model. ``images`` maps a task (None: the model as a whole) to
    the relative paths of its figures."""
    images = images or {}
    runs = df[df.model == model]
    tasks = _tasks(runs)
    parts = [
        f"# {model}",
        f"{_run_counts(runs)} over {len(tasks)} task(s): {', '.join(tasks)}. {CELL_LEGEND}",
        f"## Average over tasks\n\n{average_table(df, model)}",
        _images(images.get(None, [])),
        "## Efficiency\n\nMeans over complete runs (\"tasks\": how many). KV held: bytes after prefill, "
        f"per sample.\n\n{_efficiency_table(runs, tasks)}",
    ]
    groups: set[TaskGroup] = {g for task_groups in runs.task_groups for g in task_groups}
    for group in sorted(groups, key=lambda g: (g.kind, g.rank, g.name)):
        in_group = runs[runs.task_groups.map(lambda task_groups: group in task_groups)]
        group_tasks = _tasks(in_group)
        parts.append(f"## {group.title}\n\nMean over {', '.join(group_tasks)}.\n\n"
                     + _score_table(in_group, partial(_average_cell, tasks=group_tasks)))
    parts.append("## Per task")
    for task in tasks:
        task_runs = runs[runs.task == task]
        parts += [f"### {task}\n\n{_task_about(task_runs)}\n\n{_score_table(task_runs, _run_cell)}",
                  _images(images.get(task, []))]
    return "\n\n".join(filter(None, parts)) + "\n"


def index_markdown(df: pd.DataFrame, results_dir: Path, pages: Mapping[str, str],
                   images: Mapping[str, list[str]], exports: list[str], bench_page: str | None = None) -> str:
    """LEADERBOARD.md: per model its average table, main figure and a link to its page; then the
    exports and the method-cost benchmark. ``pages`` and ``images`` map a model to relative paths,
    ``exports`` and ``bench_page`` are relative paths."""
    parts = [
        "# kvbench leaderboard",
        f"Generated by `python -m kvbench.report {results_dir}` from {_run_counts(df)}; regenerated at the end "
        f"of every sweep (config key `report`). {CELL_LEGEND}",
    ]
    if df.empty:
        parts.append(f"No runs found under `{results_dir}`.")
    for model in sorted(df.model.unique()):
        page = f"[Full leaderboard: per task, per task group, efficiency]({pages[model]})" if model in pages else ""
        parts += [f"## {model}", f"Average over tasks. {page}\n\n{average_table(df, model)}",
                  _images(images.get(model, []))]
    if exports:
        parts.append("Run table (one row per run): " + ", ".join(f"[{Path(p).name}]({p})" for p in exports))
    if bench_page:
        parts.append(f"Method cost (time, KV bytes and memory against the full cache, from "
                     f"`scripts/bench_methods.py`): [{Path(bench_page).name}]({bench_page})")
    return "\n\n".join(filter(None, parts)) + "\n"


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def retention_points(df: pd.DataFrame, model: str, task: str | None = None) -> pd.DataFrame:
    """(row, nominal_ratio, retention) of a model's compressing methods at nominal ratios, for one
    task or averaged over all its tasks; complete runs only, averages only where they cover every
    task (the same cells as the tables bold)."""
    runs = df[(df.model == model) & df.budget.isna() & (df.method != BASELINE_METHOD)]
    if task is not None:
        runs = runs[(runs.task == task) & (runs.state == "complete") & runs.retention.notna()]
        return runs[["row", "nominal_ratio", "retention"]].reset_index(drop=True)
    tasks = _tasks(df[df.model == model])
    points = []
    for (row, column), group in runs.groupby(["row", "column"], sort=False):
        cell = _average_cell(group, tasks)
        if cell.rankable and pd.notna(cell.retention):
            points.append({"row": row, "nominal_ratio": group.nominal_ratio.iloc[0], "retention": cell.retention,
                           "key": (_row_key(group.iloc[0]), _column_key(group.iloc[0]))})
    points.sort(key=lambda p: p["key"])
    return pd.DataFrame(points, columns=["row", "nominal_ratio", "retention"])


def _bytes_points(runs: pd.DataFrame) -> pd.DataFrame:
    done = runs[(runs.state == "complete") & runs.bytes_held.notna() & runs.score.notna()]
    return done.assign(bytes_mib=done.bytes_held / MIB)[["row", "bytes_mib", "score"]]


def _write_plots(df: pd.DataFrame, plot_dir: Path, formats: list[str]) -> tuple[dict, list[Path]]:
    """Every figure of every model; returns ({model: {task or None: [figure stems]}}, files)."""
    stems: dict[str, dict[str | None, list[Path]]] = {}
    written: list[Path] = []

    def draw(model: str, task: str | None, stem: Path, fig) -> None:
        written.extend(plots.save(fig, stem, formats))
        stems.setdefault(model, {}).setdefault(task, []).append(stem)

    for model in df.model.unique():
        runs = df[df.model == model]
        points = retention_points(df, model)
        if not points.empty:
            draw(model, None, plot_dir / model / "retention_average",
                 plots.retention_vs_ratio(points, f"{model}: retention averaged over tasks"))
        for task in _tasks(runs):
            task_runs = runs[runs.task == task]
            points = retention_points(df, model, task)
            if not points.empty:
                draw(model, task, plot_dir / model / task / "retention",
                     plots.retention_vs_ratio(points, f"{model} · {task}: retention"))
            bytes_points = _bytes_points(task_runs)
            if not bytes_points.empty:
                metric = task_runs.metric.dropna().iloc[0]
                draw(model, task, plot_dir / model / task / "score_vs_kv_bytes",
                     plots.score_vs_bytes(bytes_points, f"{model} · {task}: score vs KV held", metric))
            for run in task_runs.itertuples():
                task_obj = _task(run.suite, run.task, run.task_params)
                if task_obj is None or not isinstance(run.metrics, dict):
                    continue
                flag = f" (partial: {run.n} of {run.n_expected})" if run.state == "partial" else ""
                title = f"{model} · {task} · {run.row} {run.column}{flag}"
                for name, fig in task_obj.figures(run.metrics, title).items():
                    draw(model, task, plot_dir / model / task / f"{name}_{run.method}_{run.setting}", fig)
    return stems, written


# ---------------------------------------------------------------------------------------------
# Writing everything
# ---------------------------------------------------------------------------------------------


def _export_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The run table for CSV and Parquet: ``metrics`` (nested, varying keys) as a JSON string, the
    task groups as a JSON list of their titles; the per-sample scores stay in samples.jsonl."""
    return df.drop(columns="sample_scores").assign(
        metrics=df.metrics.map(lambda m: json.dumps(m, sort_keys=True) if m is not None else None),
        task_groups=df.task_groups.map(lambda groups: json.dumps([g.title for g in groups])))


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_report(results_dir: str | Path, out_dir: str | Path | None = None,
                 formats: Iterable[str] = FORMATS) -> list[Path]:
    """Write the index, per-model leaderboards, exports and figures (see the module docstring)
    for the runs under ``results_dir`` into ``out_dir`` (default: ``results_dir``); return the
    files written."""
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else results_dir
    report_dir = out / REPORT_DIR
    formats = list(formats)
    df = collect(results_dir)
    written: list[Path] = []
    image_format = next((f for f in ("png", "svg") if f in formats), None)
    stems: dict = {}
    if image_format:
        shutil.rmtree(report_dir / "plots", ignore_errors=True)  # so no figure outlives its run
        stems, files = _write_plots(df, report_dir / "plots", [f for f in formats if f in ("png", "svg")])
        written += files
    if "csv" in formats:
        report_dir.mkdir(parents=True, exist_ok=True)
        _export_frame(df).to_csv(report_dir / "results.csv", index=False)
        written.append(report_dir / "results.csv")
    if "parquet" in formats:
        report_dir.mkdir(parents=True, exist_ok=True)
        _export_frame(df).to_parquet(report_dir / "results.parquet", index=False)
        written.append(report_dir / "results.parquet")
    if "md" in formats:
        exports = [p for p in written if p.suffix in (".csv", ".parquet")]
        written += _write_markdown(df, results_dir, out, stems, image_format, exports)
    return written


def _write_markdown(df: pd.DataFrame, results_dir: Path, out: Path, stems: Mapping, image_format: str | None,
                    exports: list[Path]) -> list[Path]:
    report_dir = out / REPORT_DIR

    def relative(stem: Path, start: Path) -> str:
        return (stem.parent / f"{stem.name}.{image_format}").relative_to(start).as_posix()

    written, pages = [], {}
    for model in sorted(df.model.unique()):
        images = {task: [relative(s, report_dir) for s in paths] for task, paths in stems.get(model, {}).items()}
        page = _write_text(report_dir / f"{model}.md", leaderboard_markdown(df, model, images))
        written.append(page)
        pages[model] = page.relative_to(out).as_posix()
    index_images = {model: [relative(s, out) for s in by_task.get(None, [])] for model, by_task in stems.items()}
    export_links = [p.relative_to(out).as_posix() for p in exports]
    bench = results_dir / BENCH_PAGE
    bench_link = Path(os.path.relpath(bench, out)).as_posix() if bench.is_file() else None
    written.append(_write_text(out / INDEX, index_markdown(df, results_dir, pages, index_images, export_links,
                                                           bench_link)))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvbench.report",
                                     description="Leaderboards, plots and table exports from kvbench result files.")
    parser.add_argument("results_dir", nargs="?", default="results", type=Path,
                        help="results directory to read (default: results)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where LEADERBOARD.md and leaderboards/ go (default: results_dir)")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS), dest="formats",
                        help="what to write (default: all)")
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        parser.error(f"no results directory {args.results_dir}")
    written = write_report(args.results_dir, args.out, args.formats)
    index = next((p for p in written if p.name == INDEX), None)
    print(f"kvbench.report: wrote {len(written)} files" + (f"; index: {index}" if index else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
