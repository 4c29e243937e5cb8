"""Passkey scorers, as longctx_bench (the LagKV paper's passkey facility) defines them."""

import re
import string
from difflib import SequenceMatcher


def normalize(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD-style)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, key: str) -> float:
    """1.0 when the normalised key occurs in the normalised prediction."""
    return float(normalize(key) in normalize(prediction))


def partial_match(prediction: str, key: str) -> float:
    """Length of the longest common substring of key and prediction, over the key length.

    The LagKV paper's "needle score". Computed on the raw strings, with autojunk off so that long
    repetitive keys are not treated as junk.
    """
    if not key:
        raise ValueError("empty passkey")
    match = SequenceMatcher(None, key, prediction, autojunk=False).find_longest_match(0, len(key), 0, len(prediction))
    return match.size / len(key)
