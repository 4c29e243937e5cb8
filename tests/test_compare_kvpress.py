"""scripts/compare_kvpress.py: its comparison of kept positions and its recovery of the positions a
kvpress press kept (the script itself needs kvpress's own environment and is not run here)."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_kvpress.py"
spec = importlib.util.spec_from_file_location("compare_kvpress", SCRIPT)
compare_kvpress = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_kvpress)


def test_jaccard_per_layer_and_head():
    ours = [[[0, 1, 2, 3], [0, 5]], [[7], []]]
    theirs = [[[0, 1, 2, 4], [0, 5]], [[8], []]]
    result = compare_kvpress.compare_kept(ours, theirs)
    # {0,1,2} of {0,1,2,3,4}; identical; disjoint; both empty
    assert result["jaccard"] == [[3 / 5, 1.0], [0.0, 1.0]]
    assert result["mean"] == pytest.approx((0.6 + 1 + 0 + 1) / 4)
    assert result["min"] == 0.0 and result["min_at"] == [1, 0]
    assert result["count_bound"] == 1.0  # every head keeps as many on both sides
    assert result["kept_ours"] == result["kept_theirs"] == (4 + 2 + 1 + 0) / 4


def test_count_bound_separates_how_many_from_which():
    # 4 kept against 5: the best a 4-set and a 5-set can share is 4 of 5
    result = compare_kvpress.compare_kept([[[0, 1, 2, 3]]], [[[0, 1, 2, 3, 4]]])
    assert result["mean"] == result["count_bound"] == pytest.approx(4 / 5)
    assert result["kept_ours"] == 4 and result["kept_theirs"] == 5


def test_shapes_must_match():
    with pytest.raises(ValueError, match="layer/head shapes differ"):
        compare_kvpress.compare_kept([[[0], [1]]], [[[0]]])


def test_positions_of_gathered_keys():
    keys = torch.arange(2 * 5 * 3, dtype=torch.float32).view(1, 2, 5, 3)
    idx = torch.tensor([[4, 0], [2, 3]])  # per head, in the order a top-k returns them
    kept = keys.gather(2, idx[None, :, :, None].expand(1, 2, 2, 3))
    assert compare_kvpress.kept_positions(keys, kept, None) == [[0, 4], [2, 3]]


def test_positions_of_masked_keys():
    keys = torch.randn(1, 2, 4, 3)
    masked = (torch.tensor([0, 0, 0]), torch.tensor([0, 1, 1]), torch.tensor([2, 0, 3]))
    assert compare_kvpress.kept_positions(keys, keys, masked) == [[0, 1, 3], [1, 2]]


def test_identical_keys_are_refused():
    keys = torch.zeros(1, 1, 3, 2)
    with pytest.raises(RuntimeError, match="identical keys"):
        compare_kvpress.kept_positions(keys, keys[:, :, :1], None)
