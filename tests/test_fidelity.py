"""Fidelity of a compressed cache to the full cache over the gold answer and over the full cache's greedy
output: the metrics on hand-computed logits, and their measurement in a run, which must leave its
predictions alone."""

import dataclasses
import math

import pytest
import torch

from conftest import random_prompt
from kvbench import runner
from kvbench.cache import KVCache, layer_windows
from kvbench.config import load_config
from kvbench.fidelity import compare, greedy_continuation, measure
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


def cache_of(model, method, params=None, **comp):
    compression = Compression(**comp) if comp else None
    return KVCache(build_method(method, params or {}, compression), layer_windows(model.config))


def compressed_run(model, method, question=True, params=None, **comp):
    """(prompt, question, generation keeping its prefill and compressed cache) of a random prompt."""
    prompt, question = random_prompt(40), random_prompt(5, seed=1) if question else None
    gen = generate(model, cache_of(model, method, params, **comp), prompt, question, 4, eos_ids=set(),
                   keep_prefill=True, keep_compressed=True)
    return prompt, question, gen


def fidelity_of(model, method, answer_len=6, question=True, params=None, **comp):
    _, question, gen = compressed_run(model, method, question, params, **comp)
    return measure(model, gen.prefilled, question, gen.compressed, random_prompt(answer_len, seed=2))


def greedy_fidelity_of(model, method, question=True, params=None, new_tokens=7, **comp):
    prompt, question, gen = compressed_run(model, method, question, params, **comp)
    greedy = greedy_continuation(model, gen.prefilled, prompt, question, new_tokens, eos_ids=set())
    return greedy, measure(model, gen.prefilled, question, gen.compressed, greedy)


@pytest.mark.parametrize("question", [True, False])
def test_a_cache_that_evicts_nothing_is_the_full_cache(tiny_llama, question):
    f = fidelity_of(tiny_llama, "streaming", question=question, budget=1000)
    assert f.kl == pytest.approx(0, abs=1e-6) and f.nll_delta == pytest.approx(0, abs=1e-5)
    assert (f.top1_agreement, f.tokens) == (1.0, 6)
    _, g = greedy_fidelity_of(tiny_llama, "streaming", question=question, budget=1000)
    assert g.kl == pytest.approx(0, abs=1e-6) and g.nll_delta == pytest.approx(0, abs=1e-5)
    assert (g.top1_agreement, g.tokens) == (1.0, 7)


@pytest.mark.parametrize("method,params", [("snapkv", {}), ("h2o", {})])  # h2o: a store of its own (scores)
def test_the_greedy_continuation_is_the_full_caches_generation(tiny_llama, method, params):
    prompt, question, gen = compressed_run(tiny_llama, method, params=params, ratio=4)
    full = generate(tiny_llama, cache_of(tiny_llama, "full"), prompt, question, 7, eos_ids=set())
    greedy = greedy_continuation(tiny_llama, gen.prefilled, prompt, question, 7, eos_ids=set())
    assert greedy.tolist() == full.tokens and greedy.shape == (1, 7)
    # it stops as generation does: at an EOS id, which it keeps as its last token
    stopped = greedy_continuation(tiny_llama, gen.prefilled, prompt, question, 7, eos_ids={full.tokens[0][2]})
    assert stopped.tolist() == [full.tokens[0][:3]]
    # over it the full cache's most likely token is the one fed: agreement is the share the compressed
    # cache would have generated too
    f = measure(tiny_llama, gen.prefilled, question, gen.compressed, greedy)
    assert f.kl > 1e-4 and f.tokens == 7 and f.top1_agreement in {i / 7 for i in range(8)}


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
    without = lambda r: {**r.to_json(), "fidelity": None, "fidelity_greedy": None, "finished_at": None}  # noqa: E731
    timing = ("prefill_s", "decode_s", "compress_s", "decode_compress_s", "prefill_reused")
    assert [{k: v for k, v in without(r).items() if k not in timing} for r in on] == \
           [{k: v for k, v in without(r).items() if k not in timing} for r in off]
    assert all(r.fidelity is None and r.fidelity_greedy is None for r in off)
    assert off_scores.fidelity is None and off_scores.fidelity_greedy is None
    assert all(r.fidelity.tokens == len(r.answers[0]) and r.fidelity.kl > 0 for r in on)  # one token a digit
    # no EOS: the full cache's greedy output runs to max_new_tokens
    assert all(r.fidelity_greedy.tokens == TASK["max_new_tokens"] and r.fidelity_greedy.kl > 0 for r in on)
    assert on_scores.fidelity_greedy["kl"]["n"] == len(on)
    kl = [r.fidelity.kl for r in on]
    summary = on_scores.fidelity["kl"]
    assert summary["mean"] == pytest.approx(sum(kl) / len(kl)) and summary["n"] == len(on)
    assert summary["ci95"][0] <= summary["mean"] <= summary["ci95"][1]
    assert on_scores.score == off_scores.score and on_scores.ci95 == off_scores.ci95
    # the report recomputes them from the records, and shows them in the task's section
    (row,) = collect(tmp_path / "on").itertuples()
    assert (row.kl, row.kl_ci_low, row.kl_ci_high) == (summary["mean"], *summary["ci95"])
    greedy = on_scores.fidelity_greedy["top1_agreement"]
    assert (row.greedy_top1_agreement, row.greedy_top1_agreement_ci_low, row.greedy_top1_agreement_ci_high) == \
           (greedy["mean"], *greedy["ci95"])
    page = leaderboard_markdown(collect(tmp_path / "on"), "tiny")
    assert "Fidelity to the full cache" in page and f"{summary['mean']:.3g} [" in page
    assert "| gold answer |" in page and "| greedy output |" in page
    assert "Fidelity to the full cache" not in leaderboard_markdown(collect(tmp_path / "off"), "tiny")


