"""The node agent: one per allocated node, it runs that node's part of the launch plan.

    python -m deepeyes.launch.agent LAUNCH_DIR      # what a plain sbatch script runs (srun, one task per node)

It starts the node's service roles, waits for their /ready, tells the other nodes it is ready
(a marker file in the job's shared launch directory), and on the trainer's node starts the
trainer once every node is ready: one process per rank of a multi-rank trainer, each with its
RANK / LOCAL_RANK / WORLD_SIZE (as torchrun sets them). Every role gets the rendezvous
environment: MASTER_ADDR / MASTER_PORT from the allocation, NODE_RANK from SLURMD_NODENAME (all
nodes of the test cluster share one hostname), the job's token file, and the URLs of every
service in the plan.

The job fails fast and says why: a role that exits or is not ready in time writes a `failed`
marker naming the node, role and log; every agent sees it within a fraction of a second, stops
its roles and exits non-zero (srun --kill-on-bad-exit ends the rest). Roles are stopped however
the agent ends. SIGUSR2 (Slurm's warning before the time limit or preemption) is passed to the
trainer, which checkpoints at the end of its step and exits with REQUEUE_EXIT_CODE; the job is
then requeued and resumes from that checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from deepeyes.launch.logs import setup_logging
from deepeyes.launch.plan import HOST, PORT, TOKEN_FILE, LaunchPlan, Role
from deepeyes.train.preemption import REQUEUE_EXIT_CODE, STOP_SIGNAL
from deepeyes.service import LOOPBACK, LocalService, read_token

log = logging.getLogger(__name__)

POLL_S = 0.2


class LaunchError(RuntimeError):
    """A role failed to start, to become ready, or died; the message names node, role and log."""


@dataclass
class Allocation:
    """Where this agent runs: the job, its nodes in order, and which of them this is."""

    job_id: int
    restart: int  # how many times the job was requeued before this run
    hostnames: list[str]
    node: int

    @classmethod
    def from_environment(cls) -> "Allocation":
        if "SLURM_JOB_ID" not in os.environ:
            return cls(os.getpid(), 0, [socket.gethostname()], 0)
        hostnames = subprocess.run(
            ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
            check=True, capture_output=True, text=True,
        ).stdout.split()
        # SLURMD_NODENAME, not the hostname: several Slurm nodes may share one host.
        name = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        if name not in hostnames:
            raise LaunchError(f"this node ({name}) is not in the job's node list {hostnames}")
        return cls(
            int(os.environ["SLURM_JOB_ID"]), int(os.environ.get("SLURM_RESTART_COUNT", "0")), hostnames,
            hostnames.index(name),
        )

    def address(self, node: int) -> str:
        return socket.gethostbyname(self.hostnames[node])


class NodeAgent:
    def __init__(self, launch_dir: Path, plan: LaunchPlan, allocation: Allocation):
        self.launch_dir = launch_dir
        self.plan = plan
        self.allocation = allocation
        # Markers and role logs of this run (a requeued job gets a fresh directory).
        self.run_dir = launch_dir / f"run_{allocation.job_id}_{allocation.restart}"
        self.token_file = launch_dir / "service_token"
        self.trainers: list[LocalService] = []  # the trainer's ranks on this node, leader first
        self.services: list[LocalService] = []
        self.timings: dict[str, float] = {"agent_start": time.time()}

    @classmethod
    def from_launch_dir(cls, launch_dir: Path) -> "NodeAgent":
        plan = LaunchPlan.from_json((launch_dir / "plan.json").read_text())
        allocation = Allocation.from_environment()
        if len(allocation.hostnames) != plan.nodes:
            raise LaunchError(f"the plan needs {plan.nodes} nodes; the allocation has {allocation.hostnames}")
        return cls(launch_dir, plan, allocation)

    @property
    def node_name(self) -> str:
        return f"node {self.allocation.node} ({self.allocation.hostnames[self.allocation.node]})"

    def run(self) -> dict:
        """Run this node's roles until the job is done; return what ran where and when."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        roles = self.plan.roles_on(self.allocation.node)
        # SIGTERM means the job is ending (cancelled, requeued, out of time): stop the roles and
        # leave quietly, without reporting the roles' deaths as a failure of this run.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        try:
            services = [r for r in roles if not r.main]
            for role in services:
                self.services.append(self._start(role))
            trainer = next((r for r in roles if r.main), None)
            if trainer is not None:
                # Started now, it imports while the services load, then waits until every node is ready.
                self.trainers = [self._start(trainer, rank) for rank in range(trainer.processes)]
                self.timings["trainer_start"] = time.time()
            self._wait_until_ready(services)
            self.timings["services_ready"] = time.time()
            self._mark("ready", "")
            exit_code = self._watch()
        except LaunchError as error:
            self._mark("failed", str(error))
            raise
        finally:
            self._stop()
        summary = {
            "node": self.allocation.node, "hostname": self.allocation.hostnames[self.allocation.node],
            "slurmd_nodename": os.environ.get("SLURMD_NODENAME"), "job_id": self.allocation.job_id,
            "restart": self.allocation.restart, "roles": [r.name for r in roles],
            "services": {s.name: s.url for s in self.services}, "trainer_exit_code": exit_code,
            "timings": self.timings,
        }
        (self.run_dir / f"node_{self.allocation.node}.json").write_text(json.dumps(summary, indent=1))
        return summary

    def stop_trainer_for_requeue(self, timeout_s: float) -> bool:
        """Ask the trainer to checkpoint and stop (SIGUSR2); True once it exited for a requeue."""
        if not self.trainers:
            return False
        self.signal_trainer(STOP_SIGNAL)
        deadline = time.monotonic() + timeout_s
        try:
            codes = [rank.process.wait(max(deadline - time.monotonic(), 0)) for rank in self.trainers]
        except subprocess.TimeoutExpired:
            log.warning("trainer did not checkpoint within %.0f s of the stop signal", timeout_s)
            return False
        return codes[0] == REQUEUE_EXIT_CODE

    def signal_trainer(self, signum: int) -> None:
        for rank in self.trainers:
            with contextlib.suppress(ProcessLookupError):
                rank.process.send_signal(signum)

    # ---- roles ---------------------------------------------------------------------------------

    def _service(self, role: Role, rank: int = 0) -> LocalService:
        job_id = self.allocation.job_id
        host = LOOPBACK if role.node_local else self.allocation.address(role.node)
        port = self.plan.port(role, job_id) if role.serves else self.plan.rendezvous_port(job_id)
        fill = {PORT: str(port), HOST: host, TOKEN_FILE: str(self.token_file)}
        argv = [fill.get(part, part) for part in role.command]
        env = self._rendezvous_env() | {
            "RANK": str(role.first_rank + rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(role.world_size),
        }
        if self.plan.gpus_per_node:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(self.plan.gpus_per_node))))
            env["CUDA_VISIBLE_DEVICES"] = ",".join(visible.split(",")[i] for i in role.gpus)
        log_path = self.run_dir / self.plan.log_name(role, rank)
        return LocalService(role.name, argv, port, read_token(self.token_file), log_path, host=host, env=env,
                            clean_environment=not role.inherit_environment, secrets=role.secrets)

    def _rendezvous_env(self) -> dict[str, str]:
        job_id = self.allocation.job_id
        services: dict[str, list[str]] = {}  # every service this node can reach
        for role in self.plan.roles:
            if role.serves and not (role.node_local and role.node != self.allocation.node):
                host = LOOPBACK if role.node_local else self.allocation.address(role.node)
                services.setdefault(role.name, []).append(f"http://{host}:{self.plan.port(role, job_id)}")
        return {
            "MASTER_ADDR": self.allocation.address(0),
            "MASTER_PORT": str(self.plan.rendezvous_port(job_id)),
            "NODE_RANK": str(self.allocation.node),
            "NNODES": str(self.plan.nodes),
            "DEEPEYES_TOKEN_FILE": str(self.token_file),
            "DEEPEYES_SERVICES": json.dumps(services),
            "DEEPEYES_RUN_DIR": str(self.run_dir),
        }

    def _start(self, role: Role, rank: int = 0) -> LocalService:
        service = self._service(role, rank)
        # Slurm signals every process of a job step: services must outlive SIGUSR2 until the
        # trainer has checkpointed, and the trainer must not die of it while it loads (its loop
        # takes the signal over). An ignored signal stays ignored across exec.
        previous = signal.signal(STOP_SIGNAL, signal.SIG_IGN)
        try:
            service.start()
        except OSError as error:
            raise LaunchError(f"{self.node_name}: role {role.name} could not start {role.command}: {error}") from None
        finally:
            signal.signal(STOP_SIGNAL, previous)
        return service

    def _wait_until_ready(self, roles: list[Role]) -> None:
        """Until every role with a ready check answers; fails as soon as one exits, time runs out,
        or another node fails."""
        deadline = time.monotonic() + self.plan.ready_timeout_s
        pending = [(role, service) for role, service in zip(roles, self.services) if role.ready]
        while pending:
            for role, service in list(pending):
                try:
                    service.wait_ready(0)  # one look: raises TimeoutError while not ready yet
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise LaunchError(
                            f"{self.node_name}: role {role.name} failed its health check: not ready on "
                            f"{service.url} after {self.plan.ready_timeout_s:.0f} s; last log lines "
                            f"({service.log_path}):\n{service.log_tail()}"
                        ) from None
                    continue
                except RuntimeError as error:  # it exited
                    raise LaunchError(f"{self.node_name}: role {role.name} failed its health check: {error}") from None
                pending.remove((role, service))
                self.timings[f"{role.name}_ready"] = time.time()
            self._raise_if_another_node_failed()
            time.sleep(POLL_S)

    def _watch(self) -> int | None:
        """Until the trainer exits (its node) or the job is done (other nodes); the trainer's exit code."""
        while True:
            for service in self.services:
                if service.process.poll() is not None:
                    raise LaunchError(
                        f"{self.node_name}: role {service.name} exited with code {service.process.returncode}; "
                        f"last log lines ({service.log_path}):\n{service.log_tail()}"
                    )
            self._raise_if_another_node_failed()
            codes = [rank.process.poll() for rank in self.trainers]
            for rank, code in zip(self.trainers, codes):
                if code not in (None, 0, REQUEUE_EXIT_CODE):  # one failed rank fails the job, not a hang
                    raise LaunchError(
                        f"{self.node_name}: the trainer ({rank.log_path.stem}) exited with code {code}; "
                        f"last log lines ({rank.log_path}):\n{rank.log_tail()}"
                    )
            if self.trainers and None not in codes:
                self.timings["trainer_exit"] = time.time()
                if codes[0] == 0:
                    self._mark("done", "")
                return codes[0]
            if not self.trainers and any(self.run_dir.glob("done_*")):
                return None
            time.sleep(POLL_S)

    def _raise_if_another_node_failed(self) -> None:
        for marker in self.run_dir.glob("failed_*"):
            raise LaunchError(f"{self.node_name} stops: another node failed: {marker.read_text()}")

    def _mark(self, what: str, message: str) -> None:
        (self.run_dir / f"{what}_{self.allocation.node}").write_text(message)

    def _stop(self) -> None:
        for rank in self.trainers:
            rank.stop()
        for service in reversed(self.services):
            service.stop()


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def wait_for_all_nodes(run_dir: Path, nodes: int, timeout_s: float) -> None:
    """Until every node's agent has marked its roles ready (the trainer waits for this)."""
    deadline = time.monotonic() + timeout_s
    while len(list(run_dir.glob("ready_*"))) < nodes:
        if time.monotonic() > deadline:
            ready = sorted(p.name for p in run_dir.glob("ready_*"))
            raise LaunchError(f"not every node was ready after {timeout_s:.0f} s (ready: {ready})")
        time.sleep(POLL_S)


def failure_messages(launch_dir: Path) -> list[str]:
    """What the nodes of every run of this job reported when they failed, newest run last."""
    runs = sorted(launch_dir.glob("run_*"), key=lambda p: p.stat().st_mtime)
    return [marker.read_text() for run in runs for marker in sorted(run.glob("failed_*"))]


def main(argv: list[str] | None = None) -> int:
    """The agent as a plain command (sbatch scripts); requeues the job itself after a checkpoint."""
    setup_logging()
    launch_dir = Path((argv or sys.argv[1:])[0])
    agent = NodeAgent.from_launch_dir(launch_dir)
    # The trainer gets Slurm's SIGUSR2 itself; passing it on also covers a signal sent to the batch shell only.
    signal.signal(STOP_SIGNAL, lambda signum, frame: agent.signal_trainer(signum))
    summary = agent.run()
    if summary["trainer_exit_code"] == REQUEUE_EXIT_CODE and agent.allocation.node == 0:  # one requeue per job
        restarts = agent.allocation.restart
        if restarts >= agent.plan.max_requeues:
            raise LaunchError(f"preempted after {restarts} requeues (cluster.max_requeues); not requeued again")
        subprocess.run(["scontrol", "requeue", str(agent.allocation.job_id)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
