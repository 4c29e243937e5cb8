"""LagKV (authors' recursive algorithm) and kvpress's LagKVPress variant, on hand-computed cases."""

import math

import pytest
import torch

from conftest import random_prompt
from kvbench.cache import KVCache, layer_windows
from kvbench.generation import generate
from kvbench.errors import ConfigError
from kvbench.methods import Compression, build_method
from kvbench.methods.lagkv import lag_relative_scores

# Four token types whose per-channel min is 0 and max is 1 over any partition holding all four, so a
# partition of them used as reference normalises the one before it to itself (x - 0) / (1 - 0). Their
# unbiased standard deviations over the 4 channels:
#   X1 = [1, 0, 1, 0]:        mean .5,   squared deviations 4 x .25 = 1,                 std sqrt(1/3)   = .57735
#   X2 = [0, 1, .5, 1]:       mean .625, .390625 + .140625 + .015625 + .140625 = .6875,  std sqrt(.6875/3) = .47871
#   X3 = [.5, .5, 0, .5]:     mean .375, 3 x .015625 + .140625 = .1875,                  std sqrt(.0625) = .25
#   X4 = [.5, .5, .5, .5]:    std 0
# so inside a partition holding each type once, the softmax of the stds ranks X1 > X2 > X3 > X4, and
# all such partitions share the softmax denominator e^.57735 + e^.47871 + e^.25 + e^0.
X = {1: [1.0, 0.0, 1.0, 0.0], 2: [0.0, 1.0, 0.5, 1.0], 3: [0.5, 0.5, 0.0, 0.5], 4: [0.5, 0.5, 0.5, 0.5]}
STD = {1: math.sqrt(1 / 3), 2: math.sqrt(0.6875 / 3), 3: 0.25, 4: 0.0}
SINK, LAG = 2, 4
N = SINK + 3 * LAG + 5  # 19 tokens: sinks 0-1, partitions [2,6) [6,10) [10,14) [14,18), remainder 18


def build(layouts):
    """A (1, heads, 19, 4) tensor: sinks and remainder are arbitrary (never scored, never references),
    partitions 0..3 hold the X types listed for each head."""
    heads = []
    for parts in layouts:
        rows = [[5.0, -5.0, 5.0, -5.0], [-3.0, 3.0, 2.0, 7.0]]  # sinks
        rows += [X[t] for part in parts for t in part]
        rows += [[9.0, 9.0, 9.0, 9.0]]  # remainder
        heads.append(rows)
    return torch.tensor([heads])


# head 0: keys = values, so a token's score is 2 x softmax(std): top 2 = the X1 and X2 of each partition
HEAD0 = [(4, 1, 3, 2), (2, 4, 1, 3), (3, 2, 4, 1), (1, 2, 3, 4)]
#   partition 0 (positions 2..5)   X4 X1 X3 X2 -> keep 3 (X1), 5 (X2)
#   partition 1 (positions 6..9)   X2 X4 X1 X3 -> keep 6, 8
#   partition 2 (positions 10..13) X3 X2 X4 X1 -> keep 11, 13
#   partition 3 (14..17) is the last full partition: window with the remainder 18
# head 1: keys and values ordered differently; both partitions hold each type once, so s_K and s_V share
# a denominator and the ranking follows e^std(K) + e^std(V) (e^.57735 = 1.78131, e^.47871 = 1.61398,
# e^.25 = 1.28403, e^0 = 1):
HEAD1_K = [(1, 2, 3, 4), (4, 3, 1, 2), (2, 4, 3, 1), (1, 2, 3, 4)]
HEAD1_V = [(4, 1, 2, 3), (2, 1, 4, 3), (3, 2, 1, 4), (4, 3, 2, 1)]
#   p0: K X1 X2 X3 X4 / V X4 X1 X2 X3 -> 1.781+1 = 2.781, 1.614+1.781 = 3.395, 1.284+1.614 = 2.898,
#       1+1.284 = 2.284 -> keep t1, t2 = positions 3, 4 (keys alone would keep 2, 3; values alone 3, 4)
#   p1: K X4 X3 X1 X2 / V X2 X1 X4 X3 -> 2.614, 3.065, 2.781, 2.898 -> keep t1, t3 = positions 7, 9
#   p2: K X2 X4 X3 X1 / V X3 X2 X1 X4 -> 2.898, 2.614, 3.065, 2.781 -> keep t2, t0 = positions 12, 10
WINDOW = list(range(14, 19))
EXPECTED = [[0, 1, 3, 5, 6, 8, 11, 13] + WINDOW, [0, 1, 3, 4, 7, 9, 10, 12] + WINDOW]


