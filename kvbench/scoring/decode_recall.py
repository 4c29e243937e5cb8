"""decode_recall scorers: the word recalled after the follow-up, and whether the count was finished."""

import re


def answer_part(prediction: str, followup: str) -> str:
    """The text generated after the (last) follow-up; empty when the follow-up never came."""
    before, found, after = prediction.rpartition(followup)
    return after if found else ""


def recalled(prediction: str, word: str, followup: str) -> float:
    """1.0 when the first word of the answer is the secret word (case and punctuation aside)."""
    words = re.findall(r"[a-z]+", answer_part(prediction, followup).lower())
    return float(bool(words) and words[0] == word.lower())


def counted(prediction: str, count_to: int, followup: str) -> float:
    """1.0 when the count before the follow-up reached ``count_to`` with every number in order."""
    count = prediction.rpartition(followup)[0] if followup in prediction else prediction
    numbers = [int(n) for n in re.findall(r"\d+", count)]
    return float(numbers == list(range(4, count_to + 1)))
