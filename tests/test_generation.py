"""Generation with kvbench's cache: equality with transformers, positions after eviction, stats."""

import pytest
import torch

from conftest import random_prompt
from kvbench.cache import KVCache, layer_windows
from kvbench.decoding import Decoding
from kvbench.errors import ConfigError
from kvbench.generation import choose_tokens, generate
from kvbench.methods import Compression, build_method


def run(model, method, prompt, new_tokens=8, question=None, **comp):
    compression = Compression(**comp) if comp else None
    cache = KVCache(build_method(method, {}, compression), layer_windows(model.config))
    return generate(model, cache, prompt, question, new_tokens, eos_ids=set()), cache


def reference_generate(model, prompt, new_tokens):
    """transformers' own greedy generate with its plain dynamic cache and SDPA attention."""
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    finally:
        model.set_attn_implementation("kvbench")
    return out[:, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
@pytest.mark.parametrize("method,comp", [("full", {}), ("streaming", {"budget": 1000})])
def test_no_eviction_matches_transformers_generate(fixture, method, comp, request):
    model = request.getfixturevalue(fixture)
    prompt = random_prompt(40, batch=2)  # tiny_gemma's window is 8: its local layers really slide
    gen, _ = run(model, method, prompt, 10, **comp)
    assert gen.tokens == reference_generate(model, prompt, 10)


def test_appended_question_equals_whole_prompt_without_compression(tiny_llama):
    prompt = random_prompt(40)
    whole, _ = run(tiny_llama, "full", prompt)
    split, _ = run(tiny_llama, "full", prompt[:, :30], question=prompt[:, 30:])
    assert split.tokens == whole.tokens


def test_streaming_decodes_at_original_positions(tiny_llama):
    """After eviction, decode logits equal a full-sequence forward in which each query sees exactly
    the tokens StreamingLLM keeps, at their original positions (eager attention, explicit 4D mask)."""
    n, steps, sinks, capacity = 40, 6, 4, 10  # ratio 4 of 40 tokens -> 10 kept: 4 sinks + 6 recent
    prompt = random_prompt(n)
    cache = KVCache(build_method("streaming", {}, Compression(ratio=4)), layer_windows(tiny_llama.config))
    gen = generate(tiny_llama, cache, prompt, None, steps, eos_ids=set())
    assert [layer.get_seq_length() for layer in cache.layers] == [capacity] * 2
    expected_positions = list(range(sinks)) + list(range(n + steps - 1 - (capacity - sinks), n + steps - 1))
    assert cache.layers[0].positions[0, 0].sort().values.tolist() == expected_positions  # decoding may reorder

    sequence = torch.cat([prompt, torch.tensor([gen.tokens[0][:-1]])], dim=1)
    total = sequence.shape[1]
    visible = torch.zeros(total, total, dtype=torch.bool)
    for q in range(total):
        if q < n:  # the prompt is prefilled with full causal attention (use, then compress)
            visible[q, : q + 1] = True
        else:  # decode step at position q sees the sinks, the 6 most recent kept tokens and itself
            visible[q, :sinks] = True
            visible[q, q - (capacity - sinks): q + 1] = True
    mask = torch.zeros(1, 1, total, total).masked_fill(~visible, float("-inf"))
    tiny_llama.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            logits = tiny_llama(input_ids=sequence, attention_mask=mask).logits[0]
    finally:
        tiny_llama.set_attn_implementation("kvbench")
    assert logits[n - 1:].argmax(-1).tolist() == gen.tokens[0]


def test_stats_report_measured_compression(tiny_llama):
    gen, cache = run(tiny_llama, "streaming", random_prompt(400), 5, ratio=4)
    assert gen.after_prefill["tokens_held"] == 100
    assert gen.after_prefill["ratio"] == pytest.approx(4.0)
    # 2 layers x 2 KV heads x 100 tokens x 16 dims x (K and V) x 4 bytes
    assert gen.after_prefill["bytes_held"] == 2 * 2 * 100 * 16 * 2 * 4
    assert gen.at_end["bytes_full"] == 2 * 2 * 404 * 16 * 2 * 4  # 400 prompt + 4 decoded tokens fed back
    # streaming evicts every decode step: between steps it never holds more than after prefill, but
    # inside a step the prompt (prefill) is held whole before compression
    assert gen.peak_bytes_held == gen.after_prefill["bytes_held"]
    assert gen.peak_bytes_in_step == 2 * 2 * 400 * 16 * 2 * 4


def test_sliding_layers_keep_their_window(tiny_gemma):
    gen, cache = run(tiny_gemma, "streaming", random_prompt(60), 3, ratio=2)
    local, global_ = cache.layers
    assert local.is_sliding and local.get_seq_length() == 7  # window 8 - 1, as transformers keeps
    assert global_.get_seq_length() == 30
    # the window layer holds what the full cache holds, so only the global layer is compressed
    assert gen.after_prefill["tokens_per_layer"] == [7.0, 30.0]


def test_stop_check_and_eos(tiny_llama):
    prompt = random_prompt(20)
    free, _ = run(tiny_llama, "full", prompt, 6)
    first = free.tokens[0][0]
    cache = KVCache(build_method("full", {}, None), layer_windows(tiny_llama.config))
    stopped = generate(tiny_llama, cache, prompt, None, 6, eos_ids={first})
    assert stopped.tokens == [[first]] and stopped.stopped_by == ["eos"]
    cache = KVCache(build_method("full", {}, None), layer_windows(tiny_llama.config))
    by_check = generate(tiny_llama, cache, prompt, None, 6, eos_ids=set(), stop_check=lambda t: len(t) == 2)
    assert by_check.tokens[0] == free.tokens[0][:2] and by_check.stopped_by == ["stop"]


def test_min_new_tokens_masks_eos(tiny_llama):
    prompt = random_prompt(20)
    free, _ = run(tiny_llama, "full", prompt, 3)
    first = free.tokens[0][0]
    cache = KVCache(build_method("full", {}, None), layer_windows(tiny_llama.config))
    held = generate(tiny_llama, cache, prompt, None, 3, eos_ids={first}, min_new_tokens=1)
    assert held.tokens[0][0] != first


@pytest.mark.embedded
@pytest.mark.parametrize("method,comp", [("full", {}), ("streaming", {"budget": 4096})])
def test_embedded_model_matches_transformers_generate(embedded, method, comp):
    model, tok = embedded
    text = "There is an important info hidden inside a lot of irrelevant text." + \
        " The grass is green. The sky is blue." * 20 + " The pass key is 68191. Remember it." + \
        " The sun is yellow. Here we go." * 20 + "\nWhat is the pass key? The pass key is"
    prompt = tok(text, return_tensors="pt").input_ids
    gen, _ = run(model, method, prompt, 12, **comp)
    assert gen.tokens == reference_generate(model, prompt, 12)
    assert "68191" in tok.decode(gen.tokens[0])


# -- storage: decoding writes into spare room instead of copying the cache --------------------------

def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_decoding_appends_in_place_and_holds_the_same_tokens():
    layer = build_method("full", {}, None).make_layer(0)
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(1, 2, 50, 4, generator=g)] + [torch.randn(1, 2, 1, 4, generator=g) for _ in range(40)]
    layer.update(steps[0], -steps[0])
    layer.update(steps[1], -steps[1])  # the first append moves the prompt into a buffer with room
    buffers = {storage(layer.keys), storage(layer.values)}
    for new in steps[2:]:
        layer.update(new, -new)
        assert {storage(layer.keys), storage(layer.values)} == buffers  # 50 + 40 tokens fit the room
    expected = torch.cat(steps, dim=2)
    assert torch.equal(layer.keys, expected) and torch.equal(layer.values, -expected)
    assert layer.positions[0, 0].tolist() == list(range(90))
    assert layer.bytes_held() == 2 * 90 * 2 * 4 * 4  # tokens held, not the room


