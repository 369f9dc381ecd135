"""Weight sync time, by broadcast and by file, against a raw torch.distributed broadcast of the same bytes.

    python bench/weight_sync.py [--repeats 5] [--servers 2]
    python bench/weight_sync.py --smoke     # one repeat, one server: checks the script runs

The trainer is this process, with the tiny model; its trained parameters go to `--servers` real
rollout server processes (hf backend) as after every optimizer step, end to end:
- broadcast: `BroadcastWeightSync.publish` (rollout.weight_sync=broadcast): the /info probe, the
  /weights/receive calls and the gloo broadcast, one tensor at a time straight into each server's
  parameters (the CPU default). The group forms once, in a warm-up publish, as once per job.
- packed:    the same in vLLM's packed buckets (the GPU default): a copy into a bucket on each side.
- file:      `WeightSync.publish` (rollout.weight_sync=file): one safetensors file written, every
  server loads it.
- raw:       `torch.distributed.broadcast` of one buffer of the same bytes from this process to
  as many helper processes, already joined: the floor for moving those bytes this way.

Runs alternate, and each reports its best. The projection scales the measured bandwidth to a 7B
model's 15.2 GB of bf16 weights. Last line: `RESULT {json}`; target `broadcast_over_raw`
(raw time / broadcast time) ≥ 0.8.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from deepeyes.config import ModelConfig
from deepeyes.model import ensure_tiny_model
from deepeyes.rollout.client import RolloutClient
from deepeyes.rollout.weight_sync import BroadcastWeightSync, WeightSync, trained_state
from deepeyes.service import LOOPBACK, LocalService, free_port, local_services, new_token_file, python_module, read_token
from deepeyes.train.setup import load_policy

SEVEN_B_BYTES = 15.2e9

RAW_RECEIVER = """
import sys, torch, torch.distributed as dist
port, rank, world, size, repeats = map(int, sys.argv[1:])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
buffer = torch.empty(size, dtype=torch.uint8)
for _ in range(repeats):
    dist.broadcast(buffer, 0)
dist.destroy_process_group()
"""


def new_weights(model: torch.nn.Module) -> None:
    with torch.no_grad():
        model.lm_head.weight.add_(1e-3)  # new weights every time, as after a step


def measure(args, servers: list[LocalService], token: str, root: Path) -> dict:
    policy = load_policy(ModelConfig(), str(ensure_tiny_model()))
    size = sum(t.numel() * t.element_size() for t in trained_state(policy.model).values())

    def clients():
        return RolloutClient([s.url for s in servers], token)

    broadcast = BroadcastWeightSync(clients, LOOPBACK, timeout_s=120, packed=False)
    packed = BroadcastWeightSync(clients, LOOPBACK, timeout_s=120, packed=True)
    file = WeightSync(clients, root)
    port = free_port()
    helpers = [subprocess.Popen([sys.executable, "-c", RAW_RECEIVER, str(port), str(rank), str(len(servers) + 1),
                                 str(size), str(args.repeats)]) for rank in range(1, len(servers) + 1)]
    dist.init_process_group("gloo", init_method=f"tcp://{LOOPBACK}:{port}", rank=0, world_size=len(servers) + 1)
    raw_buffer = torch.randint(0, 255, (size,), dtype=torch.uint8)
    times: dict[str, list[float]] = {"broadcast": [], "packed": [], "file": [], "raw": []}
    syncs = {"broadcast": broadcast, "packed": packed, "file": file}
    version = 0
    try:
        for _ in range(args.repeats):
            for name, sync in syncs.items():
                new_weights(policy.model)
                version += 1
                if name != "file":  # the two modes take turns with the servers: an untimed publish re-forms
                    sync.publish(policy.model, version)  # the group (once per job in a real run)
                started = time.perf_counter()
                sync.publish(policy.model, version)
                times[name].append(time.perf_counter() - started)
            started = time.perf_counter()
            dist.broadcast(raw_buffer, 0)
            times["raw"].append(time.perf_counter() - started)
    finally:
        dist.destroy_process_group()
        for sync in syncs.values():
            sync.close()
        for helper in helpers:
            helper.wait(timeout=60)
    best = {name: min(values) for name, values in times.items()}
    gb_per_s = {name: size / seconds / 1e9 for name, seconds in best.items()}
    return {
        "bytes": size, "servers": len(servers),
        **{f"{name}_s": round(seconds, 4) for name, seconds in best.items()},
        **{f"{name}_gb_per_s": round(rate, 3) for name, rate in gb_per_s.items()},
        "broadcast_over_raw": round(best["raw"] / best["broadcast"], 3),
        "packed_over_raw": round(best["raw"] / best["packed"], 3),
        "file_over_raw": round(best["raw"] / best["file"], 3),
        "broadcast_over_file": round(best["file"] / best["broadcast"], 3),
        "projected_7b_broadcast_s": round(SEVEN_B_BYTES / gb_per_s["broadcast"] / 1e9, 2),
        "projected_7b_raw_s": round(SEVEN_B_BYTES / gb_per_s["raw"] / 1e9, 2),
        "projected_7b_file_s": round(SEVEN_B_BYTES / gb_per_s["file"] / 1e9, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="one repeat, one server")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.servers = 1, 1
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        token_file = new_token_file(scratch)
        servers = []
        for i in range(args.servers):
            port = free_port()
            argv = python_module("deepeyes.rollout.server", "--backend", "hf", "--model", ensure_tiny_model(),
                                 "--port", port, "--token-file", token_file, "--threads", 1)
            servers.append(LocalService(f"rollout{i}", argv, port, read_token(token_file), scratch / f"server{i}.log"))
        with local_services(servers, ready_timeout_s=120):
            result = measure(args, servers, read_token(token_file), scratch / "weights")
    for key, value in result.items():
        print(f"{key:>26}: {value}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
