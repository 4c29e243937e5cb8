"""Official LongBench metrics and aggregation on hand-made cases.

Every expected value is worked out by hand from the official definitions (LongBench/metrics.py,
LongBench/eval.py); the arithmetic is in the comment next to each case.
"""

from __future__ import annotations

import difflib
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import jieba
import pytest

from kvbench.scoring import longbench as lb

REPO_ROOT = Path(__file__).resolve().parents[2]

# rouge's ROUGE-L F is 2PR / (P + R + 1e-8): hand values are exact fractions, so allow ~1e-7.
ROUGE_TOL = 1e-7


# ---------------------------------------------------------------------------------------------
# normalization and qa_f1
# ---------------------------------------------------------------------------------------------


def test_normalize_answer():
    # lower -> "an apple, a day." ; drop punctuation -> "an apple a day" ;
    # articles -> " apple   day" ; collapse -> "apple day"
    assert lb.normalize_answer("An apple, a day.") == "apple day"
    # punctuation goes before articles: "state-of-the-art" -> "stateoftheart" (no word "the")
    assert lb.normalize_answer("State-of-the-Art") == "stateoftheart"


def test_qa_f1_articles_and_punctuation():
    # pred -> "eiffel tower in paris" (4 tokens), gold -> "eiffel tower" (2 tokens)
    # common 2: P = 2/4, R = 2/2, F1 = 2*(1/2)*1 / (3/2) = 2/3
    assert lb.qa_f1("The Eiffel Tower, in Paris!", "Eiffel Tower") == pytest.approx(2 / 3)
    # "the" inside a hyphenated word survives as part of one token: ["stateoftheart"] vs
    # ["state", "of", "art"] -> no common token -> 0
    assert lb.qa_f1("state-of-the-art", "state of the art") == 0.0


def test_qa_f1_multiset_and_empty():
    # Counter overlap: pred {paris: 2}, gold {paris: 1} -> common 1; P = 1/2, R = 1 -> F1 = 2/3
    assert lb.qa_f1("Paris paris", "Paris") == pytest.approx(2 / 3)
    # empty prediction: no overlap -> 0
    assert lb.qa_f1("", "Paris") == 0.0
    # only articles/punctuation: normalizes to "" -> 0
    assert lb.qa_f1("The.", "the") == 0.0


# ---------------------------------------------------------------------------------------------
# qa_f1_zh
# ---------------------------------------------------------------------------------------------


def test_normalize_zh_answer():
    # lower: "《北京》 abc，" ; "》" and "，" are in the official list but "《" is not (quirk);
    # whitespace removed entirely -> "《北京abc"
    assert lb.normalize_zh_answer("《北京》 ABC，") == "《北京abc"


def test_qa_f1_zh_chinese_punctuation():
    # jieba precise mode (checked here so the hand computation rests on a known segmentation)
    assert list(jieba.cut("我爱北京！", cut_all=False)) == ["我", "爱", "北京", "！"]
    assert list(jieba.cut("北京。", cut_all=False)) == ["北京", "。"]
    # "！" normalizes to "" and is dropped: pred [我, 爱, 北京], gold [北京]
    # common 1: P = 1/3, R = 1 -> F1 = 2*(1/3) / (4/3) = 1/2
    assert lb.qa_f1_zh("我爱北京！", "北京") == pytest.approx(0.5)
    # "。" dropped: [北京] vs [北京] -> 1 (it would be 2/3 if "。" counted as a token)
    assert lb.qa_f1_zh("北京。", "北京") == pytest.approx(1.0)
    assert lb.qa_f1_zh("", "北京") == 0.0


# ---------------------------------------------------------------------------------------------
# rouge / rouge_zh (PyPI rouge 1.0.1)
# ---------------------------------------------------------------------------------------------


def test_rouge_empty_prediction_is_zero():
    # the library raises "Hypothesis is empty" style errors; the official code returns 0.0
    assert lb.rouge("", "the cat sat") == 0.0
    # "..." splits on "." into no sentence at all -> also an exception -> 0.0
    assert lb.rouge("...", "the cat sat") == 0.0


