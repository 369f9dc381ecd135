"""The `vllm` rollout backend: vLLM's async engine (`AsyncLLM`) in the rollout server's process.

Same contract as `HFRolloutEngine`: token ids (each image's placeholder run expanded, as
`ChatEncoder` writes them) and image paths in; token ids, the logprob of each sampled token under
the distribution it was drawn from (`logprobs_mode="processed_logprobs"`: after temperature and
top-p), finish reason and weight version out. vLLM is imported only when this backend is built.

Prompts. vLLM 0.33 expands EVERY `<|image_pad|>` of a token prompt into the image's N pads, so a
prompt already expanded would come out silently corrupted (N x N pads, images at wrong offsets).
Each image's run is collapsed to one pad before sending; vLLM's own expansion then reproduces our
ids exactly (tests/rollout/test_vllm_contract.py proves it with vLLM's Qwen2.5-VL processor).
Each image carries its content hash as vLLM's multimodal uuid, so vLLM processes an image once
for the n rollouts of a prompt and every later turn that resends it.

Weights. Generation pauses through vLLM's own `pause_generation(mode="wait")` (requests in flight
finish on the old weights, so each response comes from one version; KV, prefix and multimodal
caches are dropped) and resumes after. Two ways in: `update_weights(path, version)`, the
published safetensors file loaded by every worker through the model's `load_weights` (the `file`
fallback), and the broadcast from the trainer through vLLM's NCCL weight-transfer engine:
`init_weight_transfer` once per group, then per version `pause_generation`, `receive_weights`,
`resume_generation`, driven by the server. The pause is its own step because vLLM's NCCL receive
has no timeout: the trainer broadcasts only once every engine has paused, so none waits inside
the collective while another drains (deepeyes.rollout.weight_sync). New requests wait at our
door while weights change; one that slips into vLLM just as the pause starts is refused by vLLM
and sent again after the update.

Wire format of the broadcast (vLLM 0.33 `vllm/distributed/weight_transfer/nccl_engine.py`,
`nccl_common.py`, `packed_tensor.py`); the trainer's sender must match it exactly:
- The group is vLLM's own: a `StatelessProcessGroup` (a TCPStore at master_address:master_port)
  carrying a `PyNcclCommunicator`. The trainer joins it as vLLM's
  `nccl_common.trainer_init` does, through the same `stateless_init_process_group` on its current
  device index (`weight_sync.join_weight_group`), not with a torch.distributed NCCL group (its
  store keys differ).
- The trainer's sender is rank 0 and the only source of every broadcast. An engine's workers take
  ranks rank_offset + tp_rank (one group for all servers: server i of tensor-parallel size T gets
  rank_offset 1 + i*T; world_size = 1 + servers*T). Every rank must enter the rendezvous together.
- Update info: `names` (Hugging Face checkpoint names, as `trained_state` gives them: vLLM's
  `load_weights` maps them and fuses q/k/v and gate/up), `dtype_names` (`str(dtype).split(".")[-1]`,
  e.g. "bfloat16"; the receiver allocates that dtype and `load_weights` casts into the served
  dtype, so sending the served dtype halves the bytes of fp32), `shapes` (full, unsharded).
- Packed (the default here, as on vLLM's trainer side): tensors go in `names` order, each as its
  contiguous bytes (`view(-1).view(uint8)`), concatenated into a uint8 bucket that is closed after
  the tensor that takes it past `packed_buffer_size_bytes` (default 1 GiB, so a bucket may exceed
  it by one tensor); one broadcast per bucket from rank 0; `packed_num_buffers` (2) buckets in
  flight. The receiver cuts the same buckets from (shape, dtype) alone, so sizes and order must
  agree exactly, and each tensor must start at an offset its dtype can be viewed at (one dtype
  for all never fails; the sender refuses other layouts). Unpacked: one broadcast per tensor, in
  `names` order. `packed` and both buffer sizes are fixed when the group is set up, not per
  update. The vllm tier runs vLLM's own trainer and worker engines against our sender.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Awaitable, Callable, Coroutine, Sequence

from deepeyes.config import ModelConfig, RolloutConfig
from deepeyes.data.image_store import content_key
from deepeyes.rollout.api import GenerateRequest, GenerateResult, SamplingParams

INSTALL_HINT = "the vllm rollout backend needs vLLM on a GPU node: pip install 'deepeyes[gpu]'"
# What the max_model_len budget gives the prompt's text: DeepEyesV2's system prompt (~950 tokens) and
# a question. A longer prompt is refused by vLLM with an error that names its length.
PROMPT_TEXT_TOKENS = 1024
TOKEN_PIXELS = 28 * 28  # Qwen2.5-VL: 14-pixel patches merged 2 x 2 into one language-model token
# vLLM's packed broadcast buckets (vllm.distributed.weight_transfer.packed_tensor defaults).
PACKED_BUFFER_SIZE_BYTES = 1 << 30
PACKED_NUM_BUFFERS = 2


def rollout_max_model_len(model: ModelConfig, rollout: RolloutConfig) -> int:
    """vLLM's context length: the longest conversation a rollout sends, prompt + responses.

        PROMPT_TEXT_TOKENS + (model.max_trajectory_pixels or model.max_pixels) // 784
                           + rollout.max_response_tokens

    The prompt's images fit in the trajectory's pixel budget (one image's budget when there is none);
    every model turn and tool observation after the prompt counts in rollout.max_response_tokens.
    """
    image_pixels = model.max_trajectory_pixels or model.max_pixels
    return PROMPT_TEXT_TOKENS + image_pixels // TOKEN_PIXELS + rollout.max_response_tokens


def engine_args(model: Path, *, dtype: str, tensor_parallel: int, max_model_len: int | None,
                gpu_memory_utilization: float, max_batch: int, min_pixels: int, max_pixels: int) -> dict[str, Any]:
    """Keyword arguments of `vllm.AsyncEngineArgs` for one rollout engine."""
    return {
        "model": str(model), "dtype": dtype, "tensor_parallel_size": tensor_parallel, "max_model_len": max_model_len,
        "gpu_memory_utilization": gpu_memory_utilization, "max_num_seqs": max_batch,
        "logprobs_mode": "processed_logprobs", "enable_prefix_caching": True,
        # The pixel budget our processor (PixelCache) resizes into, so image token counts agree.
        "mm_processor_kwargs": {"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}},
        "limit_mm_per_prompt": {"video": 0},  # no video: vLLM neither profiles nor reserves memory for it
        "weight_transfer_config": {"backend": "nccl"},
        "worker_extension_cls": f"{__name__}.WeightLoaderExtension",
    }


def sampling_kwargs(sampling: SamplingParams) -> dict[str, Any]:
    """Our sampling parameters as `vllm.SamplingParams` keyword arguments."""
    return {
        "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
        "seed": sampling.seed, "stop": list(sampling.stop), "include_stop_str_in_output": True,
        "logprobs": 0,  # the sampled token's own logprob only
        "detokenize": True,  # stop strings are matched on text
    }


def weight_transfer_init_info(master_address: str, master_port: int, rank_offset: int, world_size: int,
                              packed: bool) -> dict[str, Any]:
    """vLLM's NCCL weight-transfer init info for this engine's workers (see the module docstring)."""
    return {
        "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
        "world_size": world_size, "packed": packed, "packed_buffer_size_bytes": PACKED_BUFFER_SIZE_BYTES,
        "packed_num_buffers": PACKED_NUM_BUFFERS,
    }


def collapse_image_pads(input_ids: Sequence[int], image_pad: int) -> list[int]:
    """`input_ids` with each run of `image_pad` cut to one pad: what vLLM expands per image."""
    return [token for i, token in enumerate(input_ids) if token != image_pad or i == 0 or input_ids[i - 1] != image_pad]


def vllm_prompt(input_ids: Sequence[int], image_pad: int, images: Sequence[Any], uuids: Sequence[str]) -> dict[str, Any]:
    """A vLLM token prompt: one pad per image, the decoded images and their content hashes."""
    prompt: dict[str, Any] = {"prompt_token_ids": collapse_image_pads(input_ids, image_pad)}
    if images:
        prompt["multi_modal_data"] = {"image": list(images)}
        prompt["multi_modal_uuids"] = {"image": list(uuids)}
    return prompt


def finish_reason(output: Any) -> str:
    """vLLM's (finish_reason, stop_reason) as ours: a stop string → "stop", EOS or a stop token →
    "eos", the token limit → "length"; "abort" (a pause or shutdown cut it) and "error" are kept,
    and any other reason vLLM may add is an "error"."""
    if output.finish_reason == "stop":
        return "stop" if isinstance(output.stop_reason, str) else "eos"
    if output.finish_reason in ("length", "abort", "error"):
        return output.finish_reason
    return "error"


def sampled_logprobs(output: Any) -> list[float]:
    """The logprob of each sampled token, from vLLM's per-position {token_id: Logprob} dicts."""
    return [float(position[token].logprob) for token, position in zip(output.token_ids, output.logprobs or [])]


def _load_image(path: Path) -> tuple[Any, str]:
    """The decoded image and its content hash (vLLM's uuid for it)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB"), content_key(path)


class WeightLoaderExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`): loads a published file in place."""

    def load_published(self, path: str) -> None:
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as tensors:
            weights = ((name, tensors.get_tensor(name)) for name in tensors.keys())
            self.model_runner.model.load_weights(weights=weights)


class VLLMRolloutEngine:
    """One vLLM engine (`tensor_parallel` GPUs) behind the rollout server.

    Every call into vLLM runs on one event loop that this engine owns, in its own thread: AsyncLLM
    binds its output handler to the loop of its first request, and the server calls
    `init_weight_transfer` from a worker thread (it blocks until the trainer joins the group).
    """

    def __init__(self, engine: Any, weight_timeout_s: float = 600.0):
        """Serve `engine`, a `vllm.AsyncLLM` (`build` makes one from our settings); `weight_timeout_s`
        bounds a pause for new weights."""
        import vllm

        self._vllm = vllm
        self.engine = engine
        self.weight_timeout_s = weight_timeout_s
        self.image_pad = engine.model_config.hf_config.image_token_id
        self.vocab_size = engine.model_config.get_vocab_size()
        # Ranks this engine adds to the weight-broadcast group: one per worker (tensor x pipeline parallel).
        self.weight_transfer_ranks = engine.vllm_config.parallel_config.world_size_across_dp
        self.weight_version = 0
        self._ids = itertools.count()
        self._packed = True
        self._running = asyncio.Event()  # cleared while weights change: new requests wait at the door
        self._running.set()
        self._pauses = 0  # weight changes begun so far
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def build(cls, model: Path, *, dtype: str = "bfloat16", tensor_parallel: int = 1, max_model_len: int | None = None,
              gpu_memory_utilization: float = 0.85, max_batch: int = 256, min_pixels: int = 3136,
              max_pixels: int = 50176, weight_timeout_s: float = 600.0) -> VLLMRolloutEngine:
        """vLLM's engine on `tensor_parallel` GPUs of this node, with the arguments `engine_args` gives."""
        try:
            import vllm
            from vllm.engine.arg_utils import AsyncEngineArgs
        except ImportError as error:
            raise ImportError(f"{INSTALL_HINT} ({error})") from None
        args = AsyncEngineArgs(**engine_args(
            model, dtype=dtype, tensor_parallel=tensor_parallel, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization, max_batch=max_batch, min_pixels=min_pixels,
            max_pixels=max_pixels,
        ))
        return cls(vllm.AsyncLLMEngine.from_engine_args(args), weight_timeout_s)

    def _on_engine_loop(self, coroutine: Coroutine) -> Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        return await asyncio.wrap_future(self._on_engine_loop(self._generate(request)))

    async def _generate(self, request: GenerateRequest) -> GenerateResult:
        from vllm.exceptions import RetryableRequestError

        loaded = await asyncio.gather(*(asyncio.to_thread(_load_image, path) for path in request.images))
        prompt = vllm_prompt(request.input_ids, self.image_pad, [image for image, _ in loaded],
                             [uuid for _, uuid in loaded])
        params = self._vllm.SamplingParams(**sampling_kwargs(request.sampling))
        while True:
            await self._running.wait()
            pauses = self._pauses
            try:
                async for output in self.engine.generate(prompt, params, f"req-{next(self._ids)}"):
                    final = output
                break
            except RetryableRequestError:
                if self._pauses == pauses:  # not refused for a weight update of ours
                    raise
        completion = final.outputs[0]
        return GenerateResult(
            list(completion.token_ids), sampled_logprobs(completion), finish_reason(completion), self.weight_version
        )

    async def update_weights(self, path: Path, version: int) -> None:
        """The `file` weight sync: every worker loads the published safetensors at `path`."""
        await self.pause_generation()
        try:
            await self._on_engine_loop_changing(version, lambda: self.engine.collective_rpc(
                "load_published", args=(str(path),)))
        finally:
            await self.resume_generation()

    def init_weight_transfer(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                             packed: bool = True) -> None:
        """Join the trainer's broadcast group (vLLM's NCCL weight-transfer engine): this engine's
        workers take ranks rank_offset .. rank_offset + tensor_parallel - 1. Blocks until every rank
        of the group has joined, so call it off the server's event loop."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        self._packed = packed
        init_info = weight_transfer_init_info(master_address, master_port, rank_offset, world_size, packed)
        self._on_engine_loop(self.engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info))).result()

    def check_weight_update(self, packed: bool) -> None:
        """Refuse, before anyone broadcasts, an update this engine cannot take."""
        if packed != self._packed:
            raise ValueError(f"the trainer sends packed={packed} but this engine joined the group with "
                             f"packed={self._packed}: both are fixed when the group is set up")

    async def receive_weights(self, version: int, names: list[str], dtype_names: list[str], shapes: list[list[int]],
                              packed: bool) -> None:
        """Receive `version` from the trainer's broadcast (sent as the module docstring says); the
        caller has paused generation (`pause_generation`)."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        self.check_weight_update(packed)
        if not names:  # vLLM reads empty lists as "the previous update's names" and would wait for those
            raise ValueError("a weight update with no tensors")
        update = WeightTransferUpdateRequest({"names": names, "dtype_names": dtype_names, "shapes": shapes})

        async def receive() -> None:
            await self.engine.start_weight_update()
            await self.engine.update_weights(update)
            await self.engine.finish_weight_update(str(version))

        await self._on_engine_loop_changing(version, receive)

    async def pause_generation(self) -> None:
        """Pause through vLLM (`mode="wait"`: requests in flight finish on the old weights, each
        response comes from one version; caches dropped); new requests wait at our door. A pause
        not reached within the weight timeout is undone and raises."""
        async def pause() -> None:
            self._running.clear()
            self._pauses += 1
            try:
                await asyncio.wait_for(self.engine.pause_generation(mode="wait", clear_cache=True),
                                       self.weight_timeout_s)
            except BaseException:  # not paused within the bound: serve on
                await self.engine.resume_generation()
                self._running.set()
                raise

        await asyncio.wrap_future(self._on_engine_loop(pause()))

    async def resume_generation(self) -> None:
        async def resume() -> None:
            try:
                await self.engine.resume_generation()
            finally:
                self._running.set()

        await asyncio.wrap_future(self._on_engine_loop(resume()))

    async def _on_engine_loop_changing(self, version: int, change: Callable[[], Awaitable[Any]]) -> None:
        """Run `change()` on the engine's loop; on success the engine serves `version`. A change that
        fails midway may leave a mix of two versions: the engine then reports version -1 until a
        later change succeeds."""
        async def changing() -> None:
            try:
                await change()
            except BaseException:
                self.weight_version = -1
                raise
            self.weight_version = version

        await asyncio.wrap_future(self._on_engine_loop(changing()))

    async def close(self) -> None:
        self.engine.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
