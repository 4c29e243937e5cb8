"""Leaderboards, plots and table exports, built from result files only (no model, no GPU)::

    python -m kvbench.report [results_dir] [--out DIR] [--format md csv parquet png svg]
    python -m kvbench.report [results_dir] [--out DIR] --compare A B
    python -m kvbench.report leaderboard/runs --out leaderboard --publish     (kvbench.publish)

``DIR`` defaults to ``results_dir`` (so the default is ``results/LEADERBOARD.md`` and
``results/leaderboards/``); the sweep regenerates it at its end (``report: true`` in the config)::

    DIR/LEADERBOARD.md                        index: each model's average table and plot, links
                                              (to results_dir/bench/bench_methods.md too, when
                                              scripts/bench_methods.py wrote one inside DIR), the
                                              command that wrote it
    DIR/leaderboards/<model>.md               a model's leaderboard (average, efficiency, per
                                              task group (``Task.groups``), per task)
    DIR/leaderboards/results.csv, .parquet    the run table of :func:`collect`, one row per run
    DIR/leaderboards/plots/<model>/...        PNG and SVG figures (plots/ is rebuilt every time):
                                              retention vs ratio (95% error bars), the area under
                                              it per method, score vs measured KV bytes with the
                                              Pareto frontier, and the tasks' own figures
    DIR/comparisons/<A>_vs_<B>.csv            ``--compare A B`` (:func:`compare`)

The report is written into a hidden staging folder and swapped in (:func:`write_report`), so a failed
or killed report leaves the previous one whole.

How numbers are compared:

* baseline: the complete ``full`` run of the same model name, task name and task parameters
  (``identity.task.params`` in run.json). retention = 100 * score / baseline score. Without such a
  run (not run, partial, other task parameters) or with a baseline score of 0, retention is "n/a"
  with a footnote.
* partial runs (n of N samples) and unscored runs (run.json but no scores.json: still running, or their
  job died before scoring them) keep their row, marked
  in the cell (``partial 40/100``; an average says ``3 of 9 tasks``) with a footnote, and never enter an average: averages over tasks use complete runs only, and a cell
  that does not cover every task of its table names the tasks left out and is not bolded. An average's
  tasks: in a ratio column, every task but those compressed only at a budget (:func:`ratio_tasks`); in a
  budget column, the tasks run at that budget.
* intervals (``ci_low``, ``ci_high``, cells' ``±`` half-width) and the paired comparison with the
  baseline (:data:`VS_FULL`) are recomputed from each run's samples.jsonl (the main metric's per-sample
  scores, and the records' clusters: ``kvbench.stats.mean_ci``, ``paired_comparison``), so directories
  whose scores.json predates intervals report them too; ``docs/statistics.md``.
* bold, in per-task tables: the best complete run of each column and every run not significantly
  below it (``kvbench.stats.indistinguishable_from_best``), where at least two compete; averages over
  tasks are not bolded; their interval resamples every task's samples (``kvbench.stats.task_mean_ci``).
* order: ``full`` first, then methods alphabetically, a method's default parameters before its
  variants (the setting's suffix, e.g. ``ratio-4_lag-128``); nominal ratios ascending, then token
  budgets ascending. Tasks by suite, then group order (``Task.groups``), then name.

``--compare A B`` pairs B with A (the reference) run by run and sample by sample: A and B are
``METHOD`` (its default parameters, every setting) or ``METHOD/SETTING`` (a setting directory name,
e.g. ``snapkv/ratio-4``); see :func:`compare`.

What is task-specific comes from the task classes, rebuilt from each run's identity: the groups of
tasks averaged in tables of their own (``Task.groups``), a run's own figures (``Task.figures``) and a
task kind's own tables over a model's complete runs (``Task.tables``).
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
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kvbench import plots
from kvbench.errors import ConfigError
from kvbench.registry import unknown_name
from kvbench.results import (FIDELITY_METRICS, RunDir, find_runs, generations, sample_clusters, sample_scores,
                             seconds_per_correct, summarize_fidelity, write_atomic)
from kvbench.stats import (
    detectable_drop_unpaired,
    holm,
    indistinguishable_from_best,
    mean_ci,
    paired_comparison,
    retention_auc,
    retention_auc_ci,
    retention_ci,
    task_mean_ci,
)
from kvbench.tasks import Task, TaskGroup, task_from_identity
from kvbench.tasks import ReportRun, registered

log = logging.getLogger(__name__)

#: the method every other one is compared with: it keeps the whole cache
BASELINE_METHOD = "full"
INDEX = "LEADERBOARD.md"
REPORT_DIR = "leaderboards"
#: where ``--compare`` writes its CSV files (under --out, default the results directory)
COMPARISONS_DIR = "comparisons"
#: where scripts/bench_methods.py writes by default (under the results directory); the index links it
BENCH_PAGE = Path("bench") / "bench_methods.md"
FORMATS = ("md", "csv", "parquet", "png", "svg")
#: a task's score vs measured KV bytes figure, with the Pareto frontier (plots/<model>/<task>/<stem>.<format>)
BYTES_FIGURE = "score_vs_kv_bytes"
MIB = 2**20

#: mean output tokens (every generation), its change against the full cache in %, seconds per correct answer
GENERATION = ["mean_new_tokens", "new_tokens_vs_full", "s_per_correct"]
#: a compressed run against its full-cache baseline, sample by sample (kvbench.stats.PairedComparison),
#: on the ``vs_full_n`` samples both runs hold
VS_FULL = ["vs_full_diff", "vs_full_ci_low", "vs_full_ci_high", "vs_full_p", "lost", "gained", "vs_full_n"]
#: fidelity to the full cache (kvbench.fidelity) over the gold answer (``kl``...) and over the full cache's
#: greedy output (``greedy_kl``...): each metric's mean over the records that hold it and its 95% interval,
#: on the metric's own scale
FIDELITY_PREFIXES = {"gold": "", "greedy": "greedy_"}
FIDELITY = [f"{prefix}{m}{part}" for prefix in FIDELITY_PREFIXES.values() for m in FIDELITY_METRICS
            for part in ("", "_ci_low", "_ci_high")]
COLUMNS = [
    "model", "method", "variant", "method_params", "setting", "row", "column", "nominal_ratio", "budget",
    "measured_ratio", "task", "suite", "task_groups", "task_params", "metric", "score", "ci_low", "ci_high",
    "baseline_score", "retention", *VS_FULL, "n", "n_expected", "complete", "state", "status", "tokens_held",
    "bytes_held", "bytes_vs_full", "peak_bytes_held", "decode_tokens_per_s", "prefill_s_computed", "prefill_s_reused",
    "decode_s_mean", *GENERATION, *FIDELITY, "metrics", "run_dir", "sample_scores", "baseline_sample_scores",
    "sample_clusters",
]
#: per-sample scores (sample id -> 0..1) of the run and of its baseline, and the run's clusters (sample id ->
#: key, None when unclustered: kvbench.results.sample_clusters): for intervals, not exported
SAMPLE_COLUMNS = ["sample_scores", "baseline_sample_scores", "sample_clusters"]
FLOAT_COLUMNS = [
    "nominal_ratio", "measured_ratio", "score", "ci_low", "ci_high", "baseline_score", *VS_FULL[:4], "retention",
    "tokens_held", "bytes_held", "bytes_vs_full", "peak_bytes_held", "decode_tokens_per_s", "prefill_s_computed",
    "prefill_s_reused", "decode_s_mean", *GENERATION, *FIDELITY,
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
    clusters = sample_clusters(records)
    interval = mean_ci(list(per_sample.values()), clusters and list(clusters.values())).columns() if per_sample else {}
    state = "unscored" if scores is None else "complete" if scores.complete else "partial"
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
        # a reused prefill's time is restoring another ratio's prefill and compressing it: kept apart
        "prefill_s_computed": _mean(r.prefill_s for r in records if not r.prefill_reused),
        "prefill_s_reused": _mean(r.prefill_s for r in records if r.prefill_reused),
        "decode_s_mean": _mean(r.decode_s for r in records),
        "mean_new_tokens": _mean(g.new_tokens for r in records for g in generations(r)),
        "s_per_correct": seconds_per_correct(records, metric) if metric else None,
        **{f"{prefix}{m}{part}": value for over, prefix in FIDELITY_PREFIXES.items()
           for m, summary in (summarize_fidelity(records, over) or {}).items()
           for part, value in zip(("", "_ci_low", "_ci_high"), (summary["mean"], *summary["ci95"]))},
        "metrics": scores.metrics if scores else None,
        "run_dir": str(run.path),
        "sample_scores": per_sample,
        "sample_clusters": clusters,
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


def _clusters(*runs: tuple[dict | None, dict | None]) -> dict[str, Hashable] | None:
    """The clusters of runs of one task compared sample by sample, each run given as its
    (``sample_scores``, ``sample_clusters``): every run's clusters together, a sample no run
    clusters being its own; None when no run is clustered."""
    if all(clusters is None for _, clusters in runs):
        return None
    merged = {i: ("sample", i) for scores, _ in runs for i in scores or {}}
    for _, clusters in runs:
        merged.update(clusters or {})
    return merged


def _add_baselines(rows: list[dict]) -> None:
    """Attach the score and KV bytes of the complete full-cache run with the same model, task and
    task parameters, the retention and bytes relative to it, and (for the other methods) the paired
    comparison with it on the samples both hold (:data:`VS_FULL`, 0-100 scale)."""
    baselines = {_baseline_key(r): r for r in rows if r["method"] == BASELINE_METHOD and r["state"] == "complete"}
    for row in rows:
        base = baselines.get(_baseline_key(row), {})
        row["baseline_score"] = base.get("score")
        row["baseline_sample_scores"] = base.get("sample_scores")
        usable = row["score"] is not None and base.get("score")  # a 0 baseline makes retention undefined
        row["retention"] = 100 * row["score"] / base["score"] if usable else None
        row["bytes_vs_full"] = (row["bytes_held"] / base["bytes_held"]
                                if row["bytes_held"] is not None and base.get("bytes_held") else None)
        row["new_tokens_vs_full"] = (100 * (row["mean_new_tokens"] / base["mean_new_tokens"] - 1)
                                     if row["mean_new_tokens"] is not None and base.get("mean_new_tokens") else None)
        paired = row["method"] != BASELINE_METHOD and row["sample_scores"] and base.get("sample_scores")
        shared = paired and row["sample_scores"].keys() & base["sample_scores"].keys()
        if shared:
            comparison = paired_comparison(base["sample_scores"], row["sample_scores"],
                                           _clusters(*((r["sample_scores"], r["sample_clusters"]) for r in (base, row))))
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
    #: the run's clusters (``sample_clusters``)
    clusters: dict[str, Hashable] | None = None
    #: shown in the cell itself when it is not a complete result: "partial 40/100", "3 of 9 tasks"
    partial: str | None = None


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
    if run.state == "unscored":
        # a job writes scores.json when it ends, so a run without one is still running or its job died
        return [f"unscored: no scores.json, still running or its job died (run.json status '{run.status}', "
                f"{run.n} of {run.n_expected} samples written; `python -m kvbench.score` scores what it holds)"]
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
    partial = None if run.state == "complete" else f"{run.state} {run.n}/{run.n_expected}"
    return Cell(run.score, run.retention, _run_notes(run), rankable=run.state == "complete" and pd.notna(run.score),
                samples=run.sample_scores, half_width=half_width, n=run.n, clusters=run.sample_clusters,
                partial=partial)


def _left_out_reason(runs: pd.DataFrame, task: str) -> str:
    run = runs[runs.task == task]
    if run.empty:
        return "not run"
    run = run.iloc[0]
    return f"partial, {run.n} of {run.n_expected}" if run.state == "partial" else run.state


def _average_cell(runs: pd.DataFrame, tasks: list[str]) -> Cell:
    """Mean score and mean retention over the complete runs among ``tasks``; the score's interval is
    :func:`kvbench.stats.task_mean_ci` over those runs' samples (none where a run lacks them)."""
    complete = runs[(runs.state == "complete") & runs.task.isin(tasks)]
    left_out = [f"{t} ({_left_out_reason(runs, t)})" for t in tasks if t not in set(complete.task)]
    notes = []
    if left_out:
        notes.append(f"mean over {len(tasks) - len(left_out)} of {len(tasks)} tasks; left out: {', '.join(left_out)}")
    no_baseline = list(complete.task[complete.retention.isna()])
    if no_baseline:
        notes.append(f"retention n/a: no usable full-cache baseline for {', '.join(no_baseline)}")
    retention = complete.retention.mean() if not no_baseline else math.nan
    samples = list(complete.sample_scores)
    clusters = [c and [c[i] for i in s] for s, c in zip(samples, complete.sample_clusters)]
    interval = task_mean_ci([list(s.values()) for s in samples], clusters) if samples and all(samples) else None
    return Cell(complete.score.mean(), retention, notes, rankable=not left_out and not complete.empty,
                half_width=(interval.high - interval.low) * 50 if interval else None,
                partial=_coverage(runs, tasks, len(tasks) - len(left_out)) if left_out else None)


