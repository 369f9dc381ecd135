"""The format half of the DeepEyesV2 reward: did the model follow the tag protocol?"""

from __future__ import annotations

from typing import Sequence

from deepeyes.agent.protocol import extract_answer

# Longer answers fail format and score no accuracy: the released reward's guard against a policy
# that learns to pad answers until an LLM judge says yes.
MAX_ANSWER_CHARS = 300


def model_text(model_turns: Sequence[str]) -> str:
    """The model's own turns as one text, the way the released reward reads a response.

    Tool observations are left out on purpose: a program can print "<answer>" or "</think>" into
    its stdout, and the model must not be rewarded (or punished) for tags it did not write.
    A turn that does not start with "<think>" gets one, as the released reward does for the first
    turn; for later turns, the released RL environment writes "<think>" at the end of each
    observation (the model continues it), so the released reward counted one there too.
    Turns are joined by a newline so that no tag can form across a boundary.
    """
    if isinstance(model_turns, str):
        raise TypeError("model_turns must be a sequence of model turns, not one str; wrap it in a list")
    return "\n".join(turn if turn.startswith("<think>") else "<think>" + turn for turn in model_turns)


def final_answer(text: str) -> str | None:
    """The first <answer> after the last </think> (stripped), or None."""
    return extract_answer(text.split("</think>")[-1])


def format_ok(model_turns: Sequence[str]) -> bool:
    """The released DeepEyesV2 format rules, applied to the model's turns only.

    - <think> and </think> counts are equal and non-zero;
    - <code>/</code> and <tool_call>/</tool_call> counts are equal;
    - after the last </think>, <answer>/</answer> counts are equal and non-zero;
    - the answer is non-empty and shorter than MAX_ANSWER_CHARS.
    """
    text = model_text(model_turns)
    after_thinking = text.split("</think>")[-1]
    answer = final_answer(text)
    return (
        text.count("<think>") == text.count("</think>") > 0
        and text.count("<code>") == text.count("</code>")
        and text.count("<tool_call>") == text.count("</tool_call>")
        and after_thinking.count("<answer>") == after_thinking.count("</answer>") > 0
        and answer is not None
        and len(answer) < MAX_ANSWER_CHARS
    )
