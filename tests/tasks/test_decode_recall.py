"""decode_recall: samples, scorers, config; and on the embedded model, full recalls the word after the
count while StreamingLLM at a budget below the count loses it."""

import pytest

from conftest import sample_record
from kvbench.config import load_config
from kvbench.errors import ConfigError
from kvbench.results import RunDir
from kvbench.scoring.decode_recall import answer_part, counted, recalled
from kvbench.tasks import build_task

FOLLOWUP = "\nThe secret word is"


def task(**params):
    return build_task({"name": "decode_recall", "kind": "decode_recall", **params})


def test_samples_are_seeded_and_carry_the_followup():
    samples = task(count_to=[12, 40], samples=3, seed=1).samples(None, None)
    assert [s.id for s in samples] == ["N12-0", "N12-1", "N12-2", "N40-0", "N40-1", "N40-2"]
    first = samples[0]
    word = first.answers[0]
    assert first.context == f"The secret word is {word}. Remember it.\nNow count to 12: 1, 2, 3,"
    assert (first.question, first.chat_template, first.meta) == ("", False, {"count_to": 12})
    assert first.stop_strings == [" 12,", "\n"] and first.followup == FOLLOWUP and first.followup_new_tokens == 4
    def words(seed):
        return [s.answers for s in task(count_to=[12, 40], samples=3, seed=seed).samples(None, None)]

    assert [s.answers for s in samples] == words(1) and words(1) != words(2)


def test_scorers():
    pred = " 4, 5, 6, 7,\nThe secret word is Zebra."
    assert answer_part(pred, FOLLOWUP) == " Zebra."
    assert recalled(pred, "zebra", FOLLOWUP) == 1.0
    assert recalled(" 4, 5,\nThe secret word is the zebra", "zebra", FOLLOWUP) == 0.0  # the first word counts
    assert recalled(" 4, 5, 6, 7, 8, 9", "zebra", FOLLOWUP) == 0.0  # no follow-up: no answer
    assert counted(pred, 7, FOLLOWUP) == 1.0
    assert counted(" 4, 5, 7,\nThe secret word is zebra", 7, FOLLOWUP) == 0.0  # a number skipped
    assert counted(" 4, 5, 6,\nThe secret word is zebra", 7, FOLLOWUP) == 0.0  # stopped short
    record = sample_record("N7-0", task="decode_recall", pred=pred, answers=["zebra"], meta={"count_to": 7})
    assert task().score(record) == {"recalled": 1.0, "counted": 1.0}


@pytest.mark.parametrize("params,problem", [
    ({"count_to": [3]}, r"decode_recall.count_to=\[3\]: expected a non-empty list of distinct integers >= 4"),
    ({"count_to": []}, "decode_recall.count_to=.*expected a non-empty list"),
    ({"samples": 0}, "decode_recall.samples=0: expected an integer >= 1"),
    ({"answer_tokens": 0}, "decode_recall.answer_tokens=0: expected an integer >= 1"),
])
def test_bad_parameters(params, problem):
    with pytest.raises(ConfigError, match=problem):
        task(**params)


def test_config_composes(compose):
    cfg = load_config(compose(["task=decode_recall", "method=h2o", "budget=64", "task.samples=4"]))
    t = build_task(cfg.task)
    assert (t.params.count_to, t.params.samples, cfg.budget) == ([40], 4, 64)


@pytest.mark.embedded
def test_full_recalls_the_word_and_streaming_at_a_decode_time_budget_loses_it(embedded, tmp_path):
    """The prompt (26 tokens) fits budget 64, the count (about 125 tokens) does not: StreamingLLM
    evicts the word while counting. Both count correctly; only the full cache still has the word."""
    from conftest import EMBEDDED
    from kvbench.runner import RunSpec, run_task

    model, tokenizer = embedded
    scores = {}
    for method in ("full", "streaming"):
        cfg = load_config({"model": vars(EMBEDDED), "method": {"name": method}, "task": {
            "name": "decode_recall", "kind": "decode_recall", "samples": 2}, "budget": 64 if method != "full" else None,
            "results_dir": str(tmp_path), "summary": False, "report": False})
        spec = RunSpec.from_config(cfg)
        scores[method] = run_task(model, tokenizer, spec, spec.task)["metrics"]
    assert scores["full"] == {"recalled": 100.0, "counted": 100.0}
    assert scores["streaming"] == {"recalled": 0.0, "counted": 100.0}
    # fidelity, which never compresses over the continuation: the prompt fits the budget, so over the
    # full cache's greedy count (stopped at " 40,") both caches are the same; no gold fidelity (the
    # answer follows the follow-up)
    for record in RunDir(spec.run_dir(spec.task).path).records():
        greedy = record.fidelity_greedy
        assert record.fidelity is None and greedy.tokens > 100
        assert greedy.kl == pytest.approx(0, abs=1e-4) and greedy.top1_agreement == 1.0
