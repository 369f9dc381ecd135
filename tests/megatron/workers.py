"""What each rank of the multi-process tests runs (real torch.distributed over gloo).

Every rank also computes the reference — the plain-PyTorch HF trainer's forward
(`token_logprobs`), loss and AdamW steps — on the same mini-batches, and compares locally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from deepeyes.agent.chat import ChatEncoder
from deepeyes.data import ensure_sample_data, read_sft_records
from transformers import Qwen2_5_VLForConditionalGeneration

from deepeyes.model import IMAGE_TOKEN_ID, ensure_tiny_model, load_model, load_processor
from deepeyes.model.load import CheckpointTensors
from deepeyes.model.tiny import tiny_config
from deepeyes.model.pixels import PixelCache
from deepeyes.model.megatron.convert import save_hf_checkpoint
from deepeyes.model.megatron.spec import ParallelLayout
from deepeyes.train.forward import TokenSequence, token_logprobs
from deepeyes.train.checkpoint import restore_checkpoint, save_checkpoint
from deepeyes.train.megatron.checkpoint import MegatronModelCheckpoint
from deepeyes.train.sampler import MixtureSampler
from deepeyes.train.megatron.engine import MegatronEngine, OptimSettings
from deepeyes.train.megatron.parallel import init_parallel
from deepeyes.train.setup import build_optimizer, clip_and_step
from deepeyes.config import OptimConfig
from deepeyes.train.sft import encode_sft_dataset

LR = 1e-5
STEPS = 3
MICRO = 2


@dataclass
class Case:
    layout: ParallelLayout
    distributed_optimizer: bool = False


def join(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def shorten(sequence: TokenSequence, keep_head: int = 16) -> TokenSequence:
    """The sequence without most of its long system prompt (a CPU-sized, still valid sequence):
    tokens between the first `keep_head` and a few before the first image are dropped."""
    first_image = sequence.ids.index(IMAGE_TOKEN_ID) if IMAGE_TOKEN_ID in sequence.ids else len(sequence.ids)
    cut = slice(keep_head, max(keep_head, first_image - 8))
    ids, mask = list(sequence.ids), list(sequence.mask)
    del ids[cut], mask[cut]
    return TokenSequence(ids, sequence.images, mask)


def sft_batches(tokenizer, pixels, count: int, steps: int):
    """`steps` mini-batches of `count` shortened cold-start SFT sequences."""
    sample = ensure_sample_data(n_per_family=4, seed=0)
    sequences, _ = encode_sft_dataset(read_sft_records(sample.sft_train), ChatEncoder(tokenizer, pixels.tokens), 2048)
    sequences = [shorten(s) for s in sequences][: count * steps]
    return [sequences[i * count : (i + 1) * count] for i in range(steps)]


def sft_loss(batch):
    def loss_fn(per_sequence, indices):
        loss = -sum(lp.sum() for lp in per_sequence)
        tokens = sum(lp.numel() for lp in per_sequence)
        return loss, tokens, {"loss_sum": float(loss.detach()), "tokens": tokens}
    return loss_fn


def reference_run(model, pixels, pad_id, batches):
    """The reference trainer's SFT steps: losses, first-step gradients, final parameters."""
    optimizer = build_optimizer(model, OptimConfig(lr=LR, grad_clip=1.0))
    losses, first_grads = [], None
    model.train()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        tokens = sum(sum(s.mask) for s in batch)
        total = 0.0
        for start in range(0, len(batch), MICRO):
            logprobs = token_logprobs(model, pixels, batch[start : start + MICRO], pad_id)
            loss = -sum(lp.sum() for lp in logprobs) / tokens
            loss.backward()
            total += float(loss)
        losses.append(total)
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        clip_and_step(model, optimizer, 1.0)
    return losses, first_grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def deeper_tiny_model(out_dir: str, layers: int) -> Path:
    """The tiny model with `layers` language layers (an interleaved pipeline needs more than 2)."""
    path = Path(out_dir) / f"tiny-{layers}-layers"
    config = tiny_config()
    config.text_config.num_hidden_layers = layers
    config.text_config.layer_types = ["full_attention"] * layers
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    load_processor(ensure_tiny_model()).save_pretrained(path)
    return path


