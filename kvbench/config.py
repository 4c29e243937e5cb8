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
    #: "i/n": run only the i-th of n disjoint slices of the samples, into the configuration's one
    #: results directory (sweep shard=0/4,1/4,2/4,3/4 to split a configuration over jobs); null = all
    shard: Optional[str] = None
    #: GiB of uncompressed prefill states kept so the next ratio of a sweep reuses them (methods whose
    #: prefill does not depend on the ratio); 0 = prefill in every run
    prefill_reuse_gb: float = 2.0
    #: local folder of benchmark data files for tasks that read a dataset (LongBench: the unzipped
    #: data.zip); a task's own `task.data_dir` takes precedence; null = download from the hub
    data_dir: Optional[str] = None
    #: print the summary table when the run or sweep ends
    summary: bool = True
    #: regenerate <results_dir>/LEADERBOARD.md and leaderboards/ when the run or sweep ends
    report: bool = True


def register_schema() -> None:
    ConfigStore.instance().store(name="kvbench_schema", node=KVBenchConfig)
    # task=longbench/<task>: generated from task_data/longbench/tasks.yaml instead of 34 yaml files
    from kvbench.tasks.longbench import store_configs

    store_configs(ConfigStore.instance())
    # task=ruler and task=ruler/<name>: generated from task_data/ruler/tasks.yaml
    from kvbench.tasks import ruler

    ruler.store_configs(ConfigStore.instance())
    # task=math500, task=aime25, task=gsm8k
    from kvbench.tasks import math as math_tasks

    math_tasks.store_configs(ConfigStore.instance())
