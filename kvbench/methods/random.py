import torch

from kvbench.methods import register
from kvbench.methods.base import EvictionLayer, Method, Phase


class RandomLayer(EvictionLayer):
    def __init__(self, method, layer_idx):
        super().__init__(method, layer_idx)
        # one stream per (seed, layer): results depend on the seed only, not on the order layers run
        self.generator = torch.Generator().manual_seed(method.seed * 100_003 + layer_idx)

    def compress(self, phase: Phase) -> None:
        if phase != "prefill" or self.get_seq_length() <= self.capacity:
            return
        draws = torch.rand(self.keys.shape[:3], generator=self.generator)
        self.keep(draws.topk(self.capacity, dim=-1).indices.to(self.keys.device))


@register
class Random(Method):
    """Random eviction: each KV head of each layer keeps a uniformly random subset of ``capacity``
    prompt tokens, drawn from a generator seeded with the run's seed and the layer index, so runs with
    the same seed keep the same tokens. Compresses the prefill only, as kvpress's ``RandomPress``."""

    name = "random"
    phases = ("prefill",)
    shares_prefill = True  # the draws come from the layer's own generator, first used in end_step

    def make_layer(self, layer_idx: int) -> RandomLayer:
        return RandomLayer(self, layer_idx)
