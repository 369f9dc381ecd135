"""What every job that runs the agent builds from its config: the rollout engine, the tools and
the chat encoder. Training (`deepeyes.train.grpo`), the difficulty filter and evaluation share
this wiring, so the three run exactly the same agent loop; and `run_scored` runs it over records
and scores every trajectory with the DeepEyesV2 reward.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.loop import EpisodeLimits, rollout
from deepeyes.agent.tool_session import Toolbox
from deepeyes.agent.trajectory import Trajectory
from deepeyes.config import RewardConfig, RolloutConfig, ToolsConfig
from deepeyes.data.schema import Record
from deepeyes.reward import Grader, accuracy, compute_reward
from deepeyes.rollout.hf_engine import GenerateRequest, GenerateResult, HFRolloutEngine
from deepeyes.tools import connect_sandbox
from deepeyes.tools.search_service import LocalSearch, Search


class RolloutEngine(Protocol):
    """What the agent loop needs from an engine (in-process or a client of rollout servers)."""

    async def generate(self, request: GenerateRequest) -> GenerateResult: ...

    async def close(self) -> None: ...


def build_engine(policy, cfg: RolloutConfig) -> HFRolloutEngine:
    """The in-process engine over a loaded `deepeyes.train.setup.Policy`."""
    return HFRolloutEngine(policy.model, policy.tokenizer, policy.pixels, cfg.max_batch, cfg.batch_wait_ms)


def build_toolbox(
    cfg: ToolsConfig, corpus: Path, image_index: Path | None, scratch_root: Path, search: Search | None = None,
    policy=None, max_trajectory_pixels: int = 0,
) -> Toolbox:
    """`search`: a client of a running search service; None = the local indexes in this process.
    The code sandbox is the nodes' daemons (`cfg.code.urls`) or one started here, next to
    `scratch_root` (the step's image store): `toolbox.close()` stops it. With a `policy`, each
    trajectory's images are held to `max_trajectory_pixels` as its processor measures them."""
    return Toolbox(
        search=search or LocalSearch.from_files(corpus, image_index),
        sandbox=connect_sandbox(cfg.code, scratch_root.with_name("sandbox")),
        scratch_root=scratch_root,
        top_k=cfg.search_top_k,
        image_pixels=policy.pixels.pixels if policy is not None else None,
        max_trajectory_pixels=max_trajectory_pixels if policy is not None else 0,
    )


def episode_limits(cfg: RolloutConfig, max_turns: int | None = None) -> EpisodeLimits:
    return EpisodeLimits(
        max_turns or cfg.max_turns, cfg.max_turn_tokens, cfg.max_response_tokens, cfg.temperature, cfg.top_p
    )


@dataclass
class AgentRuntime:
    engine: RolloutEngine
    encoder: ChatEncoder
    toolbox: Toolbox


def run_scored(
    runtime: AgentRuntime,
    records: Sequence[Record],
    n: int,
    limits: EpisodeLimits,
    seed: int,
    reward: RewardConfig,
    grader: Grader = accuracy,
    step: int = 0,
) -> list[Trajectory]:
    """n rollouts per record (grouped by record), each scored: reward, accuracy, format, answer."""

    async def run() -> list[Trajectory]:
        try:
            return await rollout(records, n, step, seed, runtime.engine, runtime.encoder, runtime.toolbox, limits)
        finally:
            await runtime.engine.close()

    trajectories = asyncio.run(run())
    for trajectory in trajectories:
        result = compute_reward(
            trajectory.model_turns, trajectory.record.answer, reward.accuracy_weight, reward.format_weight,
            grader=grader,
        )
        trajectory.reward, trajectory.accuracy = result.score, result.accuracy
        trajectory.format, trajectory.answer = result.format, result.answer
    return trajectories
