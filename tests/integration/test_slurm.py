"""A real sweep through the Slurm launcher, on a real single-node Slurm cluster on this machine
(scripts/slurm_up.sh, stopped again by scripts/slurm_down.sh at the end)."""

import fcntl
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
SLURM_DIR = Path(os.environ.get("KVBENCH_SLURM_DIR", "/var/spool/kvbench-slurm"))
SETTINGS = ["ratio-2", "ratio-2_sink_tokens-8", "ratio-4", "ratio-4_sink_tokens-8"]


def _running(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="module")
def slurm_env():
    """The environment to reach the cluster of scripts/slurm_up.sh. The cluster is stopped at the end
    unless it was up before (then it is someone else's and stays up)."""
    if os.geteuid() != 0:
        pytest.skip("Slurm's daemons and the Debian packages need root")
    # Test sessions on one machine take turns: they would share the daemons and their ports.
    with open(Path(tempfile.gettempdir()) / "kvbench-slurm-test.lock", "w") as lock:
        deadline = time.monotonic() + 900
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail("another test session has held the Slurm test cluster for 15 minutes")
                time.sleep(2)
        env = {**os.environ, "KVBENCH_SLURM_DIR": str(SLURM_DIR), "SLURM_CONF": str(SLURM_DIR / "etc/slurm.conf")}
        was_up = _running(SLURM_DIR / "run/slurmctld.pid")
        up = subprocess.run(["bash", "scripts/slurm_up.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
        if up.returncode == 3:  # the packages cannot be installed on this machine
            pytest.skip(f"no Slurm here: {up.stderr.strip()}")
        try:
            assert up.returncode == 0, f"scripts/slurm_up.sh failed:\n{up.stdout}\n{up.stderr}"
            yield env
        finally:
            if not was_up:
                down = subprocess.run(["bash", "scripts/slurm_down.sh"], cwd=ROOT, env=env, capture_output=True,
                                      text=True, timeout=300)
                assert down.returncode == 0, f"scripts/slurm_down.sh failed:\n{down.stdout}\n{down.stderr}"


@pytest.fixture(scope="module")
def sweep(slurm_env, tmp_path_factory):
    """2 ratios x 2 StreamingLLM sink sizes, one short passkey each, as 4 Slurm jobs: 1 CPU each, so
    that the 2-CPU node runs 2 at a time. The launcher returns when every job has ended."""
    results = tmp_path_factory.mktemp("slurm-results")
    args = [
        sys.executable, "-m", "kvbench", "-m", "hydra/launcher=slurm",
        "method=streaming", "ratio=2,4", "method.sink_tokens=4,8",
        "task=passkey", "task.lengths=[200]", "task.depths=[0.5]", f"results_dir={results}",
        "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=20",
    ]
    # sbatch exports the submitting environment to the jobs: one torch thread per job's CPU
    env = {**slurm_env, "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    try:
        out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the sweep did not end in 15 minutes:\n{e.stdout}\n{e.stderr}\n{job_logs(results)}")
    print(f"slurm sweep: {time.monotonic() - started:.0f} s")
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}\n{job_logs(results)}"
    return results, out


def job_logs(results: Path) -> str:
    """The tails of the jobs' logs, for failure messages."""
    logs = sorted(results.glob("_hydra/multirun/*/.submitit/*/*.out"))
    return "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in logs)


def test_sweep_runs_every_configuration_as_a_slurm_job(sweep):
    results, out = sweep
    assert "Submitit 'slurm' sweep output dir" in out.stderr + out.stdout
    finished = list(results.glob("_hydra/multirun/*/.submitit/*/*_result.pkl"))
    assert len(finished) == len(SETTINGS), job_logs(results)
    base = results / "smollm2-135m/passkey/streaming"
    assert sorted(p.name for p in base.iterdir()) == SETTINGS
    for setting in SETTINGS:
        scores = json.loads((base / setting / "scores.json").read_text())
        meta = json.loads((base / setting / "run.json").read_text())
        assert scores["n"] == scores["n_expected"] == 1 and scores["complete"], setting
        assert meta["status"] == "complete" and meta["identity"]["compression"]["label"] == setting
        assert len((base / setting / "samples.jsonl").read_text().splitlines()) == 1


def test_report_reads_the_sweep(sweep):
    if importlib.util.find_spec("kvbench.report") is None:
        pytest.skip("kvbench/report.py does not exist (yet): nothing to check the results with")
    results, _ = sweep
    out = subprocess.run([sys.executable, "-m", "kvbench.report", str(results), "--format", "md", "csv"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    index = (results / "LEADERBOARD.md").read_text()
    assert "streaming" in index
    assert (results / "leaderboards/results.csv").read_text().count("streaming") >= len(SETTINGS)
