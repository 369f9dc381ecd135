"""The learning proof: cold-start SFT then GRPO teach the tiny model to use the right tool.

Runs the learning recipe exactly as a user would (README, "Learning proof"):

    python jobs/sft.py  +experiment=learning_sft
    python jobs/rl.py   +experiment=learning_rl run.init_from=<sft checkpoint>
    python jobs/eval.py +experiment=learning_eval ckpt=<checkpoint>       # before SFT, after SFT, after RL

and reports, on held-out tasks at each stage: format validity, accuracy per family, tool calls per
trajectory by family and tool kind, and wall time. The cold start is deliberately imperfect (half
the perception trajectories answer without a tool), so what RL adds is measured against the SFT
checkpoint it starts from, in the same run. The plot (RL reward and tool calls per step, as the
paper's Figure 8) lands in <out>/eval_after_rl/plots/training_curves.png; the last line is
`RESULT {json}`.

With several seeds (`--seeds 0,1,2`) each seed is a whole run (its own SFT, RL and evaluations, in
<out>/seed-N); the result has every seed's stages and checks, the spread (min, median, max over the
seeds) of each metric, how many seeds pass each check, and `all_seeds_pass`. `--smoke` runs a tiny
shape (a few steps and questions, one seed) that checks the script runs; it claims no learning.

    python bench/learning.py [--out DIR] [--seeds 0,1,2] [--sft-steps 300] [--rl-steps 8] [--eval-questions 48] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deepeyes.allocator import allocator_env
from deepeyes.train.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
STAGES = ("before_sft", "after_sft", "after_rl")
# The tool a family's questions need, as deepeyes.eval.tool_use classifies calls.
RIGHT_TOOL = {"perception": "crop", "arithmetic": "numerical", "lookup": "text_search"}
TARGETS = {"format_after_sft": 0.95, "gain_points": 20.0, "total_s": 15 * 60}


def run_job(job: str, run_dir: Path, overrides: list[str]) -> tuple[float, float]:
    """`python jobs/<job>.py <overrides>` with its run directory at `run_dir`; its wall time and
    CPU time (user + system, its processes together). On a box shared with other work the wall
    time grows with the load; the CPU time much less."""
    command = [sys.executable, str(REPO / "jobs" / f"{job}.py"), *overrides, f"hydra.run.dir={run_dir}"]
    print("$", " ".join(command[1:]), flush=True)
    started, cpu_before = time.perf_counter(), _children_cpu_s()
    subprocess.run(command, cwd=REPO, check=True, env=allocator_env())
    return time.perf_counter() - started, _children_cpu_s() - cpu_before


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stage_summary(report: dict) -> dict:
    """What one evaluation says about learning: format, accuracy and tool calls per family."""
    families = {}
    for family, m in report["categories"].items():
        families[family] = {
            "accuracy": m["accuracy"],
            "format_rate": m["format_rate"],
            "tool_calls_per_trajectory": m["tool_calls_per_trajectory"],
            "tool_calls": {kind: count / m["n"] for kind, count in m["tool_calls"].items() if count},
        }
    return {"format_rate": report["format_rate"], "accuracy": report["accuracy"], "questions": report["questions"],
            "families": families}


def right_tool_rate(summary: dict, family: str) -> float:
    return summary["families"][family]["tool_calls"].get(RIGHT_TOOL[family], 0.0)


# --smoke: short episodes and a small GRPO step (the model after 4 SFT steps rambles to every limit).
SMOKE_ROLLOUTS = ["rollout.max_turn_tokens=24", "rollout.max_response_tokens=48", "rollout.max_turns=2"]
SMOKE_RL = [*SMOKE_ROLLOUTS, "grpo.prompts_per_step=2", "rollout.n=2"]


def run(out: Path, seed: int, sft_steps: int, rl_steps: int, eval_questions: int, smoke: bool = False) -> dict:
    common = [f"run.seed={seed}", "logger.mode=disabled"]
    evaluation = ["+experiment=learning_eval", f"benchmark.limit={eval_questions}", *common, *(SMOKE_ROLLOUTS if smoke else [])]
    wall, cpu, reports = {}, {}, {}

    def job(phase: str, name: str, run_dir: Path, overrides: list[str]) -> None:
        wall[phase], cpu[phase] = run_job(name, run_dir, overrides)

    def evaluate(stage: str, extra: list[str]) -> None:
        job(f"eval_{stage}", "eval", out / f"eval_{stage}", evaluation + extra)
        reports[stage] = stage_summary(json.loads((out / f"eval_{stage}" / "report.json").read_text())[0])

    started, load_at_start, cpu_at_start = time.perf_counter(), os.getloadavg()[0], _children_cpu_s()
    evaluate("before_sft", [])
    job("sft", "sft", out / "sft", ["+experiment=learning_sft", f"sft.max_steps={sft_steps}", *common])
    sft_ckpt = latest_checkpoint(out / "sft")
    evaluate("after_sft", [f"ckpt={sft_ckpt}"])
    job("rl", "rl", out / "rl", ["+experiment=learning_rl", f"run.init_from={sft_ckpt}", f"grpo.steps={rl_steps}", *common,
                      *(SMOKE_RL if smoke else [])])
    evaluate("after_rl", [f"ckpt={latest_checkpoint(out / 'rl')}", f"eval.training_run={out / 'rl'}"])
    wall["total"], cpu["total"] = time.perf_counter() - started, _children_cpu_s() - cpu_at_start
    return summarize(reports, wall, cpu) | {"load_avg_1m_at_start": load_at_start}


def summarize(reports: dict[str, dict], wall: dict[str, float], cpu: dict[str, float]) -> dict:
    """The result: the stages' summaries, RL's gain over SFT per family, the right tool's use,
    and the issue's targets checked."""
    after_sft, after_rl = reports["after_sft"], reports["after_rl"]
    families = sorted(after_rl["families"])
    gain = {f: 100 * (after_rl["families"][f]["accuracy"] - after_sft["families"][f]["accuracy"]) for f in families}
    right_tool = {s: {f: right_tool_rate(reports[s], f) for f in families} for s in STAGES}
    checks = {
        "format_after_sft": after_sft["format_rate"] >= TARGETS["format_after_sft"],
        # A gain counts only where the family's right tool is used at least as much after RL: a
        # model that learns to stop calling a broken tool and guess is not the effect sought.
        "gain_20_points_with_right_tool": any(
            gain[f] >= TARGETS["gain_points"] and right_tool["after_rl"][f] >= right_tool["after_sft"][f] for f in families
        ),
        "no_family_worse": min(gain.values()) >= 0.0,
        # Each family's right tool is its most used one after RL.
        "tool_choice_by_family": all(
            right_tool["after_rl"][f] > 0 and right_tool["after_rl"][f] == max(after_rl["families"][f]["tool_calls"].values())
            for f in families
        ),
        "total_under_15_min": wall["total"] <= TARGETS["total_s"],
    }
    return {
        "stages": reports,
        "gain_points_after_rl_vs_sft": gain,
        "right_tool_calls_per_trajectory": right_tool,
        "wall_s": wall,
        "cpu_s": cpu,
        "checks": checks,
        "cpus": os.cpu_count(),
        "load_avg_1m_at_end": os.getloadavg()[0],
    }