def _coverage(runs: pd.DataFrame, tasks: list[str], complete: int) -> str:
    """An average cell's coverage, shown in the cell: "3 of 9 tasks, 2 partial"."""
    partial = int((runs.task.isin(tasks) & (runs.state == "partial")).sum())
    return f"{complete} of {len(tasks)} tasks" + (f", {partial} partial" if partial else "")


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
    ranked = {row: cell for row, cell in column.items() if cell.rankable and cell.samples}
    runs = {row: cell.samples for row, cell in ranked.items()}
    clusters = _clusters(*((cell.samples, cell.clusters) for cell in ranked.values()))
    return set(indistinguishable_from_best(runs, clusters)) if len(runs) > 1 else set()


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
        if entry.partial:
            shown += f" *{entry.partial}*"
        return shown + notes.mark(entry.notes)

    table = markdown_table(["method", *columns], [[r, *(text(r, c) for c in columns)] for r in rows])
    size = _sample_size_note(cells)
    return "\n\n".join(filter(None, [table, notes.markdown(), size]))


def _efficiency_table(runs: pd.DataFrame, tasks: list[str]) -> str:
    """Measured compression and speed per method and setting: means over complete runs."""
    header = ["method", "setting", "tasks", "measured ratio", "KV held (MiB)", "KV held vs full",
              "peak KV (MiB)", "decode tok/s", "prefill s/sample (computed)", "prefill s/sample (reused)",
              "decode s/sample"]
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
                _fmt(done.prefill_s_computed.mean(), ".3f"),
                _fmt(done.prefill_s_reused.mean(), ".3f"),
                _fmt(done.decode_s_mean.mean(), ".3f"),
            ])
    return markdown_table(header, body)


