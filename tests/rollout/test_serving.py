"""The rollout server's contract with its clients, real servers on loopback: every field is
range-checked (a bad request is a 400 with a reason and never disturbs a good one), errors come
back as JSON and `RolloutClient` classifies them, a trajectory's turns stick to one server."""

import asyncio
import json
import math
import urllib.request

import pytest
from aiohttp import web

from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.protocol import SYSTEM_PROMPT
from deepeyes.model import IMAGE_TOKEN_ID, load_processor
from deepeyes.rollout.api import GenerateRequest, SamplingParams, result_from_json
from deepeyes.rollout.client import RolloutClient, RolloutRequestFailed
from deepeyes.service import LOOPBACK, auth_headers, free_port, local_services, read_token
from tests.rollout.conftest import rollout_server

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 48  # the servers' cap (the rollout limits' tokens per turn)


@pytest.fixture(scope="module")
def servers(tiny_dir, token_file, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    services = [rollout_server(f"rollout{i}", tiny_dir, token_file, logs, "--max-new-tokens", MAX_NEW_TOKENS)
                for i in range(2)]
    with local_services(services, ready_timeout_s=120):
        yield services


@pytest.fixture(scope="module")
def prompt(tiny_dir):
    encoder = ChatEncoder(load_processor(tiny_dir).tokenizer, lambda image: 0)
    return encoder.prompt(SYSTEM_PROMPT, "What is 2 + 2? Answer inside <answer> </answer>.", [])


def run(coroutine_fn):
    return asyncio.run(coroutine_fn())


def served(service):
    request = urllib.request.Request(service.url + "/info", headers=auth_headers(service.token))
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["requests_served"]


@pytest.mark.parametrize("bad, reason", [
    ({"max_new_tokens": 10**7}, "cap is 48"),
    ({"seed": 2**64}, "'sampling.seed'"),
    ({"temperature": math.nan}, "'sampling.temperature' must be a finite number"),
    ({"input_ids": [10**6]}, "outside the vocabulary"),
    ({"top_p": math.inf}, "'sampling.top_p'"),
    ({"max_new_tokens": -1}, "'sampling.max_new_tokens' must be a positive integer"),
])
def test_a_bad_field_is_a_400_with_a_reason_and_a_good_request_beside_it_succeeds(servers, token_file, prompt,
                                                                                  bad, reason):
    good = GenerateRequest(prompt, [], SamplingParams(MAX_NEW_TOKENS, seed=1))
    fields = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "seed": 0} | bad
    ids = fields.pop("input_ids", prompt)
    client = RolloutClient([servers[0].url], read_token(token_file))

    async def both():
        try:
            in_flight = asyncio.create_task(client.generate(good))
            await asyncio.sleep(0.05)  # the good request is in the server's batcher
            # SamplingParams itself takes any value: the server is what must refuse it.
            bad_request = GenerateRequest(ids, [], SamplingParams(**fields))
            with pytest.raises(RolloutRequestFailed) as refused:
                await client.generate(bad_request)
            return refused.value, await in_flight
        finally:
            await client.close()

    refused, result = run(both)
    assert refused.kind == "bad_request" and "(400)" in str(refused) and reason in str(refused)
    assert result.finish_reason in ("eos", "stop", "length") and len(result.token_ids) > 0
    assert client.errors == {"bad_request": 1} and not client.failures  # failed, counted, not retried


def test_an_engine_error_comes_back_as_json_and_fails_only_that_request(servers, token_file, prompt):
    # Image placeholders with no image: valid ids, but the model cannot place them.
    broken = GenerateRequest(prompt + [IMAGE_TOKEN_ID] * 4, [], SamplingParams(8))
    client = RolloutClient([s.url for s in servers], read_token(token_file))

    async def go():
        try:
            with pytest.raises(RolloutRequestFailed) as failed:
                await client.generate(broken)
            return failed.value, await client.generate(GenerateRequest(prompt, [], SamplingParams(8)))
        finally:
            await client.close()

    failed, after = run(go)
    assert failed.kind == "engine_error" and "<|image_pad|>" in str(failed)
    assert client.errors == {"engine_error": 1} and not client.failures and client.retries == 0
    assert len(after.token_ids) > 0  # the server serves on


def test_a_dead_server_and_a_plain_text_500_are_retried_on_another_server(servers, token_file, prompt):
    dead = f"http://{LOOPBACK}:{free_port()}"  # nothing listens

    async def go():
        async def plain_text_500(request):
            return web.Response(status=500, text="500 Internal Server Error\n\nServer got itself in trouble")

        app = web.Application()
        app.router.add_post("/generate", plain_text_500)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, LOOPBACK, port).start()
        text_server = f"http://{LOOPBACK}:{port}"
        client = RolloutClient([dead, text_server, servers[0].url], read_token(token_file))
        try:
            requests = [GenerateRequest(prompt, [], SamplingParams(4, seed=i)) for i in range(4)]
            return client, await asyncio.gather(*(client.generate(r) for r in requests))
        finally:
            await client.close()
            await runner.cleanup()

    client, results = run(go)
    assert len(results) == 4 and all(r.token_ids for r in results)
    assert client.failures[dead] >= 1 and client.failures[servers[0].url] == 0
    assert sum(client.failures.values()) == client.retries and not client.errors


def test_the_turns_of_a_trajectory_stick_to_one_server(servers, token_file, prompt):
    client = RolloutClient([s.url for s in servers], read_token(token_file))
    before = [served(s) for s in servers]

    async def trajectory(session):
        ids = list(prompt)
        for turn in range(3):
            result = await client.generate(GenerateRequest(ids, [], SamplingParams(4, seed=turn), session=session))
            ids += result.token_ids

    async def go():
        try:
            for session in ("traj-a", "traj-b"):
                await trajectory(session)  # one after another: without affinity the turns would alternate
        finally:
            await client.close()

    run(go)
    per_server = [served(s) - b for s, b in zip(servers, before)]
    assert per_server in ([3, 3], [0, 6], [6, 0])  # whole trajectories, never split 2 + 1
    assert per_server == [3, 3]  # and the second trajectory went to the less busy server


def test_abort_and_error_finish_reasons_are_kept_and_unknown_ones_refused():
    for reason in ("abort", "error"):
        body = {"token_ids": [1], "logprobs": [-0.5], "finish_reason": reason, "weight_version": 3}
        assert result_from_json(body).finish_reason == reason
    with pytest.raises(ValueError, match="unknown finish_reason"):
        result_from_json({"token_ids": [], "logprobs": [], "finish_reason": "done", "weight_version": 0})
