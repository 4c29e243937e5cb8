"""Needle in a haystack: the needle where the depth puts it, prompt lengths, seeded haystacks and
values, containment scoring, the grid summary and its heatmap, configs.

Tokens are counted with the small regex tokenizer of the RULER tests (words and punctuation marks).
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from conftest import sample_record
from kvbench.errors import ConfigError
from kvbench.tasks import build_task
from kvbench.tasks import niah as nt
from kvbench.tasks.niah import insert_at_depth
from tests.tasks.test_ruler import DATA, NOISE, ChatTokenizer, RegexTokenizer, embedded_tokenizer  # noqa: F401 (a fixture)

TOK = RegexTokenizer()
KAMRADT = nt.kamradt_texts()


def samples(tokenizer=TOK, **over):
    values = {"name": "niah", "kind": "niah", "lengths": [300, 600], "depths": [0.0, 0.3, 0.5, 1.0],
              "template": "base", "data_dir": str(DATA), **over}
    return build_task(values).samples(tokenizer, None)


def tokens(text: str) -> int:
    return len(TOK(text, add_special_tokens=False).input_ids)


def haystack_parts(sample, needle=KAMRADT["needle"]) -> tuple[str, str]:
    """The haystack before and after the needle."""
    haystack = sample.context.removeprefix(KAMRADT["instruction"] + "\n\n").removesuffix("\n\n")
    before, after = haystack.split(needle)
    return before, after


def test_insert_at_depth_on_hand_counted_sentences():
    sentences, counts = ["a.", "b.", "c.", "d."], [2, 4, 2, 2]  # 10 tokens, ends at 2, 6, 8, 10
    assert insert_at_depth(sentences, counts, "N", 0.0) == ("N a. b. c. d.", 0)
    # depth 0.5 = token 5: the last sentence ending at or before it ends at 2
    assert insert_at_depth(sentences, counts, "N", 0.5) == ("a. N b. c. d.", 1)
    assert insert_at_depth(sentences, counts, "N", 0.6) == ("a. b. N c. d.", 2)
    assert insert_at_depth(sentences, counts, "\nN\n", 1.0) == ("a. b. c. d.\nN\n", 4)


@pytest.mark.parametrize("haystack", ["noise", "essay"])
def test_needle_at_the_declared_depth_and_prompt_at_the_length(haystack):
    got = samples(haystack=haystack)
    assert [s.id for s in got] == [f"L{n}-D{d:g}-0" for n in (300, 600) for d in (0.0, 0.3, 0.5, 1.0)]
    for s in got:
        assert s.answers == [KAMRADT["answer"]] and s.question.startswith(KAMRADT["question"])
        before, after = haystack_parts(s)
        total = tokens(before) + tokens(after)
        longest = max(tokens(x) for x in re.split(r"(?<=[.!?])\s+", before + " " + after))
        # the fraction of haystack tokens before the needle: at most one sentence short of the depth
        assert s.meta["depth"] * total - longest < tokens(before) <= s.meta["depth"] * total
        assert s.meta["needle_depth"] == pytest.approx(tokens(before) / total, abs=1e-3)
        n = len(TOK(s.context).input_ids) + tokens(s.question)
        assert s.meta["length"] - longest - 2 <= n <= s.meta["length"]


def test_haystacks_are_seeded_and_reproducible():
    a, b, c = samples(haystack="essay"), samples(haystack="essay"), samples(haystack="essay", seed=7)
    assert [(s.context, s.question) for s in a] == [(s.context, s.question) for s in b]
    assert [s.context for s in a] != [s.context for s in c]
    # every depth of a (length, index) uses the same haystack
    first = [haystack_parts(s) for s in a if s.meta["length"] == 300]
    assert len({" ".join(f"{before} {after}".split()) for before, after in first}) == 1
    noise = samples()
    assert all(NOISE.split(". ")[1] in s.context for s in noise)


def test_value_needles_are_drawn_per_cell():
    got = samples(needle=" The secret number is {value}. ", question="What is the secret number?",
                  answer="{value}", lengths=[300])
    values = [s.answers[0] for s in got]
    assert all(re.fullmatch(r"\d{7}", v) for v in values) and len(set(values)) == len(values)
    for s, value in zip(got, values):
        assert s.context.count(f"The secret number is {value}.") == 1
    assert values == [s.answers[0] for s in samples(needle=" The secret number is {value}. ", answer="{value}",
                                                    question="What is the secret number?", lengths=[300])]


def test_chat_template_wraps_prompt():
    (s,) = samples(tokenizer=ChatTokenizer(), template="chat", lengths=[300], depths=[0.5])
    assert s.context.startswith("<user>" + KAMRADT["instruction"])
    assert s.question.endswith(KAMRADT["question_suffix"] + "</user><assistant>")


def test_containment_scoring_summary_and_heatmap():
    task = build_task({"name": "niah", "kind": "niah"})
    answer = KAMRADT["answer"]
    assert task.score(sample_record("x", pred=" Eat a sandwich and sit in Dolores Park on a sunny day.",
                                    answers=[answer])) == {"contains": 1.0}
    assert task.score(sample_record("x", pred="Sit in Dolores Park.", answers=[answer])) == {"contains": 0.0}
    records = []
    for length, depth, pred in [(512, 0.0, answer), (512, 0.5, "no"), (1024, 0.0, answer), (1024, 0.0, "no")]:
        r = sample_record(f"{length}-{depth}", pred=pred, answers=[answer], meta={"length": length, "depth": depth})
        r.scores = task.score(r)
        records.append(r)
    summary = task.summarize(records)
    # cells 100, 0, 50 -> mean over cells 50
    assert summary["contains"] == 50.0
    assert summary["cells"] == {"512/0": {"contains": 100.0}, "512/0.5": {"contains": 0.0},
                                "1024/0": {"contains": 50.0}}
    (name, fig), = task.figures(summary, "t").items()
    assert name == "niah" and fig.axes[0].images[0].get_array().shape == (2, 2)


def test_bad_parameters_are_config_errors(tmp_path):
    base = {"name": "niah", "kind": "niah"}
    with pytest.raises(ConfigError, match="PaulGrahamEssays.json"):
        build_task({**base, "haystack": "essay"})
    with pytest.raises(ConfigError, match="PaulGrahamEssays.json"):
        build_task({**base, "haystack": "essay", "data_dir": str(tmp_path)})
    (tmp_path / "PaulGrahamEssays.json").write_text('{"text": 3}')
    with pytest.raises(ConfigError, match="PaulGrahamEssays.json: field .text. has type int"):
        build_task({**base, "haystack": "essay", "data_dir": str(tmp_path)}).check_data()
    with pytest.raises(ConfigError, match="niah.haystack='grass': expected one of 'noise', 'essay'"):
        build_task({**base, "haystack": "grass"})
    with pytest.raises(ConfigError, match="depths"):
        build_task({**base, "depths": [1.5]})
    with pytest.raises(ConfigError, match="niah.needle='The key is {key}.': braces other than"):
        build_task({**base, "needle": "The key is {key}."})
    with pytest.raises(ConfigError, match="holds \\{value\\} but the needle does not"):
        build_task({**base, "answer": "{value}"})
    with pytest.raises(ConfigError, match="one haystack sentence already exceeds 20"):
        samples(lengths=[20])


def test_hydra_config(compose):
    cfg = compose(["task=niah", "task.lengths=[256]"])
    task = build_task(cfg["task"])
    assert task.params.lengths == [256] and task.params.haystack == "noise" and task.params.data_dir is None


@pytest.mark.embedded
def test_prompts_in_the_embedded_tokenizer_fill_each_length(embedded_tokenizer):  # noqa: F811 (the fixture)
    from kvbench.runner import encode

    model_cfg = SimpleNamespace(chat_template=True)
    for s in samples(tokenizer=embedded_tokenizer, template="chat", lengths=[512, 1024], depths=[0.0, 0.5, 1.0]):
        assert s.context.startswith("<|im_start|>system") and s.question.endswith("<|im_start|>assistant\n")
        ids, _ = encode(s, embedded_tokenizer, model_cfg, "whole")
        # the runner's tokens; the haystack grows by noise sentences of about 6 tokens
        assert s.meta["length"] - 8 <= ids.shape[1] <= s.meta["length"]
        assert abs(s.meta["needle_depth"] - s.meta["depth"]) <= 0.02


def test_essay_file_is_fingerprinted_and_context_mode_splits_before_the_question():
    essay = build_task({"name": "niah", "kind": "niah", "haystack": "essay", "data_dir": str(DATA)})
    assert list(essay.data_fingerprint()["sha256"]) == ["PaulGrahamEssays.json"]
    assert build_task({"name": "niah", "kind": "niah"}).data_fingerprint() is None
    whole, split = samples(lengths=[300], depths=[0.5]), samples(lengths=[300], depths=[0.5], compress="context")
    assert split[0].context + split[0].question == whole[0].context + whole[0].question
    assert split[0].context.endswith("\n\n") and split[0].question.startswith(KAMRADT["question"])


def test_depths_of_one_drawn_passage_form_one_cluster():
    essay = samples(haystack="essay", samples_per_cell=2)
    # one cluster per (length, index), holding its four depths
    assert {s.cluster for s in essay} == {f"haystack-L{length}-{i}" for length in (300, 600) for i in (0, 1)}
    assert all(sum(o.cluster == s.cluster for o in essay) == 4 for s in essay)
    # the noise haystack is one fixed text: nothing drawn is shared
    assert all(s.cluster is None for s in samples())
