"""The client every caller uses to reach rollout servers (and judge servers, the same kind).

`RolloutClient.generate` keeps the engine shape `async generate(GenerateRequest) -> GenerateResult`,
so the agent loop runs unchanged on one in-process engine or on many servers.

Routing: the first turn of a trajectory (`GenerateRequest.session`) goes to the server with the
fewest requests in flight, and its later turns follow it there, where the prefix cache holds the
conversation so far. A turn moves only when its server cannot serve.

Failures are classified from the server's JSON reply (see `deepeyes.rollout.server`):
- retried on another server, counted per server in `failures`: a lost connection, a timeout, a
  server that is loading, overloaded or behind on weights (503, 409, 429, other 5xx). A server
  that refused a connection is skipped for `cooldown_s`.
- failed at once, counted by kind in `errors`: a request the server refused as malformed (400:
  no other server would differ) or an engine error on it (500 with `kind: "engine"`), raised as
  `RolloutRequestFailed`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Sequence

import aiohttp

from deepeyes.service import auth_headers
from deepeyes.rollout.api import GenerateRequest, GenerateResult, request_to_json, result_from_json

log = logging.getLogger(__name__)

MAX_SESSIONS = 1 << 16  # trajectories remembered for routing (oldest forgotten first)


class RolloutUnavailable(RuntimeError):
    """No server could serve a request."""


class RolloutRequestFailed(RuntimeError):
    """A server refused or failed this request itself; another server would do the same."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # "bad_request" | "engine_error"


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
        self.errors: Counter[str] = Counter()  # per kind: requests failed for good
        self.retries = 0
        self._headers = auth_headers(token)
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._cooldown_s = cooldown_s
        self._in_flight: Counter[str] = Counter()
        self._down_until: dict[str, float] = {}
        self._sessions: OrderedDict[str, str] = OrderedDict()  # trajectory -> the server holding its prefix
        self._turn = 0
        self._session: aiohttp.ClientSession | None = None

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        body = request_to_json(request, self.min_weight_version)
        body = await self._post_anywhere("/generate", body, request.session)
        return result_from_json(body)

    async def update_weights(self, version: int, path: Path) -> dict[str, float]:
        """Every server loads `path` as `version`; returns seconds per server. A server that cannot
        is counted as failed and skipped (until it recovers, it answers 409 to fresher requests)."""
        replies = await self.post_each("/weights", {url: {"version": version, "path": str(path)} for url in self.urls})
        loaded = {url: reply["seconds"] for url, reply in replies.items() if reply is not None}
        if not loaded:
            raise RolloutUnavailable(f"no rollout server loaded weight version {version} from {path}")
        return loaded

    async def post_each(self, path: str, bodies: dict[str, dict] | None = None, method: str = "POST",
                        timeout_s: float | None = None) -> dict[str, dict | None]:
        """One call per server at once, with its own body (`bodies`: {url: body}; None: every
        server, no body): {url: reply, or None where it failed (counted and logged)}."""
        async def one(url: str, body: dict | None) -> tuple[str, dict | None]:
            try:
                return url, await self._call(url, path, body, method, timeout_s)
            except (aiohttp.ClientError, asyncio.TimeoutError, _Retriable, RolloutRequestFailed) as error:
                self._fail(url, error)
                return url, None

        calls = bodies if bodies is not None else dict.fromkeys(self.urls)
        return dict(await asyncio.gather(*(one(url, body) for url, body in calls.items())))

    async def close(self) -> None:
        """Close the HTTP session; the next call opens one on whatever event loop is running."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- routing and retrying ----------------------------------------------------------------

    async def _post_anywhere(self, path: str, body: dict, session: str) -> dict:
        tried: set[str] = set()
        while True:
            url = self._pick(session, exclude=tried)
            if url is None:
                raise RolloutUnavailable(
                    f"{path} failed on every rollout server ({', '.join(self.urls)}); failures so far: {dict(self.failures)}"
                )
            tried.add(url)
            try:
                reply = await self._call(url, path, body)
            except (aiohttp.ClientError, asyncio.TimeoutError, _Retriable) as error:
                self._fail(url, error)
                self.retries += 1
                continue
            except RolloutRequestFailed as error:
                self.errors[error.kind] += 1
                raise
            if session:
                self._remember(session, url)
            return reply

    def _pick(self, session: str, exclude: set[str]) -> str | None:
        """The trajectory's own server while it serves; else the least-busy server not yet tried,
        servers in cooldown only when nothing else is left."""
        now = time.monotonic()
        home = self._sessions.get(session) if session else None
        if home is not None and home not in exclude and self._down_until.get(home, 0.0) <= now:
            self._sessions.move_to_end(session)
            return home
        candidates = [url for url in self.urls if url not in exclude]
        up = [url for url in candidates if self._down_until.get(url, 0.0) <= now]
        pool = up or candidates
        if not pool:
            return None
        self._turn += 1  # rotate among equally busy servers
        order = {url: (i - self._turn) % len(self.urls) for i, url in enumerate(self.urls)}
        return min(pool, key=lambda url: (self._in_flight[url], order[url]))

    def _remember(self, session: str, url: str) -> None:
        self._sessions[session] = url
        self._sessions.move_to_end(session)
        if len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)

    async def _call(self, url: str, path: str, body: dict | None, method: str = "POST",
                    timeout_s: float | None = None) -> dict:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        timeout = {"timeout": aiohttp.ClientTimeout(total=timeout_s)} if timeout_s else {}  # else the session's
        self._in_flight[url] += 1
        try:
            async with self._session.request(method, url + path, json=body, **timeout) as response:
                reply = await _json_or_none(response)
                if response.status == 200 and reply is not None:
                    self._down_until.pop(url, None)
                    return reply
                raise _classify(url + path, response.status, reply)
        finally:
            self._in_flight[url] -= 1

    def _fail(self, url: str, error: BaseException) -> None:
        self.failures[url] += 1
        if isinstance(error, (aiohttp.ClientConnectionError, asyncio.TimeoutError)):
            self._down_until[url] = time.monotonic() + self._cooldown_s
        log.warning("rollout server %s failed (%s: %s); retrying elsewhere", url, type(error).__name__, error)


class _Retriable(RuntimeError):
    """A server answered but could not serve now (overloaded, loading, behind on weights, down)."""


async def _json_or_none(response: aiohttp.ClientResponse) -> dict | None:
    try:
        reply = await response.json(content_type=None)
    except ValueError:  # not JSON: a proxy's page, a server that died mid-reply
        return None
    return reply if isinstance(reply, dict) else None


def _classify(where: str, status: int, reply: dict[str, Any] | None) -> Exception:
    """What a non-200 reply means for the caller: retry elsewhere, or fail this request."""
    message = reply.get("error") if reply else "a reply that is not a JSON object"
    if status == 400:
        return RolloutRequestFailed("bad_request", f"{where} refused the request (400): {message}")
    if status in (401, 404):  # our own setup is wrong: no other server would differ
        return ValueError(f"{where} refused the request ({status}): {message}")
    if status == 500 and reply is not None and reply.get("kind") == "engine":
        return RolloutRequestFailed("engine_error", f"{where} failed on the request: {message}")
    return _Retriable(f"{where} answered {status}: {message}")
