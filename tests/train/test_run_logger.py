"""The run logger: a resumed run's metrics mirror holds each step once, wandb's history keeps
every step after a requeue (redone steps included), tables carry their images, and the run
says where it is (URL, or the `wandb sync` command when offline)."""

import json
import subprocess
import sys

from PIL import Image

from deepeyes.config import LoggerConfig, RLJobConfig
from deepeyes.train.run_logger import STEP_METRIC, RunLogger
from tests.wandb_files import artifact_files, history, run_files, run_groups


def test_a_resumed_run_drops_the_rows_logged_after_its_checkpoint(tmp_path):
    mirror = tmp_path / "metrics.jsonl"
    mirror.write_text("".join(json.dumps({"step": step, "reward/mean": step / 10}) + "\n" for step in range(1, 5)))
    # stopped after logging step 4; the newest checkpoint holds step 2, so steps 3 and 4 are redone
    logger = RunLogger(LoggerConfig(mode="disabled"), RLJobConfig(), tmp_path, job="rl", run_id="abc", resumed_at=2)
    logger.log({"reward/mean": 0.9}, step=3)
    logger.finish()
    rows = [json.loads(line) for line in mirror.read_text().splitlines()]
    assert [(row["step"], row["reward/mean"]) for row in rows] == [(1, 0.1), (2, 0.2), (3, 0.9)]


ATTEMPT = """
import logging
import sys
from pathlib import Path
from deepeyes.config import LoggerConfig, RLJobConfig
from deepeyes.train.run_logger import RunLogger

logging.basicConfig(level=logging.INFO)
out_dir, run_id, resumed_at, first, last, offset = sys.argv[1:]
logger = RunLogger(LoggerConfig(mode="offline", group="sweep-x"), RLJobConfig(), Path(out_dir), job="rl",
                   run_id=run_id if run_id != "-" else None, resumed_at=int(resumed_at))
for step in range(int(first), int(last) + 1):
    logger.log({"reward/mean": step / 10 + float(offset)}, step=step)
logger.finish()
print(logger.run_id)
"""


def attempt(out_dir, run_id: str, resumed_at: int, first: int, last: int, offset: float) -> subprocess.CompletedProcess:
    """One run of the job's logging, in its own process as each Slurm attempt is."""
    return subprocess.run([sys.executable, "-c", ATTEMPT, str(out_dir), run_id, str(resumed_at), str(first), str(last),
                           str(offset)], capture_output=True, text=True, check=True, timeout=120)


def test_after_a_requeue_the_wandb_history_has_every_step(tmp_path):
    first = attempt(tmp_path, "-", 0, 1, 4, 0)  # preempted after step 4; the newest checkpoint holds step 2
    run_id = first.stdout.split()[-1]
    second = attempt(tmp_path, run_id, 2, 3, 5, 1)  # the requeued job redoes steps 3 and 4, then goes on
    assert len(run_files(tmp_path)) == 2 and run_groups(tmp_path) == {"sweep-x"}
    rows = [row for row in history(tmp_path) if "reward/mean" in row]
    assert sorted({row[STEP_METRIC] for row in rows}) == [1, 2, 3, 4, 5]
    last = {row[STEP_METRIC]: row["reward/mean"] for row in rows}  # the redone steps' values win
    assert last == {1: 0.1, 2: 0.2, 3: 1.3, 4: 1.4, 5: 1.5}
    run_dir = run_files(tmp_path)[-1].parent
    assert f"offline; upload with `wandb sync {run_dir}`" in second.stderr


TABLE = """
import logging
import sys
from pathlib import Path
from deepeyes.config import LoggerConfig, RLJobConfig
from deepeyes.train.run_logger import RunLogger

logging.basicConfig(level=logging.INFO)
out_dir = Path(sys.argv[1])
logger = RunLogger(LoggerConfig(mode="offline"), RLJobConfig(), out_dir, job="rl")
rows = [["q1", out_dir / "crop.png", "code"], ["q2", out_dir / "cleared.png", "code"]]  # the second is gone
logger.log_table("rollouts/samples", ["id", "image", "tool_calls"], rows, step=7)
logger.finish()
"""


def test_a_table_logs_its_images_at_the_training_step_and_leaves_a_vanished_one_empty(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "crop.png")
    # Its own process, as a job's: in a process that already ran a wandb run, a second offline
    # run sometimes writes nothing past its header (wandb 0.31).
    done = subprocess.run([sys.executable, "-c", TABLE, str(tmp_path)], check=True, timeout=120, capture_output=True,
                          text=True)
    assert "1 image(s) no longer on disk, left empty" in done.stderr
    (row,) = [row for row in history(tmp_path) if "rollouts/samples" in row]
    assert row[STEP_METRIC] == 7 and row["rollouts/samples"]["_type"] == "table-file"
    (files,) = artifact_files(tmp_path).values()  # offline, wandb keeps a table's cells in an artifact
    assert sorted(path.rsplit("/", 1)[-1] for path in files) == ["crop.png", "samples.table.json"]
