"""RULER: scorers against RULER's definitions, generated prompts (template, needles, answers,
length), data loading from fixtures in the official formats, kvpress's set, configs and scoring CLI.

Most tests count tokens with a small regex tokenizer (words and punctuation marks), so they run in
seconds; one test checks the lengths in the embedded model's own tokenizer.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import sample_record
from kvbench.errors import ConfigError
from kvbench.scoring import ruler as rs
from kvbench.tasks import build_task
from kvbench.tasks import ruler as rt

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "ruler"
DATA = FIXTURES / "data"
KVPRESS = FIXTURES / "kvpress"
OFFLINE = ["niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "fwe"]
ESSAY = ["niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery"]
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


class RegexTokenizer:
    """Words and punctuation marks are tokens; id 1 is the BOS, added with special tokens."""

    bos_token, bos_token_id = "<s>", 1
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        ids = [2 + len(t) for t in re.findall(r"\w+|[^\w\s]", text)]
        return SimpleNamespace(input_ids=([1] if add_special_tokens else []) + ids)


class ChatTokenizer(RegexTokenizer):
    """A chat template that writes its own BOS, as Llama 3's and Gemma's do."""

    chat_template = "user/assistant"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return f"<s><user>{messages[0]['content']}</user><assistant>"


TOK = RegexTokenizer()


def task(name, **over):
    values = {"name": rs.PREFIX + name, "kind": "ruler", "tasks": [name], "lengths": [1024],
              "samples_per_length": 2, "data_dir": str(DATA), **over}
    return build_task(values)


def samples(name, tokenizer=TOK, model_cfg=None, **over):
    return task(name, **over).samples(tokenizer, model_cfg)


# ---------------------------------------------------------------------------------------------
# Scorers: RULER's eval/synthetic/constants.py and evaluate.py
# ---------------------------------------------------------------------------------------------


def ruler_postprocess(pred):
    return re.sub(r"[\x00-\x1f]", "\n", pred.strip()).strip()


def ruler_match_all(preds, refs):  # RULER's definition, written out
    preds = [ruler_postprocess(p) for p in preds]
    total = sum(sum(1.0 if r.lower() in p.lower() else 0.0 for r in ref) / len(ref) for p, ref in zip(preds, refs))
    return round(total / len(preds) * 100, 2)


def ruler_match_part(preds, refs):
    preds = [ruler_postprocess(p) for p in preds]
    total = sum(max(1.0 if r.lower() in p.lower() else 0.0 for r in ref) for p, ref in zip(preds, refs))
    return round(total / len(preds) * 100, 2)


def test_scorers_on_hand_made_cases():
    pred = "The numbers are 4821937 and ABC-def.\x07"
    assert rs.string_match_all([pred], [["4821937", "abc-DEF", "999"]]) == 66.67
    assert rs.string_match_part([pred], [["4821937", "abc-DEF", "999"]]) == 100.0
    assert rs.string_match_part([pred], [["999"]]) == 0.0
    # two samples: 1/3 and 1 -> (1/3 + 1) / 2 = 66.67; part: (1 + 1) / 2
    preds, refs = ["x 1", "2 3"], [["1", "4", "5"], ["2", "3"]]
    assert rs.string_match_all(preds, refs) == 66.67
    assert rs.string_match_part(preds, refs) == 100.0
    assert rs.match_all("\n  Answer: 12\t34  ", ["12\n34"]) == 1.0  # control characters become newlines
    assert rs.metric_of("qa_2") == "string_match_part" and rs.metric_of("vt") == "string_match_all"


def test_scorers_equal_ruler_on_random_cases():
    rng = random.Random(0)
    alphabet = "abAB12 \n\t."
    for _ in range(300):
        n = rng.randint(1, 6)
        preds = ["".join(rng.choices(alphabet, k=rng.randint(0, 12))) for _ in range(n)]
        refs = [["".join(rng.choices(alphabet[:6], k=rng.randint(1, 3))) for _ in range(rng.randint(1, 4))]
                for _ in range(n)]
        assert rs.string_match_all(preds, refs) == ruler_match_all(preds, refs)
        assert rs.string_match_part(preds, refs) == ruler_match_part(preds, refs)


def test_task_scores_each_record_and_summarizes_per_length():
    sub = task("vt")
    records = [sample_record(str(i), pred=p, answers=["AAAAA", "BBBBB"], meta={"length": n})
               for i, (p, n) in enumerate([("AAAAA BBBBB", 1024), ("aaaaa", 1024), ("", 2048)])]
    for r in records:
        r.scores = sub.score(r)
    assert [r.scores["score"] for r in records] == [1.0, 0.5, 0.0]
    assert sub.summarize(records) == {"score": 50.0, "lengths": {"1024": 75.0, "2048": 0.0}}
    qa = task("qa_1")
    assert qa.score(sample_record("q", pred="Vesna", answers=["vesna", "the Vesna"])) == {"score": 1.0}


def test_effective_length_as_ruler_reads_its_table():
    lengths = [4096, 8192, 16384, 32768, 65536, 131072]

    def effective(scores):
        return rs.effective_length(dict(zip(lengths, scores)))

    # rows of RULER's README: GPT-4 (64K), InternLM2.5 (4K), LWM (<4K), Jamba-1.5-large (>128K)
    assert effective([96.6, 96.3, 95.2, 93.2, 87.0, 81.2]) == 65536
    assert effective([88.1, 85.5, 84.5, 82.7, 75.5, 68.9]) == 4096
    assert effective([82.3, 78.4, 73.7, 69.1, 68.1, 65.0]) is None
    assert effective([96.7, 96.6, 96.4, 96.0, 95.4, 95.1]) == 131072
    # the score must exceed the threshold, and every shorter length must pass too
    assert effective([90.0, 85.6, 90.0, 90.0, 90.0, 90.0]) == 4096
    assert rs.effective_length({1024: 60.0, 2048: 40.0}, threshold=50.0) == 1024


def test_weighted_averages_as_ruler_reports_them():
    # GPT-4-1106-preview in RULER's README: wAvg (inc) 89.0, wAvg (dec) 94.1
    gpt4 = dict(zip([4096, 8192, 16384, 32768, 65536, 131072], [96.6, 96.3, 95.2, 93.2, 87.0, 81.2]))
    assert round(rs.weighted_average(gpt4, increasing=True), 1) == 89.0
    assert round(rs.weighted_average(gpt4, increasing=False), 1) == 94.1
    assert rs.weighted_average({2048: 30.0, 1024: 60.0}, increasing=True) == (60.0 + 2 * 30.0) / 3


def test_ruler_table_averages_tasks_per_length():
    runs = [rt.ReportRun("full", "full", "ruler/niah_single_1", {"score": 95.0, "lengths": {"1024": 100.0, "2048": 90.0}}),
            rt.ReportRun("full", "full", "ruler/vt", {"score": 85.0, "lengths": {"1024": 90.0, "2048": 80.0}}),
            rt.ReportRun("lagkv", "4x", "ruler/niah_single_1", {"score": 50.0, "lengths": {"1024": 80.0, "2048": 20.0}}),
            rt.ReportRun("lagkv", "4x", "ruler/vt", {"score": 50.0, "lengths": {"1024": 80.0}}),
            rt.ReportRun("knorm", "4x", "ruler/vt", {"score": 100.0, "lengths": {"1024": 100.0, "2048": 100.0}})]
    ((title, table),) = rt.Ruler.tables(runs).items()
    assert title == "RULER by length"
    assert table.header == ["method", "setting", "tasks", "1024", "2048", "avg", "wavg inc", "wavg dec",
                            "effective length"]
    # full: 95 at 1024, 85 at 2048 (not above 85.6), wavg (95 + 2 * 85) / 3 and (2 * 95 + 85) / 3;
    # lagkv: 2048 missing for vt, so n/a and left out
    assert table.rows == [["full", "full", "2", "95.00", "85.00", "90.00", "88.33", "91.67", "1024"],
                          ["lagkv", "4x", "2", "80.00", "n/a", "80.00", "80.00", "80.00", "<1024"],
                          ["knorm", "4x", "1", "100.00", "100.00", "100.00", "100.00", "100.00", ">2048"]]
    assert "Tasks (2): ruler/niah_single_1, ruler/vt." in table.caption
    assert rt.Ruler.tables([]) == {}


def test_leaderboard_shows_the_ruler_table(tmp_path):
    from dataclasses import asdict

    from conftest import run_info
    from kvbench import report
    from kvbench.results import RunDir, RunScores

    def write(task, method, ratio, label, per_length, complete=True):
        params = {k: v for k, v in asdict(rt.RulerParams(tasks=[task])).items() if k not in ("data_dir", "kvpress_dir")}
        run = RunDir(tmp_path / "m" / (rs.PREFIX + task) / method / label)
        run.write_run(run_info({"name": rs.PREFIX + task, "kind": "ruler", "params": params}, method=method,
                               ratio=ratio, label=label, n_expected=2))
        for i, n in enumerate(per_length):
            run.append(sample_record(f"{n}-{i}", task=rs.PREFIX + task, scores={"score": per_length[n] / 100},
                                     meta={"length": int(n)}))
        score = sum(per_length.values()) / len(per_length)
        run.write_scores(RunScores(task=rs.PREFIX + task, metric="score", score=score,
                                   metrics={"score": score, "lengths": per_length}, n=2 if complete else 1,
                                   n_expected=2, complete=complete, measured_ratio=ratio, tokens_held=1.0,
                                   bytes_held=1.0, peak_bytes_held=1.0, decode_tokens_per_s=1.0))

    write("niah_single_1", "full", 1, "ratio-1", {"1024": 100.0, "2048": 100.0})
    write("vt", "full", 1, "ratio-1", {"1024": 100.0, "2048": 80.0})
    write("niah_single_1", "lagkv", 4, "ratio-4", {"1024": 100.0, "2048": 0.0})
    write("vt", "lagkv", 4, "ratio-4", {"1024": 0.0}, complete=False)  # partial runs stay out
    markdown = report.leaderboard_markdown(report.collect(tmp_path), "m")
    section = markdown.split("## RULER by length")[1].split("## Per task")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    assert lines[0] == "| method | setting | tasks | 1024 | 2048 | avg | wavg inc | wavg dec | effective length |"
    assert lines[2:] == ["| full | 1x | 2 | 100.00 | 90.00 | 95.00 | 93.33 | 96.67 | >2048 |",
                         "| lagkv | 4x | 1 | 100.00 | 0.00 | 50.00 | 33.33 | 66.67 | 1024 |"]


def test_score_cli_prints_ruler_tasks(tmp_path, capsys):
    from kvbench.score import main

    lines = [{"task": "ruler/niah_multivalue", "pred": "1 and 2", "answers": ["1", "2", "3"]},
             {"task": "ruler/niah_multivalue", "pred": "nothing", "answers": ["1"]},
             {"task": "ruler/qa_2", "pred": "yes", "answers": ["Yes", "no"]}]
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main([str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"ruler/niah_multivalue": {"score": 33.33, "n": 2}, "ruler/qa_2": {"score": 100.0, "n": 1}}
    path.write_text(json.dumps({"task": "ruler/niah", "pred": "", "answers": ["1"]}) + "\n")
    assert main([str(path)]) == 1
    assert "unknown RULER task 'ruler/niah'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Generated prompts
# ---------------------------------------------------------------------------------------------


def test_generation_is_reproducible_per_seed():
    for name in OFFLINE + ["niah_single_2", "qa_1"]:
        a, b = samples(name), samples(name)
        assert [(s.id, s.context, s.question, s.answers) for s in a] == [(s.id, s.context, s.question, s.answers) for s in b]
        assert a[0].context != a[1].context  # every sample draws its own
        assert samples(name, seed=7)[0].context != a[0].context


@pytest.mark.parametrize("name", OFFLINE + ESSAY + ["qa_1", "qa_2"])
def test_prompt_length_fits_the_target(name):
    for s in samples(name, lengths=[1024, 2048]):
        gen = rt.SPEC["prompts"][rt.SPEC["tasks"][name]["generator"]]["tokens_to_generate"]
        budget = s.meta["length"] - (0 if name == "fwe" else gen)  # RULER sizes fwe's prompt alone
        tokens = rt.prompt_tokens(TOK, s.context, s.question)
        assert budget * 0.97 <= tokens <= budget, (s.id, tokens, budget)
        assert s.max_new_tokens == gen


def test_haystack_search_finds_the_largest_fitting_size():
    calls = []

    def tokens(n):
        calls.append(n)
        return 100 + 7 * n

    assert rt.size_haystack(tokens, 1000, 1, 5) == 128  # 100 + 7 * 128 = 996
    assert rt.size_haystack(tokens, 1000, 1, 5, cap=50) == 50
    assert rt.size_haystack(tokens, 50, 1, 5) is None
    # a large fixed part makes the first estimate (3 x 2000 / 183 per unit at 5 units) too low: the bound doubles
    assert rt.size_haystack(lambda n: 900 + 3 * n, 2000, 1, 5) == 366
    assert rt.largest_fitting(lambda n: n * n <= 50, 3, 100) == 7 and rt.largest_fitting(lambda n: False, 1, 9) is None


def test_niah_single_noise_template_needle_and_answer():
    (s, _) = samples("niah_single_1")
    (needle,) = s.meta["needles"]
    key, value = re.fullmatch(r"One of the special magic numbers for (\S+) is: (\d{7})\.", needle).groups()
    head = ("A special magic number is hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the number afterwards.\n")
    assert s.context.startswith(head) and s.context.endswith("\n")
    assert s.question == (f"What is the special magic number for {key} mentioned in the provided text? "
                          f"The special magic number for {key} mentioned in the provided text is")
    assert s.answers == [value]
    lines = s.context[len(head):-1].split("\n")
    assert lines.index(needle) == s.meta["indexes"][0]
    assert [line for line in lines if line != needle] == [NOISE] * s.meta["units"]
    adjective, noun = key.split("-", 1)
    nouns, adjectives, _ = rt.word_lists()
    assert adjective in adjectives and noun in nouns


def test_niah_needle_haystacks_are_distractor_needles():
    for name, pattern in [("niah_multikey_2", r"[a-z]+-\S+ is: \d{7}"), ("niah_multikey_3", r"[0-9a-f-]{36} is: [0-9a-f-]{36}")]:
        s = samples(name)[0]
        lines = s.context.split("\n")[1:-1]
        assert len(lines) == s.meta["units"] + 1
        assert all(re.fullmatch(r"One of the special magic (numbers|uuids) for " + pattern + r"\.", line) for line in lines)
        (needle,) = s.meta["needles"]
        assert lines.index(needle) == s.meta["indexes"][0]
        assert needle.endswith(f" is: {s.answers[0]}.") and needle.split(" for ")[1].split(" is")[0] in s.question


def test_niah_uuids_are_version_4():
    s = samples("niah_multikey_3")[0]
    import uuid

    assert uuid.UUID(s.answers[0]).version == 4


def sentences_before(text: str, needle: str, needles: list[str]) -> int:
    before = text[: text.index(needle)]
    for other in needles:
        before = before.replace(other, "")
    return len(rt.split_sentences(before)) if before.strip() else 0


@pytest.mark.parametrize("name", ESSAY)
def test_essay_needles_at_their_depths_and_answers(name):
    args = rt.SPEC["tasks"][name]["args"]
    for s in samples(name):
        body = s.context.split("\n", 1)[1].rstrip("\n")
        needles = s.meta["needles"]
        assert len(needles) == max(args["num_needle_k"], args["num_needle_q"]) * args["num_needle_v"]
        total = len(rt.split_sentences(rt.essay_text(rt.essay_words(str(DATA)), s.meta["units"])))
        # needles go in their drawn order after int(total * depth / 100) essay sentences, depths sorted
        assert sorted(needles, key=body.index) == needles
        assert [sentences_before(body, n, needles) for n in needles] == [int(total * d / 100) for d in s.meta["depths"]]
        keyed = {re.search(r"for (\S+) is", n).group(1): re.search(r"is: (\S+)\.$", n).group(1) for n in needles}
        queried = re.findall(r"([a-z]+-[a-z-]+)", s.question.split("mentioned")[0])
        if name == "niah_multivalue":
            values = [re.search(r"is: (\S+)\.$", n).group(1) for n in needles]
            assert sorted(s.answers) == sorted(values) and len(keyed) == 1 and list(keyed) == queried
        else:
            assert len(queried) == args["num_needle_q"] and s.answers == [keyed[k] for k in queried]
        if name == "niah_single_3":
            assert re.fullmatch(r"[0-9a-f-]{36}", s.answers[0]) and "special magic uuid for" in s.question


def test_essay_depth_rule_on_a_plain_list():
    sentences = [f"S{i}." for i in range(10)]
    # RULER joins the pieces with spaces, so a needle at depth 100 leaves a trailing space
    assert rt.insert_at_depths(sentences, ["N1", "N2"], [100, 26]) == "S0. S1. N1 S2. S3. S4. S5. S6. S7. S8. S9. N2 "
    assert rt.insert_at_depths(sentences, ["N1"], [0]) == " N1 S0. S1. S2. S3. S4. S5. S6. S7. S8. S9."
    assert rt.DEPTHS[:4] == [0, 3, 5, 8] and rt.DEPTHS[-1] == 100 and len(rt.DEPTHS) == 40


def test_vt_chain_example_and_answers():
    s = samples("vt")[0]
    template = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
    assert s.question.startswith("Question: Find all variables that are assigned the value ")
    value = re.search(r"the value (\d{5}) in the text above", s.question).group(1)
    assert s.question.endswith(f"5 variables are assgined the value {value}, they are: ")
    example, task_text = s.context.split("\n\n" + template)[0], s.context.split("\n" + template)[-1]
    # the one-shot example: a full task with 3-letter names and its answer, sized to 500 tokens
    assert example.startswith(template) and re.search(r"they are:  ([A-Z]{3} ){4}[A-Z]{3}$", example)
    assert 450 < rt.prompt_tokens(TOK, example.rsplit(" ", 5)[0], "") <= 500
    assert "12345" not in example
    lines = task_text.rstrip("\n").split("\n")
    assignments = {m.group(1): m.group(2) for line in lines if (m := re.fullmatch(r"VAR (\w+) = (?:VAR )?(\w+) ?", line))}
    assert [line for line in lines if not line.startswith("VAR ")] == [NOISE] * s.meta["units"]
    found, frontier = set(), {value}
    while frontier:  # follow the chain from the queried value
        frontier = {var for var, source in assignments.items() if source in frontier and var not in found}
        found |= frontier
    assert sorted(found) == sorted(s.answers) and len(s.answers) == 5
    assert all(re.fullmatch(r"[A-Z]{5}", v) for v in s.answers)
    chain_lines = [i for i, line in enumerate(lines) if line.startswith("VAR ")]
    assert [i - j for j, i in enumerate(chain_lines)] == s.meta["positions"]


@pytest.mark.parametrize("length,common", [(1024, 6), (4096, 30)])
def test_cwe_word_counts_and_answers(length, common):
    s = samples("cwe", lengths=[length])[0]
    shots, main = s.context.rsplit("Below is a numbered list of words.", 1)
    words = re.findall(r"\d+\. (\S+)", main)
    counts = Counter(words)
    assert sorted(s.answers) == sorted(w for w, c in counts.items() if c == common)
    assert set(counts.values()) == {common, 1 if length < 4096 else 3} and len(s.answers) == 10
    assert shots.startswith("Below is a numbered list of words.") and "The top 10 words that appear most often in the list are: 1. " in shots
    assert s.question == ("Question: What are the 10 most common words in the above list? "
                          "Answer: The top 10 words that appear most often in the list are:")


def test_fwe_zipf_counts_and_answers():
    s = samples("fwe")[0]
    words = s.context.split("coded words. ", 1)[1].rstrip("\n").split(" ")
    ranked = [w for w, _ in Counter(words).most_common()]
    assert ranked[0] == "..." and sorted(ranked[1:4]) == sorted(s.answers)
    assert all(re.fullmatch(r"[a-z]{6}", w) for w in s.answers)
    n = s.meta["units"]
    assert Counter(words)["..."] == int(n / (3.141592653589793**2 / 6))  # k=1 of Zipf(2): n / zeta(2)


def test_zeta_is_exact_to_double_precision():
    import math

    assert rt.zeta(2.0) == math.pi**2 / 6
    assert abs(rt.zeta(4.0) - math.pi**4 / 90) < 1e-15 and abs(rt.zeta(3.0) - 1.2020569031595942) < 1e-15


def test_qa_documents_and_answers():
    squad = samples("qa_1")
    assert squad[0].answers == ["Anna Brandt", "keeper Anna Brandt"]
    assert squad[1].answers == ["1920"]  # the impossible question is skipped, in dataset order
    assert squad[0].question == ("Answer the question based on the given documents. Only give me the answer and "
                                 "do not output any other words.\n\nQuestion: Who first lit the lamp on Ferro Point? Answer:")
    assert "Document 1:\n" in squad[0].context and "was first lit by keeper Anna Brandt" in squad[0].context
    hotpot = samples("qa_2")[1]
    assert hotpot.answers == ["yes"] and "Tellan\nTellan is a board game for two players." in hotpot.context
    docs = re.findall(r"Document (\d+):\n", hotpot.context)
    assert docs == [str(i + 1) for i in range(hotpot.meta["units"])]


def test_qa_samples_of_one_question_form_one_cluster():
    # the i-th sample of every length asks the i-th question about its own documents
    squad = samples("qa_1", lengths=[1024, 2048])
    assert [s.cluster for s in squad[:2]] == [s.cluster for s in squad[2:]]
    assert squad[0].cluster != squad[1].cluster and squad[0].cluster.startswith("documents-")
    # tasks that draw a haystack per sample are not clustered
    assert all(s.cluster is None for s in samples("niah_single_1"))


def test_hub_rows_read_as_the_official_files():
    """The hub copies (one row per question, HotpotQA's context as title/sentences columns) give
    the same questions and documents as RULER's files."""
    squad = json.loads((DATA / "squad.json").read_text())
    rows = [{"title": a["title"], "context": p["context"], "question": q["question"],
             "answers": {"text": [x["text"] for x in q["answers"]], "answer_start": [0] * len(q["answers"])}}
            for a in squad["data"] for p in a["paragraphs"] for q in p["qas"]]
    from_rows = rt.read_squad(rt._squad_from_hub(rows))
    # paragraphs without questions are not in the hub rows
    kept = {"data": [{**a, "paragraphs": [p for p in a["paragraphs"] if p["qas"]]} for a in squad["data"]]}
    assert from_rows == rt.read_squad(kept)
    hotpot = json.loads((DATA / "hotpotqa.json").read_text())
    rows = [{"question": d["question"], "answer": d["answer"],
             "context": {"title": [t for t, _ in d["context"]], "sentences": [s for _, s in d["context"]]}}
            for d in hotpot]
    assert rt.read_hotpotqa(rt._hotpotqa_from_hub(rows)) == rt.read_hotpotqa(hotpot)


def test_chat_template_places_the_answer_prefix_after_the_generation_prompt():
    chat = ChatTokenizer()
    (s, _) = samples("niah_single_1", tokenizer=chat, template="chat")
    assert s.context.startswith("<user>A special magic number")  # the template's BOS is the tokenizer's
    assert s.question.endswith("mentioned in the provided text?</user><assistant> The special magic number for "
                               + s.question.split("number for ")[1].split(" ")[0] + " mentioned in the provided text is")
    base = samples("niah_single_1", tokenizer=chat)[0]
    assert base.context.startswith("A special magic number") and "<assistant>" not in base.question
    # a model config that turns chat templates off gets the base layout
    off = samples("niah_single_1", tokenizer=chat, template="chat", model_cfg=SimpleNamespace(chat_template=False))
    assert off[0].context == base.context


# ---------------------------------------------------------------------------------------------
# Data, errors, configs
# ---------------------------------------------------------------------------------------------


def test_missing_data_names_the_files_and_tasks(tmp_path):
    with pytest.raises(ConfigError, match=r"no hub copy of PaulGrahamEssays.json, which RULER task\(s\) "
                                          r"niah_single_2, niah_multivalue need"):
        task("niah_single_2", tasks=["niah_single_2", "vt", "niah_multivalue"], data_dir=None)
    with pytest.raises(ConfigError, match=r"has no squad.json, which RULER task\(s\) qa_1 need.*task.tasks=\[niah_single_1"):
        task("qa_1", data_dir=str(tmp_path))
    (tmp_path / "PaulGrahamEssays.json").write_text('{"essay": "no text field"}')
    with pytest.raises(ConfigError, match="PaulGrahamEssays.json: missing field 'text'"):
        samples("niah_single_2", data_dir=str(tmp_path))
    (tmp_path / "squad.json").write_text('{"data": [{"paragraphs": [{"qas": []}]}]}')
    with pytest.raises(ConfigError, match=r"squad.json: data\[0\].paragraphs\[0\]: missing field .context."):
        samples("qa_1", data_dir=str(tmp_path))
    assert [s.id for s in samples("vt", data_dir=None)] == ["1024-0", "1024-1"]  # needs no data


def test_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="unknown RULER task 'niah'"):
        task("niah")
    with pytest.raises(ConfigError, match="^ruler.template='llama-3': expected one of 'base', 'chat'$"):
        task("vt", template="llama-3")
    with pytest.raises(ConfigError, match="lengths"):
        task("vt", lengths=[])
    with pytest.raises(ConfigError, match=r"has lengths \(4096, 8192, 16384\), not \[1024\]"):
        task("vt", source="kvpress")
    with pytest.raises(ConfigError, match="only with source=kvpress"):
        task("vt", samples_per_length=None)
    with pytest.raises(ConfigError, match="exceeds 0 tokens"):
        samples("vt", lengths=[30])


