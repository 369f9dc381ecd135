"""The agent loop: one coroutine per trajectory, no barrier between trajectories.

A trajectory alternates model turns (sampled by the rollout engine) and tool observations until
the model answers, runs out of turns or out of tokens. While one trajectory waits on its code
cell, the others keep generating: the engine batches whatever requests are pending.
"""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass
from typing import Sequence

from deepeyes.agent import protocol
from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.tool_session import Toolbox
from deepeyes.agent.trajectory import Trajectory
from deepeyes.data.schema import Record
from deepeyes.progress import progress_bar
from deepeyes.rollout.api import GenerateRequest, RolloutEngine, SamplingParams


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int
    max_turn_tokens: int
    max_response_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0


def episode_seed(run_seed: int, step: int, group: int, sample: int, turn: int) -> int:
    """A stable noise-stream seed per (step, prompt, rollout, turn)."""
    return zlib.crc32(f"{run_seed}/{step}/{group}/{sample}/{turn}".encode())


async def run_episode(
    record: Record,
    group: int,
    sample: int,
    step: int,
    seed: int,
    engine: RolloutEngine,
    encoder: ChatEncoder,
    toolbox: Toolbox,
    limits: EpisodeLimits,
) -> Trajectory:
    images = list(record.images)
    trajectory = Trajectory(
        record=record,
        group=group,
        prompt_ids=encoder.prompt(protocol.SYSTEM_PROMPT, protocol.user_prompt(record.question), images),
        images=images,
    )
    session = toolbox.session(f"step{step}-g{group}-s{sample}", images)
    try:
        for turn in range(limits.max_turns):
            budget = limits.max_response_tokens - len(trajectory.response_ids)
            if budget <= 0:
                trajectory.finish = "length"
                break
            sampling = SamplingParams(
                max_new_tokens=min(limits.max_turn_tokens, budget),
                temperature=limits.temperature,
                top_p=limits.top_p,
                seed=episode_seed(seed, step, group, sample, turn),
            )
            result = await engine.generate(GenerateRequest(  # session: every turn to the server holding its prefix
                trajectory.input_ids, list(trajectory.images), sampling, session=f"step{step}-g{group}-s{sample}"))
            trajectory.extend(result.token_ids, trained=True, logprobs=result.logprobs)
            trajectory.weight_versions.add(result.weight_version)
            text = encoder.decode(result.token_ids)
            trajectory.model_turns.append(text)
            action = protocol.parse_action(text)
            if isinstance(action, protocol.Answer):
                trajectory.finish = "answer"
                break
            if result.finish_reason == "length":
                trajectory.finish = "length"  # cut mid-turn: nothing to execute
                break
            if turn == limits.max_turns - 1:
                trajectory.finish = "max_turns"
                break
            observation = await session.execute(action)
            trajectory.tool_calls.append(observation.call)
            ids = encoder.observation(observation.text, observation.images, model_closed_turn=result.finish_reason == "eos")
            if len(ids) >= limits.max_response_tokens - len(trajectory.response_ids):
                trajectory.finish = "length"
                break
            trajectory.extend(ids, trained=False)
            trajectory.observations.append(observation.text)
            trajectory.images += observation.images
            trajectory.images_dropped += observation.dropped_images
    finally:
        await session.close()
    return trajectory


async def rollout(
    records: Sequence[Record],
    n: int,
    step: int,
    seed: int,
    engine: RolloutEngine,
    encoder: ChatEncoder,
    toolbox: Toolbox,
    limits: EpisodeLimits,
    progress: bool = True,
) -> list[Trajectory]:
    """n trajectories per record, all in flight at once; returned grouped by record."""
    records = [toolbox.stored(record) for record in records]  # one stored copy per prompt, for all n rollouts
    bar = progress_bar(total=len(records) * n, desc=f"rollout step {step}", unit="traj", disable=not progress, leave=False)

    async def one(group: int, sample: int) -> Trajectory:
        trajectory = await run_episode(records[group], group, sample, step, seed, engine, encoder, toolbox, limits)
        bar.update()
        return trajectory

    try:
        return list(await asyncio.gather(*(one(g, s) for g in range(len(records)) for s in range(n))))
    finally:
        bar.close()
