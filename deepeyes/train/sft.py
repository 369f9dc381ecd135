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

from tqdm.auto import tqdm

from deepeyes.agent.chat import ChatEncoder
from deepeyes.config import SFTJobConfig
from deepeyes.data import read_sft_records
from deepeyes.train.checkpoint import TrainerState, rng_state, save_checkpoint
from deepeyes.train.forward import TokenSequence, token_logprobs
from deepeyes.train.run_logger import RunLogger
from deepeyes.train.sampler import MixtureSampler, realized_mix
from deepeyes.train.setup import (
    build_optimizer, clip_and_step, data_sources, load_policy, read_validated, seed_everything, set_learning_rate,
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


def train_sft(cfg: SFTJobConfig) -> Path:
    """The SFT job on this machine; returns the final checkpoint directory."""
    if cfg.trainer.backend == "megatron":
        from deepeyes.train.megatron.sft import train_sft_megatron  # imports megatron-core only when asked for

        return train_sft_megatron(cfg)
    out_dir = Path(cfg.run.out_dir)
    seed_everything(cfg.run.seed)
    policy = load_policy(cfg.model, cfg.run.init_from)
    samples, dropped = load_sft_samples(cfg, policy)
    optimizer = build_optimizer(policy.model, cfg.optim)
    logger = RunLogger(cfg.logger, cfg, out_dir, job="sft")
    logger.log({"data/samples": len(samples)} | {f"data/dropped_{k}": v for k, v in dropped.items()}, step=0)
    model = policy.model
    model.train()
    step = 0
    bar = tqdm(total=sft_total_steps(len(samples), cfg), desc="sft", unit="step")
    try:
        for epoch, batch in sft_schedule(samples, cfg):
            started = time.perf_counter()
            lr = set_learning_rate(optimizer, cfg.optim, step)
            optimizer.zero_grad(set_to_none=True)
            trained_tokens = sum(sum(s.mask) for s in batch)
            loss_total = 0.0
            for start in range(0, len(batch), cfg.sft.micro_batch_size):
                micro = batch[start : start + cfg.sft.micro_batch_size]
                logprobs = token_logprobs(model, policy.pixels, micro, policy.tokenizer.pad_token_id)
                loss = -sum(lp.sum() for lp in logprobs) / trained_tokens  # token mean over the batch
                loss.backward()
                loss_total += float(loss.detach())
            grad_norm = clip_and_step(model, optimizer, cfg.optim.grad_clip)
            step += 1
            logger.log(
                {"sft/loss": loss_total, "sft/grad_norm": grad_norm, "sft/lr": lr, "sft/epoch": epoch,
                 "sft/tokens": trained_tokens, "timing/step_s": time.perf_counter() - started} | batch_mix(batch, cfg),
                step=step,
            )
            bar.set_postfix(loss=f"{loss_total:.3f}", epoch=epoch)
            bar.update()
        policy.pixels.release()
        model.eval()
        state = TrainerState(step, optimizer.state_dict(), {"epoch": cfg.sft.epochs, "position": 0}, logger.run_id, rng_state())
        checkpoint = save_checkpoint(out_dir, model, policy.processor, state)
        log.info("saved %s", checkpoint)
    finally:
        bar.close()
        logger.finish()
    return checkpoint
