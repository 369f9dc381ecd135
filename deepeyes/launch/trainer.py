"""The trainer role: `python -m deepeyes.launch.trainer LAUNCH_DIR` runs the job's training loop
with the resolved config the launcher wrote there (LAUNCH_DIR/config.yaml).

Under the node agent it starts while the services are still loading: it does its imports, then
waits until every node is ready. It exits with REQUEUE_EXIT_CODE when it stopped for
preemption after saving a checkpoint; a rerun in the same run.out_dir resumes from there.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from deepeyes.config import RLJobConfig, SFTJobConfig, to_object
from deepeyes.launch.agent import wait_for_all_nodes
from deepeyes.launch.logs import setup_logging
from deepeyes.launch.plan import LaunchPlan
from deepeyes.train.preemption import REQUEUE_EXIT_CODE, Preempted

SCHEMAS = {"rl": RLJobConfig, "sft": SFTJobConfig}
TRAINING_LOOPS = {"rl": ("deepeyes.train.rl", "train_grpo"), "sft": ("deepeyes.train.sft", "train_sft")}

log = logging.getLogger(__name__)


def load_job(launch_dir: Path):
    """The plan and the job's typed config, as the launcher resolved it at submission."""
    plan = LaunchPlan.from_json((launch_dir / "plan.json").read_text())
    merged = OmegaConf.merge(OmegaConf.structured(SCHEMAS[plan.job]), OmegaConf.load(launch_dir / "config.yaml"))
    return plan, to_object(merged)


def run_training(job: str, cfg) -> int:
    """The job's training loop in this process: 0 when it finished, REQUEUE_EXIT_CODE when it
    stopped on the stop signal after saving a checkpoint."""
    module, function = TRAINING_LOOPS[job]
    try:
        getattr(importlib.import_module(module), function)(cfg)
    except Preempted as stop:
        log.warning("preempted: %s", stop)
        return REQUEUE_EXIT_CODE
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    launch_dir = Path((argv or sys.argv[1:])[0])
    plan, cfg = load_job(launch_dir)
    importlib.import_module(TRAINING_LOOPS[plan.job][0])  # seconds of imports, while the services load
    wait_for_all_nodes(Path(os.environ["DEEPEYES_RUN_DIR"]), plan.nodes, plan.ready_timeout_s)
    sandboxes = json.loads(os.environ.get("DEEPEYES_SERVICES", "{}")).get("sandbox")
    if sandboxes:  # every node's daemon, started by the node agents
        cfg.tools.code.urls, cfg.tools.code.token_file = sandboxes, os.environ["DEEPEYES_TOKEN_FILE"]
    return run_training(plan.job, cfg)


if __name__ == "__main__":
    sys.exit(main())
