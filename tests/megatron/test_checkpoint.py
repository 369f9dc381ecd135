"""Distributed checkpoints reshard: saved at TP=2, resumed at TP=1 (DP=2), the next step is the same."""

import pytest

from deepeyes.model import load_model
from deepeyes.model.megatron.spec import ParallelLayout
from tests.megatron.workers import resume

pytestmark = pytest.mark.slow


def test_save_at_tp2_resume_at_tp1_gives_the_same_next_step(tmp_path, run_ranks):
    result = run_ranks(resume, 2, ParallelLayout(tensor=2), ParallelLayout(), str(tmp_path))
    assert result["step"] == 1 and result["run_id"] == "run-1"
    restored_next, saved_next = result["next_tasks"]
    assert restored_next == saved_next  # the data position came back
    assert result["loss_diff"] < 1e-5, result
    assert result["param_diff"] < 1e-5, result  # optimizer moments came back too
    # the HF directory beside it loads with plain from_pretrained
    assert load_model(tmp_path / "checkpoints" / "step_000001").config.text_config.hidden_size == 64
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000001"
