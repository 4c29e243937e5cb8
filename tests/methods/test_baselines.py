"""The baseline methods on small hand-made tensors: layers are driven directly (update, observe and
attend, end_step), as the cache and kvbench's attention function drive them."""

import pytest
import torch

from conftest import random_prompt
from kvbench.cache import KVCache, layer_attention, layer_windows
from kvbench.generation import generate
from kvbench.methods import Compression, build_method
from kvbench.errors import ConfigError
from kvbench.methods.pyramidkv import layer_budgets
from kvbench.packing import dequantize, pack, quantize, unpack
from kvbench.methods.scores import attention_probs, attention_with_received, top_and_recent, window_scores


def make_layer(name, layer_idx=0, seed=0, params=None, **comp):
    return build_method(name, params or {}, Compression(**comp), seed).make_layer(layer_idx)


def step(layer, keys, query=None, phase="prefill", values=None, scaling=1.0):
    """One forward step of one layer: update -> observe, attend -> end_step. Returns what the step attended."""
    k, v = layer.update(keys, keys.clone() if values is None else values)
    if query is not None:
        layer_attention(layer, query, k, v, scaling)
    layer.end_step(phase)
    return k, v


def vec(*rows):
    """(1, heads, n, 2) from per-head lists of first components (second component 0)."""
    t = torch.tensor(rows, dtype=torch.float32)
    return torch.stack([t, torch.zeros_like(t)], dim=-1)[None]


def naive_probs(query, keys, scaling=1.0):
    """Full causal softmax per query head, the way one would write it by hand."""
    group = query.shape[1] // keys.shape[1]
    logits = query @ keys.repeat_interleave(group, 1).transpose(-1, -2) * scaling
    q, n = query.shape[2], keys.shape[2]
    future = torch.arange(n)[None, :] > torch.arange(n - q, n)[:, None]
    return logits.masked_fill(future, float("-inf")).softmax(-1)


# -- shared scores ----------------------------------------------------------------------------------

def test_attention_with_received_in_chunks_equals_the_full_matrix():
    g = torch.Generator().manual_seed(0)
    keys, query = torch.randn(2, 2, 11, 4, generator=g), torch.randn(2, 4, 7, 4, generator=g)  # GQA 2
    values = torch.randn(2, 2, 11, 3, generator=g)
    full = naive_probs(query, keys, 0.5)  # (2, 4, 7, 11)
    expected = full.unflatten(1, (2, 2)).mean(2).sum(2)
    expected_out = full @ values.repeat_interleave(2, dim=1)
    for chunk in (1, 3, 512):
        out, received = attention_with_received(query, keys, values, 0.5, chunk=chunk)
        torch.testing.assert_close(received, expected)
        torch.testing.assert_close(out, expected_out)
    last_two = full[:, :, -2:].unflatten(1, (2, 2)).mean(2)
    torch.testing.assert_close(attention_probs(query[:, :, -2:], keys, 0.5), last_two)


def test_top_and_recent():
    scores = torch.tensor([[[5.0, 1.0, 4.0, 0.0, 9.0, 9.0]]])
    assert top_and_recent(scores, 6, 4, 2).sort(-1).values.tolist() == [[[0, 2, 4, 5]]]
    assert top_and_recent(scores, 6, 3, 5).sort(-1).values.tolist() == [[[3, 4, 5]]]  # window shrinks


# -- H2O ----------------------------------------------------------------------------------------------

def test_h2o_keeps_heavy_hitters_and_recent_tokens():
    # one KV head, two query heads: head 0 asks for the first key component, head 1 for the second.
    # Token 2 is heavy for head 0 (key [10, 0]), token 3 for head 1 (key [0, 10]).
    keys = torch.zeros(1, 1, 6, 2)
    keys[0, 0, 2, 0] = keys[0, 0, 3, 1] = 10.0
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[None, :, None, :].expand(1, 2, 6, 2)
    layer = make_layer("h2o", budget=4)  # 2 heavy hitters + 2 recent tokens
    step(layer, keys, query)
    # by hand (mean over the two heads of the summed causal attention, e^-10 ~ 0):
    #   token 0: head 0 gets 1 + 1/2, head 1 gets 1 + 1/2 + 1/3  -> 1.667
    #   token 1: 1/2 and 1/2 + 1/3                                -> 0.667
    #   token 2: ~4 (queries 2..5) and 1/3                       -> 2.167
    #   token 3: ~0 and ~3 (queries 3..5)                         -> 1.5
    # heavy hitters among tokens 0..3: tokens 2 and 0; recent: 4 and 5
    assert layer.positions.tolist() == [[[0, 2, 4, 5]]]
    torch.testing.assert_close(layer.scores[0, 0, :2], torch.tensor([5 / 3, 13 / 6]), atol=1e-3, rtol=0)
    # a decode step adds the new query's attention; token 2 (attended by head 0) stays a heavy hitter
    step(layer, torch.zeros(1, 1, 1, 2), query[:, :, :1], phase="decode")
    assert layer.positions.sort(dim=-1).values.tolist() == [[[0, 2, 5, 6]]]  # decoding may reorder
    assert layer.get_seq_length() == 4  # never above capacity between steps


