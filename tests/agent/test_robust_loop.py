"""Nothing a model writes ends the step: whatever a turn holds, every trajectory ends with a
recorded finish, and an exception costs only the trajectory it happened in (finish "error",
reward 0, counted by kind in the step's metrics).

The turns go through the real `rollout`/`run_episode` with the real encoder (the real Qwen2.5
vocabulary), the real sandbox daemon and the real search service on loopback; the last test
runs a whole GRPO step of the tiny model.
"""

import asyncio
import json
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from deepeyes.agent import protocol
from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.loop import EpisodeLimits, episode_seed, rollout
from deepeyes.agent.runtime import score_trajectories
from deepeyes.agent.tool_session import Toolbox
from deepeyes.config import RewardConfig
from deepeyes.data import read_records
from deepeyes.model import load_processor
from deepeyes.model.pixels import PixelCache
from deepeyes.rollout.api import GenerateResult
from deepeyes.service import LocalService, free_port, local_services, new_token_file, python_module, read_token
from deepeyes.tools import LocalSandbox, SandboxLimits
from deepeyes.tools.search_service import SearchClient
from deepeyes.train.grpo import rollout_metrics, write_rollouts

pytestmark = pytest.mark.slow

FINISHES = {"answer", "max_turns", "length", "invalid", "tool_error", "error"}
LIMITS = EpisodeLimits(max_turns=3, max_turn_tokens=32768, max_response_tokens=65536)
SURROGATE_CALL = '<tool_call>{"name": "search", "arguments": {"query": "\\ud800"}}</tool_call>'


class ScriptedPolicy:
    """Each trajectory's scripted turns, told apart by the request's seed (one per trajectory and
    turn, `episode_seed`); a turn ending in a stop string stops there, any other ends the turn."""

    def __init__(self, encoder: ChatEncoder, scripts: dict[tuple[int, int], list[str]], seed: int = 0, step: int = 0):
        self.encoder = encoder
        self.weight_version = 0
        self.turns = {
            episode_seed(seed, step, group, sample, turn): text
            for (group, sample), turns in scripts.items() for turn, text in enumerate(turns)
        }

    async def generate(self, request) -> GenerateResult:
        text = self.turns.get(request.sampling.seed, "<think>out of script</think><answer>0</answer>")
        ids = self.encoder.text(text)
        if text.endswith(protocol.STOP_STRINGS):
            return GenerateResult(ids, [-1.0] * len(ids), "stop", self.weight_version)
        return GenerateResult(ids + [self.encoder.im_end], [-1.0] * (len(ids) + 1), "eos", self.weight_version)

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def rig(tiny_dir, sample_data, tmp_path_factory):
    processor = load_processor(tiny_dir)
    encoder = ChatEncoder(processor.tokenizer, PixelCache(processor.image_processor, 3136, 50176).tokens)
    logs = tmp_path_factory.mktemp("search")
    token_file = new_token_file(logs)
    port = free_port()
    argv = python_module(
        "deepeyes.tools.search_service", "--port", port, "--token-file", token_file,
        "--corpus", sample_data.corpus, "--image-index", sample_data.image_index,
    )
    search = LocalService("search", argv, port, read_token(token_file), logs / "search.log")
    sandbox = LocalSandbox(tmp_path_factory.mktemp("sandbox"), SandboxLimits(timeout_s=5))
    scratch = tmp_path_factory.mktemp("scratch")
    record = next(r for r in read_records(sample_data.rl_train) if r.metadata.get("variant") == "flag")
    with local_services([search], ready_timeout_s=60):
        yield encoder, search, sandbox, scratch, record
    sandbox.close()


def run_step(rig, scripts: dict[tuple[int, int], list[str]], variant: str):
    """One record, a rollout per script, scored: the agent half of a GRPO step."""
    encoder, search, sandbox, scratch, record = rig

    async def step():
        client = SearchClient(search.url, search.token, timeout_s=30)
        toolbox = Toolbox(client, sandbox, scratch)
        try:
            trajectories = await rollout(
                [record], len(scripts), 0, 0, ScriptedPolicy(encoder, scripts), encoder, toolbox, LIMITS,
                progress=False, variant=variant,
            )
        finally:
            await client.close()
        await score_trajectories(trajectories, variant, RewardConfig())
        return trajectories

    return asyncio.run(step())


def assert_recorded(trajectories, tmp_path):
    for trajectory in trajectories:
        assert trajectory.finish in FINISHES
        assert bool(trajectory.error_kind) == (trajectory.finish == "error")
        if trajectory.finish == "error":
            assert trajectory.error_kind in ("decode", "parse", "tool", "encode", "reward")
            assert trajectory.reward == 0.0
        assert len(trajectory.loss_mask) == len(trajectory.response_ids) == len(trajectory.rollout_logprobs)
    metrics = rollout_metrics(trajectories, step=0)
    assert sum(v for k, v in metrics.items() if k.startswith("rollout/error_")) == sum(
        t.finish == "error" for t in trajectories)
    write_rollouts(tmp_path / "rollouts.jsonl", trajectories)  # what the step writes must be writable
    assert len((tmp_path / "rollouts.jsonl").read_text().splitlines()) == len(trajectories)
    return metrics


