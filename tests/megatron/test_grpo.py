"""GRPO on the Megatron engine: the same update as the reference trainer on the same trajectories."""

import pytest

from tests.megatron.workers import grpo_update

pytestmark = pytest.mark.slow


def test_megatron_grpo_update_equals_the_reference_update(tmp_path, run_ranks):
    # two mini-batches: the old policy's logprobs are recomputed, the second mini-batch is off-policy
    overrides = ["grpo.micro_batch_size=1", "grpo.mini_batch_size=2"]
    result = run_ranks(grpo_update, 1, str(tmp_path), overrides)
    for key, (want, got) in result["metrics"].items():
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), (key, want, got)
    assert result["metrics"]["policy/grad_norm"][0] > 0
    assert result["moved"] > 1e-4  # the update did something ...
    assert result["param_diff"] < 1e-5  # ... and the same thing (fp32, lr 1e-3)
