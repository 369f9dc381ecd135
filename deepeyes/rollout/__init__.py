"""Generation for RL: engines that sample token ids with exact logprobs, and the services around them.

- `HFRolloutEngine`: transformers generation in process, batching concurrent requests.
- `deepeyes.rollout.server`: the same (or vLLM) behind HTTP; `RolloutClient` spreads requests
  over several servers, retries elsewhere and counts failures.
- `WeightSync`: the trainer publishes weights after each step; servers load them (versioned).
- `JudgeClient`: an LLM judge served by a rollout server, with a counted rule-based fallback.
"""

from deepeyes.rollout.api import GenerateRequest, GenerateResult, RolloutEngine, SamplingParams
from deepeyes.rollout.client import RolloutClient, RolloutUnavailable
from deepeyes.rollout.judge import JudgeClient
from deepeyes.rollout.weight_sync import WeightSync, load_weights, publish_weights

__all__ = [
    "GenerateRequest",
    "GenerateResult",
    "JudgeClient",
    "RolloutClient",
    "RolloutEngine",
    "RolloutUnavailable",
    "SamplingParams",
    "WeightSync",
    "load_weights",
    "publish_weights",
]
