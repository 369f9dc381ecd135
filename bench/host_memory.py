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

Loading (`--loading [--smoke] [--hidden 1024] [--layers 8] [--tp 2] [--pp 2]`): the host memory of a
trainer node while its megatron ranks load the checkpoint, 4 ranks on gloo, each a fresh process:

- full:       what the trainer did before rank-local loading: every rank loads the whole HF model
              (`from_pretrained`) and copies its slices out of it (and keeps it, as the policy did);
- rank_local: every rank builds a weightless (meta) HF model and reads only its slices from the
              safetensors files (deepeyes.model.load.CheckpointTensors).

The checkpoint is synthetic: the tiny model's builder (deepeyes.model.tiny.tiny_config) widened
to `--hidden` and `--layers`, saved in several safetensors files as released checkpoints are, once
in float32 and once in bfloat16; the ranks train in bfloat16. transformers 5 memory-maps a
checkpoint whose dtype it keeps, so the full load then costs a rank only the file pages it touches
(its slices, shared with the ranks that read the same pages); a checkpoint it must convert is
materialized whole in every rank. Each rank reports its own PSS (psutil memory_full_info) before
loading, after it, and at its peak (sampled every 10 ms), and its share: the bytes of the
parameters it holds (its layers' TP slices, the vision tower on the first stage). Target: every
rank's rank_local PSS growth within 1.5 x its share, for both checkpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
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
    parser.add_argument("--loading", action="store_true", help="measure rank-local checkpoint loading instead")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny shape that checks the script runs: 2 small photos, 2 rollouts, 2 turns; with "
                             "--loading, hidden 256 and 4 layers")
    parser.add_argument("--hidden", type=int, default=1024, help="--loading: the synthetic model's width")
    parser.add_argument("--layers", type=int, default=8, help="--loading: its language-model layers")
    parser.add_argument("--tp", type=int, default=2, help="--loading: tensor parallel size (4 ranks in all)")
    parser.add_argument("--pp", type=int, default=2, help="--loading: pipeline parallel size")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loading-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("store", "baseline", "full", "rank_local"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        # tcmalloc keeps freed memory mapped: the RSS and PSS measured would not be glibc's.
        sys.exit(f"bench/host_memory.py measures glibc's malloc; run it without LD_PRELOAD={os.environ['LD_PRELOAD']}")
    if args.smoke and not args.worker:
        args.prompts, args.n, args.turns, args.width, args.height, args.max_sessions = 2, 2, 2, 320, 240, 4
    if args.worker:
        return worker(args)
    if args.loading_worker:
        return loading_worker(args)
    if args.loading:
        return loading_main(args)

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



LOADING_RANKS = 4


def synthetic_checkpoint(path: Path, hidden: int, layers: int, tensor_parallel: int, dtype: str) -> Path:
    """The tiny model's architecture at width `hidden` (head dim 64, 4 query heads per key/value
    group) and `layers` layers, random weights in `dtype`, saved in 256 MB safetensors files."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from deepeyes.model.tiny import tiny_config

    config = tiny_config()
    text = config.text_config
    heads = hidden // 64
    text.hidden_size, text.intermediate_size = hidden, hidden * 11 // 4
    text.num_hidden_layers, text.layer_types = layers, ["full_attention"] * layers
    text.num_attention_heads, text.num_key_value_heads = heads, max(heads // 4, tensor_parallel)
    text.rope_parameters["mrope_section"] = [8, 12, 12]  # head dim 64: 32 rotary frequencies
    config.vision_config.out_hidden_size = hidden  # the merger feeds the language model
    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, dtype))
    model = Qwen2_5_VLForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(path, max_shard_size="256MB")
    return path


def loading_worker(args: argparse.Namespace) -> None:
    """One rank (RANK etc. in the environment): load its chunks the `args.mode` way; prints DONE {json}."""
    import torch
    import torch.distributed as dist

    from deepeyes.model import load_model
    from deepeyes.model.load import CheckpointTensors
    from deepeyes.model.megatron.spec import ParallelLayout, transformer_config
    from deepeyes.train.megatron.engine import load_chunks
    from deepeyes.train.megatron.parallel import init_parallel

    torch.set_num_threads(1)
    path = Path(args.root)
    layout = ParallelLayout(tensor=args.tp, pipeline=args.pp)
    init_parallel(layout, seed=0)
    me = psutil.Process()
    gc.collect()
    before = me.memory_full_info().pss
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], me.memory_full_info().pss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    if args.mode == "full":  # kept alive, as the policy kept it
        hf_model = load_model(path, dtype=torch.bfloat16)
        weights = None
    else:
        hf_model = load_model(path, dtype=torch.bfloat16, weights=False)
        weights = CheckpointTensors(path)
    config = transformer_config(hf_model.config.text_config, layout, torch.bfloat16)
    config.perform_initialization = False  # as the engine does
    chunks = load_chunks(hf_model, config, torch.device("cpu"), weights)
    if weights is not None:
        weights.close()
    seconds = time.perf_counter() - started
    gc.collect()
    after = me.memory_full_info().pss
    stop.set()
    sampler.join()
    share = sum(p.numel() * p.element_size() for chunk in chunks for p in chunk.parameters())
    dist.barrier()
    print("DONE " + json.dumps({"rank": dist.get_rank(), "before": before, "after": after, "peak": max(peak[0], after),
                                "share": share, "load_s": seconds}), flush=True)
    dist.destroy_process_group()


def measure_loading(args: argparse.Namespace, mode: str, model_dir: Path) -> list[dict]:
    """The ranks' reports (by rank) for one way of loading, each rank a fresh process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, __file__, "--loading-worker", "--mode", mode, "--root", str(model_dir),
               "--tp", str(args.tp), "--pp", str(args.pp)]
    ranks = [
        subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=os.environ | {
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(LOADING_RANKS),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        })
        for rank in range(LOADING_RANKS)
    ]
    reports = []
    for rank, process in enumerate(ranks):
        out, _ = process.communicate()
        done = [line for line in out.splitlines() if line.startswith("DONE ")]
        if process.returncode or not done:
            raise RuntimeError(f"{mode} loading: rank {rank} failed (exit {process.returncode})")
        reports.append(json.loads(done[-1][5:]))
    return sorted(reports, key=lambda r: r["rank"])


