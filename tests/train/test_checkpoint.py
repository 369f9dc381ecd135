"""Checkpoints: one save/restore helper for every trainer, and a previous stage's result named by
its checkpoint, its `latest` pointer or its run directory."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from deepeyes.config import ModelConfig, OptimConfig
from deepeyes.data import read_sft_records, write_sft_records
from deepeyes.train.checkpoint import (
    HFModelCheckpoint, latest_checkpoint, prune_checkpoints, resolve_checkpoint, restore_checkpoint, save_checkpoint,
)
from deepeyes.train.preemption import Preempted
from deepeyes.train.sampler import MixtureSampler
from deepeyes.train.setup import build_optimizer, load_policy
from deepeyes.train.sft import train_sft
from tests.train.test_sft import sft_config, stop_once_step_1_is_logged


def test_a_checkpoint_is_found_from_its_pointer_or_its_run_directory(tmp_path):
    step = tmp_path / "checkpoints" / "step_000240"
    step.mkdir(parents=True)
    (step / "config.json").write_text("{}")
    (tmp_path / "checkpoints" / "latest").write_text("step_000240\n")
    for name in (step, tmp_path / "checkpoints" / "latest", tmp_path):
        assert resolve_checkpoint(name) == step
    assert resolve_checkpoint(tmp_path / "elsewhere") == tmp_path / "elsewhere"  # left for the loader's error


def test_save_and_restore_bring_back_optimizer_data_position_and_rng(tmp_path):
    policy = load_policy(ModelConfig())
    optimizer = build_optimizer(policy.model, OptimConfig(lr=1e-3))
    policy.model.lm_head.weight.sum().backward()
    optimizer.step()  # Adam moments to save
    sampler = MixtureSampler({"tasks": list(range(10))}, {"tasks": 1.0}, seed=0)
    sampler.take(4)
    torch.manual_seed(7)
    checkpoint = save_checkpoint(tmp_path, 3, "run-3", HFModelCheckpoint(policy.model, policy.processor, optimizer),
                                 sampler)
    moments = optimizer.state_dict()["state"]  # lm_head's: the one parameter with a gradient
    (index,) = moments
    expected = (sampler.take(3), torch.rand(2), moments[index]["exp_avg"].clone())
    assert checkpoint == tmp_path / "checkpoints" / "step_000003" and latest_checkpoint(tmp_path) == checkpoint
    assert not list((tmp_path / "checkpoints").glob(".partial*"))

    restored_policy = load_policy(ModelConfig(), str(checkpoint))  # the weights come with the policy
    fresh = build_optimizer(restored_policy.model, OptimConfig(lr=1e-3))
    fresh_sampler = MixtureSampler({"tasks": list(range(10))}, {"tasks": 1.0}, seed=0)
    state = restore_checkpoint(checkpoint, HFModelCheckpoint(restored_policy.model, policy.processor, fresh),
                               fresh_sampler)
    assert (state.step, state.run_id) == (3, "run-3")
    assert fresh_sampler.take(3) == expected[0] and torch.equal(torch.rand(2), expected[1])
    assert torch.equal(fresh.state_dict()["state"][index]["exp_avg"], expected[2])
    assert torch.equal(restored_policy.model.lm_head.weight, policy.model.lm_head.weight)


def steps(out_dir):
    return sorted(path.name for path in (out_dir / "checkpoints").iterdir() if path.name != "latest")


def test_only_the_newest_checkpoints_stay_and_never_the_one_latest_names(tmp_path):
    policy = load_policy(ModelConfig())
    model = HFModelCheckpoint(policy.model, policy.processor, build_optimizer(policy.model, OptimConfig()))
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        save_checkpoint(tmp_path, step, "run", model)  # keep=0: every checkpoint stays
    assert steps(tmp_path) == ["step_000001", "step_000002"]
    # What a job killed mid-save or mid-prune leaves behind goes with the next prune.
    (root / ".partial_step_000009").mkdir()
    (root / ".pruning_step_000000").mkdir()
    for step in (3, 4):
        save_checkpoint(tmp_path, step, "run", model, keep=2)
    assert steps(tmp_path) == ["step_000003", "step_000004"] and latest_checkpoint(tmp_path) == root / "step_000004"
    assert load_policy(ModelConfig(), str(tmp_path)).path == root / "step_000004"

    # A run sent back to step 3 (latest edited by hand): step 4 is an abandoned attempt's, past
    # `latest`, and stays (the run overwrites it when it gets there); step 3 is `latest` and stays.
    (root / "latest").write_text("step_000003")
    assert prune_checkpoints(root, keep=1) == [] and steps(tmp_path) == ["step_000003", "step_000004"]
    save_checkpoint(tmp_path, 4, "run", model, keep=1)  # a newer step 4, complete: now step 3 goes
    assert steps(tmp_path) == ["step_000004"] and latest_checkpoint(tmp_path) == root / "step_000004"


@pytest.mark.slow
def test_a_run_resumes_from_its_pruned_checkpoints_exactly(tmp_path, sample_data):
    """keep_checkpoints=1 and a save every step: the preempted run leaves one checkpoint, the
    requeued job resumes from it and ends where the run that was never stopped ends."""
    write_sft_records(tmp_path / "sft.jsonl", read_sft_records(sample_data.sft_train)[:4])
    small = [f"data.sft={tmp_path / 'sft.jsonl'}", "sft.epochs=2", "sft.batch_size=2", "optim.lr=3e-3", "trainer=hf",
             "run.save_every=1", "run.keep_checkpoints=1"]
    whole = train_sft(sft_config(tmp_path / "whole", *small))
    stop_once_step_1_is_logged(tmp_path / "stopped")
    with pytest.raises(Preempted, match=r"stopped after step ([123]) on the stop signal") as stopped:
        train_sft(sft_config(tmp_path / "stopped", *small))
    stopped_at = int(re.search(r"after step (\d+)", str(stopped.value)).group(1))
    assert steps(tmp_path / "stopped") == [f"step_{stopped_at:06d}"]  # the older ones pruned
    resumed = train_sft(sft_config(tmp_path / "stopped", *small))  # the requeued job
    assert steps(tmp_path / "stopped") == steps(tmp_path / "whole") == ["step_000004"]
    want, got = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(want[name].equal(got[name]) for name in want)

    def losses(run):
        rows = map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
        return {row["step"]: row["sft/loss"] for row in rows if "sft/loss" in row}

    assert losses("stopped") == losses("whole") and len(losses("whole")) == 4
