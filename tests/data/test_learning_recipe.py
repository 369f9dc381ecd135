"""The learning recipe's sample data: measurable color questions, a deliberately imperfect cold start."""

from collections import Counter

import pytest

from deepeyes.agent.protocol import Answer, CodeCall, SearchCall, parse_action
from deepeyes.data import generate_sample_data, read_records, read_sft_records
from deepeyes.data.sample_tasks import LEARNING_SQUARE, ensure_sample_data


@pytest.fixture(scope="module")
def learning(tmp_path_factory):
    return generate_sample_data(
        tmp_path_factory.mktemp("learning"), n_per_family=8, seed=0, recipe="learning", no_tool={"perception": 0.75}
    )


def actions(trajectory):
    return [type(parse_action(m.content)) for m in trajectory.messages if m.role == "assistant"]


def test_perception_asks_for_colors_and_the_cold_start_measures_them(learning):
    tasks = {r.id: r for r in read_records(learning.rl_train)}
    perception = [t for t in read_sft_records(learning.sft_train) if t.family == "perception"]
    assert {tasks[t.id].metadata["variant"] for t in perception} == {"color"}
    measured = [t for t in perception if actions(t) == [CodeCall, Answer]]
    assert len(measured) == 2  # 8 tasks, 75% without a tool
    for trajectory in measured:
        task = tasks[trajectory.id]
        code, observation, answer = (m.content for m in trajectory.messages[2:])
        assert ".crop(" in code and task.answer in ("red", "green", "blue")
        # The cell really printed it, once per pixel row of the square (and nothing else).
        assert f"stdout:\n```\n{(task.answer.upper() + chr(10)) * LEARNING_SQUARE}\n```" in observation
        assert answer.endswith(f"<answer>{task.answer.upper()}</answer>")


def test_thoughts_are_brief_and_arithmetic_has_fixed_widths(learning):
    thoughts = {
        m.content.split("</think>")[0] for t in read_sft_records(learning.sft_train) for m in t.messages if m.role == "assistant"
    }
    assert len(thoughts) <= 9  # a fixed sentence per step, nothing copied from the task
    widths = {}
    for task in read_records(learning.rl_train) + read_records(learning.rl_test):
        if task.family == "arithmetic":
            a, op, b = task.metadata["expression"].split()
            widths.setdefault(op, set()).add((len(a), len(b), len(task.answer)))
    assert widths == {"*": {(4, 2, 6)}, "+": {(5, 5, 6)}}


def test_a_quarter_of_lookups_ask_about_islands_no_search_finds(learning):
    tasks = {r.id: r for r in read_records(learning.rl_train)}
    lookups = [t for t in read_sft_records(learning.sft_train) if t.family == "lookup"]
    unlisted = [t for t in lookups if tasks[t.id].metadata["variant"] == "unlisted"]
    assert len(unlisted) == 2  # 8 lookups
    corpus = learning.corpus.read_text()
    for trajectory in unlisted:
        name = tasks[trajectory.id].metadata["entity"]
        assert name in tasks[trajectory.id].question and name not in corpus
        assert actions(trajectory) == [SearchCall, Answer]
        # It searched the right name and read five pages, all about other islands.
        header, results = trajectory.messages[3].content.split("## Web Results")
        assert "found 5 results" in header and name not in results
        assert trajectory.messages[-1].content.endswith("<answer>unknown</answer>")
    # The other lookups still find their answer in the first result.
    answered = [t for t in lookups if t not in unlisted]
    assert all(tasks[t.id].answer in t.messages[-2].content.split("2. [")[0] for t in answered)


def test_no_tool_share_answers_at_once_only_in_its_family(learning):
    by_family = {}
    for trajectory in read_sft_records(learning.sft_train):
        by_family.setdefault(trajectory.family, []).append(actions(trajectory) == [Answer])
    assert sum(by_family["perception"]) == 6
    assert not any(by_family["arithmetic"]) and not any(by_family["lookup"])


def test_bad_recipe_or_share_is_refused_before_generating(tmp_path):
    with pytest.raises(ValueError, match="recipe 'learnin'"):
        ensure_sample_data(tmp_path, n_per_family=2, recipe="learnin")
    with pytest.raises(ValueError, match=r"no_tool\['perceptoin'\]"):
        generate_sample_data(tmp_path, n_per_family=2, no_tool={"perceptoin": 0.5})
    with pytest.raises(ValueError, match=r"no_tool\['lookup'\]=1.5"):
        generate_sample_data(tmp_path, n_per_family=2, no_tool={"lookup": 1.5})


def test_rl_tasks_hold_twice_the_perception_tasks_and_the_cold_start_covers_the_first(learning):
    tasks = read_records(learning.rl_train)
    assert [t.family for t in tasks[:4]] == ["perception", "perception", "arithmetic", "lookup"]
    assert Counter(t.family for t in tasks) == {"perception": 16, "arithmetic": 8, "lookup": 8}
    cold_start = read_sft_records(learning.sft_train)
    assert Counter(t.family for t in cold_start) == {"perception": 8, "arithmetic": 8, "lookup": 8}
    assert {t.id for t in cold_start if t.family == "perception"} == {f"perception-train-{i:05d}" for i in range(8)}
    assert Counter(t.family for t in read_records(learning.rl_test)) == {"perception": 4, "arithmetic": 4, "lookup": 4}


def test_island_names_are_two_known_tokens(learning):
    from deepeyes.model.tokenizer import build_qwen2_5_tokenizer

    tokenizer = build_qwen2_5_tokenizer()
    names = {t.metadata["entity"] for t in read_records(learning.rl_train) + read_records(learning.rl_test) if t.family == "lookup"}
    assert all(len(tokenizer.encode(f" {name}")) == 2 for name in names)
