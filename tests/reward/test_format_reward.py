"""format_ok: the released DeepEyesV2 format rules, on the model's turns only."""

import pytest

from deepeyes.reward import MAX_ANSWER_CHARS, format_ok

CODE = "<think>Zoom in on the sign.</think>\n<code>\n```python\nprint(image_1.size)\n```\n</code>"
SEARCH = '<think>Look it up.</think>\n<tool_call>\n{"name": "search", "arguments": {"query": "q"}}\n</tool_call>'
ANSWER = "<think>It reads 1517.</think>\n<answer>1517</answer>"


@pytest.mark.parametrize(
    "turns",
    [
        [ANSWER],
        [CODE, ANSWER],
        [CODE, SEARCH, CODE, ANSWER],
        ["It reads 1517.</think>\n<answer>1517</answer>"],  # the prompt ended with <think>
        [CODE, "Now I see it.</think><answer>1517</answer>"],  # continues a prefilled <think>
        ["<think>a</think><think>b</think><answer>x</answer><answer>y</answer>"],
    ],
)
def test_well_formed(turns):
    assert format_ok(turns)


@pytest.mark.parametrize(
    "turns",
    [
        ["<answer>1517</answer>"],  # no </think> at all
        ["<think>a<think>b</think><answer>1517</answer>"],  # unbalanced think
        ["<think>x</think><code>\n```python\nprint(1)\n```\n", ANSWER],  # unclosed code
        ["<think>x</think><tool_call>{}", ANSWER],  # unclosed tool call
        [CODE],  # no answer
        ["<think>x</think><answer>1517"],  # unclosed answer
        ["<think>x<answer>1517</answer></think>"],  # answer only inside the thinking
        ["<think>x</think><answer>1517</answer></answer>"],
        ["<think>x</think><answer>   </answer>"],  # empty answer
        ["<think>x</think><answer>" + "y" * MAX_ANSWER_CHARS + "</answer>"],  # judge hacking
        [],
    ],
)
def test_malformed(turns):
    assert not format_ok(turns)


def test_answer_just_under_the_limit_is_fine():
    assert format_ok(["<think>x</think><answer>" + "y" * (MAX_ANSWER_CHARS - 1) + "</answer>"])


def test_no_tag_forms_across_turns():
    assert not format_ok(["<think>x</think><answer>1</ans", "wer>"])


def test_one_str_is_refused():
    with pytest.raises(TypeError, match="sequence of model turns"):
        format_ok(ANSWER)
