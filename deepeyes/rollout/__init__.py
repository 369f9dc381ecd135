"""Generation for RL: engines that sample token ids with exact logprobs, and the services around them.

- `HFRolloutEngine`: transformers generation in process, batching concurrent requests.
- `deepeyes.rollout.server`: the same (or vLLM) behind HTTP; `RolloutClient` spreads requests
  over several servers (a trajectory's turns stick to one), retries elsewhere what another server
  can serve and counts what fails for good (`RolloutRequestFailed`).
- `WeightSync` / `BroadcastWeightSync`: after each step the trainer's leader makes the new version
  what the servers serve, through a file or a broadcast (`rollout.weight_sync`).
- `JudgeClient`: an LLM judge served by a rollout server, with a counted rule-based fallback.
"""

from deepeyes.rollout.api import GenerateRequest, GenerateResult, RolloutEngine, SamplingParams
from deepeyes.rollout.client import RolloutClient, RolloutRequestFailed, RolloutUnavailable
from deepeyes.rollout.judge import JudgeClient
from deepeyes.rollout.weight_sync import BroadcastWeightSync, WeightSync, load_weights, publish_weights

__all__ = [
    "BroadcastWeightSync",
    "GenerateRequest",
    "GenerateResult",
    "JudgeClient",
    "RolloutClient",
    "RolloutEngine",
    "RolloutRequestFailed",
    "RolloutUnavailable",
    "SamplingParams",
    "WeightSync",
    "load_weights",
    "publish_weights",
]
