"""Fuzzing the command line: 200 seeded random overrides of the config schema's keys (the top-level
keys, ``model.<key>``, every method's and some tasks' parameters) with values of wrong types and
out-of-range numbers. None may end in a traceback (an exception other than ConfigError) or write a
file; the model never loads (a valid config reaches ``load_model``, which stops the run).

The overrides go through what ``python -m kvbench`` runs, in-process: ``check_overrides`` (before
Hydra), Hydra's composition of the config groups and its override of the value (``OmegaConf.update``
on the composed config, as Hydra applies overrides), then the job (``run`` on the typed config)."""

import copy
import dataclasses
import random

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kvbench import runner
from kvbench.config import KVBenchConfig, check_overrides, register_schema
from kvbench.errors import ConfigError
from kvbench.methods import registered as methods
from kvbench.models import ModelConfig
from kvbench.tasks import registered as task_kinds

CASES = 200
BAD_VALUES = ["abc", "true", "false", "null", "4.5", "-1", "0", "-7.25", "1e30", "-1e30", "nan", "inf", "-inf",
              "[1,2]", "[]", "[a,a]", "{a:1}", "''", "../x", "/abs/x", "a/b", "a\\\\b", "99999999999999999999"]
#: task configs fuzzed, with their kinds
TASKS = {"passkey": "passkey", "gsm8k": "gsm8k", "ruler/vt": "ruler", "longbench/trec": "longbench"}


class ModelWouldLoad(BaseException):
    """Raised instead of loading the model: the config was accepted."""


def keys() -> list[tuple[list[str], str]]:
    """(config group choices, key) for every fuzzed key."""
    top = [([], f.name) for f in dataclasses.fields(KVBenchConfig) if f.name not in ("model", "method", "task")]
    model = [([], f"model.{f.name}") for f in dataclasses.fields(ModelConfig)]
    method = [([f"method={name}"], f"method.{f.name}") for name, cls in methods().items()
              for f in dataclasses.fields(cls.Params)]
    task = [([f"task={name}"], f"task.{f.name}") for name, kind in TASKS.items()
            for f in dataclasses.fields(task_kinds()[kind].Params)]
    return top + model + method + task


@pytest.fixture(scope="module")
def composed():
    """The composed config (a DictConfig, as Hydra hands it to the job) of each group choice, cached."""
    register_schema()
    cache = {}

    def get(groups: tuple[str, ...]):
        if groups not in cache:
            with initialize_config_module(config_module="kvbench.conf", version_base="1.3"):
                cache[groups] = compose(config_name="config", overrides=list(groups))
        return copy.deepcopy(cache[groups])

    return get


def outcome(composed, groups: list[str], key: str, text: str, results_dir: str) -> str:
    """What the CLI does with ``groups + [key=text]``: "refused" (ConfigError, exit 2), "hydra" (Hydra's
    own composition error, exit 1) or "accepted" (the model would load)."""
    override = f"{key}={text}"
    try:
        check_overrides([*groups, override, f"results_dir={results_dir}"])
        cfg = composed(tuple(groups))
        cfg.results_dir = results_dir
        (parsed,) = OverridesParser.create().parse_overrides([override])
        try:
            OmegaConf.update(cfg, key, parsed.value(), merge=True)
        except OmegaConfBaseException:
            return "hydra"
        runner.run(OmegaConf.to_object(cfg))
    except ConfigError:
        return "refused"
    except ModelWouldLoad:
        return "accepted"
    raise AssertionError(f"{override} ran without loading the model")


def test_random_bad_overrides_never_end_in_a_traceback_or_a_write(composed, tmp_path, monkeypatch):
    def stop(cfg):
        raise ModelWouldLoad()

    monkeypatch.setattr(runner, "load_model", stop)
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    rng = random.Random(20)
    choices = keys()
    seen = {"refused": 0, "hydra": 0, "accepted": 0}
    for _ in range(CASES):
        groups, key = rng.choice(choices)
        text = rng.choice(BAD_VALUES)
        try:
            seen[outcome(composed, groups, key, text, str(results))] += 1
        except Exception as err:  # anything else is a traceback on the command line
            raise AssertionError(f"{' '.join(groups)} {key}={text}: {type(err).__name__}: {err}") from err
    assert list(tmp_path.rglob("*")) == [], "a rejected or stopped run wrote files"
    # most draws are bad values; the rest are values a key takes (seed=0, ratio=4.5, data_dir=abc)
    assert seen["refused"] > CASES * 3 / 4, seen
