"""Checks every registered method must pass (parametrized over the registry, so new methods are
checked automatically): declared defaults within their own bounds, compression only in the declared
phases, lossless without eviction, measured ratio, decoding at the right positions (against a
reference that recomputes attention with explicit masks), batch sizes 1 and 2, determinism, the
budget as a capacity after every step (also with a chunked prefill), and the same on the embedded
model."""

import dataclasses

import pytest
import torch
from transformers import AttentionInterface

from conftest import random_prompt
from kvbench.cache import KVCache, layer_windows
from kvbench.generation import generate
from kvbench.methods import Compression, build_method, registered
from kvbench.methods.base import EvictionLayer

METHODS = registered()
NAMES = list(METHODS)
#: parameters a method needs to hold the small budgets used here (LagKV's default sink and window
#: alone make 2063 tokens its smallest feasible budget); budget mode only
FEASIBLE = {"lagkv": {"lag_size": 16}}


def make_method(model, name, seed=0, **comp):
    compression = Compression(**comp) if METHODS[name].uses_compression else None
    params = FEASIBLE.get(name, {}) if compression is not None and compression.budget is not None else {}
    method = build_method(name, params, compression, seed)
    method.setup(model)
    return method


def make_cache(model, name, seed=0, **comp):
    return KVCache(make_method(model, name, seed, **comp), layer_windows(model.config))


def run(model, name, prompt, new_tokens, question=None, seed=0, **comp):
    cache = make_cache(model, name, seed, **comp)
    return generate(model, cache, prompt, question, new_tokens, eos_ids=set()), cache


def skip_if_lossy(name):
    if METHODS[name].lossy_note:
        pytest.skip(f"{name} is lossy without eviction: {METHODS[name].lossy_note}")


def check_ratio(name, stats, nominal):
    measured = stats["ratio"]
    if not METHODS[name].uses_compression:
        assert measured == pytest.approx(1.0)
    elif METHODS[name].ratio_note:
        # reported, and never more than the full cache; it may be 1 where the note says the method
        # leaves short inputs alone (LagKV below S + 2L tokens)
        assert 1 <= measured < float("inf"), f"{name}: {METHODS[name].ratio_note}"
    else:
        assert measured == pytest.approx(nominal, rel=0.05)


def check_positions(cache):
    """Every layer holds distinct positions of tokens that exist (in any order: decode-time
    evictions move the newest token into the freed slot), as many per head as it says it holds
    (heads of different lengths pad theirs with -1)."""
    for layer in cache.layers:
        pos = layer.positions
        if layer.ragged_heads:
            assert ((pos >= 0).sum(-1) == layer.tokens_held()).all() and pos.shape[-1] == layer.tokens_held().max()
        else:
            assert pos.shape[-1] == layer.get_seq_length() and pos.min() >= 0
        held = pos.sort(dim=-1).values
        assert ((held.diff(dim=-1) > 0) | (held[..., :-1] < 0)).all() and pos.max() < layer.seen


@pytest.mark.parametrize("name", NAMES)
def test_declared_defaults_pass_their_own_checks(name):
    cls = METHODS[name]
    defaults = dataclasses.asdict(cls.Params())
    assert cls.parse_params(defaults) == cls.Params()


@pytest.mark.parametrize("name", NAMES)
def test_compress_is_called_in_the_declared_phases_only(name, tiny_llama, monkeypatch):
    calls = []
    layer_cls = METHODS[name].layer
    compress = layer_cls.compress
    monkeypatch.setattr(layer_cls, "compress", lambda self, phase: calls.append(phase) or compress(self, phase))
    gen, _ = run(tiny_llama, name, random_prompt(40), 3, question=random_prompt(4, seed=1), ratio=2)
    every_step = ["prefill", "append", "decode", "decode"]  # per layer (2 layers)
    assert calls == [phase for phase in every_step for _ in range(2) if phase in METHODS[name].phases]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
@pytest.mark.parametrize("name", NAMES)
def test_no_eviction_equals_full(name, fixture, request):
    skip_if_lossy(name)
    model = request.getfixturevalue(fixture)
    prompt, new = random_prompt(40, batch=2), 8
    full, _ = run(model, "full", prompt, new)
    gen, cache = run(model, name, prompt, new, budget=40 + new + 1)
    assert gen.tokens == full.tokens
    assert gen.at_end["tokens_per_layer"] == full.at_end["tokens_per_layer"]


