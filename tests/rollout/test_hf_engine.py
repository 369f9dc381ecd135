"""The hf rollout engine on the real tiny model: logprobs, batching, limits, stop strings."""

import asyncio

import pytest
import torch

from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.protocol import SYSTEM_PROMPT, user_prompt
from deepeyes.config import ModelConfig
from deepeyes.data import read_records
from deepeyes.rollout.hf_engine import GenerateRequest, HFRolloutEngine, SamplingParams
from deepeyes.rollout.weight_sync import publish_weights
from deepeyes.train.forward import TokenSequence, token_logprobs
from deepeyes.train.setup import load_policy


@pytest.fixture(scope="module")
def setup(tiny_dir, sample_data):
    policy = load_policy(ModelConfig(), str(tiny_dir))
    encoder = ChatEncoder(policy.tokenizer, policy.pixels.tokens)
    engine = HFRolloutEngine(policy.model, policy.tokenizer, policy.pixels, max_batch=8, batch_wait_ms=20)
    records = read_records(sample_data.rl_train)[:3]
    requests = [
        GenerateRequest(
            encoder.prompt(SYSTEM_PROMPT, user_prompt(r.question), list(r.images)),
            list(r.images),
            SamplingParams(max_new_tokens=12 + 4 * i, temperature=0.9, top_p=0.95 if i == 1 else 1.0, seed=i),
        )
        for i, r in enumerate(records)
    ]
    return policy, engine, requests


def test_reported_logprobs_are_those_the_trainer_computes(setup):
    policy, engine, requests = setup
    results = engine.generate_batch(requests)
    for request, result in zip(requests, results):
        assert len(result.token_ids) == len(result.logprobs) > 0
        if request.sampling.top_p < 1.0:
            continue  # top-p renormalizes: the trainer scores the unfiltered distribution
        ids = request.input_ids + result.token_ids
        mask = [0] * len(request.input_ids) + [1] * len(result.token_ids)
        with torch.no_grad():
            (recomputed,) = token_logprobs(
                policy.model, policy.pixels, [TokenSequence(ids, request.images, mask)],
                policy.tokenizer.pad_token_id, request.sampling.temperature,
            )
        assert torch.allclose(recomputed, torch.tensor(result.logprobs), atol=2e-3)


def test_samples_do_not_depend_on_the_batch_they_shared(setup):
    _, engine, requests = setup
    together = engine.generate_batch(requests)
    alone = [engine.generate_batch([request])[0] for request in requests]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert all(len(r.token_ids) <= q.sampling.max_new_tokens for r, q in zip(together, requests))
    reseeded = engine.generate_batch([GenerateRequest(requests[0].input_ids, requests[0].images,
                                                      SamplingParams(12, temperature=0.9, seed=99))])[0]
    assert reseeded.token_ids != together[0].token_ids


def test_concurrent_requests_are_served_in_shared_batches(setup):
    _, engine, requests = setup

    async def run():
        try:
            return await asyncio.gather(*(engine.generate(r) for r in requests))
        finally:
            await engine.close()

    before = engine.batches_served
    results = asyncio.run(run())
    assert engine.batches_served - before == 1
    assert [r.token_ids for r in results] == [r.token_ids for r in engine.generate_batch(requests)]


def test_a_turn_is_cut_right_after_its_stop_string(setup):
    _, engine, requests = setup
    text = "<think> crop </think>\n<code>\n```python\nprint(1)\n```\n</code> and more text"
    tokens = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    result = engine._finish(requests[0].__class__(requests[0].input_ids, [], SamplingParams(100)), tokens, [0.0] * len(tokens))
    assert result.finish_reason == "stop"
    assert engine.tokenizer.decode(result.token_ids).endswith("</code>")
    eos = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    result = engine._finish(requests[0], [11, 12, eos, 13], [0.0] * 4)
    assert (result.token_ids, result.finish_reason) == ([11, 12, eos], "eos")


def test_a_request_that_fails_fails_alone_not_the_batch_it_joined(setup):
    _, engine, requests = setup
    broken = GenerateRequest(requests[0].input_ids, [], requests[0].sampling)  # image placeholders, no image

    async def run():
        try:
            return await asyncio.gather(*(engine.generate(r) for r in (requests[1], broken, requests[2])),
                                        return_exceptions=True)
        finally:
            await engine.close()

    first, failed, last = asyncio.run(run())
    assert isinstance(failed, ValueError) and "<|image_pad|>" in str(failed)
    expected = engine.generate_batch([requests[1], requests[2]])
    assert [first.token_ids, last.token_ids] == [r.token_ids for r in expected]


def test_a_weight_update_waits_for_the_batch_in_progress_and_holds_back_the_next(setup, tmp_path):
    policy, engine, requests = setup
    published = publish_weights(policy.model, tmp_path, version=7)
    events = []

    async def run():
        try:
            generating = asyncio.create_task(engine.generate(requests[0]))
            while not engine._lock.locked():  # the batch is on the model
                await asyncio.sleep(0.005)
            update = asyncio.create_task(engine.update_weights(published.path, 7))
            await asyncio.sleep(0.05)
            queued = asyncio.create_task(engine.generate(requests[1]))
            first = await generating
            events.append(("first", first.weight_version))
            await update
            events.append(("updated", engine.weight_version))
            second = await queued
            events.append(("second", second.weight_version))
        finally:
            await engine.close()

    asyncio.run(run())
    assert events == [("first", 0), ("updated", 7), ("second", 7)]
    engine.weight_version = 0
