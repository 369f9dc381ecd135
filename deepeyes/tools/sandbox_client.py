"""The client side of the code sandbox: what a rollout uses to run a trajectory's cells.

    with LocalSandbox(directory) as sandbox:              # or SandboxClient(url, token) for a
        session = sandbox.session([image], out_dir)       # daemon the launcher started
        result = await session.run("image_1.crop((0, 0, 64, 64))")
        await session.close()

A session is created on its first cell and lives until `close()`. Problems of the cell (an
exception, a timeout, a dead kernel) come back in the result; problems of the service (the
daemon unreachable, the wrong token, the session reaped) raise SandboxError.

On a cluster every node runs a daemon; `SandboxPool` spreads a job's sessions over all of them
(`connect_sandbox` builds one from `tools.code.urls`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import aiohttp

from deepeyes.config import CodeToolConfig
from deepeyes.service import LocalService, auth_headers, free_port, new_token_file, python_module, read_token

log = logging.getLogger(__name__)

ISOLATIONS = ("namespaces", "none")


@dataclass(frozen=True)
class SandboxLimits:
    """What one session may use. cpu_s is CPU time over a kernel's life, a backstop behind timeout_s."""

    timeout_s: float = 30.0  # wall clock per cell; the whole session process tree is killed past it
    # Memory of the whole session (its cgroup: every process, tmpfs and memfd page) and the
    # address space of each of its processes (RLIMIT_AS); /tmp is a tmpfs of the same size.
    memory_mb: int = 1024
    max_processes: int = 64  # processes and threads of the session (cgroup pids.max, RLIMIT_NPROC)
    cpus: float = 1.0  # CPU share of the whole session (cgroup CPU quota)
    scratch_mb: int = 256  # /scratch, a tmpfs of the session's own
    max_file_mb: int = 16  # largest file a cell may write (RLIMIT_FSIZE)
    max_open_files: int = 256
    cpu_s: int = 60
    max_image_pixels: int = 4096 * 4096  # a returned image with more is refused, before it is decoded


@dataclass(frozen=True)
class CodeResult:
    """One cell's outcome; `images` are PNG files in the session's out_dir (an image store: each
    named by its content hash), in display order.
    `failed`: the cell did not complete (timed out, or the kernel died) and the kernel restarted."""

    stdout: str
    stderr: str
    images: tuple[Path, ...]
    timed_out: bool = False
    failed: bool = False


class SandboxError(RuntimeError):
    """The sandbox service could not run the cell (unreachable, refused, session gone)."""


class SandboxUnreachable(SandboxError):
    """The daemon did not answer at all (dead, or its node is gone)."""


class SandboxClient:
    """The node's sandbox daemon, as seen by this process (which counts its sessions there)."""

    def __init__(self, url: str, token: str):
        self.url = url.rstrip("/")
        self.token = token
        self.open = 0  # this process's sessions on the daemon now
        self.started = 0
        self.lost = 0  # sessions that died with the daemon
        self.down_until = 0.0  # found unreachable: no new session before this (monotonic) time

    def session(self, images: Sequence[Path], out_dir: Path) -> SandboxSession:
        """A notebook with image_1..image_n opened from `images`; returned images land in out_dir."""
        return SandboxSession(lambda: self, [str(Path(image).resolve()) for image in images], Path(out_dir).resolve())

    def close(self) -> None:
        """Nothing to release: the daemon belongs to whoever started it (see LocalSandbox)."""

    async def request(self, method: str, path: str, body: dict | None = None) -> dict:
        # A connection per request: a session then works from any event loop (a trainer runs
        # one per step), at a fraction of a millisecond per cell on loopback.
        url = self.url + path
        try:
            async with aiohttp.ClientSession(headers=auth_headers(self.token)) as http:
                async with http.request(method, url, json=body) as response:
                    reply = await response.json(content_type=None)
        except aiohttp.ClientConnectionError as error:
            raise SandboxUnreachable(f"sandbox daemon at {self.url} unreachable: {error!r}") from error
        except (aiohttp.ClientError, ValueError) as error:
            raise SandboxError(f"sandbox daemon at {self.url} broken: {error!r}") from error
        if response.status != 200:
            raise SandboxError(f"sandbox daemon at {self.url} refused {method} {path} ({response.status}): {reply.get('error')}")
        return reply