def test_rouge_lcs_by_hand():
    # gold words {the, quick, brown, fox, jumps} m = 5; pred {the, brown, fox, runs} n = 4
    # LCS(gold, pred) = "the brown fox" = 3 -> R = 3/5, P = 3/4
    # F = 2*P*R / (P+R) = 2*(9/20) / (27/20) = 2/3   (the library adds 1e-8 to the denominator)
    assert lb.rouge("the brown fox runs", "the quick brown fox jumps") == pytest.approx(
        2 / 3, abs=ROUGE_TOL
    )


def test_rouge_is_case_sensitive():
    # "The" != "the": LCS = "brown fox" = 2; P = 2/4, R = 2/5 -> F = 2*(1/5) / (9/10) = 4/9
    assert lb.rouge("The brown fox runs", "the quick brown fox jumps") == pytest.approx(
        4 / 9, abs=ROUGE_TOL
    )


def test_rouge_summary_level_union_lcs():
    # pred splits on "." into sentences "a b x" and "c e y"; gold is one sentence "a b c d e".
    # LCS(gold, "a b x") = {a, b}, LCS(gold, "c e y") = {c, e}; union = {a, b, c, e} = 4
    # m = 5 gold words, n = 6 distinct pred words -> R = 4/5, P = 4/6
    # F = 2*(4/5)(2/3) / (4/5 + 2/3) = (16/15) / (22/15) = 8/11
    assert lb.rouge("a b x. c e y", "a b c d e") == pytest.approx(8 / 11, abs=ROUGE_TOL)


def test_rouge_counts_word_sets():
    # exclusive=True: m = |{a, b}| = 2 (not 3 tokens), n = 2, LCS words {a, b} = 2
    # R = P = 1 -> F = 2/(2 + 1e-8) ~ 1
    assert lb.rouge("a b", "a a b") == pytest.approx(1.0, abs=ROUGE_TOL)


def test_rouge_recursion_error_scores_zero():
    # the recursive LCS reconstruction needs one Python frame per LCS word; 1100 matching words
    # exceed the default recursion limit (1000) -> RecursionError -> 0.0 as in the official code
    text = " ".join(f"w{i}" for i in range(1100))
    assert lb.rouge(text, text) == 0.0


def test_rouge_zh():
    assert list(jieba.cut("我爱北京", cut_all=False)) == ["我", "爱", "北京"]
    assert list(jieba.cut("我爱上海", cut_all=False)) == ["我", "爱", "上海"]
    # "我 爱 北京" vs "我 爱 上海": m = n = 3, LCS = "我 爱" = 2 -> P = R = 2/3 -> F = 2/3
    assert lb.rouge_zh("我爱北京", "我爱上海") == pytest.approx(2 / 3, abs=ROUGE_TOL)
    # without segmentation each string is one "word" and they differ -> LCS 0 -> F = 0
    assert lb.rouge("我爱北京", "我爱上海") == 0.0


def test_rouge_score_l_is_a_different_metric():
    # Google rouge-score: lowercases, token lists; LCS = 3, P = 3/4, R = 3/5 -> F = 2/3 exactly
    score = lb.rouge_score_l("the brown fox runs", "the quick brown fox jumps")
    assert score == pytest.approx(2 / 3)
    # lowercasing: [the, brown, fox] both -> 1.0, where the LongBench rouge gives
    # LCS {fox} = 1, P = R = 1/3 -> F = 1/3
    assert lb.rouge_score_l("The Brown fox", "the brown fox") == pytest.approx(1.0)
    assert lb.rouge("The Brown fox", "the brown fox") == pytest.approx(1 / 3, abs=ROUGE_TOL)


# ---------------------------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------------------------


