"""Launching jobs: the launch plan (roles on nodes), Slurm submission, the node agent,
service lifecycle and preemption. `launch(job, cfg)` is what the job scripts call."""

from deepeyes.launch.launcher import launch
from deepeyes.launch.plan import LaunchPlan, Role, build_plan

__all__ = ["LaunchPlan", "Role", "build_plan", "launch"]
