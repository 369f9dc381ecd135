"""Launching jobs: the launch plan (roles on nodes), Slurm submission and the node agent; the top
of the house (it calls the trainers and starts the services, which never import it).
`launch(job, cfg)` is what the job scripts call."""

from deepeyes.launch.launcher import launch
from deepeyes.launch.plan import LaunchPlan, Role, build_plan

__all__ = ["LaunchPlan", "Role", "build_plan", "launch"]
