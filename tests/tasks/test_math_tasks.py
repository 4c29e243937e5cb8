r"""Math reasoning tasks (math500, aime25, gsm8k): answer extraction, equivalence, data loading,
prompts and configs.

Fixtures: tests/fixtures/math/<task>/ (self-written problems in each dataset's published format).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import sample_record
from kvbench.errors import ConfigError
from kvbench.models import ModelConfig
from kvbench.runner import encode
from kvbench.scoring.math import equivalent, extract, gsm8k_gold, last_boxed, last_number, normalize
from kvbench.tasks import build_task

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "math"
MODEL = ModelConfig(name="m", source="path", path="m")


def task(kind, data_dir=None, **params):
    folder = FIXTURES / kind if data_dir is None else data_dir
    return build_task({"name": kind, "kind": kind, "data_dir": str(folder), **params})


def record(t, pred, answer, stopped_by="eos", new_tokens=10):
    r = sample_record("s", task=t.name, pred=pred, answers=[answer], stopped_by=stopped_by, new_tokens=new_tokens)
    r.scores = t.score(r)
    return r


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    (r"so the answer is \boxed{5}.", "5"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # a cut at the first } would give \frac{1
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"first \boxed{3}, then corrected: \boxed{4}", "4"),
    (r"\boxed{1} and finally \fbox{x^{2}+1}", "x^{2}+1"),
    (r"\boxed {12}", "12"),
    (r"\boxed{10\text{ cm}}", r"10\text{ cm}"),
    ("the answer is 5", None),
    (r"\boxed{3} but then \boxed{\frac{7}{", None),  # the last box was cut off: no answer
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_gsm8k_falls_back_to_the_last_number_only_without_a_box():
    assert extract("3 boxes, 12 apples, so 10 are left.", fallback_to_last_number=True) == "10"
    assert extract("It earns $1,200 in week 1 and $7,200 in total.", fallback_to_last_number=True) == "7,200"
    assert extract("the loss is -3.5 dollars", fallback_to_last_number=True) == "-3.5"
    assert extract(r"12 apples, \boxed{10}, 99 bottles", fallback_to_last_number=True) == "10"
    assert extract("no digits here", fallback_to_last_number=True) is None
    assert extract("so 10 are left", fallback_to_last_number=False) is None  # MATH-500, AIME: box only
    assert last_number("1,2,3") == "3"


def test_gsm8k_gold_is_the_text_after_the_marker():
    assert gsm8k_gold("3 * 4 = <<3*4=12>>12\n#### 1,200") == "1,200"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no final answer")


# ---------------------------------------------------------------------------------------------
# Normalisation and equivalence
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw,expected", [
    (r"10\text{ cm}^2", "10"),
    (r"\frac{1}{2}\text{ cup}", r"\frac{1}{2}"),
    (r"\text{(C)}", "(C)"),
    (r"\text{Evelyn}", "Evelyn"),
    (r"(2,\text{ odd})", "(2,odd)"),  # text inside an answer is kept, only a trailing unit goes
    (r"90^\circ", "90"),
    (r"90^{\circ}", "90"),
    (r"\$32,\!348", "32348"),
    (r"1{,}000", "1000"),
    ("x = 5", "5"),
    ("x_1=2", "2"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    (r"\dfrac12", r"\frac{1}{2}"),
    (r"\tfrac{3}4", r"\frac{3}{4}"),
    (r"3\sqrt2", r"3\sqrt{2}"),
    (".5", "0.5"),
    ("-.5", "-0.5"),
    ("7.", "7"),
    ("{5}", "5"),
    (r"50\%", "50"),
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


@pytest.mark.parametrize("pred,gold", [
    ("0.5", r"\frac{1}{2}"),
    (r"\dfrac12", r"\frac{1}{2}"),
    ("1/2", r"\frac{1}{2}"),
    ("0.50", "1/2"),
    (r"-\frac{3}{4}", "-0.75"),
    (r"\frac{-3}{4}", r"-\frac34"),
    ("070", "70"),  # AIME's three-digit habit
    (r"50\%", r"50\%"),
    ("50", r"50\%"),
    (r"50\%", "50"),
    ("1,000", "1000"),
    (r"\$18.00", "18"),
    (r"18 \text{ dollars}", "18"),
    (r"10\text{ inches}^2", "10"),
    (r"90^\circ", "90"),
    (r"(3,\frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\text{(C)}", "(C)"),
    ("k = 3", "3"),
    (r"3 \sqrt{13}", r"3\sqrt{13}"),
])
def test_equivalent(pred, gold):
    assert equivalent(pred, gold) and equivalent(gold, pred)


@pytest.mark.parametrize("pred,gold", [
    ("0.33", r"\frac{1}{3}"),  # exact rationals, no tolerance
    ("0.5", r"50\%"),  # a percent answer is the percentage itself
    ("2", "-2"),
    (r"\frac{x}{2}", "x/2"),  # symbolic: strings, no algebra
    ("(1,2)", "(2,1)"),
    ("1/0", "0"),
    ("", "0"),
    (r"\sqrt{2}", "1.4142"),
])
def test_not_equivalent(pred, gold):
    assert not equivalent(pred, gold) and not equivalent(gold, pred)


def test_no_answer_is_never_equal():
    assert not equivalent(None, "5")


# ---------------------------------------------------------------------------------------------
# Data: local folders and the hub
# ---------------------------------------------------------------------------------------------


def test_math500_loader():
    samples = task("math500").samples(None, MODEL)
    assert [s.id for s in samples] == ["test/prealgebra/1.json", "test/precalculus/2.json", "test/geometry/3.json"]
    assert samples[1].answers == [r"\left( 3, \frac{\pi}{2} \right)"]
    assert samples[1].meta == {"subject": "Precalculus", "level": 2, "unique_id": "test/precalculus/2.json"}


def test_aime25_loader_reads_both_parts_in_order():
    samples = task("aime25").samples(None, MODEL)
    assert [(s.id, s.answers, s.meta["part"]) for s in samples] == [
        ("AIME2025-I-1", ["16"], "AIME2025-I"), ("AIME2025-I-2", ["24"], "AIME2025-I"),
        ("AIME2025-II-1", ["9"], "AIME2025-II")]


def test_gsm8k_loader_takes_the_gold_after_the_marker():
    samples = task("gsm8k").samples(None, MODEL)
    assert [(s.id, s.answers) for s in samples] == [("test-0", ["10"]), ("test-1", ["7200"])]
    assert samples[1].context.startswith("A shop sells 1,200 pens")


@pytest.mark.parametrize("kind,missing", [("math500", "test.jsonl"), ("aime25", "aime2025-I.jsonl"),
                                          ("gsm8k", "test.jsonl")])
def test_missing_local_file_is_named_with_the_task(tmp_path, kind, missing):
    with pytest.raises(ConfigError, match=f"task {kind}: data file {re.escape(str(tmp_path / missing))} not found"):
        task(kind, tmp_path)


def test_missing_second_aime_part_is_named(tmp_path):
    (tmp_path / "aime2025-I.jsonl").write_text((FIXTURES / "aime25" / "aime2025-I.jsonl").read_text())
    with pytest.raises(ConfigError, match="aime2025-II.jsonl not found"):
        task("aime25", tmp_path)


def test_missing_data_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"task gsm8k: data folder .*nowhere does not exist"):
        task("gsm8k", tmp_path / "nowhere")


def test_hub_unreachable_names_the_task_dataset_and_files(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("datasets.load_dataset", offline)
    t = build_task({"name": "aime25", "kind": "aime25", "data_dir": None})
    with pytest.raises(ConfigError, match=r"task aime25: could not load opencompass/AIME2025 \(AIME2025-I\) "
                                          r"from the Hugging Face hub: ConnectionError: no network.*"
                                          r"aime2025-I.jsonl, aime2025-II.jsonl"):
        t.samples(None, MODEL)


@pytest.mark.parametrize("kind,row,calls,expected", [
    ("gsm8k", {"question": "q", "answer": "#### 4"}, [("openai/gsm8k", "main", "test")], [("test-0", "4")]),
    ("aime25", {"question": "q", "answer": 7},
     [("opencompass/AIME2025", "AIME2025-I", "test"), ("opencompass/AIME2025", "AIME2025-II", "test")],
     [("AIME2025-I-1", "7"), ("AIME2025-II-1", "7")]),
    ("math500", {"problem": "p", "solution": "s", "answer": "1", "subject": "Algebra", "level": 3,
                 "unique_id": "test/algebra/9.json"},
     [("HuggingFaceH4/MATH-500", None, "test")], [("test/algebra/9.json", "1")]),
])
def test_hub_rows_are_read_like_local_ones(monkeypatch, kind, row, calls, expected):
    seen = []

    def hub(name, config, split):
        seen.append((name, config, split))
        return [row]

    monkeypatch.setattr("datasets.load_dataset", hub)
    samples = build_task({"name": kind, "kind": kind}).samples(None, MODEL)
    assert seen == calls
    assert [(s.id, s.answers[0]) for s in samples] == expected


def test_malformed_rows_are_named_with_file_and_line(tmp_path):
    rows = [{"question": "q", "answer": "#### 1"}, {"question": "q", "answer": "no marker"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"test.jsonl:2: a GSM8K answer must end in '#### "):
        task("gsm8k", tmp_path).samples(None, MODEL)
    (tmp_path / "test.jsonl").write_text(json.dumps({"problem": "p", "answer": "1", "subject": "s",
                                                     "level": "Level 1", "unique_id": "u"}) + "\n")
    with pytest.raises(ConfigError, match=r"test.jsonl:1: field 'level' has type str"):
        task("math500", tmp_path).samples(None, MODEL)
    (tmp_path / "test.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match=r"test.jsonl:1: malformed JSON line"):
        task("math500", tmp_path).samples(None, MODEL)


# ---------------------------------------------------------------------------------------------
# Prompts, scores, configs
# ---------------------------------------------------------------------------------------------


def test_prompt_of_a_sample():
    (first, *_) = task("gsm8k", max_new_tokens=2048).samples(None, MODEL)
    assert first.context == ("Tom has 3 boxes with 4 apples each. He eats 2 apples. How many apples are left?\n"
                             "Please reason step by step, and put your final answer within \\boxed{}.")
    assert (first.question, first.chat_template, first.max_new_tokens) == ("", True, 2048)
    assert (first.stop_strings, first.stop_tokens, first.min_new_tokens) == ([], [], 0)


class TemplateTokenizer:
    """One token per character and a chat template that wraps the message in <u>...</u><a>."""

    chat_template = "<u>{content}</u><a>"

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        import torch

        return SimpleNamespace(input_ids=torch.tensor([[ord(c) for c in text]], dtype=torch.long))

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        (message,) = messages
        return f"<u>{message['content']}</u><a>"


def decode(ids) -> str:
    return "".join(map(chr, ids[0].tolist())) if ids is not None else ""


@pytest.mark.parametrize("compress,appended", [("whole", ""), ("context", "</u><a>")])
def test_the_runner_templates_the_whole_prompt(compress, appended):
    (sample, *_) = task("aime25", compress=compress).samples(None, MODEL)
    ctx, q = encode(sample, TemplateTokenizer(), MODEL, compress)
    assert decode(ctx) + decode(q) == f"<u>{sample.context}</u><a>"
    assert decode(q) == appended


def test_scores_and_summary():
    t = task("math500")
    records = [record(t, r"so \boxed{\dfrac12}", r"\frac{1}{2}"),
               record(t, r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", new_tokens=30),
               record(t, "the area is 16", "16", stopped_by="max_new_tokens", new_tokens=50)]
    assert [r.scores for r in records] == [{"accuracy": 1.0, "boxed": 1.0}, {"accuracy": 1.0, "boxed": 1.0},
                                              {"accuracy": 0.0, "boxed": 0.0}]  # no box: no fallback
    assert t.summarize(records) == {"accuracy": 66.67, "boxed": 66.67, "truncated": 33.33, "mean_new_tokens": 30.0}
    g = task("gsm8k")
    assert record(g, "so 10 apples are left", "10").scores == {"accuracy": 1.0, "boxed": 0.0}


def test_max_new_tokens_must_be_positive():
    with pytest.raises(ConfigError, match="^gsm8k.max_new_tokens=0: expected an integer >= 1$"):
        task("gsm8k", max_new_tokens=0)


@pytest.mark.parametrize("kind", ["math500", "aime25", "gsm8k"])
def test_hydra_configs(compose, kind):
    cfg = compose([f"task={kind}", "task.max_new_tokens=8192", f"task.data_dir={FIXTURES / kind}"])
    assert cfg["task"] == {"name": kind, "kind": kind, "data_dir": str(FIXTURES / kind),
                           "max_new_tokens": 8192, "compress": "whole"}
    t = build_task(cfg["task"])
    assert (t.name, t.kind, t.params.max_new_tokens) == (kind, kind, 8192)
    assert compose([f"task={kind}"])["task"]["data_dir"] is None  # the hub by default


def test_local_data_is_identified_by_content_not_location():
    t = task("aime25")
    assert "data_dir" not in t.describe()["params"]
    digest = hashlib.sha256((FIXTURES / "aime25" / "aime2025-II.jsonl").read_bytes()).hexdigest()
    assert t.data_fingerprint()["sha256"]["aime2025-II.jsonl"] == digest
    assert set(t.data_fingerprint()["sha256"]) == {"aime2025-I.jsonl", "aime2025-II.jsonl"}
    assert build_task({"name": "aime25", "kind": "aime25"}).data_fingerprint() is None