def spread(results: dict[int, dict]) -> dict:
    """Min, median and max over the seeds of every metric the per-seed results share: format and
    accuracy per stage, accuracy and right-tool calls per family and stage, RL's gain per family,
    wall times; and per check, how many seeds pass it."""
    metrics: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        metrics.setdefault(name, []).append(value)

    for result in results.values():
        for stage, summary in result["stages"].items():
            add(f"{stage}.format_rate", summary["format_rate"])
            add(f"{stage}.accuracy", summary["accuracy"])
            for family, m in summary["families"].items():
                add(f"{stage}.{family}.accuracy", m["accuracy"])
                add(f"{stage}.{family}.right_tool", result["right_tool_calls_per_trajectory"][stage][family])
        for family, points in result["gain_points_after_rl_vs_sft"].items():
            add(f"gain_points.{family}", points)
        for phase, seconds in result["wall_s"].items():
            add(f"wall_s.{phase}", seconds)
        for phase, seconds in result["cpu_s"].items():
            add(f"cpu_s.{phase}", seconds)
    checks = {name: sum(r["checks"][name] for r in results.values()) for name in next(iter(results.values()))["checks"]}
    return {
        "metrics": {name: {"min": min(v), "median": statistics.median(v), "max": max(v)} for name, v in metrics.items()},
        "seeds_passing": checks,
    }


def print_table(results: dict[int, dict], summary: dict) -> None:
    """Per seed, per stage: format and each family's accuracy / right-tool calls; then the spread."""
    for seed, result in results.items():
        for stage in STAGES:
            stage_result = result["stages"][stage]
            cells = ", ".join(
                f"{f} acc {m['accuracy']:.2f} {RIGHT_TOOL[f]} {result['right_tool_calls_per_trajectory'][stage][f]:.2f}"
                for f, m in sorted(stage_result["families"].items())
            )
            print(f"seed {seed} {stage:>10}: format {stage_result['format_rate']:.2f} | {cells}")
        times = ", ".join(f"{phase} {wall:.0f}s ({result['cpu_s'][phase]:.0f}s)" for phase, wall in result["wall_s"].items())
        print(f"seed {seed} wall (cpu): {times}; checks {result['checks']}")
    if len(results) > 1:
        for name, m in summary["metrics"].items():
            print(f"spread {name}: min {m['min']:.2f} median {m['median']:.2f} max {m['max']:.2f}")
        print(f"seeds passing each check (of {len(results)}): {summary['seeds_passing']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a fresh temporary one)")
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds, one whole run each (default 0)")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--rl-steps", type=int, default=8)
    parser.add_argument("--eval-questions", type=int, default=48, help="held-out questions, balanced over families")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape that checks the script runs (no learning claim)")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    if args.smoke:
        seeds, args.sft_steps, args.rl_steps, args.eval_questions = seeds[:1], 4, 1, 3
    out = (args.out or Path(tempfile.mkdtemp(prefix="deepeyes-learning-"))).resolve()
    results = {}
    for seed in seeds:
        seed_out = out / f"seed-{seed}" if len(seeds) > 1 else out
        results[seed] = run(seed_out, seed, args.sft_steps, args.rl_steps, args.eval_questions, args.smoke)
        results[seed]["training_curves"] = str(seed_out / "eval_after_rl" / "plots" / "training_curves.png")
    summary = spread(results)
    print_table(results, summary)
    result = {
        "seeds": seeds,
        "per_seed": {str(seed): r for seed, r in results.items()},
        "per_seed_checks": {str(seed): r["checks"] for seed, r in results.items()},
        "spread": summary["metrics"],
        "seeds_passing": summary["seeds_passing"],
        "all_seeds_pass": all(all(r["checks"].values()) for r in results.values()),
        "smoke": args.smoke,
        "shape": {"sft_steps": args.sft_steps, "rl_steps": args.rl_steps, "eval_questions": args.eval_questions},
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
