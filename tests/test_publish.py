"""The published board (kvbench.publish) and the papers' claims (kvbench.claims), on small runs trees
written here with the runner's schema; and the committed tree itself, regenerated and re-scored."""

import dataclasses
import filecmp
import re
import shutil
from pathlib import Path

import pytest
from conftest import run_info, sample_record
from test_experiments import EXPERIMENTS, axes, spec

from kvbench import claims, publish, report
from kvbench.config import compose_config
from kvbench.errors import ConfigError
from kvbench.results import RunDir
from kvbench.runner import summarize_run
from kvbench.score import rescore
from kvbench.tasks import task_from_identity

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_RUNS = ROOT / "leaderboard" / "runs"
PASSKEY = {"name": "passkey", "kind": "passkey",
           "params": {"compress": "whole", "depths": [0.0, 1.0], "lengths": [512], "metric": "exact_match",
                      "key_digits": 5, "samples_per_cell": 1, "seed": 0, "max_new_tokens": 12}}


def write_run(root: Path, outcomes: str, model="m", method="full", setting="ratio-1", task=PASSKEY,
              n_expected=None, bytes_held=1000, peak_tokens=None, peak_bytes=1000, clusters=None) -> RunDir:
    """A results directory as the runner writes it: one record per character of ``outcomes``
    ("1": the key recalled, "0": not), sample ids s0, s1, ..., in ``clusters`` (one key per record)
    where given; scores.json as the runner summarises them (so ``kvbench.score --write`` leaves it
    unchanged)."""
    kind, _, value = setting.partition("_")[0].partition("-")  # "ratio-2_lag_size-128": a variant
    ratio, budget = (float(value), None) if kind == "ratio" else (None, int(value))
    run = RunDir(root / model / task["name"] / method / setting)
    n_expected = n_expected or len(outcomes)
    run.write_run(run_info(task, model=model, method=method, ratio=ratio, budget=budget, label=setting,
                           n_expected=n_expected, status="complete" if len(outcomes) == n_expected else "partial"))
    task_obj = task_from_identity(task)
    records = []
    for i, outcome in enumerate(outcomes):
        record = sample_record(f"s{i}", pred="12345" if outcome == "1" else "99999", meta={"length": 512, "depth": 0.0},
                               cluster=clusters[i] if clusters else None)
        stats = dataclasses.replace(record.kv.after_prefill, bytes_held=bytes_held, ratio=4000 / bytes_held)
        record.kv = dataclasses.replace(record.kv, after_prefill=stats, peak_tokens_held=peak_tokens,
                                        peak_bytes_held=peak_bytes)
        record.scores = task_obj.score_record(record)
        run.append(record)
        records.append(record)
    run.write_scores(summarize_run(task_obj, records, n_expected))
    return run


def board(root: Path, outcomes: dict[tuple[str, str], str], **fields) -> Path:
    """A runs tree of one model and task: (method, setting) -> outcomes."""
    for (method, setting), result in outcomes.items():
        write_run(root, result, method=method, setting=setting, **fields)
    return root


def verdict(root: Path, test, models=("m",)) -> claims.Verdict:
    (result,) = claims.evaluate(report.collect(root), claims.Claim("paper", "claim", "figure", test, models))
    return result


# ---------------------------------------------------------------------------------------------
# Verdicts
# ---------------------------------------------------------------------------------------------

BEATS = claims.Beats("a", "b", "passkey", "ratio-2")


def test_a_method_above_its_rival_on_enough_samples_is_reproduced_in_direction(tmp_path):
    # a recalls all 30 keys, b 10 of them: +66.7 points, the interval far above 0
    board(tmp_path, {("full", "ratio-1"): "1" * 30, ("a", "ratio-2"): "1" * 30, ("b", "ratio-2"): "1" * 10 + "0" * 20})
    v = verdict(tmp_path, BEATS)
    assert v.verdict == claims.REPRODUCED and v.n == 30
    assert "a 100.0 vs b 33.3: difference +66.7 [" in v.figure and "p = " in v.figure
    assert v.figure.endswith("measured ratios 4.00x vs 4.00x; peak KV held 1000 B vs 1000 B")


