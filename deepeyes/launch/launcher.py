"""What `jobs/rl.py` and `jobs/sft.py` call: validate the config, build the launch plan, then run
the job here (`cluster=local`) or submit it to Slurm (`cluster=slurm`).

Everything that can be checked is checked before anything is queued: the typed config (a typo
in a key fails at composition), the plan (nodes, GPUs, memory estimate) and the sbatch script
(`sbatch --test-only`: partition, account, QOS, resources). A sweep's members go the same way,
then are submitted together (deepeyes.launch.sweep).

    LAUNCH_DIR = <run.out_dir>/launch/
        plan.json, config.yaml (resolved), service_token (0600), job.sbatch, slurm_job_id
        sbatch_logs/                the agents' output when job.sbatch is submitted by hand
        submitit/<job id>/          submitit's pickles and the node agents' stdout/stderr
        run_<job id>_<restart>/     per-node markers and summaries, one log per role
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from deepeyes.config import to_object
from deepeyes.launch.logs import setup_logging
from deepeyes.launch.plan import LaunchPlan, build_plan
from deepeyes.launch.trainer import run_training
from deepeyes.service import new_token_file

log = logging.getLogger(__name__)


def launch(job: str, cfg: DictConfig) -> None:
    setup_logging()
    sweep = _group_sweep_runs(cfg)
    typed = to_object(cfg)
    if typed.cluster.name == "local" and not typed.cluster.dry_run:
        exit_code = run_training(job, typed)  # REQUEUE_EXIT_CODE after a SIGUSR2 checkpoint
        if exit_code:
            sys.exit(exit_code)
        return
    launch_dir = Path(typed.run.out_dir).resolve() / "launch"
    if not typed.cluster.dry_run:
        _cold_start_before_queueing(cfg, typed)
    plan = write_launch_dir(job, cfg, typed, launch_dir)
    print(plan.describe())
    if typed.cluster.name == "local":  # a dry run of the local plan
        return

    from deepeyes.launch.slurm import check_with_slurm, render_sbatch, submit, wait

    script = launch_dir / "job.sbatch"
    script.write_text(render_sbatch(plan, typed.cluster, launch_dir))
    if typed.cluster.dry_run:
        print(f"\n# sbatch script ({script}; submit by hand with `sbatch {script}`):\n{script.read_text()}")
        return
    check_with_slurm(script)
    if sweep:  # submitted with the other members once the sweep is planned (deepeyes.launch.sweep)
        from deepeyes.launch.sweep import SweepMember, plan_member

        hydra = HydraConfig.get()
        plan_member(SweepMember(int(hydra.job.num), list(hydra.overrides.task), plan, typed.cluster, launch_dir))
        return
    job_handle = submit(plan, typed.cluster, launch_dir)
    (launch_dir / "slurm_job_id").write_text(job_handle.job_id)
    print(f"submitted Slurm job {job_handle.job_id}; each role logs to {launch_dir}/run_{job_handle.job_id}_<restart>/"
          f"<its log in the plan above>, the node agents to {launch_dir}/submitit/")
    if typed.cluster.wait:
        for summary in wait(job_handle, launch_dir):
            print(f"node {summary['node']} ({summary['slurmd_nodename']}): {', '.join(summary['roles']) or '-'}")


def write_launch_dir(job: str, cfg: DictConfig, typed, launch_dir: Path) -> LaunchPlan:
    """The plan, the resolved config and a fresh token, where every node can read them."""
    launch_dir.mkdir(parents=True, exist_ok=True)
    plan = build_plan(job, typed, launch_dir)
    (launch_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    new_token_file(launch_dir)
    (launch_dir / "plan.json").write_text(plan.to_json())
    return plan


def _cold_start_before_queueing(cfg: DictConfig, typed) -> None:
    """With `model.cold_start` (the embedded default), the tiny model's cold start is minutes of
    SFT: it is built (or found in the cache) here, before the job waits in the queue, as the plan
    finds the tiny model, and the job's nodes load it as `model.path` instead of racing to build it."""
    model = typed.model
    if not model.cold_start or model.path or typed.run.init_from:
        return
    from deepeyes.train.cold_start import ensure_cold_start_checkpoint

    model.path = str(ensure_cold_start_checkpoint())
    with open_dict(cfg):
        cfg.model.path = model.path


def _group_sweep_runs(cfg: DictConfig) -> bool:
    """True in a sweep, whose runs share a wandb group (unless the config names one)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    if OmegaConf.select(cfg, "logger.group") is None:
        with open_dict(cfg):
            cfg.logger.group = "sweep-" + Path(HydraConfig.get().sweep.dir).name
    return True
