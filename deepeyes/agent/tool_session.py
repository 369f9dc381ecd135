"""Carries out one trajectory's tool calls and renders what the model sees back.

A session belongs to one trajectory: its code worker (started on the first code call, so
trajectories that never run code never pay for one), its scratch directory and its one
allowed image search.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from deepeyes.agent import protocol
from deepeyes.agent.trajectory import ToolCall
from deepeyes.tools import CodeLimits, CodeWorker, LocalImageSearch, LocalTextSearch


@dataclass
class Toolbox:
    """What every session of a run shares: the search indexes, code limits and scratch root."""

    text_search: LocalTextSearch
    image_search: Optional[LocalImageSearch]
    code_limits: CodeLimits
    scratch_root: Path
    top_k: int = 5

    def session(self, name: str, images: list[Path]) -> "ToolSession":
        return ToolSession(self, self.scratch_root / name, images)


@dataclass(frozen=True)
class Observation:
    text: str
    images: list[Path]
    call: ToolCall


class ToolSession:
    def __init__(self, toolbox: Toolbox, scratch: Path, images: list[Path]):
        self._toolbox = toolbox
        self._scratch = scratch
        self._images = images  # the record's images: image_1 … image_n, and the image-search query
        self._worker: CodeWorker | None = None
        self._image_search_used = False

    async def execute(self, action: protocol.Action) -> Observation:
        started = time.perf_counter()
        if isinstance(action, protocol.CodeCall):
            text, images, tool, ok = await self._run_code(action.code)
        elif isinstance(action, protocol.SearchCall):
            hits = self._toolbox.text_search.search(action.query, k=self._toolbox.top_k)
            text, images, tool, ok = protocol.render_text_search(action.query, hits), [], protocol.TEXT_SEARCH, True
        elif isinstance(action, protocol.ImageSearchCall):
            text, images, tool, ok = self._image_search()
        elif isinstance(action, protocol.InvalidCall):
            text, images, tool, ok = action.observation, [], action.tool, False
        else:
            raise TypeError(f"not a tool action: {action!r}")
        return Observation(text, images, ToolCall(tool, ok, time.perf_counter() - started))

    async def _run_code(self, code: str):
        if self._worker is None:
            self._scratch.mkdir(parents=True, exist_ok=True)
            self._worker = await CodeWorker.start(self._images, self._scratch, self._toolbox.code_limits)
        result = await self._worker.run(code)
        images = list(result.images[: protocol.MAX_RETURNED_IMAGES])
        text = protocol.render_code_observation(result.stdout, result.stderr, len(images))
        return text, images, protocol.CODE, not result.timed_out

    def _image_search(self):
        search = self._toolbox.image_search
        if search is None or not self._images:
            return protocol.SEARCH_ERROR, [], protocol.IMAGE_SEARCH, False
        if self._image_search_used:
            return protocol.IMAGE_SEARCH_REPEATED, [], protocol.IMAGE_SEARCH, False
        self._image_search_used = True
        hits = search.search(self._images[0], k=self._toolbox.top_k)
        text = protocol.render_image_search([title for title, _ in hits])
        return text, [path for _, path in hits], protocol.IMAGE_SEARCH, True

    async def close(self) -> None:
        """Stop the worker. The scratch stays until the step ends: returned images live there."""
        if self._worker is not None:
            await self._worker.close()
            self._worker = None


def clear_scratch(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
