"""Code sandbox latency, throughput, start time and memory against the floor and against Jupyter.

    python bench/sandbox.py [--runs 60] [--concurrent-calls 20] [--sessions 8]

Three ways to run the same notebook cells on the same 2048x1536 photo, measured in this run:

- floor:    exec() in a plain process, image_1 preloaded: no isolation, no IPC (the best possible);
- sandbox:  deepeyes' sandbox daemon over its client (HTTP on loopback, a forked, namespaced session);
- jupyter:  an ipykernel per session driven through jupyter_client, the conventional design
            (DeepEyesV2's sandbox adds HTTP and base64 images on top of it).

Calls interleave round-robin across the three, so load from other processes on a shared box
hits all of them alike. Needs the bench extra: `pip install -e .[bench]`. Last line:
`RESULT {json}` with the ratios the sandbox issue sets targets for.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import io
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from deepeyes.service import auth_headers
from deepeyes.tools import LocalSandbox, SandboxLimits

SNIPPET = (  # what the model does most: zoom into a region and look at it
    "crop = image_1.crop((768, 576, 1280, 960))\n"
    "zoomed = crop.resize((crop.width * 2, crop.height * 2))\n"
    "zoomed.save('zoomed.png')\n"
    "print(zoomed.size)"
)
TRIVIAL = "x = 1 + 1"


def make_photo(path: Path) -> None:
    """A 2048x1536 JPEG with photo-like content (gradients plus noise), deterministic."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:1536, 0:2048]
    base = np.stack([x / 2048 * 255, y / 1536 * 255, (x + y) / 3584 * 255], axis=-1)
    pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"p50_ms": ms(statistics.median(ordered)), "p99_ms": ms(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))])}


# ---- the three designs ----------------------------------------------------------------------


class Floor:
    """exec() in a process of its own with image_1 preloaded: no isolation, and no IPC in the
    timing (measured around exec itself). Its own process, forked before the bench starts any
    threads, so that nothing else in the bench contends for its GIL."""

    def __init__(self, image: Path, workdir: Path):
        self._conn, theirs = multiprocessing.get_context("fork").Pipe()
        self._process = multiprocessing.get_context("fork").Process(
            target=_floor_loop, args=(str(image), str(workdir), theirs), daemon=True
        )
        self._process.start()

    def run(self, code: str) -> float:
        return self.run_many(code, 1)

    def run_many(self, code: str, calls: int) -> float:
        """Seconds for `calls` runs of the cell, back to back."""
        self._conn.send((code, calls))
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send(None)
        self._process.join()


def _floor_loop(image: str, workdir: str, conn) -> None:
    # A session of its own, as sandbox kernels and Jupyter kernels have: with the scheduler's
    # autogroups, CPU is shared per session, so otherwise the floor would run at a handicap.
    os.setsid()
    namespace = {"image_1": Image.open(image)}
    namespace["image_1"].load()
    os.chdir(workdir)
    while (request := conn.recv()) is not None:
        code, calls = request
        compiled = compile(code, "<cell>", "exec")
        sys.stdout = io.StringIO()
        started = time.perf_counter()
        for _ in range(calls):
            exec(compiled, namespace)
        conn.send(time.perf_counter() - started)


class Sandbox:
    """One session of the sandbox daemon, driven from its own event loop thread."""

    def __init__(self, client, image: Path | None, out_dir: Path):
        self.session = client.session([image] if image else [], out_dir)
        self.loop = asyncio.new_event_loop()

    def run(self, code: str) -> float:
        started = time.perf_counter()
        result = self.loop.run_until_complete(self.session.run(code))
        elapsed = time.perf_counter() - started
        if result.stderr:
            raise RuntimeError(f"sandbox cell failed: {result.stderr}")
        return elapsed

    def close(self) -> None:
        self.loop.run_until_complete(self.session.close())
        self.loop.close()


class Jupyter:
    """An ipykernel started and driven through jupyter_client."""

    def __init__(self, workdir: Path):
        from jupyter_client.manager import start_new_kernel

        self.manager, self.client = start_new_kernel(
            kernel_name="python3", cwd=str(workdir), extra_arguments=["--IPKernelApp.log_level=ERROR"]
        )

    def run(self, code: str) -> float:
        started = time.perf_counter()
        reply = self.client.execute_interactive(code, timeout=120, output_hook=lambda message: None)
        elapsed = time.perf_counter() - started
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"jupyter cell failed: {reply['content']}")
        return elapsed

    def pss(self) -> int:
        return psutil.Process(self.manager.provisioner.process.pid).memory_full_info().pss

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def load_image_cell(image: Path) -> str:
    return f"from PIL import Image\nimage_1 = Image.open({str(image)!r})\nimage_1.load()"


