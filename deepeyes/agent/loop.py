"""The agent loop: one coroutine per trajectory, no barrier between trajectories.

A trajectory alternates model turns (sampled by the rollout engine) and tool observations until
the model answers, runs out of turns or out of tokens. While one trajectory waits on its code
cell, the others keep generating: the engine batches whatever requests are pending.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from dataclasses import dataclass
from typing import Sequence

from deepeyes.agent import protocol
from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.tool_session import Toolbox
from deepeyes.agent.trajectory import ToolCall, Trajectory
from deepeyes.data.schema import Record
from deepeyes.progress import progress_bar
from deepeyes.rollout.api import GenerateRequest, RolloutEngine, SamplingParams

log = logging.getLogger(__name__)


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
    variant: str = protocol.DEEPEYESV2,
) -> Trajectory:
    """One trajectory under the protocol `variant`. Whatever the model writes, it ends with a
    recorded `finish`: an exception while decoding, parsing, running a tool or encoding the
    observation (its images included) ends this trajectory alone, as finish "error" with
    `error_kind` the stage it happened in; the reward scores it 0. The engine's own failures
    (no server answers) still end the step: they are no trajectory's doing."""
    images = list(record.images)
    trajectory = Trajectory(
        record=record,
        group=group,
        prompt_ids=encoder.prompt(protocol.SYSTEM_PROMPT, protocol.user_prompt(record.question), images),
        images=images,
    )
    name = f"step{step}-g{group}-s{sample}"
    data_index = str(record.metadata.get("index", record.id))
    session = toolbox.session(name, images, variant)
    stage = "generate"
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
            stage = "generate"
            result = await engine.generate(GenerateRequest(  # session: every turn to the server holding its prefix
                trajectory.input_ids, list(trajectory.images), sampling, session=f"step{step}-g{group}-s{sample}"))
            trajectory.extend(result.token_ids, trained=True, logprobs=result.logprobs)
            trajectory.weight_versions.add(result.weight_version)
            stage = "decode"
            text = encoder.decode(result.token_ids)
            trajectory.model_turns.append(text)
            stage = "parse"
            action = protocol.parse_action(text, variant, data_index)
            if isinstance(action, protocol.Answer):
                trajectory.finish = "answer"
                break
            if result.finish_reason == "length":
                trajectory.finish = "length"  # cut mid-turn: nothing to execute
                break
            if isinstance(action, protocol.EndEpisode):  # deepeyesv2: shown nothing, the episode ends
                trajectory.tool_calls.append(ToolCall(action.tool, ok=False, seconds=0.0))
                trajectory.finish = "invalid"
                break
            if turn == limits.max_turns - 1:
                trajectory.finish = "max_turns"
                break
            stage = "tool"
            observation = await session.execute(action)
            trajectory.tool_calls.append(observation.call)
            if observation.ends_episode:
                trajectory.finish = "tool_error"
                break
            stage = "encode"
            ids = encoder.observation(
                observation.pieces or observation.text, observation.images,
                model_closed_turn=result.finish_reason == "eos", end=protocol.observation_end(variant),
            )
            if len(ids) >= limits.max_response_tokens - len(trajectory.response_ids):
                trajectory.finish = "length"
                break
            trajectory.extend(ids, trained=False)
            trajectory.observations.append(observation.text)
            trajectory.images += observation.images
            trajectory.images_dropped += observation.dropped_images
    except Exception as error:  # noqa: BLE001 - whatever the model's output provoked ends this trajectory only
        if stage == "generate":
            raise  # the engine failed (no rollout server answers, the teacher API is down): not this trajectory's doing
        trajectory.fail(stage, error)
        log.warning("trajectory %s ended by an error while it was at %s: %s", name, stage, trajectory.error)
    finally:
        try:
            await session.close()
        except Exception as error:  # noqa: BLE001 - a session that will not close does not cost the step
            log.warning("trajectory %s: closing its tool session failed: %r", name, error)
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
    variant: str = protocol.DEEPEYESV2,
) -> list[Trajectory]:
    """n trajectories per record, all in flight at once; returned grouped by record."""
    records = [toolbox.stored(record) for record in records]  # one stored copy per prompt, for all n rollouts
    bar = progress_bar(total=len(records) * n, desc=f"rollout step {step}", unit="traj", disable=not progress, leave=False)

    async def one(group: int, sample: int) -> Trajectory:
        trajectory = await run_episode(
            records[group], group, sample, step, seed, engine, encoder, toolbox, limits, variant
        )
        bar.update()
        return trajectory

    try:
        return list(await asyncio.gather(*(one(g, s) for g in range(len(records)) for s in range(n))))
    finally:
        bar.close()
