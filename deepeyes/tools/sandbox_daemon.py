"""The code sandbox daemon: one per node, serving every rollout's Python notebook sessions.

    python -m deepeyes.tools.sandbox_daemon --port PORT --token-file FILE --scratch-root DIR \\
        --store-root DIR [--image-root DIR ...] [--max-sessions 64] [--idle-timeout-s 600] ...

It listens on loopback unless `--host` says otherwise (a `deepeyes.service` app: every request
needs the job's token) and speaks JSON:

    POST   /sessions           {"images": [path, ...], "out_dir": path}  → {"session": id}
    POST   /sessions/{id}/run  {"code": "..."}  → {"stdout", "stderr", "images": [path, ...], "timed_out"}
    DELETE /sessions/{id}                       → {}
    GET    /health, /ready, /stats   (/ready: 503 until sessions can start, once the fork-server
                                      died, or while every session slot is taken: "saturated")

Clients use `deepeyes.tools.SandboxClient`, never this wire format. A session is one
trajectory's notebook: `image_1`…`image_n` opened by the daemon from the given paths (which
must lie under `--store-root` or an `--image-root`), variables kept across cells, returned
images written as PNG files into `out_dir` (under `--store-root`), an image store
(`deepeyes.data.image_store`) where each is named by its content hash. Sessions are forked
from a fork-server with the heavy modules preloaded (`_forkserver.py`), walled off from the host
and each other by namespaces (`_isolation.py`) and bounded as a whole by a cgroup each
(`_cgroup.py`). Isolation that does not work on this machine stops the daemon at start-up,
unless `--isolation none` says the code is trusted.

Nothing a session sends is trusted: the daemon reads at most `MAX_FRAME` bytes per reply (a
kernel that announces more, or breaks the protocol, is killed), cuts each output stream to
`MAX_OUTPUT_CHARS` itself and says how much it dropped, kills any process a cell left running,
and checks every returned image (format, size, aspect ratio, pixels) before it is stored.

A cell that outlives `timeout_s`, however it handles signals, is killed with its whole
process tree; so is a session idle longer than `idle_timeout_s`. A killed or crashed
kernel comes back fresh on the session's next cell, as after a Jupyter kernel restart.

The daemon never holds a secret: started with anything beyond `safe_environment()`, it re-runs
itself without it before doing anything. It keeps root (where it has it) for what needs it
(namespaces, cgroups, reading the sessions' scratch, killing), and touches the job's files
(input images, the store) with the file-system identity of the store root's owner.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import io
import json
import logging
import math
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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aiohttp import web
from PIL import Image

from deepeyes.data.image_store import ImageStore
from deepeyes.service import add_service_args, error_response, read_token, safe_environment, serve, service_app
from deepeyes.tools._cgroup import CgroupError, CgroupTree, SessionCgroup, SessionLimits
from deepeyes.tools._forkserver import MAX_SESSION_IMAGES
from deepeyes.tools._kernel import MAX_IMAGES, MAX_OUTPUT_CHARS
from deepeyes.tools.sandbox_client import ISOLATIONS, SandboxLimits

log = logging.getLogger(__name__)

_OUTPUT_NAME = re.compile(r"cell\d+_\d+\.png")  # as the kernel names returned images
_START_TIMEOUT_S = 30.0
_EXIT_WAIT_S = 5.0  # after SIGKILL, how long the keeper may take to report the kernel's end
_MAX_IMAGE_BYTES = 32 << 20  # a returned image file
# The largest reply frame: two streams of MAX_OUTPUT_CHARS (plus the kernel's truncation note),
# each character at most 12 bytes of JSON (an escaped surrogate pair), and the image names.
MAX_FRAME = 2 * (MAX_OUTPUT_CHARS + 200) * 12 + 4096
MIN_SIDE = 28  # returned images are at least this many pixels on each side ...
MAX_ASPECT = 200  # ... and at most this elongated (Qwen2.5-VL's processor refuses more)
_MODEL_MODES = {"L", "RGB", "RGBA"}  # PNG modes stored as they are; others are converted


class SandboxUnavailable(RuntimeError):
    """The daemon cannot run sessions as configured on this machine (says why and what to do)."""


class SessionRefused(ValueError):
    """A session request the daemon will not serve (a 400; the message says why)."""


class _ProtocolError(Exception):
    """The kernel sent something other than the replies it owes (the session is ended)."""


@dataclass
class _Kernel:
    pid: int  # as the daemon sees it
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@dataclass
class _Session:
    id: str
    slot: int
    images: list[str]  # resolved paths, checked against the roots
    out_dir: Path
    scratch: Path  # isolation none only: the host directory the kernel works in
    cgroup: SessionCgroup | None = None
    kernel: _Kernel | None = None
    starting: asyncio.Task | None = None  # the kernel's start, begun when the session opens
    cells: int = 0  # never reset, so returned file names stay unique across kernel restarts
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SandboxDaemon:
    """Sessions on this node: their slots, kernels, cgroups, deadlines and scratch."""

    def __init__(
        self,
        scratch_root: Path,
        store_root: Path,
        limits: SandboxLimits = SandboxLimits(),
        max_sessions: int = 64,
        idle_timeout_s: float = 600.0,
        isolation: str = "namespaces",
        image_roots: tuple[Path, ...] = (),
        uid_base: int = 1_000_000,
    ):
        if isolation not in ISOLATIONS:
            raise ValueError(f"sandbox isolation must be one of {ISOLATIONS}, got {isolation!r}")
        self.scratch_root = Path(scratch_root).resolve()
        self.store_root = Path(store_root).resolve()
        self.image_roots = (self.store_root, *(Path(root).resolve() for root in image_roots))
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
        self._cgroups: CgroupTree | None = None
        self._read_only = _python_environment()
        # The job's files (as the store root's owner) and returned images: two at a time, which
        # bounds the memory that decoding them takes.
        self._files: ThreadPoolExecutor | None = None
        self._warmer = ThreadPoolExecutor(1, "sandbox-cgroup-warm")  # see CgroupTree.warm
        self.counts: Counter[str] = Counter()
        self.ready = False

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the fork-server and prove that an isolated session starts here."""
        self.scratch_root.mkdir(parents=True, exist_ok=True)
        self.store_root.mkdir(parents=True, exist_ok=True)
        owner = os.stat(self.store_root)
        self._files = ThreadPoolExecutor(2, "sandbox-files", initializer=_act_on_files_as, initargs=(owner.st_uid, owner.st_gid))
        try:
            self._cgroups = CgroupTree.create("deepeyes-sandbox")
        except CgroupError as error:
            log.warning(
                "no cgroup for sandbox sessions (%s): memory is bounded per process (RLIMIT_AS %d MB) and by "
                "the /scratch and /tmp tmpfs sizes, processes by RLIMIT_NPROC%s, CPU by RLIMIT_CPU; a session "
                "with many processes can use more", error, self.limits.memory_mb,
                " (a uid per session)" if self._uid_base is not None else " (shared by all sessions: not root)",
            )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = safe_environment() | {"MPLBACKEND": "Agg", "MPLCONFIGDIR": str(self.scratch_root / ".matplotlib")}
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
            "sandbox ready: isolation %s, %d sessions max, %s, store %s", self.isolation, self.max_sessions,
            self._cgroups.describe() if self._cgroups else "no cgroups", self.store_root,
        )

    async def _probe(self) -> None:
        if self.isolation == "none":
            log.warning(
                "sandbox isolation is OFF (isolation=none): code reaches the network, the host's files "
                "and other processes%s. Only for trusted code.",
                "" if self._uid_base is not None else ", and the process limit is shared by all sessions",
            )
        probe = await self.open_session([], str(self.store_root))
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
        log.info("sandbox daemon stopping: %s", dict(self.counts))
        if self._reaper is not None:
            self._reaper.cancel()
        for session_id in list(self._sessions):
            await self.close_session(session_id)
        if self._control is not None:
            self._control.close()
        if self._forkserver is not None:
            self._forkserver.kill()
            self._forkserver.wait()
        if self._cgroups is not None:
            self._cgroups.remove()
        if self._files is not None:
            self._files.shutdown()
        self._warmer.shutdown()

    # ---- sessions ---------------------------------------------------------------------------

    async def open_session(self, images: list[str], out_dir: str | Path, wait_s: float = 600.0) -> _Session:
        """A session with image_1.. from `images`; its kernel starts now, in the background,
        while the client sends the first cell (a start that fails is retried, and reported, by
        that cell). Everything is checked before a slot is taken (SessionRefused says what is
        wrong), and a failure after that frees what was taken. Waits up to `wait_s` for a free slot."""
        if len(images) > MAX_SESSION_IMAGES:
            raise SessionRefused(f"{len(images)} images: a session takes at most {MAX_SESSION_IMAGES}")
        loop = asyncio.get_running_loop()
        out = _under(out_dir, (self.store_root,), "out_dir")
        paths = [_under(image, self.image_roots, f"image_{index}") for index, image in enumerate(images, 1)]
        await loop.run_in_executor(self._files, _check_session_files, paths, out)
        async with self._slot_freed:
            await asyncio.wait_for(self._slot_freed.wait_for(lambda: self._free_slots), wait_s)
            slot = self._free_slots.pop()
        session_id = secrets.token_hex(8)
        session = _Session(session_id, slot, [str(path) for path in paths], out, self.scratch_root / session_id)
        try:
            if self._cgroups is not None:
                limits = SessionLimits(self.limits.memory_mb << 20, self.limits.max_processes, self.limits.cpus)
                session.cgroup = self._cgroups.session(session_id, limits)
            if self.isolation == "none":  # isolated kernels get a tmpfs of their own instead
                session.scratch.mkdir(parents=True)
                if self._uid_base is not None:
                    os.chown(session.scratch, self._uid_base + slot, self._uid_base + slot)
        except BaseException:
            await self._release(session)
            raise
        self._sessions[session_id] = session
        self.counts["sessions_opened"] += self.ready  # not the start-up probe
        if self._cgroups is not None:
            self._cgroups.weigh(len(self._sessions))
        if self.ready:
            if self._cgroups is not None:  # after the cgroup is made: the warming holds cgroup_mutex
                loop.run_in_executor(self._warmer, self._cgroups.warm)  # not awaited: it only saves time
            session.starting = asyncio.create_task(self._start_kernel(session))
        return session

    async def _start_kernel(self, session: _Session) -> None:
        async with session.lock:
            with contextlib.suppress(SandboxUnavailable):
                await self._ensure_kernel(session)

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
            self.counts["cells"] += 1
            _write(kernel.writer, {"code": code, "cell": session.cells})
            try:
                reply = await asyncio.wait_for(_read(kernel.reader), self.limits.timeout_s)
                _check_reply(reply, session.cells)
            except TimeoutError:
                await self._kill(session)
                return _failed(
                    f"TimeoutError: the cell did not finish within {self.limits.timeout_s:g} s and was killed.\n"
                    f"{_RESTARTED}",
                    timed_out=True,
                )
            except _ProtocolError as error:
                self.counts["protocol_violations"] += 1
                log.warning("session %s: %s; its kernel is killed", session.id, error)
                await self._kill(session)
                return _failed(f"{error}: dropped, and the kernel was killed.\n{_RESTARTED}")
            except (asyncio.IncompleteReadError, ConnectionError):
                reply = {"exit": None}
            finally:
                session.last_used = time.monotonic()
            if "exit" in reply:
                await self._kill(session)
                return _failed(
                    f"The kernel died ({_describe_exit(reply['exit'])}), e.g. from the memory, CPU-time or "
                    f"file-size limit.\n{_RESTARTED}"
                )
            notes = []
            leftover = self._kill_leftovers(session)
            if leftover:
                self.counts["leftover_processes_killed"] += leftover
                notes.append(f"[{leftover} background process(es) the cell left running were killed]")
            stdout, stderr = (self._bounded(reply[stream]) for stream in ("stdout", "stderr"))
            images, image_notes = await self._take_images(session, reply["images"])
            notes += image_notes
            if notes:
                stderr += ("\n" if stderr and not stderr.endswith("\n") else "") + "\n".join(notes) + "\n"
            return {"stdout": stdout, "stderr": stderr, "images": [str(p) for p in images], "timed_out": False}

    async def close_session(self, session_id: str) -> None:
        """Kill the session's processes, remove its cgroup and scratch, free its slot. Returned images stay."""
        session = self._sessions.pop(session_id, None)
        if session is not None:
            if session.starting is not None:
                await asyncio.wait([session.starting])  # then its kernel, if it started, is killed below
            await self._release(session)
            if self._cgroups is not None:
                self._cgroups.weigh(len(self._sessions))

    async def _release(self, session: _Session) -> None:
        await self._kill(session)
        if session.cgroup is not None:
            session.cgroup.remove()
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
        image_fds = []
        if session.images:  # a thread hop only where there is a file to open
            try:
                image_fds = await asyncio.get_running_loop().run_in_executor(self._files, _open_images, session.images)
            except OSError as error:
                raise SandboxUnavailable(f"cannot open the session's images: {error}") from None
        ours, theirs = socket.socketpair()
        spec = {
            "scratch": str(session.scratch),
            "isolated": self.isolation == "namespaces",
            "uid": None if self._uid_base is None else self._uid_base + session.slot,
            "cgroup": session.cgroup.procs_files if session.cgroup is not None else [],
            "read_only": self._read_only,
            "limits": asdict(self.limits),
        }
        try:
            socket.send_fds(self._control, [json.dumps(spec).encode()], [theirs.fileno(), *image_fds])
        except OSError as error:
            raise SandboxUnavailable(f"the fork-server is gone ({error})") from error
        finally:
            theirs.close()
            for fd in image_fds:
                os.close(fd)
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=MAX_FRAME)
        kernel = None
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                hello = await _read(reader)
                if "pid" in hello:
                    kernel = _Kernel(hello["pid"], reader, writer)
                    hello = await _read(reader)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, _ProtocolError) as error:
            hello = {"error": f"no answer from the new kernel ({type(error).__name__})"}
        if "ready" in hello:
            return kernel
        session.kernel = kernel
        await self._kill(session)
        writer.close()
        raise SandboxUnavailable(hello.get("error") or f"the kernel died while starting ({_describe_exit(hello.get('exit'))})")

    async def _kill(self, session: _Session) -> None:
        """SIGKILL the kernel's process group (its pid namespace dies with it) and the rest of
        its cgroup, and wait for the keeper to report it gone; the next cell forks a fresh kernel."""
        kernel, session.kernel = session.kernel, None
        if kernel is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(kernel.pid, signal.SIGKILL)
        if session.cgroup is not None:
            session.cgroup.kill()
        with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError, _ProtocolError):
            async with asyncio.timeout(_EXIT_WAIT_S):
                while "exit" not in await _read(kernel.reader):
                    pass
        kernel.writer.close()

    def _kill_leftovers(self, session: _Session) -> int:
        """Kill every process of the session but its kernel: nothing a cell started runs on
        between cells. The cgroup lists them; without one, the kernel's pid namespace does."""
        kernel = session.kernel.pid
        if session.cgroup is not None:
            return session.cgroup.kill(keep=kernel)
        if self.isolation == "none":
            return 0  # trusted code: its processes are its own business
        killed = 0
        with contextlib.suppress(OSError):
            namespace = os.readlink(f"/proc/{kernel}/ns/pid")
            for entry in os.scandir("/proc"):
                if entry.name.isdigit() and int(entry.name) != kernel:
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{entry.name}/ns/pid") == namespace:
                            os.kill(int(entry.name), signal.SIGKILL)
                            killed += 1
        return killed

    def _bounded(self, text) -> str:
        """At most MAX_OUTPUT_CHARS (+ the kernel's own note) of one stream, head and tail, with
        what was dropped said in the text: the kernel's own cut is not to be relied on."""
        text = text if isinstance(text, str) else ""
        limit = MAX_OUTPUT_CHARS + 200
        if len(text) <= limit:
            return text
        dropped = len(text) - limit
        self.counts["output_chars_dropped"] += dropped
        return f"{text[: limit // 2]}\n[... {dropped} characters dropped by the sandbox ...]\n{text[-(limit - limit // 2):]}"

    async def _take_images(self, session: _Session, names: list[str]) -> tuple[list[Path], list[str]]:
        """Take the images a cell returned out of the sandbox, check them and store them in
        out_dir (an image store: an image returned by many sessions is one file).

        A returned file is opened without following links and checked on the open file (a
        plain file of sane size), read through the kernel's own root (its scratch is a tmpfs
        only it can see), then held to what the model accepts (`fit_for_model`). What fails is
        not returned, and the cell's stderr says why.
        """
        loop = asyncio.get_running_loop()
        root = f"/proc/{session.kernel.pid}/root/scratch" if self.isolation == "namespaces" else str(session.scratch)
        paths, notes = [], []
        for index, name in enumerate(dict.fromkeys(names[:MAX_IMAGES]), 1):
            if not _OUTPUT_NAME.fullmatch(name):
                continue
            try:
                data = await asyncio.to_thread(_take_file, f"{root}/{name}")
                fitted, changed = await loop.run_in_executor(self._files, fit_for_model, data, self.limits.max_image_pixels)
                paths.append(await loop.run_in_executor(self._files, ImageStore(session.out_dir).put, fitted))
                self.counts["images_resized"] += changed
            except (OSError, ValueError) as error:
                self.counts["images_refused"] += 1
                notes.append(f"[image {index} not returned: {error}]")
        return paths, notes

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

    def saturated(self) -> bool:
        return not self._free_slots

    def load(self) -> dict:
        return {"sessions": self.max_sessions - len(self._free_slots), "max_sessions": self.max_sessions,
                "saturated": self.saturated()}

    def stats(self) -> dict:
        return {
            **self.load(), "isolation": self.isolation, "pid": os.getpid(),
            "forkserver_pid": self._forkserver.pid if self._forkserver else None,
            "cgroups": self._cgroups.describe() if self._cgroups else None, "counts": dict(self.counts),
        }


