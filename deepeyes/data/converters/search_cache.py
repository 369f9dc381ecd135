"""The MMSearch-R1 image-search cache → our image-search index (`deepeyes.tools.search`).

The released cache (`fvqa_train_image_search_results_cache.json`) maps a sample id — the
`extra_info.index` of an RL row — to what image search returned for that sample's image::

    {"<sample_id>": {"tool_returned_web_title": [str, ...], "cached_images_path": [path | null, ...]}}

Our index is keyed by the sha256 of the query image instead, so the converter needs the converted
RL records (`convert_verl_parquet` output) to find each sample's first image. As the released
environment reads the cache (reinforcement_learning/verl/workers/agent/envs/deepeyesv2/
search_utils.py:55-59), every (title, path) pair whose image exists is kept, whatever its title
(a null title shows as "None", as the release's f-string writes it), and every other result is
left out and counted: a null or missing image, a title or a path without its partner.
A sample id no record carries, or whose image another sample already indexed, is a bad row.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from deepeyes.data.converters.images import write_hash_manifest
from deepeyes.data.converters.rows import Conversion, OnError, RowProblem, load_json, parse_rows
from deepeyes.data.readers import read_records
from deepeyes.tools.search import sha256_file

log = logging.getLogger(__name__)


def convert_image_search_cache(
    cache: Path,
    image_root: Path,
    records: Path,
    output: Path,
    on_error: OnError = "raise",
) -> Conversion:
    """Write the image-search index for `records` from the cache. Rows are numbered from 1 in the
    cache's key order. `Conversion.skipped` also counts, under "<cache>#results", dropped results."""
    cache, output = Path(cache), Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    by_sample = {}
    for record in read_records(Path(records)):
        index = record.metadata.get("index")
        if index is not None and record.images:
            by_sample[str(index)] = record.images[0]
    entries = load_json(cache, dict, "an object keyed by sample id")
    conversion = Conversion(output)
    dropped = 0
    seen: dict[str, str] = {}

    def parse(row: int, item: tuple[str, Any]) -> dict[str, Any]:
        nonlocal dropped
        sample_id, entry = item
        results, missing = _results(entry, Path(image_root))
        query = by_sample.get(sample_id)
        if query is None:
            raise RowProblem(f"sample {sample_id!r}: no record in {records} has extra_info.index {sample_id!r}")
        digest = sha256_file(query)
        if digest in seen:
            raise RowProblem(f"sample {sample_id!r}: its image is already indexed for sample {seen[digest]!r}")
        seen[digest] = sample_id
        dropped += missing
        return {"image_sha256": digest, "results": results}

    rows = list(parse_rows(cache, enumerate(entries.items(), start=1), parse, on_error, conversion))
    conversion.skipped[f"{cache}#results"] = dropped
    if dropped:
        log.warning("%s: left out %d results whose image is null or missing, or that lack a title or a path",
                    cache, dropped)
    base = output.parent
    with open(output, "w", encoding="utf-8") as out:
        for row in rows:
            for result in row["results"]:
                result["image"] = Path(os.path.relpath(result["image"], base)).as_posix()
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_hash_manifest(output, (base / r["image"] for row in rows for r in row["results"]))
    return conversion


def _results(entry: Any, image_root: Path) -> tuple[list[dict[str, Any]], int]:
    """(results with an existing image, number left out)."""
    if not isinstance(entry, dict):
        raise RowProblem(f"expected an object, got {type(entry).__name__}")
    titles, paths = entry.get("tool_returned_web_title"), entry.get("cached_images_path")
    if not isinstance(titles, list) or not isinstance(paths, list):
        raise RowProblem("keys 'tool_returned_web_title' and 'cached_images_path' must both be lists")
    results = []
    for title, path in zip(titles, paths):
        image = image_root / path if isinstance(path, str) and path else None
        if image is not None and image.is_file():
            results.append({"title": title if isinstance(title, str) else f"{title}", "image": image.resolve()})
    return results, max(len(titles), len(paths)) - len(results)
