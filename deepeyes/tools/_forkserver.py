"""The sandbox's fork-server: numpy, PIL and matplotlib loaded once, one fork per session.

Started by the sandbox daemon (`python -m deepeyes.tools._forkserver CONTROL_FD`) from an
allowlisted environment (no secret is ever in its memory, so none is in a session's) and never
reached by anything else. The daemon sends, over the control socket, a JSON session spec with
file descriptors attached (SCM_RIGHTS): the daemon's end of a fresh socket pair, then image_1..
as the daemon opened them. The fork-server forks and goes back to waiting. It never reads a
reply, so a slow or dying session cannot stall it.

Each fork is a session's *keeper*: it enters the session's namespaces (see `_isolation`) and
forks the *kernel*, puts it in the session's cgroup (`_cgroup`; the keeper stays outside, so
the daemon can kill everything in there but the kernel), and the kernel becomes pid 1 of the
new pid namespace, builds its root filesystem,
drops its privileges and runs the notebook (`_kernel.Notebook`) over the socket. The kernel
sets itself up while the keeper moves it into the cgroup (on cgroup v1 a move waits for an RCU
grace period, ~10 ms, most of a session's start), and runs no cell before it is in. The keeper
sends the daemon the kernel's pid, waits for the kernel to die and sends how it died. What
the daemon reads on a session socket, in order:

    keeper:  {"pid": n}
    kernel:  {"ready": true} | {"error": "..."}, then one reply per {"code": ..., "cell": n} request
    keeper:  {"exit": code}      (when the kernel has died, however it died)

A forked child shares the preloaded modules with the fork-server page by page (copy on
write), which is why a session starts in milliseconds and costs a few MB.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import sys
import traceback

from deepeyes.tools import _isolation
from deepeyes.tools._kernel import Notebook, apply_limits, install_inline_backend, send_message

MAX_SESSION_IMAGES = 32  # image_1.. per session: descriptors passed with a spec

KERNEL_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "MPLCONFIGDIR": "/tmp/matplotlib",
    "MPLBACKEND": "module://deepeyes_inline",  # plt.show() returns images (see _kernel)
    "OMP_NUM_THREADS": "1",  # thread stacks count against RLIMIT_AS, threads against RLIMIT_NPROC
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def preload() -> None:
    """Import what the model's cells use, and warm what would otherwise happen in every session
    (matplotlib's font list, PIL's plugin registry, the Agg canvas)."""
    import numpy  # noqa: F401
    from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps  # noqa: F401

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Image.init()
    figure = plt.figure(figsize=(1, 1), dpi=10)
    figure.gca().plot([0, 1])
    figure.canvas.draw()
    plt.close(figure)
    gc.collect()
    gc.freeze()  # the collector never touches these objects again: their pages stay shared


def serve(control: socket.socket) -> None:
    while True:
        message, fds, _, _ = socket.recv_fds(control, 1 << 20, 1 + MAX_SESSION_IMAGES)
        if not message:
            return  # the daemon is gone
        spec = json.loads(message)
        try:
            keeper = os.fork()
        except OSError as error:
            with os.fdopen(os.dup(fds[0]), "wb") as session:
                send_message(session, {"error": f"fork failed: {error}"})
            keeper = None
        if keeper == 0:
            code = 1
            try:
                control.close()
                code = keep_session(spec, fds[0], fds[1:])
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)


def keep_session(spec: dict, session_fd: int, image_fds: list[int]) -> int:
    """In the keeper: enter the namespaces, fork the kernel, put it in the session's cgroup,
    report its pid, map its user namespace to the session's uid (as root, when the kernel asks),
    let it start serving cells, and report its end."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the fork-server ignores it; we wait for the kernel
    replies = os.fdopen(os.dup(session_fd), "wb")
    try:
        if spec["isolated"]:
            _isolation.enter_namespaces()
        _isolation.die_with_parent()  # after unshare: a credential change would clear it
    except OSError as error:
        send_message(replies, {"error": f"cannot isolate the session: {error}"})
        return 1
    go_read, go_write = os.pipe()  # "m": mapped (or "x": not); "g": in the cgroup, go
    map_read, map_write = os.pipe()  # root: the kernel asks to be mapped to the session's uid
    kernel = os.fork()
    if kernel == 0:
        os.close(go_write)
        os.close(map_read)
        replies.close()
        run_kernel(spec, session_fd, image_fds, (map_write, go_read))
        os._exit(0)
    os.close(session_fd)
    os.close(map_write)
    for fd in image_fds:
        os.close(fd)
    try:
        for procs in spec["cgroup"]:
            with open(procs, "w") as file:
                file.write(str(kernel))
    except OSError as error:
        send_message(replies, {"error": f"cannot put the session in its cgroup: {error}"})
        os.kill(kernel, signal.SIGKILL)
        os.waitpid(kernel, 0)
        return 1
    send_message(replies, {"pid": kernel})
    if os.read(map_read, 1):  # EOF instead: the kernel died before, or needs no mapping
        try:
            _isolation.map_root(kernel, spec["uid"], spec["uid"])
            os.write(go_write, b"m")
        except OSError:
            os.write(go_write, b"x")  # the kernel reports it
    os.write(go_write, b"g")
    os.close(go_write)
    os.close(map_read)
    _, status = os.waitpid(kernel, 0)
    try:
        send_message(replies, {"exit": os.waitstatus_to_exitcode(status)})
    except OSError:
        pass  # the daemon already closed the session
    return 0


