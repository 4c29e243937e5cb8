"""The published board: everything the repository shows about results, regenerated from the committed
runs by one command, run from the repository root::

    python -m kvbench.report leaderboard/runs --out leaderboard --publish

It writes, from the runs under ``leaderboard/runs/`` only (:func:`publish`):

- ``leaderboard/LEADERBOARD.md`` and ``leaderboard/leaderboards/`` (:func:`kvbench.report.write_report`;
  ``leaderboard/runs/`` itself is only read);
- README.md's leaderboard section, between :data:`BEGIN` and :data:`END`, rewritten in place (the rest
  of the file is kept byte for byte): per model, the score averaged over tasks at each setting
  (:func:`kvbench.report.averages_table`) with its interval and retention, partial cells marked in the
  cell, each task's n and the smallest drop from the full cache detectable at that n, and links to the
  per-task tables and the score vs measured KV bytes figures (Pareto frontier);
- docs/reproductions.md: the source papers' claims (:mod:`kvbench.claims`) with kvbench's figures and
  verdicts, and the GPU experiment's table.

Every output is a function of the runs' files alone: no dates, hosts or timings other than those the
files hold, so regenerating from the same runs gives the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from kvbench import claims, report
from kvbench.errors import ConfigError
from kvbench.results import write_atomic
from kvbench.stats import detectable_drop_unpaired

README = Path("README.md")
REPRODUCTIONS = Path("docs") / "reproductions.md"
BEGIN = "<!-- kvbench:leaderboard -->"
END = "<!-- /kvbench:leaderboard -->"
CPU_EXPERIMENT = "python -m kvbench +experiment=leaderboard_cpu"
GPU_EXPERIMENT = "python -m kvbench +experiment=leaderboard_gpu"


def command(runs_dir: Path, out_dir: Path) -> str:
    return f"python -m kvbench.report {runs_dir.as_posix()} --out {out_dir.as_posix()} --publish"


def replace_block(text: str, block: str, where: str = "README.md") -> str:
    """``text`` with what stands between its :data:`BEGIN` and :data:`END` lines replaced by ``block``;
    everything else is kept as it is. ConfigError unless each marker appears exactly once, in order."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ConfigError(f"{where} needs one '{BEGIN}' line followed by one '{END}' line, where the "
                          "published leaderboard goes")
    head, rest = text.split(BEGIN)
    tail = rest.split(END)[1]
    return f"{head}{BEGIN}\n{block.strip()}\n{END}{tail}"


# ---------------------------------------------------------------------------------------------
# README's leaderboard section
# ---------------------------------------------------------------------------------------------


def _sample_sizes(runs: pd.DataFrame) -> str:
    """Per task, the full cache's n and score and the smallest drop from it detectable at that n."""
    parts = []
    for task in report._ordered(runs, "task", report._task_key):
        full = runs[(runs.task == task) & (runs.method == report.BASELINE_METHOD) & (runs.state == "complete")]
        if full.empty:
            parts.append(f"{task}: no complete full-cache run")
            continue
        n, score = int(full.n.iloc[0]), full.score.iloc[0]
        text = f"{task}: n = {n}, full cache {score:.1f}"
        if 0 < score <= 100:
            drop = detectable_drop_unpaired(n, score / 100)
            text += ", detectable drop " + ("none" if pd.isna(drop) else f"{100 * drop:.1f} points")
        parts.append(text)
    return "; ".join(parts)


def _measured_ratios(runs: pd.DataFrame) -> str:
    """Per compressed column, the range of its complete runs' measured ratios: what a nominal ratio
    really saves on these prompts."""
    done = runs[(runs.state == "complete") & (runs.method != report.BASELINE_METHOD) & runs.measured_ratio.notna()]
    parts = []
    for column in report._ordered(done, "column", report._column_key):
        ratios = done.measured_ratio[done.column == column]
        low, high = f"{ratios.min():.2f}", f"{ratios.max():.2f}"
        parts.append(f"{column}: {low}x" if low == high else f"{column}: {low}-{high}x")
    return "; ".join(parts)


def _figure_links(runs: pd.DataFrame, model: str, plots_link: str, image_format: str) -> str:
    """Links to each task's score vs measured KV bytes figure, where the report draws one."""
    links = [f"[{task}]({plots_link}/{model}/{task}/{report.BYTES_FIGURE}.{image_format})"
             for task in report._ordered(runs, "task", report._task_key)
             if not report._bytes_points(runs[runs.task == task]).empty]
    return " · ".join(links)


