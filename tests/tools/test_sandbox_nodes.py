"""Sandboxes on every node: a job's sessions spread over the daemons of all its nodes, stay with
their trajectory, and a daemon that dies takes only its own sessions with it. Two real daemons
on this machine stand for two nodes (tests/launch/test_slurm_sandboxes.py runs a real RL step on
the Slurm cluster)."""

import asyncio
import signal

import pytest
from PIL import Image

from deepeyes.service import LocalService, free_port, local_services, new_token_file, read_token
from deepeyes.config import CodeToolConfig
from deepeyes.tools import SandboxError, SandboxLimits, SandboxPool, connect_sandbox, daemon_command

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


def test_the_launchers_daemon_urls_make_a_pool_with_the_per_node_cap(tmp_path):
    token_file = new_token_file(tmp_path)
    cfg = CodeToolConfig(urls=["http://10.0.0.1:9000", "http://10.0.0.2:9000"], token_file=str(token_file), max_sessions=5)
    pool = connect_sandbox(cfg, tmp_path)
    assert isinstance(pool, SandboxPool) and pool.max_sessions == 5
    assert [daemon.url for daemon in pool.daemons] == cfg.urls
    with pytest.raises(ValueError, match="token_file"):
        connect_sandbox(CodeToolConfig(urls=cfg.urls), tmp_path)