def _fidelity_table(runs: pd.DataFrame) -> str | None:
    """Per method and setting of one task: fidelity to the full cache over the gold answer and over
    the full cache's greedy output, with 95% intervals; None where no run measured it."""
    header = ["method", "setting", "over", "KL(full ‖ compressed), nats", "NLL change, nats", "top-1 agreement, %"]
    body = [[run.row, run.column, label,
             *(_interval_text(scale * getattr(run, f"{prefix}{m}"), scale * getattr(run, f"{prefix}{m}_ci_low"),
                              scale * getattr(run, f"{prefix}{m}_ci_high"), spec)
               for m, scale, spec in (("kl", 1, ".3g"), ("nll_delta", 1, "+.3g"), ("top1_agreement", 100, ".1f")))]
            for run in runs.itertuples()
            for label, prefix in (("gold answer", FIDELITY_PREFIXES["gold"]),
                                  ("greedy output", FIDELITY_PREFIXES["greedy"]))
            if pd.notna(getattr(run, f"{prefix}kl"))]
    if not body:
        return None
    return ("Fidelity to the full cache, teacher-forced over the gold answer and over the full cache's greedy "
            "output (means over samples [95% CI], docs/statistics.md). It measures the cache as the prefill left "
            "it: nothing is evicted while teacher-forcing, so a method that evicts only while decoding reads as "
            "the full cache here:\n\n" + markdown_table(header, body))


def _generation_table(runs: pd.DataFrame) -> str:
    """Per method and setting of one task: the score, the mean output length, its change against
    the full cache (compression can make outputs longer) and the generation time per correct answer."""
    header = ["method", "setting", "score", "output tokens", "vs full", "s per correct answer"]
    body = []
    for row in _ordered(runs, "row", _row_key):
        for column in _ordered(runs, "column", _column_key):
            for run in runs[(runs.row == row) & (runs.column == column)].itertuples():
                change = "–" if pd.isna(run.new_tokens_vs_full) else f"{run.new_tokens_vs_full:+.1f}%"
                body.append([row, column, _fmt(run.score, ".1f"), _fmt(run.mean_new_tokens, ".1f"), change,
                             _fmt(run.s_per_correct, ".2f")])
    return markdown_table(header, body)


# ---------------------------------------------------------------------------------------------
# Markdown documents
# ---------------------------------------------------------------------------------------------

