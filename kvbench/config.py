"""The structured config schema (types of the top-level keys and of the model entry, bounds declared
with ``kvbench.params.param``), its checks, and the configs generated from classes
(``method/<name>``, ``task=longbench/<task>``, ...). Method and task parameters are validated by
their classes (``parse_params``), which name unknown keys and list the valid ones.

:func:`check_overrides` checks the command line's top-level and ``model.`` values before Hydra
composes the config, and :func:`check_config` the composed config before anything is loaded, with
the message format of method and task parameters (``ratio=0.5: expected a number >= 1, or null``).
Names that become folders of ``results_dir`` are checked by :func:`check_folder_name`."""

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from kvbench.decoding import Decoding
from kvbench.errors import ConfigError
from kvbench.models import ModelConfig
from kvbench.params import allowed, check_value, field_kinds, param
from kvbench.registry import unknown_name


@dataclass
class KVBenchConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="???", source="???", path="???"))
    #: a ``method/`` config: ``name`` and the method's parameters (checked by its class)
    method: Any = None
    #: a ``task/`` config: ``name`` (results directory), ``kind`` and the task's parameters
    task: Any = None
    #: uncompressed KV bytes / KV bytes held, >= 1 (exclusive with budget); `full` takes neither
    #: (a ratio given to it is ignored and recorded as 1)
    ratio: Optional[float] = param(None, ge=1)
    #: tokens kept per layer and KV head: the predefined-capacity mode (exclusive with ratio)
    budget: Optional[int] = param(None, ge=1)
    #: with a budget: methods that compress only their prompt re-score and evict every k decoding
    #: steps, holding at most budget + k - 1 tokens (1: a hard capacity after every step)
    evict_every: int = param(1, ge=1)
    #: feed the prompt N tokens per prefill step, each compressed by the method, so no step holds the
    #: whole prompt (peak KV about the capacity + N); null = the whole prompt in one step
    prefill_chunk: Optional[int] = param(None, ge=1)
    #: in the run identity; a seed other than this default is also in the setting name (``_seed-N``)
    seed: int = 0
    #: how tokens are chosen: greedy (temperature 0, the default) or sampled, n samples per prompt
    #: (``kvbench.decoding.Decoding``); part of the run identity
    decoding: Decoding = field(default_factory=Decoding)
    #: decoding steps between two points of each record's held-cache curve (``kv.curve``)
    cache_curve_every: int = param(16, ge=1)
    #: record each sample's fidelity to the full cache over the gold answer and over the full cache's
    #: greedy output (``kvbench.fidelity``): the full cache's greedy decoding, then teacher-forced
    #: forwards of both caches over each (docs/statistics.md counts them). Adds fields, changes no
    #: prediction: not in the run identity
    fidelity: bool = True
    #: where results directories, the leaderboards and Hydra's job folders go: scratch, git-ignored
    #: (the published board, leaderboard/, is written only by ``kvbench.report results --out leaderboard``)
    results_dir: str = "results"
    #: run only the first N samples of each task (smoke tests); the results directory still expects
    #: every sample of the task, so the run is partial until a run without limit completes it
    limit: Optional[int] = param(None, ge=1)
    #: "i/n": run only the i-th of n disjoint slices of the samples, into the configuration's one
    #: results directory (sweep shard=0/4,1/4,2/4,3/4 to split a configuration over jobs); null = all
    shard: Optional[str] = None
    #: GiB of uncompressed prefill states kept so the next ratio of a sweep reuses them (methods whose
    #: prefill does not depend on the ratio); 0 = prefill in every run
    prefill_reuse_gb: float = param(2.0, ge=0)
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
        kind = _schema_field(str(err.full_key))
        if isinstance(err, ValidationError) and kind is not None:
            raise ConfigError(f"{err.full_key}={err.value!r}: expected {allowed(*kind)}") from None
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


#: the schema's fields checked here; ``method`` and ``task`` are checked by their classes, ``model`` by
#: ``ModelConfig.validate``, ``decoding`` by ``Decoding.validate``
_CHECKED = {name: kind for name, kind in field_kinds(KVBenchConfig).items()
            if name not in ("model", "method", "task", "decoding")}


def _schema_field(key: str) -> tuple | None:
    """(type, optional, metadata) of a top-level key or of ``model.<key>``; None for others (and for
    mappings such as ``model.chat_template_kwargs``, whose type Hydra's schema checks)."""
    if key.startswith("model."):
        kind = field_kinds(ModelConfig).get(key[len("model."):])
        return None if kind is None or typing.get_origin(kind[0]) is dict else kind
    return _CHECKED.get(key)


