"""GRPO training: rollout → reward → advantages → policy update → new weights, step after step.

`GRPOTrainer.step` is one step and reads top to bottom; the job around it is
deepeyes.train.rl.train_grpo. This trainer is plain PyTorch on the Hugging Face model: it is the
reference other trainers are checked against.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.loop import EpisodeLimits, rollout
from deepeyes.agent.runtime import build_engine, build_toolbox, score_trajectories
from deepeyes.agent.tool_session import Toolbox, clear_scratch
from deepeyes.agent.trajectory import Trajectory
from deepeyes.config import RLJobConfig
from deepeyes.model import ensure_tiny_model, load_processor
from deepeyes.rollout.client import RolloutClient
from deepeyes.rollout.hf_engine import HFRolloutEngine
from deepeyes.rollout.judge import JudgeClient
from deepeyes.rollout.services import JUDGE, ROLLOUT, SEARCH, ServiceEndpoints, rl_services
from deepeyes.rollout.weight_sync import BroadcastWeightSync, WeightSync
from deepeyes.service import LOOPBACK
from deepeyes.tools.search_service import SearchClient
from deepeyes.train.checkpoint import HFModelCheckpoint, TrainerState, restore_checkpoint, save_checkpoint
from deepeyes.train.forward import TokenSequence, token_logprobs
from deepeyes.train.losses import clipped_policy_loss, grpo_advantages
from deepeyes.train.sampler import MixtureSampler, realized_mix
from deepeyes.train.setup import (
    Policy, clip_and_step, data_paths, task_sampler,
)

log = logging.getLogger(__name__)


@dataclass
class GRPOTrainer:
    cfg: RLJobConfig
    policy: Policy
    optimizer: torch.optim.Optimizer
    # The rollout side (see `rollout_side`). A multi-rank trainer builds it on its leader only:
    # the other ranks receive each step's trajectories from it and take part in the update.
    engine: HFRolloutEngine | RolloutClient | None = None
    encoder: ChatEncoder | None = None
    toolbox: Toolbox | None = None
    sampler: MixtureSampler | None = None
    weight_sync: WeightSync | None = None  # None: the engine generates with the trainer's own model
    judge: JudgeClient | None = None
    services: contextlib.ExitStack | None = None  # local service processes, stopped by close()

    @property
    def leader(self) -> bool:
        """Whether this process runs the rollouts, logs and writes the run's files (one-process trainer: always)."""
        return True

    def agree(self, stop_requested: bool) -> bool:
        """The leader's stop decision, the same on every rank."""
        return stop_requested

    def save(self, out_dir: Path, step: int, run_id: str | None) -> Path:
        """Checkpoint after `step` optimizer steps: HF model directory + optimizer, data position, RNG."""
        return save_checkpoint(out_dir, step, run_id, self.model_checkpoint(), self.sampler,
                               keep=self.cfg.run.keep_checkpoints)

    def restore(self, checkpoint: Path) -> TrainerState:
        """Optimizer, data position and RNG from `checkpoint` (the weights were loaded with the policy)."""
        return restore_checkpoint(checkpoint, self.model_checkpoint(), self.sampler)

    def model_checkpoint(self):
        """Where this trainer's weights and optimizer go in a checkpoint."""
        return HFModelCheckpoint(self.policy.model, self.policy.processor, self.optimizer)

    def step(self, step: int) -> tuple[dict[str, float], list[Trajectory]]:
        """One GRPO step; returns its metrics and its scored trajectories."""
        started = time.perf_counter()
        # The previous step's image store: kept until the job logged that step's sample table.
        clear_scratch(self.toolbox.scratch_root)
        trajectories = self.collect(step)
        rollout_s = time.perf_counter() - started
        advantages = grpo_advantages([t.reward for t in trajectories], [t.group for t in trajectories])
        update_started = time.perf_counter()
        update_metrics = self.update(trajectories, advantages)
        self.publish_weights(step + 1)
        self.policy.pixels.release()

        metrics = rollout_metrics(trajectories, step)
        metrics.update(update_metrics)
        metrics["timing/rollout_s"] = rollout_s
        metrics["timing/update_s"] = time.perf_counter() - update_started
        metrics["timing/step_s"] = time.perf_counter() - started
        metrics.update(self.service_metrics())
        if self.cfg.data.train_mix:
            metrics.update(realized_mix(self.sampler.last_sources))  # the step's prompts, by mixture source
        return metrics, trajectories

    def publish_weights(self, version: int, everything: bool = False) -> None:
        """Make `version` (the weights after this many optimizer steps) what rollouts use."""
        if self.weight_sync is None:
            self.engine.weight_version = version  # in process: the engine samples from the trained model itself
        else:
            self.weight_sync.publish(self.policy.model, version, everything)

    def service_metrics(self) -> dict[str, float]:
        """Cumulative counts: rollout-server failures (each retried elsewhere), judge fallbacks."""
        metrics = {}
        if isinstance(self.engine, RolloutClient):
            metrics["rollout/server_failures"] = float(sum(self.engine.failures.values()))
            metrics.update({f"rollout/request_{kind}": float(n) for kind, n in self.engine.errors.items()})
        if self.weight_sync is not None:
            metrics["timing/weight_sync_s"] = self.weight_sync.last_seconds
            metrics["rollout/weight_sync_failures"] = float(sum(self.weight_sync.server_failures.values()))
        if self.judge is not None:
            for key, count in self.judge.stats.items():
                metrics[f"reward/judge_{key}"] = float(count)
        return metrics

    def close(self) -> None:
        if self.weight_sync is not None:
            self.weight_sync.close()
        if self.services is not None:
            self.services.close()

    def collect(self, step: int) -> list[Trajectory]:
        """The step's prompts, n rollouts each, scored by the reward."""
        cfg = self.cfg
        records = self.sampler.take(cfg.grpo.prompts_per_step)
        limits = EpisodeLimits(
            cfg.rollout.max_turns, cfg.rollout.max_turn_tokens, cfg.rollout.max_response_tokens,
            cfg.rollout.temperature, cfg.rollout.top_p,
        )
        if self.weight_sync is not None:  # no sample from weights older than the staleness bound
            oldest = step - cfg.rollout.max_staleness
            self.weight_sync.wait_for(oldest)
            self.engine.min_weight_version = max(oldest, 0)
        return asyncio.run(self._rollout(records, step, limits))

    async def _rollout(self, records, step: int, limits: EpisodeLimits) -> list[Trajectory]:
        """The trajectories, scored by the reward of the protocol variant (the judge's, when configured)."""
        variant = self.cfg.protocol.variant
        try:
            trajectories = await rollout(
                records, self.cfg.rollout.n, step, self.cfg.run.seed, self.engine, self.encoder, self.toolbox, limits,
                variant=variant,
            )
            await score_trajectories(trajectories, variant, self.cfg.reward, self.judge)
            return trajectories
        finally:
            await self.engine.close()
            if self.judge is not None:
                await self.judge.close()
            await self.toolbox.search.close()

    def update(self, trajectories: list[Trajectory], advantages: list[float]) -> dict[str, float]:
        """Clipped policy-gradient steps over the batch, in mini-batches of trajectories."""
        cfg = self.cfg.grpo
        model = self.policy.model
        model.train()
        size = cfg.mini_batch_size or len(trajectories)
        mini_batches = [list(range(i, min(i + size, len(trajectories)))) for i in range(0, len(trajectories), size)]
        # With one mini-batch the policy has not moved when the loss is taken, so the "old"
        # logprobs equal the current ones (detached); with several, they are recomputed first.
        old = self._logprobs(trajectories, grad=False) if len(mini_batches) > 1 else None
        totals: Counter = Counter()
        for indices in mini_batches:
            trained_tokens = sum(trajectories[i].model_tokens for i in indices) or 1
            self.optimizer.zero_grad(set_to_none=True)
            for start in range(0, len(indices), cfg.micro_batch_size):
                micro = indices[start : start + cfg.micro_batch_size]
                logprobs = self._logprobs([trajectories[i] for i in micro], grad=True)
                loss = torch.zeros(())
                for i, lp in zip(micro, logprobs):  # lp: logprobs of the model's tokens only
                    old_lp = old[i] if old is not None else lp.detach()
                    token_loss, stats = clipped_policy_loss(
                        lp, old_lp, torch.full_like(lp, advantages[i]), torch.ones_like(lp),
                        cfg.clip_ratio_low, cfg.clip_ratio_high,
                    )
                    loss = loss + token_loss / trained_tokens
                    sampled = torch.tensor([v for v, m in zip(trajectories[i].rollout_logprobs, trajectories[i].loss_mask) if m])
                    totals["policy/rollout_logprob_abs_diff"] += float((sampled - lp.detach()).abs().sum())
                    for key, value in stats.items():
                        totals[f"policy/{key}"] += float(value)
                    totals["tokens"] += lp.numel()
                loss.backward()
                totals["policy/loss"] += float(loss.detach())
            grad_norm = clip_and_step(model, self.optimizer, self.cfg.optim.grad_clip)
            totals["policy/grad_norm"] += grad_norm / len(mini_batches)
        model.eval()
        tokens = totals.pop("tokens") or 1.0
        return {
            key: value / tokens if key.startswith("policy/") and key not in ("policy/loss", "policy/grad_norm") else value
            for key, value in totals.items()
        } | {"policy/lr": self.optimizer.param_groups[0]["lr"]}

    def _logprobs(self, trajectories: list[Trajectory], grad: bool) -> list[torch.Tensor]:
        """Logprobs of each trajectory's model tokens under the current weights, at the sampling temperature."""
        sequences = [TokenSequence(t.input_ids, t.images, [0] * len(t.prompt_ids) + t.loss_mask) for t in trajectories]
        with torch.set_grad_enabled(grad):
            return token_logprobs(
                self.policy.model, self.policy.pixels, sequences, self.policy.tokenizer.pad_token_id,
                self.cfg.rollout.temperature,
            )


