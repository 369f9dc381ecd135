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

import asyncio
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
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


def trained_state(model: torch.nn.Module, everything: bool = False) -> dict[str, torch.Tensor]:
    """The parameters an optimizer can change (with `everything`, all of them), by name."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if everything or p.requires_grad}


def publish_weights(model: torch.nn.Module, root: Path, version: int, keep: int = 2) -> PublishedWeights:
    """Write `model`'s trained parameters as `version`; keep the newest `keep` versions on disk
    (a server may still be reading the previous one)."""
    return _write(trained_state(model), root, version, keep)


def _write(tensors: dict[str, torch.Tensor], root: Path, version: int, keep: int = 2) -> PublishedWeights:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"weights_v{version:06d}.safetensors"
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata={"version": str(version)})
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


class WeightSync:
    """The trainer's side: after each optimizer step, publish version k+1 and have every rollout
    server load it, within a staleness bound.

    With `max_staleness=0` `publish` returns once every server serves the new version (strictly
    on-policy). With a bound b > 0 the file write and the servers' loads run in a background
    thread while the next rollout starts; `wait_for(step - b)` before a rollout makes sure no
    sample comes from weights more than b versions old (the servers also refuse such requests).
    """

    def __init__(self, client_factory, root: Path, max_staleness: int = 0):
        self._client_factory = client_factory  # a fresh RolloutClient per push: it runs on its own event loop
        self.root = root
        self.max_staleness = max_staleness
        self._pending: list[tuple[int, Future]] = []
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync")
        self.last_seconds = 0.0
        self.last_bytes = 0

    def publish(self, model: torch.nn.Module, version: int, everything: bool = False) -> None:
        """`everything`: frozen parameters too — once at the start, so servers that loaded another
        checkpoint (the base model rather than the SFT result, say) serve exactly the trainer's."""
        snapshot = trained_state(model, everything)
        if self.max_staleness:  # written while the next update may already change the parameters
            snapshot = {name: tensor.clone() for name, tensor in snapshot.items()}
        self._pending.append((version, self._worker.submit(self._publish, snapshot, version)))
        if self.max_staleness == 0:
            self.wait_for(version)

    def wait_for(self, version: int) -> None:
        """Return once every publish up to `version` has been loaded by the servers."""
        while self._pending and self._pending[0][0] <= version:
            _, future = self._pending.pop(0)
            future.result()

    def close(self) -> None:
        try:
            self.wait_for(float("inf"))
        finally:
            self._worker.shutdown()

    def _publish(self, snapshot: dict[str, torch.Tensor], version: int) -> None:
        started = time.perf_counter()
        published = _write(snapshot, self.root, version)
        client = self._client_factory()

        async def push() -> None:
            try:
                await client.update_weights(published.version, published.path)
            finally:
                await client.close()

        asyncio.run(push())
        self.last_seconds = time.perf_counter() - started
        self.last_bytes = published.bytes
