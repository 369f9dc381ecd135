"""What a rollout engine is asked and answers, in process and on the wire.

Every engine (in-process `HFRolloutEngine`, the HTTP `RolloutClient`, the vLLM backend) serves
`async generate(GenerateRequest) -> GenerateResult`. Token ids go in and come out: the caller
never re-tokenizes model output, so training sees exactly what was sampled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from deepeyes.agent.protocol import STOP_STRINGS


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy; logprobs are then those of the unscaled distribution
    top_p: float = 1.0
    stop: tuple[str, ...] = STOP_STRINGS
    seed: int = 0  # the request's own noise stream


@dataclass(frozen=True)
class GenerateRequest:
    input_ids: list[int]
    images: list[Path]  # every image whose placeholder tokens appear in input_ids, in order
    sampling: SamplingParams


@dataclass(frozen=True)
class GenerateResult:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "eos" (model ended its turn) | "stop" (a stop string) | "length"
    weight_version: int


class BadRequest(ValueError):
    """A request body that does not describe a generation; the message names the field."""


def request_to_json(request: GenerateRequest, min_weight_version: int = 0) -> dict[str, Any]:
    sampling = asdict(request.sampling)
    sampling["stop"] = list(sampling["stop"])
    return {
        "input_ids": list(request.input_ids),
        "images": [str(image) for image in request.images],
        "sampling": sampling,
        "min_weight_version": min_weight_version,
    }


def request_from_json(body: Any) -> tuple[GenerateRequest, int]:
    """(request, min_weight_version) from a decoded JSON body; BadRequest names what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    ids = body.get("input_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise BadRequest("'input_ids' must be a non-empty list of non-negative integers")
    images = body.get("images", [])
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise BadRequest("'images' must be a list of file paths")
    for image in images:
        if not Path(image).is_file():
            raise BadRequest(f"image {image} does not exist on the server's filesystem")
    raw = body.get("sampling")
    if not isinstance(raw, dict):
        raise BadRequest("'sampling' must be an object")
    try:
        sampling = SamplingParams(
            max_new_tokens=int(raw["max_new_tokens"]),
            temperature=float(raw.get("temperature", 1.0)),
            top_p=float(raw.get("top_p", 1.0)),
            stop=tuple(str(s) for s in raw.get("stop", STOP_STRINGS)),
            seed=int(raw.get("seed", 0)),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise BadRequest(f"'sampling' is invalid: {error!r}") from None
    if sampling.max_new_tokens <= 0 or sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
        raise BadRequest(f"'sampling' out of range: {sampling}")
    min_version = body.get("min_weight_version", 0)
    if not isinstance(min_version, int):
        raise BadRequest("'min_weight_version' must be an integer")
    return GenerateRequest(list(ids), [Path(i) for i in images], sampling), min_version


def result_to_json(result: GenerateResult) -> dict[str, Any]:
    return asdict(result)


def result_from_json(body: dict[str, Any]) -> GenerateResult:
    return GenerateResult(
        token_ids=list(body["token_ids"]), logprobs=[float(v) for v in body["logprobs"]],
        finish_reason=body["finish_reason"], weight_version=int(body["weight_version"]),
    )


class RolloutEngine(Protocol):
    """What the agent loop needs: the in-process `HFRolloutEngine` or a `RolloutClient`."""

    async def generate(self, request: GenerateRequest) -> GenerateResult: ...

    async def close(self) -> None: ...