def rollout_metrics(trajectories: list[Trajectory], step: int) -> dict[str, float]:
    """What a person watches: reward, accuracy, format, tool use, turns, lengths, staleness."""
    n = len(trajectories)
    mean = lambda values: sum(values) / n  # noqa: E731 - reads better than a def here
    metrics = {
        "reward/mean": mean([t.reward for t in trajectories]),
        "reward/accuracy": mean([t.accuracy for t in trajectories]),
        "reward/format_rate": mean([t.format for t in trajectories]),
        "rollout/turns": mean([len(t.model_turns) for t in trajectories]),
        "rollout/response_tokens": mean([len(t.response_ids) for t in trajectories]),
        "rollout/model_tokens": mean([t.model_tokens for t in trajectories]),
        "rollout/staleness": mean([step - min(t.weight_versions) for t in trajectories]),
        "tools/images_dropped": mean([t.images_dropped for t in trajectories]),
    }
    calls = Counter(call.tool for t in trajectories for call in t.tool_calls)
    failed = Counter(call.tool for t in trajectories for call in t.tool_calls if not call.ok)
    for tool in ("code", "search", "image_search", "none"):
        metrics[f"tools/{tool}_calls"] = calls[tool] / n
        metrics[f"tools/{tool}_failed"] = failed[tool] / n
    for finish, count in Counter(t.finish for t in trajectories).items():
        metrics[f"rollout/finish_{finish}"] = count / n
    # Trajectories an exception ended (reward 0), by the stage it happened in: a count, not a share.
    for kind, count in Counter(t.error_kind for t in trajectories if t.error_kind).items():
        metrics[f"rollout/error_{kind}"] = float(count)
    families = Counter(t.record.family for t in trajectories)
    for family, count in families.items():
        metrics[f"accuracy/{family}"] = sum(t.accuracy for t in trajectories if t.record.family == family) / count
    return metrics


