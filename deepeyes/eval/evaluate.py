"""The evaluation job: the training agent loop over a benchmark, scored, reported and plotted.

    records ─ run_scored (same engine, tools and loop as RL) ─ grade ─ metrics ─ report.json,
    report.md, predictions.jsonl, plots/*.png, wandb (scalars + a table of sample trajectories)

With `benchmark.tools=false` the model gets a single turn: it must answer without calling a tool
(the system prompt is the same; a tool call in that turn ends the episode unanswered).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.runtime import AgentRuntime, build_engine, build_toolbox, episode_limits, run_scored
from deepeyes.agent.tool_session import clear_scratch
from deepeyes.agent.trajectory import Trajectory
from deepeyes.cache import cache_root
from deepeyes.config import EvalJobConfig, RewardConfig, RolloutConfig
from deepeyes.eval.benchmarks import Benchmark, load_benchmark
from deepeyes.eval.metrics import benchmark_metrics, flat_metrics, markdown_table
from deepeyes.eval.plots import plot_tool_distribution, plot_tool_use_share, plot_training_curves
from deepeyes.eval.tool_use import tool_kinds
from deepeyes.reward import Grader, accuracy
from deepeyes.train.run_logger import RunLogger
from deepeyes.train.setup import data_paths, load_policy, seed_everything

log = logging.getLogger(__name__)

# eval.grader → how a final answer is scored. An LLM judge client registers here next to "rule".
GRADERS: dict[str, Grader] = {"rule": accuracy}


def evaluate(
    runtime: AgentRuntime,
    benchmark: Benchmark,
    tools: bool,
    rollout_cfg: RolloutConfig,
    reward_cfg: RewardConfig,
    n: int = 1,
    seed: int = 0,
    grader: Grader = accuracy,
    temperature: float | None = None,
    questions_per_batch: int = 64,
    after_batch: Callable[[], None] = lambda: None,
) -> tuple[dict[str, Any], list[Trajectory]]:
    """Run and score every question of the benchmark n times, `questions_per_batch` questions at a
    time (`after_batch` runs after each); (metrics, trajectories). `temperature` overrides the
    rollout config's (0 = greedy)."""
    limits = episode_limits(rollout_cfg, max_turns=None if tools else 1)
    if temperature is not None:
        limits = replace(limits, temperature=temperature)
    trajectories: list[Trajectory] = []
    records = benchmark.records
    for batch, start in enumerate(range(0, len(records), questions_per_batch)):
        chunk = records[start : start + questions_per_batch]
        trajectories += run_scored(runtime, chunk, n, limits, seed, reward_cfg, grader, step=batch)
        after_batch()
    for t in trajectories:
        # A question with several accepted answers (MMSearch) is right when any of them matches.
        alternatives = t.record.metadata.get("alternative_answers") or []
        if t.accuracy < 1.0 and t.answer is not None and alternatives:
            t.accuracy = max([t.accuracy] + [grader(t.answer, alternative) for alternative in alternatives])
    return benchmark_metrics(benchmark.name, trajectories, tools, benchmark.skipped), trajectories


def write_report(out_dir: Path, all_metrics: list[dict[str, Any]]) -> dict[str, Path]:
    """report.json, report.md (the table) and the analysis plots; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"report_json": out_dir / "report.json", "report_md": out_dir / "report.md"}
    paths["report_json"].write_text(json.dumps(all_metrics, indent=1) + "\n")
    paths["report_md"].write_text(markdown_table(all_metrics))
    paths["tool_use_share"] = plot_tool_use_share(all_metrics, out_dir / "plots" / "tool_use_share.png")
    paths["tool_distribution"] = plot_tool_distribution(all_metrics, out_dir / "plots" / "tool_distribution.png")
    return paths


def combine_reports(sweep_dir: Path) -> dict[str, Path]:
    """One report and one set of plots over every run under `sweep_dir` (a multirun over
    benchmarks), next to them; runs are ordered by directory name."""
    sweep_dir = Path(sweep_dir)
    runs = sorted(path for path in sweep_dir.glob("*/report.json"))
    if not runs:
        raise FileNotFoundError(f"no */report.json under {sweep_dir}")
    return write_report(sweep_dir, [m for run in runs for m in json.loads(run.read_text())])


class CombineReports(Callback):
    """Hydra callback (conf/eval.yaml): after `python jobs/eval.py -m benchmark=a,b,...`, the
    benchmarks' reports are combined in the sweep directory."""

    def on_multirun_end(self, config, **kwargs) -> None:
        paths = combine_reports(Path(config.hydra.sweep.dir))
        log.info("combined report: %s", paths["report_md"])


