"""kvbench.report on synthetic results directories written here with the runner's schema."""

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from conftest import run_info, sample_record
from omegaconf import OmegaConf

from kvbench import plots, report
from kvbench.results import KVStats, KVUsage, RunDir, RunScores
from kvbench.summary import SweepSummary

PASSKEY_PARAMS = {"compress": "whole", "depths": [0.0, 1.0], "lengths": [512, 1024], "metric": "exact_match"}
LONGBENCH_PARAMS = {"variant": "v1", "compress": "whole", "limit": None, "seed": 42, "revision": "main"}
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"


def write_run(root: Path, model="m", task="passkey", method="full", ratio=1, budget=None, variant="",
              score=80.0, n=4, n_expected=4, kind="passkey", task_params=None, scores=True,
              bytes_held=1000.0, cells=None) -> Path:
    """A results directory as kvbench.runner writes it; ``scores=False`` leaves a killed run."""
    compression = f"budget-{budget}" if budget is not None else f"ratio-{ratio:g}"
    setting = "_".join(filter(None, [compression, variant]))
    run = RunDir(root / model / task / method / setting)
    status = "complete" if n == n_expected else "partial" if scores else "running"
    run.write_run(run_info({"name": task, "kind": kind, "params": task_params or PASSKEY_PARAMS}, model=model,
                           method=method, params={"lag": 128} if variant else {},
                           ratio=None if budget is not None else ratio, budget=budget, label=setting,
                           n_expected=n_expected, status=status))
    stats = KVStats(bytes_full=4000, bytes_held=int(bytes_held), ratio=ratio or 2.0, tokens_held=100.0,
                    tokens_per_layer=[100.0])
    for i in range(n):
        run.append(sample_record(f"s{i}", kv=KVUsage(after_prefill=stats, at_end=stats, peak_bytes_held=int(bytes_held),
                                                      peak_bytes_in_step=4000)))
    if scores:
        metrics = {"exact_match": score, **({"cells": cells} if cells else {})}
        run.write_scores(RunScores(
            task=task, metric="exact_match", score=score, metrics=metrics, n=n, n_expected=n_expected,
            complete=n == n_expected, measured_ratio=ratio or 2.0, tokens_held=100.0, bytes_held=bytes_held,
            peak_bytes_held=bytes_held, decode_tokens_per_s=16.0))
    return run.path


def run_of(df: pd.DataFrame, **where) -> pd.Series:
    match = df
    for column, value in where.items():
        match = match[match[column] == value]
    assert len(match) == 1, where
    return match.iloc[0]


def table_blocks(markdown: str) -> list[list[str]]:
    """The markdown tables of a document, as lists of their lines."""
    blocks, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    return blocks