def rollout_side(cfg: RLJobConfig, out_dir: Path, policy: Policy) -> dict:
    """GRPOTrainer's rollout fields: data sampler, rollout engine and tools; with `rollout.servers`
    > 0 (or under the launcher) the engine, search and judge are services (see `rl_services`)."""
    paths = data_paths(cfg.data, cfg.tools)
    sampler = task_sampler(cfg.data, cfg.run.seed)
    services = contextlib.ExitStack()
    endpoints = services.enter_context(
        rl_services(cfg, out_dir, policy.path, 0, paths.corpus, paths.image_index, paths.train)
    )
    engine, weight_sync, search, judge = _service_clients(cfg, endpoints, out_dir)
    engine = engine or build_engine(policy, cfg.rollout)
    toolbox = build_toolbox(cfg.tools, paths.corpus, paths.image_index, out_dir / "scratch", search, policy,
                            cfg.model.max_trajectory_pixels, paths.train)
    services.callback(toolbox.close)  # the code sandbox daemon, if the job started one
    encoder = ChatEncoder(policy.tokenizer, policy.pixels.tokens)
    return dict(engine=engine, encoder=encoder, toolbox=toolbox, sampler=sampler, weight_sync=weight_sync,
                judge=judge, services=services)


def _service_clients(cfg: RLJobConfig, endpoints: ServiceEndpoints | None, out_dir: Path):
    """(rollout client, weight sync, search client, judge client) for the services that run;
    None for each that does not."""
    if endpoints is None:
        if cfg.reward.judge.enabled:
            raise ValueError("config reward.judge.enabled needs a judge server: set rollout.servers > 0")
        return None, None, None, None
    engine = weight_sync = search = judge = None
    timeout = cfg.rollout.request_timeout_s
    if endpoints.get(ROLLOUT):
        urls = endpoints.get(ROLLOUT)
        engine = RolloutClient(urls, endpoints.token, timeout)
        weight_sync = _weight_sync(cfg, lambda: RolloutClient(urls, endpoints.token, timeout), out_dir)
    if endpoints.get(SEARCH):
        search = SearchClient(endpoints.get(SEARCH)[0], endpoints.token, cfg.tools.search_timeout_s + 10)
    if cfg.reward.judge.enabled:
        if not endpoints.get(JUDGE):
            raise ValueError("config reward.judge.enabled, but the job runs no judge server")
        judge_model = cfg.reward.judge.model or str(ensure_tiny_model())
        judge = JudgeClient(
            RolloutClient(endpoints.get(JUDGE), endpoints.token, cfg.reward.judge.timeout_s),
            load_processor(judge_model).tokenizer, cfg.reward.judge.timeout_s, cfg.reward.judge.max_new_tokens,
        )
    return engine, weight_sync, search, judge


