r"""Final-answer scorers for math reasoning tasks (MATH-500, AIME 2025, GSM8K).

Extraction
    The answer is the content of the LAST ``\boxed{...}`` or ``\fbox{...}`` of the prediction,
    braces matched so nested groups (``\boxed{\frac{1}{2}}``) are kept whole. If that last box is
    never closed (generation cut off inside it) there is no answer: an earlier box would be an
    answer the model went on to revise. GSM8K predictions without a complete box fall back to the
    last number in the text (lm-evaluation-harness's "flexible" GSM8K extraction), since GSM8K's
    own solutions end in ``#### N`` rather than a box.

Normalisation (both prediction and gold), then equality of the strings
    - spacing commands (``\!``, ``\,``, ``\;``, ``\:``, ``\ ``), ``\left``, ``\right``,
      ``\displaystyle``, ``$``, ``\$`` and all whitespace are dropped;
    - ``\dfrac`` and ``\tfrac`` become ``\frac``; ``\frac12`` becomes ``\frac{1}{2}`` and
      ``\sqrt2`` ``\sqrt{2}``;
    - a ``\text{...}`` (``\textbf``, ``\mbox``...) that ends the answer right after a number or a
      closing brace is a unit and is dropped, with a following power (``10\text{ cm}^2`` -> ``10``,
      ``\frac{1}{2}\text{ cup}`` -> ``\frac{1}{2}``); any other is unwrapped (``\text{(C)}`` ->
      ``(C)``, ``(2,\text{ odd})`` -> ``(2,odd)``);
    - degrees (``^\circ``, ``^{\circ}``, ``°``) are dropped;
    - ``%`` is a unit too: dropped on both sides, so ``50\%``, ``50%`` and ``50`` are all equal to
      a gold ``50\%``, and ``0.5`` is not (the answer's number must be the percentage itself);
    - thousands separators in a whole-answer number are dropped (``1,000``, ``1{,}000``,
      ``32,\!348``); so a bare ``1,234`` always reads as one number, never as a pair;
    - a leading one-letter variable (``x=``, ``k =``, ``x_1=``) is dropped;
    - ``.5`` becomes ``0.5``; a trailing ``.`` and braces around the whole answer are dropped.

Numeric equivalence
    When both normalised answers are numbers - an integer or decimal, ``\frac{a}{b}`` or ``a/b``
    with integer or decimal a and b, optionally negative - they are compared as exact rationals:
    ``0.5``, ``\frac{1}{2}``, ``\dfrac12``, ``1/2`` and ``0.50`` are equal, ``0.33`` and
    ``\frac{1}{3}`` are not. Anything else (``3\sqrt{13}``, ``(3,\frac{\pi}{2})``, ``x^2+1``) is
    compared as its normalised string, with no algebra: ``\frac{x}{2}`` and ``x/2`` differ.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_TEXT = re.compile(r"\\(?:text(?:bf|rm|it|normal)?|mbox)\s*\{")
_UNIT_POWER = re.compile(r"\s*\^\s*(?:\d|\{\d+\})")
_NUMBER = r"-?\d+(?:\.\d+)?"
_LAST_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _group_end(text: str, open_at: int) -> int | None:
    """Index just past the ``}`` closing the ``{`` at ``open_at``; None if it is never closed."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{}``/``\fbox{}`` of ``text``; None without one or if it is unclosed."""
    matches = list(_BOX.finditer(text))
    if not matches:
        return None
    brace = matches[-1].end() - 1
    end = _group_end(text, brace)
    return text[brace + 1:end - 1] if end is not None else None


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (``-3``, ``1,234``, ``2.5``), or None."""
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _strip_text(s: str) -> str:
    r"""Unwrap ``\text{...}`` groups, except a unit: a group that ends the answer (perhaps with a
    power) right after a number or a closing brace is dropped (module doc)."""
    out, at = [], 0
    while (m := _TEXT.search(s, at)) is not None:
        close = _group_end(s, m.end() - 1)
        end = close if close is not None else len(s)
        content = s[m.end():end - 1] if close is not None else s[m.end():]
        power = _UNIT_POWER.match(s, end)
        after = power.end() if power else end
        out.append(s[at:m.start()])
        if not s[after:].strip() and re.search(r"[\d}]\s*$", "".join(out)):
            at = after
        else:
            out.append(content)
            at = end
    return "".join(out) + s[at:]


def normalize(answer: str) -> str:
    """The normalised form compared by :func:`equivalent` (module doc)."""
    s = answer.strip()
    s = re.sub(r"\\(?:left|right|displaystyle)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[!,;: ]", "", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = _strip_text(s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\s+", "", s)
    s = s.replace("{,}", ",")
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if m := re.fullmatch(r"[a-zA-Z](?:_\w|_\{\w+\})?=([^=]+)", s):
        s = m.group(1)
    s = re.sub(r"\\frac(\w)", r"\\frac{\1}", s)
    s = re.sub(r"(\\frac\{[^{}]*\})(\w)", r"\1{\2}", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = s.rstrip(".")
    s = re.sub(r"^(-?)\.(\d)", r"\g<1>0.\2", s)
    while s.startswith("{") and _group_end(s, 0) == len(s):
        s = s[1:-1]
    return s


def as_number(s: str) -> Fraction | None:
    """The exact value of a normalised numeric answer (number, ``\\frac{a}{b}``, ``a/b``), or None."""
    if re.fullmatch(_NUMBER, s):
        return Fraction(s)
    m = (re.fullmatch(rf"(-?)\\frac\{{({_NUMBER})\}}\{{({_NUMBER})\}}", s)
         or re.fullmatch(rf"()({_NUMBER})/({_NUMBER})", s))
    if m is None or Fraction(m.group(3)) == 0:
        return None
    value = Fraction(m.group(2)) / Fraction(m.group(3))
    return -value if m.group(1) else value


def equivalent(prediction: str | None, gold: str) -> bool:
    """Whether an extracted answer equals the gold one (module doc); no answer is never equal."""
    if prediction is None:
        return False
    pred, ref = normalize(prediction), normalize(gold)
    if pred == ref:
        return True
    a, b = as_number(pred), as_number(ref)
    return a is not None and b is not None and a == b


def gsm8k_gold(solution: str) -> str:
    """GSM8K's final answer: the text after the solution's ``####``."""
    if "####" not in solution:
        raise ValueError("a GSM8K answer must end in '#### <final answer>'")
    return solution.rsplit("####", 1)[1].strip()


def extract(prediction: str, fallback_to_last_number: bool = False) -> str | None:
    """The answer of a prediction: its last box, else (GSM8K) its last number."""
    boxed = last_boxed(prediction)
    if boxed is None and fallback_to_last_number:
        return last_number(prediction)
    return boxed
