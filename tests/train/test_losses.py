import pytest
import torch

from deepeyes.train.losses import clipped_policy_loss, grpo_advantages


def test_advantages_are_normalized_within_each_group():
    rewards = [1.0, 0.0, 0.0, 0.0, 0.2, 0.2, 1.0, 1.0]
    groups = [0, 0, 0, 0, 1, 1, 2, 2]
    adv = grpo_advantages(rewards, groups)
    group0 = torch.tensor(adv[:4])
    assert group0.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert group0.std().item() == pytest.approx(1.0, abs=1e-4)
    assert adv[0] > 0 > adv[1]
    assert adv[4:] == [0.0, 0.0, 0.0, 0.0]  # identical rewards: no signal


def test_a_group_of_one_has_zero_advantage():
    assert grpo_advantages([0.7], [3]) == [0.0]


def _loss(ratio: float, advantage: float):
    logprob = torch.tensor([0.0], requires_grad=True)
    old = torch.log(torch.tensor([1.0 / ratio]))
    loss, stats = clipped_policy_loss(logprob, old, torch.tensor([advantage]), torch.ones(1), 0.2, 0.28)
    loss.backward()
    return loss.item(), logprob.grad.item(), stats


def test_on_policy_gradient_is_minus_the_advantage():
    loss, grad, stats = _loss(1.0, 2.0)
    assert loss == pytest.approx(-2.0)
    assert grad == pytest.approx(-2.0)
    assert stats["clip_fraction"].item() == 0.0


@pytest.mark.parametrize(
    "ratio, advantage, clipped",
    [(1.5, 1.0, True), (1.2, 1.0, False), (0.5, -1.0, True), (0.9, -1.0, False), (0.5, 1.0, False), (1.5, -1.0, False)],
)
def test_clipping_stops_the_gradient_only_beyond_the_trust_region(ratio, advantage, clipped):
    _, grad, stats = _loss(ratio, advantage)
    assert (grad == 0.0) == clipped
    assert bool(stats["clip_fraction"].item()) == clipped


def test_masked_tokens_contribute_nothing():
    logprob = torch.zeros(3, requires_grad=True)
    loss, _ = clipped_policy_loss(logprob, torch.zeros(3), torch.ones(3), torch.tensor([1.0, 0.0, 1.0]), 0.2, 0.2)
    loss.backward()
    assert logprob.grad.tolist() == [-1.0, 0.0, -1.0]