def test_eviction_reuses_the_buffer_when_decoding_and_frees_it_after_prefill():
    layer = build_method("streaming", {"sink_tokens": 2}, Compression(budget=8)).make_layer(0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 1, 300, 4, generator=g)
    layer.update(tokens[:, :, :200], tokens[:, :, :200])
    layer.update(tokens[:, :, 200:201], tokens[:, :, 200:201])  # 201 tokens in a buffer sized for ~265
    big = storage(layer.keys)
    layer.end_step("prefill")  # 8 of 201 kept: a small tensor, the big buffer is let go
    assert storage(layer.keys) != big and layer.keys.shape[2] == 8
    layer.update(tokens[:, :, 201:202], tokens[:, :, 201:202])
    room = storage(layer.keys)
    for i in range(202, 300):
        layer.end_step("decode")
        layer.update(tokens[:, :, i:i + 1], tokens[:, :, i:i + 1])
        assert storage(layer.keys) == room  # evict one, append one: same buffer every step
    layer.end_step("decode")
    kept = [0, 1, *range(294, 300)]
    order = layer.positions[0, 0].argsort()  # each eviction moved the newest token into the freed slot
    assert layer.positions[0, 0, order].tolist() == kept
    assert torch.equal(layer.keys[:, :, order], tokens[:, :, kept])


