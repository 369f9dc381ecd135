"""Cold-start SFT on the Megatron engine: the reference SFT job's trainer (deepeyes.train.sft)
with its forward, backward and optimizer step run by megatron-core.

Same data, same encoding, same token-mean loss on assistant tokens, same loop
(deepeyes.train.sft.train_sft). Every rank reads the whole dataset and walks the same shuffled
order; the engine gives each data-parallel rank its share of every batch. Global rank 0 logs;
checkpoints are distributed checkpoints beside the HF directory (they reshard on load).
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from deepeyes.config import SFTJobConfig
from deepeyes.train.checkpoint import TrainerState, restore_checkpoint, save_checkpoint
from deepeyes.train.forward import TokenSequence
from deepeyes.train.megatron.checkpoint import MegatronModelCheckpoint
from deepeyes.train.megatron.engine import build_engine
from deepeyes.train.megatron.parallel import from_leader
from deepeyes.train.setup import Policy


def negative_log_likelihood(per_sequence, indices):
    """The SFT loss function for MegatronEngine: summed -log p over trained tokens."""
    loss = -sum(lp.sum() for lp in per_sequence)
    tokens = sum(lp.numel() for lp in per_sequence)
    # A tensor, not a float: reading it here would stall the GPU after every micro-batch.
    return loss, tokens, {"loss_sum": loss.detach(), "tokens": tokens}


class MegatronSFTTrainer:
    """deepeyes.train.sft.SFTTrainer's methods, on megatron-core (collective: every rank calls them)."""

    def __init__(self, cfg: SFTJobConfig, policy: Policy):
        self.cfg, self.policy = cfg, policy
        self.engine = build_engine(policy, cfg.trainer, cfg.optim, cfg.run.seed)
        self.optimizer = self.engine.optimizer
        self.leader = dist.get_rank() == 0

    def update(self, batch: list[TokenSequence]) -> dict[str, float]:
        metrics = self.engine.forward_backward(batch, self.cfg.sft.micro_batch_size, negative_log_likelihood)
        grad_norm = self.engine.step(self.optimizer.param_groups[0]["lr"])
        return {"sft/loss": metrics["loss_sum"] / metrics["tokens"], "sft/grad_norm": grad_norm,
                "sft/tokens": metrics["tokens"]}

    def agree(self, stop_requested: bool) -> bool:
        return from_leader(stop_requested)

    def save(self, out_dir: Path, step: int, run_id: str | None) -> Path:
        # No sampler: the data position is the step. Collective; restores at any TP/PP/DP layout.
        return save_checkpoint(out_dir, step, run_id, MegatronModelCheckpoint(self.engine, self.policy.processor),
                               keep=self.cfg.run.keep_checkpoints)

    def restore(self, checkpoint: Path) -> TrainerState:
        return restore_checkpoint(checkpoint, MegatronModelCheckpoint(self.engine, self.policy.processor))