def readme_block(df: pd.DataFrame, cmd: str, board_link: str, reproductions_link: str,
                 image_format: str | None = "png") -> str:
    """README.md's leaderboard section for the run table ``df``; ``board_link`` and
    ``reproductions_link``: the board folder and docs/reproductions.md relative to README.md;
    ``image_format``: the figures' format (None: no figure links)."""
    parts = [
        f"Generated by `{cmd}` from the {report._run_counts(df)} committed there; edit nothing between these "
        f"markers. The sweep: `{CPU_EXPERIMENT}`. Full tables: [{board_link}/{report.INDEX}]({board_link}/"
        f"{report.INDEX}); the papers' claims checked against these runs: [{reproductions_link}]({reproductions_link}).",
        "Cells: score ±half-width of its 95% interval (retention against the full cache, %), averaged over "
        "the same tasks in every ratio column (all but those compressed only at a budget) and over the "
        "tasks run at a budget in its column, each task weighted equally. A cell that is not complete says so in "
        "the cell: *k of K tasks* (the average leaves out tasks not complete yet, footnoted), *partial n/N* "
        "(samples). Measured compression: per column, the range over its complete runs of the full cache's KV "
        "bytes over the bytes held after prefill, mean over samples (a budget column's decode-time "
        "compression is not in it); far below the nominal ratio where layers are exempt (Gemma 3's sliding-window "
        "layers, 5 in 6, are never compressed) or a method keeps a fixed part of the prompt (lagkv's sink and "
        "lag windows). Sample sizes: the full cache's n per task and the smallest drop from its "
        "score that a two-proportion test detects at that n (80% power, alpha 0.05; the paired tests of the "
        "per-task pages do better).",
    ]
    if df.empty:
        parts.append("No runs are committed under the runs folder yet.")
    for model in sorted(df.model.unique()):
        runs = df[df.model == model]
        table = report.averages_table(runs)
        page = f"{board_link}/{report.REPORT_DIR}/{model}.md"
        figures = _figure_links(runs, model, f"{board_link}/{report.REPORT_DIR}/plots", image_format) if image_format else ""
        measured = _measured_ratios(runs)
        parts += [f"### {model}", table, *([f"Measured compression: {measured}."] if measured else []),
                  f"Sample sizes: {_sample_sizes(runs)}.",
                  f"Per task, per task group and efficiency: [{page}]({page})."
                  + (f" Score vs measured KV bytes, Pareto frontier: {figures}." if figures else "")]
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------
# docs/reproductions.md
# ---------------------------------------------------------------------------------------------


def _verdict_row(v: claims.Verdict) -> list[str]:
    verdict = f"{v.verdict} = {v.n}" if v.verdict == claims.INCONCLUSIVE and v.n else v.verdict
    return [v.model, v.cells, v.figure, "–" if v.n is None else str(v.n), verdict + (f": {v.why}" if v.why else "")]


