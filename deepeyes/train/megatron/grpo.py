"""GRPO updates on the Megatron engine: the reference trainer's `update` (deepeyes.train.grpo)
with forward, backward and optimizer step run by megatron-core.

Rollouts, rewards, advantages, logging and checkpoints are the reference trainer's; only the
policy update differs. Same sequences (prompt masked out), same clipped token-mean loss
(deepeyes.train.losses.clipped_policy_loss), same old-policy rule: with several mini-batches
the old logprobs are recomputed before the first update, otherwise they are the current
ones, detached. After each update the new weights are copied into the HF model that the
rollout engine (or the weight sync to rollout servers) reads.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from deepeyes.agent.trajectory import Trajectory
from deepeyes.train.forward import TokenSequence
from deepeyes.train.grpo import GRPOTrainer
from deepeyes.train.losses import clipped_policy_loss
from deepeyes.train.megatron.engine import MegatronEngine, build_engine


@dataclass
class MegatronGRPOTrainer(GRPOTrainer):
    megatron: MegatronEngine | None = None

    def update(self, trajectories: list[Trajectory], advantages: list[float]) -> dict[str, float]:
        """Clipped policy-gradient steps over the batch, in mini-batches of trajectories."""
        cfg = self.cfg.grpo
        temperature = self.cfg.rollout.temperature
        sequences = [TokenSequence(t.input_ids, t.images, [0] * len(t.prompt_ids) + t.loss_mask) for t in trajectories]
        size = cfg.mini_batch_size or len(trajectories)
        mini_batches = [list(range(i, min(i + size, len(trajectories)))) for i in range(0, len(trajectories), size)]
        old = None
        if len(mini_batches) > 1:
            old = [self.megatron.logprobs([sequences[i] for i in batch], cfg.micro_batch_size, temperature)
                   for batch in mini_batches]
        totals: Counter = Counter()
        for b, batch in enumerate(mini_batches):
            def loss_fn(per_sequence, local, batch=batch, b=b):
                loss, metrics = torch.zeros(()), Counter()
                for j, lp in zip(local, per_sequence):
                    i = batch[j]
                    old_lp = old[b][j] if old is not None else lp.detach()
                    token_loss, stats = clipped_policy_loss(
                        lp, old_lp, torch.full_like(lp, advantages[i]), torch.ones_like(lp),
                        cfg.clip_ratio_low, cfg.clip_ratio_high,
                    )
                    loss = loss + token_loss
                    sampled = torch.tensor([v for v, m in zip(trajectories[i].rollout_logprobs, trajectories[i].loss_mask) if m])
                    metrics["policy/rollout_logprob_abs_diff"] += float((sampled - lp.detach()).abs().sum())
                    for key, value in stats.items():
                        metrics[f"policy/{key}"] += float(value)
                    metrics["tokens"] += lp.numel()
                metrics["loss_sum"] = float(loss.detach())
                return loss, int(metrics["tokens"]), dict(metrics)

            metrics = self.megatron.forward_backward([sequences[i] for i in batch], cfg.micro_batch_size, loss_fn, temperature)
            totals["policy/grad_norm"] += self.megatron.step(self.optimizer.param_groups[0]["lr"]) / len(mini_batches)
            totals["policy/loss"] += metrics.pop("loss_sum") / max(metrics["tokens"], 1)
            totals.update(metrics)
        self.policy.model.load_state_dict(self.megatron.hf_state())
        tokens = totals.pop("tokens") or 1.0
        return {
            key: value / tokens if key.startswith("policy/") and key not in ("policy/loss", "policy/grad_norm") else value
            for key, value in totals.items()
        } | {"policy/lr": self.optimizer.param_groups[0]["lr"]}


def on_megatron(trainer: GRPOTrainer) -> MegatronGRPOTrainer:
    """The same trainer with its policy updates on megatron-core (`trainer.backend=megatron`)."""
    cfg = trainer.cfg
    engine = build_engine(trainer.policy, cfg.trainer, cfg.optim, cfg.run.seed)
    if dist.get_world_size() > 1:
        raise ValueError(
            "GRPO with trainer.backend=megatron runs as one process here (rollouts are not yet shared "
            f"between ranks); got world size {dist.get_world_size()}"
        )
    values = {f.name: getattr(trainer, f.name) for f in fields(GRPOTrainer)}
    return MegatronGRPOTrainer(**(values | {"optimizer": engine.optimizer}), megatron=engine)
