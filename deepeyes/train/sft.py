"""Cold-start SFT on multi-turn tool-using trajectories: loss on assistant tokens only.

Conversations are encoded with the same `ChatEncoder` the RL agent loop uses, so the model
learns exactly the token sequences it will later produce and read during rollouts.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from deepeyes.agent.chat import ChatEncoder
from deepeyes.config import SFTJobConfig
from deepeyes.data import read_sft_records
from deepeyes.progress import progress_bar
from deepeyes.train.preemption import Preempted, StopSignal
from deepeyes.train.checkpoint import (
    HFModelCheckpoint, TrainerState, latest_checkpoint, restore_checkpoint, save_checkpoint,
)
from deepeyes.train.forward import TokenSequence, token_logprobs
from deepeyes.train.run_logger import RunLogger
from deepeyes.train.sampler import MixtureSampler, realized_mix
from deepeyes.train.setup import (
    Policy, build_optimizer, clip_and_step, data_sources, load_policy, read_validated, seed_everything,
    set_learning_rate,
)

log = logging.getLogger(__name__)


def encode_sft_dataset(records, encoder: ChatEncoder, cutoff_len: int) -> tuple[list[TokenSequence], Counter]:
    """One sequence per record (loss mask 1 on assistant tokens), and why others were dropped:
    longer than `cutoff_len` (truncating would cut an answer off its reasoning, or an image in
    half) or without an assistant turn to learn from."""
    samples, dropped = [], Counter()
    for record in records:
        ids, mask = encoder.conversation(record.messages, list(record.images))
        if len(ids) > cutoff_len:
            dropped["too_long"] += 1
        elif 1 not in mask:
            dropped["no_assistant_turn"] += 1
        else:
            samples.append(TokenSequence(ids, list(record.images), mask))
    return samples, dropped


def load_sft_samples(cfg: SFTJobConfig, policy) -> tuple[list[TokenSequence], Counter]:
    """The configured SFT trajectories (of every mixture source), validated and encoded, each
    tagged with its source; dropped samples are counted and logged."""
    encoder = ChatEncoder(policy.tokenizer, policy.pixels.tokens)
    samples, dropped = [], Counter()
    for source in data_sources(cfg.data, "sft"):
        records = read_validated(read_sft_records, Path(source.path), cfg.data.on_bad_record)
        encoded, lost = encode_sft_dataset(records, encoder, cfg.sft.cutoff_len)
        if lost:
            log.warning("%s: dropped %s of %d samples (sft.cutoff_len=%d)", source.path, dict(lost), len(records),
                        cfg.sft.cutoff_len)
        if not encoded:
            raise ValueError(f"{source.path}: no usable sample ({dict(lost)}; sft.cutoff_len={cfg.sft.cutoff_len})")
        samples += [replace(sample, source=source.name) for sample in encoded]
        dropped += lost
    return samples, dropped


def sft_schedule(samples: list[TokenSequence], cfg: SFTJobConfig) -> Iterator[tuple[int, list[TokenSequence]]]:
    """(epoch, batch) for every optimizer step, up to sft.max_steps: a seeded shuffle per epoch;
    for a mixture (data.sft_mix), batches drawn from the sources by weight, an "epoch" being as
    many samples as all sources hold."""
    if cfg.data.sft_mix:
        by_source = defaultdict(list)
        for sample in samples:
            by_source[sample.source].append(sample)
        sampler = MixtureSampler(by_source, {source.name: source.weight for source in cfg.data.sft_mix}, cfg.run.seed)
        for step in range(sft_total_steps(len(samples), cfg)):
            yield step * cfg.sft.batch_size // len(samples), sampler.take(cfg.sft.batch_size)
        return
    order_rng = random.Random(cfg.run.seed)
    step = 0
    for epoch in range(cfg.sft.epochs):
        order = list(range(len(samples)))
        order_rng.shuffle(order)
        for first in range(0, len(order), cfg.sft.batch_size):
            if step == sft_total_steps(len(samples), cfg):
                return
            step += 1
            yield epoch, [samples[i] for i in order[first : first + cfg.sft.batch_size]]


def batch_mix(batch: list[TokenSequence], cfg: SFTJobConfig) -> dict[str, float]:
    """The batch's realized mix (`data/mix/<source>`) when training on a mixture."""
    return realized_mix(sample.source for sample in batch) if cfg.data.sft_mix else {}


