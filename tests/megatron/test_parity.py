"""Megatron training equals the reference trainer: losses, gradients, weights after 3 steps.

Each rank runs 3 SFT optimizer steps (vision tower trainable, so its data-parallel gradient
reduction is covered too); rank 0 runs the plain-PyTorch reference trainer on the same
mini-batches and compares the gathered Megatron weights and gradients with it.
"""

import pytest

from deepeyes.model.megatron.spec import ParallelLayout as Layout
from tests.megatron.workers import Case, deeper_tiny_model, parity

pytestmark = pytest.mark.slow
TOLERANCE = 1e-5  # fp32


def _check(report):
    for case, result in report.items():
        assert result["loss_diff"] < TOLERANCE, (case, result)
        assert result["grad_diff"] is None or result["grad_diff"] < TOLERANCE, (case, result)
        assert result["param_diff"] < TOLERANCE, (case, result)


def test_two_ranks_tp_pp_dp_sequence_parallel_recompute(run_ranks):
    cases = [
        Case(Layout(tensor=2)),
        Case(Layout(pipeline=2)),
        Case(Layout()),  # DP=2
        Case(Layout(tensor=2, sequence_parallel=True, recompute=True)),
        Case(Layout(), distributed_optimizer=True),
    ]
    report = run_ranks(parity, 2, cases, None)
    assert len(report) == len(cases)
    _check(report)


def test_four_ranks_tp2_dp2_distributed_optimizer_and_tp2_pp2(run_ranks):
    cases = [Case(Layout(tensor=2), distributed_optimizer=True), Case(Layout(tensor=2, pipeline=2))]
    report = run_ranks(parity, 4, cases, None)
    assert len(report) == len(cases)
    _check(report)


def test_interleaved_pipeline_on_a_four_layer_model(tmp_path, run_ranks):
    model_dir = deeper_tiny_model(str(tmp_path), layers=4)
    cases = [Case(Layout(pipeline=2, virtual_pipeline=2))]  # interleaved 1F1B, 2 chunks per rank
    report = run_ranks(parity, 2, cases, str(model_dir))
    assert len(report) == len(cases)
    _check(report)
