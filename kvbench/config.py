"""The structured config schema Hydra validates at start-up (types of the top-level keys and of the
model entry). Method and task parameters are validated by their classes (``parse_params``), which
name unknown keys and list the valid ones."""

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from kvbench.models import ModelConfig


@dataclass
class KVBenchConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="???", source="???", path="???"))
    method: Any = None
    task: Any = None
    #: uncompressed KV bytes / KV bytes held, >= 1 (exclusive with budget)
    ratio: Optional[float] = None
    #: tokens kept per layer and KV head: the predefined-capacity mode (exclusive with ratio)
    budget: Optional[int] = None
    seed: int = 0
    results_dir: str = "results"
    #: run only the first N samples of each task (smoke tests)
    limit: Optional[int] = None
    #: print the summary table when the run or sweep ends
    summary: bool = True


def register_schema() -> None:
    ConfigStore.instance().store(name="kvbench_schema", node=KVBenchConfig)
