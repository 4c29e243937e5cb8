"""Passkey task: deterministic generation, target lengths, scorers on hand-made cases."""

import pytest

from kvbench.errors import ConfigError
from kvbench.scoring.passkey import exact_match, partial_match
from kvbench.tasks import build_task
from kvbench.tasks.passkey import load_texts

BASE = {"name": "passkey", "kind": "passkey", "lengths": [300, 600], "depths": [0.0, 0.5, 1.0]}


def samples(tokenizer, **over):
    return build_task({**BASE, **over}).samples(tokenizer, None)


@pytest.mark.embedded
def test_generator_is_deterministic_per_seed(embedded):
    _, tok = embedded
    a, b = samples(tok, seed=3), samples(tok, seed=3)
    assert [(s.id, s.context, s.answers) for s in a] == [(s.id, s.context, s.answers) for s in b]
    other = samples(tok, seed=4)
    assert [s.answers for s in other] != [s.answers for s in a]
    assert len({s.answers[0] for s in a}) == len(a)  # every cell draws its own key


@pytest.mark.embedded
def test_lengths_depths_and_key_digits(embedded):
    _, tok = embedded
    got = samples(tok, key_digits=64)
    texts = load_texts()
    assert [s.id for s in got] == [f"L{n}-D{d:g}-0" for n in (300, 600) for d in (0.0, 0.5, 1.0)]
    for s in got:
        key = s.answers[0]
        assert len(key) == 64 and key.isdigit() and s.context.count(key) == 2
        n = len(tok(s.context + s.question).input_ids)
        assert abs(n - s.meta["length"]) <= 0.05 * s.meta["length"]  # within one filler repeat
        needle = texts["needle"].format(key=key)
        haystack_before = s.context.index(needle) - len(texts["instruction"])
        haystack = len(s.context) - len(texts["instruction"]) - len(needle)
        # the needle goes between filler repeats: within one repeat of the requested depth
        assert abs(haystack_before - s.meta["depth"] * haystack) <= len(texts["filler"])


def test_exact_match_is_substring_after_normalisation():
    assert exact_match(" 71432.\nThe pass key is", "71432") == 1.0
    assert exact_match("The pass key is 7143", "71432") == 0.0
    assert exact_match("THE KEY: 71432!", "71432") == 1.0


def test_partial_match_is_longest_common_substring_over_key_length():
    # key 12345678: the prediction shares "3456" (4 chars) as its longest common run -> 4/8
    assert partial_match("xx3456yy12", "12345678") == 0.5
    assert partial_match("the key is 12345678", "12345678") == 1.0
    assert partial_match("", "12345678") == 0.0
    # a 64-digit key of repeated digits must not be treated as junk by difflib (autojunk off)
    key = "1" * 64
    assert partial_match("1" * 32, key) == 0.5


def test_bad_task_parameters_are_named():
    with pytest.raises(ConfigError, match="depths"):
        build_task({**BASE, "depths": [1.5]})
    with pytest.raises(ConfigError, match=r"unknown passkey task parameter 'lenghts' \(did you mean 'lengths'\?\); valid: .*depths"):
        build_task({**BASE, "lenghts": [1]})
    with pytest.raises(ConfigError, match="unknown task kind 'nope'; valid: .*passkey"):
        build_task({"name": "x", "kind": "nope"})


def test_the_heatmap_is_the_tasks_figure_of_its_cells():
    task = build_task({**BASE, "metric": "partial_match"})
    assert task.figures({"exact_match": 50.0}, "no cells") == {}
    cells = {"300/0": {"exact_match": 100.0, "partial_match": 80.0},
             "600/0": {"exact_match": 0.0, "partial_match": 20.0},
             "600/1": {"exact_match": 50.0, "partial_match": 60.0}}
    (name, fig), = task.figures({"partial_match": 53.33, "cells": cells}, "title").items()
    ax = fig.axes[0]
    grid = ax.images[0].get_array()
    # rows are depths (0, 1), columns lengths (300, 600); the main metric; a missing cell is empty
    assert name == "passkey" and grid[0].tolist() == [80.0, 20.0] and grid[1, 1] == 60.0 and grid.mask[1, 0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["300", "600"] and "depth" in ax.get_ylabel()
