"""The judge client against a real judge server (the tiny model: plumbing, not wisdom)."""

import asyncio

import pytest

from deepeyes.service import free_port, local_services, read_token
from deepeyes.rollout.api import GenerateResult
from deepeyes.rollout.client import RolloutClient
from deepeyes.rollout.judge import JudgeClient
from tests.rollout.conftest import rollout_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def judge_server(tiny_dir, token_file, tmp_path_factory):
    service = rollout_server("judge", tiny_dir, token_file, tmp_path_factory.mktemp("logs"))
    with local_services([service], ready_timeout_s=120):
        yield service


def grade(judge, *args):
    async def run():
        try:
            return await judge.grade(*args)
        finally:
            await judge.close()

    return asyncio.run(run())


def test_a_judge_reply_that_is_no_verdict_falls_back_to_the_rule_based_grade(judge_server, token_file, tokenizer):
    judge = JudgeClient(RolloutClient([judge_server.url], read_token(token_file)), tokenizer, timeout_s=60)
    assert grade(judge, "How many dots?", "1,517", "1517") == 1.0
    assert judge.stats["judged"] + judge.stats["fallback_unparsed"] == 1  # the tiny judge did reply


def test_a_slow_judge_falls_back_and_is_counted(judge_server, token_file, tokenizer):
    judge = JudgeClient(RolloutClient([judge_server.url], read_token(token_file)), tokenizer, timeout_s=0.001)
    assert grade(judge, "What color?", "red", "Red.") == 1.0
    assert grade(judge, "What color?", "blue", "red") == 0.0
    assert judge.stats == {"fallback_timeout": 2}


def test_a_judge_that_is_down_falls_back_and_is_counted(token_file, tokenizer):
    nobody = f"http://127.0.0.1:{free_port()}"
    judge = JudgeClient(RolloutClient([nobody], read_token(token_file)), tokenizer, timeout_s=10)
    assert grade(judge, "What color?", "red", "red") == 1.0
    assert judge.stats == {"fallback_unavailable": 1}


class ScriptedJudge:
    """Replies with fixed text, as a judge model would; for the verdict parsing only."""

    def __init__(self, tokenizer, text):
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    async def generate(self, request):
        return GenerateResult(self.ids, [0.0] * len(self.ids), "eos", 0)

    async def close(self):
        pass


@pytest.mark.parametrize("reply, expected", [("Judgement: 1", 1.0), ("judgement:0\n", 0.0)])
def test_the_judges_verdict_overrides_the_rule_based_grade(tokenizer, reply, expected):
    judge = JudgeClient(ScriptedJudge(tokenizer, reply), tokenizer, timeout_s=10,
                        fallback=lambda p, g: pytest.fail("fallback used"))
    assert grade(judge, "q", "a fox", "a dog" if expected else "a fox") == expected
    assert judge.stats == {"judged": 1}


# --- protocol.variant=deepeyesv2: the released judges --------------------------------------------


def release_grade(judge, method, *args):
    async def run():
        try:
            return await getattr(judge, method)(*args)
        finally:
            await judge.close()

    return asyncio.run(run())


@pytest.mark.parametrize("method", ["release_grade", "release_math_grade"])
def test_the_released_judge_on_a_real_server_gives_a_verdict(judge_server, token_file, tokenizer, method):
    judge = JudgeClient(RolloutClient([judge_server.url], read_token(token_file)), tokenizer, timeout_s=120,
                        max_new_tokens=16)
    assert release_grade(judge, method, "How many dots?", "1517", "1,517") in (0.0, 1.0)
    assert sum(judge.stats.values()) == 1 and not any(key.startswith("fallback") for key in judge.stats)


@pytest.mark.parametrize("method", ["release_grade", "release_math_grade"])
def test_a_released_judge_that_is_slow_or_down_gives_none_and_is_counted(judge_server, token_file, tokenizer, method):
    slow = JudgeClient(RolloutClient([judge_server.url], read_token(token_file)), tokenizer, timeout_s=0.001)
    assert release_grade(slow, method, "q", "a", "a") is None
    assert slow.stats == {"fallback_timeout": 1}
    down = JudgeClient(RolloutClient([f"http://127.0.0.1:{free_port()}"], read_token(token_file)), tokenizer, timeout_s=10)
    assert release_grade(down, method, "q", "a", "a") is None
    assert down.stats == {"fallback_unavailable": 1}
