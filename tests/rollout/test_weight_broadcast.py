"""Weights by broadcast: a 2-rank gloo trainer (this process is its leader, rank 0; rank 1 is a
subprocess) and two hf rollout servers, all real processes on loopback. The leader broadcasts
over a group of its own beside the trainer's default group; every server must then hold the
trainer's weights bit for bit (SHA-256 of every parameter), also after a server restarts, and a
server killed mid-broadcast must fail nothing silently.

The restart and the kill run on loopback, because the test must restart one server and kill
another at a chosen moment and read every server's weights after every step, which the launcher
(rightly) does not expose. The last test runs the same broadcast in a real RL job on three nodes
of the local Slurm cluster: a 2-rank trainer on one, a rollout server on each of the others.
"""

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from deepeyes.config import ModelConfig
from deepeyes.rollout import weight_sync
from deepeyes.rollout.client import RolloutClient
from deepeyes.rollout.weight_sync import BroadcastFailed, BroadcastWeightSync, weights_digest
from deepeyes.service import LOOPBACK, auth_headers, free_port, local_services, read_token
from deepeyes.train.setup import load_policy
from tests.launch.conftest import slurm_cluster  # noqa: F401  (the fixture, for the Slurm job)
from tests.paths import REPO, TOY_RL
from tests.rollout.conftest import rollout_server

pytestmark = pytest.mark.slow

STEPS = 3


def train_step(model: torch.nn.Module, step: int) -> None:
    """What a data-parallel update does to the trained weights: each rank's own "gradient", summed
    over the trainer's default group, applied on every rank alike."""
    generator = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            update = torch.randn(param.shape, generator=generator)
            dist.all_reduce(update)
            param.add_(update, alpha=1e-3)


