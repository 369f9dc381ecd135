"""Checkpoints: a Hugging Face model directory plus the trainer state needed to resume exactly.

    <out_dir>/checkpoints/step_000003/   config.json, model.safetensors, tokenizer + processor files
                                         trainer_state.pt: step, optimizer, data position, RNG, run id
    <out_dir>/checkpoints/latest         name of the newest complete checkpoint

The model directory loads with plain `from_pretrained(path)` (evaluation, the next stage's
`run.init_from`, vLLM). A checkpoint is written to a temporary name and renamed, so a job
killed mid-save never leaves a half checkpoint behind `latest`.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


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


def save_checkpoint(out_dir: Path, model, processor, state: TrainerState) -> Path:
    root = Path(out_dir) / "checkpoints"
    final = root / f"step_{state.step:06d}"
    partial = root / f".partial_step_{state.step:06d}"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    processor.save_pretrained(partial)
    torch.save(state.__dict__, partial / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    (root / "latest").write_text(final.name)
    return final


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
