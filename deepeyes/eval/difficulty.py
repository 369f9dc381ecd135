"""The difficulty filter (DeepEyesV2 data curation): which questions are worth training on.

The base model answers every question k times with its tools. Questions it solves more than
`max_passes` times are too easy and dropped. Of the rest, those it solved at least once *with*
a tool call go to RL (the tools make them solvable); the others — never solved, or solved only
without tools — go to cold-start trajectory generation.

Writes into the output directory:
    rl.jsonl, cold_start.jsonl, too_easy.jsonl   Record files; metadata gains pass_count, k,
                                                 passes_with_tools, tool_calls
    pass_counts.jsonl                            one row per question: id, data_source, family,
                                                 pass_count, passes_with_tools, tool_calls, split
    summary.json                                 counts per split, per data source and per family
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.runtime import AgentRuntime, build_engine, build_toolbox, episode_limits, run_scored
from deepeyes.agent.tool_session import clear_scratch
from deepeyes.config import FilterJobConfig, FilterConfig, RewardConfig, RolloutConfig
from deepeyes.data import write_records
from deepeyes.data.schema import Record
from deepeyes.eval.tool_use import tool_kinds
from deepeyes.train.setup import data_paths, load_policy, question_records, seed_everything

log = logging.getLogger(__name__)

SPLITS = ("rl", "cold_start", "too_easy")


@dataclass(frozen=True)
class Verdict:
    record: Record
    pass_count: int  # rollouts with accuracy 1
    passes_with_tools: int  # of those, rollouts that called a tool
    tool_calls: int  # over all k rollouts
    split: str  # one of SPLITS


def split_of(pass_count: int, passes_with_tools: int, max_passes: int) -> str:
    if pass_count > max_passes:
        return "too_easy"
    return "rl" if passes_with_tools > 0 else "cold_start"


def judge(
    runtime: AgentRuntime,
    records: Sequence[Record],
    cfg: FilterConfig,
    rollout_cfg: RolloutConfig,
    reward_cfg: RewardConfig,
    seed: int = 0,
    after_batch: Callable[[], None] = lambda: None,
) -> list[Verdict]:
    """k scored rollouts per question, `prompts_per_batch` questions at a time; a verdict each.
    `after_batch` runs after each batch (the job frees the batch's cached pixels there)."""
    limits = episode_limits(rollout_cfg)
    verdicts = []
    for batch, start in enumerate(range(0, len(records), cfg.prompts_per_batch)):
        chunk = records[start : start + cfg.prompts_per_batch]
        trajectories = run_scored(runtime, chunk, cfg.k, limits, seed, reward_cfg, step=batch)
        clear_scratch(runtime.toolbox.scratch_root)
        after_batch()
        for group, record in enumerate(chunk):
            mine = [t for t in trajectories if t.group == group]
            passed = [t for t in mine if t.accuracy >= 1.0]
            with_tools = sum(1 for t in passed if tool_kinds(t))
            calls = sum(len(tool_kinds(t)) for t in mine)
            verdicts.append(Verdict(record, len(passed), with_tools, calls, split_of(len(passed), with_tools, cfg.max_passes)))
        log.info("filtered %d/%d questions", len(verdicts), len(records))
    return verdicts


def summarize(verdicts: Sequence[Verdict], k: int, max_passes: int) -> dict[str, Any]:
    """Counts per split overall, per data source and per family, with the mean pass rate and
    pass@k (the share of questions solved at least once)."""

    def counts(group: Sequence[Verdict]) -> dict[str, Any]:
        row: dict[str, Any] = {"questions": len(group)}
        row.update({split: sum(1 for v in group if v.split == split) for split in SPLITS})
        row["mean_pass_rate"] = sum(v.pass_count for v in group) / (k * len(group)) if group else 0.0
        row["pass_at_k"] = sum(1 for v in group if v.pass_count) / len(group) if group else 0.0
        return row

    by_source, by_family = defaultdict(list), defaultdict(list)
    for verdict in verdicts:
        by_source[verdict.record.data_source].append(verdict)
        by_family[verdict.record.family].append(verdict)
    return {
        "k": k,
        "max_passes": max_passes,
        "total": counts(verdicts),
        "pass_count_histogram": {str(p): sum(1 for v in verdicts if v.pass_count == p) for p in range(k + 1)},
        "by_data_source": {source: counts(group) for source, group in sorted(by_source.items())},
        "by_family": {family: counts(group) for family, group in sorted(by_family.items())},
    }


def write_outputs(out_dir: Path, verdicts: Sequence[Verdict], k: int, max_passes: int) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        kept = [
            replace(v.record, metadata={**v.record.metadata, "pass_count": v.pass_count, "k": k,
                                        "passes_with_tools": v.passes_with_tools, "tool_calls": v.tool_calls})
            for v in verdicts if v.split == split
        ]
        write_records(out_dir / f"{split}.jsonl", kept)
    with open(out_dir / "pass_counts.jsonl", "w", encoding="utf-8") as out:
        for v in verdicts:
            out.write(json.dumps({
                "id": v.record.id, "data_source": v.record.data_source, "family": v.record.family,
                "pass_count": v.pass_count, "passes_with_tools": v.passes_with_tools, "tool_calls": v.tool_calls,
                "split": v.split,
            }) + "\n")
    summary = summarize(verdicts, k, max_passes)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def run_filter(cfg: FilterJobConfig) -> dict[str, Any]:
    """The filter job on this machine; returns the summary (also in <out_dir>/summary.json)."""
    out_dir = Path(cfg.run.out_dir)
    seed_everything(cfg.run.seed)
    paths = data_paths(cfg.data, cfg.tools)
    source, records = question_records(cfg.data, cfg.filter.input, cfg.filter.limit)
    policy = load_policy(cfg.model, cfg.ckpt)
    toolbox = build_toolbox(cfg.tools, paths.corpus, paths.image_index, out_dir / "scratch", None, policy,
                            cfg.model.max_trajectory_pixels, source)
    runtime = AgentRuntime(
        build_engine(policy, cfg.rollout), ChatEncoder(policy.tokenizer, policy.pixels.tokens), toolbox, cfg.protocol.variant
    )
    try:
        verdicts = judge(runtime, records, cfg.filter, cfg.rollout, cfg.reward, cfg.run.seed, policy.pixels.release)
    finally:
        toolbox.close()  # stops the sandbox daemon this job started
    summary = write_outputs(out_dir, verdicts, cfg.filter.k, cfg.filter.max_passes)
    total = summary["total"]
    log.info("filter %s: %d questions → rl %d, cold_start %d, too_easy %d (out: %s)", source, total["questions"],
             total["rl"], total["cold_start"], total["too_easy"], out_dir)
    return summary