def test_classification_remove_while_iterating_quirk():
    classes = ["Other", "location", "Other location"]
    # matches (classes found in the pred, in class order): [Other, location, Other location]
    # loop index 0: "Other" is in the gold and != gold -> removed -> [location, Other location]
    # loop index 1: "Other location" == gold -> kept; "location" slid to index 0 and is never
    # examined, so it stays. Gold is among 2 matches -> 1/2 (a clean loop would give 1/1).
    assert lb.classification("Other location", "Other location", all_classes=classes) == 0.5


def test_classification_removal_without_skip():
    classes = ["Other", "Date", "Other location"]
    # matches [Other, Other location]; "Other" removed -> [Other location]; loop ends -> 1/1
    assert lb.classification("Other location", "Other location", all_classes=classes) == 1.0


def test_classification_plain_cases():
    classes = ["City", "Country", "Date"]
    # matches [City, Country]; neither is a proper substring of "City" -> gold among 2 -> 1/2
    assert lb.classification("City or Country", "City", all_classes=classes) == 0.5
    # matches [Date]; gold "City" not among them -> 0
    assert lb.classification("Date", "City", all_classes=classes) == 0.0
    # nothing matches -> 0
    assert lb.classification("no idea", "City", all_classes=classes) == 0.0
    with pytest.raises(ValueError, match="all_classes"):
        lb.classification("City", "City")


# ---------------------------------------------------------------------------------------------
# retrieval / retrieval_zh / count
# ---------------------------------------------------------------------------------------------


def test_retrieval_several_numbers():
    # gold id "3"; numbers in pred ["3", "13", "3"]; "13" != "3" (whole runs of digits)
    # -> 2 right out of 3 = 2/3
    pred = "Paragraph 3, not Paragraph 13; I repeat: 3"
    assert lb.retrieval(pred, "Paragraph 3") == pytest.approx(2 / 3)
    # no number in the prediction -> 0
    assert lb.retrieval("I do not know", "Paragraph 3") == 0.0
    with pytest.raises(ValueError, match="paragraph id"):
        lb.retrieval("3", "3")


def test_retrieval_zh():
    # gold id "5"; numbers ["5", "15"] -> 1/2
    assert lb.retrieval_zh("段落5和段落15", "段落5") == pytest.approx(0.5)


def test_count():
    # numbers ["7", "30"]; one equals "7" -> 1/2
    assert lb.count("There are 7 unique paragraphs among 30.", "7") == pytest.approx(0.5)
    # string comparison: "07" != "7" -> 0
    assert lb.count("07", "7") == 0.0
    assert lb.count("seven", "7") == 0.0


# ---------------------------------------------------------------------------------------------
# code_sim (fuzzywuzzy ratio, difflib backend: ratio = 2*M/T, int(round(100*ratio)))
# ---------------------------------------------------------------------------------------------


def test_code_sim_skips_commented_first_line():
    # lines: "// set x" (has "//", skipped), "x = 1;" (kept)
    # "x = 1;" vs "x = 2;": matching blocks "x = " (4) + ";" (1) -> M = 5, T = 6 + 6 = 12
    # ratio = 10/12 = 0.8333 -> round(83.33) = 83 -> 0.83
    assert lb.code_sim("// set x\nx = 1;", "x = 2;") == 0.83
    # leading "\n" stripped, then "```python" and "# comment" skipped; "foo()" == gold -> 1.0
    assert lb.code_sim("\n```python\n# comment\nfoo()\n```", "foo()") == 1.0
    # every line has "`", "#" or "//" -> "" -> fuzz.ratio with an empty string is 0
    assert lb.code_sim("# a\n// b\n```", "foo()") == 0.0


def test_code_sim_rounding_and_no_strip():
    # "abcde123" vs "abcde456": M = 5, T = 16 -> ratio 10/16 = 0.625 -> 62.5;
    # fuzzywuzzy rounds with Python's round (half to even) -> 62 -> 0.62
    assert lb.code_sim("abcde123", "abcde456") == 0.62
    # indentation is not stripped: "  x = 1;" vs "x = 1;": M = 6, T = 8 + 6 = 14
    # ratio = 12/14 = 0.857 -> 86 -> 0.86
    assert lb.code_sim("  x = 1;", "x = 1;") == 0.86


