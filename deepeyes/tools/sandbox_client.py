"""The client side of the code sandbox: what a rollout uses to run a trajectory's cells.

    with LocalSandbox(directory) as sandbox:              # or SandboxClient(url, token) for a
        session = sandbox.session([image], out_dir)       # daemon the launcher started
        result = await session.run("image_1.crop((0, 0, 64, 64))")
        await session.close()

A session is created on its first cell and lives until `close()`. Problems of the cell (an
exception, a timeout, a dead kernel) come back in the result; problems of the service (the
daemon unreachable, the wrong token, the session reaped) raise SandboxError.
"""

from __future__ import annotations

import atexit
import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import aiohttp

from deepeyes.config import CodeToolConfig
from deepeyes.service import LocalService, auth_headers, free_port, new_token_file, python_module, read_token

ISOLATIONS = ("namespaces", "none")


@dataclass(frozen=True)
class SandboxLimits:
    """What one session may use. cpu_s is CPU time over a kernel's life, a backstop behind timeout_s."""

    timeout_s: float = 30.0  # wall clock per cell; the whole session process tree is killed past it
    memory_mb: int = 1024  # address space per process (RLIMIT_AS); /tmp is capped at the same size
    max_processes: int = 64  # processes and threads of the session (RLIMIT_NPROC)
    max_file_mb: int = 16  # largest file a cell may write (RLIMIT_FSIZE)
    max_open_files: int = 256
    cpu_s: int = 60


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


class SandboxClient:
    """The node's sandbox daemon, as seen by this process."""

    def __init__(self, url: str, token: str):
        self.url = url.rstrip("/")
        self.token = token

    def session(self, images: Sequence[Path], out_dir: Path) -> SandboxSession:
        """A notebook with image_1..image_n opened from `images`; returned images land in out_dir."""
        return SandboxSession(self, [str(Path(image).resolve()) for image in images], Path(out_dir).resolve())

    def close(self) -> None:
        """Nothing to release: the daemon belongs to whoever started it (see LocalSandbox)."""


class SandboxSession:
    def __init__(self, client: SandboxClient, images: list[str], out_dir: Path):
        self._client = client
        self._images = images
        self._out_dir = out_dir
        self._id: str | None = None

    async def run(self, code: str) -> CodeResult:
        """Run one cell; variables persist into the next unless this one fails."""
        if self._id is None:
            reply = await self._request("POST", "/sessions", {"images": self._images, "out_dir": str(self._out_dir)})
            self._id = reply["session"]
        try:
            reply = await self._request("POST", f"/sessions/{self._id}/run", {"code": code})
        except BaseException:
            await self.close()  # a cell cut off midway leaves the kernel out of step: start over
            raise
        return CodeResult(
            reply["stdout"], reply["stderr"], tuple(map(Path, reply["images"])), reply["timed_out"], reply.get("failed", False)
        )

    async def close(self) -> None:
        """End the session: its processes are killed, its scratch deleted; returned images stay."""
        session_id, self._id = self._id, None
        if session_id is not None:
            with contextlib.suppress(SandboxError):
                await self._request("DELETE", f"/sessions/{session_id}")

    async def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        # A connection per request: a session then works from any event loop (a trainer runs
        # one per step), at a fraction of a millisecond per cell on loopback.
        url = self._client.url + path
        try:
            async with aiohttp.ClientSession(headers=auth_headers(self._client.token)) as http:
                async with http.request(method, url, json=body) as response:
                    reply = await response.json(content_type=None)
        except (aiohttp.ClientError, ValueError) as error:
            raise SandboxError(f"sandbox daemon at {self._client.url} unreachable or broken: {error!r}") from error
        if response.status != 200:
            raise SandboxError(f"sandbox daemon refused {method} {path} ({response.status}): {reply.get('error')}")
        return reply


class LocalSandbox(SandboxClient):
    """A sandbox daemon this process starts and stops: what a job without a launcher uses.

    Stop it with `close()` or a `with` block; should this process die first, the daemon gets
    SIGTERM with it (see `deepeyes.service.LocalService`).
    """

    def __init__(
        self,
        directory: Path,
        limits: SandboxLimits = SandboxLimits(),
        max_sessions: int = 64,
        idle_timeout_s: float = 600.0,
        isolation: str = "namespaces",
    ):
        directory = Path(directory)
        port = free_port()
        token_file = new_token_file(directory)
        command = daemon_command(port, token_file, directory / "sessions", limits, max_sessions, idle_timeout_s, isolation)
        self._service = LocalService("sandbox", command, port, read_token(token_file), directory / "sandbox.log")
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


def connect_sandbox(cfg: CodeToolConfig, directory: Path) -> SandboxClient:
    """The sandbox a job's config names: the node's daemon at `cfg.url` (started by the
    launcher), or else a daemon of this process's own in `directory`."""
    if cfg.url:
        if not cfg.token_file:
            raise ValueError("tools.code.url is set but tools.code.token_file is not: the daemon needs the job's token")
        return SandboxClient(cfg.url, read_token(cfg.token_file))
    limits = SandboxLimits(timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb, max_processes=cfg.max_processes, cpu_s=cfg.cpu_s)
    return LocalSandbox(directory, limits, cfg.max_sessions, cfg.idle_timeout_s, cfg.isolation)


def daemon_command(
    port: int,
    token_file: Path,
    scratch_root: Path,
    limits: SandboxLimits = SandboxLimits(),
    max_sessions: int = 64,
    idle_timeout_s: float = 600.0,
    isolation: str = "namespaces",
) -> list[str]:
    """The command line that starts a sandbox daemon (one per node)."""
    args = ["--port", port, "--token-file", token_file, "--scratch-root", scratch_root]
    args += ["--max-sessions", max_sessions, "--idle-timeout-s", idle_timeout_s, "--isolation", isolation]
    for name, value in asdict(limits).items():
        args += [f"--{name.replace('_', '-')}", value]
    return python_module("deepeyes.tools.sandbox_daemon", *args)
