"""Carries out one trajectory's tool calls and renders what the model sees back.

A session belongs to one trajectory: its code sandbox session (started on the first code call,
so trajectories that never run code never pay for one), its scratch directory (where returned
images land) and its one allowed image search.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from deepeyes.agent import protocol
from deepeyes.agent.trajectory import ToolCall
from deepeyes.tools import SandboxClient, SandboxError, SandboxSession
from deepeyes.tools.search_service import Search, SearchError

log = logging.getLogger(__name__)


@dataclass
class Toolbox:
    """What every session of a run shares: search (in process or a search-service client), the
    code sandbox and the scratch root."""

    search: Search
    sandbox: SandboxClient
    scratch_root: Path
    top_k: int = 5

    def session(self, name: str, images: list[Path]) -> "ToolSession":
        return ToolSession(self, self.scratch_root / name, images)

    def close(self) -> None:
        """Stop the code sandbox if this toolbox started it."""
        self.sandbox.close()


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
        self._code: SandboxSession | None = None
        self._image_search_used = False

    async def execute(self, action: protocol.Action) -> Observation:
        started = time.perf_counter()
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
        return Observation(text, images, ToolCall(tool, ok, time.perf_counter() - started))

    async def _run_code(self, code: str):
        if self._code is None:
            self._code = self._toolbox.sandbox.session(self._images, self._scratch)
        try:
            result = await self._code.run(code)
        except SandboxError as error:  # the service failed, not the cell: the model sees an error
            log.warning("code call failed: %s", error)
            return protocol.render_code_observation("", f"SandboxError: {error}", 0), [], protocol.CODE, False
        images = list(result.images[: protocol.MAX_RETURNED_IMAGES])
        text = protocol.render_code_observation(result.stdout, result.stderr, len(images))
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
        text = protocol.render_image_search([title for title, _ in hits])
        return text, [path for _, path in hits], protocol.IMAGE_SEARCH, True

    async def close(self) -> None:
        """End the sandbox session. The scratch stays until the step ends: returned images live there."""
        if self._code is not None:
            await self._code.close()
            self._code = None


def clear_scratch(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