def test_a_method_below_its_rival_or_level_with_it_is_not_reproduced(tmp_path):
    board(tmp_path, {("full", "ratio-1"): "1" * 30, ("a", "ratio-2"): "0" * 30, ("b", "ratio-2"): "1" * 30})
    assert verdict(tmp_path, BEATS).verdict == claims.NOT_REPRODUCED
    # identical scores: the interval is [0, 0], which shows no gain
    board(tmp_path, {("a", "ratio-2"): "1" * 30})
    assert verdict(tmp_path, BEATS).verdict == claims.NOT_REPRODUCED


def test_samples_that_share_a_context_are_compared_as_clusters(tmp_path):
    # a gains 15 of 30 samples, all in one of two contexts: independent samples would show a gain, two
    # clusters cannot (a resample may draw the other context twice)
    clusters = ["x"] * 15 + ["y"] * 15
    board(tmp_path, {("full", "ratio-1"): "1" * 30, ("a", "ratio-2"): "1" * 30, ("b", "ratio-2"): "0" * 15 + "1" * 15})
    assert verdict(tmp_path, BEATS).verdict == claims.REPRODUCED
    clustered = board(tmp_path / "clustered", {("full", "ratio-1"): "1" * 30, ("a", "ratio-2"): "1" * 30,
                                               ("b", "ratio-2"): "0" * 15 + "1" * 15}, clusters=clusters)
    assert verdict(clustered, BEATS).verdict == claims.INCONCLUSIVE


def test_a_difference_whose_interval_straddles_zero_is_inconclusive(tmp_path):
    # one sample gained, one lost: difference 0 but the interval reaches both sides
    board(tmp_path, {("full", "ratio-1"): "1111", ("a", "ratio-2"): "1011", ("b", "ratio-2"): "0111"})
    v = verdict(tmp_path, BEATS)
    assert v.verdict == claims.INCONCLUSIVE and v.n == 4


def test_missing_and_partial_cells_are_not_run_yet_and_named(tmp_path):
    board(tmp_path, {("full", "ratio-1"): "1111", ("a", "ratio-2"): "11"}, n_expected=None)
    write_run(tmp_path, "11", method="a", setting="ratio-2", n_expected=4)
    v = verdict(tmp_path, BEATS)
    assert v.verdict == claims.NOT_RUN
    assert v.why == "a/ratio-2 partial (2 of 4) on passkey; b/ratio-2 missing on passkey"


def test_a_task_the_full_cache_fails_is_not_testable(tmp_path):
    board(tmp_path, {("full", "ratio-1"): "0000", ("a", "ratio-2"): "0000", ("b", "ratio-2"): "0000"})
    v = verdict(tmp_path, BEATS)
    assert (v.verdict, v.why) == (claims.NOT_TESTABLE, "the full cache scores 0 on passkey")


def test_retention_is_judged_against_the_claimed_floor(tmp_path):
    # 19 of 20 kept: retention 95%; the paired interval is about [85, 100]
    board(tmp_path, {("full", "ratio-1"): "1" * 20, ("a", "ratio-2"): "1" * 19 + "0"}, bytes_held=2000)
    judged = {floor: verdict(tmp_path, claims.Retention("a", "ratio-2", ("passkey",), floor)) for floor in (80, 95, 101)}
    assert judged[80].verdict == claims.REPRODUCED
    assert judged[95].verdict == claims.INCONCLUSIVE
    assert judged[101].verdict == claims.NOT_REPRODUCED
    assert judged[80].figure.startswith("retention 95.0% [") and judged[80].figure.endswith("(measured ratio 2.00x)")