def sft_total_steps(n_samples: int, cfg: SFTJobConfig) -> int:
    total = -(-n_samples // cfg.sft.batch_size) * cfg.sft.epochs
    return min(total, cfg.sft.max_steps) if cfg.sft.max_steps else total


class SFTTrainer:
    """The reference SFT update: `token_logprobs` + backward + AdamW on the HF model, one process.
    The megatron trainer (deepeyes.train.megatron.sft) has the same methods."""

    leader = True  # this process logs and writes the run's files

    def __init__(self, cfg: SFTJobConfig, policy: Policy):
        self.cfg, self.policy = cfg, policy
        self.optimizer = build_optimizer(policy.model, cfg.optim)
        policy.model.train()

    def update(self, batch: list[TokenSequence]) -> dict[str, float]:
        """One optimizer step on `batch`: token-mean negative log-likelihood of the trained tokens."""
        model = self.policy.model
        self.optimizer.zero_grad(set_to_none=True)
        trained_tokens = sum(sum(s.mask) for s in batch)
        loss_total = 0.0
        for start in range(0, len(batch), self.cfg.sft.micro_batch_size):
            micro = batch[start : start + self.cfg.sft.micro_batch_size]
            logprobs = token_logprobs(model, self.policy.pixels, micro, self.policy.tokenizer.pad_token_id)
            loss = -sum(lp.sum() for lp in logprobs) / trained_tokens  # token mean over the batch
            loss.backward()
            loss_total += float(loss.detach())
        grad_norm = clip_and_step(model, self.optimizer, self.cfg.optim.grad_clip)
        return {"sft/loss": loss_total, "sft/grad_norm": grad_norm, "sft/tokens": trained_tokens}

    def agree(self, stop_requested: bool) -> bool:
        return stop_requested

    def save(self, out_dir: Path, step: int, run_id: str | None) -> Path:
        # No sampler: the data position is the step (the schedule is a function of the seed).
        return save_checkpoint(out_dir, step, run_id, self.model_checkpoint(), keep=self.cfg.run.keep_checkpoints)

    def restore(self, checkpoint: Path) -> TrainerState:
        return restore_checkpoint(checkpoint, self.model_checkpoint())

    def model_checkpoint(self):
        """Where this trainer's weights and optimizer go in a checkpoint."""
        return HFModelCheckpoint(self.policy.model, self.policy.processor, self.optimizer)


def train_sft(cfg: SFTJobConfig) -> Path:
    """The SFT job on this machine (or on this rank); returns the final checkpoint directory.

    A run restarted in the same `run.out_dir` resumes from its latest checkpoint (weights,
    optimizer, data position, RNG, wandb run); on the stop signal (Slurm's SIGUSR2) it saves
    at the end of the step and raises Preempted.
    """
    out_dir = Path(cfg.run.out_dir)
    seed_everything(cfg.run.seed)
    resume = latest_checkpoint(out_dir)
    # Megatron ranks read their own slices of the checkpoint (deepeyes.train.megatron.engine.build_engine).
    policy = load_policy(cfg.model, str(resume) if resume else cfg.run.init_from,
                         weights=cfg.trainer.backend != "megatron")
    if cfg.trainer.backend == "megatron":
        from deepeyes.train.megatron.sft import MegatronSFTTrainer  # imports megatron-core only when asked for

        trainer = MegatronSFTTrainer(cfg, policy)
    else:
        trainer = SFTTrainer(cfg, policy)
    samples, dropped = load_sft_samples(cfg, policy)
    start, run_id = 0, None
    if resume is not None:
        state = trainer.restore(resume)
        start, run_id = state.step, state.run_id
        log.info("resuming from %s at step %d", resume, start)
    logger = RunLogger(cfg.logger, cfg, out_dir, job="sft", run_id=run_id, resumed_at=start) if trainer.leader else None
    if logger is not None and resume is None:
        logger.log({"data/samples": len(samples)} | {f"data/dropped_{k}": v for k, v in dropped.items()}, step=0)
    total = sft_total_steps(len(samples), cfg)
    bar = progress_bar(total=total, initial=start, desc="sft", unit="step", disable=not trainer.leader)
    checkpoint = resume
    stop = StopSignal.install()
    try:
        for step, (epoch, batch) in enumerate(sft_schedule(samples, cfg), start=1):
            if step <= start:
                continue  # done before the resume
            started = time.perf_counter()
            lr = set_learning_rate(trainer.optimizer, cfg.optim, step - 1, total)
            metrics = trainer.update(batch)
            if logger is not None:
                metrics |= {"sft/lr": lr, "sft/epoch": epoch, "timing/step_s": time.perf_counter() - started}
                logger.log(metrics | batch_mix(batch, cfg), step=step)
            bar.set_postfix(loss=f"{metrics['sft/loss']:.3f}", epoch=epoch)
            bar.update()
            last = step == total
            stopping = trainer.agree(stop.requested)
            if last or stopping or (cfg.run.save_every and step % cfg.run.save_every == 0):
                checkpoint = trainer.save(out_dir, step, logger and logger.run_id)
                log.info("saved %s", checkpoint)
            if stopping and not last:
                raise Preempted(f"stopped after step {step} on the stop signal; resume from {checkpoint}")
    finally:
        stop.restore()
        bar.close()
        if logger is not None:
            logger.finish()
    return checkpoint