def test_code_sim_ratio_matches_fuzzywuzzy_difflib_backend():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fuzz warns that it uses the pure-python backend
        from fuzzywuzzy import fuzz
    if fuzz.SequenceMatcher is not difflib.SequenceMatcher:
        pytest.skip("python-Levenshtein is installed: fuzzywuzzy uses another backend")
    pairs = [("x = 1;", "x = 2;"), ("abcde123", "abcde456"), ("", "a"), ("same", "same"),
             ("    return self.x", "return self.y")]
    for a, b in pairs:
        assert lb.code_sim(a, b) == fuzz.ratio(a, b) / 100


# ---------------------------------------------------------------------------------------------
# task table
# ---------------------------------------------------------------------------------------------


def test_task_table():
    assert len(lb.TASKS) == 21
    assert len(lb.E_TASKS) == 13
    assert lb.FIRST_LINE_TASKS == {"trec", "triviaqa", "samsum", "lsht"}
    raw = {name for name, spec in lb.TASKS.items() if not spec["chat_template"]}
    assert raw == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
    assert {spec["metric"] for spec in lb.TASKS.values()} == set(lb.METRICS)
    assert lb.TASKS["gov_report"]["max_new_tokens"] == 512
    assert lb.TASKS["2wikimqa"]["category"] == "multi-doc QA"
    assert lb.base_task("repobench-p_e") == "repobench-p"
    with pytest.raises(KeyError, match="narrativeqa_e"):
        lb.base_task("narrativeqa_e")  # there is no LongBench-E narrativeqa


# ---------------------------------------------------------------------------------------------
# score_sample: first-line rule and max over gold answers
# ---------------------------------------------------------------------------------------------


def test_first_line_rule_for_few_shot_tasks():
    classes = ["Date", "Location"]
    pred = "\n\nDate\nLocation"
    # trec: lstrip("\n") then first line -> "Date" -> matches [Date] -> 1
    assert lb.score_sample("trec", pred, ["Date"], all_classes=classes) == 1.0
    assert lb.score_sample("trec_e", pred, ["Date"], all_classes=classes) == 1.0
    # the same text without the rule would match [Date, Location] -> 1/2
    assert lb.classification(pred, "Date", all_classes=classes) == 0.5
    # triviaqa: first line "Paris" -> F1 1; hotpotqa (no rule): [paris, london] vs [paris]
    # -> P = 1/2, R = 1 -> 2/3
    assert lb.score_sample("triviaqa", "Paris\nLondon", ["Paris"]) == 1.0
    assert lb.score_sample("hotpotqa", "Paris\nLondon", ["Paris"]) == pytest.approx(2 / 3)
    # only "\n" is stripped: " \nParis" -> first line " " -> normalizes to "" -> 0
    assert lb.score_sample("triviaqa", " \nParis", ["Paris"]) == 0.0


def test_max_over_gold_answers():
    # "Paris" vs "London" = 0, vs "Paris" = 1 -> max(0, 0, 1) = 1
    assert lb.score_sample("hotpotqa", "Paris", ["London", "Paris"]) == 1.0
    # "the Eiffel Tower" -> [eiffel, tower]: vs [eiffel, tower] = 1; vs [tower] = 2/3 -> 1
    assert lb.score_sample("hotpotqa", "the Eiffel Tower", ["tower", "Eiffel Tower"]) == 1.0
    # the running max starts at 0: no gold answers -> 0
    assert lb.score_sample("hotpotqa", "Paris", []) == 0.0
    with pytest.raises(KeyError, match="valid tasks"):
        lb.score_sample("nope", "Paris", ["Paris"])


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------


