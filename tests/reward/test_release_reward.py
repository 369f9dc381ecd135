"""The released reward's pieces that are not graded by anyone: the response it reads, the format
rules per family and the math normalization (reinforcement_learning/verl/utils/reward_score/
deepeyesv2.py, cited "reward:LINE"). tests/agent/test_release_rules.py scores whole trajectories."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepeyes.reward import release


def plain_normalize(answer: str) -> str:
    """reward:454-492 as written there: every step a plain re.sub over the whole answer."""
    answer = answer.split("=")[-1]
    for before, after in release._SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for removed in release._REMOVED:
        answer = answer.replace(removed, "")
    for pattern, replacement, _ in release._LATEX_STEPS:
        answer = pattern.sub(replacement, answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


PIECES = ["$", "\\boxed{", "\\text{", "\\textbf{", "\\overline{", "}", "{", "\n", "x", " ", "frac", "sqrt", "=", "1",
          ",", "a ", "an ", "dollars", "\\text{m}", "^\\circ"]


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=16).map("".join))
def test_the_linear_normalization_equals_the_released_regexes(answer):
    assert release.normalize_final_answer(answer) == plain_normalize(answer)


@pytest.mark.parametrize("answer, normal", [
    ("\\boxed{5}", "5"), ("$\\frac{1}{2}$", "\\frac{1}{2}"), ("5 dollars", "5"), ("x = 1,000", "1000"),
    ("\\fracab", "\\frac{a}{b}"), ("\\sqrt2", "\\sqrt{2}"), ("45^\\circ", "45"), ("an apple", "apple"), ("a pear", "pear"),
    ("the answer is $7$ cm", "7"), ("\\text{(B)}", "(B)"), ("", ""),
])
def test_normalize_final_answer(answer, normal):
    assert release.normalize_final_answer(answer) == normal


@pytest.mark.parametrize("data_source, family, rule", [
    ("perception", "perception_all", release.PERCEPTION), ("reason", "reason", release.MATH),
    ("search", "search", release.SEARCH), ("sample", "arithmetic", release.MATH), ("sample", "lookup", release.SEARCH),
    ("vstar", "all", release.PERCEPTION),
])
def test_the_rule_of_a_record(data_source, family, rule):
    assert release.rule_of(data_source, family) == rule  # reward_score/__init__.py:84-94


def test_the_response_holds_every_observation_as_the_environment_wrote_it():
    text = release.release_response(["<think>a</think><code>c</code>", "b</think><answer>1</answer>"], ["OBS"])
    assert text == ("<think>a</think><code>c</code><|im_end|>\n<|im_start|>user\nOBS<|im_end|>\n<|im_start|>assistant\n"
                    "<think>b</think><answer>1</answer>")


@pytest.mark.parametrize("rule", [release.PERCEPTION, release.MATH, release.SEARCH])
def test_format_checks_run_in_linear_time_on_unclosed_tags(rule):
    check = release.check_response("<think>x</think>" + "<answer>" * 100_000, rule)
    assert (check.answer, check.format_ok, check.needs_grading) == (None, False, False)  # bench/parse.py times it
