"""Slurm through submitit: one job for the whole plan, one task (the node agent) per node.

The executor's parameters are the single source of the sbatch header: submitit renders them for
its own submission, and `render_sbatch` renders them around the agent command for users who
submit by hand (`sbatch LAUNCH_DIR/job.sbatch`).
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import DelayedSubmission
from submitit.slurm.slurm import _make_sbatch_string

from deepeyes.config import ClusterConfig
from deepeyes.launch.agent import NodeAgent, failure_messages
from deepeyes.launch.logs import setup_logging
from deepeyes.launch.plan import LaunchPlan

log = logging.getLogger(__name__)


def sbatch_parameters(plan: LaunchPlan, cluster: ClusterConfig) -> dict[str, Any]:
    """The job's sbatch options, in submitit's SlurmExecutor parameter names."""
    optional = {
        "partition": cluster.partition, "account": cluster.account, "qos": cluster.qos,
        "constraint": cluster.constraint, "cpus_per_task": cluster.cpus_per_node or None,
        "gpus_per_node": cluster.gpus_per_node or None,
    }
    return dict(
        job_name=f"deepeyes-{plan.job}",
        nodes=plan.nodes,
        ntasks_per_node=1,  # the node agent; it starts the node's roles itself
        time=cluster.time_min,
        mem=f"{cluster.mem_gb}G" if cluster.mem_gb else "0",  # 0 = all of the node's memory
        signal_delay_s=cluster.signal_delay_s,
        srun_args=["--kill-on-bad-exit=1"],  # one failed node agent ends the others
        additional_parameters={"requeue": True, **{k: v if v != "" else True for k, v in cluster.sbatch_extra.items()}},
        **{key: value for key, value in optional.items() if value is not None},
    )


def python_command(cluster: ClusterConfig) -> str:
    """How every node starts Python: in the job's container when it names one."""
    if not cluster.container_image:
        return shlex.quote(sys.executable)
    binds = f" --bind {shlex.quote(','.join(cluster.container_binds))}" if cluster.container_binds else ""
    return f"apptainer exec --nv{binds} {shlex.quote(cluster.container_image)} python3"


def slurm_executor(plan: LaunchPlan, cluster: ClusterConfig, folder: Path) -> submitit.SlurmExecutor:
    """submitit's executor for the job (it needs Slurm's client: `srun` on PATH)."""
    executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=cluster.max_requeues,
                                      python=python_command(cluster))
    executor.update_parameters(**sbatch_parameters(plan, cluster))
    return executor


def render_sbatch(plan: LaunchPlan, cluster: ClusterConfig, launch_dir: Path) -> str:
    """A plain sbatch script running the node agent on every node, with the header submitit
    writes for the same parameters; needs no Slurm binaries (a dry run works anywhere)."""
    command = f"{python_command(cluster)} -m deepeyes.launch.agent {shlex.quote(str(launch_dir))}"
    logs = launch_dir / "sbatch_logs"  # Slurm does not create the directory of --output
    logs.mkdir(parents=True, exist_ok=True)
    script = _make_sbatch_string(command=command, folder=logs, **sbatch_parameters(plan, cluster))
    described = "".join(f"# {line}\n" for line in plan.describe().splitlines())
    return script.replace("\n# command\n", f"\n# What the node agent starts on each node (plan.json):\n{described}\n# command\n", 1)


def check_with_slurm(script: Path) -> None:
    """`sbatch --test-only`: Slurm itself checks partition, account, QOS and resources; nothing is queued."""
    result = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f"Slurm refuses this job (sbatch --test-only {script}): {result.stderr.strip()}")


class SlurmNodeJob:
    """What submitit runs on each node: the node agent. On SIGUSR2, submitit calls `checkpoint`,
    which lets the trainer save its step before the job is requeued."""

    def __init__(self, launch_dir: Path):
        self.launch_dir = launch_dir
        self._agent: NodeAgent | None = None

    def __call__(self) -> dict:
        setup_logging()
        self._agent = NodeAgent.from_launch_dir(self.launch_dir)
        return self._agent.run()

    def checkpoint(self) -> DelayedSubmission:
        if self._agent is not None:
            # Leave 10 s of the warning for the requeue itself.
            saved = self._agent.stop_trainer_for_requeue(max(self._agent.plan.signal_delay_s - 10, 5))
            log.warning("requeueing; the trainer %s", "saved a checkpoint" if saved else "did not checkpoint")
        return DelayedSubmission(SlurmNodeJob(self.launch_dir))

    def __getstate__(self) -> dict:
        return {"launch_dir": self.launch_dir, "_agent": None}


def submit(plan: LaunchPlan, cluster: ClusterConfig, launch_dir: Path) -> submitit.Job:
    return slurm_executor(plan, cluster, launch_dir / "submitit").submit(SlurmNodeJob(launch_dir))


def pending_reason(job_id: str) -> str:
    """Why Slurm keeps a job waiting (Resources, Priority, ReqNodeNotAvail, ...), as squeue says it."""
    result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%r"], capture_output=True, text=True)
    return result.stdout.strip() or "reason unknown"


def wait(job: submitit.Job, launch_dir: Path, poll_s: float = 1.0) -> list[dict]:
    """Block until the job ends; its per-node summaries, or an error with what the nodes reported."""
    last_state = None
    while not job.done(force_check=True):  # one sacct call per poll; submitit alone backs off to minutes
        state = job.state
        if state == "PENDING":
            state = f"PENDING ({pending_reason(job.job_id)})"
        if state != last_state:
            log.info("job %s: %s", job.job_id, state)
            last_state = state
        time.sleep(poll_s)
    try:
        return job.results()
    except Exception as error:  # submitit's own error says little when a node agent was killed
        reports = failure_messages(launch_dir)
        detail = "\n".join(reports) if reports else str(error)
        raise RuntimeError(f"Slurm job {job.job_id} failed ({job.state}): {detail}") from error
