"""Continuous fidelity of a compressed cache: how far its next-token distributions move from the
full cache's, teacher-forced over the gold answer.

Accuracy is 0/1 (or a bounded text overlap) per sample, so at small n it hides most of what
compression does. These numbers use the model's whole distribution at every answer token instead:

- ``kl``: mean over the answer's tokens of KL(full || compressed), in nats: the information the
  compressed cache's prediction loses against the full cache's (0 when they are identical);
- ``nll_delta``: the gold answer's mean negative log-likelihood per token under the compressed cache
  minus under the full cache, in nats (> 0: the compressed cache finds the answer less likely);
- ``top1_agreement``: the share of answer tokens where both caches' most likely token is the same.

Both caches are fed the same gold tokens (teacher forcing), so an early mistake does not derail the
rest, as it does in free generation. Where the states come from is :func:`measure`'s to say.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvbench.cache import KVCache
from kvbench.generation import Compressed, Prefilled
from kvbench.results import Fidelity


def compare(full_logits: torch.Tensor, compressed_logits: torch.Tensor, target_ids: torch.Tensor) -> Fidelity:
    """Fidelity of ``compressed_logits`` to ``full_logits`` (both (k, vocab), row i predicting
    ``target_ids[i]``, (k,)): the means over the k positions."""
    if full_logits.shape != compressed_logits.shape or full_logits.shape[0] != target_ids.shape[0]:
        raise ValueError(f"fidelity: logits {tuple(full_logits.shape)} and {tuple(compressed_logits.shape)} "
                         f"must match each other and the {target_ids.shape[0]} target tokens")
    full, comp = full_logits.double().log_softmax(-1), compressed_logits.double().log_softmax(-1)
    kl = F.kl_div(comp, full, log_target=True, reduction="none").sum(-1)  # sum p_full (log p_full - log p_comp)
    targets = target_ids[:, None]
    nll_delta = full.gather(-1, targets) - comp.gather(-1, targets)
    agree = full.argmax(-1) == comp.argmax(-1)
    return Fidelity(kl=kl.mean().item(), nll_delta=nll_delta.mean().item(),
                    top1_agreement=agree.double().mean().item(), tokens=int(target_ids.shape[0]))


def _next_token_logits(model, cache: KVCache, last_logits: torch.Tensor, feed_ids: torch.Tensor,
                       start: int, k: int, per_token: bool = False) -> torch.Tensor:
    """The last ``k`` next-token predictions (k, vocab) of: ``last_logits`` (1, vocab), the
    prediction the cache already made, followed by those after each of ``feed_ids`` (1, q), fed at
    positions ``start...`` in one forward, or with ``per_token`` one token per forward as decoding
    feeds them (so attention that a method makes sparse for decoding queries, Quest's, is). No
    ``end_step``: the method does not compress over the fed tokens."""
    q = feed_ids.shape[1]
    rows = [last_logits]
    with cache.active():
        for begin, end in ([(i, i + 1) for i in range(q)] if per_token else [(0, q)] if q else []):
            positions = torch.arange(start + begin, start + end, device=feed_ids.device)[None]
            # only the rows needed: a long question's logits would be vocab-wide each
            out = model(input_ids=feed_ids[:, begin:end], position_ids=positions, past_key_values=cache,
                        use_cache=True, logits_to_keep=min(k, end - begin))
            rows.append(out.logits[0])
    return torch.cat(rows)[-k:]


@torch.inference_mode()
def measure(model, fresh: KVCache, prefilled: Prefilled, question_ids: torch.Tensor | None,
            compressed: Compressed, answer_ids: torch.Tensor) -> Fidelity:
    """Fidelity over ``answer_ids`` (1, k) of the cache decoding started from (``compressed``: the
    prompt prefilled and compressed, and the question, if any, appended and compressed as the method
    does) against the full cache of the same sequence.

    The full cache is ``prefilled`` (the prompt's prefill before compression) restored into ``fresh``
    (a cache of a new instance of the same method, which stores the state as it was taken), with the
    question and answer fed in one forward without compression. The compressed cache is fed the
    answer one token per forward, as decoding feeds tokens, without compressing over them. The
    forwards change only these two caches.
    """
    targets = answer_ids[0]
    answer_feed = answer_ids[:, :-1]
    for layer, state in zip(fresh.layers, prefilled.layers):
        layer.restore(state)
    prompt = fresh.layers[0].seen
    question = question_ids if question_ids is not None else answer_ids[:, :0]
    k = targets.shape[0]
    full = _next_token_logits(model, fresh, prefilled.logits, torch.cat([question, answer_feed], dim=1), prompt, k)
    comp = _next_token_logits(model, compressed.cache, compressed.logits, answer_feed, compressed.seen, k,
                              per_token=True)
    return compare(full, comp, targets)