def test_a_retention_over_tasks_leaves_out_those_the_full_cache_fails(tmp_path):
    other = {**PASSKEY, "name": "passkey_long"}
    board(tmp_path, {("full", "ratio-1"): "1" * 20, ("a", "ratio-2"): "1" * 20}, bytes_held=2000)
    board(tmp_path, {("full", "ratio-1"): "0" * 20, ("a", "ratio-2"): "0" * 20}, bytes_held=2000, task=other)
    v = verdict(tmp_path, claims.Retention("a", "ratio-2", ("passkey", "passkey_long"), 95))
    assert (v.verdict, v.n) == (claims.REPRODUCED, 20)
    assert v.why == "floor 95%; left out, the full cache scores 0: passkey_long"
    v = verdict(tmp_path, claims.Retention("a", "ratio-2", ("passkey_long",), 95))
    assert (v.verdict, v.why) == (claims.NOT_TESTABLE, "the full cache scores 0 on passkey_long")


def test_a_cell_that_compressed_nothing_cannot_test_a_compression_claim(tmp_path):
    board(tmp_path, {("full", "ratio-1"): "1" * 20, ("a", "ratio-2"): "1" * 20}, bytes_held=4000)
    v = verdict(tmp_path, claims.Retention("a", "ratio-2", ("passkey",), 95))
    assert v.verdict == claims.NOT_TESTABLE and "compressed nothing on passkey (measured ratio 1.00x)" in v.why


def test_a_budget_cell_whose_prompt_fits_is_still_judged(tmp_path):
    # decode_recall's prompt fits the budget: nothing is evicted at prefill (measured ratio 1), the
    # compression happens while decoding
    board(tmp_path, {("full", "ratio-1"): "1" * 30, ("a", "budget-8"): "1" * 30, ("b", "budget-8"): "0" * 30},
          bytes_held=4000)
    assert verdict(tmp_path, claims.Beats("a", "b", "passkey", "budget-8")).verdict == claims.REPRODUCED


def test_the_gpu_table_reads_the_hub_models_runs(tmp_path):
    passkey64 = {**PASSKEY, "name": "passkey64"}
    row = next(r for r in claims.GPU_ROWS if r.tasks == "passkey64" and r.method == "lagkv")
    assert row.setting == "ratio-2"
    llama, qwen = claims.GPU_MODELS
    write_run(tmp_path, "1101", model=llama, method="lagkv", setting=row.setting, task=passkey64)
    write_run(tmp_path, "11", model=qwen, method="lagkv", setting=row.setting, task=passkey64, n_expected=4)
    df = report.collect(tmp_path)
    assert claims.gpu_figure(df, llama, row) == "75.00"
    assert claims.gpu_figure(df, qwen, row) == claims.NOT_RUN


def test_the_rival_given_no_fewer_bytes_is_the_closest_above(tmp_path):
    write_run(tmp_path, "1" * 20)
    write_run(tmp_path, "1" * 20, method="a", setting="ratio-2", bytes_held=700)
    for setting, held in (("ratio-2", 2000), ("ratio-4", 1000), ("ratio-8", 500)):
        write_run(tmp_path, "0" * 20, method="b", setting=setting, bytes_held=held)
    test = claims.BeatsWithFewerBytes("a", "b", "passkey", "ratio-2", ("ratio-2", "ratio-4", "ratio-8"))
    v = verdict(tmp_path, test)
    # ratio-8 holds less than a (500 < 700): never chosen; ratio-4 (1000) is the closest above
    assert v.cells == "passkey: a/ratio-2 vs b/ratio-4" and v.verdict == claims.REPRODUCED
    assert v.figure.endswith("; KV held after prefill 700 B vs 1000 B")
    write_run(tmp_path, "0" * 20, method="a", setting="ratio-4", bytes_held=3000)
    v = verdict(tmp_path, dataclasses.replace(test, setting="ratio-4"))
    assert v.verdict == claims.NOT_TESTABLE and "no b cell" in v.why


