"""What every training job builds first: the policy (model + processor) and its data paths."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from deepeyes.config import DataConfig, ModelConfig, OptimConfig, SourceConfig, ToolsConfig
from deepeyes.data import Record, SampleDataset, ensure_sample_data, read_records
from deepeyes.model import ensure_tiny_model, load_model, load_processor
from deepeyes.model.pixels import PixelCache
from deepeyes.train.checkpoint import resolve_checkpoint
from deepeyes.train.cold_start import ensure_cold_start_checkpoint
from deepeyes.train.sampler import MixtureSampler

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Policy:
    model: torch.nn.Module
    processor: object  # tokenizer + image processor; saved beside every checkpoint
    pixels: PixelCache
    path: Path

    @property
    def tokenizer(self):
        return self.processor.tokenizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_policy(cfg: ModelConfig, init_from: str | None = None, weights: bool = True) -> Policy:
    """The model to train: `init_from` (a previous stage's checkpoint, its `latest` pointer or its
    run directory), else `model.path`, else the tiny offline model (after its cold start with
    `model.cold_start`). All go through the same `from_pretrained(path)` loading. `weights=False`:
    a weightless (meta) model, for a megatron rank that reads only its own slices from `Policy.path`."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    path = init_from or cfg.path or (ensure_cold_start_checkpoint() if cfg.cold_start else ensure_tiny_model())
    path = resolve_checkpoint(Path(path))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json (model.path / run.init_from)")
    model = load_model(path, dtype=_DTYPES[cfg.dtype], weights=weights)
    processor = load_processor(path)
    if cfg.freeze_vision:
        model.model.visual.requires_grad_(False)  # vision tower and merger, as in the paper
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("policy %s: %.1fM parameters, %.1fM trainable", path, model.num_parameters() / 1e6, trainable / 1e6)
    pixels = PixelCache(processor.image_processor, cfg.min_pixels, cfg.max_pixels, cfg.pixel_cache_mb << 20)
    return Policy(model, processor, pixels, path)


@dataclass(frozen=True)
class DataPaths:
    """The job's data files: each one configured, else the bundled sample data's, generated on the
    first read of a file that is not configured (so a job with its own files never builds it)."""

    cfg: DataConfig
    tools: ToolsConfig | None = None  # the job's search backends: see `corpus` and `image_index`

    @property
    def train(self) -> Path:
        return self._pick(self.cfg.train, "rl_train")

    @property
    def test(self) -> Path:
        return self._pick(self.cfg.test, "rl_test")

    @property
    def sft(self) -> Path:
        return self._pick(self.cfg.sft, "sft_train")

    @property
    def corpus(self) -> Path | None:
        """None when the text search is not local (serpapi reads no corpus)."""
        if self.tools is not None and self.tools.search_backend != "local":
            return None
        return self._pick(self.cfg.corpus, "corpus")

    @property
    def image_index(self) -> Path | None:
        """None when the image search is not local (serpapi; mmsearch_cache builds its own index)."""
        if self.tools is not None and self.tools.image_search_backend != "local":
            return None
        return self._pick(self.cfg.image_index, "image_index")

    def _pick(self, configured: str | None, sample_file: str) -> Path:
        return Path(configured) if configured else getattr(self._sample, sample_file)

    @cached_property
    def _sample(self) -> SampleDataset:
        cfg = self.cfg
        return ensure_sample_data(n_per_family=cfg.sample_per_family, seed=cfg.sample_seed, recipe=cfg.sample_recipe,
                                  no_tool=cfg.sample_no_tool)


def data_paths(cfg: DataConfig, tools: ToolsConfig | None = None) -> DataPaths:
    """Configured files, with the bundled sample data filling whatever is not set and is read.
    With the job's `tools`, a search index its backend does not read is None, so the search
    service is not handed (nor made to build) the toy corpus or image index."""
    return DataPaths(cfg, tools)


def data_sources(cfg: DataConfig, kind: str) -> list[SourceConfig]:
    """The files of `kind` ("train": RL tasks, "sft": trajectories) with their weights: the
    mixture `data.<kind>_mix` when set, else the one file `data.<kind>` (the sample data by
    default) as a source named `kind`."""
    mixture = cfg.train_mix if kind == "train" else cfg.sft_mix
    if mixture:
        return list(mixture)
    path = getattr(data_paths(cfg), kind)
    if path is None:
        raise ValueError(f"data.{kind}: no file configured")
    return [SourceConfig(kind, str(path), 1.0)]


def task_sampler(cfg: DataConfig, seed: int) -> MixtureSampler[Record]:
    """RL tasks in a seeded, resumable order, drawn from the configured sources by weight."""
    sources = data_sources(cfg, "train")
    tasks = {source.name: read_validated(read_records, Path(source.path), cfg.on_bad_record) for source in sources}
    return MixtureSampler(tasks, {source.name: source.weight for source in sources}, seed)


def question_records(cfg: DataConfig, path: str | None, limit: int) -> tuple[Path, list[Record]]:
    """The questions a job runs the agent on (filter, synthesis): the file `path`, else data.train;
    validated; the first `limit` (0 = all). Returns the file too, for the job's log."""
    source = Path(path) if path else data_paths(cfg).train
    records = read_validated(read_records, source, cfg.on_bad_record)
    return source, records[:limit] if limit else records


def read_validated(reader, path: Path, on_bad_record: str) -> list:
    """`reader(path)` (read_records / read_sft_records); bad rows raise, or with
    data.on_bad_record=skip are counted and logged."""
    if on_bad_record == "skip":
        records, skipped = reader(path, on_error="skip")
        if skipped:
            log.warning("%s: skipped %d bad rows (data.on_bad_record=skip)", path, skipped)
        return records
    return reader(path)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (the frozen vision tower is left out)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int, total_steps: int) -> float:
    """The rate for optimizer step `step` (0-based) of `total_steps`: linear warmup (see
    `warmup_steps`), then constant (the paper's RL) or a cosine decay to 0 (the paper's SFT)."""
    warmup = warmup_steps(cfg, total_steps)
    if step < warmup:
        lr = cfg.lr * (step + 1) / warmup
    elif cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        lr = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        lr = cfg.lr
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """`optim.warmup_steps`, or `optim.warmup_ratio` of the run's `total_steps` rounded up (as
    transformers' warmup_ratio, which the release's SFT uses)."""
    # round() first: 0.1 x 30 is 3.0000000000000004 in floating point, which must stay 3 steps.
    return math.ceil(round(cfg.warmup_ratio * total_steps, 9)) if cfg.warmup_ratio else cfg.warmup_steps


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> float:
    """Clip the gradient norm, take the optimizer step, return the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    return float(norm)
