"""Read and validate record files (see `deepeyes.data.schema` for the format).

Every row is checked before any job sees it, so that a bad row fails at load time with
`file:row: problem` instead of deep inside a rollout. Rows are numbered from 1 (the line
number in a JSON lines file). With `on_error="skip"` bad rows are logged one by one and
counted, and the count is returned so the caller can report it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

from deepeyes.agent.protocol import user_prompt
from deepeyes.data.schema import IMAGE_PLACEHOLDER, Message, Record, RecordError, SFTRecord

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
T = TypeVar("T")

_RECORD_KEYS = {"id": str, "question": str, "images": list, "answer": str, "family": str}
_RECORD_OPTIONAL = {"data_source": str, "metadata": dict}
_SFT_KEYS = {"id": str, "messages": list, "images": list}
_SFT_OPTIONAL = {"family": str, "data_source": str}
_ROLES = ("system", "user", "assistant")


class _RowProblem(Exception):
    """A problem with the current row; the reader adds the file and row number."""


@overload
def read_records(path: Path, on_error: Literal["raise"] = "raise") -> list[Record]: ...
@overload
def read_records(path: Path, on_error: Literal["skip"]) -> tuple[list[Record], int]: ...


def read_records(path: Path, on_error: OnError = "raise") -> list[Record] | tuple[list[Record], int]:
    """RL/eval tasks from a `.jsonl` or `.parquet` file.

    Raises `RecordError` on the first bad row; with `on_error="skip"` returns
    `(records, number_of_skipped_rows)` instead.
    """
    path = Path(path)
    rows = _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_rows(path)
    return _read(path, rows, _parse_record, on_error)


@overload
def read_sft_records(path: Path, on_error: Literal["raise"] = "raise") -> list[SFTRecord]: ...
@overload
def read_sft_records(path: Path, on_error: Literal["skip"]) -> tuple[list[SFTRecord], int]: ...


def read_sft_records(
    path: Path, on_error: OnError = "raise"
) -> list[SFTRecord] | tuple[list[SFTRecord], int]:
    """Cold-start trajectories from a `.jsonl` file; errors as in `read_records`."""
    path = Path(path)
    return _read(path, _jsonl_rows(path), _parse_sft_record, on_error)


def _read(
    path: Path,
    rows: Iterator[tuple[int, Any]],
    parse: Callable[[dict[str, Any], Path], T],
    on_error: OnError,
) -> list[T] | tuple[list[T], int]:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    records: list[T] = []
    seen_ids: set[str] = set()
    skipped = 0
    for row, value in rows:
        try:
            if isinstance(value, _RowProblem):
                raise value
            if not isinstance(value, dict):
                raise _RowProblem(f"expected a JSON object, got {type(value).__name__}")
            record = parse(value, path.parent)
            if record.id in seen_ids:
                raise _RowProblem(f"key 'id': duplicate id {record.id!r}")
        except _RowProblem as problem:
            error = RecordError(path, row, str(problem))
            if on_error == "raise":
                raise error from None
            logger.warning("skipping bad row: %s", error)
            skipped += 1
            continue
        seen_ids.add(record.id)
        records.append(record)
    if on_error == "raise":
        return records
    if skipped:
        logger.warning("%s: skipped %d of %d rows", path, skipped, skipped + len(records))
    return records, skipped


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) per non-blank line; an unparsable line yields its problem."""
    with open(path, encoding="utf-8") as lines:
        for row, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield row, json.loads(line.strip())
            except ValueError as err:
                yield row, _RowProblem(f"not valid JSON: {err}")


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq  # only parquet readers pay for the import

    for row, value in enumerate(pq.read_table(path).to_pylist(), start=1):
        # Parquet has no "absent": a column missing from some rows reads as None.
        yield row, {key: item for key, item in value.items() if item is not None}


def _check_keys(value: dict[str, Any], required: dict[str, type], optional: dict[str, type]) -> None:
    for key in required:
        if key not in value:
            raise _RowProblem(f"key {key!r}: missing")
    for key, item in value.items():
        kind = required.get(key) or optional.get(key)
        if kind is None:
            known = ", ".join([*required, *optional])
            raise _RowProblem(f"key {key!r}: unknown key (known keys: {known})")
        if not isinstance(item, kind):
            raise _RowProblem(f"key {key!r}: expected {kind.__name__}, got {type(item).__name__}")


def _image_paths(images: list[Any], base: Path) -> tuple[Path, ...]:
    paths = []
    for index, image in enumerate(images):
        if not isinstance(image, str):
            raise _RowProblem(f"key 'images': entry {index} is {type(image).__name__}, not a path")
        resolved = base / image
        if not resolved.is_file():
            raise _RowProblem(f"key 'images': entry {index}: no image file at {resolved}")
        paths.append(resolved)
    return tuple(paths)


def _check_placeholders(key: str, n_placeholders: int, n_images: int) -> None:
    if n_placeholders != n_images:
        raise _RowProblem(
            f"key {key!r}: {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) "
            f"but {n_images} image(s) in 'images'"
        )


def _parse_record(value: dict[str, Any], base: Path) -> Record:
    _check_keys(value, _RECORD_KEYS, _RECORD_OPTIONAL)
    images = _image_paths(value["images"], base)
    # The agent asks `user_prompt(question)`, which adds the first placeholder itself.
    _check_placeholders("question", user_prompt(value["question"]).count(IMAGE_PLACEHOLDER), len(images))
    return Record(
        id=value["id"],
        question=value["question"],
        images=images,
        answer=value["answer"],
        family=value["family"],
        data_source=value.get("data_source", "sample"),
        metadata=value.get("metadata", {}),
    )


def _parse_sft_record(value: dict[str, Any], base: Path) -> SFTRecord:
    _check_keys(value, _SFT_KEYS, _SFT_OPTIONAL)
    messages = _messages(value["messages"])
    images = _image_paths(value["images"], base)
    placeholders = sum(message.content.count(IMAGE_PLACEHOLDER) for message in messages)
    _check_placeholders("messages", placeholders, len(images))
    return SFTRecord(
        id=value["id"],
        messages=messages,
        images=images,
        family=value.get("family", "unknown"),
        data_source=value.get("data_source", "sample"),
    )


def _messages(raw: list[Any]) -> tuple[Message, ...]:
    """Messages in the order SFT needs: [system], user, assistant, user, ..., assistant."""
    messages = []
    for index, item in enumerate(raw):
        where = f"key 'messages': message {index}"
        if not isinstance(item, dict) or set(item) != {"role", "content"}:
            raise _RowProblem(f"{where}: expected an object with exactly 'role' and 'content'")
        if item["role"] not in _ROLES:
            raise _RowProblem(f"{where}: role {item['role']!r} is not one of {', '.join(_ROLES)}")
        if not isinstance(item["content"], str):
            raise _RowProblem(f"{where}: content is {type(item['content']).__name__}, not str")
        expected = _expected_role(index, raw[0].get("role") == "system")
        if item["role"] != expected:
            raise _RowProblem(f"{where}: role {item['role']!r} out of order, expected {expected!r}")
        messages.append(Message(item["role"], item["content"]))
    if not messages or messages[-1].role != "assistant":
        raise _RowProblem("key 'messages': must end with an assistant message")
    return tuple(messages)


def _expected_role(index: int, has_system: bool) -> str:
    if has_system:
        if index == 0:
            return "system"
        index -= 1
    return "user" if index % 2 == 0 else "assistant"
