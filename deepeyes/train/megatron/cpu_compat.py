"""Everything that adapts megatron-core 0.16.1 to a machine without CUDA, in one place.

megatron-core assumes a GPU in a few dozen call sites. Without CUDA, `enable()` points the
`torch` name inside megatron-core's own modules at `_CpuTorch` — real torch, except that
tensors it is asked to create on "cuda" are created on the CPU and `torch.cuda` is `_CpuCuda`
— and patches the other places listed below. Nothing outside megatron.core sees a
change, and with CUDA present `enable()` does nothing. Parity tests (tests/megatron) compare
every parallel layout run through these shims with the plain HF model.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch

_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn",
    "zeros_like", "ones_like", "empty_like", "full_like",
)


def _cpu_device(kwargs: dict) -> dict:
    device = kwargs.get("device")
    if device is not None and torch.device(device).type == "cuda":
        kwargs["device"] = "cpu"
    kwargs.pop("pin_memory", None)  # pinned memory needs a CUDA context
    return kwargs


class _CpuCuda:
    """`torch.cuda` as megatron-core's modules see it without a GPU."""

    # Buffers, rotary tables and p2p shape tensors are made on `torch.cuda.current_device()`.
    @staticmethod
    def current_device():
        return "cpu"

    # Schedules, p2p and the optimizer synchronize streams; the CPU has one ordered stream.
    @staticmethod
    def synchronize(*_args, **_kwargs):
        return None

    @staticmethod
    def empty_cache():
        return None

    # The RNG tracker keeps "cuda" generator states for model-parallel dropout and activation
    # recompute; on CPU the CPU generator plays that role.
    manual_seed = staticmethod(torch.manual_seed)
    get_rng_state = staticmethod(torch.get_rng_state)
    set_rng_state = staticmethod(torch.set_rng_state)

    class random:  # noqa: N801 - mirrors torch.cuda.random
        @staticmethod
        def get_rng_state(device=None):
            return torch.get_rng_state()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch:
    """`torch` as megatron-core's modules see it without a GPU: "cuda" tensors land on the CPU."""

    cuda = _CpuCuda()

    def __getattr__(self, name):
        value = getattr(torch, name)
        if name in _FACTORIES:
            factory = value

            @functools.wraps(factory)
            def value(*args, **kwargs):
                return factory(*args, **_cpu_device(kwargs))
        setattr(self, name, value)  # looked up once: megatron reads torch.* on every step
        return value


@contextlib.contextmanager
def _cuda_type_names():
    """While active, CPU tensors report `.type()` as 'torch.cuda.FloatTensor' (etc.).

    The optimizer and gradient clipping accept parameters only after string-comparing
    `.type()` against the CUDA names; their arithmetic is device-agnostic.
    """
    original = torch.Tensor.type
    if getattr(original, "__cpu_compat__", False):  # already active (nested call)
        yield
        return

    def cuda_named(self, *args, **kwargs):
        if args or kwargs or self.is_cuda:
            return original(self, *args, **kwargs)
        return original(self).replace("torch.", "torch.cuda.", 1)

    cuda_named.__cpu_compat__ = True
    torch.Tensor.type = cuda_named
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return function(*args, **kwargs)
    return wrapper


_ENABLED = False


def enable() -> None:
    """Install the shims (idempotent); a no-op when CUDA is available."""
    global _ENABLED
    if torch.cuda.is_available():
        return
    # Import what training uses so that its modules exist to be patched.
    import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401
    import megatron.core.distributed  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.pipeline_parallel.schedules  # noqa: F401
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.tensor_parallel import random

    cpu_torch = _CpuTorch()
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = cpu_torch
    if _ENABLED:
        return
    _ENABLED = True

    # The RNG tracker swaps generator states through these two helpers, which reach for
    # torch.cuda.default_generators directly.
    random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)

    # `.type()` string checks (see _cuda_type_names).
    dist_opt = distrib_optimizer.DistributedOptimizer
    dist_opt._build_model_and_main_param_groups = staticmethod(
        _with_cuda_type_names(dist_opt._build_model_and_main_param_groups)
    )
    dist_opt.__init__ = _with_cuda_type_names(dist_opt.__init__)
    fp16_opt = optimizer.Float16OptimizerWithFloat16Params  # bf16/fp16 weights, non-distributed
    fp16_opt.__init__ = _with_cuda_type_names(fp16_opt.__init__)
    clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clip
    optimizer.clip_grad_by_total_norm_fp32 = clip