def test_snapshot_is_unaffected_by_later_appends():
    layer = build_method("full", {}, None).make_layer(0)
    first = torch.randn(1, 1, 5, 4)
    layer.update(first, first)
    layer.update(first[:, :, :1], first[:, :, :1])  # now in a buffer with room
    state = layer.snapshot()
    for _ in range(3):
        layer.update(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))
    assert torch.equal(state.stores["keys"].tensor, torch.cat([first, first[:, :, :1]], dim=2))
    assert state.fields["seen"] == 6 and state.nbytes() == 2 * 6 * 4 * 4 + 6 * 8  # keys, values, positions
    layer.restore(state)
    layer.update(torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4))
    assert torch.equal(layer.keys[:, :, -1], torch.ones(1, 1, 4)) and layer.keys.shape[2] == 7
    assert state.stores["keys"].tokens == 6 and layer.positions[0, 0].tolist() == list(range(7))


# -- decoding: greedy or sampled -----------------------------------------------------------------------

def sampled(model, prompt, decoding, seeds, new_tokens=12, method="full", **comp):
    compression = Compression(**comp) if comp else None
    cache = KVCache(build_method(method, {}, compression), layer_windows(model.config))
    return generate(model, cache, prompt, None, new_tokens, eos_ids=set(), decoding=decoding, seeds=seeds).tokens


def test_temperature_zero_is_greedy(tiny_llama):
    prompt = random_prompt(30, batch=2)
    greedy = sampled(tiny_llama, prompt, Decoding(temperature=0.0), None)
    assert greedy == reference_generate(tiny_llama, prompt, 12)


def test_top_k_one_samples_the_greedy_tokens(tiny_llama):
    prompt = random_prompt(30, batch=2)
    assert sampled(tiny_llama, prompt, Decoding(temperature=1.5, top_k=1), [3, 4]) == \
        reference_generate(tiny_llama, prompt, 12)


def test_sampling_is_reproducible_per_seed_and_independent_of_the_batch(tiny_llama):
    prompt = random_prompt(30, batch=2)
    decoding = Decoding(temperature=1.0)
    both = sampled(tiny_llama, prompt, decoding, [11, 12], new_tokens=20)
    assert both == sampled(tiny_llama, prompt, decoding, [11, 12], new_tokens=20)
    # a sequence's draws depend on its own seed only, not on the batch it runs in
    assert both[1] == sampled(tiny_llama, prompt[1:], decoding, [12], new_tokens=20)[0]
    assert sampled(tiny_llama, prompt[:1], decoding, [13], new_tokens=20)[0] != both[0]
    assert both[0] != sampled(tiny_llama, prompt[:1], Decoding(), None, new_tokens=20)[0]  # not greedy


def support(logits, decoding, draws=400):
    """The tokens ``choose_tokens`` draws from ``logits`` (one row) in ``draws`` seeded draws."""
    g = torch.Generator().manual_seed(0)
    return {int(choose_tokens(logits[None], decoding, [g])) for _ in range(draws)}


def test_top_k_and_top_p_cut_the_distribution():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()  # probabilities at temperature 1
    assert support(logits, Decoding(temperature=1.0)) == {0, 1, 2, 3}
    assert support(logits, Decoding(temperature=1.0, top_k=2)) == {0, 1}
    # the nucleus: the most likely tokens until their mass reaches top_p (0.5 + 0.3 reaches 0.8)
    assert support(logits, Decoding(temperature=1.0, top_p=0.8)) == {0, 1}
    assert support(logits, Decoding(temperature=1.0, top_p=0.81)) == {0, 1, 2}
    assert support(logits, Decoding(temperature=1.0, top_p=0.3)) == {0}  # the most likely always stays
    assert support(logits, Decoding(temperature=1.0, top_k=3, top_p=0.99)) == {0, 1, 2}  # top_k first
    assert support(logits, Decoding(temperature=0.01)) == {0}  # a cold temperature is nearly greedy


def test_sample_seeds_depend_on_run_seed_sample_and_index_only():
    d = Decoding(temperature=0.7, n=4)
    seeds = {d.sample_seed(run, sid, i) for run in (0, 1) for sid in ("a", "b") for i in range(4)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)
    assert d.sample_seed(0, "a", 2) == Decoding(temperature=1.0).sample_seed(0, "a", 2)