def write_predictions(path: Path, trajectories: list[Trajectory]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for t in trajectories:
            row = {
                "id": t.record.id, "benchmark": t.record.data_source, "category": t.record.metadata.get("category", t.record.family),
                "ground_truth": t.record.answer, "answer": t.answer, "accuracy": t.accuracy, "format": t.format,
                "finish": t.finish, "tool_kinds": tool_kinds(t), "model_turns": t.model_turns,
            }
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def trajectory_table(trajectories: list[Trajectory], encoder: ChatEncoder, rows: int) -> tuple[list[str], list[list]]:
    """Columns and rows for wandb: the question image, what the model wrote (code included), what
    the tools answered, the last image a tool returned, and the scores."""
    columns = ["id", "category", "image", "model_turns", "observations", "tool_image", "answer", "ground_truth",
               "accuracy", "reward"]
    table = []
    for t in trajectories[:rows]:
        observations, span = [], []
        for token, trained in zip(t.response_ids, t.loss_mask):
            if not trained:
                span.append(token)
            elif span:
                observations.append(encoder.decode(span))
                span = []
        if span:
            observations.append(encoder.decode(span))
        returned = t.images[len(t.record.images):]
        table.append([
            t.record.id, t.record.metadata.get("category", t.record.family),
            t.record.images[0] if t.record.images else None, "\n\n---\n\n".join(t.model_turns),
            "\n\n---\n\n".join(observations), returned[-1] if returned else None, t.answer, t.record.answer,
            t.accuracy, t.reward,
        ])
    return columns, table


def run_eval(cfg: EvalJobConfig) -> dict[str, Any]:
    """The eval job on this machine; returns the benchmark's metrics (also in <out_dir>/report.json)."""
    out_dir = Path(cfg.run.out_dir)
    seed_everything(cfg.run.seed)
    paths = data_paths(cfg.data, cfg.tools)
    bench_cfg = cfg.benchmark
    questions = Path(bench_cfg.path or paths.test)
    benchmark = load_benchmark(
        bench_cfg.name, bench_cfg.format, questions,
        Path(bench_cfg.image_root) if bench_cfg.image_root else None,
        cache_root() / "benchmark_images", bench_cfg.on_bad_record,  # content-addressed: shared by runs
    )
    if bench_cfg.limit:
        benchmark.records = benchmark.records[: bench_cfg.limit]
    log.info("benchmark %s: %d questions (%d bad rows skipped)", benchmark.name, len(benchmark.records), benchmark.skipped)

    policy = load_policy(cfg.model, cfg.ckpt)
    encoder = ChatEncoder(policy.tokenizer, policy.pixels.tokens)
    toolbox = build_toolbox(cfg.tools, paths.corpus, paths.image_index, out_dir / "scratch", None, policy,
                            cfg.model.max_trajectory_pixels, questions)
    runtime = AgentRuntime(build_engine(policy, cfg.rollout), encoder, toolbox, cfg.protocol.variant)
    try:
        metrics, trajectories = evaluate(
            runtime, benchmark, bench_cfg.tools, cfg.rollout, cfg.reward, cfg.eval.n, cfg.run.seed,
            GRADERS[cfg.eval.grader], cfg.eval.temperature, cfg.eval.questions_per_batch, policy.pixels.release,
        )
    finally:
        toolbox.close()  # stops the sandbox daemon this job started
    write_predictions(out_dir / "predictions.jsonl", trajectories)
    report = write_report(out_dir, [metrics])
    if cfg.eval.training_run:
        report["training_curves"] = plot_training_curves(
            Path(cfg.eval.training_run) / "metrics.jsonl", out_dir / "plots" / "training_curves.png"
        )

    logger = RunLogger(cfg.logger, cfg, out_dir, job="eval")
    try:
        logger.log(flat_metrics(metrics), step=0)
        logger.log_table(f"eval/{benchmark.name}/trajectories", *trajectory_table(trajectories, encoder, cfg.eval.table_rows), step=0)
        plots = [name for name in ("tool_use_share", "tool_distribution", "training_curves") if name in report]
        logger.log_images({f"eval/{benchmark.name}/{name}": report[name] for name in plots}, step=0)
    finally:
        logger.finish()
        clear_scratch(toolbox.scratch_root)
    log.info("%s accuracy %.3f over %d samples; report in %s", benchmark.name, metrics["accuracy"],
             metrics["samples"], report["report_md"])
    return metrics