CELLS = [
    "print(1)", "display(image_1)", "1 / 0", "print('<image>' * 3)", "print('\\x00')", "print('\\ud800')",
    "import os\nos._exit(3)", "print('<|im_end|>\\n<|im_start|>assistant')", "print('x' * 100000)",
    "for i in range(12):\n    display(image_1.crop((0, 0, 30 + i, 30)))", "def f(:\n  pass", "",
]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.sampled_from(["\\ud800", "\udfff"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
PIECES = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=20),  # random text: NULs, any plane
    st.sampled_from(["<think>", "</think>", "<code>", "</code>", "<tool_call>", "</tool_call>", "<answer>",
                     "</answer>", "```python\n", "\n```", "```py\n", "<image>", "<|im_end|>", "\x00", "\n"]),
    st.sampled_from(CELLS).map(lambda cell: f"<code>\n```python\n{cell}\n```\n</code>"),
    st.builds(lambda name, arguments: json.dumps({"name": name, "arguments": arguments}, ensure_ascii=True),
              st.sampled_from(["search", "image_search", "calculator"]), JSON
              ).map(lambda call: f"<tool_call>{call}</tool_call>"),
    st.sampled_from([
        SURROGATE_CALL, '<tool_call>{"name": "image_search"}</tool_call>',
        "<tool_call>" + "[" * 5000 + "</tool_call>",  # deep nesting
        '<tool_call>{"name": "search", "arguments": {"query": "' + "q" * 20000 + '"}}</tool_call>',  # huge JSON
        "<tool_call>" * 300, "<answer>" * 300 + "</answer>",  # many unclosed tags
    ]),
)
TURNS = st.lists(st.lists(PIECES, max_size=6).map("".join), min_size=1, max_size=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=TURNS, second=TURNS, variant=st.sampled_from(protocol.VARIANTS))
def test_arbitrary_model_turns_never_end_the_step(rig, tmp_path, first, second, variant):
    trajectories = run_step(rig, {(0, 0): first, (0, 1): second}, variant)
    assert len(trajectories) == 2
    assert_recorded(trajectories, tmp_path)
    for trajectory in trajectories:  # --hypothesis-show-statistics: how the examples ended
        event(f"{variant}: finish {trajectory.finish} {trajectory.error_kind}".strip())
        event(f"tool calls: {len(trajectory.tool_calls)}")


def test_a_lone_surrogate_in_a_search_query_ends_its_trajectory_only(rig, tmp_path):
    fine = ["<think>Search.</think>" + '<tool_call>{"name": "search", "arguments": {"query": "capital"}}</tool_call>',
            "<think>Done.</think><answer>A</answer>"]
    for variant in protocol.VARIANTS:
        trajectories = run_step(rig, {(0, 0): ["<think>Search.</think>" + SURROGATE_CALL], (0, 1): fine}, variant)
        broken, ok = trajectories
        assert (broken.finish, broken.error_kind, broken.reward) == ("error", "encode", 0.0), broken.error
        assert broken.observations == [] and broken.tool_calls[0].ok  # the search ran; its text could not be encoded
        assert ok.finish == "answer" and not ok.error
        assert assert_recorded(trajectories, tmp_path)["rollout/error_encode"] == 1.0


def test_a_rl_step_survives_a_lone_surrogate_and_a_tool_that_raises(tmp_path):
    """A whole GRPO step of the tiny model (scripted turns in place of sampling): one trajectory's
    search query holds a lone surrogate, another's search raises inside the tool; the step
    updates the policy and counts both errors."""
    from tests.train.test_grpo import rl_config
    from deepeyes.train.rl import build_trainer

    trainer = build_trainer(rl_config(tmp_path, "trainer=hf", "rollout.max_turns=2"), tmp_path, None)

    class ExplodingSearch:  # an exception injected into one trajectory's tool call
        def __init__(self, search):
            self.search_backend = search

        async def search(self, query, k):
            if query == "boom":
                raise RuntimeError("injected failure")
            return await self.search_backend.search(query, k)

        async def image_search(self, image, k):
            return await self.search_backend.image_search(image, k)

        async def close(self):
            await self.search_backend.close()

    trainer.toolbox = replace(trainer.toolbox, search=ExplodingSearch(trainer.toolbox.search))
    answer = "<think>Done.</think><answer>A</answer>"
    scripts = {
        (0, 0): ["<think>Search.</think>" + SURROGATE_CALL, answer],
        (0, 1): ['<think>Search.</think><tool_call>{"name": "search", "arguments": {"query": "boom"}}</tool_call>',
                 answer],
        (1, 0): [answer], (1, 1): ["<think>No idea.</think>"],
    }
    trainer.engine = ScriptedPolicy(trainer.encoder, scripts, seed=trainer.cfg.run.seed)
    try:
        metrics, trajectories = trainer.step(0)
    finally:
        trainer.close()
    assert [(t.finish, t.error_kind) for t in trajectories] == [
        ("error", "encode"), ("error", "tool"), ("answer", ""), ("invalid", "")]
    assert (metrics["rollout/error_encode"], metrics["rollout/error_tool"], metrics["rollout/finish_error"]) == (1, 1, 0.5)
    assert "injected failure" in trajectories[1].error
    assert metrics["policy/grad_norm"] > 0  # the surviving trajectories trained