def test_kvpress_set_from_a_local_copy():
    sub = task("niah_single_1", source="kvpress", kvpress_dir=str(KVPRESS), lengths=[4096], samples_per_length=None)
    got = sub.samples(TOK, None)
    assert [s.id for s in got] == ["4096-0", "4096-1"] and [s.answers for s in got] == [["4821937"], ["7305518"]]
    assert got[0].question == ("What is the special magic number for tame-falcon mentioned in the provided text?\n"
                               " The special magic number for tame-falcon mentioned in the provided text is")
    assert got[0].context.startswith("A special magic number is hidden") and got[0].max_new_tokens == 128
    (qa,) = task("qa_1", source="kvpress", kvpress_dir=str(KVPRESS), lengths=[4096]).samples(TOK, None)
    assert qa.answers == ["the Vesna", "Vesna"] and qa.max_new_tokens == 32
    assert len(task("niah_single_1", source="kvpress", kvpress_dir=str(KVPRESS), lengths=[4096],
                    samples_per_length=1).samples(TOK, None)) == 1
    with pytest.raises(ConfigError, match="no rows of task 'vt'"):
        task("vt", source="kvpress", kvpress_dir=str(KVPRESS), lengths=[4096]).samples(TOK, None)
    with pytest.raises(ConfigError, match="no \\*.parquet file"):
        task("vt", source="kvpress", kvpress_dir=str(KVPRESS), lengths=[8192]).samples(TOK, None)


