"""Megatron checkpoints: a resumable distributed checkpoint beside a plain HF model directory.

    <out_dir>/checkpoints/step_000003/   config.json, model.safetensors, processor files (HF)
                                         trainer_state.pt: step, data position, RNG, run id
                                         megatron/: dist checkpoint (model + optimizer)
    <out_dir>/checkpoints/latest

The layout and the `latest` pointer are deepeyes.train.checkpoint's, so evaluation and the next
stage's `run.init_from` read the HF directory as they read the reference trainer's. The
megatron/ part stores every tensor with its global shape and offsets, so it loads at another
TP/PP (and DP) layout than it was saved at. The learning-rate schedule is a function of the
step, so the step is the scheduler's whole state. RNG: the Python/NumPy/torch generators of
global rank 0 (the only generators the data order and the dropout-free model consume).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from deepeyes.model.megatron.convert import save_hf_checkpoint
from deepeyes.train.checkpoint import TrainerState
from deepeyes.train.megatron.engine import MegatronEngine


def _sharded_state(engine: MegatronEngine, is_loading: bool) -> dict:
    model = {}
    for i, chunk in enumerate(engine.chunks):
        model.update(chunk.module.sharded_state_dict(prefix=f"chunk{i}." if len(engine.chunks) > 1 else ""))
    return {"model": model, "optimizer": engine.optimizer.sharded_state_dict(model, is_loading=is_loading)}


def save_megatron_checkpoint(out_dir: Path, engine: MegatronEngine, processor, state: TrainerState) -> Path:
    """Write the step's checkpoint (collective: every rank calls it); returns its directory."""
    root = Path(out_dir) / "checkpoints"
    final = root / f"step_{state.step:06d}"
    partial = root / f".partial_step_{state.step:06d}"
    hf_state = engine.hf_state()
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "megatron").mkdir(parents=True)
        save_hf_checkpoint(hf_state, engine.hf_config, partial)
        processor.save_pretrained(partial)
        torch.save({**state.__dict__, "optimizer": None}, partial / "trainer_state.pt")
    dist.barrier()
    dist_checkpointing.save(_sharded_state(engine, is_loading=False), str(partial / "megatron"))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        (root / "latest").write_text(final.name)
    dist.barrier()
    return final


def load_megatron_checkpoint(checkpoint: Path, engine: MegatronEngine) -> TrainerState:
    """Restore model and optimizer into `engine` (any layout) and return the trainer state."""
    loaded = dist_checkpointing.load(_sharded_state(engine, is_loading=True), str(Path(checkpoint) / "megatron"))
    for i, chunk in enumerate(engine.chunks):
        prefix = f"chunk{i}." if len(engine.chunks) > 1 else ""
        chunk.module.load_state_dict(
            {k.removeprefix(prefix): v for k, v in loaded["model"].items() if k.startswith(prefix)}, strict=True
        )
    engine.optimizer.load_state_dict(loaded["optimizer"])
    return TrainerState(**torch.load(Path(checkpoint) / "trainer_state.pt", weights_only=False))