# ---- measurements -----------------------------------------------------------------------------


def latency(floor: Floor, sandbox: Sandbox, jupyter: Jupyter, code: str, runs: int) -> dict:
    samples = {"floor": [], "sandbox": [], "jupyter": []}
    for _ in range(runs):
        samples["floor"].append(floor.run(code))
        samples["sandbox"].append(sandbox.run(code))
        samples["jupyter"].append(jupyter.run(code))
    return {name: summary(values) for name, values in samples.items()}


def throughput(floors: list[Floor], client, image: Path, root: Path, calls: int, rounds: int = 4) -> dict:
    """Snippet calls per second with 2 concurrent clients (2 processes / sessions / kernels),
    in rounds that alternate the designs so that outside load hits all three alike."""
    loop = asyncio.new_event_loop()
    sessions = [client.session([image], root / f"s{index}") for index in range(2)]
    for session in sessions:
        loop.run_until_complete(session.run("image_1.load()"))
    kernels = [Jupyter(root) for _ in range(2)]
    for kernel in kernels:
        kernel.run(load_image_cell(image))

    def floor_pair():
        threads = [threading.Thread(target=floor.run_many, args=(SNIPPET, calls)) for floor in floors]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    async def sandbox_client(session):
        for _ in range(calls):
            await session.run(SNIPPET)

    async def both_sessions():
        await asyncio.gather(*(sandbox_client(session) for session in sessions))

    def sandbox_pair():
        loop.run_until_complete(both_sessions())

    def jupyter_pair():
        threads = [threading.Thread(target=lambda k=kernel: [k.run(SNIPPET) for _ in range(calls)]) for kernel in kernels]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    seconds = {"floor": 0.0, "sandbox": 0.0, "jupyter": 0.0}
    for _ in range(rounds):
        for name, pair in (("floor", floor_pair), ("sandbox", sandbox_pair), ("jupyter", jupyter_pair)):
            started = time.perf_counter()
            pair()
            seconds[name] += time.perf_counter() - started
    for session in sessions:
        loop.run_until_complete(session.close())
    loop.close()
    for kernel in kernels:
        kernel.close()
    return {name: round(2 * calls * rounds / total, 2) for name, total in seconds.items()}


