"""How tokens are chosen: the ``decoding`` config section (greedy, or sampling with n samples per prompt).

``temperature: 0`` (the default) is greedy decoding: the argmax, exactly as before sampling existed.
With ``temperature > 0`` each step samples from ``softmax(logits / temperature)`` restricted by
``top_k`` (the k most likely tokens; 0 = all) and then ``top_p`` (the smallest set of most likely
tokens whose probability reaches p; 1 = all), the order in which transformers' and vLLM's samplers
apply them. ``n`` samples are drawn per prompt and every score is the mean over them: pass@1
averaged over n samples, the protocol of the reasoning papers (DeepSeek-R1: n = 64 for AIME).

Each sample has its own seed, derived from the run's ``seed``, the prompt's sample id and the
sample's index (:meth:`Decoding.sample_seed`): a sample draws the same tokens whatever order the
prompts run in, whether the run was resumed and however it is sharded. Draws use a CPU generator, so
the seed means the same on every device (the logits themselves may still differ in the last bits).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

from kvbench.errors import ConfigError
from kvbench.params import check_value, field_kinds, param


@dataclass
class Decoding:
    #: 0 = greedy; > 0 = sample from softmax(logits / temperature)
    temperature: float = param(0.0, ge=0)
    #: nucleus sampling: the smallest set of most likely tokens whose probability reaches top_p (1 = off)
    top_p: float = param(1.0, le=1)
    #: sample among the top_k most likely tokens only (0 = off)
    top_k: int = param(0, ge=0)
    #: samples per prompt; a record's scores are their means (pass@1 averaged over n)
    n: int = param(1, ge=1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        for name, kind in field_kinds(Decoding).items():
            check_value(f"decoding.{name}", getattr(self, name), *kind)
        if not self.top_p > 0:
            raise ConfigError(f"decoding.top_p={self.top_p!r}: expected a number in (0, 1] (1 = off)")
        if self.greedy and (self.top_p != 1 or self.top_k != 0 or self.n != 1):
            raise ConfigError(
                "decoding.top_p, top_k and n > 1 apply to sampling only, and decoding.temperature=0 is greedy "
                f"(got top_p={self.top_p}, top_k={self.top_k}, n={self.n}): set decoding.temperature > 0"
            )

    def sample_seed(self, run_seed: int, sample_id: str, index: int) -> int:
        """The seed of the ``index``-th sample of prompt ``sample_id`` in a run seeded ``run_seed``."""
        digest = hashlib.sha256(f"{run_seed}\x00{sample_id}\x00{index}".encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1  # torch seeds are < 2**63

    def label(self) -> str:
        """The results directory's suffix: the fields that differ from greedy (``temperature-0.6_n-4``);
        empty for greedy decoding, whose directories keep their names."""
        default = dataclasses.asdict(Decoding())
        return "_".join(f"{k}-{v:g}" for k, v in dataclasses.asdict(self).items() if v != default[k])
