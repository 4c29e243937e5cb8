import torch

from kvbench.methods import register
from kvbench.methods.base import Method, ScoreKeepLayer


class RandomLayer(ScoreKeepLayer):
    def __init__(self, method, layer_idx):
        super().__init__(method, layer_idx)
        # one stream per (seed, layer): results depend on the seed only, not on the order layers run
        self.generator = torch.Generator().manual_seed(method.seed * 100_003 + layer_idx)

    def score(self):
        return torch.rand(self.keys.shape[:3], generator=self.generator)


@register
class Random(Method):
    """Random eviction: each KV head of each layer keeps a uniformly random subset of ``capacity``
    prompt tokens, drawn from a generator seeded with the run's seed and the layer index, so runs with
    the same seed keep the same tokens. Compresses the prefill only, as kvpress's ``RandomPress``.
    The prefill is shared between ratios: the generator is first used in ``end_step``.

    Budget mode (a hard capacity): after an appended question or a decoding step, once the cache holds
    ``evict_every`` tokens more than the budget (every step by default), a fresh draw from the same
    generator keeps budget tokens of those held; so it holds at most ``budget + evict_every - 1``."""

    name = "random"
    layer = RandomLayer
    phases = ("prefill",)
