"""Sandboxes on every node, on the real local Slurm cluster: an RL step on four nodes spreads its
code sessions over the sandbox daemons of several nodes (each node's daemon on its own port)."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from deepeyes.cache import build_once, cache_root
from tests.paths import REPO, TOY_RL

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

CODE_TURN = "<think>look</think>\n<code>\n```python\nprint(image_1.size)\n```\n</code>"


def code_writing_sft_data(sample_data, path: Path) -> Path:
    """Four sample cold-start trajectories with every model turn replaced by a code cell."""
    rows = []
    for line in sample_data.sft_train.read_text().splitlines()[:4]:
        row = json.loads(line)
        messages = row["messages"][:4] + [{"role": "assistant", "content": CODE_TURN}]
        messages[2] = {"role": "assistant", "content": CODE_TURN}
        image_count = sum(m["content"].count("<image>") for m in messages)
        images = [str(sample_data.sft_train.parent / image) for image in row["images"]][:image_count]
        rows.append({**row, "messages": messages, "images": images})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def code_writing_model(sample_data):
    """The tiny model after 40 SFT steps on code-only turns: it writes a cell in every turn (a
    random one never does). Built once into the cache (minutes on a 2-core box)."""

    recipe = ["trainer=hf", "optim.lr=3e-3", "sft.epochs=100", "sft.max_steps=40", "sft.batch_size=4",
              "sft.micro_batch_size=4", "logger.mode=disabled"]

    def build(staging: Path) -> None:
        data = code_writing_sft_data(sample_data, staging / "code_sft.jsonl")
        sft = subprocess.run(
            [sys.executable, "jobs/sft.py", *recipe, f"data.sft={data}", f"hydra.run.dir={staging / 'sft'}"],
            cwd=REPO, capture_output=True, text=True, timeout=3600,
        )
        assert sft.returncode == 0, sft.stdout[-3000:] + sft.stderr[-3000:]

    digest = hashlib.sha256(json.dumps([CODE_TURN, recipe]).encode()).hexdigest()[:12]
    return build_once(cache_root() / "models" / f"code-writing-tiny-{digest}", build) / "sft"


def test_an_rl_step_on_four_nodes_uses_the_sandboxes_of_several(code_writing_model, tmp_path):
    rl = subprocess.run(
        [sys.executable, "jobs/rl.py", *TOY_RL, "cluster=slurm", "cluster.wait=true", "nodes=4", "cluster.gpus_per_node=1",
         "cluster.cpus_per_node=2", "trainer=hf", f"run.init_from={code_writing_model}", "grpo.steps=1",
         "grpo.prompts_per_step=2", "rollout.n=4", "rollout.max_turns=2", "rollout.max_turn_tokens=48",
         "rollout.temperature=0.3", "tools.code.max_sessions=2", "model.threads=1", "logger.mode=disabled",
         f"hydra.run.dir={tmp_path / 'rl'}"],
        cwd=REPO, capture_output=True, text=True, timeout=1800,
    )
    assert rl.returncode == 0, rl.stdout[-3000:] + rl.stderr[-3000:]
    (run,) = (tmp_path / "rl" / "launch").glob("run_*")
    opened = {}
    for node in range(4):
        log = (run / f"sandbox_node{node}.log").read_text()
        opened[node] = int(log.split("'sessions_opened': ")[1].split(",")[0].rstrip("}")) if "'sessions_opened'" in log else 0
    assert sum(count > 0 for count in opened.values()) >= 2, opened  # sessions on several nodes' daemons
    metrics = json.loads((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["tools/code_calls"] > 0
