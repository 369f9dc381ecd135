"""Cold-start SFT data: LLaMA-Factory "sharegpt" JSON → SFTRecord JSON lines.

The released files (DeepEyesV2_SFT `sft_part_*.json`) are JSON arrays of::

    {"messages": [{"role": "system"|"user"|"assistant", "content": "... <image> ..."}, ...],
     "images": ["relative/to/the/image/folder.jpg", ...]}

Tool observations are user turns. Paths in `images` are resolved against `image_root` (absolute
paths, as the released `data_convert.py` writes them, stay as they are). A row may carry a
separate "system" string (LLaMA-Factory's system column); other extra columns are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepeyes.data.converters.images import write_hash_manifest
from deepeyes.data.converters.rows import Conversion, OnError, RowProblem, load_json, parse_rows
from deepeyes.data.readers import _parse_sft_record
from deepeyes.data.schema import SFTRecord
from deepeyes.data.writers import write_sft_records


def convert_sharegpt(
    sources: Sequence[Path],
    image_root: Path,
    output: Path,
    family: str = "deepeyesv2",
    on_error: OnError = "raise",
) -> Conversion:
    """Concatenate sharegpt JSON files into one SFTRecord file at `output` (+ its hash manifest).

    Rows are numbered from 1 in each file's array. Ids are `<file stem>-<row>`; `data_source` is
    the file stem.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    conversion = Conversion(output)
    records: list[SFTRecord] = []
    for source in map(Path, sources):
        def parse(row: int, item: Any, source: Path = source) -> SFTRecord:
            return _sft_record(item, f"{source.stem}-{row}", source.stem, family, Path(image_root))

        samples = load_json(source, list, "a JSON array of samples")
        records += parse_rows(source, enumerate(samples, start=1), parse, on_error, conversion)
    write_sft_records(output, records)
    write_hash_manifest(output, (image for record in records for image in record.images))
    return conversion


def _sft_record(item: Any, record_id: str, data_source: str, family: str, image_root: Path) -> SFTRecord:
    if not isinstance(item, dict):
        raise RowProblem(f"expected a JSON object, got {type(item).__name__}")
    if "messages" not in item:
        hint = " ('conversations' with from/value is the other sharegpt layout; re-export with role/content)" \
            if "conversations" in item else ""
        raise RowProblem(f"key 'messages': missing{hint}")
    messages = item["messages"]
    if isinstance(item.get("system"), str) and item["system"]:
        if not isinstance(messages, list):
            raise RowProblem(f"key 'messages': expected list, got {type(messages).__name__}")
        messages = [{"role": "system", "content": item["system"]}, *messages]
    value = {
        "id": record_id,
        "messages": messages,
        "images": item.get("images") or [],
        "family": family,
        "data_source": data_source,
    }
    return _parse_sft_record(value, image_root)
