"""The agent loop with real tools, driven by a policy that replays cold-start trajectories.

Replaying a known-good conversation through the loop must rebuild it token for token: under the
`feedback` variant, the code worker, the searches, the observation rendering and the chat
assembly of RL rollouts agree exactly with what SFT trains on; under `deepeyesv2`, every
observation is the token sequence the released environment's text tokenizes to.
"""

import asyncio

import numpy as np
import pytest
from PIL import Image

from deepeyes.agent import protocol
from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.loop import EpisodeLimits, run_episode
from deepeyes.agent.tool_session import Toolbox
from deepeyes.data import read_records, read_sft_records
from deepeyes.model.pixels import PixelCache
from deepeyes.model import load_processor
from deepeyes.rollout.hf_engine import GenerateResult
from deepeyes.tools import LocalSandbox, SandboxLimits
from deepeyes.tools.search_service import LocalSearch

pytestmark = pytest.mark.slow


class ReplayPolicy:
    """Answers `generate` with the next assistant turn of a conversation, as the engine would:
    tool turns end at their stop string, the last turn with <|im_end|>."""

    def __init__(self, encoder: ChatEncoder, turns: list[str], opened_think: bool = False):
        self._encoder = encoder
        # deepeyesv2: the observation before a turn already wrote its "<think>"; the model goes on from there.
        self._turns = [t.removeprefix("<think>") if i and opened_think else t for i, t in enumerate(turns)]
        self.requests = []

    async def generate(self, request) -> GenerateResult:
        self.requests.append(request)
        index = len(self.requests) - 1
        ids = self._encoder.content(self._turns[index], [])
        last = index == len(self._turns) - 1
        if last:
            ids = ids + [self._encoder.im_end]
        return GenerateResult(ids, [-0.5] * len(ids), "eos" if last else "stop", weight_version=7)


@pytest.fixture(scope="module")
def setup(tiny_dir, sample_data, tmp_path_factory):
    processor = load_processor(tiny_dir)
    pixels = PixelCache(processor.image_processor, 3136, 50176)
    encoder = ChatEncoder(processor.tokenizer, pixels.tokens)
    toolbox = Toolbox(
        LocalSearch.from_files(sample_data.corpus, sample_data.image_index),
        LocalSandbox(tmp_path_factory.mktemp("sandbox"), SandboxLimits(timeout_s=20), image_roots=[sample_data.root]),
        tmp_path_factory.mktemp("scratch"),
    )
    tasks = {r.id: r for r in read_records(sample_data.rl_train)}
    conversations = read_sft_records(sample_data.sft_train)
    yield encoder, toolbox, tasks, conversations, pixels
    toolbox.close()


def pick(conversations, tasks, family, variant=None):
    for conversation in conversations:
        task = tasks[conversation.id]
        if task.family == family and (variant is None or task.metadata.get("variant") == variant):
            return task, conversation
    raise LookupError(family)


@pytest.mark.parametrize("family, variant", [("perception", None), ("arithmetic", None), ("lookup", "flag")])
def test_replaying_a_cold_start_trajectory_rebuilds_it_token_for_token(setup, family, variant):
    encoder, toolbox, tasks, conversations, _ = setup
    task, conversation = pick(conversations, tasks, family, variant)
    turns = [m.content for m in conversation.messages if m.role == "assistant"]
    policy = ReplayPolicy(encoder, turns)
    limits = EpisodeLimits(max_turns=9, max_turn_tokens=4096, max_response_tokens=16384)

    trajectory = asyncio.run(run_episode(task, 0, 0, 0, 0, policy, encoder, toolbox, limits, protocol.FEEDBACK))

    ids, mask = encoder.conversation(conversation.messages, list(conversation.images))
    assert trajectory.finish == "answer"
    assert trajectory.input_ids == ids[: -len(encoder.newline)]
    # SFT also trains the <|im_end|> after a turn cut at a stop string (as LLaMA-Factory does);
    # in a rollout that token is the observation's, so it is the only place the masks differ.
    rl_mask = [0] * len(trajectory.prompt_ids) + trajectory.loss_mask
    differ = [i for i, (a, b) in enumerate(zip(rl_mask, mask)) if a != b]
    assert len(rl_mask) == len(mask) - len(encoder.newline)
    assert [ids[i] for i in differ] == [encoder.im_end] * (len(turns) - 1)
    assert trajectory.model_turns == turns
    assert all(call.ok for call in trajectory.tool_calls)
    assert len(trajectory.tool_calls) == len(turns) - 1
    assert trajectory.weight_versions == {7}
    # Images the tools returned are pixel-identical to the ones the trajectory was written with.
    assert len(trajectory.images) == len(conversation.images)
    for returned, recorded in zip(trajectory.images, conversation.images):
        assert np.array_equal(np.asarray(Image.open(returned).convert("RGB")), np.asarray(Image.open(recorded).convert("RGB")))
    # Every request carried the whole conversation so far and all of its images.
    for request in policy.requests:
        assert trajectory.input_ids[: len(request.input_ids)] == request.input_ids