def test_kvpress_layout_adds_the_bos_text_the_tokenizer_does_not():
    class NoBos(RegexTokenizer):
        def __call__(self, text, add_special_tokens=True):
            return super().__call__(text, add_special_tokens=False)

    (s, _) = task("niah_single_1", source="kvpress", kvpress_dir=str(KVPRESS), lengths=[4096]).samples(NoBos(), None)
    assert s.context.startswith("<s>A special magic number")
    # with a chat template, kvpress's pipeline: question, the template's closing, the answer prefix
    (s, _) = task("niah_single_1", source="kvpress", kvpress_dir=str(KVPRESS), lengths=[4096],
                  template="chat").samples(ChatTokenizer(), None)
    assert s.context.startswith("<user>A special magic number") and s.question == (
        "What is the special magic number for tame-falcon mentioned in the provided text?</user><assistant>"
        " The special magic number for tame-falcon mentioned in the provided text is")


def test_hydra_configs(compose):
    cfg = compose(["task=ruler/vt", "task.lengths=[512]"])
    assert cfg["task"]["name"] == "ruler/vt" and cfg["task"]["tasks"] == ["vt"] and cfg["task"]["lengths"] == [512]
    (sub,) = build_task(cfg["task"]).subtasks()
    assert sub.name == "ruler/vt"
    cfg = compose(["task=ruler", f"data_dir={DATA}"])
    assert cfg["task"]["data_dir"] == str(DATA) and cfg["task"]["lengths"] == [1024, 2048]
    assert [t.name for t in build_task(cfg["task"]).subtasks()] == [rs.PREFIX + n for n in rs.TASK_NAMES]