class SandboxSession:
    """One trajectory's notebook. Its daemon is chosen when the session starts (`pick`) and
    kept until it ends; after a daemon died, the next cell starts a fresh session elsewhere."""

    def __init__(self, pick: Callable[[], SandboxClient], images: list[str], out_dir: Path):
        self._pick = pick
        self._images = images
        self._out_dir = out_dir
        self._daemon: SandboxClient | None = None
        self._id: str | None = None

    async def run(self, code: str) -> CodeResult:
        """Run one cell; variables persist into the next unless this one fails."""
        if self._id is None:
            daemon = self._pick()
            daemon.open += 1  # counted before the answer, so sessions started together spread
            try:
                reply = await daemon.request("POST", "/sessions", {"images": self._images, "out_dir": str(self._out_dir)})
            except BaseException as error:
                daemon.open -= 1
                if isinstance(error, SandboxUnreachable):
                    daemon.down_until = time.monotonic() + _RETRY_DEAD_S
                raise
            daemon.started += 1
            self._daemon, self._id = daemon, reply["session"]
        try:
            reply = await self._daemon.request("POST", f"/sessions/{self._id}/run", {"code": code})
        except SandboxUnreachable:
            self._lost()
            raise
        except BaseException:
            await self.close()  # a cell cut off midway leaves the kernel out of step: start over
            raise
        return CodeResult(
            reply["stdout"], reply["stderr"], tuple(map(Path, reply["images"])), reply["timed_out"], reply.get("failed", False)
        )

    async def close(self) -> None:
        """End the session: its processes are killed, its scratch deleted; returned images stay."""
        daemon, session_id, self._id = self._daemon, self._id, None
        if session_id is not None:
            daemon.open -= 1
            with contextlib.suppress(SandboxError):
                await daemon.request("DELETE", f"/sessions/{session_id}")

    def _lost(self) -> None:
        daemon, self._id = self._daemon, None
        daemon.open -= 1
        daemon.lost += 1
        daemon.down_until = time.monotonic() + _RETRY_DEAD_S
        log.warning("sandbox daemon %s is unreachable: a session on it is lost (%d so far)", daemon.url, daemon.lost)


_RETRY_DEAD_S = 30.0  # a daemon found unreachable gets no new session for this long


class SandboxPool:
    """The sandbox daemons of every node of the allocation, as one sandbox.

    A new session goes to the daemon with the fewest of this process's sessions open, among
    those below their cap (`max_sessions` per node) and not found unreachable lately; when all
    are full, to the least loaded one, which queues it. A session stays on its daemon until it
    ends. A daemon that dies takes only its own sessions with it: each is counted (`lost`).
    """

    def __init__(self, urls: Sequence[str], token: str, max_sessions: int):
        if not urls:
            raise ValueError("a sandbox pool needs at least one daemon URL")
        self.daemons = [SandboxClient(url, token) for url in urls]
        self.max_sessions = max_sessions

    def session(self, images: Sequence[Path], out_dir: Path) -> SandboxSession:
        return SandboxSession(self._pick, [str(Path(image).resolve()) for image in images], Path(out_dir).resolve())

    @property
    def lost(self) -> int:
        return sum(daemon.lost for daemon in self.daemons)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per daemon URL: this process's sessions open, started and lost there."""
        return {d.url: {"open": d.open, "started": d.started, "lost": d.lost} for d in self.daemons}

    def close(self) -> None:
        """Nothing to release: the daemons belong to the node agents."""

    def _pick(self) -> SandboxClient:
        now = time.monotonic()
        alive = [d for d in self.daemons if d.down_until <= now] or self.daemons
        below_cap = [d for d in alive if d.open < self.max_sessions] or alive
        return min(below_cap, key=lambda d: d.open)


