"""The vllm backend's own pieces, checkable without vLLM: how our requests become vLLM's prompts
and sampling parameters, how vLLM's outputs become our results, the context length, and that a
box without vLLM gets a clear error. tests/rollout/test_vllm_contract.py runs them against
vLLM's own code (where vLLM is installed); generation itself needs a GPU."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from deepeyes.config import ModelConfig, RolloutConfig
from deepeyes.service import free_port, new_token_file
from deepeyes.rollout.api import SamplingParams
from deepeyes.rollout.vllm_engine import (
    INSTALL_HINT, collapse_image_pads, engine_args, finish_reason, rollout_max_model_len, sampled_logprobs,
    sampling_kwargs, vllm_prompt,
)

PAD = 151655


def test_sampling_parameters_keep_stop_strings_and_ask_for_the_sampled_logprob():
    kwargs = sampling_kwargs(SamplingParams(max_new_tokens=7, temperature=0.7, top_p=0.9, stop=("</code>",), seed=3))
    assert kwargs["max_tokens"] == 7 and kwargs["seed"] == 3 and kwargs["stop"] == ["</code>"]
    assert kwargs["include_stop_str_in_output"] is True  # the trained tokens end where the model stopped
    assert kwargs["logprobs"] == 0


@pytest.mark.parametrize("reason, stop_reason, ours", [
    ("length", None, "length"), ("stop", "</code>", "stop"), ("stop", None, "eos"), ("stop", 151645, "eos"),
    ("abort", None, "abort"), ("error", None, "error"), ("repetition", None, "error"),
])
def test_finish_reasons_map_to_ours(reason, stop_reason, ours):
    assert finish_reason(SimpleNamespace(finish_reason=reason, stop_reason=stop_reason)) == ours


def test_each_image_run_is_collapsed_to_one_pad_and_nothing_else_changes():
    ids = [1, 2, PAD, PAD, PAD, 3, PAD, 4, PAD, PAD]
    assert collapse_image_pads(ids, PAD) == [1, 2, PAD, 3, PAD, 4, PAD]
    assert collapse_image_pads([PAD, PAD, 7], PAD) == [PAD, 7]
    assert collapse_image_pads([5, 6], PAD) == [5, 6]


def test_a_prompt_carries_its_images_under_their_content_hashes():
    prompt = vllm_prompt([1, PAD, PAD, 2], PAD, ["image a"], ["sha-a"])
    assert prompt == {"prompt_token_ids": [1, PAD, 2], "multi_modal_data": {"image": ["image a"]},
                      "multi_modal_uuids": {"image": ["sha-a"]}}
    assert vllm_prompt([1, 2], PAD, [], []) == {"prompt_token_ids": [1, 2]}


def test_the_context_length_is_prompt_plus_the_response_budget():
    model = ModelConfig(max_pixels=262144, max_trajectory_pixels=4194304)
    assert rollout_max_model_len(model, RolloutConfig(max_response_tokens=16384)) == 1024 + 4194304 // 784 + 16384
    no_trajectory_budget = ModelConfig(max_pixels=50176, max_trajectory_pixels=0)
    assert rollout_max_model_len(no_trajectory_budget, RolloutConfig(max_response_tokens=512)) == 1024 + 64 + 512


def test_engine_arguments_carry_parallelism_context_memory_and_pixel_budget(tmp_path):
    args = engine_args(tmp_path, dtype="bfloat16", tensor_parallel=4, max_model_len=22758,
                       gpu_memory_utilization=0.8, max_batch=256, min_pixels=3136, max_pixels=262144)
    assert (args["tensor_parallel_size"], args["max_model_len"], args["gpu_memory_utilization"]) == (4, 22758, 0.8)
    assert args["mm_processor_kwargs"] == {"size": {"shortest_edge": 3136, "longest_edge": 262144}}
    assert args["weight_transfer_config"] == {"backend": "nccl"} and args["enable_prefix_caching"]


def test_logprobs_are_those_of_the_sampled_tokens():
    output = SimpleNamespace(token_ids=[5, 9], logprobs=[
        {5: SimpleNamespace(logprob=-0.5), 7: SimpleNamespace(logprob=-2.0)}, {9: SimpleNamespace(logprob=-0.25)},
    ])
    assert sampled_logprobs(output) == [-0.5, -0.25]


@pytest.mark.slow
@pytest.mark.skipif("vllm" in sys.modules or __import__("importlib").util.find_spec("vllm") is not None,
                    reason="vLLM is installed here")
def test_a_server_without_vllm_exits_naming_the_fix(tiny_dir, tmp_path):
    server = subprocess.run(
        [sys.executable, "-m", "deepeyes.rollout.server", "--backend", "vllm", "--model", str(tiny_dir),
         "--port", str(free_port()), "--token-file", str(new_token_file(tmp_path))],
        capture_output=True, text=True, timeout=120,
    )
    assert server.returncode == 1
    assert INSTALL_HINT in server.stderr
