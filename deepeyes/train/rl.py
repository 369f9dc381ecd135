"""The RL job: build the trainer for the configured backend, then step, log and checkpoint.

`train_grpo` is the whole job and reads top to bottom; one step is `GRPOTrainer.step`
(deepeyes.train.grpo, the plain-PyTorch reference) or its megatron-core twin
(deepeyes.train.megatron.grpo). This module sits above both, so neither imports the other's job.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rich.console import Console

from deepeyes.agent.chat import ChatEncoder
from deepeyes.agent.trajectory import Trajectory
from deepeyes.config import RLJobConfig
from deepeyes.train.checkpoint import latest_checkpoint
from deepeyes.train.grpo import GRPOTrainer, rollout_side, write_rollouts
from deepeyes.train.preemption import Preempted, StopSignal
from deepeyes.train.run_logger import RunLogger
from deepeyes.train.setup import (
    build_optimizer,
    load_policy,
    seed_everything,
    set_learning_rate,
)

log = logging.getLogger(__name__)


def build_trainer(cfg: RLJobConfig, out_dir: Path, init_from: str | None) -> GRPOTrainer:
    """Policy, optimizer and the rollout side, wired together (the megatron backend: see
    deepeyes.train.megatron.grpo.build_megatron_trainer)."""
    # Megatron ranks read their own slices of the checkpoint; the leader (global rank 0) also keeps
    # the whole HF model, which its rollout side generates from or publishes.
    leader = int(os.environ.get("RANK", "0")) == 0
    policy = load_policy(cfg.model, init_from, weights=cfg.trainer.backend != "megatron" or leader)
    if cfg.trainer.backend == "megatron":
        from deepeyes.train.megatron.grpo import (
            build_megatron_trainer,  # imports megatron-core only when asked for
        )

        return build_megatron_trainer(cfg, out_dir, policy)
    return GRPOTrainer(cfg, policy, build_optimizer(policy.model, cfg.optim), **rollout_side(cfg, out_dir, policy))


def clear_weights_after(root: Path, version: int) -> None:
    """Remove the weight versions an earlier attempt published past `version` (this run restarts
    from scratch or from an older checkpoint): the files of its own versions must never be
    mistaken for them, nor pruned as older than them."""
    for path in root.glob("weights_v*"):
        if int(path.name.split(".")[0].removeprefix("weights_v")) > version:
            path.unlink(missing_ok=True)
            log.info("removed %s, published past step %d by an earlier attempt", path.name, version)


def sample_table(trajectories: list[Trajectory], encoder: ChatEncoder, rows: int) -> tuple[list[str], list[list]]:
    """A few of the step's trajectories, spread over its prompts, as a wandb table: the evaluation
    job's columns (question image, model turns, tool output, the last image a tool returned,
    answer, scores) and the tool calls with how they ended."""
    from deepeyes.eval.evaluate import trajectory_table  # the same table the evaluation logs

    picked = trajectories[:: max(len(trajectories) // rows, 1)][:rows]
    columns, table = trajectory_table(picked, encoder, rows)
    calls = [", ".join(f"{c.tool}{'' if c.ok else ' (failed)'}" for c in t.tool_calls) or "-" for t in picked]
    return columns + ["tool_calls"], [row + [call] for row, call in zip(table, calls)]


def train_grpo(cfg: RLJobConfig) -> Path:
    """The RL job on this machine; returns the final checkpoint directory.

    A run restarted in the same `run.out_dir` resumes from its latest checkpoint: weights,
    optimizer, data position, RNG and the wandb run.
    """
    out_dir = Path(cfg.run.out_dir)
    seed_everything(cfg.run.seed)
    resume = latest_checkpoint(out_dir)
    trainer = build_trainer(cfg, out_dir, str(resume) if resume else cfg.run.init_from)
    start, run_id = 0, None
    if resume is not None:
        state = trainer.restore(resume)
        start, run_id = state.step, state.run_id
        log.info("resuming from %s at step %d", resume, start)
    if trainer.leader:
        clear_weights_after(out_dir / "weights", start)
    # Servers may have started from another checkpoint (the launcher's model path, or before a
    # resume): from here on they serve the trainer's weights, labelled with its step.
    trainer.publish_weights(start, everything=True)
    logger = RunLogger(cfg.logger, cfg, out_dir, job="rl", run_id=run_id, resumed_at=start) if trainer.leader else None
    console = Console(soft_wrap=True)  # no line breaks at 80 columns in a Slurm log (not a TTY)
    checkpoint = resume
    first = last_metrics = None
    stop = StopSignal.install()  # Slurm's SIGUSR2: checkpoint at the end of this step, then stop for a requeue
    try:
        for step in range(start, cfg.grpo.steps):
            set_learning_rate(trainer.optimizer, cfg.optim, step, cfg.grpo.steps)
            metrics, trajectories = trainer.step(step)
            first, last_metrics = first or (step + 1, metrics), (step + 1, metrics)
            if logger is not None:
                logger.log(metrics, step=step + 1)
                write_rollouts(out_dir / "rollouts" / f"step_{step + 1:06d}.jsonl", trajectories)
                if cfg.logger.table_every and (step == start or (step + 1) % cfg.logger.table_every == 0):
                    columns, rows = sample_table(trajectories, trainer.encoder, cfg.logger.table_rows)
                    logger.log_table("rollouts/samples", columns, rows, step=step + 1)
                console.print(
                    f"[bold]step {step + 1}/{cfg.grpo.steps}[/] reward {metrics['reward/mean']:.3f} "
                    f"acc {metrics['reward/accuracy']:.3f} format {metrics['reward/format_rate']:.3f} "
                    f"code {metrics['tools/code_calls']:.2f} search {metrics['tools/search_calls']:.2f} "
                    f"img {metrics['tools/image_search_calls']:.2f} turns {metrics['rollout/turns']:.2f} "
                    f"({metrics['timing/step_s']:.1f}s)"
                )
            last = step + 1 == cfg.grpo.steps
            stopping = trainer.agree(stop.requested)
            if last or stopping or (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0):
                checkpoint = trainer.save(out_dir, step + 1, logger and logger.run_id)
                log.info("saved %s", checkpoint)
            if stopping and not last:
                raise Preempted(f"stopped after step {step + 1} on the stop signal; resume from {checkpoint}")
    finally:
        stop.restore()
        if logger is not None:
            logger.finish()
        trainer.close()  # publishes in flight, then the service processes this run started
    if logger is not None and first is not None:
        console.print(what_moved(first, last_metrics))
    return checkpoint


# What the end-of-run summary compares (a step's rollouts: rewards and tool calls per trajectory).
WATCHED = {"reward": "reward/mean", "accuracy": "reward/accuracy", "format": "reward/format_rate",
           "code calls": "tools/code_calls", "searches": "tools/search_calls", "image searches": "tools/image_search_calls"}


def what_moved(first: tuple[int, dict], last: tuple[int, dict]) -> str:
    """The run's first and last step side by side: the watched metrics, and the accuracy of each
    task family both steps sampled. One step's few prompts are noisy; the per-step log has all."""
    (first_step, before), (last_step, after) = first, last
    watched = dict(WATCHED)
    for key in sorted(before):
        if key.startswith("accuracy/") and key in after:
            watched[f"{key.removeprefix('accuracy/')} accuracy"] = key
    moved = ", ".join(f"{name} {before[key]:.2f} -> {after[key]:.2f}" for name, key in watched.items())
    return f"[bold]step {first_step} -> step {last_step}:[/] {moved}"
