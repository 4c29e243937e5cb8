"""ThinK on small hand-made tensors: the channel scores, which channels are pruned, what is stored
(and counted) afterwards, composition with a token-eviction base, and its configuration errors."""

import pytest
import torch
from conftest import random_prompt

from kvbench.cache import KVCache, layer_attention, layer_windows
from kvbench.errors import ConfigError
from kvbench.generation import generate
from kvbench.methods import Compression, build_method
from kvbench.methods.think import channel_scores


def think_layer(params, **comp):
    method = build_method("think", params, Compression(**comp))
    return method.make_layer(0)


def prefill(layer, keys, values, query):
    k, v = layer.update(keys, values)
    layer_attention(layer, query, k, v, 1.0)
    layer.end_step("prefill")


def test_channel_scores_are_query_energy_times_key_energy():
    # 2 query heads sharing 1 KV head, window of 2 queries, 3 keys, d = 2
    query = torch.tensor([[[1., 0.], [3., 2.]], [[1., 2.], [1., 0.]]])[None]  # (1, 2, 2, 2)
    keys = torch.tensor([[[1., 1.], [2., 0.], [0., 1.]]])[None]  # (1, 1, 3, 2)
    # query energy per head: head 0 (1+9)/2 = 5, (0+4)/2 = 2; head 1 (1+1)/2 = 1, (4+0)/2 = 2 ->
    # group mean 3, 2; key energy (1+4+0)/3 = 5/3, (1+0+1)/3 = 2/3
    expected = torch.tensor([[[3 * 5 / 3, 2 * 2 / 3]]])
    torch.testing.assert_close(channel_scores(query, keys), expected)


def test_prunes_the_lowest_channels_of_all_but_the_recent_keys():
    # no base: 5 tokens, d = 4, recent 2, half the channels pruned (2 of 4)
    layer = think_layer({"base": None, "recent": 2, "key_channel_compression_ratio": 0.5, "window": 1}, ratio=1)
    keys = torch.arange(1., 21.).view(1, 1, 5, 4)
    values = -keys
    # query energy per channel 1, 4, 0.01, 9 times key energies that grow with the channel index:
    # scores rank channel 2 lowest, then channel 0 -> channels 1 and 3 are kept
    query = torch.tensor([1., 2., 0.1, 3.]).view(1, 1, 1, 4)
    prefill(layer, keys, values, query)
    pruned = layer.stores["pruned_keys"]
    assert pruned.tokens == 3 and layer.stores["keys"].tokens == 2 and layer.stores["values"].tokens == 5
    assert torch.equal(pruned.kept, torch.tensor([[[1, 3]]]))
    k, v = layer.update(torch.full((1, 1, 1, 4), 7.), torch.zeros(1, 1, 1, 4))
    expected = keys.clone()
    expected[:, :, :3, [0, 2]] = 0  # the older keys lose channels 0 and 2
    assert torch.equal(k, torch.cat([expected, torch.full((1, 1, 1, 4), 7.)], dim=2))
    assert torch.equal(v[:, :, :5], values)
    # held: 3 keys x 2 channels + 3 full keys (2 recent, 1 new) x 4 + 6 values x 4, float32, + 2 int64 indices
    assert layer.bytes_held() == (3 * 2 + 3 * 4 + 6 * 4) * 4 + 2 * 8
    assert layer.get_seq_length() == 6


def test_short_prompts_and_zero_ratio_prune_nothing():
    keys = torch.randn(1, 1, 3, 4)
    for params in ({"recent": 3}, {"key_channel_compression_ratio": 0.0}):
        layer = think_layer({"base": None, **params}, ratio=1)
        prefill(layer, keys, keys, torch.randn(1, 1, 3, 4))
        assert "pruned_keys" not in layer.stores


def test_the_base_evicts_first_and_think_prunes_what_it_kept(tiny_llama):
    prompt = random_prompt(400)  # ratio 4: 100 tokens kept, 68 of them older than the recent 32
    snap_cache, think_cache = (KVCache(method, layer_windows(tiny_llama.config)) for method in (
        build_method("snapkv", {}, Compression(ratio=4)),
        build_method("think", {"base": "snapkv"}, Compression(ratio=4))))
    for cache in (snap_cache, think_cache):
        generate(tiny_llama, cache, prompt, None, 3, set())
    for snap, think in zip(snap_cache.layers, think_cache.layers):
        assert torch.equal(snap.positions, think.positions)  # the same tokens: SnapKV's
        # head_dim 16, lambda 0.4: int(6.4) = 6 channels pruned of every key but the 32 most recent held
        older = snap.get_seq_length() - 2 - 32  # 2 decoded tokens were added after the prefill
        assert think.stores["pruned_keys"].part.tensor.shape[-2:] == (older, 10)
        assert think.bytes_held() < snap.bytes_held()


@pytest.mark.parametrize("params, comp, message", [
    ({"base": None}, {"ratio": 4}, "think without a base evicts no tokens"),
    ({"base": None}, {"budget": 64}, "think takes no budget"),
    ({"base": "h2o"}, {"ratio": 4}, "think.base=h2o: ThinK prunes the keys that a prompt-only eviction keeps"),
    ({"base": "quant"}, {"ratio": 4}, "think.base=quant"),
    ({"base": "snapvk"}, {"ratio": 4}, "snapkv"),
])
def test_bases_and_settings_it_cannot_combine_are_refused(params, comp, message):
    with pytest.raises(ConfigError, match=message):
        build_method("think", params, Compression(**comp))


def test_phases_follow_the_base():
    assert build_method("think", {"base": "snapkv"}, Compression(ratio=2)).phases == ("prefill",)
    assert build_method("think", {"base": None}, Compression(ratio=1)).phases == ("prefill",)


@pytest.mark.parametrize("base", ["snapkv", "pyramidkv"])
def test_without_pruning_it_is_its_base(base, tiny_llama):
    prompt = random_prompt(300, batch=2)
    windows = layer_windows(tiny_llama.config)
    methods = (build_method(base, {}, Compression(ratio=4)),
               build_method("think", {"base": base, "key_channel_compression_ratio": 0.0}, Compression(ratio=4)))
    runs = []
    for method in methods:
        method.setup(tiny_llama)
        cache = KVCache(method, windows)
        runs.append((generate(tiny_llama, cache, prompt, None, 5, set()), cache))
    (base_gen, base_cache), (think_gen, think_cache) = runs
    assert think_gen.tokens == base_gen.tokens and think_gen.at_end == base_gen.at_end
    for a, b in zip(base_cache.layers, think_cache.layers):
        assert torch.equal(a.positions, b.positions)
