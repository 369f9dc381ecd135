"""Metrics to wandb (offline by default: the run lands in <out_dir>/wandb, `wandb sync` uploads it),
mirrored to <out_dir>/metrics.jsonl: one JSON object per step that scripts, benchmarks and plots
read without a wandb client (wandb's offline run file is a private binary format).

Every row carries the job's own step as `train/step`, wandb's x-axis for every metric
(`define_metric`): wandb accepts only increasing values of its internal step, so after a requeue
the steps redone from the checkpoint are logged again under new internal steps and still show
at their training step.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deepeyes.config import LoggerConfig

log = logging.getLogger(__name__)

STEP_METRIC = "train/step"


class RunLogger:
    def __init__(self, cfg: LoggerConfig, job_config: Any, out_dir: Path, job: str, run_id: str | None = None,
                 resumed_at: int = 0):
        """`run_id` continues that run; `resumed_at` is the step its checkpoint holds: rows logged
        after it (the steps between that checkpoint and the stop) are dropped, as they are redone."""
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self._run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            tags=list(cfg.tags),
            job_type=job,
            mode=cfg.mode,
            dir=str(out_dir),
            config=asdict(job_config),
            id=run_id,
            resume="allow" if run_id else None,
        )
        self._run.define_metric(STEP_METRIC)
        self._run.define_metric("*", step_metric=STEP_METRIC)
        mirror = Path(out_dir) / "metrics.jsonl"
        if run_id is not None and mirror.exists():
            rows = mirror.read_text().splitlines(keepends=True)
            kept = [row for row in rows if json.loads(row)["step"] <= resumed_at]
            if len(kept) < len(rows):
                log.info("metrics.jsonl: dropped %d rows logged after step %d (redone)", len(rows) - len(kept), resumed_at)
                mirror.write_text("".join(kept))
        self._mirror = open(mirror, "a")
        log.info("wandb run %s: %s", self._run.id, self.where())

    def where(self) -> str:
        """The run's URL, or for an offline run the command that uploads it."""
        if self._run.offline:
            return f"offline; upload with `wandb sync {Path(self._run.dir).parent.resolve()}`"
        return self._run.url or "disabled"

    @property
    def run_id(self) -> str:
        return self._run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log({STEP_METRIC: step, **metrics})
        self._mirror.write(json.dumps({"step": step, **metrics}) + "\n")
        self._mirror.flush()

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A wandb table (not mirrored to metrics.jsonl); a cell that is a Path to an image file is
        logged as that image, or left empty, counted and logged, when the file is gone."""
        import wandb

        missing = []

        def cell(value: Any) -> Any:
            if not isinstance(value, Path):
                return value
            if not value.is_file():
                missing.append(value)
                return None
            return wandb.Image(str(value))

        table = wandb.Table(columns=columns, data=[[cell(v) for v in row] for row in rows])
        if missing:
            log.warning("table %s at step %d: %d image(s) no longer on disk, left empty (first: %s)",
                        name, step, len(missing), missing[0])
        self._run.log({STEP_METRIC: step, name: table})

    def log_images(self, images: dict[str, Path], step: int) -> None:
        """Image files (plots) to wandb (not mirrored to metrics.jsonl)."""
        import wandb

        self._run.log({STEP_METRIC: step, **{name: wandb.Image(str(path)) for name, path in images.items()}})

    def finish(self) -> None:
        where = self.where()
        self._run.finish()
        self._mirror.close()
        log.info("wandb run %s: %s", self._run.id, where)
