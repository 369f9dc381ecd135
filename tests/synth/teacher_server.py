"""A scripted OpenAI-compatible chat-completions server on loopback, for deterministic teachers.

Real HTTP, the real token check and the OpenAI wire format: replies are looked up by the request's
`seed`, which the agent loop derives from (run seed, step, question, attempt, turn), so a test
scripts exactly what the teacher says in each turn of each attempt. A scripted reply is either
text (cut at the first stop string, as OpenAI endpoints do) or an HTTP error status, optionally
only for its first few requests. It records what it was asked, to check the client's messages.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections import Counter
from dataclasses import dataclass

from aiohttp import web
from PIL import Image

from deepeyes.service import LOOPBACK, free_port, service_app


@dataclass(frozen=True)
class Fail:
    status: int
    times: int = 10**9  # then answer `then`
    then: str = ""


class ScriptedTeacher:
    def __init__(self, token: str, replies: dict[int, str | Fail], default: str = "<think>no idea</think>",
                 refuse_after: int | None = None, judge: str | None = None):
        self.replies = replies
        self.judge = judge  # the reply to judge prompts (deepeyes.rollout.judge.JUDGE_PROMPT)
        self.judged = 0
        self.default = default
        self.refuse_after = refuse_after  # answer 401 to every request after this many answered ones
        self.answered = 0
        self.seen: Counter[int] = Counter()  # requests per seed
        self.images_seen = 0
        self.last_messages: list = []
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}/v1"
        self._app = service_app(token)
        self._app.router.add_post("/v1/chat/completions", self._complete)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> "ScriptedTeacher":
        self._thread.start()
        self._runner = web.AppRunner(self._app)
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, LOOPBACK, self.port).start()

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _complete(self, request: web.Request) -> web.Response:
        body = await request.json()
        seed = body["seed"]
        self.seen[seed] += 1
        if self.refuse_after is not None and self.answered >= self.refuse_after:
            return web.json_response({"error": {"message": "key revoked"}}, status=401)
        self.last_messages = body["messages"]
        for message in body["messages"]:
            for part in message["content"] if isinstance(message["content"], list) else []:
                if part["type"] == "image_url":
                    header, payload = part["image_url"]["url"].split(",", 1)
                    assert header.startswith("data:image/") and header.endswith(";base64")
                    Image.open(io.BytesIO(base64.b64decode(payload))).verify()
                    self.images_seen += 1
        reply = self.replies.get(seed, self.default)
        first = body["messages"][0]["content"]
        if self.judge is not None and isinstance(first, str) and first.startswith("You are grading"):
            reply = self.judge
            self.judged += 1
        if isinstance(reply, Fail):
            if self.seen[seed] <= reply.times:
                return web.json_response({"error": {"message": f"scripted {reply.status}"}}, status=reply.status,
                                         headers={"Retry-After": "0"})
            reply = reply.then
        self.answered += 1
        text, finish = reply, "stop"
        cuts = [text.find(stop) for stop in body.get("stop") or () if stop in text]
        if cuts:
            text = text[: min(cuts)]
        words = len(reply.split())
        return web.json_response({
            "id": f"chatcmpl-{seed}", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": words, "total_tokens": 1000 + words},
        })
