"""Generation with kvbench's cache: equality with transformers, positions after eviction, stats."""

import pytest
import torch

from conftest import random_prompt
from kvbench.cache import KVCache, layer_windows
from kvbench.generation import generate
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
