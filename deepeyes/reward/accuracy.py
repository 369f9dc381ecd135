"""Rule-based accuracy: is the model's final answer the ground truth?

`accuracy` is one `Grader`; the LLM judge that DeepEyesV2 uses for open-ended answers will be
another with the same call shape, so `compute_reward` takes whichever is configured.
"""

from __future__ import annotations

import re
import string
from decimal import Decimal
from typing import Protocol

from deepeyes.reward.math_verifier import MathVerifier


class Grader(Protocol):
    """Scores a final answer (None when the model gave none) against the ground truth, in [0, 1]."""

    def __call__(self, prediction: str | None, ground_truth: str) -> float: ...


DEFAULT_VERIFIER = MathVerifier()


def accuracy(prediction: str | None, ground_truth: str, verifier: MathVerifier | None = None) -> float:
    """1.0 when `prediction` matches `ground_truth`, else 0.0.

    A letter ground truth ("B", "(B)") is a multiple-choice key: the prediction's option letter
    counts, the one it starts with ("(B)", "B.", "B) text", "\\boxed{B}") or the only one a short
    sentence names ("The answer is B"). A quantity ("12 kg", "three apples", "42") matches one
    with the same number and, when both name a unit or a thing, the same one: "12 kg" is not
    "12 cm", but "42 apples" is "42", as the released judge prompt rules ("6棵", "6" and "six"
    agree; verify_prompt.md, 客观类). Anything else matches by normalized exact match, or else by
    math-verify (equivalent numbers and expressions), which runs in `verifier`'s worker under
    its timeout; its failures score 0 and are counted there.
    """
    if not prediction or not prediction.strip():
        return 0.0
    key = option_letter(ground_truth, whole=True)
    if key is not None:
        return float(chosen_option(prediction) == key)
    gold_quantity, predicted_quantity = quantity(ground_truth), quantity(prediction)
    if gold_quantity is not None and predicted_quantity is not None:
        (gold_number, gold_unit), (number, unit) = gold_quantity, predicted_quantity
        if gold_unit and unit and gold_unit != unit:
            return 0.0
        ground_truth, prediction = gold_number, number
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


# A letter standing alone ("B", "(B)"), not inside a word or a contraction.
_LONE_LETTER = re.compile(r"(?<![A-Za-z'’])\(?([A-Z])\)?(?![A-Za-z'’])")
_MAX_SENTENCE_WORDS = 12


def chosen_option(text: str) -> str | None:
    """The option letter an answer gives: the one it starts with (see `option_letter`), or else
    the only letter standing alone in a short sentence ("The answer is B", "I pick (C)."). A
    sentence's first "A" or "I" before a lower-case word is an article or a pronoun, not an option."""
    letter = option_letter(text)
    if letter is not None:
        return letter
    text = _unwrap_latex(text).strip()
    if len(text.split()) > _MAX_SENTENCE_WORDS:
        return None
    if re.match(r"[AI] [a-z]", text):
        text = text[1:]
    letters = set(_LONE_LETTER.findall(text))
    return letters.pop() if len(letters) == 1 else None


# Number words, the way short answers spell them (0-99): no maintained library is worth a
# dependency for this, and the common ones (word2number) also read "a" and "point" as numbers.
_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
          "sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
NUMBER_WORDS = {word: value for value, word in enumerate(_UNITS)} | {
    word: 20 + 10 * index for index, word in enumerate(_TENS)
} | {f"{tens}{joint}{unit}": 20 + 10 * index + value
     for index, tens in enumerate(_TENS) for value, unit in enumerate(_UNITS[1:10], start=1) for joint in ("-", " ")}

# Units that are the same unit under other names; any other word names a thing ("apples"), compared singular.
_UNIT_NAMES = {
    "m": ("m", "meter", "meters", "metre", "metres"), "cm": ("cm", "centimeter", "centimeters", "centimetre"),
    "mm": ("mm", "millimeter", "millimeters"), "km": ("km", "kilometer", "kilometers", "kilometre", "kilometres"),
    "kg": ("kg", "kgs", "kilogram", "kilograms"), "g": ("g", "gram", "grams"), "mg": ("mg", "milligram", "milligrams"),
    "lb": ("lb", "lbs", "pound", "pounds"), "s": ("s", "sec", "secs", "second", "seconds"),
    "min": ("min", "mins", "minute", "minutes"), "h": ("h", "hr", "hrs", "hour", "hours"),
    "%": ("%", "percent", "per cent"), "°": ("°", "degree", "degrees", "deg"), "$": ("$", "dollar", "dollars", "usd"),
    "ft": ("ft", "foot", "feet"), "in": ("in", "inch", "inches"), "l": ("l", "liter", "liters", "litre", "litres"),
    "ml": ("ml", "milliliter", "milliliters"), "mph": ("mph",), "km/h": ("km/h", "kph", "kmh"),
}
_CANONICAL_UNIT = {name: unit for unit, names in _UNIT_NAMES.items() for name in names}
_QUANTITY = re.compile(r"(?P<number>[+-]?(?:\d[\d,]*(?:\.\d+)?|\.\d+))\s*(?P<unit>%|°|[a-z][a-z/ ]{0,30})?")
_WORDS = re.compile(r"[a-z]+(?:[- ][a-z]+)*")
_MULTIPLIERS = {"hundred": 100, "thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12,
                "dozen": 12, "k": 10**3, "bn": 10**9}


def quantity(text: str) -> tuple[str, str] | None:
    """(number, unit) when `text` is a number, written or spelled (0-99), with at most a unit or
    a thing after it ("12 kg", "three apples"); unit "" when there is none. None otherwise."""
    text = _unwrap_latex(text).replace("\\%", "%").strip().rstrip(_TRAILING_PUNCTUATION).lower()
    match = _QUANTITY.fullmatch(text)
    if match is not None:
        number, unit = match["number"], match["unit"] or ""
    elif _WORDS.fullmatch(text) is not None:
        words = text.replace("-", " - ").split()
        sizes = [size for size in (3, 2, 1) if " ".join(words[:size]).replace(" - ", "-") in NUMBER_WORDS]
        if not sizes:  # "twenty-one" (split as "twenty - one"), "twenty one", "three"
            return None
        number = str(NUMBER_WORDS[" ".join(words[: sizes[0]]).replace(" - ", "-")])
        unit = " ".join(words[sizes[0]:])
    else:
        return None
    scale, _, rest = unit.partition(" ")
    if scale in _MULTIPLIERS:  # "5 million" is not 5 of something: it is 5000000
        value = Decimal(number.replace(",", "")) * _MULTIPLIERS[scale]
        number, unit = format(value.normalize(), "f"), rest
    return number, _unit(unit)


def _unit(name: str) -> str:
    """A unit's canonical name, or a thing's singular ("apples" -> "apple")."""
    name = name.strip()
    if name in _CANONICAL_UNIT:
        return _CANONICAL_UNIT[name]
    if name.endswith(("ches", "shes", "sses", "xes", "zes")):
        return name[:-2]
    if name.endswith("ies"):
        return name[:-3] + "y"
    return name[:-1] if name.endswith("s") and not name.endswith("ss") else name


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
