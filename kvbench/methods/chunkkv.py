"""ChunkKV: chunk-level selection over any score-based method (see :class:`ChunkKV`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.methods import register, registered
from kvbench.methods.base import MethodOverBase, ScoreKeepLayer
from kvbench.params import param


@dataclass
class ChunkKVParams:
    #: the method whose scores are chunked (a score-based method that compresses the prefill)
    base: str = param("snapkv")
    #: tokens per chunk (kvpress's ``chunk_length``)
    chunk_length: int = param(20, ge=1)


def scorer_methods() -> list[str]:
    """The methods ChunkKV can use as its base: score-and-keep methods that compress the prefill."""
    return [name for name, cls in registered().items()
            if issubclass(cls.layer, ScoreKeepLayer) and "prefill" in cls.phases and name != ChunkKV.name
            and not cls.layer.ragged_heads]


def chunk_choice(token_scores: torch.Tensor, chunk_length: int, keep: int) -> torch.Tensor:
    """Indices (batch, keep) of the tokens kept from ``token_scores`` (batch, n), higher = better:
    tokens ranked by their chunk's mean score, then by their own score, so the best chunks are kept
    whole and the last places go to the best tokens of the next chunk. Ties go to the earlier token."""
    b, n = token_scores.shape
    chunk = torch.arange(n, device=token_scores.device) // chunk_length
    n_chunks = int(chunk[-1]) + 1
    sums = torch.zeros(b, n_chunks, device=token_scores.device).index_add_(1, chunk, token_scores)
    means = sums / torch.bincount(chunk, minlength=n_chunks)
    by_token = token_scores.argsort(dim=-1, descending=True, stable=True)
    by_chunk = means[:, chunk].gather(1, by_token).argsort(dim=-1, descending=True, stable=True)
    return by_token.gather(1, by_chunk)[:, :keep]


class ChunkKVLayer(ScoreKeepLayer):
    """Mixed into the base's layer class (``ChunkKV.__init__``): the base's ``score``, ChunkKV's
    ``choose``. ``self.method`` is the base method object, so the base layer finds its parameters."""

    chunk_length: int

    def choose(self, scores):
        scores = scores.float() if self.keep_highest else -scores.float()
        n = self.get_seq_length()
        if scores.shape[-1] < n:  # the base's always-kept window: the best score of any head (kvpress)
            top = scores.amax(dim=(1, 2), keepdim=True)
            scores = torch.cat([scores, top.expand(*scores.shape[:2], n - scores.shape[-1])], dim=-1)
        return chunk_choice(scores.sum(dim=1), self.chunk_length, self.kept_tokens())[:, None]


@register
class ChunkKV(MethodOverBase):
    """ChunkKV (Liu et al. 2025, arXiv 2502.00299; code: kvpress's ``ChunkKVPress``): chunk-level
    selection over any score-based method.

    ``method=chunkkv method.base=snapkv``: the base method (any registered method whose layer is a
    ``ScoreKeepLayer`` and that compresses the prefill) scores the prompt's tokens with its own default
    parameters; ChunkKV then keeps whole chunks of ``chunk_length`` consecutive tokens instead of single
    tokens:

    * per token, the base's score summed over the layer's KV heads (kvpress: ``scores.sum(dim=1)``), so
      every head of a layer keeps the same chunks; a base that keeps the lowest scores (KNorm) is
      negated first, as kvpress's ``KnormPress`` scores minus the norm;
    * a base that scores only the tokens before the window it always keeps (SnapKV, PyramidKV, CAKE)
      has that window scored with the layer's maximum score (over all its heads), as kvpress's
      ``SnapKVPress`` pads it, so chunks inside the window are kept;
    * a chunk's score is the mean of its tokens' scores; the chunks are cut from the first token, the
      last one shorter when ``chunk_length`` does not divide the prompt (as kvpress);
    * the best chunks are kept whole until ``capacity`` tokens are held.

    Choices that differ from kvpress, so that ``ratio`` and ``budget`` mean the same as for every other
    method and a batch's sequences hold the same number of tokens:

    * kvpress keeps ``int(n_chunks * (1 - compression_ratio))`` whole chunks (at least one), so it holds up
      to a chunk more or fewer tokens than the capacity; here exactly ``capacity`` tokens are held: the
      best ``capacity // chunk_length`` chunks (a shorter last chunk counts as one) whole, and the
      remaining places go to the best-scoring tokens of the next best chunk. Kept positions therefore
      differ from kvpress's by less than one chunk per layer;
    * kvpress uses the chunk choice of the batch's first sequence for all of them; here each sequence
      chooses its own;
    * a prompt shorter than one chunk is chunked like any other (kvpress hands it to the base).

    Only the base's scores are used, not its own choice of tokens; its per-layer budgets are kept
    (PyramidKV's and CAKE's shares; kvpress's ChunkKV over PyramidKV keeps the same number in every
    layer). The paper's layer-wise index reuse (later layers reuse an earlier layer's kept indices, a
    speed optimisation that changes results) is not implemented, as in kvpress. Compresses the prefill
    only, whatever the base does during decoding. Budget mode (a hard capacity): after an appended
    question or a decoding step, once a layer holds ``evict_every`` tokens more than its budget, the
    base scores the held tokens again and the same chunk rule keeps the budget; so it holds at most
    ``budget + evict_every - 1`` tokens. A chunked prefill applies the rule after every chunk.
    """

    name = "chunkkv"
    Params = ChunkKVParams
    layer = ChunkKVLayer
    phases = ("prefill",)

    @classmethod
    def bases(cls) -> list[str]:
        return scorer_methods()

    def layer_attributes(self, params):
        return {"chunk_length": params.chunk_length}
