"""The synthesis job against a scripted OpenAI-compatible teacher on loopback, with the real agent
loop, sandbox and search: what is kept, what is dropped and why, resuming, and SFT on the result."""

import json

import pytest

from deepeyes.agent.loop import episode_seed
from deepeyes.config import DataConfig, LoggerConfig, RunConfig, SFTConfig, SFTJobConfig, SynthConfig, SynthJobConfig
from deepeyes.config import RolloutConfig, TeacherConfig
from deepeyes.data import read_records, read_sft_records
from deepeyes.synth import TeacherRefused, run_synthesis
from deepeyes.train.sft import train_sft
from tests.synth.teacher_server import Fail, ScriptedTeacher

K = 4
QUESTIONS = 6
KEY = "scripted-teacher-key"


def think_answer(answer, think="I have what I need."):
    return f"<think> {think} </think>\n<answer>{answer}</answer>"


def tool_turn(record):
    """A turn that calls the tool the question's family needs."""
    if record.family == "perception":
        left, top, right, bottom = record.metadata["crop_box"]
        code = f"crop = image_1.crop(({left}, {top}, {right}, {bottom})).resize(({(right - left) * 4}, {(bottom - top) * 4}))\ndisplay(crop)"
    elif record.family == "arithmetic":
        code = f"print({record.metadata['expression']})"
    else:
        query = record.metadata["query"]
        return f'<think> I will search. </think>\n<tool_call>\n{{"name": "search", "arguments": {{"query": "{query}"}}}}\n</tool_call>'
    return f"<think> I will run code. </think>\n<code>\n```python\n{code}\n```\n</code>"


def script(records):
    """Per question: attempt 0 solves it with a tool; 1 answers right without one (dropped as
    no_tool); 2 answers wrong; 3 differs per question (see EXPECTED)."""
    replies = {}

    def say(index, attempt, *turns):
        for turn, text in enumerate(turns):
            replies[episode_seed(0, 0, index, attempt, turn)] = text

    for index, record in enumerate(records):
        solve = (tool_turn(record), think_answer(record.answer))
        say(index, 0, *solve)
        say(index, 1, think_answer(record.answer))
        say(index, 2, think_answer("zebra crossing"))
        if index == 0:
            say(index, 3, f"<answer>{record.answer}</answer>")  # no <think>: bad format
        elif index == 1:
            say(index, 3, tool_turn(record), tool_turn(record), tool_turn(record))  # never answers
        elif index == 2:
            say(index, 3, tool_turn(record), think_answer(record.answer, "as <image> shows"))  # breaks the record
        elif index == 3:
            say(index, 3, Fail(500))  # the teacher keeps failing
        elif index == 4:
            say(index, 3, Fail(429, times=1, then=solve[0]), solve[1])  # rate-limited once, then solves
        else:
            say(index, 3, *solve)
    return replies


EXPECTED = {"kept": 8, "dropped": {"teacher_error": 1, "no_answer": 1, "bad_format": 1, "unverified": 6,
                                   "no_tool": 6, "malformed": 1}}


def synth_config(sample_data, out_dir, url, **synth):
    return SynthJobConfig(
        data=DataConfig(train=str(sample_data.rl_train), corpus=str(sample_data.corpus),
                        image_index=str(sample_data.image_index)),
        rollout=RolloutConfig(max_turns=3, max_turn_tokens=256, max_response_tokens=2048),
        teacher=TeacherConfig(base_url=url, api_key_env="SCRIPTED_TEACHER_KEY", max_retries=2, backoff_s=0.01),
        synth=SynthConfig(k=K, limit=QUESTIONS, require_tool=True, concurrency=8, attempts_per_batch=10, **synth),
        run=RunConfig(out_dir=str(out_dir)),
    )


@pytest.fixture
def records(sample_data):
    return read_records(sample_data.rl_train)[:QUESTIONS]


@pytest.fixture(autouse=True)
def teacher_key(monkeypatch):
    monkeypatch.setenv("SCRIPTED_TEACHER_KEY", KEY)


