"""How a forked session process walls itself off: its own namespaces, root filesystem and uid.

The fork-server calls `enter_namespaces` in the forked child (the session's keeper) and then
forks the session's kernel, which becomes pid 1 of a new pid namespace and calls `build_root`
(in a mount namespace of its own), as root `enter_user_namespace` + `become_mapped_root` once
the keeper has called `map_root` for it, and `drop_privileges`. What the kernel is left with:

- no network (an empty network namespace: not even the host's loopback), its own IPC and UTS;
- its own pid namespace: it sees and can signal only its own processes, and when it dies the
  kernel kills every process left in the namespace;
- an empty root (a tmpfs, read-only) holding only the Python environment and /usr read-only,
  a size-capped tmpfs of its own at /scratch and at /tmp (a full disk is the cell's error, never
  the host's; the pages count against the session's cgroup and die with the kernel), a fresh
  /proc and the harmless devices (null, zero, full, random, urandom);
- no privileges: the kernel ends up root of a user namespace of its own, with every capability
  dropped and no further user namespaces allowed. As a normal user that namespace comes first
  (it is what permits the mounts); as root the mounts are made as real root and the kernel then
  enters a user namespace whose root is the session's own unprivileged uid (`uid_base + slot`,
  mapped by the keeper), so RLIMIT_NPROC holds and sessions cannot signal each other.

Python 3.11 has no os.unshare, so the few syscalls are made through libc.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import struct
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203}
_DEVICES = ("null", "zero", "full", "random", "urandom")

_libc = ctypes.CDLL(None, use_errno=True)


class IsolationError(OSError):
    """A namespace, mount or credential step failed: the session must not run."""


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise IsolationError(errno, f"{what}: {os.strerror(errno)}")


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` when the parent exits. Credential changes clear it: call last."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def enter_namespaces() -> None:
    """Unshare network, IPC, UTS and pid namespaces (the pid one takes effect for the next
    fork; the mount one is the kernel's own, see `build_root`). A normal user also gets a user
    namespace, in which it is root over the kernel's mounts only: capabilities there mean
    nothing to the host."""
    flags = CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID
    privileged = os.geteuid() == 0
    uid, gid = os.geteuid(), os.getegid()
    _check(_libc.unshare(flags if privileged else flags | CLONE_NEWUSER), "unshare")
    if not privileged:
        Path("/proc/self/setgroups").write_text("deny")
        map_root("self", uid, gid)


def enter_user_namespace() -> None:
    """As root, after `build_root`: move into a new user namespace, to be made root of by
    `map_root` from outside (by a process still privileged there)."""
    os.setgroups([])
    _check(_libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")


def become_mapped_root() -> None:
    """Once mapped: become the namespace's root, i.e. the session's own uid outside it."""
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def map_root(pid: int | str, uid: int, gid: int) -> None:
    """Make root of `pid`'s user namespace be uid/gid outside it (and nobody else)."""
    Path(f"/proc/{pid}/uid_map").write_text(f"0 {uid} 1")
    Path(f"/proc/{pid}/gid_map").write_text(f"0 {gid} 1")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda text: None if text is None else text.encode()  # noqa: E731
    _check(_libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}")


def _bind(source: str, target: str, read_only: bool) -> None:
    """Bind `source` (a path under /oldroot) at `target`; read-only keeps the flags the host
    mount has (nosuid, nodev, noexec, atime: a user namespace may not clear them)."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        Path(target).touch()
    _mount(source, target, None, MS_BIND | MS_REC)
    if read_only:
        kept = os.statvfs(target).f_flag
        flags = kept & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)
        flags |= MS_RELATIME if kept & os.ST_RELATIME else 0
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | flags)


def build_root(read_only: list[str], scratch_mb: int, tmp_mb: int) -> None:
    """Replace this process's view of the filesystem (it must be root in its mount namespace).

    `read_only` are host directories shown at the same path; /scratch and /tmp are tmpfs of
    `scratch_mb` and `tmp_mb` (the daemon reads returned images through /proc/<pid>/root).
    The tmpfs root is built with the host still visible under /oldroot (that is where the
    binds come from), which is then detached: nothing of the host stays reachable.
    """
    # A mount namespace of the kernel's own: pivot_root moves the root of every process in the
    # namespace, and the keeper must keep the host's view (it maps this kernel's uid via /proc).
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks back to the host
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    os.mkdir("/tmp/oldroot")
    os.chdir("/tmp")
    _check(_libc.syscall(_PIVOT_ROOT[platform.machine()], b".", b"oldroot"), "pivot_root")
    os.chdir("/")
    for path in read_only:
        _bind("/oldroot" + path, path, read_only=True)
    for top in ("/bin", "/lib", "/lib64", "/lib32", "/sbin"):  # merged-/usr symlinks, or real directories
        host = "/oldroot" + top
        if os.path.islink(host):
            os.symlink(os.readlink(host), top)
        elif os.path.isdir(host) and not os.path.exists(top):
            _bind(host, top, read_only=True)
    os.mkdir("/scratch")
    _mount("tmpfs", "/scratch", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={scratch_mb}m")
    os.mkdir("/dev")
    for device in _DEVICES:
        _bind(f"/oldroot/dev/{device}", f"/dev/{device}", read_only=False)
    os.mkdir("/proc")
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # tmpfs pages are memory outside RLIMIT_AS: cap /tmp like the address space.
    os.mkdir("/tmp", 0o1777)
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={tmp_mb}m")
    _check(_libc.umount2(b"/oldroot", MNT_DETACH), "umount /oldroot")
    os.rmdir("/oldroot")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir("/scratch")


def drop_privileges() -> None:
    """As root of the session's own user namespace: give up every privilege for good. No user
    namespaces may be made inside it (in one, code would be root again, over new mounts whose
    tmpfs pages escape RLIMIT_AS, and over more of the kernel); no capability is left; no
    later execve can gain any back."""
    Path("/proc/sys/user/max_user_namespaces").write_text("0")
    header = struct.pack("=Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    _check(_libc.capset(header, bytes(24)), "capset")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def become(uid: int) -> None:
    """Without namespaces, as root: run as `uid`, which clears every capability."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
