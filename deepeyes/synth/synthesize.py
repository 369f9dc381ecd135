"""Cold-start trajectory synthesis: a teacher solves the questions with our tools; verified
trajectories become SFT records (DeepEyesV2 builds its cold-start set this way).

Each question gets k attempts through the RL agent loop (same protocol, sandbox, search and
limits) with the teacher as the policy (`deepeyes.synth.teacher`). An attempt is kept when the
teacher gave an answer, in valid format, graded correct (rule-based accuracy, or the judge),
and — with `synth.require_tool` — after at least one tool call that ran without error.
Every other attempt is dropped and counted by its reason (DROP_REASONS). Writes into the output
directory:

    trajectories.jsonl  the kept trajectories as SFT records (deepeyes.data.schema.SFTRecord),
                        id "<question id>#<attempt>"; images the tools returned are copied to images/
    attempts.jsonl      one row per finished attempt: outcome, tool kinds, turns, teacher tokens
    summary.json        per data source and per family: attempted, kept, dropped by reason, tool
                        mix, teacher tokens (`summarize`)

A run restarted in the same directory resumes: attempts with a row are not run again (an attempt
whose teacher request failed is), and trajectories without a finished attempt row (the run died
between the two writes) are dropped first, so no trajectory is written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.loop import EpisodeLimits, episode_seed, run_episode
from deepeyes.agent.protocol import SYSTEM_PROMPT, user_prompt
from deepeyes.agent.runtime import build_toolbox, episode_limits
from deepeyes.agent.tool_session import Toolbox, clear_scratch
from deepeyes.agent.trajectory import Trajectory
from deepeyes.config import SynthJobConfig, TeacherConfig
from deepeyes.data import IMAGE_PLACEHOLDER, Message, Record, SFTRecord
from deepeyes.data.writers import sft_record_row
from deepeyes.eval.tool_use import tool_kinds
from deepeyes.service import LocalService, free_port, local_services, new_token_file, read_token
from deepeyes.model import ensure_tiny_model, load_processor
from deepeyes.model.pixels import PixelCache
from deepeyes.progress import progress_bar
from deepeyes.reward import compute_reward
from deepeyes.synth.teacher import ChatJudge, TeacherClient, TeacherEngine, TeacherError
from deepeyes.train.setup import data_paths, question_records, seed_everything

log = logging.getLogger(__name__)

KEPT = "kept"
# Why an attempt was dropped, in the order they are checked.
DROP_REASONS = ("teacher_error", "no_answer", "bad_format", "unverified", "no_tool", "malformed")
STEP = 0  # synthesis is one "step" of the agent loop: seeds and sandbox sessions are per (question, attempt),
# the same whichever batch an attempt runs in (so a resumed run asks the teacher exactly the same)


@dataclass(frozen=True)
class Attempt:
    index: int  # the question's position in the input: names its seeds and sandbox sessions
    record: Record
    attempt: int

    @property
    def id(self) -> str:
        return f"{self.record.id}#{self.attempt}"


# ---- the outputs, appended as attempts finish, and how a restart reads them back --------------


class SynthesisOutput:
    """trajectories.jsonl, attempts.jsonl and images/ of one run directory."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.trajectories = self.out_dir / "trajectories.jsonl"
        self.attempts = self.out_dir / "attempts.jsonl"
        self.images = self.out_dir / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.rows = self._resume()
        self.kept = sum(1 for row in self.rows.values() if row["outcome"] == KEPT)
        self._trajectories = open(self.trajectories, "a", encoding="utf-8")
        self._attempts = open(self.attempts, "a", encoding="utf-8")

    def _resume(self) -> dict[str, dict[str, Any]]:
        """The finished attempts (by id) of an earlier run, after dropping its unfinished writes:
        a torn last line, a failed teacher request (tried again), a trajectory without its row."""
        rows = {row["id"]: row for row in _json_lines(self.attempts) if row.get("outcome") != "teacher_error"}
        kept = {id_ for id_, row in rows.items() if row["outcome"] == KEPT}
        trajectories: dict[str, dict[str, Any]] = {}
        for row in _json_lines(self.trajectories):
            if row.get("id") in kept:
                trajectories.setdefault(row["id"], row)
        missing = kept - trajectories.keys()
        for id_ in missing:  # a kept row without its trajectory cannot happen (written first); redo it
            del rows[id_]
        _rewrite(self.attempts, rows.values())
        _rewrite(self.trajectories, trajectories.values())
        if rows:
            log.info("resuming %s: %d attempts done (%d kept)", self.out_dir, len(rows), len(trajectories))
        return rows

    def add(self, row: dict[str, Any], record: SFTRecord | None) -> None:
        """The trajectory first, then its attempt row: a restart trusts only trajectories with a row."""
        if record is not None:
            _append(self._trajectories, sft_record_row(record, self.trajectories))
        _append(self._attempts, row)
        self.rows[row["id"]] = row
        self.kept += row["outcome"] == KEPT

    def close(self) -> None:
        self._trajectories.close()
        self._attempts.close()


