"""protocol.variant=deepeyesv2 replays the released DeepEyesV2 RL environment and reward.

Every case is a crafted model turn (or trajectory) whose outcome was read off the release
(github.com/Visual-Agent/DeepEyesV2, commit 0373e6e), cited as
  env:LINE    reinforcement_learning/verl/workers/agent/envs/deepeyesv2/deepeyesv2.py
  prompt:LINE reinforcement_learning/verl/workers/agent/envs/deepeyesv2/prompt.py
  loop:LINE   reinforcement_learning/verl/workers/agent/parallel_env.py
  reward:LINE reinforcement_learning/verl/utils/reward_score/deepeyesv2.py
The turns run through the real `run_episode` with the real encoder, the real sandbox daemon and
the real local search; the reward cases through `score_trajectories` with a judge client whose
server replies as a judge model would.
"""

import asyncio
from dataclasses import dataclass, replace

import pytest
from PIL import Image

from deepeyes.agent import protocol
from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.loop import EpisodeLimits, run_episode
from deepeyes.agent.runtime import score_trajectories
from deepeyes.agent.tool_session import Toolbox
from deepeyes.agent.trajectory import Trajectory
from deepeyes.config import RewardConfig
from deepeyes.data import read_records
from deepeyes.data.schema import Record
from deepeyes.model import load_processor
from deepeyes.model.pixels import PixelCache
from deepeyes.rollout.api import GenerateResult
from deepeyes.rollout.judge import JudgeClient, release_math_verdict, release_verdict
from deepeyes.tools import LocalSandbox, SandboxLimits
from deepeyes.tools.search_service import LocalSearch

pytestmark = pytest.mark.slow

INDEX = "fvqa_train_7"
LIMITS = EpisodeLimits(max_turns=3, max_turn_tokens=4096, max_response_tokens=16384)
EMPTY_CELL = "Code execution result:\nstdout:\n```\n{stdout}\n```\n\nstderr:\n```\n{stderr}\n```"


def code(body: str, fence: str = "python") -> str:
    return f"<think>Look closer.</think>\n<code>\n```{fence}\n{body}\n```\n</code>"


def call(raw: str) -> str:
    return f"<think>Search.</think>\n<tool_call>\n{raw}\n</tool_call>"


ANSWER = "<think>Done.</think>\n<answer>42</answer>"


class ScriptedPolicy:
    """The engine's reply to each request: the next scripted turn, ended as vLLM ends it (a stop
    string, "stop"; otherwise <|im_end|>, "eos"; `cut` turns, "length")."""

    def __init__(self, encoder: ChatEncoder, turns: list[str], cut: bool = False):
        self.encoder, self.turns, self.cut, self.requests = encoder, turns, cut, []

    async def generate(self, request) -> GenerateResult:
        self.requests.append(request)
        turn = self.turns[min(len(self.requests) - 1, len(self.turns) - 1)]
        ids = self.encoder.text(turn)
        if self.cut:
            return GenerateResult(ids, [0.0] * len(ids), "length", 0)
        if turn.endswith(protocol.STOP_STRINGS):
            return GenerateResult(ids, [0.0] * len(ids), "stop", 0)
        return GenerateResult(ids + [self.encoder.im_end], [0.0] * (len(ids) + 1), "eos", 0)


@pytest.fixture(scope="module")
def rig(tiny_dir, sample_data, tmp_path_factory):
    processor = load_processor(tiny_dir)
    pixels = PixelCache(processor.image_processor, 3136, 50176)
    encoder = ChatEncoder(processor.tokenizer, pixels.tokens)
    sandbox = LocalSandbox(tmp_path_factory.mktemp("sandbox"), SandboxLimits(timeout_s=3))
    search = LocalSearch.from_files(sample_data.corpus, sample_data.image_index)
    toolbox = Toolbox(search, sandbox, tmp_path_factory.mktemp("scratch"))
    broken = Toolbox(LocalSearch(None, None), sandbox, tmp_path_factory.mktemp("scratch"))  # every search fails
    # A lookup task whose image is a flag the image-search index knows: image search finds it.
    task = next(r for r in read_records(sample_data.rl_train) if r.metadata.get("variant") == "flag")
    record = replace(toolbox.stored(task), metadata={"index": INDEX})
    yield encoder, toolbox, broken, record
    sandbox.close()


