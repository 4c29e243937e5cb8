"""kvbench as a user installs it: a wheel (not the checkout) in a fresh venv, run from a folder outside
the repository, through the console commands and ``python -m``.

The venv reuses the test environment's packages (torch, transformers, the embedded model) through a
``.pth`` line, so nothing is downloaded; kvbench itself comes only from the wheel. A venv created from
a venv does not see its parent's site-packages even with ``--system-site-packages``, hence the
``.pth``; its plain path line also keeps the parent's editable-install hook from being loaded.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "kvbench"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, venv folder, environment for its commands) with the wheel built from this checkout."""
    tmp = tmp_path_factory.mktemp("installed")
    # build from a copy, so the build writes no build/ or egg-info into the checkout
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "kvbench", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"),
                    str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("kvbench-*.whl"))

    env_dir = tmp / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "test_env_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # --ignore-installed: the test environment's own (editable) kvbench is visible and must not count
    subprocess.run([python, "-m", "pip", "-q", "--disable-pip-version-check", "install", "--no-deps",
                    "--no-index", "--ignore-installed", str(wheel)], check=True, capture_output=True, timeout=300)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}"
    env["OMP_NUM_THREADS"] = "1"
    return wheel, env_dir, env


@pytest.fixture
def user_folder(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    return folder


def run(args, folder, env, timeout=300):
    out = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args}: {out.stderr[-3000:]}"
    return out


def test_the_wheel_ships_every_config_and_task_file(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("conf", "task_data"):
        files = [p for p in (PACKAGE / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files
        missing = [p.relative_to(ROOT).as_posix() for p in files if p.relative_to(ROOT).as_posix() not in names]
        assert not missing
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for line in ("kvbench = kvbench.__main__:cli", "kvbench-score = kvbench.score:main",
                 "kvbench-report = kvbench.report:main"):
        assert line in scripts


def test_installed_help_runs_outside_the_checkout(installed, user_folder):
    _, env_dir, env = installed
    python = str(env_dir / "bin" / "python")
    where = run([python, "-c", "import kvbench; print(kvbench.__file__)"], user_folder, env).stdout.strip()
    assert Path(where).is_relative_to(env_dir), where  # the wheel's copy, not the checkout
    out = run([python, "-m", "kvbench", "--help"], user_folder, env).stdout
    assert "kvbench is powered by Hydra" in out
    assert "method: " in out and "streaming" in out and "task/longbench: " in out and "narrativeqa" in out


@pytest.mark.embedded
def test_installed_commands_run_score_and_report_one_sample(installed, user_folder):
    _, _, env = installed
    results = user_folder / "results"
    # method and ratio replace the default sweep's axes; one 256-token passkey sample
    run(["kvbench", "method=full", "ratio=null", "task=passkey", "task.lengths=[256]", "task.depths=[0.5]",
         "limit=1", "report=false", f"results_dir={results}"], user_folder, env)
    run_dir = results / "smollm2-135m" / "passkey" / "full" / "ratio-1"
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == 1
    scores = json.loads((run_dir / "scores.json").read_text())

    # re-scoring the saved prediction reproduces the run's own scores
    rescored = json.loads(run(["kvbench-score", "--write", str(results)], user_folder, env).stdout)
    assert rescored == {str(run_dir): scores}

    out = run(["kvbench-report", str(results)], user_folder, env).stdout
    assert f"index: {results / 'LEADERBOARD.md'}" in out
    assert "full" in (results / "LEADERBOARD.md").read_text()
