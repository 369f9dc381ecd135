"""Process groups for tensor, pipeline and data parallelism (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from deepeyes.model.megatron.spec import ParallelLayout
from deepeyes.train.megatron import cpu_compat


def init_parallel(layout: ParallelLayout, seed: int) -> None:
    """Join (or, for a single process, create) the world and split it into TP × PP × DP groups.

    A process started by torchrun finds its rank in the environment; a plain `python jobs/...`
    run is a world of one on a free loopback port.
    """
    cpu_compat.enable()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "RANK" in os.environ:  # torchrun, or the node agent's trainer ranks
            dist.init_process_group(backend, timeout=timedelta(minutes=10))
        else:  # not through the environment: processes this one starts must not inherit a rendezvous
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                    timeout=timedelta(minutes=10))
    world = dist.get_world_size()
    model_parallel = layout.tensor * layout.pipeline
    if world % model_parallel:
        raise ValueError(f"world size {world} is not a multiple of tensor × pipeline = {model_parallel}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline if layout.virtual_pipeline > 1 else None,
    )
    cpu_compat.enable()  # again: initialization imported more of megatron-core
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def from_leader(value, group: dist.ProcessGroup | None = None):
    """Global rank 0's `value`, on every rank (a picklable object; collective over `group`)."""
    if dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
