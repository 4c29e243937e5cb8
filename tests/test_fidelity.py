"""Fidelity of a compressed cache to the full cache over the gold answer: the metrics on hand-computed
logits, and their measurement in a run, which must leave its predictions alone."""

import dataclasses
import math

import pytest
import torch

from conftest import random_prompt
from kvbench.cache import KVCache, layer_windows
from kvbench.config import load_config
from kvbench.fidelity import compare, measure
from kvbench.generation import generate
from kvbench.methods import Compression, build_method
from kvbench.report import collect, leaderboard_markdown
from kvbench.results import RunDir
from kvbench.runner import RunSpec, run_task
from kvbench.tasks import Sample
from test_sampling import MODEL, TASK, DigitTokenizer


def test_metrics_by_hand():
    # row 0: full (1/3, 2/3) vs compressed (3/4, 1/4), target 1; row 1: both (3/4, 1/4), target 0
    full = torch.tensor([[0.0, math.log(2)], [math.log(3), 0.0]])
    compressed = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0]])
    f = compare(full, compressed, torch.tensor([1, 0]))
    kl_row0 = 1 / 3 * math.log((1 / 3) / (3 / 4)) + 2 / 3 * math.log((2 / 3) / (1 / 4))
    assert f.kl == pytest.approx(kl_row0 / 2)
    assert f.nll_delta == pytest.approx((math.log(4) - math.log(3 / 2)) / 2)  # -log 1/4 - (-log 2/3), then 0
    assert (f.top1_agreement, f.tokens) == (0.5, 2)
    # the same distributions: nothing lost
    same = compare(full, full + 5.0, torch.tensor([0, 1]))  # a shift of the logits is the same softmax
    assert (same.kl, same.nll_delta, same.top1_agreement) == (pytest.approx(0, abs=1e-12), pytest.approx(0, abs=1e-12), 1.0)
    with pytest.raises(ValueError, match="must match"):
        compare(full, compressed, torch.tensor([1]))


def fidelity_of(model, method, answer_len=6, question=True, params=None, **comp):
    prompt, question = random_prompt(40), random_prompt(5, seed=1) if question else None
    answer = random_prompt(answer_len, seed=2)
    make = lambda: KVCache(build_method(method, params or {}, Compression(**comp)), layer_windows(model.config))  # noqa: E731
    gen = generate(model, make(), prompt, question, 4, eos_ids=set(), keep_prefill=True, keep_compressed=True)
    return measure(model, make(), gen.prefilled, question, gen.compressed, answer)


@pytest.mark.parametrize("question", [True, False])
def test_a_cache_that_evicts_nothing_is_the_full_cache(tiny_llama, question):
    f = fidelity_of(tiny_llama, "streaming", question=question, budget=1000)
    assert f.kl == pytest.approx(0, abs=1e-6) and f.nll_delta == pytest.approx(0, abs=1e-5)
    assert (f.top1_agreement, f.tokens) == (1.0, 6)


@pytest.mark.parametrize("method,params", [("streaming", {}), ("snapkv", {}),
                                           # sparse attention for decoding queries only: fed as decoding does
                                           ("quest", {"page_size": 4, "dense_layers": 0})])
def test_an_evicting_cache_moves_the_distributions(tiny_llama, method, params):
    f = fidelity_of(tiny_llama, method, params=params, ratio=4)
    assert f.kl > 1e-4 and f.tokens == 6


def run(model, tmp_path, **over):
    cfg = load_config({"model": MODEL, "method": {"name": "streaming"}, "task": TASK, "budget": 16,
                       "results_dir": str(tmp_path), "summary": False, "report": False, **over})
    spec = RunSpec.from_config(cfg)
    run_task(model, DigitTokenizer(), spec, spec.task)
    run_dir = RunDir(spec.run_dir(spec.task).path)
    return run_dir.records(), run_dir.read_scores()


def test_fidelity_is_recorded_and_changes_no_prediction(tiny_llama, tmp_path):
    on, on_scores = run(tiny_llama, tmp_path / "on")
    off, off_scores = run(tiny_llama, tmp_path / "off", fidelity=False, prefill_reuse_gb=0)
    without = lambda r: {**r.to_json(), "fidelity": None, "finished_at": None}  # noqa: E731
    timing = ("prefill_s", "decode_s", "compress_s", "decode_compress_s", "prefill_reused")
    assert [{k: v for k, v in without(r).items() if k not in timing} for r in on] == \
           [{k: v for k, v in without(r).items() if k not in timing} for r in off]
    assert all(r.fidelity is None for r in off) and off_scores.fidelity is None
    assert all(r.fidelity.tokens == len(r.answers[0]) and r.fidelity.kl > 0 for r in on)  # one token a digit
    kl = [r.fidelity.kl for r in on]
    summary = on_scores.fidelity["kl"]
    assert summary["mean"] == pytest.approx(sum(kl) / len(kl)) and summary["n"] == len(on)
    assert summary["ci95"][0] <= summary["mean"] <= summary["ci95"][1]
    assert on_scores.score == off_scores.score and on_scores.ci95 == off_scores.ci95
    # the report recomputes them from the records, and shows them in the task's section
    (row,) = collect(tmp_path / "on").itertuples()
    assert (row.kl, row.kl_ci_low, row.kl_ci_high) == (summary["mean"], *summary["ci95"])
    page = leaderboard_markdown(collect(tmp_path / "on"), "tiny")
    assert "Fidelity to the full cache" in page and f"{summary['mean']:.3g} [" in page
    assert "Fidelity to the full cache" not in leaderboard_markdown(collect(tmp_path / "off"), "tiny")


def test_no_fidelity_for_the_full_cache_or_without_an_uncompressed_prefill(tiny_llama, tmp_path):
    full, full_scores = run(tiny_llama, tmp_path / "full", method={"name": "full"}, budget=None)
    chunked, _ = run(tiny_llama, tmp_path / "chunked", prefill_chunk=16)
    assert all(r.fidelity is None for r in full + chunked) and full_scores.fidelity is None
    spec = RunSpec.from_config(load_config({"model": MODEL, "method": {"name": "streaming"}, "task": TASK,
                                            "budget": 16}))
    answered = Sample(id="s", context="c", question="q", answers=["42"], max_new_tokens=4)
    assert spec.measures_fidelity(answered)
    # an answer given after a follow-up, or none at all, is not a continuation of the prompt
    for other in ({"followup": "Answer:"}, {"answers": []}, {"answers": [""]}):
        assert not spec.measures_fidelity(dataclasses.replace(answered, **other))
