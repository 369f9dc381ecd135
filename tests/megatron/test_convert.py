"""HF ⇄ Megatron conversion: bit-exact round trip and equal logprobs, at several TP/PP layouts."""

import pytest
import torch
from safetensors.torch import load_file

from deepeyes.model import load_model
from deepeyes.model.megatron.spec import ParallelLayout
from tests.megatron.workers import conversion

pytestmark = pytest.mark.slow


def _assert_same_checkpoint(original_dir, converted_dir):
    original = load_file(original_dir / "model.safetensors")
    converted = load_file(converted_dir / "model.safetensors")
    assert original.keys() == converted.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, converted[name]), name
    # and transformers loads it into the same model
    a, b = load_model(original_dir).state_dict(), load_model(converted_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_is_bit_exact_and_logprobs_match_hf(tiny_dir, tmp_path, run_ranks):
    layouts = [ParallelLayout(), ParallelLayout(tensor=2), ParallelLayout(pipeline=2)]  # DP2, TP2, PP2
    report = run_ranks(conversion, 2, layouts, str(tmp_path))
    for i, result in enumerate(report):
        _assert_same_checkpoint(tiny_dir, tmp_path / str(i))
        # Megatron (packed rows, local attention) vs HF (padded batch, sdpa), fp32
        assert result["scored_sequences"] == 4 and result["logprob_diff"] < 1e-5, (layouts[i], result)
