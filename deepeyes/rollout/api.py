"""What a rollout engine is asked and answers, in process and on the wire.

Every engine (in-process `HFRolloutEngine`, the HTTP `RolloutClient`, the vLLM backend) serves
`async generate(GenerateRequest) -> GenerateResult`. Token ids go in and come out: the caller
never re-tokenizes model output, so training sees exactly what was sampled.
"""

from __future__ import annotations

import math
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
    # The trajectory this turn belongs to: a client sends every turn of one trajectory to the same
    # server, whose prefix cache then holds the conversation so far ("" = no affinity).
    session: str = ""


# "eos": the model ended its turn; "stop": a stop string; "length": the token limit;
# "abort": the engine dropped the request (a weight update or shutdown cut it short);
# "error": the engine failed on it. The last two are kept as they are, never reported as "eos".
FINISH_REASONS = ("eos", "stop", "length", "abort", "error")


@dataclass(frozen=True)
class GenerateResult:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # one of FINISH_REASONS
    weight_version: int


@dataclass(frozen=True)
class RequestLimits:
    """What a server accepts: checked before a request joins a batch, so a bad one never fails the
    others batched with it."""

    vocab_size: int  # every input id is below it
    max_new_tokens: int  # the configured cap (the rollout limits' tokens per turn)
    max_input_tokens: int = 1 << 20
    max_stop_strings: int = 32
    max_stop_chars: int = 256


MAX_SEED = 2**63 - 1  # torch and vLLM take a signed 64-bit seed
MAX_TEMPERATURE = 100.0


class BadRequest(ValueError):
    """A request body that does not describe a generation; the message names the field."""


def request_to_json(request: GenerateRequest, min_weight_version: int = 0) -> dict[str, Any]:
    sampling = asdict(request.sampling)
    sampling["stop"] = list(sampling["stop"])
    return {
        "input_ids": list(request.input_ids),
        "images": [str(image) for image in request.images],
        "sampling": sampling,
        "session": request.session,
        "min_weight_version": min_weight_version,
    }


def request_from_json(body: Any, limits: RequestLimits | None = None) -> tuple[GenerateRequest, int]:
    """(request, min_weight_version) from a decoded JSON body, every field range-checked against
    `limits` (None: types only, for in-process use); BadRequest names what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    ids = body.get("input_ids")
    if not isinstance(ids, list) or not ids or not all(_is_int(i) and i >= 0 for i in ids):
        raise BadRequest("'input_ids' must be a non-empty list of non-negative integers")
    if limits is not None:
        if len(ids) > limits.max_input_tokens:
            raise BadRequest(f"'input_ids' has {len(ids)} tokens; this server takes at most {limits.max_input_tokens}")
        too_big = max(ids)
        if too_big >= limits.vocab_size:
            raise BadRequest(f"'input_ids' holds id {too_big}, outside the vocabulary (size {limits.vocab_size})")
    images = body.get("images", [])
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise BadRequest("'images' must be a list of file paths")
    for image in images:
        if not Path(image).is_file():
            raise BadRequest(f"image {image} does not exist on the server's filesystem")
    session = body.get("session", "")
    if not isinstance(session, str) or len(session) > 256:
        raise BadRequest("'session' must be a string of at most 256 characters")
    sampling = _sampling_from_json(body.get("sampling"), limits)
    min_version = body.get("min_weight_version", 0)
    if not _is_int(min_version):
        raise BadRequest("'min_weight_version' must be an integer")
    return GenerateRequest(list(ids), [Path(i) for i in images], sampling, session), min_version


def _sampling_from_json(raw: Any, limits: RequestLimits | None) -> SamplingParams:
    if not isinstance(raw, dict):
        raise BadRequest("'sampling' must be an object")
    max_new, seed = raw.get("max_new_tokens"), raw.get("seed", 0)
    temperature, top_p = raw.get("temperature", 1.0), raw.get("top_p", 1.0)
    stop = raw.get("stop", list(STOP_STRINGS))
    if not _is_int(max_new) or max_new <= 0:
        raise BadRequest(f"'sampling.max_new_tokens' must be a positive integer, not {max_new!r}")
    if limits is not None and max_new > limits.max_new_tokens:
        raise BadRequest(f"'sampling.max_new_tokens' is {max_new}; this server's cap is {limits.max_new_tokens}")
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise BadRequest(f"'sampling.seed' must be an integer in [0, 2**63 - 1], not {seed!r}")
    if not _is_number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
        raise BadRequest(f"'sampling.temperature' must be a finite number in [0, {MAX_TEMPERATURE}], not {temperature!r}")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise BadRequest(f"'sampling.top_p' must be a finite number in (0, 1], not {top_p!r}")
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'sampling.stop' must be a list of non-empty strings")
    if limits is not None and (len(stop) > limits.max_stop_strings or any(len(s) > limits.max_stop_chars for s in stop)):
        raise BadRequest(f"'sampling.stop' takes at most {limits.max_stop_strings} strings of "
                         f"{limits.max_stop_chars} characters")
    return SamplingParams(max_new, float(temperature), float(top_p), tuple(stop), seed)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def result_to_json(result: GenerateResult) -> dict[str, Any]:
    return asdict(result)


def result_from_json(body: dict[str, Any]) -> GenerateResult:
    if body.get("finish_reason") not in FINISH_REASONS:
        raise ValueError(f"unknown finish_reason {body.get('finish_reason')!r} (expected one of {FINISH_REASONS})")
    return GenerateResult(
        token_ids=list(body["token_ids"]), logprobs=[float(v) for v in body["logprobs"]],
        finish_reason=body["finish_reason"], weight_version=int(body["weight_version"]),
    )


class RolloutEngine(Protocol):
    """What the agent loop needs: the in-process `HFRolloutEngine` or a `RolloutClient`."""

    async def generate(self, request: GenerateRequest) -> GenerateResult: ...

    async def close(self) -> None: ...
