"""RL data: verl-style parquet (DeepEyesV2_RL `perception_all_*.parquet`, `reason.parquet`,
`search.parquet`) → Record JSON lines. Several files are concatenated into one output.

A row, as verl's multi-turn agent reads it::

    data_source   str                      where the question comes from (e.g. "fvqa", "vstar")
    prompt        [{"role", "content"}]    the chat; the last user message holds the question
    images        [{"bytes": b"...", "path": ...} | {"image": path} | path]
    reward_model  {"ground_truth": str, "style": ...}
    extra_info    {"index": ..., "question": str, "answer": ..., ...}
    env_name      str                      the tool environment (kept in metadata)
    ability, ...                           kept in metadata when they are plain values

The question is `extra_info.question` when present, else the last user message with its leading
`<image>` placeholder and our prompt instruction removed. Image bytes are written once into an
`ImageStore` under `<output dir>/images/`; paths are resolved against `image_root`. The family is
the file's name without a trailing part number and `_all` ("perception_all_3" → "perception").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepeyes.agent.protocol import USER_PROMPT
from deepeyes.data.converters.images import write_hash_manifest
from deepeyes.data.image_store import ImageStore
from deepeyes.data.converters.rows import Conversion, OnError, RowProblem, parquet_rows, parse_rows
from deepeyes.data.readers import _parse_record
from deepeyes.data.schema import IMAGE_PLACEHOLDER, Record
from deepeyes.data.writers import write_records
from deepeyes.tools.search import sha256_file

_PART_SUFFIX = re.compile(r"(_all)?(_\d+)?$")
_INSTRUCTION = USER_PROMPT.split("{question}")[1]
_METADATA_SCALARS = (str, int, float, bool)


def family_of(path: Path) -> str:
    """The task family a released RL file holds, from its name."""
    return _PART_SUFFIX.sub("", Path(path).stem) or Path(path).stem


def convert_verl_parquet(
    sources: Sequence[Path],
    output: Path,
    image_root: Path | None = None,
    on_error: OnError = "raise",
) -> Conversion:
    """Concatenate verl parquet files into one Record file at `output` (+ its hash manifest).

    Ids are `<data_source>-<extra_info.index>` (`<file stem>-<row>` without an index); an id seen
    before, in this file or an earlier one, is a bad row.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    store = ImageStore(output.parent / "images")
    conversion = Conversion(output)
    records: list[Record] = []
    seen: dict[str, str] = {}
    for source in map(Path, sources):
        def parse(row: int, value: Any, source: Path = source) -> Record:
            record = _record(value, source, row, store, Path(image_root or source.parent))
            if record.id in seen:
                raise RowProblem(f"key 'extra_info.index': duplicate id {record.id!r} (first at {seen[record.id]})")
            seen[record.id] = f"{source}:{row}"
            return record

        records += parse_rows(source, parquet_rows(source), parse, on_error, conversion)
    write_records(output, records)
    write_hash_manifest(output, (image for record in records for image in record.images))
    return conversion


def _record(value: dict[str, Any], source: Path, row: int, store: ImageStore, image_root: Path) -> Record:
    data_source = _string(value, "data_source")
    extra = value.get("extra_info") or {}
    if not isinstance(extra, dict):
        raise RowProblem(f"key 'extra_info': expected a struct, got {type(extra).__name__}")
    reward_model = value.get("reward_model")
    if not isinstance(reward_model, dict) or reward_model.get("ground_truth") is None:
        raise RowProblem("key 'reward_model.ground_truth': missing")
    answer = reward_model["ground_truth"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise RowProblem(f"key 'reward_model.ground_truth': expected a string, got {type(answer).__name__}")
    index = extra.get("index")
    images = [_image(item, i, store, image_root) for i, item in enumerate(value.get("images") or [])]
    metadata = {
        "source_file": source.name,
        "source_row": row,
        "image_sha256": [sha256_file(image) for image in images],
    }
    if index is not None:
        metadata["index"] = index
    for key in ("env_name", "ability"):
        if isinstance(value.get(key), _METADATA_SCALARS):
            metadata[key] = value[key]
    fields = {
        "id": f"{data_source}-{index}" if index is not None else f"{source.stem}-{row}",
        "question": _question(value, extra),
        "images": [str(image) for image in images],
        "answer": str(answer),
        "family": family_of(source),
        "data_source": data_source,
        "metadata": metadata,
    }
    return _parse_record(fields, Path("/"))  # image paths are absolute here


def _string(value: dict[str, Any], key: str) -> str:
    item = value.get(key)
    if not isinstance(item, str) or not item:
        raise RowProblem(f"key {key!r}: expected a non-empty string, got {item!r:.60}")
    return item


def _question(value: dict[str, Any], extra: dict[str, Any]) -> str:
    if isinstance(extra.get("question"), str) and extra["question"].strip():
        return extra["question"]
    prompt = value.get("prompt")
    if not isinstance(prompt, list):
        raise RowProblem("key 'prompt': expected a list of messages (and no extra_info.question)")
    users = [_text(m.get("content")) for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    if not users or users[-1] is None:
        raise RowProblem("key 'prompt': no user message with text content")
    question = users[-1].removeprefix(IMAGE_PLACEHOLDER).lstrip("\n")
    return question.removesuffix(_INSTRUCTION).rstrip()


def _text(content: Any) -> str | None:
    """A message's text: a string, or the text parts of an OpenAI-style list of content parts
    (an image part becomes a placeholder)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    pieces = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif isinstance(part, dict) and part.get("type") == "image":
            pieces.append(IMAGE_PLACEHOLDER)
    return "".join(pieces) if pieces else None


def _image(item: Any, index: int, store: ImageStore, image_root: Path) -> Path:
    where = f"key 'images': entry {index}"
    if isinstance(item, dict) and item.get("bytes"):
        try:
            return store.put(item["bytes"])
        except ValueError as err:
            raise RowProblem(f"{where}: {err}") from None
    path = item.get("path") or item.get("image") if isinstance(item, dict) else item
    if not isinstance(path, str) or not path:
        raise RowProblem(f"{where}: neither image bytes nor a path")
    resolved = image_root / path
    if not resolved.is_file():
        raise RowProblem(f"{where}: no image file at {resolved}")
    return resolved.resolve()