def loading_main(args: argparse.Namespace) -> None:
    if args.smoke:
        args.hidden, args.layers = 256, 4
    if args.tp * args.pp != LOADING_RANKS:
        raise SystemExit(f"--tp x --pp must be {LOADING_RANKS} (one model replica over the 4 ranks)")
    mb = lambda n: round(n / 2**20, 1)  # noqa: E731
    result = {"shape": {"hidden": args.hidden, "layers": args.layers, "tp": args.tp, "pp": args.pp,
                        "ranks": LOADING_RANKS, "train_dtype": "bfloat16"}}
    for checkpoint_dtype in ("float32", "bfloat16"):
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:  # on disk: the page cache is not the bench's
            model_dir = synthetic_checkpoint(Path(tmp) / "model", args.hidden, args.layers, args.tp, checkpoint_dtype)
            runs = {mode: measure_loading(args, mode, model_dir) for mode in ("full", "rank_local")}
            checkpoint = result[f"{checkpoint_dtype}_checkpoint"] = {
                "file_mb": mb(sum(f.stat().st_size for f in model_dir.glob("*.safetensors")))}
        for mode, reports in runs.items():
            growth = [r["after"] - r["before"] for r in reports]
            peak = [r["peak"] - r["before"] for r in reports]
            checkpoint[mode] = {
                "share_mb": [mb(r["share"]) for r in reports],
                "pss_growth_mb": [mb(g) for g in growth],
                "peak_pss_growth_mb": [mb(p) for p in peak],
                "growth_over_share": [round(g / r["share"], 3) for g, r in zip(growth, reports)],
                "peak_over_share": [round(p / r["share"], 3) for p, r in zip(peak, reports)],
                "node_pss_growth_mb": mb(sum(growth)),
                "load_s": [round(r["load_s"], 2) for r in reports],
            }
            print(f"{checkpoint_dtype} checkpoint, {mode}: {json.dumps(checkpoint[mode])}", flush=True)
        checkpoint["node_ratio"] = round(checkpoint["rank_local"]["node_pss_growth_mb"]
                                         / checkpoint["full"]["node_pss_growth_mb"], 3)
    result["max_rank_local_growth_over_share"] = max(
        max(result[f"{d}_checkpoint"]["rank_local"]["growth_over_share"]) for d in ("float32", "bfloat16"))
    result["target_met"] = result["max_rank_local_growth_over_share"] <= 1.5
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
