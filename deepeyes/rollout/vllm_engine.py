"""The `vllm` rollout backend: vLLM's async engine in the server's process (GPU only).

Same contract as `HFRolloutEngine`: token ids (with each image's placeholder tokens already
expanded, as `ChatEncoder` writes them) and image paths in; token ids, the logprob of each
sampled token under the distribution it was drawn from (`logprobs_mode="processed_logprobs"`:
after temperature and top-p), finish reason and weight version out. Weight updates load the
published safetensors through the model's own `load_weights` on every worker (which maps HF
names and fuses QKV / gate-up), then drop the prefix cache, which belongs to the old weights.

vLLM is imported only when this backend is built: a CPU box never needs it installed.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

from deepeyes.rollout.api import GenerateRequest, GenerateResult, SamplingParams

INSTALL_HINT = "the vllm rollout backend needs vLLM on a GPU node: pip install 'deepeyes[gpu]'"


def sampling_kwargs(sampling: SamplingParams) -> dict[str, Any]:
    """Our sampling parameters as `vllm.SamplingParams` keyword arguments."""
    return {
        "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
        "seed": sampling.seed, "stop": list(sampling.stop), "include_stop_str_in_output": True,
        "logprobs": 0,  # the sampled token's own logprob only
        "detokenize": True,  # stop strings are matched on text
    }


def finish_reason(output: Any) -> str:
    """vLLM's (finish_reason, stop_reason) as ours: a stop string → "stop", EOS or a stop token
    → "eos", the token limit → "length"."""
    if output.finish_reason == "length":
        return "length"
    return "stop" if isinstance(output.stop_reason, str) else "eos"


def sampled_logprobs(output: Any) -> list[float]:
    """The logprob of each sampled token, from vLLM's per-position {token_id: Logprob} dicts."""
    return [float(position[token].logprob) for token, position in zip(output.token_ids, output.logprobs)]


class WeightLoaderExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`): loads published weights in place."""

    def load_published(self, path: str) -> None:
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as tensors:
            weights = ((name, tensors.get_tensor(name)) for name in tensors.keys())
            self.model_runner.model.load_weights(weights=weights)


class VLLMRolloutEngine:
    def __init__(self, model: Path, dtype: str = "bfloat16", max_batch: int = 256, min_pixels: int = 3136,
                 max_pixels: int = 50176, gpu_memory_utilization: float = 0.85):
        try:
            import vllm
            from vllm.engine.arg_utils import AsyncEngineArgs
        except ImportError as error:
            raise ImportError(f"{INSTALL_HINT} ({error})") from None
        self._vllm = vllm
        args = AsyncEngineArgs(
            model=str(model), dtype=dtype, max_num_seqs=max_batch, gpu_memory_utilization=gpu_memory_utilization,
            logprobs_mode="processed_logprobs", enable_prefix_caching=True,
            mm_processor_kwargs={"min_pixels": min_pixels, "max_pixels": max_pixels},
            worker_extension_cls=f"{__name__}.WeightLoaderExtension",
        )
        self.engine = vllm.AsyncLLMEngine.from_engine_args(args)
        self.weight_version = 0
        self._ids = itertools.count()
        self._accepting = asyncio.Event()  # cleared while weights change: new requests wait
        self._accepting.set()
        self._drained = asyncio.Event()  # set when no request is in flight
        self._drained.set()
        self._in_flight = 0

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        from PIL import Image

        prompt: dict[str, Any] = {"prompt_token_ids": list(request.input_ids)}
        if request.images:
            prompt["multi_modal_data"] = {"image": [Image.open(path).convert("RGB") for path in request.images]}
        await self._accepting.wait()
        self._in_flight += 1
        self._drained.clear()
        try:
            final = None
            async for output in self.engine.generate(
                prompt, self._vllm.SamplingParams(**sampling_kwargs(request.sampling)), f"req-{next(self._ids)}"
            ):
                final = output
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._drained.set()
        completion = final.outputs[0]
        return GenerateResult(
            list(completion.token_ids), sampled_logprobs(completion), finish_reason(completion), self.weight_version
        )

    async def update_weights(self, path: Path, version: int) -> None:
        """Between requests: new requests wait, those in flight finish, then every worker loads `path`."""
        self._accepting.clear()
        try:
            await self._drained.wait()
            await self.engine.collective_rpc("load_published", args=(str(path),))
            await self.engine.reset_prefix_cache()
            self.weight_version = version
        finally:
            self._accepting.set()

    async def close(self) -> None:
        self.engine.shutdown()
