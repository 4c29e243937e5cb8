"""Bounded cache: count-weighted merge arithmetic, capacity held through long generations."""

import torch

from conftest import random_prompt
from kvbench.cache import KVCache, layer_windows
from kvbench.generation import generate
from kvbench.methods import Compression, build_method
from kvbench.methods.bounded import merge_into_slots


def t(*rows):
    return torch.tensor([[list(rows)]], dtype=torch.float32)  # (1, 1, n, d)


def step(layer, k, v, phase="decode"):
    layer.append(t(*k), t(*v))
    layer.end_step(phase)


def test_merge_arithmetic_by_hand():
    # sink 1, window 1, capacity 4 -> [sink | 2 memory slots | window]
    layer = build_method("bounded", {"sink_tokens": 1, "window": 1}, Compression(budget=4)).make_layer(0)
    keys = [[0, 5], [1, 0], [0, 1], [2, 0.2], [3, 0.3]]
    values = [[9, 9], [1, 1], [2, 2], [4, 0], [7, 3]]
    step(layer, keys, values, "prefill")
    # 5 tokens > 4: slots k1 = [1, 0], k2 = [0, 1]; k3 = [2, .2] leaves the window:
    # cos(k3, k1) = 2 / 2.01 = .995 > cos(k3, k2) = .2 / 2.01 = .0995 -> slot 1:
    # k = ([1, 0] + [2, .2]) / 2 = [1.5, .1], v = ([1, 1] + [4, 0]) / 2 = [2.5, .5], count 2
    assert layer.positions[0, 0].tolist() == [0, 1, 2, 4]
    torch.testing.assert_close(layer.keys, t([0, 5], [1.5, 0.1], [0, 1], [3, 0.3]))
    torch.testing.assert_close(layer.values, t([9, 9], [2.5, 0.5], [2, 2], [7, 3]))
    assert layer.counts.tolist() == [[[1, 2, 1, 1]]]
    step(layer, [[0.1, 2]], [[0, 6]])
    # k4 = [3, .3] leaves: cos with [1.5, .1] = .9995, with [0, 1] = .0995 -> slot 1, count 2 -> 3:
    # k = (2 [1.5, .1] + [3, .3]) / 3 = [2, .5/3], v = (2 [2.5, .5] + [7, 3]) / 3 = [4, 4/3]
    assert layer.positions[0, 0].tolist() == [0, 1, 2, 5]
    torch.testing.assert_close(layer.keys, t([0, 5], [2, 0.5 / 3], [0, 1], [0.1, 2]))
    torch.testing.assert_close(layer.values, t([9, 9], [4, 4 / 3], [2, 2], [0, 6]))
    step(layer, [[-1, 0]], [[1, -1]])
    # k5 = [.1, 2] leaves: cos with [2, .167] = .133, with [0, 1] = .9988 -> slot 2:
    # k = ([0, 1] + [.1, 2]) / 2 = [.05, 1.5], v = ([2, 2] + [0, 6]) / 2 = [1, 4]; positions kept
    assert layer.positions[0, 0].tolist() == [0, 1, 2, 6]
    torch.testing.assert_close(layer.keys, t([0, 5], [2, 0.5 / 3], [0.05, 1.5], [-1, 0]))
    torch.testing.assert_close(layer.values, t([9, 9], [4, 4 / 3], [1, 4], [1, -1]))
    assert layer.counts.tolist() == [[[1, 3, 2, 1]]]
    assert layer.bytes_held() == 4 * 2 * 2 * 4 + 4 * 4  # K and V float32 + int32 counts


def test_merge_weights_by_counts_and_merges_a_step_in_parallel():
    # slot [1, 0] (count 2) receives [2, 0] (count 3) and [4, 0] (count 1): (2x1 + 3x2 + 1x4) / 6 = 2
    # slot [0, 1] (count 1) receives nothing
    k, v, c = merge_into_slots(t([1, 0], [0, 1]), t([1, 1], [5, 5]), torch.tensor([[[2, 1]]], dtype=torch.int32),
                               t([2, 0], [4, 0]), t([4, 4], [10, -2]), torch.tensor([[[3, 1]]], dtype=torch.int32))
    torch.testing.assert_close(k, t([2, 0], [0, 1]))
    torch.testing.assert_close(v, t([(2 * 1 + 3 * 4 + 10) / 6, (2 * 1 + 3 * 4 - 2) / 6], [5, 5]))
    assert c.tolist() == [[[6, 1]]]


def run(model, comp, prompt, new_tokens, question=None, **params):
    cache = KVCache(build_method("bounded", params, comp), layer_windows(model.config))
    lengths = []
    end_step = cache.end_step

    def spy(phase):  # record what every layer holds after every step
        end_step(phase)
        lengths.append([layer.get_seq_length() for layer in cache.layers])

    cache.end_step = spy
    return generate(model, cache, prompt, question, new_tokens, eos_ids=set()), cache, lengths


def test_capacity_never_exceeded_in_a_long_generation(tiny_llama):
    # prompt 40, ratio 4 -> capacity 10 = 4 sinks + 3 memory slots + 3 window
    gen, cache, lengths = run(tiny_llama, Compression(ratio=4), random_prompt(40), 120,
                              question=random_prompt(6, seed=2), window=3)
    assert len(lengths) == 1 + 1 + 119  # prefill, appended question, decode steps
    assert all(n == 10 for step_lengths in lengths for n in step_lengths)
    for layer in cache.layers:
        assert layer.positions[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6] + list(range(162, 165))
        assert layer.counts.sum(-1).tolist() == [[165, 165]]  # every token seen is in exactly one entry
    assert gen.peak_bytes_held == 2 * 2 * 10 * (2 * 16 * 4 + 4)


def test_budget_mode_grows_to_the_budget_then_merges(tiny_llama):
    gen, cache, lengths = run(tiny_llama, Compression(budget=30), random_prompt(20), 25)
    assert [step_lengths[0] for step_lengths in lengths] == [20 + i for i in range(11)] + [30] * 14
    assert cache.layers[0].counts.sum().item() == 2 * 44


def test_no_eviction_matches_full(tiny_llama):
    prompt = random_prompt(60)
    full = generate(tiny_llama, KVCache(build_method("full", {}, None), layer_windows(tiny_llama.config)),
                    prompt, None, 30, eos_ids=set())
    gen, cache, _ = run(tiny_llama, Compression(budget=10_000), prompt, 30)
    assert gen.tokens == full.tokens
    assert cache.layers[0].counts.max().item() == 1  # nothing merged