@pytest.mark.parametrize("family, variant", [("perception", None), ("arithmetic", None), ("lookup", "flag"),
                                             ("lookup", None)])
def test_under_deepeyesv2_every_observation_is_the_released_text_tokenized(setup, tokenizer, family, variant):
    """The released environment writes each observation as one string (env:162) that verl
    tokenizes whole, special tokens included, with "<image>" become the vision tokens: a released
    checkpoint run through our loop sees exactly those tokens, and the "<think>" it continues from."""
    encoder, toolbox, tasks, conversations, pixels = setup
    task, conversation = pick(conversations, tasks, family, variant)
    turns = [m.content for m in conversation.messages if m.role == "assistant"]
    policy = ReplayPolicy(encoder, turns, opened_think=True)
    limits = EpisodeLimits(max_turns=9, max_turn_tokens=4096, max_response_tokens=16384)

    trajectory = asyncio.run(run_episode(task, 0, 0, 0, 0, policy, encoder, toolbox, limits, protocol.DEEPEYESV2))

    assert trajectory.finish == "answer"
    assert len(trajectory.observations) == len(turns) - 1 and all(call.ok for call in trajectory.tool_calls)
    expected = list(trajectory.prompt_ids)
    images = iter(trajectory.images[len(task.images):])
    for index, turn in enumerate(trajectory.model_turns):
        expected += encoder.content(turn, []) + ([encoder.im_end] if index == len(turns) - 1 else [])
        if index < len(trajectory.observations):
            text = trajectory.observations[index]
            pieces = text.split("<image>")
            vision = ["<|vision_start|>" + "<|image_pad|>" * pixels.tokens(next(images)) + "<|vision_end|>"
                      for _ in pieces[1:]]
            released = "".join(p + v for p, v in zip(pieces, vision + [""]))
            wrapped = f"<|im_end|>\n<|im_start|>user\n{released}<|im_end|>\n<|im_start|>assistant\n<think>"
            expected += tokenizer(wrapped, add_special_tokens=False)["input_ids"]
    assert trajectory.input_ids == expected
    observation_tokens = [i for i, m in enumerate(trajectory.loss_mask) if m == 0]
    assert tokenizer.decode([trajectory.response_ids[i] for i in observation_tokens]).count("<think>") == len(turns) - 1


def test_the_turn_limit_ends_an_episode_without_running_the_last_call(setup):
    encoder, toolbox, tasks, conversations, _ = setup
    task, conversation = pick(conversations, tasks, "arithmetic")
    turns = [m.content for m in conversation.messages if m.role == "assistant"]
    limits = EpisodeLimits(max_turns=1, max_turn_tokens=4096, max_response_tokens=16384)
    trajectory = asyncio.run(run_episode(task, 0, 0, 0, 0, ReplayPolicy(encoder, turns), encoder, toolbox, limits))
    assert (trajectory.finish, trajectory.tool_calls, len(trajectory.model_turns)) == ("max_turns", [], 1)


def test_the_token_budget_ends_an_episode_before_an_observation_overflows_it(setup):
    encoder, toolbox, tasks, conversations, _ = setup
    task, conversation = pick(conversations, tasks, "perception")
    turns = [m.content for m in conversation.messages if m.role == "assistant"]
    first_turn = len(encoder.content(turns[0], []))
    limits = EpisodeLimits(max_turns=9, max_turn_tokens=4096, max_response_tokens=first_turn + 5)
    trajectory = asyncio.run(run_episode(task, 0, 0, 0, 0, ReplayPolicy(encoder, turns), encoder, toolbox, limits))
    assert trajectory.finish == "length"
    assert len(trajectory.response_ids) <= limits.max_response_tokens
    assert trajectory.loss_mask == [1] * first_turn