def cells_of(line: str) -> list[str]:
    assert line.startswith("| ") and line.endswith(" |"), line
    return [c.strip() for c in re.split(r"(?<!\\)\|", line[1:-1])]


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Two models with different full-cache scores; two methods, a variant, ratios and a budget;
    a partial and an unscored run; passkey depth x length cells."""
    cells = {"512/0": {"exact_match": 100.0}, "512/1": {"exact_match": 0.0}, "1024/0": {"exact_match": 50.0}}
    write_run(tmp_path, model="a", score=80.0, bytes_held=4000.0, cells=cells)
    write_run(tmp_path, model="b", score=40.0)
    for model in ("a", "b"):
        write_run(tmp_path, model=model, method="zeta", ratio=2, score=40.0, bytes_held=2000.0, cells=cells)
    write_run(tmp_path, model="a", method="zeta", ratio=16, score=20.0, bytes_held=250.0)
    write_run(tmp_path, model="a", method="alpha", ratio=2, score=60.0, bytes_held=2000.0)
    write_run(tmp_path, model="a", method="alpha", ratio=2, variant="lag-128", score=70.0)
    write_run(tmp_path, model="a", method="alpha", budget=256, score=10.0)
    # second task: zeta complete; alpha partial at 2x, unscored (killed, no scores.json) at 16x
    write_run(tmp_path, model="a", task="passkey_long", score=50.0)
    write_run(tmp_path, model="a", task="passkey_long", method="zeta", ratio=2, score=25.0)
    write_run(tmp_path, model="a", task="passkey_long", method="alpha", ratio=2, score=45.0, n=2)
    write_run(tmp_path, model="a", task="passkey_long", method="alpha", ratio=16, scores=False, n=1)
    return tmp_path


def test_collect_one_row_per_run_with_run_facts(sweep):
    df = report.collect(sweep)
    assert len(df) == 12
    run = run_of(df, model="a", task="passkey", method="zeta", setting="ratio-2")
    assert (run.nominal_ratio, run.measured_ratio, run.suite, run.metric, run.n, run.n_expected) == (
        2, 2, "passkey", "exact_match", 4, 4)
    assert (run.prefill_s_computed, run.decode_s_mean, run.bytes_vs_full) == (0.5, 0.25, 0.5)
    assert pd.isna(run.prefill_s_reused)  # no record reused a prefill
    assert run.run_dir == str(sweep / "a" / "passkey" / "zeta" / "ratio-2")
    budget = run_of(df, method="alpha", setting="budget-256")
    assert budget.budget == 256 and pd.isna(budget.nominal_ratio) and budget.column == "budget 256"
    assert run_of(df, setting="ratio-2_lag-128").row == "alpha lag-128"


def test_retention_against_the_same_models_and_tasks_full_cache(sweep):
    df = report.collect(sweep)
    # the same 40.0 is 50% of model a's full cache (80) and 100% of model b's (40)
    assert run_of(df, model="a", task="passkey", method="zeta", setting="ratio-2").retention == 50.0
    assert run_of(df, model="b", task="passkey", method="zeta", setting="ratio-2").retention == 100.0
    # and 50% of model a's other task (full 50)
    assert run_of(df, model="a", task="passkey_long", method="zeta").retention == 50.0
    assert run_of(df, model="a", task="passkey", method="full").retention == 100.0


def test_other_task_parameters_have_no_baseline(tmp_path):
    write_run(tmp_path, score=80.0)
    write_run(tmp_path, method="zeta", ratio=2, score=40.0, task_params={**PASSKEY_PARAMS, "lengths": [4096]})
    df = report.collect(tmp_path)
    assert pd.isna(run_of(df, method="zeta").retention)
    markdown = report.leaderboard_markdown(df, "m")
    assert "40.0 ±24 (n/a) [1]" in markdown  # 4 of 4 records right: Wilson's [51.0, 100]
    assert "[1] retention n/a: no complete full-cache run with the same task parameters" in markdown


def test_missing_baseline_is_na_with_a_note_not_a_crash(tmp_path):
    write_run(tmp_path, method="zeta", ratio=2, score=40.0)
    write_run(tmp_path, method="zeta", ratio=4, score=30.0)
    df = report.collect(tmp_path)
    assert df.retention.isna().all()
    markdown = report.leaderboard_markdown(df, "m")
    assert "40.0 ±24 (n/a)" in markdown and "no usable full-cache baseline for passkey" in markdown
    written = report.write_report(tmp_path)
    assert (tmp_path / "LEADERBOARD.md") in written
    assert report.retention_points(df, "m").empty


def test_partial_and_unscored_runs_are_flagged_and_left_out_of_averages(sweep):
    df = report.collect(sweep)
    partial = run_of(df, task="passkey_long", method="alpha", setting="ratio-2")
    unscored = run_of(df, task="passkey_long", method="alpha", setting="ratio-16")
    assert (partial.state, partial.complete, partial.n, partial.n_expected) == ("partial", False, 2, 4)
    assert (unscored.state, unscored.status, unscored.n) == ("unscored", "running", 1)
    markdown = report.leaderboard_markdown(df, "a")
    assert "partial: 2 of 4 samples, left out of averages" in markdown
    assert "unscored: no scores.json, still running or its job died (run.json status 'running', 1 of 4" in markdown
    average = table_blocks(markdown)[0]
    alpha = cells_of(next(line for line in average if line.startswith("| alpha |")))
    # alpha 2x: only the complete passkey run (60 = 75% of 80) counts, marked in the cell, footnoted, not bold
    assert alpha[2].startswith("60.0 ±24 (75.0%) *1 of 2 tasks, 1 partial* [")  # one task: its own interval
    per_task = table_blocks(markdown.split("### passkey_long")[1])[0]
    assert "*partial 2/4*" in next(line for line in per_task if line.startswith("| alpha |"))
    assert "mean over 1 of 2 tasks; left out: passkey_long (partial, 2 of 4)" in markdown
    assert "passkey_long (unscored)" in markdown and "passkey_long (not run)" in markdown
    # zeta 2x covers both tasks (mean of 40 and 25, of 50% and 50%); the only such cell of its
    # column, so there is nothing to bold
    zeta = cells_of(next(line for line in average if line.startswith("| zeta |")))
    assert zeta[2] == "32.5 ±0 (50.0%)"  # every record scores 1: no spread for the stratified bootstrap


def test_a_task_compressed_only_at_a_budget_stays_out_of_the_ratio_columns(tmp_path):
    # recall: the full cache at 1x and a method at a budget only, as for a prompt shorter than any budget
    write_run(tmp_path, score=80.0)
    write_run(tmp_path, method="zeta", ratio=2, score=40.0)
    write_run(tmp_path, task="recall", score=100.0)
    write_run(tmp_path, task="recall", method="zeta", budget=8, score=50.0)
    df = report.collect(tmp_path)
    assert report.ratio_tasks(df) == ["passkey"]
    average = table_blocks(report.average_table(df, "m"))[0]
    assert cells_of(average[0]) == ["method", "1x", "2x", "budget 8"]
    # the full cache's 1x averages what the 2x column averages (passkey alone), not recall's 100
    assert cells_of(average[2])[1].startswith("80.0 ")
    zeta = cells_of(average[3])
    assert zeta[2].startswith("40.0 ") and zeta[2].endswith("(50.0%)")  # complete: no task left out
    assert zeta[3].startswith("50.0 ") and zeta[3].endswith("(50.0%)")
    assert report.retention_points(df, "m")[["row", "retention"]].to_dict("records") == [
        {"row": "zeta", "retention": 50.0}]
    # once the method runs recall at a ratio too, recall joins the ratio columns, missing where not run
    write_run(tmp_path, task="recall", method="zeta", ratio=4, score=50.0)
    df = report.collect(tmp_path)
    assert report.ratio_tasks(df) == ["passkey", "recall"]
    assert "left out: recall (not run)" in report.average_table(df, "m")


def test_rows_and_columns_in_a_stable_order(sweep):
    markdown = report.leaderboard_markdown(report.collect(sweep), "a")
    table = table_blocks(markdown)[0]
    assert cells_of(table[0]) == ["method", "1x", "2x", "16x", "budget 256"]
    assert [cells_of(line)[0] for line in table[2:]] == ["full", "alpha", "alpha lag-128", "zeta"]
    tasks = re.findall(r"^### (.+)$", markdown, flags=re.M)
    assert tasks == ["passkey", "passkey_long"]


def test_runs_no_test_tells_apart_from_the_best_are_all_bold(sweep):
    # every record of the sweep scores 1: the scores differ (scores.json) but no sample does; 4 of 4 right
    # is Wilson's [51.0, 100], +-24
    markdown = report.leaderboard_markdown(report.collect(sweep), "a")
    passkey = table_blocks(markdown[markdown.index("### passkey"):])[0]
    column = [cells_of(line)[2] for line in passkey[2:]]  # 2x: full, alpha, alpha lag-128, zeta
    assert column == ["–", "**60.0 ±24 (75.0%)**", "**70.0 ±24 (87.5%)**", "**40.0 ±24 (50.0%)**"]


def test_markdown_tables_are_well_formed(sweep):
    df = report.collect(sweep)
    for markdown in [report.leaderboard_markdown(df, model) for model in ("a", "b")] + [
            report.index_markdown(df, sweep, {}, {}, [])]:
        blocks = table_blocks(markdown)
        assert blocks
        for block in blocks:
            width = len(cells_of(block[0]))
            assert all(re.fullmatch(r":?-{3,}:?", c) for c in cells_of(block[1])), block[1]
            assert all(len(cells_of(line)) == width for line in block), block


def test_task_groups_get_tables_of_their_own(tmp_path):
    # the groups are the task's (LongBench: categories), rebuilt from each run's identity
    for task in ("narrativeqa", "qasper", "hotpotqa_e"):
        params = {**LONGBENCH_PARAMS, "tasks": [task.removesuffix("_e")], "variant": "e" if task.endswith("_e") else "v1"}
        write_run(tmp_path, task=task, kind="longbench", score=30.0, task_params=params)
        write_run(tmp_path, task=task, kind="longbench", method="zeta", ratio=4, score=15.0, task_params=params)
    df = report.collect(tmp_path)
    assert {task: [g.title for g in groups] for task, groups in zip(df.task, df.task_groups)} == {
        "narrativeqa": ["LongBench category: single-doc QA"], "qasper": ["LongBench category: single-doc QA"],
        "hotpotqa_e": ["LongBench category: multi-doc QA"]}
    markdown = report.leaderboard_markdown(df, "m")
    assert markdown.index("## LongBench category: single-doc QA") < markdown.index(
        "## LongBench category: multi-doc QA")
    assert "Mean over narrativeqa, qasper." in markdown
    assert "suite `longbench`, LongBench category `single-doc QA`, metric `exact_match`" in markdown
    exported = pd.read_csv(report.write_report(tmp_path, formats=["csv"])[0])
    groups = dict(zip(exported.task, exported.task_groups.map(json.loads)))
    assert groups["hotpotqa_e"] == ["LongBench category: multi-doc QA"]


def test_a_task_kind_this_kvbench_lacks_is_reported_without_groups_or_figures(tmp_path, caplog):
    write_run(tmp_path, kind="gone", cells={"512/0": {"exact_match": 100.0}})
    df = report.collect(tmp_path)
    assert run_of(df, suite="gone").task_groups == ()
    assert "unknown task kind 'gone'" in caplog.text
    written = report.write_report(tmp_path, formats=["md", "png"])
    assert not [p for p in written if p.name.startswith("passkey_")]


def legend_labels(fig) -> list[str]:
    return [text.get_text() for text in fig.legends[0].get_texts()]


def data_lines(fig) -> dict:
    """label -> the Line2D through the points of each series drawn with error bars."""
    return {bars.get_label(): bars.lines[0] for bars in fig.axes[0].containers}


def test_retention_figure_has_one_line_per_method_and_labelled_axes(sweep):
    df = report.collect(sweep)
    fig = plots.retention_vs_ratio(report.retention_points(df, "a", "passkey"), "a: passkey")
    ax = fig.axes[0]
    assert legend_labels(fig) == [plots.FULL_CACHE_LABEL, "alpha", "alpha lag-128", "zeta"]
    zeta = data_lines(fig)["zeta"]
    # zeta, the last of three methods, is dodged right of the true ratios by one step
    offset = 2 ** plots.DODGE_STEP
    assert list(zeta.get_xdata()) == pytest.approx([2 * offset, 16 * offset]) and list(zeta.get_ydata()) == [50.0, 25.0]
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["2x", "16x"]
    assert "compression ratio" in ax.get_xlabel() and "retention" in ax.get_ylabel()
    # averaged: only settings complete on every task (zeta 2x); alpha has none
    average = report.retention_points(df, "a")
    assert average[["row", "nominal_ratio", "retention"]].to_dict("records") == [
        {"row": "zeta", "nominal_ratio": 2.0, "retention": 50.0}]


def many_methods(root: Path, count: int = 15, score: float = 0.0) -> list[str]:
    """A full cache and ``count`` methods at 2x and 4x, every run scoring ``score``."""
    names = [f"method{i:02d}" for i in range(count)]
    write_run(root, score=80.0)
    for name in names:
        for ratio in (2, 4):
            write_run(root, method=name, ratio=ratio, score=score, bytes_held=4000 / ratio)
    return names


def test_every_figure_gives_a_method_the_same_distinct_colour_and_marker(tmp_path):
    names = many_methods(tmp_path)
    df = report.collect(tmp_path)
    palette = report.palette(df)
    retention = data_lines(plots.retention_vs_ratio(report.retention_points(df, "m", "passkey"), "r", palette))
    pareto = data_lines(plots.score_vs_bytes(report._bytes_points(df), "s", "exact_match", palette))
    for figure in (retention, pareto):
        assert {name: (line.get_color(), line.get_marker(), line.get_linestyle()) for name, line in figure.items()
                if name in names} == {name: (palette[name].color, palette[name].marker, palette[name].linestyle)
                                      for name in names}
    styles = {(palette[name].color, palette[name].marker) for name in names}
    assert len(styles) == 15
    assert len({palette[name].color for name in names}) == len(plots.COLORS)  # every colour before any repeats
    assert pareto["full"].get_color() == plots.REFERENCE_STYLE_COLOR
    # a style comes from the name, not from a position: alone, two names get different colours, and
    # together (free colours) each keeps its own
    first, last = (plots.Palette([name])[name] for name in (names[0], names[-1]))
    assert first.color != last.color
    assert plots.Palette([names[0], names[-1]])[names[-1]] == last
    with pytest.raises(KeyError, match="not in this palette"):
        palette["unknown"]


def test_identical_lines_stay_visible(tmp_path):
    many_methods(tmp_path, count=2, score=40.0)  # both methods score the same at every ratio
    df = report.collect(tmp_path)
    lines = data_lines(plots.retention_vs_ratio(report.retention_points(df, "m", "passkey"), "r"))
    first, second = lines["method00"], lines["method01"]
    assert list(first.get_ydata()) == list(second.get_ydata())
    assert all(a < b for a, b in zip(first.get_xdata(), second.get_xdata()))  # dodged apart


def test_legend_is_outside_the_data(tmp_path):
    many_methods(tmp_path, count=4, score=40.0)
    df = report.collect(tmp_path)
    for fig in (plots.retention_vs_ratio(report.retention_points(df, "m", "passkey"), "r"),
                plots.score_vs_bytes(report._bytes_points(df), "s", "exact_match")):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legend, axes = fig.legends[0].get_window_extent(renderer), fig.axes[0].get_window_extent(renderer)
        assert legend.x0 >= axes.x1, (legend, axes)


def test_constant_data_gets_the_score_scale_not_a_sliver(tmp_path):
    many_methods(tmp_path, count=2, score=0.0)
    df = report.collect(tmp_path)
    bottom, top = plots.score_vs_bytes(report._bytes_points(df[df.method != "full"]), "s", "exact_match").axes[0].get_ylim()
    assert bottom == 0 and top >= 100
    points = report.retention_points(df, "m", "passkey")
    assert (points.retention == 0).all()
    bottom, top = plots.retention_vs_ratio(points, "r").axes[0].get_ylim()
    assert bottom == 0 and top >= 110


def test_heatmap_uses_a_colour_blind_safe_map():
    fig = plots.heatmap([[0.0, 100.0]], [512, 1024], [0.5], "length", "depth", "exact_match", "t")
    image = fig.axes[0].get_images()[0]
    assert image.get_cmap().name == plots.HEATMAP_CMAP == "cividis"
    # the cell text stays readable: white on the dark end, black on the light end
    assert [text.get_color() for text in fig.axes[0].texts] == ["white", "black"]


def test_write_report_writes_linked_tables_exports_and_figures(sweep):
    written = report.write_report(sweep, formats=["md", "csv", "parquet", "png", "svg"])
    assert all(path.is_file() for path in written)
    out = sweep / report.REPORT_DIR
    assert {out / "a.md", out / "b.md", out / "results.csv", out / "results.parquet",
            sweep / report.INDEX} <= set(written)
    assert out / "plots" / "a" / "passkey" / "passkey_zeta_ratio-2.png" in written
    assert out / "plots" / "a" / "retention_average.svg" in written
    assert len(pd.read_parquet(out / "results.parquet")) == len(pd.read_csv(out / "results.csv")) == 12
    for page in (sweep / report.INDEX, out / "a.md"):
        for link in re.findall(r"\]\(([^)]+)\)", page.read_text()):
            assert (page.parent / link).is_file(), (page, link)


def test_cli_writes_to_out_dir(sweep, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    assert report.main([str(sweep), "--out", str(out), "--format", "md"]) == 0
    assert (out / report.INDEX).is_file() and (out / report.REPORT_DIR / "a.md").is_file()
    assert not (sweep / report.INDEX).exists()
    assert "LEADERBOARD.md" in capsys.readouterr().out


def report_files(root: Path) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and (p.name == report.INDEX or report.REPORT_DIR in p.parts)}


def test_a_failing_report_leaves_the_previous_one_whole(sweep, monkeypatch):
    report.write_report(sweep, formats=["md", "csv", "png"])
    before = report_files(sweep)
    write_run(sweep, model="a", method="beta", ratio=2, score=30.0)  # a new run the next report would add

    def broken(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(plots, "score_vs_bytes", broken)
    with pytest.raises(RuntimeError, match="plotting failed"):
        report.write_report(sweep, formats=["md", "csv", "png"])
    assert report_files(sweep) == before
    assert not list(sweep.glob(report.STAGING_PREFIX + "*"))  # no staging folder left behind


def test_a_killed_reports_staging_folder_is_removed_by_a_later_report(sweep):
    killed, running = sweep / f"{report.STAGING_PREFIX}killed", sweep / f"{report.STAGING_PREFIX}running"
    for folder in (killed, running):
        (folder / report.REPORT_DIR).mkdir(parents=True)
        (folder / report.INDEX).write_text("half a report")
    stale = time.time() - report.STALE_STAGING_S - 60
    os.utime(killed, (stale, stale))
    report.write_report(sweep, formats=["md"])
    assert not killed.exists() and "half a report" not in (sweep / report.INDEX).read_text()
    assert (running / report.INDEX).is_file()  # possibly another report's, still writing


def test_a_partial_format_report_keeps_what_it_does_not_rewrite(sweep):
    report.write_report(sweep, formats=["md", "csv", "png"])
    figure = sweep / report.REPORT_DIR / "plots" / "a" / "retention_average.png"
    written = report.write_report(sweep, formats=["md"])
    assert figure.is_file() and (sweep / report.REPORT_DIR / "results.csv").is_file()
    assert figure not in written and all(path.is_file() for path in written)
    # the figures are regenerated as a whole: one whose run is gone disappears; the pages stay
    run_figure = sweep / report.REPORT_DIR / "plots" / "a" / "passkey" / "passkey_zeta_ratio-2.png"
    assert run_figure.is_file()
    shutil.rmtree(sweep / "a" / "passkey" / "zeta" / "ratio-2")
    report.write_report(sweep, formats=["png"])
    assert (run_figure.parent / "score_vs_kv_bytes.png").is_file() and not run_figure.exists()
    assert (sweep / report.REPORT_DIR / "a.md").is_file() and (sweep / report.INDEX).is_file()


def test_reused_prefills_are_timed_apart_from_computed_ones(tmp_path):
    write_run(tmp_path)
    run = RunDir(write_run(tmp_path, method="zeta", ratio=4, n=0, n_expected=4, scores=False))
    for i, (reused, seconds) in enumerate([(False, 8.0), (True, 0.5), (True, 0.7), (False, 10.0)]):
        run.append(sample_record(f"s{i}", prefill_reused=reused, prefill_s=seconds))
    df = report.collect(tmp_path)
    zeta = run_of(df, method="zeta")
    assert (zeta.prefill_s_computed, zeta.prefill_s_reused) == (9.0, pytest.approx(0.6))
    page = report.leaderboard_markdown(df, "m")
    efficiency = next(block for block in table_blocks(page) if "prefill s/sample (reused)" in block[0])
    header = cells_of(efficiency[0])
    assert header[-3:] == ["prefill s/sample (computed)", "prefill s/sample (reused)", "decode s/sample"]
    full = cells_of(efficiency[2])
    assert full[0] == "full" and full[-3:-1] == ["0.500", "n/a"]
    assert report.PREFILL_NOTE in page


def test_sweep_end_regenerates_the_report_and_survives_failures(tmp_path, monkeypatch, caplog):
    write_run(tmp_path)
    config = OmegaConf.create({"results_dir": str(tmp_path), "report": True})
    summary = SweepSummary()
    summary.rows = {"dir": {}}  # a job has finished
    summary._print = lambda rows, config: None
    summary.on_multirun_end(config)
    assert (tmp_path / report.INDEX).is_file()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "write_report", broken)
    summary.on_run_end(config)
    assert "could not regenerate the report" in caplog.text and "disk full" in caplog.text


def test_notebook_executes(sweep, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    # a kernelspec naming this interpreter, so the kernel is the venv's whatever kernels are installed
    spec_dir = tmp_path / "jupyter" / "kernels" / "kvbench-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "kvbench test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("KVBENCH_RESULTS", str(sweep))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells), "the notebook is stored without outputs"
    NotebookClient(nb, kernel_name="kvbench-test", timeout=120,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # one figure per model
