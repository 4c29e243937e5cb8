from dataclasses import dataclass

from kvbench.methods import register
from kvbench.methods.base import Method, ScoreKeepLayer
from kvbench.params import param
from kvbench.methods.scores import last_queries, top_and_recent, window_scores


@dataclass
class SnapKVParams:
    #: observation window: the last prompt queries whose attention scores the earlier tokens; the
    #: window's own tokens are always kept (32 in FasterDecoding/SnapKV)
    window: int = param(32, ge=1)
    #: width of the 1-D average pooling of the scores along the token axis
    kernel: int = param(5, ge=1, odd=True)


class SnapKVLayer(ScoreKeepLayer):
    state_fields = ScoreKeepLayer.state_fields + ("window_query", "scaling")

    def __init__(self, method, layer_idx):
        super().__init__(method, layer_idx)
        self.window_query, self.scaling = None, 1.0  # the last window of queries seen, and its scaling

    def observe(self, query, keys, scaling):
        # only the observation window is needed, and only if this step turns out to be the prefill
        self.window_query, self.scaling = last_queries(query, self.method.params.window), scaling

    def kept_tokens(self) -> int:
        """Tokens this layer keeps of the prompt (the same for every layer in SnapKV)."""
        return self.capacity

    def window(self) -> int:
        """The observation window in use: a window longer than what is kept shrinks to it (short
        prompts at high ratios)."""
        return min(self.method.params.window, self.window_query.shape[2], self.kept_tokens())

    def score(self):
        """Pooled window attention of every token before the window (the window is kept whole)."""
        query = self.window_query[:, :, self.window_query.shape[2] - self.window():]
        return window_scores(query, self.keys, self.scaling, self.method.params.kernel)

    def choose(self, scores):
        return top_and_recent(scores, self.get_seq_length(), self.kept_tokens(), self.window())


@register
class SnapKV(Method):
    """SnapKV (Li et al. 2024; FasterDecoding/SnapKV): prompt compression by observation window.

    At the end of the prefill, every token before the last ``window`` prompt tokens is scored by the
    attention it gets from those ``window`` queries (summed over them, mean over the query heads of a
    GQA group), smoothed by average pooling of width ``kernel``; the layer keeps the top
    ``capacity - window`` of them plus the window itself. Compresses the prefill only: an appended
    question (``compress: context``) and decoded tokens are added uncompressed, so the cache grows by
    one token per generated token after prefill. Prompts no longer than the capacity are untouched.
    The prefill forward only records the observation window's queries, so it is shared between ratios.
    """

    name = "snapkv"
    Params = SnapKVParams
    layer = SnapKVLayer
    phases = ("prefill",)
