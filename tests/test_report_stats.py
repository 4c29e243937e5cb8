"""Intervals and paired comparisons in scores.json, the run table and the leaderboards."""

import dataclasses
import itertools
import json
import shutil

import pandas as pd
import pytest
from conftest import run_info, sample_record

from kvbench import plots, report
from kvbench.errors import ConfigError
from kvbench.results import RunDir, RunScores, find_runs, sample_scores
from kvbench.runner import summarize_run
from kvbench.stats import (
    bootstrap_ci,
    detectable_drop_unpaired,
    mean_ci,
    paired_comparison,
    retention_auc,
    retention_auc_ci,
    retention_ci,
)
from kvbench.tasks import task_from_identity

PASSKEY = {"name": "passkey", "kind": "passkey",
           "params": {"compress": "whole", "depths": [0.0, 1.0], "lengths": [512, 1024], "metric": "exact_match"}}


def test_scores_json_records_the_main_metrics_interval():
    task = task_from_identity(PASSKEY)
    hits = [1.0, 0.0, 1.0, 1.0]

    def summary(scores, clusters=(None,) * 4):
        return summarize_run(task, [sample_record(f"s{i}", meta={"length": 512, "depth": 0.0}, cluster=c,
                                                  scores={"exact_match": h, "partial_match": h})
                                    for i, (h, c) in enumerate(zip(scores, clusters))], 4)

    # 0/1 scores of independent samples: Wilson's interval, by hand (3 + z^2/2) / (4 + z^2) -+
    # z / (4 + z^2) * sqrt(3 / 4 + z^2 / 4) = 0.6275 -+ 0.3269
    scores = summary(hits)
    assert scores.ci95 == [30.06, 95.44] and scores.score == 75.0
    assert (scores.ci_method, scores.ci_resamples, scores.ci_seed) == ("Wilson score", None, None)
    # other scores: the percentile bootstrap
    scores = summary([1.0, 0.0, 0.5, 1.0])
    interval = bootstrap_ci([1.0, 0.0, 0.5, 1.0])
    assert scores.ci95 == [round(100 * interval.low, 2), round(100 * interval.high, 2)]
    assert (scores.ci_method, scores.ci_resamples, scores.ci_seed) == ("percentile bootstrap", 10_000, 0)
    # samples sharing a context: the clustered bootstrap over the records' clusters
    scores = summary(hits, ["x", "x", "y", None])
    interval = bootstrap_ci(hits, ["x", "x", "y", "s3"])
    assert scores.ci95 == [round(100 * interval.low, 2), round(100 * interval.high, 2)]
    assert scores.ci_method == "clustered percentile bootstrap"


def test_no_interval_when_a_record_lacks_the_main_metric():
    records = [sample_record("a", scores={"exact_match": 1.0}), sample_record("b", scores={})]
    assert sample_scores(records, "exact_match") is None
    assert sample_scores([], "exact_match") is None
    assert sample_scores(records[:1], "exact_match") == {"a": 1.0}


def test_scores_json_without_interval_fields_still_loads():
    old = {"task": "t", "metric": "exact_match", "score": 50.0, "metrics": {}, "n": 2, "n_expected": 2,
           "complete": True, "measured_ratio": 1.0, "tokens_held": 1.0, "bytes_held": 1.0,
           "peak_bytes_held": 1.0, "decode_tokens_per_s": 1.0}
    scores = RunScores.from_json(json.loads(json.dumps(old)))
    assert scores.ci95 is None and scores.ci_method is None


