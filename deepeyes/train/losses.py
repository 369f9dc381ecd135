"""GRPO: group-normalized advantages and the clipped, token-mean policy-gradient loss."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch


def grpo_advantages(rewards: Sequence[float], groups: Sequence[int], eps: float = 1e-6) -> list[float]:
    """(r - mean of its group) / (std of its group + eps), one value per trajectory.

    A group whose rollouts all scored the same carries no signal: its advantages are 0.
    """
    by_group: dict[int, list[float]] = defaultdict(list)
    for reward, group in zip(rewards, groups):
        by_group[group].append(reward)
    stats = {}
    for group, values in by_group.items():
        t = torch.tensor(values, dtype=torch.float64)
        stats[group] = (t.mean().item(), t.std(unbiased=len(values) > 1).item() if len(values) > 1 else 0.0)
    return [(r - stats[g][0]) / (stats[g][1] + eps) for r, g in zip(rewards, groups)]


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over trained tokens (mask 1) of the PPO clipped surrogate, plus per-token statistics.

    The caller divides by the number of trained tokens in the whole mini-batch (token-mean),
    so long and short responses weigh each of their tokens equally.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped) * mask
    with torch.no_grad():
        stats = {
            "clip_fraction": ((clipped > unclipped).float() * mask).sum(),
            "approx_kl": (0.5 * (logprobs - old_logprobs) ** 2 * mask).sum(),
        }
    return per_token.sum(), stats
