from kvbench.methods import register
from kvbench.methods.base import Method


@register
class Full(Method):
    """The uncompressed cache: every token of every layer is kept. Has no ratio (recorded as 1)."""

    name = "full"
    uses_compression = False
    shares_prefill = False  # a single setting: there is no other ratio to share a prefill with
