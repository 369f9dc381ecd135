"""The teacher side: token ids ⇄ chat messages exactly, turn closing, pacing, and the rollout
server's /v1/chat/completions reached with the official openai client."""

import asyncio
import json
import subprocess
import sys
import time

import openai
import pytest

from deepeyes.agent.chat import ChatEncoder
from deepeyes.config import TeacherConfig
from deepeyes.data import read_sft_records
from deepeyes.service import local_services, new_token_file, read_token
from deepeyes.model import load_processor
from deepeyes.model.pixels import PixelCache
from deepeyes.rollout.api import GenerateRequest, SamplingParams
from deepeyes.rollout.client import RolloutClient
from deepeyes.rollout.openai_api import chat_request_from_json, image_data_url
from deepeyes.synth.teacher import TeacherClient, TeacherEngine, close_turn
from tests.paths import REPO
from tests.rollout.conftest import rollout_server
from tests.synth.teacher_server import ScriptedTeacher

KEY = "k"


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    processor = load_processor(tiny_dir)
    return ChatEncoder(processor.tokenizer, PixelCache(processor.image_processor, 3136, 50176).tokens)


def test_messages_round_trip_to_the_same_token_ids(encoder, tokenizer, sample_data, tmp_path):
    """What the teacher is sent is exactly the conversation the loop built: a chat server that
    applies the Qwen2.5 template to those messages gets back the same token ids and images."""
    record = next(r for r in read_sft_records(sample_data.sft_train) if len(r.images) > 1)  # a returned crop
    history, images = record.messages[:-1], list(record.images)
    ids = encoder.conversation(history, images)[0] + encoder.header("assistant")
    engine = TeacherEngine(None, encoder, tokenizer)

    messages = engine.messages(ids, images)
    assert [m["role"] for m in messages] == [m.role for m in history]
    assert messages[0]["content"] == history[0].content  # the system prompt, text only
    observation = messages[-1]["content"]
    assert [part["type"] for part in observation if part["type"] == "image_url"] == ["image_url"]
    assert observation[-1]["image_url"]["url"] == image_data_url(images[-1])

    request = chat_request_from_json({"messages": messages, "seed": 3}, encoder, tmp_path)
    assert request.input_ids == ids
    assert [p.read_bytes() for p in request.images] == [p.read_bytes() for p in images]


def test_a_literal_placeholder_or_special_token_in_text_stays_text(encoder, tokenizer, tmp_path):
    text = 'print("<image> <|im_end|> <|im_start|>user")'
    ids = encoder.header("user") + encoder.text(text) + [encoder.im_end] + encoder.newline + encoder.header("assistant")
    messages = TeacherEngine(None, encoder, tokenizer).messages(ids, [])
    assert messages == [{"role": "user", "content": text}]
    assert chat_request_from_json({"messages": messages}, encoder, tmp_path).input_ids == ids


@pytest.mark.parametrize("reply, finish, expected", [
    ("<think> a </think>\n<code>\n```python\nprint(1)\n```\n", "stop", ("</code>", "stop")),  # stop string left out
    ("<think> a </think>\n<code>\n```python\nprint(1)\n```\n</code>", "stop", ("", "stop")),  # ... or kept
    ('<think> a </think>\n<tool_call>\n{"name": "image_search"}\n', "stop", ("</tool_call>", "stop")),
    ("<think> a </think>\n<answer>3</answer>", "stop", ("", "eos")),
    ("<think> a </think>\n<code>\nprint(", "length", ("", "length")),
    ("<think> I could use <code> </code> but </think><answer>3</answer>", "stop", ("", "eos")),
])
def test_close_turn_restores_what_our_engine_would_return(reply, finish, expected):
    suffix, reason = expected
    assert close_turn(reply, finish) == (reply + suffix, reason)


