"""The client side of the code sandbox: what a rollout uses to run a trajectory's cells.

    with local_sandbox(scratch_root) as sandbox:          # or SandboxClient(url, token) for a
        session = sandbox.session([image], out_dir)       # daemon the launcher started
        result = await session.run("image_1.crop((0, 0, 64, 64))")
        await session.close()

A session is created on its first cell and lives until `close()`. Problems of the cell (an
exception, a timeout, a dead kernel) come back in the result; problems of the service (the
daemon unreachable, the wrong token, the session reaped) raise SandboxError.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import aiohttp

from deepeyes.launch.service import LocalService, auth_headers, free_port, local_services, new_token_file, python_module

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
    """One cell's outcome; `images` are PNG files in the session's out_dir, in display order.
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


@contextlib.contextmanager
def local_sandbox(
    scratch_root: Path,
    limits: SandboxLimits = SandboxLimits(),
    max_sessions: int = 64,
    idle_timeout_s: float = 600.0,
    isolation: str = "namespaces",
) -> Iterator[SandboxClient]:
    """A sandbox daemon on this machine for the length of the block (what a job without a
    launcher runs; on Slurm the launcher starts one per node with `daemon_command`)."""
    scratch_root = Path(scratch_root)
    port = free_port()
    token_file = new_token_file(scratch_root)
    command = daemon_command(port, token_file, scratch_root / "sessions", limits, max_sessions, idle_timeout_s, isolation)
    service = LocalService("sandbox", command, port, token_file.read_text(), scratch_root / "sandbox.log")
    with local_services([service], ready_timeout_s=120):
        yield SandboxClient(service.url, service.token)


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
