"""G-KV: global score (decay + max) across compression events, the compression schedule on a real
model, and R-KV's redundancy term, on hand-made tensors (layers driven directly, as the cache and
kvbench's attention function drive them: update -> observe, attend -> end_step)."""

import math

import pytest
import torch

from conftest import random_prompt
from kvbench.cache import KVCache, layer_attention, layer_windows
from kvbench.generation import generate
from kvbench.methods import Compression, build_method
from kvbench.errors import ConfigError
from kvbench.methods.gkv import local_scores, redundancy


def make_layer(params=None, **comp):
    return build_method("gkv", params or {}, Compression(**comp)).make_layer(0)


def step(layer, keys, query, phase):
    k, v = layer.update(keys, keys.clone())
    layer_attention(layer, query, k, v, 1.0)
    layer.end_step(phase)


def held(layer):
    return layer.positions[0, 0].tolist()


def test_global_score_decays_and_max_combines_across_two_events():
    # one head, head_dim 2, window 1, no redundancy (lambda 1): selection by F alone. Keys are
    # [log a, log b]: the query [1, 0] gives token j the weight a_j, the query [0, 1] the weight b_j, and
    # the local score (softmax, window column dropped, divided by its max) is a_j / max a (or b_j / max b)
    layer = make_layer({"window": 1, "divide_length": 2, "alpha": 0.5, "mix_lambda": 1.0}, budget=4)
    a = [1, 4, 2, 8, 3, 5]  # prefill tokens 0..5 (token 5 is the window)
    b = [1, 1, 1, 1, 8, 6, 1, 1]  # used by the second event (tokens 1, 3, 4, 5, 6 are its candidates)
    keys = torch.tensor([[math.log(x), math.log(y)] for x, y in zip(a + [1, 1], b)])[None, None]
    q1, q2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])

    step(layer, keys[:, :, :6], q1.expand(1, 1, 6, 2), "prefill")
    # event 1 (generated 0, 6 > 4 tokens): local = [1, 4, 2, 8, 3] / 8 = [.125, .5, .25, 1, .375];
    # top 3 = tokens 3, 1, 4, kept with the window token 5; F stored for 1, 3, 4 (in position order)
    assert held(layer) == [1, 3, 4, 5]
    torch.testing.assert_close(layer.global_score[0, 0], torch.tensor([0.5, 1.0, 0.375]))

    step(layer, keys[:, :, 6:7], q1.view(1, 1, 1, 2), "decode")  # generated 1: no event
    assert held(layer) == [1, 3, 4, 5, 6]
    step(layer, keys[:, :, 7:8], q2.view(1, 1, 1, 2), "decode")  # generated 2: event 2 (6 > 4)
    # local over tokens 1, 3, 4, 5, 6 = b / 8 = [.125, .125, 1, .75, .125]
    # F = max(0.5 * F_prev, local) for 1, 3, 4: [max(.25, .125), max(.5, .125), max(.1875, 1)] = [.25, .5, 1]
    #   (tokens 1 and 3 keep their decayed score, token 4 takes its new local one);
    #   tokens 5 (the old window) and 6 have no stored score: F = local = .75, .125
    # top 3 = tokens 4 (1), 5 (.75), 3 (.5), kept with the window token 7
    assert held(layer) == [3, 4, 5, 7]
    torch.testing.assert_close(layer.global_score[0, 0], torch.tensor([0.5, 1.0, 0.75]))


def test_local_score_by_hand_with_gqa_and_a_causal_window():
    g = torch.Generator().manual_seed(0)
    keys, query = torch.randn(2, 2, 9, 4, generator=g), torch.randn(2, 4, 3, 4, generator=g)  # group 2
    logits = query @ keys.repeat_interleave(2, 1).transpose(-1, -2) * 0.5  # (2, 4, 3, 9)
    future = torch.arange(9)[None, :] > torch.arange(6, 9)[:, None]  # query i sits at token 6 + i
    probs = logits.masked_fill(future, float("-inf")).softmax(-1)
    local = probs.unflatten(1, (2, 2)).amax(2)[..., :6].mean(2)  # max over the group, drop the window
    torch.testing.assert_close(local_scores(query, keys, 0.5), local / local.amax(-1, keepdim=True))


