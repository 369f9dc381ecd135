"""Scores per benchmark and category, RealX-Bench capability scores, and tool-use statistics."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from deepeyes.agent.trajectory import Trajectory
from deepeyes.eval.benchmarks import CAPABILITIES
from deepeyes.eval.tool_use import TOOL_KINDS, tool_kinds


def benchmark_metrics(name: str, trajectories: list[Trajectory], tools: bool, skipped: int = 0) -> dict[str, Any]:
    """Accuracy and format validity overall and per category (mean over every sample of every
    question), per RealX-Bench capability tag and on the questions tagged with all three, and how
    tools were used, overall and per category."""
    by_category: dict[str, list[Trajectory]] = defaultdict(list)
    by_capability: dict[str, list[float]] = defaultdict(list)
    for t in trajectories:
        by_category[t.record.metadata.get("category", t.record.family)].append(t)
        tags = t.record.metadata.get("capabilities")
        if tags:
            for tag in tags:
                by_capability[tag].append(t.accuracy)
            if set(CAPABILITIES) <= set(tags):
                by_capability["all_three"].append(t.accuracy)
    metrics = {
        "benchmark": name,
        "tools": tools,
        "questions": len({t.record.id for t in trajectories}),
        "samples": len(trajectories),
        "skipped_rows": skipped,
        "accuracy": _mean([t.accuracy for t in trajectories]),
        "format_rate": _mean([t.format for t in trajectories]),
        "categories": {c: _category(v) for c, v in sorted(by_category.items())},
        **tool_use(trajectories),
    }
    if by_capability:
        metrics["capabilities"] = {c: {"n": len(v), "accuracy": _mean(v)} for c, v in sorted(by_capability.items())}
    return metrics


def _category(trajectories: list[Trajectory]) -> dict[str, Any]:
    calls = tool_use(trajectories)
    return {
        "n": len(trajectories),
        "accuracy": _mean([t.accuracy for t in trajectories]),
        "format_rate": _mean([t.format for t in trajectories]),
        "tool_calls_per_trajectory": calls["tool_calls_per_trajectory"],
        "tool_calls": calls["tool_calls"],
    }


def tool_use(trajectories: list[Trajectory]) -> dict[str, Any]:
    """Among answered trajectories, the share that called a tool (and each side's accuracy);
    calls per trajectory; and the calls by kind."""
    answered = [t for t in trajectories if t.answer is not None]
    with_tools = [t for t in answered if tool_kinds(t)]
    without = [t for t in answered if not tool_kinds(t)]
    kinds = {kind: 0 for kind in TOOL_KINDS}
    for t in trajectories:
        for kind in tool_kinds(t):
            kinds[kind] += 1
    return {
        "answered": len(answered),
        "answers_with_tools": len(with_tools) / len(answered) if answered else 0.0,
        "answers_without_tools": len(without) / len(answered) if answered else 0.0,
        "accuracy_with_tools": _mean([t.accuracy for t in with_tools]),
        "accuracy_without_tools": _mean([t.accuracy for t in without]),
        "tool_calls_per_trajectory": sum(kinds.values()) / len(trajectories) if trajectories else 0.0,
        "tool_calls": kinds,
    }


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """`eval/<benchmark>/...` scalars for wandb and metrics.jsonl."""
    prefix = f"eval/{metrics['benchmark']}"
    flat = {f"{prefix}/accuracy": metrics["accuracy"], f"{prefix}/answers_with_tools": metrics["answers_with_tools"],
            f"{prefix}/tool_calls_per_trajectory": metrics["tool_calls_per_trajectory"]}
    for group in ("categories", "capabilities"):
        for key, value in metrics.get(group, {}).items():
            flat[f"{prefix}/{group}/{key}"] = value["accuracy"]
    for kind, count in metrics["tool_calls"].items():
        flat[f"{prefix}/tool_calls/{kind}"] = count
    return flat


def markdown_table(all_metrics: list[dict[str, Any]]) -> str:
    """One row per benchmark, category and capability: what a paper's table shows."""
    lines = ["| benchmark | tools | subset | n | accuracy (%) | answers with tools (%) |", "|---|---|---|---|---|---|"]
    for m in all_metrics:
        on = "on" if m["tools"] else "off"
        lines.append(f"| {m['benchmark']} | {on} | all | {m['samples']} | {100 * m['accuracy']:.1f} | "
                     f"{100 * m['answers_with_tools']:.1f} |")
        for group in ("categories", "capabilities"):
            for key, value in m.get(group, {}).items():
                lines.append(f"| {m['benchmark']} | {on} | {key} | {value['n']} | {100 * value['accuracy']:.1f} | |")
    return "\n".join(lines) + "\n"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
