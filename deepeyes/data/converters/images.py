"""Images by path and content hash: a content-addressed store for images that arrive as bytes,
and the hash manifest written beside every converted file."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from deepeyes.tools.search import sha256_file

_FORMAT_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


class ImageStore:
    """Writes image bytes once to `root/<sha[:2]>/<sha>.<ext>`; the same bytes give the same path."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def put(self, data: bytes) -> Path:
        """The stored file for these bytes. Raises ValueError when the bytes are not an image."""
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
                suffix = _FORMAT_SUFFIX.get(image.format or "", ".img")
        except Exception as err:  # PIL raises many types for undecodable bytes
            raise ValueError(f"image bytes do not decode: {err}") from None
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / digest[:2] / f"{digest}{suffix}"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
            partial.write_bytes(data)
            partial.replace(path)  # atomic: a reader never sees half an image
        return path


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