def write_run(root, method, hits, setting="ratio-1", ratio=1, with_interval=True, clusters=None):
    """A passkey results directory whose records score ``hits`` (0/1 per sample, ids s0, s1, ...), in
    ``clusters`` (a key per record; None: unclustered); ``with_interval=False`` writes scores.json as
    kvbench did before it recorded intervals."""
    run = RunDir(root / "m" / "passkey" / method / setting)
    run.write_run(run_info(PASSKEY, method=method, ratio=ratio, label=setting, n_expected=len(hits)))
    for i, (h, c) in enumerate(zip(hits, clusters or [None] * len(hits))):
        run.append(sample_record(f"s{i}", scores={"exact_match": h}, cluster=c))
    scores = RunScores(task="passkey", metric="exact_match", score=100 * sum(hits) / len(hits),
                       metrics={"exact_match": 100 * sum(hits) / len(hits)}, n=len(hits), n_expected=len(hits),
                       complete=True, measured_ratio=float(ratio), tokens_held=1.0, bytes_held=1000.0 / ratio,
                       peak_bytes_held=1000.0, decode_tokens_per_s=1.0)
    if with_interval:
        scores = dataclasses.replace(scores, ci95=[1.0, 2.0], ci_method="percentile bootstrap", ci_resamples=10_000,
                                     ci_seed=0)  # the report recomputes intervals; it must not read these
    run.write_scores(scores)
    return run


FULL = [1.0] * 10 + [0.0] * 2
ALPHA = [1.0] * 4 + [0.0] * 8
ZETA = [0.0, 1.0] + [1.0] * 8 + [1.0, 0.0]


@pytest.fixture
def tree(tmp_path):
    write_run(tmp_path, "full", FULL, with_interval=False)  # an old directory: no interval in scores.json
    write_run(tmp_path, "alpha", ALPHA, "ratio-4", 4)
    write_run(tmp_path, "zeta", ZETA, "ratio-4", 4, with_interval=False)
    return tmp_path


def recomputed(root, method):
    """The interval and the paired comparison with the full cache, from samples.jsonl."""
    def scores(m):
        run = next(r for r in find_runs(root) if r.read_run().identity.method["name"] == m)
        return {r.id: r.scores["exact_match"] for r in run.records()}

    columns = mean_ci(list(scores(method).values())).columns()
    return {**columns, **(paired_comparison(scores("full"), scores(method)).columns() if method != "full" else {})}


def test_exported_intervals_and_paired_columns_agree_with_samples_jsonl(tree):
    report.write_report(tree, formats=["csv", "parquet"])
    for table in (pd.read_csv(tree / "leaderboards" / "results.csv"),
                  pd.read_parquet(tree / "leaderboards" / "results.parquet")):
        assert "sample_scores" not in table.columns
        for method in ("full", "alpha", "zeta"):
            row = table[table.method == method].iloc[0]
            expected = recomputed(tree, method)
            assert row.n == 12
            for column, value in expected.items():
                assert row[column] == pytest.approx(value), (method, column)
            if method == "full":
                assert all(pd.isna(row[c]) for c in report.VS_FULL)
    table = pd.read_csv(tree / "leaderboards" / "results.csv").set_index("method")
    # by hand: alpha loses s4..s9 and gains none (McNemar b=6, c=0: p = 2/64); zeta loses s0 and gains s10 (b=c: p = 1)
    assert (table.lost["alpha"], table.gained["alpha"], table.vs_full_p["alpha"]) == (6, 0, pytest.approx(2 / 64))
    assert table.vs_full_diff["alpha"] == pytest.approx(-50.0)
    assert (table.lost["zeta"], table.gained["zeta"], table.vs_full_p["zeta"]) == (1, 1, 1.0)
    assert table.vs_full_ci_low["alpha"] < -50 < table.vs_full_ci_high["alpha"] < 0
    assert table.ci_low["full"] < 100 * 10 / 12 < table.ci_high["full"]


