"""The released DeepEyesV2 reward, family by family (protocol.variant=deepeyesv2).

Read from the release's reinforcement_learning/verl/utils/reward_score/deepeyesv2.py (cited as
"reward:LINE") and the reward manager that feeds it (verl/workers/reward_manager/naive_async.py):

- The reward reads the whole decoded response: every model turn and every observation, which
  ends in "<think>" (`release_response`). Tags a program printed count, as they did there.
- Format (all families): <think>/</think> counts equal and non-zero, <code>/</code> equal, and
  after the last </think> one <answer> pair holding a non-empty answer. Search also needs
  <tool_call>/</tool_call> equal.
- perception and search: an answer of 300 characters or more fails format and scores accuracy 0
  without being graded (the guard against a policy that pads its answers until the judge says
  yes); otherwise an LLM judge grades it. Search scores 0.8 · acc · (1 − 0.1 if the response
  holds any <tool_call>) + 0.2 · format; the others 0.8 · acc + 0.2 · format.
- math ("reason"): the answer is normalized (`normalize_final_answer`) and verified; no length guard.

Who grades (the judge, or the rules when there is none) is the caller's: see
`deepeyes.agent.runtime.score_trajectories`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

PERCEPTION, MATH, SEARCH = "perception", "math", "search"

# Which rule scores a record, by its data_source (the release's dispatch, reward_score/__init__.py:84-94)
# or else its family (the sample data's arithmetic and lookup are math and search questions).
# Anything else is graded as perception is: an open answer, judged.
RULE_OF = {"perception": PERCEPTION, "reason": MATH, "search": SEARCH, "arithmetic": MATH, "lookup": SEARCH}

MAX_ANSWER_CHARS = 300  # reward:148, reward:340
SEARCH_PENALTY = 0.1  # reward:322-325


def rule_of(data_source: str, family: str) -> str:
    return RULE_OF.get(data_source) or RULE_OF.get(family) or PERCEPTION


def release_response(model_turns: Sequence[str], observations: Sequence[str]) -> str:
    """The response text the released reward read: the model turns with each observation as the
    released environment wrote it between them (env:162), image tokens aside."""
    parts = []
    for index, turn in enumerate(model_turns):
        parts.append(turn)
        if index < len(observations):
            parts.append(f"<|im_end|>\n<|im_start|>user\n{observations[index]}"
                         "<|im_end|>\n<|im_start|>assistant\n<think>")
    return "".join(parts)


@dataclass(frozen=True)
class ReleaseCheck:
    """What the released reward reads off a response before any grading."""

    rule: str
    answer: str | None  # the first answer after the last </think>, stripped; None when empty or absent
    format_ok: bool
    needs_grading: bool  # False: accuracy is 0 without asking anyone
    tool_calls: int  # "<tool_call>" occurrences (search's penalty)


def check_response(response: str, rule: str) -> ReleaseCheck:
    """reward:118-150 (perception), reward:246-283 (math), reward:301-343 (search)."""
    text = response if response.startswith("<think>") else "<think>" + response
    format_ok = text.count("<think>") == text.count("</think>") > 0  # reward:122-127
    format_ok &= text.count("<code>") == text.count("</code>")  # reward:129-133
    tool_calls = text.count("<tool_call>")
    if rule == SEARCH:
        format_ok &= tool_calls == text.count("</tool_call>")  # reward:318-321
    after_thinking = text.split("</think>")[-1].strip()
    format_ok &= after_thinking.count("<answer>") == after_thinking.count("</answer>") > 0  # reward:135-141
    answer = _first_answer(after_thinking)
    format_ok &= answer is not None  # reward:143-145
    if rule == MATH:
        needs_grading = answer is not None and bool(normalize_final_answer(answer))  # reward:271-287
    else:
        too_long = answer is not None and len(answer) >= MAX_ANSWER_CHARS
        format_ok &= not too_long  # reward:147-150
        needs_grading = answer is not None and not too_long
    return ReleaseCheck(rule, answer, format_ok, needs_grading, tool_calls)


def release_score(check: ReleaseCheck, accuracy: float, accuracy_weight: float = 0.8,
                  format_weight: float = 0.2) -> float:
    """reward:193 (perception, math) and reward:386 (search)."""
    if check.rule == SEARCH and check.tool_calls:
        accuracy *= 1 - SEARCH_PENALTY
    return accuracy_weight * accuracy + format_weight * float(check.format_ok)


def _first_answer(text: str) -> str | None:
    # reward:110-115. Bounded to the last closing tag so an unclosed <answer> costs linear time.
    end = text.rfind("</answer>")
    match = _ANSWER.search(text, 0, end + len("</answer>")) if end >= 0 else None
    return (match.group(1).strip() or None) if match else None


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

# The MATH-dataset normalization (Hendrycks et al., as in Minerva) that the release applies to a
# math answer before it is verified (reward:395-492): the same substitutions, in the same order.
_SUBSTITUTIONS = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)
_REMOVED = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
    "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
    "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
    ",\\!", "{,}", '"', "\\dots",
)
# (pattern, replacement, the literal every match ends with, or None for a fixed-length pattern)
_LATEX_STEPS = (
    (re.compile(r"(.*?)(\$)(.*?)(\$)(.*)"), "$\\3$", "$"),
    (re.compile(r"(\\text\{)(.*?)(\})"), "\\2", "}"),
    (re.compile(r"(\\textbf\{)(.*?)(\})"), "\\2", "}"),
    (re.compile(r"(\\overline\{)(.*?)(\})"), "\\2", "}"),
    (re.compile(r"(\\boxed\{)(.*)(\})"), "\\2", "}"),
    (re.compile(r"(frac)([^{])(.)"), "frac{\\2}{\\3}", None),
    (re.compile(r"(sqrt)([^{])"), "sqrt{\\2}", None),
)


def normalize_final_answer(answer: str) -> str:
    """A math answer as the release verifies it: the right side of the last "=", articles,
    spaces and unit words gone, $...$, \\text{}, \\boxed{} unwrapped, "\\fracab" braced."""
    answer = answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for removed in _REMOVED:
        answer = answer.replace(removed, "")
    for pattern, replacement, closing in _LATEX_STEPS:
        if closing is None:
            answer = pattern.sub(replacement, answer)
        else:
            answer = _sub_by_line(pattern, replacement, answer, closing)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


def _sub_by_line(pattern: re.Pattern, replacement: str, text: str, closing: str) -> str:
    """`pattern.sub(replacement, text)` in linear time, for a pattern whose matches stay within a
    line ("." is not DOTALL) and end with `closing`. The "$...$" pattern runs only on a line that
    holds two "$" (its first attempt then matches the whole line); a "...}" pattern sees each line
    only up to its last "}", so no attempt rescans the rest of a line for a "}" that is not there."""
    lines = text.split("\n")
    for index, line in enumerate(lines):
        if closing == "$":
            if line.count("$") >= 2:
                lines[index] = pattern.sub(replacement, line)
            continue
        end = line.rfind(closing) + len(closing)
        if end:
            lines[index] = pattern.sub(replacement, line[:end]) + line[end:]
    return "\n".join(lines)
