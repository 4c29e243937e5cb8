"""One prefill for many ratios: for every method that declares ``shares_prefill``, compressing a
stored prefill state gives exactly what a separate prefill gives, at every ratio; the runner's store
of those states."""

from dataclasses import asdict

import pytest
import torch

from conftest import EMBEDDED, random_prompt
from kvbench.cache import KVCache, layer_windows
from kvbench.config import load_config
from kvbench.generation import Prefilled, generate
from kvbench.methods import Compression, build_method, registered
from kvbench.methods.base import LayerState
from kvbench.runner import PrefillStore, RunSpec
from kvbench.tasks import build_task

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
        method = build_method(name, {}, Compression(ratio=ratio), seed=3)
        method.setup(model)
        return KVCache(method, windows)

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


def spec(method="streaming", gb=1.0):
    return RunSpec.from_config(load_config({"model": asdict(EMBEDDED), "method": {"name": method}, "ratio": 2,
                                            "task": {"name": "passkey", "kind": "passkey"},
                                            "prefill_reuse_gb": gb}))


def state(mib):
    layer = LayerState(stores={}, fields={"keys": torch.zeros(mib * 2**18)})
    return Prefilled(layers=[layer], logits=torch.zeros(1), in_step=0, prefill_s=0.0)


def test_the_store_serves_any_sweep_order_within_its_memory():
    task = build_task({"name": "passkey", "kind": "passkey"})
    store = PrefillStore()
    a, b = state(300), state(300)
    # ratio outermost: streaming and snapkv alternate, each still finds its own states
    store.put(spec("streaming"), task, "s1", a)
    store.put(spec("snapkv"), task, "s1", b)
    assert store.get(spec("streaming"), task, "s1") is a and store.get(spec("snapkv"), task, "s1") is b
    assert store.get(spec("streaming"), task, "s2") is None
    store.put(spec("streaming"), task, "s2", state(500))  # 1100 MiB > 1 GiB: the oldest goes
    assert store.get(spec("streaming"), task, "s1") is None and store.get(spec("snapkv"), task, "s1") is b
    store.put(spec("streaming"), task, "s3", state(2000))  # larger than the whole budget: not held
    assert store.get(spec("streaming"), task, "s3") is None and len(store.states) == 2