def test_clustered_runs_get_clustered_intervals_and_comparisons(tree):
    # alpha's records (written again, clustered) share contexts in pairs; the full cache's are old records
    # without clusters: the comparison resamples alpha's clusters
    shutil.rmtree(tree / "m" / "passkey" / "alpha")
    keys = [f"ctx{i // 2}" for i in range(12)]
    write_run(tree, "alpha", ALPHA, "ratio-4", 4, clusters=keys)
    df = report.collect(tree).set_index("method")
    full = dict(zip((f"s{i}" for i in range(12)), FULL))
    alpha = dict(zip((f"s{i}" for i in range(12)), ALPHA))
    interval = mean_ci(ALPHA, keys)
    assert interval.method == "clustered percentile bootstrap"
    assert (df.ci_low["alpha"], df.ci_high["alpha"]) == tuple(interval.columns().values())
    paired = paired_comparison(full, alpha, dict(zip(alpha, keys)))
    assert paired.ci_method == "clustered percentile bootstrap" and paired.test.startswith("sign-flip")
    assert (df.vs_full_p["alpha"], df.vs_full_ci_low["alpha"]) == (paired.p, 100 * paired.ci_low)
    assert df.vs_full_p["alpha"] != pytest.approx(2 / 64)  # not McNemar's on 12 independent pairs
    # unclustered runs keep Wilson's interval
    assert (df.ci_low["zeta"], df.ci_high["zeta"]) == tuple(mean_ci(ZETA).columns().values())
    rows = report.compare(report.collect(tree), "full", "alpha")
    assert rows.p.iloc[0] == paired.p


def passkey_table(root):
    markdown = report.leaderboard_markdown(report.collect(root), "m")
    section = markdown[markdown.index("### passkey"):]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    lines = list(itertools.takewhile(lambda line: line.startswith("| "), lines[start:]))  # the first table
    cells = {line.split(" | ")[0].removeprefix("| "): [c.strip() for c in line.strip("| ").split(" | ")[1:]]
             for line in lines[2:]}
    return cells, section


def test_cells_show_the_interval_and_bold_the_runs_indistinguishable_from_the_best(tree):
    write_run(tree, "beta", [1.0] * 12, "ratio-4", 4)
    cells, section = passkey_table(tree)
    # 4x column: beta (12/12) is best; zeta loses 2 samples to it (McNemar p = 0.5), alpha 8 (p = 2/256,
    # 0.016 after Holm): zeta stays bold with beta, alpha does not
    half = round((recomputed(tree, "alpha")["ci_high"] - recomputed(tree, "alpha")["ci_low"]) / 2)
    assert cells["alpha"][1] == f"33.3 ±{half} (40.0%)"
    # 12 of 12: Wilson's [12 / (12 + z^2), 1] = [75.8, 100], not the bootstrap's [100, 100]
    assert cells["beta"][1] == "**100.0 ±12 (120.0%)**"
    assert cells["zeta"][1].startswith("**83.3 ±") and cells["zeta"][1].endswith("(100.0%)**")
    assert cells["full"][0].startswith("83.3 ±")  # alone in its column: nothing to compare
    drop = 100 * detectable_drop_unpaired(12, 10 / 12)
    assert "n = 12 samples per run; from the full cache's 83.3, the smallest drop" in section
    assert f"is {drop:.1f} points." in section


def test_the_best_alone_is_bold_when_it_beats_every_other_run(tree):
    write_run(tree, "beta", [1.0] * 12, "ratio-4", 4)
    shutil.rmtree(tree / "m" / "passkey" / "zeta")
    cells, _ = passkey_table(tree)
    assert cells["beta"][1].startswith("**") and not cells["alpha"][1].startswith("**")


# --- comparing two methods


def test_compare_pairs_two_methods_sample_by_sample(tree):
    table = report.compare(report.collect(tree), "alpha", "zeta")
    row = table.iloc[0]
    assert len(table) == 1 and (row.a_setting, row.b_setting, row.n) == ("ratio-4", "ratio-4", 12)
    # by hand: zeta (B) loses s0 to alpha (A) and gains s4..s10; McNemar b=1, c=7: p = 2 * 9 / 256
    assert (row.lost, row.gained, row.test) == (1, 7, "McNemar exact")
    assert row.p == pytest.approx(18 / 256) and row.p_holm == row.p
    assert (row.a_score, row.b_score, row.difference) == (pytest.approx(100 / 3), pytest.approx(250 / 3), pytest.approx(50.0))
    assert row.ci_low < 50 < row.ci_high


