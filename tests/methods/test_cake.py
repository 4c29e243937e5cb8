"""CAKE: layer preference, eviction indicator and budget allocation by hand; two layers of one cache
sharing the budget; decoding held at each layer's budget; the total on a real model."""

import math

import pytest
import torch

from conftest import random_prompt
from kvbench.cache import KVCache, layer_attention, layer_windows
from kvbench.errors import ConfigError
from kvbench.generation import generate
from kvbench.methods import Compression, build_method
from kvbench.methods.cake import eviction_indicator, layer_budgets, layer_preference


def test_layer_preference_by_hand():
    # two window queries, two tokens: entropy -(2 * 0.5 ln 0.5 + 1 ln 1 + 0) = ln 2; variance over the
    # queries (unbiased) 0.125 per token, 0.25 in all
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])[None, None]
    assert layer_preference(probs, 1.0, 1.0) == pytest.approx(math.log(2) * 0.25)
    assert layer_preference(probs, 0.5, 2.0) == pytest.approx(math.log(2) ** 2 * 0.25 ** 0.5)


def test_eviction_indicator_by_hand():
    # one KV head, two query heads, two window queries, three tokens. Head 0: means 0.3, 0.4, 0.2,
    # variances 0.02, 0.08, 0; with gamma 10: 0.5, 1.2, 0.2. Head 1: the same probabilities swapped
    # between tokens 0 and 2: 0.2, 1.2, 0.5. Kernel 3 pooling, zero padding counted, then the mean
    # over the two heads: head 0 pooled 1.7/3, 1.9/3, 1.4/3; head 1 1.4/3, 1.9/3, 1.7/3.
    head = torch.tensor([[0.2, 0.6, 0.2], [0.4, 0.2, 0.2]])
    probs = torch.stack([head, head.flip(-1)])[None, None]  # (1, 1, 2, 2, 3)
    torch.testing.assert_close(eviction_indicator(probs[:, :, :1], 10.0, 1)[0, 0], torch.tensor([0.5, 1.2, 0.2]))
    torch.testing.assert_close(eviction_indicator(probs, 10.0, 3)[0, 0], torch.tensor([3.1, 3.8, 3.1]) / 6)


def test_layer_budgets_by_hand():
    assert layer_budgets([1.0, 2.0, 5.0], 80, 100) == [10, 20, 50]  # proportional
    # 72 is above the 40 tokens there are: its 32 extra tokens go 16 each to the other layers
    assert layer_budgets([1.0, 1.0, 8.0], 90, 40) == [25, 25, 40]
    assert layer_budgets([1.0, 1.0, 1.0], 10, 10) == [4, 3, 3]  # truncation deficit to the first layers
    assert layer_budgets([0.0, 0.0], 7, 10) == [4, 3]  # no preference at all: equal shares


@pytest.mark.parametrize("n_layers", [2, 5, 30])
def test_layer_budgets_sum_to_the_total(n_layers):
    g = torch.Generator().manual_seed(n_layers)
    for _ in range(20):
        prefs = (torch.rand(n_layers, generator=g) ** 4).tolist()
        cap = int(torch.randint(1, 50, (1,), generator=g))
        total = int(torch.randint(0, n_layers * cap + 1, (1,), generator=g))
        budgets = layer_budgets(prefs, total, cap)
        assert sum(budgets) == total and all(0 <= b <= cap for b in budgets)


def two_layers(**params):
    """The two layers of one cache (window 2, capacity 5 tokens per layer)."""
    method = build_method("cake", {"window": 2, **params}, Compression(budget=5))
    return method.make_layer(0), method.make_layer(1)


def step(layers, keys, phase):
    """One forward step of the cache: each layer stores its keys and sees the query (1, 0); then the
    cache's end_step, layer after layer."""
    query = torch.tensor([1.0, 0.0]).expand(1, 1, keys[0].shape[2], 2)
    for layer, k in zip(layers, keys):
        held_k, held_v = layer.update(k, k.clone())
        layer_attention(layer, query, held_k, held_v, 1.0)
    for layer in layers:
        layer.end_step(phase)


def test_layers_share_the_budget_by_preference():
    # 10 tokens. Layer 0: every key 0, attention spread evenly (high entropy, some shift between the
    # window's two queries, which see 9 and 10 tokens). Layer 1: token 3's key takes all the
    # attention (entropy and variance ~0): its preference ~0. The 2 x (5 - 2) = 6 selected tokens
    # all go to layer 0, which keeps 6 of its 8 scorable tokens plus the window; layer 1 only its window.
    # (Layer 0's token 1 gets slightly less attention than the others: key -0.1.)
    spread = torch.zeros(1, 1, 10, 2)
    focused = spread.clone()
    focused[0, 0, 3, 0] = 50.0
    spread[0, 0, 1, 0] = -0.1
    layers = two_layers()
    step(layers, [spread, focused], "prefill")
    assert layers[1].preference < 1e-12 < layers[0].preference  # computed by the first layer to compress
    # layer 0's indicator is about the same for tokens 0-7 before pooling; the zero padding of the
    # 5-wide pooling lowers the 2 tokens at each end, so tokens 1-6 are kept (0 and 7 have 3 of 5 taps)
    assert layers[0].positions.tolist() == [[[1, 2, 3, 4, 5, 6, 8, 9]]]
    assert layers[1].positions.tolist() == [[[8, 9]]]
    assert [layer.capacity for layer in layers] == [8, 2]  # what each holds from now on
    # decoding: a new token (key 0) per layer; layer 1 keeps its last 2, layer 0 drops one of the 7
    # tokens before its window: the ends of the pooled range (tokens 1 and 8) have 3 taps, and token
    # 1's own attention is the lower
    step(layers, [torch.zeros(1, 1, 1, 2)] * 2, "decode")
    assert layers[1].positions.tolist() == [[[9, 10]]]
    assert layers[0].positions.tolist() == [[[2, 3, 4, 5, 6, 8, 9, 10]]]


def test_a_capacity_the_window_fills_keeps_the_last_tokens():
    method = build_method("cake", {}, Compression(budget=20))  # window 32
    layer = method.make_layer(0)
    step([layer], [torch.randn(1, 1, 50, 2)], "prefill")
    assert layer.positions.tolist() == [[list(range(30, 50))]]


def test_tau_must_be_positive():
    with pytest.raises(ConfigError, match="cake.tau1=0.0"):
        build_method("cake", {"tau1": 0.0}, Compression(ratio=2))


def test_layers_of_a_model_hold_the_total_in_different_shares(tiny_llama):
    method = build_method("cake", {}, Compression(ratio=4))
    method.setup(tiny_llama)
    cache = KVCache(method, layer_windows(tiny_llama.config))
    gen = generate(tiny_llama, cache, random_prompt(400, batch=2), None, 4, eos_ids=set())
    per_layer = gen.after_prefill["tokens_per_layer"]
    assert sum(per_layer) == 2 * 100 and per_layer[0] != per_layer[1]
    assert gen.at_end["tokens_per_layer"] == per_layer  # decoding holds every layer at its budget
    assert gen.after_prefill["ratio"] == pytest.approx(4.0)
