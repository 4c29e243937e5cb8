"""ChunkKV: whole chunks chosen by their mean score over any score-based base method."""

import pytest
import torch

from conftest import random_prompt
from kvbench.cache import KVCache, layer_windows
from kvbench.errors import ConfigError
from kvbench.generation import generate
from kvbench.methods import Compression, build_method
from kvbench.methods.chunkkv import chunk_choice
from test_baselines import step


def test_chunk_choice_by_hand():
    # chunks of 3: (1, 5, 2) mean 2.67, (0, 9, 9) mean 6, (0) mean 0. Four places: the best chunk
    # whole, then the best token of the next chunk (token 1: 5), not the token-level top 4 (4, 5, 1, 2)
    scores = torch.tensor([[1.0, 5.0, 2.0, 0.0, 9.0, 9.0, 0.0]])
    assert chunk_choice(scores, 3, 4).tolist() == [[4, 5, 3, 1]]
    assert chunk_choice(scores, 3, 6).sort().values.tolist() == [[0, 1, 2, 3, 4, 5]]
    # a short last chunk competes on its mean: (8) beats (1, 5, 2)
    scores[0, 6] = 8.0
    assert chunk_choice(scores, 3, 4).sort().values.tolist() == [[3, 4, 5, 6]]


def layer(params, **comp):
    method = build_method("chunkkv", params, Compression(**comp))
    return method.make_layer(0)


def test_chunkkv_over_knorm_sums_heads_and_keeps_the_same_chunks_in_every_head():
    # key norms per head; KNorm keeps low norms, so ChunkKV ranks by minus the norms summed over heads:
    # per token -2, -4, -10, -10, -3, -4; chunks of 2: -3, -10, -3.5. Three places: chunk 0 whole, then
    # token 4 of chunk 2. Head 0 alone would keep tokens 0, 1 and 4 or 5; head 1 alone 0, 4 and 5.
    norms = torch.tensor([[1.0, 1.0, 5.0, 5.0, 2.0, 2.0], [1.0, 3.0, 5.0, 5.0, 1.0, 2.0]])
    keys = torch.stack([norms, torch.zeros_like(norms)], dim=-1)[None]
    chunked = layer({"base": "knorm", "chunk_length": 2}, budget=3)
    step(chunked, keys)
    assert chunked.positions.tolist() == [[[0, 1, 4], [0, 1, 4]]]


def test_chunkkv_over_snapkv_keeps_the_observation_window(tiny_llama):
    # SnapKV scores only the tokens before its window; ChunkKV scores the window at SnapKV's best
    # score (as kvpress's SnapKVPress pads it), so a chunk inside the window is the best chunk
    method = build_method("chunkkv", {"base": "snapkv"}, Compression(ratio=3))
    method.setup(tiny_llama)
    cache = KVCache(method, layer_windows(tiny_llama.config))
    generate(tiny_llama, cache, random_prompt(300, batch=2), None, 2, eos_ids=set())
    for kv in cache.layers:
        held = kv.positions
        assert held.shape[-1] == 101  # 100 after the prompt, one decoded token added (ratio mode)
        assert (held == held[:, :1]).all()  # every head keeps the same tokens
        assert set(range(280, 301)) <= set(held[0, 0].tolist())  # chunk 280-299 and the new token


def test_chunkkv_over_cake_keeps_cakes_layer_budgets(tiny_llama):
    def per_layer(name, params):
        method = build_method(name, params, Compression(ratio=4))
        method.setup(tiny_llama)
        cache = KVCache(method, layer_windows(tiny_llama.config))
        generate(tiny_llama, cache, random_prompt(400), None, 1, eos_ids=set())
        return [kv.positions[0, 0].tolist() for kv in cache.layers]

    cake, chunked = per_layer("cake", {}), per_layer("chunkkv", {"base": "cake"})
    assert [len(p) for p in chunked] == [len(p) for p in cake] and sum(map(len, cake)) == 2 * 100
    for kept in chunked:  # whole chunks of 20, but for one that fills the last places
        counts = torch.bincount(torch.tensor(kept) // 20, minlength=20)
        assert ((counts > 0) & (counts < 20)).sum() <= 1
    assert chunked != cake


def test_chunkkv_base_must_be_a_registered_scorer():
    with pytest.raises(ConfigError, match=r"did you mean 'snapkv'\?.*valid: .*knorm"):
        build_method("chunkkv", {"base": "snapk"}, Compression(ratio=2))
    with pytest.raises(ConfigError, match=r"'h2o'; valid: .*snapkv"):  # accumulates attention: no score()
        build_method("chunkkv", {"base": "h2o"}, Compression(ratio=2))
    with pytest.raises(ConfigError, match="'chunkkv'"):
        build_method("chunkkv", {"base": "chunkkv"}, Compression(ratio=2))
