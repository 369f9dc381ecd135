"""Every deepeyes network service, both sides: how it is served and how a job runs it locally.

Server side: `service_app(token, ready)` is an aiohttp application that refuses any request
without the job's token (`Authorization: Bearer <token>`, 401) and answers `GET /health` (the
process is up) and `GET /ready` (it can serve: model loaded, index built; 503 until then).
`add_service_args` gives a server command its common flags (`--host`, default 127.0.0.1,
`--port`, `--token-file`) and `serve(app, args)` runs the app there.

Environment: a child gets this process's whole environment unless it is started with
`clean_environment=True`, which passes only `safe_environment()` (what Python, the C library
and the locale need) plus the variables it is given: a service that needs no secret never
holds one.

Client side: `LocalService` starts a server command as a child process, waits for its /ready
and stops it (SIGTERM, then SIGKILL); `local_services(...)` holds several for the length of a
`with` block and stops them however the block ends (return, exception, Ctrl-C). Children also
get SIGTERM when the thread that started them dies (PR_SET_PDEATHSIG), so a trainer killed with
SIGKILL leaves no orphan servers behind.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hmac
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from aiohttp import web

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# What a process that needs no secret may inherit: Python's, the C library's and the locale's
# variables. API keys, wandb and cloud credentials are never among them.
SAFE_VARIABLES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
    "PYTHONPATH", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "VIRTUAL_ENV", "LD_LIBRARY_PATH",
})
SAFE_PREFIXES = ("LC_",)


# What a service process (rollout server, judge, search) may inherit beyond that: the GPU stack's,
# the scheduler's and our own settings, and offline switches; never a token or key.
RUNTIME_VARIABLES = frozenset({
    "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "LD_PRELOAD",
})
RUNTIME_PREFIXES = ("CUDA_", "NCCL_", "NVIDIA_", "VLLM_", "TORCH_", "TRITON_", "OMP_", "MKL_", "SLURM_", "DEEPEYES_")


def safe_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The allowlisted part of `environ` (default: this process's environment)."""
    environ = os.environ if environ is None else environ
    return {name: value for name, value in environ.items() if name in SAFE_VARIABLES or name.startswith(SAFE_PREFIXES)}


def service_environment(secrets: Sequence[str] = (), environ: dict[str, str] | None = None) -> dict[str, str]:
    """A service's environment: the safe variables, the runtime's, and only the secrets it names
    (e.g. the search service's SERPAPI_API_KEY) — not the trainer's wandb or API keys."""
    environ = os.environ if environ is None else environ
    runtime = {name: value for name, value in environ.items()
               if name in RUNTIME_VARIABLES or name.startswith(RUNTIME_PREFIXES)}
    return safe_environment(environ) | runtime | {name: environ[name] for name in secrets if name in environ}


# ---- the token -------------------------------------------------------------------------------


def new_token_file(directory: Path) -> Path:
    """A fresh per-job token in a file only this user can read; servers get its path, never the
    token itself on their command line (which `ps` shows to everyone)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "service_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_hex(32))
    return path


def read_token(path: Path | str) -> str:
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def auth_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---- server side -----------------------------------------------------------------------------


def service_app(
    token: str, ready: Callable[[], bool] = lambda: True, load: Callable[[], dict] | None = None
) -> web.Application:
    """An application with the token check and /health, /ready; add the service's routes to it.
    `load`: what /ready reports beside `ready` (e.g. how many sessions of how many are taken)."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def require_token(request: web.Request, handler):
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return web.json_response({"error": "missing or wrong job token"}, status=401)
        return await handler(request)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readiness(request: web.Request) -> web.Response:
        is_ready = ready()
        body = {"ready": is_ready, **(load() if load is not None else {})}
        return web.json_response(body, status=200 if is_ready else 503)

    app = web.Application(middlewares=[require_token], client_max_size=64 << 20)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", readiness)
    return app


def add_service_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=LOOPBACK, help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-file", type=Path, required=True, help="file holding the job's token")


def serve(app: web.Application, args: argparse.Namespace) -> None:
    """Run until SIGTERM/SIGINT (aiohttp turns both into a clean shutdown), then exit at once:
    the interpreter's own teardown of a loaded model takes seconds and guards nothing."""
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None, shutdown_timeout=5)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# ---- client side: local processes -----------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    """A port free right now (another process could take it before the server binds; the
    server then fails to start and `wait_ready` says so)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class LocalService:
    """One server command run as a child process of this one."""

    name: str
    argv: Sequence[str]  # the full command, e.g. [sys.executable, "-m", "deepeyes.rollout.server", ...]
    port: int
    token: str
    log_path: Path
    host: str = LOOPBACK
    env: dict[str, str] = field(default_factory=dict)
    # True: service_environment(secrets) + env, none of this process's other secrets; False: all of it.
    clean_environment: bool = False
    secrets: Sequence[str] = ()
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                list(self.argv), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**(service_environment(self.secrets) if self.clean_environment else os.environ), **self.env},
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        log.info("started %s (pid %d) on %s, log %s", self.name, self.process.pid, self.url, self.log_path)

    def wait_ready(self, timeout_s: float) -> None:
        """Return once GET /ready answers 200; raise if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        request = urllib.request.Request(self.url + "/ready", headers=auth_headers(self.token))
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"service {self.name} exited with code {self.process.returncode} before it was ready; "
                    f"last log lines ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 503 while loading
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"service {self.name} not ready on {self.url} after {timeout_s:.0f}s; "
                    f"last log lines ({self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the service's process group, SIGKILL what is left after `grace_s`."""
        stop_services([self], grace_s)

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def stop_services(services: Sequence[LocalService], grace_s: float = 5.0) -> None:
    """Stop several services at once: SIGTERM to all, then SIGKILL to any still running after
    `grace_s` (so shutdown takes the slowest service's time, not the sum)."""
    running = [s for s in services if s.process is not None and s.process.poll() is None]
    stopping = list(running)  # those already stopped were reported when they were
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for service in running:
            service._signal(sig)
        deadline = time.monotonic() + wait_s
        for service in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                service.process.wait(max(deadline - time.monotonic(), 0.01))
        running = [s for s in running if s.process.poll() is None]
        for service in running:
            log.warning("service %s did not stop on %s", service.name, sig.name)
        if not running:
            break
    for service in stopping:
        log.info("stopped %s (exit code %s)", service.name, service.process.returncode)


@contextlib.contextmanager
def local_services(services: Sequence[LocalService], ready_timeout_s: float = 300.0) -> Iterator[list[LocalService]]:
    """Start all services at once, wait until every one is ready, stop all on the way out.

    SIGTERM to this process is turned into the same clean exit as Ctrl-C, so services are
    stopped whether the job ends, fails, is interrupted or is cancelled by Slurm.
    """
    previous = signal.getsignal(signal.SIGTERM)
    in_main_thread = _is_main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    started: list[LocalService] = []
    try:
        for service in services:
            service.start()
            started.append(service)
        for service in services:
            service.wait_ready(ready_timeout_s)
        yield list(services)
    finally:
        stop_services(started)
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def python_module(module: str, *args: object) -> list[str]:
    """The argv running `python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *(str(a) for a in args)]


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
