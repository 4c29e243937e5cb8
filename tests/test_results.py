"""Results files: typed records with a schema version, identities without prose or local paths, and
directories written before schema versions existed (tests/fixtures/results_v0, written by kvbench
before this schema) that still resume and still report."""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest

import kvbench.runner as runner
from conftest import run_info, sample_record
from kvbench import report
from kvbench.config import load_config
from kvbench.errors import ConfigError
from kvbench.results import (SCHEMA_VERSION, RunDir, RunIdentity, RunScores, SampleRecord, SchemaError,
                             find_runs, record_line)
from kvbench.runner import RunSpec
from kvbench.score import main as score_main
from kvbench.summary import row_from_disk
from kvbench.tasks import build_task

ROOT = Path(__file__).resolve().parents[1]
V0 = ROOT / "tests" / "fixtures" / "results_v0"
MODEL_DIR = "smollm2-135m"
LONGBENCH_DATA = ROOT / "tests" / "data" / "longbench"


def v0_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(V0, tmp_path / "results"))


def v0_run(results: Path, task: str, method: str, setting: str) -> RunDir:
    return RunDir(results / MODEL_DIR / task / method / setting)


# ---------------------------------------------------------------------------------------------
# Typed records
# ---------------------------------------------------------------------------------------------


def test_a_record_round_trips_and_keeps_every_key_of_the_old_schema():
    record = sample_record("a", meta={"length": 512, "depth": 0.5})
    line = record_line(record.to_json())
    assert SampleRecord.from_json(json.loads(line)) == record
    old = json.loads(v0_run(V0, "passkey", "streaming", "ratio-4").samples_path.read_text().splitlines()[0])
    written = json.loads(line)
    # fields added since have defaults, so old records read as they were
    assert set(old) < set(written) and set(written) - set(old) == {"schema_version", "completions", "fidelity", "fidelity_greedy",
                                                                   "cluster"}
    assert set(written["kv"]) - set(old["kv"]) == {"peak_tokens_held", "curve", "decode_bytes_read"}
    assert set(old["kv"]["after_prefill"]) == set(written["kv"]["at_end"])
    assert SampleRecord.from_json(old).completions == [] and SampleRecord.from_json(old).kv.curve is None
    assert SampleRecord.from_json(old).fidelity is None and SampleRecord.from_json(old).fidelity_greedy is None
    assert SampleRecord.from_json(old).cluster is None
    assert written["schema_version"] == SCHEMA_VERSION == 1


def test_scores_and_run_files_carry_the_schema_version(tmp_path):
    run = RunDir(tmp_path)
    run.write_run(run_info({"name": "passkey", "kind": "passkey", "params": {}}))
    run.write_scores(RunScores(task="passkey", metric="exact_match", score=None, metrics={}, n=0, n_expected=1,
                               complete=False, measured_ratio=None, tokens_held=None, bytes_held=None,
                               peak_bytes_held=None, decode_tokens_per_s=None))
    for name in ("run.json", "scores.json"):
        assert json.loads((tmp_path / name).read_text())["schema_version"] == SCHEMA_VERSION
    assert "schema_version" not in json.loads((tmp_path / "run.json").read_text())["identity"]
    assert run.read_run().identity.schema_version == SCHEMA_VERSION


def test_files_of_a_newer_schema_or_of_another_shape_are_refused_by_name(tmp_path):
    newer = {**sample_record("a").to_json(), "schema_version": SCHEMA_VERSION + 1}
    with pytest.raises(SchemaError, match="schema_version 2 is not one this kvbench reads.*newer kvbench writes"):
        SampleRecord.from_json(newer)
    partial = sample_record("a").to_json()
    del partial["pred"]
    with pytest.raises(SchemaError, match=r"here: not a SampleRecord \(missing \['pred'\], unexpected \[\]\)"):
        SampleRecord.from_json(partial, "here")
    (tmp_path / "scores.json").write_text(json.dumps({"task": "t", "extra": 1}))
    with pytest.raises(SchemaError, match="scores.json: not a RunScores .*unexpected \\['extra'\\]"):
        RunDir(tmp_path).read_scores()


