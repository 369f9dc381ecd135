"""The DeepEyesV2 RL reward: score = 0.8 * accuracy + 0.2 * format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from deepeyes.reward.accuracy import Grader, accuracy
from deepeyes.reward.format import MAX_ANSWER_CHARS, final_answer, format_ok, model_text


@dataclass(frozen=True)
class RewardResult:
    score: float
    accuracy: float
    format: float
    answer: str | None  # the graded final answer; None when the model gave none


def compute_reward(
    model_turns: Sequence[str],
    ground_truth: str,
    accuracy_weight: float = 0.8,
    format_weight: float = 0.2,
    *,
    grader: Grader = accuracy,
) -> RewardResult:
    """Reward for one trajectory, from its model turns (tool observations excluded).

    Accuracy is graded even when the format fails, as in the released reward, except that an
    answer of MAX_ANSWER_CHARS or more scores 0 without being graded. `grader` defaults to the
    rule-based `accuracy`; an LLM judge with the same call shape can replace it.
    """
    answer = final_answer(model_text(model_turns))
    graded = 0.0
    if answer is not None and len(answer) < MAX_ANSWER_CHARS:
        graded = grader(answer, ground_truth)
    formatted = 1.0 if format_ok(model_turns) else 0.0
    return RewardResult(
        score=accuracy_weight * graded + format_weight * formatted,
        accuracy=graded,
        format=formatted,
        answer=answer,
    )
