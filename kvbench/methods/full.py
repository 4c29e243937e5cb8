from kvbench.methods import register
from kvbench.methods.base import KVLayer, Method


@register
class Full(Method):
    """The uncompressed cache: every token of every layer is kept. Has no ratio (recorded as 1)."""

    name = "full"
    uses_compression = False

    def make_layer(self, layer_idx: int) -> KVLayer:
        return KVLayer(self, layer_idx)