# ---------------------------------------------------------------------------------------------
# The embedded model's tokenizer
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_tokenizer():
    """The embedded model's tokenizer alone (no weights)."""
    from transformers import AutoTokenizer

    from kvbench.models import _locate
    from tests.conftest import EMBEDDED

    where, extra = _locate(EMBEDDED)
    return AutoTokenizer.from_pretrained(where, **extra)


@pytest.mark.embedded
def test_lengths_in_the_embedded_tokenizer(embedded_tokenizer):
    tok = embedded_tokenizer
    for name in OFFLINE + ["niah_single_2", "qa_2"]:
        for template in ("base", "chat"):
            for s in samples(name, tokenizer=tok, template=template, samples_per_length=1):
                gen = 0 if name == "fwe" else s.max_new_tokens
                tokens = rt.prompt_tokens(tok, s.context, s.question)
                # the haystack grows by whole units: a line of two uuids is ~70 tokens here
                slack = 0.1 if name == "niah_multikey_3" else 0.03
                assert (1 - slack) * (1024 - gen) <= tokens <= 1024 - gen, (name, template, tokens)
    (s,) = samples("niah_single_1", tokenizer=tok, template="chat", samples_per_length=1)
    assert s.context.startswith("<|im_start|>system") and s.question.endswith(
        "<|im_end|>\n<|im_start|>assistant\n The special magic number for "
        + s.question.split("number for ")[1].split(" ")[0] + " mentioned in the provided text is")
