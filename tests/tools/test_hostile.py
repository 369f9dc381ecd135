"""The attacks of the sandbox and services hardening issue, each tried as a new user would: real
daemon, real fork-server, real namespaces and cgroups, the real search service and agent loop.

The daemon is started the way the node agent starts it: from a process whose environment holds
secrets (canaries here). After the suite the daemon is still healthy and starts a session as
fast as it did at the beginning.
"""

import asyncio
import hashlib
import json
import os
import shutil
import signal
import time
import urllib.error
import urllib.request

import psutil
import pytest
from aiohttp.test_utils import make_mocked_request
from PIL import Image

from deepeyes.agent import protocol
from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.loop import EpisodeLimits, rollout
from deepeyes.agent.tool_session import Toolbox
from deepeyes.data.image_store import ImageStore
from deepeyes.data.schema import Record
from deepeyes.model import load_processor
from deepeyes.model.pixels import PixelCache
from deepeyes.rollout.api import GenerateResult
from deepeyes.rollout.hf_engine import request_inputs
from deepeyes.service import (
    LocalService,
    auth_headers,
    free_port,
    local_services,
    new_token_file,
    python_module,
    read_token,
)
from deepeyes.tools import SandboxClient, SandboxLimits, daemon_command
from deepeyes.tools.sandbox_daemon import MAX_FRAME
from deepeyes.tools.search_service import LocalSearch, SearchServer

LIMITS = SandboxLimits(timeout_s=40.0, memory_mb=1024, max_processes=32, scratch_mb=64, cpu_s=30)
CANARY = "canary-7f3e9b1c2d"
SECRETS = {"OPENAI_API_KEY": f"sk-{CANARY}", "WANDB_API_KEY": f"wandb-{CANARY}", "SERPAPI_API_KEY": f"serp-{CANARY}"}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """The job's store root (inputs and outputs), and a directory outside every root."""
    return tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("elsewhere")


@pytest.fixture(scope="module")
def daemon(roots, tmp_path_factory):
    """A daemon started as the node agent starts roles: with this process's whole environment,
    which holds API keys."""
    store, _ = roots
    directory = tmp_path_factory.mktemp("daemon")
    port, token_file = free_port(), new_token_file(directory)
    command = daemon_command(port, token_file, directory / "sessions", LIMITS, max_sessions=4, store_root=store)
    service = LocalService("sandbox", command, port, read_token(token_file), directory / "sandbox.log", env=SECRETS)
    with local_services([service], ready_timeout_s=120):
        client = SandboxClient(service.url, service.token)
        client.directory = directory
        client.start_s = session_start_s(client, store)
        yield client


@pytest.fixture(scope="module")
def image(roots):
    path = roots[0] / "photo.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return path


