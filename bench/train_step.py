"""Time of one Megatron training step against the reference (plain PyTorch) step, same model and batch.

    python bench/train_step.py [--steps 6] [--batch 4] [--micro 2] [--threads 0]

Both take one SFT optimizer step on the same mini-batch of cold-start trajectories on the tiny
model (fp32, one process, TP=PP=DP=1): the reference is `token_logprobs` + backward + AdamW as
deepeyes.train.sft runs it; Megatron is `MegatronEngine.forward_backward` + `step` (packed rows,
megatron-core layers, DDP buffers, the CPU shims). The two alternate, after one warm-up each, so
load from other processes hits both alike. The ratio is the median over pairs of steps, by wall
and by CPU time; the load average is reported with it.

Last line: `RESULT {json}`; target `megatron_over_reference` ≤ 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from deepeyes.agent.chat import ChatEncoder
from deepeyes.config import OptimConfig
from deepeyes.data import ensure_sample_data, read_sft_records
from deepeyes.model import ensure_tiny_model, load_model, load_processor
from deepeyes.model.megatron.spec import ParallelLayout
from deepeyes.model.pixels import PixelCache
from deepeyes.train.forward import token_logprobs
from deepeyes.train.megatron.engine import MegatronEngine, OptimSettings
from deepeyes.train.megatron.parallel import init_parallel
from deepeyes.train.megatron.sft import negative_log_likelihood
from deepeyes.train.setup import build_optimizer, clip_and_step
from deepeyes.train.sft import encode_sft_dataset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="2 steps of a batch of 2: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.batch, args.micro = 2, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    path = ensure_tiny_model()
    processor = load_processor(path)
    pixels = PixelCache(processor.image_processor, 3136, 50176)
    sample = ensure_sample_data(n_per_family=4, seed=0)
    sequences, _ = encode_sft_dataset(
        read_sft_records(sample.sft_train), ChatEncoder(processor.tokenizer, pixels.tokens), 2048
    )
    batch = sequences[: args.batch]
    tokens = sum(len(s.ids) for s in batch)
    pad_id = processor.tokenizer.pad_token_id

    reference = load_model(path)
    reference.train()
    optimizer = build_optimizer(reference, OptimConfig(lr=1e-5))

    def reference_step():
        optimizer.zero_grad(set_to_none=True)
        trained = sum(sum(s.mask) for s in batch)
        for start in range(0, len(batch), args.micro):
            logprobs = token_logprobs(reference, pixels, batch[start : start + args.micro], pad_id)
            (-sum(lp.sum() for lp in logprobs) / trained).backward()
        clip_and_step(reference, optimizer, 1.0)

    init_parallel(ParallelLayout(), seed=0)
    engine = MegatronEngine(load_model(path), pixels, ParallelLayout(), OptimSettings(1e-5, 0.0, (0.9, 0.999), 1.0, False))

    def megatron_step():
        engine.forward_backward(batch, args.micro, negative_log_likelihood)
        engine.step(1e-5)

    # Wall time and this process's CPU time of each step. On a shared, noisy box each pair (one
    # reference step, then one megatron step) sees about the same load, so the median of the
    # per-pair ratios is steadier than the ratio of medians; CPU time ignores time waiting for cores.
    wall = {"reference": [], "megatron": []}
    cpu = {"reference": [], "megatron": []}
    for repeat in range(args.steps + 1):
        for name, step in (("reference", reference_step), ("megatron", megatron_step)):
            started, started_cpu = time.perf_counter(), time.process_time()
            step()
            if repeat:  # the first of each is a warm-up
                wall[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - started_cpu)
    ratio = lambda times: statistics.median(m / r for r, m in zip(times["reference"], times["megatron"]))  # noqa: E731
    ref_s, meg_s = statistics.median(wall["reference"]), statistics.median(wall["megatron"])
    print(f"batch: {len(batch)} sequences, {tokens} tokens ({sum(sum(s.mask) for s in batch)} trained)")
    print(f"reference step {ref_s:.2f} s ({tokens / ref_s:.0f} tokens/s); megatron step {meg_s:.2f} s ({tokens / meg_s:.0f} tokens/s)")
    print(f"per-pair ratios (megatron / reference), wall: {[round(m / r, 2) for r, m in zip(wall['reference'], wall['megatron'])]}")
    result = {
        "reference_step_s": round(ref_s, 3), "megatron_step_s": round(meg_s, 3),
        "reference_tokens_per_s": round(tokens / ref_s), "megatron_tokens_per_s": round(tokens / meg_s),
        "megatron_over_reference": round(ratio(wall), 3), "megatron_over_reference_cpu_time": round(ratio(cpu), 3),
        "target": 1.3, "device": "cpu", "threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 1),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
