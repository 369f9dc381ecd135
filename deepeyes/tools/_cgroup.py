"""A cgroup per sandbox session: memory, processes and CPU of the whole session, enforced by the
host kernel outside the sandbox.

rlimits are per process: eight forks under a 1 GB address-space limit hold 8 GB, and memfd or
tmpfs pages are outside the address space altogether. A cgroup counts every page a session's
processes fault in (anonymous, page cache, tmpfs, memfd) and every process, whatever they do.

Where the cgroups come from, first that works:

- cgroup v2 with the memory, pids and cpu controllers below the daemon's own cgroup: the daemon
  moves itself into a leaf (`<own>/daemon`) and puts sessions under `<own>/sessions`. That needs
  the daemon's cgroup to itself (a delegated one: `systemd-run --scope -p Delegate=yes`, or
  root on a host whose daemon cgroup holds nothing else);
- cgroup v1 (or a hybrid host, like this one): the memory, pids and cpu hierarchies, each below
  the daemon's own cgroup there (root);
- neither: `CgroupTree.create` returns None, and the daemon says what is then bounded
  (per-process rlimits, the tmpfs sizes).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

CONTROLLERS = ("memory", "pids", "cpu")
_CPU_PERIOD_US = 100_000


class CgroupError(OSError):
    """The host offers no cgroups this daemon may create (says why)."""


@dataclass(frozen=True)
class SessionLimits:
    memory_bytes: int
    max_processes: int
    cpus: float


class SessionCgroup:
    """One session's cgroup (v2: one directory; v1: one per controller)."""

    def __init__(self, version: int, directories: dict[str, Path]):
        self.version = version
        self.directories = directories  # v2: {"": dir}; v1: {controller: dir}

    @property
    def procs_files(self) -> list[str]:
        """Where a process writes its pid to join the session (all of them)."""
        return [str(directory / "cgroup.procs") for directory in self.directories.values()]

    def pids(self) -> list[int]:
        """Every process of the session (host pids)."""
        directory = self.directories["" if self.version == 2 else "pids"]
        with contextlib.suppress(FileNotFoundError):
            return [int(line) for line in (directory / "cgroup.procs").read_text().split()]
        return []

    def kill(self, keep: int | None = None) -> int:
        """SIGKILL every process of the session but `keep`; the number killed. Repeated until
        no new one shows up, so a process forked while the list was read is caught too (the
        killed stay listed until their parent reaps them)."""
        killed: set[int] = set()
        for _ in range(100):
            victims = set(self.pids()) - killed - {keep}
            if not victims:
                break
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed |= victims
        deadline = time.monotonic() + 2.0  # dead (a zombie, for its parent to reap) before we return
        while killed and time.monotonic() < deadline and not all(map(_dead, killed)):
            time.sleep(0.002)
        return len(killed)

    def memory_peak(self) -> int | None:
        """The session's most memory at once, in bytes (None where the host does not say)."""
        directory = self.directories["" if self.version == 2 else "memory"]
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            with contextlib.suppress(OSError, ValueError):
                return int((directory / name).read_text())
        return None

    def remove(self) -> None:
        """Kill what is left and remove the directories (a cgroup with processes cannot go)."""
        self.kill()
        for directory in self.directories.values():
            for _ in range(50):  # a killed process leaves its cgroup a moment after SIGKILL
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as error:
                    if error.errno != errno.EBUSY:
                        raise
                    os.sched_yield()


