"""compute_reward: 0.8 * accuracy + 0.2 * format on whole trajectories."""

from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepeyes.reward import MathVerifier, RewardResult, accuracy, compute_reward

CODE = "<think>The number is small; zoom in.</think>\n<code>\n```python\nplt.imshow(image_1.crop((0, 0, 9, 9)))\nplt.show()\n```\n</code>"
SEARCH = '<think>Check the name.</think>\n<tool_call>\n{"name": "search", "arguments": {"query": "tower"}}\n</tool_call>'


def answer(text: str) -> str:
    return f"<think>The crop shows it clearly.</think>\n<answer>{text}</answer>"


def test_well_formed_trajectory_with_code_then_answer():
    assert compute_reward([CODE, SEARCH, answer("1517")], "1517") == RewardResult(1.0, 1.0, 1.0, "1517")


@pytest.mark.parametrize("prediction", ["1517", "1,517", "\\boxed{1517}", "1517.0"])
def test_numeric_equivalence(prediction):
    assert compute_reward([CODE, answer(prediction)], "1517").score == 1.0


@pytest.mark.parametrize(
    "prediction, truth",
    [("\\frac{3}{4}", "0.75"), ("The Eiffel Tower.", "eiffel tower"), ("(B)", "B"), ("B. 42", "B")],
)
def test_equivalent_answers(prediction, truth):
    assert compute_reward([answer(prediction)], truth).score == 1.0


@pytest.mark.parametrize("prediction, truth", [("1518", "1517"), ("4/3", "3/4"), ("London", "Paris"), ("(C)", "B")])
def test_wrong_answer_scores_only_format(prediction, truth):
    result = compute_reward([CODE, answer(prediction)], truth)
    assert (result.score, result.accuracy, result.format) == (pytest.approx(0.2), 0.0, 1.0)


def test_missing_think_keeps_accuracy_only():
    result = compute_reward(["<answer>1517</answer>"], "1517")
    assert (result.score, result.accuracy, result.format) == (0.8, 1.0, 0.0)


def test_unbalanced_code_keeps_accuracy_only():
    result = compute_reward(["<think>x</think><code>\n```python\nprint(1)\n```\n", answer("1517")], "1517")
    assert (result.score, result.accuracy, result.format) == (0.8, 1.0, 0.0)


def test_missing_answer_scores_nothing():
    assert compute_reward([CODE], "1517") == RewardResult(0.0, 0.0, 0.0, None)
    assert compute_reward([], "1517") == RewardResult(0.0, 0.0, 0.0, None)


def test_wrong_and_malformed_scores_nothing():
    assert compute_reward(["<answer>12</answer>"], "1517").score == 0.0


def test_long_answer_is_not_graded():
    graded = []
    long_answer = "1517 " + "because " * 40

    def grader(prediction, ground_truth):
        graded.append(prediction)
        return 1.0

    result = compute_reward([answer(long_answer)], "1517", grader=grader)
    assert (result.score, result.accuracy, result.format) == (0.0, 0.0, 0.0)
    assert result.answer == long_answer.strip()
    assert graded == []


def test_weights():
    result = compute_reward([answer("1517")], "1517", accuracy_weight=0.5, format_weight=0.25)
    assert result.score == 0.75


def test_grader_can_be_swapped():
    calls = []

    def judge(prediction, ground_truth):
        calls.append((prediction, ground_truth))
        return 1.0

    result = compute_reward([answer("a tall iron tower")], "Eiffel Tower", grader=judge)
    assert result.score == 1.0
    assert calls == [("a tall iron tower", "Eiffel Tower")]


# --- never raises, always in [0, 1] -----------------------------------------------------------

TAGS = ["<think>", "</think>", "<code>", "</code>", "<tool_call>", "</tool_call>", "<answer>", "</answer>", "```python\n", "\n```"]
TURNS = st.lists(st.lists(st.one_of(st.sampled_from(TAGS), st.text(max_size=15)), max_size=10).map("".join), max_size=4)
TRUTHS = st.one_of(st.text(max_size=12), st.sampled_from(["1517", "B", "3/4", "\\frac{1}{2}", "Paris", ""]))


@pytest.fixture(scope="module")
def grader():
    verifier = MathVerifier(timeout_s=2.0)
    yield partial(accuracy, verifier=verifier)
    verifier.close()


@settings(max_examples=200, deadline=None)
@given(turns=TURNS, truth=TRUTHS)
def test_never_raises_and_stays_in_unit_interval(grader, turns, truth):
    result = compute_reward(turns, truth, grader=grader)
    assert 0.0 <= result.score <= 1.0
    assert result.accuracy in (0.0, 1.0) and result.format in (0.0, 1.0)
    assert result.score == pytest.approx(0.8 * result.accuracy + 0.2 * result.format)


@settings(max_examples=100, deadline=None)
@given(turns=st.lists(st.text(), max_size=3), truth=st.text())
def test_never_raises_on_arbitrary_text(grader, turns, truth):
    assert 0.0 <= compute_reward(turns, truth, grader=grader).score <= 1.0