def run_kernel(spec: dict, session_fd: int, image_fds: list[int], keeper: tuple[int, int]) -> None:
    """In the kernel: load the images, wall off, wait until the keeper has put this process in
    the session's cgroup, then serve cells until the daemon hangs up. `keeper`: (ask, answer)
    pipe ends to have the keeper map this kernel's user namespace and say when it is in."""
    os.setsid()  # its own process group: without namespaces, that is what the daemon kills
    requests = os.fdopen(session_fd, "rb")
    replies = os.fdopen(os.dup(session_fd), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # output below Python's sys.stdout is not the model's business
        os.dup2(devnull, fd)
    try:
        notebook = Notebook(image_fds, "/scratch" if spec["isolated"] else spec["scratch"])
        install_inline_backend(notebook)
        keep = {0, 1, 2, requests.fileno(), replies.fileno(), *keeper, *image_fds}
        for fd in map(int, os.listdir("/proc/self/fd")):
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass  # the directory listing's own descriptor
        ask, answer = keeper
        if spec["isolated"]:
            _isolation.build_root(spec["read_only"], spec["limits"]["scratch_mb"], spec["limits"]["memory_mb"])
            if spec["uid"] is not None:
                _isolation.enter_user_namespace()
                os.write(ask, b"m")
                if os.read(answer, 1) != b"m":
                    raise _isolation.IsolationError("the keeper could not map the session's uid")
                _isolation.become_mapped_root()
            _isolation.drop_privileges()
        else:
            os.chdir(spec["scratch"])
            if spec["uid"] is not None:
                _isolation.become(spec["uid"])
        os.close(ask)
        _isolation.die_with_parent()
        os.environ.clear()
        os.environ.update(KERNEL_ENV if spec["isolated"] else {**KERNEL_ENV, "HOME": spec["scratch"]})
        apply_limits(spec["limits"])
        if os.read(answer, 1) != b"g":
            raise _isolation.IsolationError("the keeper could not put the kernel in the session's cgroup")
        os.close(answer)
    except Exception as error:  # noqa: BLE001 — reported to the daemon, which raises it
        send_message(replies, {"error": "".join(traceback.format_exception_only(error)).strip()})
        return
    send_message(replies, {"ready": True})
    notebook.serve(requests, replies)


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    _isolation.die_with_parent()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # keepers are reaped by the kernel, not by us
    preload()
    send_message(control.makefile("wb"), {"ready": True})
    serve(control)


if __name__ == "__main__":
    main()
