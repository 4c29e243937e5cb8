from kvbench.methods import register
from kvbench.methods.base import EvictionLayer, Method, Phase


class KNormLayer(EvictionLayer):
    def compress(self, phase: Phase) -> None:
        if phase != "prefill" or self.get_seq_length() <= self.capacity:
            return
        norms = self.keys.float().norm(dim=-1)
        self.keep(norms.topk(self.capacity, dim=-1, largest=False).indices)


@register
class KNorm(Method):
    """KNorm (Devoto et al. 2024): keep the keys with the smallest L2 norm, per KV head.

    Low-norm keys tend to receive high attention, so the prompt is cut to the capacity by keeping its
    lowest-norm keys (and their values). Attention-free: no queries needed. Compresses the prefill
    only, as kvpress's ``KnormPress`` does for long-context tasks; appended and decoded tokens are
    added uncompressed. Unlike the paper's experiments, the first layers are compressed like the
    others, so every method compresses every layer by the same ratio.
    """

    name = "knorm"
    phases = ("prefill",)
    shares_prefill = True  # attention-free: the prefill does not depend on the ratio

    def make_layer(self, layer_idx: int) -> KNormLayer:
        return KNormLayer(self, layer_idx)