def parity(rank: int, world: int, port: int, cases: list[Case], model_dir: str | None, results) -> None:
    """For each case: losses of 3 SFT steps, step-1 gradients and final weights vs the reference."""
    join(rank, world, port)
    path = Path(model_dir) if model_dir else ensure_tiny_model()
    processor = load_processor(path)
    pixels = PixelCache(processor.image_processor, 3136, 50176)
    pad_id = processor.tokenizer.pad_token_id
    batches = sft_batches(processor.tokenizer, pixels, 4, STEPS)
    if rank == 0:  # the only rank the gathered Megatron weights arrive on
        ref_losses, ref_grads, ref_params = reference_run(load_model(path), pixels, pad_id, batches)
    report = {}
    for case in cases:
        init_parallel(case.layout, seed=0)
        engine = MegatronEngine(
            load_model(path), pixels, case.layout,
            OptimSettings(LR, 0.0, (0.9, 0.999), 1.0, case.distributed_optimizer),
        )
        losses, grad_diff = [], None
        for step, batch in enumerate(batches):
            metrics = engine.forward_backward(batch, MICRO, sft_loss(batch))
            losses.append(metrics["loss_sum"] / metrics["tokens"])
            if step == 0 and not case.distributed_optimizer:
                grads = engine.hf_state(lambda p: p.main_grad)
                if grads is not None:
                    grad_diff = max((grads[n] - g).abs().max().item() for n, g in ref_grads.items())
            engine.step(LR)
        params = engine.hf_state()
        if params is not None:
            report[repr(case)] = {
                "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
                "grad_diff": grad_diff,
                "param_diff": max((params[n] - p).abs().max().item() for n, p in ref_params.items()),
                "losses": losses,
            }
    if rank == 0:
        results.put(report)
    dist.barrier()
    dist.destroy_process_group()


def conversion(rank: int, world: int, port: int, layouts: list[ParallelLayout], out_dir: str, results) -> None:
    """Per layout: HF → Megatron → HF directory `<out_dir>/<i>`, and Megatron logprobs vs the HF model's."""
    join(rank, world, port)
    path = ensure_tiny_model()
    processor = load_processor(path)
    pixels = PixelCache(processor.image_processor, 3136, 50176)
    batch = sft_batches(processor.tokenizer, pixels, 4, 1)[0]
    hf = load_model(path)
    with torch.no_grad():
        want = token_logprobs(hf, pixels, batch, processor.tokenizer.pad_token_id)
    report = []
    for i, layout in enumerate(layouts):
        init_parallel(layout, seed=0)
        engine = MegatronEngine(hf, pixels, layout, OptimSettings(LR, 0.0, (0.9, 0.999), 1.0, False))
        got = engine.logprobs(batch, MICRO)
        diffs = [(got[j] - want[j]).abs().max().item() for j, lp in enumerate(got) if lp is not None]
        if parallel_state.get_tensor_model_parallel_rank() != 0:
            diffs = []  # the same sequences as tensor rank 0
        gathered = [None] * world
        dist.all_gather_object(gathered, diffs)
        state = engine.hf_state()
        if rank == 0:
            save_hf_checkpoint(state, hf.config, f"{out_dir}/{i}")
            scored = [d for part in gathered for d in part]
            report.append({"logprob_diff": max(scored), "scored_sequences": len(scored)})
    if rank == 0:
        results.put(report)
    dist.barrier()
    dist.destroy_process_group()


