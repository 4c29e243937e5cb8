from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.errors import ConfigError
from kvbench.methods import register
from kvbench.methods.base import Method, Phase, ScoreKeepLayer
from kvbench.params import param
from kvbench.methods.scores import attention_probs, last_queries, pool, recent_queries, top_and_recent


@dataclass
class CakeParams:
    #: observation window: the last prompt queries that score the tokens before them; always kept
    #: (``window_size`` 32 in the authors' code)
    window: int = param(32, ge=2)
    #: width of the average pooling of the eviction indicator (5, fixed in the authors' code)
    kernel: int = param(5, ge=1, odd=True)
    #: weight of the attention variance in the eviction indicator (``gamma`` 200)
    gamma: float = param(200.0, ge=0)
    #: temperature of the entropy in the layer preference (``tau1``; 1 unless tuned per model)
    tau1: float = param(1.0, ge=0)
    #: temperature of the variance in the layer preference (``tau2``; 1 unless tuned per model)
    tau2: float = param(1.0, ge=0)


def layer_preference(probs: torch.Tensor, tau1: float, tau2: float) -> float:
    """CAKE's preference ``H^(1/tau1) * V^(1/tau2)`` of one layer, from the window's attention
    ``probs`` (..., w, m) to the m tokens before the window, every batch row and head summed:
    ``H`` (spatial dispersion) = the entropy ``-sum p log(p + 1e-10)``; ``V`` (temporal shift) = the
    variance over the w window queries (unbiased), summed over the tokens."""
    entropy = -(probs * (probs + 1e-10).log()).sum()
    shift = probs.var(dim=-2).sum()
    return float(entropy ** (1 / tau1) * shift ** (1 / tau2))


def eviction_indicator(probs: torch.Tensor, gamma: float, kernel: int) -> torch.Tensor:
    """CAKE's eviction indicator (batch, kv_heads, m) from the window's attention ``probs``
    (batch, kv_heads, group, w, m): mean plus ``gamma`` times the variance over the w window queries,
    average-pooled along the tokens, then averaged over the query heads of each KV head."""
    return pool(probs.mean(dim=-2) + gamma * probs.var(dim=-2), kernel).mean(dim=2)


def _spread(budgets: list[int], amount: int, cap: int) -> None:
    """Add ``amount`` tokens over the layers below ``cap``: evenly, the remainder one token each to the
    first of them, again while a layer would go over the cap."""
    while amount > 0:
        open_layers = [i for i, b in enumerate(budgets) if b < cap]
        each, extra = divmod(amount, len(open_layers))
        for rank, i in enumerate(open_layers):
            added = min(cap - budgets[i], each + (rank < extra))
            budgets[i] += added
            amount -= added


def layer_budgets(preferences: list[float], total: int, cap: int) -> list[int]:
    """Tokens each layer selects besides its window, summing to ``total`` (<= ``cap`` per layer,
    ``total <= len(preferences) * cap``), in proportion to the layers' preferences, as the authors'
    ``adjust_budgets``: shares truncated to integers; the excess of layers over ``cap`` (the tokens
    there are to select) then the truncation deficit spread evenly over the layers below the cap, the
    remainder to the first ones. Where one pass of the authors' code can leave a layer over the cap,
    the spreading repeats. Preferences all zero give equal shares."""
    weight = sum(preferences)
    shares = [p / weight * total for p in preferences] if weight > 0 else [total / len(preferences)] * len(preferences)
    budgets = [int(s) for s in shares]
    excess = sum(max(0, b - cap) for b in budgets)
    budgets = [min(b, cap) for b in budgets]
    _spread(budgets, excess, cap)
    _spread(budgets, total - sum(budgets), cap)
    return budgets