CELL_LEGEND = (
    "Cells: score ±half-width of its 95% interval over samples (Wilson's for 0/1 scores, else a bootstrap; "
    "samples sharing a context are resampled together) (retention = score / score of "
    "the complete full-cache run of the same model, task and task parameters, in %). Averages are means "
    "over complete runs only, each task weighted equally (a ratio column: every task but those compressed "
    "only at a budget; a budget column: the tasks run at it), their interval from resampling every task's "
    "samples; partial and unscored runs are footnoted and left out. "
    "Bold, in per-task tables: the column's best complete run and every run not significantly below it "
    "(paired test on the shared samples, Holm-corrected over the column, p > 0.05); a lone bold cell "
    "beats every other run of its column significantly. Averages are not marked."
)


PREFILL_NOTE = (
    "Prefill time is split by how the prefill ran: \"computed\" samples ran the prefill forward; "
    "\"reused\" samples took the prefill another ratio of the same sweep had computed, so their time is "
    "restoring that state and compressing it, not a forward (docs/performance.md). n/a: no such sample."
)


def _tasks(runs: pd.DataFrame) -> list[str]:
    return _ordered(runs, "task", _task_key)


def _run_counts(runs: pd.DataFrame) -> str:
    counts = runs.state.value_counts()
    return f"{len(runs)} runs (" + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("complete", "partial", "unscored")) + ")"


def _images(paths: Iterable[str]) -> str:
    return " ".join(f"![{Path(p).stem}]({p})" for p in paths)


def _task_about(task_runs: pd.DataFrame) -> str:
    """Suite, groups (if any) and metric of a task, as one line."""
    facts = [("suite", task_runs.suite.iloc[0]),
             *((g.kind, g.name) for g in task_runs.task_groups.iloc[0]),
             ("metric", next(iter(task_runs.metric.dropna()), None))]
    return ", ".join(f"{name} `{value}`" for name, value in facts if isinstance(value, str))


def _kind_tables(runs: pd.DataFrame) -> list[str]:
    """Each task kind's own tables (``Task.tables``) over the complete runs of one model."""
    done = runs[runs.state == "complete"]
    rows, columns = _ordered(done, "row", _row_key), _ordered(done, "column", _column_key)
    parts = []
    for kind in sorted(done.suite.unique()):
        cls = registered().get(kind)
        ordered = sorted(done[done.suite == kind].itertuples(),
                         key=lambda r: (rows.index(r.row), columns.index(r.column), r.task))
        tables = cls.tables([ReportRun(r.row, r.column, r.task, r.metrics) for r in ordered]) if cls else {}
        parts += [f"## {title}\n\n{t.caption}\n\n{markdown_table(t.header, t.rows)}" for title, t in tables.items()]
    return parts


def ratio_tasks(runs: pd.DataFrame) -> list[str]:
    """The tasks the ratio columns (the full cache's 1x among them) average: every task but those
    compressed only at a budget (decode_recall, whose prompt is shorter than any budget), so that a row
    and the full cache average the same tasks and a cell missing some says so."""
    compressed = runs[runs.method != BASELINE_METHOD]
    budget_only = set(compressed.task) - set(compressed.task[compressed.budget.isna()])
    return [task for task in _tasks(runs) if task not in budget_only]


def averages_table(runs: pd.DataFrame) -> str:
    """Score (retention) averaged over tasks: :func:`ratio_tasks` in the ratio columns, the tasks run
    at that budget in a budget column."""
    at_ratios = ratio_tasks(runs)
    tasks = {column: at_ratios if group.budget.isna().all() else _tasks(group)
             for column, group in runs.groupby("column")}
    return _score_table(runs, lambda group: _average_cell(group, tasks[group.column.iloc[0]]))


def average_table(df: pd.DataFrame, model: str) -> str:
    """The model's headline table: :func:`averages_table` over all its tasks."""
    return averages_table(df[df.model == model])


def _auc_section(df: pd.DataFrame, model: str) -> str | None:
    table = retention_auc_table(df, model)
    if table.empty:
        return None
    return ("## Area under the retention curve\n\nThe averaged retention curve's mean height over log2(ratio), "
            "from the full cache at 1x (100%) through each method's ratios, with its 95% paired-bootstrap interval "
            "(docs/statistics.md). Compare only methods swept over the same ratios.\n\n" + _auc_markdown(table))


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
        _auc_section(df, model),
        "## Efficiency\n\nMeans over complete runs (\"tasks\": how many). KV held: bytes after prefill, "
        f"per sample. {PREFILL_NOTE}\n\n{_efficiency_table(runs, tasks)}",
    ]
    groups: set[TaskGroup] = {g for task_groups in runs.task_groups for g in task_groups}
    for group in sorted(groups, key=lambda g: (g.kind, g.rank, g.name)):
        in_group = runs[runs.task_groups.map(lambda task_groups: group in task_groups)]
        group_tasks = _tasks(in_group)
        parts.append(f"## {group.title}\n\nMean over {', '.join(group_tasks)}.\n\n" + averages_table(in_group))
    parts += _kind_tables(runs)
    parts.append("## Per task")
    for task in tasks:
        task_runs = runs[runs.task == task]
        parts += [f"### {task}\n\n{_task_about(task_runs)}\n\n{_score_table(task_runs, _run_cell)}",
                  f"Generation:\n\n{_generation_table(task_runs)}", _fidelity_table(task_runs),
                  _images(images.get(task, []))]
    return "\n\n".join(filter(None, parts)) + "\n"


