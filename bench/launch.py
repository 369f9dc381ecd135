"""Submit → first RL step completed on the local Slurm cluster, broken into its parts.

    python bench/launch.py            # brings the local cluster up (root) if it is not answering
    python bench/launch.py --smoke    # the Slurm job alone, without the baselines

`python jobs/rl.py cluster=slurm nodes=2` (tiny model, one GRPO step) is timed from the moment
the command starts to the moment step 1's rollouts are written, in parts:

    submit        compose the config, plan, `sbatch --test-only`, submitit's sbatch (job id known)
    queue_wait    job id known → node agent running on its node
    service_start node agent running → every service ready on every node (the rollout server on
                  node 1, search, sandboxes); the trainer does its imports meanwhile
    model_load    every service ready → first step begins (model, data, optimizer)
    first_step    the first GRPO step (rollout + update)

Baselines measured in the same run: the same job with `cluster=local` (the trainer in this
process's child, no Slurm; time to step 1), and a trivial submitit job (submit → result: the
floor of any Slurm round trip here). Target: total ≤ 30 s for the tiny model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The tiny model with random weights, a rollout server and the megatron trainer (the embedded default
# starts from the cold start, minutes of SFT to build, and generates in the trainer's process).
JOB = ["model=tiny", "data=sample", "rollout=hf", "trainer=megatron",
       "grpo.steps=1", "grpo.prompts_per_step=2", "rollout.n=2", "rollout.max_turn_tokens=32", "model.threads=1"]


def run_job(out_dir: Path, *overrides: str) -> tuple[float, float]:
    """Run jobs/rl.py to the end; (seconds from its start to step 1's rollouts written, its start time)."""
    started = time.time()
    subprocess.run(
        [sys.executable, "jobs/rl.py", *JOB, *overrides, f"hydra.run.dir={out_dir}"],
        cwd=REPO, check=True, capture_output=True, text=True,
    )
    return (out_dir / "rollouts" / "step_000001.jsonl").stat().st_mtime - started, started


def trivial_submitit_round_trip(folder: Path) -> float:
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(nodes=1, tasks_per_node=1, timeout_min=5)
    started = time.time()
    job = executor.submit(sum, [1, 2])
    while not job.done(force_check=True):
        time.sleep(0.1)
    assert job.result() == 3
    return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the Slurm job alone, no baselines: checks the script runs")
    args = parser.parse_args()
    subprocess.run(["bash", str(REPO / "scripts" / "slurm_cluster.sh"), "up"], check=True)
    with tempfile.TemporaryDirectory(prefix="bench_launch_") as tmp:
        tmp = Path(tmp)
        floor = float("nan") if args.smoke else trivial_submitit_round_trip(tmp / "trivial")
        local_total = float("nan") if args.smoke else run_job(tmp / "local")[0]

        slurm_dir = tmp / "slurm"
        slurm_total, started = run_job(slurm_dir, "cluster=slurm", "nodes=2", "cluster.wait=true",
                                       "cluster.gpus_per_node=2", "cluster.cpus_per_node=2")
        launch = slurm_dir / "launch"
        submitted = (launch / "slurm_job_id").stat().st_mtime
        nodes = [json.loads(p.read_text()) for p in launch.glob("run_*/node_*.json")]
        agent_start = min(n["timings"]["agent_start"] for n in nodes)
        services_ready = max(n["timings"]["services_ready"] for n in nodes)
        first_metrics = json.loads((slurm_dir / "metrics.jsonl").read_text().splitlines()[0])
        step_end = (slurm_dir / "rollouts" / "step_000001.jsonl").stat().st_mtime
        first_step = first_metrics["timing/step_s"]
        parts = {
            "submit_s": submitted - started,
            "queue_wait_s": agent_start - submitted,
            "service_start_s": services_ready - agent_start,
            "model_load_s": step_end - first_step - services_ready,
            "first_step_s": first_step,
        }
    for name, seconds in parts.items():
        print(f"{name:<16} {seconds:6.1f} s")
    print(f"{'total':<16} {slurm_total:6.1f} s   (local, no Slurm: {local_total:.1f} s; trivial submitit job: {floor:.1f} s)")
    result = {
        "slurm_submit_to_first_step_s": round(slurm_total, 2),
        **{k: round(v, 2) for k, v in parts.items()},
        **({} if args.smoke else {
            "local_to_first_step_s": round(local_total, 2),
            "trivial_submitit_job_s": round(floor, 2),
            "slurm_vs_local_ratio": round(slurm_total / local_total, 3),
        }),
        "target_s": 30,
        "meets_target": slurm_total <= 30,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