def test_the_rival_given_no_less_peak_memory_is_chosen_by_its_peak(tmp_path):
    # a holds what b/budget-8 holds after prefill, but peaks above it while decoding
    write_run(tmp_path, "1" * 20)
    write_run(tmp_path, "1" * 20, method="a", setting="budget-8", peak_bytes=1200)
    write_run(tmp_path, "0" * 20, method="b", setting="budget-8", peak_bytes=1000)
    write_run(tmp_path, "0" * 20, method="b", setting="budget-10", peak_bytes=1250)
    test = claims.BeatsWithFewerBytes("a", "b", "passkey", "budget-8", ("budget-8", "budget-10"), held="peak_bytes_held")
    v = verdict(tmp_path, test)
    assert v.cells == "passkey: a/budget-8 vs b/budget-10" and v.verdict == claims.REPRODUCED
    assert v.figure.endswith("; peak KV held 1.17 KiB vs 1.22 KiB")
    assert verdict(tmp_path, dataclasses.replace(test, held="bytes_held")).cells == "passkey: a/budget-8 vs b/budget-8"


def test_capacity_is_checked_on_every_record(tmp_path):
    write_run(tmp_path, "11", method="a", setting="budget-8", peak_tokens=8)
    test = claims.WithinCapacity("a", "budget-8", ("passkey",))
    v = verdict(tmp_path, test)
    assert (v.verdict, v.n) == (claims.REPRODUCED, 2)
    assert v.figure == "most tokens held by a KV head between steps: 8 (capacity 8)"
    write_run(tmp_path / "over", "11", method="a", setting="budget-8", peak_tokens=9)
    assert verdict(tmp_path / "over", test).verdict == claims.NOT_REPRODUCED


def test_a_capacity_shows_its_complete_cells_and_is_refuted_by_one_record_over_it(tmp_path):
    test = claims.WithinCapacity("a", "budget-8", ("passkey", "passkey64"))
    write_run(tmp_path, "11", method="a", setting="budget-8", peak_tokens=8)
    v = verdict(tmp_path, test)
    assert (v.verdict, v.n) == (claims.NOT_RUN, 2)
    assert v.figure.endswith("(capacity 8) on the 1 complete of 2: passkey") and "a/budget-8 missing on passkey64" in v.why
    write_run(tmp_path / "over", "11", method="a", setting="budget-8", peak_tokens=9)
    v = verdict(tmp_path / "over", test)
    assert (v.verdict, v.why) == (claims.NOT_REPRODUCED, "over capacity on passkey")


def test_claims_that_need_a_gpu_say_why():
    claim = next(c for c in claims.CLAIMS if isinstance(c.test, claims.NotOnCpu))
    (v,) = claims.evaluate(report.collect(Path("/nonexistent")), claim)
    assert v.verdict == claims.NOT_TESTABLE and v.why


def test_every_claim_reads_cells_the_cpu_sweeps_run():
    """The cells a claim reads are cells of ``+experiment=leaderboard_cpu``, its budget half or its
    controls (every ``leaderboard_cpu*`` experiment), by the names the runs get (a method config with
    parameters of its own, such as board/lagkv, adds them to the setting), so a typo cannot leave a row
    "not run yet" for ever."""
    swept = set()
    for name in sorted(p.stem for p in EXPERIMENTS.glob("leaderboard_cpu*.yaml")):
        sweep = axes(name)
        tasks = [compose_config([f"+experiment={name}", f"task={task}"])["task"]["name"] for task in sweep["task"]]
        ratios = [r for r in sweep["ratio"] if r != "null"]
        for method in sweep["method"]:
            # one run's names; the other compressions of the method differ only in the setting's first part
            run = spec(f"+experiment={name}", f"method={method}", f"task={sweep['task'][0]}",
                       *([f"ratio={ratios[0]}"] if ratios else []))
            first, _, variant = run.setting.partition("_")
            settings = ([f"ratio-{r}" for r in ratios] if ratios and method != "full" else [first])
            swept |= {(task, run.method.name, "_".join(filter(None, (s, variant)))) for task in tasks for s in settings}
    for claim in claims.CLAIMS:
        assert set(claim.test.cells()) <= swept, claim
        if not isinstance(claim.test, claims.NotOnCpu):
            assert set(claim.models) == set(axes("leaderboard_cpu")["model"])