def test_task_score_round_100_mean():
    # (1 + 0.5 + 0) / 3 = 0.5 -> 50.0
    assert lb.task_score([1.0, 0.5, 0.0]) == 50.0
    # (2/3 + 1) / 2 = 5/6 -> 83.333... -> 83.33
    assert lb.task_score([2 / 3, 1.0]) == 83.33
    # 1/3 -> 33.333... -> 33.33
    assert lb.task_score([1 / 3]) == 33.33
    with pytest.raises(ValueError):
        lb.task_score([])


def test_task_score_e_buckets():
    lengths = [100, 3999, 4000, 7999, 8000, 20000]
    scores = [1.0, 0.0, 1.0, 0.5, 0.0, 0.25]
    # <4000: [1, 0] -> 50.0 ; <8000: [1, 0.5] -> 75.0 ; else: [0, 0.25] -> 12.5
    assert lb.task_score_e(scores, lengths) == {"0-4k": 50.0, "4-8k": 75.0, "8k+": 12.5}


def test_task_score_e_empty_bucket_is_nan():
    # eval.py: round(100 * np.mean([]), 2) = nan, written as NaN in result.json
    result = lb.task_score_e([1.0], [10])
    assert result["0-4k"] == 100.0
    assert math.isnan(result["4-8k"]) and math.isnan(result["8k+"])
    with pytest.raises(ValueError):
        lb.task_score_e([1.0], [])


def test_task_score_e_uses_numpy_rounding():
    # 100 * 0.02675 is the double just below 2.675: Python's round (correct rounding) gives 2.67,
    # numpy's round (scale by 100, rint half to even: 267.5 -> 268) gives 2.68. eval.py uses the
    # former for the task score and the latter for LongBench-E buckets.
    assert lb.task_score([0.02675]) == 2.67
    assert lb.task_score_e([0.02675], [10])["0-4k"] == 2.68


def test_summarize():
    records = [
        # hotpotqa_e: scores 1 (length 1000 -> 0-4k) and 0 (length 5000 -> 4-8k)
        {"task": "hotpotqa_e", "pred": "Paris", "answers": ["Paris"], "length": 1000},
        {"task": "hotpotqa_e", "pred": "London", "answers": ["Paris"], "length": 5000},
        # trec: first line "City" -> matches [City] -> 1; no length -> no buckets
        {"task": "trec", "pred": "City\nDate", "answers": ["City"],
         "all_classes": ["City", "Date"]},
    ]
    summary = lb.summarize(records)
    assert set(summary) == {"hotpotqa_e", "trec"}
    hot = summary["hotpotqa_e"]
    assert hot["score"] == 50.0 and hot["n"] == 2  # (1 + 0) / 2
    assert hot["score_e"]["0-4k"] == 100.0 and hot["score_e"]["4-8k"] == 0.0
    assert math.isnan(hot["score_e"]["8k+"])
    assert summary["trec"] == {"score": 100.0, "score_e": None, "n": 1}


def test_category_and_overall_means():
    scores = {"hotpotqa": 50.0, "2wikimqa": 30.0, "trec": 70.0}
    # multi-doc QA: (50 + 30) / 2 = 40 ; few-shot: 70
    categories = lb.category_means(scores)
    assert categories == {"multi-doc QA": 40.0, "few-shot": 70.0}
    # (40 + 70) / 2 = 55
    assert lb.overall_mean(categories) == 55.0
    assert lb.category_means({"hotpotqa_e": 10.0}) == {"multi-doc QA": 10.0}
    with pytest.raises(ValueError):
        lb.category_means({"hotpotqa": 1.0, "hotpotqa_e": 2.0})


# ---------------------------------------------------------------------------------------------
# CLI: python -m kvbench.score
# ---------------------------------------------------------------------------------------------


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvbench.score", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )


def _write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
        encoding="utf-8",
    )
    return path


