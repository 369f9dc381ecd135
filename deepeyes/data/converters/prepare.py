"""The prepare-data job: every DeepEyesV2 file that is configured, converted into one directory."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from deepeyes.config import PrepareDataConfig
from deepeyes.data.converters.search_cache import convert_image_search_cache
from deepeyes.data.converters.sharegpt import convert_sharegpt
from deepeyes.data.converters.verl import convert_verl_parquet

log = logging.getLogger(__name__)


def prepare_data(cfg: PrepareDataConfig, out_dir: Path) -> dict[str, dict]:
    """Writes sft.jsonl, rl_train.jsonl, image_index.jsonl (whichever inputs are set) and
    conversion.json (rows read / written / skipped per source file); returns the latter."""
    if not (cfg.sft or cfg.rl):
        raise ValueError("nothing to convert: set prepare.sft=[...] and/or prepare.rl=[...] (see conf/prepare_data.yaml)")
    if cfg.search_cache and not cfg.rl:
        raise ValueError("prepare.search_cache needs prepare.rl: the cache is keyed by the RL rows' extra_info.index")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    conversions = {}
    if cfg.sft:
        if not cfg.sft_image_root:
            raise ValueError("prepare.sft needs prepare.sft_image_root (the folder the JSON's image paths are relative to)")
        conversions["sft"] = convert_sharegpt(
            [Path(p) for p in cfg.sft], Path(cfg.sft_image_root), out_dir / "sft.jsonl", cfg.sft_family, cfg.on_bad_record
        )
    if cfg.rl:
        conversions["rl"] = convert_verl_parquet(
            [Path(p) for p in cfg.rl], out_dir / "rl_train.jsonl",
            Path(cfg.rl_image_root) if cfg.rl_image_root else None, cfg.on_bad_record,
        )
    if cfg.search_cache:
        conversions["image_index"] = convert_image_search_cache(
            Path(cfg.search_cache), Path(cfg.search_cache_images or Path(cfg.search_cache).parent),
            out_dir / "rl_train.jsonl", out_dir / "image_index.jsonl", cfg.on_bad_record,
        )
    report = {name: {**asdict(c), "output": str(c.output)} for name, c in conversions.items()}
    (out_dir / "conversion.json").write_text(json.dumps(report, indent=1) + "\n")
    for name, c in conversions.items():
        log.info("%s: wrote %d rows to %s, skipped %d", name, c.total_written, c.output, c.total_skipped)
    return report
