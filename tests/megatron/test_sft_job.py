"""`jobs/sft.py trainer=megatron`: stopped on two ranks, resumed on one, it ends where an
uninterrupted one-rank run ends (the distributed checkpoint reshards on load)."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from deepeyes.data import read_sft_records, write_sft_records
from tests.megatron.workers import sft_job

pytestmark = pytest.mark.slow


def test_sft_job_stopped_on_two_ranks_resumes_on_one(tmp_path, run_ranks, sample_data):
    write_sft_records(tmp_path / "sft.jsonl", read_sft_records(sample_data.sft_train)[:4])
    small = [f"data.sft={tmp_path / 'sft.jsonl'}", "sft.epochs=2", "sft.batch_size=2", "sft.micro_batch_size=1",
             "optim.lr=3e-3"]
    whole = Path(run_ranks(sft_job, 1, str(tmp_path / "whole"), small, False))
    stopped = run_ranks(sft_job, 2, str(tmp_path / "stopped"), small, True)
    assert stopped.startswith("preempted: stopped after step")
    resumed = Path(run_ranks(sft_job, 1, str(tmp_path / "stopped"), small, False))
    assert whole.name == resumed.name == "step_000004"
    want, got = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert max((want[n] - got[n]).abs().max().item() for n in want) < 1e-5
    losses = {
        run: {r["step"]: r["sft/loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
              if "sft/loss" in r}
        for run in ("whole", "stopped")
    }
    assert sorted(losses["stopped"]) == [1, 2, 3, 4]
    assert losses["stopped"] == pytest.approx(losses["whole"], rel=1e-5)