def session_start(floor: Floor, client, image: Path, root: Path, sessions: int) -> dict:
    """Time to a first answered cell in a new session: without an image, and with the 3 MP
    photo loaded by that cell (their difference is the image hand-off)."""
    bare, with_image, floor_times = [], [], []
    for index in range(sessions):
        sandbox = Sandbox(client, None, root / "start")
        bare.append(sandbox.run("pass"))
        sandbox.close()
        sandbox = Sandbox(client, image, root / "start")
        with_image.append(sandbox.run("image_1.load()"))
        sandbox.close()
        floor_times.append(floor.run(f"from PIL import Image\nImage.open({str(image)!r}).load()"))
    jupyter = []
    for _ in range(max(3, sessions // 4)):
        started = time.perf_counter()
        kernel = Jupyter(root)
        jupyter.append(time.perf_counter() - started)
        kernel.close()
    return {
        "sandbox_p50_ms": ms(statistics.median(bare)),
        "sandbox_with_image_p50_ms": ms(statistics.median(with_image)),
        "floor_image_open_p50_ms": ms(statistics.median(floor_times)),
        "jupyter_p50_ms": ms(statistics.median(jupyter)),
    }


def base64_handoff(image: Path) -> float:
    """The conventional hand-off: PNG-encode and base64 the image, then decode it back."""
    started = time.perf_counter()
    buffer = io.BytesIO()
    Image.open(image).save(buffer, format="PNG")
    payload = base64.b64encode(buffer.getvalue())
    Image.open(io.BytesIO(base64.b64decode(payload))).load()
    return time.perf_counter() - started


def idle_pss(client, image: Path, root: Path, sessions: int) -> dict:
    """PSS per idle session (after one cell): the session's keeper and kernel processes, whose
    pages are shared with the fork-server until written (PSS splits those among the sharers;
    USS, the private part, is what one more session costs); vs an idle ipykernel."""
    request = urllib.request.Request(client.url + "/stats", headers=auth_headers(client.token))
    with urllib.request.urlopen(request) as response:
        forkserver = psutil.Process(json.load(response)["forkserver_pid"])
    opened = [Sandbox(client, image, root / "pss") for _ in range(sessions)]
    for sandbox in opened:
        sandbox.run(TRIVIAL)
    time.sleep(0.5)
    infos = [[p.memory_full_info() for p in [keeper, *keeper.children()]] for keeper in forkserver.children()]
    per_session = [sum(info.pss for info in session) for session in infos]
    private = [sum(info.uss for info in session) for session in infos]
    for sandbox in opened:
        sandbox.close()
    kernels = [Jupyter(root) for _ in range(2)]
    for kernel in kernels:
        kernel.run(TRIVIAL)
    jupyter = [kernel.pss() for kernel in kernels]
    for kernel in kernels:
        kernel.close()
    return {
        "sandbox_mb": round(statistics.mean(per_session) / 2**20, 2),
        "sandbox_private_mb": round(statistics.mean(private) / 2**20, 2),  # what one more session adds
        "sandbox_sessions_measured": len(per_session),
        "jupyter_mb": round(statistics.mean(jupyter) / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=40, help="calls per design for the latency figures")
    parser.add_argument("--concurrent-calls", type=int, default=5, help="calls per client and round in the throughput run")
    parser.add_argument("--sessions", type=int, default=16, help="sessions started for start time and memory")
    parser.add_argument("--smoke", action="store_true", help="a few calls and sessions: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.concurrent_calls, args.sessions = 3, 2, 2
    if importlib.util.find_spec("jupyter_client") is None:
        sys.exit("bench/sandbox.py compares against a Jupyter kernel: install the bench extra first, "
                 "pip install -e '.[bench]' (jupyter_client, ipykernel)")

    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as tmp:
        root = Path(tmp)
        image = root / "photo.jpg"
        make_photo(image)
        for index in range(3):
            (root / f"floor{index}").mkdir()
        floors = [Floor(image, root / f"floor{index}") for index in range(3)]
        floor = floors[0]
        with LocalSandbox(root / "daemon", SandboxLimits(timeout_s=60)) as client:
            sandbox = Sandbox(client, image, root / "out")
            sandbox.run("image_1.load()")
            jupyter = Jupyter(root)
            jupyter.run(load_image_cell(image))
            for design in (*floors, sandbox, jupyter):  # first-call effects (imports, caches) out of the figures
                design.run(SNIPPET)
            snippet = latency(floor, sandbox, jupyter, SNIPPET, args.runs)
            trivial = latency(floor, sandbox, jupyter, TRIVIAL, args.runs)
            sandbox.close()
            jupyter.close()
            calls_per_s = throughput(floors[1:], client, image, root, args.concurrent_calls)
            start = session_start(floor, client, image, root, args.sessions)
            memory = idle_pss(client, image, root, args.sessions)
        handoff_base64 = statistics.median(base64_handoff(image) for _ in range(5))
        for each in floors:
            each.close()

    handoff = start["sandbox_with_image_p50_ms"] - start["sandbox_p50_ms"]
    report = {
        "image": "2048x1536 JPEG",
        "load_average_1m": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "snippet": snippet,
        "trivial": trivial,
        "calls_per_s_2_clients": calls_per_s,
        "session_start": start,
        "idle_pss": memory,
        "image_handoff_ms": {"sandbox_path": round(handoff, 2), "base64_png": ms(handoff_base64)},
    }
    print(json.dumps(report, indent=2))
    result = {
        "snippet_p50_vs_floor": round(snippet["sandbox"]["p50_ms"] / snippet["floor"]["p50_ms"], 3),
        "snippet_p99_vs_floor": round(snippet["sandbox"]["p99_ms"] / snippet["floor"]["p99_ms"], 3),
        "snippet_p50_vs_jupyter": round(snippet["sandbox"]["p50_ms"] / snippet["jupyter"]["p50_ms"], 3),
        "trivial_p50_ms": {name: value["p50_ms"] for name, value in trivial.items()},
        "calls_per_s_vs_floor": round(calls_per_s["sandbox"] / calls_per_s["floor"], 3),
        "calls_per_s_vs_jupyter": round(calls_per_s["sandbox"] / calls_per_s["jupyter"], 3),
        "session_start_p50_ms": start["sandbox_p50_ms"],
        "session_start_vs_jupyter": round(start["sandbox_p50_ms"] / start["jupyter_p50_ms"], 4),
        "idle_session_mb": memory["sandbox_mb"],
        "idle_session_vs_jupyter": round(memory["sandbox_mb"] / memory["jupyter_mb"], 3),
        "image_handoff_ms": round(handoff, 2),
        "image_handoff_vs_base64": round(handoff / 1000 / handoff_base64, 4),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