# ---------------------------------------------------------------------------------------------
# The published files
# ---------------------------------------------------------------------------------------------

README_TEXT = "# project\n\nIntro.\n\n## Leaderboard\n" + publish.BEGIN + "\nold\n" + publish.END + "\n\n## After\ntext\n"


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repository root with README.md and a runs tree (one complete, one partial cell)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text(README_TEXT)
    runs = tmp_path / "leaderboard" / "runs"
    write_run(runs, "1" * 10)
    write_run(runs, "1" * 8 + "00", method="a", setting="ratio-2", bytes_held=2000)
    write_run(runs, "1" * 4, method="a", setting="ratio-4", bytes_held=1000, n_expected=10)
    return tmp_path


def publish_here(formats=("md", "csv", "png"), draw=False) -> list[Path]:
    return publish.publish(Path("leaderboard/runs"), Path("leaderboard"), formats=formats, draw=draw)


def test_the_readme_block_is_rewritten_and_the_rest_kept_byte_for_byte(repo):
    publish_here()
    text = (repo / "README.md").read_text()
    head, rest = text.split(publish.BEGIN)
    block, tail = rest.split(publish.END)
    assert head == README_TEXT.split(publish.BEGIN)[0] and tail == README_TEXT.split(publish.END)[1]
    assert "`python -m kvbench.report leaderboard/runs --out leaderboard --publish`" in block
    # the partial cell says so in the cell, with its samples
    row = next(line for line in block.splitlines() if line.startswith("| a |"))
    assert re.fullmatch(r"\| a \| – \| 80\.0 ±\d+ \(80\.0%\) \| n/a \*0 of 1 tasks, 1 partial\* \[1\] \|", row), row
    assert "[1] mean over 0 of 1 tasks; left out: passkey (partial, 4 of 10)" in block
    assert "passkey: n = 10, full cache 100.0, detectable drop" in block
    # what the complete compressed runs really saved; the partial 4x run is not in it
    assert "Measured compression: 2x: 2.00x." in block
    assert "[leaderboard/leaderboards/m.md](leaderboard/leaderboards/m.md)" in block
    assert "[passkey](leaderboard/leaderboards/plots/m/passkey/score_vs_kv_bytes.png)" in block
    publish_here(("md", "svg"))
    assert "[passkey](leaderboard/leaderboards/plots/m/passkey/score_vs_kv_bytes.svg)" in (repo / "README.md").read_text()
    publish_here(("md",))
    assert "score_vs_kv_bytes" not in (repo / "README.md").read_text()


def test_publishing_twice_gives_the_same_bytes_and_leaves_the_runs_alone(repo):
    runs = repo / "leaderboard" / "runs"
    before = {p: p.read_bytes() for p in sorted(runs.rglob("*")) if p.is_file()}
    publish_here(report.FORMATS, draw=True)
    first = {p: p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}
    publish_here(report.FORMATS, draw=True)
    second = {p: p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}
    assert first == second
    assert {p: b for p, b in second.items() if runs in p.parents} == before
    index = (repo / "leaderboard" / "LEADERBOARD.md").read_text()
    assert "Generated by `python -m kvbench.report leaderboard/runs --out leaderboard --publish`" in index
    assert "../results" not in index