def test_redundancy_by_hand():
    s = 1 / math.sqrt(2)
    # k0 and k2 are duplicates, k3 is within 45 degrees of all three others
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])[None, None]
    # cosine rows (diagonal 0):   k0 [0, 0, 1, s]   k1 [0, 0, 0, s]   k2 [1, 0, 0, s]   k3 [s, s, s, 0]
    # each row's most recent near-duplicate (cos > 0.5) escapes: k0 -> k3, k1 -> k3, k2 -> k3, k3 -> k2
    # column sums then: k0 1 + s (from k2, k3), k1 s (k3), k2 1 (k0), k3 0; mean over the 4 rows, softmax
    expected = torch.tensor([1 + s, s, 1.0, 0.0]).div(4).softmax(-1)
    torch.testing.assert_close(redundancy(keys)[0, 0], expected)
    # the later copy of a repeated key is penalised less than the earlier one
    assert redundancy(keys)[0, 0, 2] < redundancy(keys)[0, 0, 0]


def dense_redundancy(keys, threshold=0.5):
    """The definition, with the whole n x n cosine matrix."""
    unit = keys / (keys.norm(dim=-1, keepdim=True) + 1e-8)
    sim = unit @ unit.transpose(-1, -2)
    sim.diagonal(dim1=-2, dim2=-1).zero_()
    n = keys.shape[2]
    for idx in torch.cartesian_prod(*(torch.arange(s) for s in keys.shape[:2])).tolist():
        rows = sim[tuple(idx)]
        for i in range(n):
            dups = (rows[i] > threshold).nonzero().flatten()
            if len(dups):
                rows[i, dups[-1]] = 0
    return (sim.sum(dim=2) / n).softmax(dim=-1)


def test_redundancy_blocks_equal_the_dense_definition():
    # orthogonal-ish random keys in 16 dimensions rarely pass cos > 0.5, so most rows scan every block
    # (or find none); planted copies put some rows' latest near-duplicate in the first or last block
    keys = torch.randn(2, 2, 50, 16, generator=torch.Generator().manual_seed(3))
    keys[:, :, 45] = keys[:, :, 2] * 3  # row 2's latest copy is in the newest block
    keys[:, :, 1] = keys[:, :, 40] + 0.01  # row 40's latest copy is in the oldest block
    keys[1, 0, 30:] = keys[1, 0, 29]  # a run of copies: every row finds one at once
    for chunk in (4, 7, 64):
        torch.testing.assert_close(redundancy(keys, chunk=chunk), dense_redundancy(keys))
    torch.testing.assert_close(redundancy(keys, threshold=-0.2, chunk=8), dense_redundancy(keys, -0.2))


def test_redundancy_in_row_chunks_equals_one_block():
    keys = torch.randn(2, 3, 37, 8, generator=torch.Generator().manual_seed(1))
    keys[:, :, 20] = keys[:, :, 3] * 2  # some near-duplicates
    torch.testing.assert_close(redundancy(keys, chunk=5), redundancy(keys, chunk=512))


def test_redundancy_decides_between_equally_attended_tokens():
    # a zero query attends uniformly: every local score is 1, so s = 0.5 - 0.5 * red / max(red) and the
    # two least redundant of tokens 0..4 are kept with the window token 5 (budget 3, window 1).
    # Tokens 0, 1, 2 are copies of [1, 0]; k3 = [.3, .954], k4 = [-1, 0], k5 = [0, -1]. The only
    # near-duplicates are the copies: row 0 and row 1 spare k2, row 2 spares k1. Column sums of the
    # cosines left: k0 1 + 1 + .3 - 1 = 1.3, k1 1 + .3 - 1 = .3, k2 .3 - 1 = -.7, k3 .9 - .3 - .954 = -.354,
    # k4 -3 - .3 = -3.3: keep k4 and k2 - of three copies the latest survives.
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.3, 0.954], [-1.0, 0.0], [0.0, -1.0]])[None, None]
    layer = make_layer({"window": 1}, budget=3)
    step(layer, keys, torch.zeros(1, 1, 6, 2), "prefill")
    assert held(layer) == [2, 4, 5]
    assert redundancy(keys)[0, 0, :5].argsort()[:2].tolist() == [4, 2]
    # F (not s) is stored: both kept tokens have local score 1
    torch.testing.assert_close(layer.global_score[0, 0], torch.ones(2))