def call(client, method, path, body=None, timeout=60):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(client.url + path, data, auth_headers(client.token), method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def run_cells(client, images, out_dir, cells):
    async def main():
        session = client.session(images, out_dir)
        try:
            return [await session.run(cell) for cell in cells]
        finally:
            await session.close()

    return asyncio.run(main())


def session_start_s(client, store) -> float:
    """Median time to open a session and run its first cell."""
    times = []
    for _ in range(3):
        started = time.monotonic()
        (result,) = run_cells(client, [], store, ["1"])
        times.append(time.monotonic() - started)
        assert result.stdout == "1\n"
    return sorted(times)[1]


def stats(client):
    status, body = call(client, "GET", "/stats")
    assert status == 200
    return body


def needs_cgroups(client):
    if stats(client)["cgroups"] is None:
        pytest.skip("the host delegates no cgroup to the daemon: sessions are bounded per process only")


# ---- 1. secrets ------------------------------------------------------------------------------

# The canary's value never appears in the cell (its own code is in the memory it scans): a
# pattern that matches the planted values, and not itself, is searched for instead.
READ_SECRETS = r"""
import ctypes, os, re
canary = re.compile(rb'(sk|wandb|serp)-canary-[0-9a-f]{10}')
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: /proc/self/environ and mem readable
scanned, hits = 0, []
def look(where, data):
    global scanned
    scanned += len(data)
    if canary.search(data):
        hits.append(where)
try:
    look('environ', open('/proc/self/environ', 'rb').read())
except OSError as error:
    print('environ', error)
fields = open('/proc/self/stat').read().rsplit(')', 1)[1].split()
env_start, env_end = int(fields[47]), int(fields[48])  # fields 50 and 51 of proc(5)
look('env_start..env_end', ctypes.string_at(env_start, env_end - env_start))
with open('/proc/self/maps') as maps, open('/proc/self/mem', 'rb', 0) as mem:
    for line in maps:
        span, perms = line.split()[:2]
        if 'r' not in perms:
            continue
        start, end = (int(x, 16) for x in span.split('-'))
        for offset in range(start, end, 16 << 20):
            try:
                mem.seek(offset)
                look(line.split()[-1], mem.read(min(16 << 20, end - offset) + 64))
            except (OSError, OverflowError, ValueError):
                pass
for pid in [p for p in os.listdir('/proc') if p.isdigit()] + [str(os.getppid())]:
    for name in ('environ', 'cmdline', 'mem'):
        try:
            look(f'/proc/{pid}/{name}', open(f'/proc/{pid}/{name}', 'rb').read(1 << 20))
        except OSError:
            pass
print('scanned', scanned > 10_000_000, hits)
"""


def test_no_secret_of_the_launching_process_reaches_a_cell(daemon, image, roots):
    crash_dumping = "import ctypes\nctypes.CDLL(None).prctl(4, 1, 0, 0, 0)\nctypes.string_at(0)"  # SIGSEGV, dumpable
    scan, crash, after = run_cells(daemon, [image], roots[0], [READ_SECRETS, crash_dumping, "import os\nprint(os.listdir('.'))"])
    assert scan.stdout.splitlines()[-1] == "scanned True []", scan
    assert crash.failed and "SIGSEGV" in crash.stderr and after.stdout == "[]\n"  # no core file, not even in scratch
    # neither the daemon nor its fork-server hold one: they run from an allowlisted environment
    for pid in (stats(daemon)["pid"], stats(daemon)["forkserver_pid"]):
        assert CANARY not in open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")
    for path in daemon.directory.rglob("*"):
        assert not path.is_file() or CANARY.encode() not in path.read_bytes(), path


# ---- 2. bounded per session ------------------------------------------------------------------

FLOOD = """
import os, struct
def is_socket(fd):
    try:
        return os.readlink(f'/proc/self/fd/{fd}').startswith('socket:')
    except OSError:
        return False
sockets = [int(fd) for fd in os.listdir('/proc/self/fd') if is_socket(fd)]
chunk = b'x' * (1 << 20)
for fd in sockets:
    os.write(fd, struct.pack('>I', 0xFFFFFFF0))
while True:
    for fd in sockets:
        os.write(fd, chunk)
"""


def test_a_lying_length_prefix_ends_the_session_without_growing_the_daemon(daemon, image, roots):
    before = psutil.Process(stats(daemon)["pid"]).memory_info().rss
    flood, after = run_cells(daemon, [image], roots[0], [FLOOD, "print('fresh')"])
    grown = psutil.Process(stats(daemon)["pid"]).memory_info().rss - before
    assert flood.failed and f"over the sandbox's {MAX_FRAME}-byte limit" in flood.stderr and "kernel was killed" in flood.stderr
    assert grown < 64 << 20, f"the daemon grew by {grown >> 20} MB"
    assert after.stdout == "fresh\n"


def test_lifting_the_output_cap_inside_the_sandbox_does_not_lift_it(daemon, image, roots):
    lift = "import sys\nsys.stdout._head_limit = sys.stdout._tail_limit = 10**9\n"
    medium, huge, after = run_cells(daemon, [image], roots[0], [
        lift + "print('a' * 100_000)\nprint('END')",
        lift + "print('b' * 50_000_000)",
        "print('fresh')",
    ])
    assert len(medium.stdout) < 10_500 and "characters dropped by the sandbox" in medium.stdout
    assert medium.stdout.rstrip().endswith("END") and not medium.failed
    assert huge.failed and "over the sandbox's" in huge.stderr and huge.stdout == ""
    assert after.stdout == "fresh\n"
    assert stats(daemon)["counts"]["output_chars_dropped"] >= 89_000


MANY_PROCESSES = """
import os, time
import numpy as np
children, pipes = [], []
for _ in range(4):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        held = np.ones(350 << 20, dtype=np.uint8)  # every page touched
        os.write(write, b'k')
        time.sleep(60)
        os._exit(0)
    children.append(pid)
    pipes.append(read)
    os.close(write)
    os.set_blocking(read, False)
settled, deadline = {}, time.monotonic() + 25  # each child allocated, or was killed
while len(settled) < len(children) and time.monotonic() < deadline:
    for pid, read in zip(children, pipes):
        if pid not in settled:
            try:
                if os.read(read, 1) == b'k':
                    settled[pid] = 'holding'
            except BlockingIOError:
                pass
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                settled[pid] = 'killed'
    time.sleep(0.05)
time.sleep(1)
alive = [pid for pid in children if settled.get(pid) == 'holding' and os.waitpid(pid, os.WNOHANG) == (0, 0)]
print(len(settled), 'holding', len(alive))
"""


def test_memory_is_bounded_per_session_not_per_process(daemon, image, roots):
    needs_cgroups(daemon)
    result, after = run_cells(daemon, [image], roots[0], [MANY_PROCESSES, "print('fresh')"])
    # 4 x 350 MB, each under the per-process limit: the session's 1024 MB hold at most two at once
    assert result.failed or (result.stdout.startswith("4 holding") and int(result.stdout.split()[-1]) <= 2), result
    assert after.stdout == "fresh\n"


MEMFDS = """
import os
held, mb = [], 0
try:
    while mb < 1500:
        fd = os.memfd_create('hold')
        os.write(fd, b'x' * (15 << 20))
        held.append(fd)
        mb += 15
except OSError as error:
    print(type(error).__name__)
print('held', mb)
"""


def test_memfd_pages_count_against_the_session(daemon, image, roots):
    needs_cgroups(daemon)
    result, after = run_cells(daemon, [image], roots[0], [MEMFDS, "print('fresh')"])
    assert result.failed or int(result.stdout.split()[-1]) <= LIMITS.memory_mb, result
    assert "held 1500" not in result.stdout
    assert after.stdout == "fresh\n"


DISK_FILL = """
import os
written = 0
try:
    while written < 600:
        with open(f'fill{written}', 'wb') as file:
            for _ in range(8):
                file.write(b'x' * (1 << 20))
                file.flush()
                written += 1
except OSError as error:
    print(error.strerror)
print('written', written)
"""


def test_filling_the_disk_is_an_error_in_the_cell_not_on_the_host(daemon, image, roots):
    free_before = shutil.disk_usage(daemon.directory).free
    result, after = run_cells(daemon, [image], roots[0], [DISK_FILL, "import os\nprint(sum(os.path.getsize(f) for f in os.listdir('.')) >> 20)"])
    assert "No space left on device" in result.stdout and int(result.stdout.split()[-1]) <= LIMITS.scratch_mb, result
    assert shutil.disk_usage(daemon.directory).free > free_before - (32 << 20)  # nothing reached the host's disk
    assert int(after.stdout) <= LIMITS.scratch_mb


def test_processes_left_by_a_cell_are_killed_before_the_next(daemon, image, roots):
    spawn = "import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        time.sleep(600)\n        os._exit(0)\nprint('spawned')"
    look = "import os\nprint(sorted(p for p in os.listdir('/proc') if p.isdigit()))"
    spawned, looked, again = run_cells(daemon, [image], roots[0], [spawn, look, spawn])
    assert spawned.stdout == "spawned\n" and "3 background process(es) the cell left running were killed" in spawned.stderr
    assert looked.stdout == "['1']\n"  # killed, and reaped
    assert again.stdout == "spawned\n" and not again.failed


# ---- 3. images checked at the boundary -------------------------------------------------------

DEGENERATE = """
from PIL import Image
notebook = display.__self__
name = lambda k: f'cell{notebook._cell:03d}_{k:02d}.png'
Image.new('L', (400, 1), 255).save(name(1), format='PNG')                       # a line: aspect 400
Image.new('P', (40, 30)).save(name(2), format='GIF')                           # a GIF named .png
frames = [Image.new('RGB', (50, 50), c) for c in ('red', 'green', 'blue')]
frames[0].save(name(3), format='GIF', save_all=True, append_images=frames[1:])  # animated
Image.new('1', (8000, 3000)).save(name(4), format='PNG')                       # 24 MP: over the budget
open(name(5), 'wb').write(b'not an image at all')
import os
os.symlink('/proc/self/environ', name(6))
notebook._saved += [name(k) for k in range(1, 7)]
"""


class DegeneratePolicy:
    """Turn 1 returns degenerate images (bypassing the kernel's own display); turn 2 answers."""

    def __init__(self, encoder, pixels, pad_id):
        self._encoder, self._pixels, self._pad_id = encoder, pixels, pad_id

    async def generate(self, request) -> GenerateResult:
        request_inputs([request], self._pixels, self._pad_id)  # every image decoded as the engine does
        if request.input_ids.count(self._encoder.im_start) == 3:
            ids = self._encoder.content(f"<think>x</think>\n<code>\n```python\n{DEGENERATE}\n```\n</code>", [])
            return GenerateResult(ids, [-0.5] * len(ids), "stop", 0)
        ids = self._encoder.content("<think>done</think>\n<answer>7</answer>", []) + [self._encoder.im_end]
        return GenerateResult(ids, [-0.5] * len(ids), "eos", 0)

    async def close(self) -> None:
        pass


def test_degenerate_returned_images_never_fail_the_agent_loop(daemon, roots, tiny_dir):
    processor = load_processor(tiny_dir)
    pixels = PixelCache(processor.image_processor, 3136, 50176)
    encoder = ChatEncoder(processor.tokenizer, pixels.tokens)
    store = roots[0] / "step"
    toolbox = Toolbox(LocalSearch(), daemon, store, image_pixels=pixels.pixels, max_trajectory_pixels=0)
    photo = roots[0] / "question.png"
    Image.new("RGB", (64, 64), "white").save(photo)
    record = Record("r0", "What is shown?", (photo,), "7", "perception")
    policy = DegeneratePolicy(encoder, pixels, processor.tokenizer.pad_token_id)
    (trajectory,) = asyncio.run(rollout([record], 1, 0, 0, policy, encoder, toolbox, EpisodeLimits(3, 4096, 8192), progress=False))
    assert trajectory.finish == "answer"
    returned = trajectory.images[1:]
    # The daemon fits them (at least 28 pixels a side, at most 200:1, one frame), then the default
    # protocol variant shows them as the released environment does (a side under 32 scaled up).
    fitted = [(5600, 28), (40, 30), (50, 50)]
    assert [Image.open(path).size for path in returned] == [protocol.release_image_size(Image.new("L", s)).size for s in fitted]
    assert all(Image.open(path).format == "PNG" for path in returned)
    observation = trajectory.observations[0]
    assert "[image 4 not returned: 8000x3000 pixels" in observation
    assert "[image 5 not returned: not a readable image" in observation
    assert "[image 6 not returned:" in observation


# ---- 4. no slot or scratch leaks -------------------------------------------------------------


def test_bad_out_dirs_are_refused_before_taking_a_slot_and_ready_reports_saturation(daemon, image, roots):
    store, _ = roots
    blocker = store / "a-file"
    blocker.write_text("not a directory")
    for attempt in range(12):  # thrice the daemon's 4 slots
        status, body = call(daemon, "POST", "/sessions", {"images": [str(image)], "out_dir": str(blocker / f"out{attempt}")})
        assert status == 400 and "cannot be made" in body["error"], body
    for bad in ({"images": "x", "out_dir": str(store)}, {"images": [], "out_dir": 5}, {"images": [7], "out_dir": str(store)}):
        assert call(daemon, "POST", "/sessions", bad)[0] == 400
    status, ready = call(daemon, "GET", "/ready")
    assert status == 200 and ready["sessions"] == 0 and not ready["saturated"]
    sessions = [call(daemon, "POST", "/sessions", {"images": [], "out_dir": str(store)})[1]["session"] for _ in range(4)]
    status, ready = call(daemon, "GET", "/ready")
    assert status == 503 and ready["saturated"] and ready["sessions"] == 4
    for session in sessions:
        call(daemon, "DELETE", f"/sessions/{session}")
    assert call(daemon, "GET", "/ready")[0] == 200


# ---- 5. least privilege for token holders ----------------------------------------------------


def test_images_and_out_dirs_outside_the_roots_are_refused(daemon, roots):
    store, elsewhere = roots
    private = elsewhere / "private.png"
    Image.new("RGB", (8, 8)).save(private)
    private.chmod(0o600)
    link = store / "link-to-private.png"
    link.symlink_to(private)
    for images, out_dir in (
        ([str(private)], str(store)),
        ([str(link)], str(store)),
        (["/etc/hostname"], str(store)),
        ([], "/etc/deepeyes-out"),
        ([], str(elsewhere / "out")),
        ([], str(store / ".." / elsewhere.name)),
    ):
        status, body = call(daemon, "POST", "/sessions", {"images": images, "out_dir": out_dir})
        assert status == 400 and "outside this sandbox's roots" in body["error"], (images, out_dir, body)
    assert not os.path.exists("/etc/deepeyes-out") and not (elsewhere / "out").exists()


def test_the_image_store_never_writes_through_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    store = ImageStore(tmp_path / "store")
    image = tmp_path / "image.png"
    Image.new("RGB", (4, 4), "red").save(image)
    data = image.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    shard = tmp_path / "store" / digest[:2]
    shard.mkdir(parents=True)
    final = shard / f"{digest}.png"
    for pid in range(os.getpid() - 50, os.getpid() + 50):  # the names a predictable writer would use
        (shard / f".{final.name}.{pid}.partial").symlink_to(victim)
    final.symlink_to(victim)
    assert store.put(data) == final and final.read_bytes() == data and not final.is_symlink()
    assert victim.read_text() == "precious"
    # a shard directory replaced by a link is refused, not written through
    other = Image.new("RGB", (5, 5), "blue")
    other.save(tmp_path / "other.png")
    other_data = (tmp_path / "other.png").read_bytes()
    other_shard = tmp_path / "store" / hashlib.sha256(other_data).hexdigest()[:2]
    if not other_shard.exists():
        (tmp_path / "outside").mkdir()
        other_shard.symlink_to(tmp_path / "outside")
        with pytest.raises(OSError):
            store.put(other_data)
        assert list((tmp_path / "outside").iterdir()) == []


@pytest.fixture
def search_service(sample_data, tmp_path):
    token_file = new_token_file(tmp_path)
    port = free_port()
    argv = python_module("deepeyes.tools.search_service", "--port", port, "--token-file", token_file,
                         "--corpus", sample_data.corpus, "--image-index", sample_data.image_index)
    service = LocalService("search", argv, port, read_token(token_file), tmp_path / "search.log")
    with local_services([service], ready_timeout_s=60):
        yield service


def test_search_reads_no_proc_path_and_stops_at_once(search_service):
    client = SandboxClient(search_service.url, search_service.token)  # only for its url and token
    for path in ("/proc/self/pagemap", "/proc/self/environ", "/etc/hostname", "/dev/zero"):
        started = time.monotonic()
        status, body = call(client, "POST", "/image_search", {"image": path, "k": 3}, timeout=10)
        assert status == 400 and "outside the search service's image roots" in body["error"], body
        assert time.monotonic() - started < 2
    started = time.monotonic()
    search_service._signal(signal.SIGTERM)
    search_service.process.wait(10)
    assert time.monotonic() - started < 5


def test_the_search_cache_is_bounded_in_bytes(tmp_path):
    class Echo:
        async def search(self, query, k):
            return [protocol.TextHit(query[:100], "https://example.org", "x" * 200_000)]

        async def image_search(self, image, k):
            return []

    server = SearchServer(Echo(), "token", cache_bytes=1 << 20)

    async def queries():
        for index in range(40):
            body = json.dumps({"query": f"q{index} " + "w" * 4000, "k": 1}).encode()
            request = make_mocked_request("POST", "/search", headers={"Content-Type": "application/json"})
            request._read_bytes = body
            await server.text(request)

    asyncio.run(queries())
    assert server.cached_bytes <= 1 << 20 and server.counts["backend_calls"] == 40


# ---- afterwards ------------------------------------------------------------------------------


def test_after_the_attacks_the_daemon_is_healthy_and_starts_sessions_as_fast(daemon, roots):
    assert call(daemon, "GET", "/ready")[0] == 200
    assert stats(daemon)["sessions"] == 0
    assert session_start_s(daemon, roots[0]) < max(3 * daemon.start_s, daemon.start_s + 0.5)
