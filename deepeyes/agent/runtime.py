"""What every job that runs the agent builds from its config: the rollout engine, the tools and
the chat encoder. Training (`deepeyes.train.grpo`), the difficulty filter and evaluation share
this wiring, so the three run exactly the same agent loop; `run_scored` runs it over records,
and `score_trajectories` scores every trajectory with the reward of the protocol variant.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from deepeyes.agent import protocol
from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.loop import EpisodeLimits, rollout
from deepeyes.agent.tool_session import Toolbox
from deepeyes.agent.trajectory import Trajectory
from deepeyes.config import RewardConfig, RolloutConfig, ToolsConfig
from deepeyes.data.schema import Record
from deepeyes.reward import Grader, accuracy, compute_reward, release
from deepeyes.reward.format import MAX_ANSWER_CHARS, final_answer, model_text
from deepeyes.rollout.judge import JudgeClient
from deepeyes.rollout.hf_engine import GenerateRequest, GenerateResult, HFRolloutEngine
from deepeyes.tools import connect_sandbox
from deepeyes.tools.search_service import Search, build_search

log = logging.getLogger(__name__)


class RolloutEngine(Protocol):
    """What the agent loop needs from an engine (in-process or a client of rollout servers)."""

    async def generate(self, request: GenerateRequest) -> GenerateResult: ...

    async def close(self) -> None: ...


def build_engine(policy, cfg: RolloutConfig) -> HFRolloutEngine:
    """The in-process engine over a loaded `deepeyes.train.setup.Policy`."""
    return HFRolloutEngine(policy.model, policy.tokenizer, policy.pixels, cfg.max_batch, cfg.batch_wait_ms)


def build_toolbox(
    cfg: ToolsConfig, corpus: Path | None, image_index: Path | None, scratch_root: Path, search: Search | None = None,
    policy=None, max_trajectory_pixels: int = 0, records: Path | None = None,
) -> Toolbox:
    """`search`: a client of a running search service; None = the configured backends
    (`tools.search_backend`, `tools.image_search_backend`) in this process, over `corpus` and
    `image_index` when local, `records` for the MMSearch cache. The code sandbox is the nodes'
    daemons (`cfg.code.urls`) or one started here, next to `scratch_root` (the step's image
    store): `toolbox.close()` stops it. With a `policy`, each trajectory's images are held to
    `max_trajectory_pixels` as its processor measures them."""
    if search is None:
        cache_records = Path(cfg.search_cache_records) if cfg.search_cache_records else records
        search = build_search(
            cfg.search_backend, cfg.image_search_backend, scratch_root.with_name("search"), corpus=corpus,
            image_index=image_index, timeout_s=cfg.search_timeout_s, image_url_base=cfg.serpapi_image_url_base,
            mmsearch_cache=Path(cfg.search_cache) if cfg.search_cache else None,
            mmsearch_images=Path(cfg.search_cache_images) if cfg.search_cache_images else None, records=cache_records,
        )
    return Toolbox(
        search=search,
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
    variant: str = protocol.DEEPEYESV2  # protocol.variant


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
            trajectories = await rollout(
                records, n, step, seed, runtime.engine, runtime.encoder, runtime.toolbox, limits,
                variant=runtime.variant,
            )
        finally:
            await runtime.engine.close()
            await runtime.toolbox.search.close()
        await score_trajectories(trajectories, runtime.variant, reward, grader=grader)
        return trajectories

    return asyncio.run(run())


async def score_trajectories(
    trajectories: Sequence[Trajectory],
    variant: str,
    reward: RewardConfig,
    judge: JudgeClient | None = None,
    grader: Grader = accuracy,
) -> None:
    """Set every trajectory's reward, accuracy, format and answer under the protocol `variant`.

    `feedback`: `deepeyes.reward.compute_reward` on the model turns, accuracy from the judge
    when there is one, else from `grader`. `deepeyesv2`: the released reward of the record's
    family (`deepeyes.reward.release`): the judge grades perception and search answers, and math
    answers that the rules (`grader`) do not confirm; with no judge, or no verdict in time
    (counted in the judge's stats), `grader` grades. A trajectory that ended in an error keeps
    reward 0; an error while scoring one ends it the same way (error kind "reward").
    """

    async def score(trajectory: Trajectory) -> None:
        if trajectory.finish == "error":
            return
        try:
            if variant == protocol.FEEDBACK:
                await _score_feedback(trajectory, reward, judge, grader)
            else:
                await _score_release(trajectory, reward, judge, grader)
        except Exception as error:  # noqa: BLE001 - one unscorable answer must not cost the step
            trajectory.fail("reward", error)
            log.warning("scoring trajectory of %s failed: %s", trajectory.record.id, trajectory.error)

    await asyncio.gather(*(score(t) for t in trajectories))


async def _score_feedback(trajectory: Trajectory, reward: RewardConfig, judge: JudgeClient | None, grader: Grader):
    answer = final_answer(model_text(trajectory.model_turns))
    if judge is not None and answer is not None and len(answer) < MAX_ANSWER_CHARS:
        verdict = await judge.grade(trajectory.record.question, answer, trajectory.record.answer)
        grader = lambda prediction, ground_truth: verdict  # noqa: E731
    result = compute_reward(
        trajectory.model_turns, trajectory.record.answer, reward.accuracy_weight, reward.format_weight, grader=grader
    )
    trajectory.reward, trajectory.accuracy = result.score, result.accuracy
    trajectory.format, trajectory.answer = result.format, result.answer


async def _score_release(trajectory: Trajectory, reward: RewardConfig, judge: JudgeClient | None, grader: Grader):
    record = trajectory.record
    check = release.check_response(
        release.release_response(trajectory.model_turns, trajectory.observations),
        release.rule_of(record.data_source, record.family),
    )
    graded = 0.0
    if check.needs_grading and record.answer:
        if check.rule == release.MATH:
            graded = grader(check.answer, record.answer)  # the rules first; the judge where they say no
            if graded < 1.0 and judge is not None:
                normalized = release.normalize_final_answer(check.answer)
                graded = await judge.release_math_grade(record.question, normalized, record.answer) or graded
        else:
            verdict = await judge.release_grade(record.question, check.answer, record.answer) if judge else None
            graded = grader(check.answer, record.answer) if verdict is None else verdict
    trajectory.reward = release.release_score(check, graded, reward.accuracy_weight, reward.format_weight)
    trajectory.accuracy, trajectory.format, trajectory.answer = graded, float(check.format_ok), check.answer
