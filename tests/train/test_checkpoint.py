"""Checkpoints: one save/restore helper for every trainer, and a previous stage's result named by
its checkpoint, its `latest` pointer or its run directory."""

import torch

from deepeyes.config import ModelConfig, OptimConfig
from deepeyes.train.checkpoint import (
    HFModelCheckpoint, latest_checkpoint, resolve_checkpoint, restore_checkpoint, save_checkpoint,
)
from deepeyes.train.sampler import MixtureSampler
from deepeyes.train.setup import build_optimizer, load_policy


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
