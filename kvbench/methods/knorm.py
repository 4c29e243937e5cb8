from kvbench.methods import register
from kvbench.methods.base import Method, ScoreKeepLayer


class KNormLayer(ScoreKeepLayer):
    keep_highest = False  # the smallest key norms are kept

    def score(self):
        return self.keys.float().norm(dim=-1)


@register
class KNorm(Method):
    """KNorm (Devoto et al. 2024): keep the keys with the smallest L2 norm, per KV head.

    Low-norm keys tend to receive high attention, so the prompt is cut to the capacity by keeping its
    lowest-norm keys (and their values). Attention-free: no queries needed. Compresses the prefill
    only, as kvpress's ``KnormPress`` does for long-context tasks; in ratio mode appended and decoded
    tokens are added uncompressed. Unlike the paper's experiments, the first layers are compressed
    like the others, so every method compresses every layer by the same ratio.

    Budget mode (a hard capacity): after an appended question or a decoding step, once the cache holds
    ``evict_every`` tokens more than the budget (every step by default), the held keys' norms decide
    again which budget tokens stay; so it holds at most ``budget + evict_every - 1`` tokens. A chunked
    prefill keeps the lowest-norm keys after every chunk.
    """

    name = "knorm"
    layer = KNormLayer
    phases = ("prefill",)