def index_markdown(df: pd.DataFrame, results_dir: Path, pages: Mapping[str, str],
                   images: Mapping[str, list[str]], exports: list[str], bench_page: str | None = None,
                   generated_by: str | None = None) -> str:
    """LEADERBOARD.md: per model its average table, main figure and a link to its page; then the
    exports and the method-cost benchmark. ``pages`` and ``images`` map a model to relative paths,
    ``exports`` and ``bench_page`` are relative paths. ``generated_by``: the command that writes
    this board, where it is not the report a sweep regenerates in its own results directory."""
    origin = (f"Generated by `{generated_by}` from {_run_counts(df)}." if generated_by else
              f"Generated by `python -m kvbench.report {results_dir}` from {_run_counts(df)}; regenerated at the "
              "end of every sweep (config key `report`).")
    parts = ["# kvbench leaderboard", f"{origin} {CELL_LEGEND}"]
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
    else:
        parts.append("Method cost (time, KV bytes and memory against the full cache): `python scripts/bench_methods.py` "
                     "measures it on your machine (docs/performance.md).")
    return "\n\n".join(filter(None, parts)) + "\n"


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def retention_points(df: pd.DataFrame, model: str, task: str | None = None, intervals: bool = True) -> pd.DataFrame:
    """(row, nominal_ratio, retention, ci_low, ci_high) of a model's compressing methods at nominal
    ratios, for one task or averaged over its :func:`ratio_tasks`; complete runs only, averages only where
    they cover every one of them (the same cells as the tables rank). The interval is :func:`kvbench.stats.retention_ci`
    over the task's (or every task's) samples, NaN where a run lacks per-sample scores (or with
    ``intervals=False``, which skips the bootstrap)."""
    runs = df[(df.model == model) & df.budget.isna() & (df.method != BASELINE_METHOD)]
    tasks = ratio_tasks(df[df.model == model]) if task is None else [task]
    runs = runs[runs.task.isin(tasks)]
    points = []
    for (row, column), group in runs.groupby(["row", "column"], sort=False):
        cell = _average_cell(group, tasks)
        if cell.rankable and pd.notna(cell.retention):
            ratio = group.nominal_ratio.iloc[0]
            paired, clusters = _retention_samples(group, [ratio]) if intervals else (None, [])
            interval = (retention_ci([(ref, [at[0] for at in scores]) for ref, scores in paired], clusters).columns(1)
                        if paired else {})
            points.append({"row": row, "nominal_ratio": ratio, "retention": cell.retention, **interval,
                           "key": (_row_key(group.iloc[0]), _column_key(group.iloc[0]))})
    points.sort(key=lambda p: p["key"])
    return pd.DataFrame(points, columns=["row", "nominal_ratio", "retention", "ci_low", "ci_high"]).astype(
        {"ci_low": float, "ci_high": float})


def _retention_samples(runs: pd.DataFrame, ratios: list[float]) -> tuple[list | None, list]:
    """Per task of ``runs`` (one method row's complete runs): the full cache's per-sample scores and,
    per sample, the run's at each of ``ratios``, on the samples all of them hold, and per task the
    runs' cluster keys of those samples (None: unclustered); (None, []) where a run is missing or
    lacks per-sample scores (or its baseline does)."""
    tasks, clusters = [], []
    for _, task_runs in runs.groupby("task", sort=True):
        by_ratio = {run.nominal_ratio: run for run in task_runs.itertuples()}
        chosen = [by_ratio.get(ratio) for ratio in ratios]
        if any(run is None or not run.sample_scores or not run.baseline_sample_scores for run in chosen):
            return None, []
        base = chosen[0].baseline_sample_scores
        ids = [i for i in base if all(i in run.sample_scores for run in chosen)]
        if not ids:
            return None, []
        tasks.append(([base[i] for i in ids], [[run.sample_scores[i] for run in chosen] for i in ids]))
        keys = _clusters(*((run.sample_scores, run.sample_clusters) for run in chosen))
        clusters.append(keys and [keys[i] for i in ids])
    return tasks or None, clusters


def retention_auc_table(df: pd.DataFrame, model: str) -> pd.DataFrame:
    """Per method row of the averaged retention curve (:func:`retention_points`): the area under it
    from 1x (the full cache, 100%) through the row's ratios, in % of the full cache's score, with its
    95% interval. Both come from :func:`kvbench.stats.retention_auc_ci` on the per-sample scores, so
    the value lies in its interval even where a task's score is not the plain mean of its samples;
    where a run lacks per-sample scores, the area of the plotted points
    (:func:`kvbench.stats.retention_auc`) without interval. ``ratios`` names the range: only rows
    with the same compare."""
    points = retention_points(df, model)
    runs = df[(df.model == model) & (df.state == "complete") & df.budget.isna()]
    rows = []
    for row, line in points.groupby("row", sort=False):
        ratios = [1.0, *line.nominal_ratio]
        paired, clusters = _retention_samples(runs[runs.row == row], ratios[1:])
        if paired:
            # the full cache itself at 1x: retention exactly 100 in every resample
            interval = retention_auc_ci(ratios, [(ref, [[r, *at] for r, at in zip(ref, scores)])
                                                 for ref, scores in paired], clusters)
            values = {"auc": interval.estimate, "ci_low": interval.low, "ci_high": interval.high}
        else:
            values = {"auc": retention_auc(ratios, [100.0, *line.retention])}
        rows.append({"row": row, "ratios": "1-" + "/".join(f"{r:g}" for r in ratios[1:]) + "x", **values})
    return pd.DataFrame(rows, columns=["row", "ratios", "auc", "ci_low", "ci_high"]).astype(
        {"ci_low": float, "ci_high": float})


def _interval_text(value: float, low: float, high: float, spec: str = ".1f") -> str:
    return _fmt(value, spec) + (f" [{low:{spec}}, {high:{spec}}]" if pd.notna(low) else "")


def _auc_markdown(table: pd.DataFrame) -> str:
    body = [[r.row, r.ratios, _interval_text(r.auc, r.ci_low, r.ci_high)] for r in table.itertuples()]
    return markdown_table(["method", "ratios", "AUC, % of full cache [95% CI]"], body)


