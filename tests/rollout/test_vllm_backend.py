"""The vllm backend's contract, checkable without a GPU: how our requests become vLLM's sampling
parameters, how vLLM's outputs become our results, and that a box without vLLM gets a clear
error. Generation itself runs only where vLLM and a GPU are present."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from deepeyes.service import free_port, new_token_file
from deepeyes.rollout.api import SamplingParams
from deepeyes.rollout.vllm_engine import INSTALL_HINT, finish_reason, sampled_logprobs, sampling_kwargs


def test_sampling_parameters_keep_stop_strings_and_ask_for_the_sampled_logprob():
    kwargs = sampling_kwargs(SamplingParams(max_new_tokens=7, temperature=0.7, top_p=0.9, stop=("</code>",), seed=3))
    assert kwargs["max_tokens"] == 7 and kwargs["seed"] == 3 and kwargs["stop"] == ["</code>"]
    assert kwargs["include_stop_str_in_output"] is True  # the trained tokens end where the model stopped
    assert kwargs["logprobs"] == 0


@pytest.mark.parametrize("reason, stop_reason, ours", [
    ("length", None, "length"), ("stop", "</code>", "stop"), ("stop", None, "eos"), ("stop", 151645, "eos"),
])
def test_finish_reasons_map_to_ours(reason, stop_reason, ours):
    assert finish_reason(SimpleNamespace(finish_reason=reason, stop_reason=stop_reason)) == ours


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