# ---------------------------------------------------------------------------------------------
# Identity: what determines results, nothing else
# ---------------------------------------------------------------------------------------------


def longbench_spec(results: Path, data_dir: Path) -> RunSpec:
    return RunSpec.from_config(load_config({
        "model": {"name": "m", "source": "hub", "path": "m"}, "method": {"name": "streaming"}, "ratio": 4,
        "task": {"name": "trec", "kind": "longbench", "tasks": ["trec"], "data_dir": str(data_dir)},
        "results_dir": str(results)}))


def test_identity_holds_the_datas_content_not_its_folder(tmp_path):
    moved = Path(shutil.copytree(LONGBENCH_DATA, tmp_path / "moved"))
    here, there = (longbench_spec(tmp_path, d) for d in (LONGBENCH_DATA, moved))
    (task,) = here.task.subtasks()
    identity = here.identity(task)
    assert identity == there.identity(there.task.subtasks()[0])
    assert "data_dir" not in identity.task["params"] and str(LONGBENCH_DATA) not in json.dumps(identity.to_json())
    assert identity.data == {"sha256": {"trec.jsonl": hashlib.sha256((LONGBENCH_DATA / "trec.jsonl").read_bytes()).hexdigest()}}
    # other data in the same place is another configuration
    with open(moved / "trec.jsonl", "a") as f:
        f.write("\n")
    assert there.identity(there.task.subtasks()[0]).differences(identity) == ["data"]


def test_ruler_identity_holds_the_files_it_reads_not_their_folders(tmp_path):
    data = ROOT / "tests" / "fixtures" / "ruler" / "data"
    moved = Path(shutil.copytree(data, tmp_path / "moved"))

    def subtask(name, **params):
        (sub,) = build_task({"name": "ruler", "kind": "ruler", "tasks": [name], **params}).subtasks()
        return sub

    here, there = subtask("niah_single_2", data_dir=str(data)), subtask("niah_single_2", data_dir=str(moved))
    assert here.describe() == there.describe() and "data_dir" not in here.describe()["params"]
    essays = hashlib.sha256((data / "PaulGrahamEssays.json").read_bytes()).hexdigest()
    assert here.data_fingerprint() == there.data_fingerprint() == {"sha256": {"PaulGrahamEssays.json": essays}}
    assert subtask("vt", data_dir=str(data)).data_fingerprint() is None  # generated from nothing read
    kvpress = subtask("vt", source="kvpress", lengths=[4096], kvpress_dir=str(data.parent / "kvpress"))
    assert list(kvpress.data_fingerprint()["sha256"]) == ["4096/test-00000-of-00001.parquet"]


def test_identity_holds_no_prose():
    spec = RunSpec.from_config(load_config({
        "model": {"name": "m", "source": "hub", "path": "m"}, "method": {"name": "quant"}, "ratio": 2,
        "task": {"name": "passkey", "kind": "passkey"}}))
    identity = spec.identity(spec.task)
    assert set(identity.method) == {"name", "params", "phases"}  # no sentence, no derived bits in use
    assert identity.data is None  # passkey reads no data files


def test_old_identities_are_read_in_the_current_meaning():
    info = v0_run(V0, "trec", "streaming", "ratio-4").read_run()
    raw = json.loads((v0_run(V0, "trec", "streaming", "ratio-4").path / "run.json").read_text())["identity"]
    assert "sliding_window_layers" in raw["method"] and "data_dir" in raw["task"]["params"]  # what v0 wrote
    assert info.identity.method == {"name": "streaming", "params": {"sink_tokens": 4},
                                    "phases": ["prefill", "append", "decode"]}
    assert "data_dir" not in info.identity.task["params"] and info.identity.schema_version == 0
    # a v0 identity has no data fingerprint: any data matches it; a current one must match exactly
    current = RunIdentity(**{**info.identity.to_json(), "data": {"sha256": "x"}})
    assert current.differences(info.identity) == []
    assert current.differences(RunIdentity(**info.identity.to_json())) == ["data"]


# ---------------------------------------------------------------------------------------------
# Directories written before schema versions: report, re-score, resume
# ---------------------------------------------------------------------------------------------


