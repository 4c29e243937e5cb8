"""AdaKV: head-wise budgets from scores flattened over a layer's heads, held in the flat (ragged)
layout, attended per head over that head's tokens only."""

import pytest
import torch
import torch.nn.functional as F

from conftest import random_prompt
from kvbench.cache import KVCache, layer_windows, ragged_attention
from kvbench.errors import ConfigError
from kvbench.generation import generate
from kvbench.methods import Compression, build_method
from kvbench.methods.adakv import adakv_bases, head_allocation
from kvbench.storage import pad_segments, segment_ids
from test_baselines import step, vec


def kept(scores, heads, n_heads, per_head, alpha):
    return head_allocation(torch.tensor([scores]), torch.tensor([heads]), n_heads, per_head, alpha)[0].sort().values.tolist()


def test_head_allocation_by_hand():
    # head 0's scores are all above head 1's: without a safeguard it takes the 4 places of 2 heads x 2
    scores, heads = [0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1, 0.0], [0, 0, 0, 0, 1, 1, 1, 1]
    assert kept(scores, heads, 2, 2, 0.0) == [0, 1, 2, 3]
    # alpha 0.5: each head keeps its int(0.5 x 2) = 1 best first (token 4), head 0 the 3 best others
    assert kept(scores, heads, 2, 2, 0.5) == [0, 1, 2, 4]
    # alpha 1: every head keeps its own 2 best, as per-head eviction does
    assert kept(scores, heads, 2, 2, 1.0) == [0, 1, 4, 5]
    # heads interleaved (the flat layout after decoding steps), a tie (0.5) to the earlier token
    assert kept([0.1, 0.9, 0.5, 0.8, 0.5, 0.7], [0, 1, 0, 1, 0, 1], 2, 1, 0.0) == [1, 3]
    assert kept([0.1, 0.9, 0.5, 0.8, 0.5, 0.7], [0, 1, 0, 1, 0, 1], 2, 2, 0.5) == [1, 2, 3, 5]
    # nothing to evict: every token kept
    assert kept([0.3, 0.1], [0, 1], 2, 1, 0.2) == [0, 1]


def adakv_layer(base="knorm", alpha=0.2, **comp):
    return build_method("adakv", {"base": base, "alpha_safeguard": alpha}, Compression(**comp)).make_layer(0)


@pytest.mark.parametrize("alpha, head0, head1", [(0.0, [0, 1, 2, 3], []), (0.5, [0, 1, 2], [3])])
def test_heads_hold_their_own_numbers_of_tokens_and_bytes(alpha, head0, head1):
    # KNorm keeps the lowest key norms: head 0's are all low, head 1's high but for token 3
    layer = adakv_layer(alpha=alpha, budget=2)
    step(layer, vec([1, 1, 1, 1], [9, 9, 9, 8]))
    assert layer.positions.tolist() == [[head0, head1 + [-1] * (len(head0) - len(head1))]]
    assert layer.tokens_held().tolist() == [[len(head0), len(head1)]]
    # the bytes held are the 4 tokens' keys and values (2 float32 channels each), no padding
    assert layer.bytes_held() == 4 * 2 * 2 * 4 == layer.capacity_bytes(2)
    assert layer.get_seq_length() == 2  # tokens per head, on average: the budget's unit


def reference_attention(query, keys, values, visible, scaling):
    """Dense attention of each head's queries over the keys ``visible`` (heads, q, n) marks."""
    logits = torch.einsum("hqd,hnd->hqn", query, keys) * scaling
    return logits.masked_fill(~visible, float("-inf")).softmax(-1) @ values


def test_a_decoding_step_attends_over_each_heads_own_tokens():
    layer = adakv_layer(alpha=0.5, budget=2)
    keys = vec([1, 1, 1, 1], [9, 9, 9, 8])
    values = torch.arange(16, dtype=torch.float32).view(1, 2, 4, 2)
    step(layer, keys, values=values)  # head 0 keeps tokens 0, 1, 2; head 1 token 3
    new_k, new_v = torch.tensor([[[[0.5, 1.0]], [[2.0, -1.0]]]]), torch.tensor([[[[7.0, 7.0]], [[-3.0, 3.0]]]])
    query = torch.tensor([[[[0.3, 0.7]], [[-0.2, 0.4]]]])  # one query head per KV head
    k, v = layer.update(new_k, new_v)
    out = layer.attend(query, k, v, 0.5, None)
    for h, kept_tokens in enumerate([[0, 1, 2], [3]]):
        head_k = torch.cat([keys[0, h, kept_tokens], new_k[0, h]])
        head_v = torch.cat([values[0, h, kept_tokens], new_v[0, h]])
        probs = (head_k @ query[0, h, 0] * 0.5).softmax(-1)
        torch.testing.assert_close(out[0, h, 0], probs @ head_v)


