"""The record schema every job reads.

Two kinds of record, both JSON lines (one object per line) with images referenced by path:

RL / eval task (`Record`)::

    {"id": "arith-00012", "question": "What is 37 * 41?", "images": ["images/arith-00012.png"],
     "answer": "1517", "family": "arithmetic", "data_source": "sample", "metadata": {...}}

Cold-start trajectory (`SFTRecord`), in the LLaMA-Factory "sharegpt" shape DeepEyesV2 uses::

    {"id": "...", "messages": [{"role": "system"|"user"|"assistant", "content": "... <image> ..."}],
     "images": ["images/a.png", ...], "family": "...", "data_source": "..."}

Each `<image>` placeholder in `messages` (in order) consumes the next entry of `images`.
Relative image paths are resolved against the directory of the file that holds the record.

Content hashes (optional, written by `deepeyes.data.converters`): a Record's
`metadata["image_sha256"]` lists the sha256 of each entry of `images`, in order; and a converted
file `X.jsonl` comes with `X.jsonl.sha256.json`, {image path as written in X.jsonl: sha256}, for
Records and SFTRecords alike. Readers do not re-hash images on load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_PLACEHOLDER = "<image>"


class RecordError(ValueError):
    """A record that does not follow the schema; the message names the file, row and key."""

    def __init__(self, source: str | Path, row: int, problem: str):
        super().__init__(f"{source}:{row}: {problem}")
        self.source = str(source)
        self.row = row
        self.problem = problem


@dataclass(frozen=True)
class Record:
    """One task: a question about some images, with the answer used for the accuracy reward."""

    id: str
    question: str
    images: tuple[Path, ...]
    answer: str
    family: str
    data_source: str = "sample"
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class SFTRecord:
    """One multi-turn tool-using trajectory for cold-start SFT."""

    id: str
    messages: tuple[Message, ...]
    images: tuple[Path, ...]
    family: str = "unknown"
    data_source: str = "sample"