def test_old_directories_report(tmp_path):
    results = v0_copy(tmp_path)
    df = report.collect(results)
    assert len(df) == 7 and set(df.state) == {"complete"}
    samsum = df[(df.task == "samsum") & (df.method == "streaming")].iloc[0]
    assert (samsum.score, samsum.baseline_score) == (26.67, 52.63)
    assert samsum.retention == pytest.approx(100 * 26.67 / 52.63)
    assert "data_dir" not in json.loads(samsum.task_params)
    written = report.write_report(results, formats=["md", "png"])
    assert results / "leaderboards" / "plots" / MODEL_DIR / "passkey" / "passkey_streaming_ratio-4.png" in written
    assert "## LongBench category: few-shot" in (results / "leaderboards" / f"{MODEL_DIR}.md").read_text()
    rows = [row_from_disk(run) for run in find_runs(results)]
    assert {(r["task"], r["setting"], r["score"]) for r in rows} >= {("trec_e", "ratio-1", 33.33)}


def test_old_directories_rescore_in_place(tmp_path, capsys):
    results = v0_copy(tmp_path)
    before = {run.path: run.read_scores() for run in find_runs(results)}
    assert score_main([str(results), "--write"]) == 0
    for run in find_runs(results):
        after = run.read_scores()
        # the same scorer: the same scores, now with the main metric's interval added
        assert after.ci95 is not None and after.ci95[0] <= after.score <= after.ci95[1]
        no_interval = {"ci95": None, "ci_method": None, "ci_resamples": None, "ci_seed": None}
        assert dataclasses.replace(after, **no_interval) == before[run.path]
        assert json.loads(run.samples_path.read_text().splitlines()[0])["schema_version"] == SCHEMA_VERSION


@pytest.mark.embedded
def test_old_directories_resume(tmp_path, embedded, monkeypatch):
    results = v0_copy(tmp_path)
    moved = tmp_path / "data"  # the LongBench data moved since the directories were written
    shutil.copytree(LONGBENCH_DATA, moved)
    passkey = v0_run(results, "passkey", "streaming", "ratio-4")
    old_record = json.loads(passkey.samples_path.read_text())
    passkey.samples_path.write_text("")  # its only sample lost: the resumed run generates it again

    def config(run: RunDir):
        values = json.loads((run.path / "run.json").read_text())["config"]
        values["results_dir"] = str(results)
        if values["task"]["kind"] == "longbench":
            values["data_dir"] = values["task"]["data_dir"] = str(moved)
        return load_config(values)

    rows = runner.run(config(passkey))
    new_record = json.loads(passkey.samples_path.read_text())
    # the same prediction, scores and bytes as the code that wrote the directory
    for key in ("id", "pred", "scores", "prompt_tokens", "new_tokens"):
        assert new_record[key] == old_record[key], key
    assert new_record["kv"]["after_prefill"] == old_record["kv"]["after_prefill"]
    assert rows[0]["complete"] and rows[0]["score"] == 0.0
    info = passkey.read_run()
    assert info.schema_version == SCHEMA_VERSION and info.started == "2026-12-02T05:57:00+00:00"

    # complete LongBench directories resume with nothing to do, and take the data's fingerprint
    monkeypatch.setattr(runner, "run_sample", lambda *a: pytest.fail("a finished sample generated again"))
    trec = v0_run(results, "trec", "streaming", "ratio-4")
    rows = runner.run(config(trec))
    # they ran with limit=1 of the fixture's 2 samples per task: partial, and still resumable
    assert [(r["task"], r["n"], r["n_expected"], r["complete"]) for r in rows] == [("trec", 1, 2, False),
                                                                                  ("samsum", 1, 2, False)]
    assert list(trec.read_run().identity.data["sha256"]) == ["trec.jsonl"]
    assert "sliding_window_layers" not in json.loads((trec.path / "run.json").read_text())["identity"]["method"]

    # and what determines results is still checked
    values = json.loads((trec.path / "run.json").read_text())["config"]
    values.update(results_dir=str(results), data_dir=str(moved))
    values["task"].update(data_dir=str(moved), compress="context")
    with pytest.raises(ConfigError, match="different configuration.*task"):
        runner.run(load_config(values))