def test_the_full_caches_greedy_output_is_decoded_once_per_prompt(tiny_llama, tmp_path, monkeypatch):
    """Another compression of the same prompts measures its fidelity against the greedy output
    decoded for the first, with the figures a fresh decoding gives."""
    decoded = []
    real = runner.greedy_continuation
    monkeypatch.setattr(runner, "greedy_continuation", lambda *a, **k: decoded.append(1) or real(*a, **k))
    monkeypatch.setattr(runner, "_greedy", runner.GreedyStore())
    first, _ = run(tiny_llama, tmp_path / "first")
    assert len(decoded) == len(first) > 1  # one per prompt: the key tells the prompts apart
    reused, _ = run(tiny_llama, tmp_path / "reused", budget=8)
    assert len(decoded) == len(first)
    monkeypatch.setattr(runner, "_greedy", runner.GreedyStore())
    fresh, _ = run(tiny_llama, tmp_path / "fresh", budget=8)
    assert len(decoded) == 2 * len(first)
    assert [r.fidelity_greedy for r in reused] == [r.fidelity_greedy for r in fresh]
    assert [r.fidelity_greedy for r in reused] != [r.fidelity_greedy for r in first]  # another compression


def test_a_greedy_full_cache_run_serves_its_output_to_the_compressed_runs_after_it(tiny_llama, tmp_path,
                                                                                   monkeypatch):
    decoded = []
    real = runner.greedy_continuation
    monkeypatch.setattr(runner, "greedy_continuation", lambda *a, **k: decoded.append(1) or real(*a, **k))
    monkeypatch.setattr(runner, "_greedy", runner.GreedyStore())
    run(tiny_llama, tmp_path / "sampled", method={"name": "full"}, budget=None, decoding={"temperature": 1.0})
    run(tiny_llama, tmp_path / "full", method={"name": "full"}, budget=None)
    after_full, _ = run(tiny_llama, tmp_path / "after")
    assert decoded == []
    monkeypatch.setattr(runner, "_greedy", runner.GreedyStore())
    run(tiny_llama, tmp_path / "sampled_only", method={"name": "full"}, budget=None, decoding={"temperature": 1.0})
    fresh, _ = run(tiny_llama, tmp_path / "fresh")
    assert len(decoded) == len(fresh) > 1  # a sampled output is no greedy continuation
    assert [r.fidelity_greedy for r in after_full] == [r.fidelity_greedy for r in fresh]


def test_no_fidelity_for_the_full_cache_or_without_an_uncompressed_prefill(tiny_llama, tmp_path):
    full, full_scores = run(tiny_llama, tmp_path / "full", method={"name": "full"}, budget=None)
    chunked, _ = run(tiny_llama, tmp_path / "chunked", prefill_chunk=16)
    assert all(r.fidelity is None and r.fidelity_greedy is None for r in full + chunked)
    assert full_scores.fidelity is None and full_scores.fidelity_greedy is None
    spec = RunSpec.from_config(load_config({"model": MODEL, "method": {"name": "streaming"}, "task": TASK,
                                            "budget": 16}))
    answered = Sample(id="s", context="c", question="q", answers=["42"], max_new_tokens=4)
    assert spec.measures_fidelity() and spec.measures_gold_fidelity(answered)
    # an answer given after a follow-up, or none at all, is not a continuation of the prompt (the greedy
    # output still is)
    for other in ({"followup": "Answer:"}, {"answers": []}, {"answers": [""]}):
        assert not spec.measures_gold_fidelity(dataclasses.replace(answered, **other))
