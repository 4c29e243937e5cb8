from kvbench.methods import register
from kvbench.methods.base import Method, Phase, ScoreKeepLayer
from kvbench.methods.scores import attention_probs, last_queries


class TOVALayer(ScoreKeepLayer):
    state_fields = ScoreKeepLayer.state_fields + ("query", "scaling")

    def __init__(self, method, layer_idx):
        super().__init__(method, layer_idx)
        self.query, self.scaling = None, 1.0  # the last query seen, and its scaling

    def observe(self, query, keys, scaling):
        self.query, self.scaling = last_queries(query, 1), scaling

    def score(self):
        # the current (last) query's attention, averaged over all the layer's heads: TOVA's policy is
        # layer-wise, every KV head keeps the same tokens
        return attention_probs(self.query, self.keys, self.scaling)[:, :, 0].mean(dim=1, keepdim=True)

    def compress(self, phase: Phase) -> None:
        if phase == "decode" and self.get_seq_length() > self.capacity:
            # one token over: the lowest-scoring one leaves
            self.evict_one(self.score().argmin(dim=-1, keepdim=True).expand(-1, self.keys.shape[1], -1))
            return
        super().compress(phase)


@register
class TOVA(Method):
    """TOVA, Token Omission Via Attention (Oren et al. 2024, "Transformers are Multi-State RNNs").

    Once the cache holds more than its capacity, the tokens with the lowest attention from the current
    query - averaged over all query heads of the layer, so all heads of a layer keep the same tokens,
    as in the paper - are dropped. At the end of the prefill (and of an appended question) the last
    query's attention cuts the cache to the capacity in one go; each decoding step then drops the
    single lowest-scoring token (the new token itself included, as in the paper; kvpress forces it in).
    The prefill forward only records the last query, so it is shared between ratios. With a chunked
    prefill (``prefill_chunk``) the last query of each chunk cuts the cache to the capacity after it.
    """

    name = "tova"
    layer = TOVALayer
    phases = ("prefill", "append", "decode")