def _json_lines(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            try:
                yield json.loads(line)
            except ValueError:
                log.warning("%s:%d: unreadable line (a write cut off by the interruption); dropped", path, number)


def _rewrite(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    partial = path.with_suffix(".rewrite")
    with open(partial, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.replace(path)


def _append(file, row: dict[str, Any]) -> None:
    file.write(json.dumps(row, ensure_ascii=False) + "\n")
    file.flush()
    os.fsync(file.fileno())


# ---- one attempt ------------------------------------------------------------------------------


def conversation(trajectory: Trajectory) -> tuple[Message, ...]:
    """The trajectory as chat messages: system, question, then model turns and tool results."""
    messages = [Message("system", SYSTEM_PROMPT), Message("user", user_prompt(trajectory.record.question))]
    for turn, text in enumerate(trajectory.model_turns):
        messages.append(Message("assistant", text))
        if turn < len(trajectory.observations):
            messages.append(Message("user", trajectory.observations[turn]))
    return tuple(messages)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def sft_record(attempt: Attempt, trajectory: Trajectory, image_dir: Path) -> SFTRecord | None:
    """The kept trajectory as an SFT record, the images tools returned copied into `image_dir`
    (the scratch is cleared after each batch). None when its text breaks the record format (a
    teacher turn that writes "<image>" itself)."""
    messages = conversation(trajectory)
    if sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages) != len(trajectory.images):
        return None
    images = list(attempt.record.images)  # the question's own files (the loop may hold copies)
    for number, source in enumerate(trajectory.images[len(attempt.record.images):], 1):
        target = image_dir / f"{_safe(attempt.id)}-{number}{source.suffix}"
        shutil.copyfile(source, target)
        images.append(target)
    return SFTRecord(attempt.id, messages, tuple(images), attempt.record.family, attempt.record.data_source)


def verdict(trajectory: Trajectory, correct: float, require_tool: bool) -> str:
    """KEPT, or the first reason in DROP_REASONS that applies."""
    if trajectory.finish != "answer":
        return "no_answer"
    if not trajectory.format:
        return "bad_format"
    if correct < 1.0:
        return "unverified"
    if require_tool and not any(call.ok and call.tool != "none" for call in trajectory.tool_calls):
        return "no_tool"
    return KEPT


class Synthesizer:
    """Runs attempts through the agent loop with the teacher and writes what they give."""

    def __init__(self, cfg: SynthJobConfig, engine: TeacherEngine, toolbox: Toolbox, output: SynthesisOutput,
                 grader=None):
        self.cfg = cfg
        self.engine = engine
        self.toolbox = toolbox
        self.output = output
        self.limits: EpisodeLimits = episode_limits(cfg.rollout)
        self.grader = grader  # async (question, prediction, ground truth) -> grade; None = rule-based

    async def run(self, attempts: Sequence[Attempt], progress: bool = True) -> None:
        slots = asyncio.Semaphore(self.cfg.synth.concurrency)
        bar = progress_bar(total=len(attempts), desc="synthesize", unit="traj", disable=not progress)

        async def one(attempt: Attempt) -> None:
            async with slots:
                row, record = await self.attempt(attempt)
            self.output.add(row, record)
            bar.update()
            bar.set_postfix(kept=self.output.kept, retries=self.engine.client.retries)

        try:
            for start in range(0, len(attempts), self.cfg.synth.attempts_per_batch):
                await asyncio.gather(*(one(a) for a in attempts[start : start + self.cfg.synth.attempts_per_batch]))
                clear_scratch(self.toolbox.scratch_root)  # returned images: the kept ones were copied out
        finally:
            bar.close()

    async def attempt(self, attempt: Attempt) -> tuple[dict[str, Any], SFTRecord | None]:
        seed = self.cfg.run.seed
        row: dict[str, Any] = {
            "id": attempt.id, "question": attempt.record.id, "attempt": attempt.attempt,
            "data_source": attempt.record.data_source, "family": attempt.record.family,
        }
        try:
            # The question's images as store copies: the sandbox reads inputs only under its store root.
            record = self.toolbox.stored(attempt.record)
            trajectory = await run_episode(record, attempt.index, attempt.attempt, STEP, seed, self.engine,
                                           self.engine.encoder, self.toolbox, self.limits, self.cfg.protocol.variant)
        except TeacherError as error:
            log.warning("%s: %s", attempt.id, error)
            row |= {"outcome": "teacher_error", "error": str(error)}  # in place: the tokens below still land in it
            return row, None
        finally:
            usage = [self.engine.usage.pop(episode_seed(seed, STEP, attempt.index, attempt.attempt, turn), (0, 0))
                     for turn in range(self.limits.max_turns)]
            row["teacher_prompt_tokens"] = sum(prompt for prompt, _ in usage)
            row["teacher_completion_tokens"] = sum(completion for _, completion in usage)
        row |= await self._judge(attempt, trajectory)
        record = sft_record(attempt, trajectory, self.output.images) if row["outcome"] == KEPT else None
        if row["outcome"] == KEPT and record is None:
            row["outcome"] = "malformed"
        return row, record

    async def _judge(self, attempt: Attempt, trajectory: Trajectory) -> dict[str, Any]:
        reward = self.cfg.reward
        result = compute_reward(trajectory.model_turns, attempt.record.answer, reward.accuracy_weight,
                                reward.format_weight)
        trajectory.format, trajectory.answer, correct = result.format, result.answer, result.accuracy
        if self.grader is not None and result.format and result.answer is not None:
            correct = await self.grader(attempt.record.question, result.answer, attempt.record.answer)
        return {
            "outcome": verdict(trajectory, correct, self.cfg.synth.require_tool),
            "answer": result.answer, "finish": trajectory.finish, "turns": len(trajectory.model_turns),
            "tools": tool_kinds(trajectory), "tool_errors": sum(1 for call in trajectory.tool_calls if not call.ok),
            "response_tokens": len(trajectory.response_ids),
        }


# ---- the summary ------------------------------------------------------------------------------


def summarize(rows: Iterable[dict[str, Any]], k: int) -> dict[str, Any]:
    """Per data source and per family: attempts, kept, dropped by reason, questions with at
    least one kept trajectory, tool mix of the kept trajectories, and teacher tokens."""

    def counts(group: list[dict[str, Any]]) -> dict[str, Any]:
        kept = [row for row in group if row["outcome"] == KEPT]
        outcomes = Counter(row["outcome"] for row in group)
        return {
            "attempted": len(group),
            "kept": len(kept),
            "kept_rate": len(kept) / len(group) if group else 0.0,
            "dropped": {reason: outcomes[reason] for reason in DROP_REASONS if outcomes[reason]},
            "questions": len({row["question"] for row in group}),
            "questions_kept": len({row["question"] for row in kept}),
            "tool_mix": dict(sorted(Counter(kind for row in kept for kind in row.get("tools", [])).items())),
            "teacher_prompt_tokens": sum(row.get("teacher_prompt_tokens", 0) for row in group),
            "teacher_completion_tokens": sum(row.get("teacher_completion_tokens", 0) for row in group),
        }

    rows = list(rows)
    by_source, by_family = defaultdict(list), defaultdict(list)
    for row in rows:
        by_source[row["data_source"]].append(row)
        by_family[row["family"]].append(row)
    return {
        "k": k,
        "total": counts(rows),
        "by_data_source": {name: counts(group) for name, group in sorted(by_source.items())},
        "by_family": {name: counts(group) for name, group in sorted(by_family.items())},
    }


# ---- the job ----------------------------------------------------------------------------------


@contextlib.contextmanager
def teacher_endpoint(cfg: SynthJobConfig, out_dir: Path) -> Iterator[tuple[str, str]]:
    """(base URL, API key) of the teacher: the configured endpoint with the key from
    `teacher.api_key_env`, or a rollout server this job starts on `teacher.checkpoint` (its
    chat-completions endpoint, the job's token as the key), stopped when the block ends."""
    teacher: TeacherConfig = cfg.teacher
    if teacher.base_url:
        key = os.environ.get(teacher.api_key_env)
        if not key:
            raise ValueError(f"teacher.base_url={teacher.base_url} needs its API key in ${teacher.api_key_env} "
                             f"(teacher.api_key_env names the variable)")
        yield teacher.base_url, key
        return
    from deepeyes.rollout.services import rollout_server_command

    token_file = new_token_file(out_dir / "services")
    port = free_port()
    checkpoint = Path(teacher.checkpoint) if teacher.checkpoint else ensure_tiny_model()
    server = LocalService("teacher", rollout_server_command(cfg, checkpoint, port, token_file, 0, cfg.rollout.server_threads),
                          port, read_token(token_file), out_dir / "services" / "teacher.log", clean_environment=True)
    with local_services([server]):
        yield server.url + "/v1", read_token(token_file)


def student_encoder(cfg: SynthJobConfig) -> tuple[ChatEncoder, Any]:
    """The student's tokenizer and image-token counts (its processor only, not its weights)."""
    processor = load_processor(Path(cfg.model.path or ensure_tiny_model()))
    pixels = PixelCache(processor.image_processor, cfg.model.min_pixels, cfg.model.max_pixels)
    return ChatEncoder(processor.tokenizer, pixels.tokens), processor.tokenizer


def run_synthesis(cfg: SynthJobConfig, progress: bool = True) -> dict[str, Any]:
    """The synthesis job on this machine; returns the summary (also <out_dir>/summary.json)."""
    if cfg.cluster.name != "local":  # as jobs/filter.py and jobs/eval.py: no launch plan of its own
        raise ValueError("jobs/synthesize.py runs where it is started: run it inside an allocation (srun) "
                         "with cluster=local, teacher.base_url pointing at the teacher's server")
    out_dir = Path(cfg.run.out_dir)
    seed_everything(cfg.run.seed)
    paths = data_paths(cfg.data, cfg.tools)
    source, records = question_records(cfg.data, cfg.synth.input, cfg.synth.limit)
    output = SynthesisOutput(out_dir)
    attempts = [
        Attempt(index, record, number) for index, record in enumerate(records) for number in range(cfg.synth.k)
        if f"{record.id}#{number}" not in output.rows
    ]
    encoder, tokenizer = student_encoder(cfg)
    log.info("synthesize %s: %d questions x %d attempts, %d to run", source, len(records), cfg.synth.k, len(attempts))
    toolbox = build_toolbox(cfg.tools, paths.corpus, paths.image_index, out_dir / "scratch", records=source)
    try:
        with teacher_endpoint(cfg, out_dir) as (base_url, key):
            judged = asyncio.run(_synthesize(cfg, base_url, key, encoder, tokenizer, toolbox, output, attempts, progress))
    finally:
        output.close()
        toolbox.close()  # stops the sandbox daemon this job started
    summary = summarize(output.rows.values(), cfg.synth.k)
    if cfg.synth.grader == "judge":
        summary["judge_this_run"] = judged  # verdicts used vs rule-based fallbacks, by reason
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    total = summary["total"]
    log.info("synthesize: kept %d of %d attempts (%s dropped); %s", total["kept"], total["attempted"],
             total["dropped"], output.trajectories)
    return summary


async def _synthesize(cfg, base_url, key, encoder, tokenizer, toolbox, output, attempts, progress) -> dict[str, int]:
    """Runs the attempts; returns the judge's counts (judged, fallback_<reason>)."""
    client = TeacherClient(cfg.teacher, base_url, key)
    engine = TeacherEngine(client, encoder, tokenizer)
    judge = ChatJudge(client, cfg.reward.judge.timeout_s, cfg.reward.judge.max_new_tokens)
    grader = judge.grade if cfg.synth.grader == "judge" else None
    try:
        await Synthesizer(cfg, engine, toolbox, output, grader).run(attempts, progress)
    finally:
        await client.close()
        await toolbox.search.close()
    return dict(judge.stats)
