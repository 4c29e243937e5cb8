"""The structured config schema Hydra validates at start-up (types of the top-level keys and of the
model entry), and the configs generated from classes (``method/<name>``, ``task=longbench/<task>``, ...).
Method and task parameters are validated by their classes (``parse_params``), which name unknown
keys and list the valid ones."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kvbench.errors import ConfigError
from kvbench.models import ModelConfig


@dataclass
class KVBenchConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="???", source="???", path="???"))
    #: a ``method/`` config: ``name`` and the method's parameters (checked by its class)
    method: Any = None
    #: a ``task/`` config: ``name`` (results directory), ``kind`` and the task's parameters
    task: Any = None
    #: uncompressed KV bytes / KV bytes held, >= 1 (exclusive with budget); `full` takes neither
    #: (a ratio given to it is ignored and recorded as 1)
    ratio: Optional[float] = None
    #: tokens kept per layer and KV head: the predefined-capacity mode (exclusive with ratio)
    budget: Optional[int] = None
    #: in the run identity; a seed other than this default is also in the setting name (``_seed-N``)
    seed: int = 0
    #: where results directories, the leaderboards and Hydra's job folders go: scratch, git-ignored
    #: (the published board, leaderboard/, is written only by ``kvbench.report results --out leaderboard``)
    results_dir: str = "results"
    #: run only the first N samples of each task (smoke tests); the results directory still expects
    #: every sample of the task, so the run is partial until a run without limit completes it
    limit: Optional[int] = None
    #: "i/n": run only the i-th of n disjoint slices of the samples, into the configuration's one
    #: results directory (sweep shard=0/4,1/4,2/4,3/4 to split a configuration over jobs); null = all
    shard: Optional[str] = None
    #: GiB of uncompressed prefill states kept so the next ratio of a sweep reuses them (methods whose
    #: prefill does not depend on the ratio); 0 = prefill in every run
    prefill_reuse_gb: float = 2.0
    #: local folder of data files for the tasks that read a dataset (their configs take it as
    #: `task.data_dir`, which may also be set on its own); null = download from the hub
    data_dir: Optional[str] = None
    #: print the summary table when the run or sweep ends
    summary: bool = True
    #: regenerate <results_dir>/LEADERBOARD.md and leaderboards/ when the run or sweep ends
    report: bool = True


def register_schema() -> None:
    """The schema and the configs task kinds generate (``Task.store_configs``)."""
    from kvbench.methods import store_configs as store_method_configs
    from kvbench.tasks import registered

    store = ConfigStore.instance()
    store.store(name="kvbench_schema", node=KVBenchConfig)
    store_method_configs(store)  # method=<name>: generated from the method classes' parameter defaults
    for task_cls in registered().values():
        task_cls.store_configs(store)


def load_config(values: Mapping[str, Any]) -> KVBenchConfig:
    """A run's config from a plain mapping (a Python caller's, or run.json's ``config``), checked
    against the schema and completed with its defaults, as Hydra does for the command line."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(KVBenchConfig), dict(values)))
    except OmegaConfBaseException as err:  # a key the schema does not have, a value of the wrong type
        problem = str(err.msg).splitlines()[0]  # OmegaConf's further lines repeat the key and the types
        raise ConfigError(f"config does not fit the schema at '{err.full_key}': {problem}") from None


def compose_config(overrides: list[str]) -> dict:
    """The config ``python -m kvbench <overrides>`` runs with: the same files, schema and checks."""
    register_schema()
    try:
        with initialize_config_module(config_module="kvbench.conf", version_base="1.3"):
            return OmegaConf.to_container(compose(config_name="config", overrides=overrides), resolve=True)
    except ConfigCompositionException as e:
        raise ConfigError(f"{' '.join(overrides)}: {e}") from e
