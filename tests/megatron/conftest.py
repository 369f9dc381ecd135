"""Multi-process runs on real torch.distributed (gloo): each test spawns its ranks afresh."""

import socket

import pytest
import torch.multiprocessing as mp


def spawn(function, world: int, *args):
    """Run `function(rank, world, port, *args, results)` on `world` processes; rank 0's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(function, args=(world, port, *args, results), nprocs=world)
    return results.get()


@pytest.fixture
def run_ranks():
    return spawn
