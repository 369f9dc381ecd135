"""The row loop every converter shares: validate each row, raise or count-and-log a bad one."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from deepeyes.data.readers import _RowProblem
from deepeyes.data.schema import RecordError

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
T = TypeVar("T")

RowProblem = _RowProblem  # raised by a row parser; the loop adds the file and row


@dataclass
class Conversion:
    """What a converter wrote: the output file, and rows read / written / skipped per source file."""

    output: Path
    read: dict[str, int] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def total_written(self) -> int:
        return sum(self.written.values())

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())


def parse_rows(
    source: Path,
    rows: Iterable[tuple[int, Any]],
    parse: Callable[[int, Any], T],
    on_error: OnError,
    conversion: Conversion,
) -> Iterator[T]:
    """`parse(row, value)` for each (row, value); a `RowProblem` or `RecordError` from it raises
    `RecordError(source, row, ...)`, or with on_error="skip" is logged and counted."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    key = str(source)
    for counter in (conversion.read, conversion.written, conversion.skipped):
        counter.setdefault(key, 0)
    for row, value in rows:
        conversion.read[key] += 1
        try:
            parsed = parse(row, value)
        except (_RowProblem, RecordError) as problem:
            message = problem.problem if isinstance(problem, RecordError) else str(problem)
            error = RecordError(source, row, message)
            if on_error == "raise":
                raise error from None
            log.warning("skipping bad row: %s", error)
            conversion.skipped[key] += 1
            continue
        conversion.written[key] += 1
        yield parsed
    if conversion.skipped[key]:
        log.warning("%s: skipped %d of %d rows", source, conversion.skipped[key], conversion.read[key])


def parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError for non-parquet files
        raise RecordError(path, 0, f"not a readable parquet file: {err}") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=64):  # image bytes: never the whole file at once
        for value in batch.to_pylist():
            row += 1
            yield row, value


def load_json(path: Path, expected: type, what: str) -> Any:
    """A whole-file JSON release (an array of samples, an object keyed by sample id), checked to be
    of the `expected` type; anything else is a RecordError naming the file."""
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except ValueError as err:
        raise RecordError(path, 0, f"not valid JSON: {err}") from None
    if not isinstance(data, expected):
        raise RecordError(path, 0, f"expected {what}, got {type(data).__name__}")
    return data
