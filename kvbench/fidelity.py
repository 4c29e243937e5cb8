"""Continuous fidelity of a compressed cache: how far its next-token distributions move from the
full cache's, teacher-forced over a fixed continuation: the gold answer, and the full cache's own
greedy output (:func:`greedy_continuation`).

Accuracy is 0/1 (or a bounded text overlap) per sample, so at small n it hides most of what
compression does. These numbers use the model's whole distribution at every answer token instead:

- ``kl``: mean over the answer's tokens of KL(full || compressed), in nats: the information the
  compressed cache's prediction loses against the full cache's (0 when they are identical);
- ``nll_delta``: the continuation's mean negative log-likelihood per token under the compressed cache
  minus under the full cache, in nats (> 0: the compressed cache finds it less likely);
- ``top1_agreement``: the share of its tokens where both caches' most likely token is the same.

Both caches are fed the same tokens (teacher forcing), so an early mistake does not derail the
rest, as it does in free generation. Where the states come from is :func:`measure`'s to say. Over
the full cache's greedy output, the full cache's top-1 token is the fed token itself, so
``top1_agreement`` is the share of the full cache's greedy steps the compressed cache would have
taken too, and the gold text's wording no longer matters.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F

from kvbench.cache import KVCache, layer_windows
from kvbench.generation import Compressed, Prefilled, generate
from kvbench.methods import build_method
from kvbench.methods.base import LayerState
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


def full_cache(model, prefilled: Prefilled) -> tuple[KVCache, Prefilled]:
    """A cache of the ``full`` method and the state ``prefilled`` (the prompt's prefill, taken from
    another method's cache before it compressed) as that cache's layers hold it: the keys, values
    and positions, without the other method's own stores (H2O's scores), so no step attends or
    compresses as that method would. Restore the state into the cache (``layer.restore``) or hand it
    to :func:`~kvbench.generation.generate` as ``prefilled``."""
    method = build_method("full", {}, None)
    method.setup(model)
    cache = KVCache(method, layer_windows(model.config))
    layers = [LayerState({name: state.stores[name] for name in layer.stores},
                         {name: state.fields[name] for name in layer.state_fields})
              for layer, state in zip(cache.layers, prefilled.layers)]
    return cache, dataclasses.replace(prefilled, layers=layers)


def greedy_continuation(model, prefilled: Prefilled, prompt_ids: torch.Tensor, question_ids: torch.Tensor | None,
                        max_new_tokens: int, eos_ids: set[int], stop_check=None, min_new_tokens: int = 0) -> torch.Tensor:
    """(1, k): the full cache's greedy continuation of the prompt ``prefilled`` holds (with the
    question, if any, appended), as :func:`~kvbench.generation.generate` decodes it: up to
    ``max_new_tokens``, its last token the EOS or the one that completes a stop string where it
    stopped on one."""
    cache, state = full_cache(model, prefilled)
    gen = generate(model, cache, prompt_ids, question_ids, max_new_tokens, eos_ids, stop_check, min_new_tokens,
                   prefilled=state)
    return torch.tensor(gen.tokens, device=prompt_ids.device)


@torch.inference_mode()
def measure(model, prefilled: Prefilled, question_ids: torch.Tensor | None, compressed: Compressed,
            answer_ids: torch.Tensor) -> Fidelity:
    """Fidelity over ``answer_ids`` (1, k) of the cache decoding started from (``compressed``: the
    prompt prefilled and compressed, and the question, if any, appended and compressed as the method
    does) against the full cache of the same sequence.

    The full cache is ``prefilled`` (the prompt's prefill before compression) restored into a cache
    of the ``full`` method (:func:`full_cache`), with the question and answer fed in one forward.
    A copy of the compressed cache is fed the answer one token per forward, as decoding feeds
    tokens, without compressing over them. ``compressed`` is left as it was, so it serves several
    answers.
    """
    targets = answer_ids[0]
    answer_feed = answer_ids[:, :-1]
    full, state = full_cache(model, prefilled)
    for layer, layer_state in zip(full.layers, state.layers):
        layer.restore(layer_state)
    prompt = full.layers[0].seen
    question = question_ids if question_ids is not None else answer_ids[:, :0]
    k = targets.shape[0]
    full_logits = _next_token_logits(model, full, prefilled.logits, torch.cat([question, answer_feed], dim=1),
                                     prompt, k)
    comp = _next_token_logits(model, copy.deepcopy(compressed.cache), compressed.logits, answer_feed,
                              compressed.seen, k, per_token=True)
    return compare(full_logits, comp, targets)
