"""LongBench v2: answer extraction on the official edge cases, result.py's accuracies, prompts and
truncation as pred.py builds them, data loading from a fixture in the official format, the scoring
CLI and the config.

A character tokenizer (one id per character, BOS first) makes token counts and truncation exact by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import sample_record
from kvbench.score import main as score_main
from kvbench.scoring.longbench_v2 import accuracies, extract_answer, judge
from kvbench.tasks import build_task
from kvbench.tasks.longbench_v2 import DataError, load_questions

DATA = Path(__file__).resolve().parents[1] / "fixtures" / "longbench_v2"
MODEL = SimpleNamespace(max_prompt_tokens=100_000, chat_template=True)


class CharTokenizer:
    """id = code point + 2; BOS (id 1) first with special tokens."""

    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=([1] if add_special_tokens else []) + [ord(c) + 2 for c in text])

    def decode(self, ids, skip_special_tokens=False):
        return "".join("<s>" if i == 1 else chr(i - 2) for i in ids if not (skip_special_tokens and i == 1))


TOK = CharTokenizer()


def task(**over):
    return build_task({"name": "longbench_v2", "kind": "longbench_v2", "data_dir": str(DATA), **over})


@pytest.mark.parametrize("response, letter", [
    ("The correct answer is (B)", "B"),
    ("**The correct answer is (B)**", "B"),          # asterisks are removed first
    ("The correct answer is **(C)**.", "C"),
    ("The correct answer is D.", "D"),               # the fallback without parentheses
    ("The correct answer is Because ...", "B"),      # the fallback reads a word's first letter
    ("The correct answer is (E)", None),             # only A-D
    ("the correct answer is (A)", None),             # case-sensitive
    ("The correct answer is: (A)", None),
    ("The correct answer is  (A)", None),            # two spaces
    ("The correct answer is (insert answer here)", None),
    ("(A) is right. The correct answer is (C). The correct answer is (A)", "C"),  # the first occurrence
    ("The correct answer is A, not (B). The correct answer is (B)", "B"),  # the parenthesised form first
    ("", None),
])
def test_extract_answer_official_edge_cases(response, letter):
    assert extract_answer(response) == letter
    assert judge(response, "B") == float(letter == "B")


def test_accuracies_by_difficulty_and_length():
    judged = [(1.0, "easy", "short"), (0.0, "hard", "short"), (1.0, "hard", "medium"), (0.0, "hard", "long"),
              (1.0, "easy", "long"), (1.0, "other", "other")]
    # overall 4/6; easy 2/2; hard (not easy) 2/4; short 1/2; medium 1/1; long (neither) 2/3
    assert accuracies(judged) == {"accuracy": 66.7, "easy": 100.0, "hard": 50.0, "short": 50.0,
                                  "medium": 100.0, "long": 66.7}
    assert accuracies([(1.0, "easy", "short"), (0.0, "easy", "short"), (0.0, "easy", "short")]) == {
        "accuracy": 33.3, "easy": 33.3, "short": 33.3}  # empty groups left out


def test_prompt_is_the_official_template_with_stripped_fields():
    samples = task().samples(TOK, MODEL)
    assert [s.id for s in samples] == [q["_id"] for q in json.loads((DATA / "data.json").read_text())]
    s = samples[0]
    assert s.context == (
        "Please read the following text and answer the question below.\n\n<text>\n"
        "Annual report of a small trading company.\n\nThe company rents one warehouse, in Rotterdam, close to "
        "the port. Its offices are in Lyon and Porto, and a sales agent works from Gdansk.\n</text>\n\n"
        "What is the correct answer to this question: Which city hosts the company's only warehouse?\n"
        "Choices:\n(A) Lyon\n(B) Rotterdam\n(C) Porto\n(D) Gdansk\n\n"
        "Format your response as follows: \"The correct answer is (insert answer here)\".")
    assert s.question == "" and s.answers == ["B"] and s.max_new_tokens == 128 and s.chat_template
    assert s.meta == {"difficulty": "easy", "length": "short", "domain": "Single-Document QA",
                      "sub_domain": "Financial", "truncated": False}
    # pred.py replaces $Q$ after inserting the document, so a "$Q$" in a document becomes the question
    assert "The template placeholder What does the function `scale` return" in samples[2].context


def test_middle_truncation_keeps_floor_halves():
    full = task().samples(TOK, MODEL)[1].context
    (s,) = [x for x in task(max_prompt_tokens=101).samples(TOK, MODEL) if x.id == "66ebed525a08c7b9b35e1cb4"]
    # ids = BOS + characters: the first 101 // 2 = 50 ids (BOS + 49 characters) and the last
    # -101 // 2 = -51, i.e. 51 ids, decoded with the BOS skipped
    assert s.context == full[:49] + full[-51:] and s.meta["truncated"]
    model = SimpleNamespace(max_prompt_tokens=100)  # null max_prompt_tokens: the model's
    assert task().samples(TOK, model)[1].context == full[:49] + full[-50:]


def test_context_mode_appends_the_question_part():
    whole, split = task().samples(TOK, MODEL), task(compress="context").samples(TOK, MODEL)
    for w, c in zip(whole, split):
        assert c.context + c.question == w.context
        assert c.question.startswith("What is the correct answer to this question:") and c.context.endswith("</text>\n\n")


def test_limit_is_a_seeded_subset_in_dataset_order():
    ids = [s.id for s in task().samples(TOK, MODEL)]
    two = [s.id for s in task(limit=2, seed=1).samples(TOK, MODEL)]
    assert len(two) == 2 and two == [i for i in ids if i in two]
    assert two == [s.id for s in task(limit=2, seed=1).samples(TOK, MODEL)]


def test_data_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(DataError, match="data.json not found"):
        task(data_dir=str(tmp_path))
    rows = json.loads((DATA / "data.json").read_text())
    (tmp_path / "data.json").write_text(json.dumps([{**rows[0], "answer": "E"}]))
    with pytest.raises(DataError, match="question 0: field 'answer' must be one of"):
        task(data_dir=str(tmp_path)).check_data()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data.json").write_text(json.dumps([{k: v for k, v in rows[0].items() if k != "difficulty"}]))
    with pytest.raises(DataError, match="missing field 'difficulty'"):
        load_questions(str(bad))
    twice = tmp_path / "twice"
    twice.mkdir()
    (twice / "data.json").write_text(json.dumps([rows[0], rows[0]]))
    with pytest.raises(DataError, match="question 1: duplicate sample id"):
        load_questions(str(twice))


def test_task_scores_records_and_summarizes():
    t = task()
    records = []
    for i, (pred, difficulty, length) in enumerate([("The correct answer is (A)", "easy", "short"),
                                                    ("The correct answer is (B)", "hard", "long")]):
        r = sample_record(str(i), pred=pred, answers=["A"], meta={"difficulty": difficulty, "length": length})
        r.scores = t.score(r)
        records.append(r)
    assert [r.scores for r in records] == [{"accuracy": 1.0}, {"accuracy": 0.0}]
    assert t.summarize(records) == {"accuracy": 50.0, "easy": 100.0, "hard": 0.0, "short": 100.0, "long": 0.0}


def test_score_cli_reads_plain_and_kvbench_records(tmp_path, capsys):
    path = tmp_path / "preds.jsonl"
    lines = [{"task": "longbench_v2", "pred": "The correct answer is (C)", "answers": ["C"],
              "difficulty": "easy", "length": "medium"},
             {"task": "longbench_v2", "pred": "I think (C).", "answers": ["C"],
              "meta": {"difficulty": "hard", "length": "medium"}},
             {"task": "ruler/vt", "pred": "AAAAA", "answers": ["AAAAA"]}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert score_main([str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["longbench_v2"] == {"accuracy": 50.0, "easy": 100.0, "hard": 0.0, "medium": 50.0, "n": 2}
    assert out["ruler/vt"]["score"] == 100.0
    path.write_text(json.dumps({"task": "longbench_v2", "pred": "x", "answers": ["C"], "length": "short"}) + "\n")
    assert score_main([str(path)]) == 1
    assert "preds.jsonl:1: task 'longbench_v2' needs a string field 'difficulty'" in capsys.readouterr().err


def test_hydra_config(compose):
    t = build_task(compose(["task=longbench_v2", f"data_dir={DATA}"])["task"])
    assert t.params.data_dir == str(DATA) and t.params.max_prompt_tokens is None and t.params.compress == "whole"


def test_report_table_has_the_official_columns():
    from kvbench.tasks import ReportRun
    from kvbench.tasks.longbench_v2 import LongBenchV2

    runs = [ReportRun("full", "1x", "longbench_v2", {"accuracy": 40.0, "easy": 50.0, "hard": 33.3, "short": 40.0}),
            ReportRun("lagkv", "4x", "longbench_v2", {"accuracy": 20.0, "easy": 0.0, "hard": 33.3, "short": 20.0})]
    ((title, table),) = LongBenchV2.tables(runs).items()
    assert title == "LongBench v2"
    assert table.header == ["method", "setting", "Overall", "Easy", "Hard", "Short", "Medium", "Long"]
    assert table.rows == [["full", "1x", "40.0", "50.0", "33.3", "40.0", "n/a", "n/a"],
                          ["lagkv", "4x", "20.0", "0.0", "33.3", "20.0", "n/a", "n/a"]]


def test_data_file_is_fingerprinted():
    assert list(task().data_fingerprint()["sha256"]) == ["data.json"]
    assert build_task({"name": "longbench_v2", "kind": "longbench_v2"}).data_fingerprint() is None


def test_questions_about_one_document_form_one_cluster(tmp_path):
    questions = json.loads((DATA / "data.json").read_text())
    (tmp_path / "data.json").write_text(json.dumps([*questions, {**questions[0], "_id": "again", "question": "Why?"}]))
    clusters = [s.cluster for s in task(data_dir=str(tmp_path)).samples(TOK, MODEL)]
    # the fixture's documents are all different: one cluster each, and the added question joins the first's
    assert len(set(clusters[:-1])) == len(questions) and clusters[-1] == clusters[0]
