"""Write records as JSON lines, image paths relative to the file (the inverse of `readers`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from deepeyes.data.schema import Record, SFTRecord


def write_records(path: Path, records: Iterable[Record]) -> None:
    rows = (
        {
            "id": record.id,
            "question": record.question,
            "images": _relative(record.images, path),
            "answer": record.answer,
            "family": record.family,
            "data_source": record.data_source,
            "metadata": record.metadata,
        }
        for record in records
    )
    _write_jsonl(path, rows)


def write_sft_records(path: Path, records: Iterable[SFTRecord]) -> None:
    _write_jsonl(path, (sft_record_row(record, path) for record in records))


def sft_record_row(record: SFTRecord, path: Path) -> dict:
    """The JSON object of one SFT record in the file at `path` (for writers that append)."""
    return {
        "id": record.id,
        "messages": [{"role": m.role, "content": m.content} for m in record.messages],
        "images": _relative(record.images, path),
        "family": record.family,
        "data_source": record.data_source,
    }


def _relative(images: Iterable[Path], path: Path) -> list[str]:
    # POSIX separators so a file written anywhere reads anywhere.
    return [Path(os.path.relpath(image, Path(path).parent)).as_posix() for image in images]


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
