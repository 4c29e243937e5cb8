"""Predefined capacity beyond the shared method matrix (which checks every method's bound, also with a
chunked prefill): ``evict_every``, methods that refuse a budget, one chunk as the one-step prefill
bit for bit (every method), chunks and prefill reuse, the run identity, the docs' capacity table."""

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import EMBEDDED, random_prompt
from kvbench.cache import KVCache, layer_windows
from kvbench.config import load_config
from kvbench.errors import ConfigError
from kvbench.generation import generate
from kvbench.methods import (CAPACITY_TABLE_BEGIN, CAPACITY_TABLE_END, Compression, build_method, capacity_table,
                             registered)
from kvbench.runner import RunSpec
from test_method_matrix import BUDGET, budget_run, check_held

METHODS = registered()


def test_evict_every_bounds_prefill_only_methods_by_budget_plus_k_minus_1(tiny_llama):
    gen, cache, method, held = budget_run(tiny_llama, "snapkv", budget=BUDGET, evict_every=8)
    assert method.held_bound("decode") == BUDGET + 7
    sizes = [layers[0][0] // cache.layers[0].token_bytes() for _, layers in held]
    # 64 after the prefill, then it grows to 71 and the 72nd token brings it back to 64
    assert sizes[:10] == [64, 65, 66, 67, 68, 69, 70, 71, 64, 65]
    check_held(method, held)


@pytest.mark.parametrize("comp", [{"ratio": 2, "evict_every": 4}, {"budget": 8, "evict_every": 0}])
def test_evict_every_needs_a_budget_and_is_at_least_1(comp):
    with pytest.raises(ConfigError, match="evict_every must be an integer >= 1 and above 1 only with a budget"):
        Compression(**comp)


def test_methods_that_refuse_a_budget_say_why():
    refusing = [name for name, cls in METHODS.items() if cls.budget_refusal]
    assert "quant" in refusing
    for name in refusing:
        with pytest.raises(ConfigError, match="takes no budget"):
            build_method(name, {}, Compression(budget=BUDGET))


# -- one chunk is today's prefill ----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(METHODS))
def test_one_chunk_is_the_one_step_prefill_bit_for_bit(name, tiny_llama):
    prompt = random_prompt(96, batch=2, seed=2)
    comp = Compression(ratio=2) if METHODS[name].uses_compression else None
    runs = []
    for chunk in (None, 96, 500):
        method = build_method(name, {}, comp, seed=1)
        method.setup(tiny_llama)
        cache = KVCache(method, layer_windows(tiny_llama.config))
        runs.append((generate(tiny_llama, cache, prompt, random_prompt(5, batch=2), 6, set(), prefill_chunk=chunk),
                     cache))
    (base, base_cache), *others = runs
    for gen, cache in others:
        assert gen.tokens == base.tokens
        assert (gen.after_prefill, gen.at_end) == (base.after_prefill, base.at_end)
        assert (gen.peak_bytes_held, gen.peak_bytes_in_step) == (base.peak_bytes_held, base.peak_bytes_in_step)
        for a, b in zip(cache.layers, base_cache.layers):
            assert torch.equal(a.positions, b.positions)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_chunks_of_the_full_cache_attend_as_one_prefill(fixture, request):
    """Positions, the causal mask across chunks and Gemma's sliding-window layers: a chunked prefill of
    the uncompressed cache computes the same logits as one step."""
    model = request.getfixturevalue(fixture)
    prompt = random_prompt(70, batch=2)
    last = {}
    for chunk in (None, 16, 7):
        hook = model.lm_head.register_forward_hook(lambda m, i, out: last.__setitem__(chunk, out[:, -1].clone()))
        try:
            generate(model, KVCache(build_method("full", {}, None), layer_windows(model.config)), prompt, None, 3,
                     set(), prefill_chunk=chunk)
        finally:
            hook.remove()
    # the last forward: the second decoding step, after a cache built in 1, 5 or 10 steps
    torch.testing.assert_close(last[16], last[None], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last[7], last[None], atol=1e-5, rtol=1e-5)


@pytest.mark.embedded
def test_a_chunk_longer_than_the_prompt_changes_nothing_on_the_embedded_model(embedded):
    model, tokenizer = embedded
    prompt = tokenizer("The pass key is 71432. Remember it. " * 20, return_tensors="pt").input_ids
    for name in ("snapkv", "lagkv"):
        gens = [generate(model, KVCache(build_method(name, {}, Compression(ratio=4)), layer_windows(model.config)),
                         prompt, None, 8, set(), prefill_chunk=chunk) for chunk in (None, 4096)]
        assert gens[0].tokens == gens[1].tokens and gens[0].at_end == gens[1].at_end


# -- chunks, prefill reuse and the run identity ----------------------------------------------------------

def test_a_chunked_prefill_is_never_stored_or_reused(tiny_llama):
    prompt = random_prompt(96)
    cache = KVCache(build_method("snapkv", {}, Compression(ratio=2)), layer_windows(tiny_llama.config))
    with pytest.raises(ValueError, match="cannot be stored or reused"):
        generate(tiny_llama, cache, prompt, None, 2, set(), keep_prefill=True, prefill_chunk=32)
    # one chunk is the one-step prefill, which can be stored
    stored = generate(tiny_llama, cache, prompt, None, 2, set(), keep_prefill=True, prefill_chunk=96).prefilled
    with pytest.raises(ValueError, match="cannot be stored or reused"):
        generate(tiny_llama, cache, prompt, None, 2, set(), prefilled=stored, prefill_chunk=32)


def spec(method="snapkv", **top):
    return RunSpec.from_config(load_config({"model": asdict(EMBEDDED), "method": {"name": method},
                                            "task": {"name": "passkey", "kind": "passkey"}, **top}))


def test_an_infeasible_budget_fails_before_the_model_loads_naming_the_smallest_feasible_one():
    # LagKV's defaults: 16 sink tokens and an uncompressed window of up to 2 x 1024 - 1 tokens
    with pytest.raises(ConfigError, match="smallest feasible budget is sink_tokens \\+ 2 x lag_size - 1 = 2063"):
        spec("lagkv", ratio=None, budget=2062)
    assert spec("lagkv", ratio=None, budget=2063).method.compression.budget == 2063


def test_runs_with_a_chunked_prefill_do_not_share_prefills():
    unchunked, chunked = spec(ratio=2), spec(ratio=2, prefill_chunk=64)
    assert unchunked.reuses_prefill(unchunked.method.new())
    assert not chunked.reuses_prefill(chunked.method.new())


def test_chunk_and_evict_every_enter_the_identity_only_when_set():
    task = spec(ratio=2).task
    assert spec(budget=64, ratio=None).identity(task).compression == {"ratio": None, "budget": 64, "label": "budget-64"}
    chunked = spec(budget=64, ratio=None, prefill_chunk=32, evict_every=4)
    assert chunked.setting == "budget-64_every-4_prefill_chunk-32"
    assert chunked.identity(task).compression == {"ratio": None, "budget": 64, "label": chunked.setting,
                                                  "evict_every": 4, "prefill_chunk": 32}
    with pytest.raises(ConfigError, match="prefill_chunk=0: expected an integer >= 1"):
        spec(ratio=2, prefill_chunk=0)


# -- the capacity table of the docs -----------------------------------------------------------------------

@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md"])
def test_the_docs_show_the_generated_capacity_table(doc):
    text = (Path(__file__).resolve().parents[2] / doc).read_text()
    shown = text.partition(CAPACITY_TABLE_BEGIN)[2].partition(CAPACITY_TABLE_END)[0].strip()
    assert shown == capacity_table(), f"{doc}: run `python -m kvbench.methods` to regenerate its capacity table"