def check_folder_name(key: str, name: Any, nested: bool = False) -> str:
    """``name`` if it can name a folder inside ``results_dir`` (with ``nested``, folders separated by
    '/', as in ``ruler/vt``); otherwise a ConfigError. Nothing a run writes may land outside
    ``results_dir``, so empty names, '.', '..', absolute paths and '\\' are refused."""
    parts = name.split("/") if nested and isinstance(name, str) else [name]
    if not all(isinstance(p, str) and p not in ("", ".", "..") and p.isprintable() and not set(p) & {"/", "\\"}
               for p in parts):
        what = ("folder names separated by '/' inside results_dir, each" if nested
                else "a folder name inside results_dir:")
        refused = "'\\'" if nested else "'/', '\\'"
        raise ConfigError(f"{key}={name!r}: expected {what} not empty, not '.' or '..', "
                          f"with no {refused} or control characters")
    return name


def check_results_dir(path: str) -> None:
    """A ConfigError if ``path`` (or a folder above it) is something other than a folder."""
    for at in (Path(path), *Path(path).parents):
        if at.exists() and not at.is_dir():
            raise ConfigError(f"results_dir={path!r}: {at} is a file, not a folder")
        if at.exists():
            return


def check_config(cfg: KVBenchConfig) -> None:
    """The top-level values against their declared types and bounds, ``results_dir``, and the model
    and task names that become folders (method names are registry names; the setting is checked by
    the runner)."""
    for name, kind in _CHECKED.items():
        check_value(name, getattr(cfg, name), *kind)
    cfg.decoding.validate()
    check_results_dir(cfg.results_dir)
    check_folder_name("model.name", cfg.model.name)
    if isinstance(cfg.task, Mapping):
        check_folder_name("task.name", cfg.task.get("name"), nested=True)


def check_overrides(overrides: list[str]) -> None:
    """The command line's values of top-level keys and of ``model.<key>`` (every value of a sweep)
    checked against the schema before Hydra composes the config, so a wrong type gets the same
    message as a method parameter, and ``results_dir`` and ``model.name`` are checked before Hydra
    creates its job folder. What cannot be parsed or enumerated is left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from kvbench.methods import method_class

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra reports its own syntax errors
        return
    given_results_dir = False
    for override in parsed:
        key = override.key_or_group
        if override.is_delete() or override.is_add() or override.package is not None or key.startswith("hydra"):
            continue
        if override.is_sweep_override():
            try:
                values = list(override.sweep_iterator())
            except Exception:  # interval sweeps (optimisers) have no values to enumerate
                continue
        else:
            values = [override.value()]
        if key == "method":  # a config group option: the registered methods, or a packaged variant of one
            for value in values:
                if not (Path(__file__).parent / "conf" / "method" / f"{value}.yaml").is_file():
                    method_class(value)
            continue
        kind = _schema_field(key)
        if kind is None:
            _check_key(key)
            continue
        for value in values:
            converted = _converted(key, value, kind)
            if converted is _INTERPOLATED:
                continue
            if key == "results_dir":
                given_results_dir = True
                check_results_dir(converted)
            if key == "model.name":
                check_folder_name(key, converted)
    if not given_results_dir:
        check_results_dir(KVBenchConfig.results_dir)


def _check_key(key: str) -> None:
    """An unknown top-level or ``model.`` key gets the valid ones (and the closest); other keys
    (``method.<param>``, ``task.<param>``, config group options) are left to Hydra and the classes."""
    head, _, rest = key.partition(".")
    fields = field_kinds(KVBenchConfig)
    if head not in fields:
        raise unknown_name("config key", head, fields)
    if head == "model" and rest and "." not in rest:
        raise unknown_name("model key", rest, field_kinds(ModelConfig))


_INTERPOLATED, _INVALID = object(), object()


def _converted(key: str, value: Any, kind: tuple) -> Any:
    """``value`` as the schema stores it (OmegaConf's conversions: ``8`` for a str field is "8"); a
    ConfigError in the parameters' format where it does not fit the field's type (or, for top-level
    keys, its bounds)."""
    node = OmegaConf.structured(KVBenchConfig)
    try:
        OmegaConf.update(node, key, value, merge=True)
        converted = OmegaConf.select(node, key, throw_on_missing=False)
    except ValidationError:
        converted = _INVALID
    except OmegaConfBaseException:  # an interpolation: resolved (and checked) in the job
        return _INTERPOLATED
    if kind[0] is bool and not isinstance(value, bool) and value is not None:
        converted = _INVALID  # OmegaConf reads -1 or "yes" as a bool; parameters take true or false only
    try:
        return check_value(key, converted, *kind) if key in _CHECKED or converted is _INVALID else converted
    except ConfigError:
        raise ConfigError(f"{key}={value!r}: expected {allowed(*kind)}") from None
