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
import importlib.util
import threading
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
from deepeyes.rollout.weight_sync import trained_state
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
        await engine.receive_weights(2, ["lm_head.weight"], ["bfloat16"], [[152064, 64]], packed=True)
        with pytest.raises(ValueError, match="packed"):
            await engine.receive_weights(3, ["lm_head.weight"], ["bfloat16"], [[152064, 64]], packed=False)
        with pytest.raises(RuntimeError, match="NCCL"):
            await engine.receive_weights(3, ["broken"], ["bfloat16"], [[1]], packed=True)
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