def test_pages_link_the_same_figures_whether_or_not_they_are_drawn(repo):
    pages = ["leaderboard/LEADERBOARD.md", "leaderboard/leaderboards/m.md", "README.md", "docs/reproductions.md"]
    publish.publish(Path("leaderboard/runs"), Path("leaderboard"), draw=False)
    linked = {page: (repo / page).read_text() for page in pages}
    assert not (repo / "leaderboard" / "leaderboards" / "plots").exists()
    publish.publish(Path("leaderboard/runs"), Path("leaderboard"), draw=False, pages=False)
    assert not (repo / "leaderboard" / "leaderboards" / "m.md").exists()
    index_and_docs = [page for page in pages if page != "leaderboard/leaderboards/m.md"]
    assert {page: (repo / page).read_text() for page in index_and_docs} == {page: linked[page] for page in index_and_docs}
    assert "plots/m/passkey/score_vs_kv_bytes.png" in linked["leaderboard/leaderboards/m.md"]
    publish.publish(Path("leaderboard/runs"), Path("leaderboard"))
    assert {page: (repo / page).read_text() for page in pages} == linked
    assert (repo / "leaderboard" / "leaderboards" / "plots" / "m" / "passkey" / "score_vs_kv_bytes.png").is_file()


def test_reproductions_name_every_claim_and_the_gpu_command(repo):
    publish_here(("md",))
    text = (repo / "docs" / "reproductions.md").read_text()
    for claim in claims.CLAIMS:
        assert claim.claim in text
    assert publish.GPU_EXPERIMENT in text and "| not run yet |" in text


def test_no_markers_no_runs_nothing_written(repo):
    (repo / "README.md").write_text("# no markers\n")
    with pytest.raises(ConfigError, match="kvbench:leaderboard"):
        publish_here()
    assert not (repo / "leaderboard" / "LEADERBOARD.md").exists()
    with pytest.raises(ConfigError, match="no runs folder"):
        publish.publish(Path("missing"), Path("leaderboard"))


def test_the_cli_publishes(repo, capsys):
    assert report.main(["leaderboard/runs", "--out", "leaderboard", "--publish", "--format", "md"]) == 0
    assert (repo / "docs" / "reproductions.md").is_file()
    assert "published" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# The committed tree
# ---------------------------------------------------------------------------------------------

needs_committed_runs = pytest.mark.skipif(not COMMITTED_RUNS.is_dir(),
                                          reason="no committed runs yet (leaderboard/runs/ does not exist)")


@needs_committed_runs
def test_the_committed_board_is_what_the_committed_runs_regenerate(tmp_path, monkeypatch):
    """The index, README's section, docs/reproductions.md and the run table: the figures are linked, not
    drawn, and the per-model pages not written (both slow on the whole board; that the same runs give
    the same bytes, figures and pages included, is the tests' above)."""
    (tmp_path / "leaderboard").mkdir()
    (tmp_path / "leaderboard" / "runs").symlink_to(COMMITTED_RUNS)
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    monkeypatch.chdir(tmp_path)
    publish.publish(Path("leaderboard/runs"), Path("leaderboard"), formats=("md", "csv", "parquet", "png", "svg"),
                    draw=False, pages=False)
    for path in ("leaderboard/LEADERBOARD.md", "leaderboard/leaderboards/results.csv", "README.md",
                 "docs/reproductions.md"):
        assert (tmp_path / path).read_text() == (ROOT / path).read_text(), f"{path} is stale: run {publish.command(Path('leaderboard/runs'), Path('leaderboard'))}"


@needs_committed_runs
def test_the_committed_runs_are_scored_as_kvbench_scores_them(tmp_path):
    copy = shutil.copytree(COMMITTED_RUNS, tmp_path / "runs")
    rescore(copy)
    compare = filecmp.dircmp(COMMITTED_RUNS, copy)

    def differing(cmp) -> list[str]:
        return [*cmp.diff_files, *cmp.left_only, *cmp.right_only,
                *(f"{name}/{d}" for name, sub in cmp.subdirs.items() for d in differing(sub))]

    assert not differing(compare), "kvbench.score --write changes these committed files"