def attempt_ids(path):
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_synthesis_keeps_verified_tool_trajectories_and_sft_trains_on_them(sample_data, records, tmp_path):
    with ScriptedTeacher(KEY, script(records)) as teacher:
        summary = run_synthesis(synth_config(sample_data, tmp_path / "synth", teacher.url), progress=False)

    total = summary["total"]
    assert {key: total[key] for key in ("kept", "dropped")} == EXPECTED
    assert total["attempted"] == QUESTIONS * K and total["questions_kept"] == QUESTIONS
    assert set(total["tool_mix"]) == {"crop", "numerical", "text_search"}
    assert summary["by_family"]["perception"]["tool_mix"] == {"crop": 2}
    # One failed request retried (429), the 500s retried until the limit: none of it kept.
    assert teacher.seen[episode_seed(0, 0, 4, 3, 0)] == 2 and teacher.seen[episode_seed(0, 0, 3, 3, 0)] == 3
    # Teacher tokens as the endpoint counted them (1000 prompt tokens per answered request).
    assert total["teacher_prompt_tokens"] == 1000 * teacher.answered and total["teacher_completion_tokens"] > 0
    # Images went out as data URLs: every prompt carries its question image.
    assert teacher.images_seen >= QUESTIONS * K

    out = tmp_path / "synth"
    kept = read_sft_records(out / "trajectories.jsonl")  # the validating reader: placeholders match images
    assert sorted(r.id for r in kept) == sorted(
        [f"{r.id}#0" for r in records] + [f"{records[4].id}#3", f"{records[5].id}#3"])
    perception = next(r for r in kept if r.id == f"{records[0].id}#0")
    assert [m.role for m in perception.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert perception.messages[2].content.endswith("</code>")  # the stop string the endpoint left out
    assert perception.messages[3].content.startswith("Code execution result:")
    assert len(perception.images) == 2 and perception.images[1].parent == out / "images"  # the returned crop
    lookup = next(r for r in kept if r.id == f"{records[2].id}#0")
    assert "<tool_response>" in lookup.messages[3].content and records[2].answer in lookup.messages[3].content
    assert len(attempt_ids(out / "attempts.jsonl")) == QUESTIONS * K
    assert not list((out / "scratch").rglob("*.png"))  # returned images cleared after each batch

    sft = SFTJobConfig(
        data=DataConfig(sft=str(out / "trajectories.jsonl")), sft=SFTConfig(batch_size=4, max_steps=2),
        logger=LoggerConfig(mode="disabled"), run=RunConfig(out_dir=str(tmp_path / "sft")),
    )
    checkpoint = train_sft(sft)
    metrics = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["data/samples"] == 8 and not any(key.startswith("data/dropped") for key in metrics[0])
    assert [m["step"] for m in metrics if "sft/loss" in m] == [1, 2]
    assert (checkpoint / "config.json").is_file()


@pytest.mark.slow
def test_a_judge_grades_instead_of_the_rule(sample_data, records, tmp_path):
    """With synth.grader=judge the teacher endpoint's verdict decides: here it accepts every
    answer, so the wrong ones (attempt 2, no tool either) are dropped as no_tool, not unverified."""
    with ScriptedTeacher(KEY, script(records), judge="Judgement: 1") as teacher:
        summary = run_synthesis(synth_config(sample_data, tmp_path, teacher.url, grader="judge"), progress=False)
    dropped = summary["total"]["dropped"]
    assert "unverified" not in dropped and dropped["no_tool"] == 12 and summary["total"]["kept"] == EXPECTED["kept"]
    # Judged: every well-formed answer (not the failed request, the bad format nor the missing answer).
    assert summary["judge_this_run"] == {"judged": teacher.judged} and teacher.judged == 21


@pytest.mark.slow
def test_interrupted_synthesis_resumes_without_duplicates(sample_data, records, tmp_path):
    out = tmp_path / "synth"
    cfg = synth_config(sample_data, out, None)
    with ScriptedTeacher(KEY, script(records), refuse_after=9) as teacher:  # the key is revoked mid-run
        cfg.teacher.base_url = teacher.url
        with pytest.raises(TeacherRefused, match="401"):
            run_synthesis(cfg, progress=False)
    rows = [json.loads(line) for line in (out / "attempts.jsonl").read_text().splitlines()]
    finished = {row["id"] for row in rows if row["outcome"] != "teacher_error"}  # a failed request is retried
    assert 0 < len(finished) < QUESTIONS * K
    # The run also died between writing a trajectory and its attempt row, then mid-line.
    orphan = next(f"{r.id}#{a}" for r in reversed(records) for a in range(K) if f"{r.id}#{a}" not in finished)
    with open(out / "trajectories.jsonl", "a") as trajectories:
        trajectories.write(json.dumps({"id": orphan, "messages": [], "images": []}) + "\n")
        trajectories.write('{"id": "torn')

    with ScriptedTeacher(KEY, script(records)) as teacher:
        cfg.teacher.base_url = teacher.url
        summary = run_synthesis(cfg, progress=False)
    asked = {f"{records[index].id}#{attempt}" for index in range(QUESTIONS) for attempt in range(K)
             if teacher.seen[episode_seed(0, 0, index, attempt, 0)]}
    assert asked == {f"{r.id}#{a}" for r in records for a in range(K)} - finished  # only what was left

    ids = attempt_ids(out / "attempts.jsonl")
    assert len(ids) == len(set(ids)) == QUESTIONS * K
    kept = [r.id for r in read_sft_records(out / "trajectories.jsonl")]  # the orphan and the torn line are gone
    assert len(kept) == len(set(kept)) == EXPECTED["kept"]
    assert {key: summary["total"][key] for key in ("kept", "dropped")} == EXPECTED


def test_synthesis_refuses_to_pretend_it_submits_to_slurm(sample_data, tmp_path):
    cfg = synth_config(sample_data, tmp_path, "http://127.0.0.1:9/v1")
    cfg.cluster.name = "slurm"
    with pytest.raises(ValueError, match="inside an allocation"):
        run_synthesis(cfg, progress=False)