def episode(rig, turns, cut=False, broken=False):
    encoder, toolbox, failing, record = rig
    policy = ScriptedPolicy(encoder, turns, cut)
    box = failing if broken else toolbox
    return asyncio.run(run_episode(record, 0, 0, 0, 0, policy, encoder, box, LIMITS, protocol.DEEPEYESV2))


@dataclass
class Case:
    cite: str
    turns: list[str]
    finish: str  # how the episode ends
    shown: list[str] | None = None  # the observations' exact text (None: not checked here)
    images: int | None = None  # images the observations showed, all together (None: not checked here)
    cut: bool = False
    broken: bool = False


CASES = {
    # --- the episode ends, or goes on --------------------------------------------------------
    "answer ends the episode": Case("env:131-133", [ANSWER], "answer", []),
    "last of two answers ends it": Case("env:87-88", ["<answer>1</answer> or <answer>2</answer>"], "answer", []),
    "whitespace answer is an answer": Case("env:132 (' ' is truthy)", ["<answer> </answer>"], "answer", []),
    "empty answer runs the code": Case(
        "env:131-137", ["<answer></answer>" + code("print(1)"), ANSWER], "answer", [EMPTY_CELL.format(stdout="1\n", stderr="")]),
    "empty answer and no action ends": Case("env:132, env:135, env:143-144", ["<answer></answer>"], "invalid", []),
    "no action ends": Case("env:135, env:142-144", ["<think>Not sure.</think> Hmm."], "invalid", []),
    "empty turn ends": Case("loop:431-433, env:142-144", [""], "invalid", []),
    "code without a python block ends": Case("env:96-99, env:143", ["<code>print(1)</code>"], "invalid", []),
    "```py fence ends": Case("env:96 (only ```python)", [code("print(1)", "py")], "invalid", []),
    "```Python fence ends": Case("env:96 (case-sensitive)", [code("print(1)", "Python")], "invalid", []),
    "```python3 fence ends": Case("env:96 (python then whitespace)", [code("print(1)", "python3")], "invalid", []),
    "bare ``` fence ends": Case("env:96", [code("print(1)", "")], "invalid", []),
    "unclosed code ends": Case("env:91-93", ["<code>\n```python\nprint(1)\n```\n"], "invalid", []),
    "empty python block ends": Case("env:143 ('' is falsy)", ["<code>\n```python\n\n```\n</code>"], "invalid", []),
    "last code block runs": Case(
        "env:95", [code("print(1)").replace("</code>", "</code><code>\n```python\nprint(2)\n```\n</code>"), ANSWER],
        "answer", [EMPTY_CELL.format(stdout="2\n", stderr="")]),
    "last python block of the code runs": Case(
        "env:97-100", ["<code>\n```python\nprint(1)\n```\n```python\nprint(3)\n```\n</code>", ANSWER], "answer",
        [EMPTY_CELL.format(stdout="3\n", stderr="")]),
    "code wins over a tool call": Case(
        "env:136-139", ['<tool_call>{"name": "image_search"}</tool_call>' + code("print(4)"), ANSWER], "answer",
        [EMPTY_CELL.format(stdout="4\n", stderr="")]),
    "unclosed tool call ends": Case("env:115-116, env:173", ['<tool_call>{"name": "image_search"}'], "invalid", []),
    "empty tool call ends": Case("env:173-174", ["<tool_call></tool_call>"], "invalid", []),
    "whitespace tool call is bad JSON and goes on": Case(
        "env:173 (' ' is truthy), env:176-182", ["<tool_call> </tool_call>", ANSWER], "answer",
        ["Error: Invalid tool call format: . Error: Expecting value: line 1 column 1 (char 0)"]),
    "invalid JSON goes on": Case(
        "env:176-182", [call('{"name": "search"'), ANSWER], "answer",
        ["Error: Invalid tool call format: {\"name\": \"search\". "
         "Error: Expecting ',' delimiter: line 1 column 18 (char 17)"]),
    "unknown tool name goes on": Case(
        "env:189-193", [call('{"name": "calculator"}'), ANSWER], "answer",
        ['Error: Invalid tool call name: {"name": "calculator"}.']),
    "a JSON array shows Python's error": Case(
        "env:185, env:223-224", [call("[1, 2]"), ANSWER], "answer",
        [f"Error: list indices must be integers or slices, not str for {INDEX}"]),
    "a call without a name shows the KeyError": Case(
        "env:185, env:223-224", [call('{"arguments": {"query": "q"}}'), ANSWER], "answer", [f"Error: 'name' for {INDEX}"]),
    "image search with arguments goes on": Case(
        "env:194-198", [call('{"name": "image_search", "arguments": {}}'), ANSWER], "answer",
        ['Error: Invalid tool call parameters for image search: {"name": "image_search", "arguments": {}}.']),
    "search without arguments shows the TypeError": Case(
        "env:186, env:293, env:223-224", [call('{"name": "search"}'), ANSWER], "answer",
        [f"Error: 'NoneType' object is not subscriptable for {INDEX}"]),
    "search without a query shows the KeyError": Case(
        "env:293, env:223-224", [call('{"name": "search", "arguments": {}}'), ANSWER], "answer",
        [f"Error: 'query' for {INDEX}"]),
    "search failure ends": Case("env:200-203, env:296-298", [call('{"name": "search", "arguments": {"query": "q"}}')],
                                "tool_error", [], broken=True),
    "image search failure ends": Case("env:200-203, env:264-267", [call('{"name": "image_search"}')], "tool_error", [],
                                      broken=True),
    "a cell that times out ends": Case("env:147-150 (status is not success)", [code("while True:\n    pass")],
                                       "tool_error", []),
    "a cell that raises goes on with its traceback": Case("env:147-163 (the kernel reports success)",
                                                          [code("1 / 0"), ANSWER], "answer"),
    "a turn cut by the token limit ends": Case("loop:427-429", [code("print(1)")], "length", [], cut=True),
    "the last turn's call is not shown": Case("loop:230-232", [code("print(1)")] * 3, "max_turns"),
    # --- observation text ----------------------------------------------------------------------
    "code is re-indented: a block never closes": Case(
        "env:53-66, env:146", [code("for i in range(2):\n    print(i)\nprint('end')"), ANSWER], "answer",
        [EMPTY_CELL.format(stdout="0\nend\n1\nend\n", stderr="")]),
    "code is re-indented: stray indentation and blank lines": Case(
        "env:55, env:65", [code("   x = 5\n\n        print(x)"), ANSWER], "answer", [EMPTY_CELL.format(stdout="5\n", stderr="")]),
    "a printed <image> stays text": Case(
        "env:157-163 (no image: a text observation)", [code("print('<image>')"), ANSWER], "answer",
        [EMPTY_CELL.format(stdout="<image>\n", stderr="")], 0),
    "two images are listed": Case(
        "env:152-158, prompt:1-13", [code("display(image_1)\ndisplay(image_1.crop((0, 0, 64, 64)))"), ANSWER], "answer",
        [EMPTY_CELL.format(stdout="", stderr="") + "\n\nImages:\n<image><image>"], 2),
    # Our sandbox also notes the 2 it drops in stderr (the release drops them silently), so the text is not compared.
    "at most 10 images per round": Case(
        "env:77, env:153, env:157", [code("for i in range(12):\n    display(image_1.crop((0, 0, 40 + i, 40)))"), ANSWER],
        "answer", None, 10),
    "image search lists its images": Case("env:275-285, prompt:15-18", [call('{"name": "image_search"}'), ANSWER],
                                          "answer"),
    "image search may run twice": Case(
        "env:260-289 (nothing enforces 'once')", [call('{"name": "image_search"}')] * 2 + [ANSWER], "answer"),
    "text search lists its hits": Case("env:305-317, prompt:15-18",
                                       [call('{"name": "search", "arguments": {"query": "capital"}}'), ANSWER], "answer"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_release_episode_rule(rig, name):
    case = CASES[name]
    trajectory = episode(rig, case.turns, case.cut, case.broken)
    assert trajectory.finish == case.finish, case.cite
    assert not trajectory.error, trajectory.error
    if case.shown is not None:
        assert trajectory.observations == case.shown, case.cite
    if case.images is not None:
        assert len(trajectory.images) == len(rig[3].images) + case.images, case.cite
        assert sum(o.endswith("Images:\n" + "<image>" * case.images) for o in trajectory.observations) == bool(case.images)


def test_every_observation_ends_in_the_think_the_model_continues(rig, tokenizer):
    """env:162: '<|im_end|>\\n<|im_start|>user\\n' + text + '<|im_end|>\\n<|im_start|>assistant\\n<think>';
    loop:257: those tokens are observation (action mask 0)."""
    trajectory = episode(rig, [code("print(1)"), call('{"name": "calculator"}'), ANSWER])
    observed = "".join(
        tokenizer.decode([i for i, m in zip(trajectory.response_ids, trajectory.loss_mask) if m == 0]).split("<think>")
    )
    assert tokenizer.decode(trajectory.response_ids).count("<|im_start|>assistant\n<think>") == 2
    assert observed == (
        "<|im_end|>\n<|im_start|>user\n" + EMPTY_CELL.format(stdout="1\n", stderr="") + "<|im_end|>\n<|im_start|>assistant\n"
        + "<|im_end|>\n<|im_start|>user\n" + 'Error: Invalid tool call name: {"name": "calculator"}.'
        + "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_cell_that_raises_shows_the_traceback(rig):
    trajectory = episode(rig, CASES["a cell that raises goes on with its traceback"].turns)
    assert "ZeroDivisionError" in trajectory.observations[0] and trajectory.tool_calls[0].ok


def test_the_turn_limit_runs_and_shows_nothing_after_the_last_turn(rig):
    trajectory = episode(rig, [code("print(1)")] * 3)
    assert len(trajectory.observations) == 2 and len(trajectory.model_turns) == 3


def test_searches_render_as_the_release_formats_them(rig, sample_data):
    text = episode(rig, CASES["text search lists its hits"].turns).observations[0]
    assert text.startswith("<tool_response>\nA Google search for 'capital' found 5 results:\n\n## Web Results\n1. [")
    assert text.endswith("\n</tool_response>") and text.count("\n\n2. [") == 1
    images = episode(rig, CASES["image search lists its images"].turns)
    listing = images.observations[0]
    assert listing.startswith("<tool_response>\nA Google image search for the image found ")
    assert listing.count("<image>\n[") == len(images.images) - 1 and listing.endswith("] \n\n</tool_response>")
    twice = episode(rig, CASES["image search may run twice"].turns)
    assert twice.observations[0] == twice.observations[1] and all(c.ok for c in twice.tool_calls)


SIZES = [
    ((10, 10), (32, 32)),  # env:391-397: the short side scaled up to 32
    ((40, 12), (107, 32)),  # ceil(40 * 32 / 12)
    ((1000, 2), (1600, 32)),  # env:372-388: ratio 500 cut to 150 (1000x2 -> 300x6), then 6 -> 32
    ((3, 900), (32, 2400)),  # ratio 300 cut to 150 (3x900 -> 6x450), then 6 -> 32 (450 -> 2400)
    ((64, 48), (64, 48)),  # large enough: as returned
]


@pytest.mark.parametrize("size, shown", SIZES)
def test_the_release_resize_rule(size, shown):
    image = Image.new("RGB", size)
    assert protocol.release_image_size(image).size == shown
    assert (protocol.release_image_size(image) is image) == (size == shown)


@pytest.mark.parametrize("size, shown", [sizes for sizes in SIZES if max(sizes[0]) / min(sizes[0]) <= 200])
def test_code_images_are_resized_as_the_release_does(rig, size, shown):
    """Through the real sandbox. Its kernel first fits an image to at least 28 pixels a side and
    an aspect ratio of at most 200 (tools/_kernel.py); for these sizes that changes nothing the
    release rule then shows. A longer strip would reach the rule pre-fitted (not as the release)."""
    body = f"from PIL import Image as I\ndisplay(I.new('RGB', {size}, 'red'))"
    trajectory = episode(rig, [code(body), ANSWER])
    assert Image.open(trajectory.images[-1]).size == shown


# --- reward per family -----------------------------------------------------------------------


class JudgeModel:
    """A judge server's replies, scripted; records the prompts it was asked."""

    def __init__(self, tokenizer, reply: str):
        self.tokenizer, self.reply, self.prompts = tokenizer, reply, []

    async def generate(self, request):
        self.prompts.append(self.tokenizer.decode(request.input_ids))
        ids = self.tokenizer(self.reply, add_special_tokens=False)["input_ids"]
        return GenerateResult(ids, [0.0] * len(ids), "eos", 0)

    async def close(self):
        pass


def scored(tokenizer, turns, family, truth="42", reply=None, observations=()):
    record = Record("r", "How many?", (), truth, family, family if family in ("perception", "search", "reason") else "x")
    trajectory = Trajectory(record, 0, [], model_turns=list(turns), observations=list(observations), finish="answer")
    model = JudgeModel(tokenizer, reply) if reply is not None else None
    judge = JudgeClient(model, tokenizer, timeout_s=10) if model else None
    asyncio.run(score_trajectories([trajectory], protocol.DEEPEYESV2, RewardConfig(), judge))
    return trajectory, (model.prompts if model else [])


YES = "<think>一致</think>\n<最终结果>\n\\boxed{Yes}\n<\\最终结果>"
NO = "<think>不一致</think>\n<最终结果>\n\\boxed{No}\n<\\最终结果>"
LONG = "x" * 300


@pytest.mark.parametrize("family, turns, reply, reward, accuracy, fmt, cite", [
    ("perception", [ANSWER], YES, 1.0, 1.0, 1.0, "reward:179-193"),
    ("perception", [ANSWER], NO, 0.2, 0.0, 1.0, "reward:179-193"),
    ("perception", [f"<think>t</think><answer>{LONG}</answer>"], YES, 0.0, 0.0, 0.0, "reward:147-150"),
    ("perception", [f"<think>t</think><answer>{LONG[:299]}</answer>"], YES, 1.0, 1.0, 1.0, "reward:148 (>= 300)"),
    ("perception", ["<think>t</think> no answer"], YES, 0.0, 0.0, 0.0, "reward:135-145"),
    ("perception", ["<think>t</think><answer></answer>"], YES, 0.0, 0.0, 0.0, "reward:143-145"),
    ("perception", ["<answer>42</answer>"], YES, 0.8, 1.0, 0.0, "reward:120-127 (<think> prepended, no </think>)"),
    ("perception", ["<think>t</think><code>x<answer>42</answer>"], YES, 0.8, 1.0, 0.0, "reward:129-133"),
    ("perception", ["<think>a<think>b</think><answer>42</answer>"], YES, 0.8, 1.0, 0.0, "reward:122-125"),
    ("search", ["<think>s</think><tool_call>{}</tool_call>", ANSWER], YES, 0.92, 1.0, 1.0, "reward:318-325, reward:386"),
    ("search", [ANSWER], YES, 1.0, 1.0, 1.0, "reward:322-326"),
    ("search", ["<think>s</think><tool_call>{}", ANSWER], YES, 0.72, 1.0, 0.0, "reward:318-321"),
    ("search", [f"<think>t</think><answer>{LONG}</answer>"], YES, 0.0, 0.0, 0.0, "reward:339-342"),
    ("search", ["<think>s</think><tool_call>{}</tool_call>", ANSWER], NO, 0.2, 0.0, 1.0, "reward:386"),
    ("reason", [ANSWER], None, 1.0, 1.0, 1.0, "reward:283-293 (rules first: math-verify says equal)"),
    ("reason", ["<think>t</think><answer>41</answer>"], "## Equivalence Judgement\nTRUE", 1.0, 1.0, 1.0,
     "reward:237-239, reward:288 (the generative verify)"),
    ("reason", ["<think>t</think><answer>41</answer>"], "## Equivalence Judgement\nFALSE", 0.2, 0.0, 1.0, "reward:240-241"),
    ("reason", ["<think>t</think><answer>41</answer>"], "TRUE or FALSE", 0.2, 0.0, 1.0, "reward:242-243 (no verdict: 0)"),
    ("reason", [f"<think>t</think><answer>{LONG}</answer>"], "## Equivalence Judgement\nFALSE", 0.2, 0.0, 1.0,
     "reward:271-288 (math has no length guard)"),
    ("reason", ["<think>t</think><answer>x = 42</answer>"], None, 1.0, 1.0, 1.0, "reward:463 (the right side of '=')"),
])
def test_release_reward_by_family(tokenizer, family, turns, reply, reward, accuracy, fmt, cite):
    trajectory, _ = scored(tokenizer, turns, family, reply=reply)
    assert (round(trajectory.reward, 6), trajectory.accuracy, trajectory.format) == (reward, accuracy, fmt), cite


def test_the_observations_think_counts_as_the_release_read_it(tokenizer):
    """naive_async.py:105-106 decodes the whole response, observations included: the observation's
    <think> opens the next turn, which the model closes."""
    turns = ["<think>zoom</think><code>\n```python\nprint(1)\n```\n</code>", "It is 42.</think><answer>42</answer>"]
    trajectory, _ = scored(tokenizer, turns, "perception", reply=YES, observations=["Code execution result:"])
    assert trajectory.format == 1.0 and trajectory.reward == 1.0


def test_the_judge_is_asked_with_the_released_prompt(tokenizer):
    """reward:30-44, reward:160-169: verify_prompt.md as the system prompt, the fields in Chinese."""
    _, prompts = scored(tokenizer, ["<think>t</think><answer> 41 </answer>"], "perception", reply=YES)
    assert "<|im_start|>system\n# 角色\n你是一个判断专家" in prompts[0]
    assert prompts[0].endswith(
        "<|im_start|>user\n\n    [问题]:How many?\n    [参考答案]:42\n    [模型回答]:41\n    <|im_end|>\n<|im_start|>assistant\n")
    _, prompts = scored(tokenizer, ["<think>t</think><answer>$41$ dollars</answer>"], "reason",
                        reply="## Equivalence Judgement\nFALSE")
    assert "你是一个判断专家" not in prompts[0]  # reward:225-227: the user message alone
    assert "**Question**:\nHow many?\n\n**Reference Answer**\n42\n\n## Student Final Answer\n41<|im_end|>" in prompts[0]
    _, prompts = scored(tokenizer, [f"<think>t</think><answer>{LONG}</answer>"], "search", reply=YES)
    assert prompts == []  # reward:340-342: never graded


@pytest.mark.parametrize("reply, verdict", [
    (YES, True), (NO, False),
    ("\\boxed{Yes}", True),
    ("<think>Yes, they agree... or not.</think>\n<最终结果>\n\\boxed{No}\n<\\最终结果>", False),  # only the final result
    ("Yes", True), ("yes", False),  # case-sensitive "Yes" (reward:179)
    ("", False),
])
def test_the_released_judge_verdict(reply, verdict):
    assert release_verdict(reply) is verdict  # reward:170-182


@pytest.mark.parametrize("reply, verdict", [
    ("## Equivalence Judgement\nTRUE", True), ("## Equivalence Judgement\nFalse", False),
    ("## Equivalence Judgement\nTRUE or FALSE", None), ("TRUE", True), ("", None),
    ("## Equivalence Judgement\nFALSE\n## Equivalence Judgement\ntrue", True),  # the last section counts
])
def test_the_released_math_verdict(reply, verdict):
    assert release_math_verdict(reply) is verdict  # reward:237-243


def test_without_a_judge_the_rules_grade_perception(tokenizer):
    trajectory, _ = scored(tokenizer, ["<think>t</think><answer>42</answer>"], "perception")
    assert trajectory.reward == 1.0


def test_the_cases_cover_at_least_forty_release_rules_each_citing_its_line():
    reward_cases = test_release_reward_by_family.pytestmark[0].args[1]
    assert len(CASES) + len(reward_cases) >= 40
    cites = [case.cite for case in CASES.values()] + [case[-1] for case in reward_cases]
    assert all(cite.split(":")[0] in ("env", "loop", "reward", "prompt") for cite in cites)
