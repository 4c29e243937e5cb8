"""The Hydra app as a user runs it: help, config printing, errors, and a real multirun sweep."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def kvbench(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "kvbench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_config_groups_and_choices():
    out = kvbench("--help")
    assert out.returncode == 0
    for line in ("method: ", "model: ", "task: "):
        assert line in out.stdout
    assert "smollm2-135m" in out.stdout and "gemma3-270m" in out.stdout and "streaming" in out.stdout


def test_cfg_job_prints_the_resolved_config():
    out = kvbench("--cfg", "job", "method=streaming", "ratio=8")
    assert out.returncode == 0, out.stderr
    assert "name: streaming" in out.stdout and "ratio: 8" in out.stdout


def test_unknown_method_lists_the_choices():
    out = kvbench("method=nope")
    assert out.returncode != 0
    assert "unknown method 'nope'; valid: " in out.stderr and "streaming" in out.stderr


def test_bad_ratio_is_a_config_error_before_loading(tmp_path):
    out = kvbench("method=streaming", "ratio=0.5", f"results_dir={tmp_path}")
    assert out.returncode == 2
    assert "ratio=0.5: expected a number >= 1, or null" in out.stderr
    assert "loading model" not in out.stderr + out.stdout


@pytest.mark.embedded
def test_multirun_sweep_writes_one_record_per_configuration(tmp_path):
    out = kvbench("-m", "method=full,streaming", "ratio=2,4", "task=passkey", "task.lengths=[200]",
                  "task.depths=[0.5]", f"results_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    scores = sorted(tmp_path.glob("smollm2-135m/passkey/*/*/scores.json"))
    settings = [p.parent.relative_to(tmp_path / "smollm2-135m/passkey").as_posix() for p in scores]
    # full has no ratio: both of its jobs write the single ratio-1 record
    assert settings == ["full/ratio-1", "streaming/ratio-2", "streaming/ratio-4"]
    for path in scores:
        data = json.loads(path.read_text())
        assert data["n"] == data["n_expected"] == 1 and data["complete"]
        lines = (path.parent / "samples.jsonl").read_text().splitlines()
        assert len(lines) == 1
    table = out.stdout[out.stdout.index("measured ratio"):]
    assert table.count("streaming") == 2 and table.count("full") == 1
