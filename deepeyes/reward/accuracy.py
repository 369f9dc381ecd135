"""Rule-based accuracy: is the model's final answer the ground truth?

`accuracy` is one `Grader`; the LLM judge that DeepEyesV2 uses for open-ended answers will be
another with the same call shape, so `compute_reward` takes whichever is configured.
"""

from __future__ import annotations

import re
import string
from typing import Protocol

from deepeyes.reward.math_verifier import MathVerifier


class Grader(Protocol):
    """Scores a final answer (None when the model gave none) against the ground truth, in [0, 1]."""

    def __call__(self, prediction: str | None, ground_truth: str) -> float: ...


DEFAULT_VERIFIER = MathVerifier()


def accuracy(prediction: str | None, ground_truth: str, verifier: MathVerifier | None = None) -> float:
    """1.0 when `prediction` matches `ground_truth`, else 0.0.

    A letter ground truth ("B", "(B)") is a multiple-choice key: only the option letter the
    prediction starts with counts ("(B)", "B.", "B) text", "\\boxed{B}"). Anything else matches
    by normalized exact match, or else by math-verify (equivalent numbers and expressions), which
    runs in `verifier`'s worker under its timeout; its failures score 0 and are counted there.
    """
    if not prediction or not prediction.strip():
        return 0.0
    key = option_letter(ground_truth, whole=True)
    if key is not None:
        return float(option_letter(prediction) == key)
    gold = normalize_answer(ground_truth)
    if gold and gold == normalize_answer(prediction):
        return 1.0
    return float((verifier or DEFAULT_VERIFIER).verify(ground_truth, prediction))


_OPTION_WHOLE = re.compile(r"\(?([A-Za-z])\)?[.:]?")
# A letter alone, or a letter marked as an option ("(B)", "B.", "B)", "B:") then the option text;
# "Both" or "A cat" name no option.
_OPTION_PREFIX = re.compile(r"\(([A-Za-z])\)|([A-Za-z])(?:[.:)]|$)")


def option_letter(text: str, whole: bool = False) -> str | None:
    """The multiple-choice letter `text` gives, upper-cased; with `whole`, only if that is all of it."""
    text = _unwrap_latex(text).strip()
    if whole:
        match = _OPTION_WHOLE.fullmatch(text)
        return match.group(1).upper() if match else None
    match = _OPTION_PREFIX.match(text)
    return (match.group(1) or match.group(2)).upper() if match else None


# Math-looking text keeps its punctuation: stripping it would make "x+y" equal "xy".
_MATH_SIGNS = re.compile(r"[\d+*/^=<>\\_{}()\[\]|]")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_TRAILING_PUNCTUATION = ".,;:!?'\"` "
_LEADING_PUNCTUATION = ",;:!?'\"` "  # not ".": ".5" is a number
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """A canonical form for exact matching (MATH / DeepEyesV2 `normalize_final_answer` style).

    LaTeX wrappers go (`\\boxed{}`, `$...$`, `\\text{}`), only the right side of an equation is
    kept, numbers are canonical ("1,517", "1517.0" -> "1517"), and plain-text answers lose case,
    punctuation, articles and whitespace. May be "", which matches nothing.
    """
    text = _unwrap_latex(text)
    _, equals, right = text.rpartition("=")
    if equals and right.strip():
        text = right
    text = text.strip().rstrip(_TRAILING_PUNCTUATION).lstrip(_LEADING_PUNCTUATION).lower()
    text = _THOUSANDS_COMMA.sub("", text)
    if _NUMBER.fullmatch(text):
        return _canonical_number(text)
    if _MATH_SIGNS.search(text):
        return "".join(text.split())
    text = _ARTICLES.sub(" ", text.translate(_PUNCTUATION))
    return "".join(text.split())


def _canonical_number(text: str) -> str:
    """"+01517.50" -> "1517.5"; done on the digits, so long numbers are never rounded."""
    sign = "-" if text.startswith("-") else ""
    whole, _, fraction = text.lstrip("+-").partition(".")
    fraction = fraction.rstrip("0")
    number = (whole.lstrip("0") or "0") + ("." + fraction if fraction else "")
    return number if number == "0" else sign + number


_LATEX_WRAPPERS = ("boxed", "text", "textbf", "mathrm", "mbox", "textit")
_LATEX_SPACING = re.compile(r"\\[,;:! ]|\\left|\\right|\^\{?\\circ\}?")


def _unwrap_latex(text: str) -> str:
    """Drop `$`, spacing macros and degree signs, and replace `\\boxed{x}`-style wrappers with x."""
    text = _LATEX_SPACING.sub("", text.replace("$", "")).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for name in _LATEX_WRAPPERS:
        text = _replace_wrapper(text, "\\" + name + "{")
    return text.strip()


def _replace_wrapper(text: str, opening: str) -> str:
    """Replace each `\\name{body}` by body, matching braces (a regex cannot: `\\boxed{\\frac{1}{2}}`)."""
    start = text.find(opening)
    while start != -1:
        depth, index = 1, start + len(opening)
        while index < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            index += 1
        if depth:  # unbalanced: leave the rest as it is
            return text
        text = text[:start] + text[start + len(opening) : index - 1] + text[index:]
        start = text.find(opening, start)
    return text