def test_cache_stays_between_budget_and_budget_plus_divide_length(tiny_llama):
    budget, divide = 12, 8
    method = build_method("gkv", {"window": 4, "divide_length": divide}, Compression(budget=budget))
    cache = KVCache(method, layer_windows(tiny_llama.config))
    lengths = []
    end_step = cache.end_step

    def recording(phase):
        end_step(phase)
        lengths.append([layer.get_seq_length() for layer in cache.layers])

    cache.end_step = recording
    gen = generate(tiny_llama, cache, random_prompt(40), None, 60, eos_ids=set())
    assert len(gen.tokens[0]) == 60 and len(lengths) == 60  # prefill + 59 decoding steps
    for k, per_layer in enumerate(lengths):  # k decoding steps done: an event every 8
        assert per_layer == [budget + k % divide] * 2
        assert all(budget <= n < budget + divide for n in per_layer)
    for layer in cache.layers:
        pos = layer.positions
        assert (pos.diff(dim=-1) > 0).all() and pos.max() == layer.seen - 1
        assert pos[..., -4:].tolist() == [[list(range(layer.seen - 4, layer.seen))] * 2]  # the window


def test_short_prompt_is_left_alone_until_it_outgrows_the_budget():
    layer = make_layer({"window": 2, "divide_length": 2}, budget=6)
    keys = torch.randn(1, 1, 8, 4, generator=torch.Generator().manual_seed(2))
    step(layer, keys[:, :, :5], torch.randn(1, 1, 5, 4), "prefill")  # 5 <= 6: nothing happens
    assert layer.global_score is None and held(layer) == [0, 1, 2, 3, 4]
    step(layer, keys[:, :, 5:6], torch.randn(1, 1, 1, 4), "append")  # appended, never compressed
    step(layer, keys[:, :, 6:7], torch.randn(1, 1, 1, 4), "decode")  # generated 1: no event
    assert layer.get_seq_length() == 7 and layer.generated == 1
    step(layer, keys[:, :, 7:8], torch.randn(1, 1, 1, 4), "decode")  # generated 2: 8 > 6, event
    assert layer.get_seq_length() == 6 and held(layer)[-2:] == [6, 7]
    assert layer.global_score.shape == (1, 1, 4)


@pytest.mark.parametrize("comp,after_append", [({"ratio": 2}, 7), ({"budget": 4}, 4)])
def test_an_appended_question_is_cut_back_to_the_budget_in_budget_mode_only(comp, after_append):
    layer = make_layer({"window": 2, "divide_length": 4}, **comp)
    keys = torch.randn(1, 1, 11, 4, generator=torch.Generator().manual_seed(5))
    step(layer, keys[:, :, :8], torch.randn(1, 1, 8, 4), "prefill")  # 8 -> 4 (half, or the budget)
    step(layer, keys[:, :, 8:], torch.randn(1, 1, 3, 4), "append")  # a 3-token question: 4 + 3 = 7
    assert layer.get_seq_length() == after_append
    assert held(layer)[-2:] == [9, 10] and layer.generated == 0  # the window stays; no generated token


def test_a_budget_below_the_window_keeps_the_last_tokens():
    layer = make_layer({"window": 16}, ratio=8)  # 40 tokens -> budget 5 < window 16
    step(layer, torch.randn(1, 2, 40, 4), torch.randn(1, 4, 40, 4), "prefill")
    assert layer.budget == 5 and layer.positions.tolist() == [[list(range(35, 40))] * 2]


@pytest.mark.parametrize("params", [{"window": 0}, {"divide_length": 0}, {"alpha": 1.5}, {"mix_lambda": -0.1}])
def test_bad_parameters_are_rejected(params):
    with pytest.raises(ConfigError):
        build_method("gkv", params, Compression(ratio=2))