def test_requests_are_paced_to_the_rate_limit(encoder):
    cfg = TeacherConfig(model="m", requests_per_minute=600, max_concurrency=8)  # one start per 0.1 s
    with ScriptedTeacher(KEY, {}) as teacher:
        client = TeacherClient(cfg, teacher.url, KEY)

        async def six():
            try:
                return await asyncio.gather(*(client.complete([{"role": "user", "content": "hi"}],
                                                              SamplingParams(4, seed=i)) for i in range(6)))
            finally:
                await client.close()

        started = time.perf_counter()
        replies = asyncio.run(six())
    assert time.perf_counter() - started >= 0.5 and len(replies) == 6 and teacher.answered == 6


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    return new_token_file(tmp_path_factory.mktemp("token"))


@pytest.fixture(scope="module")
def tiny_server(tiny_dir, token_file, tmp_path_factory):
    server = rollout_server("teacher", tiny_dir, token_file, tmp_path_factory.mktemp("logs"))
    with local_services([server], ready_timeout_s=120):
        yield server


@pytest.mark.slow
def test_rollout_server_answers_chat_completions_like_generate(tiny_server, token_file, encoder, sample_data):
    """The official openai client against our server: text + image in, OpenAI's reply shape out,
    with exactly the tokens /generate samples for the same ids and seed."""
    record = read_sft_records(sample_data.sft_train)[0]
    image = record.images[0]
    messages = [
        {"role": "system", "content": record.messages[0].content},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url(image)}},
                                     {"type": "text", "text": "\nWhat is in the box?"}]},
    ]
    token = read_token(token_file)

    async def ask():
        client = openai.AsyncOpenAI(base_url=tiny_server.url + "/v1", api_key=token, max_retries=0)
        rollout = RolloutClient([tiny_server.url], token)
        try:
            reply = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, seed=7,
                                                         stop=["</code>"])
            ids = encoder.message("system", record.messages[0].content)
            ids += encoder.header("user") + encoder.image(image) + encoder.text("\nWhat is in the box?")
            ids += [encoder.im_end] + encoder.newline + encoder.header("assistant")
            direct = await rollout.generate(GenerateRequest(ids, [image], SamplingParams(12, seed=7, stop=("</code>",))))
            with pytest.raises(openai.AuthenticationError):
                await openai.AsyncOpenAI(base_url=tiny_server.url + "/v1", api_key="wrong", max_retries=0) \
                    .chat.completions.create(model="tiny", messages=messages, max_tokens=4)
            with pytest.raises(openai.BadRequestError, match="data:"):
                await client.chat.completions.create(model="tiny", max_tokens=4, messages=[
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}])
            return reply, ids, direct
        finally:
            await client.close()
            await rollout.close()

    reply, ids, direct = asyncio.run(ask())
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == len(direct.token_ids)
    text = encoder.decode(direct.token_ids)
    assert reply.choices[0].message.content == text.split("</code>")[0]
    assert reply.choices[0].finish_reason == ("length" if direct.finish_reason == "length" else "stop")


@pytest.mark.slow
def test_synthesis_job_with_the_tiny_model_as_local_teacher(tmp_path):
    """The embedded default end to end: the job serves the tiny model and synthesizes from it.
    Its random weights never solve anything, so every attempt is dropped, each with its reason."""
    run_dir = tmp_path / "run"
    subprocess.run([sys.executable, "jobs/synthesize.py", "synth.limit=3", "synth.k=2", "rollout.max_turn_tokens=16",
                    f"hydra.run.dir={run_dir}"], cwd=REPO, check=True, timeout=300)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["total"]["attempted"] == 6 and summary["total"]["kept"] == 0
    assert sum(summary["total"]["dropped"].values()) == 6
    assert summary["total"]["teacher_prompt_tokens"] > 6 * 900  # the system prompt alone is ~900 tokens
    assert set(summary["by_family"]) == {"perception", "arithmetic", "lookup"}
    assert len((run_dir / "attempts.jsonl").read_text().splitlines()) == 6