def test_compare_with_a_single_setting_pairs_it_with_every_setting_of_the_other(tree):
    write_run(tree, "zeta", [1.0] * 12, "ratio-8", 8)
    df = report.collect(tree)
    against_full = report.compare(df, "full", "zeta")
    assert list(against_full.b_setting) == ["ratio-4", "ratio-8"] and set(against_full.a_setting) == {"ratio-1"}
    # the same comparison as the run table's paired columns with the full cache
    exported = df[df.method == "zeta"].set_index("setting")
    assert list(against_full.difference) == pytest.approx(list(exported.vs_full_diff))
    assert list(against_full.p) == pytest.approx(list(exported.vs_full_p))
    assert list(against_full.p_holm) == pytest.approx([min(1.0, 2 * min(against_full.p))] * 2)
    pinned = report.compare(df, "alpha/ratio-4", "zeta")
    assert list(pinned.b_setting) == ["ratio-4", "ratio-8"]
    both = report.compare(df, "alpha/ratio-4", "zeta/ratio-8")
    assert list(both.b_setting) == ["ratio-8"]


def test_compare_uses_the_samples_both_runs_hold(tree):
    write_run(tree, "beta", [1.0] * 5, "ratio-4", 4)  # a limited run: s0..s4 only
    row = report.compare(report.collect(tree), "alpha", "beta").iloc[0]
    # on s0..s4 alpha scores 1, 1, 1, 1, 0: beta gains s4 only
    assert (row.n, row.lost, row.gained, row.a_score) == (5, 0, 1, 80.0)


def test_compare_names_the_choices_for_unknown_names(tree):
    df = report.collect(tree)
    with pytest.raises(ConfigError, match=r"unknown method in these results 'alpah' \(did you mean 'alpha'\?\); "
                                          r"valid: alpha, full, zeta"):
        report.compare(df, "alpah", "zeta")
    with pytest.raises(ConfigError, match=r"unknown setting of zeta in these results 'ratio-3'.*valid: ratio-4"):
        report.compare(df, "alpha", "zeta/ratio-3")
    write_run(tree, "beta", [1.0] * 12, "ratio-8", 8)
    with pytest.raises(ConfigError, match="share no model and task .* at the same compression"):
        report.compare(report.collect(tree), "alpha", "beta")
    write_run(tree, "gamma", [1.0] * 12, "ratio-4_lag-128", 4)  # only a variant: name its setting
    with pytest.raises(ConfigError, match="gamma has no runs at its default parameters here; name a setting: "
                                          "gamma/ratio-4_lag-128"):
        report.compare(report.collect(tree), "alpha", "gamma")
    assert report.compare(report.collect(tree), "alpha", "gamma/ratio-4_lag-128").n.tolist() == [12]


def test_compare_cli_prints_the_table_and_writes_csv(tree, capsys):
    assert report.main([str(tree), "--compare", "full", "alpha/ratio-4"]) == 0
    printed = capsys.readouterr().out
    path = tree / report.COMPARISONS_DIR / "full_vs_alpha_ratio-4.csv"
    assert f"written: {path}" in printed
    table = pd.read_csv(path)
    assert list(table.columns) == report.COMPARE_COLUMNS
    assert (table.n[0], table.lost[0], table.gained[0]) == (12, 6, 0)
    line = next(line for line in printed.splitlines() if line.startswith("| m | passkey |"))
    assert [c.strip() for c in line.strip("|").split("|")][4:8] == ["12", "83.3", "33.3", "-50.0 [-75.0, -25.0]"]
    assert report.main([str(tree), "--compare", "nope", "alpha"]) == 2
    assert "unknown method in these results 'nope'" in capsys.readouterr().err


# --- intervals in the figures and the AUC summary


def paired_scores(root, method):
    run = next(r for r in find_runs(root) if r.read_run().identity.method["name"] == method)
    return [r.scores["exact_match"] for r in run.records()]


