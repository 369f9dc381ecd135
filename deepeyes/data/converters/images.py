"""The hash manifest written beside every converted file (images that arrive as bytes go into a
content-addressed `deepeyes.data.image_store.ImageStore`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from deepeyes.tools.search import sha256_file


def write_hash_manifest(output: Path, images: Iterable[Path]) -> Path:
    """`<output>.sha256.json`: {image path relative to the output's directory: sha256 of its bytes}."""
    output = Path(output)
    base = output.parent
    hashes = {}
    for image in images:
        key = Path(os.path.relpath(image, base)).as_posix()
        if key not in hashes:
            hashes[key] = sha256_file(Path(image))
    manifest = output.with_name(output.name + ".sha256.json")
    manifest.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return manifest
