"""The trainer role: `python -m deepeyes.launch.trainer LAUNCH_DIR` runs the job's training loop
with the resolved config the launcher wrote there (LAUNCH_DIR/config.yaml).

It exits with REQUEUE_EXIT_CODE when it stopped for preemption after saving a checkpoint; a
rerun in the same run.out_dir resumes from that checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

from omegaconf import OmegaConf

from deepeyes.config import RLJobConfig, SFTJobConfig, to_object
from deepeyes.launch.plan import LaunchPlan
from deepeyes.launch.preemption import REQUEUE_EXIT_CODE, STOP_SIGNAL, Preempted

SCHEMAS = {"rl": RLJobConfig, "sft": SFTJobConfig}


def load_job_config(launch_dir: Path):
    """The job's typed config as the launcher resolved it at submission."""
    plan = LaunchPlan.from_json((launch_dir / "plan.json").read_text())
    merged = OmegaConf.merge(OmegaConf.structured(SCHEMAS[plan.job]), OmegaConf.load(launch_dir / "config.yaml"))
    return plan.job, to_object(merged)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    # Until the training loop takes SIGUSR2 (at its first step), a stop signal would kill the
    # process while loading; there is nothing to checkpoint yet, so it is ignored instead.
    signal.signal(STOP_SIGNAL, signal.SIG_IGN)
    launch_dir = Path((argv or sys.argv[1:])[0])
    job, cfg = load_job_config(launch_dir)
    sandboxes = json.loads(os.environ.get("DEEPEYES_SERVICES", "{}")).get("sandbox")
    if sandboxes:  # this node's daemon, started by the node agent
        cfg.tools.code.url, cfg.tools.code.token_file = sandboxes[0], os.environ["DEEPEYES_TOKEN_FILE"]
    try:
        if job == "rl":
            from deepeyes.train.grpo import train_grpo

            train_grpo(cfg)
        else:
            from deepeyes.train.sft import train_sft

            train_sft(cfg)
    except Preempted as stop:
        logging.getLogger(__name__).warning("preempted: %s", stop)
        return REQUEUE_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