def follower(port: str, model_dir: str, digest_file: str) -> None:
    """Trainer rank 1: takes part in every update, never talks to a rollout server."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{LOOPBACK}:{port}", rank=1, world_size=2)
    policy = load_policy(ModelConfig(), model_dir)
    for step in range(1, STEPS + 1):
        train_step(policy.model, step)
    with open(digest_file, "w") as out:
        out.write(weights_digest(policy.model))
    dist.destroy_process_group()


def get(service, path):
    request = urllib.request.Request(service.url + path, headers=auth_headers(service.token))
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def post(service, path, body) -> tuple[int, dict]:
    request = urllib.request.Request(service.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={**auth_headers(service.token), "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def served_digests(servers):
    return [get(s, "/weights/digest")["sha256"] for s in servers]


@pytest.fixture
def trainer_world(tiny_dir, tmp_path):
    """This process as rank 0 of a 2-rank gloo trainer; yields rank 1's digest file."""
    if dist.is_initialized():  # an earlier in-process megatron run's world of one (init_parallel keeps it)
        dist.destroy_process_group()
    port = free_port()
    digest_file = tmp_path / "follower.sha256"
    code = "import sys; from tests.rollout.test_weight_broadcast import follower; follower(*sys.argv[1:])"
    rank1 = subprocess.Popen([sys.executable, "-c", code, str(port), str(tiny_dir), str(digest_file)], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    dist.init_process_group("gloo", init_method=f"tcp://{LOOPBACK}:{port}", rank=0, world_size=2)
    try:
        yield digest_file
    finally:
        dist.destroy_process_group()
        assert rank1.wait(timeout=120) == 0


def test_broadcast_leaves_every_server_bit_equal_to_the_trainer_after_each_step_and_a_restart(
    trainer_world, tiny_dir, token_file, tmp_path, monkeypatch
):
    servers = [rollout_server(f"rollout{i}", tiny_dir, token_file, tmp_path) for i in range(2)]
    with local_services(servers, ready_timeout_s=120):
        policy = load_policy(ModelConfig(), str(tiny_dir))
        # Packed buckets, vLLM's NCCL format (the other test runs the unpacked, in-place path).
        sync = BroadcastWeightSync(lambda: RolloutClient([s.url for s in servers], read_token(token_file)),
                                   LOOPBACK, timeout_s=60, packed=True)
        paused_when_sending = []  # every member must have paused before the first byte is broadcast
        real_send = weight_sync.send_buckets

        def send_once_all_paused(group, tensors, packed=True, *args):
            paused_when_sending.append([get(s, "/info")["weights_paused_for"] for s in servers])
            return real_send(group, tensors, packed, *args)

        monkeypatch.setattr(weight_sync, "send_buckets", send_once_all_paused)
        try:
            sync.publish(policy.model, 0, everything=True)  # as a job starts: the group forms once
            assert served_digests(servers) == [weights_digest(policy.model)] * 2
            for step in range(1, STEPS + 1):
                before = weights_digest(policy.model)
                train_step(policy.model, step)
                assert weights_digest(policy.model) != before
                if step == 2:  # a server restarts mid-job: back at the checkpoint, in no group
                    servers[1].stop()
                    servers[1].start()
                    servers[1].wait_ready(120)
                    assert get(servers[1], "/info")["weight_group"] is None
                    assert get(servers[1], "/info")["weight_version"] == 0
                sync.publish(policy.model, step)
                assert served_digests(servers) == [weights_digest(policy.model)] * 2, f"after step {step}"
                infos = [get(s, "/info") for s in servers]
                assert [i["weight_version"] for i in infos] == [step, step]
                assert infos[0]["weight_group"] == infos[1]["weight_group"] == sync.group_id
            assert sync.formations == 2  # once at the start, once to take the restarted server back in
            assert sum(sync.server_failures.values()) == 0
            assert paused_when_sending == [[version, version] for version in range(STEPS + 1)]
            leader_digest = weights_digest(policy.model)

            # `packed` was announced when the group formed: a pause for another wire format is refused.
            status, reply = post(servers[0], "/weights/pause", {"version": 99, "packed": False})
            assert status == 409 and "packed" in reply["error"]
            # A member that cannot pause (here: paused already) stops the broadcast before it starts:
            # the other member is resumed with its weights untouched, and the publish fails loudly.
            assert post(servers[1], "/weights/pause", {"version": 99, "packed": True}) == (200, {"paused": 99})
            with pytest.raises(BroadcastFailed, match="could not pause"):
                sync.publish(policy.model, STEPS + 1)
            assert len(paused_when_sending) == STEPS + 1  # nothing was broadcast
            assert [get(s, "/info")["weights_paused_for"] for s in servers] == [None, 99]
            assert get(servers[0], "/info")["weight_version"] == STEPS
            assert post(servers[1], "/weights/resume", {}) == (200, {"resumed": 99})
            assert served_digests(servers) == [leader_digest] * 2
        finally:
            sync.close()
    assert trainer_world.read_text() == leader_digest  # both trainer ranks hold what the servers hold


def test_a_server_killed_mid_broadcast_is_counted_and_the_others_get_the_version(
    tiny_dir, token_file, tmp_path, monkeypatch
):
    servers = [rollout_server(f"rollout{i}", tiny_dir, token_file, tmp_path) for i in range(2)]
    survivor, victim = servers
    with local_services(servers, ready_timeout_s=120):
        policy = load_policy(ModelConfig(), str(tiny_dir))
        # One broadcast per tensor, so the kill lands with half the tensors received everywhere.
        sync = BroadcastWeightSync(lambda: RolloutClient([s.url for s in servers], read_token(token_file)),
                                   LOOPBACK, timeout_s=60, packed=False)
        try:
            sync.publish(policy.model, 0, everything=True)
            with torch.no_grad():
                policy.model.lm_head.weight.mul_(-1.0)
            real_send = weight_sync.send_buckets
            attempts = []

            def send_and_kill_midway(group, tensors, packed=True, *args):
                attempts.append(len(attempts) + 1)
                tensors = list(tensors)
                if len(attempts) == 1:
                    real_send(group, tensors[: len(tensors) // 2], packed)
                    os.killpg(victim.process.pid, signal.SIGKILL)
                    victim.process.wait()
                    tensors = tensors[len(tensors) // 2:]
                return real_send(group, tensors, packed)

            monkeypatch.setattr(weight_sync, "send_buckets", send_and_kill_midway)
            sync.publish(policy.model, 1, everything=True)  # does not hang, does not raise: re-forms without it
            assert attempts == [1, 2]
            assert sync.server_failures[victim.url] >= 1
            assert get(survivor, "/info")["weight_version"] == 1
            assert get(survivor, "/weights/digest")["sha256"] == weights_digest(policy.model)
            assert sync.formations == 2
        finally:
            sync.close()


def test_an_rl_job_on_three_slurm_nodes_moves_its_weights_by_broadcast(slurm_cluster, tmp_path):  # noqa: F811
    result = subprocess.run(
        [sys.executable, "jobs/rl.py", *TOY_RL, "cluster=slurm", "cluster.wait=true", "nodes=3", "cluster.gpus_per_node=2",
         "cluster.cpus_per_node=2", "grpo.steps=2", "grpo.prompts_per_step=2", "rollout.n=2",
         "rollout.max_turn_tokens=32", "model.threads=1", "rollout.weight_sync=broadcast", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (run,) = (tmp_path / "launch").glob("run_*")
    nodes = {s["node"]: s for s in map(json.loads, map(Path.read_text, run.glob("node_*.json")))}
    rollout_nodes = [n for n, summary in nodes.items() if "rollout" in summary["roles"]]
    assert sorted(rollout_nodes) == [1, 2] and "trainer" in nodes[0]["roles"]
    assert len(list(run.glob("trainer_node0*.log"))) == 2  # a 2-rank trainer; its leader broadcasts
    assert "trainer + 4 servers" in (run / "trainer_node0.log").read_text()  # an engine per GPU of 2 nodes
    for node in rollout_nodes:
        logs = sorted(run.glob(f"rollout_node{node}_*.log"))
        assert len(logs) == 2
        for log in logs:
            text = log.read_text()
            assert "joined weight-broadcast group" in text and "received weight version 2" in text, log
    assert not list(tmp_path.glob("weights/*.safetensors"))  # no file moved the weights
