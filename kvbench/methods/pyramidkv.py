import math
from dataclasses import dataclass

from kvbench.methods import register
from kvbench.methods.base import Method
from kvbench.params import param
from kvbench.methods.snapkv import SnapKVLayer, SnapKVParams


@dataclass
class PyramidKVParams(SnapKVParams):
    #: observation window, always kept (64 in kvpress's PyramidKVPress and in methods.md)
    window: int = param(64, ge=1)
    #: steepness of the pyramid: the deepest layer selects (capacity - window) / beta tokens
    beta: int = param(20, ge=1)


def layer_budgets(n_layers: int, capacity: int, window: int, beta: int, n_tokens: int) -> list[int]:
    """Tokens kept by each of ``n_layers`` layers (shallowest first), summing to ``n_layers * capacity``.

    Each layer keeps the window plus a share of selected tokens falling linearly with depth from
    ``hi = 2 (capacity - w) - lo`` to ``lo = (capacity - w) / beta``, whose mean is ``capacity - w``.
    As in KVCache-Factory, ``hi`` is capped at the ``n_tokens - w`` tokens there are to select (and
    ``lo`` raised to keep the mean). Shares are rounded by largest remainder so the total is exact.
    """
    w = min(window, capacity)
    mean = capacity - w
    if n_layers == 1 or mean == 0:
        return [capacity] * n_layers
    lo = mean / beta
    hi = min(2 * mean - lo, n_tokens - w)
    lo = 2 * mean - hi
    shares = [hi - (hi - lo) * i / (n_layers - 1) for i in range(n_layers)]
    floors = [math.floor(s) for s in shares]
    missing = n_layers * mean - sum(floors)
    for i in sorted(range(n_layers), key=lambda i: floors[i] - shares[i])[:missing]:
        floors[i] += 1
    return [w + s for s in floors]


class PyramidKVLayer(SnapKVLayer):
    def kept_tokens(self) -> int:
        layers = self.method.compressed_layers
        if layers is None:
            raise RuntimeError("pyramidkv needs the model's layer list: call its setup(model) first")
        p = self.method.params
        return layer_budgets(len(layers), self.capacity, p.window, p.beta, self.seen)[layers.index(self.layer_idx)]


@register
class PyramidKV(Method):
    """PyramidKV (Cai et al. 2024): SnapKV's scores with budgets falling linearly with depth.

    Shallow layers, whose attention is spread out, keep more tokens; deep layers, whose attention is
    concentrated, keep fewer (:func:`layer_budgets`). The budgets average the capacity, so the total
    over layers - and the memory ratio - is the nominal one. Depth counts only the layers the method
    compresses (Gemma 3's sliding-window layers are not among them). As in the reference code, a
    prompt no longer than the capacity is not compressed. Prefill only, like SnapKV; as there, the
    per-layer budgets first act in ``end_step``, so the prefill is shared between ratios.
    """

    name = "pyramidkv"
    Params = PyramidKVParams
    layer = PyramidKVLayer
    phases = ("prefill",)
