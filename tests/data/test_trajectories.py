import asyncio
import contextlib
import io

import pytest
from PIL import Image

from deepeyes.agent.protocol import (
    SYSTEM_PROMPT,
    STOP_STRINGS,
    Answer,
    CodeCall,
    ImageSearchCall,
    SearchCall,
    parse_action,
    render_code_observation,
    render_image_search,
    render_text_search,
    user_prompt,
)
from deepeyes.data import IMAGE_PLACEHOLDER, Record, cold_start_trajectory, read_records, read_sft_records
from deepeyes.tools import LocalSandbox
from deepeyes.tools.search import LocalImageSearch, LocalTextSearch


@pytest.fixture(scope="module")
def pairs(sample):
    """(task, its trajectory) for every train task."""
    tasks = {record.id: record for record in read_records(sample.rl_train)}
    trajectories = read_sft_records(sample.sft_train)
    assert [t.id for t in trajectories] == list(tasks)
    return [(tasks[t.id], t) for t in trajectories]


def assistant_turns(trajectory):
    return [m.content for m in trajectory.messages if m.role == "assistant"]


def expected_actions(task):
    if task.family in ("perception", "arithmetic"):
        return [CodeCall, Answer]
    search = [SearchCall] if task.metadata["variant"] == "named" else [ImageSearchCall, SearchCall]
    return [*search, Answer]


def test_trajectories_follow_the_protocol(pairs):
    for task, trajectory in pairs:
        messages = trajectory.messages
        assert (messages[0].role, messages[0].content) == ("system", SYSTEM_PROMPT)
        assert (messages[1].role, messages[1].content) == ("user", user_prompt(task.question))
        assert messages[1].content.startswith(f"{IMAGE_PLACEHOLDER}\n")
        assert trajectory.family == task.family
        turns = assistant_turns(trajectory)
        actions = [parse_action(turn) for turn in turns]
        assert [type(action) for action in actions] == expected_actions(task)
        assert actions[-1] == Answer(task.answer)
        for turn in turns:
            assert turn.startswith("<think> ") and turn.count("</think>") == 1
        for turn in turns[:-1]:
            # The rollout stops at the first stop string, so a turn must end exactly there.
            assert any(turn.endswith(stop) for stop in STOP_STRINGS)
            assert sum(turn.count(stop) for stop in STOP_STRINGS) == 1
        for action in actions:
            if isinstance(action, SearchCall):
                assert action.query == task.metadata["query"]


def test_placeholders_match_images_message_by_message(pairs):
    for task, trajectory in pairs:
        images = list(trajectory.images)
        assert images[0] == task.images[0]
        placeholders = sum(m.content.count(IMAGE_PLACEHOLDER) for m in trajectory.messages)
        assert placeholders == len(images)
        assert all(IMAGE_PLACEHOLDER not in m.content for m in trajectory.messages if m.role != "user")


def test_code_observations_are_what_the_code_really_outputs(pairs, tmp_path):
    for task, trajectory in pairs:
        if task.family not in ("perception", "arithmetic"):
            continue
        code = parse_action(assistant_turns(trajectory)[0]).code
        shown = []
        stdout = io.StringIO()
        with Image.open(task.images[0]) as image_1, contextlib.redirect_stdout(stdout):
            exec(code, {"image_1": image_1, "display": shown.append})
        assert trajectory.messages[3].content == render_code_observation(stdout.getvalue(), "", len(shown))
        assert len(trajectory.images) == 1 + len(shown)
        for image, path in zip(shown, trajectory.images[1:]):
            image.save(tmp_path / "shown.png", format="PNG")
            assert (tmp_path / "shown.png").read_bytes() == path.read_bytes()
        if task.family == "perception":
            assert len(shown) == 1
        else:
            assert (stdout.getvalue(), shown) == (f"{task.answer}\n", [])


def test_search_observations_are_what_the_search_returns(sample, pairs):
    text_search = LocalTextSearch.from_jsonl(sample.corpus)
    image_search = LocalImageSearch.from_jsonl(sample.image_index)
    for task, trajectory in pairs:
        if task.family != "lookup":
            continue
        observations = [m.content for m in trajectory.messages[3::2]]
        query = task.metadata["query"]
        assert observations[-1] == render_text_search(query, text_search.search(query, 5))
        assert task.answer in text_search.search(query, 5)[0].snippet
        if task.metadata["variant"] == "flag":
            results = image_search.search(task.images[0], 10)
            assert observations[0] == render_image_search([title for title, _ in results])
            assert list(trajectory.images[1:]) == [path for _, path in results]


def test_unknown_family_has_no_trajectory(sample, tmp_path):
    record = Record("x", "q", (sample.rl_train,), "a", "chart")
    with pytest.raises(ValueError, match="family 'chart'"):
        cold_start_trajectory(record, None, None, tmp_path)


def test_code_observations_match_the_real_sandbox(pairs, sample, tmp_path):
    """The trajectories' code cells, run by the sandbox RL rollouts use, give the same
    observation text and byte-identical images."""
    async def run(sandbox, task, code, out_dir):
        session = sandbox.session(task.images, out_dir)
        try:
            return await session.run(code)
        finally:
            await session.close()

    with LocalSandbox(tmp_path / "sandbox", image_roots=[sample.root]) as sandbox:
        results = [
            (task, trajectory, asyncio.run(run(sandbox, task, parse_action(assistant_turns(trajectory)[0]).code, tmp_path / task.id)))
            for task, trajectory in pairs
            if task.family in ("perception", "arithmetic")
        ]
    for task, trajectory, result in results:
        assert render_code_observation(result.stdout, result.stderr, len(result.images)) == trajectory.messages[3].content
        assert [path.read_bytes() for path in result.images] == [path.read_bytes() for path in trajectory.images[1:]]
