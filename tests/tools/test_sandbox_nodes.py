"""Sandboxes on every node: a job's sessions spread over the daemons of all its nodes, stay with
their trajectory, and a daemon that dies takes only its own sessions with it.

The first test runs two real daemons on this machine as two nodes would; the second runs an RL
job on the real local Slurm cluster with a model that writes code in every turn."""

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from deepeyes.service import LocalService, free_port, local_services, new_token_file, read_token
from deepeyes.tools import SandboxError, SandboxLimits, SandboxPool, daemon_command
from tests.paths import REPO

LIMITS = SandboxLimits(timeout_s=10.0)


@pytest.fixture
def two_daemons(tmp_path):
    token_file = new_token_file(tmp_path)
    services = []
    for node in range(2):
        port = free_port()
        command = daemon_command(port, token_file, tmp_path / f"node{node}", LIMITS, max_sessions=3, store_root=tmp_path)
        services.append(LocalService(f"sandbox{node}", command, port, read_token(token_file), tmp_path / f"node{node}.log"))
    with local_services(services, ready_timeout_s=120):
        yield services, read_token(token_file)


def test_sessions_spread_over_the_nodes_stay_put_and_a_dead_daemon_takes_only_its_own(two_daemons, tmp_path):
    (first, second), token = two_daemons
    pool = SandboxPool([first.url, second.url], token, max_sessions=2)
    image = tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(image)

    async def scenario():
        sessions = [pool.session([image], tmp_path) for _ in range(4)]
        await asyncio.gather(*(s.run(f"x = {i}") for i, s in enumerate(sessions)))
        spread = {url: counts["open"] for url, counts in pool.stats().items()}
        daemons = [s._daemon.url for s in sessions]
        kept = await asyncio.gather(*(s.run("print(x)") for s in sessions))
        second._signal(signal.SIGKILL)  # the second node's daemon dies (its sessions die with it)
        second.process.wait(10)
        after = []
        for session in sessions:
            try:
                after.append((await session.run("print(x)")).stdout)
            except SandboxError as error:
                after.append(type(error).__name__)
        newcomer = pool.session([image], tmp_path)
        fresh = await newcomer.run("print('new')")
        await newcomer.close()
        moved = await sessions[daemons.index(second.url)].run("print('x' in globals())")  # starts over elsewhere
        for session in sessions:
            await session.close()
        return spread, daemons, kept, after, newcomer._daemon, fresh, moved

    spread, daemons, kept, after, newcomer_daemon, fresh, moved = asyncio.run(scenario())
    assert spread == {first.url: 2, second.url: 2}  # within the pool's cap of 2 per daemon
    assert [r.stdout for r in kept] == ["0\n", "1\n", "2\n", "3\n"]  # each session stayed with its daemon
    assert after == [f"{i}\n" if url == first.url else "SandboxUnreachable" for i, url in enumerate(daemons)]
    assert pool.lost == 2 and pool.stats()[second.url]["lost"] == 2 and pool.stats()[first.url]["lost"] == 0
    assert fresh.stdout == "new\n" and moved.stdout == "False\n"
    assert newcomer_daemon.url == first.url


# ---- on the Slurm cluster ----------------------------------------------------------------------

CODE_TURN = "<think>look</think>\n<code>\n```python\nprint(image_1.size)\n```\n</code>"


def code_writing_sft_data(sample_data, path: Path) -> Path:
    """The sample cold-start trajectories with every model turn replaced by a code cell: a few
    SFT steps on them make the tiny model write code in its turns (a random one never does)."""
    rows = []
    for line in sample_data.sft_train.read_text().splitlines()[:8]:
        row = json.loads(line)
        messages = row["messages"][:4] + [{"role": "assistant", "content": CODE_TURN}]
        messages[2] = {"role": "assistant", "content": CODE_TURN}
        image_count = sum(m["content"].count("<image>") for m in messages)
        images = [str(sample_data.sft_train.parent / image) for image in row["images"]][:image_count]
        rows.append({**row, "messages": messages, "images": images})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.slow
@pytest.mark.usefixtures("slurm_cluster")
def test_an_rl_step_on_four_nodes_uses_the_sandboxes_of_several(sample_data, tmp_path):
    data = code_writing_sft_data(sample_data, tmp_path / "code_sft.jsonl")
    sft = subprocess.run(
        [sys.executable, "jobs/sft.py", "trainer=hf", f"data.sft={data}", "optim.lr=3e-3", "sft.epochs=100",
         "sft.max_steps=40", "sft.batch_size=6", "sft.micro_batch_size=6", "logger.mode=disabled",
         f"hydra.run.dir={tmp_path / 'sft'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert sft.returncode == 0, sft.stdout[-3000:] + sft.stderr[-3000:]
    rl = subprocess.run(
        [sys.executable, "jobs/rl.py", "cluster=slurm", "cluster.wait=true", "nodes=4", "cluster.gpus_per_node=1",
         "cluster.cpus_per_node=2", "trainer=hf", f"run.init_from={tmp_path / 'sft'}", "grpo.steps=1",
         "grpo.prompts_per_step=2", "rollout.n=4", "rollout.max_turns=2", "rollout.max_turn_tokens=48",
         "rollout.temperature=0.3", "tools.code.max_sessions=2", "model.threads=1", "logger.mode=disabled",
         f"hydra.run.dir={tmp_path / 'rl'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert rl.returncode == 0, rl.stdout[-3000:] + rl.stderr[-3000:]
    (run,) = (tmp_path / "rl" / "launch").glob("run_*")
    used = {}
    for node in range(4):
        log = (run / f"sandbox_node{node}.log").read_text()
        used[node] = int(log.split("sessions_opened': ")[1].split(",")[0].rstrip("}")) if "sessions_opened'" in log else 0
    assert sum(count > 0 for count in used.values()) >= 2, used
    metrics = json.loads((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["tools/code_calls"] > 0
