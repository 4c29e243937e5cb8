"""n sampled generations per prompt through the runner: recorded, scored as means, reproducible
whatever the order, sharding or resumption of the run."""

from types import SimpleNamespace

import torch

from kvbench.config import load_config
from kvbench.results import RunDir
from kvbench.runner import RunSpec, run_task

MODEL = {"name": "tiny", "source": "hub", "path": "tiny"}
TASK = {"name": "passkey", "kind": "passkey", "lengths": [60], "depths": [0.0, 0.5, 1.0], "max_new_tokens": 6}


class DigitTokenizer:
    """Characters to ids 1..100 of the tiny models' vocabulary; ids decode to digits, so a passkey
    prediction's partial match is a real score."""

    chat_template = None
    eos_token_id = None

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [ord(c) % 100 + 1 for c in text]
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors else ids)

    def encode(self, text, add_special_tokens=False):
        return self(text).input_ids

    def decode(self, ids, skip_special_tokens=False):
        return "".join(str(i % 10) for i in ids)


def run(model, tmp_path, **over):
    cfg = load_config({"model": MODEL, "method": {"name": "streaming"}, "task": TASK, "budget": 32, "seed": 5,
                       "results_dir": str(tmp_path), "summary": False, "report": False,
                       "decoding": {"temperature": 1.0, "n": 3}, **over})
    spec = RunSpec.from_config(cfg)
    run_task(model, DigitTokenizer(), spec, spec.task)
    run_dir = spec.run_dir(spec.task)
    return spec, RunDir(run_dir.path).records(), run_dir.read_run()


def test_n_samples_are_recorded_with_their_seeds_and_scored_as_means(tiny_llama, tmp_path):
    spec, records, info = run(tiny_llama, tmp_path)
    assert spec.setting == "budget-32_seed-5_temperature-1_n-3"
    assert info.identity.decoding == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "n": 3}
    assert len(records) == 3
    for r in records:
        assert [c.seed for c in r.completions] == [spec.decoding.sample_seed(5, r.id, i) for i in range(3)]
        assert (r.pred, r.new_tokens) == (r.completions[0].pred, r.completions[0].new_tokens)
        for metric, value in r.scores.items():
            assert value == sum(c.scores[metric] for c in r.completions) / 3
        assert r.kv.curve.steps[0] == 0 and r.kv.peak_tokens_held <= 32
    preds = [c.pred for r in records for c in r.completions]
    assert len(set(preds)) > 3  # the samples differ


def test_a_shard_draws_the_same_samples_as_the_whole_run(tiny_llama, tmp_path):
    _, whole, _ = run(tiny_llama, tmp_path / "whole")
    _, shard, _ = run(tiny_llama, tmp_path / "shard", shard="1/2")
    (second,) = shard  # the stride 1/2 of three samples: the second one alone, run first
    assert second.id == whole[1].id
    assert [c.pred for c in second.completions] == [c.pred for c in whole[1].completions]
    assert second.scores == whole[1].scores


def test_identities_written_before_decoding_and_template_variables_were_recorded_resume(tmp_path):
    from kvbench.results import RunIdentity

    spec = RunSpec.from_config(load_config({"model": MODEL, "method": {"name": "full"}, "task": TASK,
                                            "results_dir": str(tmp_path)}))
    current = spec.identity(spec.task)
    old = current.to_json()
    del old["decoding"], old["model"]["chat_template_kwargs"]
    assert current.differences(RunIdentity.from_json(old, version=1)) == []  # still resumable
    sampled = RunSpec.from_config(load_config({"model": MODEL, "method": {"name": "full"}, "task": TASK,
                                               "decoding": {"temperature": 0.6}}))
    # the setting's label (its directory) says it too
    assert sampled.identity(sampled.task).differences(current) == ["compression", "decoding"]


def test_time_per_correct_answer_counts_every_generation():
    from conftest import sample_record
    from kvbench.results import Completion, seconds_per_correct

    one = sample_record("a", prefill_s=1.0, decode_s=3.0, scores={"acc": 1.0})
    wrong = sample_record("b", prefill_s=1.0, decode_s=1.0, scores={"acc": 0.0})
    assert seconds_per_correct([one, wrong], "acc") == 6.0  # 6 s for one correct answer
    assert seconds_per_correct([wrong], "acc") is None
    sampled = sample_record("c", completions=[
        Completion(seed=1, pred="x", new_tokens=5, stopped_by="eos", prefill_s=0.5, decode_s=1.5,
                   peak_tokens_held=9, scores={"acc": 1.0}),
        Completion(seed=2, pred="y", new_tokens=9, stopped_by="eos", prefill_s=0.5, decode_s=3.5,
                   peak_tokens_held=9, scores={"acc": 0.0})], scores={"acc": 0.5})
    assert seconds_per_correct([sampled], "acc") == 6.0  # both samples' time, one correct
