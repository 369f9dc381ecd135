"""GRPO updates on the Megatron engine: the reference trainer's `update` (deepeyes.train.grpo)
with forward, backward and optimizer step run by megatron-core, on one rank or many.

Rollouts, rewards, advantages, logging and checkpoint layout are the reference trainer's; only
the policy update differs. Same sequences (prompt masked out), same clipped token-mean loss
(deepeyes.train.losses.clipped_policy_loss), same old-policy rule: with several mini-batches
the old logprobs are recomputed before the first update, otherwise they are the current
ones, detached.

With several ranks (torchrun, or the node agent's per-GPU trainer processes) global rank 0 is
the leader: it alone samples prompts, drives the rollout servers and tools, logs and writes the
run's files. Each step it hands the scored batch (token ids, loss masks, images, advantages) to
every rank; all ranks run the update, each on its data-parallel share; the leader then copies
the new weights into the HF model the rollout engine (or the weight sync) reads. Checkpoints
are megatron distributed checkpoints beside the HF directory, so a run resumes at another
TP/PP/DP layout.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from deepeyes.agent.trajectory import Trajectory
from deepeyes.config import RLJobConfig
from deepeyes.train.forward import TokenSequence
from deepeyes.train.grpo import GRPOTrainer, rollout_side
from deepeyes.train.losses import clipped_policy_loss
from deepeyes.train.megatron.checkpoint import MegatronModelCheckpoint
from deepeyes.train.megatron.engine import MegatronEngine, build_engine
from deepeyes.train.megatron.parallel import from_leader
from deepeyes.train.setup import Policy

# How long the other ranks wait for the leader's rollouts of one step. The hand-off has its own
# gloo group so that this wait does not stretch the training collectives' (NCCL) timeout.
ROLLOUT_WAIT = timedelta(hours=6)


@dataclass
class Batch:
    """What every rank needs of a step's trajectories for the update."""

    sequences: list[TokenSequence]  # prompt + response, loss mask on the model's own tokens
    advantages: list[float]
    sampled_logprobs: list[list[float]]  # the rollout engine's logprob of each trained token

    @classmethod
    def of(cls, trajectories: list[Trajectory], advantages: list[float]) -> "Batch":
        return cls(
            [TokenSequence(t.input_ids, t.images, [0] * len(t.prompt_ids) + t.loss_mask) for t in trajectories],
            list(advantages),
            [[v for v, m in zip(t.rollout_logprobs, t.loss_mask) if m] for t in trajectories],
        )


@dataclass
class MegatronGRPOTrainer(GRPOTrainer):
    megatron: MegatronEngine | None = None
    handoff: dist.ProcessGroup | None = None  # leader → other ranks (None: a world of one)

    @property
    def leader(self) -> bool:
        return dist.get_rank() == 0

    def step(self, step: int) -> tuple[dict[str, float], list[Trajectory]]:
        if self.leader:
            return super().step(step)
        self.update(None, None)  # the leader's batch arrives in update
        self.policy.pixels.release()
        return {}, []

    def agree(self, stop_requested: bool) -> bool:
        return from_leader(stop_requested, self.handoff)

    def publish_weights(self, version: int, everything: bool = False) -> None:
        if self.leader:
            super().publish_weights(version, everything)

    def update(self, trajectories: list[Trajectory] | None, advantages: list[float] | None) -> dict[str, float]:
        """Clipped policy-gradient steps over the batch, in mini-batches of trajectories (collective)."""
        batch = from_leader(Batch.of(trajectories, advantages) if self.leader else None, self.handoff)
        cfg = self.cfg.grpo
        temperature = self.cfg.rollout.temperature
        count = len(batch.sequences)
        size = cfg.mini_batch_size or count
        mini_batches = [list(range(i, min(i + size, count))) for i in range(0, count, size)]
        old = None
        if len(mini_batches) > 1:
            old = [self.megatron.logprobs([batch.sequences[i] for i in indices], cfg.micro_batch_size, temperature)
                   for indices in mini_batches]
        totals: Counter = Counter()
        for b, indices in enumerate(mini_batches):
            def loss_fn(per_sequence, local, indices=indices, b=b):
                loss, metrics = torch.zeros(()), Counter()
                for j, lp in zip(local, per_sequence):
                    i = indices[j]
                    old_lp = old[b][j] if old is not None else lp.detach()
                    token_loss, stats = clipped_policy_loss(
                        lp, old_lp, torch.full_like(lp, batch.advantages[i]), torch.ones_like(lp),
                        cfg.clip_ratio_low, cfg.clip_ratio_high,
                    )
                    loss = loss + token_loss
                    sampled = torch.tensor(batch.sampled_logprobs[i], device=lp.device)
                    metrics["policy/rollout_logprob_abs_diff"] += float((sampled - lp.detach()).abs().sum())
                    for key, value in stats.items():
                        metrics[f"policy/{key}"] += float(value)
                    metrics["tokens"] += lp.numel()
                metrics["loss_sum"] = float(loss.detach())
                return loss, int(metrics["tokens"]), dict(metrics)

            metrics = self.megatron.forward_backward(
                [batch.sequences[i] for i in indices], cfg.micro_batch_size, loss_fn, temperature,
            )
            totals["policy/grad_norm"] += self.megatron.step(self.optimizer.param_groups[0]["lr"]) / len(mini_batches)
            totals["policy/loss"] += metrics.pop("loss_sum") / max(metrics["tokens"], 1)
            totals.update(metrics)
        weights = self.megatron.hf_state()  # gathered on the leader only
        if weights is not None:
            self.policy.model.load_state_dict(weights)
        tokens = totals.pop("tokens") or 1.0
        return {
            key: value / tokens if key.startswith("policy/") and key not in ("policy/loss", "policy/grad_norm") else value
            for key, value in totals.items()
        } | {"policy/lr": self.optimizer.param_groups[0]["lr"]}

    def model_checkpoint(self) -> MegatronModelCheckpoint:
        """HF directory + megatron distributed checkpoint (model, optimizer; restores at any TP/PP/DP
        layout); save and restore are collective. The sampler is the leader's alone."""
        return MegatronModelCheckpoint(self.megatron, self.policy.processor)


def build_megatron_trainer(cfg: RLJobConfig, out_dir: Path, policy: Policy) -> MegatronGRPOTrainer:
    """Join the process groups, build the engine; the rollout side on the leader only."""
    engine = build_engine(policy, cfg.trainer, cfg.optim, cfg.run.seed)
    handoff = dist.new_group(backend="gloo", timeout=ROLLOUT_WAIT) if dist.get_world_size() > 1 else None
    rollouts = rollout_side(cfg, out_dir, policy) if dist.get_rank() == 0 else {}
    return MegatronGRPOTrainer(cfg, policy, engine.optimizer, **rollouts, megatron=engine, handoff=handoff)