def resume(rank: int, world: int, port: int, save_layout: ParallelLayout, load_layout: ParallelLayout,
           out_dir: str, results) -> None:
    """Train 1 step at `save_layout`, save, take step 2; reload at `load_layout`, take step 2 again."""
    join(rank, world, port)
    path = ensure_tiny_model()
    processor = load_processor(path)
    pixels = PixelCache(processor.image_processor, 3136, 50176)
    first, second = sft_batches(processor.tokenizer, pixels, 4, 2)
    settings = OptimSettings(LR, 0.0, (0.9, 0.999), 1.0, False)

    def next_loss(engine):
        metrics = engine.forward_backward(second, MICRO, sft_loss(second))
        engine.step(LR)
        return metrics["loss_sum"] / metrics["tokens"], engine.hf_state()

    init_parallel(save_layout, seed=0)
    engine = MegatronEngine(load_model(path), pixels, save_layout, settings)
    engine.forward_backward(first, MICRO, sft_loss(first))
    engine.step(LR)
    sampler = MixtureSampler({"tasks": list(range(10))}, {"tasks": 1.0}, seed=0)
    sampler.take(4)  # the data position saved with the step
    checkpoint = save_checkpoint(Path(out_dir), 1, "run-1", MegatronModelCheckpoint(engine, processor), sampler)
    expected, expected_params = next_loss(engine)

    init_parallel(load_layout, seed=0)
    engine = MegatronEngine(load_model(path), pixels, load_layout, settings)  # fresh weights, then the checkpoint
    fresh = MixtureSampler({"tasks": list(range(10))}, {"tasks": 1.0}, seed=0)
    restored = restore_checkpoint(checkpoint, MegatronModelCheckpoint(engine, processor), fresh)
    got, got_params = next_loss(engine)
    if rank == 0:
        results.put({
            "loss_diff": abs(got - expected), "step": restored.step, "run_id": restored.run_id,
            "next_tasks": (fresh.take(3), sampler.take(3)),
            "param_diff": max((got_params[k] - v).abs().max().item() for k, v in expected_params.items()),
        })
    dist.barrier()
    dist.destroy_process_group()


def grpo_update(rank: int, world: int, port: int, out_dir: str, overrides: list[str], results) -> None:
    """The reference GRPO update and the Megatron one on the same scored trajectories."""
    from tests.train.test_grpo import rl_config
    from deepeyes.train.rl import build_trainer
    from deepeyes.train.losses import grpo_advantages

    join(rank, world, port)
    reference = build_trainer(rl_config(Path(out_dir) / "hf", *overrides, "trainer=hf"), Path(out_dir) / "hf", None)
    trajectories = reference.collect(step=0)
    for index, trajectory in enumerate(trajectories):  # within each group: first good, second bad
        trajectory.reward = 1.0 if index % 2 == 0 else 0.0
    advantages = grpo_advantages([t.reward for t in trajectories], [t.group for t in trajectories])
    megatron = build_trainer(rl_config(Path(out_dir) / "mg", *overrides, "trainer=megatron"), Path(out_dir) / "mg", None)
    want = reference.update(trajectories, advantages)
    got = megatron.update(trajectories, advantages)
    weights = megatron.policy.model.state_dict()  # what the rollout engine samples from next
    results.put({
        "metrics": {key: (want[key], got[key]) for key in want},
        "param_diff": max((p - weights[n]).abs().max().item() for n, p in reference.policy.model.state_dict().items()),
        "moved": max((p - weights[n]).abs().max().item() for n, p in load_model(ensure_tiny_model()).state_dict().items()),
    })
    dist.destroy_process_group()


