"""Cold-start SFT on the Megatron engine: the reference SFT job (deepeyes.train.sft) with its
forward, backward and optimizer step run by megatron-core.

Same data, same encoding, same token-mean loss on assistant tokens. Every rank reads the whole
dataset and walks the same shuffled order; the engine gives each data-parallel rank its share
of every batch.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch.distributed as dist

from deepeyes.config import SFTJobConfig
from deepeyes.train.checkpoint import TrainerState, rng_state
from deepeyes.train.megatron.checkpoint import save_megatron_checkpoint
from deepeyes.train.megatron.engine import build_engine
from deepeyes.train.run_logger import RunLogger
from deepeyes.train.setup import load_policy, seed_everything, set_learning_rate
from deepeyes.train.sft import batch_mix, load_sft_samples, sft_schedule

log = logging.getLogger(__name__)


def negative_log_likelihood(per_sequence, indices):
    """The SFT loss function for MegatronEngine: summed -log p over trained tokens."""
    loss = -sum(lp.sum() for lp in per_sequence)
    tokens = sum(lp.numel() for lp in per_sequence)
    return loss, tokens, {"loss_sum": float(loss.detach()), "tokens": tokens}


def train_sft_megatron(cfg: SFTJobConfig) -> Path:
    """The SFT job with `trainer.backend=megatron`; returns the final checkpoint directory."""
    out_dir = Path(cfg.run.out_dir)
    seed_everything(cfg.run.seed)
    policy = load_policy(cfg.model, cfg.run.init_from)
    engine = build_engine(policy, cfg.trainer, cfg.optim, cfg.run.seed)
    samples, dropped = load_sft_samples(cfg, policy)
    leader = dist.get_rank() == 0
    logger = RunLogger(cfg.logger, cfg, out_dir, job="sft") if leader else None
    if logger:
        logger.log({"data/samples": len(samples)} | {f"data/dropped_{k}": v for k, v in dropped.items()}, step=0)
    step = 0
    try:
        for epoch, batch in sft_schedule(samples, cfg):
            started = time.perf_counter()
            lr = set_learning_rate(engine.optimizer, cfg.optim, step)
            metrics = engine.forward_backward(batch, cfg.sft.micro_batch_size, negative_log_likelihood)
            grad_norm = engine.step(lr)
            step += 1
            if logger:
                logger.log(
                    {"sft/loss": metrics["loss_sum"] / metrics["tokens"], "sft/grad_norm": grad_norm, "sft/lr": lr,
                     "sft/epoch": epoch, "sft/tokens": metrics["tokens"], "timing/step_s": time.perf_counter() - started}
                    | batch_mix(batch, cfg),
                    step=step,
                )
        policy.pixels.release()
        state = TrainerState(step, None, {"epoch": cfg.sft.epochs, "position": 0}, logger and logger.run_id, rng_state())
        checkpoint = save_megatron_checkpoint(out_dir, engine, policy.processor, state)
        log.info("saved %s", checkpoint)
    finally:
        if logger:
            logger.finish()
    return checkpoint
