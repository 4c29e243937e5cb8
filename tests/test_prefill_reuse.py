"""One prefill for many ratios: for every method that declares ``shares_prefill``, compressing a
stored prefill state gives exactly what a separate prefill gives, at every ratio."""

import pytest

from conftest import random_prompt
from kvbench.cache import KVCache, layer_windows
from kvbench.generation import generate
from kvbench.methods import Compression, build_method, registered

SHARING = [name for name, cls in registered().items() if cls.shares_prefill]


def test_some_methods_share_their_prefill():
    assert "streaming" in SHARING


@pytest.mark.parametrize("name", SHARING)
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_reused_prefill_equals_separate_prefill(name, fixture, request):
    model = request.getfixturevalue(fixture)
    prompt = random_prompt(96, batch=2, seed=1)
    windows = layer_windows(model.config)

    def cache(ratio):
        return KVCache(build_method(name, {}, Compression(ratio=ratio), seed=3), windows)

    first = generate(model, cache(2), prompt, None, 6, set(), keep_prefill=True)
    assert first.prefilled is not None
    for ratio in (2, 4, 8):
        separate_cache, reused_cache = cache(ratio), cache(ratio)
        separate = generate(model, separate_cache, prompt, None, 6, set())
        reused = generate(model, reused_cache, prompt, None, 6, set(), prefilled=first.prefilled)
        assert reused.tokens == separate.tokens
        assert reused.after_prefill == separate.after_prefill
        for a, b in zip(separate_cache.layers, reused_cache.layers):
            assert a.positions.equal(b.positions)