def _bytes_points(runs: pd.DataFrame) -> pd.DataFrame:
    done = runs[(runs.state == "complete") & runs.bytes_held.notna() & runs.score.notna()]
    return done[["row", "bytes_held", "score", "ci_low", "ci_high"]]


def palette(df: pd.DataFrame) -> plots.Palette:
    """The colours and markers of every figure of a report: one per method row of ``df``."""
    return plots.Palette(df.row, reference=BASELINE_METHOD)


def _write_plots(df: pd.DataFrame, plot_dir: Path, formats: list[str], save: bool = True,
                 per_task: bool = True) -> tuple[dict, list[Path]]:
    """Every figure of every model; returns ({model: {task or None: [figure stems]}}, files).
    ``save=False`` only lists the stems: nothing is drawn or written, and no interval computed (a
    figure's presence does not depend on them). ``per_task=False``: the models' figures only."""
    stems: dict[str, dict[str | None, list[Path]]] = {}
    written: list[Path] = []
    styles = palette(df)

    def draw(model: str, task: str | None, stem: Path, figure: Callable, *args) -> None:
        """``figure(*args)`` is the figure, built only when it is saved."""
        if save:
            written.extend(plots.save(figure(*args), stem, formats))
        stems.setdefault(model, {}).setdefault(task, []).append(stem)

    for model in df.model.unique():
        runs = df[df.model == model]
        points = retention_points(df, model, intervals=save)
        if not points.empty:
            draw(model, None, plot_dir / model / "retention_average",
                 plots.retention_vs_ratio, points, f"{model}: retention averaged over tasks", styles)
        # the area table has a row per method row of the points
        auc = retention_auc_table(df, model) if save else points
        if not auc.empty:
            draw(model, None, plot_dir / model / "retention_auc",
                 plots.retention_auc_bars, auc, f"{model}: area under the retention curve", styles)
        for task in _tasks(runs) if per_task else []:
            task_runs = runs[runs.task == task]
            points = retention_points(df, model, task, intervals=save)
            if not points.empty:
                draw(model, task, plot_dir / model / task / "retention",
                     plots.retention_vs_ratio, points, f"{model} · {task}: retention", styles)
            bytes_points = _bytes_points(task_runs)
            if not bytes_points.empty:
                metric = task_runs.metric.dropna().iloc[0]
                draw(model, task, plot_dir / model / task / BYTES_FIGURE,
                     plots.score_vs_bytes, bytes_points, f"{model} · {task}: score vs KV held", metric, styles)
            for run in task_runs.itertuples():
                task_obj = _task(run.suite, run.task, run.task_params)
                if task_obj is None or not isinstance(run.metrics, dict):
                    continue
                flag = f" (partial: {run.n} of {run.n_expected})" if run.state == "partial" else ""
                title = f"{model} · {task} · {run.row} {run.column}{flag}"
                for name, fig in task_obj.figures(run.metrics, title).items():
                    draw(model, task, plot_dir / model / task / f"{name}_{run.method}_{run.setting}",
                         lambda built: built, fig)
    return stems, written


# ---------------------------------------------------------------------------------------------
# Writing everything
# ---------------------------------------------------------------------------------------------


