"""The vllm backend against vLLM's own code, run on a CPU (tests marked `vllm`).

vLLM's front end runs without a GPU: its engine configuration, its input processing (the
`InputProcessor` AsyncLLM puts every request through, with vLLM's Qwen2.5-VL multimodal
processor), `SamplingParams`, the weight-transfer request types, and its Qwen2.5-VL model class
with `load_weights`, instantiated on the CPU. Generation itself needs CUDA (`vllm._C`) and is
not run here (.device/gpu_check.sh does, on a GPU). vLLM's CPU platform is selected with its own
switch, VLLM_TARGET_DEVICE=cpu, because the PyPI wheel finds no CUDA device here.

Run them in a venv with vLLM (README "On a GPU cluster"); elsewhere they skip.
"""

import asyncio
import contextlib
import importlib.util
import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepeyes.agent.chat import ChatEncoder
from deepeyes.config import ModelConfig, RolloutConfig
from deepeyes.data.image_store import content_key
from deepeyes.model import load_model, load_processor
from deepeyes.model.pixels import PixelCache
from deepeyes.rollout.api import SamplingParams
from deepeyes.rollout.vllm_engine import (
    PACKED_BUFFER_SIZE_BYTES, PACKED_NUM_BUFFERS, collapse_image_pads, engine_args, rollout_max_model_len,
    sampling_kwargs, vllm_prompt, weight_transfer_init_info,
)
from deepeyes.rollout.weight_sync import (
    WeightGroup, join_weight_group, send_buckets, trained_state, unaligned_in_buckets, update_info,
)
from deepeyes.service import free_port

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (README: the vllm tier)"),
]

# A pixel budget other than the one saved in the tiny model's directory (3136..50176), so the prompt
# tests see vLLM resize into the budget the engine passes (ours), not into its own default.
PIXELS = ModelConfig(min_pixels=6272, max_pixels=100352)


@pytest.fixture(scope="module")
def vllm_on_cpu():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_TARGET_DEVICE", "cpu")
        import vllm

        yield vllm


def args_for(model_dir: Path, **overrides) -> dict:
    args = dict(dtype="float32", tensor_parallel=1, max_model_len=4096, gpu_memory_utilization=0.85, max_batch=16,
                min_pixels=PIXELS.min_pixels, max_pixels=PIXELS.max_pixels)
    return engine_args(model_dir, **{**args, **overrides})


@pytest.fixture(scope="module")
def vllm_config(vllm_on_cpu, tiny_dir):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(**args_for(tiny_dir)).create_engine_config()


@pytest.fixture(scope="module")
def input_processor(vllm_config):
    """What AsyncLLM runs on every request before it reaches the engine core."""
    from vllm.v1.engine.input_processor import InputProcessor

    return InputProcessor(vllm_config)


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    processor = load_processor(tiny_dir)
    pixels = PixelCache(processor.image_processor, PIXELS.min_pixels, PIXELS.max_pixels)
    return ChatEncoder(processor.tokenizer, pixels.tokens)


def image_file(directory: Path, height: int, width: int, seed: int) -> Path:
    path = directory / f"image_{height}x{width}_{seed}.png"
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def pad_runs(ids: list[int], pad: int) -> list[tuple[int, int]]:
    """(offset, length) of every run of `pad`: where the trainer puts each image's features."""
    runs = []
    for i, token in enumerate(ids):
        if token == pad:
            if i and ids[i - 1] == pad:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((i, 1))
    return runs


def through_vllm(input_processor, encoder, ids: list[int], images: list[Path]):
    from vllm import SamplingParams as VLLMSamplingParams

    prompt = vllm_prompt(ids, encoder.image_pad, [Image.open(path).convert("RGB") for path in images],
                         [content_key(path) for path in images])
    return input_processor.process_inputs("req-0", prompt, VLLMSamplingParams(max_tokens=8), supported_tasks=("generate",))


def test_the_tiny_model_directory_is_a_complete_qwen2_5_vl_directory(vllm_config, tiny_dir):
    from transformers import AutoProcessor, Qwen2_5_VLProcessor
    from vllm.multimodal import MULTIMODAL_REGISTRY

    processor = AutoProcessor.from_pretrained(tiny_dir)
    assert type(processor) is Qwen2_5_VLProcessor and processor.video_processor is not None
    assert vllm_config.model_config.architecture == "Qwen2_5_VLForConditionalGeneration"
    assert type(MULTIMODAL_REGISTRY.create_processor(vllm_config.model_config)).__name__ == "Qwen2_5_VLMultiModalProcessor"