def test_retention_points_carry_the_paired_interval(tree):
    points = report.retention_points(report.collect(tree), "m", "passkey").set_index("row")
    interval = retention_ci([(FULL, ALPHA)])
    assert points.retention["alpha"] == pytest.approx(40.0)
    assert (points.ci_low["alpha"], points.ci_high["alpha"]) == (interval.low, interval.high)
    fig = plots.retention_vs_ratio(points.reset_index(), "t")
    bars = {container.get_label(): container for container in fig.axes[0].containers}
    segment = bars["alpha"].lines[2][0].get_segments()[0]  # the vertical error bar
    assert [y for _, y in segment] == pytest.approx([interval.low, interval.high])


def test_auc_table_and_figure_with_intervals(tree):
    write_run(tree, "alpha", [1.0] * 2 + [0.0] * 10, "ratio-8", 8)
    df = report.collect(tree)
    table = report.retention_auc_table(df, "m").set_index("row")
    # alpha: 100% at 1x (the full cache), 40% at 4x, 20% at 8x
    assert table.auc["alpha"] == pytest.approx(retention_auc([1, 4, 8], [100, 40, 20]))  # samples agree with scores
    assert table.ratios["alpha"] == "1-4/8x" and table.ratios["zeta"] == "1-4x"
    expected = retention_auc_ci([1, 4, 8], [(FULL, list(zip(FULL, ALPHA, [1.0] * 2 + [0.0] * 10)))])
    assert (table.ci_low["alpha"], table.ci_high["alpha"]) == (expected.low, expected.high)
    page = report.leaderboard_markdown(df, "m")
    assert "## Area under the retention curve" in page
    assert f"| alpha | 1-4/8x | {table.auc['alpha']:.1f} [{expected.low:.1f}, {expected.high:.1f}] |" in page
    fig = plots.retention_auc_bars(table.reset_index(), "auc")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["alpha (1-4/8x)", "zeta (1-4x)"]
    written = report.write_report(tree, formats=["png"])
    assert tree / report.REPORT_DIR / "plots" / "m" / "retention_auc.png" in written


def test_pareto_plot_draws_the_frontier_over_measured_bytes(tree):
    df = report.collect(tree)
    points = report._bytes_points(df)
    fig = plots.score_vs_bytes(points, "t", "exact_match")
    frontier = next(line for line in fig.axes[0].get_lines() if line.get_label() == plots.FRONTIER_LABEL)
    # zeta (250 B, 83.3) scores as the full cache (1000 B, 83.3) with fewer bytes; alpha (250 B, 33.3) is
    # dominated by zeta: the frontier is zeta alone, held to the widest byte count
    assert fig.axes[0].get_xlabel() == "KV cache held after prefill, measured (B, mean per sample)"
    assert list(frontier.get_xdata()) == pytest.approx([250, 1000])
    assert list(frontier.get_ydata()) == pytest.approx([250 / 3, 250 / 3])
    zeta = next(c for c in fig.axes[0].containers if c.get_label() == "zeta")
    segment = zeta.lines[2][0].get_segments()[0]
    assert [y for _, y in segment] == pytest.approx([df.ci_low[df.method == "zeta"].iloc[0],
                                                     df.ci_high[df.method == "zeta"].iloc[0]])


def test_averages_over_tasks_carry_an_interval(tree):
    markdown = report.leaderboard_markdown(report.collect(tree), "m")
    average = markdown[markdown.index("## Average over tasks"):markdown.index("## Area under")]
    # one task: the average's interval is the task's own
    half = round((recomputed(tree, "alpha")["ci_high"] - recomputed(tree, "alpha")["ci_low"]) / 2)
    assert f"| alpha | – | 33.3 ±{half} (40.0%) |" in average


def test_a_run_records_its_samples_clusters(tiny_llama, tmp_path, monkeypatch):
    from test_fidelity import run

    from kvbench.tasks.passkey import Passkey

    samples = Passkey.samples
    monkeypatch.setattr(Passkey, "samples", lambda self, *args: [dataclasses.replace(s, cluster=f"c{i // 2}")
                                                                 for i, s in enumerate(samples(self, *args))])
    records, scores = run(tiny_llama, tmp_path, fidelity=False)
    assert [r.cluster for r in records] == ["c0", "c0", "c1"]
    assert scores.ci_method == "clustered percentile bootstrap"