# -- SnapKV ---------------------------------------------------------------------------------------------

def test_snapkv_pools_window_attention_before_choosing():
    # window = the last 2 of 10 tokens, both querying the first key component; key logits e^a:
    a = [0.0, 2.0, 0.0, 6.0, 0.0, 1.0, 4.0, 4.0, 0.0, 0.0]
    keys, query = vec(a), vec([1.0] * 10)
    s = naive_probs(query[:, :, -2:], keys)[..., :8].sum(2)[0, 0]  # attention summed over the window
    pooled = window_scores(query[:, :, -2:], keys, 1.0, kernel=3)[0, 0]
    padded = torch.cat([torch.zeros(1), s, torch.zeros(1)])
    torch.testing.assert_close(pooled, torch.stack([padded[j:j + 3].sum() / 3 for j in range(8)]))
    # raw top-3 would be tokens 3, 6, 7; pooled, token 3's neighbours 2 and 4 beat the pair 6-7
    assert s.topk(3).indices.sort().values.tolist() == [3, 6, 7]
    for comp in ({"ratio": 2}, {"budget": 5}):
        layer = make_layer("snapkv", params={"window": 2, "kernel": 3}, **comp)
        step(layer, keys, query)
        assert layer.positions.tolist() == [[[2, 3, 4, 8, 9]]]
    ratio_mode = make_layer("snapkv", params={"window": 2, "kernel": 3}, ratio=2)
    step(ratio_mode, keys, query)
    step(ratio_mode, vec([0.0]), vec([1.0]), phase="decode")  # ratio mode, prefill only: decoding adds
    assert ratio_mode.positions.tolist() == [[[2, 3, 4, 8, 9, 10]]]
    # budget mode: the decoding step takes the layer over its budget, so the rule runs again with the
    # last 2 queries (the prompt's last and the new token's): the window 9, 10 and the top 3 of the rest
    step(layer, vec([0.0]), vec([1.0]), phase="decode")
    held = torch.cat([keys[:, :, [2, 3, 4, 8, 9]], vec([0.0])], dim=2)
    rescored = window_scores(torch.cat([query[:, :, -1:], vec([1.0])], dim=2), held, 1.0, kernel=3)[0, 0]
    top = [[2, 3, 4, 8][i] for i in rescored.topk(3).indices.sort().values.tolist()]
    assert layer.positions.tolist() == [[top + [9, 10]]]


def test_snapkv_leaves_short_prompts_alone():
    layer = make_layer("snapkv", budget=10)
    step(layer, vec([1.0] * 10), vec([1.0] * 10))
    assert layer.get_seq_length() == 10


# -- PyramidKV ----------------------------------------------------------------------------------------

def test_pyramid_budgets_by_hand():
    # mean selected share 100 - 20 = 80; lo = 80 / 20 = 4; hi = 2 * 80 - 4 = 156; linear in 5 layers
    assert layer_budgets(5, 100, 20, 20, 1000) == [20 + 156, 20 + 118, 20 + 80, 20 + 42, 20 + 4]
    # hi capped at the 90 tokens there are to select (n - w), lo raised to 70 to keep the mean
    assert layer_budgets(4, 90, 10, 20, 100) == [100, 93, 87, 80]


@pytest.mark.parametrize("n_layers", [1, 2, 7, 30, 32])
@pytest.mark.parametrize("capacity,window,n_tokens", [(128, 64, 1024), (500, 64, 1000), (333, 32, 999),
                                                       (40, 64, 320), (900, 64, 1000)])
def test_pyramid_budgets_sum_to_the_total(n_layers, capacity, window, n_tokens):
    budgets = layer_budgets(n_layers, capacity, window, 20, n_tokens)
    assert sum(budgets) == n_layers * capacity
    assert budgets == sorted(budgets, reverse=True) and budgets[0] <= n_tokens
    assert min(budgets) >= min(window, capacity)


