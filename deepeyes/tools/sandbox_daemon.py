"""The code sandbox daemon: one per node, serving every rollout's Python notebook sessions.

    python -m deepeyes.tools.sandbox_daemon --port PORT --token-file FILE --scratch-root DIR \\
        [--max-sessions 64] [--idle-timeout-s 600] [--timeout-s 20] [--memory-mb 1024] ...

It listens on loopback only (a `deepeyes.service` app: every request needs the job's
token; `GET /ready` answers 200 once sessions can start) and speaks JSON:

    POST   /sessions           {"images": [path, ...], "out_dir": path}  → {"session": id}
    POST   /sessions/{id}/run  {"code": "..."}  → {"stdout", "stderr", "images": [path, ...], "timed_out"}
    DELETE /sessions/{id}                       → {}
    GET    /health, /ready, /stats              (/ready: 503 until sessions can start, or once the fork-server died)

Clients use `deepeyes.tools.SandboxClient`, never this wire format. A session is one
trajectory's notebook: `image_1`…`image_n` opened from the given paths (the n rollouts of a
prompt read one file, nothing is copied or encoded), variables kept across cells, returned
images written as PNG files into `out_dir`, an image store (`deepeyes.data.image_store`) where
each is named by its content hash. The sandbox never sees out_dir: the daemon copies the images
out of the session's scratch. Sessions are forked from a fork-server with the heavy modules
preloaded (`_forkserver.py`) and walled off from the host and each other by namespaces
(`_isolation.py`). Isolation that does not work on this machine stops the daemon at start-up,
unless `--isolation none` says the code is trusted.

A cell that outlives `timeout_s`, however it handles signals, is killed with its whole
process tree; so is a session idle longer than `idle_timeout_s`. A killed or crashed
kernel comes back fresh on the session's next cell, as after a Jupyter kernel restart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aiohttp import web

from deepeyes.data.image_store import ImageStore
from deepeyes.service import add_service_args, error_response, read_token, serve, service_app
from deepeyes.tools.sandbox_client import ISOLATIONS, SandboxLimits

log = logging.getLogger(__name__)

_OUTPUT_NAME = re.compile(r"cell\d+_\d+\.png")  # as the kernel names returned images
_START_TIMEOUT_S = 30.0
_EXIT_WAIT_S = 5.0  # after SIGKILL, how long the keeper may take to report the kernel's end
_MAX_IMAGE_BYTES = 64 << 20


class SandboxUnavailable(RuntimeError):
    """The daemon cannot run sessions as configured on this machine (says why and what to do)."""


@dataclass
class _Kernel:
    pid: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@dataclass
class _Session:
    id: str
    slot: int
    images: list[str]
    out_dir: Path
    scratch: Path  # the kernel sees it as /scratch
    kernel: _Kernel | None = None
    cells: int = 0  # never reset, so returned file names stay unique across kernel restarts
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SandboxDaemon:
    """Sessions on this node: their slots, kernels, deadlines and scratch directories."""

    def __init__(
        self,
        scratch_root: Path,
        limits: SandboxLimits = SandboxLimits(),
        max_sessions: int = 64,
        idle_timeout_s: float = 600.0,
        isolation: str = "namespaces",
        uid_base: int = 1_000_000,
    ):
        if isolation not in ISOLATIONS:
            raise ValueError(f"sandbox isolation must be one of {ISOLATIONS}, got {isolation!r}")
        self.scratch_root = Path(scratch_root).resolve()
        self.limits = limits
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.isolation = isolation
        # As root every session runs as its own uid, uid_base + slot: RLIMIT_NPROC then counts
        # one session's processes, and sessions cannot signal each other.
        self._uid_base = uid_base if os.geteuid() == 0 else None
        self._sessions: dict[str, _Session] = {}
        self._free_slots = list(range(max_sessions))
        self._slot_freed = asyncio.Condition()
        self._forkserver: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._reaper: asyncio.Task | None = None
        self.ready = False

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the fork-server and prove that an isolated session starts here."""
        self.scratch_root.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, "MPLBACKEND": "Agg", "MPLCONFIGDIR": str(self.scratch_root / ".matplotlib")}
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self._forkserver = subprocess.Popen(
            [sys.executable, "-m", "deepeyes.tools._forkserver", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
        )
        theirs.close()
        ours.setblocking(False)
        self._control = ours
        hello = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(ours, 1 << 16), 120)
        if not hello:
            raise SandboxUnavailable(f"the sandbox fork-server exited (code {self._forkserver.wait()}) while starting")
        await self._probe()
        self._reaper = asyncio.create_task(self._reap_idle())
        self.ready = True
        log.info(
            "sandbox ready: isolation %s, %d sessions max, scratch %s", self.isolation, self.max_sessions, self.scratch_root
        )

    async def _probe(self) -> None:
        if self.isolation == "none":
            log.warning(
                "sandbox isolation is OFF (isolation=none): code reaches the network, the host's files "
                "and other processes%s. Only for trusted code.",
                "" if self._uid_base is not None else ", and the process limit is shared by all sessions",
            )
        probe = await self.open_session([], self.scratch_root / ".probe")
        try:
            await self._ensure_kernel(probe)
        except SandboxUnavailable as error:
            raise SandboxUnavailable(
                f"{error}\nSessions cannot be isolated on this machine (user/mount/network/pid namespaces). "
                "Allow unprivileged user namespaces (sysctl user.max_user_namespaces>0; on Ubuntu "
                "kernel.apparmor_restrict_unprivileged_userns=0) or run as root; or start the daemon with "
                "--isolation none for trusted code only."
            ) from error
        finally:
            await self.close_session(probe.id)

    async def stop(self) -> None:
        self.ready = False
        if self._reaper is not None:
            self._reaper.cancel()
        for session_id in list(self._sessions):
            await self.close_session(session_id)
        if self._control is not None:
            self._control.close()
        if self._forkserver is not None:
            self._forkserver.kill()
            self._forkserver.wait()

    # ---- sessions ---------------------------------------------------------------------------

    async def open_session(self, images: list[str], out_dir: Path, wait_s: float = 600.0) -> _Session:
        """A session with image_1.. from `images`; its kernel starts with the first cell.
        Waits up to `wait_s` for a free slot when `max_sessions` are open."""
        for index, image in enumerate(images, 1):
            if not os.path.isfile(image):
                raise FileNotFoundError(f"image_{index}: no such file {image}")
        async with self._slot_freed:
            await asyncio.wait_for(self._slot_freed.wait_for(lambda: self._free_slots), wait_s)
            slot = self._free_slots.pop()
        session_id = secrets.token_hex(8)
        scratch = self.scratch_root / session_id
        session = _Session(session_id, slot, [os.path.abspath(p) for p in images], Path(out_dir), scratch)
        self._sessions[session_id] = session
        scratch.mkdir(parents=True)
        session.out_dir.mkdir(parents=True, exist_ok=True)
        if self._uid_base is not None:
            os.chown(scratch, self._uid_base + slot, self._uid_base + slot)
        return session

    async def run(self, session_id: str, code: str) -> dict:
        """Run one cell; see the module docstring for what a timeout or a dead kernel returns."""
        session = self._session(session_id)
        async with session.lock:
            self._session(session_id)  # closed while this call waited for the previous cell?
            session.last_used = time.monotonic()
            try:
                kernel = await self._ensure_kernel(session)
            except SandboxUnavailable as error:
                return _failed(f"The kernel could not start: {error}")
            session.cells += 1
            _write(kernel.writer, {"code": code, "cell": session.cells})
            try:
                reply = await asyncio.wait_for(_read(kernel.reader), self.limits.timeout_s)
            except TimeoutError:
                await self._kill(session)
                return _failed(
                    f"TimeoutError: the cell did not finish within {self.limits.timeout_s:g} s and was killed.\n"
                    "The kernel restarted: all variables are lost; image_1.. are loaded again.",
                    timed_out=True,
                )
            except (asyncio.IncompleteReadError, ConnectionError):
                reply = {"exit": None}
            finally:
                session.last_used = time.monotonic()
            if "exit" in reply:
                await self._kill(session)
                return _failed(
                    f"The kernel died ({_describe_exit(reply['exit'])}), e.g. from the memory, CPU-time or "
                    "file-size limit.\nThe kernel restarted: all variables are lost; image_1.. are loaded again."
                )
            images = [str(path) for path in self._take_images(session, reply["images"])]
            return {"stdout": reply["stdout"], "stderr": reply["stderr"], "images": images, "timed_out": False}

    async def close_session(self, session_id: str) -> None:
        """Kill the session's processes, delete its scratch, free its slot. Returned images stay."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        await self._kill(session)
        shutil.rmtree(session.scratch, ignore_errors=True)
        async with self._slot_freed:
            self._free_slots.append(session.slot)
            self._slot_freed.notify()

    def _session(self, session_id: str) -> _Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise KeyError(f"no sandbox session {session_id!r} (closed, or reaped after being idle)") from None

    async def _ensure_kernel(self, session: _Session) -> _Kernel:
        if session.kernel is None:
            session.kernel = await self._fork(session)
        return session.kernel

    async def _fork(self, session: _Session) -> _Kernel:
        """Ask the fork-server for a kernel; wait until it has loaded the images and walled off."""
        ours, theirs = socket.socketpair()
        spec = {
            "images": session.images,
            "scratch": str(session.scratch),
            "isolated": self.isolation == "namespaces",
            "uid": None if self._uid_base is None else self._uid_base + session.slot,
            "read_only": _python_environment(),
            "limits": asdict(self.limits),
        }
        try:
            socket.send_fds(self._control, [json.dumps(spec).encode()], [theirs.fileno()])
        except OSError as error:
            raise SandboxUnavailable(f"the fork-server is gone ({error})") from error
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=1 << 24)
        kernel = None
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                hello = await _read(reader)
                if "pid" in hello:
                    kernel = _Kernel(hello["pid"], reader, writer)
                    hello = await _read(reader)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as error:
            hello = {"error": f"no answer from the new kernel ({type(error).__name__})"}
        if "ready" in hello:
            return kernel
        session.kernel = kernel
        await self._kill(session)
        writer.close()
        raise SandboxUnavailable(hello.get("error") or f"the kernel died while starting ({_describe_exit(hello.get('exit'))})")

    async def _kill(self, session: _Session) -> None:
        """SIGKILL the kernel's process group (its pid namespace dies with it) and wait for the
        keeper to report it gone; the next cell forks a fresh kernel."""
        kernel, session.kernel = session.kernel, None
        if kernel is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(kernel.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError):
            async with asyncio.timeout(_EXIT_WAIT_S):
                while "exit" not in await _read(kernel.reader):
                    pass
        kernel.writer.close()

    def _take_images(self, session: _Session, names: list[str]) -> list[Path]:
        """Copy the images a cell returned out of the sandbox's reach, into out_dir: an image
        store (`deepeyes.data.image_store`), so an image returned by many sessions is one file.

        Opened without following links and checked on the open file, so a process left running
        in the sandbox cannot swap a returned image for a link to a host file. Anything but a
        plain PNG-named file of sane size that decodes as an image is skipped.
        """
        paths = []
        for name in names:
            if not _OUTPUT_NAME.fullmatch(name):
                continue
            source = session.scratch / name
            try:
                fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            with open(fd, "rb") as image:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_IMAGE_BYTES:
                    continue
                data = image.read()
            source.unlink(missing_ok=True)
            try:
                paths.append(ImageStore(session.out_dir).put(data))
            except ValueError as error:
                log.warning("session %s: returned image %s skipped: %s", session.id, name, error)
        return paths

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.idle_timeout_s / 4))
            now = time.monotonic()
            for session in list(self._sessions.values()):
                if not session.lock.locked() and now - session.last_used > self.idle_timeout_s:
                    log.info("closing sandbox session %s: idle for %.0f s", session.id, now - session.last_used)
                    await self.close_session(session.id)

    def forkserver_alive(self) -> bool:
        return self._forkserver is not None and self._forkserver.poll() is None

    def stats(self) -> dict:
        return {
            "sessions": len(self._sessions), "max_sessions": self.max_sessions, "isolation": self.isolation,
            "pid": os.getpid(), "forkserver_pid": self._forkserver.pid if self._forkserver else None,
        }


def _failed(stderr: str, timed_out: bool = False) -> dict:
    return {"stdout": "", "stderr": stderr, "images": [], "timed_out": timed_out, "failed": True}


def _python_environment() -> list[str]:
    """The host directories a session sees read-only: /usr and the Python installation."""
    roots = ["/usr"]
    for prefix in sorted({sys.base_prefix, sys.prefix, sys.exec_prefix}):
        prefix = os.path.realpath(prefix)
        if not any(prefix == root or prefix.startswith(root + "/") for root in roots):
            roots.append(prefix)
    return roots


def _write(writer: asyncio.StreamWriter, message: dict) -> None:
    data = json.dumps(message).encode()
    writer.write(struct.pack(">I", len(data)) + data)


async def _read(reader: asyncio.StreamReader) -> dict:
    (size,) = struct.unpack(">I", await reader.readexactly(4))
    return json.loads(await reader.readexactly(size))


def _describe_exit(code: int | None) -> str:
    """A waitstatus_to_exitcode value in words: -N is death by signal N."""
    if code is None:
        return "connection lost"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


# ---- HTTP ------------------------------------------------------------------------------------


def sandbox_app(daemon: SandboxDaemon, token: str) -> web.Application:
    app = service_app(token, ready=lambda: daemon.ready and daemon.forkserver_alive())

    async def open_session(request: web.Request) -> web.Response:
        body = await request.json()
        try:
            session = await daemon.open_session([str(p) for p in body.get("images", [])], Path(body["out_dir"]))
        except (FileNotFoundError, KeyError) as error:
            return error_response(400, str(error))
        except TimeoutError:
            return error_response(503, f"all {daemon.max_sessions} sandbox sessions are busy")
        return web.json_response({"session": session.id})

    async def run(request: web.Request) -> web.Response:
        body = await request.json()
        try:
            return web.json_response(await daemon.run(request.match_info["id"], body["code"]))
        except KeyError as error:
            return error_response(404, str(error.args[0]))

    async def close(request: web.Request) -> web.Response:
        await daemon.close_session(request.match_info["id"])
        return web.json_response({})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(daemon.stats())

    app.router.add_post("/sessions", open_session)
    app.router.add_post("/sessions/{id}/run", run)
    app.router.add_delete("/sessions/{id}", close)
    app.router.add_get("/stats", stats)
    app.on_startup.append(lambda app: daemon.start())
    app.on_cleanup.append(lambda app: daemon.stop())
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_service_args(parser)
    parser.add_argument("--scratch-root", type=Path, required=True, help="node-local directory for session scratch")
    parser.add_argument("--max-sessions", type=int, default=64)
    parser.add_argument("--idle-timeout-s", type=float, default=600.0)
    parser.add_argument("--isolation", choices=ISOLATIONS, default="namespaces")
    for name, value in asdict(SandboxLimits()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    limits = SandboxLimits(**{name: getattr(args, name) for name in asdict(SandboxLimits())})
    daemon = SandboxDaemon(args.scratch_root, limits, args.max_sessions, args.idle_timeout_s, args.isolation)
    try:
        serve(sandbox_app(daemon, read_token(args.token_file)), args)
    except SandboxUnavailable as error:
        log.error("%s", error)
        sys.exit(2)


if __name__ == "__main__":
    main()