def reproductions_markdown(df: pd.DataFrame, cmd: str) -> str:
    """docs/reproductions.md for the run table ``df``."""
    parts = [
        "# Reproductions",
        f"Generated by `{cmd}` from the runs committed under the board's runs folder; do not edit (the claims "
        "are data in `kvbench/claims.py`). Each row is one claim of a source paper on one model: the paper's "
        "own figure and where it stands, the board cells kvbench reads, kvbench's figure with its 95% "
        f"interval and n (samples), and a verdict by the rules below. The CPU sweep: `{CPU_EXPERIMENT}` "
        f"(models {', '.join(claims.CPU_MODELS)}; tasks {', '.join(claims.CPU_TASKS)}; every method at ratios "
        f"2, 4, 8 and {claims.BUDGET}).",
        "## Verdicts",
        report.markdown_table(["verdict", "rule"], [[k, v] for k, v in claims.VERDICT_RULES.items()]),
        "Intervals: differences are method - rival in points, paired by sample id (kvbench.stats.paired_comparison: "
        "bootstrap interval; p from McNemar or sign-flip, shown, not used); retention is against the complete "
        "full-cache run, paired by sample id, the mean over the claim's tasks (kvbench.stats.retention_ci). Each "
        "claim is judged at its own 95% level, with no correction across claims. A claim's direction is tested, "
        "not the paper's margin: the paper's figure stands next to kvbench's for that.",
    ]
    # one table per claim of a paper; claims that share their text and figure (the same claim on other
    # tasks or settings) share it
    tables: dict[str, dict[tuple[str, str], list[list[str]]]] = {}
    verdicts = []
    for claim in claims.CLAIMS:
        for v in claims.evaluate(df, claim):
            key = (claim.claim, claim.paper_figure, claim.note)
            tables.setdefault(claim.paper, {}).setdefault(key, []).append(_verdict_row(v))
            verdicts.append(v.verdict)
    header = ["model", "cells read", "kvbench [95% CI]", "n", "verdict"]
    parts.append("Verdicts now: " + ", ".join(f"{verdicts.count(v)} {v}" for v in claims.VERDICT_RULES) + ".")
    for paper, by_claim in tables.items():
        parts.append(f"## {paper}")
        for (claim, figure, note), body in by_claim.items():
            parts += [f"**Claim:** {claim}. **Paper:** {figure}." + (f" **kvbench:** {note}." if note else ""),
                      report.markdown_table(header, body)]
    parts.append("## Sample sizes\n\nPer model and task, the full cache's n and score and the smallest drop from it "
                 "that a two-proportion test detects at that n (80% power, alpha 0.05); the paired tests above detect "
                 "smaller ones (docs/statistics.md).")
    parts += [f"- {model}: {_sample_sizes(df[df.model == model])}." for model in sorted(df.model.unique())] or [
        "No runs yet."]
    parts += [
        "## On GPUs: hub models",
        f"The same experiment on the papers' models, Llama-3.1-8B-Instruct and Qwen2.5-7B-Instruct, on LongBench, "
        f"RULER at 4k tokens and the 64-digit passkey at 2k-24k tokens: `{GPU_EXPERIMENT}`, then `{cmd}` as above. "
        "The papers' numbers stand next to where kvbench's go; a kvbench figure is the mean score over the complete "
        "runs of those cells (how many tasks when a suite), \"not run yet\" until they are committed. kvbench's "
        "LongBench figure averages the tasks the experiment runs; the paper's average is over its own selection. The "
        "experiment runs lagkv at its default lag of 1024, the paper's headline setting, which compresses prompts "
        "this long. RULER at 4k has no paper number in kvbench's notes: its scores are on the board's per-model pages.",
        report.markdown_table(
            ["source", "setting", *(f"paper, {m}" for m in claims.GPU_MODELS), *(f"kvbench, {m}" for m in claims.GPU_MODELS)],
            [[row.source, row.what, *row.paper, *(claims.gpu_figure(df, m, row) for m in claims.GPU_MODELS)]
             for row in claims.GPU_ROWS]),
    ]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def publish(runs_dir: str | Path, out_dir: str | Path, readme: str | Path = README,
            reproductions: str | Path = REPRODUCTIONS, formats: Iterable[str] = report.FORMATS,
            draw: bool = True, pages: bool = True) -> list[Path]:
    """Regenerate the board in ``out_dir``, README's leaderboard section and docs/reproductions.md
    from the runs under ``runs_dir``; return the files written. Paths are taken as given (relative
    ones from the working directory: run it from the repository root), and the commands and links
    written are built from them. Nothing is written unless the runs folder exists and README holds
    the section's markers. ``draw=False``: the figures are linked, not drawn; ``pages=False``: no
    per-model page is written (:func:`kvbench.report.write_report`; both for checks in a scratch folder)."""
    runs_dir, out_dir, readme, reproductions = map(Path, (runs_dir, out_dir, readme, reproductions))
    formats = list(formats)
    if not runs_dir.is_dir():
        raise ConfigError(f"no runs folder {runs_dir}: --publish reads the committed runs (e.g. leaderboard/runs)")
    readme_text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    replace_block(readme_text, "", str(readme))  # check the markers before anything is written
    cmd = command(runs_dir, out_dir)
    df = report.collect(runs_dir)
    written = report.write_report(runs_dir, out_dir, formats, generated_by=cmd, df=df, draw=draw, pages=pages)
    def link(path: Path) -> str:
        return Path(os.path.relpath(path, readme.parent)).as_posix()

    block = readme_block(df, cmd, link(out_dir), link(reproductions), report._image_format(formats))
    write_atomic(readme, replace_block(readme_text, block, str(readme)))
    reproductions.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(reproductions, reproductions_markdown(df, cmd))
    return [*written, readme, reproductions]
