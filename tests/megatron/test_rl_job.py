"""`jobs/rl.py trainer=megatron` on several ranks: the leader's rollouts feed every rank's update."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from deepeyes.model import ensure_tiny_model
from tests.megatron.workers import rl_job

pytestmark = pytest.mark.slow


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rl_job_on_two_ranks_follows_one_rank_and_resumes_at_another_layout(tmp_path, run_ranks):
    # Two data-parallel ranks checkpoint after step 1; the run resumes on one rank (the
    # distributed checkpoint reshards on load) and must end where an uninterrupted one-rank run ends.
    one = Path(run_ranks(rl_job, 1, str(tmp_path / "one"), ["grpo.steps=2"]))
    run_ranks(rl_job, 2, str(tmp_path / "two"), ["grpo.steps=1"])
    resumed = Path(run_ranks(rl_job, 1, str(tmp_path / "two"), ["grpo.steps=2"]))
    assert one.name == resumed.name == "step_000002"
    for step in (1, 2):
        turns = [
            [(r["model_turns"], r["reward"]) for r in read_jsonl(run / "rollouts" / f"step_{step:06d}.jsonl")]
            for run in (tmp_path / "one", tmp_path / "two")
        ]
        assert turns[0] == turns[1], f"step {step}"
    want, got = load_file(one / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert max((want[n] - got[n]).abs().max().item() for n in want) < 1e-5
    initial = load_file(Path(ensure_tiny_model()) / "model.safetensors")
    assert max((want[n] - initial[n]).abs().max().item() for n in want) > 1e-4  # the runs trained
    assert [row["step"] for row in read_jsonl(tmp_path / "two" / "metrics.jsonl")] == [1, 2]
