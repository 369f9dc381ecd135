"""accuracy: normalized exact match, math-verify equivalence, multiple-choice letters."""

import pytest

from deepeyes.reward import accuracy, normalize_answer, option_letter


@pytest.mark.parametrize("prediction", ["1517", "1,517", "\\boxed{1517}", "1517.0", "$1517$", " 1517. "])
def test_equivalent_numbers(prediction):
    assert accuracy(prediction, "1517") == 1.0


@pytest.mark.parametrize(
    "prediction, truth",
    [
        ("\\frac{3}{4}", "3/4"),
        ("0.75", "3/4"),
        ("\\dfrac{3}{4}", "0.75"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("x = 5", "5"),
        ("50\\%", "50%"),
        ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
        ("y + x", "x+y"),
    ],
)
def test_equivalent_math(prediction, truth):
    assert accuracy(prediction, truth) == 1.0


@pytest.mark.parametrize(
    "prediction, truth",
    [("1518", "1517"), ("4/3", "3/4"), ("0.76", "3/4"), ("-5", "5"), ("15170", "1,517"), ("x+y", "xy")],
)
def test_different_math(prediction, truth):
    assert accuracy(prediction, truth) == 0.0


@pytest.mark.parametrize(
    "prediction, truth",
    [
        ("The Eiffel Tower.", "eiffel tower"),
        ("a red car", "Red car"),
        ("Paris!", "paris"),
        ("\\text{New York}", "new york"),
        ("Mont-Blanc", "mont blanc"),
        ("'yes'", "Yes"),
    ],
)
def test_equivalent_text(prediction, truth):
    assert accuracy(prediction, truth) == 1.0


@pytest.mark.parametrize("prediction, truth", [("London", "Paris"), ("pairs", "Paris"), ("no", "on"), ("The", "a"), ("red car", "blue car")])
def test_different_text(prediction, truth):
    assert accuracy(prediction, truth) == 0.0


@pytest.mark.parametrize("prediction", ["(B)", "B.", "B", "b", "B)", "B: 42", "(B) Paris", "B. Paris", "\\boxed{B}"])
@pytest.mark.parametrize("truth", ["B", "(B)", "B."])
def test_option_letters(prediction, truth):
    assert accuracy(prediction, truth) == 1.0


@pytest.mark.parametrize("prediction", ["(C)", "C", "Both", "Blue", "B Paris", "The answer is B", "A"])
def test_wrong_option_letters(prediction):
    assert accuracy(prediction, "B") == 0.0


def test_a_text_answer_starting_with_a_is_not_option_a():
    assert accuracy("A cat", "A") == 0.0
    assert option_letter("A cat") is None


@pytest.mark.parametrize("prediction", [None, "", "   "])
def test_no_prediction(prediction):
    assert accuracy(prediction, "1517") == 0.0


@pytest.mark.parametrize(
    "text, normal",
    [
        ("\\boxed{\\text{1,517}}", "1517"),
        ("+01517.50", "1517.5"),
        (".5", "0.5"),
        ("-0.50", "-0.5"),
        ("x = 5", "5"),
        ("45^\\circ", "45"),
        ("The Eiffel Tower.", "eiffeltower"),
        ("x + y", "x+y"),
        ("the", ""),
        ("123456789012345678901234567890123456789.0", "123456789012345678901234567890123456789"),
        ("\\boxed{unclosed", "\\boxed{unclosed"),
    ],
)
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal
