from dataclasses import dataclass

from kvbench.methods import register
from kvbench.methods.base import EvictionLayer, Method, Phase
from kvbench.errors import ConfigError
from kvbench.methods.scores import last_queries, top_and_recent, window_scores


@dataclass
class SnapKVParams:
    #: observation window: the last prompt queries whose attention scores the earlier tokens; the
    #: window's own tokens are always kept (32 in FasterDecoding/SnapKV)
    window: int = 32
    #: width of the 1-D average pooling of the scores along the token axis (odd)
    kernel: int = 5

    def validate(self):
        if self.window < 1:
            raise ConfigError(f"window must be >= 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ConfigError(f"kernel must be an odd number >= 1, got {self.kernel}")


class SnapKVLayer(EvictionLayer):
    state_fields = EvictionLayer.state_fields + ("window_query", "scaling")

    def __init__(self, method, layer_idx):
        super().__init__(method, layer_idx)
        self.window_query, self.scaling = None, 1.0  # the last window of queries seen, and its scaling

    def observe(self, query, keys, scaling):
        # only the observation window is needed, and only if this step turns out to be the prefill
        self.window_query, self.scaling = last_queries(query, self.method.params.window), scaling

    def kept_tokens(self) -> int:
        """Tokens this layer keeps of the prompt (the same for every layer in SnapKV)."""
        return self.capacity

    def compress(self, phase: Phase) -> None:
        query, self.window_query = self.window_query, None
        n = self.get_seq_length()
        if phase != "prefill" or n <= self.capacity:
            return
        keep = self.kept_tokens()
        # a window longer than what is kept shrinks to it (short prompts at high ratios)
        window = min(self.method.params.window, query.shape[2], keep)
        scores = window_scores(query[:, :, query.shape[2] - window:], self.keys, self.scaling,
                               self.method.params.kernel)
        self.keep(top_and_recent(scores, n, keep, window))


@register
class SnapKV(Method):
    """SnapKV (Li et al. 2024; FasterDecoding/SnapKV): prompt compression by observation window.

    At the end of the prefill, every token before the last ``window`` prompt tokens is scored by the
    attention it gets from those ``window`` queries (summed over them, mean over the query heads of a
    GQA group), smoothed by average pooling of width ``kernel``; the layer keeps the top
    ``capacity - window`` of them plus the window itself. Compresses the prefill only: an appended
    question (``compress: context``) and decoded tokens are added uncompressed, so the cache grows by
    one token per generated token after prefill. Prompts no longer than the capacity are untouched.
    """

    name = "snapkv"
    Params = SnapKVParams
    phases = ("prefill",)
    needs_queries = True
    shares_prefill = True  # the prefill forward only records the observation window's queries

    def make_layer(self, layer_idx: int) -> SnapKVLayer:
        return SnapKVLayer(self, layer_idx)
