"""Quest on small hand-made tensors: page bounds, the upper bound, which pages a decoding step
attends over (per query head), the bytes it reads, and where it stays dense."""

import torch
from conftest import random_prompt

from kvbench.cache import KVCache, layer_attention, layer_windows
from kvbench.generation import generate
from kvbench.methods import Compression, build_method
from kvbench.methods.quest import page_bounds, upper_bounds
from kvbench.results import SampleRecord

# pages of 2 tokens: p0 = tokens 0-1, p1 = 2-3, p2 = 4-5; the current token 6 opens p3
KEYS = torch.tensor([[0., 0.], [1., 0.], [5., 0.], [4., 1.], [-3., 0.], [2., -1.]]).view(1, 1, 6, 2)
VALUES = torch.arange(12.).view(1, 1, 6, 2)
NEW_KEY, NEW_VALUE = torch.zeros(1, 1, 1, 2), torch.full((1, 1, 1, 2), 100.)


def quest_layer(layer_idx=0, **comp):
    method = build_method("quest", {"page_size": 2, "dense_layers": 0}, Compression(**comp))
    return method.make_layer(layer_idx)


def decode_step(layer, query):
    layer.update(KEYS, VALUES)
    layer.end_step("prefill")
    k, v = layer.update(NEW_KEY, NEW_VALUE)
    return layer_attention(layer, query, k, v, 1.0), k, v


def test_page_bounds_cover_partial_last_pages():
    lo, hi = page_bounds(torch.cat([KEYS, NEW_KEY], dim=2), 2)
    assert torch.equal(lo[0, 0], torch.tensor([[0., 0.], [4., 0.], [-3., -1.], [0., 0.]]))
    assert torch.equal(hi[0, 0], torch.tensor([[1., 0.], [5., 1.], [2., 0.], [0., 0.]]))


def test_upper_bound_is_the_channelwise_best_corner_and_bounds_every_key():
    lo, hi = page_bounds(KEYS, 2)
    # q = (1, 1): p0 max(0, 1) + max(0, 0) = 1; p1 5 + 1 = 6; p2 2 + 0 = 2
    # q = (-1, 0): p0 max(-0, -1) = 0; p1 max(-4, -5) = -4; p2 max(3, -2) = 3
    query = torch.tensor([[1., 1.], [-1., 0.]]).view(1, 1, 2, 2)
    bounds = upper_bounds(query, lo, hi)
    assert torch.equal(bounds[0, 0], torch.tensor([[1., 6., 2.], [0., -4., 3.]]))
    logits = (query[0, 0] @ KEYS[0, 0].T).view(2, 3, 2).amax(-1)
    assert (logits <= bounds[0, 0]).all()


def test_a_decoding_step_attends_over_the_top_page_and_the_last():
    # budget 4 tokens = 2 pages: the last page (token 6) and the best of p0..p2 by bound: p1
    layer = quest_layer(budget=4)
    query = torch.tensor([1., 1.]).view(1, 1, 1, 2)
    out, _, _ = decode_step(layer, query)
    weights = torch.tensor([5., 5., 0.]).softmax(0)  # q . k of tokens 2, 3 and 6
    expected = weights @ torch.cat([VALUES[0, 0, 2:4], NEW_VALUE[0, 0]])
    torch.testing.assert_close(out[0, 0, 0], expected)
    # read: 3 tokens x (key + value) x 2 channels x 4 bytes, and the bounds (min, max) of 3 pages
    assert layer.bytes_read() == 3 * 2 * 2 * 4 + 3 * 2 * 2 * 4
    assert layer.bytes_held() == 7 * 2 * 2 * 4  # everything is still held
    assert layer.get_seq_length() == 7


def test_query_heads_choose_their_own_pages_and_their_kv_head_reads_the_union():
    layer = quest_layer(budget=4)
    query = torch.tensor([[1., 1.], [-1., 0.]]).view(1, 2, 1, 2)  # 2 query heads share the KV head
    out, _, _ = decode_step(layer, query)
    head_1 = torch.tensor([3., -2., 0.]).softmax(0) @ torch.cat([VALUES[0, 0, 4:6], NEW_VALUE[0, 0]])
    torch.testing.assert_close(out[0, 1, 0], head_1)  # head 1: p2 (bound 3) and the last page
    assert layer.bytes_read() == 5 * 2 * 2 * 4 + 3 * 2 * 2 * 4  # pages p1, p2 and p3: 5 tokens


def test_dense_when_every_page_fits_or_in_the_first_layers():
    query = torch.tensor([1., 1.]).view(1, 1, 1, 2)
    fits, first = quest_layer(budget=8), build_method(
        "quest", {"page_size": 2}, Compression(budget=4)).make_layer(1)  # dense_layers 2: layer 1 is dense
    for layer in (fits, first):
        out, _, _ = decode_step(layer, query)
        assert out is None  # exact attention over everything, by SDPA
        assert layer.bytes_read() == layer.bytes_held()


def test_a_ratio_sets_the_token_budget_from_the_prompt():
    layer = quest_layer(ratio=3)  # 6 prompt tokens / 3 = 2 tokens: 1 page, the last only
    out, _, _ = decode_step(layer, torch.tensor([1., 1.]).view(1, 1, 1, 2))
    torch.testing.assert_close(out[0, 0, 0], NEW_VALUE[0, 0, 0])


def test_generation_records_what_decoding_read(tiny_llama):
    prompt = random_prompt(200)
    method = build_method("quest", {"dense_layers": 0}, Compression(budget=64))
    method.setup(tiny_llama)
    gen = generate(tiny_llama, KVCache(method, layer_windows(tiny_llama.config)), prompt, None, 4, set())
    full = generate(tiny_llama, KVCache(build_method("full", {}, None), layer_windows(tiny_llama.config)),
                    prompt, None, 4, set())
    assert gen.at_end["bytes_held"] == full.at_end["bytes_held"]  # the whole cache is held
    # per (layer, KV head) a step with 201..203 tokens (13 pages) reads 3 chosen pages for each of
    # its 2 query heads (3 to 6 distinct), the last page (9..11 tokens) and the bounds of 12 pages;
    # a token is 2 x 16 channels x 4 bytes of key and value
    token, bounds, heads = 2 * 16 * 4, 12 * 2 * 16 * 4, 2 * 2
    last = (9 + 10 + 11) / 3
    assert heads * ((3 * 16 + last) * token + bounds) <= gen.decode_bytes_read
    assert gen.decode_bytes_read <= heads * ((6 * 16 + last) * token + bounds)
    assert full.decode_bytes_read == (201 + 202 + 203) / 3 * heads * token  # everything, every step


def test_records_written_before_bytes_read_existed_still_read():
    from conftest import sample_record

    record = sample_record("s0").to_json()
    del record["kv"]["decode_bytes_read"]
    assert SampleRecord.from_json(record).kv.decode_bytes_read is None
