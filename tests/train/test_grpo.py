"""Real RL steps on the tiny model: reproducible from the seed, logged, and moving the policy the
way the advantages say."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from deepeyes.config import register_configs, to_object
from deepeyes.train.rl import build_trainer, train_grpo
from deepeyes.train.losses import grpo_advantages
from tests.paths import CONF_DIR, TOY_RL

pytestmark = pytest.mark.slow

SMALL = [
    *TOY_RL, "grpo.steps=1", "grpo.prompts_per_step=2", "rollout.n=2", "rollout.max_turn_tokens=12",
    "rollout.max_response_tokens=64", "rollout.max_turns=2", "optim.lr=1e-3", "data.sample_per_family=4",
    "rollout.servers=0",  # the in-process reference path; tests/rollout/test_rl_services.py runs the services
]


def rl_config(out_dir, *overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("rl", overrides=[*SMALL, f"run.out_dir={out_dir}", *overrides])
    return to_object(cfg)


def rollouts(run_dir):
    return [json.loads(line) for line in (run_dir / "rollouts" / "step_000001.jsonl").read_text().splitlines()]


def test_an_rl_run_is_reproducible_from_its_seed_and_logs_its_metrics(tmp_path):
    first = train_grpo(rl_config(tmp_path / "a"))
    second = train_grpo(rl_config(tmp_path / "b"))
    other_seed = train_grpo(rl_config(tmp_path / "c", "run.seed=1"))
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert all(a[name].equal(b[name]) for name in a)
    turns = lambda run: [(r["model_turns"], r["reward"]) for r in rollouts(tmp_path / run)]  # noqa: E731
    assert turns("a") == turns("b")
    assert turns("a") != turns("c")
    assert other_seed.name == first.name == "step_000001"

    (metrics,) = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward/mean", "reward/format_rate", "reward/accuracy", "tools/code_calls", "tools/search_calls",
                "tools/image_search_calls", "rollout/turns", "rollout/response_tokens", "timing/step_s"):
        assert key in metrics
    assert metrics["policy/rollout_logprob_abs_diff"] < 1e-2  # the engine and the trainer agree
    assert list((tmp_path / "a" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_an_update_raises_the_logprob_of_better_rollouts_and_lowers_worse_ones(tmp_path):
    trainer = build_trainer(rl_config(tmp_path, "grpo.micro_batch_size=1", "trainer=hf"), tmp_path, None)
    trajectories = trainer.collect(step=0)
    for index, trajectory in enumerate(trajectories):  # within each group: first good, second bad
        trajectory.reward = 1.0 if index % 2 == 0 else 0.0
    advantages = grpo_advantages([t.reward for t in trajectories], [t.group for t in trajectories])
    frozen_before = {n: p.clone() for n, p in trainer.policy.model.named_parameters() if "visual" in n}
    with torch.no_grad():
        before = [lp.sum().item() for lp in trainer._logprobs(trajectories, grad=False)]
    metrics = trainer.update(trajectories, advantages)
    with torch.no_grad():
        after = [lp.sum().item() for lp in trainer._logprobs(trajectories, grad=False)]
    assert metrics["policy/grad_norm"] > 0
    for advantage, old, new in zip(advantages, before, after):
        assert (new - old) * advantage > 0
    assert all(p.equal(frozen_before[n]) for n, p in trainer.policy.model.named_parameters() if "visual" in n)
