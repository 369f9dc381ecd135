"""Weight sync time against a raw copy of the same bytes.

    python bench/weight_sync.py [--repeats 5]

- sync: the trainer publishes its trained parameters (`publish_weights`: one safetensors file on
  the shared filesystem) and a real rollout server process loads them into its model between
  requests (`RolloutClient.update_weights`), end to end, as after every optimizer step.
- raw:  the same number of bytes written from memory to a file in the same directory and read
  back into memory: the floor for moving those bytes through that filesystem.

Runs alternate, and each reports its best. Last line: `RESULT {json}`; target
`bandwidth_ratio` (raw time / sync time) ≥ 0.5.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepeyes.config import ModelConfig
from deepeyes.service import LocalService, free_port, local_services, new_token_file, python_module, read_token
from deepeyes.model import ensure_tiny_model
from deepeyes.rollout.client import RolloutClient
from deepeyes.rollout.weight_sync import publish_weights
from deepeyes.train.setup import load_policy


def raw_copy(data: bytes, path: Path) -> float:
    copy = bytearray(data)  # the destination exists and is paged in, as the server's parameters are
    started = time.perf_counter()
    with open(path, "wb") as out:
        out.write(data)
    with open(path, "rb") as file:
        file.readinto(copy)
    seconds = time.perf_counter() - started
    os.unlink(path)
    return seconds


async def sync(model, root: Path, version: int, client: RolloutClient) -> tuple[float, int]:
    started = time.perf_counter()
    published = publish_weights(model, root, version)
    await client.update_weights(published.version, published.path)
    return time.perf_counter() - started, published.bytes


async def measure(args, url: str, token: str, root: Path) -> dict:
    policy = load_policy(ModelConfig(), str(ensure_tiny_model()))
    client = RolloutClient([url], token)
    sync_s, raw_s = [], []
    try:
        for version in range(1, args.repeats + 1):
            with torch.no_grad():
                policy.model.lm_head.weight.add_(1e-3)  # new weights every time, as after a step
            seconds, size = await sync(policy.model, root, version, client)
            sync_s.append(seconds)
            raw_s.append(raw_copy(os.urandom(size), root / "raw.bin"))
    finally:
        await client.close()
    best_sync, best_raw = min(sync_s), min(raw_s)
    return {
        "bytes": size, "sync_s": round(best_sync, 4), "raw_s": round(best_raw, 4),
        "sync_gb_per_s": round(size / best_sync / 1e9, 3), "raw_gb_per_s": round(size / best_raw / 1e9, 3),
        "bandwidth_ratio": round(best_raw / best_sync, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        token_file = new_token_file(scratch)
        port = free_port()
        argv = python_module("deepeyes.rollout.server", "--backend", "hf", "--model", ensure_tiny_model(),
                             "--port", port, "--token-file", token_file, "--threads", 1)
        server = LocalService("rollout", argv, port, read_token(token_file), scratch / "server.log")
        with local_services([server], ready_timeout_s=120):
            result = asyncio.run(measure(args, server.url, server.token, scratch / "weights"))
    for key, value in result.items():
        print(f"{key:>16}: {value}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
