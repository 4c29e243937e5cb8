"""A fixed small sweep must keep giving the same predictions, scores and KV figures.

Every method of the fixture runs at ratio 4 and at a budget of 32 tokens (methods that take no
budget: ratio only) on two 256-token passkey prompts of the embedded model, through the command
line a user types. ``tests/fixtures/regression/expected.json`` holds what the code gave when the
fixture was written; a refactoring that changes any prediction, score or byte held fails here.
``KVBENCH_WRITE_REGRESSION=1`` rewrites the fixture from the sweep instead of checking it (only when
a change of results is intended, and said so in its commit).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "regression" / "expected.json"
TASK = ["task=passkey", "task.lengths=[256]", "task.depths=[0.0,1.0]", "summary=false", "report=false"]
SETTINGS = {"ratio-4": ["ratio=4"], "budget-32": ["ratio=null", "budget=32"]}
KV_FIELDS = ("bytes_full", "bytes_held", "tokens_held", "tokens_per_layer")


def observed(record: dict) -> dict:
    """What is compared of one sample record (no timings)."""
    kv = record["kv"]
    return {
        "pred": record["pred"],
        "scores": record["scores"],
        "prompt_tokens": record["prompt_tokens"],
        "new_tokens": record["new_tokens"],
        "stopped_by": record["stopped_by"],
        "after_prefill": {k: kv["after_prefill"][k] for k in KV_FIELDS},
        "at_end": {k: kv["at_end"][k] for k in KV_FIELDS},
        "peak_bytes_held": kv["peak_bytes_held"],
    }


def collect(results_dir: Path) -> dict:
    """``{"<method>/<setting>/<sample id>": observed record}`` for every run under ``results_dir``."""
    found = {}
    for samples in sorted(results_dir.rglob("samples.jsonl")):
        method, setting = samples.parent.parent.name, samples.parent.name
        for line in samples.read_text().splitlines():
            record = json.loads(line)
            found[f"{method}/{setting}/{record['id']}"] = observed(record)
    return found


@pytest.mark.embedded
def test_fixed_sweep_gives_the_recorded_results(tmp_path):
    expected = json.loads(FIXTURE.read_text())
    for setting, overrides in SETTINGS.items():
        methods = sorted({key.split("/")[0] for key in expected if key.split("/")[1] == setting})
        if setting == "ratio-4":
            methods.append("full")  # its one setting is ratio-1
        done = subprocess.run(
            [sys.executable, "-m", "kvbench", "-m", f"method={','.join(methods)}", *overrides, *TASK,
             f"results_dir={tmp_path}"],
            capture_output=True, text=True,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    got = collect(tmp_path)
    if os.environ.get("KVBENCH_WRITE_REGRESSION"):
        FIXTURE.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote {FIXTURE}")
    assert sorted(got) == sorted(expected)
    differing = [key for key in expected if got[key] != expected[key]]
    assert not differing, {key: (got[key], expected[key]) for key in differing[:3]}