@pytest.mark.parametrize("ratio", [2, 4, 8])
@pytest.mark.parametrize("name", NAMES)
def test_measured_ratio_after_prefill(name, ratio, tiny_llama):
    # 1024 tokens: capacities 512 / 256 / 128 are exact and exceed PyramidKV's 64-token window
    gen, cache = run(tiny_llama, name, random_prompt(1024), 2, ratio=ratio)
    check_ratio(name, gen.after_prefill, ratio)
    check_positions(cache)


# -- decoding after compression, against a reference forward with explicit per-head masks ----------

REFERENCE = "kvbench_test_reference"
_visible: dict[int, torch.Tensor] = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention in which each layer and KV head sees exactly ``_visible[layer]``."""
    group = query.shape[1] // key.shape[1]
    visible = _visible[module.layer_idx].repeat_interleave(group, dim=1)
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    probs = (query @ key.transpose(-1, -2) * scaling).masked_fill(~visible, float("-inf")).softmax(-1)
    return (probs @ value).transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE, _reference_attention)


def visible_masks(cache, snapshots, steps, total):
    """(batch, kv_heads, total, total) masks: a step's queries see what the cache held after the
    previous step plus the step's own tokens up to themselves (the prefill: plain causal)."""
    masks = {}
    rows = torch.arange(total)[:, None]
    cols = torch.arange(total)[None, :]
    for i, layer in enumerate(cache.layers):
        b, h = snapshots[0][i].shape[:2]
        mask = torch.zeros(b, h, total, total, dtype=torch.bool)
        start = 0
        for j, length in enumerate(steps):
            end = start + length
            if j > 0:
                held = snapshots[j - 1][i]
                held = held.where(held >= 0, total)  # padding (-1) goes to a column dropped below
                seen = torch.zeros(b, h, length, total + 1, dtype=torch.bool)
                mask[:, :, start:end] = seen.scatter_(-1, held[:, :, None, :].expand(-1, -1, length, -1), True)[..., :total]
            mask[:, :, start:end] |= (cols <= rows)[start:end] & (cols >= start)
            start = end
        if layer.is_sliding:
            mask &= (rows - cols) < layer.window
        masks[layer.layer_idx] = mask
    return masks


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_decoding_after_compression_uses_kept_tokens_at_their_positions(name, batch, fixture, request):
    """Greedy decoding with a compressed cache (ratio 2 of 320 tokens; with batch 2 a question is
    appended too) gives the logits of a full-sequence forward in which every query of every layer and
    head sees exactly the tokens the cache held at that step, at their original positions (methods
    declaring ``lossy_note`` or ``approximation_note`` get the shape and position checks only)."""
    model = request.getfixturevalue(fixture)
    n, new = 320, 6
    prompt = random_prompt(n, batch=batch)
    question = random_prompt(5, batch=batch, seed=1) if batch == 2 else None
    cache = make_cache(model, name, ratio=2)
    snapshots, logits = [], []
    end_step = cache.end_step

    def recording_end_step(phase):
        end_step(phase)
        snapshots.append([layer.positions.clone() for layer in cache.layers])
        for layer in cache.layers:
            if isinstance(layer, EvictionLayer) and "decode" in METHODS[name].phases:
                assert layer.get_seq_length() <= layer.capacity  # never above capacity between steps

    cache.end_step = recording_end_step
    hook = model.lm_head.register_forward_hook(lambda m, i, out: logits.append(out[:, -1].clone()))
    try:
        gen = generate(model, cache, prompt, question, new, eos_ids=set())
    finally:
        hook.remove()
    assert [len(t) for t in gen.tokens] == [new] * batch
    check_positions(cache)
    steps = [n] + ([question.shape[1]] if question is not None else []) + [1] * (new - 1)
    assert len(snapshots) == len(logits) == len(steps)
    if METHODS[name].lossy_note or METHODS[name].approximation_note:
        return  # what it holds or how it attends is approximate: positions and shapes checked above
    parts = [prompt] + ([question] if question is not None else []) + [torch.tensor(gen.tokens)[:, :-1]]
    sequence = torch.cat(parts, dim=1)
    _visible.update(visible_masks(cache, snapshots, steps, sequence.shape[1]))
    model.set_attn_implementation(REFERENCE)
    try:
        with torch.inference_mode():
            reference = model(input_ids=sequence).logits
    finally:
        model.set_attn_implementation("kvbench")
        _visible.clear()
    ends = torch.tensor(steps).cumsum(0) - 1
    torch.testing.assert_close(torch.stack(logits, 1), reference[:, ends], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_given_seed(name, tiny_llama):
    prompt = random_prompt(200, batch=2)
    (a, cache_a), (b, cache_b) = (run(tiny_llama, name, prompt, 6, seed=3, ratio=4) for _ in range(2))
    assert a.tokens == b.tokens
    for la, lb in zip(cache_a.layers, cache_b.layers):
        assert torch.equal(la.positions, lb.positions)


# -- the budget is a capacity -----------------------------------------------------------------------

HOLDING = [name for name, cls in METHODS.items()
           if cls.uses_compression and not cls.budget_refusal and cls.budget_is_capacity]
BUDGET, PROMPT, NEW, CHUNK = 64, 300, 50, 64


def budget_run(model, name, prefill_chunk=None, **comp):
    """A generation of NEW tokens from a PROMPT-token prompt, recording after every step (phase, [(bytes
    held, bytes the declared bound allows) per layer])."""
    method = make_method(model, name, **comp)
    cache = KVCache(method, layer_windows(model.config))
    held = []
    end_step = cache.end_step

    def recording(phase):
        end_step(phase)
        bound = method.held_bound(phase)
        held.append((phase, [(layer.bytes_held(), layer.capacity_bytes(bound)) for layer in cache.layers]))

    cache.end_step = recording
    gen = generate(model, cache, random_prompt(PROMPT), None, NEW, eos_ids=set(), prefill_chunk=prefill_chunk)
    return gen, cache, method, held


def check_held(method, held):
    """Every step held at most the declared bound: per layer, or over all layers for a method whose
    budget bounds the mean over layers (PyramidKV). Bytes against ``capacity_bytes`` compare every
    unit: for dense tokens they are the token count times a token's bytes."""
    for phase, layers in held:
        if method.budget_per_layer:
            assert all(b <= cap for b, cap in layers), (phase, layers)
        else:
            assert sum(b for b, _ in layers) <= sum(cap for _, cap in layers), (phase, layers)


@pytest.mark.parametrize("name", HOLDING)
def test_the_budget_holds_after_every_step(name, tiny_llama):
    gen, cache, method, held = budget_run(tiny_llama, name, budget=BUDGET)
    assert len(gen.tokens[0]) == NEW and [p for p, _ in held] == ["prefill"] + ["decode"] * (NEW - 1)
    check_held(method, held)


@pytest.mark.parametrize("name", HOLDING)
def test_a_chunked_prefill_holds_the_budget_plus_one_chunk_inside_a_step(name, tiny_llama):
    gen, cache, method, held = budget_run(tiny_llama, name, prefill_chunk=CHUNK, budget=BUDGET)
    assert [p for p, _ in held] == ["prefill"] * -(-PROMPT // CHUNK) + ["decode"] * (NEW - 1)
    check_held(method, held)
    # inside a step: what the previous step left (its bound) plus the step's new tokens (one chunk)
    bound = max(method.held_bound("prefill"), method.held_bound("decode"))
    in_step = sum(layer.capacity_bytes(bound) + max(layer.capacity_bytes(bound + CHUNK) - layer.capacity_bytes(bound),
                                                    CHUNK * layer.token_bytes()) for layer in cache.layers)
    assert gen.peak_bytes_in_step <= in_step
    whole, *_ = budget_run(tiny_llama, name, budget=BUDGET)
    assert gen.peak_bytes_in_step < whole.peak_bytes_in_step  # the 300-token prompt is never held at once


# -- the embedded model (SmolLM2-135M: 30 layers, GQA 9/3, head_dim 64) ---------------------------

EMBEDDED_TOKENS = 320  # divisible by 4: capacity 80 at ratio 4 is exact


@pytest.fixture(scope="module")
def embedded_prompt(embedded):
    model, tokenizer = embedded
    text = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 40
            + "The pass key is 71432. Remember it. 71432 is the pass key. " + "The grass is green. " * 20)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :EMBEDDED_TOKENS]
    assert ids.shape[1] == EMBEDDED_TOKENS
    full, _ = run(model, "full", ids, 6)
    return ids, full.tokens


@pytest.mark.embedded
@pytest.mark.parametrize("name", NAMES)
def test_embedded_model(name, embedded, embedded_prompt):
    model, _ = embedded
    prompt, full_tokens = embedded_prompt
    if not METHODS[name].lossy_note:
        lossless, _ = run(model, name, prompt, 6, budget=EMBEDDED_TOKENS + 7)
        assert lossless.tokens == full_tokens
    gen, cache = run(model, name, prompt, 6, ratio=4)
    assert len(gen.tokens[0]) == 6
    check_ratio(name, gen.after_prefill, 4)
    check_positions(cache)
