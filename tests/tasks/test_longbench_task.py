"""The LongBench task: official prompt building (pred.py), data loading, configs, re-scoring CLI.

Fixtures: tests/data/longbench (self-written examples in the official format, written by
scripts/make_longbench_fixtures.py). Most tests use a character-level tokenizer, where the middle
truncation can be checked by hand; the ``embedded`` ones use SmolLM2-135M's tokenizer and model.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import run_info, sample_record
from kvbench.errors import ConfigError
from kvbench.models import ModelConfig
from kvbench.results import RunDir
from kvbench.scoring.longbench import E_TASKS, TASKS
from kvbench.tasks import build_task
from kvbench.tasks import longbench as lbt

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "longbench"
# pred.py: `if dataset not in [...]: prompt = build_chat(...)`
NO_CHAT = {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
# config/dataset2maxlen.json
MAXLEN = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64,
          "hotpotqa": 32, "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512,
          "qmsum": 512, "multi_news": 512, "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
          "lsht": 64, "passage_count": 32, "passage_retrieval_en": 32, "passage_retrieval_zh": 32,
          "lcc": 64, "repobench-p": 64}
ALL_DATASETS = [(t, "v1") for t in TASKS] + [(t, "e") for t in TASKS if t in E_TASKS]


class CharTokenizer:
    """One token per character, plus a BOS special token that decode can skip."""

    BOS = -1

    def __call__(self, text, add_special_tokens=True, truncation=False, return_tensors=None):
        return SimpleNamespace(input_ids=([self.BOS] if add_special_tokens else []) + [ord(c) for c in text])

    def decode(self, ids, skip_special_tokens=False):
        return "".join("" if i == self.BOS and skip_special_tokens else "<s>" if i == self.BOS else chr(i)
                       for i in ids)


def model_cfg(max_prompt_tokens=100_000):
    return ModelConfig(name="m", source="path", path="m", max_prompt_tokens=max_prompt_tokens)


def longbench(tasks=None, variant="v1", data_dir=DATA, **params):
    values = {"name": "longbench", "kind": "longbench", "tasks": tasks, "variant": variant,
              "data_dir": str(data_dir) if data_dir is not None else None, **params}
    return build_task(values)


def subtask(task, variant="v1", **params):
    (sub,) = longbench([task], variant, **params).subtasks()
    return sub


def examples(name):
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------
# Task table and prompt templates
# ---------------------------------------------------------------------------------------------


def test_template_quirks_kept():
    prompt = {name: spec["prompt"] for name, spec in TASKS.items()}
    assert prompt["narrativeqa"].count("asconcisely as you can") == 2
    assert "\n\n Answer the question based on the above article" in prompt["qasper"]
    assert "Write a one-page summary of all news. \n\nNews:\n{context}" in prompt["multi_news"]
    assert prompt["passage_count"].endswith("\n\nThe final answer is: ")
    assert prompt["passage_retrieval_en"].endswith("\n\nThe answer is: ")
    assert prompt["passage_retrieval_zh"].endswith("\n\n答案是：")
    assert prompt["lcc"] == "Please complete the code given below. \n{context}Next line of code:\n"
    assert prompt["repobench-p"] == "Please complete the code given below. \n{context}{input}Next line of code:\n"
    assert prompt["trec"].endswith("\n\n{context}\n{input}")
    for name, text in prompt.items():
        assert text.count("{context}") == 1, name
        # only {context} and {input} are fields: formatting with both leaves no brace behind
        assert "{" not in text.format(context="", input=""), name


def test_max_new_tokens_and_chat_rule_match_pred_py():
    assert {name: spec["max_new_tokens"] for name, spec in TASKS.items()} == MAXLEN
    assert {name for name, spec in TASKS.items() if not spec["chat_template"]} == NO_CHAT


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task,variant", ALL_DATASETS)
def test_samples_follow_pred_py(task, variant):
    sub = subtask(task, variant)
    name = task if variant == "v1" else f"{task}_e"
    assert sub.name == name
    raw = examples(name)
    samples = sub.samples(CharTokenizer(), model_cfg())
    assert len(samples) == len(raw)
    for sample, example in zip(samples, raw):
        prompt = TASKS[task]["prompt"].format(context=example["context"], input=example["input"])
        assert (sample.context, sample.question) == (prompt, "")  # whole mode: one string
        assert sample.id == example["_id"]
        assert sample.answers == example["answers"]
        assert sample.max_new_tokens == MAXLEN[task]
        assert sample.chat_template is (task not in NO_CHAT)
        samsum = task == "samsum"
        assert sample.stop_tokens == (["\n"] if samsum else [])
        assert sample.min_new_tokens == (1 if samsum else 0)
        assert sample.meta == {"_id": example["_id"], "length": example["length"],
                               "all_classes": example["all_classes"], "language": example["language"],
                               "category": TASKS[task]["category"], "truncated": False}


@pytest.mark.parametrize("task,question", [
    ("hotpotqa", "Question: {input}\nAnswer:"),
    ("narrativeqa", "Question: {input}\n\nAnswer:"),
    ("dureader", "问题：{input}\n回答："),
    ("trec", "{input}"),
    ("passage_retrieval_en", "{input}\n\nPlease enter the number of the paragraph that the abstract is "
                             "from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", "
                             "etc.\n\nThe answer is: "),
    ("repobench-p", "{input}Next line of code:\n"),  # input right after the context
    ("gov_report", "\n\nNow, write a one-page summary of the report.\n\nSummary:"),  # no input
    ("lcc", "Next line of code:\n"),
])
def test_context_mode_splits_at_the_question(task, question):
    example = examples(task)[0]
    (sample, _) = subtask(task, compress="context").samples(CharTokenizer(), model_cfg())
    assert sample.question == question.format(input=example["input"])
    prompt = TASKS[task]["prompt"].format(context=example["context"], input=example["input"])
    assert sample.context + sample.question == prompt
    assert example["context"] in sample.context


def test_question_start_with_input_before_context():
    # no official template does this; the question part is then what follows the context
    template = "Q: {input}\n\n{context}\n\nAnswer:"
    assert template[lbt.question_start(template):] == "\n\nAnswer:"


@pytest.mark.parametrize("compress", ["whole", "context"])
def test_middle_truncation_keeps_first_and_last_half(compress):
    max_tokens = 1001  # odd on purpose: half = int(1001 / 2) = 500 tokens each side
    short, long = examples("hotpotqa")
    samples = subtask("hotpotqa", compress=compress).samples(CharTokenizer(), model_cfg(max_tokens))
    template = TASKS["hotpotqa"]["prompt"]
    # the short example (BOS + 675 characters) is not truncated
    prompt = template.format(context=short["context"], input=short["input"])
    assert len(prompt) + 1 <= max_tokens
    assert samples[0].context + samples[0].question == prompt and samples[0].meta["truncated"] is False
    # the long one (BOS + 1706) keeps BOS + 499 characters and the last 500; BOS is decoded away
    prompt = template.format(context=long["context"], input=long["input"])
    assert len(prompt) + 1 > max_tokens
    assert samples[1].context + samples[1].question == prompt[:499] + prompt[-500:]
    assert samples[1].meta["truncated"] is True
    if compress == "context":  # the question part survived in the kept tail
        assert samples[1].question == f"Question: {long['input']}\nAnswer:"


def test_truncation_into_the_question_compresses_everything(caplog):
    (_, sample) = subtask("hotpotqa", compress="context").samples(CharTokenizer(), model_cfg(20))
    assert sample.question == "" and len(sample.context) == 19
    assert "cut into the question" in caplog.text


@pytest.mark.embedded
def test_middle_truncation_with_a_real_tokenizer(embedded):
    _, tokenizer = embedded
    max_tokens = 300
    short, example = examples("narrativeqa")
    prompt = TASKS["narrativeqa"]["prompt"].format(context=example["context"], input=example["input"])
    ids = tokenizer(prompt).input_ids
    assert len(ids) > max_tokens
    expected = (tokenizer.decode(ids[:150], skip_special_tokens=True)
                + tokenizer.decode(ids[-150:], skip_special_tokens=True))
    for compress in ("whole", "context"):
        samples = subtask("narrativeqa", compress=compress).samples(tokenizer, model_cfg(max_tokens))
        assert samples[1].context + samples[1].question == expected
    assert samples[1].question == f"Question: {example['input']}\n\nAnswer:"
    # the short example stays whole
    assert len(tokenizer(samples[0].context).input_ids) <= max_tokens
    assert samples[0].context + samples[0].question == TASKS["narrativeqa"]["prompt"].format(
        context=short["context"], input=short["input"])


def test_limit_takes_a_seeded_subset_in_dataset_order():
    ids = [e["_id"] for e in examples("trec_e")]
    picked = [s.id for s in subtask("trec", "e", limit=2).samples(CharTokenizer(), model_cfg())]
    again = [s.id for s in subtask("trec", "e", limit=2).samples(CharTokenizer(), model_cfg())]
    assert picked == again and len(picked) == 2
    assert picked == [i for i in ids if i in picked]


# ---------------------------------------------------------------------------------------------
# Configuration and data errors
# ---------------------------------------------------------------------------------------------


def test_subtasks_one_per_task():
    assert [t.name for t in longbench().subtasks()] == list(TASKS)
    e_names = [t.name for t in longbench(variant="e").subtasks()]
    assert e_names == [f"{t}_e" for t in TASKS if t in E_TASKS] and len(e_names) == 13
    assert [t.name for t in longbench(["hotpotqa", "trec"]).subtasks()] == ["hotpotqa", "trec"]


@pytest.mark.parametrize("params,message", [
    ({"tasks": ["narrativeqa"], "variant": "e"},
     r"LongBench-E has no 'narrativeqa_e' set; the 13 LongBench-E tasks are: qasper, .*repobench-p"),
    ({"tasks": ["hotpot"]}, r"unknown LongBench task 'hotpot' \(variant v1\); valid tasks: narrativeqa"),
    ({"tasks": ["hotpotqa_e"]}, r"task\.variant=e .*task=longbench/hotpotqa_e"),
    ({"variant": "v2"}, r"^longbench.variant='v2': expected one of 'v1', 'e'$"),
    ({"tasks": []}, r"^longbench.tasks=\[\]: expected a non-empty list of distinct strings, or null$"),
    ({"tasks": ["trec", "trec"]}, r"longbench.tasks=\['trec', 'trec'\]: expected a non-empty list of distinct"),
    ({"limit": 0}, "^longbench.limit=0: expected an integer >= 1, or null$"),
    ({"compress": "question"}, "^longbench.compress='question': expected one of 'whole', 'context'$"),
])
def test_bad_params(params, message):
    with pytest.raises(ConfigError, match=message):
        longbench(**params)


def test_e_error_lists_only_valid_tasks():
    with pytest.raises(ConfigError) as err:
        longbench(["musique"], "e")
    listed = str(err.value).split("are: ")[1].split(", ")
    assert listed == [t for t in TASKS if t in E_TASKS]


def test_missing_data_folder_says_where_to_put_the_files(tmp_path):
    with pytest.raises(lbt.DataError, match=r"does not exist; download https://huggingface.co/"
                                            r"datasets/THUDM/LongBench/resolve/main/data.zip .*data_dir="):
        longbench(["hotpotqa"], data_dir=tmp_path / "nowhere")  # at config time, before any model


def test_missing_file_names_the_expected_path(tmp_path):
    with pytest.raises(lbt.DataError) as err:
        longbench(["hotpotqa"], "e", data_dir=tmp_path)
    assert f"{tmp_path / 'hotpotqa_e.jsonl'} not found" in str(err.value)
    assert "data/{task}_e.jsonl" in str(err.value)


def _copy_with(tmp_path, name, extra_lines):
    text = (DATA / f"{name}.jsonl").read_text(encoding="utf-8")
    (tmp_path / f"{name}.jsonl").write_text(text + "".join(extra_lines), encoding="utf-8")
    return tmp_path / f"{name}.jsonl"


def test_malformed_line_names_file_and_line(tmp_path):
    path = _copy_with(tmp_path, "hotpotqa", ["\n", '{"input": "x", "context": \n'])  # lines 3 (blank), 4
    task = subtask("hotpotqa", data_dir=tmp_path)
    with pytest.raises(lbt.DataError, match=rf"{path}:4: malformed JSON line"):
        task.samples(CharTokenizer(), model_cfg())


def test_missing_field_names_file_and_line(tmp_path):
    bad = dict(examples("hotpotqa")[0])
    del bad["answers"]
    path = _copy_with(tmp_path, "hotpotqa", [json.dumps(bad) + "\n"])
    with pytest.raises(lbt.DataError, match=rf"{path}:3: missing field 'answers'"):
        subtask("hotpotqa", data_dir=tmp_path).samples(CharTokenizer(), model_cfg())


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "trec.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(lbt.DataError, match="has no examples"):
        subtask("trec", data_dir=tmp_path).samples(CharTokenizer(), model_cfg())


def test_hub_loading_uses_the_parquet_revision(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name, split, revision):
        calls.append((path, name, split, revision))
        return examples("hotpotqa_e")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    samples = subtask("hotpotqa", "e", data_dir=None).samples(CharTokenizer(), model_cfg())
    assert calls == [("THUDM/LongBench", "hotpotqa_e", "test", "refs/convert/parquet")]
    assert [s.id for s in samples] == [e["_id"] for e in examples("hotpotqa_e")]


def test_hub_failure_tells_to_use_data_zip(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(lbt.DataError, match=r"could not load THUDM/LongBench 'trec' .*ConnectionError: "
                                            r"no network.*data\.zip.*data_dir="):
        subtask("trec", data_dir=None).samples(CharTokenizer(), model_cfg())


# ---------------------------------------------------------------------------------------------
# Scoring (the scorer itself is tested in test_longbench_metrics.py)
# ---------------------------------------------------------------------------------------------


def _records(sub, preds=None):
    samples = sub.samples(CharTokenizer(), model_cfg())
    out = []
    for i, s in enumerate(samples):
        record = sample_record(s.id, task=sub.name, pred=s.answers[0] if preds is None else preds[i],
                               answers=s.answers, meta=s.meta)
        record.scores = sub.score(record)
        out.append(record)
    return out


@pytest.mark.parametrize("task,variant", ALL_DATASETS)
def test_gold_answers_score_one(task, variant):
    # every metric of the table runs on the fixtures, through Task.score
    sub = subtask(task, variant)
    records = _records(sub)
    # (the rouge package's F has an epsilon: 0.999999995)
    assert [r.scores["score"] for r in records] == pytest.approx([1.0] * len(records))
    summary = sub.summarize(records)
    assert summary["score"] == 100.0
    assert ("score_e" in summary) is (variant == "e")


def test_summarize_e_buckets():
    sub = subtask("hotpotqa", "e")
    records = _records(sub, ["Vessen", "nothing", "Vessen"])  # lengths 1500, 5200, 9100
    assert sub.summarize(records) == {"score": 66.67, "score_e": {"0-4k": 100.0, "4-8k": 0.0, "8k+": 100.0}}


def test_classification_reads_all_classes_from_meta():
    sub = subtask("trec")
    # "Country" and "Other" both occur: 1/2, as the official classification score
    assert _records(sub, ["Country or Other", "Person"])[0].scores["score"] == 0.5


# ---------------------------------------------------------------------------------------------
# Hydra configs
# ---------------------------------------------------------------------------------------------




def test_hydra_per_task_config(compose):
    cfg = compose(["task=longbench/narrativeqa", "data_dir=tests/data/longbench"])
    assert cfg["task"]["tasks"] == ["narrativeqa"] and cfg["task"]["variant"] == "v1"
    assert cfg["task"]["data_dir"] == "tests/data/longbench"
    (sub,) = build_task(cfg["task"]).subtasks()
    assert sub.name == "narrativeqa"
    cfg = compose(["task=longbench/hotpotqa_e", "task.compress=context", "task.data_dir=/elsewhere"])
    assert (cfg["task"]["tasks"], cfg["task"]["variant"], cfg["task"]["compress"]) == (["hotpotqa"], "e", "context")
    assert cfg["task"]["data_dir"] == "/elsewhere" and cfg["data_dir"] is None


def test_hydra_suite_configs(compose):
    cfg = compose(["task=longbench", "task.tasks=[hotpotqa,trec]"])
    assert cfg["task"]["tasks"] == ["hotpotqa", "trec"] and cfg["task"]["data_dir"] is None
    cfg = compose(["task=longbench_e", f"data_dir={DATA}"])
    assert [t.name for t in build_task(cfg["task"]).subtasks()] == [f"{t}_e" for t in TASKS if t in E_TASKS]


@pytest.mark.parametrize("name,variant", [("longbench", "v1"), ("longbench_e", "e")])
def test_suite_yaml_matches_the_parameter_defaults(name, variant):
    from dataclasses import asdict

    values = yaml.safe_load((ROOT / "kvbench" / "conf" / "task" / f"{name}.yaml").read_text())
    expected = {"name": name, "kind": "longbench", **asdict(lbt.LongBenchParams()),
                "variant": variant, "data_dir": "${data_dir}"}
    assert values == expected


# ---------------------------------------------------------------------------------------------
# Re-scoring CLI: python -m kvbench.score RESULTS_DIR --write
# ---------------------------------------------------------------------------------------------


def _fake_run(results: Path, sub, preds) -> RunDir:
    """A results directory as the runner writes it (records, run.json, scores.json)."""
    from kvbench.runner import summarize_run

    run_dir = RunDir(results / "m" / sub.name / "full" / "ratio-1")
    records = _records(sub, preds)
    for record in records:
        run_dir.append(record)
    run_dir.write_run(run_info(sub.describe(), n_expected=len(records)))
    run_dir.write_scores(summarize_run(sub, records, len(records)))
    return run_dir


def _score_cli(*args):
    return subprocess.run([sys.executable, "-m", "kvbench.score", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_rescore_write_round_trip(tmp_path):
    sub = subtask("trec", "e")
    run_dir = _fake_run(tmp_path, sub, ["Other", "Other", "Other"])
    assert run_dir.read_scores().score == 0.0
    lines = run_dir.samples_path.read_text().splitlines()
    first = json.loads(lines[0])
    first["pred"] = first["answers"][0]  # a fixed prediction: its stored score is now stale
    duplicate = json.loads(lines[1])
    duplicate["pred"] = "a second record with the same id must not come back"
    run_dir.samples_path.write_text("\n".join([json.dumps(first), *lines[1:], json.dumps(duplicate)])
                                    + "\n" + '{"id": "torn')

    proc = _score_cli(str(tmp_path), "--write")
    assert proc.returncode == 0, proc.stderr
    records = run_dir.records()
    assert [r.id for r in records] == [e["_id"] for e in examples("trec_e")]
    assert len(run_dir.samples_path.read_text().splitlines()) == 3
    assert [r.scores["score"] for r in records] == [1.0, 0.0, 0.0]
    scores = run_dir.read_scores()
    assert (scores.score, scores.n, scores.complete) == (33.33, 3, True)
    assert scores.metrics["score_e"] == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 0.0}
    assert json.loads(proc.stdout)[str(run_dir.path)]["score"] == 33.33

    # the read-only CLI scores the same records with the same task to the same score, writing nothing
    proc = _score_cli(str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[str(run_dir.path)]["score"] == 33.33


def test_rescore_needs_a_results_directory(tmp_path):
    proc = _score_cli(str(tmp_path), "--write")
    assert proc.returncode == 1 and "no kvbench results directory" in proc.stderr


# ---------------------------------------------------------------------------------------------
# End to end: the real CLI on the fixtures
# ---------------------------------------------------------------------------------------------


@pytest.mark.embedded
def test_cli_end_to_end(tmp_path):
    # The command uses method=snapkv; streaming stands in for it here.
    proc = subprocess.run(
        [sys.executable, "-m", "kvbench", "task=longbench/passage_retrieval_en", "data_dir=tests/data/longbench",
         "method=streaming", "ratio=4", "limit=2", f"results_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = RunDir(tmp_path / "smollm2-135m" / "passage_retrieval_en" / "streaming" / "ratio-4")
    scores = run_dir.read_scores()
    assert scores.metric == "score" and scores.n == 2 and scores.complete
    assert 0.0 <= scores.score <= 100.0 and not math.isnan(scores.score)
    records = run_dir.records()
    assert [r.id for r in records] == [e["_id"] for e in examples("passage_retrieval_en")]
    assert all(r.task == "passage_retrieval_en" and "score" in r.scores for r in records)
    # re-scoring the real output with the same scorer changes nothing
    before = run_dir.samples_path.read_text()
    proc = _score_cli(str(tmp_path), "--write")
    assert proc.returncode == 0, proc.stderr
    assert run_dir.samples_path.read_text() == before
    assert run_dir.read_scores().score == scores.score


@pytest.mark.parametrize("compress,max_prompt_tokens", [("whole", 100_000), ("context", 100_000), ("whole", 300)])
def test_questions_about_one_context_form_one_cluster(compress, max_prompt_tokens):
    # hotpotqa_e's fixture asks two of its three questions about one context; the cluster does not
    # depend on the prompt (mode, truncation), only on the context
    raw = examples("hotpotqa_e")
    samples = subtask("hotpotqa", "e", compress=compress).samples(CharTokenizer(), model_cfg(max_prompt_tokens))
    clusters = [s.cluster for s in samples]
    for sample, example in zip(samples, raw):
        others = [o for o in raw if o["context"] == example["context"]]
        assert clusters.count(sample.cluster) == len(others)
    assert len(set(clusters)) == len({e["context"] for e in raw}) == 2
    assert clusters[0] == subtask("hotpotqa", "e").samples(CharTokenizer(), model_cfg())[0].cluster
