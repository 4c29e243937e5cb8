import torch.nn.functional as F

from kvbench.methods import register
from kvbench.methods.base import Method, ScoreKeepLayer


class KeyDiffLayer(ScoreKeepLayer):
    def score(self):
        """Minus the cosine similarity of every key to the anchor: the mean of the head's
        L2-normalised keys. The keys least like the others score highest."""
        keys = self.keys.float()
        anchor = F.normalize(keys, dim=-1).mean(dim=2, keepdim=True)
        return -F.cosine_similarity(keys, anchor, dim=-1)


@register
class KeyDiff(Method):
    """KeyDiff (Park et al. 2025, arXiv 2504.15364; kvpress's ``KeyDiffPress``): keep the most
    distinctive keys, per KV head.

    Attention-free: every held key is scored by minus its cosine similarity to the anchor, the mean
    of the head's L2-normalised keys, and the ``capacity`` highest scores are kept. A key of zero norm
    has similarity 0 (``F.cosine_similarity``'s epsilon). Compresses the prefill once, over the whole
    prompt, as kvpress does by default: the paper processes the prompt block by block, evicting after
    each block (kvpress's ``BlockPress`` around ``KeyDiffPress``), which kvbench does not offer.
    In ratio mode appended and decoded tokens are added uncompressed. Budget mode (a hard capacity):
    after an appended question or a decoding step, once the cache holds ``evict_every`` tokens more
    than the budget, the held keys are scored against their own anchor again and the budget kept; so it
    holds at most ``budget + evict_every - 1`` tokens. No parameters; the prefill is shared between
    ratios.
    """

    name = "keydiff"
    layer = KeyDiffLayer
    phases = ("prefill",)
