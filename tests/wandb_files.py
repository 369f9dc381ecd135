"""What an offline wandb run wrote, read back from its run files (`<dir>/wandb/offline-run-*/run-<id>.wandb`).

wandb keeps no reader for them in the installed client, so this reads the container by hand: a
7-byte header (":W&B", magic, version), then 32 KiB blocks of records, each a 7-byte header
(CRC32, length, kind: full, first, middle or last piece) and a piece of a serialized
`wandb.proto.wandb_internal_pb2.Record`.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    position, pieces = HEADER, b""
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        if left < HEADER:  # a block's tail too short for a record header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        pieces += data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def run_files(out_dir: Path) -> list[Path]:
    """Every attempt's run file under a run directory, oldest first."""
    return sorted((out_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def run_groups(out_dir: Path) -> set[str]:
    return {r.run.run_group for f in run_files(out_dir) for r in records(f) if r.WhichOneof("record_type") == "run"}


def history(out_dir: Path) -> list[dict]:
    """Every history row of every attempt, in the order logged, values decoded from JSON (a
    value logged as a media object, such as a table, is a dict of its fields)."""
    rows = []
    for f in run_files(out_dir):
        for r in records(f):
            if r.WhichOneof("record_type") != "history":
                continue
            row: dict = {}
            for item in r.history.item:
                *parents, name = [item.key] if item.key else list(item.nested_key)
                node = row
                for parent in parents:
                    node = node.setdefault(parent, {})
                node[name] = json.loads(item.value_json)
            rows.append(row)
    return rows


def artifact_files(out_dir: Path) -> dict[str, list[str]]:
    """The files of every artifact the runs logged (a table's json and its images), by artifact name."""
    return {
        r.artifact.name: [entry.path for entry in r.artifact.manifest.contents]
        for f in run_files(out_dir) for r in records(f) if r.WhichOneof("record_type") == "artifact"
    }
