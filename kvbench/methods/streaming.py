from dataclasses import dataclass

import torch

from kvbench.methods import register
from kvbench.methods.base import EvictionLayer, Method, Phase
from kvbench.params import param


@dataclass
class StreamingParams:
    #: attention sinks: the first tokens of the sequence, always kept (4 in Xiao et al. 2023)
    sink_tokens: int = param(4, ge=0)


class StreamingLayer(EvictionLayer):
    def compress(self, phase: Phase) -> None:
        n = self.get_seq_length()
        if n <= self.capacity:
            return
        sinks = min(self.method.params.sink_tokens, self.capacity)
        if phase == "decode":
            # one token over: the oldest after the sinks leaves (sinks stay in the first slots, since
            # evict_one only ever moves the newest token)
            self.evict_one(sinks + self.positions[..., sinks:].argmin(dim=-1, keepdim=True))
            return
        kept = torch.cat([torch.arange(sinks), torch.arange(n - (self.capacity - sinks), n)])
        self.keep(kept.to(self.keys.device).expand(*self.keys.shape[:2], -1))


@register
class Streaming(Method):
    """StreamingLLM (Xiao et al. 2023): the first ``sink_tokens`` plus the most recent tokens.

    The capacity (sinks + window) is fixed from the prompt length at the end of prefill and held
    through decoding: every step evicts the token leaving the window. Keys keep their original RoPE
    positions (kvpress's choice); the paper's re-indexing of positions inside the cache is not done.
    """

    name = "streaming"
    Params = StreamingParams
    layer = StreamingLayer
    phases = ("prefill", "append", "decode")