CLI_RECORDS = [
    # "Paris" vs ["Paris"] -> 1 ; length 100 -> 0-4k
    {"task": "hotpotqa", "pred": "Paris", "answers": ["Paris"], "length": 100},
    # "The city of London" -> [city, of, london]: vs [paris] 0, vs [london] P = 1/3, R = 1
    # -> F1 = 2*(1/3) / (4/3) = 1/2 ; length 5000 -> 4-8k
    {"task": "hotpotqa", "pred": "The city of London", "answers": ["Paris", "London"],
     "length": 5000},
    # trec, first line "Date" -> 1 ; no length
    {"task": "trec", "pred": "Date\nCity", "answers": ["Date"], "all_classes": ["Date", "City"]},
]
# hotpotqa: (1 + 0.5) / 2 -> 75.0 ; buckets 100.0, 50.0, empty -> NaN
CLI_EXPECTED = {
    "hotpotqa": {"score": 75.0, "score_e": {"0-4k": 100.0, "4-8k": 50.0, "8k+": math.nan}, "n": 2},
    "trec": {"score": 100.0, "score_e": None, "n": 1},
}


def test_cli_file(tmp_path):
    path = _write_jsonl(tmp_path / "preds.jsonl", CLI_RECORDS)
    proc = _run_cli(str(path))
    assert proc.returncode == 0, proc.stderr
    # sorted keys, indent 2; NaN printed as in the official result.json
    assert proc.stdout == json.dumps(CLI_EXPECTED, sort_keys=True, indent=2) + "\n"


def test_cli_results_directory_reads_samples_jsonl(tmp_path):
    _write_jsonl(tmp_path / "run" / "hotpotqa" / "samples.jsonl", CLI_RECORDS[:2])
    _write_jsonl(tmp_path / "run" / "trec" / "samples.jsonl", CLI_RECORDS[2:])
    # another JSONL in a results directory is not a prediction file: it is ignored
    _write_jsonl(tmp_path / "run" / "other.jsonl", ["not json at all"])
    proc = _run_cli(str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == json.dumps(CLI_EXPECTED, sort_keys=True, indent=2) + "\n"


def test_cli_plain_directory_reads_every_jsonl(tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", CLI_RECORDS[:1])
    _write_jsonl(tmp_path / "sub" / "b.jsonl", CLI_RECORDS[1:])
    proc = _run_cli(str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["hotpotqa"]["score"] == 75.0


def test_cli_malformed_line_names_file_and_line(tmp_path):
    # line 1 valid, line 2 blank (skipped but counted), line 3 malformed
    path = _write_jsonl(tmp_path / "bad.jsonl", [CLI_RECORDS[0], "", '{"task": "hotpotqa", '])
    proc = _run_cli(str(path))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert f"{path}:3: malformed JSON" in proc.stderr


def test_cli_missing_field_and_unknown_task(tmp_path):
    path = _write_jsonl(tmp_path / "missing.jsonl", [{"task": "hotpotqa", "pred": "x"}])
    proc = _run_cli(str(path))
    assert proc.returncode == 1
    assert f"{path}:1: missing required field 'answers'" in proc.stderr

    path = _write_jsonl(tmp_path / "unknown.jsonl",
                        [CLI_RECORDS[0], {"task": "hotpot", "pred": "x", "answers": ["x"]}])
    proc = _run_cli(str(path))
    assert proc.returncode == 1
    assert f"{path}:2: unknown LongBench task 'hotpot'" in proc.stderr
    assert "hotpotqa" in proc.stderr and "repobench-p_e" in proc.stderr


def test_cli_metric_preconditions_name_the_line(tmp_path):
    # trec without all_classes, and a retrieval gold answer without "Paragraph N"
    path = _write_jsonl(tmp_path / "trec.jsonl", [{"task": "trec", "pred": "x", "answers": ["x"]}])
    proc = _run_cli(str(path))
    assert proc.returncode == 1
    assert f"{path}:1: task 'trec' needs field 'all_classes'" in proc.stderr

    path = _write_jsonl(tmp_path / "ret.jsonl",
                        [{"task": "passage_retrieval_en", "pred": "1", "answers": ["1"]}])
    proc = _run_cli(str(path))
    assert proc.returncode == 1
    assert f"{path}:1: gold answer '1' has no paragraph id" in proc.stderr
