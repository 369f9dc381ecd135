"""Weight sync through a shared filesystem: the trainer publishes, rollout servers load.

After each optimizer step the trainer writes version k+1 as one safetensors file,
`<root>/weights_v{k+1:06d}.safetensors` (written beside, then renamed: a reader never sees half a
file), and tells every server to load it (`RolloutClient.update_weights`). Only parameters that
train are published — a frozen vision tower never changes, so its bytes never move.

The unit that moves is (version, path). A GPU cluster can replace the file with an NCCL broadcast
from trainer rank 0 to the rollout ranks behind the same `update_weights(version, ...)` call; the
version bookkeeping (responses carry the version, the trainer bounds staleness) stays as it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


@dataclass(frozen=True)
class PublishedWeights:
    version: int
    path: Path
    bytes: int


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters an optimizer can change, by state-dict name."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def publish_weights(model: torch.nn.Module, root: Path, version: int, keep: int = 2) -> PublishedWeights:
    """Write `model`'s trained parameters as `version`; keep the newest `keep` versions on disk
    (a server may still be reading the previous one)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"weights_v{version:06d}.safetensors"
    partial = path.with_suffix(".partial")
    save_file(trained_state(model), str(partial), metadata={"version": str(version)})
    os.replace(partial, path)
    for old in sorted(root.glob("weights_v*.safetensors"))[:-keep]:
        old.unlink(missing_ok=True)
    return PublishedWeights(version, path, path.stat().st_size)


def load_weights(model: torch.nn.Module, path: Path) -> int:
    """Copy published tensors into `model` in place; returns the bytes read. A name the model
    lacks, or a shape that differs, raises naming it (the server runs another model)."""
    params = dict(model.named_parameters())
    size = 0
    with torch.no_grad(), safe_open(str(path), framework="pt") as tensors:  # one tensor in memory at a time
        for name in tensors.keys():
            tensor = tensors.get_tensor(name)
            if name not in params:
                raise KeyError(f"{path}: tensor {name!r} is not a parameter of the served model")
            if params[name].shape != tensor.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the served model {tuple(params[name].shape)}")
            params[name].copy_(tensor)
            size += tensor.numel() * tensor.element_size()
    return size
