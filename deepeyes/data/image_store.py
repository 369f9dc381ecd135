"""Images by content hash: one node-local copy of each image, referenced by path everywhere.

Every image a run touches — a record's input, an image a code cell returns, an image-search
hit — is a file named by the sha256 of its bytes, `root/<sha[:2]>/<sha>.<ext>`. Records,
trajectories, rollout requests and sandbox sessions carry these paths, never pixels: the n
rollouts of a prompt reference one file, and an image that several rollouts' cells returned is
stored once. Pixels are decoded only where they are consumed (`deepeyes.model.pixels.PixelCache`
in the rollout engine and the trainer's forward), within a bounded cache. A run's store is
cleared after every step (`deepeyes.agent.tool_session.clear_scratch`); the converters keep a
persistent one for images that arrive as bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import secrets
import shutil
import stat
from pathlib import Path

from PIL import Image

from deepeyes.tools.search import STORED_NAME, content_key, sha256_file

__all__ = ["ImageStore", "content_key"]

_FORMAT_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


class ImageStore:
    """Writes each image once to `root/<sha[:2]>/<sha>.<ext>`; the same bytes give the same path."""

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
        path = self._path(hashlib.sha256(data).hexdigest(), suffix)
        if not _is_stored(path):
            self._write(path, lambda directory, name: _write_new(directory, name, data))
        return path

    def put_file(self, path: str | Path) -> Path:
        """The stored copy of an image file. A file already named by its hash is its own
        reference; others are hashed once and hard-linked in (copied across filesystems), so a
        dataset image costs no second copy. Dataset files must not change during a run."""
        path = Path(path)
        if STORED_NAME.fullmatch(path.name):
            return path
        target = self._path(sha256_file(path), path.suffix.lower() or ".img")
        if not _is_stored(target):
            self._write(target, lambda directory, name: _link_or_copy(path, directory, name))
        return target

    def files(self) -> list[Path]:
        """Every stored image (for accounting: what a step left behind)."""
        return sorted(p for p in self.root.glob("*/*") if STORED_NAME.fullmatch(p.name)) if self.root.is_dir() else []

    def _path(self, digest: str, suffix: str) -> Path:
        return self.root / digest[:2] / f"{digest}{suffix}"

    def _write(self, path: Path, fill) -> None:
        """Write `path` through a temporary name nobody can guess, created only if new and
        never through a link (O_EXCL | O_NOFOLLOW), in its directory opened without following a
        link; then rename it over `path`. A link planted in the store is never written through,
        and a reader never sees half an image."""
        self.root.mkdir(parents=True, exist_ok=True)
        root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(path.parent.name, 0o755, dir_fd=root)
            directory = os.open(path.parent.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
        finally:
            os.close(root)
        partial = f".{secrets.token_hex(16)}.partial"
        try:
            fill(directory, partial)
            os.replace(partial, path.name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(partial, dir_fd=directory)
            raise
        finally:
            os.close(directory)


def _is_stored(path: Path) -> bool:
    """A plain file is there already (a link is not: it is replaced)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _write_new(directory: int, name: str, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=directory)
    with open(fd, "wb") as file:
        file.write(data)


def _link_or_copy(source: Path, directory: int, name: str) -> None:
    try:
        os.link(source, name, dst_dir_fd=directory)
    except OSError:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=directory)
        with open(source, "rb") as src, open(fd, "wb") as dst:
            shutil.copyfileobj(src, dst)