_RESTARTED = "The kernel restarted: all variables and files are lost; image_1.. are loaded again."


def _failed(stderr: str, timed_out: bool = False) -> dict:
    return {"stdout": "", "stderr": stderr, "images": [], "timed_out": timed_out, "failed": True}


def _under(path, roots: tuple[Path, ...], what: str) -> Path:
    """`path` resolved (links followed), if it lies under one of `roots`; else SessionRefused."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise SessionRefused(f"{what}: expected a path, got {path!r}")
    resolved = Path(os.path.realpath(path))
    if not any(resolved == root or root in resolved.parents for root in roots):
        raise SessionRefused(f"{what} {path} is outside this sandbox's roots ({', '.join(map(str, roots))})")
    return resolved


def _check_session_files(images: list[Path], out_dir: Path) -> None:
    """In the files thread (as the store root's owner): every image opens as a plain file, and
    out_dir exists or can be made. Raises SessionRefused naming what is wrong."""
    try:
        for fd in _open_images([str(image) for image in images]):
            os.close(fd)
    except OSError as error:
        raise SessionRefused(error.strerror or str(error)) from None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SessionRefused(f"out_dir {out_dir} cannot be made: {error.strerror}") from None


def _open_images(paths: list[str]) -> list[int]:
    """Descriptors of the session's images, opened without following a link at the last step
    (the paths are resolved already), each a plain file."""
    fds = []
    try:
        for index, path in enumerate(paths, 1):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as error:
                raise type(error)(error.errno, f"image_{index}: cannot open {path}: {error.strerror}") from None
            fds.append(fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise IsADirectoryError(f"image_{index}: {path} is not a plain file")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _take_file(path: str) -> bytes:
    """A returned image file's bytes (a plain file of at most _MAX_IMAGE_BYTES), then unlinked."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a plain file")
        data = file.read(_MAX_IMAGE_BYTES + 1)
    os.unlink(path)
    if len(data) > _MAX_IMAGE_BYTES:
        raise ValueError(f"over {_MAX_IMAGE_BYTES >> 20} MB")
    return data


def model_size(width: int, height: int) -> tuple[int, int]:
    """The nearest size the released model's image processor accepts: the short side stretched
    until the aspect ratio is at most MAX_ASPECT (Qwen2.5-VL refuses more), then both sides
    scaled up until the short one is MIN_SIDE (one merged patch)."""
    if max(width, height) > MAX_ASPECT * min(width, height):
        if width > height:
            height = math.ceil(width / MAX_ASPECT)
        else:
            width = math.ceil(height / MAX_ASPECT)
    if min(width, height) < MIN_SIDE:
        scale = MIN_SIDE / min(width, height)
        width, height = max(MIN_SIDE, round(width * scale)), max(MIN_SIDE, round(height * scale))
    return width, height


def fit_for_model(data: bytes, max_pixels: int) -> tuple[bytes, bool]:
    """Returned image bytes as a PNG the model's processor accepts, and whether they changed.

    The size is read from the header and refused past `max_pixels` before anything is decoded;
    the image is then decoded in full (a broken file fails here, not in the trainer's step),
    and anything but a single-frame PNG of a plain mode, at least MIN_SIDE a side and at most
    MAX_ASPECT elongated, is converted and resized (`model_size`). Raises ValueError saying why
    an image cannot be returned.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width < 1 or height < 1 or width * height > max_pixels:
                raise ValueError(f"{width}x{height} pixels: at most {max_pixels} are returned; make it smaller")
            image.load()
            size = model_size(width, height)
            if image.format == "PNG" and image.mode in _MODEL_MODES and size == (width, height) \
                    and getattr(image, "n_frames", 1) == 1:
                return data, False
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            converted = image.convert("RGBA" if has_alpha else "RGB") if image.mode not in _MODEL_MODES else image.copy()
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 — PIL raises many types for bytes that are no image
        raise ValueError(f"not a readable image ({type(error).__name__}: {error})") from None
    if size != converted.size:
        converted = converted.resize(size)
    out = io.BytesIO()
    converted.save(out, format="PNG")
    return out.getvalue(), True


def _act_on_files_as(uid: int, gid: int) -> None:
    """In a files thread: check file access as uid/gid (setfsuid is per thread; from root to
    anyone else it also drops the capabilities that override file permissions)."""
    if os.geteuid() != 0 or uid == 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.setfsgid(gid)
    libc.setfsuid(uid)


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
    """One message from a session: at most MAX_FRAME bytes, a JSON object; else _ProtocolError."""
    (size,) = struct.unpack(">I", await reader.readexactly(4))
    if size > MAX_FRAME:
        raise _ProtocolError(f"the cell's output ({size} bytes) is over the sandbox's {MAX_FRAME}-byte limit")
    try:
        message = json.loads(await reader.readexactly(size))
    except (ValueError, RecursionError):
        raise _ProtocolError("the kernel sent a malformed reply") from None
    if not isinstance(message, dict):
        raise _ProtocolError("the kernel sent a malformed reply")
    return message


def _check_reply(reply: dict, cell: int) -> None:
    """A cell's reply has the shape the kernel owes, for this cell (not a stale or forged one)."""
    if "exit" in reply:
        return
    if reply.get("cell") != cell or not isinstance(reply.get("stdout"), str) or not isinstance(reply.get("stderr"), str) \
            or not isinstance(reply.get("images"), list) or not all(isinstance(n, str) for n in reply["images"]):
        raise _ProtocolError("the kernel sent a reply out of protocol")


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
    app = service_app(
        token, ready=lambda: daemon.ready and daemon.forkserver_alive() and not daemon.saturated(), load=daemon.load
    )

    async def open_session(request: web.Request) -> web.Response:
        body = await _json_object(request)
        images, out_dir = body.get("images", []), body.get("out_dir")
        if not isinstance(images, list):
            return error_response(400, "images: expected a list of paths")
        try:
            session = await daemon.open_session(images, out_dir)
        except SessionRefused as error:
            daemon.counts["sessions_refused"] += 1
            return error_response(400, str(error))
        except TimeoutError:
            return error_response(503, f"all {daemon.max_sessions} sandbox sessions are busy")
        return web.json_response({"session": session.id})

    async def run(request: web.Request) -> web.Response:
        code = (await _json_object(request)).get("code")
        if not isinstance(code, str):
            return error_response(400, "code: expected a string")
        try:
            return web.json_response(await daemon.run(request.match_info["id"], code))
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


async def _json_object(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text='{"error": "body is not JSON"}', content_type="application/json") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text='{"error": "body must be a JSON object"}', content_type="application/json")
    return body


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    clean = safe_environment()
    if clean != dict(os.environ):  # whatever started us, no secret stays in this process's memory
        os.execve(sys.executable, [sys.executable, "-m", "deepeyes.tools.sandbox_daemon", *argv], clean)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_service_args(parser)
    parser.add_argument("--scratch-root", type=Path, required=True, help="node-local directory for session scratch")
    parser.add_argument("--store-root", type=Path, required=True, help="returned images go under it (and inputs may come from it)")
    parser.add_argument("--image-root", type=Path, action="append", default=[], help="inputs may also come from under it")
    parser.add_argument("--max-sessions", type=int, default=64)
    parser.add_argument("--idle-timeout-s", type=float, default=600.0)
    parser.add_argument("--isolation", choices=ISOLATIONS, default="namespaces")
    for name, value in asdict(SandboxLimits()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    limits = SandboxLimits(**{name: getattr(args, name) for name in asdict(SandboxLimits())})
    daemon = SandboxDaemon(
        args.scratch_root, args.store_root, limits, args.max_sessions, args.idle_timeout_s, args.isolation,
        tuple(args.image_root),
    )
    try:
        serve(sandbox_app(daemon, read_token(args.token_file)), args)
    except SandboxUnavailable as error:
        log.error("%s", error)
        sys.exit(2)


if __name__ == "__main__":
    main()