def test_pyramidkv_layers_keep_their_budgets(tiny_llama):
    method = build_method("pyramidkv", {}, Compression(ratio=4))
    method.setup(tiny_llama)
    cache = KVCache(method, layer_windows(tiny_llama.config))
    gen = generate(tiny_llama, cache, random_prompt(1024), None, 1, eos_ids=set())
    # mean share 256 - 64 = 192: lo = 9.6, hi = 374.4, rounded so that the total stays 2 x 256
    assert gen.after_prefill["tokens_per_layer"] == layer_budgets(2, 256, 64, 20, 1024) == [64 + 374, 64 + 10]
    assert gen.after_prefill["ratio"] == pytest.approx(4.0)


def test_pyramid_depth_counts_only_compressed_layers(tiny_gemma):
    method = build_method("pyramidkv", {}, Compression(ratio=4))
    method.setup(tiny_gemma)
    cache = KVCache(method, layer_windows(tiny_gemma.config))
    gen = generate(tiny_gemma, cache, random_prompt(400), None, 1, eos_ids=set())
    # one compressed layer (layer 0 is a sliding-window layer): it keeps the whole capacity, 400 / 4
    assert gen.after_prefill["tokens_per_layer"] == [7, 100]


# -- TOVA -----------------------------------------------------------------------------------------------

def tova_inputs():
    # 2 KV heads x 2 query heads each; query heads 0 and 2 read the first key component, 1 and 3 the
    # second (always 0: uniform attention). Only the last query matters to TOVA.
    keys = vec([0.0, 3.0, 0.0, 1.5], [1.0, 0.0, 3.0, 0.0])
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 2)[None, :, None, :].expand(1, 4, 4, 2)
    return keys, query


def test_tova_drops_the_lowest_mean_attention_over_all_heads():
    keys, query = tova_inputs()
    probs = naive_probs(query[:, :, -1:], keys)[0, :, 0]  # (4 query heads, 4 tokens)
    # mean over all four heads: token 0 is lowest (0.162 vs 0.177 for token 3)...
    assert probs.mean(0).argmin().item() == 0
    # ...while KV head 1 alone would rather drop token 1 or 3: TOVA's choice is layer-wise
    assert probs[2:].mean(0).argmin().item() != 0
    layer = make_layer("tova", budget=3)
    step(layer, keys, query)
    assert layer.positions.tolist() == [[[1, 2, 3], [1, 2, 3]]]
    # decoding: the new token (key 0 for both heads) gets the least attention from its own query
    # (0.145, below tokens 1, 2, 3), so it is the one dropped
    step(layer, vec([0.0], [0.0]), query[:, :, :1], phase="decode")
    assert layer.positions.tolist() == [[[1, 2, 3], [1, 2, 3]]]
    step(layer, vec([5.0], [5.0]), query[:, :, :1], phase="decode")  # a key everyone attends to stays
    assert layer.positions.tolist() == [[[1, 2, 5], [1, 2, 5]]] and layer.get_seq_length() == 3


# -- KNorm ----------------------------------------------------------------------------------------------

def test_knorm_keeps_the_smallest_key_norms_per_head():
    keys = vec([5.0, 1.0, -4.0, 2.0, 3.0], [1.0, -2.0, 3.0, 4.0, 0.5])
    values = torch.arange(20.0).reshape(1, 2, 5, 2)
    layer = make_layer("knorm", budget=3)
    step(layer, keys, values=values)
    assert layer.positions.tolist() == [[[1, 3, 4], [0, 1, 4]]]
    assert torch.equal(layer.values[0, 1], values[0, 1, [0, 1, 4]])  # values follow their keys
    # budget mode holds the budget in decoding too: a key of norm 9 is the first to leave
    step(layer, vec([9.0], [9.0]), phase="decode")
    assert layer.positions.tolist() == [[[1, 3, 4], [0, 1, 4]]]
    ratio_mode = make_layer("knorm", ratio=5 / 3)
    step(ratio_mode, keys, values=values)
    step(ratio_mode, vec([9.0], [9.0]), phase="decode")  # ratio mode, prefill only: decoding adds
    assert ratio_mode.get_seq_length() == 4


# -- Random ---------------------------------------------------------------------------------------------

def random_kept(seed, layer_idx=0):
    layer = make_layer("random", layer_idx, seed, budget=8)
    step(layer, torch.randn(2, 3, 40, 4))
    return layer.positions


def test_random_is_seeded():
    kept = random_kept(0)
    assert kept.shape == (2, 3, 8)
    assert torch.equal(kept, random_kept(0))
    assert not torch.equal(kept, random_kept(1))
    assert not torch.equal(kept, random_kept(0, layer_idx=1))
    assert not torch.equal(kept[0, 0], kept[0, 1])  # heads draw independently


