"""The metrics mirror of a resumed run holds each step once."""

import json

from deepeyes.config import LoggerConfig, RLJobConfig
from deepeyes.train.run_logger import RunLogger


def test_a_resumed_run_drops_the_rows_logged_after_its_checkpoint(tmp_path):
    mirror = tmp_path / "metrics.jsonl"
    mirror.write_text("".join(json.dumps({"step": step, "reward/mean": step / 10}) + "\n" for step in range(1, 5)))
    # stopped after logging step 4; the newest checkpoint holds step 2, so steps 3 and 4 are redone
    logger = RunLogger(LoggerConfig(mode="disabled"), RLJobConfig(), tmp_path, job="rl", run_id="abc", resumed_at=2)
    logger.log({"reward/mean": 0.9}, step=3)
    logger.finish()
    rows = [json.loads(line) for line in mirror.read_text().splitlines()]
    assert [(row["step"], row["reward/mean"]) for row in rows] == [(1, 0.1), (2, 0.2), (3, 0.9)]
