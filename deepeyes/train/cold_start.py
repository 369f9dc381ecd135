"""The tiny model after its cold start: SFT on the learning recipe, built once into the cache.

The embedded default RL job (`python jobs/rl.py`, `make run`) starts here, not from random
weights: a random model never writes a valid turn, so every reward and tool call of its GRPO steps
is 0 and nothing can be learned. After the learning recipe's cold start (README, "Learning
proof") the model follows the protocol and calls a tool in every family, and RL has rewards to
compare. It is built by the SFT job exactly as a user runs it,

    python jobs/sft.py +experiment=learning_sft run.seed=0

once, into `$DEEPEYES_CACHE/models/qwen2_5_vl-tiny-cold-start-<hash>` beside the tiny model. The
hash covers the SFT job's resolved config (`--cfg job`: the preset, the data recipe, every
default), the tiny model's own build hash and the sample generator's version, so a changed
recipe builds afresh. The directory is a plain Hugging Face model directory (the SFT checkpoint
without its trainer state).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from deepeyes.allocator import allocator_env
from deepeyes.cache import build_once, cache_root
from deepeyes.data.sample_tasks import GENERATOR_VERSION
from deepeyes.model.tiny import ensure_tiny_model
from deepeyes.train.checkpoint import latest_checkpoint

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SFT_OVERRIDES = ("+experiment=learning_sft", "run.seed=0", "cluster=local", "logger.mode=disabled")


def ensure_cold_start_checkpoint(cache_dir: Path | None = None, overrides: Sequence[str] = ()) -> Path:
    """Path of the cold-start checkpoint, built on first use (a few minutes of SFT on 2 cores).
    `overrides` change the SFT job's config (and so the hash), e.g. fewer steps in a test."""
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "models"
    command = [sys.executable, str(REPO / "jobs" / "sft.py"), *SFT_OVERRIDES, *overrides]
    target = cache_dir / f"qwen2_5_vl-tiny-cold-start-{_recipe_hash(command)}"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Minutes of SFT: concurrent callers (ranks, jobs on one node) wait for one build rather than
    # each building its own copy, as build_once alone would let them.
    with open(cache_dir / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            log.info("building the tiny model's cold start (SFT on the learning recipe, once) into %s", target)
        return build_once(target, lambda directory: _build(directory, command))


def _recipe_hash(command: list[str]) -> str:
    resolved = subprocess.run([*command, "--cfg", "job"], cwd=REPO, check=True, capture_output=True, text=True).stdout
    recipe = hashlib.sha256(resolved.encode())
    recipe.update(f"{ensure_tiny_model().name} {GENERATOR_VERSION}".encode())
    return recipe.hexdigest()[:12]


def _build(directory: Path, command: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="cold-start-sft-", dir=directory.parent) as run_dir:
        # The SFT job's own output (progress, errors) goes to this job's console and log.
        subprocess.run([*command, f"hydra.run.dir={run_dir}"], cwd=REPO, check=True, env=allocator_env())
        checkpoint = latest_checkpoint(Path(run_dir))
        if checkpoint is None:
            raise RuntimeError(f"the cold-start SFT run in {run_dir} wrote no checkpoint")
        for file in checkpoint.iterdir():
            if file.name != "trainer_state.pt":  # optimizer and data position: only a resumed SFT needs them
                shutil.copy2(file, directory / file.name)