# -- Quant ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (2, 3, 5, 16), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 16 * bits // 8
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("group", [4, 16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantisation_error_is_within_half_a_step(bits, group):
    x = torch.randn(2, 3, 9, 16, generator=torch.Generator().manual_seed(bits)) * 3
    x[0, 0, 0] = 1.0001  # a constant group whose value fp16 cannot hold
    x[0, 0, 1, :8] = torch.linspace(-1000, 1000, 8)  # a wide one
    p = quantize(x, bits, group)
    assert p.scale.dtype == p.zero.dtype == torch.float16 and p.scale.shape[-1] == 16 // group
    error = (x - dequantize(p, x.dtype)).abs().unflatten(-1, (-1, group))
    assert (error <= p.scale.float()[..., None] / 2 + 1e-6 * x.abs().max()).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_is_codes_times_scale_plus_zero_into_any_output(bits):
    x = torch.randn(2, 3, 7, 16, generator=torch.Generator().manual_seed(bits))
    p = quantize(x, bits, 8)
    by_hand = (unpack(p.data, bits).float().unflatten(-1, (2, 8)) * p.scale.float()[..., None]
               + p.zero.float()[..., None]).flatten(-2)
    assert torch.equal(dequantize(p), by_hand)
    longer = torch.full((2, 3, 9, 16), 7.0)
    dequantize(p, out=longer[:, :, :7])  # the front of a longer tensor: strided
    assert torch.equal(longer[:, :, :7], by_hand) and (longer[:, :, 7:] == 7).all()
    half = torch.empty(2, 3, 7, 16, dtype=torch.float16)
    assert torch.equal(dequantize(p, out=half), by_hand.half())  # computed in float32, then rounded
    assert torch.equal(dequantize(p, torch.float16), by_hand.half())


@pytest.mark.parametrize("ratio,bits,group_size,bytes_per_token_head", [
    (4, 4, None, 16 * 4 // 8 + 2 + 2),  # 8 packed bytes + fp16 scale + fp16 zero
    (8, 2, 8, 16 * 2 // 8 + 2 * (2 + 2)),  # two groups of 8 channels
    (2, 8, None, 16 + 4),
])
def test_quant_layer_holds_packed_bytes(ratio, bits, group_size, bytes_per_token_head):
    method = build_method("quant", {"group_size": group_size}, Compression(ratio=ratio))
    assert method.bits == bits
    layer = method.make_layer(0)
    x = torch.randn(2, 3, 10, 16)
    keys, _ = step(layer, x, values=-x)
    assert torch.equal(keys, x)  # the step that adds tokens attends over their exact values
    assert layer.bytes_held() == 2 * 2 * 3 * 10 * bytes_per_token_head  # K and V
    assert layer.bytes_full() == 2 * 2 * 3 * 10 * 16 * 4
    assert layer.get_seq_length() == 10 and layer.tokens_held().tolist() == [[10] * 3] * 2
    new = torch.randn(2, 3, 1, 16)
    keys, values = layer.update(new, new)
    assert keys.shape == (2, 3, 11, 16) and torch.equal(keys[:, :, -1:], new)
    assert torch.equal(keys[:, :, :10], dequantize(layer.stores["packed_keys"].packed(), x.dtype))
    assert layer.bytes_held() == 2 * 2 * 3 * 10 * bytes_per_token_head + 2 * new.numel() * 4  # new: float
    layer.end_step("decode")
    assert layer.bytes_held() == 2 * 2 * 3 * 11 * bytes_per_token_head
    assert layer.positions[0, 0].tolist() == list(range(11))


@pytest.mark.parametrize("params,comp,message", [
    ({}, {"ratio": 3}, r"cannot reach ratio 3: its achievable ratios are 8 \(int2\), 4 \(int4\), 2 \(int8\)"),
    ({"bits": 4}, {"ratio": 2}, r"bits=4 compresses 4x .* ratio 2 is not achievable"),
    ({}, {"budget": 100}, "give ratio = 16 / bits instead"),
])
def test_quant_rejects_unreachable_settings(params, comp, message):
    with pytest.raises(ConfigError, match=message):
        build_method("quant", params, Compression(**comp))


def test_quant_bits_must_be_packable():
    with pytest.raises(ConfigError, match="quant.bits=3: expected one of 2, 4, 8, or null"):
        build_method("quant", {"bits": 3}, Compression(ratio=4))
    assert build_method("quant", {"bits": 2}, Compression(ratio=8)).bits == 2
