"""The project's build cache: artifacts made offline on first use (the tiny model, sample data).

Everything lives under `$DEEPEYES_CACHE` (default `~/.cache/deepeyes`), one directory per
artifact, named by a hash of what it is built from so that a changed recipe builds afresh.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def cache_root() -> Path:
    return Path(os.environ.get("DEEPEYES_CACHE") or Path.home() / ".cache" / "deepeyes")


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, calling `build(staging_dir)` first if it does not exist yet.

    The build writes into a temporary sibling directory that is then renamed into place, so
    concurrent callers (ranks, test workers, jobs on a shared filesystem) never read a half-built
    artifact: the first rename wins and the others discard their identical copy.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        build(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
