"""MiKV: quantisation error per bit width, real packed bytes against the methods reference's formula,
exactness with everything important (fp16 model), the important set during decoding, the key
balancer and the ratio mappings. Layers are driven directly where tensors are hand-made."""

import copy

import pytest
import torch

from conftest import random_prompt
from kvbench.cache import KVCache, layer_attention, layer_windows
from kvbench.generation import generate
from kvbench.methods import Compression, build_method
from kvbench.errors import ConfigError
from kvbench.methods.mikv import key_balancer
from kvbench.packing import dequantize, pack, quantize, unpack
from test_method_matrix import budget_run, check_held


def make_layer(params=None, **comp):
    return build_method("mikv", params or {}, Compression(**comp)).make_layer(0)


def step(layer, keys, query, phase="prefill", values=None):
    k, v = layer.update(keys, -keys if values is None else values)
    layer_attention(layer, query, k, v, keys.shape[-1] ** -0.5)
    layer.end_step(phase)
    return k, v


def sets(layer):
    """(important, low-precision) positions of batch 0, head 0."""
    lo = [] if layer.lo_positions is None else layer.lo_positions[0, 0].tolist()
    return set(layer.hi_positions[0, 0].tolist()), set(lo)


# -- quantisation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantisation_error_is_within_half_a_step(bits):
    head_dim = 16
    x = torch.randn(2, 3, 7, head_dim, generator=torch.Generator().manual_seed(bits)) * 4
    x[0, 0, 0, :8] = 0.3  # a constant group
    p = quantize(x, bits, head_dim // 2)  # MiKV's groups: g = head_dim / 2
    assert p.data.dtype == torch.uint8 and p.data.shape[-1] == head_dim * bits // 8  # int3: 6 bytes, dense
    assert p.scale.dtype == p.zero.dtype == torch.float16 and p.scale.shape[-1] == 2
    error = (x - dequantize(p, torch.float32)).abs().unflatten(-1, (2, head_dim // 2))
    assert (error <= p.scale.float()[..., None] / 2 + 1e-6).all()


def test_int3_packs_eight_codes_in_three_bytes():
    codes = torch.randint(0, 8, (2, 5, 24), dtype=torch.uint8)
    packed = pack(codes, 3)
    assert packed.shape == (2, 5, 9) and torch.equal(unpack(packed, 3), codes)
    one = torch.tensor([1, 0, 0, 0, 0, 0, 0, 7], dtype=torch.uint8)  # code 7 at bits 21..23
    assert pack(one, 3).tolist() == [1, 0, 0b11100000]


# -- bytes --------------------------------------------------------------------------------------------

# b = 1, 2 KV heads, 20 tokens, head_dim 16 (g = 8), fp16 "model": ratio 4 in tokens mode -> 5 important
# tokens per head. Per token and head, K or V:
#   fp16: 16 * 2 = 32 bytes; intB: 16 * B / 8 packed bytes + 2 groups * (fp16 scale + fp16 zero) = 2B + 8
# methods.md's formula, bits per element: rho * b_hi + (1 - rho) * (b_lo + 32 / g) (+ 32 / g for int b_hi)
@pytest.mark.parametrize("high,low,hi_bytes,lo_bytes,bits", [
    (16, 2, 32, 12, 0.25 * 16 + 0.75 * (2 + 4)),  # 8.5 bits: 16 / 8.5 = 1.88x
    (16, 3, 32, 14, 0.25 * 16 + 0.75 * (3 + 4)),  # int3 packed densely: 6 bytes of codes
    (8, 2, 24, 12, 0.25 * (8 + 4) + 0.75 * (2 + 4)),
    (8, 4, 24, 16, 0.25 * (8 + 4) + 0.75 * (4 + 4)),
])
def test_bytes_held_match_the_formula(high, low, hi_bytes, lo_bytes, bits):
    layer = make_layer({"high_bits": high, "low_bits": low}, ratio=4)
    x = torch.randn(1, 2, 20, 16, generator=torch.Generator().manual_seed(0)).half()
    step(layer, x, torch.randn(1, 4, 20, 16).half())
    assert layer.hi_positions.shape == (1, 2, 5) and layer.lo_positions.shape == (1, 2, 15)
    balancer = 2 * 16 * 4  # fp32 per head and channel
    per_head = 2 * (5 * hi_bytes + 15 * lo_bytes)  # K and V
    assert layer.bytes_held() == 2 * per_head + balancer
    assert 2 * per_head == 20 * 16 * 2 * 2 * bits / 8  # elements x bits: the formula
    assert layer.bytes_full() == 2 * 2 * 20 * 16 * 2
    assert layer.bytes_full() / (layer.bytes_held() - balancer) == pytest.approx(16 / bits)


def test_memory_mode_solves_the_formula_for_rho():
    # fp16 / int2, g = 8: 16 / ratio = 16 rho + 6 (1 - rho); ratio 16 / 8.5 -> rho = 0.25
    method = build_method("mikv", {"ratio_mode": "memory", "group_size": 8}, Compression(ratio=16 / 8.5))
    assert method.memory_rho(8) == pytest.approx(0.25)
    layer = method.make_layer(0)
    step(layer, torch.randn(1, 2, 20, 16).half(), torch.randn(1, 4, 20, 16).half())
    assert layer.hi_positions.shape[-1] == 5
    assert layer.bytes_full() / (layer.bytes_held() - 2 * 16 * 4) == pytest.approx(16 / 8.5)


@pytest.mark.parametrize("params,ratio,message", [
    ({"group_size": 8}, 4, r"achievable ratios are 1 \(all important\) to 2.667 \(none important\)"),
    ({"high_bits": 8, "group_size": 32}, 1,  # 16 / (8 + 1), 16 / (2 + 1)
     r"achievable ratios are 1.778 \(all important\) to 5.333"),
    ({}, 8, "below 8 .16 / 2 bits"),  # unreachable whatever the head size
    ({"low_bits": 4}, 4, "below 4 .16 / 4 bits"),
])
def test_memory_mode_rejects_unreachable_ratios_when_built(params, ratio, message):
    with pytest.raises(ConfigError, match=message):
        build_method("mikv", {"ratio_mode": "memory", **params}, Compression(ratio=ratio))


def test_memory_mode_checks_the_exact_range_once_head_dim_is_known(tiny_llama):
    # head_dim 16, g = 8: fp16 / int2 reaches 1 to 16 / 6 = 2.67x; 4x passes the build-time bound (< 8)
    method = build_method("mikv", {"ratio_mode": "memory"}, Compression(ratio=4))
    with pytest.raises(ConfigError, match="achievable ratios are 1 .* to 2.667"):
        method.setup(tiny_llama)


@pytest.mark.parametrize("params", [{"ratio_mode": "bits"}, {"high_bits": 12}, {"low_bits": 8},
                                    {"high_bits": 4, "low_bits": 4}, {"recent_fraction": 2}])
def test_bad_parameters_are_rejected(params):
    with pytest.raises(ConfigError):
        build_method("mikv", params, Compression(ratio=2))


# -- exactness and decoding ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama_fp16(tiny_llama):
    """The tiny model in fp16: MiKV's fp16 important tokens are then lossless."""
    return copy.deepcopy(tiny_llama).half()


def run_logits(model, cache, prompt, new):
    logits = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: logits.append(out[:, -1].clone()))
    try:
        gen = generate(model, cache, prompt, None, new, eos_ids=set())
    finally:
        hook.remove()
    return gen, torch.stack(logits, 1)


@pytest.fixture(scope="module")
def fp16_full(tiny_llama_fp16):
    prompt = random_prompt(40, batch=2)
    cache = KVCache(build_method("full", {}, None), layer_windows(tiny_llama_fp16.config))
    return prompt, run_logits(tiny_llama_fp16, cache, prompt, 8), cache


@pytest.mark.parametrize("params,comp", [
    ({}, {"ratio": 1}),  # tokens mode: rho = 1
    ({"ratio_mode": "memory"}, {"ratio": 1}),  # fp16 everywhere = 16 bits: rho = 1
    ({}, {"budget": 60}),  # 59 fp16 tokens' bytes besides the balancer: more than the sequence
])
def test_everything_important_equals_full_on_an_fp16_model(tiny_llama_fp16, fp16_full, params, comp):
    prompt, (full, full_logits), full_cache = fp16_full
    cache = KVCache(build_method("mikv", params, Compression(**comp)), layer_windows(tiny_llama_fp16.config))
    gen, logits = run_logits(tiny_llama_fp16, cache, prompt, 8)
    assert gen.tokens == full.tokens
    for layer in cache.layers:
        assert layer.lo_positions is None and layer.important_held().tolist() == [[47, 47]] * 2
    # the cache is lossless: the first layer (whose inputs are the same tokens' embeddings) holds the
    # full cache's keys and values bit for bit. Deeper layers and the logits differ by rounding only,
    # because MiKV computes attention from the probabilities it scores with rather than with SDPA.
    first = cache.layers[0]
    assert torch.equal(first.positions, full_cache.layers[0].positions)
    assert torch.equal(first.stores["hi_k"].tensor, full_cache.layers[0].keys)
    assert torch.equal(first.stores["hi_v"].tensor, full_cache.layers[0].values)
    torch.testing.assert_close(logits, full_logits, atol=2e-3, rtol=2e-3)


def test_demotion_keeps_the_important_set_at_rho_n(tiny_llama):
    cache = KVCache(build_method("mikv", {}, Compression(ratio=4)), layer_windows(tiny_llama.config))
    history = []
    end_step = cache.end_step

    def recording(phase):
        end_step(phase)
        history.append([sets(layer) for layer in cache.layers])
        for layer in cache.layers:
            n = layer.seen
            hi, lo = sets(layer)
            assert len(hi) == round(n / 4) and layer.important_held().unique().tolist() == [round(n / 4)]
            assert hi | lo == set(range(n)) and not hi & lo  # nothing evicted, one precision each
            recent = int(round(n / 4) * 0.5)
            assert set(range(n - recent, n)) <= hi  # the recent half is always important
            # every token held once, in the stores' order (important first), not re-sorted by position
            assert layer.get_seq_length() == n
            assert torch.equal(layer.positions.sort(dim=-1).values, torch.arange(n).expand_as(layer.positions))
            assert torch.equal(layer.positions, torch.cat([layer.hi_positions, layer.lo_positions], dim=-1))

    cache.end_step = recording
    generate(tiny_llama, cache, random_prompt(40, batch=2), random_prompt(3, batch=2, seed=1), 30, eos_ids=set())
    assert len(history) == 1 + 1 + 29  # prefill, question, decoding
    for before, after in zip(history, history[1:]):
        for (_, lo_before), (_, lo_after) in zip(before, after):
            assert lo_before <= lo_after  # never promoted back


def test_the_lowest_scoring_non_recent_important_token_is_demoted():
    g = torch.Generator().manual_seed(3)
    layer = make_layer(ratio=2.5)  # 4 important tokens of 10 and of 11: 2 recent + 2 top-scoring
    keys, queries = torch.randn(1, 1, 12, 8, generator=g), torch.randn(1, 2, 12, 8, generator=g)
    step(layer, keys[:, :, :10], queries[:, :, :10])
    hi, lo = sets(layer)
    scores = layer.hi_scores[0, 0].clone()
    top_two = set(layer.hi_positions[0, 0][scores.argsort(descending=True)[:2]].tolist())
    assert {8, 9} <= hi and len(hi) == 4 and hi - {8, 9} == top_two - {8, 9}

    k, v = layer.update(keys[:, :, 10:11], keys[:, :, 10:11])
    positions = layer.positions[0, 0].tolist()
    layer_attention(layer, queries[:, :, 10:11], k, v, 8 ** -0.5)
    # the new query's attention, summed over the group's two heads, adds to every important token
    probs = torch.softmax(queries[0, :, 10] @ k[0, 0].T * 8 ** -0.5, dim=-1).sum(0)
    by_position = dict(zip(positions, probs.tolist()))
    hi_positions = layer.hi_positions[0, 0].tolist()
    torch.testing.assert_close(layer.hi_scores[0, 0], scores + torch.tensor([by_position[p] for p in hi_positions]))
    # token 10 enters; 5 > 4, the recent two are 9 and 10: the lowest-scoring of the others goes
    candidates = {p: s for p, s in zip(hi_positions, layer.hi_scores[0, 0].tolist()) if p < 9}
    demoted = min(candidates, key=candidates.get)
    layer.end_step("decode")
    assert sets(layer) == ((hi | {10}) - {demoted}, lo | {demoted})


def test_a_budget_is_bytes_of_16_bit_tokens():
    method = build_method("mikv", {"group_size": 32}, Compression(budget=10))
    # head_dim 64: fp16 token 2 x 64 x 2 = 256 bytes, int2 token 2 x 64 x (2 + 32 / 32) / 8 = 48 bytes;
    # the budget is 10 x 256 bytes, less the fp32 balancer's 64 x 4 = 256: room 2304
    assert method.room(64) == 2304 and method.low_room(64, 32) == 2304 // 48
    # 20 tokens held: C fp16 + (20 - C) int2 <= 2304 -> C = (2304 - 20 x 48) // (256 - 48) = 6
    assert method.important_tokens(100, 32, 64, held=20) == 6
    assert method.important_tokens(100, 32, 64, held=3) == 3  # all fit
    assert method.important_tokens(100, 32, 64, held=60) == 0  # 60 x 48 > 2304: none


def test_budget_mode_holds_the_bytes_and_evicts_the_oldest_low_precision_tokens(tiny_llama):
    gen, cache, method, held = budget_run(tiny_llama, "mikv", budget=6)  # 300 + 49 tokens seen
    check_held(method, held)
    # head_dim 16, groups of 8: room 6 x 64 - 64 (balancer) = 320 bytes; an int2 token 2 x 16 x (2 + 32 / 8)
    # / 8 = 24 bytes, an fp16 one 64: once 13 int2 tokens fill it, nothing stays important and the
    # oldest int2 tokens leave
    layer = cache.layers[0]
    assert layer.important_held().tolist() == [[0, 0]]
    assert layer.lo_positions[0, 0].sort().values.tolist() == list(range(349 - 13, 349))


# -- the key balancer ----------------------------------------------------------------------------------

def test_balancer_by_hand_and_stored_keys_are_balanced():
    keys = torch.tensor([[[[1.0, -8.0, 0.0, 2.0], [-2.0, 4.0, 0.0, 1.0]]]])  # (1, 1, 2, 4)
    query = torch.tensor([[[[2.0, 1.0, 3.0, 0.5]], [[-8.0, 0.5, 1.0, 0.0]]]])  # (1, 2, 1, 4): a group of 2
    # max |q| per channel over both heads: [8, 1, 3, .5]; max |k|: [2, 8, 0, 2]
    # b = sqrt([8/2, 1/8, -, .5/2]) = [2, .3536, 1 (a zero channel), .5]
    b = torch.tensor([2.0, 0.125 ** 0.5, 1.0, 0.5])
    torch.testing.assert_close(key_balancer(query, keys)[0, 0], b)

    # one important token, the most recent: token 0 is quantised (int2, groups of 2 channels)
    layer = make_layer({"group_size": 2, "recent_fraction": 1.0}, ratio=2)
    step(layer, keys, query.expand(1, 2, 2, 4).contiguous())
    assert sets(layer) == ({1}, {0})
    torch.testing.assert_close(layer.balance[0, 0], b)
    # the low-precision token holds Q(k * b); attention gets dequant / b
    stored = quantize(keys[:, :, :1] * b, 2, 2)
    held = layer.stores["lo_k"].packed()
    assert torch.equal(held.data, stored.data) and torch.equal(held.scale, stored.scale)
    expected = dequantize(stored, torch.float32) / b
    k, _ = layer.update(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))
    at = layer.positions[0, 0].tolist().index(0)  # held in the stores' order: important first
    torch.testing.assert_close(k[:, :, at:at + 1], expected)
    important = layer.positions[0, 0].tolist().index(1)
    torch.testing.assert_close(k[:, :, important:important + 1], keys[:, :, 1:2])  # fp16 keys, no balancer


def test_balancer_lowers_the_logit_error_of_outlier_channels():
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(1, 2, 64, 16, generator=g)
    keys[..., 3] *= 30  # an outlier key channel, as in real models
    query = torch.randn(1, 4, 64, 16, generator=g)

    def logit_error(balancer):
        layer = make_layer({"balancer": balancer}, ratio=64)
        step(layer, keys, query)
        k, _ = layer.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))
        by_position = layer.positions[:, :, :64].argsort(dim=-1)  # held in the stores' order
        held = torch.gather(k[:, :, :64], 2, by_position[..., None].expand(-1, -1, -1, 16))
        exact = query @ keys.repeat_interleave(2, 1).transpose(-1, -2)
        return (query @ held.repeat_interleave(2, 1).transpose(-1, -2) - exact).abs().mean()

    assert logit_error(True) < 0.8 * logit_error(False)
