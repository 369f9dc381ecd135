"""The one sample type that flows from the agent loop through the reward to the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from deepeyes.data.schema import Record


@dataclass
class ToolCall:
    tool: str  # "code" | "search" | "image_search" | "none" (a malformed call)
    ok: bool  # False for malformed calls, tool errors and timeouts
    seconds: float


@dataclass
class Trajectory:
    """One rollout of one prompt: everything the trainer and the metrics need, nothing more.

    `response_ids`, `loss_mask` and `rollout_logprobs` are aligned token by token: model tokens
    have mask 1 and the logprob the rollout engine sampled them with; observation tokens have
    mask 0 and logprob 0.
    """

    record: Record
    group: int  # index of the prompt in the step's batch: GRPO normalizes within a group
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    rollout_logprobs: list[float] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)  # every image in the sequence, in order (store paths)
    images_dropped: int = 0  # tool images not shown: over the trajectory's pixel budget
    model_turns: list[str] = field(default_factory=list)  # decoded model turns (reward, logs)
    observations: list[str] = field(default_factory=list)  # tool results shown, after model_turns[i]
    tool_calls: list[ToolCall] = field(default_factory=list)
    # "answer" | "max_turns" | "length"; deepeyesv2 also "invalid" (an invalid action) and
    # "tool_error" (the sandbox or search failed); "error" (an exception, see `fail`).
    finish: str = ""
    error_kind: str = ""  # the stage an exception ended it in: generate, decode, parse, tool, encode, reward
    error: str = ""
    weight_versions: set[int] = field(default_factory=set)  # policy versions that sampled it
    reward: float = 0.0
    accuracy: float = 0.0
    format: float = 0.0
    answer: str | None = None

    def extend(self, ids: list[int], trained: bool, logprobs: list[float] | None = None) -> None:
        self.response_ids += ids
        self.loss_mask += [int(trained)] * len(ids)
        self.rollout_logprobs += logprobs if logprobs is not None else [0.0] * len(ids)

    def fail(self, kind: str, error: BaseException) -> None:
        """End the trajectory on an exception: finish "error", reward 0, the error kept for metrics and logs."""
        self.finish, self.error_kind = "error", kind
        # backslashreplace: the message may quote a lone surrogate, which no UTF-8 log or file takes.
        self.error = f"{type(error).__name__}: {error}"[:500].encode("utf-8", "backslashreplace").decode("utf-8")
        self.reward = self.accuracy = self.format = 0.0

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def model_tokens(self) -> int:
        return sum(self.loss_mask)
