"""The client every caller uses to reach rollout servers (and judge servers, the same kind).

`RolloutClient.generate` keeps the engine shape `async generate(GenerateRequest) -> GenerateResult`,
so the agent loop runs unchanged on one in-process engine or on many servers. Requests go to the
server with the fewest requests in flight; a request that fails on one server (connection lost,
server error, stale weights) is retried on another, and the failure is counted per server. A
server that refused a connection is skipped for `cooldown_s` before it is tried again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import aiohttp

from deepeyes.service import auth_headers
from deepeyes.rollout.api import GenerateRequest, GenerateResult, request_to_json, result_from_json

log = logging.getLogger(__name__)


class RolloutUnavailable(RuntimeError):
    """No server could serve a request."""


class RolloutClient:
    def __init__(
        self, urls: Sequence[str], token: str, request_timeout_s: float = 600.0, cooldown_s: float = 10.0,
        min_weight_version: int = 0,
    ):
        if not urls:
            raise ValueError("RolloutClient needs at least one server URL")
        self.urls = list(urls)
        self.min_weight_version = min_weight_version  # the trainer's staleness bound, per step
        self.failures: Counter[str] = Counter()  # per server: failed attempts (each retried elsewhere)
        self.retries = 0
        self._headers = auth_headers(token)
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._cooldown_s = cooldown_s
        self._in_flight: Counter[str] = Counter()
        self._down_until: dict[str, float] = {}
        self._turn = 0
        self._session: aiohttp.ClientSession | None = None

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        body = request_to_json(request, self.min_weight_version)
        body = await self._post_anywhere("/generate", body)
        return result_from_json(body)

    async def update_weights(self, version: int, path: Path) -> dict[str, float]:
        """Every server loads `path` as `version`; returns seconds per server. A server that cannot
        is counted as failed and skipped (until it recovers, it answers 409 to fresher requests)."""
        async def one(url: str) -> tuple[str, float | None]:
            try:
                reply = await self._post(url, "/weights", {"version": version, "path": str(path)})
                return url, reply["seconds"]
            except (aiohttp.ClientError, asyncio.TimeoutError, _ServerError) as error:
                self._fail(url, error)
                return url, None

        replies = await asyncio.gather(*(one(url) for url in self.urls))
        loaded = {url: seconds for url, seconds in replies if seconds is not None}
        if not loaded:
            raise RolloutUnavailable(f"no rollout server loaded weight version {version} from {path}")
        return loaded

    async def close(self) -> None:
        """Close the HTTP session; the next call opens one on whatever event loop is running."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- spreading and retrying --------------------------------------------------------------

    async def _post_anywhere(self, path: str, body: dict) -> dict:
        tried: set[str] = set()
        while True:
            url = self._pick(exclude=tried)
            if url is None:
                raise RolloutUnavailable(
                    f"{path} failed on every rollout server ({', '.join(self.urls)}); failures so far: {dict(self.failures)}"
                )
            tried.add(url)
            try:
                return await self._post(url, path, body)
            except (aiohttp.ClientError, asyncio.TimeoutError, _ServerError) as error:
                self._fail(url, error)
                self.retries += 1

    def _pick(self, exclude: set[str]) -> str | None:
        """The least-busy server not yet tried; servers in cooldown only when nothing else is left."""
        now = time.monotonic()
        candidates = [url for url in self.urls if url not in exclude]
        up = [url for url in candidates if self._down_until.get(url, 0.0) <= now]
        pool = up or candidates
        if not pool:
            return None
        self._turn += 1  # rotate among equally busy servers
        order = {url: (i - self._turn) % len(self.urls) for i, url in enumerate(self.urls)}
        return min(pool, key=lambda url: (self._in_flight[url], order[url]))

    async def _post(self, url: str, path: str, body: dict) -> dict:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        self._in_flight[url] += 1
        try:
            async with self._session.post(url + path, json=body) as response:
                reply = await response.json(content_type=None)
                if response.status in (400, 401, 404):  # our own mistake: no other server would differ
                    raise ValueError(f"{url}{path} refused the request ({response.status}): {reply.get('error')}")
                if response.status != 200:
                    raise _ServerError(f"{url}{path} answered {response.status}: {reply.get('error')}")
                self._down_until.pop(url, None)
                return reply
        finally:
            self._in_flight[url] -= 1

    def _fail(self, url: str, error: BaseException) -> None:
        self.failures[url] += 1
        if isinstance(error, (aiohttp.ClientConnectionError, asyncio.TimeoutError)):
            self._down_until[url] = time.monotonic() + self._cooldown_s
        log.warning("rollout server %s failed (%s: %s); retrying elsewhere", url, type(error).__name__, error)


class _ServerError(RuntimeError):
    """A server answered but could not serve (5xx, or 409: weights older than required)."""
