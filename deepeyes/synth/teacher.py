"""The teacher policy: a model behind an OpenAI-compatible chat-completions endpoint, plugged
into our agent loop as a rollout engine.

The agent loop speaks token ids (RL must train on exactly what was sampled); a chat endpoint
speaks messages. `TeacherEngine` turns one into the other: it splits the conversation at the
`<|im_start|>` ids back into messages (our `ChatEncoder` built them, and text inside a message
can never produce that id, so the split is exact), sends images as data URLs, and tokenizes the
reply with the student's tokenizer. So the teacher runs through the same loop, protocol, tools
and token limits as the student will, and its trajectories are measured in the student's tokens.

`TeacherClient` is the HTTP side (the official `openai` client): requests paced to
`requests_per_minute`, at most `max_concurrency` in flight, and retried with exponential
backoff on rate limits, server errors, timeouts and lost connections. An endpoint that refuses
the request itself (bad key, unknown model, malformed request) stops the job: retrying cannot help.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.protocol import STOP_STRINGS
from deepeyes.config import TeacherConfig
from deepeyes.rollout.api import GenerateRequest, GenerateResult, SamplingParams
from deepeyes.rollout.client import RolloutUnavailable
from deepeyes.rollout.judge import JudgeClient
from deepeyes.rollout.openai_api import image_data_url

_RETRIED_STATUS = (408, 409, 429)  # and every 5xx: the server may answer next time


class TeacherError(RuntimeError):
    """A request that still failed after its retries; the attempt is dropped and counted."""


class TeacherRefused(RuntimeError):
    """The endpoint refused the request itself (credentials, model name, request shape)."""


@dataclass
class TeacherReply:
    text: str
    finish_reason: str  # as the endpoint said: "stop", "length", ...
    prompt_tokens: int
    completion_tokens: int


class _Pacer:
    """Spaces request starts at least `60 / per_minute` seconds apart. Hand-written: no
    rate-limiting library is installed, and this is all a per-minute budget needs."""

    def __init__(self, per_minute: float):
        self._interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self._interval:
            return
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + self._interval  # reserved before sleeping: concurrent callers queue up
        if start > now:
            await asyncio.sleep(start - now)


class TeacherClient:
    def __init__(self, cfg: TeacherConfig, base_url: str, api_key: str):
        self.cfg = cfg
        self.base_url = base_url
        self.retries = 0  # retried requests, over the run
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=cfg.timeout_s)
        self._pacer = _Pacer(cfg.requests_per_minute)
        self._slots: asyncio.Semaphore | None = None
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # its line per request drowns the progress bar

    async def complete(self, messages: list[dict[str, Any]], sampling: SamplingParams) -> TeacherReply:
        if self._slots is None:  # created on the running event loop
            self._slots = asyncio.Semaphore(self.cfg.max_concurrency)
        for retry in range(self.cfg.max_retries + 1):
            async with self._slots:
                await self._pacer.wait()
                try:
                    response = await self._client.chat.completions.create(
                        model=self.cfg.model, messages=messages, max_tokens=sampling.max_new_tokens,
                        temperature=sampling.temperature, top_p=sampling.top_p, stop=list(sampling.stop) or None,
                        seed=sampling.seed,
                    )
                except (openai.APIConnectionError, openai.APIStatusError) as error:  # timeouts are connection errors
                    status = getattr(error, "status_code", None)
                    if status is not None and status not in _RETRIED_STATUS and status < 500:
                        raise TeacherRefused(f"{self.base_url} refused the request ({status}): {error}") from error
                    if retry == self.cfg.max_retries:
                        raise TeacherError(f"{self.base_url}: {type(error).__name__} after {retry} retries: {error}") from error
                    delay = self._backoff(retry, error)
                else:
                    return _reply(response)
            self.retries += 1
            await asyncio.sleep(delay)  # outside the slot: a waiting retry does not block other requests
        raise AssertionError("unreachable")

    def _backoff(self, retry: int, error: Exception) -> float:
        """Exponential with jitter, at least what the server asked for (Retry-After)."""
        delay = min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2**retry) * random.uniform(0.5, 1.0)
        response = getattr(error, "response", None)
        try:
            asked = float(response.headers.get("retry-after", 0)) if response is not None else 0.0
        except ValueError:  # an HTTP date: not worth parsing, the backoff is long enough
            asked = 0.0
        return max(delay, min(asked, self.cfg.max_backoff_s))

    async def close(self) -> None:
        await self._client.close()


def _reply(response: Any) -> TeacherReply:
    usage = response.usage
    choice = response.choices[0] if response.choices else None
    return TeacherReply(
        text=(choice.message.content or "") if choice is not None else "",
        finish_reason=(choice.finish_reason or "stop") if choice is not None else "stop",
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
    )


def close_turn(text: str, finish_reason: str) -> tuple[str, str]:
    """The reply as our engine would have returned the turn: (text, "eos" | "stop" | "length").

    OpenAI endpoints leave out the stop string that ended the reply; the loop needs it back
    (`</code>` closes the call it executes). A reply that opened `<code>` or `<tool_call>` and
    ended without closing it stopped there."""
    if finish_reason == "length":
        return text, "length"
    if text.rstrip().endswith(STOP_STRINGS):
        return text, "stop"
    unclosed = [(text.rfind("<" + stop[2:]), stop) for stop in STOP_STRINGS]  # "</code>" -> "<code>"
    unclosed = [(position, stop) for position, stop in unclosed if position > text.rfind(stop)]
    if unclosed:
        return text + max(unclosed)[1], "stop"
    return text, "eos"


class TeacherEngine:
    """A rollout engine (`generate(GenerateRequest) -> GenerateResult`) whose policy is the teacher.

    Logprobs are zeros (the teacher's are not ours to train on). `usage` holds each request's
    teacher tokens by its sampling seed, which names (run, question, attempt, turn)."""

    weight_version = 0

    def __init__(self, client: TeacherClient, encoder: ChatEncoder, tokenizer):
        self.client = client
        self.encoder = encoder
        self._tokenizer = tokenizer
        self.usage: dict[int, tuple[int, int]] = {}  # seed -> (prompt tokens, completion tokens)

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        reply = await self.client.complete(self.messages(request.input_ids, request.images), request.sampling)
        self.usage[request.sampling.seed] = (reply.prompt_tokens, reply.completion_tokens)
        text, finish = close_turn(reply.text, reply.finish_reason)
        ids = self.encoder.text(text) + ([self.encoder.im_end] if finish == "eos" else [])
        return GenerateResult(ids, [0.0] * len(ids), finish, self.weight_version)

    def messages(self, ids: Sequence[int], images: Sequence[Path]) -> list[dict[str, Any]]:
        """The chat messages that `ids` (a ChatEncoder conversation ending in an open assistant
        header) encode; the i-th image block is images[i]."""
        encoder = self.encoder
        starts = [index for index, token in enumerate(ids) if token == encoder.im_start] + [len(ids)]
        pending = list(images)
        messages = []
        for begin, end in zip(starts, starts[1:]):
            segment = list(ids[begin:end])
            role = next((r for r in ("system", "user", "assistant") if segment[: len(encoder.header(r))] == encoder.header(r)), None)
            if role is None:
                raise ValueError(f"token {begin}: a message without a system/user/assistant header")
            body = segment[len(encoder.header(role)):]
            if body[-len(encoder.newline):] == encoder.newline:
                body = body[: -len(encoder.newline)]
            if body[-1:] == [encoder.im_end]:
                body = body[:-1]
            if end == len(ids):
                if role != "assistant" or body:
                    raise ValueError("the conversation must end where the assistant's turn begins")
                break
            parts = self._parts(body, pending)
            text_only = all(part["type"] == "text" for part in parts)
            content = "".join(part["text"] for part in parts) if text_only else parts
            messages.append({"role": role, "content": content})
        if pending:
            raise ValueError(f"{len(pending)} images but no image block for them")
        return messages

    def _parts(self, body: list[int], pending: list[Path]) -> list[dict[str, Any]]:
        encoder = self.encoder
        parts: list[dict[str, Any]] = []
        text: list[int] = []
        inside_image = False
        for token in body:
            if token == encoder.vision_start:
                inside_image = True
                if text:
                    parts.append({"type": "text", "text": self._tokenizer.decode(text)})
                    text = []
                if not pending:
                    raise ValueError("more image blocks than images")
                parts.append({"type": "image_url", "image_url": {"url": image_data_url(pending.pop(0))}})
            elif token == encoder.vision_end:
                inside_image = False
            elif not inside_image:
                text.append(token)
        if text or not parts:
            parts.append({"type": "text", "text": self._tokenizer.decode(text)})
        return parts

    async def close(self) -> None:
        """Nothing to release per step: the client lives as long as the job (see `TeacherClient.close`)."""


class ChatJudge(JudgeClient):
    """The LLM judge asked through a chat-completions endpoint (the teacher's): the same prompt,
    verdict parsing and counted rule-based fallback as the rollout-server judge."""

    def __init__(self, client: TeacherClient, timeout_s: float, max_new_tokens: int = 16):
        super().__init__(client, tokenizer=None, timeout_s=timeout_s, max_new_tokens=max_new_tokens)

    async def ask(self, prompt: str) -> str:
        sampling = SamplingParams(self.max_new_tokens, temperature=0.0, stop=())
        try:
            reply = await self.client.complete([{"role": "user", "content": prompt}], sampling)
        except TeacherError as error:
            raise RolloutUnavailable(str(error)) from error
        return reply.text
