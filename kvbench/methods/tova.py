from kvbench.methods import register
from kvbench.methods.base import EvictionLayer, Method, Phase
from kvbench.methods.scores import attention_probs, last_queries


class TOVALayer(EvictionLayer):
    state_fields = EvictionLayer.state_fields + ("query", "scaling")

    def __init__(self, method, layer_idx):
        super().__init__(method, layer_idx)
        self.query, self.scaling = None, 1.0  # the last query seen, and its scaling

    def observe(self, query, keys, scaling):
        self.query, self.scaling = last_queries(query, 1), scaling

    def compress(self, phase: Phase) -> None:
        query, self.query = self.query, None
        n = self.get_seq_length()
        if n <= self.capacity:
            return
        # the current (last) query's attention, averaged over all the layer's heads: TOVA's policy is
        # layer-wise, every KV head keeps the same tokens
        scores = attention_probs(query, self.keys, self.scaling)[:, :, 0].mean(dim=1, keepdim=True)
        heads = self.keys.shape[1]
        if phase == "decode":  # one token over: the lowest-scoring one leaves
            self.evict_one(scores.argmin(dim=-1, keepdim=True).expand(-1, heads, -1))
            return
        self.keep(scores.topk(self.capacity, dim=-1).indices.expand(-1, heads, -1))


@register
class TOVA(Method):
    """TOVA, Token Omission Via Attention (Oren et al. 2024, "Transformers are Multi-State RNNs").

    Once the cache holds more than its capacity, the tokens with the lowest attention from the current
    query - averaged over all query heads of the layer, so all heads of a layer keep the same tokens,
    as in the paper - are dropped. At the end of the prefill (and of an appended question) the last
    query's attention cuts the cache to the capacity in one go; each decoding step then drops the
    single lowest-scoring token (the new token itself included, as in the paper; kvpress forces it in).
    """

    name = "tova"
    phases = ("prefill", "append", "decode")
    needs_queries = True
    shares_prefill = True  # the prefill forward only records the last query

    def make_layer(self, layer_idx: int) -> TOVALayer:
        return TOVALayer(self, layer_idx)