def rl_job(rank: int, world: int, port: int, out_dir: str, overrides: list[str], results) -> None:
    """`python jobs/rl.py trainer=megatron` as one rank of a torchrun-style world. The tiny model
    earns no reward, so within each group the first rollout is scored 1 and the second 0 (the
    policy then moves)."""
    from tests.train.test_grpo import rl_config
    from deepeyes.train.grpo import GRPOTrainer
    from deepeyes.train.rl import train_grpo

    collect = GRPOTrainer.collect

    def scored(self, step):
        trajectories = collect(self, step)
        for index, trajectory in enumerate(trajectories):
            trajectory.reward = 1.0 if index % 2 == 0 else 0.0
        return trajectories

    GRPOTrainer.collect = scored
    join(rank, world, port)
    checkpoint = train_grpo(rl_config(out_dir, "trainer=megatron", *overrides))
    if rank == 0:
        results.put(str(checkpoint))
    dist.destroy_process_group()


def sft_job(rank: int, world: int, port: int, out_dir: str, overrides: list[str], stop: bool, results) -> None:
    """`python jobs/sft.py trainer=megatron` as one rank; with `stop`, Slurm's stop signal reaches
    every rank once step 1 is logged, and the rank reports how the run ended."""
    from tests.train.test_sft import sft_config, stop_once_step_1_is_logged
    from deepeyes.train.preemption import Preempted
    from deepeyes.train.sft import train_sft

    join(rank, world, port)
    if stop:
        stop_once_step_1_is_logged(Path(out_dir))
    try:
        outcome = str(train_sft(sft_config(out_dir, "trainer=megatron", *overrides)))
    except Preempted as preempted:
        outcome = f"preempted: {preempted}"
    if rank == 0:
        results.put(outcome)
    dist.destroy_process_group()


def rank_local_loading(rank: int, world: int, port: int, layouts: list[ParallelLayout], model_dir: str,
                       results) -> None:
    """Per layout: the engine loaded from the whole HF state dict and the one loaded from this
    rank's own slices of the safetensors files (CheckpointTensors) hold the same parameters."""
    join(rank, world, port)
    path = Path(model_dir)
    processor = load_processor(path)
    pixels = PixelCache(processor.image_processor, 3136, 50176)
    settings = OptimSettings(LR, 0.0, (0.9, 0.999), 1.0, False)
    report = []
    for layout in layouts:
        init_parallel(layout, seed=0)
        full = MegatronEngine(load_model(path), pixels, layout, settings)
        tensors = CheckpointTensors(path)
        local = MegatronEngine(load_model(path, weights=False), pixels, layout, settings, weights=tensors)
        tensors.close()
        pairs = [(name, a, b) for chunk_a, chunk_b in zip(full.chunks, local.chunks)
                 for (name, a), (_, b) in zip(chunk_a.module.named_parameters(), chunk_b.module.named_parameters(),
                                              strict=True)]
        differ = [name for name, a, b in pairs if not torch.equal(a, b)]
        trainable = [name for name, a, b in pairs if a.requires_grad != b.requires_grad]
        gathered = [None] * world
        dist.all_gather_object(gathered, {"compared": len(pairs), "differ": differ, "requires_grad_differ": trainable,
                                          "vision": any(name.startswith("visual.") for name, _, _ in pairs)})
        report.append(gathered)
    if rank == 0:
        results.put(report)
    dist.barrier()
    dist.destroy_process_group()


def engine_logs(rank: int, world: int, port: int, debug: bool, results) -> None:
    """The log records (level, logger, first line) of building an engine, with INFO logging as
    Hydra sets it up, and the engine's logger at DEBUG when `debug`."""
    import logging

    join(rank, world, port)
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append((record.levelname, record.name, record.getMessage().split("\n")[0]))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    if debug:
        logging.getLogger("deepeyes.train.megatron.engine").setLevel(logging.DEBUG)
    path = ensure_tiny_model()
    init_parallel(ParallelLayout(), seed=0)
    MegatronEngine(load_model(path), PixelCache(load_processor(path).image_processor, 3136, 50176), ParallelLayout(),
                   OptimSettings(LR, 0.0, (0.9, 0.999), 1.0, True))
    results.put(records)
    dist.destroy_process_group()