class CgroupTree:
    """Where this daemon's session cgroups go."""

    def __init__(self, version: int, parents: dict[str, Path], own_procs: Path):
        self.version = version
        self.parents = parents  # v2: {"": <own>/sessions}; v1: {controller: <own>/deepeyes-sandbox-<pid>}
        self._own_procs = own_procs  # the cgroup.procs of the cgroup this daemon is in

    def warm(self) -> None:
        """Start the grace period that the next move into a session's cgroup waits for.

        Every move into a cgroup takes a global kernel lock (cgroup_threadgroup_rwsem) whose
        first taker after a quiet spell waits for an RCU grace period: 6-15 ms measured here,
        most of a session's start. Moving this daemon into the cgroup it is already in takes
        the lock and moves nothing; called (in a thread) when a session opens, the grace period
        passes while the keeper forks, and the kernel's own move finds the lock ready."""
        with contextlib.suppress(OSError):
            _write(self._own_procs, os.getpid())

    @classmethod
    def create(cls, name: str) -> CgroupTree:
        """Set up below this process's own cgroup; raises CgroupError saying why it cannot."""
        reasons = []
        for setup in (cls._v2, cls._v1):
            try:
                return setup(name)
            except OSError as error:
                reasons.append(str(error))
        raise CgroupError("; ".join(reasons))

    def weigh(self, sessions: int) -> None:
        """Give the sessions' parent the CPU weight of as many processes as sessions are open.
        The parent competes with the host's processes as one of them: with its default weight,
        all sessions together get one process's share of a loaded node (measured: two sessions
        ran at half the throughput of two plain kernels); a fixed large weight would take
        other jobs' share."""
        if self.version == 2:
            _write(self.parents[""] / "cpu.weight", min(10_000, 100 * max(sessions, 1)))
        else:
            _write(self.parents["cpu"] / "cpu.shares", 1024 * max(sessions, 1))

    def describe(self) -> str:
        return f"cgroup v{self.version} at {', '.join(map(str, self.parents.values()))}"

    def session(self, name: str, limits: SessionLimits) -> SessionCgroup:
        directories = {key: parent / name for key, parent in self.parents.items()}
        for directory in directories.values():
            directory.mkdir()
        cgroup = SessionCgroup(self.version, directories)
        try:
            quota = max(int(limits.cpus * _CPU_PERIOD_US), 1000)
            if self.version == 2:
                (directory,) = directories.values()
                _write(directory / "memory.max", limits.memory_bytes)
                _write(directory / "memory.swap.max", 0, optional=True)
                _write(directory / "pids.max", limits.max_processes)
                _write(directory / "cpu.max", f"{quota} {_CPU_PERIOD_US}")
            else:
                _write(directories["memory"] / "memory.limit_in_bytes", limits.memory_bytes)
                _write(directories["memory"] / "memory.memsw.limit_in_bytes", limits.memory_bytes, optional=True)
                _write(directories["pids"] / "pids.max", limits.max_processes)
                _write(directories["cpu"] / "cpu.cfs_period_us", _CPU_PERIOD_US)
                _write(directories["cpu"] / "cpu.cfs_quota_us", quota)
        except BaseException:
            cgroup.remove()
            raise
        return cgroup

    def remove(self) -> None:
        """Remove what this daemon made (every session must be removed first)."""
        parents = list(self.parents.values())
        if self.version == 2:
            parents.append(parents[0].parent / "daemon")  # empty only once the daemon has exited
        for parent in parents:
            with contextlib.suppress(OSError):
                parent.rmdir()

    @classmethod
    def _v2(cls, name: str) -> CgroupTree:
        mount = _mount_point("cgroup2", None)
        own = mount / _own_path("")
        available = (own / "cgroup.controllers").read_text().split()
        missing = [c for c in CONTROLLERS if c not in available]
        if missing:
            raise CgroupError(f"cgroup v2 at {own}: controllers {missing} not delegated here")
        leaf = own / "daemon"
        leaf.mkdir(exist_ok=True)
        try:
            (leaf / "cgroup.procs").write_text(str(os.getpid()))
            _write(own / "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))
            sessions = own / "sessions"
            sessions.mkdir(exist_ok=True)
            _write(sessions / "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))
        except OSError as error:
            with contextlib.suppress(OSError):
                (own / "cgroup.procs").write_text(str(os.getpid()))
                leaf.rmdir()
            raise CgroupError(
                f"cgroup v2 at {own}: cannot enable {CONTROLLERS} for sessions ({error.strerror}); the daemon "
                "needs a delegated cgroup of its own"
            ) from None
        return cls(2, {"": sessions}, leaf / "cgroup.procs")

    @classmethod
    def _v1(cls, name: str) -> CgroupTree:
        parents = {}
        try:
            for controller in CONTROLLERS:
                parent = _mount_point("cgroup", controller) / _own_path(controller) / f"{name}-{os.getpid()}"
                parent.mkdir(exist_ok=True)
                parents[controller] = parent
            own_procs = parents["pids"].parent / "cgroup.procs"
        except OSError as error:
            for parent in parents.values():
                with contextlib.suppress(OSError):
                    parent.rmdir()
            raise CgroupError(f"cgroup v1: {error}") from None
        return cls(1, parents, own_procs)


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


def _mount_point(fstype: str, controller: str | None) -> Path:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, target, kind, options = line.split()[:4]
        if kind == fstype and (controller is None or controller in options.split(",")):
            return Path(target)
    raise CgroupError(f"no {fstype} mount{f' with the {controller} controller' if controller else ''}")


def _own_path(controller: str) -> str:
    """This process's cgroup, relative to its hierarchy's mount ("" is v2's unified one)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (controller == "" and controllers == "") or controller in controllers.split(","):
            return path.lstrip("/")
    raise CgroupError(f"this process is in no {controller or 'cgroup v2'} cgroup")


def _write(path: Path, value, optional: bool = False) -> None:
    try:
        path.write_text(str(value))
    except FileNotFoundError:
        if not optional:
            raise
