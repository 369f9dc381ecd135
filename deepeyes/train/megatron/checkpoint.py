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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass
class MegatronModelCheckpoint:
    """The megatron trainers' part of a checkpoint (deepeyes.train.checkpoint.save_checkpoint):
    the HF directory gathered on global rank 0 and the distributed checkpoint of model and
    optimizer in megatron/, which restores at any layout. Every rank calls its methods."""

    engine: MegatronEngine
    processor: Any

    @property
    def leader(self) -> bool:
        return dist.get_rank() == 0

    def write(self, directory: Path) -> None:
        hf_state = self.engine.hf_state()  # gathered on rank 0
        if self.leader:
            save_hf_checkpoint(hf_state, self.engine.hf_config, directory)
            self.processor.save_pretrained(directory)
            (directory / "megatron").mkdir()
        dist.barrier()
        dist_checkpointing.save(_sharded_state(self.engine, is_loading=False), str(directory / "megatron"))
        dist.barrier()  # every rank's shards are written before the leader renames the directory

    def read(self, checkpoint: Path, state: TrainerState) -> None:
        engine = self.engine
        loaded = dist_checkpointing.load(_sharded_state(engine, is_loading=True), str(Path(checkpoint) / "megatron"))
        for i, chunk in enumerate(engine.chunks):
            prefix = f"chunk{i}." if len(engine.chunks) > 1 else ""
            chunk.module.load_state_dict(
                {k.removeprefix(prefix): v for k, v in loaded["model"].items() if k.startswith(prefix)}, strict=True
            )
        engine.optimizer.load_state_dict(loaded["optimizer"])

    def barrier(self) -> None:
        dist.barrier()
