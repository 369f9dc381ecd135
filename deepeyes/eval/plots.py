"""The paper's analysis figures as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from deepeyes.eval.tool_use import TOOL_KINDS  # noqa: E402


def plot_tool_use_share(all_metrics: list[dict[str, Any]], path: Path) -> Path:
    """Per benchmark, the share of answers given with and without tool use (stacked bars)."""
    names = [m["benchmark"] for m in all_metrics]
    with_tools = [100 * m["answers_with_tools"] for m in all_metrics]
    without = [100 * m["answers_without_tools"] for m in all_metrics]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 3.5))
    ax.bar(names, with_tools, 0.5, label="with tools", color="#3b75af")
    ax.bar(names, without, 0.5, bottom=with_tools, label="without tools", color="#cfcfcf")
    ax.set_ylabel("answers (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Answers with and without tool use")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)
    return _save(fig, path)


def plot_tool_distribution(all_metrics: list[dict[str, Any]], path: Path) -> Path:
    """Per benchmark, the share of tool calls of each kind (crop, numerical, mark, ...)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(1, len(all_metrics))
    for i, m in enumerate(all_metrics):
        total = sum(m["tool_calls"].values()) or 1
        shares = [100 * m["tool_calls"][kind] / total for kind in TOOL_KINDS]
        ax.bar([k + i * width for k in range(len(TOOL_KINDS))], shares, width, label=m["benchmark"])
    ax.set_xticks([k + width * (len(all_metrics) - 1) / 2 for k in range(len(TOOL_KINDS))])
    ax.set_xticklabels([kind.replace("_", " ") for kind in TOOL_KINDS], fontsize=8)
    ax.set_ylabel("tool calls (%)")
    ax.set_title("Distribution of tool calls")
    ax.legend(fontsize=8)
    return _save(fig, path)


TRAINING_CURVES = {
    "response length (tokens)": ("rollout/response_tokens",),
    "reward": ("reward/mean",),
    "tool calls per trajectory": ("tools/code_calls", "tools/search_calls", "tools/image_search_calls"),
}


def plot_training_curves(metrics_jsonl: Path, path: Path) -> Path:
    """Response length, reward and tool calls per trajectory over RL steps, from a run's
    metrics.jsonl (`deepeyes.train.run_logger`), and rollout accuracy per task family where the
    run logged it: the mix of families varies from step to step, so the mean reward alone hides
    which family improved."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "reward/mean" in row]
    if not rows:
        raise ValueError(f"{metrics_jsonl}: no RL step metrics (reward/mean) to plot")
    steps = [row["step"] for row in rows]
    families = sorted({key for row in rows for key in row if key.startswith("accuracy/")})
    panels = len(TRAINING_CURVES) + bool(families)
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3))
    for ax, (title, keys) in zip(axes, TRAINING_CURVES.items()):
        ax.plot(steps, [sum(row.get(key, 0.0) for key in keys) for row in rows], marker="o", markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    if families:
        ax = axes[-1]
        for key in families:  # a family absent from a step's prompts has no point there
            ax.plot(*zip(*[(row["step"], row[key]) for row in rows if key in row]), marker="o", markersize=3,
                    label=key.removeprefix("accuracy/"))
        ax.set_title("rollout accuracy by family", fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
