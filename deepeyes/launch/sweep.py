"""Sweeps on Slurm: `python jobs/rl.py -m cluster=slurm optim.lr=1e-6,2e-6`.

Hydra's basic launcher runs the job function once per member in this process; each member goes
through `launch` as a single job does — its plan, resolved config, token and sbatch script
written, checked by the plan and by `sbatch --test-only` — and is kept here instead of being
submitted. Once every member is planned (a bad member stops the sweep before anything is
queued), `SlurmSweep` submits them: members whose sbatch options are the same go as one Slurm
array of the same node-agent job, with the same container, requeue, memory and preemption
handling (SIGUSR2 → checkpoint → requeue → exact resume) as a single job. With
`cluster.wait=true` it waits for all of them and lists their results in member order.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from deepeyes.config import ClusterConfig
from deepeyes.launch.plan import LaunchPlan

log = logging.getLogger(__name__)


@dataclass
class SweepMember:
    number: int  # hydra.job.num
    overrides: list[str]
    plan: LaunchPlan
    cluster: ClusterConfig
    launch_dir: Path


_planned: list[SweepMember] = []


def plan_member(member: SweepMember) -> None:
    """Keep a planned, checked member for submission when the sweep has been planned."""
    _planned.append(member)
    print(f"sweep member {member.number} ({' '.join(member.overrides)}): planned and checked", flush=True)


class SlurmSweep(Callback):
    """Submits the planned members at the end of the sweep (see the module docstring)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        members = sorted(_planned, key=lambda member: member.number)
        _planned.clear()
        if not members:
            return
        try:
            submit_sweep(members, Path(config.hydra.sweep.dir))
        except Exception as error:
            # Hydra turns a callback's exception into a warning and exits 0; a failed sweep must not.
            raise SystemExit(f"sweep failed: {error}") from error


def submit_sweep(members: list[SweepMember], sweep_dir: Path) -> None:
    from deepeyes.launch.slurm import SlurmNodeJob, python_command, sbatch_parameters, slurm_executor, wait

    groups: dict[str, list[SweepMember]] = {}
    for member in members:  # one array per set of identical sbatch options
        key = json.dumps([sbatch_parameters(member.plan, member.cluster), python_command(member.cluster),
                          member.cluster.max_requeues], sort_keys=True)
        groups.setdefault(key, []).append(member)
    jobs = {}
    for group in groups.values():
        executor = slurm_executor(group[0].plan, group[0].cluster, sweep_dir / ".submitit")
        with executor.batch():
            submitted = [executor.submit(SlurmNodeJob(member.launch_dir)) for member in group]
        for member, job in zip(group, submitted):
            (member.launch_dir / "slurm_job_id").write_text(job.job_id)
            jobs[member.number] = job
    for member in members:
        print(f"sweep member {member.number}: submitted Slurm job {jobs[member.number].job_id}; "
              f"logs in {member.launch_dir}", flush=True)
    if not all(member.cluster.wait for member in members):
        return
    failed = []
    for member in members:
        try:
            summaries = wait(jobs[member.number], member.launch_dir)
        except RuntimeError as error:
            failed.append(f"sweep member {member.number} ({' '.join(member.overrides)}): {error}")
            continue
        trainer = next(s for s in summaries if s["node"] == 0)
        print(f"sweep member {member.number} ({' '.join(member.overrides)}): done, trainer exit code "
              f"{trainer['trainer_exit_code']}, results in {member.launch_dir.parent}", flush=True)
    if failed:
        raise RuntimeError("\n".join(failed))