def _weight_sync(cfg: RLJobConfig, client_factory, out_dir: Path) -> WeightSync:
    """`rollout.weight_sync`: a file per version, or a broadcast from this process (the trainer's
    leader) with the rendezvous at MASTER_ADDR, the trainer node's address from the launch plan."""
    if cfg.rollout.weight_sync == "broadcast":
        return BroadcastWeightSync(client_factory, os.environ.get("MASTER_ADDR", LOOPBACK), cfg.rollout.max_staleness,
                                   cfg.rollout.request_timeout_s)
    if cfg.rollout.weight_sync != "file":
        raise ValueError(f"config rollout.weight_sync={cfg.rollout.weight_sync!r}: expected 'file' or 'broadcast'")
    return WeightSync(client_factory, out_dir / "weights", cfg.rollout.max_staleness)


def write_rollouts(path: Path, trajectories: list[Trajectory]) -> None:
    """The step's trajectories as readable JSON lines: what the model wrote, what it earned."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        for t in trajectories:
            row = {
                "id": t.record.id, "group": t.group, "family": t.record.family, "ground_truth": t.record.answer,
                "answer": t.answer, "reward": t.reward, "accuracy": t.accuracy, "format": t.format,
                "finish": t.finish, "error": t.error or None, "model_turns": t.model_turns,
                "response_tokens": len(t.response_ids),
                "tool_calls": [{"tool": c.tool, "ok": c.ok, "seconds": round(c.seconds, 3)} for c in t.tool_calls],
            }
            # U+0085, U+2028 and U+2029 stay escaped: str.splitlines() would break a line at them.
            line = json.dumps(row, ensure_ascii=False)
            out.write(line.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n")