class CakeLayer(ScoreKeepLayer):
    state_fields = ScoreKeepLayer.state_fields + ("window_query", "query", "scaling", "preference", "indicator")

    def __init__(self, method, layer_idx):
        super().__init__(method, layer_idx)
        #: the other layers of the same cache (:meth:`Cake.make_layer`), this one included
        self.group: list[CakeLayer] = [self]
        self.window_query = None  # the sequence's last ``window`` queries: the observation window
        self.query, self.scaling = None, 1.0  # the step's own last ``window`` queries, and the scaling
        #: the step's preference (a float) and indicator (batch, kv_heads, n - window), computed when a
        #: layer of the cache first needs them (:meth:`statistics`)
        self.preference = self.indicator = None
        #: the capacity every layer has before the layers share it out (``capacity`` becomes this layer's)
        self.mean_capacity: int | None = None

    def observe(self, query, keys, scaling):
        window = self.method.params.window
        # the observation window spans steps (a prefill in chunks shorter than the window); the
        # eviction after the prefill uses the step's own queries, as the authors' decoding step does
        self.window_query = recent_queries(self.window_query, query, window)
        self.query, self.scaling = last_queries(query, window), scaling
        self.preference = self.indicator = None

    def statistics(self) -> float:
        """The layer's preference for this step, computed with its indicator on first use: by the
        cache's first layer to compress, before any layer has evicted."""
        if self.preference is None:
            p = self.method.params
            older = self.get_seq_length() - p.window
            probs = attention_probs(self.window_query, self.keys, self.scaling, reduce="none")[..., :older]
            self.preference = layer_preference(probs, p.tau1, p.tau2)
            self.indicator = eviction_indicator(probs, p.gamma, p.kernel)
        return self.preference

    def score(self):
        """After the prefill: the step's last (up to ``window``) queries' mean attention to the tokens
        before the window, pooled (the authors' eviction after the prefill; one query when decoding)."""
        older = self.get_seq_length() - self.method.params.window
        probs = attention_probs(self.query, self.keys, self.scaling)[..., :older].mean(dim=2)
        return pool(probs, self.method.params.kernel)

    def compress(self, phase: Phase) -> None:
        n, window = self.get_seq_length(), self.method.params.window
        if self.mean_capacity is None:
            self.mean_capacity = self.capacity
        if n <= self.capacity:
            return
        if self.mean_capacity <= window:  # the window alone fills the capacity: every layer keeps its last tokens
            self.keep(torch.arange(n - self.capacity, n, device=self.keys.device).expand(*self.keys.shape[:2], -1))
            return
        if phase == "prefill":
            # every layer of the cache holds the same prompt: their preferences share out the total
            selected = layer_budgets([layer.statistics() for layer in self.group],
                                     len(self.group) * (self.mean_capacity - window), n - window)
            self.capacity = window + selected[self.group.index(self)]
            scores = self.indicator
        else:
            scores = self.score()
        self.keep(self.choose(scores))

    def choose(self, scores):
        """The ``capacity - window`` best of the tokens before the window, and the window."""
        return top_and_recent(scores, self.get_seq_length(), self.capacity, self.method.params.window)


@register
class Cake(Method):
    """CAKE (Qin et al. 2025, "Cascading and Adaptive KV cache Eviction with Layer Preferences", ICLR
    2025; authors' code antgroup/cakekv, read in its public copies): per-layer budgets from each
    layer's attention dispersion and shift, tokens chosen by an attention-shift tolerant indicator.

    At the end of the prefill, each layer's attention from the last ``window`` prompt queries to the
    tokens before them gives (:func:`layer_preference`, :func:`eviction_indicator`): its preference
    ``P = H^(1/tau1) V^(1/tau2)`` (entropy: how spread the attention is; variance over the window
    queries: how much it shifts), summed over the batch and the heads; and per KV head the indicator
    ``mean + gamma * variance`` of each token's attention over the window queries, pooled (kernel 5)
    and averaged over the group's query heads. The layers share ``L * (capacity - window)`` selected
    tokens in proportion to ``P`` (:func:`layer_budgets`, at most the ``n - window`` tokens there are),
    and each keeps its best-scoring tokens plus the window: the layers' budgets sum to ``L x
    capacity``, so the memory ratio is the nominal one while each layer holds its own number of
    tokens (reported per layer). Budgets are shared by a batch's sequences (the preference sums the
    batch, as the authors' code). After the prefill, as the authors' code, each layer is held at its
    budget: after every step (a decoded token, or an appended question with ``compress: context``),
    the tokens before the window are scored by the pooled mean attention of the step's last
    ``window`` queries (the current query when decoding) and the lowest leave.

    What differs from the authors' code:

    * cascading: the authors evict during the prefill forward, layer by layer, each stage sharing the
      total among the layers seen so far, so the prompt's cache never exceeds the total budget.
      kvbench compresses after the forward step, so it allocates once, with every layer's preference:
      these are the budgets the cascade ends with, and the top-budget tokens of the same indicator are
      the ones its successive cuts keep (except where a stage's budget was below the final one: the
      cascade cannot take evicted tokens back). Peak memory during the prefill is therefore not
      reduced, and is reported as such;
    * a prompt is compressed once it is longer than the capacity (the authors': longer than the cache
      size plus the window); a capacity no larger than the window keeps the last ``capacity`` tokens
      of every layer (the authors' code requires a cache larger than the window);
    * ``tau1``, ``tau2`` default to 1 (the authors' code default; they tune them per model and budget).

    Budget mode: the budget is the mean capacity, so it bounds the total over layers (hence the
    memory), not each layer. A chunked prefill (``prefill_chunk``) shares the budget out after every
    chunk, with each layer's last ``window`` queries (across chunks) and the tokens it holds then.
    Depth counts only the compressed layers (not Gemma 3's sliding-window ones). The prefill forward only records the preference and the indicator, so it is
    shared between ratios.
    """

    name = "cake"
    Params = CakeParams
    layer = CakeLayer
    phases = ("prefill", "append", "decode")
    budget_unit = "tokens, mean over layers (per-layer shares by layer preference)"
    budget_per_layer = False

    @classmethod
    def check_params(cls, params) -> None:
        for name in ("tau1", "tau2"):
            if not getattr(params, name) > 0:
                raise ConfigError(f"cake.{name}={getattr(params, name)!r}: expected a number > 0")

    def make_layer(self, layer_idx: int) -> CakeLayer:
        layer = super().make_layer(layer_idx)
        # a cache builds its layers in order: a layer index that does not increase starts a new cache
        group = getattr(self, "_group", None)
        if group is None or layer_idx <= group[-1].layer_idx:
            group = self._group = []
        group.append(layer)
        layer.group = group
        return layer
