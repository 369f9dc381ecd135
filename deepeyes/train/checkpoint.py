"""Checkpoints: a Hugging Face model directory plus the trainer state needed to resume exactly.

    <out_dir>/checkpoints/step_000003/   config.json, model.safetensors, tokenizer + processor files
                                         trainer_state.pt: step, optimizer, data position, RNG, run id
    <out_dir>/checkpoints/latest         name of the newest complete checkpoint

The model directory loads with plain `from_pretrained(path)` (evaluation, the next stage's
`run.init_from`, vLLM). A checkpoint is written to a temporary name and renamed, so a job
killed mid-save never leaves a half checkpoint behind `latest`. With `run.keep_checkpoints=N`
only the newest N stay (a 32B checkpoint with its optimizer is ~520 GB): see `prune_checkpoints`.

Every trainer saves and restores through `save_checkpoint` / `restore_checkpoint`; what differs
is where its weights and optimizer go, a `ModelCheckpoint`: `HFModelCheckpoint` here (the
reference trainers: the optimizer in trainer_state.pt) or the megatron one
(deepeyes.train.megatron.checkpoint: a resharding distributed checkpoint beside the HF directory).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class TrainerState:
    step: int  # optimizer steps completed
    optimizer: dict[str, Any]
    data: dict[str, Any]  # the sampler's position
    run_id: str | None  # the logger's run, continued on resume
    rng: dict[str, Any]


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class ModelCheckpoint(Protocol):
    """A trainer's weights and optimizer in a checkpoint directory (the rest is common)."""

    leader: bool  # this process writes the directory's shared files (one-process trainers: always)

    def write(self, directory: Path) -> dict[str, Any] | None:
        """Write the weights (and the optimizer, or return its state for trainer_state.pt) into
        `directory`, which the leader created (collective for a multi-rank trainer)."""

    def read(self, checkpoint: Path, state: TrainerState) -> None:
        """Restore the weights and optimizer that `write` saved (collective for a multi-rank trainer)."""

    def barrier(self) -> None:
        """Wait for every rank (nothing for a one-process trainer)."""


@dataclass
class HFModelCheckpoint:
    """The reference trainers' part: the HF model directory; the optimizer state in trainer_state.pt.
    On restore the weights are already in (the policy was loaded from the checkpoint)."""

    model: Any
    processor: Any
    optimizer: torch.optim.Optimizer
    leader: bool = True

    def write(self, directory: Path) -> dict[str, Any]:
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        return self.optimizer.state_dict()

    def read(self, checkpoint: Path, state: TrainerState) -> None:
        self.optimizer.load_state_dict(state.optimizer)

    def barrier(self) -> None:
        pass


def save_checkpoint(out_dir: Path, step: int, run_id: str | None, model: ModelCheckpoint, sampler=None,
                    keep: int = 0) -> Path:
    """The checkpoint after `step` optimizer steps: `model`'s weights and optimizer, the data
    position (`sampler`'s; None when the step alone gives it), RNG and run id; then `latest`
    names it, and with `keep` > 0 the leader prunes all but the newest `keep` (`prune_checkpoints`).
    Every rank of a multi-rank trainer calls it. Returns its directory."""
    root = Path(out_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    partial = root / f".partial_step_{step:06d}"
    if model.leader:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    model.barrier()
    optimizer = model.write(partial)
    if model.leader:
        state = TrainerState(step, optimizer, sampler.state_dict() if sampler is not None else None, run_id, rng_state())
        torch.save(state.__dict__, partial / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        pointer = root / ".latest"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")  # atomic: a job killed here leaves the old or the new pointer
    model.barrier()
    if model.leader and keep > 0:
        prune_checkpoints(root, keep)
    return final


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints up to the one `latest` names, which is never
    deleted, and what killed saves or prunes left behind. Run after a save completed, so the
    checkpoint a run resumed from goes only once a newer one is complete. Checkpoints numbered past
    `latest` (an abandoned attempt's, when a run went back to an older one) are left alone: the run
    overwrites them as it gets there. Returns the deleted checkpoints."""
    latest = latest_checkpoint(root.parent)
    if latest is None:
        return []
    steps = sorted(path for path in root.glob("step_*") if path.is_dir() and path.name <= latest.name)
    pruned = [path for path in steps[:-keep] if path != latest]
    for debris in [*root.glob(".pruning_*"), *root.glob(".partial_*")]:
        shutil.rmtree(debris, ignore_errors=True)
    for path in pruned:
        # Renamed first, so a job killed mid-delete leaves no half checkpoint under a step's name.
        doomed = path.rename(root / f".pruning_{path.name}")
        shutil.rmtree(doomed)
    if pruned:
        log.info("deleted %s (run.keep_checkpoints=%d)", ", ".join(path.name for path in pruned), keep)
    return pruned


def restore_checkpoint(checkpoint: Path, model: ModelCheckpoint, sampler=None) -> TrainerState:
    """Weights and optimizer (`model`), data position (into `sampler`, when given) and RNG from
    `checkpoint`; returns its trainer state (step, run id)."""
    state = load_trainer_state(checkpoint)
    model.read(checkpoint, state)
    if sampler is not None:
        sampler.load_state_dict(state.data)
    set_rng_state(state.rng)
    return state


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = Path(out_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def resolve_checkpoint(path: Path) -> Path:
    """The model directory that `path` names: itself, the step a `checkpoints/latest` pointer
    names, or a run directory's latest checkpoint (so `run.init_from=<run dir>` works)."""
    path = Path(path)
    if path.is_file() and path.name == "latest":
        return path.parent / path.read_text().strip()
    if not (path / "config.json").is_file():
        return latest_checkpoint(path) or path
    return path


def load_trainer_state(checkpoint: Path) -> TrainerState:
    return TrainerState(**torch.load(checkpoint / "trainer_state.pt", weights_only=False))
