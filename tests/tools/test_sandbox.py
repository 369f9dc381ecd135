"""The sandbox daemon against hostile code: real daemon, real fork-server, real namespaces.

Every attack runs in its own session while a bystander session holds a secret; after each
test the daemon must still be ready and the bystander's state intact.
"""

import asyncio
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import psutil
import pytest
from PIL import Image

from deepeyes.service import LocalService, auth_headers, free_port, local_services, new_token_file, read_token
from deepeyes.tools import LocalSandbox, SandboxClient, SandboxError, SandboxLimits, daemon_command
from deepeyes.tools.sandbox_daemon import SandboxDaemon

LIMITS = SandboxLimits(timeout_s=2.0, memory_mb=1024, max_processes=32, cpu_s=30)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    with LocalSandbox(tmp_path_factory.mktemp("sandbox"), LIMITS, max_sessions=16) as client:
        yield client


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "photo.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return path


@pytest.fixture
def out_dir(tmp_path):
    return tmp_path / "out"


def get(client: SandboxClient, path: str, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(client.url + path, headers=auth_headers(token or client.token))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def run_cells(sandbox, images, out_dir, cells):
    """Results of the cells, in order, in one fresh session."""

    async def main():
        session = sandbox.session(images, out_dir)
        try:
            return [await session.run(cell) for cell in cells]
        finally:
            await session.close()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def bystander(sandbox, image, tmp_path_factory):
    """A session that set a secret before the attacks (driven over raw HTTP: it outlives the
    event loop of each test)."""

    def call(method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(sandbox.url + path, data, auth_headers(sandbox.token), method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    session = call("POST", "/sessions", {"images": [str(image)], "out_dir": str(tmp_path_factory.mktemp("by"))})["session"]
    call("POST", f"/sessions/{session}/run", {"code": "secret = 'bystander-42'\nopen('secret.txt', 'w').write(secret)"})
    yield lambda code: call("POST", f"/sessions/{session}/run", {"code": code})
    call("DELETE", f"/sessions/{session}")


@pytest.fixture
def contained(sandbox, bystander):
    """After the test: the daemon is ready and the bystander's variables and files are intact."""
    yield
    assert get(sandbox, "/ready")[0] == 200
    assert bystander("print(secret, open('secret.txt').read())")["stdout"] == "bystander-42 bystander-42\n"


# ---- the notebook ------------------------------------------------------------------------------


def test_state_persists_and_images_are_preloaded(sandbox, image, out_dir, tmp_path):
    second = tmp_path / "elsewhere" / "photo.png"  # same file name, another directory
    second.parent.mkdir()
    Image.new("L", (5, 7)).save(second)
    cells = ["size = image_1.size", "print(size)", "size[0] * 2", "None", "print(image_2.size, image_2.mode)"]
    results = run_cells(sandbox, [image, second], out_dir, cells)
    assert [r.stdout for r in results] == ["", "(64, 48)\n", "128\n", "", "(5, 7) L\n"]
    assert all(r.stderr == "" and not r.failed for r in results)


def test_shown_and_displayed_images_come_back_as_png_files_in_out_dir(sandbox, image, out_dir):
    plot = "import matplotlib.pyplot as plt\nplt.figure(figsize=(2, 1), dpi=50)\nplt.plot([1, 2])\nplt.show()"
    shown, cropped, displayed, many = run_cells(
        sandbox, [image], out_dir,
        [plot, "image_1.crop((0, 0, 30, 40))", "display(image_1.resize((32, 32)), 'text')", "for _ in range(12):\n    display(image_1)"],
    )
    sizes = []
    for result in (shown, cropped, displayed):
        assert len(result.images) == 1 and out_dir in result.images[0].parents, result
        with Image.open(result.images[0]) as png:
            assert result.images[0].stem == hashlib.sha256(result.images[0].read_bytes()).hexdigest()
            assert png.format == "PNG"
            sizes.append(png.size)
    assert sizes == [(100, 50), (30, 40), (32, 32)]
    assert displayed.stdout == "'text'\n"
    assert len(many.images) == 10 and "2 more images not returned" in many.stderr
    assert len(set(many.images)) == 1  # ten identical images: one stored file


def test_tiny_and_extreme_aspect_images_come_back_as_the_model_accepts_them(sandbox, image, out_dir):
    (result,) = run_cells(
        sandbox, [image], out_dir,
        ["from PIL import Image\ndisplay(Image.new('L', (3, 3)), Image.new('RGB', (1000, 2)), Image.new('RGB', (6000, 40)), image_1)"],
    )
    sizes = [Image.open(path).size for path in result.images]
    assert sizes == [(28, 28), (5600, 28), (6000, 40), (64, 48)]  # 1000x2: stretched to 1:200, then scaled up


def test_exceptions_are_tracebacks_and_the_session_survives(sandbox, image, out_dir):
    _, failed, after = run_cells(sandbox, [image], out_dir, ["kept = 5", "def f():\n    return 1 / 0\nf()", "print(kept)"])
    assert "ZeroDivisionError: division by zero" in failed.stderr and 'File "<cell 2>", line 2, in f' in failed.stderr
    assert "_kernel.py" not in failed.stderr and not failed.failed
    assert after.stdout == "5\n"


def test_concurrent_sessions_never_see_each_others_image_1(sandbox, tmp_path):
    colors = [(index * 30, 255 - index * 30, 7) for index in range(6)]
    paths = []
    for index, color in enumerate(colors):
        paths.append(tmp_path / f"{index}" / "image.png")  # one file name for all, as rollouts have
        paths[-1].parent.mkdir()
        Image.new("RGB", (32, 32), color).save(paths[-1])

    async def one(index):
        session = sandbox.session([paths[index]], tmp_path / f"out{index}")
        try:
            await session.run(f"mine_{index} = image_1.getpixel((0, 0))\ndisplay(image_1)")
            await asyncio.sleep(0.2)  # every session has loaded its image before any looks again
            return await session.run("print(image_1.getpixel((5, 5)), sorted(n for n in globals() if n.startswith('mine_')))")
        finally:
            await session.close()

    async def main():
        return await asyncio.gather(*(one(index) for index in range(len(colors))))

    results = asyncio.run(main())
    assert [r.stdout for r in results] == [f"{color} ['mine_{index}']\n" for index, color in enumerate(colors)]


def test_requests_without_the_right_token_are_refused(sandbox, image, out_dir):
    assert get(sandbox, "/ready")[0] == 200
    assert get(sandbox, "/ready", token="wrong")[0] == 401
    request = urllib.request.Request(sandbox.url + "/sessions", json.dumps({"images": [], "out_dir": "/tmp"}).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    with pytest.raises(SandboxError, match="401"):
        run_cells(SandboxClient(sandbox.url, "not-the-token"), [image], out_dir, ["1"])


def test_a_missing_image_is_refused_naming_it(sandbox, tmp_path):
    with pytest.raises(SandboxError, match="400.*image_1: cannot open .*nope.png: No such file"):
        run_cells(sandbox, [tmp_path / "nope.png"], tmp_path, ["1"])


# ---- hostile code --------------------------------------------------------------------------------

STUBBORN_LOOP = """
import signal, time
for sig in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGXCPU):
    signal.signal(sig, signal.SIG_IGN)
while True:
    try:
        time.sleep(0.01)
    except BaseException:
        pass
"""


@pytest.mark.parametrize(
    "cell",
    ["while True:\n    pass", STUBBORN_LOOP, "import time\ntime.sleep(60)"],
    ids=["infinite-loop", "catches-timeouts", "sleeps-past-deadline"],
)
def test_a_cell_past_the_deadline_is_killed_and_the_kernel_restarts(sandbox, image, out_dir, contained, cell):
    started = time.monotonic()
    lost, killed, after = run_cells(sandbox, [image], out_dir, ["lost = 1", cell, "print(image_1.size)\nlost"])
    assert time.monotonic() - started < LIMITS.timeout_s + 3.0
    assert killed.timed_out and killed.failed and "restarted" in killed.stderr
    assert after.stdout == "(64, 48)\n" and "NameError" in after.stderr


def test_memory_limits_raise_memory_error(sandbox, image, out_dir, contained):
    grow = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))"
    results = run_cells(
        sandbox, [image], out_dir,
        ["blob = bytearray(50 * 2**30)", "import numpy as np\nnp.ones(50 * 2**30 // 8)", grow, "del chunks\nprint('alive')"],
    )
    assert "MemoryError" in results[0].stderr
    assert "Unable to allocate" in results[1].stderr  # numpy's MemoryError subclass
    # Growth stops at the limit; on a box so loaded that it cannot fill 1 GB before the deadline,
    # the deadline stops it instead (and the kernel restarts without `chunks`).
    assert "MemoryError" in results[2].stderr or results[2].timed_out
    assert results[3].stdout == "alive\n" or "NameError" in results[3].stderr


def test_a_fork_bomb_is_contained_and_leaves_no_process_behind(sandbox, image, out_dir, contained):
    mark = f"bomb-{uuid.uuid4().hex}"  # the bomb's working directory tells its processes apart
    bomb = f"import os\nos.mkdir({mark!r})\nos.chdir({mark!r})\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"

    async def main():
        session = sandbox.session([image], out_dir)
        try:
            bombing = asyncio.create_task(session.run(bomb))
            await asyncio.sleep(1.5)
            during = _processes_in(mark)
            return during, await bombing, await session.run("print('alive')")
        finally:
            await session.close()

    during, result, after = asyncio.run(main())
    assert 1 < len(during) <= LIMITS.max_processes
    assert result.timed_out and after.stdout == "alive\n"
    assert _processes_in(mark) == []


def _processes_in(directory_name):
    found = []
    for process in psutil.process_iter():
        try:
            if process.cwd().endswith(directory_name):
                found.append(process.pid)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


def test_no_network_no_host_files_no_writes_outside_scratch(sandbox, image, out_dir, tmp_path, contained):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    outside = tmp_path / "escaped.txt"
    cells = [
        "open('/etc/passwd').read()",
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
        f"open({str(outside)!r}, 'w').write('x')",
        "open('/usr/escaped.txt', 'w').write('x')",
        "open('/escaped.txt', 'w').write('x')",
        f"open({str(image)!r}, 'rb').read()",
        "open('written.txt', 'w').write('ok')\nprint(open('/scratch/written.txt').read(), sorted(os.listdir('/')) if (os := __import__('os')) else 0)",
    ]
    etc, connect, host_path, usr, root, image_path, scratch = run_cells(sandbox, [image], out_dir, cells)
    with pytest.raises(BlockingIOError):
        server.accept()
    server.close()
    assert "FileNotFoundError" in etc.stderr
    assert "Network is unreachable" in connect.stderr
    assert "FileNotFoundError" in host_path.stderr and not outside.exists()
    assert "Read-only file system" in usr.stderr and "Read-only file system" in root.stderr
    assert "FileNotFoundError" in image_path.stderr  # image_1 is open; its host path is not visible
    assert scratch.stderr == "" and scratch.stdout.startswith("ok ['bin',")


def test_sessions_cannot_kill_the_daemon_or_reach_other_sessions(sandbox, image, out_dir, contained):
    status, stats = get(sandbox, "/stats")
    assert status == 200
    daemon_scratch = os.path.dirname(out_dir)  # a host path: not visible in the sandbox
    cells = [
        f"import os, signal\nfor pid in ({stats['pid']}, {stats['forkserver_pid']}):\n"
        "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError as error:\n        print(pid, type(error).__name__)",
        "try:\n    os.kill(-1, signal.SIGKILL)\nexcept ProcessLookupError:\n    pass\nprint('survived', os.getpid(), sorted(p for p in os.listdir('/proc') if p.isdigit()))",
        "print('secret' in globals(), os.listdir('/scratch'), os.path.exists('/scratch/../secret.txt'))",
        f"print(os.path.exists({daemon_scratch!r}))",
        "import ctypes\nprint(ctypes.CDLL(None).unshare(0x10000000))",  # a nested user namespace: refused
    ]
    kill, kill_all, look, host, nested = run_cells(sandbox, [image], out_dir, cells)
    assert kill.stdout == f"{stats['pid']} ProcessLookupError\n{stats['forkserver_pid']} ProcessLookupError\n"
    assert kill_all.stdout == "survived 1 ['1']\n"  # pid 1 of its own namespace: nothing else to signal
    assert look.stdout == "False [] False\n"
    assert host.stdout == "False\n" and nested.stdout == "-1\n"
    assert psutil.pid_exists(stats["pid"]) and psutil.pid_exists(stats["forkserver_pid"])


def test_huge_output_is_truncated_with_a_marker(sandbox, image, out_dir, contained):
    (result,) = run_cells(sandbox, [image], out_dir, ["for _ in range(200_000):\n    print('spam ' * 20)\nprint('END')"])
    assert len(result.stdout) < 11_000
    assert "characters truncated" in result.stdout and result.stdout.rstrip().endswith("END")


def test_a_kernel_that_dies_is_reported_and_restarted(sandbox, image, out_dir, contained):
    lost, exited, after = run_cells(sandbox, [image], out_dir, ["lost = 1", "import os\nos._exit(3)", "lost"])
    assert exited.failed and not exited.timed_out and "exit status 3" in exited.stderr
    assert "NameError" in after.stderr


def test_a_cancelled_cell_closes_its_session_and_the_next_cell_starts_fresh(sandbox, image, out_dir, contained):
    async def main():
        session = sandbox.session([image], out_dir)
        try:
            await session.run("kept = 1")
            cell = asyncio.create_task(session.run("import time\ntime.sleep(0.5)\nprint('late')"))
            await asyncio.sleep(0.2)
            cell.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cell
            return await session.run("print('next', 'kept' in globals())")
        finally:
            await session.close()

    assert asyncio.run(main()).stdout == "next False\n"


def test_sessions_over_the_cap_wait_for_one_reaped_when_idle_and_a_dead_forkserver_fails_cleanly(image, tmp_path):
    async def main():
        daemon = SandboxDaemon(tmp_path / "sessions", tmp_path, LIMITS, max_sessions=1, idle_timeout_s=1.0,
                               image_roots=(image.parent,))
        await daemon.start()
        try:
            first = await daemon.open_session([str(image)], tmp_path / "out")
            assert (await daemon.run(first.id, "x = 1"))["stderr"] == ""
            started = time.monotonic()
            second = await daemon.open_session([], tmp_path / "out")  # the only slot frees when `first` is reaped
            waited = time.monotonic() - started
            with pytest.raises(KeyError, match="idle"):
                await daemon.run(first.id, "x")
            second_result = await daemon.run(second.id, "print(2)")
            await daemon.close_session(second.id)
            os.kill(daemon.stats()["forkserver_pid"], 9)  # a dead fork-server: not ready, cells fail cleanly
            await asyncio.sleep(0.2)
            third = await daemon.open_session([], tmp_path / "out")
            return waited, second_result, daemon.forkserver_alive(), await daemon.run(third.id, "1")
        finally:
            await daemon.stop()

    waited, second, alive, third = asyncio.run(main())
    assert 0.5 < waited < 10 and second["stdout"] == "2\n"
    assert not alive and third["failed"] and "fork-server is gone" in third["stderr"]


def test_without_isolation_sessions_still_get_limits_and_their_own_directory(image, tmp_path):
    """isolation=none (trusted code only) keeps the rlimits, the deadline and, as root, a uid per session."""

    async def main():
        daemon = SandboxDaemon(tmp_path / "sessions", tmp_path, LIMITS, isolation="none", image_roots=(image.parent,))
        await daemon.start()
        try:
            session = await daemon.open_session([str(image)], tmp_path / "out")
            cells = ["import os, resource\nprint(os.getcwd() == %r, resource.getrlimit(resource.RLIMIT_NPROC)[0], os.getuid() != 0)" % str(session.scratch),
                     "print(image_1.size)", "while True:\n    pass"]
            return [await daemon.run(session.id, cell) for cell in cells]
        finally:
            await daemon.stop()

    where, size, loop = asyncio.run(main())
    assert where["stdout"] == f"True {LIMITS.max_processes} True\n"
    assert size["stdout"] == "(64, 48)\n" and loop["timed_out"]


@pytest.mark.slow
def test_as_a_normal_user_sessions_are_isolated_in_their_own_user_namespace(image, tmp_path):
    """The branch clusters without root take (user namespace + dropped capabilities), run here
    by starting the daemon as uid 1000 of a user namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare")
    port, token_file = free_port(), new_token_file(tmp_path)
    command = ["unshare", "--user", "--map-user=1000", "--map-group=1000", "--"]
    command += daemon_command(port, token_file, tmp_path / "sessions", LIMITS, store_root=tmp_path,
                              image_roots=[image.parent])
    service = LocalService("sandbox", command, port, read_token(token_file), tmp_path / "sandbox.log")
    cells = [
        "import os, socket\nprint(os.getuid(), os.getpid(), os.listdir('/proc/self/fd') and 'ok')",
        "open('/etc/passwd')",
        "socket.create_connection(('127.0.0.1', 9), timeout=2)",
        "import ctypes\nprint(ctypes.CDLL(None).unshare(0x10000000))",  # a nested user namespace: refused
        "image_1.crop((0, 0, 30, 30))",  # the daemon reads it through the kernel's root
    ]
    with local_services([service], ready_timeout_s=120):
        who, etc, connect, nested, crop = run_cells(SandboxClient(service.url, service.token), [image], tmp_path, cells)
    assert who.stdout == "0 1 ok\n"  # root of its own user namespace, pid 1 of its own pid namespace
    assert "FileNotFoundError" in etc.stderr and "Network is unreachable" in connect.stderr
    assert nested.stdout == "-1\n"
    assert len(crop.images) == 1 and Image.open(crop.images[0]).size == (30, 30), crop


@pytest.mark.slow
def test_the_daemon_refuses_to_start_where_sessions_cannot_be_isolated(tmp_path):
    """Inside a user namespace that forbids nested ones, isolation is impossible: the daemon
    says so and exits, unless told the code is trusted."""
    if shutil.which("bwrap") is None:
        pytest.skip("needs bwrap to make a machine without user namespaces")
    token_file = new_token_file(tmp_path)
    no_userns = ["bwrap", "--unshare-user", "--disable-userns", "--uid", "1000", "--dev-bind", "/", "/", "--"]
    command = no_userns + daemon_command(free_port(), token_file, tmp_path / "s", store_root=tmp_path)
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "cannot be isolated" in refused.stderr and "--isolation none" in refused.stderr