class LocalSandbox(SandboxClient):
    """A sandbox daemon this process starts and stops: what a job without a launcher uses.

    Sessions read images under `store_root` (default: `directory`'s parent, the job's run
    directory) or `image_roots`, and write returned images only under `store_root`. The daemon
    starts from an allowlisted environment: none of this process's secrets reach it. Stop it
    with `close()` or a `with` block; should this process die first, the daemon gets SIGTERM
    with it (see `deepeyes.service.LocalService`).
    """

    def __init__(
        self,
        directory: Path,
        limits: SandboxLimits = SandboxLimits(),
        max_sessions: int = 64,
        idle_timeout_s: float = 600.0,
        isolation: str = "namespaces",
        store_root: Path | None = None,
        image_roots: Sequence[Path] = (),
    ):
        directory = Path(directory)
        port = free_port()
        token_file = new_token_file(directory)
        command = daemon_command(
            port, token_file, directory / "sessions", limits, max_sessions, idle_timeout_s, isolation,
            store_root=store_root or directory.resolve().parent, image_roots=image_roots,
        )
        self._service = LocalService(
            "sandbox", command, port, read_token(token_file), directory / "sandbox.log", clean_environment=True
        )
        self._service.start()
        try:
            self._service.wait_ready(120)
        except BaseException:
            self._service.stop()
            raise
        super().__init__(self._service.url, self._service.token)
        atexit.register(self.close)  # for owners that never call close()

    def close(self) -> None:
        self._service.stop()

    def __enter__(self) -> LocalSandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sandbox_limits(cfg: CodeToolConfig) -> SandboxLimits:
    """The session limits a job's `tools.code` config sets."""
    return SandboxLimits(
        timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb, max_processes=cfg.max_processes, cpus=cfg.cpus,
        scratch_mb=cfg.scratch_mb, cpu_s=cfg.cpu_s,
    )


def connect_sandbox(cfg: CodeToolConfig, directory: Path) -> SandboxClient | SandboxPool:
    """The sandbox a job's config names: the daemons at `cfg.urls` (one per node, started by
    the launcher), or else a daemon of this process's own in `directory`."""
    if cfg.urls:
        if not cfg.token_file:
            raise ValueError("tools.code.urls is set but tools.code.token_file is not: the daemons need the job's token")
        return SandboxPool(cfg.urls, read_token(cfg.token_file), cfg.max_sessions)
    return LocalSandbox(directory, sandbox_limits(cfg), cfg.max_sessions, cfg.idle_timeout_s, cfg.isolation)


def daemon_command(
    port: int,
    token_file: Path,
    scratch_root: Path,
    limits: SandboxLimits = SandboxLimits(),
    max_sessions: int = 64,
    idle_timeout_s: float = 600.0,
    isolation: str = "namespaces",
    *,
    store_root: Path,
    image_roots: Sequence[Path] = (),
    host: str | None = None,
) -> list[str]:
    """The command line that starts a sandbox daemon (one per node). `store_root`: where it may
    write returned images (and read inputs, beside `image_roots`); `host`: the address to bind
    (default loopback)."""
    args = ["--port", port, "--token-file", token_file, "--scratch-root", scratch_root, "--store-root", store_root]
    args += ["--max-sessions", max_sessions, "--idle-timeout-s", idle_timeout_s, "--isolation", isolation]
    for root in image_roots:
        args += ["--image-root", root]
    if host is not None:
        args += ["--host", host]
    for name, value in asdict(limits).items():
        args += [f"--{name.replace('_', '-')}", value]
    return python_module("deepeyes.tools.sandbox_daemon", *args)
