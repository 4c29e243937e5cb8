import pytest

from kvbench.errors import ConfigError
from kvbench.methods import build_method, method_class
from kvbench.registry import Registry, unknown_name
from kvbench.tasks import build_task


def test_unknown_name_suggests_the_closest_choices():
    err = unknown_name("method", "snapvk", ["snapkv", "streaming", "full"])
    assert str(err) == "unknown method 'snapvk' (did you mean 'snapkv'?); valid: full, snapkv, streaming"


def test_unknown_name_without_a_close_choice_lists_them_only():
    assert str(unknown_name("method", "zzz", ["b", "a"])) == "unknown method 'zzz'; valid: a, b"


def test_method_and_task_registries_suggest():
    with pytest.raises(ConfigError, match=r"unknown method 'lagvk' \(did you mean 'lagkv'"):
        method_class("lagvk")
    with pytest.raises(ConfigError, match=r"unknown task kind 'paskey' \(did you mean 'passkey'\?\)"):
        build_task({"name": "x", "kind": "paskey"})
    with pytest.raises(ConfigError, match=r"unknown method None"):
        build_method(None, {}, None)


def test_registering_a_second_class_under_one_name_fails():
    reg = Registry("thing", "kvbench.methods", lambda cls: cls.key)
    a, b = type("A", (), {"key": "x"}), type("B", (), {"key": "x"})
    reg.register(a)
    assert reg.register(a) is a
    with pytest.raises(ValueError, match="registered twice"):
        reg.register(b)
