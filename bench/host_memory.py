"""Host memory of one RL step's images: by reference (this repository) vs the per-sample copies
DeepEyesV2's loop keeps, at a realistic rollout-batch shape.

    python bench/host_memory.py [--prompts 16] [--n 8] [--turns 3] [--width 2048] [--height 1536]
                                [--max-pixels 262144] [--pixel-cache-mb 256] [--max-sessions 64]

The README's numbers are from `--prompts 32` (the baseline then peaks near 11 GB; 64 prompts
would need ~20 GB, more than a 24 GB box shared with other work spares).

Each measurement is a fresh worker process running one step's image path for real:

- `prompts` records, each its own `width` x `height` photo-like JPEG; `n` rollouts each through
  the agent loop (`deepeyes.agent.loop.rollout`): turns 1..turns-1 run a code cell in the real
  sandbox daemon that crops a 600 x 450 region of image_1 (a different region per rollout and
  turn) and shows it; the last turn answers.
- A scripted policy stands in for the model: the model's compute lives in GPU memory, and a
  tiny model writes no code. Every request's images are consumed exactly as the hf engine
  consumes them (`deepeyes.rollout.hf_engine.request_inputs`, through the pixel cache).
- The trainer hand-off: every trajectory's model inputs, in micro-batches of 8, as the update's
  forward builds them (`deepeyes.train.forward.sequence_inputs`). Then the step's release.

Two modes, in the same run, with identical work otherwise:

- store:    records, trajectories and tool results hold image-store paths; pixels are decoded
            where consumed, within the bounded pixel cache (`--pixel-cache-mb`).
- baseline: also keeps, per trajectory, what DeepEyesV2's loop keeps per sample: the decoded
            images (`multi_modal_data`, PIL) and the processor outputs (`multi_modal_inputs`) of
            all its images, renewed every turn and held until the update is done.

The parent samples the worker's process tree (worker, sandbox daemon, fork-server, kernels)
every 50 ms: summed PSS (each shared page divided among the processes sharing it, so the sum is
the real host memory; summed RSS counts the kernels' shared pages once per kernel, also reported)
and the worker's own RSS (the trainer's process). Growth per trajectory is the slope between two
batch sizes, (peak(all prompts) - peak(half the prompts)) / (trajectories added): fixed, bounded
costs (the sandbox's concurrent sessions, each holding its decoded image_1; the pixel cache at its
bound) cancel. The extrapolation to the paper's batch (256 prompts x 16 rollouts) on the trainer's
node, which holds every trajectory of the step, is the half-batch peak plus growth x the
trajectories added, at this bench's token count per trajectory (the paper's responses are longer:
their token lists add the same to both modes). Last line: `RESULT {json}`; target `growth_ratio` (store / baseline, PSS) <= 0.05.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageDraw

from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.loop import EpisodeLimits, episode_seed, rollout
from deepeyes.agent.tool_session import Toolbox, clear_scratch
from deepeyes.data.schema import Record
from deepeyes.model import ensure_tiny_model, load_processor
from deepeyes.model.pixels import PixelCache
from deepeyes.rollout.api import GenerateResult
from deepeyes.rollout.hf_engine import request_inputs
from deepeyes.tools import LocalSandbox, SandboxLimits
from deepeyes.tools.search_service import LocalSearch
from deepeyes.train.forward import TokenSequence, sequence_inputs

CROP = (600, 450)
MICRO_BATCH = 8
PAPER_TRAJECTORIES = 256 * 16


def photo(path: Path, width: int, height: int, seed: int) -> Path:
    """A photo-like JPEG: smooth gradients, shapes and mild sensor noise (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([(x / width) * 200 + 30, (y / height) * 180 + 40, ((x + y) / (width + height)) * 220 + 20], -1)
    image = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, width - 200)), int(rng.integers(0, height - 200))
        size = int(rng.integers(40, 400))
        draw.ellipse((x0, y0, x0 + size, y0 + size), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    image.save(path, quality=90)
    return path


class ScriptedPolicy:
    """Crops a region that depends on the request's noise seed, then answers. In baseline mode it
    also keeps each trajectory's decoded images and processor outputs, as DeepEyesV2's loop does."""

    def __init__(self, encoder: ChatEncoder, pixels: PixelCache, processor, pad_id: int, args: argparse.Namespace,
                 retain: dict | None, trajectory_of: dict[int, tuple[int, int]]):
        self._encoder, self._pixels, self._processor, self._pad_id = encoder, pixels, processor, pad_id
        self._width, self._height, self._code_turns = args.width, args.height, args.turns - 1
        self._size = {"shortest_edge": args.min_pixels, "longest_edge": args.max_pixels}
        self.retained, self._trajectory_of = retain, trajectory_of
        self._one_at_a_time = asyncio.Lock()  # the engine serves one batch at a time

    def _consume(self, request) -> None:
        request_inputs([request], self._pixels, self._pad_id)  # decoded where consumed, as the hf engine does
        if self.retained is not None:  # multi_modal_data + multi_modal_inputs of this sample, renewed each turn
            decoded = [Image.open(path).convert("RGB") for path in request.images]
            self.retained[self._trajectory_of[request.sampling.seed]] = (
                decoded, self._processor(images=decoded, size=self._size, return_tensors="pt"),
            )

    async def generate(self, request) -> GenerateResult:
        # Off the event loop, as the hf engine generates in a worker thread: the tool calls of
        # other trajectories go on meanwhile.
        async with self._one_at_a_time:
            await asyncio.to_thread(self._consume, request)
        if request.input_ids.count(self._encoder.im_start) < 3 + 2 * self._code_turns:
            seed = request.sampling.seed
            x, y = seed % (self._width - CROP[0]), (seed // 7919) % (self._height - CROP[1])
            code = f"display(image_1.crop(({x}, {y}, {x + CROP[0]}, {y + CROP[1]})))"
            ids = self._encoder.content(f"<think>Zoom in.</think>\n<code>\n```python\n{code}\n```\n</code>", [])
            return GenerateResult(ids, [-0.5] * len(ids), "stop", 0)
        ids = self._encoder.content("<think>Done.</think>\n<answer>7</answer>", []) + [self._encoder.im_end]
        return GenerateResult(ids, [-0.5] * len(ids), "eos", 0)

    async def close(self) -> None:
        pass


def worker(args: argparse.Namespace) -> None:
    """One step's image path in this process; prints READY before the step and DONE {json} after it."""
    root = Path(args.root)
    processor = load_processor(ensure_tiny_model())
    pixels = PixelCache(processor.image_processor, args.min_pixels, args.max_pixels, args.pixel_cache_mb << 20)
    encoder = ChatEncoder(processor.tokenizer, pixels.tokens)
    pad_id = processor.tokenizer.pad_token_id
    limits = EpisodeLimits(max_turns=args.turns, max_turn_tokens=256, max_response_tokens=100_000)
    records = [
        Record(f"p{index}", "What is in the picture?", (root / "inputs" / f"{index}.jpg",), "7", "perception")
        for index in range(args.prompts)
    ]
    trajectory_of = {episode_seed(0, 0, g, s, t): (g, s) for g in range(args.prompts) for s in range(args.n)
                     for t in range(args.turns)}
    retained = {} if args.mode == "baseline" else None
    policy = ScriptedPolicy(encoder, pixels, processor.image_processor, pad_id, args, retained, trajectory_of)
    with LocalSandbox(root / f"sandbox-{args.mode}", SandboxLimits(timeout_s=120), args.max_sessions) as sandbox:
        toolbox = Toolbox(LocalSearch(), sandbox, root / f"store-{args.mode}-{args.prompts}",
                          image_pixels=pixels.pixels, max_trajectory_pixels=0)
        print("READY", flush=True)
        time.sleep(0.5)  # the parent's idle sample
        started = time.perf_counter()
        trajectories = asyncio.run(rollout(records, args.n, 0, 0, policy, encoder, toolbox, limits, progress=False))
        for start in range(0, len(trajectories), MICRO_BATCH):  # the update's forward inputs
            micro = trajectories[start : start + MICRO_BATCH]
            sequence_inputs(pixels, [TokenSequence(t.input_ids, t.images, [0] * len(t.input_ids)) for t in micro], pad_id)
        failed = sum(not call.ok for t in trajectories for call in t.tool_calls)
        if failed or any(len(t.images) != args.turns for t in trajectories):  # a measurement of less work
            raise RuntimeError(f"{failed} code calls failed (see the sandbox log): the step did not do its work")
        stored = toolbox.store.files()
        references = sum(len(t.images) for t in trajectories)
        result = {
            "trajectories": len(trajectories),
            "finished": sum(t.finish == "answer" for t in trajectories),
            "tool_images": sum(len(t.images) - 1 for t in trajectories),
            "tokens": sum(len(t.input_ids) for t in trajectories),
            "image_references": references,
            "stored_files": len(stored),
            "stored_bytes": sum(p.stat().st_size for p in stored),
            "pixels_processed": pixels.processed,
            "pixel_cache_bytes": pixels.bytes,
            "step_s": time.perf_counter() - started,
        }
        print("PEAKED", flush=True)
        time.sleep(0.3)  # the peak is held while the parent samples
        del trajectories
        if retained is not None:
            retained.clear()
        pixels.release()
        clear_scratch(toolbox.scratch_root)
        result["stored_files_after_release"] = len(toolbox.store.files())
        time.sleep(0.5)
        print("DONE " + json.dumps(result), flush=True)


def tree_memory(root: psutil.Process) -> tuple[int, int, int]:
    """(summed RSS, summed PSS) of a process and all its descendants, and the RSS of the process
    alone. RSS counts a page once per process mapping it, so the forked kernels' shared pages
    are counted many times over; PSS divides each shared page among its sharers: its sum is the
    tree's real host memory."""
    rss = pss = 0
    for process in [root] + root.children(recursive=True):
        try:
            info = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss += info.rss
        pss += info.pss
    return rss, pss, root.memory_info().rss


def measure(args: argparse.Namespace, mode: str, prompts: int, root: Path) -> dict:
    """Run one worker; its tree's memory when idle, at peak, and after the step's release."""
    command = [sys.executable, __file__, "--worker", "--mode", mode, "--prompts", str(prompts), "--root", str(root)]
    for key in ("n", "turns", "width", "height", "min_pixels", "max_pixels", "pixel_cache_mb", "max_sessions"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    tree = psutil.Process(process.pid)
    samples: list[tuple[str, int, int, int]] = []
    phase = ["setup"]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((phase[0], *tree_memory(tree)))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = None
    for line in process.stdout:
        if line.startswith("READY"):
            time.sleep(0.2)
            phase[0] = "idle"
            time.sleep(0.2)
            phase[0] = "step"
        elif line.startswith("PEAKED"):
            time.sleep(0.2)
            phase[0] = "released"
        elif line.startswith("DONE "):
            result = json.loads(line[5:])
            break
    stop.set()
    sampler.join()
    process.wait()
    if result is None or process.returncode:
        raise RuntimeError(f"{mode} worker with {prompts} prompts failed (exit {process.returncode})")
    idle = [s for s in samples if s[0] == "idle"] or [s for s in samples if s[0] == "setup"][-1:]
    step = [s for s in samples if s[0] == "step"]
    released = [s for s in samples if s[0] == "released"]
    result.update(
        idle_rss=min(s[1] for s in idle), idle_pss=min(s[2] for s in idle), idle_trainer_rss=min(s[3] for s in idle),
        peak_rss=max(s[1] for s in step), peak_pss=max(s[2] for s in step), peak_trainer_rss=max(s[3] for s in step),
        released_pss=released[-1][2], released_trainer_rss=released[-1][3], samples=len(step),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--height", type=int, default=1536)
    parser.add_argument("--min-pixels", type=int, default=3136)
    parser.add_argument("--max-pixels", type=int, default=262144, help="per image (Qwen2.5-VL-7B in the paper)")
    parser.add_argument("--pixel-cache-mb", type=int, default=256)
    parser.add_argument("--max-sessions", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("store", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        # tcmalloc keeps freed memory mapped: the RSS and PSS measured would not be glibc's.
        sys.exit(f"bench/host_memory.py measures glibc's malloc; run it without LD_PRELOAD={os.environ['LD_PRELOAD']}")
    if args.worker:
        return worker(args)

    from tqdm import tqdm

    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:  # on disk, not tmpfs: stored files are not RAM
        root = Path(tmp)
        (root / "inputs").mkdir()
        for index in tqdm(range(args.prompts), desc="inputs", leave=False):
            photo(root / "inputs" / f"{index}.jpg", args.width, args.height, index)
        half = args.prompts // 2
        runs = {}
        for mode, prompts in tqdm([("store", half), ("store", args.prompts), ("baseline", half),
                                   ("baseline", args.prompts)], desc="runs"):
            runs[f"{mode}_{prompts}"] = measure(args, mode, prompts, root)
            tqdm.write(f"{mode} {prompts} prompts: {json.dumps(runs[f'{mode}_{prompts}'])}")

    added = (args.prompts - half) * args.n
    result = {"shape": {"prompts": args.prompts, "n": args.n, "turns": args.turns, "input": [args.width, args.height],
                        "max_pixels": args.max_pixels, "pixel_cache_mb": args.pixel_cache_mb,
                        "max_sessions": args.max_sessions}}
    for mode in ("store", "baseline"):
        small, large = runs[f"{mode}_{half}"], runs[f"{mode}_{args.prompts}"]
        growth = {key: (large[f"peak_{key}"] - small[f"peak_{key}"]) / added for key in ("pss", "rss", "trainer_rss")}
        result[mode] = {
            "bytes_per_trajectory": round(growth["pss"]),  # all processes, PSS
            "trainer_rss_bytes_per_trajectory": round(growth["trainer_rss"]),  # the trainer's process alone, RSS
            "rss_sum_bytes_per_trajectory": round(growth["rss"]),  # shared pages counted per process: noisy
            "peak_pss_gb": round(large["peak_pss"] / 1e9, 3),
            "step_pss_gb": round((large["peak_pss"] - large["idle_pss"]) / 1e9, 3),
            "peak_trainer_rss_gb": round(large["peak_trainer_rss"] / 1e9, 3),
            "peak_rss_sum_gb": round(large["peak_rss"] / 1e9, 3),
            "paper_batch_node_gb": round((small["peak_pss"] + growth["pss"] * (PAPER_TRAJECTORIES - half * args.n)) / 1e9, 1),
            "tokens_per_trajectory": round(large["tokens"] / large["trajectories"]),
            "stored_files": large["stored_files"], "image_references": large["image_references"],
            "stored_bytes_per_trajectory": round(large["stored_bytes"] / large["trajectories"]),
            "pixels_processed": large["pixels_processed"],
            "released_pss_over_idle_mb": round((large["released_pss"] - large["idle_pss"]) / 2**20, 1),
            "stored_files_after_release": large["stored_files_after_release"],
            "step_s": round(large["step_s"], 1),
        }
    # What the plan's sandbox estimate uses: the store run's fixed step cost (all but the pixel
    # cache and the trajectories) spread over its concurrent sessions.
    small = runs[f"store_{half}"]
    fixed = small["peak_pss"] - small["idle_pss"] - small["pixel_cache_bytes"] - result["store"]["bytes_per_trajectory"] * half * args.n
    result["sandbox_session_bytes"] = round(fixed / min(args.max_sessions, half * args.n))
    result["growth_ratio"] = round(result["store"]["bytes_per_trajectory"] / result["baseline"]["bytes_per_trajectory"], 4)
    result["trainer_growth_ratio"] = round(
        result["store"]["trainer_rss_bytes_per_trajectory"] / result["baseline"]["trainer_rss_bytes_per_trajectory"], 4
    )
    result["target_met"] = result["growth_ratio"] <= 0.05
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
