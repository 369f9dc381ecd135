"""Carries out one trajectory's tool calls and renders what the model sees back.

A session belongs to one trajectory: its code sandbox session (started on the first code call,
so trajectories that never run code never pay for one), its share of the trajectory's pixel
budget and its one allowed image search. Every image it hands back is a path in the step's
content-addressed image store (`deepeyes.data.image_store`): a crop that several rollouts
returned is one file.
"""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

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

    def session(self, name: str, images: list[Path], variant: str = protocol.DEEPEYESV2) -> "ToolSession":
        return ToolSession(self, name, images, variant)

    def close(self) -> None:
        """Stop the code sandbox if this toolbox started it."""
        self.sandbox.close()


@dataclass(frozen=True)
class Observation:
    text: str  # what the model is shown, one <image> per image (for logs and the reward)
    images: list[Path]
    call: ToolCall
    dropped_images: int = 0  # returned, but over the trajectory's pixel budget: not shown
    # The text around `images` (len(images) + 1 pieces): an "<image>" a program printed stays text.
    pieces: tuple[str, ...] = ()
    ends_episode: bool = False  # deepeyesv2: the released environment stops here (a tool failure)


class ToolSession:
    def __init__(self, toolbox: Toolbox, name: str, images: list[Path], variant: str = protocol.DEEPEYESV2):
        self._toolbox = toolbox
        self._variant = variant
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
            pieces, images, tool, ok = await self._run_code(action.code)
        elif isinstance(action, protocol.SearchCall):
            pieces, images, tool, ok = await self._text_search(action.query)
        elif isinstance(action, protocol.ImageSearchCall):
            pieces, images, tool, ok = await self._image_search()
        elif isinstance(action, protocol.InvalidCall):
            pieces, images, tool, ok = [action.observation], [], action.tool, False
        else:
            raise TypeError(f"not a tool action: {action!r}")
        # deepeyesv2: a sandbox or search failure ends the episode (env:148-150, env:201-203).
        failed = not ok and pieces[0] in (protocol.CODE_ERROR, protocol.SEARCH_ERROR)
        ends = failed and self._variant == protocol.DEEPEYESV2
        return Observation(
            protocol.IMAGE_PLACEHOLDER.join(pieces), images, ToolCall(tool, ok, time.perf_counter() - started),
            self._dropped, tuple(pieces), ends,
        )

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
        if self._variant == protocol.DEEPEYESV2:
            code = await asyncio.to_thread(protocol.reindent_code, code)  # autopep8: off the event loop
        try:
            result = await self._code.run(code)
        except SandboxError as error:  # the service failed, not the cell: the model sees an error
            log.warning("code call failed: %s", error)
            if self._variant == protocol.DEEPEYESV2:
                return [protocol.CODE_ERROR], [], protocol.CODE, False
            return [protocol.render_code_observation("", f"SandboxError: {error}", 0)], [], protocol.CODE, False
        if result.failed and self._variant == protocol.DEEPEYESV2:  # timed out or the kernel died
            return [protocol.CODE_ERROR], [], protocol.CODE, False
        returned = list(result.images[: protocol.MAX_RETURNED_IMAGES])
        if self._variant == protocol.DEEPEYESV2:
            returned = await asyncio.to_thread(lambda: [self._release_size(image) for image in returned])
        images = self._within_budget(returned)
        stderr = result.stderr
        if self._dropped:
            stderr += (
                f"\n[{self._dropped} image(s) not shown: this trajectory's image budget "
                f"({self._toolbox.max_trajectory_pixels} pixels) is used up]"
            )
        pieces = protocol.code_observation(result.stdout, stderr, len(images))
        return pieces, images, protocol.CODE, not result.failed

    def _release_size(self, image: Path) -> Path:
        """The image as the released environment shows it (env:352, env:367-398): resized when a
        side is under 32 pixels or the aspect ratio is over 200; a resized copy goes to the store."""
        with Image.open(image) as opened:
            resized = protocol.release_image_size(opened)
            if resized is opened:
                return image
            buffer = io.BytesIO()
            resized.save(buffer, format="PNG")
        return self._toolbox.store.put(buffer.getvalue())

    async def _text_search(self, query: str):
        try:
            hits = await self._toolbox.search.search(query, self._toolbox.top_k)
        except SearchError:
            return [protocol.SEARCH_ERROR], [], protocol.TEXT_SEARCH, False
        return [protocol.text_search_observation(query, hits, self._variant)], [], protocol.TEXT_SEARCH, True

    async def _image_search(self):
        if not self._images:
            return [protocol.SEARCH_ERROR], [], protocol.IMAGE_SEARCH, False
        # The released environment does not enforce the prompt's "only once"; feedback does.
        if self._image_search_used and self._variant == protocol.FEEDBACK:
            return [protocol.IMAGE_SEARCH_REPEATED], [], protocol.IMAGE_SEARCH, False
        try:
            hits = await self._toolbox.search.image_search(self._images[0], self._toolbox.top_k)
        except SearchError:  # a failed search does not use up the one allowed
            return [protocol.SEARCH_ERROR], [], protocol.IMAGE_SEARCH, False
        self._image_search_used = True
        hits = hits[: protocol.MAX_RETURNED_IMAGES]
        images = self._within_budget([self._toolbox.store.put_file(path) for _, path in hits])
        pieces = protocol.image_search_observation([title for title, _ in hits[: len(images)]], self._variant)
        return pieces, images, protocol.IMAGE_SEARCH, True

    async def close(self) -> None:
        """End the sandbox session. Its returned images stay in the store until the step ends."""
        if self._code is not None:
            await self._code.close()
            self._code = None


def clear_scratch(root: Path) -> None:
    """Drop the step's image store: nothing outlives the step that made it."""
    shutil.rmtree(root, ignore_errors=True)