def _export_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The run table for CSV and Parquet: ``metrics`` (nested, varying keys) as a JSON string, the
    task groups as a JSON list of their titles; the per-sample scores stay in samples.jsonl."""
    return df.drop(columns=SAMPLE_COLUMNS).assign(
        metrics=df.metrics.map(lambda m: json.dumps(m, sort_keys=True) if m is not None else None),
        task_groups=df.task_groups.map(lambda groups: json.dumps([g.title for g in groups])))


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_report(results_dir: str | Path, out_dir: str | Path | None = None,
                 formats: Iterable[str] = FORMATS, generated_by: str | None = None,
                 df: pd.DataFrame | None = None, draw: bool = True, pages: bool = True) -> list[Path]:
    """Write the index, per-model leaderboards, exports and figures (see the module docstring)
    for the runs under ``results_dir`` into ``out_dir`` (default: ``results_dir``); return the
    files written.

    Everything is written into a hidden staging folder in ``out_dir`` first and swapped in when
    complete (:func:`_swap_in`), so a report that fails or is killed leaves the previous one whole.
    Staging folders older than :data:`STALE_STAGING_S` were left by killed reports and are removed.
    What ``formats``
    does not regenerate (say the figures, for ``--format md csv``) is carried over from the previous
    report; what it does regenerate is replaced as a whole, so no figure or page outlives its runs.

    ``generated_by`` is the command the index names (default: the report command, with ``--out``
    where ``out_dir`` is another folder); ``df`` is :func:`collect` of ``results_dir`` where the
    caller has it already. ``draw=False`` writes the pages as ``formats`` say, linking their figures,
    without drawing them (the figures are the slow part); ``pages=False`` writes no per-model page (the
    index links them as ever): both for checking the index in a scratch folder."""
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else results_dir
    if generated_by is None and out != results_dir:
        generated_by = f"python -m kvbench.report {results_dir.as_posix()} --out {out.as_posix()}"
    formats = list(formats)
    df = collect(results_dir) if df is None else df
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(STAGING_PREFIX + "*"):
        if time.time() - stale.stat().st_mtime > STALE_STAGING_S:
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        written = _write_all(df, results_dir, out, staging, formats, generated_by, draw, pages)
        _carry_over(out / REPORT_DIR, staging / REPORT_DIR, formats)
        _swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out / path.relative_to(staging) for path in written]


def _image_format(formats: Iterable[str]) -> str | None:
    """The figure format pages link: PNG where it is written, else SVG, else none."""
    return next((f for f in ("png", "svg") if f in formats), None)


def _write_all(df: pd.DataFrame, results_dir: Path, out: Path, staging: Path, formats: list[str],
               generated_by: str | None, draw: bool, pages: bool) -> list[Path]:
    """The report of ``df`` under ``staging``, laid out (and linked) as it will be under ``out``."""
    report_dir = staging / REPORT_DIR
    written: list[Path] = []
    image_format = _image_format(formats)
    stems: dict = {}
    if image_format:
        stems, files = _write_plots(df, report_dir / "plots", [f for f in formats if f in ("png", "svg")], draw,
                                    pages)
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
        written += _write_markdown(df, results_dir, out, staging, stems, image_format, exports, generated_by, pages)
    return written


#: the hidden folder a report is written into before it is swapped in
STAGING_PREFIX = ".report-"
#: a staging folder untouched for this long (seconds) was left by a killed report: no report runs
#: that long, so removing it cannot disturb one still writing (no lock, which NFS would not honour)
STALE_STAGING_S = 3600


def _regenerated(name: str, formats: list[str]) -> bool:
    """Whether an entry of the report folder is rewritten by a report of ``formats``."""
    if name == "plots":
        return "png" in formats or "svg" in formats
    if name.endswith(".md"):
        return "md" in formats
    return name in {f"results.{fmt}" for fmt in ("csv", "parquet") if fmt in formats}


def _carry_over(previous: Path, new: Path, formats: list[str]) -> None:
    """Copy what this report does not regenerate from the previous report folder into the new one."""
    if not previous.is_dir():
        return
    for entry in previous.iterdir():
        if _regenerated(entry.name, formats):
            continue
        new.mkdir(parents=True, exist_ok=True)
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name)
        else:
            shutil.copy2(entry, new / entry.name)


def _swap_in(staging: Path, out: Path) -> None:
    """Move the staged report into ``out``: the report folder by two renames (the previous one into
    the staging folder, which the caller deletes), then the index by an atomic replace. Readers never
    see a half-written page or a page whose figures are missing, except between the two renames."""
    if (staging / REPORT_DIR).is_dir():
        if (out / REPORT_DIR).exists():
            os.rename(out / REPORT_DIR, staging / "previous")
        os.rename(staging / REPORT_DIR, out / REPORT_DIR)
    if (staging / INDEX).is_file():
        os.replace(staging / INDEX, out / INDEX)


def _write_markdown(df: pd.DataFrame, results_dir: Path, out: Path, staging: Path, stems: Mapping,
                    image_format: str | None, exports: list[Path], generated_by: str | None,
                    write_pages: bool) -> list[Path]:
    report_dir = staging / REPORT_DIR

    def relative(stem: Path, start: Path) -> str:
        return (stem.parent / f"{stem.name}.{image_format}").relative_to(start).as_posix()

    written, pages = [], {}
    for model in sorted(df.model.unique()):
        page = report_dir / f"{model}.md"
        if write_pages:
            images = {task: [relative(s, report_dir) for s in paths] for task, paths in stems.get(model, {}).items()}
            written.append(_write_text(page, leaderboard_markdown(df, model, images)))
        pages[model] = page.relative_to(staging).as_posix()
    index_images = {model: [relative(s, staging) for s in by_task.get(None, [])] for model, by_task in stems.items()}
    export_links = [p.relative_to(staging).as_posix() for p in exports]
    bench = results_dir / BENCH_PAGE
    bench_link = Path(os.path.relpath(bench, out)).as_posix() if bench.is_file() else None
    if bench_link and bench_link.startswith("../"):  # outside the board (scratch results/): a dead link once committed
        bench_link = None
    written.append(_write_text(staging / INDEX, index_markdown(df, results_dir, pages, index_images, export_links,
                                                               bench_link, generated_by)))
    return written


# ---------------------------------------------------------------------------------------------
# Comparing two methods
# ---------------------------------------------------------------------------------------------

#: one paired comparison per model, task (with its parameters) and pair of settings; scores and
#: differences on the 0-100 scale, ``difference`` = B - A
COMPARE_COLUMNS = ["model", "task", "task_params", "a", "b", "a_setting", "b_setting", "n", "a_score", "b_score",
                   "difference", "ci_low", "ci_high", "p", "p_holm", "test", "lost", "gained"]


def select(df: pd.DataFrame, spec: str) -> pd.DataFrame:
    """The runs ``spec`` names: ``METHOD`` (its runs at default parameters, every setting) or
    ``METHOD/SETTING`` (one setting directory name, e.g. ``snapkv/ratio-4``, ``knorm/budget-256``,
    ``lagkv/ratio-4_lag-128``). Unknown names raise ConfigError with the choices."""
    method, _, setting = spec.partition("/")
    if method not in set(df.method):
        raise unknown_name("method in these results", method, set(df.method))
    runs = df[df.method == method]
    if setting:
        if setting not in set(runs.setting):
            raise unknown_name(f"setting of {method} in these results", setting, set(runs.setting))
        return runs[runs.setting == setting]
    default = runs[runs.variant == ""]
    if default.empty:
        raise ConfigError(f"{method} has no runs at its default parameters here; name a setting: "
                          + ", ".join(f"{method}/{s}" for s in sorted(set(runs.setting))))
    return default


def _single_setting(spec: str) -> bool:
    """A side of a comparison that stands for one setting: named with its setting, or the full cache."""
    return "/" in spec or spec == BASELINE_METHOD


def compare(df: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """B against A (:data:`COMPARE_COLUMNS`), run by run, on the samples both hold.

    ``a`` and ``b`` are :func:`select` specs. Runs pair within a model, task and task parameters,
    and at the same compression (nominal ratio or budget), unless a side stands for one setting
    (``METHOD/SETTING``, or ``full``): then its run is compared with each of the other side's runs
    of that model and task. Each pair is :func:`kvbench.stats.paired_comparison` with A as the
    reference (``lost``: samples B scores lower than A); ``p_holm`` is Holm-adjusted over the table.
    Runs without per-sample scores (unscored runs) are left out."""
    runs_a, runs_b = select(df, a), select(df, b)
    by_compression = not (_single_setting(a) or _single_setting(b))

    def key(run: Mapping) -> tuple:
        return (*_baseline_key(run), run["column"] if by_compression else None)

    rows = []
    for run_a in runs_a.to_dict("records"):
        for run_b in runs_b.to_dict("records"):
            if key(run_a) != key(run_b) or not run_a["sample_scores"] or not run_b["sample_scores"]:
                continue
            if not run_a["sample_scores"].keys() & run_b["sample_scores"].keys():
                continue
            pair = paired_comparison(run_a["sample_scores"], run_b["sample_scores"],
                                     _clusters(*((r["sample_scores"], r["sample_clusters"]) for r in (run_a, run_b))))
            shared = [i for i in run_a["sample_scores"] if i in run_b["sample_scores"]]
            rows.append({
                "model": run_a["model"], "task": run_a["task"], "task_params": run_a["task_params"], "a": a, "b": b,
                "a_setting": run_a["setting"], "b_setting": run_b["setting"], "n": pair.n,
                "a_score": 100 * sum(run_a["sample_scores"][i] for i in shared) / len(shared),
                "b_score": 100 * sum(run_b["sample_scores"][i] for i in shared) / len(shared),
                "difference": 100 * pair.diff, "ci_low": 100 * pair.ci_low, "ci_high": 100 * pair.ci_high, "p": pair.p,
                "test": pair.test, "lost": pair.lost, "gained": pair.gained,
            })
    if not rows:
        raise ConfigError(f"{a} and {b} share no model and task (with per-sample scores) to compare"
                          + ("" if not by_compression else " at the same compression"))
    table = pd.DataFrame(rows)
    table["p_holm"] = holm(list(table.p))
    return table[COMPARE_COLUMNS]


def compare_markdown(table: pd.DataFrame) -> str:
    """The comparison table of :func:`compare`, with what its columns mean."""
    a, b = table.a.iloc[0], table.b.iloc[0]
    body = [[r.model, r.task, r.a_setting, r.b_setting, str(r.n), f"{r.a_score:.1f}", f"{r.b_score:.1f}",
             _interval_text(r.difference, r.ci_low, r.ci_high), f"{r.p:.3g}", f"{r.p_holm:.3g}", r.test, str(r.lost),
             str(r.gained)] for r in table.itertuples()]
    header = ["model", "task", f"{a} setting", f"{b} setting", "n", a, b, f"{b} - {a} [95% CI]", "p",
              "p (Holm)", "test", "lost", "gained"]
    return (f"{b} against {a}, sample by sample on the n samples both runs hold (scores: means over those "
            f"samples). lost / gained: samples {b} scores lower / higher than {a}. p: McNemar (0/1 scores) or "
            f"sign-flip; Holm-adjusted over the table's {len(table)} comparison(s).\n\n"
            + markdown_table(header, body))


def write_comparison(results_dir: str | Path, a: str, b: str, out_dir: str | Path | None = None) -> tuple[str, Path]:
    """:func:`compare` the runs under ``results_dir``; write the table as CSV to
    ``out_dir/comparisons/<A>_vs_<B>.csv`` (default ``out_dir``: ``results_dir``); return the
    markdown and the CSV path."""
    table = compare(collect(results_dir), a, b)
    out = Path(out_dir if out_dir is not None else results_dir) / COMPARISONS_DIR
    path = out / f"{a.replace('/', '_')}_vs_{b.replace('/', '_')}.csv"
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, table.to_csv(index=False))
    return compare_markdown(table), path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvbench.report",
                                     description="Leaderboards, plots and table exports from kvbench result files.")
    parser.add_argument("results_dir", nargs="?", default="results", type=Path,
                        help="results directory to read (default: results)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where LEADERBOARD.md and leaderboards/ (or comparisons/) go (default: results_dir)")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS), dest="formats",
                        help="what to write (default: all)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="instead of the report: B against A, sample by sample, for every model, task and "
                             "setting both have; A and B are METHOD (default parameters) or METHOD/SETTING "
                             "(e.g. snapkv/ratio-4); prints a table, writes OUT/comparisons/A_vs_B.csv")
    parser.add_argument("--publish", action="store_true",
                        help="the committed board: also rewrite README.md's leaderboard section and "
                             "docs/reproductions.md (run from the repository root; needs --out), e.g. "
                             "python -m kvbench.report leaderboard/runs --out leaderboard --publish")
    args = parser.parse_args(argv)
    if args.publish:
        if args.out is None or args.compare:
            parser.error("--publish needs --out (the board folder, e.g. leaderboard) and no --compare")
        from kvbench.publish import publish  # it builds on this module

        try:
            written = publish(args.results_dir, args.out, formats=args.formats)
        except ConfigError as err:
            print(f"kvbench.report: {err}", file=sys.stderr)
            return 2
        print(f"kvbench.report: published {len(written)} files from {args.results_dir}")
        return 0
    if not args.results_dir.is_dir():
        parser.error(f"no results directory {args.results_dir}")
    if args.compare:
        try:
            markdown, path = write_comparison(args.results_dir, *args.compare, args.out)
        except ConfigError as err:
            print(f"kvbench.report: {err}", file=sys.stderr)
            return 2
        print(f"{markdown}\n\nwritten: {path}")
        return 0
    written = write_report(args.results_dir, args.out, args.formats)
    index = next((p for p in written if p.name == INDEX), None)
    print(f"kvbench.report: wrote {len(written)} files" + (f"; index: {index}" if index else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
