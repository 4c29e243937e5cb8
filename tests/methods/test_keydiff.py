"""KeyDiff on hand-made keys: minus the cosine similarity to the mean normalised key."""

import math

import torch

from test_baselines import make_layer, step


def test_keydiff_keeps_the_keys_least_like_the_mean_direction():
    # key directions 0, 90, 45 and 180 degrees (norms 3, 1, 1.41, 1): the normalised keys average to
    # (0.177, 0.427), at 67.5 degrees, so the similarities are cos 67.5, cos 22.5, cos 22.5, cos 112.5
    keys = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])[None, None]
    values = torch.arange(8.0).reshape(1, 1, 4, 2)
    layer = make_layer("keydiff", ratio=2)
    c, s = math.cos(math.radians(67.5)), math.cos(math.radians(22.5))
    step(layer, keys, values=values, phase="decode")  # not compressing in ratio mode: scores only
    torch.testing.assert_close(layer.score()[0, 0], torch.tensor([-c, -s, -s, c]))
    layer = make_layer("keydiff", ratio=2)
    step(layer, keys, values=values)
    # the two least typical directions, whatever their norm (KNorm would keep tokens 1 and 3)
    assert layer.positions.tolist() == [[[0, 3]]]
    assert torch.equal(layer.values[0, 0], values[0, 0, [0, 3]])
    step(layer, torch.ones(1, 1, 1, 2), phase="decode")  # ratio mode: decoding adds, never evicts
    assert layer.positions.tolist() == [[[0, 3, 4]]]


def test_keydiff_scores_each_head_against_its_own_anchor():
    head = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    turned = torch.stack([-head[:, 1], head[:, 0]], dim=-1)  # the same keys turned by 90 degrees
    layer = make_layer("keydiff", budget=2)
    step(layer, torch.stack([head, turned])[None])
    # each head's anchor turns with its keys, so both keep the same tokens; one anchor for the layer
    # (at 112.5 degrees for the first head) would rank its token 2 level with token 3
    assert layer.positions.tolist() == [[[0, 3], [0, 3]]]
