"""Carries out one trajectory's tool calls and renders what the model sees back.

A session belongs to one trajectory: its code sandbox session (started on the first code call,
so trajectories that never run code never pay for one), its share of the trajectory's pixel
budget and its one allowed image search. Every image it hands back is a path in the step's
content-addressed image store (`deepeyes.data.image_store`): a crop that several rollouts
returned is one file.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from deepeyes.agent import protocol
from deepeyes.agent.trajectory import ToolCall
from deepeyes.data.image_store import ImageStore
from deepeyes.data.schema import Record
from deepeyes.tools import SandboxClient, SandboxError, SandboxSession
from deepeyes.tools.search_service import Search, SearchError

log = logging.getLogger(__name__)


@dataclass
class Toolbox:
    """What every session of a run shares: search (in process or a search-service client), the
    code sandbox, the step's image store (`scratch_root`, cleared after every step) and the
    per-trajectory pixel budget (`image_pixels` measures an image as the model will see it)."""

    search: Search
    sandbox: SandboxClient
    scratch_root: Path
    top_k: int = 5
    image_pixels: Callable[[Path], int] | None = None
    max_trajectory_pixels: int = 0  # 0 = no limit

    @property
    def store(self) -> ImageStore:
        return ImageStore(self.scratch_root)

    def stored(self, record: Record) -> Record:
        """The record with its images as store references: one copy, shared by its n rollouts."""
        return replace(record, images=tuple(self.store.put_file(image) for image in record.images))

    def session(self, name: str, images: list[Path]) -> "ToolSession":
        return ToolSession(self, name, images)

    def close(self) -> None:
        """Stop the code sandbox if this toolbox started it."""
        self.sandbox.close()


@dataclass(frozen=True)
class Observation:
    text: str
    images: list[Path]
    call: ToolCall
    dropped_images: int = 0  # returned, but over the trajectory's pixel budget: not shown


class ToolSession:
    def __init__(self, toolbox: Toolbox, name: str, images: list[Path]):
        self._toolbox = toolbox
        self._images = images  # the record's images: image_1 … image_n, and the image-search query
        self._code: SandboxSession | None = None
        self._image_search_used = False
        self._dropped = 0  # images the last call returned past the budget
        self._pixels_used = sum(map(self._pixels, images))
        limit = toolbox.max_trajectory_pixels
        if limit and self._pixels_used > limit:
            raise ValueError(
                f"trajectory {name}: the prompt's {len(images)} image(s) take {self._pixels_used} pixels, over "
                f"model.max_trajectory_pixels={limit}; raise it or lower model.max_pixels"
            )

    async def execute(self, action: protocol.Action) -> Observation:
        started = time.perf_counter()
        self._dropped = 0
        if isinstance(action, protocol.CodeCall):
            text, images, tool, ok = await self._run_code(action.code)
        elif isinstance(action, protocol.SearchCall):
            text, images, tool, ok = await self._text_search(action.query)
        elif isinstance(action, protocol.ImageSearchCall):
            text, images, tool, ok = await self._image_search()
        elif isinstance(action, protocol.InvalidCall):
            text, images, tool, ok = action.observation, [], action.tool, False
        else:
            raise TypeError(f"not a tool action: {action!r}")
        return Observation(text, images, ToolCall(tool, ok, time.perf_counter() - started), self._dropped)

    def _pixels(self, image: Path) -> int:
        if not self._toolbox.max_trajectory_pixels:
            return 0
        if self._toolbox.image_pixels is None:
            raise ValueError("Toolbox.max_trajectory_pixels is set but image_pixels (how to measure an image) is not")
        return self._toolbox.image_pixels(image)

    def _within_budget(self, images: list[Path]) -> list[Path]:
        """The leading images that still fit the trajectory's pixel budget; the rest are counted."""
        kept = []
        for image in images:
            need = self._pixels(image)
            if self._toolbox.max_trajectory_pixels and self._pixels_used + need > self._toolbox.max_trajectory_pixels:
                break
            self._pixels_used += need
            kept.append(image)
        self._dropped = len(images) - len(kept)
        return kept

    async def _run_code(self, code: str):
        if self._code is None:  # returned images land in the step's store, named by their hash
            self._code = self._toolbox.sandbox.session(self._images, self._toolbox.scratch_root)
        try:
            result = await self._code.run(code)
        except SandboxError as error:  # the service failed, not the cell: the model sees an error
            log.warning("code call failed: %s", error)
            return protocol.render_code_observation("", f"SandboxError: {error}", 0), [], protocol.CODE, False
        images = self._within_budget(list(result.images[: protocol.MAX_RETURNED_IMAGES]))
        stderr = result.stderr
        if self._dropped:
            stderr += (
                f"\n[{self._dropped} image(s) not shown: this trajectory's image budget "
                f"({self._toolbox.max_trajectory_pixels} pixels) is used up]"
            )
        text = protocol.render_code_observation(result.stdout, stderr, len(images))
        return text, images, protocol.CODE, not result.failed

    async def _text_search(self, query: str):
        try:
            hits = await self._toolbox.search.search(query, self._toolbox.top_k)
        except SearchError:
            return protocol.SEARCH_ERROR, [], protocol.TEXT_SEARCH, False
        return protocol.render_text_search(query, hits), [], protocol.TEXT_SEARCH, True

    async def _image_search(self):
        if not self._images:
            return protocol.SEARCH_ERROR, [], protocol.IMAGE_SEARCH, False
        if self._image_search_used:
            return protocol.IMAGE_SEARCH_REPEATED, [], protocol.IMAGE_SEARCH, False
        try:
            hits = await self._toolbox.search.image_search(self._images[0], self._toolbox.top_k)
        except SearchError:  # a failed search does not use up the one allowed
            return protocol.SEARCH_ERROR, [], protocol.IMAGE_SEARCH, False
        self._image_search_used = True
        images = self._within_budget([self._toolbox.store.put_file(path) for _, path in hits])
        text = protocol.render_image_search([title for title, _ in hits[: len(images)]])
        return text, images, protocol.IMAGE_SEARCH, True

    async def close(self) -> None:
        """End the sandbox session. Its returned images stay in the store until the step ends."""
        if self._code is not None:
            await self._code.close()
            self._code = None


def clear_scratch(root: Path) -> None:
    """Drop the step's image store: nothing outlives the step that made it."""
    shutil.rmtree(root, ignore_errors=True)
