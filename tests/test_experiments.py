"""The published board's sweeps (``+experiment=leaderboard_cpu``, its budget half and the GPU sweep) cover what they
claim to."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import kvbench.conf
from kvbench.claims import GPU_ROWS
from kvbench.config import compose_config, load_config, register_schema
from kvbench.errors import ConfigError
from kvbench.methods import METHODS
from kvbench.runner import RunSpec

EXPERIMENTS = Path(kvbench.conf.__file__).parent / "experiment"
NAMES = sorted(p.stem for p in EXPERIMENTS.glob("leaderboard_*.yaml"))


def axes(name: str) -> dict[str, list[str]]:
    """The sweep's axes as Hydra composes them (an experiment may inherit some from another)."""
    register_schema()
    with initialize_config_module(config_module="kvbench.conf", version_base="1.3"):
        params = compose(config_name="config", overrides=[f"+experiment={name}"], return_hydra_config=True)
    return {key: str(value).split(",") for key, value in params.hydra.sweeper.params.items()}


def spec(*overrides: str) -> RunSpec:
    return RunSpec.from_config(load_config(compose_config(list(overrides))))


@pytest.mark.parametrize("name", ["leaderboard_cpu", "leaderboard_gpu"])
def test_the_ratio_sweeps_run_every_registered_method_once(name):
    methods = [compose_config([f"method={option}"])["method"]["name"] for option in axes(name)["method"]]
    assert len(set(methods)) == len(methods)
    assert sorted(methods) == sorted(METHODS.all())


def test_the_boards_lagkv_compresses_the_boards_prompts():
    # with the default lag (1024) a 1024-token passkey prompt is below sink + 2 x lag: nothing is evicted
    method = spec("+experiment=leaderboard_cpu", "method=board/lagkv", "ratio=4").method.new()
    assert method.params.sink_tokens + 2 * method.params.lag_size < 512


def test_the_budget_half_leaves_out_exactly_the_methods_that_cannot_hold_its_budget():
    budget = compose_config(["+experiment=leaderboard_cpu_budget"])["budget"]
    holding = set()
    for name in set(METHODS.all()) - {"full"}:  # full ignores a budget: it runs as the baseline
        try:
            spec(f"method={name}", "ratio=null", f"budget={budget}")
            holding.add(name)
        except ConfigError:
            pass
    assert {"quant", "lagkv"} <= set(METHODS.all()) - holding  # one refuses any budget, one this one
    methods = axes("leaderboard_cpu_budget")["method"]
    assert len(set(methods)) == len(methods)
    assert set(methods) == holding | {"full"}


@pytest.mark.parametrize("name", NAMES)
def test_every_cell_composes_into_the_committed_tree_without_a_report(name):
    sweep = axes(name)
    embedded = ["smollm2-135m", "gemma3-270m"]
    assert sweep["model"] == (embedded if "cpu" in name else ["llama-3.1-8b-instruct", "qwen2.5-7b-instruct"])
    ratios = [r for r in sweep["ratio"] if r != "null"]
    for task in sweep["task"]:
        overrides = [f"+experiment={name}", f"task={task}", f"method={sweep['method'][0]}",
                     *(f"ratio={r}" for r in ratios[:1])]
        cfg = compose_config(overrides)
        assert (cfg["results_dir"], cfg["report"]) == ("leaderboard/runs", False)
        spec(*overrides)


def test_the_gpu_sweep_writes_the_cells_the_gpu_table_reads():
    sweep = axes("leaderboard_gpu")
    read = {row.method for row in GPU_ROWS}
    methods = [m for m in sweep["method"] if compose_config([f"method={m}"])["method"]["name"] in read]
    written = set()
    for task in sweep["task"]:
        for method in methods:
            for ratio in sweep["ratio"]:
                overrides = ["+experiment=leaderboard_gpu", f"task={task}", f"method={method}", f"ratio={ratio}"]
                cfg = compose_config(overrides)
                written.add((cfg["task"]["name"], cfg["method"]["name"], spec(*overrides).setting))
    assert {(row.tasks, row.method, row.setting) for row in GPU_ROWS} <= written
