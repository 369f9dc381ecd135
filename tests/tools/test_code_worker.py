"""CodeWorker against real kernel processes (and real bwrap sandboxes where it is installed)."""

import asyncio
import logging
import os
import shutil
import socket
import time
import uuid

import psutil
import pytest
from PIL import Image

from deepeyes.tools import CodeLimits, CodeWorker, CodeWorkerError
from deepeyes.tools.code_worker import _resolve_isolation

HAVE_BWRAP = shutil.which("bwrap") is not None
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bwrap not installed (apt-get install bubblewrap)")
# Without bwrap, root ignores RLIMIT_NPROC: a fork bomb would take the box down.
needs_process_limit = pytest.mark.skipif(
    not HAVE_BWRAP and os.geteuid() == 0, reason="as root, only the bwrap sandbox contains a fork bomb"
)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return path


@pytest.fixture
def scratch(tmp_path):
    path = tmp_path / "scratch"
    path.mkdir()
    return path


def run_cells(images, scratch, cells, limits=CodeLimits()):
    """Results of running the cells, in order, in one fresh worker."""

    async def main():
        worker = await CodeWorker.start(images, scratch, limits)
        try:
            return [await worker.run(cell) for cell in cells]
        finally:
            await worker.close()

    return asyncio.run(main())


def test_state_persists_across_cells_and_images_are_preloaded(image, scratch, tmp_path):
    second = tmp_path / "elsewhere" / "photo.png"  # same file name, another directory
    second.parent.mkdir()
    Image.new("L", (5, 7)).save(second)
    cells = ["size = image_1.size", "print(size)", "size[0] * 2", "None", "print(image_2.size, image_2.mode)"]
    results = run_cells([image, second], scratch, cells)
    assert [result.stdout for result in results] == ["", "(64, 48)\n", "128\n", "", "(5, 7) L\n"]
    assert all(result.stderr == "" and not result.timed_out for result in results)


def test_show_and_displayed_images_come_back_as_png_files(image, scratch):
    plot = "import matplotlib.pyplot as plt\nplt.figure(figsize=(2, 1), dpi=50)\nplt.plot([1, 2])\nplt.show()"
    shown, cropped, displayed = run_cells(
        [image], scratch, [plot, "image_1.crop((0, 0, 10, 20))", "display(image_1.resize((8, 8)), 'text')"]
    )
    sizes = []
    for result in (shown, cropped, displayed):
        assert len(result.images) == 1 and result.images[0].parent == scratch, result
        with Image.open(result.images[0]) as png:
            assert png.format == "PNG"
            sizes.append(png.size)
    assert sizes == [(100, 50), (10, 20), (8, 8)]
    assert displayed.stdout == "'text'\n"


def test_a_returned_image_swapped_for_a_symlink_is_not_returned(image, scratch):
    swap = "display(image_1)\nimport os\nos.remove('cell001_01.png')\nos.symlink('/etc/passwd', 'cell001_01.png')"
    swapped, kept = run_cells([image], scratch, [swap, "display(image_1)"])
    assert swapped.images == () and not (scratch / "cell001_01.png").exists()
    assert kept.images == (scratch / "cell002_01.png",)


def test_at_most_ten_images_per_cell_and_the_rest_is_reported(image, scratch):
    (result,) = run_cells([image], scratch, ["for _ in range(12):\n    display(image_1)"])
    assert len(result.images) == 10
    assert "2 more images not returned" in result.stderr


def test_exception_is_reported_as_traceback_and_worker_survives(image, scratch):
    _, failed, after = run_cells([image], scratch, ["kept = 5", "def f():\n    return 1 / 0\nf()", "print(kept)"])
    assert "ZeroDivisionError: division by zero" in failed.stderr
    assert 'File "<cell 2>", line 2, in f' in failed.stderr and "return 1 / 0" in failed.stderr
    assert "_kernel.py" not in failed.stderr and not failed.timed_out
    assert after.stdout == "5\n"


def test_long_output_is_truncated_and_says_so(image, scratch):
    (result,) = run_cells([image], scratch, ["print('a' * 100_000 + 'END')"])
    assert len(result.stdout) < 11_000
    assert "characters truncated" in result.stdout and result.stdout.rstrip().endswith("END")


def test_memory_limit_raises_memory_error_instead_of_taking_the_box(image, scratch):
    results = run_cells(
        [image],
        scratch,
        ["blob = bytearray(50 * 2**30)", "import numpy as np\nnp.ones(50 * 2**30 // 8)", "print('alive')"],
        CodeLimits(memory_mb=1024),
    )
    assert "MemoryError" in results[0].stderr
    assert "Unable to allocate" in results[1].stderr  # numpy's MemoryError subclass
    assert results[2].stdout == "alive\n"