def lagkv(comp, **params):
    return build_method("lagkv", {"sink_tokens": SINK, "lag_size": LAG, **params}, comp)


def kept_after_prefill(method, keys, values):
    layer = method.make_layer(0)
    layer.append(keys, values)
    layer.end_step("prefill")
    return layer


def test_lagkv_hand_computed_selection():
    keys = torch.cat([build([HEAD0]), build([HEAD1_K])], dim=1)
    values = torch.cat([build([HEAD0]), build([HEAD1_V])], dim=1)
    layer = kept_after_prefill(lagkv(Compression(ratio=2)), keys, values)  # int(4 / 2) = 2 per partition
    assert layer.positions[0].tolist() == EXPECTED
    # S + r L (floor((n - S) / L) - 1) + L + (n - S) mod L = 2 + 2 x (4 - 1) + 4 + 1 = 13
    assert layer.get_seq_length() == 13
    assert layer.base == SINK + 3 * 2
    index = torch.tensor(EXPECTED)[None, :, :, None].expand(-1, -1, -1, 4)
    assert torch.equal(layer.keys, torch.gather(keys, 2, index))


def test_lag_relative_scores_are_softmax_of_std():
    scores = lag_relative_scores(build([HEAD0])[:, :, SINK:SINK + 4 * LAG], LAG)
    assert scores.shape == (1, 1, 3, LAG)
    denominator = sum(math.exp(s) for s in STD.values())
    expected = [math.exp(STD[t]) / denominator for part in HEAD0[:3] for t in part]
    assert scores[0, 0].flatten().tolist() == pytest.approx(expected, abs=1e-6)


def test_constant_channel_is_normalised_to_zero():
    # channel 3 is 7 everywhere: max == min over the reference partition (0/0 in the source)
    x = build([HEAD0])[:, :, SINK:SINK + 2 * LAG].clone()
    x[..., 3] = 7.0
    low, high = x[:, :, LAG:].amin(-2, keepdim=True), x[:, :, LAG:].amax(-2, keepdim=True)
    raw = (x[:, :, :LAG] - low) / (high - low)
    assert raw.isnan().any()  # what the unguarded formula gives
    scores = lag_relative_scores(x, LAG)
    assert torch.isfinite(scores).all()
    # normalised tokens of partition 0 (X4 X1 X3 X2 with channel 3 -> 0):
    #   X4' = [.5, .5, .5, 0]: mean .375, 3 x .015625 + .140625 = .1875 -> std .25
    #   X1' = [1, 0, 1, 0]:    std sqrt(1/3) = .57735 (unchanged)
    #   X3' = [.5, .5, 0, 0]:  mean .25, 4 x .0625 = .25 -> std sqrt(.25/3) = .28868
    #   X2' = [0, 1, .5, 0]:   mean .375, .140625 + .390625 + .015625 + .140625 = .6875 -> std .47871
    stds = torch.tensor([0.25, math.sqrt(1 / 3), math.sqrt(0.25 / 3), math.sqrt(0.6875 / 3)])
    assert scores[0, 0, 0].tolist() == pytest.approx(stds.softmax(0).tolist(), abs=1e-6)
    # and the method keeps X1' and X2' of partition 0 (positions 3 and 5) with no NaN anywhere
    full = build([HEAD0])
    full[..., 3] = 7.0
    layer = kept_after_prefill(lagkv(Compression(ratio=2)), full, full)
    assert layer.positions[0, 0].tolist()[:4] == [0, 1, 3, 5]


