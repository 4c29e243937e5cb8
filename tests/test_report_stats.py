"""Intervals and paired comparisons in scores.json, the run table and the leaderboards."""

import json

from conftest import sample_record
from kvbench.results import RunScores, sample_scores
from kvbench.runner import summarize_run
from kvbench.stats import bootstrap_ci
from kvbench.tasks import task_from_identity

PASSKEY = {"name": "passkey", "kind": "passkey",
           "params": {"compress": "whole", "depths": [0.0, 1.0], "lengths": [512, 1024], "metric": "exact_match"}}


def test_scores_json_records_the_main_metrics_bootstrap_interval():
    task = task_from_identity(PASSKEY)
    hits = [1.0, 0.0, 1.0, 1.0]
    records = [sample_record(f"s{i}", meta={"length": 512, "depth": 0.0}, scores={"exact_match": h, "partial_match": h})
               for i, h in enumerate(hits)]
    scores = summarize_run(task, records, 4)
    interval = bootstrap_ci(hits)
    assert scores.ci95 == [round(100 * interval.low, 2), round(100 * interval.high, 2)]
    assert scores.ci95[0] < scores.score == 75.0 <= scores.ci95[1] == 100.0
    assert (scores.ci_method, scores.ci_resamples, scores.ci_seed) == ("percentile bootstrap", 10_000, 0)


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