STUBBORN_LOOP = """
import signal, time
for sig in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, signal.SIG_IGN)
while True:
    try:
        time.sleep(0.01)
    except BaseException:
        pass
"""


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["while True:\n    pass", STUBBORN_LOOP], ids=["busy", "ignores-signals"])
def test_timeout_kills_the_cell_and_the_next_cell_gets_a_fresh_kernel(image, scratch, loop):
    limits = CodeLimits(timeout_s=1.5)

    async def main():
        worker = await CodeWorker.start([image], scratch, limits)
        try:
            await worker.run("lost = 1")
            started = time.monotonic()
            timed_out = await worker.run(loop)
            elapsed = time.monotonic() - started
            return timed_out, elapsed, await worker.run("print(image_1.size)\nlost")
        finally:
            await worker.close()

    timed_out, elapsed, after = asyncio.run(main())
    assert timed_out.timed_out and "restarted" in timed_out.stderr
    assert elapsed < limits.timeout_s + 1.0
    assert after.stdout == "(64, 48)\n" and "NameError" in after.stderr


@pytest.mark.slow
@needs_process_limit
def test_fork_bomb_is_contained_and_leaves_no_process_behind(image, scratch):
    mark = f"bomb-{uuid.uuid4().hex}"  # the bomb's working directory tells its processes apart
    bomb = f"import os\nos.mkdir({mark!r})\nos.chdir({mark!r})\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    limits = CodeLimits(timeout_s=3, max_processes=32)

    async def main():
        worker = await CodeWorker.start([image], scratch, limits)
        try:
            bombing = asyncio.create_task(worker.run(bomb))
            await asyncio.sleep(2)
            during = _processes_in(mark)
            return during, await bombing, await worker.run("print('alive')")
        finally:
            await worker.close()

    during, result, after = asyncio.run(main())
    assert 1 < len(during) <= limits.max_processes
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


@needs_bwrap
def test_sandbox_hides_etc_blocks_loopback_and_writes_outside_scratch(image, scratch, tmp_path):
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
        "open('written.txt', 'w').write('ok')",
    ]
    etc, connect, write_host_path, write_usr, write_scratch = run_cells([image], scratch, cells)
    with pytest.raises(BlockingIOError):
        server.accept()
    server.close()
    assert "FileNotFoundError" in etc.stderr
    assert "Error" in connect.stderr
    assert "FileNotFoundError" in write_host_path.stderr and not outside.exists()
    assert "Read-only file system" in write_usr.stderr
    assert write_scratch.stderr == "" and (scratch / "kernel" / "written.txt").read_text() == "ok"


def test_parallel_workers_do_not_see_each_other(image, tmp_path):
    async def one(index):
        scratch = tmp_path / f"scratch{index}"
        scratch.mkdir()
        worker = await CodeWorker.start([image], scratch, CodeLimits())
        try:
            await worker.run(f"mine_{index} = {index}")
            await asyncio.sleep(0.1)  # every worker has set its variable before any looks
            return await worker.run("print(sorted(name for name in globals() if name.startswith('mine_')))")
        finally:
            await worker.close()

    async def main():
        return await asyncio.gather(*(one(index) for index in range(8)))

    results = asyncio.run(main())
    assert [result.stdout for result in results] == [f"['mine_{index}']\n" for index in range(8)]


def test_unreadable_image_fails_start_with_a_clear_error(tmp_path, scratch):
    bogus = tmp_path / "not_an_image.png"
    bogus.write_text("hello")
    with pytest.raises(CodeWorkerError, match="image_1"):
        run_cells([bogus], scratch, [])


def test_isolation_setting_is_checked(tmp_path, monkeypatch, caplog):
    with pytest.raises(ValueError, match="isolation"):
        CodeLimits(isolation="docker")
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on PATH
    _resolve_isolation.cache_clear()
    try:
        with pytest.raises(CodeWorkerError, match="apt-get install bubblewrap"):
            _resolve_isolation("bwrap")
        with caplog.at_level(logging.WARNING):
            assert _resolve_isolation("auto") is None
            assert _resolve_isolation("auto") is None
        assert len([r for r in caplog.records if "WITHOUT isolation" in r.getMessage()]) == 1
    finally:
        _resolve_isolation.cache_clear()


@pytest.mark.slow
def test_kernel_death_is_reported_and_the_next_cell_gets_a_fresh_kernel(image, scratch):
    limits = CodeLimits(cpu_s=1, timeout_s=20)
    lost, burned, after, exited = run_cells(
        [image], scratch, ["lost = 1", "while True:\n    pass", "lost", "import os\nos._exit(3)"], limits
    )
    assert not burned.timed_out and "SIGXCPU" in burned.stderr and "restarted" in burned.stderr
    assert "NameError" in after.stderr
    assert "exit status 3" in exited.stderr


def test_cancelled_cell_leaves_a_usable_worker(image, scratch):
    async def main():
        worker = await CodeWorker.start([image], scratch, CodeLimits())
        try:
            cell = asyncio.create_task(worker.run("import time\ntime.sleep(0.5)\nprint('late')"))
            await asyncio.sleep(0.2)
            cell.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cell
            return await worker.run("print('next')")
        finally:
            await worker.close()

    assert asyncio.run(main()).stdout == "next\n"