def expected_length(n, sink, lag, keep):
    """methods.md: n tokens for n < S + 2L, else S + k (floor((n - S) / L) - 1) + L + (n - S) mod L."""
    return n if n < sink + 2 * lag else sink + keep * ((n - sink) // lag - 1) + lag + (n - sink) % lag


def test_recursion_during_decoding_follows_the_formula():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 60, 4, generator=g), torch.randn(1, 2, 60, 4, generator=g)
    layer = lagkv(Compression(ratio=2)).make_layer(0)
    layer.append(keys[:, :, :7], values[:, :, :7])  # 7 < S + 2L = 10: nothing to compress yet
    layer.end_step("prefill")
    lengths = [layer.get_seq_length()]
    for i in range(7, 60):
        layer.append(keys[:, :, i:i + 1], values[:, :, i:i + 1])
        layer.end_step("decode")
        lengths.append(layer.get_seq_length())
        pos = layer.positions[0, 0].tolist()
        assert pos[:SINK] == [0, 1] and pos == sorted(pos)
        window = (i + 1 - SINK) % LAG + LAG if i + 1 >= SINK + 2 * LAG else 0
        assert pos[len(pos) - window:] == list(range(i + 1 - window, i + 1))  # window kept whole
    assert lengths == [expected_length(n, SINK, LAG, 2) for n in range(7, 61)]
    assert layer.base == SINK + 2 * ((60 - SINK) // LAG - 1)
    # 60 seen: 13 partitions compressed to 2 tokens each: 2 + 2 x 13 + 4 + (58 mod 4 = 2) = 34
    assert lengths[-1] == 34


def run(model, name, params, comp, prompt, new_tokens):
    cache = KVCache(build_method(name, params, comp), layer_windows(model.config))
    return generate(model, cache, prompt, None, new_tokens, eos_ids=set()), cache


def test_lagkv_generation_compresses_prompt_and_decode(tiny_llama):
    params = {"sink_tokens": 4, "lag_size": 8}
    gen, cache = run(tiny_llama, "lagkv", params, Compression(ratio=4), random_prompt(50), 21)
    # prompt 50: 4 + 2 x (5 - 1) + 8 + 6 = 26; after 20 decode steps (70 tokens): 4 + 2 x 7 + 8 + 2 = 28
    assert gen.after_prefill["tokens_held"] == expected_length(50, 4, 8, 2) == 26
    assert [layer.get_seq_length() for layer in cache.layers] == [expected_length(70, 4, 8, 2)] * 2


@pytest.mark.parametrize("name,params", [("lagkv", {"sink_tokens": 4, "lag_size": 8}),
                                         ("lagkv_kvpress", {"sink_tokens": 4, "lag_size": 8})])
@pytest.mark.parametrize("comp", [Compression(ratio=1), Compression(budget=10_000)])
def test_no_eviction_matches_full(tiny_llama, name, params, comp):
    prompt = random_prompt(60)
    full, _ = run(tiny_llama, "full", {}, None, prompt, 30)
    gen, cache = run(tiny_llama, name, params, comp, prompt, 30)
    assert gen.tokens == full.tokens
    assert gen.after_prefill["tokens_held"] == 60


def test_budget_mode_derives_keep_per_partition():
    keys = torch.cat([build([HEAD0]), build([HEAD1_K])], dim=1)
    values = torch.cat([build([HEAD0]), build([HEAD1_V])], dim=1)
    # n = 19: P = 4 partitions, remainder 1; sink + window = 2 + 4 + 1 = 7 never compressed
    # budget 11: k = (11 - 7) // (4 - 1) = 1 -> 2 + 1 x 3 + 5 = 10 tokens <= 11
    layer = kept_after_prefill(lagkv(Compression(budget=11)), keys, values)
    assert layer.keep_per_partition == 1 and layer.get_seq_length() == 10
    assert layer.positions[0, 0].tolist() == [0, 1, 3, 8, 13] + WINDOW  # each partition's top (X1)
    # budget 9 = sink + window (2 + 4 + 1 = 7) + 2: k = 2 // 3 = 0
    assert kept_after_prefill(lagkv(Compression(budget=9)), keys, values).get_seq_length() == 7
    # a prompt too short to compress is held whole
    assert lagkv(Compression(budget=9)).keep_per_partition(8) == LAG
    assert lagkv(Compression(budget=10_000)).keep_per_partition(19) == LAG  # nothing evicted


def test_a_budget_below_sink_and_window_fails_naming_the_smallest_feasible_one():
    # sink 2 + up to 2 x 4 - 1 = 7 uncompressed tokens: 9 is the smallest budget that can be held
    with pytest.raises(ConfigError, match="smallest feasible budget is sink_tokens \\+ 2 x lag_size - 1 = 9"):
        lagkv(Compression(budget=8))


def test_budget_mode_evicts_the_lowest_scoring_compressed_tokens():
    keys = torch.cat([build([HEAD0]), build([HEAD1_K])], dim=1)
    values = torch.cat([build([HEAD0]), build([HEAD1_V])], dim=1)
    # budget 11 keeps 10 tokens of the 19 (above): [0, 1, 3, 8, 13] and [0, 1, 3, 7, 12] + WINDOW, and
    # the scores that kept 3 / 8 / 13 and 3 / 7 / 12 (set here: the built heads tie)
    layer = kept_after_prefill(lagkv(Compression(budget=11)), keys, values)
    assert layer.positions[0, :, :5].tolist() == [[0, 1, 3, 8, 13], [0, 1, 3, 7, 12]]
    layer.stores["scores"].tensor[0, :, SINK:layer.base] = torch.tensor([[0.3, 0.1, 0.2], [0.2, 0.3, 0.1]])
    for step in range(2):  # each decoded token adds one: the 12th held token evicts the lowest scored
        layer.append(keys[:, :, :1], values[:, :, :1])
        layer.end_step("decode")
        assert layer.get_seq_length() == 11
    assert layer.positions[0].tolist() == [[0, 1, 3, 13] + WINDOW + [19, 20], [0, 1, 3, 7] + WINDOW + [19, 20]]
    assert layer.base == SINK + 2


def kvpress(comp, **params):
    return build_method("lagkv_kvpress", {"sink_tokens": SINK, "lag_size": LAG, **params}, comp)


def test_kvpress_variant_hand_computed_global_topk():
    kv = torch.cat([build([HEAD0]), build([HEAD0])], dim=1)
    # rank inside each partition / L, by std: X4 0, X3 .25, X2 .5, X1 .75 (keys = values);
    #   p0 X4 X1 X3 X2 -> [0, .75, .25, .5]; p1 X2 X4 X1 X3 -> [.5, 0, .75, .25]; p2 X3 X2 X4 X1 -> [.25, .5, 0, .75]
    # sinks 0-1 and window 14-18 score 1. Budget 13 = 7 forced + the 3 ranks .75 (3, 8, 13) + the 3 ranks
    # .5 (5, 6, 11); budget 11 = 7 forced + 3 x .75 + one .5: a tie, which goes to the earliest (5).
    layer = kept_after_prefill(kvpress(Compression(budget=13)), kv, kv)
    assert layer.positions[0].tolist() == [[0, 1, 3, 5, 6, 8, 11, 13] + WINDOW] * 2
    layer = kept_after_prefill(kvpress(Compression(budget=11)), kv, kv)
    assert layer.positions[0].tolist() == [[0, 1, 3, 5, 8, 13] + WINDOW] * 2


def test_kvpress_variant_short_prompt_keeps_sinks_and_recent_then_never_compresses_again():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 9, 4, generator=g), torch.randn(1, 2, 9, 4, generator=g)
    layer = kept_after_prefill(kvpress(Compression(ratio=3)), keys, values)  # 9 < 2 + 8: short
    assert layer.positions[0].tolist() == [[0, 1, 8]] * 2  # round(9 / 3) = 3: sinks + most recent
    for _ in range(20):  # prefill only: decoding appends without compressing
        layer.append(keys[:, :, :1], values[:, :, :1])
        layer.end_step("decode")
    assert layer.get_seq_length() == 23


def test_kvpress_variant_on_tiny_llama(tiny_llama):
    gen, cache = run(tiny_llama, "lagkv_kvpress", {"sink_tokens": 4, "lag_size": 8}, Compression(budget=13),
                     random_prompt(50), 6)
    assert gen.after_prefill["tokens_held"] == 13
    assert [layer.get_seq_length() for layer in cache.layers] == [13] * 2  # budget mode holds it decoding
    # 50 = 4 + 5 x 8 + 6: sinks 0-3 and window [36, 50) score 1, but 4 + 14 = 18 > 13: the tie among
    # forced tokens goes to the earliest (kvpress leaves it to torch.topk): sinks + [36, 45)
    _, prefilled = run(tiny_llama, "lagkv_kvpress", {"sink_tokens": 4, "lag_size": 8}, Compression(budget=13),
                       random_prompt(50), 1)  # one token: no decoding step
    assert prefilled.layers[1].positions[0, 0].tolist() == [0, 1, 2, 3] + list(range(36, 45))