@pytest.mark.parametrize("values,problem", [
    ({"temperature": -1.0}, r"decoding.temperature=-1.0: expected a number >= 0"),
    ({"temperature": 1.0, "top_p": 0.0}, r"decoding.top_p=0.0: expected a number in \(0, 1\]"),
    ({"temperature": 1.0, "top_p": 1.5}, r"decoding.top_p=1.5: expected a number <= 1"),
    ({"temperature": 1.0, "top_k": -1}, r"decoding.top_k=-1: expected an integer >= 0"),
    ({"temperature": 1.0, "n": 0}, r"decoding.n=0: expected an integer >= 1"),
    ({"n": 4}, "apply to sampling only"), ({"top_k": 5}, "apply to sampling only"),
])
def test_bad_decoding_is_a_config_error(values, problem):
    with pytest.raises(ConfigError, match=problem):
        Decoding(**values).validate()


def test_decoding_label_names_what_differs_from_greedy():
    assert Decoding().label() == ""
    assert Decoding(temperature=0.6, top_p=0.95, n=4).label() == "temperature-0.6_top_p-0.95_n-4"


# -- the cache held over a generation --------------------------------------------------------------

def test_curve_of_the_full_cache_grows_one_token_per_step(tiny_llama):
    cache = KVCache(build_method("full", {}, None), layer_windows(tiny_llama.config))
    gen = generate(tiny_llama, cache, random_prompt(20), None, 40, eos_ids=set(), curve_every=16)
    curve = gen.curve
    assert curve.every == 16 and curve.steps == [0, 16, 32, 39]  # 40 tokens, the last is not fed back
    assert curve.tokens == [20, 36, 52, 59]
    per_token = 2 * 2 * 16 * 2 * 4  # layers x KV heads x head_dim x (K, V) x float32
    assert curve.bytes == [t * per_token for t in curve.tokens]
    assert gen.peak_tokens_held == 59 and gen.peak_bytes_held == 59 * per_token


@pytest.mark.parametrize("method", ["h2o", "streaming", "tova"])
@pytest.mark.parametrize("budget", [128, 350])
def test_decode_time_methods_hold_the_budget_over_a_long_generation(tiny_llama, method, budget):
    """300-token prompt, 400 generated tokens: no layer's KV head ever holds more than the budget,
    whether the prompt fits it (350: decoding fills it, then evicts) or not (128)."""
    cache = KVCache(build_method(method, {}, Compression(budget=budget)), layer_windows(tiny_llama.config))
    gen = generate(tiny_llama, cache, random_prompt(300), None, 400, eos_ids=set(), curve_every=16)
    assert len(gen.tokens[0]) == 400
    assert gen.peak_tokens_held == budget  # checked after every step, per layer and head
    assert max(gen.curve.tokens) == budget and gen.curve.steps[-1] == 399
    assert gen.curve.tokens[0] == min(budget, 300)
    assert all(int(layer.tokens_held().max()) <= budget for layer in cache.layers)
    assert gen.peak_bytes_held == budget * 2 * 2 * 16 * 2 * 4


def test_a_followup_is_fed_after_the_stop_and_answered(tiny_llama):
    prompt, followup = random_prompt(20), [7, 8, 9]
    cache = KVCache(build_method("full", {}, None), layer_windows(tiny_llama.config))
    gen = generate(tiny_llama, cache, prompt, None, 6, eos_ids=set(), stop_check=lambda part: len(part) == 2,
                   followup_ids=followup, followup_new_tokens=5)
    first, fed, answer = gen.tokens[0][:2], gen.tokens[0][2:5], gen.tokens[0][5:]
    assert fed == followup and len(answer) == 2  # the stop rule holds for each part on its own
    assert gen.stopped_by == ["stop"]
    # the follow-up fed one token at a time gives what a prompt ending with it gives
    whole, _ = run(tiny_llama, "full", torch.cat([prompt, torch.tensor([first + followup])], dim=1), 2)
    assert answer == whole.tokens[0]
    cache = KVCache(build_method("full", {}, None), layer_windows(tiny_llama.config))
    capped = generate(tiny_llama, cache, prompt, None, 4, eos_ids=set(), followup_ids=followup, followup_new_tokens=3)
    assert len(capped.tokens[0]) == 4 + 3 + 3 and capped.stopped_by == ["max_new_tokens"]
    assert capped.curve.steps[-1] == 9  # every token but the last was fed back