def test_ragged_attention_is_causal_by_position_and_per_head_with_gqa():
    # batch 1, 2 KV heads x 2 query heads, 2 new tokens per head after ragged held ones
    g = torch.Generator().manual_seed(0)
    segments = torch.tensor([0, 0, 0, 1, 0, 0, 1, 1])[None, None]  # held, then the step's 2 per head
    positions = torch.tensor([0, 2, 5, 4, 6, 7, 6, 7])[None, None]
    keys, values = torch.randn(1, 1, 8, 4, generator=g), torch.randn(1, 1, 8, 4, generator=g)
    query = torch.randn(1, 4, 2, 4, generator=g)
    out = ragged_attention(query, keys, values, segments, positions, 2, 6, 0.5)
    for qh in range(4):
        kv = qh // 2
        mine = segments[0, 0] == kv
        visible = mine[None] & (positions[0, 0][None] <= torch.tensor([6, 7])[:, None])
        ref = reference_attention(query[0, qh][None], keys[0, 0][None], values[0, 0][None], visible[None], 0.5)[0]
        torch.testing.assert_close(out[0, qh], ref)


def test_pad_segments_by_hand():
    x = torch.tensor([10, 11, 20, 12, 21])[None, None]
    segments = torch.tensor([0, 0, 1, 0, 1])[None, None]
    assert pad_segments(x, segments, 1, 2, -1).tolist() == [[[10, 11, 12], [20, 21, -1]]]
    assert segment_ids(2, 1, 2).tolist() == [[[0, 0, 1, 1]]]


def test_rescoring_scores_each_head_over_its_own_tokens():
    # KeyDiff scores a key by minus its cosine to its head's mean normalised key: after a ragged
    # eviction each head's anchor must come from that head's tokens alone
    layer = adakv_layer(base="keydiff", alpha=0.0, budget=2)
    g = torch.Generator().manual_seed(1)
    step(layer, torch.randn(1, 2, 6, 3, generator=g))
    step(layer, torch.randn(1, 2, 1, 3, generator=g), phase="decode")  # over budget: re-scored
    assert layer.tokens_held().sum() == 4
    step(layer, torch.randn(1, 2, 1, 3, generator=g), phase="decode")
    flat_keys = layer.keys[0, 0]
    segments = layer.stores["segments"].tensor[0, 0]
    scores = layer.flat_scores()
    for h in range(2):
        head_keys = flat_keys[segments == h]
        anchor = F.normalize(head_keys, dim=-1).mean(0)
        torch.testing.assert_close(scores[segments == h], -F.cosine_similarity(head_keys, anchor[None], dim=-1))


def test_a_ragged_run_holds_the_nominal_bytes_and_heads_differ(tiny_llama):
    method = build_method("adakv", {}, Compression(ratio=4))
    method.setup(tiny_llama)
    cache = KVCache(method, layer_windows(tiny_llama.config))
    gen = generate(tiny_llama, cache, random_prompt(400, batch=2), None, 4, eos_ids=set())
    held = [layer.tokens_held() for layer in cache.layers]
    assert any(len(set(h.flatten().tolist())) > 1 for h in held)  # really head-wise
    for layer, h in zip(cache.layers, held):
        assert (h.sum(-1) == 2 * (100 + 3)).all()  # 2 KV heads x (capacity + 3 decoded tokens) per row
        assert layer.bytes_held() == h.sum() * 2 * 16 * 4  # key + value, head_dim 16, float32
    assert gen.after_prefill["ratio"] == pytest.approx(4)


def test_bases_and_their_errors():
    assert "snapkv" in adakv_bases() and "chunkkv" not in adakv_bases() and "tova" not in adakv_bases()
    with pytest.raises(ConfigError, match="adakv base method 'chunkkv'.*valid: "):
        build_method("adakv", {"base": "chunkkv"}, Compression(ratio=2))
    with pytest.raises(ConfigError, match="chunkkv base method 'adakv'"):
        build_method("chunkkv", {"base": "adakv"}, Compression(ratio=2))
    with pytest.raises(ConfigError, match="think.base=adakv"):
        build_method("think", {"base": "adakv"}, Compression(ratio=2))
    with pytest.raises(ConfigError, match="alpha_safeguard"):
        build_method("adakv", {"alpha_safeguard": 1.5}, Compression(ratio=2))


def test_nothing_evicted_is_the_full_cache_and_stays_uniform(tiny_llama):
    prompt, question = random_prompt(60, batch=2), random_prompt(4, batch=2, seed=1)
    runs = []
    for name, comp in (("full", None), ("adakv", Compression(ratio=1))):
        method = build_method(name, {}, comp)
        method.setup(tiny_llama)
        cache = KVCache(method, layer_windows(tiny_llama.config))
        runs.append((generate(tiny_llama, cache, prompt, question, 6, eos_ids=set()), cache))
    (full, _), (ada, cache) = runs
    assert ada.tokens == full.tokens and ada.at_end == full.at_end
    assert not any(layer.is_flat for layer in cache.layers)
