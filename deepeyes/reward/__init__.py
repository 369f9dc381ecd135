"""RL reward for DeepEyesV2 trajectories: 0.8 * accuracy + 0.2 * format."""

from deepeyes.reward.accuracy import DEFAULT_VERIFIER, Grader, accuracy, normalize_answer, option_letter
from deepeyes.reward.format import MAX_ANSWER_CHARS, format_ok
from deepeyes.reward.math_verifier import MathVerifier, VerifyStats
from deepeyes.reward.score import RewardResult, compute_reward

__all__ = [
    "DEFAULT_VERIFIER",
    "MAX_ANSWER_CHARS",
    "Grader",
    "MathVerifier",
    "RewardResult",
    "VerifyStats",
    "accuracy",
    "compute_reward",
    "format_ok",
    "normalize_answer",
    "option_letter",
]