CONVERSATIONS = {
    "one image": [[(224, 224)]],
    "two images of different sizes": [[(480, 640), (56, 56)]],
    "three images, one very wide": [[(300, 200), (100, 1000), (640, 480)]],
    "tool images mid-conversation": [[(480, 640)], [(120, 160), (224, 224)], [(50, 900)]],
}


@pytest.mark.parametrize("turns", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_our_prompts_come_out_of_vllms_input_processing_as_the_trainers_ids(input_processor, encoder, tmp_path, turns):
    """The prompt, then per later turn a model turn and a tool observation with images, as the
    agent loop builds them: vLLM's ids and image placeholders equal ours, and vLLM caches each
    image under its content hash."""
    images = [[image_file(tmp_path, h, w, seed=10 * t + i) for i, (h, w) in enumerate(sizes)]
              for t, sizes in enumerate(turns)]
    text = "\n".join(["<image>"] * len(images[0])) + "\nWhat is in the image?"
    ids = encoder.prompt("You are a helpful assistant.", text, images[0])
    for observation in images[1:]:
        ids += encoder.text("<think>crop it</think><code>\n```python\nprint(1)\n```\n</code>")
        ids += encoder.observation("Images:\n" + "\n".join(["<image>"] * len(observation)), observation,
                                   model_closed_turn=False)
    every_image = [path for turn in images for path in turn]

    request = through_vllm(input_processor, encoder, ids, every_image)

    assert list(request.prompt_token_ids) == ids
    features = [feature for feature in request.mm_features if feature.modality == "image"]
    assert [(f.mm_position.offset, f.mm_position.length) for f in features] == pad_runs(ids, encoder.image_pad)
    assert [f.identifier for f in features] == [content_key(path) for path in every_image]


def test_vllm_expands_every_pad_so_an_expanded_prompt_must_be_collapsed(input_processor, encoder, tmp_path):
    """Why vllm_engine collapses the runs: sent expanded, the prompt comes back silently corrupted.
    If this starts failing, vLLM stopped re-expanding and the collapse can go."""
    images = [image_file(tmp_path, 480, 640, seed=1), image_file(tmp_path, 300, 400, seed=2)]
    ids = encoder.prompt("You are a helpful assistant.", "<image>\n<image>\nCompare them.", images)
    assert collapse_image_pads(ids, encoder.image_pad) != ids

    from vllm import SamplingParams as VLLMSamplingParams

    expanded = {"prompt_token_ids": ids, "multi_modal_data": {"image": [Image.open(p).convert("RGB") for p in images]}}
    try:
        request = input_processor.process_inputs("req-1", expanded, VLLMSamplingParams(max_tokens=8),
                                                 supported_tasks=("generate",))
    except Exception:  # refusing the prompt is also a way to not corrupt it
        return
    assert list(request.prompt_token_ids) != ids


def test_sampling_parameters_build_in_vllm(vllm_on_cpu):
    sampling = SamplingParams(max_new_tokens=96, temperature=0.7, top_p=0.9, stop=("</code>", "</tool_call>"), seed=5)
    params = vllm_on_cpu.SamplingParams(**sampling_kwargs(sampling))
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (96, 0.7, 0.9, 5)
    assert params.stop == ["</code>", "</tool_call>"] and params.include_stop_str_in_output
    assert params.logprobs == 0  # the sampled token's logprob only


def test_engine_arguments_build_a_tensor_parallel_engine_configuration(vllm_on_cpu, tiny_dir):
    from vllm.engine.arg_utils import AsyncEngineArgs

    context = rollout_max_model_len(PIXELS, RolloutConfig())
    assert context == 1024 + PIXELS.max_trajectory_pixels // 784 + RolloutConfig().max_response_tokens
    config = AsyncEngineArgs(**args_for(tiny_dir, tensor_parallel=2, max_model_len=context,
                                        gpu_memory_utilization=0.7, max_batch=64)).create_engine_config()
    assert config.parallel_config.tensor_parallel_size == 2
    assert config.model_config.max_model_len == context
    assert config.cache_config.gpu_memory_utilization == 0.7
    assert config.scheduler_config.max_num_seqs == 64
    assert config.cache_config.enable_prefix_caching
    assert config.model_config.logprobs_mode == "processed_logprobs"
    assert config.model_config.multimodal_config.get_limit_per_prompt("video") == 0
    assert config.weight_transfer_config.backend == "nccl"


def test_the_papers_rollout_limits_fit_the_models_context(vllm_on_cpu, tiny_dir):
    """The 7B preset's limits (16384 response tokens, 16 images of 512 x 512) give a context
    vLLM accepts for a model with Qwen2.5-VL's 32768 positions; more is refused by vLLM."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    paper = rollout_max_model_len(ModelConfig(max_pixels=262144, max_trajectory_pixels=4194304),
                                  RolloutConfig(max_response_tokens=16384))
    assert paper == 1024 + 5349 + 16384
    AsyncEngineArgs(**args_for(tiny_dir, max_model_len=paper)).create_engine_config()
    with pytest.raises(Exception, match="max_model_len"):
        AsyncEngineArgs(**args_for(tiny_dir, max_model_len=40000)).create_engine_config()


def test_weight_transfer_requests_parse_as_vllms_nccl_engine_expects(vllm_on_cpu):
    from vllm.distributed.weight_transfer import packed_tensor
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferInitInfo, NCCLWeightTransferUpdateInfo

    init = NCCLWeightTransferInitInfo(**weight_transfer_init_info("10.0.0.1", 29600, 3, 5, packed=True))
    assert (init.master_address, init.master_port, init.rank_offset, init.world_size, init.packed) == (
        "10.0.0.1", 29600, 3, 5, True)
    assert (PACKED_BUFFER_SIZE_BYTES, PACKED_NUM_BUFFERS) == (
        packed_tensor.DEFAULT_PACKED_BUFFER_SIZE_BYTES, packed_tensor.DEFAULT_PACKED_NUM_BUFFERS)
    update = NCCLWeightTransferUpdateInfo(names=["lm_head.weight"], dtype_names=[str(torch.bfloat16).split(".")[-1]],
                                          shapes=[[152064, 64]])
    assert getattr(torch, update.dtype_names[0]) is torch.bfloat16


@pytest.fixture(scope="module")
def vllm_model(vllm_config):
    """vLLM's own Qwen2.5-VL model class, built on the CPU in a one-rank (gloo) model-parallel group."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    with set_current_vllm_config(vllm_config):
        parallel_state.init_distributed_environment(
            world_size=1, rank=0, local_rank=0, distributed_init_method=f"tcp://127.0.0.1:{free_port()}",
            backend="gloo")
        parallel_state.initialize_model_parallel(1)
        with torch.device("cpu"):
            model = Qwen2_5_VLForConditionalGeneration(vllm_config=vllm_config, prefix="")
        yield model
        parallel_state.destroy_model_parallel()
        parallel_state.destroy_distributed_environment()


@pytest.mark.parametrize("frozen_vision", [True, False], ids=["vision frozen (as trained)", "every parameter"])
def test_published_weight_names_load_into_vllms_qwen2_5_vl(vllm_model, vllm_config, tiny_dir, frozen_vision):
    """The names `trained_state` publishes (file or broadcast) map through vLLM's hf_to_vllm_mapper
    onto its parameters, fused q/k/v and gate/up included, and its `load_weights` puts exactly our
    values there."""
    from vllm.config import set_current_vllm_config

    hf = load_model(tiny_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in hf.parameters():  # trained weights differ from the directory's
            parameter.add_(torch.randn_like(parameter))
    if frozen_vision:
        hf.model.visual.requires_grad_(False)
    published = trained_state(hf)

    with set_current_vllm_config(vllm_config):
        loaded = vllm_model.load_weights(published.items())

    expected = expected_vllm_parameters(vllm_model, published)
    assert loaded == set(expected)
    parameters = dict(vllm_model.named_parameters())
    if not frozen_vision:
        assert loaded == set(parameters)
    for name, value in expected.items():
        assert torch.equal(parameters[name].data, value), name


def expected_vllm_parameters(model, published: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vLLM parameter -> the value our tensors give it, by vLLM's own declarations: the model's
    `hf_to_vllm_mapper` renames, and its `packed_modules_mapping` fuses (q, k, v) and (gate, up)
    along the output dimension in that order."""
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in published.items():
        target = model.hf_to_vllm_mapper.map_name(name)
        assert target is not None, f"vLLM's mapper drops {name}"
        module, _, leaf = target.rpartition(".")
        prefix, _, last = module.rpartition(".")
        index = 0
        for fused, pieces in model.packed_modules_mapping.items():
            if last in pieces and last != fused:
                target, index = f"{prefix}.{fused}.{leaf}", pieces.index(last)
        parts.setdefault(target, {})[index] = tensor
    return {name: torch.cat([pieces[i] for i in sorted(pieces)]) for name, pieces in parts.items()}


class AsyncLLMWithoutGPU:
    """vLLM's AsyncLLM where only a GPU could run it: the calls our engine makes, in order, with
    vLLM's own request and output types. Its methods are checked against AsyncLLM's signatures."""

    def __init__(self, vllm_config):
        from vllm.exceptions import RetryableRequestError

        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.calls: list[tuple] = []
        self.paused = False
        self.pauses = 0
        self.refuse_next = False  # the next request reaches vLLM just as a pause starts:
        self.request_arrived = threading.Event()  # it signals its arrival; its refusal comes after the pause
        self._retryable = RetryableRequestError

    async def generate(self, prompt, sampling_params, request_id):
        from vllm.logprobs import Logprob
        from vllm.outputs import CompletionOutput, RequestOutput

        self.calls.append(("generate", request_id))
        if self.refuse_next:
            self.refuse_next = False
            pauses = self.pauses
            self.request_arrived.set()
            while self.pauses == pauses:
                await asyncio.sleep(0.01)
            raise self._retryable("engine is paused")
        if self.paused:
            raise self._retryable("engine is paused")
        tokens = [7, 8]
        completion = CompletionOutput(index=0, text="", token_ids=tokens, cumulative_logprob=-1.5,
                                      logprobs=[{7: Logprob(-1.0)}, {8: Logprob(-0.5)}], finish_reason="abort")
        yield RequestOutput(request_id, None, prompt["prompt_token_ids"], None, [completion], finished=True)

    async def pause_generation(self, *, mode="abort", clear_cache=True):
        self.calls.append(("pause", mode, clear_cache))
        self.paused = True
        self.pauses += 1

    async def resume_generation(self):
        self.calls.append(("resume",))
        self.paused = False

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(("rpc", method, args))

    async def init_weight_transfer_engine(self, request):
        self.calls.append(("init", request.init_info))

    async def start_weight_update(self):
        self.calls.append(("start",))

    async def update_weights(self, request):
        self.calls.append(("update", request.update_info))
        if request.update_info["names"] == ["broken"]:
            raise RuntimeError("NCCL broadcast failed")

    async def finish_weight_update(self, weight_version=None):
        self.calls.append(("finish", weight_version))

    def shutdown(self, timeout=None):
        self.calls.append(("shutdown",))


def test_the_stand_in_calls_asyncllm_as_asyncllm_is(vllm_on_cpu):
    import inspect

    from vllm.v1.engine.async_llm import AsyncLLM

    for name, method in vars(AsyncLLMWithoutGPU).items():
        if callable(method) and not name.startswith("_"):
            ours = set(inspect.signature(method).parameters)
            assert ours <= set(inspect.signature(getattr(AsyncLLM, name)).parameters), name


def test_weight_changes_pause_generation_through_vllm_and_requests_wait(vllm_on_cpu, tiny_dir, tmp_path):
    """File update and broadcast each run between vLLM's pause and resume; a request refused by
    the pause is sent again afterwards; a broadcast that fails leaves version -1; the broadcast
    group is joined from a worker thread while the server's loop keeps serving. A tensor-parallel
    engine takes one rank of the group per GPU."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from deepeyes.rollout.api import GenerateRequest
    from deepeyes.rollout.vllm_engine import VLLMRolloutEngine

    stand_in = AsyncLLMWithoutGPU(AsyncEngineArgs(**args_for(tiny_dir, tensor_parallel=2)).create_engine_config())
    engine = VLLMRolloutEngine(stand_in)
    assert (engine.weight_transfer_ranks, engine.vocab_size) == (2, 152064)
    image = image_file(tmp_path, 56, 56, seed=3)
    request = GenerateRequest([1, engine.image_pad, engine.image_pad, 2], [image], SamplingParams(max_new_tokens=4))

    async def scenario():
        result = await engine.generate(request)
        assert (result.token_ids, result.logprobs, result.finish_reason, result.weight_version) == (
            [7, 8], [-1.0, -0.5], "abort", 0)
        stand_in.refuse_next = True
        refused = asyncio.ensure_future(engine.generate(request))
        await asyncio.to_thread(stand_in.request_arrived.wait)
        await engine.update_weights(tmp_path / "weights_v000001.safetensors", 1)
        assert (await refused).weight_version == 1  # refused by the pause, sent again after it
        joined = threading.Thread(target=engine.init_weight_transfer, args=("10.0.0.1", 29600, 1, 3))
        joined.start()
        await asyncio.to_thread(joined.join)
        await engine.pause_generation()  # the server's /weights/pause; the broadcast follows once all paused
        await engine.receive_weights(2, ["lm_head.weight"], ["bfloat16"], [[152064, 64]], packed=True)
        await engine.resume_generation()
        with pytest.raises(ValueError, match="packed"):
            engine.check_weight_update(packed=False)  # refused at /weights/pause, before anyone broadcasts
        with pytest.raises(ValueError, match="packed"):
            await engine.receive_weights(3, ["lm_head.weight"], ["bfloat16"], [[152064, 64]], packed=False)
        await engine.pause_generation()
        with pytest.raises(RuntimeError, match="NCCL"):
            await engine.receive_weights(3, ["broken"], ["bfloat16"], [[1]], packed=True)
        await engine.resume_generation()
        assert engine.weight_version == -1
        await engine.close()

    asyncio.run(scenario())
    calls = [call[0] if call[0] != "rpc" else call[:2] for call in stand_in.calls]
    assert calls == [
        "generate", "generate", "pause", ("rpc", "load_published"), "resume", "generate",
        "init", "pause", "start", "update", "finish", "resume", "pause", "start", "update", "resume", "shutdown",
    ]
    assert stand_in.calls[2] == ("pause", "wait", True)
    assert ("finish", "2") in stand_in.calls
    init = next(call[1] for call in stand_in.calls if call[0] == "init")
    assert (init["rank_offset"], init["world_size"], init["packed"]) == (1, 3, True)


def test_a_pause_vllm_does_not_reach_in_time_is_undone(vllm_on_cpu, tiny_dir):
    """Requests in flight that outlast the weight timeout (vLLM's mode="wait" waits for them): the
    pause fails, naming the timeout, and generation goes on, so the server can refuse the
    broadcast before anyone has entered it."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from deepeyes.rollout.api import GenerateRequest
    from deepeyes.rollout.vllm_engine import VLLMRolloutEngine

    class DrainingForever(AsyncLLMWithoutGPU):
        async def pause_generation(self, *, mode="abort", clear_cache=True):
            self.calls.append(("pause", mode, clear_cache))
            await asyncio.sleep(3600)

    stand_in = DrainingForever(AsyncEngineArgs(**args_for(tiny_dir)).create_engine_config())
    engine = VLLMRolloutEngine(stand_in, weight_timeout_s=0.2)

    async def scenario():
        with pytest.raises(TimeoutError):
            await engine.pause_generation()
        result = await engine.generate(GenerateRequest([1, 2], [], SamplingParams(max_new_tokens=4)))
        assert result.token_ids == [7, 8]  # requests are let in again
        await engine.close()

    asyncio.run(scenario())
    assert [call[0] for call in stand_in.calls] == ["pause", "resume", "generate", "shutdown"]


# ---- the broadcast's wire: our sender against vLLM's own trainer and worker code ------------------
#
# The communicator is the GPU boundary: a recording one stands in for PyNcclCommunicator (its
# `broadcast(tensor, src, stream)` signature), and vLLM's CUDA stream bookkeeping becomes no-ops.
# Everything else is vLLM's code: its trainer engine packing and broadcasting, its worker engine
# cutting buckets and unpacking into `load_weights`.


class RecordingCommunicator:
    """As the sender, records a copy of every broadcast tensor; as a receiver (`replay`), fills each
    broadcast tensor with the next recorded one, which must have its exact size and dtype."""

    def __init__(self, replay: list[torch.Tensor] | None = None):
        self.sent: list[torch.Tensor] = []
        self._replay = None if replay is None else list(replay)

    def broadcast(self, tensor, src, stream=None):
        assert src == 0
        if self._replay is None:
            self.sent.append(tensor.detach().clone())
            return
        assert self._replay, "the receiver waits for a broadcast the sender never made"
        recorded = self._replay.pop(0)
        assert (recorded.dtype, recorded.shape) == (tensor.dtype, tensor.shape), (
            f"receiver expects {tensor.dtype} {tuple(tensor.shape)}, the sender broadcast {recorded.dtype} "
            f"{tuple(recorded.shape)}")
        tensor.copy_(recorded)

    def unreceived(self) -> int:
        return len(self._replay)


class RecordedGroup(WeightGroup):
    """Our WeightGroup with its broadcast going to a recording communicator (as on the NCCL path)."""

    def __init__(self, communicator: RecordingCommunicator):
        super().__init__(communicator, None, torch.device("cpu"))

    def broadcast(self, tensor: torch.Tensor) -> None:
        self._communicator.broadcast(tensor, src=0)


@pytest.fixture
def cuda_streams_as_no_ops(vllm_on_cpu, monkeypatch):
    """vLLM's packed broadcast overlaps buckets on CUDA streams and events: ordering only, which a
    CPU does not need."""
    from vllm.distributed.weight_transfer import packed_tensor

    class NoStream:
        def synchronize(self):
            pass

        def wait_event(self, event):
            pass

    class NoEvent:
        def record(self, stream=None):
            pass

    monkeypatch.setattr(packed_tensor, "_get_streams", lambda device, count: tuple(NoStream() for _ in range(count)))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.accelerator, "current_stream", lambda *device: NoStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *device: None)
    monkeypatch.setattr(torch, "Event", NoEvent)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)


def mixed_parameters() -> torch.nn.Module:
    """Parameters of the dtypes a trainer sends, of sizes on both sides of a small bucket: larger
    than a bucket alone, filling one exactly with its neighbours (64 + 256 + 12 + 1280 bytes), a
    scalar, an empty one. Wider dtypes come first, so every tensor starts at an offset its dtype
    can be viewed at (see `test_a_packed_bucket_vllm_cannot_view_is_refused_before_sending`)."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"norm.weight": ([16], torch.float32), "exact.weight": ([64], torch.float32), "last.bias": ([3], torch.float32),
              "embed.weight": ([40, 16], torch.bfloat16), "scale": ([], torch.float16), "empty.bias": ([0], torch.bfloat16),
              "proj.weight": ([8, 8], torch.float16), "head.weight": ([300], torch.bfloat16)}
    module = torch.nn.Module()
    for name, (shape, dtype) in shapes.items():
        value = torch.randn(shape, generator=generator).to(dtype)
        module.register_parameter(name.replace(".", "_"), torch.nn.Parameter(value, requires_grad=True))
    return module


SMALL_BUCKET = 320  # bytes: "norm.weight" + "exact.weight" fill one exactly, so the bucket closes only after "last.bias"


@pytest.fixture(params=["tiny Qwen2.5-VL in bfloat16", "mixed dtypes and sizes"])
def trained_module(request, tiny_dir):
    if request.param == "mixed dtypes and sizes":
        return mixed_parameters()
    return load_model(tiny_dir).to(torch.bfloat16)


@pytest.mark.filterwarnings("ignore:Tensor .* exceeds buffer_size_bytes")  # vLLM's note on a tensor above a small bucket
@pytest.mark.parametrize("bucket_bytes", [SMALL_BUCKET, PACKED_BUFFER_SIZE_BYTES], ids=["small buckets", "vLLM's 1 GiB"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_our_sender_broadcasts_exactly_what_vllms_trainer_engine_broadcasts(
        cuda_streams_as_no_ops, trained_module, packed, bucket_bytes):
    """vLLM's NCCLTrainerWeightTransferEngine (its `_broadcast`: packed_nccl_broadcast_producer, or one
    tensor at a time) and our `send_buckets`, given the same parameters, make the same broadcasts:
    same count, same sizes, same bytes, in the same order."""
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    source = ModuleSource(trained_module)
    vllm_trainer = NCCLTrainerWeightTransferEngine(client=None, source=source, packed=packed,
                                                   packed_buffer_size_bytes=bucket_bytes)
    vllm_trainer.model_update_group = vllms = RecordingCommunicator()
    vllm_trainer._broadcast(source, source.metadata)

    ours = RecordingCommunicator()
    sent = send_buckets(RecordedGroup(ours), trained_state(trained_module, everything=True).items(), packed,
                        bucket_bytes=bucket_bytes)

    assert len(ours.sent) == len(vllms.sent) > 0
    if packed and bucket_bytes == SMALL_BUCKET:
        assert len(ours.sent) > 1  # the small buckets test bucket boundaries
    for index, (mine, theirs) in enumerate(zip(ours.sent, vllms.sent)):
        assert (mine.dtype, mine.shape) == (theirs.dtype, theirs.shape), f"broadcast {index}"
        assert torch.equal(mine.reshape(-1).view(torch.uint8), theirs.reshape(-1).view(torch.uint8)), f"broadcast {index}"
    assert sent == sum(t.numel() * t.element_size() for t in ours.sent)
    # The update info our sender announces is the one vLLM's trainer engine announces.
    info = update_info(trained_state(trained_module, everything=True), version=1, packed=packed)
    assert (info["names"], info["dtype_names"], info["shapes"]) == (
        [m.name for m in source.metadata], [str(m.dtype).split(".")[-1] for m in source.metadata],
        [list(m.shape) for m in source.metadata])


class LoadRecorder(torch.nn.Module):
    """A model whose `load_weights` keeps copies of what it is given (vLLM passes views of a bucket)."""

    def __init__(self):
        super().__init__()
        self.loaded: list[tuple[str, torch.Tensor]] = []

    def load_weights(self, weights):
        self.loaded += [(name, tensor.clone()) for name, tensor in weights]
        return {name for name, _ in weights}


@pytest.mark.parametrize("bucket_bytes", [SMALL_BUCKET, PACKED_BUFFER_SIZE_BYTES], ids=["small buckets", "vLLM's 1 GiB"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_vllms_worker_engine_receives_our_broadcast_as_our_tensors(
        cuda_streams_as_no_ops, vllm_config, trained_module, packed, bucket_bytes):
    """What our sender broadcasts, fed to vLLM's NCCLWeightTransferEngine (set up from the init info
    our engine sends it, receiving with the update info our trainer announces), reaches the
    model's `load_weights` as exactly our tensors: names, dtypes, shapes and values, every
    broadcast consumed."""
    from vllm.distributed.weight_transfer import nccl_engine

    tensors = trained_state(trained_module, everything=True)
    ours = RecordingCommunicator()
    send_buckets(RecordedGroup(ours), tensors.items(), packed, bucket_bytes=bucket_bytes)

    receiving = RecordingCommunicator(replay=ours.sent)
    model = LoadRecorder()
    worker = nccl_engine.NCCLWeightTransferEngine(vllm_config.weight_transfer_config, vllm_config,
                                                  torch.device("cpu"), model)
    init = {**weight_transfer_init_info("10.0.0.1", 29600, 1, 2, packed), "packed_buffer_size_bytes": bucket_bytes}
    with pytest.MonkeyPatch.context() as patch:  # the NCCL group itself: the recorded broadcasts
        patch.setattr(nccl_engine, "worker_init_process_group", lambda init_info, parallel_config: receiving)
        worker.init_transfer_engine(worker.parse_init_info(init))
    info = update_info(tensors, version=1, packed=packed)
    worker.receive_weights(worker.parse_update_info({key: info[key] for key in ("names", "dtype_names", "shapes")}))

    assert receiving.unreceived() == 0
    assert [name for name, _ in model.loaded] == list(tensors)
    for (name, received), expected in zip(model.loaded, tensors.values()):
        assert (received.dtype, received.shape) == (expected.dtype, expected.shape), name
        assert torch.equal(received, expected), name


def test_a_packed_bucket_vllm_cannot_view_is_refused_before_sending(cuda_streams_as_no_ops, vllm_config):
    """An fp32 tensor after an odd count of bf16 elements sits in a bucket where vLLM's worker cannot
    view it (so neither can ours): the sender names it before anything is broadcast."""
    from vllm.distributed.weight_transfer import nccl_engine

    tensors = {"a": torch.ones(3, dtype=torch.bfloat16), "b": torch.ones(2, dtype=torch.float32)}
    assert unaligned_in_buckets(tensors) == ["b"]
    assert unaligned_in_buckets({"b": tensors["b"], "a": tensors["a"]}) == []
    assert unaligned_in_buckets(tensors, bucket_bytes=4) == []  # "b" opens a bucket of its own

    ours = RecordingCommunicator()
    send_buckets(RecordedGroup(ours), tensors.items(), packed=True)
    worker = nccl_engine.NCCLWeightTransferEngine(vllm_config.weight_transfer_config, vllm_config,
                                                  torch.device("cpu"), LoadRecorder())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nccl_engine, "worker_init_process_group",
                      lambda init_info, parallel_config: RecordingCommunicator(replay=ours.sent))
        worker.init_transfer_engine(worker.parse_init_info(weight_transfer_init_info("10.0.0.1", 29600, 1, 2, True)))
    info = update_info(tensors, version=1)
    with pytest.raises(RuntimeError, match="storage_offset"):
        worker.receive_weights(worker.parse_update_info({key: info[key] for key in ("names", "dtype_names", "shapes")}))


def test_our_init_info_is_the_one_vllms_trainer_engine_sends_its_workers(vllm_on_cpu):
    from vllm.distributed.weight_transfer.nccl_common import build_worker_init_payload
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    for packed in (True, False):
        vllms = build_worker_init_payload(
            NCCLTrainerInitInfo(rank=0, master_address="10.0.0.1", master_port=29600, world_size=2), packed=packed)
        assert weight_transfer_init_info("10.0.0.1", 29600, 1, 2, packed) == vllms


def test_the_trainer_joins_the_group_as_vllms_trainer_init_does(vllm_on_cpu, vllm_config, monkeypatch):
    """vLLM's `trainer_init` (the trainer's side) and `worker_init_process_group` (a worker's) against
    our `join_weight_group` as the trainer's leader (rank 0) and as an hf engine on a GPU (its
    rank_offset): the same rendezvous store and NCCL communicator, made with the same arguments,
    on a device with an index (vLLM's communicator refuses tensors of any other device)."""
    from vllm.distributed import utils
    from vllm.distributed.device_communicators import pynccl
    from vllm.distributed.weight_transfer import nccl_common
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferInitInfo

    made: list[tuple] = []

    class Store:
        def __init__(self, **arguments):
            made.append(("store", arguments))

    class Communicator:  # the GPU boundary: vLLM's PyNcclCommunicator(group, device)
        def __init__(self, group, device):
            made.append(("communicator", type(group).__name__, device))
            self.group = group

    monkeypatch.setattr(utils.StatelessProcessGroup, "create", staticmethod(lambda **arguments: Store(**arguments)))
    monkeypatch.setattr(pynccl, "PyNcclCommunicator", Communicator)
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 3)

    nccl_common.trainer_init({"master_address": "10.0.0.1", "master_port": 29600, "world_size": 5})
    vllms, made[:] = list(made), []
    group = join_weight_group("10.0.0.1", 29600, 0, 5, torch.device("cuda"), timedelta(seconds=5))
    assert made == vllms
    assert group.device == torch.device("cuda:3")  # PyNcclCommunicator's device from index 3

    init = NCCLWeightTransferInitInfo(master_address="10.0.0.1", master_port=29600, rank_offset=2, world_size=5)
    made[:] = []
    nccl_common.worker_init_process_group(init, vllm_config.parallel_config)
    vllms, made[:] = list(made), []
    group = join_weight_group("10.0.0.1", 29600, 2, 5, torch.device("cuda", 3), timedelta(seconds=5))
    assert made == vllms
    assert group.device == torch.device("cuda:3")
