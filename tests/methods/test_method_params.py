"""Declared method parameters: every value is checked against its field's type and bounds in one
place, with one message format (method, parameter, value, what is allowed); the Hydra configs
``method/<name>`` are generated from the same declarations; ``setup`` rejects what the model makes
impossible before the first sample."""

import dataclasses

import pytest
from hydra.core.config_store import ConfigStore

from kvbench.errors import ConfigError
from kvbench.methods import Compression, build_method, registered, store_configs


@pytest.mark.parametrize("name,params,message", [
    ("snapkv", {"window": 0}, "snapkv.window=0: expected an integer >= 1"),
    ("snapkv", {"kernel": 4}, "snapkv.kernel=4: expected an odd integer >= 1"),
    ("snapkv", {"window": 4.5}, "snapkv.window=4.5: expected an integer >= 1"),
    ("snapkv", {"window": "abc"}, "snapkv.window='abc': expected an integer >= 1"),
    ("snapkv", {"window": True}, "snapkv.window=True: expected an integer >= 1"),
    ("snapkv", {"window": None}, "snapkv.window=None: expected an integer >= 1"),
    ("h2o", {"recent_fraction": 1.5}, r"h2o.recent_fraction=1.5: expected a number in \[0, 1\]"),
    ("h2o", {"recent_fraction": "half"}, r"h2o.recent_fraction='half': expected a number in \[0, 1\]"),
    ("gkv", {"similarity_threshold": -2}, r"gkv.similarity_threshold=-2: expected a number in \[-1, 1\]"),
    ("mikv", {"balancer": "maybe"}, "mikv.balancer='maybe': expected true or false"),
    ("mikv", {"balancer": 1}, "mikv.balancer=1: expected true or false"),
    ("mikv", {"ratio_mode": "bits"}, "mikv.ratio_mode='bits': expected one of 'tokens', 'memory'"),
    ("mikv", {"low_bits": 8}, "mikv.low_bits=8: expected one of 2, 3, 4"),
    ("mikv", {"group_size": 0}, "mikv.group_size=0: expected an integer >= 1, or null"),
    ("quant", {"bits": 3}, "quant.bits=3: expected one of 2, 4, 8, or null"),
    ("lagkv", {"score_v_ratio": -1.0}, "lagkv.score_v_ratio=-1.0: expected a number >= 0"),
    ("streaming", {"sink_tokens": -1}, "streaming.sink_tokens=-1: expected an integer >= 0"),
])
def test_a_bad_value_names_the_method_parameter_value_and_what_is_allowed(name, params, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        build_method(name, params, Compression(ratio=2))


def test_accepted_values_keep_their_type():
    # an int is a valid float; nulls where the type is optional; every declared choice
    assert build_method("h2o", {"recent_fraction": 1}, Compression(ratio=2)).params.recent_fraction == 1
    assert build_method("mikv", {"group_size": None, "balancer": False}, Compression(ratio=2)).params.balancer is False
    for bits, ratio in ((2, 8), (4, 4), (8, 2)):
        assert build_method("quant", {"bits": bits}, Compression(ratio=ratio)).bits == bits


def test_unknown_parameters_and_cross_parameter_checks():
    with pytest.raises(ConfigError, match=r"unknown streaming parameter 'sinks' \(did you mean 'sink_tokens'\?\); valid: sink_tokens$"):
        build_method("streaming", {"sinks": 2}, Compression(ratio=2))
    with pytest.raises(ConfigError, match=r"unknown knorm parameter 'window'; valid: none$"):
        build_method("knorm", {"window": 2}, Compression(ratio=2))
    with pytest.raises(ConfigError, match=r"mikv.low_bits \(4\) must be below high_bits \(4\)"):
        build_method("mikv", {"high_bits": 4, "low_bits": 4}, Compression(ratio=2))


def test_hydra_method_configs_are_the_declared_defaults():
    store = ConfigStore.instance()
    store_configs(store)  # what the app does at start-up (storing again replaces, it does not add)
    stored = store.repo["method"]
    assert sorted(stored) == sorted(f"{name}.yaml" for name in registered())
    for name, cls in registered().items():
        node = dict(stored[f"{name}.yaml"].node)
        assert node.pop("name") == name and node == dataclasses.asdict(cls.Params())
    assert dict(stored["snapkv.yaml"].node) == {"name": "snapkv", "window": 32, "kernel": 5}


def test_describe_holds_what_determines_results():
    method = build_method("snapkv", {"window": 16}, Compression(ratio=4))
    assert method.describe() == {"name": "snapkv", "params": {"window": 16, "kernel": 5}, "phases": ["prefill"]}


@pytest.mark.parametrize("name,params,message", [
    ("quant", {"group_size": 5}, "quant: head_dim 16 must be a multiple of group_size 5"),
    ("mikv", {"group_size": 3}, "mikv: group_size 3 must divide head_dim 16"),
    # head_dim 16, g = 8: fp16 / int2 reaches 1 to 16 / 6 = 2.67x; 2.9x passes the build-time bound (< 8)
    ("mikv", {"ratio_mode": "memory"}, r"achievable ratios are 1 .* to 2.667"),
])
def test_setup_rejects_what_the_model_makes_impossible(tiny_llama, name, params, message):
    method = build_method(name, params, Compression(ratio=2.9 if "ratio_mode" in params else 4))
    with pytest.raises(ConfigError, match=message):
        method.setup(tiny_llama)


def test_setup_records_the_compressed_layers(tiny_gemma, tiny_llama):
    method = build_method("pyramidkv", {}, Compression(ratio=4))
    method.setup(tiny_gemma)
    assert method.compressed_layers == [1]  # layer 0 is a sliding-window layer
    method.setup(tiny_llama)
    assert method.compressed_layers == [0, 1]
