"""Rollout servers as separate processes on loopback, reached only through RolloutClient."""

import asyncio
import json
import os
import signal
import urllib.error
import urllib.request

import pytest
import torch

from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.protocol import SYSTEM_PROMPT, user_prompt
from deepeyes.config import ModelConfig
from deepeyes.data import read_records
from deepeyes.service import auth_headers, read_token
from deepeyes.rollout.api import GenerateRequest, SamplingParams
from deepeyes.rollout.client import RolloutClient, RolloutUnavailable
from deepeyes.rollout.hf_engine import HFRolloutEngine
from deepeyes.rollout.weight_sync import WeightSync, publish_weights
from deepeyes.train.forward import TokenSequence, token_logprobs
from deepeyes.train.setup import load_policy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def policy(tiny_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the servers run: same kernels, same float results
    yield load_policy(ModelConfig(), str(tiny_dir))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def requests(policy, sample_data):
    encoder = ChatEncoder(policy.tokenizer, policy.pixels.tokens)
    records = read_records(sample_data.rl_train)[:4]
    return [
        GenerateRequest(
            encoder.prompt(SYSTEM_PROMPT, user_prompt(r.question), list(r.images)), list(r.images),
            SamplingParams(max_new_tokens=10 + 3 * i, temperature=0.0 if i % 2 else 1.0, seed=i),
        )
        for i, r in enumerate(records)
    ]


def generate_all(client, requests):
    async def run():
        try:
            return await asyncio.gather(*(client.generate(r) for r in requests))
        finally:
            await client.close()

    return asyncio.run(run())


def client_for(servers, token_file, **kwargs):
    return RolloutClient([s.url for s in servers], read_token(token_file), **kwargs)


def test_requests_without_the_job_token_are_refused(two_servers):
    url = two_servers[0].url
    for path, data in (("/health", None), ("/ready", None), ("/generate", b"{}"), ("/weights", b"{}")):
        for headers in ({}, {"Authorization": "Bearer not-the-token"}):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(url + path, data=data, headers=headers), timeout=10)
            assert refused.value.code == 401, path


def test_http_generation_equals_in_process_generation_token_for_token(two_servers, token_file, policy, requests):
    client = client_for(two_servers, token_file)
    over_http = generate_all(client, requests)
    in_process = HFRolloutEngine(policy.model, policy.tokenizer, policy.pixels).generate_batch(requests)
    for remote, local in zip(over_http, in_process):
        assert remote.token_ids == local.token_ids
        assert remote.finish_reason == local.finish_reason
        assert remote.weight_version == 0
        assert torch.allclose(torch.tensor(remote.logprobs), torch.tensor(local.logprobs), atol=1e-5)
    assert sum(client.failures.values()) == 0


def test_returned_logprobs_are_the_trainers_recomputed_logprobs(two_servers, token_file, policy, requests):
    sampled = [r for r in requests if r.sampling.temperature == 1.0]
    results = generate_all(client_for(two_servers, token_file), sampled)
    sequences = [
        TokenSequence(r.input_ids + out.token_ids, r.images, [0] * len(r.input_ids) + [1] * len(out.token_ids))
        for r, out in zip(sampled, results)
    ]
    with torch.no_grad():
        recomputed = token_logprobs(policy.model, policy.pixels, sequences, policy.tokenizer.pad_token_id, 1.0)
    for out, lp in zip(results, recomputed):
        assert (lp - torch.tensor(out.logprobs)).abs().max() < 1e-5


def test_published_weights_are_what_the_next_responses_use(two_servers, token_file, policy, requests, tmp_path):
    before = generate_all(client_for(two_servers, token_file), requests[:2])
    with torch.no_grad():
        policy.model.lm_head.weight.mul_(-1.0)  # a different policy, unmistakably
    published = publish_weights(policy.model, tmp_path, version=1)

    client = client_for(two_servers, token_file, min_weight_version=1)
    loaded = asyncio.run(_update_then_close(client, published))
    assert sorted(loaded) == sorted(s.url for s in two_servers)
    after = generate_all(client, requests[:2])
    expected = HFRolloutEngine(policy.model, policy.tokenizer, policy.pixels).generate_batch(requests[:2])
    assert [r.weight_version for r in after] == [1, 1]
    assert [r.token_ids for r in after] == [r.token_ids for r in expected]
    assert [r.token_ids for r in after] != [r.token_ids for r in before]

    too_fresh = client_for(two_servers, token_file, min_weight_version=2)  # no server has version 2
    with pytest.raises(RolloutUnavailable):
        generate_all(too_fresh, requests[:1])
    assert sum(too_fresh.failures.values()) == 2


async def _update_then_close(client, published):
    try:
        return await client.update_weights(published.version, published.path)
    finally:
        await client.close()


def test_with_a_staleness_bound_publishing_overlaps_and_is_awaited_only_when_needed(
    two_servers, token_file, policy, tmp_path
):
    sync = WeightSync(lambda: client_for(two_servers, token_file), tmp_path, max_staleness=1)
    try:
        sync.publish(policy.model, version=5)  # returns at once: the next rollout may use version 4
        sync.wait_for(4)
        assert sync._pending  # version 5 is not required yet
        sync.wait_for(5)
        assert not sync._pending
        info = [json.load(urllib.request.urlopen(urllib.request.Request(
            s.url + "/info", headers=auth_headers(read_token(token_file))), timeout=10)) for s in two_servers]
        assert [i["weight_version"] for i in info] == [5, 5]
    finally:
        sync.close()


def test_a_batch_completes_when_one_of_two_servers_dies_mid_batch(two_servers, token_file, requests):
    """Runs last in this module: it kills one of the module's servers."""
    victim = two_servers[1]
    client = client_for(two_servers, token_file)
    batch = [GenerateRequest(r.input_ids, r.images, SamplingParams(40, seed=10 + i))
             for i, r in enumerate(requests * 2)]

    async def run():
        try:
            tasks = [asyncio.create_task(client.generate(r)) for r in batch]
            while client._in_flight[victim.url] == 0:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # the victim is generating
            os.killpg(victim.process.pid, signal.SIGKILL)
            return await asyncio.gather(*tasks)
        finally:
            await client.close()

    results = asyncio.run(run())
    assert len(results) == len(batch) and all(len(r.token_ids) > 0 for r in results)
    assert client.failures[victim.url] >= 1
    assert client.failures[two_servers[0].url] == 0
